/*
 * launch/cuda/cuda_check.h - one check macro per CUDA library.  Each names the failing call, the file and the
 * line, and ends the process (moe_cuda_die): a failed CUDA call leaves the device in an unknown state, so
 * there is nothing to recover.
 *
 *   CUDA_CHECK(cudaMalloc(&p, n));        the CUDA runtime
 *   CUBLAS_CHECK(cublasCreate(&h));       cuBLAS / cuBLASLt (both return cublasStatus_t)
 *   CUDA_CHECK_LAUNCH("rmsnorm_fwd");     after a kernel launch: launch-configuration errors
 *
 * Kernel faults surface asynchronously, at the next synchronising call.  Building with
 * -DMOE_CUDA_DEBUG_SYNC makes CUDA_CHECK_LAUNCH synchronise the device, so a fault is reported at the
 * kernel that caused it (slow; for debugging).
 *
 * Plain C and C++: includable from C11 files compiled against the CUDA headers.
 */
#ifndef MOE_CUDA_CHECK_H
#define MOE_CUDA_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

/* After a failed check's message: the hook set with moe_cuda_set_fatal_hook (under mpirun: abort the NCCL
 * communicators and the MPI job, so no peer waits on this rank), else abort().  launch/cuda/context.cu. */
#ifdef __cplusplus
extern "C"
#endif
void moe_cuda_die(void) __attribute__((noreturn));

#define CUDA_CHECK(call)                                                                              \
	do {                                                                                          \
		cudaError_t moe_cuda_err_ = (call);                                                   \
		if (moe_cuda_err_ != cudaSuccess) {                                                   \
			fprintf(stderr, "moe: CUDA error %s (%d): %s\n  in %s\n  at %s:%d\n",        \
				cudaGetErrorName(moe_cuda_err_), (int)moe_cuda_err_,                  \
				cudaGetErrorString(moe_cuda_err_), #call, __FILE__, __LINE__);        \
			moe_cuda_die();                                                               \
		}                                                                                     \
	} while (0)

#define CUBLAS_CHECK(call)                                                                            \
	do {                                                                                          \
		cublasStatus_t moe_cublas_st_ = (call);                                               \
		if (moe_cublas_st_ != CUBLAS_STATUS_SUCCESS) {                                        \
			fprintf(stderr, "moe: cuBLAS error %s (%d): %s\n  in %s\n  at %s:%d\n",      \
				cublasGetStatusName(moe_cublas_st_), (int)moe_cublas_st_,             \
				cublasGetStatusString(moe_cublas_st_), #call, __FILE__, __LINE__);   \
			moe_cuda_die();                                                               \
		}                                                                                     \
	} while (0)

#ifdef MOE_CUDA_DEBUG_SYNC
#define MOE_CUDA_LAUNCH_SYNC_() cudaDeviceSynchronize()
#else
#define MOE_CUDA_LAUNCH_SYNC_() cudaSuccess
#endif

#define CUDA_CHECK_LAUNCH(kernel_name)                                                                \
	do {                                                                                          \
		cudaError_t moe_cuda_err_ = cudaGetLastError();                                      \
		if (moe_cuda_err_ == cudaSuccess)                                                     \
			moe_cuda_err_ = MOE_CUDA_LAUNCH_SYNC_();                                      \
		if (moe_cuda_err_ != cudaSuccess) {                                                   \
			fprintf(stderr, "moe: CUDA error %s (%d): %s\n  launching kernel %s\n  at %s:%d\n", \
				cudaGetErrorName(moe_cuda_err_), (int)moe_cuda_err_,                  \
				cudaGetErrorString(moe_cuda_err_), kernel_name, __FILE__, __LINE__);  \
			moe_cuda_die();                                                               \
		}                                                                                     \
	} while (0)

#endif
