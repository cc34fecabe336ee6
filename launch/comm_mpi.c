/*
 * launch/comm_mpi.c - launch/comm.h over MPI: host buffers, the CPU backend (and the host side of the NCCL
 * variant: its unique id and the all-to-all counts travel here).
 *
 * Every MPI call goes through MPI_CHECK: MPI_COMM_WORLD and every communicator made from it return errors
 * (MPI_ERRORS_RETURN) instead of aborting inside the library, and a failed call ends the whole job through
 * comm_abort with the call and line named.  Argument errors (a negative count, COMM_AVG on integers) are
 * found before anything is sent and returned as -1 with the reason printed.
 *
 * MPI counts are int.  Transfers are cut into chunks of at most chunk_elems() elements (1 GiB worth by
 * default): plain loops for allreduce and broadcast, a resized derived type for allgather, one chunked
 * reduction per root for reduce_scatter, and point-to-point messages for an all-to-all-v whose counts or
 * displacements do not fit.
 */
#include "launch/comm.h"

#include <limits.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct comm_group {
	MPI_Comm comm;
	int rank, size;
};

static int world_rank, world_size = 1;
static int local_rank, local_size = 1;
static int we_initialized;   /* MPI_Init_thread was ours, so is MPI_Finalize */
static double comm_time;     /* seconds inside collectives */
static size_t chunk_override; /* elements per MPI call; 0 = by bytes */

#define CHUNK_BYTES ((size_t)1 << 30)
#define P2P_TAG 4242

static void mpi_fail(int rc, const char *call, const char *file, int line) __attribute__((noreturn));

#define MPI_CHECK(call)                                                          \
	do {                                                                     \
		int moe_mpi_rc_ = (call);                                        \
		if (moe_mpi_rc_ != MPI_SUCCESS)                                  \
			mpi_fail(moe_mpi_rc_, #call, __FILE__, __LINE__);        \
	} while (0)

static void mpi_fail(int rc, const char *call, const char *file, int line)
{
	char es[MPI_MAX_ERROR_STRING] = "";
	char msg[MPI_MAX_ERROR_STRING + 512];
	int len = 0;

	MPI_Error_string(rc, es, &len);
	snprintf(msg, sizeof(msg), "MPI error %d (%s)\n  in %s\n  at %s:%d", rc, es, call, file, line);
	comm_abort(2, msg);
}

void comm_abort(int code, const char *msg)
{
	int up = 0, down = 0;

	fflush(stdout);
	fprintf(stderr, "moe: rank %d: %s\n", world_rank, msg);
	fflush(stderr);
	if (code == 0)
		code = 1;
	MPI_Initialized(&up);
	MPI_Finalized(&down);
	if (up && !down)
		MPI_Abort(MPI_COMM_WORLD, code);
	exit(code);
}

static void report(const char *fn, const char *what)
{
	fprintf(stderr, "moe: rank %d: %s: %s\n", world_rank, fn, what);
}

int comm_init(int *argc, char ***argv)
{
	MPI_Comm node;
	int up = 0, provided = 0;

	MPI_Initialized(&up);
	if (!up) {
		int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);

		if (rc != MPI_SUCCESS) {
			fprintf(stderr, "moe: MPI_Init_thread failed (error %d)\n", rc);
			return -1;
		}
		we_initialized = 1;
	}
	MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
	MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank));
	MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &world_size));
	MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_rank, MPI_INFO_NULL,
				      &node));
	MPI_CHECK(MPI_Comm_rank(node, &local_rank));
	MPI_CHECK(MPI_Comm_size(node, &local_size));
	MPI_CHECK(MPI_Comm_free(&node));
	return 0;
}

void comm_finalize(void)
{
	int up = 0, down = 0;

	MPI_Initialized(&up);
	MPI_Finalized(&down);
	if (up && !down && we_initialized)
		MPI_Finalize();
}

int comm_world_rank(void)
{
	return world_rank;
}

int comm_world_size(void)
{
	return world_size;
}

int comm_size(const struct comm_group *g)
{
	return g->size;
}

int comm_rank(const struct comm_group *g)
{
	return g->rank;
}

double comm_seconds(void)
{
	return comm_time;
}

void comm_reset_seconds(void)
{
	comm_time = 0;
}

void comm_add_seconds(double s)
{
	comm_time += s;
}

void comm_set_chunk(size_t elems)
{
	chunk_override = elems;
}

/* ---- the (dp, ep) grid ---- */

static struct comm_group *group_new(MPI_Comm c)
{
	struct comm_group *g = calloc(1, sizeof(*g));

	if (!g)
		comm_abort(1, "out of memory creating a communicator");
	g->comm = c;
	MPI_CHECK(MPI_Comm_set_errhandler(c, MPI_ERRORS_RETURN));
	MPI_CHECK(MPI_Comm_rank(c, &g->rank));
	MPI_CHECK(MPI_Comm_size(c, &g->size));
	return g;
}

static void group_free(struct comm_group **g)
{
	if (!*g)
		return;
	MPI_CHECK(MPI_Comm_free(&(*g)->comm));
	free(*g);
	*g = NULL;
}

int dist_setup(struct dist *d, int ep, char *err, size_t errlen)
{
	MPI_Comm w, e, p;
	int up = 0;

	memset(d, 0, sizeof(*d));
	if (!err || !errlen) {
		static char dummy[256];

		err = dummy;
		errlen = sizeof(dummy);
	}
	MPI_Initialized(&up);
	if (!up) {
		snprintf(err, errlen, "comm_init was not called");
		return -1;
	}
	if (ep < 1) {
		snprintf(err, errlen, "parallel.ep=%d must be at least 1", ep);
		return -1;
	}
	if (world_size % ep) {
		snprintf(err, errlen, "parallel.ep=%d does not divide the world size %d", ep, world_size);
		return -1;
	}
	d->rank = world_rank;
	d->world = world_size;
	d->local_rank = local_rank;
	d->local_size = local_size;
	d->ep = ep;
	d->dp = world_size / ep;
	d->ep_rank = world_rank % ep;
	d->dp_rank = world_rank / ep;
	/* The same order on every rank: these are collective over the world. */
	MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &w));
	MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, d->dp_rank, world_rank, &e));
	MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, d->ep_rank, world_rank, &p));
	d->world_g = group_new(w);
	d->ep_g = group_new(e);
	d->dp_g = group_new(p);
	if (d->ep_g->size != d->ep || d->ep_g->rank != d->ep_rank || d->dp_g->size != d->dp ||
	    d->dp_g->rank != d->dp_rank)
		comm_abort(1, "dist_setup: the split communicators disagree with the (dp, ep) grid");
	return 0;
}

void dist_free(struct dist *d)
{
	group_free(&d->dp_g);
	group_free(&d->ep_g);
	group_free(&d->world_g);
}

/* ---- types, operations, chunks ---- */

static MPI_Datatype mpi_type(enum comm_dtype t)
{
	switch (t) {
	case COMM_F32:
		return MPI_FLOAT;
	case COMM_F64:
		return MPI_DOUBLE;
	case COMM_I32:
		return MPI_INT32_T;
	case COMM_I64:
		return MPI_INT64_T;
	case COMM_BYTE:
		return MPI_UINT8_T;
	}
	return MPI_DATATYPE_NULL;
}

size_t comm_dtype_size(enum comm_dtype t)
{
	switch (t) {
	case COMM_F32:
	case COMM_I32:
		return 4;
	case COMM_F64:
	case COMM_I64:
		return 8;
	case COMM_BYTE:
		return 1;
	}
	return 0;
}

static MPI_Op mpi_op(enum comm_op op)
{
	switch (op) {
	case COMM_SUM:
	case COMM_AVG:
		return MPI_SUM;
	case COMM_MAX:
		return MPI_MAX;
	case COMM_MIN:
		return MPI_MIN;
	}
	return MPI_OP_NULL;
}

static int check_type(const char *fn, enum comm_dtype t)
{
	if (comm_dtype_size(t))
		return 0;
	report(fn, "unknown data type");
	return -1;
}

static int check_op(const char *fn, enum comm_dtype t, enum comm_op op)
{
	if (check_type(fn, t))
		return -1;
	if (mpi_op(op) == MPI_OP_NULL) {
		report(fn, "unknown reduction");
		return -1;
	}
	if (op == COMM_AVG && t != COMM_F32 && t != COMM_F64) {
		report(fn, "COMM_AVG needs a floating type");
		return -1;
	}
	return 0;
}

/* Elements one MPI call may carry. */
static size_t chunk_elems(enum comm_dtype t)
{
	size_t n = chunk_override ? chunk_override : CHUNK_BYTES / comm_dtype_size(t);

	return n < (size_t)INT_MAX ? n : (size_t)INT_MAX;
}

static size_t min_sz(size_t a, size_t b)
{
	return a < b ? a : b;
}

/* COMM_AVG: the sum, divided by the group size. */
static void divide(void *buf, size_t count, enum comm_dtype t, int size)
{
	if (t == COMM_F32) {
		float *p = buf, s = (float)size;

		for (size_t i = 0; i < count; i++)
			p[i] /= s;
	} else if (t == COMM_F64) {
		double *p = buf, s = (double)size;

		for (size_t i = 0; i < count; i++)
			p[i] /= s;
	}
}

/* ---- collectives ---- */

int comm_allreduce(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, enum comm_op op)
{
	size_t es = comm_dtype_size(t), lim = chunk_elems(t);
	double t0;

	if (check_op("comm_allreduce", t, op))
		return -1;
	t0 = MPI_Wtime();
	for (size_t off = 0; off < count; off += lim) {
		size_t n = min_sz(lim, count - off);

		MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, (char *)buf + off * es, (int)n, mpi_type(t),
					mpi_op(op), g->comm));
	}
	if (op == COMM_AVG)
		divide(buf, count, t, g->size);
	comm_time += MPI_Wtime() - t0;
	return 0;
}

int comm_broadcast(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, int root)
{
	size_t es = comm_dtype_size(t), lim = chunk_elems(t);
	double t0;

	if (check_type("comm_broadcast", t))
		return -1;
	if (root < 0 || root >= g->size) {
		report("comm_broadcast", "root outside the group");
		return -1;
	}
	t0 = MPI_Wtime();
	for (size_t off = 0; off < count; off += lim) {
		size_t n = min_sz(lim, count - off);

		MPI_CHECK(MPI_Bcast((char *)buf + off * es, (int)n, mpi_type(t), root, g->comm));
	}
	comm_time += MPI_Wtime() - t0;
	return 0;
}

int comm_allgather(struct comm_group *g, const void *send, void *recv, size_t count, enum comm_dtype t)
{
	size_t es = comm_dtype_size(t), lim = chunk_elems(t), step;
	MPI_Datatype mt = mpi_type(t);
	char *r = recv;
	int in_place;
	double t0;

	if (check_type("comm_allgather", t))
		return -1;
	if (!count)
		return 0;
	in_place = send == r + (size_t)g->rank * count * es;
	t0 = MPI_Wtime();
	step = lim / (size_t)g->size;
	if (count <= step) {
		MPI_CHECK(MPI_Allgather(in_place ? MPI_IN_PLACE : send, (int)count, mt, recv, (int)count, mt,
					g->comm));
		comm_time += MPI_Wtime() - t0;
		return 0;
	}
	/* Chunk [off, off+n) of every rank's block at once: n elements received with a stride of count. */
	if (!step)
		step = 1;
	for (size_t off = 0; off < count; off += step) {
		size_t n = min_sz(step, count - off);
		const void *s = in_place ? MPI_IN_PLACE : (const void *)((const char *)send + off * es);
		MPI_Datatype blk, strided;

		MPI_CHECK(MPI_Type_contiguous((int)n, mt, &blk));
		MPI_CHECK(MPI_Type_create_resized(blk, 0, (MPI_Aint)(count * es), &strided));
		MPI_CHECK(MPI_Type_commit(&strided));
		MPI_CHECK(MPI_Allgather(s, (int)n, mt, r + off * es, 1, strided, g->comm));
		MPI_CHECK(MPI_Type_free(&strided));
		MPI_CHECK(MPI_Type_free(&blk));
	}
	comm_time += MPI_Wtime() - t0;
	return 0;
}

int comm_reduce_scatter(struct comm_group *g, const void *send, void *recv, size_t count,
			enum comm_dtype t, enum comm_op op)
{
	size_t es = comm_dtype_size(t), lim = chunk_elems(t);
	uintptr_t s0 = (uintptr_t)send, r0 = (uintptr_t)recv;
	double t0;

	if (check_op("comm_reduce_scatter", t, op))
		return -1;
	if (!count)
		return 0;
	if (s0 < r0 + count * es && r0 < s0 + (size_t)g->size * count * es) {
		report("comm_reduce_scatter", "send and recv overlap");
		return -1;
	}
	t0 = MPI_Wtime();
	if (count <= lim / (size_t)g->size) {
		MPI_CHECK(MPI_Reduce_scatter_block(send, recv, (int)count, mpi_type(t), mpi_op(op), g->comm));
	} else {
		/* One chunked reduction to each rank of its block. */
		for (int root = 0; root < g->size; root++) {
			for (size_t off = 0; off < count; off += lim) {
				size_t n = min_sz(lim, count - off);
				const char *s = (const char *)send + ((size_t)root * count + off) * es;
				void *d = root == g->rank ? (char *)recv + off * es : NULL;

				MPI_CHECK(MPI_Reduce(s, d, (int)n, mpi_type(t), mpi_op(op), root, g->comm));
			}
		}
	}
	if (op == COMM_AVG)
		divide(recv, count, t, g->size);
	comm_time += MPI_Wtime() - t0;
	return 0;
}

int comm_exchange_counts(struct comm_group *g, const int64_t *send_counts, int64_t *recv_counts)
{
	double t0 = MPI_Wtime();

	MPI_CHECK(MPI_Alltoall(send_counts, 1, MPI_INT64_T, recv_counts, 1, MPI_INT64_T, g->comm));
	comm_time += MPI_Wtime() - t0;
	return 0;
}

/* Counts or displacements beyond one MPI call: chunked point-to-point messages, one stream per peer. */
static void alltoallv_p2p(struct comm_group *g, const char *send, const int64_t *send_counts, char *recv,
			  const int64_t *recv_counts, enum comm_dtype t, size_t lim)
{
	size_t es = comm_dtype_size(t), nreq = 0, k = 0;
	size_t *soff = calloc((size_t)g->size * 2, sizeof(*soff)), *roff = soff + g->size;
	MPI_Request *req;

	if (!soff)
		comm_abort(1, "comm_alltoallv: out of memory");
	for (int p = 0; p < g->size; p++) {
		soff[p] = p ? soff[p - 1] + (size_t)send_counts[p - 1] : 0;
		roff[p] = p ? roff[p - 1] + (size_t)recv_counts[p - 1] : 0;
		if (p != g->rank)
			nreq += ((size_t)send_counts[p] + lim - 1) / lim + ((size_t)recv_counts[p] + lim - 1) / lim;
	}
	req = malloc((nreq ? nreq : 1) * sizeof(*req));
	if (!req)
		comm_abort(1, "comm_alltoallv: out of memory");
	/* Receives first, then sends, each peer in turn starting after this rank (spreads the load). */
	for (int i = 1; i < g->size; i++) {
		int p = (g->rank + g->size - i) % g->size;

		for (size_t off = 0; off < (size_t)recv_counts[p]; off += lim) {
			size_t n = min_sz(lim, (size_t)recv_counts[p] - off);

			MPI_CHECK(MPI_Irecv(recv + (roff[p] + off) * es, (int)n, mpi_type(t), p, P2P_TAG, g->comm,
					    &req[k++]));
		}
	}
	for (int i = 1; i < g->size; i++) {
		int p = (g->rank + i) % g->size;

		for (size_t off = 0; off < (size_t)send_counts[p]; off += lim) {
			size_t n = min_sz(lim, (size_t)send_counts[p] - off);

			MPI_CHECK(MPI_Isend(send + (soff[p] + off) * es, (int)n, mpi_type(t), p, P2P_TAG, g->comm,
					    &req[k++]));
		}
	}
	if (send_counts[g->rank])
		memcpy(recv + roff[g->rank] * es, send + soff[g->rank] * es, (size_t)send_counts[g->rank] * es);
	MPI_CHECK(MPI_Waitall((int)k, req, MPI_STATUSES_IGNORE));
	free(req);
	free(soff);
}

int comm_alltoallv(struct comm_group *g, const void *send, const int64_t *send_counts, void *recv,
		   const int64_t *recv_counts, enum comm_dtype t)
{
	size_t lim = chunk_elems(t);
	int64_t stot = 0, rtot = 0;
	int big, *c;
	double t0;

	if (check_type("comm_alltoallv", t))
		return -1;
	for (int p = 0; p < g->size; p++) {
		if (send_counts[p] < 0 || recv_counts[p] < 0) {
			report("comm_alltoallv", "negative count");
			return -1;
		}
		stot += send_counts[p];
		rtot += recv_counts[p];
	}
	if (send_counts[g->rank] != recv_counts[g->rank]) {
		report("comm_alltoallv", "this rank sends itself a different count than it receives");
		return -1;
	}
	t0 = MPI_Wtime();
	/* Every rank must take the same path: agree on whether anyone's totals exceed one call. */
	big = (uint64_t)stot > lim || (uint64_t)rtot > lim;
	MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &big, 1, MPI_INT, MPI_MAX, g->comm));
	if (big) {
		alltoallv_p2p(g, send, send_counts, recv, recv_counts, t, lim);
		comm_time += MPI_Wtime() - t0;
		return 0;
	}
	c = malloc(4 * (size_t)g->size * sizeof(*c));
	if (!c)
		comm_abort(1, "comm_alltoallv: out of memory");
	int *sc = c, *sd = c + g->size, *rc = c + 2 * g->size, *rd = c + 3 * g->size;

	for (int p = 0; p < g->size; p++) {
		sc[p] = (int)send_counts[p];
		rc[p] = (int)recv_counts[p];
		sd[p] = p ? sd[p - 1] + sc[p - 1] : 0;
		rd[p] = p ? rd[p - 1] + rc[p - 1] : 0;
	}
	MPI_CHECK(MPI_Alltoallv(send, sc, sd, mpi_type(t), recv, rc, rd, mpi_type(t), g->comm));
	free(c);
	comm_time += MPI_Wtime() - t0;
	return 0;
}

int comm_barrier(struct comm_group *g)
{
	double t0 = MPI_Wtime();

	MPI_CHECK(MPI_Barrier(g->comm));
	comm_time += MPI_Wtime() - t0;
	return 0;
}
