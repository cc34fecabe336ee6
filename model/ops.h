/*
 * model/ops.h - the ops the model is built from, CPU reference implementation (float32, deterministic).
 *
 * Conventions (as in llm.c):
 *  - activations are row-major [N, dim] with N = B*T tokens;
 *  - a linear layer's weight is [out, in] (Hugging Face layout): y = x W^T;
 *  - backward functions ACCUMULATE (+=) into every gradient they produce (callers zero them), except
 *    cross_entropy_backward, which writes dlogits (and may run in place over the logits);
 *  - a NULL gradient pointer means "not needed".
 * The CUDA backend (model/cuda/) implements the same functions with a _cuda suffix and is tested against
 * these.
 */
#ifndef MOE_OPS_H
#define MOE_OPS_H

#include <stdbool.h>
#include <stddef.h>

#include "model/config.h"

/* y[N,out] = x[N,in] W[out,in]^T */
void linear_forward(float *y, const float *x, const float *w, int N, int in, int out);
/* dx[N,in] += dy W;  dw[out,in] += dy^T x */
void linear_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
		     int N, int in, int out);

/* out[n] = table[ids[n]] */
void embedding_forward(float *out, const int *ids, const float *table, int N, int C);
void embedding_backward(float *dtable, const float *dout, const int *ids, int N, int C);

/* y = x / sqrt(mean(x^2) + eps) * w, rstd[n] saved for the backward */
void rmsnorm_forward(float *y, float *rstd, const float *x, const float *w, int N, int C, float eps);
void rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
		      const float *rstd, int N, int C);

/*
 * Interleaved RoPE, in place: for row n and head h the dr numbers at x + n*row_stride + h*head_stride
 * are rotated pairwise, (x[2i], x[2i+1]) by the angle pos[n] * inv_freq[i], and multiplied by
 * attention_factor (YaRN's cos/sin multiplier, 1 without scaling; model/rope.h makes both from the
 * config).  rope_backward applies the transpose to the gradient, also in place: the inverse rotation,
 * multiplied by attention_factor too.
 */
void rope_forward(float *x, const int *pos, int N, int nheads, int row_stride, int head_stride,
		  int dr, const double *inv_freq, float attention_factor);
void rope_backward(float *dx, const int *pos, int N, int nheads, int row_stride, int head_stride,
		   int dr, const double *inv_freq, float attention_factor);

/*
 * Causal softmax attention, computed in blocks of query rows (memory O(T) per thread, never B*H*T*T).
 * q, k: [B*T, H, dq]; v: [B*T, H, dv]; out: [B*T, H, dv]; lse: [B, H, T] (log-sum-exp of the scaled,
 * masked scores, saved for the backward, which recomputes the probabilities).
 */
void attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
		       int B, int T, int H, int dq, int dv, float scale);
void attention_backward(float *grad_q, float *grad_k, float *grad_v, const float *dout, const float *out,
			const float *lse, const float *q, const float *k, const float *v,
			int B, int T, int H, int dq, int dv, float scale);

/* out = silu(gate) * up, elementwise over n */
void swiglu_forward(float *out, const float *gate, const float *up, size_t n);
void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
		     size_t n);

/* losses[n] = -log softmax(logits[n])[targets[n]]; a target < 0 is ignored (loss 0). */
void cross_entropy_forward(float *losses, const float *logits, const int *targets, int N, int V);
/* dlogits[n] = dloss * (softmax(logits[n]) - onehot(targets[n])), 0 for ignored rows.
 * WRITES (not accumulates); dlogits may equal logits (in place). */
void cross_entropy_backward(float *dlogits, const float *logits, const int *targets, float dloss,
			    int N, int V);
/* The same with row n scaled by dloss * row_scale[n] (row_scale may be NULL: 1). */
void cross_entropy_backward_rows(float *dlogits, const float *logits, const int *targets, float dloss,
				 const float *row_scale, int N, int V);

/* DeepSeekMoE router (SPEC 1). */
struct router_params {
	int E, K;                 /* routed experts, experts per token */
	int n_group, topk_group;  /* group-limited routing (1, 1: plain top-K) */
	enum moe_scoring scoring;
	bool norm_topk_prob;
	float routed_scaling_factor;
};

/*
 * logits [N,E] = gate(x).  scores = softmax or sigmoid of logits; choice = scores + bias (bias may be NULL);
 * group-limited top-K on choice; topk_w[n,k] = scores[n, topk_idx[n,k]], normalised if norm_topk_prob,
 * times routed_scaling_factor.  Ties break toward the lower expert index (deterministic).
 */
void router_forward(float *scores, int *topk_idx, float *topk_w, const float *logits, const float *bias,
		    const struct router_params *p, int N);
/*
 * Routing replay: topk_idx [N,K] is given (each row K distinct experts); topk_w gets the weights
 * router_forward would give those experts from scores [N,E] (normalised if norm_topk_prob, scaled).
 */
void router_replay_weights(float *topk_w, const float *scores, const int *topk_idx,
			   const struct router_params *p, int N);
/* dlogits[N,E] += d/dlogits of (sum dtopk_w * topk_w  +  sum dscores * scores); dscores may be NULL. */
void router_backward(float *dlogits, const float *dtopk_w, const float *dscores, const float *scores,
		     const int *topk_idx, const struct router_params *p, int N);

/*
 * Sequence-wise balance loss (DeepSeek-V3 eq. 17-20), averaged over the B sequences of T tokens:
 *   alpha * mean_b sum_i f_i P_i,  f_i = E/(K T) * #{t : i in topk(t)},  P_i = mean_t s_i,t / sum_j s_j,t.
 * f is a constant; the backward adds dloss * dL/dscores into dscores.
 */
float balance_loss_forward(const float *scores, const int *topk_idx, int B, int T, int E, int K,
			   float alpha);
void balance_loss_backward(float *dscores, const float *scores, const int *topk_idx, int B, int T,
			   int E, int K, float alpha, float dloss);

/* dst += src, n floats */
void vec_add(float *dst, const float *src, size_t n);

#endif
