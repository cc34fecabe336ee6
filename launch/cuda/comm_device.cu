/*
 * launch/cuda/comm_device.cu - launch/cuda/comm_device.h: the device collectives, NCCL or host-staged MPI.
 *
 * The staged path keeps two pinned host buffers (grown, never shrunk): the device data is copied into
 * one on the backend's stream, the stream is waited for, the MPI collective of launch/comm.h runs on the
 * host buffers, and the result is copied back and waited for.  Pinned memory makes the copies DMA at
 * full PCIe speed and lets them run asynchronously to the host.
 *
 * NCCL is compiled in where the build has it (MOE_HAVE_NCCL, set by CMakeLists.txt for the CUDA backend);
 * the CPU emulator (tests/gpu/emu) builds this file without it, so only the staged path exists there.
 */
#include "launch/cuda/comm_device.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <unistd.h>

#include "launch/cuda/cuda_common.cuh"
#include "launch/cuda/device.h"
#ifdef MOE_HAVE_NCCL
#include "launch/comm_nccl.h"
#endif

namespace {

enum dcomm_kind g_kind = DCOMM_NONE;
#ifdef MOE_HAVE_NCCL
/* dcomm_allreduce_start's stream (NCCL only): the reductions it queues run beside the backend's stream */
cudaStream_t g_side;
cudaEvent_t g_side_ready;
#endif

struct pinned {
	void *p;
	size_t cap;
};

pinned g_send, g_recv;

void *pinned_get(pinned *b, size_t bytes)
{
	if (bytes <= b->cap && b->p)
		return b->p;
	if (b->p)
		CUDA_CHECK(cudaFreeHost(b->p));
	size_t cap = bytes + bytes / 4 + 4096;  /* headroom: the all-to-all sizes drift from step to step */
	CUDA_CHECK(cudaMallocHost(&b->p, cap));
	b->cap = cap;
	return b->p;
}

/* the staging copies count as communication time (comm_seconds), like the MPI calls they serve */
void copy_timed(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind)
{
	if (!bytes)
		return;
	auto t0 = std::chrono::steady_clock::now();
	CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, moe_cuda::stream()));
	CUDA_CHECK(cudaStreamSynchronize(moe_cuda::stream()));
	comm_add_seconds(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

void d2h(void *dst, const void *src, size_t bytes)
{
	copy_timed(dst, src, bytes, cudaMemcpyDeviceToHost);
}

void h2d(void *dst, const void *src, size_t bytes)
{
	copy_timed(dst, src, bytes, cudaMemcpyHostToDevice);
}

int64_t sum_counts(const int64_t *c, int n)
{
	int64_t s = 0;
	for (int p = 0; p < n; p++)
		s += c[p] > 0 ? c[p] : 0;
	return s;
}

/* ---- the host-staged transport ---- */

int staged_allreduce(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, enum comm_op op)
{
	size_t bytes = count * comm_dtype_size(t);
	void *h = pinned_get(&g_send, bytes);
	d2h(h, buf, bytes);
	if (comm_allreduce(g, h, count, t, op))
		return -1;
	h2d(buf, h, bytes);
	return 0;
}

int staged_broadcast(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, int root)
{
	size_t bytes = count * comm_dtype_size(t);
	void *h = pinned_get(&g_send, bytes);
	if (comm_rank(g) == root)
		d2h(h, buf, bytes);
	if (comm_broadcast(g, h, count, t, root))
		return -1;
	if (comm_rank(g) != root)
		h2d(buf, h, bytes);
	return 0;
}

int staged_allgather(struct comm_group *g, const void *send, void *recv, size_t count, enum comm_dtype t)
{
	size_t es = comm_dtype_size(t), bytes = count * es;
	char *r = (char *)pinned_get(&g_recv, bytes * comm_size(g));
	char *mine = r + (size_t)comm_rank(g) * bytes;
	d2h(mine, send, bytes);  /* in place on the host too: send == recv + rank * count is allowed */
	if (comm_allgather(g, mine, r, count, t))
		return -1;
	h2d(recv, r, bytes * comm_size(g));
	return 0;
}

int staged_reduce_scatter(struct comm_group *g, const void *send, void *recv, size_t count, enum comm_dtype t,
			  enum comm_op op)
{
	size_t es = comm_dtype_size(t), bytes = count * es;
	void *s = pinned_get(&g_send, bytes * comm_size(g));
	void *r = pinned_get(&g_recv, bytes);
	d2h(s, send, bytes * comm_size(g));
	if (comm_reduce_scatter(g, s, r, count, t, op))
		return -1;
	h2d(recv, r, bytes);
	return 0;
}

int staged_alltoallv(struct comm_group *g, const void *send, const int64_t *send_counts, void *recv,
		     const int64_t *recv_counts, enum comm_dtype t)
{
	size_t es = comm_dtype_size(t);
	size_t sb = (size_t)sum_counts(send_counts, comm_size(g)) * es;
	size_t rb = (size_t)sum_counts(recv_counts, comm_size(g)) * es;
	void *s = pinned_get(&g_send, sb);
	void *r = pinned_get(&g_recv, rb);
	d2h(s, send, sb);
	if (comm_alltoallv(g, s, send_counts, r, recv_counts, t))
		return -1;
	h2d(recv, r, rb);
	return 0;
}

/* ---- choosing ---- */

/* every rank's "host|pci bus id": any two equal means two ranks share a GPU */
constexpr size_t kIdLen = 160;

int count_sharing(const struct dist *d, char *first, size_t flen)
{
	char id[kIdLen] = "", host[64] = "", name[96] = "", pci[32] = "";
	gethostname(host, sizeof(host) - 1);
	moe_cuda_describe(name, sizeof(name), pci, sizeof(pci));
	snprintf(id, sizeof(id), "%s|%s", host, pci);
	char *all = (char *)calloc((size_t)d->world, kIdLen);
	if (!all)
		comm_abort(1, "dcomm_init: out of memory");
	if (comm_allgather(d->world_g, id, all, kIdLen, COMM_BYTE))
		comm_abort(1, "dcomm_init: all-gather of the GPU placement failed");
	int shared = 0;
	for (int i = 0; i < d->world; i++) {
		for (int j = 0; j < i; j++) {
			if (strncmp(all + (size_t)i * kIdLen, all + (size_t)j * kIdLen, kIdLen))
				continue;
			if (!shared++)
				snprintf(first, flen, "ranks %d and %d share GPU %s", j, i, all + (size_t)i * kIdLen);
			break;
		}
	}
	free(all);
	return shared;
}

/* a failed CUDA check on this rank: its NCCL peers would wait in their kernels, its MPI peers in MPI */
void dcomm_fatal(void)
{
#ifdef MOE_HAVE_NCCL
	if (g_kind == DCOMM_NCCL)
		nccl_comm_abort_all();
#endif
	comm_abort(2, "a CUDA call failed (above): ending the job");
}

} /* namespace */

extern "C" {

int dcomm_init(const struct dist *d, const char *mode, char *err, size_t errlen)
{
	char why[256] = "";
	if (!mode || !*mode)
		mode = "auto";
	if (strcmp(mode, "auto") && strcmp(mode, "nccl") && strcmp(mode, "mpi")) {
		snprintf(err, errlen, "parallel.comm=%s: expected auto, nccl or mpi", mode);
		return -1;
	}
	int world = d ? d->world : 1;
	int shared = d && world > 1 ? count_sharing(d, why, sizeof(why)) : 0;
#ifdef MOE_HAVE_NCCL
	const int have_nccl = 1;
#else
	const int have_nccl = 0;
#endif
	if (!strcmp(mode, "nccl") && !have_nccl) {
		snprintf(err, errlen, "parallel.comm=nccl: this build has no NCCL (use parallel.comm=mpi or auto)");
		return -1;
	}
	if (!strcmp(mode, "nccl") && shared) {
		snprintf(err, errlen, "parallel.comm=nccl: %s (NCCL needs one GPU per rank; parallel.comm=mpi "
			 "stages the collectives through the host)", why);
		return -1;
	}
	const char *reason;
	if (!strcmp(mode, "mpi")) {
		g_kind = DCOMM_MPI;
		reason = "parallel.comm=mpi";
	} else if (!strcmp(mode, "nccl")) {
		g_kind = DCOMM_NCCL;
		reason = "parallel.comm=nccl";
	} else if (world == 1) {
		g_kind = DCOMM_MPI;  /* nothing to exchange: set nothing up */
		reason = "parallel.comm=auto, one process";
	} else if (!have_nccl) {
		g_kind = DCOMM_MPI;
		reason = "parallel.comm=auto, this build has no NCCL";
	} else if (shared) {
		g_kind = DCOMM_MPI;
		reason = why;
	} else {
		g_kind = DCOMM_NCCL;
		reason = "parallel.comm=auto, every rank on its own GPU";
	}
#ifdef MOE_HAVE_NCCL
	if (g_kind == DCOMM_NCCL && nccl_comm_init((struct dist *)d)) {
		snprintf(err, errlen, "parallel.comm: NCCL could not be initialised (see above)");
		return -1;
	}
#endif
	if (d && world > 1)
		moe_cuda_set_fatal_hook(dcomm_fatal);
	if ((!d || d->rank == 0) && world == 1 && !strcmp(mode, "auto")) {
		printf("moe: device collectives: none needed (one process)\n");
		fflush(stdout);
	} else if (!d || d->rank == 0) {
		printf("moe: device collectives: %s (%s)\n", g_kind == DCOMM_NCCL ? "nccl" : "mpi, host-staged",
		       reason);
		fflush(stdout);
	}
	return 0;
}

void dcomm_free(const struct dist *d)
{
#ifdef MOE_HAVE_NCCL
	if (g_kind == DCOMM_NCCL && d)
		nccl_comm_free((struct dist *)d);
#else
	(void)d;
#endif
	if (g_send.p)
		CUDA_CHECK(cudaFreeHost(g_send.p));
	if (g_recv.p)
		CUDA_CHECK(cudaFreeHost(g_recv.p));
	g_send = pinned{ nullptr, 0 };
	g_recv = pinned{ nullptr, 0 };
#ifdef MOE_HAVE_NCCL
	if (g_side) {
		CUDA_CHECK(cudaEventDestroy(g_side_ready));
		CUDA_CHECK(cudaStreamDestroy(g_side));
		g_side = nullptr;
	}
#endif
	g_kind = DCOMM_NONE;
	moe_cuda_set_fatal_hook(nullptr);
}

enum dcomm_kind dcomm_kind(void) { return g_kind; }

const char *dcomm_name(void)
{
	return g_kind == DCOMM_NCCL ? "nccl" : g_kind == DCOMM_MPI ? "mpi" : "none";
}

#ifdef MOE_HAVE_NCCL
#define DCOMM_NCCL_OR(call) \
	if (g_kind == DCOMM_NCCL) \
		return call
#else
#define DCOMM_NCCL_OR(call)
#endif

int dcomm_allreduce(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, enum comm_op op)
{
	DCOMM_NCCL_OR(nccl_allreduce(g, buf, count, t, op, moe_cuda_stream()));
	return staged_allreduce(g, buf, count, t, op);
}

int dcomm_overlaps(void) { return g_kind == DCOMM_NCCL; }

int dcomm_allreduce_start(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, enum comm_op op)
{
#ifdef MOE_HAVE_NCCL
	if (g_kind == DCOMM_NCCL) {
		if (!g_side) {
			CUDA_CHECK(cudaStreamCreateWithFlags(&g_side, cudaStreamNonBlocking));
			CUDA_CHECK(cudaEventCreateWithFlags(&g_side_ready, cudaEventDisableTiming));
		}
		/* after what the backend's stream has queued so far (the packing of buf), not after what follows */
		CUDA_CHECK(cudaEventRecord(g_side_ready, moe_cuda::stream()));
		CUDA_CHECK(cudaStreamWaitEvent(g_side, g_side_ready, 0));
		return nccl_allreduce_start(g, buf, count, t, op, g_side);
	}
#endif
	return staged_allreduce(g, buf, count, t, op);
}

int dcomm_wait(struct comm_group *g)
{
#ifdef MOE_HAVE_NCCL
	if (g_kind == DCOMM_NCCL && g_side)
		return nccl_stream_wait(g, g_side);
#endif
	(void)g;
	return 0;
}

int dcomm_broadcast(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, int root)
{
	DCOMM_NCCL_OR(nccl_broadcast(g, buf, count, t, root, moe_cuda_stream()));
	return staged_broadcast(g, buf, count, t, root);
}

int dcomm_allgather(struct comm_group *g, const void *send, void *recv, size_t count, enum comm_dtype t)
{
	DCOMM_NCCL_OR(nccl_allgather(g, send, recv, count, t, moe_cuda_stream()));
	return staged_allgather(g, send, recv, count, t);
}

int dcomm_reduce_scatter(struct comm_group *g, const void *send, void *recv, size_t count, enum comm_dtype t,
			 enum comm_op op)
{
	DCOMM_NCCL_OR(nccl_reduce_scatter(g, send, recv, count, t, op, moe_cuda_stream()));
	return staged_reduce_scatter(g, send, recv, count, t, op);
}

int dcomm_alltoallv(struct comm_group *g, const void *send, const int64_t *send_counts, void *recv,
		    const int64_t *recv_counts, enum comm_dtype t)
{
	DCOMM_NCCL_OR(nccl_alltoallv(g, send, send_counts, recv, recv_counts, t, moe_cuda_stream()));
	return staged_alltoallv(g, send, send_counts, recv, recv_counts, t);
}

} /* extern "C" */
