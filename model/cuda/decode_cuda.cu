/*
 * model/cuda/decode_cuda.cu - batched latent-cache decoding and sampling on the GPU (decode_cuda.h): the
 * steps of model/decode.c over device buffers, with gpu_model's weights read in place.
 *
 * Per layer of a step of n tokens: the query (q_a, its norm, q_b, RoPE), the new latents (kv_a, RoPE of
 * k_pe, the norm of c_kv) written into the cache, the latent queries q_lat = W_UK_h^T q_nope (one GEMM per
 * head over the n tokens), the absorbed attention (a kernel, one block per (token, head): scores over the
 * slot's cached [c_kv | k_pe] rows, softmax, o_lat = sum p c_kv), W_UV_h o_lat (one GEMM per head), o_proj;
 * then the MLP or the MoE layer: router in fp32 (as the training forward), the top-k to the host, the rows
 * of the whole batch grouped by expert (moe_group_rows, as the GPU model), three GEMMs per expert over its
 * rows, the shared experts over all n, and a combine that adds each token's K slots in order.
 *
 * Precision follows the gpu_model: with bf16 matmuls every linear layer but the router reads the bf16 copy
 * of the weights and rounds its activation operand to bf16 (fp32 accumulation and outputs); the cache, the
 * attention and the sampler are fp32 (the sampler's sums double).  Every reduction has a fixed order.
 */
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "launch/cuda/cuda_common.cuh"
#include "model/cuda/decode_cuda.h"
#include "model/cuda/model_cuda.h"
#include "model/cuda/ops_cuda.h"

extern "C" {
#include "model/layers.h"
#include "model/rope.h"
}

using namespace moe_cuda;

struct gpu_decoder {
	struct gpu_model *g;
	struct moe_model *m;
	int n_slots, max_len, Dl;
	const float *w0;                 /* the device fp32 arena (m->weights' image) */
	const __nv_bfloat16 *wb0;        /* its bf16 copy, NULL unless the model runs bf16 matmuls */
	float *kv;                       /* [L][n_slots][max_len][Dl]: RMSNorm_kv(c_kv) | roped k_pe */
	uint64_t *rng;                   /* [n_slots][4] xoshiro256** states */
	std::vector<int> len, new_len;   /* [n_slots] */
	int route_k;
	std::vector<int> routes;         /* [L][n_slots][max_len][K] (empty: not recorded) */

	/* per-token buffers, for cap tokens */
	int cap;
	int *tok, *slot, *pos;
	float *x, *mid, *ln, *out, *rstd, *qa, *qa_n, *q, *kva, *ckv, *ckv_n, *ql, *ol, *att;
	float *rlog, *rsc, *topk_w, *mg, *mu, *ma;
	int *topk_idx, *row_pair, *row_of;
	float *xe, *ye;
	size_t cap_mlp;                  /* floats of mg / mu / ma */
	/* the logits rows */
	int cap_l, n_logits;
	int *lrows;
	float *lx, *lnf, *lrstd, *logits;  /* [cap_l, C] x 2, [cap_l], [cap_l, V] */
	/* the sampler's outputs */
	int cap_s;
	int *s_slot, *s_ids;
	float *s_lp;
	/* host scratch of the expert grouping */
	std::vector<int> h_topk, h_pair, h_of, h_off, h_fill;
	std::vector<int64_t> h_load;
	std::vector<int> h_rows;
};

namespace {

/* ------------------------------------------------------------------------------------------------------
 * Kernels of the step
 * ---------------------------------------------------------------------------------------------------- */

__global__ void dec_to_bf16_kernel(__nv_bfloat16 *dst, const float *src, size_t n)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		dst[i] = __float2bfloat16(src[i]);
}

/* dst[r, 0..width) = src[r, 0..width) with row strides ldd / lds */
__global__ void dec_copy_cols_kernel(float *dst, int ldd, const float *src, int lds, int N, int width)
{
	size_t total = (size_t)N * width;
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
		dst[(i / width) * ldd + i % width] = src[(i / width) * lds + i % width];
}

/* the cache row of token i (its slot and position in layer kv_l) = [ckv_n[i] | kva[i, Rkv:]] */
__global__ void cache_write_kernel(float *kv_l, const float *ckv_n, const float *kva, const int *slots,
				   const int *pos, int n, int Rkv, int dr, int max_len)
{
	int Dl = Rkv + dr;
	size_t total = (size_t)n * Dl;
	for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
		size_t i = e / Dl;
		int j = (int)(e % Dl);
		float *row = kv_l + ((size_t)slots[i] * max_len + pos[i]) * Dl;
		row[j] = j < Rkv ? ckv_n[i * Rkv + j] : kva[i * Dl + j];
	}
}

/*
 * Absorbed attention, one block per (token i, head h): s_j = scale (q_lat . c_kv_j + q_pe . k_pe_j) over
 * the slot's positions j <= pos[i], softmax, ol[i, h] = sum_j p_j c_kv_j.  Shared: [Dl] query, [P] scores.
 * A warp per position for the scores (lanes over the row: coalesced); a thread per latent dim for the
 * output, positions in order (deterministic).
 */
__global__ void absorbed_attention_kernel(float *ol, const float *ql, const float *q, const float *kv_l,
					  const int *slots, const int *pos, int H, int Rkv, int dr, int dq, int dn,
					  int max_len, float scale)
{
	extern __shared__ float sm[];
	int Dl = Rkv + dr, i = blockIdx.x / H, h = blockIdx.x % H;
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
	float *qs = sm, *s = sm + Dl;
	int P = pos[i] + 1;
	const float *lat = kv_l + (size_t)slots[i] * max_len * Dl;
	size_t ih = (size_t)i * H + h;

	for (int d = threadIdx.x; d < Dl; d += blockDim.x)
		qs[d] = d < Rkv ? ql[ih * Rkv + d] : q[ih * dq + dn + (d - Rkv)];
	__syncthreads();
	for (int j = warp; j < P; j += nwarps) {
		const float *row = lat + (size_t)j * Dl;
		float dot = 0.0f;
		for (int d = lane; d < Dl; d += 32)
			dot += qs[d] * row[d];
		dot = warp_sum(dot);
		if (lane == 0)
			s[j] = dot * scale;
	}
	__syncthreads();
	float mx = -INFINITY;
	for (int j = threadIdx.x; j < P; j += blockDim.x)
		mx = fmaxf(mx, s[j]);
	mx = block_max(mx);
	float sum = 0.0f;
	for (int j = threadIdx.x; j < P; j += blockDim.x) {
		float e = expf(s[j] - mx);
		s[j] = e;
		sum += e;
	}
	sum = block_sum(sum);  /* synchronises: every s[j] is written */
	float inv = 1.0f / sum;
	for (int d = threadIdx.x; d < Rkv; d += blockDim.x) {
		float acc = 0.0f;
		for (int j = 0; j < P; j++)
			acc += s[j] * lat[(size_t)j * Dl + d];
		ol[ih * Rkv + d] = acc * inv;
	}
}

/* xe[r] = x[idx[r] / K] */
__global__ void dec_gather_kernel(float *xe, const float *x, const int *idx, int K, int R, int C)
{
	size_t total = (size_t)R * C;
	for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x)
		xe[e] = x[(size_t)(idx[e / C] / K) * C + e % C];
}

/* out[i] (set or +=) sum_k w[i, k] ye[row_of[i, k]], the K slots in order */
__global__ void dec_combine_kernel(float *out, const float *ye, const int *row_of, const float *w, int n, int K,
				   int C, int set)
{
	size_t total = (size_t)n * C;
	for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
		size_t i = e / C, c = e % C;
		float acc = set ? 0.0f : out[e];
		for (int k = 0; k < K; k++)
			acc += w[i * K + k] * ye[(size_t)row_of[i * K + k] * C + c];
		out[e] = acc;
	}
}

/* ------------------------------------------------------------------------------------------------------
 * The sampler: one block of SAMPLE_THREADS per row
 * ---------------------------------------------------------------------------------------------------- */

constexpr int SAMPLE_THREADS = 256;

__device__ uint64_t rotl64(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

/* xoshiro256** (rl/generate.c gen_rng_next), the top 53 bits as a double in [0, 1) */
__device__ double xoshiro_uniform(uint64_t *s)
{
	uint64_t result = rotl64(s[1] * 5, 7) * 9, t = s[1] << 17;
	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl64(s[3], 45);
	return (double)(result >> 11) * 0x1.0p-53;
}

/*
 * The order of the truncated sampler as one 64-bit key per id: the logit's bits made order-preserving,
 * then the complement of the id (larger key = earlier: higher logit, ties to the lower id).  Distinct ids
 * have distinct keys, so "the ids with key >= t" is a prefix of the CPU's sorted order for every t.
 */
__device__ uint64_t order_key(float x, int v)
{
	uint32_t u;
	memcpy(&u, &x, sizeof(u));
	u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
	return ((uint64_t)u << 32) | (uint32_t)(0xffffffffu - (uint32_t)v);
}

struct sample_row {
	const float *x;
	int V;
	float invT, mx;                  /* the row's max logit times invT */
};

__device__ double row_weight(const sample_row &r, int v)
{
	return (double)expf(r.x[v] * r.invT - r.mx);
}

/* the smallest key >= lower (the last id of the truncated order), block-wide */
__device__ uint64_t min_key_from(const sample_row &r, uint64_t lower)
{
	__shared__ uint64_t part[SAMPLE_THREADS];
	__shared__ uint64_t best;
	uint64_t m = ~0ULL;
	for (int v = threadIdx.x; v < r.V; v += blockDim.x) {
		uint64_t k = order_key(r.x[v], v);
		if (k >= lower && k < m)
			m = k;
	}
	part[threadIdx.x] = m;
	__syncthreads();
	if (threadIdx.x == 0) {
		uint64_t b = part[0];
		for (unsigned j = 1; j < blockDim.x; j++)
			b = part[j] < b ? part[j] : b;
		best = b;
	}
	__syncthreads();
	return best;
}

/* sum of the weights (or, count, of the ids) with key >= lower, block-wide */
__device__ double mass_from(const sample_row &r, uint64_t lower, bool count)
{
	double acc = 0.0;
	for (int v = threadIdx.x; v < r.V; v += blockDim.x)
		if (order_key(r.x[v], v) >= lower)
			acc += count ? 1.0 : row_weight(r, v);
	return block_sum(acc);
}

/*
 * The largest key t such that f(t) = the measure (weight, or count) of the ids with key >= max(t, lower)
 * reaches target (f(t) > target when strict), found 4 bits at a time from the top: per digit a histogram
 * of the measure of the ids still matching the prefix (per thread, then summed in thread order: fixed),
 * the largest digit that keeps f at or above the target taken.  f only changes at ids' keys, so t is the
 * key of the id where the running measure in descending order first reaches the target.  When even
 * f(lower) does not reach it (float rounding at the very top): the smallest key >= lower, the last id.
 */
__device__ uint64_t key_search(const sample_row &r, uint64_t lower, double target, bool strict, bool count)
{
	__shared__ double part[16][SAMPLE_THREADS];
	__shared__ double bin[16];
	__shared__ uint64_t t_sh;
	__shared__ double above_sh;
	__shared__ int hit;              /* the first digit reached the target: then every later one does */
	uint64_t t = 0;
	double above = 0.0;
	for (int shift = 60; shift >= 0; shift -= 4) {
		double local[16];
		for (int d = 0; d < 16; d++)
			local[d] = 0.0;
		for (int v = threadIdx.x; v < r.V; v += blockDim.x) {
			uint64_t k = order_key(r.x[v], v);
			if (k < lower || (shift < 60 && (k >> (shift + 4)) != (t >> (shift + 4))))
				continue;
			local[(k >> shift) & 15] += count ? 1.0 : row_weight(r, v);
		}
		for (int d = 0; d < 16; d++)
			part[d][threadIdx.x] = local[d];
		__syncthreads();
		if (threadIdx.x < 16) {
			double s = 0.0;
			for (unsigned j = 0; j < blockDim.x; j++)
				s += part[threadIdx.x][j];
			bin[threadIdx.x] = s;
		}
		__syncthreads();
		if (threadIdx.x == 0) {
			double cum = 0.0;
			int chosen = 0, reached = 0;
			for (int d = 15; d >= 0 && !reached; d--) {
				cum += bin[d];
				double f = above + cum;
				reached = strict ? f > target : f >= target;
				chosen = reached ? d : 0;
			}
			if (shift == 60)
				hit = reached;
			/* what lies above the chosen digit's ids */
			double over = 0.0;
			for (int d = 15; d > chosen; d--)
				over += bin[d];
			above_sh = above + over;
			t_sh = t | ((uint64_t)chosen << shift);
		}
		__syncthreads();
		t = t_sh;
		above = above_sh;
		__syncthreads();  /* t_sh is rewritten by the next digit */
	}
	return hit ? t : min_key_from(r, lower);
}

/* the id where the running weight in id order first passes target (rl/generate.c sample_plain) */
__device__ int sample_in_id_order(const sample_row &r, double target)
{
	__shared__ double chunk_sum[SAMPLE_THREADS];
	__shared__ int chosen;
	int per = (r.V + blockDim.x - 1) / blockDim.x, v0 = threadIdx.x * per;
	int v1 = v0 + per < r.V ? v0 + per : r.V;
	double acc = 0.0;
	for (int v = v0; v < v1; v++)
		acc += row_weight(r, v);
	chunk_sum[threadIdx.x] = acc;
	__syncthreads();
	if (threadIdx.x == 0) {
		double run = 0.0;
		unsigned c = 0;
		chosen = r.V - 1;  /* target at the very top, past the rounding of the sums */
		for (; c < blockDim.x && target >= run + chunk_sum[c]; c++)
			run += chunk_sum[c];
		for (int v = c * per; c < blockDim.x && v < r.V && v < (int)(c + 1) * per; v++) {
			run += row_weight(r, v);
			if (target < run) {
				chosen = v;
				break;
			}
		}
	}
	__syncthreads();
	return chosen;
}

/* greedy: the highest logit, ties to the lower id */
__device__ int argmax_row(const float *x, int V)
{
	__shared__ float bv[SAMPLE_THREADS];
	__shared__ int bi[SAMPLE_THREADS];
	__shared__ int best;
	float m = -INFINITY;
	int id = -1;
	for (int v = threadIdx.x; v < V; v += blockDim.x)
		if (id < 0 || x[v] > m) {
			m = x[v];
			id = v;
		}
	bv[threadIdx.x] = m;
	bi[threadIdx.x] = id;
	__syncthreads();
	if (threadIdx.x == 0) {
		int b = bi[0];
		for (unsigned j = 1; j < blockDim.x; j++)
			if (bi[j] >= 0 && (b < 0 || bv[j] > x[b] || (bv[j] == x[b] && bi[j] < b)))
				b = bi[j];
		best = b;
	}
	__syncthreads();
	return best;
}

__global__ void __launch_bounds__(SAMPLE_THREADS)
sample_kernel(int *ids, float *logprobs, const float *logits, const int *row_slot, uint64_t *rng, int V,
	      float temperature, float top_p, int top_k)
{
	__shared__ double u_sh;
	const float *x = logits + (size_t)blockIdx.x * V;
	if (temperature <= 0.0f) {
		int best = argmax_row(x, V);
		sample_row r = { x, V, 1.0f, x[best] };
		double total = mass_from(r, 0, false);
		if (threadIdx.x == 0) {
			ids[blockIdx.x] = best;
			logprobs[blockIdx.x] = (float)-log(total);
		}
		return;
	}
	float invT = 1.0f / temperature, mx = -INFINITY;
	for (int v = threadIdx.x; v < V; v += blockDim.x)
		mx = fmaxf(mx, x[v]);
	mx = block_max(mx) * invT;
	sample_row r = { x, V, invT, mx };
	double total = mass_from(r, 0, false);
	if (threadIdx.x == 0)
		u_sh = xoshiro_uniform(rng + (size_t)row_slot[blockIdx.x] * 4);
	__syncthreads();
	double u = u_sh;
	int use_k = top_k > 0 && top_k < V, use_p = top_p > 0.0f && top_p < 1.0f, chosen;
	if (!use_k && !use_p) {
		chosen = sample_in_id_order(r, u * total);
	} else {
		uint64_t lower = 0;
		double kept = total;
		if (use_k) {
			lower = key_search(r, 0, (double)top_k, false, true);
			kept = mass_from(r, lower, false);
		}
		if (use_p) {
			lower = key_search(r, lower, top_p * kept, false, false);
			kept = mass_from(r, lower, false);
		}
		uint64_t k = key_search(r, lower, u * kept, true, false);
		chosen = (int)(0xffffffffu - (uint32_t)(k & 0xffffffffu));
	}
	if (threadIdx.x == 0) {
		ids[blockIdx.x] = chosen;
		logprobs[blockIdx.x] = (float)(x[chosen] * invT - (mx + log(total)));
	}
}

/* ------------------------------------------------------------------------------------------------------
 * Products: y = x W^T etc. over the gpu_model's arena, column-major cuBLAS as in model_cuda.cu
 * ---------------------------------------------------------------------------------------------------- */

struct operand {
	const void *p;
	cudaDataType_t t;
	operand at(size_t k) const
	{
		return { t == CUDA_R_16BF ? (const void *)((const __nv_bfloat16 *)p + k) :
					    (const void *)((const float *)p + k), t };
	}
};

/* the device image of a host weight view (m->weights + k -> arena + k) */
const float *dev(const gpu_decoder *d, const float *host)
{
	return host ? d->w0 + (host - d->m->weights) : NULL;
}

bool bf16_on(const gpu_decoder *d, bool exact)
{
	return d->wb0 && !exact;
}

operand weight_op(const gpu_decoder *d, const float *host, bool exact)
{
	if (!bf16_on(d, exact))
		return { dev(d, host), CUDA_R_32F };
	return { d->wb0 + (host - d->m->weights), CUDA_R_16BF };
}

/* an activation of n floats as the product reads it; *tmp: the bf16 scratch to free after the product */
operand act_op(const gpu_decoder *d, const float *x, size_t n, bool exact, __nv_bfloat16 **tmp)
{
	*tmp = NULL;
	if (!bf16_on(d, exact))
		return { x, CUDA_R_32F };
	*tmp = scratch<__nv_bfloat16>(n ? n : 1);
	if (n)
		dec_to_bf16_kernel<<<grid_for(n), kThreads, 0, stream()>>>(*tmp, x, n);
	return { *tmp, CUDA_R_16BF };
}

void gemm(cublasOperation_t ta, int M, int N, int K, operand A, int lda, operand B, int ldb, float *C, int ldc)
{
	const float alpha = 1.0f, beta = 0.0f;
	CUBLAS_CHECK(cublasGemmEx(cublas(), ta, CUBLAS_OP_N, M, N, K, &alpha, A.p, A.t, lda, B.p, B.t, ldb, &beta,
				  C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

/* y[N, out] = x[N, in] W^T, W the host view of an [out, in] weight */
void lin(const gpu_decoder *d, float *y, const float *x, const float *w, int N, int in, int out,
	 bool exact = false)
{
	if (N <= 0 || out <= 0)
		return;
	__nv_bfloat16 *tmp;
	operand b = act_op(d, x, (size_t)N * in, exact, &tmp);
	gemm(CUBLAS_OP_T, out, N, in, weight_op(d, w, exact), in, b, in, y, out);
	if (tmp)
		scratch_free(tmp);
}

void mlp(const gpu_decoder *d, float *y, const float *x, const float *wg, const float *wu, const float *wd,
	 int rows, int C, int I)
{
	lin(d, d->mg, x, wg, rows, C, I);
	lin(d, d->mu, x, wu, rows, C, I);
	swiglu_forward_cuda(d->ma, d->mg, d->mu, (size_t)rows * I);
	lin(d, y, d->ma, wd, rows, I, C);
}

/* ------------------------------------------------------------------------------------------------------
 * Buffers
 * ---------------------------------------------------------------------------------------------------- */

template <typename U> void regrow(U **p, size_t n)
{
	moe_cuda_free(*p);
	*p = (U *)moe_cuda_malloc(sizeof(U) * (n ? n : 1));
}

void free_tokens(gpu_decoder *d)
{
	void *bufs[] = { d->tok, d->slot, d->pos, d->x, d->mid, d->ln, d->out, d->rstd, d->qa, d->qa_n, d->q,
			 d->kva, d->ckv, d->ckv_n, d->ql, d->ol, d->att, d->rlog, d->rsc, d->topk_w, d->mg, d->mu,
			 d->ma, d->topk_idx, d->row_pair, d->row_of, d->xe, d->ye };
	for (void *p : bufs)
		moe_cuda_free(p);
}

/* the buffers of a step of n tokens (grow-only) */
void ensure_tokens(gpu_decoder *d, int n)
{
	if (n <= d->cap)
		return;
	const struct model_config *c = &d->m->cfg;
	int C = c->hidden_size, H = c->num_attention_heads, dq = mc_qk_head_dim(c), Rkv = c->kv_lora_rank;
	int E = c->n_routed_experts > 0 ? c->n_routed_experts : 1, K = c->num_experts_per_tok > 0 ?
		c->num_experts_per_tok : 1;
	int Im = c->moe_intermediate_size, Is = c->n_shared_experts * Im, I = c->intermediate_size;
	size_t N = (size_t)n, w = (size_t)(I > Is ? I : Is);
	size_t we = N * K * (size_t)Im;
	moe_cuda_synchronize();  /* the old buffers may still be read by queued kernels; regrow frees them */
	regrow(&d->tok, N);
	regrow(&d->slot, N);
	regrow(&d->pos, N);
	regrow(&d->x, N * C);
	regrow(&d->mid, N * C);
	regrow(&d->ln, N * C);
	regrow(&d->out, N * C);
	regrow(&d->rstd, N);
	regrow(&d->qa, N * (c->q_lora_rank + 1));
	regrow(&d->qa_n, N * (c->q_lora_rank + 1));
	regrow(&d->q, N * H * dq);
	regrow(&d->kva, N * d->Dl);
	regrow(&d->ckv, N * Rkv);
	regrow(&d->ckv_n, N * Rkv);
	regrow(&d->ql, N * H * Rkv);
	regrow(&d->ol, N * H * Rkv);
	regrow(&d->att, N * H * c->v_head_dim);
	regrow(&d->rlog, N * E);
	regrow(&d->rsc, N * E);
	regrow(&d->topk_w, N * K);
	d->cap_mlp = N * w > we ? N * w : we;
	regrow(&d->mg, d->cap_mlp);
	regrow(&d->mu, d->cap_mlp);
	regrow(&d->ma, d->cap_mlp);
	regrow(&d->topk_idx, N * K);
	regrow(&d->row_pair, N * K);
	regrow(&d->row_of, N * K);
	regrow(&d->xe, N * K * C);
	regrow(&d->ye, N * K * C);
	d->cap = n;
}

void ensure_logits(gpu_decoder *d, int n)
{
	if (n <= d->cap_l)
		return;
	const struct model_config *c = &d->m->cfg;
	moe_cuda_synchronize();
	regrow(&d->lrows, n);
	regrow(&d->lx, (size_t)n * c->hidden_size);
	regrow(&d->lnf, (size_t)n * c->hidden_size);
	regrow(&d->lrstd, n);
	regrow(&d->logits, (size_t)n * c->vocab_size);
	d->cap_l = n;
}

float *cache_layer(const gpu_decoder *d, int l)
{
	return d->kv + (size_t)l * d->n_slots * d->max_len * d->Dl;
}

int *route_at(gpu_decoder *d, int l, int slot, int pos)
{
	return d->routes.data() + (((size_t)l * d->n_slots + slot) * d->max_len + pos) * d->route_k;
}

/* ------------------------------------------------------------------------------------------------------
 * The layers of a step
 * ---------------------------------------------------------------------------------------------------- */

/* queries, this step's latents into the cache, absorbed attention; d->mid = x + attention(x) */
void attention_block(gpu_decoder *d, int l, int n, int max_pos)
{
	const struct model_config *c = &d->m->cfg;
	const struct layer_weights *w = &d->m->w.layers[l];
	int C = c->hidden_size, H = c->num_attention_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
	int dq = dn + dr, dv = c->v_head_dim, Rq = c->q_lora_rank, Rkv = c->kv_lora_rank, Dl = d->Dl;
	float eps = (float)c->rms_norm_eps;
	struct rope_freqs rf;

	mc_rope_freqs(c, &rf);
	rmsnorm_forward_cuda(d->ln, d->rstd, d->x, dev(d, w->input_layernorm), n, C, eps);
	if (Rq > 0) {
		lin(d, d->qa, d->ln, w->q_a_proj, n, C, Rq);
		rmsnorm_forward_cuda(d->qa_n, d->rstd, d->qa, dev(d, w->q_a_layernorm), n, Rq, eps);
		lin(d, d->q, d->qa_n, w->q_b_proj, n, Rq, H * dq);
	} else {
		lin(d, d->q, d->ln, w->q_proj, n, C, H * dq);
	}
	rope_forward_cuda(d->q + dn, d->pos, n, H, H * dq, dq, dr, rf.inv_freq, rf.attention_factor);
	lin(d, d->kva, d->ln, w->kv_a_proj_with_mqa, n, C, Dl);
	dec_copy_cols_kernel<<<grid_for((size_t)n * Rkv), kThreads, 0, stream()>>>(d->ckv, Rkv, d->kva, Dl, n, Rkv);
	rope_forward_cuda(d->kva + Rkv, d->pos, n, 1, Dl, 0, dr, rf.inv_freq, rf.attention_factor);
	rmsnorm_forward_cuda(d->ckv_n, d->rstd, d->ckv, dev(d, w->kv_a_layernorm), n, Rkv, eps);
	float *kv_l = cache_layer(d, l);
	cache_write_kernel<<<grid_for((size_t)n * Dl), kThreads, 0, stream()>>>(kv_l, d->ckv_n, d->kva, d->slot,
										d->pos, n, Rkv, dr, d->max_len);

	/* q_lat[i, h] = W_UK_h^T q_nope[i, h]: W_UK_h [dn, Rkv] (kv_b rows h(dn+dv)..) */
	__nv_bfloat16 *qb;
	operand qo = act_op(d, d->q, (size_t)n * H * dq, false, &qb);
	operand wkv = weight_op(d, w->kv_b_proj, false);
	for (int h = 0; h < H; h++)
		gemm(CUBLAS_OP_N, Rkv, n, dn, wkv.at((size_t)h * (dn + dv) * Rkv), Rkv, qo.at((size_t)h * dq), H * dq,
		     d->ql + (size_t)h * Rkv, H * Rkv);
	if (qb)
		scratch_free(qb);
	size_t smem = sizeof(float) * ((size_t)Dl + max_pos + 1);
	absorbed_attention_kernel<<<n * H, 128, smem, stream()>>>(d->ol, d->ql, d->q, kv_l, d->slot, d->pos, H, Rkv,
								   dr, dq, dn, d->max_len, mc_softmax_scale(c));
	/* att[i, h] = W_UV_h o_lat[i, h]: W_UV_h [dv, Rkv] */
	__nv_bfloat16 *ob;
	operand oo = act_op(d, d->ol, (size_t)n * H * Rkv, false, &ob);
	for (int h = 0; h < H; h++)
		gemm(CUBLAS_OP_T, dv, n, Rkv, wkv.at(((size_t)h * (dn + dv) + dn) * Rkv), Rkv, oo.at((size_t)h * Rkv),
		     H * Rkv, d->att + (size_t)h * dv, H * dv);
	if (ob)
		scratch_free(ob);
	lin(d, d->mid, d->att, w->o_proj, n, H * dv, C);
	vec_add_cuda(d->mid, d->x, (size_t)n * C);
}

/* the MoE layer over d->ln -> d->out, the whole step's rows grouped by expert */
void moe_block(gpu_decoder *d, int l, int n)
{
	const struct model_config *c = &d->m->cfg;
	const struct layer_weights *w = &d->m->w.layers[l];
	struct router_params rp = moe_router_params(c);
	int C = c->hidden_size, E = rp.E, K = rp.K, Im = c->moe_intermediate_size, NK = n * K;
	int Is = c->n_shared_experts * Im;

	lin(d, d->rlog, d->ln, w->gate, n, C, E, true);
	router_forward_cuda(d->rsc, d->topk_idx, d->topk_w, d->rlog, dev(d, w->e_score_correction_bias), &rp, n);
	d->h_topk.resize(NK);
	d->h_pair.resize(NK);
	d->h_of.resize(NK);
	d->h_off.resize(E + 1);
	d->h_fill.resize(E);
	d->h_load.resize(E);
	moe_cuda_memcpy_d2h(d->h_topk.data(), d->topk_idx, sizeof(int) * NK);
	if (!d->routes.empty())
		for (int i = 0; i < n; i++)
			memcpy(route_at(d, l, d->h_rows[i], d->h_rows[n + i]), d->h_topk.data() + (size_t)i * K,
			       sizeof(int) * K);
	moe_group_rows(d->h_topk.data(), n, K, E, 0, E, d->h_load.data(), d->h_off.data(), d->h_pair.data(),
		       d->h_of.data(), d->h_fill.data());
	moe_cuda_memcpy_h2d(d->row_pair, d->h_pair.data(), sizeof(int) * NK);
	moe_cuda_memcpy_h2d(d->row_of, d->h_of.data(), sizeof(int) * NK);
	dec_gather_kernel<<<grid_for((size_t)NK * C), kThreads, 0, stream()>>>(d->xe, d->ln, d->row_pair, K, NK, C);
	for (int e = 0; e < E; e++) {
		int r0 = d->h_off[e], rows = d->h_off[e + 1] - r0;
		size_t wo = (size_t)e * Im * C;
		if (rows > 0)
			mlp(d, d->ye + (size_t)r0 * C, d->xe + (size_t)r0 * C, w->experts_gate_proj + wo,
			    w->experts_up_proj + wo, w->experts_down_proj + wo, rows, C, Im);
	}
	if (Is)
		mlp(d, d->out, d->ln, w->shared_gate_proj, w->shared_up_proj, w->shared_down_proj, n, C, Is);
	dec_combine_kernel<<<grid_for((size_t)n * C), kThreads, 0, stream()>>>(d->out, d->ye, d->row_of, d->topk_w,
									       n, K, C, Is == 0);
}

/* 0 when the step's arguments are valid; fills new_len with the lengths after it */
int check_step(gpu_decoder *d, const int *tokens, const int *slots, const int *positions, int n,
	       const int *logit_rows, int n_logits, int *max_pos)
{
	int V = d->m->cfg.vocab_size;
	if (n <= 0 || n_logits < 0)
		return -1;
	d->new_len = d->len;
	*max_pos = 0;
	for (int i = 0; i < n; i++) {
		int s = slots[i], p = positions[i];
		if (tokens[i] < 0 || tokens[i] >= V || s < 0 || s >= d->n_slots || p < 0 || p >= d->max_len ||
		    p > d->new_len[s])
			return -1;
		d->new_len[s] = p + 1;
		*max_pos = p > *max_pos ? p : *max_pos;
	}
	for (int r = 0; logit_rows && r < n_logits; r++)
		if (logit_rows[r] < 0 || logit_rows[r] >= n)
			return -1;
	return 0;
}

} /* namespace */

/* ------------------------------------------------------------------------------------------------------
 * The API
 * ---------------------------------------------------------------------------------------------------- */

extern "C" struct gpu_decoder *gpu_decoder_create(struct gpu_model *g, struct moe_model *m, int n_slots,
						  int max_len, char *err, size_t errlen)
{
	const struct model_config *c = &m->cfg;
	if (n_slots <= 0 || max_len <= 0 || c->kv_lora_rank <= 0) {
		snprintf(err, errlen, "a decoder needs slots (%d), positions (%d) and an MLA latent (kv_lora_rank "
			 "%d)", n_slots, max_len, c->kv_lora_rank);
		return NULL;
	}
	if (m->ep_group) {
		snprintf(err, errlen, "the GPU decoder runs every expert locally (no expert parallelism yet)");
		return NULL;
	}
	gpu_decoder *d = new gpu_decoder();
	d->g = g;
	d->m = m;
	d->n_slots = n_slots;
	d->max_len = max_len;
	d->Dl = c->kv_lora_rank + c->qk_rope_head_dim;
	d->w0 = gpu_model_weights(g);
	d->wb0 = (const __nv_bfloat16 *)gpu_model_weights_bf16(g);
	d->route_k = c->num_experts_per_tok;
	size_t kv = (size_t)c->num_hidden_layers * n_slots * max_len * d->Dl;
	d->kv = (float *)moe_cuda_malloc(sizeof(float) * kv);
	d->rng = (uint64_t *)moe_cuda_malloc(sizeof(uint64_t) * 4 * n_slots);
	moe_cuda_memset(d->rng, 0, sizeof(uint64_t) * 4 * n_slots);
	d->len.assign(n_slots, 0);
	/* the attention's scores live in shared memory: [Dl + max_len] floats a block */
	size_t smem = sizeof(float) * ((size_t)d->Dl + max_len + 1);
	if (smem > 48 * 1024)
		CUDA_CHECK(cudaFuncSetAttribute(absorbed_attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
						(int)smem));
	return d;
}

extern "C" void gpu_decoder_free(struct gpu_decoder *d)
{
	if (!d)
		return;
	moe_cuda_synchronize();
	free_tokens(d);
	void *bufs[] = { d->kv, d->rng, d->lrows, d->lx, d->lnf, d->lrstd, d->logits, d->s_slot, d->s_ids, d->s_lp };
	for (void *p : bufs)
		moe_cuda_free(p);
	delete d;
}

extern "C" int gpu_decoder_slots(const struct gpu_decoder *d) { return d->n_slots; }
extern "C" int gpu_decoder_max_len(const struct gpu_decoder *d) { return d->max_len; }

extern "C" int gpu_decoder_len(const struct gpu_decoder *d, int slot)
{
	return slot >= 0 && slot < d->n_slots ? d->len[slot] : 0;
}

extern "C" void gpu_decoder_reset(struct gpu_decoder *d, int slot)
{
	if (slot >= 0 && slot < d->n_slots)
		d->len[slot] = 0;
}

extern "C" int gpu_decoder_copy_prefix(struct gpu_decoder *d, int dst, int src, int len)
{
	if (dst < 0 || dst >= d->n_slots || src < 0 || src >= d->n_slots || len < 0 || len > d->len[src])
		return -1;
	if (dst == src)
		return 0;
	for (int l = 0; l < d->m->cfg.num_hidden_layers; l++) {
		float *kv_l = cache_layer(d, l);
		moe_cuda_memcpy_d2d_async(kv_l + (size_t)dst * d->max_len * d->Dl, kv_l + (size_t)src * d->max_len * d->Dl,
					  sizeof(float) * d->Dl * (size_t)len);
		if (!d->routes.empty())
			memcpy(route_at(d, l, dst, 0), route_at(d, l, src, 0), sizeof(int) * d->route_k * (size_t)len);
	}
	d->len[dst] = len;
	return 0;
}

extern "C" int gpu_decoder_enable_routes(struct gpu_decoder *d)
{
	if (!d->routes.empty() || d->route_k < 1)
		return d->route_k < 1 ? -1 : 0;
	try {
		d->routes.assign((size_t)d->m->cfg.num_hidden_layers * d->n_slots * d->max_len * d->route_k, -1);
	} catch (...) {
		return -1;
	}
	return 0;
}

extern "C" const int *gpu_decoder_route(const struct gpu_decoder *d, int layer, int slot, int pos)
{
	if (d->routes.empty() || layer < 0 || layer >= d->m->cfg.num_hidden_layers || slot < 0 ||
	    slot >= d->n_slots || pos < 0 || pos >= d->max_len)
		return NULL;
	return route_at(const_cast<gpu_decoder *>(d), layer, slot, pos);
}

extern "C" int gpu_decode_step(struct gpu_decoder *d, const int *tokens, const int *slots, const int *positions,
			       int n, const int *logit_rows, int n_logits)
{
	const struct model_config *c = &d->m->cfg;
	int max_pos, C = c->hidden_size, L = c->num_hidden_layers;
	float eps = (float)c->rms_norm_eps;
	if (!logit_rows)
		n_logits = n;
	if (check_step(d, tokens, slots, positions, n, logit_rows, n_logits, &max_pos))
		return -1;
	ensure_tokens(d, n);
	ensure_logits(d, n_logits > 0 ? n_logits : 1);
	moe_cuda_memcpy_h2d(d->tok, tokens, sizeof(int) * n);
	moe_cuda_memcpy_h2d(d->slot, slots, sizeof(int) * n);
	moe_cuda_memcpy_h2d(d->pos, positions, sizeof(int) * n);
	d->h_rows.assign(slots, slots + n);  /* the routes' (slot, position) of each token */
	d->h_rows.insert(d->h_rows.end(), positions, positions + n);

	embedding_forward_cuda(d->x, d->tok, dev(d, d->m->w.embed_tokens), n, C);
	for (int l = 0; l < L; l++) {
		const struct layer_weights *w = &d->m->w.layers[l];
		attention_block(d, l, n, max_pos);
		rmsnorm_forward_cuda(d->ln, d->rstd, d->mid, dev(d, w->post_attention_layernorm), n, C, eps);
		if (mc_layer_is_moe(c, l))
			moe_block(d, l, n);
		else
			mlp(d, d->out, d->ln, w->mlp_gate_proj, w->mlp_up_proj, w->mlp_down_proj, n, C,
			    c->intermediate_size);
		vec_add_cuda(d->out, d->mid, (size_t)n * C);
		std::swap(d->x, d->out);
	}
	d->len = d->new_len;
	d->n_logits = n_logits;
	if (n_logits == 0)
		return 0;
	const float *xf = d->x;
	if (logit_rows) {
		moe_cuda_memcpy_h2d(d->lrows, logit_rows, sizeof(int) * n_logits);
		dec_gather_kernel<<<grid_for((size_t)n_logits * C), kThreads, 0, stream()>>>(d->lx, d->x, d->lrows, 1,
											    n_logits, C);
		xf = d->lx;
	}
	rmsnorm_forward_cuda(d->lnf, d->lrstd, xf, dev(d, d->m->w.norm), n_logits, C, eps);
	lin(d, d->logits, d->lnf, d->m->w.lm_head, n_logits, C, c->vocab_size);
	return 0;
}

extern "C" const float *gpu_decoder_logits(const struct gpu_decoder *d)
{
	return d->logits;
}

extern "C" void gpu_decoder_logits_to_host(const struct gpu_decoder *d, float *dst)
{
	moe_cuda_memcpy_d2h(dst, d->logits, sizeof(float) * (size_t)d->n_logits * d->m->cfg.vocab_size);
}

extern "C" void gpu_decoder_set_rng(struct gpu_decoder *d, const uint64_t *states)
{
	moe_cuda_memcpy_h2d(d->rng, states, sizeof(uint64_t) * 4 * d->n_slots);
}

extern "C" void gpu_decoder_get_rng(const struct gpu_decoder *d, uint64_t *states)
{
	moe_cuda_memcpy_d2h(states, d->rng, sizeof(uint64_t) * 4 * d->n_slots);
}

extern "C" void gpu_sample(struct gpu_decoder *d, const int *row_slot, int n_rows, float temperature, float top_p,
			   int top_k, int *ids, float *logprobs)
{
	if (n_rows <= 0)
		return;
	if (n_rows > d->n_logits)
		fail("gpu_sample", "more rows than the last step's logits");
	if (n_rows > d->cap_s) {
		moe_cuda_synchronize();
		regrow(&d->s_slot, n_rows);
		regrow(&d->s_ids, n_rows);
		regrow(&d->s_lp, n_rows);
		d->cap_s = n_rows;
	}
	moe_cuda_memcpy_h2d(d->s_slot, row_slot, sizeof(int) * n_rows);
	sample_kernel<<<n_rows, SAMPLE_THREADS, 0, stream()>>>(d->s_ids, d->s_lp, d->logits, d->s_slot, d->rng,
							       d->m->cfg.vocab_size, temperature, top_p, top_k);
	moe_cuda_memcpy_d2h(ids, d->s_ids, sizeof(int) * n_rows);
	if (logprobs)
		moe_cuda_memcpy_d2h(logprobs, d->s_lp, sizeof(float) * n_rows);
}
