/*
 * model/cuda/router_cuda.cu - the DeepSeekMoE router (scores, group-limited top-K, weights) and the
 * sequence-wise balance loss on the GPU, mirroring model/ops_cpu.c.
 *
 * Router scores are kept in float whatever the activation type.
 */
#include "launch/cuda/cuda_common.cuh"
#include "model/cuda/ops_cuda.h"

namespace moe_cuda {
namespace {

constexpr int kMaxExperts = 1024; /* one thread per expert in the router's blocks */

/* Plain copy of struct router_params that a kernel can take by value. */
struct router_args {
	int E, K, n_group, topk_group;
	bool sigmoid, norm;
	float scale;
};

router_args check_router_params(const char *op, const struct router_params *p)
{
	if (!p)
		fail(op, "router_params is NULL");
	const int E = p->E, K = p->K, G = p->n_group, TG = p->topk_group;
	if (E < 1 || E > kMaxExperts)
		fail(op, "E must be in [1, 1024]");
	if (K < 1 || K > E)
		fail(op, "K must be in [1, E]");
	if (G < 1 || E % G != 0)
		fail(op, "n_group must divide E");
	if (TG < 1 || TG > G)
		fail(op, "topk_group must be in [1, n_group]");
	if (G > 1 && TG < G && K > TG * (E / G))
		fail(op, "K exceeds the experts of the kept groups");
	return router_args{E, K, G, TG, p->scoring == MOE_SCORING_SIGMOID, p->norm_topk_prob,
			   p->routed_scaling_factor};
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* ------------------------------------------------------------------------------------------------------
 * Router forward: one block per token, one thread per expert (strided when E > blockDim).
 * Selection is by rank instead of repeated argmax: an allowed item's rank is the number of allowed items
 * that beat it (a larger value, or an equal value at a lower index).  Rank < k means "selected", and the
 * rank is its position in the output, so the order is by value descending with ties to the lower index,
 * exactly the CPU op's repeated argmax.  O(E^2 / threads) comparisons on shared memory per token.
 * Shared memory: s[E], choice[E], allowed[E], gs[n_group], keep[n_group], idx[K].
 * ---------------------------------------------------------------------------------------------------- */
__global__ void router_fwd_kernel(float *__restrict__ scores, int *__restrict__ topk_idx,
				  float *__restrict__ topk_w, const float *__restrict__ logits,
				  const float *__restrict__ bias, router_args p)
{
	extern __shared__ float smem[];
	const int E = p.E, K = p.K, G = p.n_group;
	float *s = smem;
	float *choice = s + E;
	int *allowed = reinterpret_cast<int *>(choice + E);
	float *gs = reinterpret_cast<float *>(allowed + E);
	int *keep = reinterpret_cast<int *>(gs + G);
	int *idx = keep + G;
	const size_t n = blockIdx.x;
	const int tid = threadIdx.x, nt = blockDim.x;
	const float *l = logits + n * E;

	if (!p.sigmoid) {
		float mx = -INFINITY;
		for (int e = tid; e < E; e += nt)
			mx = fmaxf(mx, l[e]);
		mx = block_max(mx);
		float sum = 0.0f;
		for (int e = tid; e < E; e += nt) {
			const float ex = expf(l[e] - mx);
			s[e] = ex;
			sum += ex;
		}
		sum = block_sum(sum);
		for (int e = tid; e < E; e += nt)
			s[e] /= sum;
	} else {
		for (int e = tid; e < E; e += nt)
			s[e] = sigmoid(l[e]);
	}
	for (int e = tid; e < E; e += nt) {
		choice[e] = s[e] + (bias ? bias[e] : 0.0f);
		scores[n * E + e] = s[e];
	}
	for (int k = tid; k < K; k += nt)
		idx[k] = -1;
	__syncthreads();

	if (G > 1 && p.topk_group < G) {
		const int gsize = E / G;
		/* group score: the best choice (softmax) or the sum of the best two (sigmoid) */
		for (int g = tid; g < G; g += nt) {
			float m1 = -INFINITY, m2 = -INFINITY;
			for (int i = g * gsize; i < (g + 1) * gsize; i++) {
				const float c = choice[i];
				if (c > m1) {
					m2 = m1;
					m1 = c;
				} else if (c > m2) {
					m2 = c;
				}
			}
			gs[g] = p.sigmoid ? m1 + m2 : m1;
		}
		__syncthreads();
		for (int g = tid; g < G; g += nt) {
			const float v = gs[g];
			int rank = 0;
			for (int g2 = 0; g2 < G; g2++)
				rank += (gs[g2] > v) || (gs[g2] == v && g2 < g);
			keep[g] = rank < p.topk_group;
		}
		__syncthreads();
		for (int e = tid; e < E; e += nt)
			allowed[e] = keep[e / gsize];
	} else {
		for (int e = tid; e < E; e += nt)
			allowed[e] = 1;
	}
	__syncthreads();

	for (int e = tid; e < E; e += nt) {
		if (!allowed[e])
			continue;
		const float v = choice[e];
		int rank = 0;
		for (int e2 = 0; e2 < E; e2++)
			rank += allowed[e2] && (choice[e2] > v || (choice[e2] == v && e2 < e));
		if (rank < K)
			idx[rank] = e;
	}
	__syncthreads();

	if (tid == 0) { /* K is small: one thread, the CPU op's order of additions */
		float sum = 0.0f;
		for (int k = 0; k < K; k++)
			sum += idx[k] >= 0 ? s[idx[k]] : 0.0f;
		const float c = p.scale / (p.norm ? sum + 1e-20f : 1.0f);
		for (int k = 0; k < K; k++) {
			topk_idx[n * K + k] = idx[k];
			topk_w[n * K + k] = (idx[k] >= 0 ? s[idx[k]] : 0.0f) * c;
		}
	}
}

/* ------------------------------------------------------------------------------------------------------
 * Router backward: one block per token.  ds[E] (shared) = dscores + the top-K weights' contribution
 * (thread 0, K terms in order), then through softmax (block_sum of s.ds) or sigmoid into dlogits (+=).
 * ---------------------------------------------------------------------------------------------------- */
__global__ void router_bwd_kernel(float *__restrict__ dlogits, const float *__restrict__ dtopk_w,
				  const float *__restrict__ dscores, const float *__restrict__ scores,
				  const int *__restrict__ topk_idx, router_args p)
{
	extern __shared__ float ds[];
	const int E = p.E, K = p.K;
	const size_t n = blockIdx.x;
	const int tid = threadIdx.x, nt = blockDim.x;
	const float *s = scores + n * E;
	for (int e = tid; e < E; e += nt)
		ds[e] = dscores ? dscores[n * E + e] : 0.0f;
	__syncthreads();
	if (tid == 0 && dtopk_w) {
		const int *idx = topk_idx + n * K;
		const float *dw = dtopk_w + n * K;
		const float c = p.scale;
		if (p.norm) {
			/* w_k = c u_k / S, S = sum_j u_j: du_j = c (dw_j / S - sum_k dw_k u_k / S^2) */
			float S = 1e-20f, dot = 0.0f;
			for (int k = 0; k < K; k++) {
				if (idx[k] < 0 || idx[k] >= E)
					continue;
				S += s[idx[k]];
				dot += dw[k] * s[idx[k]];
			}
			for (int k = 0; k < K; k++)
				if (idx[k] >= 0 && idx[k] < E)
					ds[idx[k]] += c * (dw[k] / S - dot / (S * S));
		} else {
			for (int k = 0; k < K; k++)
				if (idx[k] >= 0 && idx[k] < E)
					ds[idx[k]] += c * dw[k];
		}
	}
	__syncthreads();
	float *dl = dlogits + n * E;
	if (!p.sigmoid) {
		float dot = 0.0f;
		for (int e = tid; e < E; e += nt)
			dot += s[e] * ds[e];
		dot = block_sum(dot);
		for (int e = tid; e < E; e += nt)
			dl[e] += s[e] * (ds[e] - dot);
	} else {
		for (int e = tid; e < E; e += nt)
			dl[e] += ds[e] * s[e] * (1.0f - s[e]);
	}
}

inline int router_threads(int E) { return round_up(E < 32 ? 32 : E, 32); }

/* ------------------------------------------------------------------------------------------------------
 * Balance loss (DeepSeek-V3 eq. 17-20).
 *  counts[b][e] = #{(t, k) : topk_idx[b, t, k] = e}: integer atomics (exact, so order-independent);
 *  f[b][e] = counts * E / (K T).
 *  Forward: one warp per token computes fs/Z (double, like the CPU op), then one block sums the B*T terms
 *  in a fixed tree.  Backward: one warp per token computes Z and fs (float) and adds into its dscores row.
 * ---------------------------------------------------------------------------------------------------- */
constexpr int kWarpsPerBlock = 8;

__global__ void balance_count_kernel(int *__restrict__ counts, const int *__restrict__ topk_idx, int B, int T,
				     int E, int K)
{
	const size_t total = (size_t)B * T * K;
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
	     i += (size_t)gridDim.x * blockDim.x) {
		const int b = (int)(i / ((size_t)T * K)), e = topk_idx[i];
		if (e >= 0 && e < E)
			atomicAdd(&counts[(size_t)b * E + e], 1);
	}
}

__global__ void balance_fwd_terms_kernel(double *__restrict__ terms, const float *__restrict__ scores,
					 const int *__restrict__ counts, int B, int T, int E, int K)
{
	const int lane = threadIdx.x & 31;
	const size_t n = (size_t)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
	if (n >= (size_t)B * T)
		return; /* whole warp */
	const size_t b = n / T;
	const float fscale = (float)E / ((float)K * T);
	const float *s = scores + n * E;
	double Z = 0.0, fs = 0.0;
	for (int e = lane; e < E; e += 32) {
		const float f = (float)counts[b * E + e] * fscale;
		Z += s[e];
		fs += (double)f * s[e];
	}
	Z = warp_sum(Z);
	fs = warp_sum(fs);
	if (lane == 0)
		terms[n] = fs / Z / T;
}

__global__ void balance_fwd_reduce_kernel(float *__restrict__ loss, const double *__restrict__ terms,
					  size_t n, int B, float alpha)
{
	double acc = 0.0;
	for (size_t i = threadIdx.x; i < n; i += blockDim.x)
		acc += terms[i];
	acc = block_sum(acc);
	if (threadIdx.x == 0)
		*loss = (float)(alpha * acc / B);
}

__global__ void balance_bwd_kernel(float *__restrict__ dscores, const float *__restrict__ scores,
				   const int *__restrict__ counts, int B, int T, int E, int K, float g)
{
	const int lane = threadIdx.x & 31;
	const size_t n = (size_t)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
	if (n >= (size_t)B * T)
		return;
	const size_t b = n / T;
	const float fscale = (float)E / ((float)K * T);
	const float *s = scores + n * E;
	float Z = 0.0f, fs = 0.0f;
	for (int e = lane; e < E; e += 32) {
		Z += s[e];
		fs += (float)counts[b * E + e] * fscale * s[e];
	}
	Z = warp_sum(Z);
	fs = warp_sum(fs);
	/* d/ds_j of (sum_i f_i s_i / Z) = (f_j - sum_i f_i s_i / Z) / Z */
	for (int e = lane; e < E; e += 32) {
		const float f = (float)counts[b * E + e] * fscale;
		dscores[n * E + e] += g * (f - fs / Z) / Z;
	}
}

/* counts[B][E] of the top-K choices, in scratch memory (caller frees) */
int *balance_counts(const int *topk_idx, int B, int T, int E, int K)
{
	int *counts = scratch<int>((size_t)B * E);
	CUDA_CHECK(cudaMemsetAsync(counts, 0, sizeof(int) * (size_t)B * E, stream()));
	balance_count_kernel<<<grid_for((size_t)B * T * K), kThreads, 0, stream()>>>(counts, topk_idx, B, T, E,
										    K);
	CUDA_CHECK_LAUNCH("balance_count_kernel");
	return counts;
}

} /* namespace */
} /* namespace moe_cuda */

using namespace moe_cuda;

extern "C" {

void router_forward_cuda(float *scores, int *topk_idx, float *topk_w, const float *logits, const float *bias,
			 const struct router_params *p, int N)
{
	const router_args a = check_router_params("router_forward_cuda", p);
	if (N <= 0)
		return;
	const size_t smem = sizeof(float) * 2 * a.E + sizeof(int) * a.E + sizeof(float) * a.n_group +
			    sizeof(int) * a.n_group + sizeof(int) * a.K;
	router_fwd_kernel<<<N, router_threads(a.E), smem, stream()>>>(scores, topk_idx, topk_w, logits, bias, a);
	CUDA_CHECK_LAUNCH("router_fwd_kernel");
}

void router_backward_cuda(float *dlogits, const float *dtopk_w, const float *dscores, const float *scores,
			  const int *topk_idx, const struct router_params *p, int N)
{
	const router_args a = check_router_params("router_backward_cuda", p);
	if (N <= 0)
		return;
	router_bwd_kernel<<<N, router_threads(a.E), sizeof(float) * a.E, stream()>>>(dlogits, dtopk_w, dscores,
										       scores, topk_idx, a);
	CUDA_CHECK_LAUNCH("router_bwd_kernel");
}

void balance_loss_forward_cuda_async(float *loss, const float *scores, const int *topk_idx, int B, int T, int E,
				     int K, float alpha)
{
	if (B <= 0 || T <= 0 || E <= 0 || K <= 0) {
		CUDA_CHECK(cudaMemsetAsync(loss, 0, sizeof(float), stream()));
		return;
	}
	int *counts = balance_counts(topk_idx, B, T, E, K);
	const size_t rows = (size_t)B * T;
	double *terms = scratch<double>(rows);
	const unsigned blocks = (unsigned)((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
	balance_fwd_terms_kernel<<<blocks, 32 * kWarpsPerBlock, 0, stream()>>>(terms, scores, counts, B, T, E, K);
	CUDA_CHECK_LAUNCH("balance_fwd_terms_kernel");
	balance_fwd_reduce_kernel<<<1, 1024, 0, stream()>>>(loss, terms, rows, B, alpha);
	CUDA_CHECK_LAUNCH("balance_fwd_reduce_kernel");
	scratch_free(terms);
	scratch_free(counts);
}

float balance_loss_forward_cuda(const float *scores, const int *topk_idx, int B, int T, int E, int K,
				float alpha)
{
	float *d_loss = scratch<float>(1);
	balance_loss_forward_cuda_async(d_loss, scores, topk_idx, B, T, E, K, alpha);
	float loss = 0.0f;
	CUDA_CHECK(cudaMemcpyAsync(&loss, d_loss, sizeof(float), cudaMemcpyDeviceToHost, stream()));
	scratch_free(d_loss);
	CUDA_CHECK(cudaStreamSynchronize(stream()));
	return loss;
}

void balance_loss_backward_cuda(float *dscores, const float *scores, const int *topk_idx, int B, int T, int E,
				int K, float alpha, float dloss)
{
	if (B <= 0 || T <= 0 || E <= 0 || K <= 0)
		return;
	int *counts = balance_counts(topk_idx, B, T, E, K);
	const float g = dloss * alpha / ((float)B * T);
	const size_t rows = (size_t)B * T;
	const unsigned blocks = (unsigned)((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
	balance_bwd_kernel<<<blocks, 32 * kWarpsPerBlock, 0, stream()>>>(dscores, scores, counts, B, T, E, K, g);
	CUDA_CHECK_LAUNCH("balance_bwd_kernel");
	scratch_free(counts);
}

} /* extern "C" */
