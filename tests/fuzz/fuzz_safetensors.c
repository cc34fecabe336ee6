/*
 * tests/fuzz/fuzz_safetensors.c - safetensors files (st_open): the input is the file.  Files come from
 * the internet: whatever the header says, an accepted file's tensors lie inside its data section, their
 * sizes agree with their shapes, and reading one as float32 reads only its own bytes (ASan sees any
 * read past the map) into a buffer of its element count, which the file's size bounds.
 */
#include <stdlib.h>

#include "common.h"
#include "train/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
	struct st_file f;
	char err[1024];
	const char *path = fuzz_write("model.safetensors", data, n);

	if (!path || st_open(&f, path, err, sizeof(err)))
		return 0;
	if (f.data_len > f.size || (size_t)(f.data - f.map) + f.data_len != f.size)
		abort();
	for (int i = 0; i < f.n_tensors; i++) {
		const struct st_tensor *t = &f.tensors[i];
		float *out;

		if (t->begin > t->end || t->end > f.data_len ||
		    t->numel * st_dtype_size(t->dtype) != t->end - t->begin || st_find(&f, t->name) == NULL)
			abort();
		out = malloc(t->numel ? t->numel * sizeof(float) : 1);
		if (!out)
			abort();
		st_read_f32(&f, t, out, err, sizeof(err));
		free(out);
	}
	for (int i = 0; i < f.n_meta; i++)
		if (!st_metadata(&f, f.meta_keys[i]))
			abort();
	st_close(&f);
	return 0;
}
