/*
 * model/cuda/ops_cuda.h - the CUDA backend: every op of model/ops.h with a _cuda suffix.  The device
 * context and device-memory helpers they run on are launch/cuda/device.h's (included here).
 *
 * Plain C (includable from C11 files; no CUDA types: a stream is handed out as an opaque pointer).
 *
 * The ops take the same arguments as their CPU counterparts in model/ops.h and follow the same conventions
 * (row-major [N, dim] activations, [out, in] weights, backward functions ACCUMULATE into gradients except
 * cross_entropy_backward_cuda, which writes; a NULL gradient pointer means "not needed"), with two
 * differences:
 *  - every array argument (float and int alike) is a DEVICE pointer, except RoPE's inv_freq table; scalars
 *    and the router_params struct are host values;
 *  - they are asynchronous: they are queued on the backend's stream (moe_cuda_stream()) and return before
 *    the device finishes.  The exception is balance_loss_forward_cuda, which returns a host float and so
 *    waits (balance_loss_forward_cuda_async writes the loss to device memory instead).
 * Results match the CPU ops up to float rounding; every reduction runs in a fixed order, so a run repeats
 * bit for bit (no order-dependent float atomics).  Errors (a failed CUDA call or launch, an unsupported
 * size) abort with a message naming the call, file and line.
 *
 * The CUDA code itself is built only when the CUDA backend is (MOE_HAVE_CUDA); this header can be included
 * regardless.
 */
#ifndef MOE_OPS_CUDA_H
#define MOE_OPS_CUDA_H

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* struct router_params, enum moe_scoring.  Included inside the extern "C" block so that the CPU ops keep C
 * linkage in C++ files too: a C++ file must include this header before (or instead of) model/ops.h. */
#include "model/ops.h"
#include "launch/cuda/device.h"

/* ---- ops (see model/ops.h for the semantics) ---- */

/* cuBLAS, fp32 inputs and fp32 compute (no TF32). */
void linear_forward_cuda(float *y, const float *x, const float *w, int N, int in, int out);
void linear_backward_cuda(float *dx, float *dw, const float *dy, const float *x, const float *w,
			  int N, int in, int out);

void embedding_forward_cuda(float *out, const int *ids, const float *table, int N, int C);
/* Deterministic: the tokens are sorted by id (stable), each row of dtable then adds its tokens in token
 * order, like the CPU op. */
void embedding_backward_cuda(float *dtable, const float *dout, const int *ids, int N, int C);

void rmsnorm_forward_cuda(float *y, float *rstd, const float *x, const float *w, int N, int C, float eps);
void rmsnorm_backward_cuda(float *dx, float *dw, const float *dy, const float *x, const float *w,
			   const float *rstd, int N, int C);

/* inv_freq is a HOST array of dr / 2 doubles (dr <= MC_ROPE_MAX_DIM): it travels as a kernel argument. */
void rope_forward_cuda(float *x, const int *pos, int N, int nheads, int row_stride, int head_stride,
		       int dr, const double *inv_freq, float attention_factor);
void rope_backward_cuda(float *dx, const int *pos, int N, int nheads, int row_stride, int head_stride,
			int dr, const double *inv_freq, float attention_factor);

/* Causal attention, FlashAttention-2 style tiles: dq <= 192, dv <= 128 (DeepSeek: 192 / 128).
 * attention_backward_cuda needs the forward's out and lse; dq/dk/dv may each be NULL. */
#define MOE_CUDA_ATTN_MAX_DQ 192
#define MOE_CUDA_ATTN_MAX_DV 128
void attention_forward_cuda(float *out, float *lse, const float *q, const float *k, const float *v,
			    int B, int T, int H, int dq, int dv, float scale);
void attention_backward_cuda(float *dq, float *dk, float *dv, const float *dout, const float *out,
			     const float *lse, const float *q, const float *k, const float *v,
			     int B, int T, int H, int dq_dim, int dv_dim, float scale);

/*
 * Which code runs the two attention ops above (train.attention; model/cuda/attention_cudnn.c):
 *   own    our FlashAttention-2-style fp32 kernels (the default until configured; deterministic);
 *   cudnn  cuDNN's graphs (loaded with dlopen): q, k, v, O, dO rounded to bf16, fp32 stats and arithmetic,
 *          graphs planned once per shape and cached; a shape cuDNN cannot plan runs on our kernel;
 *   auto   cudnn when the library loads and plans shape (B, T, H, dq, dv), else own.
 * Plans that shape's graphs.  Returns 0 with the one-line choice in msg (for the start log), or -1 with
 * the error in msg (cudnn asked for and impossible, an unknown mode).  Needs moe_cuda_init().
 */
int attention_cuda_configure(const char *mode, int B, int T, int H, int dq, int dv, char *msg, size_t len);
/* "cudnn" or "own": what the last attention_cuda_configure chose */
const char *attention_cuda_impl(void);
/* The choice itself: why_not is NULL when cuDNN can run the shape, else why not.  1 cudnn, 0 own, -1 an
 * error (mode cudnn and why_not set, or an unknown mode). */
int attention_choose(const char *mode, const char *why_not);
/* Free the cached graphs and buffers, the handle and the library; back to our kernel. */
void attention_cuda_release(void);

void swiglu_forward_cuda(float *out, const float *gate, const float *up, size_t n);
void swiglu_backward_cuda(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
			  size_t n);

void cross_entropy_forward_cuda(float *losses, const float *logits, const int *targets, int N, int V);
/* WRITES dlogits; dlogits may equal logits (in place). */
void cross_entropy_backward_cuda(float *dlogits, const float *logits, const int *targets, float dloss,
				 int N, int V);

/*
 * Distillation's KL between the softmaxes at temperature T of student logits zs and teacher logits zt
 * ([N, V] each; train/distill.h's distill_row_* are the CPU reference): per row kl (forward: KL(p_t ||
 * p_s), reverse: KL(p_s || p_t)) and the two log-partition functions of z/T (kl and those in
 * double: the reverse gradient's log-ratio minus KL cancels); rows whose target is < 0
 * get 0.  The gradient g = scale * T^2 * dKL/dzs, 0 for those rows; g may be zt (in place).
 */
void kl_div_rows_cuda(double *kl, double *lse_s, double *lse_t, const float *zs, const float *zt, const int *targets,
		      int N, int V, double temperature, int reverse);
void kl_div_grad_rows_cuda(float *g, const float *zs, const float *zt, const int *targets, const double *lse_s,
			   const double *lse_t, const double *kl, int N, int V, double temperature, int reverse,
			   double scale);

/* p is a HOST pointer; E <= 1024 experts, n_group <= E. */
void router_forward_cuda(float *scores, int *topk_idx, float *topk_w, const float *logits, const float *bias,
			 const struct router_params *p, int N);
void router_backward_cuda(float *dlogits, const float *dtopk_w, const float *dscores, const float *scores,
			  const int *topk_idx, const struct router_params *p, int N);

/* Returns the loss on the host (waits for the device). */
float balance_loss_forward_cuda(const float *scores, const int *topk_idx, int B, int T, int E, int K,
				float alpha);
/* Same, writing the loss to the device float *loss without waiting. */
void balance_loss_forward_cuda_async(float *loss, const float *scores, const int *topk_idx, int B, int T,
				     int E, int K, float alpha);
void balance_loss_backward_cuda(float *dscores, const float *scores, const int *topk_idx, int B, int T,
				int E, int K, float alpha, float dloss);

void vec_add_cuda(float *dst, const float *src, size_t n);

#ifdef __cplusplus
}
#endif

#endif
