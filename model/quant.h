/*
 * model/quant.h - 8-bit weights for generation and evaluation (`--weights int8`, grpo.rollout_weights).
 *
 * Every linear layer's weight [out, in] (attention projections, dense MLPs, routed and shared experts) is
 * held as int8 with one fp32 scale per output row: symmetric, scale = max |w_row| / 127, q = round(w /
 * scale) in [-127, 127], so w ~ scale * q.  The router (mlp.gate), the norms, the embeddings and the
 * lm_head stay fp32.  Quantised once (model_quantize) from the fp32 weights; while m->quant is set, every
 * CPU forward (model_forward and decode_step) reads the int8 weights of those layers: the products
 * consume int8 directly (qlinear_forward), no dequantised copy of a weight is kept (a product of several
 * rows dequantises one small tile of rows at a time into per-thread scratch and hands it to BLAS).
 * Training never reads them: the backward needs the fp32 weights, and GRPO attaches its int8 copy only
 * while it samples.
 */
#ifndef MOE_MODEL_QUANT_H
#define MOE_MODEL_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include "model/model.h"

/* Rows of an int8 weight: row r is scale[r] * q[r * in .. r * in + in). */
struct qmat {
	const int8_t *q;
	const float *scale;
};

/* Symmetric absmax quantisation of rows x cols floats: q [rows * cols], scale [rows] (an all-zero row:
 * scale 0, q 0). */
void quantize_rows(int8_t *q, float *scale, const float *w, size_t rows, int cols);

/*
 * y [N, out] (row stride ldy) = x [N, in] (row stride ldx) W^T with W = the int8 rows w (out of them).
 * Up to 3 rows: straight from int8 (the decode case: bound by the weight bytes read); more rows: tiles of
 * weight rows dequantised into 64 KiB of scratch on the stack and multiplied with BLAS.  Parallel over
 * tiles of output rows whose size depends on the shapes only, each computed by one thread: the result
 * does not depend on the thread count.  The _serial variant runs on the calling thread (a task of a
 * parallel region).
 */
void qlinear_forward(float *y, int ldy, const float *x, int ldx, struct qmat w, int N, int in, int out);
void qlinear_forward_serial(float *y, int ldy, const float *x, int ldx, struct qmat w, int N, int in, int out);

/*
 * y [N, cols] (row stride ldy) = alpha * x [N, k] (row stride ldx) W, W [k, cols] = the k int8 rows w: the
 * transposed use (MLA's absorbed queries fold kv_b_proj's k_nope rows into q), on the calling thread.
 */
void qlinear_t_serial(float *y, int ldy, const float *x, int ldx, struct qmat w, int N, int k, int cols,
		      float alpha);

/* The int8 copy of a model's linear weights (opaque). */
struct model_quant;

/*
 * Quantises m's linear weights (as they are now) into a new int8 copy.  NULL when out of memory.  Attach
 * it with m->quant = q (model_free frees an attached copy); quant_update re-reads the fp32 weights into it
 * after they changed (GRPO's rollouts, every step).
 */
struct model_quant *quant_create(const struct moe_model *m);
void quant_update(struct model_quant *q, const struct moe_model *m);
void quant_free(struct model_quant *q);

/* model_quantize: quant_create + attach; 0, or -1 when out of memory. */
int model_quantize(struct moe_model *m);

/*
 * Inference only (moe generate, moe eval): gives the memory of the fp32 copies of the attached int8
 * tensors back to the system (madvise: the whole pages inside each tensor; they then read as 0), so the
 * model holds about the int8 bytes.  m must not be trained, saved or re-quantised afterwards.  Returns
 * the bytes given back.
 */
size_t quant_drop_fp32(struct moe_model *m);

/*
 * The int8 rows of the weight at w, a pointer into m->weights at a row start of a tensor of rows of in
 * floats (the start of a linear weight, or of one expert's slice, or of a slice of rows); .q NULL when m
 * has no int8 copy attached or that tensor is not quantised (the router, norms, embeddings, lm_head).
 */
struct qmat quant_find(const struct moe_model *m, const float *w, int in);

/*
 * Bytes of the model's weights as the forward reads them: int8 (one byte a weight plus 4 per row of a
 * quantised tensor, the rest 4 a weight), and the same all in fp32; linear: of the quantised tensors only.
 */
struct quant_bytes {
	size_t full, int8;               /* every tensor */
	size_t linear_full, linear_int8; /* the quantised tensors */
};
struct quant_bytes quant_weight_bytes(const struct moe_model *m);

/*
 * What the forward code calls for a linear layer of the model: the int8 product when w is quantised
 * (quant_find), else linear_fwd with flags (layers.h: LIN_SERIAL runs on the calling thread); plus the
 * LoRA adapters' term when m has adapters on w (model/lora.h).
 */
void model_linear(const struct moe_model *m, float *y, const float *x, const float *w, int N, int in, int out,
		  int flags);

#endif
