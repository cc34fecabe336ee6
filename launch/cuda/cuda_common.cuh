/*
 * launch/cuda/cuda_common.cuh - internal to the CUDA backend (C++ / CUDA only).
 *
 * The backend context (stream, cuBLAS handle, stream-ordered scratch memory), element-type conversion for
 * the kernels' templates, and deterministic warp/block reductions.
 *
 * Element types: kernels are templates over the activation type `T` and always accumulate in float; the
 * extern "C" entry points instantiate T = float.  Switching activations to bf16 means instantiating
 * T = __nv_bfloat16 (to_f / from_f below already handle it).
 */
#ifndef MOE_CUDA_COMMON_CUH
#define MOE_CUDA_COMMON_CUH

#include <cstddef>
#include <cmath>
#include <cstdint>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "launch/cuda/cuda_check.h"

namespace moe_cuda {

/* ---- context (launch/cuda/context.cu) ---- */
cudaStream_t stream();
cublasHandle_t cublas();  /* aborts if moe_cuda_init has not run */
/* Stream-ordered scratch memory (cudaMallocAsync on stream()); freed with scratch_free on the same stream,
 * so it may be released right after the kernels that use it are queued. */
void *scratch_alloc(size_t bytes);
void scratch_free(void *p);
template <typename U> U *scratch(size_t n) { return static_cast<U *>(scratch_alloc(n * sizeof(U))); }

/* Abort with a message when an argument is outside what the kernels support. */
[[noreturn]] void fail(const char *op, const char *what);

/* ---- launch helpers ---- */
constexpr int kThreads = 256;  /* default block size for elementwise and row kernels */

/* Blocks for a grid-stride loop over n elements (capped: the loop covers the rest). */
inline unsigned grid_for(size_t n, int threads = kThreads)
{
	size_t b = (n + threads - 1) / threads;
	const size_t cap = 65536;
	if (b < 1)
		b = 1;
	return (unsigned)(b < cap ? b : cap);
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

/* ---- element types ---- */
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x)
{
	return __float2bfloat16(x);
}

/* ---- reductions (fixed shuffle trees: the same order on every run) ---- */
template <typename A> __device__ __forceinline__ A warp_sum(A v)
{
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o);
	return v;
}

__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
	return v;
}

/*
 * Sum (or max) over the whole block, returned to every thread.  Every thread of the block must call it
 * (it synchronises); blockDim.x must be a multiple of 32, at most 1024.  Safe to call repeatedly.
 */
template <typename A> __device__ __forceinline__ A block_sum(A v)
{
	__shared__ A part[32];
	__shared__ A total;
	const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
	v = warp_sum(v);
	__syncthreads(); /* an earlier call's readers of `total` are done */
	if (lane == 0)
		part[wid] = v;
	__syncthreads();
	if (wid == 0) {
		A t = lane < nw ? part[lane] : A(0);
		t = warp_sum(t);
		if (lane == 0)
			total = t;
	}
	__syncthreads();
	return total;
}

__device__ __forceinline__ float block_max(float v)
{
	__shared__ float part[32];
	__shared__ float total;
	const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
	v = warp_max(v);
	__syncthreads();
	if (lane == 0)
		part[wid] = v;
	__syncthreads();
	if (wid == 0) {
		float t = lane < nw ? part[lane] : -INFINITY;
		t = warp_max(t);
		if (lane == 0)
			total = t;
	}
	__syncthreads();
	return total;
}

} /* namespace moe_cuda */

#endif
