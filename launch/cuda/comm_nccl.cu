/*
 * launch/cuda/comm_nccl.cu - launch/comm_nccl.h: the collectives of launch/comm.h over device buffers,
 * with NCCL.  Host-side plumbing (the unique id, all-to-all counts, the final barrier) goes through the MPI
 * functions of launch/comm.h.
 *
 * The three NCCL communicators of a grid sit in a small table keyed by the MPI group they shadow, so the
 * comm_group stays opaque here.  Every call waits for its stream, polling ncclCommGetAsyncError: a peer
 * that fails makes NCCL report an error here instead of this rank hanging in a kernel.
 */
#include "launch/comm_nccl.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

struct nccl_slot {
	const struct comm_group *g;
	ncclComm_t comm;
};

static struct nccl_slot slots[3]; /* world, ep, dp */

static void nccl_fail(ncclResult_t r, ncclComm_t comm, const char *call, const char *file, int line)
	__attribute__((noreturn));
static void cuda_fail(cudaError_t e, ncclComm_t comm, const char *call, const char *file, int line)
	__attribute__((noreturn));

#define NCCL_CHECK(comm, call)                                                           \
	do {                                                                             \
		ncclResult_t moe_nccl_r_ = (call);                                       \
		if (moe_nccl_r_ != ncclSuccess)                                          \
			nccl_fail(moe_nccl_r_, (comm), #call, __FILE__, __LINE__);       \
	} while (0)

static void nccl_fail(ncclResult_t r, ncclComm_t comm, const char *call, const char *file, int line)
{
	char msg[1024];
	const char *last = ncclGetLastError(comm);

	snprintf(msg, sizeof(msg), "NCCL error %d (%s%s%s)\n  in %s\n  at %s:%d", (int)r, ncclGetErrorString(r),
		 last && *last ? ": " : "", last ? last : "", call, file, line);
	if (comm)
		ncclCommAbort(comm);
	comm_abort(2, msg);
}

static void cuda_fail(cudaError_t e, ncclComm_t comm, const char *call, const char *file, int line)
{
	char msg[1024];

	snprintf(msg, sizeof(msg), "CUDA error %s (%d): %s\n  in %s\n  at %s:%d", cudaGetErrorName(e), (int)e,
		 cudaGetErrorString(e), call, file, line);
	if (comm)
		ncclCommAbort(comm);
	comm_abort(2, msg);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void report(const char *fn, const char *what)
{
	fprintf(stderr, "moe: rank %d: %s: %s\n", comm_world_rank(), fn, what);
}

static ncclComm_t lookup(const struct comm_group *g, const char *fn)
{
	for (int i = 0; i < 3; i++)
		if (slots[i].g && slots[i].g == g)
			return slots[i].comm;
	report(fn, "the group has no NCCL communicator (nccl_comm_init was not called)");
	return NULL;
}

/* Wait for the stream; an asynchronous NCCL error (a failed peer, a network error) ends the job. */
static void wait_stream(ncclComm_t comm, cudaStream_t s)
{
	for (;;) {
		cudaError_t e = cudaStreamQuery(s);
		ncclResult_t ar = ncclSuccess;

		if (e == cudaSuccess)
			return;
		if (e != cudaErrorNotReady)
			cuda_fail(e, comm, "cudaStreamQuery(stream)", __FILE__, __LINE__);
		NCCL_CHECK(comm, ncclCommGetAsyncError(comm, &ar));
		if (ar != ncclSuccess && ar != ncclInProgress)
			nccl_fail(ar, comm, "ncclCommGetAsyncError (while waiting for the stream)", __FILE__,
				  __LINE__);
		sched_yield();
	}
}

static int nccl_type(const char *fn, enum comm_dtype t, ncclDataType_t *nt)
{
	switch (t) {
	case COMM_F32:
		*nt = ncclFloat32;
		return 0;
	case COMM_F64:
		*nt = ncclFloat64;
		return 0;
	case COMM_I32:
		*nt = ncclInt32;
		return 0;
	case COMM_I64:
		*nt = ncclInt64;
		return 0;
	case COMM_BYTE:
		*nt = ncclUint8;
		return 0;
	}
	report(fn, "unknown data type");
	return -1;
}

static int nccl_op(const char *fn, enum comm_dtype t, enum comm_op op, ncclDataType_t *nt, ncclRedOp_t *no)
{
	if (nccl_type(fn, t, nt))
		return -1;
	switch (op) {
	case COMM_SUM:
		*no = ncclSum;
		return 0;
	case COMM_AVG:
		if (t != COMM_F32 && t != COMM_F64) {
			report(fn, "COMM_AVG needs a floating type");
			return -1;
		}
		*no = ncclAvg;
		return 0;
	case COMM_MAX:
		*no = ncclMax;
		return 0;
	case COMM_MIN:
		*no = ncclMin;
		return 0;
	}
	report(fn, "unknown reduction");
	return -1;
}

int nccl_comm_init(struct dist *d)
{
	ncclUniqueId id;
	ncclComm_t world, ep, dp;
	int dev, n = 0, r = 0;
	cudaError_t e = cudaGetDevice(&dev);

	if (e != cudaSuccess) {
		report("nccl_comm_init", cudaGetErrorString(e));
		return -1;
	}
	memset(&id, 0, sizeof(id));
	if (d->rank == 0)
		NCCL_CHECK(NULL, ncclGetUniqueId(&id));
	if (comm_broadcast(d->world_g, &id, sizeof(id), COMM_BYTE, 0))
		return -1;
	NCCL_CHECK(NULL, ncclCommInitRank(&world, d->world, id, d->rank));
	/* Collective over the world communicator: every rank splits, in the same order. */
	NCCL_CHECK(world, ncclCommSplit(world, d->dp_rank, d->rank, &ep, NULL));
	NCCL_CHECK(world, ncclCommSplit(world, d->ep_rank, d->rank, &dp, NULL));
	NCCL_CHECK(ep, ncclCommCount(ep, &n));
	NCCL_CHECK(ep, ncclCommUserRank(ep, &r));
	if (n != d->ep || r != d->ep_rank)
		comm_abort(1, "nccl_comm_init: the NCCL expert-parallel group disagrees with the grid");
	NCCL_CHECK(dp, ncclCommCount(dp, &n));
	NCCL_CHECK(dp, ncclCommUserRank(dp, &r));
	if (n != d->dp || r != d->dp_rank)
		comm_abort(1, "nccl_comm_init: the NCCL data-parallel group disagrees with the grid");
	slots[0] = (struct nccl_slot){ d->world_g, world };
	slots[1] = (struct nccl_slot){ d->ep_g, ep };
	slots[2] = (struct nccl_slot){ d->dp_g, dp };
	return 0;
}

void nccl_comm_free(struct dist *d)
{
	const struct comm_group *gs[3] = { d->dp_g, d->ep_g, d->world_g };

	for (int k = 0; k < 3; k++) {
		for (int i = 0; i < 3; i++) {
			if (!slots[i].g || slots[i].g != gs[k])
				continue;
			NCCL_CHECK(slots[i].comm, ncclCommFinalize(slots[i].comm));
			NCCL_CHECK(NULL, ncclCommDestroy(slots[i].comm));
			slots[i] = (struct nccl_slot){ NULL, NULL };
		}
	}
}

void nccl_comm_abort_all(void)
{
	for (int i = 0; i < 3; i++) {
		if (slots[i].comm)
			ncclCommAbort(slots[i].comm);
		slots[i] = (struct nccl_slot){ NULL, NULL };
	}
}

int nccl_allreduce_start(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, enum comm_op op,
			 void *stream)
{
	ncclComm_t c = lookup(g, "nccl_allreduce");
	ncclDataType_t nt;
	ncclRedOp_t no;

	if (!c || nccl_op("nccl_allreduce", t, op, &nt, &no))
		return -1;
	NCCL_CHECK(c, ncclAllReduce(buf, buf, count, nt, no, c, (cudaStream_t)stream));
	return 0;
}

int nccl_stream_wait(struct comm_group *g, void *stream)
{
	ncclComm_t c = lookup(g, "nccl_stream_wait");
	double t0 = now();

	if (!c)
		return -1;
	wait_stream(c, (cudaStream_t)stream);
	comm_add_seconds(now() - t0);
	return 0;
}

int nccl_allreduce(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, enum comm_op op,
		   void *stream)
{
	return nccl_allreduce_start(g, buf, count, t, op, stream) || nccl_stream_wait(g, stream) ? -1 : 0;
}

int nccl_broadcast(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, int root, void *stream)
{
	ncclComm_t c = lookup(g, "nccl_broadcast");
	cudaStream_t s = (cudaStream_t)stream;
	ncclDataType_t nt;
	double t0 = now();

	if (!c || nccl_type("nccl_broadcast", t, &nt))
		return -1;
	if (root < 0 || root >= comm_size(g)) {
		report("nccl_broadcast", "root outside the group");
		return -1;
	}
	NCCL_CHECK(c, ncclBroadcast(buf, buf, count, nt, root, c, s));
	wait_stream(c, s);
	comm_add_seconds(now() - t0);
	return 0;
}

int nccl_allgather(struct comm_group *g, const void *send, void *recv, size_t count, enum comm_dtype t,
		   void *stream)
{
	ncclComm_t c = lookup(g, "nccl_allgather");
	cudaStream_t s = (cudaStream_t)stream;
	ncclDataType_t nt;
	double t0 = now();

	if (!c || nccl_type("nccl_allgather", t, &nt))
		return -1;
	/* send == recv + rank*count is NCCL's in-place form too. */
	NCCL_CHECK(c, ncclAllGather(send, recv, count, nt, c, s));
	wait_stream(c, s);
	comm_add_seconds(now() - t0);
	return 0;
}

int nccl_reduce_scatter(struct comm_group *g, const void *send, void *recv, size_t count, enum comm_dtype t,
			enum comm_op op, void *stream)
{
	ncclComm_t c = lookup(g, "nccl_reduce_scatter");
	cudaStream_t s = (cudaStream_t)stream;
	uintptr_t s0 = (uintptr_t)send, r0 = (uintptr_t)recv;
	size_t bytes = count * comm_dtype_size(t);
	ncclDataType_t nt;
	ncclRedOp_t no;
	double t0 = now();

	if (!c || nccl_op("nccl_reduce_scatter", t, op, &nt, &no))
		return -1;
	if (count && s0 < r0 + bytes && r0 < s0 + (size_t)comm_size(g) * bytes) {
		report("nccl_reduce_scatter", "send and recv overlap");
		return -1;
	}
	NCCL_CHECK(c, ncclReduceScatter(send, recv, count, nt, no, c, s));
	wait_stream(c, s);
	comm_add_seconds(now() - t0);
	return 0;
}

int nccl_alltoallv(struct comm_group *g, const void *send, const int64_t *send_counts, void *recv,
		   const int64_t *recv_counts, enum comm_dtype t, void *stream)
{
	ncclComm_t c = lookup(g, "nccl_alltoallv");
	cudaStream_t s = (cudaStream_t)stream;
	size_t es = comm_dtype_size(t), soff = 0, roff = 0;
	int n = comm_size(g), me = comm_rank(g);
	ncclDataType_t nt;
	double t0 = now();

	if (!c || nccl_type("nccl_alltoallv", t, &nt))
		return -1;
	for (int p = 0; p < n; p++) {
		if (send_counts[p] < 0 || recv_counts[p] < 0) {
			report("nccl_alltoallv", "negative count");
			return -1;
		}
	}
	if (send_counts[me] != recv_counts[me]) {
		report("nccl_alltoallv", "this rank sends itself a different count than it receives");
		return -1;
	}
	NCCL_CHECK(c, ncclGroupStart());
	for (int p = 0; p < n; p++) {
		if (send_counts[p])
			NCCL_CHECK(c, ncclSend((const char *)send + soff * es, (size_t)send_counts[p], nt, p, c, s));
		if (recv_counts[p])
			NCCL_CHECK(c, ncclRecv((char *)recv + roff * es, (size_t)recv_counts[p], nt, p, c, s));
		soff += (size_t)send_counts[p];
		roff += (size_t)recv_counts[p];
	}
	NCCL_CHECK(c, ncclGroupEnd());
	wait_stream(c, s);
	comm_add_seconds(now() - t0);
	return 0;
}

int nccl_barrier(struct comm_group *g, void *stream)
{
	ncclComm_t c = lookup(g, "nccl_barrier");
	double t0 = now();

	if (!c)
		return -1;
	wait_stream(c, (cudaStream_t)stream);
	comm_add_seconds(now() - t0);
	return comm_barrier(g);
}
