/*
 * tests/gpu/emu/include/emu.h - a small CUDA emulator for checking the backend's kernels on a machine
 * without a GPU (tests/gpu/emu/run.sh).  NOT part of the build.
 *
 * Every CUDA thread is a ucontext fiber on one OS thread; the blocks of a grid run one after another, the
 * fibers of a block round-robin between barriers (__syncthreads, __syncwarp, each shuffle).  A barrier that
 * not all live threads of its block (warp) reach is reported as a deadlock; dynamic shared memory is a heap
 * block of exactly the launched size, filled with 0xFF (NaN), so AddressSanitizer sees overruns and unwritten
 * reads show as NaN; EMU_REVERSE=1 runs the fibers in reverse order (a missing barrier between a write and a
 * read by another thread shows in one order or the other).  cuBLAS GEMM is a naive column-major loop that
 * checks the leading dimensions like cuBLAS; CUB's radix sort is std::stable_sort.  Only what the backend
 * uses is provided; it checks indexing and synchronisation, not speed, and not memory-model subtleties.
 */
#pragma once
#include <ucontext.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <cstddef>
#include <functional>
#include <vector>
#include <algorithm>
#include <numeric>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
typedef dim3 uint3;

struct EmuFiber { ucontext_t ctx; int state; uint3 tid; int linear; };
enum { EMU_RUN = 0, EMU_BLOCK_BAR = 1, EMU_WARP_BAR = 2, EMU_DONE = 3 };
extern EmuFiber *emu_cur;
extern dim3 emu_blockIdx, emu_blockDim, emu_gridDim;
extern unsigned char *emu_dyn_smem;
extern unsigned long long emu_warp_slots[32][32];
void emu_yield(int state);
#define threadIdx (emu_cur->tid)
#define blockIdx emu_blockIdx
#define blockDim emu_blockDim
#define gridDim emu_gridDim

inline void __syncthreads() { emu_yield(EMU_BLOCK_BAR); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_yield(EMU_WARP_BAR); }
template <class T> T __shfl_xor_sync(unsigned, T v, int o)
{
	static_assert(sizeof(T) <= 8, "");
	int lane = emu_cur->linear & 31, w = emu_cur->linear >> 5;
	memcpy(&emu_warp_slots[w][lane], &v, sizeof(T));
	emu_yield(EMU_WARP_BAR);
	T r;
	memcpy(&r, &emu_warp_slots[w][lane ^ o], sizeof(T));
	emu_yield(EMU_WARP_BAR);
	return r;
}
inline int atomicAdd(int *p, int v) { int o = *p; *p += v; return o; }
/* products rounded on their own, never contracted into a fused multiply-add (neither is host code here) */
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

void emu_launch(dim3 grid, dim3 block, size_t smem, const char *name, const void *fn, std::function<void()> body);

/* ---- runtime ---- */
typedef enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 } cudaError_t;
typedef void *cudaStream_t;
typedef void *cudaMemPool_t;
typedef enum { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice } cudaMemcpyKind;
typedef enum { cudaFuncAttributeMaxDynamicSharedMemorySize } cudaFuncAttribute;
typedef enum { cudaMemPoolAttrReleaseThreshold } cudaMemPoolAttr;
const char *cudaGetErrorName(cudaError_t);
const char *cudaGetErrorString(cudaError_t);
cudaError_t cudaGetLastError();
cudaError_t cudaGetDeviceCount(int *);
cudaError_t cudaSetDevice(int);
cudaError_t cudaStreamCreate(cudaStream_t *);
cudaError_t cudaStreamDestroy(cudaStream_t);
cudaError_t cudaStreamSynchronize(cudaStream_t);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t *, int);
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void *);
cudaError_t cudaMalloc(void **, size_t);
cudaError_t cudaFree(void *);
cudaError_t cudaMallocAsync(void **, size_t, cudaStream_t);
cudaError_t cudaFreeAsync(void *, cudaStream_t);
cudaError_t cudaMemcpyAsync(void *, const void *, size_t, cudaMemcpyKind, cudaStream_t);
cudaError_t cudaMemsetAsync(void *, int, size_t, cudaStream_t);
/* pinned host memory is plain host memory here */
cudaError_t cudaMallocHost(void **, size_t);
cudaError_t cudaHostAlloc(void **, size_t, unsigned);
cudaError_t cudaFreeHost(void *);
#define cudaHostAllocDefault 0u
struct cudaDeviceProp { char name[256]; int major, minor, multiProcessorCount; size_t totalGlobalMem; };
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *, int);
cudaError_t cudaDeviceGetPCIBusId(char *, int, int);
void emu_set_smem_attr(const void *fn, int bytes);
template <class F> cudaError_t cudaFuncSetAttribute(F fn, cudaFuncAttribute, int v) { emu_set_smem_attr((const void *)fn, v); return cudaSuccess; }

/* ---- bf16 stand-in ---- */
struct __nv_bfloat16 { unsigned short x; };
inline float __bfloat162float(__nv_bfloat16 h) { unsigned u = (unsigned)h.x << 16; float f; memcpy(&f, &u, 4); return f; }
/* round to nearest even, as the hardware does (NaN stays a quiet NaN) */
inline __nv_bfloat16 __float2bfloat16(float f)
{
	unsigned u; memcpy(&u, &f, 4); __nv_bfloat16 h;
	if ((u & 0x7fffffffu) > 0x7f800000u) { h.x = (unsigned short)((u >> 16) | 0x40); return h; }
	u += 0x7fffu + ((u >> 16) & 1u);
	h.x = (unsigned short)(u >> 16); return h;
}

/* ---- events: host clock readings (the emulated kernels run synchronously, so they bracket the work) ---- */
typedef struct emu_event *cudaEvent_t;
cudaError_t cudaEventCreate(cudaEvent_t *);
cudaError_t cudaEventDestroy(cudaEvent_t);
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t);
cudaError_t cudaEventSynchronize(cudaEvent_t);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t, cudaEvent_t);

/* ---- cuBLAS ---- */
typedef void *cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7, CUBLAS_STATUS_NOT_SUPPORTED = 15 } cublasStatus_t;
typedef enum { CUBLAS_OP_N, CUBLAS_OP_T } cublasOperation_t;
typedef enum { CUDA_R_32F, CUDA_R_16BF } cudaDataType_t;
typedef enum { CUBLAS_COMPUTE_32F } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT } cublasGemmAlgo_t;
typedef enum { CUBLAS_DEFAULT_MATH } cublasMath_t;
const char *cublasGetStatusName(cublasStatus_t);
const char *cublasGetStatusString(cublasStatus_t);
cublasStatus_t cublasCreate(cublasHandle_t *);
cublasStatus_t cublasDestroy(cublasHandle_t);
cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t);
cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t);
cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void *,
			    const void *, cudaDataType_t, int, const void *, cudaDataType_t, int, const void *, void *,
			    cudaDataType_t, int, cublasComputeType_t, cublasGemmAlgo_t);
/* CUDA 12.5+; EMU_NO_GROUPED_GEMM=1 makes it refuse (CUBLAS_STATUS_NOT_SUPPORTED), as an older cuBLAS would */
cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t, const cublasOperation_t[], const cublasOperation_t[],
					  const int[], const int[], const int[], const void *, const void *const[],
					  cudaDataType_t, const int[], const void *const[], cudaDataType_t, const int[],
					  const void *, void *const[], cudaDataType_t, const int[], int, const int[],
					  cublasComputeType_t);

/* ---- CUB ---- */
namespace cub {
struct DeviceRadixSort {
	template <class K, class V>
	static cudaError_t SortPairs(void *temp, size_t &bytes, const K *kin, K *kout, const V *vin, V *vout, int n,
				     int = 0, int = sizeof(K) * 8, cudaStream_t = 0)
	{
		if (!temp) { bytes = 16; return cudaSuccess; }
		std::vector<int> o(n);
		std::iota(o.begin(), o.end(), 0);
		std::stable_sort(o.begin(), o.end(), [&](int a, int b) { return kin[a] < kin[b]; });
		for (int i = 0; i < n; i++) { kout[i] = kin[o[i]]; vout[i] = vin[o[i]]; }
		return cudaSuccess;
	}
};
}
