/*
 * model/cuda/attention_cast.cu - the conversions around the cuDNN attention graphs (attention_int.h): our
 * fp32 activations to the bf16 the graphs read, their bf16 / fp32 results back into our fp32 arrays.
 * Elementwise, grid-stride.
 */
#include "launch/cuda/cuda_common.cuh"
#include "model/cuda/attention_int.h"

namespace moe_cuda {
namespace {

__global__ void to_bf16_kernel(__nv_bfloat16 *dst, const float *src, size_t n)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		dst[i] = from_f<__nv_bfloat16>(src[i]);
}

__global__ void from_bf16_kernel(float *dst, const __nv_bfloat16 *src, size_t n, int add)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		dst[i] = add ? dst[i] + to_f(src[i]) : to_f(src[i]);
}

/* one thread per element of dq, reading the packed [B, H, T, dim] accumulator */
__global__ void add_packed_kernel(float *dq, const float *acc, int B, int T, int H, int dim)
{
	const size_t n = (size_t)B * T * H * dim;
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
		const size_t d = i % dim, h = i / dim % H, bt = i / ((size_t)dim * H), b = bt / T, t = bt % T;
		dq[i] += acc[((b * H + h) * T + t) * dim + d];
	}
}

} /* namespace */
} /* namespace moe_cuda */

using namespace moe_cuda;

extern "C" {

void attn_to_bf16(uint16_t *dst, const float *src, size_t n)
{
	if (n)
		to_bf16_kernel<<<grid_for(n), kThreads, 0, stream()>>>(reinterpret_cast<__nv_bfloat16 *>(dst), src, n);
	CUDA_CHECK_LAUNCH("attn_to_bf16");
}

void attn_from_bf16(float *dst, const uint16_t *src, size_t n, int add)
{
	if (n)
		from_bf16_kernel<<<grid_for(n), kThreads, 0, stream()>>>(
			dst, reinterpret_cast<const __nv_bfloat16 *>(src), n, add);
	CUDA_CHECK_LAUNCH("attn_from_bf16");
}

void attn_add_packed(float *dq, const float *acc, int B, int T, int H, int dim)
{
	size_t n = (size_t)B * T * H * dim;
	if (n)
		add_packed_kernel<<<grid_for(n), kThreads, 0, stream()>>>(dq, acc, B, T, H, dim);
	CUDA_CHECK_LAUNCH("attn_add_packed");
}

} /* extern "C" */
