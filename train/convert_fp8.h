/*
 * train/convert_fp8.h - DeepSeek-V3's block-scaled fp8 weights (its published V3 / R1 files), for
 * train/convert.c.
 *
 * A quantised linear weight W [rows, cols] is stored as two tensors: NAME (F8_E4M3, [rows, cols]) and
 * NAME_scale_inv (F32, [ceil(rows / br), ceil(cols / bc)]), with (br, bc) config.json's
 * quantization_config.weight_block_size ([128, 128] in DeepSeek's files).  W[i][j] = fp8[i][j] x
 * scale_inv[i / br][j / bc]: one scale per br x bc block, the blocks at the right and bottom edges
 * partial when rows or cols are not multiples of the block.  Quantising, a block's scale is its
 * largest magnitude / 448 (E4M3's largest value), so the block's values fill E4M3's range.
 */
#ifndef MOE_TRAIN_CONVERT_FP8_H
#define MOE_TRAIN_CONVERT_FP8_H

#include <stddef.h>
#include <stdint.h>

/* The block DeepSeek uses, and that --to-hf --dtype fp8 writes. */
#define FP8_BLOCK 128
/* E4M3's largest finite value. */
#define FP8_E4M3_MAX 448.0f

/* Blocks along a dimension of n: ceil(n / block). */
static inline int64_t fp8_blocks(int64_t n, int block)
{
	return (n + block - 1) / block;
}

/* NAME_scale_inv for a weight NAME. */
void fp8_scale_name(char *out, size_t len, const char *weight_name);
/* Whether DeepSeek's files keep the HF tensor NAME (of ndim dimensions) in fp8: the linear layers'
 * weights (*_proj.weight, kv_a_proj_with_mqa.weight, the experts'), not the embedding, lm_head, the
 * norms, the router's gate nor its bias. */
int fp8_is_quantised(const char *name, int ndim);

/* w [rows, cols] holds the fp8 values (as read): multiplied in place by their block's scale. */
void fp8_dequantize(float *w, int64_t rows, int64_t cols, const float *scale, int br, int bc);
/* Each block's scale (largest magnitude / 448; 1 for an all-zero block) into
 * scale[fp8_blocks(rows, br) * fp8_blocks(cols, bc)].  -1 when w holds a NaN or an infinity. */
int fp8_block_scales(const float *w, int64_t rows, int64_t cols, int br, int bc, float *scale);
/* w divided in place by its block's scale: what the F8_E4M3 encoder then rounds. */
void fp8_quantize(float *w, int64_t rows, int64_t cols, const float *scale, int br, int bc);

#endif
