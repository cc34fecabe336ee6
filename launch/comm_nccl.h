/*
 * launch/comm_nccl.h - the NCCL variant of launch/comm.h: the same collectives over DEVICE buffers, for the
 * CUDA backend.  Plain C (includable from C11 files; no CUDA or NCCL types: a stream is an opaque pointer,
 * a cudaStream_t, NULL for the default stream).  Built only with the CUDA backend (MOE_HAVE_CUDA).
 *
 * Use: comm_init, dist_setup, select this rank's GPU (one rank per GPU: NCCL refuses two ranks on one
 * device; take d.local_rank % device count, since under srun --gpus-per-task=1 every rank sees its own GPU
 * as device 0), then nccl_comm_init(&d): every rank of the world calls it; it gives d->world_g, d->ep_g
 * and d->dp_g each an NCCL communicator (the current device's).  nccl_comm_free(&d) before dist_free.
 *
 * Semantics, argument rules and return values are those of the comm_ functions of the same name.  Each call
 * queues its work on `stream` after whatever is already queued there and returns once the stream has
 * finished it (so the buffers are ready, and only one communicator has kernels in flight at a time).  While
 * waiting it polls the communicator for asynchronous errors; an NCCL or CUDA failure aborts the
 * communicator and ends the whole job (comm_abort) with the call and line named.  Counts are size_t
 * elements; all-to-all-v counts live on the host (learn the receive counts with comm_exchange_counts).
 * Time spent here is added to comm_seconds().
 */
#ifndef MOE_LAUNCH_COMM_NCCL_H
#define MOE_LAUNCH_COMM_NCCL_H

#include <stddef.h>
#include <stdint.h>

#include "launch/comm.h"

#ifdef __cplusplus
extern "C" {
#endif

int nccl_comm_init(struct dist *d);
void nccl_comm_free(struct dist *d);
/* ncclCommAbort every communicator nccl_comm_init made (on a fatal error, before ending the job). */
void nccl_comm_abort_all(void);

int nccl_allreduce(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, enum comm_op op,
		   void *stream);
/* The all-reduce queued on `stream`, not waited for; nccl_stream_wait waits for the stream (an
 * asynchronous NCCL error ends the job) and counts the wait as communication time. */
int nccl_allreduce_start(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, enum comm_op op,
			 void *stream);
int nccl_stream_wait(struct comm_group *g, void *stream);
int nccl_broadcast(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, int root, void *stream);
int nccl_allgather(struct comm_group *g, const void *send, void *recv, size_t count, enum comm_dtype t,
		   void *stream);
int nccl_reduce_scatter(struct comm_group *g, const void *send, void *recv, size_t count, enum comm_dtype t,
			enum comm_op op, void *stream);
int nccl_alltoallv(struct comm_group *g, const void *send, const int64_t *send_counts, void *recv,
		   const int64_t *recv_counts, enum comm_dtype t, void *stream);
/* Waits for `stream`, then for every rank of the group to get there. */
int nccl_barrier(struct comm_group *g, void *stream);

#ifdef __cplusplus
}
#endif

#endif
