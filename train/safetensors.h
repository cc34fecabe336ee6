/*
 * train/safetensors.h - a small reader and writer of the safetensors format (Hugging Face).
 *
 * A file is: an 8-byte little-endian header length N, N bytes of JSON
 *
 *   {"__metadata__": {"format": "pt"},
 *    "NAME": {"dtype": "BF16", "shape": [d0, d1], "data_offsets": [begin, end]}, ...}
 *
 * (padded with spaces), then the data section: each tensor's bytes, row-major and little-endian, at
 * [begin, end) counted from the start of the data section.
 *
 * The reader maps the file and validates the whole header against the file before anything is read:
 * a sane header length, JSON that parses, known dtypes, shapes whose byte size equals end - begin,
 * offsets inside the data section and no two tensors overlapping.  Every refusal names the file and,
 * where there is one, the tensor.  Tensors of any standard dtype are listed; reading one as float32
 * supports F32, F16, BF16 and F8_E4M3 (exactly: they widen without rounding) and refuses the others
 * by name.
 *
 * The writer streams: the header is computed first from the list of names, dtypes and shapes, then the
 * tensors' data follow one after another (converted from float32 to F32, BF16 or F8_E4M3 on the way,
 * a slice at a time), so no tensor is ever held twice.  Written to PATH.tmp, flushed, fsync'd and renamed.
 */
#ifndef MOE_TRAIN_SAFETENSORS_H
#define MOE_TRAIN_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_DIMS 8
/* The largest header accepted (the reference implementation's limit). */
#define ST_MAX_HEADER (100u << 20)

enum st_dtype {
	ST_F32 = 0,
	ST_F16,
	ST_BF16,
	ST_F64,
	ST_I64,
	ST_U64,
	ST_I32,
	ST_U32,
	ST_I16,
	ST_U16,
	ST_I8,
	ST_U8,
	ST_BOOL,
	ST_F8_E4M3,
	ST_F8_E5M2,
	ST_N_DTYPES,
};

/* "F32", "BF16", ... */
const char *st_dtype_name(enum st_dtype t);
/* Bytes per element. */
size_t st_dtype_size(enum st_dtype t);
/* 0 and *t for a known name, -1 otherwise. */
int st_dtype_parse(const char *name, enum st_dtype *t);

/* Exact conversions; f32 -> bf16 rounds to nearest even (NaN stays NaN). */
float st_bf16_to_f32(uint16_t h);
uint16_t st_f32_to_bf16(float f);
float st_f16_to_f32(uint16_t h);
/* float8_e4m3fn (safetensors F8_E4M3): exact decode (0x7F, 0xFF are NaN); encode rounds to nearest
 * even, saturating finite magnitudes beyond 448 to 448, NaN and infinities to NaN. */
float st_f8e4m3_to_f32(uint8_t b);
uint8_t st_f32_to_f8e4m3(float f);

/* ---- reading ---- */

struct st_tensor {
	char *name;
	enum st_dtype dtype;
	int ndim;
	int64_t shape[ST_MAX_DIMS];
	uint64_t numel;
	uint64_t begin, end;        /* byte offsets into the data section */
};

struct st_file {
	char *path;
	int fd;
	uint8_t *map;               /* the whole file */
	size_t size;
	const uint8_t *data;        /* start of the data section */
	uint64_t data_len;
	int n_tensors;
	struct st_tensor *tensors;  /* in the header's order */
	int n_meta;
	char **meta_keys, **meta_values;  /* __metadata__ (string values) */
};

/* Open, map and validate (see above).  Returns 0, or -1 with a message naming the file (and tensor). */
int st_open(struct st_file *f, const char *path, char *err, size_t errlen);
void st_close(struct st_file *f);

const struct st_tensor *st_find(const struct st_file *f, const char *name);
/* The value of a __metadata__ key, or NULL. */
const char *st_metadata(const struct st_file *f, const char *key);

/* Read a whole tensor into out[t->numel] as float32.  F32, F16, BF16 and F8_E4M3 (its raw values:
 * block scales are the caller's, see train/convert_fp8.h); another dtype is refused naming the file,
 * tensor and dtype. */
int st_read_f32(const struct st_file *f, const struct st_tensor *t, float *out, char *err,
		size_t errlen);

/*
 * Drop the pages of tensor t from this process's memory (they stay in the kernel's page cache): reading
 * a file larger than memory tensor by tensor keeps only the tensor being read resident.  t stays
 * readable (its pages come back from the file).
 */
void st_release(const struct st_file *f, const struct st_tensor *t);

/* ---- writing ---- */

struct st_spec {
	const char *name;           /* copied by st_writer_open */
	enum st_dtype dtype;        /* ST_F32, ST_BF16 or ST_F8_E4M3 */
	int ndim;
	int64_t shape[ST_MAX_DIMS];
};

struct st_writer;

/*
 * Create PATH.tmp and write the header for n tensors, in that order.  meta: NULL or a NULL-terminated
 * list of key, value, key, value, ... strings for "__metadata__".  Returns NULL with err on failure
 * (duplicate or empty names, unsupported dtypes, a write error).
 */
struct st_writer *st_writer_open(const char *path, const struct st_spec *specs, int n,
				 const char *const *meta, char *err, size_t errlen);
/* Append the next n elements (float32, converted to the current tensor's dtype: F8_E4M3 takes values
 * already divided by their block's scale); may span tensors. */
int st_writer_append(struct st_writer *w, const float *x, uint64_t n, char *err, size_t errlen);
/* The next tensor whole: name must be the next in order and numel its element count. */
int st_writer_write(struct st_writer *w, const char *name, const float *x, uint64_t numel, char *err,
		    size_t errlen);
/* Check every tensor was written, flush, fsync, rename to PATH.  Frees w (also on failure, after
 * removing PATH.tmp). */
int st_writer_close(struct st_writer *w, char *err, size_t errlen);
/* Drop the file being written (PATH.tmp removed; PATH untouched) and free w. */
void st_writer_abort(struct st_writer *w);

/* Bytes of the tensors' data of a spec list (what an index's metadata.total_size adds up). */
uint64_t st_spec_bytes(const struct st_spec *s);

#endif
