/*
 * launch/cuda/comm_device.h - the collectives of launch/comm.h over DEVICE buffers, for the GPU model and
 * the GPU trainer: one interface, two transports, chosen once per job by dcomm_init.
 *
 *   nccl  NCCL (launch/cuda/comm_nccl.cu): every rank of the world on its own GPU.  NCCL refuses two ranks
 *         on one device, so this needs distinct GPUs (host name + PCI bus id) for all ranks.
 *   mpi   host-staged: device -> pinned host buffer, the MPI collective of launch/comm_mpi.c, host ->
 *         device.  Works for any placement (ranks sharing a GPU, the CPU emulator, a build without NCCL).
 *
 * parallel.comm = auto picks nccl where every rank has its own GPU and the build has NCCL, mpi otherwise;
 * nccl where that is impossible is an error naming parallel.comm.  Both give the same numbers (the same
 * reductions in the same precision; the summation order inside a reduction is the library's).
 *
 * Semantics, argument rules and return values are those of the comm_ functions of the same name.  Each
 * call is queued after the work already on the backend's stream (moe_cuda_stream()) and returns once its
 * result is in the device buffer.  A failing CUDA or NCCL call ends the whole job (comm_abort / abort,
 * after ncclCommAbort), never hangs it.  Plain C.
 */
#ifndef MOE_LAUNCH_CUDA_COMM_DEVICE_H
#define MOE_LAUNCH_CUDA_COMM_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include "launch/comm.h"

#ifdef __cplusplus
extern "C" {
#endif

enum dcomm_kind { DCOMM_NONE, DCOMM_MPI, DCOMM_NCCL };

/*
 * After moe_cuda_init on every rank: decide the transport from mode ("auto", "nccl" or "mpi"; NULL =
 * auto), set it up (NCCL communicators for d's three groups), and print the choice (rank 0).  Collective
 * over the world.  0, or -1 with err filled (naming parallel.comm), identically on every rank.
 */
int dcomm_init(const struct dist *d, const char *mode, char *err, size_t errlen);
void dcomm_free(const struct dist *d);
enum dcomm_kind dcomm_kind(void);
const char *dcomm_name(void);   /* "nccl", "mpi" or "none" */

int dcomm_allreduce(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, enum comm_op op);
/*
 * An all-reduce that may run beside the backend's stream: it reads buf after the work queued on that
 * stream so far and must not be touched until dcomm_wait(g) has returned.  With NCCL it is queued on a
 * second stream and returns at once (dcomm_overlaps() = 1), so the backward can go on while a gradient
 * bucket travels; the staged MPI path completes it before returning.  dcomm_wait waits for every
 * reduction started on g (an asynchronous NCCL error ends the job) and counts the wait as comm time.
 */
int dcomm_overlaps(void);
int dcomm_allreduce_start(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, enum comm_op op);
int dcomm_wait(struct comm_group *g);
int dcomm_broadcast(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, int root);
int dcomm_allgather(struct comm_group *g, const void *send, void *recv, size_t count, enum comm_dtype t);
int dcomm_reduce_scatter(struct comm_group *g, const void *send, void *recv, size_t count, enum comm_dtype t,
			 enum comm_op op);
/* counts on the host (comm_exchange_counts), buffers on the device */
int dcomm_alltoallv(struct comm_group *g, const void *send, const int64_t *send_counts, void *recv,
		    const int64_t *recv_counts, enum comm_dtype t);

#ifdef __cplusplus
}
#endif

#endif
