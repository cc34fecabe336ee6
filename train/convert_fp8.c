/*
 * train/convert_fp8.c - block scales of DeepSeek's fp8 weights (see convert_fp8.h).
 */
#include "train/convert_fp8.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

void fp8_scale_name(char *out, size_t len, const char *weight_name)
{
	snprintf(out, len, "%s_scale_inv", weight_name);
}

static int ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), k = strlen(suffix);

	return n >= k && !strcmp(s + n - k, suffix);
}

int fp8_is_quantised(const char *name, int ndim)
{
	/* an MTP depth's eh_proj is bf16 in DeepSeek-V3's files (a plain linear layer in its code) */
	return ndim == 2 && !ends_with(name, ".eh_proj.weight") &&
	       (ends_with(name, "_proj.weight") || ends_with(name, ".kv_a_proj_with_mqa.weight"));
}

/* Row i's scales: scale + (i / br) * (blocks of a row). */
void fp8_dequantize(float *w, int64_t rows, int64_t cols, const float *scale, int br, int bc)
{
	int64_t nb = fp8_blocks(cols, bc);

#pragma omp parallel for schedule(static) if (rows * cols > (1 << 20))
	for (int64_t i = 0; i < rows; i++) {
		const float *s = scale + (i / br) * nb;
		float *x = w + i * cols;

		for (int64_t j = 0; j < cols; j++)
			x[j] *= s[j / bc];
	}
}

int fp8_block_scales(const float *w, int64_t rows, int64_t cols, int br, int bc, float *scale)
{
	int64_t nr = fp8_blocks(rows, br), nb = fp8_blocks(cols, bc);

	for (int64_t k = 0; k < nr * nb; k++)
		scale[k] = 0;
	for (int64_t i = 0; i < rows; i++) {
		float *s = scale + (i / br) * nb;
		const float *x = w + i * cols;

		for (int64_t j = 0; j < cols; j++) {
			float a = fabsf(x[j]);

			if (!isfinite(a))
				return -1;
			if (a > s[j / bc])
				s[j / bc] = a;
		}
	}
	/* an all-zero block (or one so small its scale underflows): 1 keeps the division finite */
	for (int64_t k = 0; k < nr * nb; k++) {
		float s = scale[k] / FP8_E4M3_MAX;

		scale[k] = s > 0 ? s : 1.0f;
	}
	return 0;
}

void fp8_quantize(float *w, int64_t rows, int64_t cols, const float *scale, int br, int bc)
{
	int64_t nb = fp8_blocks(cols, bc);

#pragma omp parallel for schedule(static) if (rows * cols > (1 << 20))
	for (int64_t i = 0; i < rows; i++) {
		const float *s = scale + (i / br) * nb;
		float *x = w + i * cols;

		for (int64_t j = 0; j < cols; j++)
			x[j] /= s[j / bc];
	}
}
