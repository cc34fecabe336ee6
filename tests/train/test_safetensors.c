/*
 * tests/train/test_safetensors.c - the safetensors reader and writer: F32 and BF16 round trips (BF16
 * rounding to nearest even, exactly), F16 and BF16 widening, st_release, and every malformed file
 * (header length past the file, bad JSON, offsets out of bounds, overlapping tensors, sizes that
 * disagree with the shape, unknown dtypes, duplicate names, truncation) refused with a message naming
 * the file and the tensor.  float8_e4m3fn: all 256 codes decode exactly (against the format's
 * definition, computed in double here), encoding rounds to nearest even and saturates, and an
 * F8_E4M3 tensor written and read back gives its codes' values.  Fixtures are written by the tests,
 * by our writer or byte by byte.
 */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "train/safetensors.h"

static char err[2048];

static uint32_t bits(float f)
{
	uint32_t u;

	memcpy(&u, &f, sizeof(u));
	return u;
}

static float from_bits(uint32_t u)
{
	float f;

	memcpy(&f, &u, sizeof(f));
	return f;
}

static int file_exists(const char *path)
{
	struct stat sb;

	return !stat(path, &sb);
}

/* A file made byte by byte: the 8-byte length, the header, then data_len bytes of data. */
static void write_raw(const char *path, uint64_t declared_len, const char *header, size_t data_len)
{
	FILE *f = fopen(path, "wb");
	uint8_t len8[8];

	CU_ASSERT_PTR_NOT_NULL_FATAL(f);
	for (int i = 0; i < 8; i++)
		len8[i] = (uint8_t)(declared_len >> (8 * i));
	fwrite(len8, 1, 8, f);
	fwrite(header, 1, strlen(header), f);
	for (size_t i = 0; i < data_len; i++)
		fputc((int)(i * 37 & 0xff), f);
	fclose(f);
}

static void write_header_file(const char *path, const char *header, size_t data_len)
{
	write_raw(path, strlen(header), header, data_len);
}

/* st_open must fail with a message holding every one of the words. */
static void expect_refused(const char *path, const char *w1, const char *w2, const char *w3)
{
	struct st_file f;
	int rc;

	err[0] = '\0';
	rc = st_open(&f, path, err, sizeof(err));
	CU_ASSERT_EQUAL(rc, -1);
	if (rc == 0) {
		st_close(&f);
		return;
	}
	CU_ASSERT_PTR_NOT_NULL(strstr(err, path));
	CU_ASSERT_PTR_NOT_NULL(strstr(err, w1));
	if (w2)
		CU_ASSERT_PTR_NOT_NULL(strstr(err, w2));
	if (w3)
		CU_ASSERT_PTR_NOT_NULL(strstr(err, w3));
	if (!strstr(err, w1) || (w2 && !strstr(err, w2)) || (w3 && !strstr(err, w3)))
		fprintf(stderr, "\n  message: %s\n", err);
}

/* ---- round trips ---- */

static const struct st_spec round_specs[] = {
	{ "model.embed_tokens.weight", ST_F32, 2, { 7, 5 } },
	{ "a.scalar", ST_F32, 0, { 0 } },
	{ "b.empty", ST_F32, 2, { 0, 3 } },
	{ "c.cube", ST_F32, 3, { 2, 3, 4 } },
	{ "d.vector", ST_F32, 1, { 9 } },
};

#define N_ROUND (int)(sizeof(round_specs) / sizeof(round_specs[0]))

static void write_round(const char *path, enum st_dtype dtype, float **data, uint64_t *numel)
{
	static const char *const meta[] = { "format", "pt", "note", "round \"trip\"", NULL };
	struct st_spec specs[N_ROUND];
	struct st_writer *w;

	memcpy(specs, round_specs, sizeof(specs));
	for (int i = 0; i < N_ROUND; i++) {
		specs[i].dtype = dtype;
		numel[i] = 1;
		for (int d = 0; d < specs[i].ndim; d++)
			numel[i] *= (uint64_t)specs[i].shape[d];
		data[i] = malloc(sizeof(float) * (numel[i] + 1));
		test_fill_randn(data[i], numel[i], 3.0f);
	}
	w = st_writer_open(path, specs, N_ROUND, meta, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(w);
	/* the first whole, the rest streamed in pieces across tensor boundaries */
	CU_ASSERT_EQUAL_FATAL(st_writer_write(w, specs[0].name, data[0], numel[0], err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(st_writer_write(w, specs[1].name, data[1], 1, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(st_writer_write(w, specs[2].name, data[2], 0, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(st_writer_append(w, data[3], 10, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(st_writer_append(w, data[3] + 10, 14, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(st_writer_append(w, data[4], 9, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(st_writer_close(w, err, sizeof(err)), 0);
	CU_ASSERT_FALSE(file_exists(tmp_path("round.safetensors.tmp")));
}

static void check_layout_of(const char *path)
{
	FILE *f = fopen(path, "rb");
	uint8_t len8[8];
	uint64_t hlen = 0;

	CU_ASSERT_PTR_NOT_NULL_FATAL(f);
	CU_ASSERT_EQUAL(fread(len8, 1, 8, f), 8);
	fclose(f);
	for (int i = 7; i >= 0; i--)
		hlen = hlen << 8 | len8[i];
	CU_ASSERT_EQUAL(hlen % 8, 0);  /* data section 8-byte aligned */
}

static void test_round_trip_f32(void)
{
	const char *path = tmp_path("round.safetensors");
	float *data[N_ROUND];
	uint64_t numel[N_ROUND];
	struct st_file f;

	test_rng_seed(1);
	write_round(path, ST_F32, data, numel);
	check_layout_of(path);
	CU_ASSERT_EQUAL_FATAL(st_open(&f, path, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(f.n_tensors, N_ROUND);
	CU_ASSERT_STRING_EQUAL(st_metadata(&f, "format"), "pt");
	CU_ASSERT_STRING_EQUAL(st_metadata(&f, "note"), "round \"trip\"");
	CU_ASSERT_PTR_NULL(st_metadata(&f, "absent"));
	for (int i = 0; i < N_ROUND; i++) {
		const struct st_tensor *t = st_find(&f, round_specs[i].name);
		float *back = malloc(sizeof(float) * (numel[i] + 1));

		CU_ASSERT_PTR_NOT_NULL_FATAL(t);
		CU_ASSERT_EQUAL(t->dtype, ST_F32);
		CU_ASSERT_EQUAL(t->ndim, round_specs[i].ndim);
		for (int d = 0; d < t->ndim; d++)
			CU_ASSERT_EQUAL(t->shape[d], round_specs[i].shape[d]);
		CU_ASSERT_EQUAL(t->numel, numel[i]);
		CU_ASSERT_EQUAL(st_read_f32(&f, t, back, err, sizeof(err)), 0);
		CU_ASSERT_EQUAL(memcmp(back, data[i], sizeof(float) * numel[i]), 0);
		free(back);
		free(data[i]);
	}
	CU_ASSERT_PTR_NULL(st_find(&f, "missing"));
	st_close(&f);
}

/* Dropping a tensor's pages (and its neighbours' edges) loses nothing: every tensor reads the same. */
static void test_release(void)
{
	const char *path = tmp_path("release.safetensors");
	float *data[N_ROUND], *back;
	uint64_t numel[N_ROUND];
	struct st_file f;

	test_rng_seed(3);
	write_round(path, ST_F32, data, numel);
	CU_ASSERT_EQUAL_FATAL(st_open(&f, path, err, sizeof(err)), 0);
	back = malloc(sizeof(float) * 64);
	CU_ASSERT_PTR_NOT_NULL_FATAL(back);
	for (int pass = 0; pass < 2; pass++) {
		for (int i = 0; i < N_ROUND; i++) {
			const struct st_tensor *t = st_find(&f, round_specs[i].name);

			CU_ASSERT_EQUAL(st_read_f32(&f, t, back, err, sizeof(err)), 0);
			CU_ASSERT_EQUAL(memcmp(back, data[i], sizeof(float) * numel[i]), 0);
			st_release(&f, t);  /* the empty one too: nothing to do */
		}
	}
	for (int i = 0; i < N_ROUND; i++)
		free(data[i]);
	free(back);
	st_close(&f);
}

static void test_round_trip_bf16(void)
{
	const char *path = tmp_path("round16.safetensors");
	float *data[N_ROUND];
	uint64_t numel[N_ROUND];
	struct st_file f;

	test_rng_seed(2);
	write_round(path, ST_BF16, data, numel);
	CU_ASSERT_EQUAL_FATAL(st_open(&f, path, err, sizeof(err)), 0);
	for (int i = 0; i < N_ROUND; i++) {
		const struct st_tensor *t = st_find(&f, round_specs[i].name);
		float *back = malloc(sizeof(float) * (numel[i] + 1));
		int exact = 1, close = 1;

		CU_ASSERT_PTR_NOT_NULL_FATAL(t);
		CU_ASSERT_EQUAL(t->dtype, ST_BF16);
		CU_ASSERT_EQUAL(t->end - t->begin, 2 * numel[i]);
		CU_ASSERT_EQUAL(st_read_f32(&f, t, back, err, sizeof(err)), 0);
		for (uint64_t j = 0; j < numel[i]; j++) {
			exact &= bits(back[j]) == bits(st_bf16_to_f32(st_f32_to_bf16(data[i][j])));
			exact &= (bits(back[j]) & 0xffff) == 0;
			close &= fabsf(back[j] - data[i][j]) <= fabsf(data[i][j]) * (1.0f / 256);
		}
		CU_ASSERT(exact);
		CU_ASSERT(close);
		free(back);
		free(data[i]);
	}
	st_close(&f);
}

static void test_bf16_rounding(void)
{
	/* 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa */
	CU_ASSERT_EQUAL(st_f32_to_bf16(1.0f + 1.0f / 256), 0x3f80);
	CU_ASSERT_EQUAL(st_f32_to_bf16(1.0f + 3.0f / 256), 0x3f82);
	CU_ASSERT_EQUAL(st_f32_to_bf16(from_bits(0x3f808001)), 0x3f81);  /* just above half: up */
	CU_ASSERT_EQUAL(st_f32_to_bf16(from_bits(0x3f807fff)), 0x3f80);  /* just below: down */
	CU_ASSERT_EQUAL(st_f32_to_bf16(-2.5f), 0xc020);
	CU_ASSERT_EQUAL(st_f32_to_bf16(from_bits(0x7f7fffff)), 0x7f80);  /* FLT_MAX rounds to inf */
	CU_ASSERT_EQUAL(st_f32_to_bf16(INFINITY), 0x7f80);
	CU_ASSERT_EQUAL(st_f32_to_bf16(-0.0f), 0x8000);
	CU_ASSERT(isnan(st_bf16_to_f32(st_f32_to_bf16(NAN))));
	CU_ASSERT(isnan(st_bf16_to_f32(st_f32_to_bf16(from_bits(0x7f800001)))));  /* sNaN != inf */
	CU_ASSERT_EQUAL(st_bf16_to_f32(0x3f80), 1.0f);
	CU_ASSERT_EQUAL(bits(st_bf16_to_f32(0x0001)), 0x00010000u);  /* subnormal, exact */
	/* every bf16 value survives a round trip through float32 */
	for (uint32_t h = 0; h < 0x10000; h++) {
		float f = st_bf16_to_f32((uint16_t)h);

		if (!isnan(f) && st_f32_to_bf16(f) != h) {
			CU_FAIL("bf16 -> f32 -> bf16 changed a value");
			break;
		}
	}
}

static void test_f16_read(void)
{
	static const uint16_t h[] = { 0x3c00, 0xc000, 0x0001, 0x03ff, 0x7bff, 0x7c00, 0xfc00, 0x3800,
				      0x8000, 0x3555 };
	const float want[] = { 1.0f, -2.0f, 5.9604644775390625e-08f, 6.0975551605224609e-05f,
			       65504.0f, INFINITY, -INFINITY, 0.5f, -0.0f, 0.333251953125f };
	const char *path = tmp_path("f16.safetensors");
	const char *hdr = "{\"h\":{\"dtype\":\"F16\",\"shape\":[10],\"data_offsets\":[0,20]}}";
	struct st_file f;
	float back[10];
	FILE *fp;

	write_header_file(path, hdr, 0);
	fp = fopen(path, "ab");
	CU_ASSERT_PTR_NOT_NULL_FATAL(fp);
	for (int i = 0; i < 10; i++) {
		fputc(h[i] & 0xff, fp);
		fputc(h[i] >> 8, fp);
	}
	fclose(fp);
	CU_ASSERT_EQUAL_FATAL(st_open(&f, path, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(st_read_f32(&f, &f.tensors[0], back, err, sizeof(err)), 0);
	for (int i = 0; i < 10; i++)
		CU_ASSERT_EQUAL(bits(back[i]), bits(want[i]));
	CU_ASSERT(isnan(st_f16_to_f32(0x7e00)));
	st_close(&f);
}

static void test_writer_misuse(void)
{
	const struct st_spec specs[] = {
		{ "x", ST_F32, 1, { 4 } },
		{ "y", ST_BF16, 1, { 2 } },
	};
	const struct st_spec dup[] = { { "x", ST_F32, 1, { 1 } }, { "x", ST_F32, 1, { 1 } } };
	const struct st_spec f64[] = { { "z", ST_F64, 1, { 1 } } };
	const char *path = tmp_path("misuse.safetensors");
	float v[8] = { 0 };
	struct st_writer *w;

	w = st_writer_open(path, specs, 2, NULL, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(w);
	CU_ASSERT_EQUAL(st_writer_write(w, "y", v, 2, err, sizeof(err)), -1);  /* out of order */
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "out of order"));
	CU_ASSERT_EQUAL(st_writer_write(w, "x", v, 3, err, sizeof(err)), -1);  /* wrong size */
	CU_ASSERT_EQUAL(st_writer_write(w, "x", v, 4, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(st_writer_close(w, err, sizeof(err)), -1);            /* y never written */
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "tensor y was not written"));
	CU_ASSERT_FALSE(file_exists(path));
	CU_ASSERT_FALSE(file_exists(tmp_path("misuse.safetensors.tmp")));

	w = st_writer_open(path, specs, 2, NULL, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(w);
	CU_ASSERT_EQUAL(st_writer_append(w, v, 7, err, sizeof(err)), -1);     /* more than declared */
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "more data"));
	st_writer_abort(w);
	CU_ASSERT_FALSE(file_exists(tmp_path("misuse.safetensors.tmp")));

	CU_ASSERT_PTR_NULL(st_writer_open(path, dup, 2, NULL, err, sizeof(err)));
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "tensor x listed twice"));
	CU_ASSERT_PTR_NULL(st_writer_open(path, f64, 1, NULL, err, sizeof(err)));
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "F64"));
	CU_ASSERT_PTR_NULL(st_writer_open(tmp_path("no/such/dir/x.safetensors"), specs, 2, NULL, err,
					  sizeof(err)));
}

/* ---- malformed files ---- */

static void test_too_short(void)
{
	const char *path = tmp_path("short.safetensors");
	FILE *f = fopen(path, "wb");

	CU_ASSERT_PTR_NOT_NULL_FATAL(f);
	fwrite("\x10\0\0", 1, 3, f);
	fclose(f);
	expect_refused(path, "too short", NULL, NULL);
}

static void test_header_length_beyond_file(void)
{
	const char *path = tmp_path("hlen.safetensors");
	const char *hdr = "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";

	write_raw(path, 4096, hdr, 4);
	expect_refused(path, "header length 4096", "impossible", NULL);
	write_raw(path, (uint64_t)1 << 62, hdr, 4);
	expect_refused(path, "header length", NULL, NULL);
	write_raw(path, 0, hdr, 4);
	expect_refused(path, "header length 0", NULL, NULL);
}

static void test_bad_json(void)
{
	const char *path = tmp_path("json.safetensors");

	write_header_file(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]", 4);
	expect_refused(path, "not valid JSON", NULL, NULL);
	write_header_file(path, "[1, 2, 3]   ", 0);
	expect_refused(path, "start with '{'", NULL, NULL);
	write_header_file(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4);
	expect_refused(path, "tensor a", "data_offsets", NULL);
	write_header_file(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}",
			  4);
	expect_refused(path, "tensor a", "shape", NULL);
	write_header_file(path, "{\"__metadata__\":{\"format\":7}}", 0);
	expect_refused(path, "__metadata__.format", NULL, NULL);
}

static void test_offsets_out_of_bounds(void)
{
	const char *path = tmp_path("oob.safetensors");

	write_header_file(path, "{\"ok\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
			  "\"model.far\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[16,32]}}",
			  24);
	expect_refused(path, "tensor model.far", "[16, 32]", "run past the data section");
	write_header_file(path, "{\"back\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}",
			  8);
	expect_refused(path, "tensor back", "end before", NULL);
}

static void test_size_mismatch(void)
{
	const char *path = tmp_path("size.safetensors");

	write_header_file(path, "{\"w\":{\"dtype\":\"BF16\",\"shape\":[3,2],\"data_offsets\":[0,16]}}",
			  16);
	expect_refused(path, "tensor w", "hold 16 bytes", "needs 12");
}

static void test_overlap(void)
{
	const char *path = tmp_path("overlap.safetensors");

	write_header_file(path, "{\"first\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
			  "\"second\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}", 24);
	expect_refused(path, "overlap", "tensor second", "tensor first");
	/* zero-size tensors occupy nothing: no overlap */
	write_header_file(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
			  "\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,8]}}", 16);
	{
		struct st_file f;

		CU_ASSERT_EQUAL(st_open(&f, path, err, sizeof(err)), 0);
		st_close(&f);
	}
}

static void test_bad_dtype(void)
{
	const char *path = tmp_path("dtype.safetensors");
	struct st_file f;
	float out[2];

	write_header_file(path, "{\"q\":{\"dtype\":\"Q4_K\",\"shape\":[2],\"data_offsets\":[0,1]}}", 1);
	expect_refused(path, "tensor q", "unknown dtype \"Q4_K\"", NULL);
	/* a known dtype that does not read as float32: listed, then refused when read */
	write_header_file(path, "{\"pos\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]},"
			  "\"d\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[16,24]}}", 24);
	CU_ASSERT_EQUAL_FATAL(st_open(&f, path, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(st_read_f32(&f, st_find(&f, "pos"), out, err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "tensor pos: dtype I64"));
	CU_ASSERT_PTR_NOT_NULL(strstr(err, path));
	CU_ASSERT_EQUAL(st_read_f32(&f, st_find(&f, "d"), out, err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "tensor d: dtype F64"));
	st_close(&f);
}

static void test_duplicate_name(void)
{
	const char *path = tmp_path("dup.safetensors");

	write_header_file(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
			  "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8);
	expect_refused(path, "tensor w appears twice", NULL, NULL);
}

static void test_truncated(void)
{
	const char *path = tmp_path("trunc.safetensors");
	float *data[N_ROUND];
	uint64_t numel[N_ROUND];
	struct stat sb;

	test_rng_seed(3);
	write_round(path, ST_F32, data, numel);
	for (int i = 0; i < N_ROUND; i++)
		free(data[i]);
	CU_ASSERT_EQUAL_FATAL(stat(path, &sb), 0);
	CU_ASSERT_EQUAL_FATAL(truncate(path, sb.st_size - 1), 0);
	expect_refused(path, "tensor d.vector", "run past", "truncated");
	CU_ASSERT_EQUAL_FATAL(truncate(path, 20), 0);  /* inside the header */
	expect_refused(path, "header length", NULL, NULL);
}

static void test_missing_file(void)
{
	expect_refused(tmp_path("absent.safetensors"), "No such file", NULL, NULL);
}

/* ---- float8_e4m3fn ---- */

/* The format's definition: (-1)^s x 2^(e-7) x (1 + m/8), or 2^-6 x m/8 when e = 0; S.1111.111 NaN. */
static double e4m3_value(int code)
{
	int s = code >> 7, e = (code >> 3) & 15, m = code & 7;
	double v = e ? ldexp(1.0 + m / 8.0, e - 7) : ldexp(m / 8.0, -6);

	return s ? -v : v;
}

static void test_e4m3_decode_all(void)
{
	int bad = 0, nans = 0;

	for (int c = 0; c < 256; c++) {
		float f = st_f8e4m3_to_f32((uint8_t)c);

		if ((c & 0x7f) == 0x7f) {
			nans++;
			CU_ASSERT(isnan(f));
			continue;
		}
		if (isnan(f) || (double)f != e4m3_value(c) || !!signbit(f) != !!(c & 0x80)) {
			if (!bad++)
				fprintf(stderr, "\n  code 0x%02x: %g, want %g\n", c, f, e4m3_value(c));
		}
	}
	CU_ASSERT_EQUAL(bad, 0);
	CU_ASSERT_EQUAL(nans, 2);
	CU_ASSERT_EQUAL(st_f8e4m3_to_f32(0x7e), 448.0f);
	CU_ASSERT_EQUAL(st_f8e4m3_to_f32(0x01), 0x1p-9f);    /* smallest subnormal */
	CU_ASSERT_EQUAL(st_f8e4m3_to_f32(0x08), 0x1p-6f);    /* smallest normal */
	CU_ASSERT_EQUAL(st_f8e4m3_to_f32(0x38), 1.0f);
	CU_ASSERT_EQUAL(st_f8e4m3_to_f32(0xc0), -2.0f);
}

/* Every code encodes back to itself; halfway points go to the even code; beyond 448 saturates. */
static void test_e4m3_encode(void)
{
	int bad = 0;

	for (int c = 0; c < 256; c++) {
		if ((c & 0x7f) == 0x7f)
			continue;
		if (st_f32_to_f8e4m3(st_f8e4m3_to_f32((uint8_t)c)) != c && !bad++)
			fprintf(stderr, "\n  code 0x%02x does not round trip\n", c);
	}
	CU_ASSERT_EQUAL(bad, 0);
	/* between neighbours a < b of the same sign: below the midpoint a, above b, at it the even one */
	for (int c = 0; c < 0x7e; c++) {
		double a = e4m3_value(c), b = e4m3_value(c + 1), mid = (a + b) / 2;
		int even = (c & 1) ? c + 1 : c;

		CU_ASSERT_EQUAL(st_f32_to_f8e4m3((float)mid), even);
		CU_ASSERT_EQUAL(st_f32_to_f8e4m3(nextafterf((float)mid, 0)), c);
		CU_ASSERT_EQUAL(st_f32_to_f8e4m3(nextafterf((float)mid, 1000)), c + 1);
		CU_ASSERT_EQUAL(st_f32_to_f8e4m3((float)-mid), 0x80 | even);
	}
	CU_ASSERT_EQUAL(st_f32_to_f8e4m3(449.0f), 0x7e);
	CU_ASSERT_EQUAL(st_f32_to_f8e4m3(1e30f), 0x7e);
	CU_ASSERT_EQUAL(st_f32_to_f8e4m3(-500.0f), 0xfe);
	CU_ASSERT_EQUAL(st_f32_to_f8e4m3(NAN) & 0x7f, 0x7f);
	CU_ASSERT_EQUAL(st_f32_to_f8e4m3(INFINITY) & 0x7f, 0x7f);
	CU_ASSERT_EQUAL(st_f32_to_f8e4m3(1e-20f), 0x00);
	CU_ASSERT_EQUAL(st_f32_to_f8e4m3(-0.0f), 0x80);
}

/* An F8_E4M3 tensor through the writer and the reader: its bytes are the codes, read as their values. */
static void test_e4m3_file(void)
{
	struct st_spec spec = { "w", ST_F8_E4M3, 2, { 16, 16 } };
	float x[256], y[256];
	struct st_writer *w;
	struct st_file f;
	const struct st_tensor *t;
	int bad = 0;

	for (int c = 0; c < 256; c++)
		x[c] = st_f8e4m3_to_f32((uint8_t)c);
	w = st_writer_open(tmp_path("e4m3.safetensors"), &spec, 1, NULL, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(w);
	CU_ASSERT_EQUAL(st_writer_write(w, "w", x, 256, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(st_writer_close(w, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(st_open(&f, tmp_path("e4m3.safetensors"), err, sizeof(err)), 0);
	t = st_find(&f, "w");
	CU_ASSERT_PTR_NOT_NULL_FATAL(t);
	CU_ASSERT_EQUAL(t->dtype, ST_F8_E4M3);
	CU_ASSERT_EQUAL(t->end - t->begin, 256);
	for (int c = 0; c < 256; c++) {
		uint8_t b = f.data[t->begin + c];

		/* NaN codes stay NaN (their sign kept); every other byte is its code */
		if ((c & 0x7f) == 0x7f ? (b & 0x7f) != 0x7f : b != c)
			bad++;
	}
	CU_ASSERT_EQUAL(bad, 0);
	CU_ASSERT_EQUAL(st_read_f32(&f, t, y, err, sizeof(err)), 0);
	for (int c = 0; c < 256; c++)
		CU_ASSERT((c & 0x7f) == 0x7f ? isnan(y[c]) : bits(y[c]) == bits(x[c]));
	st_close(&f);
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "E4M3: all 256 codes decode exactly, 0x7F/0xFF NaN", test_e4m3_decode_all },
		{ "E4M3: encoding rounds to nearest even, saturates", test_e4m3_encode },
		{ "E4M3: an F8_E4M3 tensor written and read back", test_e4m3_file },
		{ "f32 write/read round trip is bit-exact", test_round_trip_f32 },
		{ "bf16 round trip rounds to nearest even", test_round_trip_bf16 },
		{ "released tensors read back the same", test_release },
		{ "bf16 rounding cases", test_bf16_rounding },
		{ "f16 widens exactly (subnormals, inf)", test_f16_read },
		{ "writer refuses misuse and leaves no file", test_writer_misuse },
		{ "file shorter than 8 bytes refused", test_too_short },
		{ "header length beyond the file refused", test_header_length_beyond_file },
		{ "malformed header JSON refused", test_bad_json },
		{ "offsets out of bounds refused", test_offsets_out_of_bounds },
		{ "byte size disagreeing with shape refused", test_size_mismatch },
		{ "overlapping tensors refused", test_overlap },
		{ "unknown dtype refused, F64/I64 not read", test_bad_dtype },
		{ "duplicate tensor name refused", test_duplicate_name },
		{ "truncated file refused", test_truncated },
		{ "missing file refused", test_missing_file },
		{ NULL, NULL },
	};

	add_suite("safetensors", cases);
}
