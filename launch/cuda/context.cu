/*
 * launch/cuda/context.cu - the CUDA backend's context: device selection, the stream every op runs on,
 * the cuBLAS handle, scratch memory, and device-memory helpers.
 *
 * One device per process (one rank per GPU), so the context is a set of file-scope globals.
 */
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "launch/cuda/cuda_common.cuh"
#include "launch/cuda/device.h"

namespace {
int g_device = -1;
void (*g_fatal_hook)(void) = nullptr;
cudaStream_t g_stream = nullptr;
cublasHandle_t g_cublas = nullptr;
} /* namespace */

namespace moe_cuda {

cudaStream_t stream() { return g_stream; }

cublasHandle_t cublas()
{
	if (!g_cublas) {
		fprintf(stderr, "moe: a cuBLAS op was called before moe_cuda_init()\n");
		abort();
	}
	return g_cublas;
}

void *scratch_alloc(size_t bytes)
{
	if (bytes == 0)
		return nullptr;
	void *p = nullptr;
	CUDA_CHECK(cudaMallocAsync(&p, bytes, g_stream));
	return p;
}

void scratch_free(void *p)
{
	if (p)
		CUDA_CHECK(cudaFreeAsync(p, g_stream));
}

void fail(const char *op, const char *what)
{
	fprintf(stderr, "moe: %s: %s\n", op, what);
	moe_cuda_die();
}

} /* namespace moe_cuda */

extern "C" {

void moe_cuda_set_fatal_hook(void (*hook)(void)) { g_fatal_hook = hook; }

void moe_cuda_die(void)
{
	fflush(stdout);
	fflush(stderr);
	if (g_fatal_hook)
		g_fatal_hook();
	abort();
}

int moe_cuda_device_count(void)
{
	int n = 0; /* without a GPU cudaGetDeviceCount fails (error 35) and leaves n unwritten */
	cudaError_t err = cudaGetDeviceCount(&n);
	if (err != cudaSuccess) {
		(void)cudaGetLastError(); /* clear the error so later calls do not report it */
		return 0;
	}
	return n > 0 ? n : 0;
}

static int init_fail(const char *what, const char *detail)
{
	fprintf(stderr, "moe: moe_cuda_init: %s: %s\n", what, detail);
	return -1;
}

int moe_cuda_init(int device)
{
	if (g_device >= 0)
		return device == g_device ? 0 : init_fail("already initialised on another device", "");
	int n = moe_cuda_device_count();
	if (device < 0 || device >= n) {
		char msg[64];
		snprintf(msg, sizeof(msg), "device %d requested, %d visible", device, n);
		return init_fail("no such device", msg);
	}
	cudaError_t err = cudaSetDevice(device);
	if (err != cudaSuccess)
		return init_fail("cudaSetDevice", cudaGetErrorString(err));
	err = cudaStreamCreate(&g_stream);
	if (err != cudaSuccess)
		return init_fail("cudaStreamCreate", cudaGetErrorString(err));
	cublasStatus_t st = cublasCreate(&g_cublas);
	if (st != CUBLAS_STATUS_SUCCESS) {
		cudaStreamDestroy(g_stream);
		g_stream = nullptr;
		g_cublas = nullptr;
		return init_fail("cublasCreate", cublasGetStatusString(st));
	}
	CUBLAS_CHECK(cublasSetStream(g_cublas, g_stream));
	/* fp32 stays fp32: no TF32 tensor-core shortcut (the CPU reference is plain fp32) */
	CUBLAS_CHECK(cublasSetMathMode(g_cublas, CUBLAS_DEFAULT_MATH));
	/* Scratch memory comes from the device's default pool; keep freed blocks cached instead of returning
	 * them to the driver at every synchronisation. */
	cudaMemPool_t pool;
	CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
	uint64_t keep = UINT64_MAX;
	CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
	g_device = device;
	return 0;
}

void moe_cuda_shutdown(void)
{
	if (g_device < 0)
		return;
	CUDA_CHECK(cudaStreamSynchronize(g_stream));
	CUBLAS_CHECK(cublasDestroy(g_cublas));
	CUDA_CHECK(cudaStreamDestroy(g_stream));
	g_cublas = nullptr;
	g_stream = nullptr;
	g_device = -1;
}

int moe_cuda_current_device(void) { return g_device; }

int moe_cuda_device_for_rank(int local_rank)
{
	int n = moe_cuda_device_count();
	return n > 0 ? (local_rank < 0 ? 0 : local_rank) % n : -1;
}

void moe_cuda_describe(char *name, size_t name_len, char *pci, size_t pci_len)
{
	cudaDeviceProp p;
	snprintf(name, name_len, "?");
	snprintf(pci, pci_len, "?");
	if (g_device < 0)
		return;
	CUDA_CHECK(cudaGetDeviceProperties(&p, g_device));
	snprintf(name, name_len, "%s", p.name);
	CUDA_CHECK(cudaDeviceGetPCIBusId(pci, (int)pci_len, g_device));
}

void *moe_cuda_stream(void) { return (void *)g_stream; }

void moe_cuda_synchronize(void) { CUDA_CHECK(cudaStreamSynchronize(g_stream)); }

void *moe_cuda_malloc(size_t bytes)
{
	if (bytes == 0)
		return nullptr;
	void *p = nullptr;
	CUDA_CHECK(cudaMalloc(&p, bytes));
	return p;
}

void moe_cuda_free(void *dptr)
{
	if (!dptr)
		return;
	CUDA_CHECK(cudaStreamSynchronize(g_stream)); /* queued ops may still use it */
	CUDA_CHECK(cudaFree(dptr));
}

static void copy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind)
{
	if (bytes == 0)
		return;
	CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, g_stream));
	CUDA_CHECK(cudaStreamSynchronize(g_stream));
}

void moe_cuda_memcpy_h2d(void *dst, const void *src, size_t bytes) { copy(dst, src, bytes, cudaMemcpyHostToDevice); }
void moe_cuda_memcpy_d2h(void *dst, const void *src, size_t bytes) { copy(dst, src, bytes, cudaMemcpyDeviceToHost); }
void moe_cuda_memcpy_d2d(void *dst, const void *src, size_t bytes) { copy(dst, src, bytes, cudaMemcpyDeviceToDevice); }

void moe_cuda_memcpy_d2d_async(void *dst, const void *src, size_t bytes)
{
	if (bytes)
		CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, g_stream));
}

void moe_cuda_memset(void *dst, int byte, size_t bytes)
{
	if (bytes == 0)
		return;
	CUDA_CHECK(cudaMemsetAsync(dst, byte, bytes, g_stream));
	CUDA_CHECK(cudaStreamSynchronize(g_stream));
}

void moe_cuda_memset_async(void *dst, int byte, size_t bytes)
{
	if (bytes)
		CUDA_CHECK(cudaMemsetAsync(dst, byte, bytes, g_stream));
}

} /* extern "C" */
