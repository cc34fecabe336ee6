/*
 * train/safetensors.c - the safetensors reader (mmap + validation) and streaming writer.
 *
 * Format and checks: train/safetensors.h.  The data is little-endian on disk; the conversions below
 * assemble and split the bytes explicitly, so the code is right whatever the host's byte order.
 */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE	/* madvise */

#include "train/safetensors.h"
#include "launch/errmsg.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

/* JSON numbers are doubles: offsets and dimensions are exact up to 2^53. */
#define ST_MAX_INT 9007199254740992.0

static const struct {
	const char *name;
	size_t size;
} dtypes[ST_N_DTYPES] = {
	[ST_F32] = { "F32", 4 },
	[ST_F16] = { "F16", 2 },
	[ST_BF16] = { "BF16", 2 },
	[ST_F64] = { "F64", 8 },
	[ST_I64] = { "I64", 8 },
	[ST_U64] = { "U64", 8 },
	[ST_I32] = { "I32", 4 },
	[ST_U32] = { "U32", 4 },
	[ST_I16] = { "I16", 2 },
	[ST_U16] = { "U16", 2 },
	[ST_I8] = { "I8", 1 },
	[ST_U8] = { "U8", 1 },
	[ST_BOOL] = { "BOOL", 1 },
	[ST_F8_E4M3] = { "F8_E4M3", 1 },
	[ST_F8_E5M2] = { "F8_E5M2", 1 },
};

const char *st_dtype_name(enum st_dtype t)
{
	return (unsigned)t < ST_N_DTYPES ? dtypes[t].name : "?";
}

size_t st_dtype_size(enum st_dtype t)
{
	return (unsigned)t < ST_N_DTYPES ? dtypes[t].size : 0;
}

int st_dtype_parse(const char *name, enum st_dtype *t)
{
	for (int i = 0; i < ST_N_DTYPES; i++) {
		if (!strcmp(name, dtypes[i].name)) {
			*t = (enum st_dtype)i;
			return 0;
		}
	}
	return -1;
}


/* ---- conversions ---- */

static float f32_of_bits(uint32_t u)
{
	float f;

	memcpy(&f, &u, sizeof(f));
	return f;
}

static uint32_t bits_of_f32(float f)
{
	uint32_t u;

	memcpy(&u, &f, sizeof(u));
	return u;
}

float st_bf16_to_f32(uint16_t h)
{
	return f32_of_bits((uint32_t)h << 16);
}

uint16_t st_f32_to_bf16(float f)
{
	uint32_t u = bits_of_f32(f);

	if ((u & 0x7fffffffu) > 0x7f800000u)          /* NaN: keep it a (quiet) NaN */
		return (uint16_t)((u >> 16) | 0x40);
	u += 0x7fffu + ((u >> 16) & 1);               /* round to nearest, ties to even */
	return (uint16_t)(u >> 16);
}

float st_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000) << 16;
	uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;

	if (exp == 0x1f)                              /* inf, NaN */
		return f32_of_bits(sign | 0x7f800000u | (man << 13));
	if (exp == 0) {
		int e = 113;                          /* 127 - 15 + 1 */

		if (!man)
			return f32_of_bits(sign);
		while (!(man & 0x400)) {              /* subnormal: normalise */
			man <<= 1;
			e--;
		}
		return f32_of_bits(sign | ((uint32_t)e << 23) | ((man & 0x3ff) << 13));
	}
	return f32_of_bits(sign | ((exp + 112) << 23) | (man << 13));
}

/*
 * float8_e4m3fn (OCP's E4M3): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits, subnormals below
 * 2^-6, no infinities, S.1111.111 is NaN, 448 the largest finite value.
 */
float st_f8e4m3_to_f32(uint8_t b)
{
	int e = (b >> 3) & 0xf, m = b & 7;
	float v;

	if (e == 0xf && m == 7)
		return (b & 0x80) ? -NAN : NAN;
	v = e ? ldexpf((float)(8 + m), e - 10) : ldexpf((float)m, -9);
	return (b & 0x80) ? -v : v;
}

/*
 * Nearest E4M3 value, ties to even (the mantissa's last bit is the code's), as torch's cast: a
 * magnitude beyond 448 saturates to 448 (the callers scale into range first), NaN and infinities
 * become NaN.  Exact: the scaled mantissa below is a float with at most 24 significant bits.
 */
uint8_t st_f32_to_f8e4m3(float f)
{
	uint8_t sign = signbit(f) ? 0x80 : 0;
	float a = fabsf(f), q;
	int e;

	if (!isfinite(a))
		return sign | 0x7f;
	if (a >= 448.0f)
		return sign | 0x7e;
	if (a < 0x1p-6f)                      /* subnormal: steps of 2^-9; 8 steps is 2^-6, code 8 */
		return sign | (uint8_t)rintf(a * 512.0f);
	frexpf(a, &e);                        /* a = [0.5, 1) x 2^e */
	e -= 1;                               /* a = [1, 2) x 2^e, e in [-6, 8] */
	q = rintf((ldexpf(a, -e) - 1.0f) * 8.0f);
	if (q == 8.0f) {
		q = 0;
		e++;
	}
	if (e + 7 > 15 || (e + 7 == 15 && q > 6))
		return sign | 0x7e;
	return sign | (uint8_t)((e + 7) << 3 | (int)q);
}

static uint64_t load_le64(const uint8_t *p)
{
	uint64_t v = 0;

	for (int i = 7; i >= 0; i--)
		v = (v << 8) | p[i];
	return v;
}

/* ---- reading ---- */

static int json_uint(const cJSON *v, uint64_t *out)
{
	if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0) || v->valuedouble > ST_MAX_INT ||
	    v->valuedouble != floor(v->valuedouble))
		return -1;
	*out = (uint64_t)v->valuedouble;
	return 0;
}

/* One tensor entry of the header into t; the message names the tensor. */
static int parse_tensor(const struct st_file *f, const cJSON *e, struct st_tensor *t, char *err,
			size_t errlen)
{
	const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
	const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
	const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
	const cJSON *d;
	uint64_t numel = 1, bytes, dim;

	if (!cJSON_IsObject(e))
		return set_err(err, errlen, "%s: tensor %s: header entry is not an object", f->path,
			       e->string);
	if (!cJSON_IsString(dt))
		return set_err(err, errlen, "%s: tensor %s: no \"dtype\" string", f->path, e->string);
	if (st_dtype_parse(dt->valuestring, &t->dtype))
		return set_err(err, errlen, "%s: tensor %s: unknown dtype \"%s\"", f->path, e->string,
			       dt->valuestring);
	if (!cJSON_IsArray(sh))
		return set_err(err, errlen, "%s: tensor %s: no \"shape\" array", f->path, e->string);
	if (cJSON_GetArraySize(sh) > ST_MAX_DIMS)
		return set_err(err, errlen, "%s: tensor %s: %d dimensions (at most %d)", f->path,
			       e->string, cJSON_GetArraySize(sh), ST_MAX_DIMS);
	t->ndim = 0;
	cJSON_ArrayForEach(d, sh) {
		if (json_uint(d, &dim))
			return set_err(err, errlen, "%s: tensor %s: shape holds something other than a "
				       "non-negative integer", f->path, e->string);
		if (dim && numel > (UINT64_C(1) << 60) / dim)
			return set_err(err, errlen, "%s: tensor %s: shape too large", f->path, e->string);
		numel *= dim;
		t->shape[t->ndim++] = (int64_t)dim;
	}
	if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 ||
	    json_uint(cJSON_GetArrayItem(off, 0), &t->begin) ||
	    json_uint(cJSON_GetArrayItem(off, 1), &t->end))
		return set_err(err, errlen, "%s: tensor %s: \"data_offsets\" is not [begin, end]", f->path,
			       e->string);
	t->numel = numel;
	bytes = numel * st_dtype_size(t->dtype);
	if (t->end < t->begin)
		return set_err(err, errlen, "%s: tensor %s: data_offsets [%llu, %llu] end before they "
			       "begin", f->path, e->string, (unsigned long long)t->begin,
			       (unsigned long long)t->end);
	if (t->end > f->data_len)
		return set_err(err, errlen, "%s: tensor %s: data_offsets [%llu, %llu] run past the data "
			       "section (%llu bytes): file truncated or corrupt", f->path, e->string,
			       (unsigned long long)t->begin, (unsigned long long)t->end,
			       (unsigned long long)f->data_len);
	if (t->end - t->begin != bytes)
		return set_err(err, errlen, "%s: tensor %s: data_offsets [%llu, %llu] hold %llu bytes, "
			       "but %s of %llu elements needs %llu", f->path, e->string,
			       (unsigned long long)t->begin, (unsigned long long)t->end,
			       (unsigned long long)(t->end - t->begin), st_dtype_name(t->dtype),
			       (unsigned long long)numel, (unsigned long long)bytes);
	t->name = strdup(e->string);
	if (!t->name)
		return set_err(err, errlen, "%s: out of memory", f->path);
	return 0;
}

static int parse_metadata(struct st_file *f, const cJSON *m, char *err, size_t errlen)
{
	const cJSON *e;
	int n = cJSON_GetArraySize(m);

	if (!cJSON_IsObject(m))
		return set_err(err, errlen, "%s: __metadata__ is not an object", f->path);
	f->meta_keys = calloc(n ? n : 1, sizeof(char *));
	f->meta_values = calloc(n ? n : 1, sizeof(char *));
	if (!f->meta_keys || !f->meta_values)
		return set_err(err, errlen, "%s: out of memory", f->path);
	cJSON_ArrayForEach(e, m) {
		if (!cJSON_IsString(e))
			return set_err(err, errlen, "%s: __metadata__.%s is not a string", f->path,
				       e->string);
		f->meta_keys[f->n_meta] = strdup(e->string);
		f->meta_values[f->n_meta] = strdup(e->valuestring);
		f->n_meta++;
		if (!f->meta_keys[f->n_meta - 1] || !f->meta_values[f->n_meta - 1])
			return set_err(err, errlen, "%s: out of memory", f->path);
	}
	return 0;
}

static int by_begin(const void *a, const void *b)
{
	const struct st_tensor *x = *(const struct st_tensor *const *)a;
	const struct st_tensor *y = *(const struct st_tensor *const *)b;

	if (x->begin != y->begin)
		return x->begin < y->begin ? -1 : 1;
	return x->end < y->end ? -1 : x->end > y->end;
}

static int by_name(const void *a, const void *b)
{
	return strcmp((*(const struct st_tensor *const *)a)->name,
		      (*(const struct st_tensor *const *)b)->name);
}

/* No two tensors share a byte and no name repeats. */
static int check_layout(struct st_file *f, char *err, size_t errlen)
{
	int n = f->n_tensors;
	const struct st_tensor **t = malloc(sizeof(*t) * (n > 0 ? (size_t)n : 1));
	const struct st_tensor *prev = NULL;
	int rc = 0;

	if (!t)
		return set_err(err, errlen, "%s: out of memory", f->path);
	for (int i = 0; i < n; i++)
		t[i] = &f->tensors[i];
	qsort(t, n, sizeof(*t), by_name);
	for (int i = 1; i < n && !rc; i++)
		if (!strcmp(t[i]->name, t[i - 1]->name))
			rc = set_err(err, errlen, "%s: tensor %s appears twice in the header", f->path,
				     t[i]->name);
	qsort(t, n, sizeof(*t), by_begin);
	for (int i = 0; i < n && !rc; i++) {
		if (t[i]->begin == t[i]->end)
			continue;
		if (prev && t[i]->begin < prev->end)
			rc = set_err(err, errlen, "%s: tensor %s: data_offsets [%llu, %llu] overlap those "
				     "of tensor %s [%llu, %llu]", f->path, t[i]->name,
				     (unsigned long long)t[i]->begin, (unsigned long long)t[i]->end,
				     prev->name, (unsigned long long)prev->begin,
				     (unsigned long long)prev->end);
		prev = t[i];
	}
	free(t);
	return rc;
}

static int parse_header(struct st_file *f, const char *text, char *err, size_t errlen)
{
	const char *end = NULL;
	cJSON *root = cJSON_ParseWithOpts(text, &end, 1), *e;
	int n, rc = 0;

	if (!root)
		return set_err(err, errlen, "%s: header is not valid JSON (near byte %ld of %zu)", f->path,
			       end ? (long)(end - text) : 0L, strlen(text));
	if (!cJSON_IsObject(root)) {
		rc = set_err(err, errlen, "%s: header is not a JSON object", f->path);
		goto out;
	}
	n = cJSON_GetArraySize(root);
	f->tensors = calloc(n ? n : 1, sizeof(*f->tensors));
	if (!f->tensors) {
		rc = set_err(err, errlen, "%s: out of memory", f->path);
		goto out;
	}
	cJSON_ArrayForEach(e, root) {
		if (!strcmp(e->string, "__metadata__")) {
			if (f->meta_keys) {
				rc = set_err(err, errlen, "%s: __metadata__ appears twice", f->path);
				break;
			}
			rc = parse_metadata(f, e, err, errlen);
		} else {
			rc = parse_tensor(f, e, &f->tensors[f->n_tensors], err, errlen);
			if (!rc)
				f->n_tensors++;
		}
		if (rc)
			break;
	}
	if (!rc)
		rc = check_layout(f, err, errlen);
out:
	cJSON_Delete(root);
	return rc;
}

static void reset(struct st_file *f)
{
	memset(f, 0, sizeof(*f));
	f->fd = -1;
}

int st_open(struct st_file *f, const char *path, char *err, size_t errlen)
{
	struct stat sb;
	uint64_t hlen;
	char *text = NULL;
	int rc = -1;

	reset(f);
	f->path = strdup(path);
	if (!f->path)
		return set_err(err, errlen, "%s: out of memory", path);
	f->fd = open(path, O_RDONLY | O_CLOEXEC);
	if (f->fd < 0) {
		set_err(err, errlen, "%s: %s", path, strerror(errno));
		goto out;
	}
	if (fstat(f->fd, &sb) || !S_ISREG(sb.st_mode)) {
		set_err(err, errlen, "%s: not a regular file", path);
		goto out;
	}
	f->size = (size_t)sb.st_size;
	if (f->size < 8) {
		set_err(err, errlen, "%s: %zu bytes: too short for a safetensors file (8-byte header "
		        "length)", path, f->size);
		goto out;
	}
	f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, f->fd, 0);
	if (f->map == MAP_FAILED) {
		f->map = NULL;
		set_err(err, errlen, "%s: mmap: %s", path, strerror(errno));
		goto out;
	}
	hlen = load_le64(f->map);
	if (hlen < 2 || hlen > ST_MAX_HEADER || hlen > f->size - 8) {
		set_err(err, errlen, "%s: header length %llu is impossible for a file of %zu bytes "
		        "(not safetensors, or truncated)", path, (unsigned long long)hlen, f->size);
		goto out;
	}
	if (f->map[8] != '{') {
		set_err(err, errlen, "%s: header does not start with '{' (not safetensors)", path);
		goto out;
	}
	text = malloc(hlen + 1);
	if (!text) {
		set_err(err, errlen, "%s: out of memory", path);
		goto out;
	}
	memcpy(text, f->map + 8, hlen);
	text[hlen] = '\0';
	if (strlen(text) != hlen) {
		set_err(err, errlen, "%s: header contains a NUL byte", path);
		goto out;
	}
	f->data = f->map + 8 + hlen;
	f->data_len = f->size - 8 - hlen;
	rc = parse_header(f, text, err, errlen);
out:
	free(text);
	if (rc)
		st_close(f);
	return rc;
}

void st_close(struct st_file *f)
{
	for (int i = 0; f->tensors && i < f->n_tensors; i++)
		free(f->tensors[i].name);
	free(f->tensors);
	for (int i = 0; i < f->n_meta; i++) {
		free(f->meta_keys[i]);
		free(f->meta_values[i]);
	}
	free(f->meta_keys);
	free(f->meta_values);
	if (f->map)
		munmap(f->map, f->size);
	if (f->fd >= 0)
		close(f->fd);
	free(f->path);
	reset(f);
}

/* A linear search: fine for the few lookups by name a caller makes. */
const struct st_tensor *st_find(const struct st_file *f, const char *name)
{
	for (int i = 0; i < f->n_tensors; i++)
		if (!strcmp(f->tensors[i].name, name))
			return &f->tensors[i];
	return NULL;
}

/*
 * Reading a tensor also maps some pages of its neighbours: the kernel maps the cached pages around each
 * fault ("fault-around", 64 KiB by default).  st_release drops this much on either side as well.
 */
#define ST_RELEASE_MARGIN ((uintptr_t)1 << 20)

void st_release(const struct st_file *f, const struct st_tensor *t)
{
	const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
	const uintptr_t map_lo = (uintptr_t)f->map, map_hi = map_lo + f->size;
	uintptr_t lo = (uintptr_t)(f->data + t->begin), hi = (uintptr_t)(f->data + t->end);

	if (!f->map || t->end <= t->begin)
		return;
	/*
	 * Whole pages, widened: a neighbour that loses pages loses nothing else, as the mapping is
	 * read-only and private (never written), so a page dropped here is read from the file again
	 * (usually from the page cache) if it is touched later.
	 */
	lo = lo - map_lo > ST_RELEASE_MARGIN ? lo - ST_RELEASE_MARGIN : map_lo;
	hi = map_hi - hi > ST_RELEASE_MARGIN ? hi + ST_RELEASE_MARGIN : map_hi;
	lo &= ~(page - 1);
	hi = (hi + page - 1) & ~(page - 1);
	madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

const char *st_metadata(const struct st_file *f, const char *key)
{
	for (int i = 0; i < f->n_meta; i++)
		if (!strcmp(f->meta_keys[i], key))
			return f->meta_values[i];
	return NULL;
}

int st_read_f32(const struct st_file *f, const struct st_tensor *t, float *out, char *err,
		size_t errlen)
{
	const uint8_t *p = f->data + t->begin;
	int64_t n = (int64_t)t->numel;

	switch (t->dtype) {
	case ST_F32:
#pragma omp parallel for schedule(static) if (n > (1 << 20))
		for (int64_t i = 0; i < n; i++) {
			const uint8_t *q = p + 4 * i;

			out[i] = f32_of_bits((uint32_t)q[0] | (uint32_t)q[1] << 8 |
					     (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24);
		}
		return 0;
	case ST_BF16:
#pragma omp parallel for schedule(static) if (n > (1 << 20))
		for (int64_t i = 0; i < n; i++)
			out[i] = st_bf16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
		return 0;
	case ST_F16:
#pragma omp parallel for schedule(static) if (n > (1 << 20))
		for (int64_t i = 0; i < n; i++)
			out[i] = st_f16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
		return 0;
	case ST_F8_E4M3:
#pragma omp parallel for schedule(static) if (n > (1 << 20))
		for (int64_t i = 0; i < n; i++)
			out[i] = st_f8e4m3_to_f32(p[i]);
		return 0;
	default:
		return set_err(err, errlen, "%s: tensor %s: dtype %s cannot be read as float32 (F32, F16, "
			       "BF16 and F8_E4M3 can)", f->path, t->name, st_dtype_name(t->dtype));
	}
}

/* ---- writing ---- */

#define WBUF_ELEMS 16384

struct st_out {
	char *name;
	enum st_dtype dtype;
	uint64_t numel;
};

struct st_writer {
	char *path, *tmp;
	FILE *fp;
	int n, cur;                 /* tensors; the one being written */
	uint64_t done;              /* elements of tensor cur written */
	struct st_out *t;
	uint8_t buf[WBUF_ELEMS * 4];
};

uint64_t st_spec_bytes(const struct st_spec *s)
{
	uint64_t n = 1;

	for (int d = 0; d < s->ndim; d++)
		n *= (uint64_t)s->shape[d];
	return n * st_dtype_size(s->dtype);
}

static void writer_free(struct st_writer *w)
{
	if (!w)
		return;
	for (int i = 0; w->t && i < w->n; i++)
		free(w->t[i].name);
	free(w->t);
	free(w->path);
	free(w->tmp);
	free(w);
}

static cJSON *raw_u64(uint64_t v)
{
	char num[32];

	snprintf(num, sizeof(num), "%llu", (unsigned long long)v);
	return cJSON_CreateRaw(num);
}

/* The header JSON for specs, offsets laid out one after another. */
static char *build_header(const struct st_spec *specs, int n, const char *const *meta)
{
	cJSON *root = cJSON_CreateObject(), *m, *e, *a;
	uint64_t off = 0;
	char *text = NULL;

	if (!root)
		return NULL;
	if (meta && meta[0]) {
		m = cJSON_AddObjectToObject(root, "__metadata__");
		for (int i = 0; m && meta[i] && meta[i + 1]; i += 2)
			if (!cJSON_AddStringToObject(m, meta[i], meta[i + 1]))
				goto out;
		if (!m)
			goto out;
	}
	for (int i = 0; i < n; i++) {
		uint64_t bytes = st_spec_bytes(&specs[i]);

		e = cJSON_AddObjectToObject(root, specs[i].name);
		if (!e || !cJSON_AddStringToObject(e, "dtype", st_dtype_name(specs[i].dtype)))
			goto out;
		a = cJSON_AddArrayToObject(e, "shape");
		for (int d = 0; a && d < specs[i].ndim; d++)
			cJSON_AddItemToArray(a, raw_u64((uint64_t)specs[i].shape[d]));
		if (!a)
			goto out;
		a = cJSON_AddArrayToObject(e, "data_offsets");
		if (!a)
			goto out;
		cJSON_AddItemToArray(a, raw_u64(off));
		cJSON_AddItemToArray(a, raw_u64(off + bytes));
		off += bytes;
	}
	text = cJSON_PrintUnformatted(root);
out:
	cJSON_Delete(root);
	return text;
}

static int check_specs(const char *path, const struct st_spec *specs, int n, char *err,
		       size_t errlen)
{
	if (n < 0)
		return set_err(err, errlen, "%s: %d tensors", path, n);
	for (int i = 0; i < n; i++) {
		const struct st_spec *s = &specs[i];

		if (!s->name || !s->name[0] || !strcmp(s->name, "__metadata__"))
			return set_err(err, errlen, "%s: tensor %d: empty or reserved name", path, i);
		if (s->dtype != ST_F32 && s->dtype != ST_BF16 && s->dtype != ST_F8_E4M3)
			return set_err(err, errlen, "%s: tensor %s: cannot write dtype %s (F32, BF16 or "
				       "F8_E4M3)",
				       path, s->name, st_dtype_name(s->dtype));
		if (s->ndim < 0 || s->ndim > ST_MAX_DIMS)
			return set_err(err, errlen, "%s: tensor %s: %d dimensions", path, s->name,
				       s->ndim);
		for (int d = 0; d < s->ndim; d++)
			if (s->shape[d] < 0)
				return set_err(err, errlen, "%s: tensor %s: negative dimension", path,
					       s->name);
		for (int j = 0; j < i; j++)
			if (!strcmp(specs[j].name, s->name))
				return set_err(err, errlen, "%s: tensor %s listed twice", path, s->name);
	}
	return 0;
}

struct st_writer *st_writer_open(const char *path, const struct st_spec *specs, int n,
				 const char *const *meta, char *err, size_t errlen)
{
	struct st_writer *w;
	char *header = NULL;
	uint8_t len8[8];
	size_t hlen, padded;

	if (check_specs(path, specs, n, err, errlen))
		return NULL;
	w = calloc(1, sizeof(*w));
	if (!w)
		goto oom;
	w->n = n;
	w->path = strdup(path);
	w->tmp = malloc(strlen(path) + 5);
	w->t = calloc(n > 0 ? (size_t)n : 1, sizeof(*w->t));
	if (!w->path || !w->tmp || !w->t)
		goto oom;
	sprintf(w->tmp, "%s.tmp", path);
	for (int i = 0; i < n; i++) {
		w->t[i].name = strdup(specs[i].name);
		w->t[i].dtype = specs[i].dtype;
		w->t[i].numel = st_spec_bytes(&specs[i]) / st_dtype_size(specs[i].dtype);
		if (!w->t[i].name)
			goto oom;
	}
	header = build_header(specs, n, meta);
	if (!header)
		goto oom;
	hlen = strlen(header);
	padded = (hlen + 7) & ~(size_t)7;  /* the data section starts 8-byte aligned */
	for (int i = 0; i < 8; i++)
		len8[i] = (uint8_t)((uint64_t)padded >> (8 * i));
	w->fp = fopen(w->tmp, "wb");
	if (!w->fp) {
		set_err(err, errlen, "%s: %s", w->tmp, strerror(errno));
		goto bad;
	}
	if (fwrite(len8, 1, 8, w->fp) != 8 || fwrite(header, 1, hlen, w->fp) != hlen ||
	    fprintf(w->fp, "%*s", (int)(padded - hlen), "") < 0) {
		set_err(err, errlen, "%s: write error: %s", w->tmp, strerror(errno));
		goto bad;
	}
	free(header);
	return w;
oom:
	set_err(err, errlen, "%s: out of memory", path);
bad:
	free(header);
	st_writer_abort(w);
	return NULL;
}

static int emit(struct st_writer *w, const float *x, uint64_t n, enum st_dtype dtype, char *err,
		size_t errlen)
{
	while (n) {
		size_t k = n < WBUF_ELEMS ? (size_t)n : WBUF_ELEMS, bytes;

		if (dtype == ST_BF16) {
			for (size_t i = 0; i < k; i++) {
				uint16_t h = st_f32_to_bf16(x[i]);

				w->buf[2 * i] = (uint8_t)h;
				w->buf[2 * i + 1] = (uint8_t)(h >> 8);
			}
			bytes = 2 * k;
		} else if (dtype == ST_F8_E4M3) {
			for (size_t i = 0; i < k; i++)
				w->buf[i] = st_f32_to_f8e4m3(x[i]);
			bytes = k;
		} else {
			for (size_t i = 0; i < k; i++) {
				uint32_t u = bits_of_f32(x[i]);

				for (int b = 0; b < 4; b++)
					w->buf[4 * i + b] = (uint8_t)(u >> (8 * b));
			}
			bytes = 4 * k;
		}
		if (fwrite(w->buf, 1, bytes, w->fp) != bytes)
			return set_err(err, errlen, "%s: write error: %s", w->tmp, strerror(errno));
		x += k;
		n -= k;
	}
	return 0;
}

int st_writer_append(struct st_writer *w, const float *x, uint64_t n, char *err, size_t errlen)
{
	while (n) {
		struct st_out *t;
		uint64_t k;

		while (w->cur < w->n && w->t[w->cur].numel == 0)
			w->cur++;
		if (w->cur >= w->n)
			return set_err(err, errlen, "%s: more data than the header declares", w->path);
		t = &w->t[w->cur];
		k = t->numel - w->done < n ? t->numel - w->done : n;
		if (emit(w, x, k, t->dtype, err, errlen))
			return -1;
		x += k;
		n -= k;
		w->done += k;
		if (w->done == t->numel) {
			w->cur++;
			w->done = 0;
		}
	}
	return 0;
}

int st_writer_write(struct st_writer *w, const char *name, const float *x, uint64_t numel,
		    char *err, size_t errlen)
{
	if (w->cur >= w->n)
		return set_err(err, errlen, "%s: tensor %s: every declared tensor is already written",
			       w->path, name);
	if (strcmp(w->t[w->cur].name, name) || w->done)
		return set_err(err, errlen, "%s: tensor %s written out of order (%s is next)", w->path,
			       name, w->t[w->cur].name);
	if (numel != w->t[w->cur].numel)
		return set_err(err, errlen, "%s: tensor %s: %llu elements given, the header says %llu",
			       w->path, name, (unsigned long long)numel,
			       (unsigned long long)w->t[w->cur].numel);
	if (!numel) {
		w->cur++;
		return 0;
	}
	return st_writer_append(w, x, numel, err, errlen);
}

static int fsync_dir_of(const char *path)
{
	char *copy = strdup(path);
	int fd, rc = -1;

	if (!copy)
		return -1;
	fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd >= 0) {
		rc = fsync(fd);
		close(fd);
	}
	free(copy);
	return rc;
}

int st_writer_close(struct st_writer *w, char *err, size_t errlen)
{
	FILE *fp = w->fp;

	while (w->cur < w->n && w->t[w->cur].numel == 0)
		w->cur++;
	if (w->cur < w->n) {
		set_err(err, errlen, "%s: tensor %s was not written (%llu of %llu elements)", w->path,
		        w->t[w->cur].name, (unsigned long long)w->done,
		        (unsigned long long)w->t[w->cur].numel);
		st_writer_abort(w);
		return -1;
	}
	w->fp = NULL;
	if (fflush(fp) || fsync(fileno(fp))) {
		set_err(err, errlen, "%s: write error: %s", w->tmp, strerror(errno));
		fclose(fp);
		goto bad;
	}
	if (fclose(fp)) {
		set_err(err, errlen, "%s: write error: %s", w->tmp, strerror(errno));
		goto bad;
	}
	if (rename(w->tmp, w->path)) {
		set_err(err, errlen, "%s: rename to %s: %s", w->tmp, w->path, strerror(errno));
		goto bad;
	}
	fsync_dir_of(w->path);
	writer_free(w);
	return 0;
bad:
	st_writer_abort(w);
	return -1;
}

void st_writer_abort(struct st_writer *w)
{
	if (!w)
		return;
	if (w->fp)
		fclose(w->fp);
	if (w->tmp)
		unlink(w->tmp);
	writer_free(w);
}
