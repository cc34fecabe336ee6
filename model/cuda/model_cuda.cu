/*
 * model/cuda/model_cuda.cu - the whole model on one GPU (model/cuda/model_cuda.h): model.c, mla.c and moe.c
 * step for step, over device arenas, with the ops of ops_cuda.h and a few layout kernels of its own.
 *
 * The activations are the CPU model's struct model_acts (model/layers.h), allocated by the same code with
 * device memory, so both models hold the same buffers under the same names.  What differs:
 *  - matmuls: with bf16 on, every linear layer except the router runs on tensor cores (bf16 operands,
 *    fp32 accumulation and output): the weights come from the bf16 copy of the arena, the activation
 *    operand is rounded to bf16 just before the product.  The router stays fp32 (its top-k decides which
 *    expert a token visits: small drifts must not flip it more than the rest of the model does).
 *  - MoE: the router's top-k and the counting sort of the CPU model (rows by expert, stable) run on the
 *    device; only the per-expert offsets come back to the host (one wait per MoE layer: the GEMM sizes).
 *    The rows are gathered, each projection of the routed experts is one grouped GEMM over their blocks
 *    (or a GEMM per expert where cuBLAS refuses that), SwiGLU runs once over all rows, and the outputs
 *    are combined by a kernel that adds the K slots of a token in order (deterministic, no atomics).
 *    Under expert parallelism the host still plans the exchange from the top-k (moe_dispatch).
 */
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "launch/cuda/comm_device.h"
#include "launch/cuda/cuda_common.cuh"
#include "launch/cuda/prof.h"
#include "model/cuda/model_cuda.h"
#include "model/cuda/ops_cuda.h"

extern "C" {
#include "model/layers.h"
#include "model/rope.h"
}

using namespace moe_cuda;

struct gpu_model {
	struct moe_model *m;
	int bf16;
	int logit_rows_opt;              /* gpu_model_logit_rows: -1 auto, 0 all, > 0 rows */
	float *w, *g;                    /* device arenas, m->n_weights floats */
	__nv_bfloat16 *wbf;              /* bf16 copy of w (NULL unless bf16) */
	struct model_weights W, G;       /* views into w and g */
	struct model_acts *a;            /* device buffers for the last (B, T) */
	float *aux;                      /* [L] each MoE layer's balance loss (device) */
	/* host side of the routing, per layer: the rows each expert got, [L][El + 1] */
	std::vector<int> offsets;
	std::vector<int> topk, row_pair, row_of, fill;  /* host scratch */
	std::vector<int> targets;        /* host copy of the last targets */
	std::vector<float> losses;       /* host copy of the per-token losses */
	std::vector<float> scores, topk_w;  /* host scratch of routing replay */
	float *token_w;                  /* [token_w_cap] device copy of m->token_weights */
	size_t token_w_cap;
	/* expert parallelism (m->ep_group): per MoE layer, what the backward needs of the forward's exchange */
	struct ep_layer {
		int *send_row;           /* [NK] device: send-order row of pair i (moe_dispatch.send_row) */
		int *send_pair;          /* [NK] device: the pair of send-order row r (its inverse) */
		int *recv_to_expert;     /* [cap_R] device: expert-major row of each received row */
		float *xr;               /* [cap_R, C] the rows the local experts compute, expert-major */
		struct mlp_acts er;      /* [cap_R, Im] their activations */
		size_t cap_NK, cap_R;
	};
	std::vector<ep_layer> ep;
	std::vector<int64_t> elem_send, elem_recv;  /* [ep] floats to / from each peer */
	gpu_grads_ready_fn grads_ready;  /* gpu_model_on_grads_ready, or NULL */
	void *grads_ready_ctx;
	const float *logit_grad;         /* gpu_model_set_logit_grad, or NULL */
};

/* ------------------------------------------------------------------------------------------------------
 * Layout kernels
 * ---------------------------------------------------------------------------------------------------- */

namespace {

__global__ void to_bf16_kernel(__nv_bfloat16 *dst, const float *src, size_t n)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		dst[i] = __float2bfloat16(src[i]);
}

/* x[i] *= alpha */
__global__ void axpy_kernel(float *y, float alpha, const float *x, size_t n)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		y[i] += alpha * x[i];
}

__global__ void scale_kernel(float *x, float alpha, size_t n)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		x[i] *= alpha;
}

/* row n of x [N, V] times w[n] */
__global__ void scale_rows_kernel(float *x, const float *w, int N, int V)
{
	size_t n_all = (size_t)N * V;
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n_all; i += (size_t)gridDim.x * blockDim.x)
		x[i] *= w[i / V];
}

/* dst[n, 0..width) = src[n, 0..width), row strides ldd / lds */
__global__ void copy_cols_kernel(float *dst, int ldd, const float *src, int lds, int N, int width)
{
	size_t total = (size_t)N * width;
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
		size_t n = i / width, j = i % width;
		dst[n * ldd + j] = src[n * lds + j];
	}
}

/* k[n,h] = [kv[n,h,:dn] | kva[n, Rkv:]],  v[n,h] = kv[n,h,dn:] */
__global__ void assemble_kv_kernel(float *k, float *v, const float *kv, const float *kva, int N, int H, int dn,
				   int dv, int dr, int Rkv)
{
	int dq = dn + dr, dkv = dn + dv;
	size_t total = (size_t)N * H * (dq + dv);
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
		size_t nh = i / (dq + dv);
		int j = (int)(i % (dq + dv));
		size_t n = nh / H;
		const float *src = kv + nh * dkv;
		if (j < dn)
			k[nh * dq + j] = src[j];
		else if (j < dq)
			k[nh * dq + j] = kva[n * (Rkv + dr) + Rkv + (j - dn)];
		else
			v[nh * dv + (j - dq)] = src[dn + (j - dq)];
	}
}

/* the transpose: dkv[n,h] = [dk[n,h,:dn] | dv[n,h]];  dkpe[n] = sum_h dk[n,h,dn:] (heads in order) */
__global__ void disassemble_dkv_kernel(float *dkv, float *dkpe, int ldpe, const float *dk, const float *dvv,
				       int N, int H, int dn, int dv, int dr)
{
	int dq = dn + dr, dkvw = dn + dv, per = H * dkvw + dr;
	size_t total = (size_t)N * per;
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
		size_t n = i / per;
		int j = (int)(i % per);
		if (j < H * dkvw) {
			int h = j / dkvw, c = j % dkvw;
			size_t nh = n * H + h;
			dkv[nh * dkvw + c] = c < dn ? dk[nh * dq + c] : dvv[nh * dv + (c - dn)];
		} else {
			int c = j - H * dkvw;
			float s = 0.0f;
			for (int h = 0; h < H; h++)
				s += dk[(n * H + h) * dq + dn + c];
			dkpe[n * ldpe + c] = s;
		}
	}
}

/* xe[r] = x[row_pair[r] / K] */
__global__ void gather_rows_kernel(float *xe, const float *x, const int *row_pair, int K, int R, int C)
{
	size_t total = (size_t)R * C;
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
		size_t r = i / C;
		int c = (int)(i % C);
		xe[i] = x[(size_t)(row_pair[r] / K) * C + c];
	}
}

/* out[n] (+)= sum_k w[n*K+k] * rows[row_of[n*K+k]], slots in order (w NULL: 1; row < 0 skipped) */
__global__ void combine_rows_kernel(float *out, const float *rows, const int *row_of, const float *w, int N,
				    int K, int C, int set)
{
	size_t total = (size_t)N * C;
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
		size_t n = i / C;
		int c = (int)(i % C);
		float acc = set ? 0.0f : out[i];
		for (int k = 0; k < K; k++) {
			int r = row_of[n * K + k];
			if (r >= 0)
				acc += (w ? w[n * K + k] : 1.0f) * rows[(size_t)r * C + c];
		}
		out[i] = acc;
	}
}

/*
 * The combine's backward, one warp per sorted row r (pair i = row_pair[r], token i / K):
 * dye[r] = w_i dout[token],  dtopk_w[i] = <dout[token], ye[r]>  (a fixed shuffle tree: deterministic).
 */
__global__ void combine_backward_kernel(float *dye, float *dtopk_w, const float *dout, const float *ye,
					const float *topk_w, const int *row_pair, int K, int R, int C)
{
	int lane = threadIdx.x & 31;
	int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
	if (r >= R)
		return;
	int i = row_pair[r];
	const float *d = dout + (size_t)(i / K) * C, *y = ye + (size_t)r * C;
	float *dy = dye + (size_t)r * C, wk = topk_w[i], dot = 0.0f;
	for (int c = lane; c < C; c += 32) {
		dot += d[c] * y[c];
		dy[c] = wk * d[c];
	}
	dot = warp_sum(dot);
	if (lane == 0)
		dtopk_w[i] = dot;
}

void copy_cols(float *dst, int ldd, const float *src, int lds, int N, int width)
{
	if (N > 0 && width > 0)
		copy_cols_kernel<<<grid_for((size_t)N * width), kThreads, 0, stream()>>>(dst, ldd, src, lds, N, width);
}

void zero(void *p, size_t bytes)
{
	if (bytes)
		CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream()));
}

/* ------------------------------------------------------------------------------------------------------
 * Linear layers: y = x W^T, column-major cuBLAS as in ops_cuda.cu (x -> x^T [in, N], W -> W^T [in, out]).
 * ---------------------------------------------------------------------------------------------------- */

void gemm_ex(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void *A, int lda,
	     const void *B, int ldb, float beta, float *C, int ldc, cudaDataType_t type)
{
	const float alpha = 1.0f;
	CUBLAS_CHECK(cublasGemmEx(cublas(), ta, tb, m, n, k, &alpha, A, type, lda, B, type, ldb, &beta, C,
				  CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

__nv_bfloat16 *to_bf16(const float *x, size_t n)
{
	__nv_bfloat16 *b = scratch<__nv_bfloat16>(n);
	to_bf16_kernel<<<grid_for(n), kThreads, 0, stream()>>>(b, x, n);
	return b;
}

/* A weight of the arena as cuBLAS should read it: its bf16 copy, or itself. */
const void *weight_operand(const gpu_model *g, const float *w, cudaDataType_t *type)
{
	if (!g->bf16) {
		*type = CUDA_R_32F;
		return w;
	}
	*type = CUDA_R_16BF;
	return g->wbf + (w - g->w);
}

/* y[N,out] = x W^T (fp32: `exact`, or the model's precision) */
void lin_fwd(const gpu_model *g, float *y, const float *x, const float *w, int N, int in, int out, bool exact = false)
{
	if (N <= 0 || out <= 0)
		return;
	if (exact || !g->bf16) {
		gemm_ex(CUBLAS_OP_T, CUBLAS_OP_N, out, N, in, w, in, x, in, 0.0f, y, out, CUDA_R_32F);
		return;
	}
	cudaDataType_t t;
	const void *wb = weight_operand(g, w, &t);
	__nv_bfloat16 *xb = to_bf16(x, (size_t)N * in);
	gemm_ex(CUBLAS_OP_T, CUBLAS_OP_N, out, N, in, wb, in, xb, in, 0.0f, y, out, t);
	scratch_free(xb);
}

/* dx[N,in] (set or +=) dy W;  dw[out,in] += dy^T x.  dx, dw may be NULL. */
void lin_bwd(const gpu_model *g, float *dx, float *dw, const float *dy, const float *x, const float *w, int N,
	     int in, int out, bool set_dx, bool exact = false)
{
	if (N <= 0 || in <= 0)
		return;
	if (out <= 0) {
		if (dx && set_dx)
			zero(dx, sizeof(float) * (size_t)N * in);
		return;
	}
	if (exact || !g->bf16) {
		if (dx)
			gemm_ex(CUBLAS_OP_N, CUBLAS_OP_N, in, N, out, w, in, dy, out, set_dx ? 0.0f : 1.0f, dx, in,
				CUDA_R_32F);
		if (dw)
			gemm_ex(CUBLAS_OP_N, CUBLAS_OP_T, in, out, N, x, in, dy, out, 1.0f, dw, in, CUDA_R_32F);
		return;
	}
	cudaDataType_t t;
	__nv_bfloat16 *dyb = to_bf16(dy, (size_t)N * out);
	if (dx) {
		const void *wb = weight_operand(g, w, &t);
		gemm_ex(CUBLAS_OP_N, CUBLAS_OP_N, in, N, out, wb, in, dyb, out, set_dx ? 0.0f : 1.0f, dx, in, t);
	}
	if (dw) {
		__nv_bfloat16 *xb = to_bf16(x, (size_t)N * in);
		gemm_ex(CUBLAS_OP_N, CUBLAS_OP_T, in, out, N, xb, in, dyb, out, 1.0f, dw, in, CUDA_R_16BF);
		scratch_free(xb);
	}
	scratch_free(dyb);
}

/* ------------------------------------------------------------------------------------------------------
 * MLA (mla.c)
 * ---------------------------------------------------------------------------------------------------- */

struct dims {
	int C, H, dn, dr, dv, dq, Rq, Rkv, N;
};

dims mla_dims(const struct model_config *c, int N)
{
	dims d = { c->hidden_size, c->num_attention_heads, c->qk_nope_head_dim, c->qk_rope_head_dim,
		   c->v_head_dim, mc_qk_head_dim(c), c->q_lora_rank, c->kv_lora_rank, N };
	return d;
}

void mla_fwd(const gpu_model *g, const struct layer_weights *w, struct mla_acts *a, float *out, const float *x,
	     const int *pos, int B, int T)
{
	const struct model_config *c = &g->m->cfg;
	dims d = mla_dims(c, B * T);
	float eps = (float)c->rms_norm_eps;
	int N = d.N, Dkva = d.Rkv + d.dr;
	struct rope_freqs rf;

	mc_rope_freqs(c, &rf);
	if (d.Rq > 0) {
		lin_fwd(g, a->qa, x, w->q_a_proj, N, d.C, d.Rq);
		rmsnorm_forward_cuda(a->qa_n, a->qa_rstd, a->qa, w->q_a_layernorm, N, d.Rq, eps);
		lin_fwd(g, a->q, a->qa_n, w->q_b_proj, N, d.Rq, d.H * d.dq);
	} else {
		lin_fwd(g, a->q, x, w->q_proj, N, d.C, d.H * d.dq);
	}
	rope_forward_cuda(a->q + d.dn, pos, N, d.H, d.H * d.dq, d.dq, d.dr, rf.inv_freq, rf.attention_factor);

	lin_fwd(g, a->kva, x, w->kv_a_proj_with_mqa, N, d.C, Dkva);
	copy_cols(a->ckv, d.Rkv, a->kva, Dkva, N, d.Rkv);
	rope_forward_cuda(a->kva + d.Rkv, pos, N, 1, Dkva, 0, d.dr, rf.inv_freq, rf.attention_factor);
	rmsnorm_forward_cuda(a->ckv_n, a->ckv_rstd, a->ckv, w->kv_a_layernorm, N, d.Rkv, eps);
	lin_fwd(g, a->kv, a->ckv_n, w->kv_b_proj, N, d.Rkv, d.H * (d.dn + d.dv));
	size_t n_kv = (size_t)N * d.H * (d.dq + d.dv);
	assemble_kv_kernel<<<grid_for(n_kv), kThreads, 0, stream()>>>(a->k, a->v, a->kv, a->kva, N, d.H, d.dn,
								       d.dv, d.dr, d.Rkv);
	prof_begin(PROF_ATTENTION);
	attention_forward_cuda(a->att, a->lse, a->q, a->k, a->v, B, T, d.H, d.dq, d.dv, mc_softmax_scale(c));
	prof_end(PROF_ATTENTION);
	lin_fwd(g, out, a->att, w->o_proj, N, d.H * d.dv, d.C);
}

/* writes dx */
void mla_bwd(const gpu_model *g, const struct layer_weights *w, const struct layer_weights *gw,
	     const struct mla_acts *a, struct grad_scratch *s, float *dx, const float *dout, const float *x,
	     const int *pos, int B, int T)
{
	const struct model_config *c = &g->m->cfg;
	dims d = mla_dims(c, B * T);
	int N = d.N, Dkva = d.Rkv + d.dr;
	struct rope_freqs rf;

	mc_rope_freqs(c, &rf);
	lin_bwd(g, s->datt, gw->o_proj, dout, a->att, w->o_proj, N, d.H * d.dv, d.C, true);
	zero(s->dq, sizeof(float) * (size_t)N * d.H * d.dq);
	zero(s->dk, sizeof(float) * (size_t)N * d.H * d.dq);
	zero(s->dv, sizeof(float) * (size_t)N * d.H * d.dv);
	prof_begin(PROF_ATTENTION);
	attention_backward_cuda(s->dq, s->dk, s->dv, s->datt, a->att, a->lse, a->q, a->k, a->v, B, T, d.H, d.dq,
				d.dv, mc_softmax_scale(c));
	prof_end(PROF_ATTENTION);

	/* kv path: kv_b, its norm, then kv_a (whose output gradient is [dc_kv | dk_pe] = dkva) */
	size_t n_dkv = (size_t)N * (d.H * (d.dn + d.dv) + d.dr);
	disassemble_dkv_kernel<<<grid_for(n_dkv), kThreads, 0, stream()>>>(s->dkv, s->dkva + d.Rkv, Dkva, s->dk,
									    s->dv, N, d.H, d.dn, d.dv, d.dr);
	rope_backward_cuda(s->dkva + d.Rkv, pos, N, 1, Dkva, 0, d.dr, rf.inv_freq, rf.attention_factor);
	lin_bwd(g, s->dckv_n, gw->kv_b_proj, s->dkv, a->ckv_n, w->kv_b_proj, N, d.Rkv, d.H * (d.dn + d.dv), true);
	float *dckv = scratch<float>((size_t)N * d.Rkv);
	zero(dckv, sizeof(float) * (size_t)N * d.Rkv);
	rmsnorm_backward_cuda(dckv, gw->kv_a_layernorm, s->dckv_n, a->ckv, w->kv_a_layernorm, a->ckv_rstd, N,
			      d.Rkv);
	copy_cols(s->dkva, Dkva, dckv, d.Rkv, N, d.Rkv);
	scratch_free(dckv);
	lin_bwd(g, dx, gw->kv_a_proj_with_mqa, s->dkva, x, w->kv_a_proj_with_mqa, N, d.C, Dkva, true);

	/* q path */
	rope_backward_cuda(s->dq + d.dn, pos, N, d.H, d.H * d.dq, d.dq, d.dr, rf.inv_freq, rf.attention_factor);
	if (d.Rq > 0) {
		lin_bwd(g, s->dqa_n, gw->q_b_proj, s->dq, a->qa_n, w->q_b_proj, N, d.Rq, d.H * d.dq, true);
		zero(s->dqa, sizeof(float) * (size_t)N * d.Rq);
		rmsnorm_backward_cuda(s->dqa, gw->q_a_layernorm, s->dqa_n, a->qa, w->q_a_layernorm, a->qa_rstd, N,
				      d.Rq);
		lin_bwd(g, dx, gw->q_a_proj, s->dqa, x, w->q_a_proj, N, d.C, d.Rq, false);
	} else {
		lin_bwd(g, dx, gw->q_proj, s->dq, x, w->q_proj, N, d.C, d.H * d.dq, false);
	}
}

/* ------------------------------------------------------------------------------------------------------
 * SwiGLU MLP and DeepSeekMoE (moe.c)
 * ---------------------------------------------------------------------------------------------------- */

void mlp_fwd(const gpu_model *g, const struct mlp_acts *a, float *y, const float *x, const float *wg,
	     const float *wu, const float *wd, int rows, int C, int I)
{
	lin_fwd(g, a->g, x, wg, rows, C, I);
	lin_fwd(g, a->u, x, wu, rows, C, I);
	swiglu_forward_cuda(a->a, a->g, a->u, (size_t)rows * I);
	lin_fwd(g, y, a->a, wd, rows, I, C);
}

/* dx written (set_dx) or accumulated; dg, du: [rows, I] scratch */
void mlp_bwd(const gpu_model *g, float *dx, float *dwg, float *dwu, float *dwd, float *dg, float *du,
	     const float *dy, const float *x, const struct mlp_acts *a, const float *wg, const float *wu,
	     const float *wd, int rows, int C, int I, bool set_dx)
{
	lin_bwd(g, dg, dwd, dy, a->a, wd, rows, I, C, true);
	/* swiglu_backward_cuda accumulates: d(gate) and d(up) from d(out) = dg, into zeroed buffers */
	float *da = scratch<float>((size_t)rows * I);
	CUDA_CHECK(cudaMemcpyAsync(da, dg, sizeof(float) * (size_t)rows * I, cudaMemcpyDeviceToDevice, stream()));
	zero(dg, sizeof(float) * (size_t)rows * I);
	zero(du, sizeof(float) * (size_t)rows * I);
	swiglu_backward_cuda(dg, du, da, a->g, a->u, (size_t)rows * I);
	scratch_free(da);
	lin_bwd(g, dx, dwg, dg, x, wg, rows, C, I, set_dx);
	lin_bwd(g, dx, dwu, du, x, wu, rows, C, I, false);
}

/*
 * Grouped expert GEMMs: one cublasGemmGroupedBatchedEx per projection per MoE layer, a problem per expert
 * with rows (a group of one each: the experts' row counts differ), instead of a host loop of three GEMMs
 * per expert.  The activation operands are rounded to bf16 once for the whole layer and SwiGLU runs once
 * over all rows.  A cuBLAS that refuses the call (older than 12.5, or a type combination it does not
 * take: bf16 operands with fp32 output) is remembered and the per-expert loop runs instead, with one line
 * on stderr; gpu_model_grouped_gemm(0) asks for the loop (tests compare the two).
 */
static int g_grouped = 1;        /* 1: try the grouped call; 0: per-expert GEMMs */
static int g_grouped_refused;    /* the grouped call failed once: per-expert GEMMs from then on */

struct gproblem {
	const void *A, *B;
	float *C;
	int m, n, k, lda, ldb, ldc;
};

/* C_i = op(A_i) op(B_i) + beta C_i for every problem, in one grouped call; false when cuBLAS refuses it */
bool gemm_grouped(cublasOperation_t ta, cublasOperation_t tb, const std::vector<gproblem> &p, float beta,
		  cudaDataType_t type)
{
	const int G = (int)p.size();
	if (G == 0)
		return true;
	if (!g_grouped || g_grouped_refused)
		return false;
	std::vector<cublasOperation_t> tas(G, ta), tbs(G, tb);
	std::vector<int> m(G), n(G), k(G), lda(G), ldb(G), ldc(G), size(G, 1);
	std::vector<float> alpha(G, 1.0f), betas(G, beta);
	std::vector<const void *> ptr(3 * (size_t)G);
	for (int i = 0; i < G; i++) {
		m[i] = p[i].m, n[i] = p[i].n, k[i] = p[i].k;
		lda[i] = p[i].lda, ldb[i] = p[i].ldb, ldc[i] = p[i].ldc;
		ptr[i] = p[i].A, ptr[G + i] = p[i].B, ptr[2 * G + i] = p[i].C;
	}
	/* the pointer arrays live in device memory; the rest are host arrays */
	const void **dptr = scratch<const void *>(3 * (size_t)G);
	CUDA_CHECK(cudaMemcpyAsync(dptr, ptr.data(), sizeof(void *) * 3 * G, cudaMemcpyHostToDevice, stream()));
	cublasStatus_t st = cublasGemmGroupedBatchedEx(cublas(), tas.data(), tbs.data(), m.data(), n.data(), k.data(),
						       alpha.data(), dptr, type, lda.data(), dptr + G, type, ldb.data(),
						       betas.data(), (void *const *)(dptr + 2 * G), CUDA_R_32F, ldc.data(),
						       G, size.data(), CUBLAS_COMPUTE_32F);
	scratch_free(dptr);
	if (st == CUBLAS_STATUS_SUCCESS)
		return true;
	if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE)
		CUBLAS_CHECK(st);
	fprintf(stderr, "experts: cublasGemmGroupedBatchedEx refused (%s): one GEMM per expert from now on\n",
		cublasGetStatusName(st));
	g_grouped_refused = 1;
	return false;
}

/* the matmul operands of the grouped path: bf16 copies (freed by ops_free) or the fp32 arrays themselves */
struct ops {
	const gpu_model *g;
	std::vector<void *> owned;
	cudaDataType_t type;
};

const void *op_act(ops &o, const float *x, size_t n)
{
	if (!o.g->bf16)
		return x;
	__nv_bfloat16 *b = to_bf16(x, n);
	o.owned.push_back(b);
	return b;
}

const void *op_weight(const ops &o, const float *w)
{
	cudaDataType_t t;
	return weight_operand(o.g, w, &t);
}

void ops_free(ops &o)
{
	for (void *p : o.owned)
		scratch_free(p);
}

ops ops_of(const gpu_model *g)
{
	ops o;
	o.g = g;
	o.type = g->bf16 ? CUDA_R_16BF : CUDA_R_32F;
	return o;
}

/* y[rows, out] = x W^T per expert (lin_fwd): W [out, in] */
gproblem fwd_problem(const void *W, const void *x, float *y, int rows, int in, int out)
{
	return gproblem{ W, x, y, out, rows, in, in, in, out };
}

/* dx[rows, in] = dy W (lin_bwd's dx) */
gproblem dx_problem(const void *W, const void *dy, float *dx, int rows, int in, int out)
{
	return gproblem{ W, dy, dx, in, rows, out, in, out, in };
}

/* dW[out, in] += dy^T x (lin_bwd's dw; A = x, B = dy) */
gproblem dw_problem(const void *x, const void *dy, float *dw, int rows, int in, int out)
{
	return gproblem{ x, dy, dw, in, out, rows, in, out, in };
}

/* the problems of every expert with rows: A_e = a + e*astride (elements of the operand type), B_e / C_e at
 * row r0 of b / c (bcols / ccols elements a row) */
std::vector<gproblem> per_expert(const ops &o, gproblem (*mk)(const void *, const void *, float *, int, int, int),
				 const void *a, size_t astride, bool a_rows, const void *b, int bcols, float *c,
				 int ccols, bool c_rows, const int *off, int El, int in, int out)
{
	const size_t es = o.type == CUDA_R_16BF ? 2 : 4;
	std::vector<gproblem> p;
	for (int e = 0; e < El; e++) {
		int r0 = off[e], n = off[e + 1] - r0;
		if (n == 0)
			continue;
		const char *ae = (const char *)a + (a_rows ? (size_t)r0 * astride : (size_t)e * astride) * es;
		const char *be = (const char *)b + (size_t)r0 * bcols * es;
		float *ce = c + (c_rows ? (size_t)r0 * ccols : (size_t)e * ccols);
		p.push_back(mk(ae, be, ce, n, in, out));
	}
	return p;
}

bool experts_fwd_grouped(const gpu_model *g, const struct layer_weights *w, const struct mlp_acts *acts, float *yr,
			 const float *xr, const int *off, int El, int C, int Im)
{
	ops o = ops_of(g);
	const int R = off[El] - off[0];
	const size_t wsz = (size_t)Im * C;
	if (R == 0)
		return true;
	const void *xb = op_act(o, xr + (size_t)off[0] * C, (size_t)R * C);
	std::vector<int> rel(off, off + El + 1); /* rows relative to off[0]: xb starts there */
	for (int &r : rel)
		r -= off[0];
	float *g0 = acts->g + (size_t)off[0] * Im, *u0 = acts->u + (size_t)off[0] * Im, *a0 = acts->a + (size_t)off[0] * Im;
	bool ok = gemm_grouped(CUBLAS_OP_T, CUBLAS_OP_N, per_expert(o, fwd_problem, op_weight(o, w->experts_gate_proj),
				wsz, false, xb, C, g0, Im, true, rel.data(), El, C, Im), 0.0f, o.type) &&
		  gemm_grouped(CUBLAS_OP_T, CUBLAS_OP_N, per_expert(o, fwd_problem, op_weight(o, w->experts_up_proj),
				wsz, false, xb, C, u0, Im, true, rel.data(), El, C, Im), 0.0f, o.type);
	if (ok) {
		swiglu_forward_cuda(a0, g0, u0, (size_t)R * Im);
		const void *ab = op_act(o, a0, (size_t)R * Im);
		ok = gemm_grouped(CUBLAS_OP_T, CUBLAS_OP_N, per_expert(o, fwd_problem, op_weight(o, w->experts_down_proj),
				  wsz, false, ab, Im, yr + (size_t)off[0] * C, C, true, rel.data(), El, Im, C), 0.0f,
				  o.type);
	}
	ops_free(o);
	return ok;
}

void experts_fwd_loop(const gpu_model *g, const struct layer_weights *w, const struct mlp_acts *acts, float *yr,
		      const float *xr, const int *off, int El, int C, int Im);
void experts_bwd_loop(const gpu_model *g, const struct layer_weights *w, const struct layer_weights *gw,
		      const struct mlp_acts *acts, float *dxr, float *dg, float *du, const float *dyr,
		      const float *xr, const int *off, int El, int C, int Im);

/* the local experts' blocks: expert e's rows [off[e], off[e+1]) of xr -> yr, activations in ea */
void experts_fwd(const gpu_model *g, const struct layer_weights *w, const struct mlp_acts *acts, float *yr,
		 const float *xr, const int *off, int El, int C, int Im)
{
	prof_begin(PROF_EXPERTS);
	if (!experts_fwd_grouped(g, w, acts, yr, xr, off, El, C, Im))
		experts_fwd_loop(g, w, acts, yr, xr, off, El, C, Im);
	prof_end(PROF_EXPERTS);
}

void experts_fwd_loop(const gpu_model *g, const struct layer_weights *w, const struct mlp_acts *acts, float *yr,
		      const float *xr, const int *off, int El, int C, int Im)
{
	for (int e = 0; e < El; e++) {
		int r0 = off[e], n = off[e + 1] - r0;
		size_t wo = (size_t)e * Im * C, ro = (size_t)r0 * Im;
		if (n == 0)
			continue;
		struct mlp_acts ea = { acts->g + ro, acts->u + ro, acts->a + ro };
		mlp_fwd(g, &ea, yr + (size_t)r0 * C, xr + (size_t)r0 * C, w->experts_gate_proj + wo,
			w->experts_up_proj + wo, w->experts_down_proj + wo, n, C, Im);
	}
}

/* experts_bwd over grouped GEMMs: dA = dy Wd, dWd += dy^T a, SwiGLU's backward over all rows, then
 * dx = dg Wg + du Wu, dWg += dg^T x, dWu += du^T x.  false (nothing written yet, or a refusal before the
 * first write of a gradient: the loop then redoes it all) when cuBLAS refuses. */
bool experts_bwd_grouped(const gpu_model *g, const struct layer_weights *w, const struct layer_weights *gw,
			 const struct mlp_acts *acts, float *dxr, float *dg, float *du, const float *dyr,
			 const float *xr, const int *off, int El, int C, int Im)
{
	ops o = ops_of(g);
	const int R = off[El] - off[0];
	const size_t wsz = (size_t)Im * C, r0 = (size_t)off[0];
	if (R == 0)
		return true;
	std::vector<int> rel(off, off + El + 1);
	for (int &r : rel)
		r -= off[0];
	const int *ro = rel.data();
	float *dg0 = dg + r0 * Im, *du0 = du + r0 * Im;
	const void *dyb = op_act(o, dyr + r0 * C, (size_t)R * C);
	/* dA into dg (the loop's order): a refusal here leaves no gradient touched */
	if (!gemm_grouped(CUBLAS_OP_N, CUBLAS_OP_N, per_expert(o, dx_problem, op_weight(o, w->experts_down_proj), wsz,
			  false, dyb, C, dg0, Im, true, ro, El, Im, C), 0.0f, o.type)) {
		ops_free(o);
		return false;
	}
	const void *ab = op_act(o, acts->a + r0 * Im, (size_t)R * Im);
	/* once the grouped call has run, it keeps running: a later refusal is a cuBLAS fault */
	auto must = [](bool ok) {
		if (!ok)
			fail("experts_bwd", "cublasGemmGroupedBatchedEx refused a call after accepting one");
	};
	must(gemm_grouped(CUBLAS_OP_N, CUBLAS_OP_T, per_expert(o, dw_problem, ab, Im, true, dyb, C,
			  gw->experts_down_proj, Im * C, false, ro, El, Im, C), 1.0f, o.type));
	float *da = scratch<float>((size_t)R * Im);
	CUDA_CHECK(cudaMemcpyAsync(da, dg0, sizeof(float) * (size_t)R * Im, cudaMemcpyDeviceToDevice, stream()));
	zero(dg0, sizeof(float) * (size_t)R * Im);
	zero(du0, sizeof(float) * (size_t)R * Im);
	swiglu_backward_cuda(dg0, du0, da, acts->g + r0 * Im, acts->u + r0 * Im, (size_t)R * Im);
	scratch_free(da);
	const void *dgb = op_act(o, dg0, (size_t)R * Im), *dub = op_act(o, du0, (size_t)R * Im);
	const void *xb = op_act(o, xr + r0 * C, (size_t)R * C);
	float *dx0 = dxr + r0 * C;
	must(gemm_grouped(CUBLAS_OP_N, CUBLAS_OP_N, per_expert(o, dx_problem, op_weight(o, w->experts_gate_proj), wsz,
			  false, dgb, Im, dx0, C, true, ro, El, C, Im), 0.0f, o.type));
	must(gemm_grouped(CUBLAS_OP_N, CUBLAS_OP_N, per_expert(o, dx_problem, op_weight(o, w->experts_up_proj), wsz,
			  false, dub, Im, dx0, C, true, ro, El, C, Im), 1.0f, o.type));
	must(gemm_grouped(CUBLAS_OP_N, CUBLAS_OP_T, per_expert(o, dw_problem, xb, C, true, dgb, Im,
			  gw->experts_gate_proj, Im * C, false, ro, El, C, Im), 1.0f, o.type));
	must(gemm_grouped(CUBLAS_OP_N, CUBLAS_OP_T, per_expert(o, dw_problem, xb, C, true, dub, Im,
			  gw->experts_up_proj, Im * C, false, ro, El, C, Im), 1.0f, o.type));
	ops_free(o);
	return true;
}

/* dxr (written) and the experts' weight gradients from dyr; dg, du: [rows, Im] scratch */
void experts_bwd(const gpu_model *g, const struct layer_weights *w, const struct layer_weights *gw,
		 const struct mlp_acts *acts, float *dxr, float *dg, float *du, const float *dyr, const float *xr,
		 const int *off, int El, int C, int Im)
{
	prof_begin(PROF_EXPERTS);
	if (!experts_bwd_grouped(g, w, gw, acts, dxr, dg, du, dyr, xr, off, El, C, Im))
		experts_bwd_loop(g, w, gw, acts, dxr, dg, du, dyr, xr, off, El, C, Im);
	prof_end(PROF_EXPERTS);
}

void experts_bwd_loop(const gpu_model *g, const struct layer_weights *w, const struct layer_weights *gw,
		      const struct mlp_acts *acts, float *dxr, float *dg, float *du, const float *dyr,
		      const float *xr, const int *off, int El, int C, int Im)
{
	for (int e = 0; e < El; e++) {
		int r0 = off[e], n = off[e + 1] - r0;
		size_t wo = (size_t)e * Im * C, ro = (size_t)r0 * Im;
		if (n == 0)
			continue;
		struct mlp_acts ea = { acts->g + ro, acts->u + ro, acts->a + ro };
		mlp_bwd(g, dxr + (size_t)r0 * C, gw->experts_gate_proj + wo, gw->experts_up_proj + wo,
			gw->experts_down_proj + wo, dg + ro, du + ro, dyr + (size_t)r0 * C, xr + (size_t)r0 * C, &ea,
			w->experts_gate_proj + wo, w->experts_up_proj + wo, w->experts_down_proj + wo, n, C, Im,
			true);
	}
}

/*
 * The counting sort of moe.c's moe_group_rows on the device: the rows sorted by expert, within an expert
 * by (token, slot) pair, so the same order as the CPU model's.  One block per expert counts its pairs,
 * one thread turns the counts into offsets (E <= 1024), then one block per expert walks the pairs in
 * chunks of its threads and places its own by a prefix sum over the chunk (stable, no atomics).
 */
constexpr int kGroupThreads = 256;

/* counts[e] = the pairs routed to expert e = blockIdx.x */
__global__ void count_rows_kernel(int *counts, const int *topk, int NK)
{
	__shared__ int part[kGroupThreads];
	const int e = blockIdx.x, t = threadIdx.x;
	int n = 0;
	for (int i = t; i < NK; i += blockDim.x)
		n += topk[i] == e;
	part[t] = n;
	__syncthreads();
	for (int d = blockDim.x / 2; d > 0; d >>= 1) {
		if (t < d)
			part[t] += part[t + d];
		__syncthreads();
	}
	if (t == 0)
		counts[e] = part[0];
}

/* off[0] = 0, off[e + 1] = off[e] + counts[e] */
__global__ void offsets_kernel(int *off, const int *counts, int E)
{
	if (blockIdx.x == 0 && threadIdx.x == 0) {
		off[0] = 0;
		for (int e = 0; e < E; e++)
			off[e + 1] = off[e] + counts[e];
	}
}

/* expert blockIdx.x's pairs, in pair order, into rows off[e], off[e] + 1, ... */
__global__ void place_rows_kernel(int *row_pair, int *row_of, const int *topk, const int *off, int NK)
{
	__shared__ int scan[kGroupThreads];
	const int e = blockIdx.x, t = threadIdx.x;
	int base = off[e];
	for (int c0 = 0; c0 < NK; c0 += blockDim.x) {
		const int i = c0 + t, mine = i < NK && topk[i] == e;
		scan[t] = mine;
		__syncthreads();
		for (int d = 1; d < (int)blockDim.x; d <<= 1) { /* inclusive prefix sum over the chunk */
			int v = t >= d ? scan[t - d] : 0;
			__syncthreads();
			scan[t] += v;
			__syncthreads();
		}
		if (mine) {
			const int r = base + scan[t] - 1;
			row_of[i] = r;
			row_pair[r] = i;
		}
		base += scan[blockDim.x - 1];
		__syncthreads(); /* before the next chunk overwrites scan */
	}
}

/* Groups the rows by expert on the device (a->row_pair, a->row_of); only the E + 1 offsets (the counts)
 * come back to the host: experts_fwd plans its GEMMs from them, and load is m->expert_load's row. */
int route_rows(gpu_model *g, struct moe_acts *a, int l, int N, int64_t *load)
{
	const struct model_config *c = &g->m->cfg;
	int K = c->num_experts_per_tok, E = c->n_routed_experts, NK = N * K;
	int *off = g->offsets.data() + (size_t)l * (E + 1);
	int *d = scratch<int>(2 * (size_t)E + 1), *counts = d, *doff = d + E;

	if (E > 1024)
		fail("route_rows", "more than 1024 routed experts");
	count_rows_kernel<<<E, kGroupThreads, 0, stream()>>>(counts, a->topk_idx, NK);
	CUDA_CHECK_LAUNCH("count_rows_kernel");
	offsets_kernel<<<1, 1, 0, stream()>>>(doff, counts, E);
	CUDA_CHECK_LAUNCH("offsets_kernel");
	place_rows_kernel<<<E, kGroupThreads, 0, stream()>>>(a->row_pair, a->row_of, a->topk_idx, doff, NK);
	CUDA_CHECK_LAUNCH("place_rows_kernel");
	moe_cuda_memcpy_d2h(off, doff, sizeof(int) * (size_t)(E + 1)); /* the layer's one host wait */
	scratch_free(d);
	for (int e = 0; e < E; e++)
		load[e] = off[e + 1] - off[e];
	return off[E];
}

/*
 * Routing replay (model.h route_replay; a->replay is the HOST array of this layer, [N, K]): the given
 * experts instead of the router's top-K, weighted by the router's scores of them, computed on the host
 * by the CPU model's router_replay_weights.
 */
void replay_routes(gpu_model *g, struct moe_acts *a, const struct router_params *rp, int N)
{
	size_t NK = (size_t)N * rp->K, NE = (size_t)N * rp->E;
	g->scores.resize(NE);
	g->topk_w.resize(NK);
	moe_cuda_memcpy_d2h(g->scores.data(), a->scores, sizeof(float) * NE);
	router_replay_weights(g->topk_w.data(), g->scores.data(), a->replay, rp, N);
	moe_cuda_memcpy_h2d(a->topk_idx, a->replay, sizeof(int) * NK);
	moe_cuda_memcpy_h2d(a->topk_w, g->topk_w.data(), sizeof(float) * NK);
}

/* ------------------------------------------------------------------------------------------------------
 * Expert parallelism (moe.c's moe_forward_ep / moe_backward_ep): the host plans with the CPU model's
 * moe_dispatch (the counting sort and the counts exchange: the one host wait of the layer), the device
 * permutes, exchanges (launch/cuda/comm_device.h) and computes.
 * ---------------------------------------------------------------------------------------------------- */

/* dst[idx[r]] = src[r] */
__global__ void scatter_rows_kernel(float *dst, const float *src, const int *idx, int R, int C)
{
	size_t total = (size_t)R * C;
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
		dst[(size_t)idx[i / C] * C + i % C] = src[i];
}

/* dst[r] = src[idx[r]] */
__global__ void gather_idx_rows_kernel(float *dst, const float *src, const int *idx, int R, int C)
{
	size_t total = (size_t)R * C;
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
		dst[i] = src[(size_t)idx[i / C] * C + i % C];
}

void scatter_rows(float *dst, const float *src, const int *idx, int R, int C)
{
	if (R > 0)
		scatter_rows_kernel<<<grid_for((size_t)R * C), kThreads, 0, stream()>>>(dst, src, idx, R, C);
}

void gather_idx_rows(float *dst, const float *src, const int *idx, int R, int C)
{
	if (R > 0)
		gather_idx_rows_kernel<<<grid_for((size_t)R * C), kThreads, 0, stream()>>>(dst, src, idx, R, C);
}

template <typename U> void grow_device(U **p, size_t n)
{
	moe_cuda_free(*p);
	*p = (U *)moe_cuda_malloc(sizeof(U) * (n ? n : 1));
}

/* grow-only: the loads drift from step to step, so R gets headroom */
void ensure_ep_layer(gpu_model::ep_layer *e, size_t NK, size_t R, int C, int Im)
{
	if (NK > e->cap_NK) {
		grow_device(&e->send_row, NK);
		grow_device(&e->send_pair, NK);
		e->cap_NK = NK;
	}
	if (R > e->cap_R || !e->xr) {
		R += R / 4 + 16;
		grow_device(&e->recv_to_expert, R);
		grow_device(&e->xr, R * C);
		grow_device(&e->er.g, R * Im);
		grow_device(&e->er.u, R * Im);
		grow_device(&e->er.a, R * Im);
		e->cap_R = R;
	}
}

void free_ep_layer(gpu_model::ep_layer *e)
{
	moe_cuda_free(e->send_row);
	moe_cuda_free(e->send_pair);
	moe_cuda_free(e->recv_to_expert);
	moe_cuda_free(e->xr);
	moe_cuda_free(e->er.g);
	moe_cuda_free(e->er.u);
	moe_cuda_free(e->er.a);
	*e = gpu_model::ep_layer{};
}

void ep_fail(const char *what)
{
	comm_abort(1, what);  /* a rank that cannot exchange must not leave its peers waiting */
}

/* rows [n, C] in this rank's send order -> every peer's rows for my experts, source-major (and back) */
void ep_exchange(gpu_model *g, const struct moe_dispatch *d, const float *send, float *recv, int C, bool back)
{
	g->elem_send.resize(d->ep);
	g->elem_recv.resize(d->ep);
	for (int p = 0; p < d->ep; p++) {
		g->elem_send[p] = (back ? d->peer_recv[p] : d->peer_send[p]) * C;
		g->elem_recv[p] = (back ? d->peer_send[p] : d->peer_recv[p]) * C;
	}
	prof_begin(PROF_COMM);
	if (dcomm_alltoallv(g->m->ep_group, send, g->elem_send.data(), recv, g->elem_recv.data(), COMM_F32))
		ep_fail(back ? "expert combine: the all-to-all back failed" : "expert dispatch: the all-to-all failed");
	prof_end(PROF_COMM);
}

/* plan on the host (topk comes back: the wait the counts exchange needs anyway), upload the maps */
void ep_plan(gpu_model *g, struct moe_acts *a, gpu_model::ep_layer *e, int N, int64_t *load)
{
	const struct moe_model *m = g->m;
	const struct model_config *c = &m->cfg;
	int K = c->num_experts_per_tok, NK = N * K, C = c->hidden_size, Im = c->moe_intermediate_size;
	struct moe_dispatch *d = &a->disp;

	if ((d->N != N || !d->send_row) &&
	    dispatch_init(d, m->ep_group, N, K, c->n_routed_experts, m->expert_begin, m->expert_end))
		ep_fail("out of memory for the expert dispatch");
	g->topk.resize(NK);
	g->row_pair.resize(NK);
	moe_cuda_memcpy_d2h(g->topk.data(), a->topk_idx, sizeof(int) * NK);
	if (dispatch_plan(d, g->topk.data()))
		ep_fail("expert dispatch: exchanging the counts failed");
	memcpy(load, d->load, sizeof(int64_t) * c->n_routed_experts);
	for (int i = 0; i < NK; i++)
		g->row_pair[d->send_row[i]] = i;
	ensure_ep_layer(e, NK, d->R, C, Im);
	moe_cuda_memcpy_h2d(e->send_row, d->send_row, sizeof(int) * NK);
	moe_cuda_memcpy_h2d(e->send_pair, g->row_pair.data(), sizeof(int) * NK);
	moe_cuda_memcpy_h2d(e->recv_to_expert, d->recv_to_expert, sizeof(int) * d->R);
}

/* the routed part of the layer under expert parallelism; out already holds the shared experts (or not:
 * set) */
void moe_fwd_ep(gpu_model *g, int l, const struct layer_weights *w, struct moe_acts *a, float *out,
		const float *x, int N, int64_t *load, bool set)
{
	const struct model_config *c = &g->m->cfg;
	int K = c->num_experts_per_tok, NK = N * K, C = c->hidden_size, Im = c->moe_intermediate_size;
	gpu_model::ep_layer *e = &g->ep[l];
	struct moe_dispatch *d = &a->disp;

	ep_plan(g, a, e, N, load);
	int R = d->R;
	/* this rank's rows in send order (a->xe), to the ranks of their experts, into expert-major order */
	gather_rows_kernel<<<grid_for((size_t)NK * C), kThreads, 0, stream()>>>(a->xe, x, e->send_pair, K, NK, C);
	float *buf = scratch<float>((size_t)(R > NK ? R : NK) * C + 1);
	ep_exchange(g, d, a->xe, buf, C, false);
	scatter_rows(e->xr, buf, e->recv_to_expert, R, C);
	float *yr = scratch<float>((size_t)R * C + 1);
	experts_fwd(g, w, &e->er, yr, e->xr, d->offsets, d->El, C, Im);
	/* the outputs back to the ranks the rows came from, in their send order (a->ye) */
	gather_idx_rows(buf, yr, e->recv_to_expert, R, C);
	ep_exchange(g, d, buf, a->ye, C, true);
	scratch_free(yr);
	scratch_free(buf);
	combine_rows_kernel<<<grid_for((size_t)N * C), kThreads, 0, stream()>>>(out, a->ye, e->send_row, a->topk_w,
										N, K, C, set);
}

/* the routed part's backward: dx written (set) or added to; s->dtopk_w of every pair */
void moe_bwd_ep(gpu_model *g, int l, const struct layer_weights *w, const struct layer_weights *gw,
		const struct moe_acts *a, struct grad_scratch *s, float *dx, const float *dout, int N, bool set)
{
	const struct model_config *c = &g->m->cfg;
	int K = c->num_experts_per_tok, NK = N * K, C = c->hidden_size, Im = c->moe_intermediate_size;
	const gpu_model::ep_layer *e = &g->ep[l];
	const struct moe_dispatch *d = &a->disp;
	int R = d->R, warps = kThreads / 32;

	/* the combine in send order: dye[r] = w_i dout[token], dtopk_w[i] = <dout[token], ye[r]> */
	combine_backward_kernel<<<(NK + warps - 1) / warps, kThreads, 0, stream()>>>(
		s->dye, s->dtopk_w, dout, a->ye, a->topk_w, e->send_pair, K, NK, C);
	float *buf = scratch<float>((size_t)(R > NK ? R : NK) * C + 1);
	float *dyr = scratch<float>((size_t)R * C + 1), *dxr = scratch<float>((size_t)R * C + 1);
	float *dgr = scratch<float>((size_t)R * Im + 1), *dur = scratch<float>((size_t)R * Im + 1);
	ep_exchange(g, d, s->dye, buf, C, false);
	scatter_rows(dyr, buf, e->recv_to_expert, R, C);
	experts_bwd(g, w, gw, &e->er, dxr, dgr, dur, dyr, e->xr, d->offsets, d->El, C, Im);
	gather_idx_rows(buf, dxr, e->recv_to_expert, R, C);
	ep_exchange(g, d, buf, s->dxe, C, true);
	scratch_free(dur);
	scratch_free(dgr);
	scratch_free(dxr);
	scratch_free(dyr);
	scratch_free(buf);
	combine_rows_kernel<<<grid_for((size_t)N * C), kThreads, 0, stream()>>>(dx, s->dxe, e->send_row, NULL, N, K,
										C, set);
}

void moe_fwd(gpu_model *g, int l, const struct layer_weights *w, struct moe_acts *a, float *out,
	     const float *x, int B, int T, int64_t *load)
{
	const struct model_config *c = &g->m->cfg;
	struct router_params rp = moe_router_params(c);
	int N = B * T, C = c->hidden_size, K = rp.K, Im = c->moe_intermediate_size;
	int Is = c->n_shared_experts * Im;

	lin_fwd(g, a->logits, x, w->gate, N, C, rp.E, true);
	router_forward_cuda(a->scores, a->topk_idx, a->topk_w, a->logits, w->e_score_correction_bias, &rp, N);
	if (a->replay)
		replay_routes(g, a, &rp, N);
	if (g->m->ep_group) {
		if (Is)
			mlp_fwd(g, &a->shared, out, x, w->shared_gate_proj, w->shared_up_proj, w->shared_down_proj,
				N, C, Is);
		moe_fwd_ep(g, l, w, a, out, x, N, load, Is == 0);
		goto balance;
	}
	{
	int R = route_rows(g, a, l, N, load);
	if (R > 0)
		gather_rows_kernel<<<grid_for((size_t)R * C), kThreads, 0, stream()>>>(a->xe, x, a->row_pair, K, R, C);
	experts_fwd(g, w, &a->e, a->ye, a->xe, g->offsets.data() + (size_t)l * (rp.E + 1), rp.E, C, Im);
	if (Is)
		mlp_fwd(g, &a->shared, out, x, w->shared_gate_proj, w->shared_up_proj, w->shared_down_proj, N, C,
			Is);
	combine_rows_kernel<<<grid_for((size_t)N * C), kThreads, 0, stream()>>>(out, a->ye, a->row_of, a->topk_w,
										N, K, C, Is == 0);
	}
balance:
	if (c->aux_loss_alpha > 0)
		balance_loss_forward_cuda_async(g->aux + l, a->scores, a->topk_idx, B, T, rp.E, K,
						(float)c->aux_loss_alpha);
}

void moe_bwd(gpu_model *g, int l, const struct layer_weights *w, const struct layer_weights *gw,
	     const struct moe_acts *a, struct grad_scratch *s, float *dx, const float *dout, const float *x,
	     int B, int T, float loss_scale)
{
	const struct model_config *c = &g->m->cfg;
	struct router_params rp = moe_router_params(c);
	int N = B * T, C = c->hidden_size, K = rp.K, E = rp.E, Im = c->moe_intermediate_size;
	int Is = c->n_shared_experts * Im;
	if (Is)
		mlp_bwd(g, dx, gw->shared_gate_proj, gw->shared_up_proj, gw->shared_down_proj, s->dg_shared,
			s->du_shared, dout, x, &a->shared, w->shared_gate_proj, w->shared_up_proj,
			w->shared_down_proj, N, C, Is, true);
	if (g->m->ep_group) {
		moe_bwd_ep(g, l, w, gw, a, s, dx, dout, N, Is == 0);
	} else {
		const int *off = g->offsets.data() + (size_t)l * (E + 1);
		int R = off[E];
		if (R > 0) {
			int warps = kThreads / 32;
			combine_backward_kernel<<<(R + warps - 1) / warps, kThreads, 0, stream()>>>(
				s->dye, s->dtopk_w, dout, a->ye, a->topk_w, a->row_pair, K, R, C);
		}
		experts_bwd(g, w, gw, &a->e, s->dxe, s->dg, s->du, s->dye, a->xe, off, E, C, Im);
		/* the expert input gradients back to their tokens, slots in order */
		combine_rows_kernel<<<grid_for((size_t)N * C), kThreads, 0, stream()>>>(dx, s->dxe, a->row_of, NULL,
											N, K, C, Is == 0);
	}

	/* router: through the weights (and the balance loss), never through the selection */
	float *dscores = NULL;
	if (c->aux_loss_alpha > 0) {
		dscores = s->dscores;
		zero(dscores, sizeof(float) * (size_t)N * E);
		balance_loss_backward_cuda(dscores, a->scores, a->topk_idx, B, T, E, K, (float)c->aux_loss_alpha,
					   loss_scale);
	}
	zero(s->dlogits, sizeof(float) * (size_t)N * E);
	router_backward_cuda(s->dlogits, s->dtopk_w, dscores, a->scores, a->topk_idx, &rp, N);
	lin_bwd(g, dx, gw->gate, s->dlogits, x, w->gate, N, C, E, false, true);
}

/* ------------------------------------------------------------------------------------------------------
 * The model (model.c)
 * ---------------------------------------------------------------------------------------------------- */

void *device_alloc(size_t bytes)
{
	void *p = moe_cuda_malloc(bytes < 16 ? 16 : bytes);
	moe_cuda_memset(p, 0, bytes < 16 ? 16 : bytes);
	return p;
}

const struct acts_memory device_memory = { device_alloc, moe_cuda_free, 0 };

/* The device view of a host view: the same offset into the other arena.  struct layer_weights holds only
 * float pointers, so it is walked as an array of them. */
float *translate(const float *p, const float *host_base, float *dev_base)
{
	return p ? dev_base + (p - host_base) : NULL;
}

void translate_weights(struct model_weights *dst, const struct model_weights *src, const float *host_base,
		       float *dev_base, int L)
{
	static_assert(sizeof(struct layer_weights) % sizeof(float *) == 0, "layer_weights: float pointers only");
	const int per = (int)(sizeof(struct layer_weights) / sizeof(float *));
	dst->embed_tokens = translate(src->embed_tokens, host_base, dev_base);
	dst->norm = translate(src->norm, host_base, dev_base);
	dst->lm_head = translate(src->lm_head, host_base, dev_base);
	dst->layers = (struct layer_weights *)calloc(L, sizeof(struct layer_weights));
	if (!dst->layers)
		fail("gpu_model_create", "out of host memory");
	for (int l = 0; l < L; l++) {
		float *const *s = (float *const *)&src->layers[l];
		float **d = (float **)&dst->layers[l];
		for (int i = 0; i < per; i++)
			d[i] = translate(s[i], host_base, dev_base);
	}
}

/* Rows of logits held at once: all (asked for, or they fit), the rows asked for, or by default as many as
 * fit in kLogitBytes of fp32 (DeepSeek's 102400 or 129280 words: 655 or 519 rows, instead of the 3.4 GB
 * of all 8192 rows of a 2 x 4096 batch). */
constexpr size_t kLogitBytes = (size_t)256 << 20;

int logit_rows_for(const gpu_model *g, int N)
{
	if (g->logit_rows_opt == 0)
		return N;
	size_t r = g->logit_rows_opt > 0 ? (size_t)g->logit_rows_opt
					 : kLogitBytes / (sizeof(float) * (size_t)g->m->cfg.vocab_size);
	r = r < 1 ? 1 : r;
	return r < (size_t)N ? (int)r : N;
}

void ensure_acts(gpu_model *g, int B, int T)
{
	if (g->a && g->a->B == B && g->a->T == T && g->a->logit_rows == logit_rows_for(g, B * T))
		return;
	model_acts_destroy(&g->m->cfg, g->a);
	struct acts_memory mem = device_memory;
	mem.logit_rows = logit_rows_for(g, B * T);
	g->a = model_acts_create(g->m, B, T, &mem);
	std::vector<int> pos((size_t)B * T);
	for (size_t n = 0; n < pos.size(); n++)
		pos[n] = (int)(n % T);
	moe_cuda_memcpy_h2d(g->a->pos, pos.data(), sizeof(int) * pos.size());
}

/* rows [r0, r0 + n) of the logits (over the temperature, as on the CPU) into a->logits */
void logits_rows(gpu_model *g, int r0, int n)
{
	struct model_acts *a = g->a;
	const int C = g->m->cfg.hidden_size, V = g->m->cfg.vocab_size;
	lin_fwd(g, a->logits, a->lnf + (size_t)r0 * C, g->W.lm_head, n, C, V);
	if (a->temperature != 1.0f)
		scale_kernel<<<grid_for((size_t)n * V), kThreads, 0, stream()>>>(a->logits, 1.0f / a->temperature,
										   (size_t)n * V);
}

} /* namespace */

/* ------------------------------------------------------------------------------------------------------
 * The API
 * ---------------------------------------------------------------------------------------------------- */

extern "C" struct gpu_model *gpu_model_create(struct moe_model *m, int bf16, char *err, size_t errlen)
{
	const struct model_config *c = &m->cfg;
	if (!m->ep_group && (m->expert_begin != 0 || m->expert_end != c->n_routed_experts)) {
		snprintf(err, errlen, "an expert slice [%d, %d) without an expert-parallel group", m->expert_begin,
			 m->expert_end);
		return NULL;
	}
	if (m->ep_group && dcomm_kind() == DCOMM_NONE) {
		snprintf(err, errlen, "expert parallelism needs the device collectives (dcomm_init) first");
		return NULL;
	}
	if (c->qk_rope_head_dim + c->qk_nope_head_dim > MOE_CUDA_ATTN_MAX_DQ || c->v_head_dim > MOE_CUDA_ATTN_MAX_DV) {
		snprintf(err, errlen, "attention head dims %d / %d exceed the GPU kernel's %d / %d",
			 mc_qk_head_dim(c), c->v_head_dim, MOE_CUDA_ATTN_MAX_DQ, MOE_CUDA_ATTN_MAX_DV);
		return NULL;
	}
	gpu_model *g = new gpu_model();
	g->m = m;
	g->bf16 = bf16 != 0;
	g->logit_rows_opt = -1;
	size_t n = m->n_weights;
	g->w = (float *)moe_cuda_malloc(sizeof(float) * n);
	g->g = m->grads ? (float *)moe_cuda_malloc(sizeof(float) * n) : NULL;  /* model_drop_grads: forward only */
	if (g->bf16)
		g->wbf = (__nv_bfloat16 *)moe_cuda_malloc(sizeof(__nv_bfloat16) * n);
	g->aux = (float *)moe_cuda_malloc(sizeof(float) * (c->num_hidden_layers + 1));
	moe_cuda_memset(g->aux, 0, sizeof(float) * (c->num_hidden_layers + 1));
	translate_weights(&g->W, &m->w, m->weights, g->w, c->num_hidden_layers);
	translate_weights(&g->G, &m->g, m->grads, g->g, c->num_hidden_layers);
	g->offsets.assign((size_t)c->num_hidden_layers * (c->n_routed_experts + 1), 0);
	g->ep.assign(c->num_hidden_layers, gpu_model::ep_layer{});
	gpu_model_upload_weights(g);
	gpu_model_zero_grad(g);
	return g;
}

extern "C" void gpu_model_free(struct gpu_model *g)
{
	if (!g)
		return;
	moe_cuda_synchronize();
	model_acts_destroy(&g->m->cfg, g->a);
	for (auto &e : g->ep)
		free_ep_layer(&e);
	moe_cuda_free(g->w);
	moe_cuda_free(g->g);
	moe_cuda_free(g->wbf);
	moe_cuda_free(g->aux);
	moe_cuda_free(g->token_w);
	free(g->W.layers);
	free(g->G.layers);
	delete g;
}

extern "C" void gpu_model_upload_weights(struct gpu_model *g)
{
	moe_cuda_memcpy_h2d(g->w, g->m->weights, sizeof(float) * g->m->n_weights);
	gpu_model_refresh_bf16(g);
}

extern "C" void gpu_model_download_weights(struct gpu_model *g)
{
	moe_cuda_memcpy_d2h(g->m->weights, g->w, sizeof(float) * g->m->n_weights);
}

extern "C" void gpu_model_download_grads(struct gpu_model *g)
{
	moe_cuda_memcpy_d2h(g->m->grads, g->g, sizeof(float) * g->m->n_weights);
}

extern "C" float *gpu_model_weights(struct gpu_model *g) { return g->w; }
extern "C" float *gpu_model_grads(struct gpu_model *g) { return g->g; }
extern "C" void gpu_model_grouped_gemm(int on)
{
	g_grouped = on != 0;
}

extern "C" const char *gpu_model_experts_gemm(void)
{
	if (!g_grouped)
		return "one GEMM per expert (asked for)";
	return g_grouped_refused ? "one GEMM per expert (cuBLAS refused the grouped call)"
				 : "grouped (cublasGemmGroupedBatchedEx, one per projection per layer)";
}

extern "C" uint16_t *gpu_model_weights_bf16(struct gpu_model *g) { return (uint16_t *)g->wbf; }

extern "C" void gpu_model_refresh_bf16(struct gpu_model *g)
{
	size_t n = g->m->n_weights;
	if (g->bf16 && n)
		to_bf16_kernel<<<grid_for(n), kThreads, 0, stream()>>>(g->wbf, g->w, n);
}

extern "C" void gpu_model_zero_grad(struct gpu_model *g)
{
	if (g->g)
		zero(g->g, sizeof(float) * g->m->n_weights);
}

extern "C" void gpu_model_set_logit_grad(struct gpu_model *g, const float *dlogits)
{
	g->logit_grad = dlogits;
}

extern "C" const float *gpu_model_logits(const struct gpu_model *g)
{
	return g->a && g->a->logit_rows == g->a->B * g->a->T ? g->a->logits : NULL;
}

extern "C" void gpu_model_logit_rows(struct gpu_model *g, int rows)
{
	g->logit_rows_opt = rows < 0 ? -1 : rows;
}

extern "C" const float *gpu_model_token_losses(const struct gpu_model *g)
{
	return g->a && g->a->has_targets ? g->losses.data() : NULL;
}

extern "C" float gpu_model_forward(struct gpu_model *g, const int *inputs, const int *targets, int B, int T)
{
	struct moe_model *m = g->m;
	const struct model_config *c = &m->cfg;
	int N = B * T, C = c->hidden_size, V = c->vocab_size, L = c->num_hidden_layers;
	float eps = (float)c->rms_norm_eps;

	ensure_acts(g, B, T);
	memset(m->expert_load, 0, sizeof(int64_t) * (size_t)L * c->n_routed_experts);  /* dense layers: 0 */
	struct model_acts *a = g->a;
	moe_cuda_memcpy_h2d(a->inputs, inputs, sizeof(int) * N);
	a->has_targets = targets != NULL;
	embedding_forward_cuda(a->resid, a->inputs, g->W.embed_tokens, N, C);
	zero(g->aux, sizeof(float) * L);
	for (int l = 0; l < L; l++) {
		const struct layer_weights *w = &g->W.layers[l];
		struct layer_acts *la = &a->layers[l];
		float *x = a->resid + (size_t)l * N * C, *mid = a->h_mid + (size_t)l * N * C;
		float *next = a->resid + (size_t)(l + 1) * N * C;

		rmsnorm_forward_cuda(la->ln1, la->ln1_rstd, x, w->input_layernorm, N, C, eps);
		mla_fwd(g, w, &la->mla, mid, la->ln1, a->pos, B, T);
		vec_add_cuda(mid, x, (size_t)N * C);
		rmsnorm_forward_cuda(la->ln2, la->ln2_rstd, mid, w->post_attention_layernorm, N, C, eps);
		la->moe.replay = m->route_replay ? m->route_replay + (size_t)l * N * c->num_experts_per_tok : NULL;
		if (mc_layer_is_moe(c, l))
			moe_fwd(g, l, w, &la->moe, next, la->ln2, B, T, m->expert_load + (size_t)l * c->n_routed_experts);
		else
			mlp_fwd(g, &la->mlp, next, la->ln2, w->mlp_gate_proj, w->mlp_up_proj, w->mlp_down_proj, N, C,
				c->intermediate_size);
		vec_add_cuda(next, mid, (size_t)N * C);
	}
	rmsnorm_forward_cuda(a->lnf, a->lnf_rstd, a->resid + (size_t)L * N * C, g->W.norm, N, C, eps);
	if (!targets && a->logit_rows == N)  /* logits for the caller (gpu_model_logits); in chunks nobody reads them */
		lin_fwd(g, a->logits, a->lnf, g->W.lm_head, N, C, V);

	std::vector<float> aux(L);
	moe_cuda_memcpy_d2h(aux.data(), g->aux, sizeof(float) * L);
	m->last_aux_loss = 0.0f;
	for (int l = 0; l < L; l++)  /* in layer order, as the CPU model adds them */
		m->last_aux_loss += aux[l];
	if (!targets) {
		m->last_ce_loss = 0.0f;
		return 0.0f;
	}
	g->targets.assign(targets, targets + N);
	moe_cuda_memcpy_h2d(a->targets, targets, sizeof(int) * N);
	a->temperature = m->logit_temperature > 0 ? m->logit_temperature : 1.0f;
	for (int r0 = 0; r0 < N; r0 += a->logit_rows) {  /* one chunk of rows unless the vocabulary is large */
		int n = N - r0 < a->logit_rows ? N - r0 : a->logit_rows;
		logits_rows(g, r0, n);
		cross_entropy_forward_cuda(a->losses + r0, a->logits, a->targets + r0, n, V);
	}
	g->losses.resize(N);
	moe_cuda_memcpy_d2h(g->losses.data(), a->losses, sizeof(float) * N);
	m->last_ce_loss = ce_term(g->losses.data(), targets, m->token_weights, N);
	return m->last_ce_loss + m->last_aux_loss;
}

extern "C" void gpu_model_backward(struct gpu_model *g, float loss_scale)
{
	struct moe_model *m = g->m;
	const struct model_config *c = &m->cfg;
	struct model_acts *a = g->a;
	if (!a || !a->has_targets)
		fail("gpu_model_backward", "no forward with targets to differentiate");
	if (!g->g)
		fail("gpu_model_backward", "a forward-only model (its host model dropped its gradients)");
	int B = a->B, T = a->T, N = B * T, C = c->hidden_size, V = c->vocab_size, L = c->num_hidden_layers;
	struct grad_scratch *s = &a->gs;

	/* d(loss)/d(raw logits), with the token weights as they are now (model.h) */
	const float *tw = m->token_weights;
	float dloss = ce_row_scale(g->targets.data(), tw, N, loss_scale, a->temperature);
	if (tw) {
		if (g->token_w_cap < (size_t)N) {
			moe_cuda_free(g->token_w);
			g->token_w = (float *)moe_cuda_malloc(sizeof(float) * N);
			g->token_w_cap = N;
		}
		moe_cuda_memcpy_h2d(g->token_w, tw, sizeof(float) * N);
	}
	/* chunk by chunk: the logits again (the buffer holds the forward's last chunk), their gradient in
	 * place (plus logit_grad's rows, times loss_scale), then the chunk's share of dx and of lm_head's
	 * gradient */
	for (int r0 = 0; r0 < N; r0 += a->logit_rows) {
		int n = N - r0 < a->logit_rows ? N - r0 : a->logit_rows;
		if (a->logit_rows < N)
			logits_rows(g, r0, n);
		cross_entropy_backward_cuda(a->logits, a->logits, a->targets + r0, dloss, n, V);
		if (tw)
			scale_rows_kernel<<<grid_for((size_t)n * V), kThreads, 0, stream()>>>(a->logits, g->token_w + r0,
											     n, V);
		if (g->logit_grad)
			axpy_kernel<<<grid_for((size_t)n * V), kThreads, 0, stream()>>>(
				a->logits, loss_scale, g->logit_grad + (size_t)r0 * V, (size_t)n * V);
		lin_bwd(g, s->dln + (size_t)r0 * C, g->G.lm_head, a->logits, a->lnf + (size_t)r0 * C, g->W.lm_head, n, C,
			V, true);
	}
	zero(s->dres, sizeof(float) * (size_t)N * C);
	rmsnorm_backward_cuda(s->dres, g->G.norm, s->dln, a->resid + (size_t)L * N * C, g->W.norm, a->lnf_rstd, N,
			      C);

	for (int l = L - 1; l >= 0; l--) {
		const struct layer_weights *w = &g->W.layers[l], *gw = &g->G.layers[l];
		struct layer_acts *la = &a->layers[l];
		const float *x = a->resid + (size_t)l * N * C, *mid = a->h_mid + (size_t)l * N * C;

		if (mc_layer_is_moe(c, l))
			moe_bwd(g, l, w, gw, &la->moe, s, s->dln, s->dres, la->ln2, B, T, loss_scale);
		else
			mlp_bwd(g, s->dln, gw->mlp_gate_proj, gw->mlp_up_proj, gw->mlp_down_proj, s->dg, s->du, s->dres,
				la->ln2, &la->mlp, w->mlp_gate_proj, w->mlp_up_proj, w->mlp_down_proj, N, C,
				c->intermediate_size, true);
		rmsnorm_backward_cuda(s->dres, gw->post_attention_layernorm, s->dln, mid, w->post_attention_layernorm,
				      la->ln2_rstd, N, C);
		mla_bwd(g, w, gw, &la->mla, s, s->dln, s->dres, la->ln1, a->pos, B, T);
		rmsnorm_backward_cuda(s->dres, gw->input_layernorm, s->dln, x, w->input_layernorm, la->ln1_rstd, N, C);
		if (g->grads_ready)
			g->grads_ready(g->grads_ready_ctx, l);
	}
	embedding_backward_cuda(g->G.embed_tokens, s->dres, a->inputs, N, C);
	if (g->grads_ready)
		g->grads_ready(g->grads_ready_ctx, -1);
}

extern "C" void gpu_model_on_grads_ready(struct gpu_model *g, gpu_grads_ready_fn fn, void *ctx)
{
	g->grads_ready = fn;
	g->grads_ready_ctx = ctx;
}
