/*
 * launch/cuda/device.h - the process's CUDA device: choosing it, the stream every GPU op is queued on,
 * and device-memory helpers.  One device per process (one rank per GPU); the context itself (cuBLAS handle,
 * scratch memory, check macros) is launch/cuda/context.cu and cuda_common.cuh, shared by model/cuda,
 * optim/cuda and launch/cuda.
 *
 * Plain C (includable from C11 files; no CUDA types: a stream is handed out as an opaque pointer).  The
 * CUDA code itself is built only when the CUDA backend is (MOE_HAVE_CUDA); this header can be included
 * regardless.
 */
#ifndef MOE_LAUNCH_CUDA_DEVICE_H
#define MOE_LAUNCH_CUDA_DEVICE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- backend context ---- */

/* Number of visible CUDA devices; 0 on ANY error (no driver, no device, ...).  Creates no context. */
int moe_cuda_device_count(void);
/* Select `device`, create the backend's stream and cuBLAS handle.  Call only once a device is known to
 * exist (moe_cuda_device_count() > device).  Returns 0, or -1 with a message on stderr.  A second call
 * while initialised returns 0 if it names the same device, -1 otherwise. */
int moe_cuda_init(int device);
/* Wait for the device, destroy the handle and stream.  Safe to call when not initialised. */
void moe_cuda_shutdown(void);
/* This rank's device: local_rank modulo the visible devices (under srun --gpus-per-task=1 every rank sees
 * its own GPU as device 0); -1 when there is none. */
int moe_cuda_device_for_rank(int local_rank);
/* The selected device's name and PCI bus id ("0000:1b:00.0"), after moe_cuda_init. */
void moe_cuda_describe(char *name, size_t name_len, char *pci, size_t pci_len);
/* The device moe_cuda_init selected, -1 before. */
int moe_cuda_current_device(void);
/* The stream every op is queued on (a cudaStream_t). */
void *moe_cuda_stream(void);
/* Wait until every op queued so far has finished (aborts if one of them faulted). */
void moe_cuda_synchronize(void);

/* What a failed CUDA / cuBLAS check calls after its message (NULL: abort()); the hook must not return. */
void moe_cuda_set_fatal_hook(void (*hook)(void));

/* ---- device memory (for tests and setup; all synchronous with respect to the backend's stream) ---- */

void *moe_cuda_malloc(size_t bytes);                                /* aborts on failure; NULL for 0 */
void moe_cuda_free(void *dptr);                                     /* NULL is fine */
void moe_cuda_memcpy_h2d(void *dst, const void *src, size_t bytes); /* host -> device */
void moe_cuda_memcpy_d2h(void *dst, const void *src, size_t bytes); /* device -> host */
void moe_cuda_memcpy_d2d(void *dst, const void *src, size_t bytes); /* device -> device */
void moe_cuda_memset(void *dst, int byte, size_t bytes);            /* 0xFF fills floats with NaN */
/* device -> device queued on the stream, not waited for (packing gradients into buckets) */
void moe_cuda_memcpy_d2d_async(void *dst, const void *src, size_t bytes);
/* memset queued on the stream, not waited for (a scratch accumulator zeroed before a kernel) */
void moe_cuda_memset_async(void *dst, int byte, size_t bytes);

#ifdef __cplusplus
}
#endif

#endif
