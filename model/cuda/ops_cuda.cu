/*
 * model/cuda/ops_cuda.cu - the dense ops of model/ops.h on the GPU: linear (cuBLAS), embedding, RMSNorm,
 * RoPE, SwiGLU, cross-entropy, vec_add.  Attention lives in attention_cuda.cu, the router and the balance
 * loss in router_cuda.cu.
 *
 * Kernels are templates over the activation type T (float accumulation); the extern "C" wrappers at the
 * bottom instantiate T = float.  All index arithmetic that can exceed 2^31 (N*C, N*V) is done in size_t.
 */
#include <cub/device/device_radix_sort.cuh>

#include "launch/cuda/cuda_common.cuh"
#include "model/cuda/ops_cuda.h"

namespace moe_cuda {

/* cuBLAS's name for an element type */
template <typename T> struct cuda_type;
template <> struct cuda_type<float> { static constexpr cudaDataType_t value = CUDA_R_32F; };
template <> struct cuda_type<__nv_bfloat16> { static constexpr cudaDataType_t value = CUDA_R_16BF; };

namespace {

/* ------------------------------------------------------------------------------------------------------
 * Linear: y = x W^T through cuBLAS (column-major).
 *
 * A row-major [R, C] matrix is the column-major [C, R] matrix (its transpose) with ld = C.  So, with
 * column-major names:  x -> x^T [in, N],  W -> W^T [in, out],  y -> y^T [out, N]  and
 *   forward   y^T  [out,N] = (W^T)^T [out,in] * x^T [in,N]          : gemm(T, N, m=out, n=N,  k=in)
 *   dx        dx^T [in,N] += W^T [in,out] * dy^T [out,N]             : gemm(N, N, m=in,  n=N,  k=out)
 *   dw        dw^T [in,out] += x^T [in,N] * (dy^T)^T [N,out]         : gemm(N, T, m=in,  n=out, k=N)
 * (dw [out,in] row-major is dw^T [in,out] column-major with ld = in.)
 * ---------------------------------------------------------------------------------------------------- */

template <typename TA, typename TB, typename TC>
void gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const TA *A, int lda,
	  const TB *B, int ldb, float beta, TC *C, int ldc)
{
	const float alpha = 1.0f;
	/* CUBLAS_COMPUTE_32F: fp32 accumulation, and with fp32 inputs no TF32 down-conversion */
	CUBLAS_CHECK(cublasGemmEx(cublas(), ta, tb, m, n, k, &alpha, A, cuda_type<TA>::value, lda, B,
				  cuda_type<TB>::value, ldb, &beta, C, cuda_type<TC>::value, ldc,
				  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

template <typename T>
void linear_forward_impl(T *y, const T *x, const T *w, int N, int in, int out)
{
	if (N <= 0 || out <= 0)
		return;
	if (in <= 0) { /* empty product: y = 0 */
		CUDA_CHECK(cudaMemsetAsync(y, 0, sizeof(T) * (size_t)N * out, stream()));
		return;
	}
	gemm(CUBLAS_OP_T, CUBLAS_OP_N, out, N, in, w, in, x, in, 0.0f, y, out);
}

template <typename T>
void linear_backward_impl(T *dx, T *dw, const T *dy, const T *x, const T *w, int N, int in, int out)
{
	if (N <= 0 || in <= 0 || out <= 0)
		return; /* nothing to add */
	if (dx)
		gemm(CUBLAS_OP_N, CUBLAS_OP_N, in, N, out, w, in, dy, out, 1.0f, dx, in);
	if (dw)
		gemm(CUBLAS_OP_N, CUBLAS_OP_T, in, out, N, x, in, dy, out, 1.0f, dw, in);
}

/* ------------------------------------------------------------------------------------------------------
 * Embedding.
 * Forward: one thread per output element (grid-stride), coalesced along C.
 * Backward, deterministic: (1) sort the token indices by id with CUB's stable radix sort; (2) one block per
 * sorted position; only a block that starts a run of equal ids works: its threads own columns and add the
 * run's tokens in token order into the table row (exactly the CPU op's order and rounding).  grid.y tiles
 * C in blocks of kThreads columns.
 * ---------------------------------------------------------------------------------------------------- */
template <typename T>
__global__ void embedding_fwd_kernel(T *__restrict__ out, const int *__restrict__ ids,
				     const T *__restrict__ table, int N, int C)
{
	const size_t total = (size_t)N * C;
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
	     i += (size_t)gridDim.x * blockDim.x) {
		const size_t n = i / C, c = i % C;
		out[i] = table[(size_t)ids[n] * C + c];
	}
}

__global__ void iota_kernel(int *__restrict__ v, int n)
{
	for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
		v[i] = i;
}

template <typename T>
__global__ void embedding_bwd_kernel(T *__restrict__ dtable, const T *__restrict__ dout,
				     const int *__restrict__ sorted_ids, const int *__restrict__ sorted_tok,
				     int N, int C)
{
	const int i = blockIdx.x;
	const int id = sorted_ids[i];
	if (i > 0 && sorted_ids[i - 1] == id)
		return; /* not the first token of its id: the run's first block handles it */
	const int c = blockIdx.y * blockDim.x + threadIdx.x;
	if (c >= C)
		return;
	T *row = dtable + (size_t)id * C + c;
	float acc = to_f(*row);
	for (int j = i; j < N && sorted_ids[j] == id; j++)
		acc += to_f(dout[(size_t)sorted_tok[j] * C + c]);
	*row = from_f<T>(acc);
}

template <typename T>
void embedding_backward_impl(T *dtable, const T *dout, const int *ids, int N, int C)
{
	if (N <= 0 || C <= 0)
		return;
	cudaStream_t s = stream();
	int *tok = scratch<int>(N), *sorted_ids = scratch<int>(N), *sorted_tok = scratch<int>(N);
	iota_kernel<<<grid_for(N), kThreads, 0, s>>>(tok, N);
	CUDA_CHECK_LAUNCH("iota_kernel");
	size_t temp_bytes = 0;
	CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, ids, sorted_ids, tok, sorted_tok, N, 0,
						   (int)(sizeof(int) * 8), s));
	void *temp = scratch_alloc(temp_bytes);
	CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, ids, sorted_ids, tok, sorted_tok, N, 0,
						   (int)(sizeof(int) * 8), s));
	dim3 grid((unsigned)N, (unsigned)((C + kThreads - 1) / kThreads));
	embedding_bwd_kernel<T><<<grid, kThreads, 0, s>>>(dtable, dout, sorted_ids, sorted_tok, N, C);
	CUDA_CHECK_LAUNCH("embedding_bwd_kernel");
	scratch_free(temp);
	scratch_free(tok);
	scratch_free(sorted_ids);
	scratch_free(sorted_tok);
}

/* ------------------------------------------------------------------------------------------------------
 * RMSNorm.
 * Forward and dx: one block per row (kThreads threads striding over C), block_sum for the row's reduction.
 * dw (a sum over rows) in two deterministic passes: (1) grid (C tiles, row chunks): thread c sums its
 * column over kRmsRows consecutive rows into partial[chunk][c]; (2) thread c adds the chunks in order.
 * ---------------------------------------------------------------------------------------------------- */
constexpr int kRmsRows = 32;

template <typename T>
__global__ void rmsnorm_fwd_kernel(T *__restrict__ y, float *__restrict__ rstd, const T *__restrict__ x,
				   const T *__restrict__ w, int C, float eps)
{
	const size_t n = blockIdx.x;
	const T *xr = x + n * C;
	T *yr = y + n * C;
	float ss = 0.0f;
	for (int c = threadIdx.x; c < C; c += blockDim.x) {
		const float v = to_f(xr[c]);
		ss += v * v;
	}
	ss = block_sum(ss);
	const float r = 1.0f / sqrtf(ss / C + eps);
	if (threadIdx.x == 0)
		rstd[n] = r;
	for (int c = threadIdx.x; c < C; c += blockDim.x)
		yr[c] = from_f<T>(to_f(xr[c]) * r * to_f(w[c]));
}

template <typename T>
__global__ void rmsnorm_bwd_dx_kernel(T *__restrict__ dx, const T *__restrict__ dy, const T *__restrict__ x,
				      const T *__restrict__ w, const float *__restrict__ rstd, int C)
{
	const size_t n = blockIdx.x;
	const T *xr = x + n * C, *dyr = dy + n * C;
	T *dxr = dx + n * C;
	const float r = rstd[n];
	float dot = 0.0f;
	for (int c = threadIdx.x; c < C; c += blockDim.x)
		dot += to_f(dyr[c]) * to_f(w[c]) * to_f(xr[c]);
	dot = block_sum(dot);
	const float k = dot * r * r * r / C;
	for (int c = threadIdx.x; c < C; c += blockDim.x)
		dxr[c] = from_f<T>(to_f(dxr[c]) + (to_f(dyr[c]) * to_f(w[c]) * r - to_f(xr[c]) * k));
}

template <typename T>
__global__ void rmsnorm_bwd_dw_partial_kernel(float *__restrict__ partial, const T *__restrict__ dy,
					      const T *__restrict__ x, const float *__restrict__ rstd, int N,
					      int C)
{
	const int c = blockIdx.x * blockDim.x + threadIdx.x;
	if (c >= C)
		return;
	const int n0 = blockIdx.y * kRmsRows, n1 = min(n0 + kRmsRows, N);
	float acc = 0.0f;
	for (int n = n0; n < n1; n++)
		acc += to_f(dy[(size_t)n * C + c]) * to_f(x[(size_t)n * C + c]) * rstd[n];
	partial[(size_t)blockIdx.y * C + c] = acc;
}

template <typename T>
__global__ void rmsnorm_bwd_dw_final_kernel(T *__restrict__ dw, const float *__restrict__ partial,
					    int nchunks, int C)
{
	const int c = blockIdx.x * blockDim.x + threadIdx.x;
	if (c >= C)
		return;
	float acc = 0.0f;
	for (int i = 0; i < nchunks; i++)
		acc += partial[(size_t)i * C + c];
	dw[c] = from_f<T>(to_f(dw[c]) + acc);
}

template <typename T>
void rmsnorm_forward_impl(T *y, float *rstd, const T *x, const T *w, int N, int C, float eps)
{
	if (N <= 0)
		return;
	rmsnorm_fwd_kernel<T><<<N, kThreads, 0, stream()>>>(y, rstd, x, w, C, eps);
	CUDA_CHECK_LAUNCH("rmsnorm_fwd_kernel");
}

template <typename T>
void rmsnorm_backward_impl(T *dx, T *dw, const T *dy, const T *x, const T *w, const float *rstd, int N,
			   int C)
{
	if (N <= 0 || C <= 0)
		return;
	cudaStream_t s = stream();
	if (dx) {
		rmsnorm_bwd_dx_kernel<T><<<N, kThreads, 0, s>>>(dx, dy, x, w, rstd, C);
		CUDA_CHECK_LAUNCH("rmsnorm_bwd_dx_kernel");
	}
	if (dw) {
		const int nchunks = (N + kRmsRows - 1) / kRmsRows;
		float *partial = scratch<float>((size_t)nchunks * C);
		const unsigned ctiles = (unsigned)((C + kThreads - 1) / kThreads);
		rmsnorm_bwd_dw_partial_kernel<T><<<dim3(ctiles, (unsigned)nchunks), kThreads, 0, s>>>(
			partial, dy, x, rstd, N, C);
		CUDA_CHECK_LAUNCH("rmsnorm_bwd_dw_partial_kernel");
		rmsnorm_bwd_dw_final_kernel<T><<<ctiles, kThreads, 0, s>>>(dw, partial, nchunks, C);
		CUDA_CHECK_LAUNCH("rmsnorm_bwd_dw_final_kernel");
		scratch_free(partial);
	}
}

/* ------------------------------------------------------------------------------------------------------
 * RoPE (interleaved pairs), in place.  One thread per (row n, pair i): it computes cos/sin once, in double
 * like the CPU op (angles reach thousands of radians, beyond float's precision), times attention_factor,
 * and rotates pair i of every head.  sign = +1 forward, -1 the inverse rotation (backward).  The frequency
 * table (model/rope.h) is a kernel argument.
 * ---------------------------------------------------------------------------------------------------- */
struct rope_table {
	double inv_freq[MC_ROPE_MAX_DIM / 2];
};

template <typename T>
__global__ void rope_kernel(T *x, const int *__restrict__ pos, int N, int nheads, int row_stride,
			    int head_stride, int dr, const rope_table freq, float attention_factor,
			    float sign)
{
	const int half = dr / 2;
	const size_t total = (size_t)N * half;
	for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
	     t += (size_t)gridDim.x * blockDim.x) {
		const int n = (int)(t / half), i = (int)(t % half);
		const double angle = (double)pos[n] * freq.inv_freq[i];
		const double scale = attention_factor;
		const float c = (float)(scale * cos(angle)), s = sign * (float)(scale * sin(angle));
		T *p = x + (size_t)n * row_stride + 2 * i;
		for (int h = 0; h < nheads; h++, p += head_stride) {
			const float a = to_f(p[0]), b = to_f(p[1]);
			p[0] = from_f<T>(a * c - b * s);
			p[1] = from_f<T>(a * s + b * c);
		}
	}
}

template <typename T>
void rope_impl(T *x, const int *pos, int N, int nheads, int row_stride, int head_stride, int dr,
	       const double *inv_freq, float attention_factor, float sign)
{
	if (N <= 0 || dr < 2 || nheads <= 0)
		return;
	if (dr > MC_ROPE_MAX_DIM)
		fail("rope", "dr must be <= MC_ROPE_MAX_DIM (256)");
	rope_table freq = {};
	for (int i = 0; i < dr / 2; i++)
		freq.inv_freq[i] = inv_freq[i];
	const size_t total = (size_t)N * (dr / 2);
	rope_kernel<T><<<grid_for(total), kThreads, 0, stream()>>>(x, pos, N, nheads, row_stride, head_stride,
								   dr, freq, attention_factor, sign);
	CUDA_CHECK_LAUNCH("rope_kernel");
}

/* ------------------------------------------------------------------------------------------------------
 * SwiGLU and vec_add: elementwise, grid-stride loops.
 * ---------------------------------------------------------------------------------------------------- */
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__global__ void swiglu_fwd_kernel(T *__restrict__ out, const T *__restrict__ gate, const T *__restrict__ up,
				  size_t n)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
		const float g = to_f(gate[i]);
		out[i] = from_f<T>(g * sigmoid(g) * to_f(up[i]));
	}
}

template <typename T>
__global__ void swiglu_bwd_kernel(T *__restrict__ dgate, T *__restrict__ dup, const T *__restrict__ dout,
				  const T *__restrict__ gate, const T *__restrict__ up, size_t n)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
		const float g = to_f(gate[i]), s = sigmoid(g), d = to_f(dout[i]);
		if (dgate)
			dgate[i] = from_f<T>(to_f(dgate[i]) + d * to_f(up[i]) * s * (1.0f + g * (1.0f - s)));
		if (dup)
			dup[i] = from_f<T>(to_f(dup[i]) + d * g * s);
	}
}

template <typename T>
__global__ void vec_add_kernel(T *__restrict__ dst, const T *__restrict__ src, size_t n)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		dst[i] = from_f<T>(to_f(dst[i]) + to_f(src[i]));
}

/* ------------------------------------------------------------------------------------------------------
 * Cross-entropy: one block per row.  Each thread runs an online (max, sum-of-exp) over its strided share of
 * the V logits; the pairs are merged across the block (fixed tree), giving the row's log-sum-exp.
 * The backward then writes dlogits = dloss * (softmax - onehot); each element is read and written by the
 * same thread after the reduction, so dlogits may alias logits (no __restrict__ on them).
 * ---------------------------------------------------------------------------------------------------- */
constexpr int kCeThreads = 512;

struct max_sum {
	float m, s;
};

__device__ __forceinline__ max_sum ms_merge(max_sum a, max_sum b)
{
	if (a.m == -INFINITY)
		return b;
	if (b.m == -INFINITY)
		return a;
	const float m = fmaxf(a.m, b.m);
	return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

/* log-sum-exp of row[0..V), returned to every thread of the block */
template <typename T> __device__ float block_logsumexp(const T *row, int V)
{
	__shared__ max_sum part[32];
	__shared__ float result;
	max_sum acc = {-INFINITY, 0.0f};
	for (int j = threadIdx.x; j < V; j += blockDim.x) {
		const float v = to_f(row[j]);
		if (v > acc.m) {
			acc.s = acc.s * expf(acc.m - v) + 1.0f; /* acc.m = -inf: 0 * 0 + 1 */
			acc.m = v;
		} else if (acc.m != -INFINITY) { /* (v = acc.m = -inf adds nothing) */
			acc.s += expf(v - acc.m);
		}
	}
#pragma unroll
	for (int o = 16; o > 0; o >>= 1) {
		max_sum other = {__shfl_xor_sync(0xffffffffu, acc.m, o), __shfl_xor_sync(0xffffffffu, acc.s, o)};
		acc = ms_merge(acc, other);
	}
	const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
	if (lane == 0)
		part[wid] = acc;
	__syncthreads();
	if (wid == 0) {
		max_sum t = lane < nw ? part[lane] : max_sum{-INFINITY, 0.0f};
#pragma unroll
		for (int o = 16; o > 0; o >>= 1) {
			max_sum other = {__shfl_xor_sync(0xffffffffu, t.m, o), __shfl_xor_sync(0xffffffffu, t.s, o)};
			t = ms_merge(t, other);
		}
		if (lane == 0)
			result = t.m + logf(t.s);
	}
	__syncthreads();
	return result;
}

template <typename T>
__global__ void cross_entropy_fwd_kernel(float *__restrict__ losses, const T *__restrict__ logits,
					 const int *__restrict__ targets, int V)
{
	const size_t n = blockIdx.x;
	const int t = targets[n];
	if (t < 0) { /* ignored row: the whole block leaves together */
		if (threadIdx.x == 0)
			losses[n] = 0.0f;
		return;
	}
	const T *row = logits + n * V;
	const float lse = block_logsumexp(row, V);
	if (threadIdx.x == 0)
		losses[n] = lse - to_f(row[t]);
}

template <typename T>
__global__ void cross_entropy_bwd_kernel(T *dlogits, const T *logits, const int *__restrict__ targets,
					 float dloss, int V)
{
	const size_t n = blockIdx.x;
	const int t = targets[n];
	T *drow = dlogits + n * V;
	if (t < 0) {
		for (int j = threadIdx.x; j < V; j += blockDim.x)
			drow[j] = from_f<T>(0.0f);
		return;
	}
	const T *row = logits + n * V;
	const float lse = block_logsumexp(row, V);
	for (int j = threadIdx.x; j < V; j += blockDim.x) {
		const float p = dloss * expf(to_f(row[j]) - lse); /* read row[j] before writing drow[j] */
		drow[j] = from_f<T>(j == t ? p - dloss : p);
	}
}

/*
 * KL between the softmaxes at temperature 1/invT of two rows of logits (distillation; the CPU reference
 * is train/distill.c's distill_row_*): one block per row, max and sums over the block, the sums of
 * exponentials in double as on the CPU.  Rows without a target get 0.
 */
__global__ void kl_div_rows_kernel(double *kl, double *lse_s, double *lse_t, const float *__restrict__ zs,
				   const float *__restrict__ zt, const int *__restrict__ targets, int V, double invT,
				   int reverse)
{
	const size_t n = blockIdx.x;
	if (targets[n] < 0) {
		if (threadIdx.x == 0)
			kl[n] = lse_s[n] = lse_t[n] = 0.0;
		return;
	}
	const float *s = zs + n * V, *t = zt + n * V;
	float ms = -INFINITY, mt = -INFINITY;
	for (int j = threadIdx.x; j < V; j += blockDim.x) {
		ms = fmaxf(ms, s[j]);
		mt = fmaxf(mt, t[j]);
	}
	const double msd = block_max(ms) * invT, mtd = block_max(mt) * invT;
	double ss = 0.0, st = 0.0;
	for (int j = threadIdx.x; j < V; j += blockDim.x) {
		ss += exp(s[j] * invT - msd);
		st += exp(t[j] * invT - mtd);
	}
	ss = block_sum(ss);
	st = block_sum(st);
	/* the log-probabilities in double: the reverse gradient's log p_s - log p_t - KL cancels */
	const double ls0 = msd + log(ss), lt0 = mtd + log(st);
	double k = 0.0;
	for (int j = threadIdx.x; j < V; j += blockDim.x) {
		const double ls = s[j] * invT - ls0, lt = t[j] * invT - lt0;
		k += reverse ? exp(ls) * (ls - lt) : exp(lt) * (lt - ls);
	}
	k = block_sum(k);
	if (threadIdx.x == 0) {
		kl[n] = k > 0.0 ? k : 0.0;  /* >= 0 exactly; rounding can leave -1e-17 */
		lse_s[n] = ls0;
		lse_t[n] = lt0;
	}
}

/* g = f * (p_s - p_t) (forward) or f * p_s * (log p_s - log p_t - KL) (reverse); g may be zt (in place:
 * each element is read before it is written, by the same thread) */
__global__ void kl_div_grad_rows_kernel(float *g, const float *zs, const float *zt,
					const int *__restrict__ targets, const double *__restrict__ lse_s,
					const double *__restrict__ lse_t, const double *__restrict__ kl, int V,
					double invT, int reverse, double f)
{
	const size_t n = blockIdx.x;
	float *gr = g + n * V;
	const float *s = zs + n * V, *t = zt + n * V;
	if (targets[n] < 0) {
		for (int j = threadIdx.x; j < V; j += blockDim.x)
			gr[j] = 0.0f;
		return;
	}
	for (int j = threadIdx.x; j < V; j += blockDim.x) {
		const double ls = s[j] * invT - lse_s[n], lt = t[j] * invT - lse_t[n], ps = exp(ls);
		gr[j] = (float)(reverse ? f * ps * (ls - lt - kl[n]) : f * (ps - exp(lt)));
	}
}

} /* namespace */
} /* namespace moe_cuda */

using namespace moe_cuda;

/* ---- extern "C" float entry points ---- */
extern "C" {

void linear_forward_cuda(float *y, const float *x, const float *w, int N, int in, int out)
{
	linear_forward_impl<float>(y, x, w, N, in, out);
}

void linear_backward_cuda(float *dx, float *dw, const float *dy, const float *x, const float *w, int N, int in,
			  int out)
{
	linear_backward_impl<float>(dx, dw, dy, x, w, N, in, out);
}

void embedding_forward_cuda(float *out, const int *ids, const float *table, int N, int C)
{
	if (N <= 0 || C <= 0)
		return;
	embedding_fwd_kernel<float><<<grid_for((size_t)N * C), kThreads, 0, stream()>>>(out, ids, table, N, C);
	CUDA_CHECK_LAUNCH("embedding_fwd_kernel");
}

void embedding_backward_cuda(float *dtable, const float *dout, const int *ids, int N, int C)
{
	embedding_backward_impl<float>(dtable, dout, ids, N, C);
}

void rmsnorm_forward_cuda(float *y, float *rstd, const float *x, const float *w, int N, int C, float eps)
{
	rmsnorm_forward_impl<float>(y, rstd, x, w, N, C, eps);
}

void rmsnorm_backward_cuda(float *dx, float *dw, const float *dy, const float *x, const float *w,
			   const float *rstd, int N, int C)
{
	rmsnorm_backward_impl<float>(dx, dw, dy, x, w, rstd, N, C);
}

void rope_forward_cuda(float *x, const int *pos, int N, int nheads, int row_stride, int head_stride, int dr,
		       const double *inv_freq, float attention_factor)
{
	rope_impl<float>(x, pos, N, nheads, row_stride, head_stride, dr, inv_freq, attention_factor, 1.0f);
}

void rope_backward_cuda(float *dx, const int *pos, int N, int nheads, int row_stride, int head_stride, int dr,
			const double *inv_freq, float attention_factor)
{
	rope_impl<float>(dx, pos, N, nheads, row_stride, head_stride, dr, inv_freq, attention_factor, -1.0f);
}

void swiglu_forward_cuda(float *out, const float *gate, const float *up, size_t n)
{
	if (n == 0)
		return;
	swiglu_fwd_kernel<float><<<grid_for(n), kThreads, 0, stream()>>>(out, gate, up, n);
	CUDA_CHECK_LAUNCH("swiglu_fwd_kernel");
}

void swiglu_backward_cuda(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
			  size_t n)
{
	if (n == 0 || (!dgate && !dup))
		return;
	swiglu_bwd_kernel<float><<<grid_for(n), kThreads, 0, stream()>>>(dgate, dup, dout, gate, up, n);
	CUDA_CHECK_LAUNCH("swiglu_bwd_kernel");
}

void cross_entropy_forward_cuda(float *losses, const float *logits, const int *targets, int N, int V)
{
	if (N <= 0)
		return;
	cross_entropy_fwd_kernel<float><<<N, kCeThreads, 0, stream()>>>(losses, logits, targets, V);
	CUDA_CHECK_LAUNCH("cross_entropy_fwd_kernel");
}

void kl_div_rows_cuda(double *kl, double *lse_s, double *lse_t, const float *zs, const float *zt, const int *targets,
		      int N, int V, double temperature, int reverse)
{
	if (N <= 0)
		return;
	kl_div_rows_kernel<<<N, kCeThreads, 0, stream()>>>(kl, lse_s, lse_t, zs, zt, targets, V, 1.0 / temperature,
							   reverse);
	CUDA_CHECK_LAUNCH("kl_div_rows_kernel");
}

void kl_div_grad_rows_cuda(float *g, const float *zs, const float *zt, const int *targets, const double *lse_s,
			   const double *lse_t, const double *kl, int N, int V, double temperature, int reverse,
			   double scale)
{
	if (N <= 0)
		return;
	/* T^2 from the loss, 1/T from d(z/T)/dz */
	kl_div_grad_rows_kernel<<<N, kCeThreads, 0, stream()>>>(g, zs, zt, targets, lse_s, lse_t, kl, V,
								1.0 / temperature, reverse, scale * temperature);
	CUDA_CHECK_LAUNCH("kl_div_grad_rows_kernel");
}

void cross_entropy_backward_cuda(float *dlogits, const float *logits, const int *targets, float dloss, int N,
				 int V)
{
	if (N <= 0)
		return;
	cross_entropy_bwd_kernel<float><<<N, kCeThreads, 0, stream()>>>(dlogits, logits, targets, dloss, V);
	CUDA_CHECK_LAUNCH("cross_entropy_bwd_kernel");
}

void vec_add_cuda(float *dst, const float *src, size_t n)
{
	if (n == 0)
		return;
	vec_add_kernel<float><<<grid_for(n), kThreads, 0, stream()>>>(dst, src, n);
	CUDA_CHECK_LAUNCH("vec_add_kernel");
}

} /* extern "C" */
