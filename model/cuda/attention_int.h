/*
 * model/cuda/attention_int.h - between the attention ops (attention_cuda.cu: our kernels and the dispatch),
 * their cuDNN path (attention_cudnn.c) and its bf16 conversions (attention_cast.cu).  Internal to
 * model/cuda.  Device pointers throughout; everything is queued on the backend's stream.
 */
#ifndef MOE_ATTENTION_INT_H
#define MOE_ATTENTION_INT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 0: cuDNN ran the op; -1: it did not (our kernel is not configured to be replaced, cuDNN has no plan
 * for this shape, or a run failed): the caller runs our kernel. */
int attention_cudnn_forward(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T,
			    int H, int dq, int dv, float scale);
int attention_cudnn_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
			     const float *lse, const float *q, const float *k, const float *v, int B, int T, int H,
			     int dq_dim, int dv_dim, float scale);

/* dst[i] = bf16(src[i]), round to nearest even */
void attn_to_bf16(uint16_t *dst, const float *src, size_t n);
/* dst[i] = src[i] (add: dst[i] += src[i]) */
void attn_from_bf16(float *dst, const uint16_t *src, size_t n, int add);
/* dq[(b*T + t)*H + h][d] += acc[((b*H + h)*T + t)*dim + d]: the packed fp32 dQ accumulator into our rows */
void attn_add_packed(float *dq, const float *acc, int B, int T, int H, int dim);

#ifdef __cplusplus
}
#endif

#endif
