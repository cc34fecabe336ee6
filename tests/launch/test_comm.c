/*
 * tests/launch/test_comm.c - launch/comm.h over MPI, at whatever world size it is started with (alone, or
 * under mpirun -np 2 / 4: tests/launch/test_comm.sh does both).  Every rank runs the same collectives in
 * the same order whatever its assertions find, so a failure never turns into a hang.
 *
 *   collectives   allreduce (sum/avg/max/min; f32/f64/i32/i64), broadcast, allgather (also in place),
 *                 reduce_scatter, alltoallv with uneven and zero counts, each element naming (src, dst, i),
 *                 over the world and over both groups of the grid; again with a 2-element chunk so that
 *                 every chunked path (and the point-to-point all-to-all-v) runs
 *   grid          every ep from 1 to world + 1: sizes, ranks and membership, or the refusal
 *   NCCL          the same over device buffers, when built with CUDA and each rank has its own GPU
 *
 * Modes, for the script:
 *   MOE_COMM_TEST_FAIL=abort|kill|segv|sigabrt|exit|mpierr   rank 1 fails while rank 0 waits (never returns)
 *   MOE_COMM_TEST_LARGE=1   transfers beyond 2^31 bytes with the default chunking (about 3 GB per rank)
 */
#define _POSIX_C_SOURCE 200809L /* nanosleep */

#include "harness.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "launch/comm.h"
#ifdef MOE_HAVE_CUDA
#include "launch/comm_nccl.h"
#include "launch/cuda/device.h"
#endif

static struct dist grid;

static void grid_up(int ep)
{
	char err[256] = "";

	if (dist_setup(&grid, ep, err, sizeof(err))) {
		fprintf(stderr, "dist_setup(ep=%d): %s\n", ep, err);
		comm_abort(2, "test grid");
	}
}

/* ep = 2 where it divides the world, so the groups differ from the world and from each other. */
static int default_ep(void)
{
	return comm_world_size() % 2 ? 1 : 2;
}

static size_t tsize(enum comm_dtype t)
{
	return t == COMM_F64 || t == COMM_I64 ? 8 : t == COMM_BYTE ? 1 : 4;
}

static void put(void *b, enum comm_dtype t, size_t i, double v)
{
	switch (t) {
	case COMM_F32:
		((float *)b)[i] = (float)v;
		break;
	case COMM_F64:
		((double *)b)[i] = v;
		break;
	case COMM_I32:
		((int32_t *)b)[i] = (int32_t)v;
		break;
	case COMM_I64:
		((int64_t *)b)[i] = (int64_t)v;
		break;
	case COMM_BYTE:
		((uint8_t *)b)[i] = (uint8_t)v;
		break;
	}
}

static double get(const void *b, enum comm_dtype t, size_t i)
{
	switch (t) {
	case COMM_F32:
		return ((const float *)b)[i];
	case COMM_F64:
		return ((const double *)b)[i];
	case COMM_I32:
		return ((const int32_t *)b)[i];
	case COMM_I64:
		return (double)((const int64_t *)b)[i];
	case COMM_BYTE:
		return ((const uint8_t *)b)[i];
	}
	return 0;
}

/* What rank q of the group contributes at element i: integers, so every sum is exact in every type. */
static double val(int q, size_t i)
{
	return (double)(q + 1) * (double)(i + 1) * (i % 2 ? -1 : 1);
}

/* The reduction over n ranks of val(q, i), as the implementation computes it (AVG: sum / n in type t). */
static double reduced(enum comm_op op, enum comm_dtype t, int n, size_t i)
{
	double acc = val(0, i);

	for (int q = 1; q < n; q++) {
		double v = val(q, i);

		acc = op == COMM_MAX ? (v > acc ? v : acc) : op == COMM_MIN ? (v < acc ? v : acc) : acc + v;
	}
	if (op == COMM_AVG)
		return t == COMM_F32 ? (double)((float)acc / (float)n) : acc / n;
	return acc;
}

static const enum comm_dtype all_types[] = { COMM_F32, COMM_F64, COMM_I32, COMM_I64 };
static const enum comm_op all_ops[] = { COMM_SUM, COMM_AVG, COMM_MAX, COMM_MIN };

/* ---- backends: host buffers through comm_*, or device buffers through nccl_* ---- */

struct backend {
	int (*allreduce)(struct comm_group *, void *, size_t, enum comm_dtype, enum comm_op);
	int (*broadcast)(struct comm_group *, void *, size_t, enum comm_dtype, int);
	int (*allgather)(struct comm_group *, const void *, void *, size_t, enum comm_dtype);
	int (*reduce_scatter)(struct comm_group *, const void *, void *, size_t, enum comm_dtype, enum comm_op);
	int (*alltoallv)(struct comm_group *, const void *, const int64_t *, void *, const int64_t *,
			 enum comm_dtype);
	int (*barrier)(struct comm_group *);
	void *(*dev)(const void *host, size_t bytes); /* a device copy (NULL: host backend) */
	void (*back)(void *host, void *dev, size_t bytes); /* copy back and free */
};

static const struct backend mpi_backend = {
	comm_allreduce, comm_broadcast, comm_allgather, comm_reduce_scatter, comm_alltoallv, comm_barrier,
	NULL, NULL,
};

static const struct backend *be = &mpi_backend;

/* Run a collective on a host buffer `h` through the backend: on a device copy where there is one. */
static void *dev_in(void *h, size_t bytes)
{
	return be->dev ? be->dev(h, bytes) : h;
}

static void dev_out(void *h, void *d, size_t bytes)
{
	if (be->dev)
		be->back(h, d, bytes);
}

/* ---- the collectives ---- */

static void check_allreduce(struct comm_group *g)
{
	const size_t n = 37;
	int size = comm_size(g), me = comm_rank(g);

	for (size_t ti = 0; ti < sizeof(all_types) / sizeof(all_types[0]); ti++) {
		enum comm_dtype t = all_types[ti];

		for (size_t oi = 0; oi < sizeof(all_ops) / sizeof(all_ops[0]); oi++) {
			enum comm_op op = all_ops[oi];
			int floating = t == COMM_F32 || t == COMM_F64;
			char *buf = malloc(n * tsize(t));
			size_t bad = 0;
			void *d;
			int rc;

			if (op == COMM_AVG && !floating) {
				free(buf);
				continue;
			}
			for (size_t i = 0; i < n; i++)
				put(buf, t, i, val(me, i));
			d = dev_in(buf, n * tsize(t));
			rc = be->allreduce(g, d, n, t, op);
			dev_out(buf, d, n * tsize(t));
			CU_ASSERT_EQUAL(rc, 0);
			for (size_t i = 0; i < n; i++)
				bad += get(buf, t, i) != reduced(op, t, size, i);
			CU_ASSERT_EQUAL(bad, 0);
			if (bad)
				fprintf(stderr, "allreduce type %d op %d over %d ranks: %zu wrong\n", t, op, size, bad);
			free(buf);
		}
	}
}

static void check_broadcast(struct comm_group *g)
{
	const size_t n = 29;
	int size = comm_size(g), me = comm_rank(g);

	for (int root = 0; root < size; root++) {
		double *x = malloc(n * sizeof(*x));
		uint8_t bytes[13];
		size_t bad = 0;
		void *d;

		for (size_t i = 0; i < n; i++)
			x[i] = me == root ? root * 1000.0 + (double)i : -1;
		for (size_t i = 0; i < sizeof(bytes); i++)
			bytes[i] = me == root ? (uint8_t)(root * 7 + i) : 0xee;
		d = dev_in(x, n * sizeof(*x));
		CU_ASSERT_EQUAL(be->broadcast(g, d, n, COMM_F64, root), 0);
		dev_out(x, d, n * sizeof(*x));
		d = dev_in(bytes, sizeof(bytes));
		CU_ASSERT_EQUAL(be->broadcast(g, d, sizeof(bytes), COMM_BYTE, root), 0);
		dev_out(bytes, d, sizeof(bytes));
		for (size_t i = 0; i < n; i++)
			bad += x[i] != root * 1000.0 + (double)i;
		for (size_t i = 0; i < sizeof(bytes); i++)
			bad += bytes[i] != (uint8_t)(root * 7 + i);
		CU_ASSERT_EQUAL(bad, 0);
		free(x);
	}
}

static void check_allgather(struct comm_group *g)
{
	const size_t n = 5;
	int size = comm_size(g), me = comm_rank(g);

	for (int in_place = 0; in_place < 2; in_place++) {
		for (size_t ti = 0; ti < sizeof(all_types) / sizeof(all_types[0]); ti++) {
			enum comm_dtype t = all_types[ti];
			size_t es = tsize(t), bad = 0;
			char *send = malloc(n * es), *recv = malloc((size_t)size * n * es);
			char *dr, *ds;

			for (size_t i = 0; i < (size_t)size * n; i++)
				put(recv, t, i, -7);
			for (size_t i = 0; i < n; i++) {
				put(send, t, i, me * 100.0 + (double)i);
				if (in_place)
					put(recv, t, (size_t)me * n + i, me * 100.0 + (double)i);
			}
			dr = dev_in(recv, (size_t)size * n * es);
			ds = in_place ? dr + (size_t)me * n * es : dev_in(send, n * es);
			CU_ASSERT_EQUAL(be->allgather(g, ds, dr, n, t), 0);
			if (!in_place)
				dev_out(send, ds, n * es);
			dev_out(recv, dr, (size_t)size * n * es);
			for (int q = 0; q < size; q++)
				for (size_t i = 0; i < n; i++)
					bad += get(recv, t, (size_t)q * n + i) != q * 100.0 + (double)i;
			CU_ASSERT_EQUAL(bad, 0);
			free(send);
			free(recv);
		}
	}
}

static void check_reduce_scatter(struct comm_group *g)
{
	const size_t n = 6;
	int size = comm_size(g), me = comm_rank(g);

	for (size_t ti = 0; ti < sizeof(all_types) / sizeof(all_types[0]); ti++) {
		enum comm_dtype t = all_types[ti];

		for (size_t oi = 0; oi < sizeof(all_ops) / sizeof(all_ops[0]); oi++) {
			enum comm_op op = all_ops[oi];
			size_t es = tsize(t), bad = 0;
			char *send, *recv;
			void *ds, *dr;
			int rc;

			if (op == COMM_AVG && t != COMM_F32 && t != COMM_F64)
				continue;
			send = malloc((size_t)size * n * es);
			recv = malloc(n * es);
			/* block b of rank q: val(q, b*n + i), so rank b receives op over q of val(q, b*n + i) */
			for (int b = 0; b < size; b++)
				for (size_t i = 0; i < n; i++)
					put(send, t, (size_t)b * n + i, val(me, (size_t)b * n + i));
			ds = dev_in(send, (size_t)size * n * es);
			dr = dev_in(recv, n * es);
			rc = be->reduce_scatter(g, ds, dr, n, t, op);
			dev_out(send, ds, (size_t)size * n * es);
			dev_out(recv, dr, n * es);
			CU_ASSERT_EQUAL(rc, 0);
			for (size_t i = 0; i < n; i++)
				bad += get(recv, t, i) != reduced(op, t, size, (size_t)me * n + i);
			CU_ASSERT_EQUAL(bad, 0);
			if (bad)
				fprintf(stderr, "reduce_scatter type %d op %d over %d ranks: %zu wrong\n", t, op,
					size, bad);
			free(send);
			free(recv);
		}
	}
}

/* Element i of what rank src sends rank dst. */
static double code(int src, int dst, int64_t i)
{
	return src * 1000000.0 + dst * 1000.0 + (double)i;
}

/* How many elements rank src sends rank dst: zero for a third of the pairs, up to 8 (several chunks). */
static int64_t cnt(int src, int dst, int shift)
{
	return (src + dst + shift) % 3 * (1 + (src * 7 + dst * 3) % 4);
}

/* Rank r sends cnt(r, p) elements to peer p (zeros included); every element says where it came from,
 * where it went and its index. */
static void check_alltoallv_shift(struct comm_group *g, enum comm_dtype t, int shift, int all_zero)
{
	int size = comm_size(g), me = comm_rank(g);
	int64_t *sc = calloc((size_t)size, sizeof(*sc)), *rc = calloc((size_t)size, sizeof(*rc));
	int64_t *rc2 = calloc((size_t)size, sizeof(*rc2)), stot = 0, rtot = 0;
	size_t es = tsize(t), bad = 0, k = 0;
	char *send, *recv;
	void *ds, *dr;

	for (int p = 0; p < size; p++) {
		sc[p] = all_zero ? 0 : cnt(me, p, shift);
		rc[p] = all_zero ? 0 : cnt(p, me, shift);
		stot += sc[p];
		rtot += rc[p];
	}
	CU_ASSERT_EQUAL(comm_exchange_counts(g, sc, rc2), 0);
	CU_ASSERT_EQUAL(memcmp(rc, rc2, (size_t)size * sizeof(*rc)), 0);
	send = malloc((size_t)stot * es + 1);
	recv = malloc((size_t)rtot * es + 1);
	for (int p = 0; p < size; p++)
		for (int64_t i = 0; i < sc[p]; i++)
			put(send, t, k++, code(me, p, i));
	for (size_t i = 0; i < (size_t)rtot; i++)
		put(recv, t, i, -1);
	ds = dev_in(send, (size_t)stot * es + 1);
	dr = dev_in(recv, (size_t)rtot * es + 1);
	CU_ASSERT_EQUAL(be->alltoallv(g, ds, sc, dr, rc, t), 0);
	dev_out(send, ds, (size_t)stot * es + 1);
	dev_out(recv, dr, (size_t)rtot * es + 1);
	k = 0;
	for (int p = 0; p < size; p++)
		for (int64_t i = 0; i < rc[p]; i++)
			bad += get(recv, t, k++) != code(p, me, i);
	CU_ASSERT_EQUAL(bad, 0);
	if (bad)
		fprintf(stderr, "alltoallv type %d shift %d over %d ranks: %zu wrong\n", t, shift, size, bad);
	free(send);
	free(recv);
	free(sc);
	free(rc);
	free(rc2);
}

static void check_alltoallv(struct comm_group *g)
{
	for (int shift = 0; shift < 3; shift++) {
		check_alltoallv_shift(g, COMM_I64, shift, 0);
		check_alltoallv_shift(g, COMM_F64, shift, 0);
	}
	check_alltoallv_shift(g, COMM_I64, 0, 1);
}

/* Argument errors: refused with -1 (and a message) before anything is sent, on every rank alike. */
static void test_refusals(void)
{
	int64_t *c, x = 1;
	double y[8] = { 0 };
	int size;

	grid_up(1);
	size = comm_size(grid.world_g);
	c = calloc((size_t)size, sizeof(*c));
	fprintf(stderr, "(four refusals follow, on purpose)\n");
	CU_ASSERT_EQUAL(comm_allreduce(grid.world_g, &x, 1, COMM_I64, COMM_AVG), -1);
	CU_ASSERT_EQUAL(comm_broadcast(grid.world_g, y, 1, COMM_F64, size), -1);
	CU_ASSERT_EQUAL(comm_reduce_scatter(grid.world_g, y, y, 1, COMM_F64, COMM_SUM), -1);
	c[0] = -1;
	CU_ASSERT_EQUAL(comm_alltoallv(grid.world_g, NULL, c, NULL, c, COMM_F32), -1);
	CU_ASSERT_EQUAL(comm_barrier(grid.world_g), 0);
	free(c);
	dist_free(&grid);
}

static void each_group(void (*check)(struct comm_group *))
{
	grid_up(default_ep());
	check(grid.world_g);
	check(grid.ep_g);
	check(grid.dp_g);
	CU_ASSERT_EQUAL(be->barrier(grid.world_g), 0);
	dist_free(&grid);
}

static void test_allreduce(void)
{
	each_group(check_allreduce);
}

static void test_broadcast(void)
{
	each_group(check_broadcast);
}

static void test_allgather(void)
{
	each_group(check_allgather);
}

static void test_reduce_scatter(void)
{
	each_group(check_reduce_scatter);
}

static void test_alltoallv(void)
{
	each_group(check_alltoallv);
}

/* The same with a 2-element chunk: chunked loops, strided allgather, per-root reduce_scatter, and the
 * point-to-point all-to-all-v. */
static void chunked(void (*check)(struct comm_group *))
{
	comm_set_chunk(2);
	each_group(check);
	comm_set_chunk(0);
}

static void test_allreduce_chunked(void)
{
	chunked(check_allreduce);
}

static void test_broadcast_chunked(void)
{
	chunked(check_broadcast);
}

static void test_allgather_chunked(void)
{
	chunked(check_allgather);
}

static void test_reduce_scatter_chunked(void)
{
	chunked(check_reduce_scatter);
}

static void test_alltoallv_chunked(void)
{
	chunked(check_alltoallv);
}

/* ---- the grid ---- */

static void test_grid(void)
{
	int w = comm_world_size(), r = comm_world_rank();

	CU_ASSERT(r >= 0 && r < w);
	for (int ep = 0; ep <= w + 1; ep++) {
		char err[256] = "", want[256];
		struct dist d;

		if (ep < 1 || w % ep) {
			CU_ASSERT_EQUAL(dist_setup(&d, ep, err, sizeof(err)), -1);
			if (ep >= 1)
				snprintf(want, sizeof(want), "parallel.ep=%d does not divide the world size %d", ep, w);
			else
				snprintf(want, sizeof(want), "parallel.ep=%d must be at least 1", ep);
			CU_ASSERT_STRING_EQUAL(err, want);
			continue;
		}
		CU_ASSERT_EQUAL_FATAL(dist_setup(&d, ep, err, sizeof(err)), 0);
		int dp = w / ep, er = r % ep, dr = r / ep;

		CU_ASSERT_EQUAL(d.rank, r);
		CU_ASSERT_EQUAL(d.world, w);
		CU_ASSERT_EQUAL(d.ep, ep);
		CU_ASSERT_EQUAL(d.dp, dp);
		CU_ASSERT_EQUAL(d.ep_rank, er);
		CU_ASSERT_EQUAL(d.dp_rank, dr);
		CU_ASSERT_EQUAL(d.rank, d.dp_rank * d.ep + d.ep_rank);
		CU_ASSERT(d.local_rank >= 0 && d.local_rank < d.local_size && d.local_size <= w);
		CU_ASSERT_EQUAL(comm_size(d.world_g), w);
		CU_ASSERT_EQUAL(comm_rank(d.world_g), r);
		CU_ASSERT_EQUAL(comm_size(d.ep_g), ep);
		CU_ASSERT_EQUAL(comm_rank(d.ep_g), er);
		CU_ASSERT_EQUAL(comm_size(d.dp_g), dp);
		CU_ASSERT_EQUAL(comm_rank(d.dp_g), dr);

		/* membership: sums of the world ranks, and the members in order */
		int64_t s = r, *who = calloc((size_t)w, sizeof(*who));

		CU_ASSERT_EQUAL(comm_allreduce(d.ep_g, &s, 1, COMM_I64, COMM_SUM), 0);
		CU_ASSERT_EQUAL(s, (int64_t)dr * ep * ep + (int64_t)ep * (ep - 1) / 2);
		s = r;
		CU_ASSERT_EQUAL(comm_allreduce(d.dp_g, &s, 1, COMM_I64, COMM_SUM), 0);
		CU_ASSERT_EQUAL(s, (int64_t)ep * dp * (dp - 1) / 2 + (int64_t)dp * er);
		s = r;
		CU_ASSERT_EQUAL(comm_allreduce(d.world_g, &s, 1, COMM_I64, COMM_SUM), 0);
		CU_ASSERT_EQUAL(s, (int64_t)w * (w - 1) / 2);
		s = r;
		CU_ASSERT_EQUAL(comm_allgather(d.ep_g, &s, who, 1, COMM_I64), 0);
		for (int j = 0; j < ep; j++)
			CU_ASSERT_EQUAL(who[j], (int64_t)dr * ep + j);
		CU_ASSERT_EQUAL(comm_allgather(d.dp_g, &s, who, 1, COMM_I64), 0);
		for (int j = 0; j < dp; j++)
			CU_ASSERT_EQUAL(who[j], (int64_t)j * ep + er);
		free(who);
		dist_free(&d);
		CU_ASSERT_PTR_NULL(d.world_g);
	}
}

/* The example of the brief, at world 4: ep=3 is refused with the message. */
static void test_ep3_refused(void)
{
	char err[256] = "";
	struct dist d;

	if (comm_world_size() % 3 == 0)
		return;
	CU_ASSERT_EQUAL(dist_setup(&d, 3, err, sizeof(err)), -1);
	if (comm_world_size() == 4)
		CU_ASSERT_STRING_EQUAL(err, "parallel.ep=3 does not divide the world size 4");
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "parallel.ep=3 does not divide the world size"));
}

static void test_seconds(void)
{
	double x = 1;

	grid_up(1);
	comm_reset_seconds();
	CU_ASSERT_EQUAL(comm_seconds(), 0);
	CU_ASSERT_EQUAL(comm_barrier(grid.world_g), 0);
	CU_ASSERT_EQUAL(comm_allreduce(grid.world_g, &x, 1, COMM_F64, COMM_SUM), 0);
	CU_ASSERT(comm_seconds() > 0);
	CU_ASSERT(comm_seconds() < 60);
	comm_add_seconds(1);
	CU_ASSERT(comm_seconds() > 1);
	comm_reset_seconds();
	CU_ASSERT_EQUAL(comm_seconds(), 0);
	dist_free(&grid);
}

/* ---- NCCL (device buffers) ---- */

#ifdef MOE_HAVE_CUDA
static void *stream;

static int n_allreduce(struct comm_group *g, void *b, size_t n, enum comm_dtype t, enum comm_op op)
{
	return nccl_allreduce(g, b, n, t, op, stream);
}

static int n_broadcast(struct comm_group *g, void *b, size_t n, enum comm_dtype t, int root)
{
	return nccl_broadcast(g, b, n, t, root, stream);
}

static int n_allgather(struct comm_group *g, const void *s, void *r, size_t n, enum comm_dtype t)
{
	return nccl_allgather(g, s, r, n, t, stream);
}

static int n_reduce_scatter(struct comm_group *g, const void *s, void *r, size_t n, enum comm_dtype t,
			    enum comm_op op)
{
	return nccl_reduce_scatter(g, s, r, n, t, op, stream);
}

static int n_alltoallv(struct comm_group *g, const void *s, const int64_t *sc, void *r, const int64_t *rc,
		       enum comm_dtype t)
{
	return nccl_alltoallv(g, s, sc, r, rc, t, stream);
}

static int n_barrier(struct comm_group *g)
{
	return nccl_barrier(g, stream);
}

static void *n_dev(const void *h, size_t bytes)
{
	void *d = moe_cuda_malloc(bytes);

	moe_cuda_memcpy_h2d(d, h, bytes);
	return d;
}

static void n_back(void *h, void *d, size_t bytes)
{
	moe_cuda_memcpy_d2h(h, d, bytes);
	moe_cuda_free(d);
}

static const struct backend nccl_backend = {
	n_allreduce, n_broadcast, n_allgather, n_reduce_scatter, n_alltoallv, n_barrier, n_dev, n_back,
};

static void nccl_each_group(void (*check)(struct comm_group *))
{
	grid_up(default_ep());
	CU_ASSERT_EQUAL_FATAL(nccl_comm_init(&grid), 0);
	be = &nccl_backend;
	check(grid.world_g);
	check(grid.ep_g);
	check(grid.dp_g);
	CU_ASSERT_EQUAL(be->barrier(grid.world_g), 0);
	be = &mpi_backend;
	nccl_comm_free(&grid);
	dist_free(&grid);
}

static void test_nccl(void)
{
	stream = moe_cuda_stream();
	nccl_each_group(check_allreduce);
	nccl_each_group(check_broadcast);
	nccl_each_group(check_allgather);
	nccl_each_group(check_reduce_scatter);
	nccl_each_group(check_alltoallv);
}

/* One GPU per rank on this node, or the NCCL suite is skipped (on every rank alike). */
static int nccl_usable(void)
{
	int ok, devices = moe_cuda_device_count();
	struct dist d;

	grid_up(1);
	d = grid;
	ok = devices >= d.local_size;
	if (comm_allreduce(d.world_g, &ok, 1, COMM_I32, COMM_MIN))
		comm_abort(2, "nccl_usable: allreduce");
	dist_free(&grid);
	if (ok && moe_cuda_init(d.local_rank % devices))
		comm_abort(2, "moe_cuda_init failed");
	return ok;
}
#endif

/* ---- large transfers (MOE_COMM_TEST_LARGE=1) ---- */

static uint8_t pattern(size_t i, int salt)
{
	return (uint8_t)((i * 131u) ^ (i >> 13) ^ (unsigned)salt);
}

static size_t bad_bytes(const uint8_t *b, size_t n, int salt, size_t from)
{
	size_t bad = 0;

	for (size_t i = 0; i < n; i++)
		bad += b[i] != pattern(from + i, salt);
	return bad;
}

static void test_large_broadcast(void)
{
	size_t n = ((size_t)1 << 31) + 7;
	uint8_t *b = malloc(n);

	CU_ASSERT_PTR_NOT_NULL_FATAL(b);
	grid_up(1);
	for (size_t i = 0; i < n; i++)
		b[i] = grid.rank == 0 ? pattern(i, 1) : 0;
	CU_ASSERT_EQUAL(comm_broadcast(grid.world_g, b, n, COMM_BYTE, 0), 0);
	CU_ASSERT_EQUAL(bad_bytes(b, n, 1, 0), 0);
	dist_free(&grid);
	free(b);
}

static void test_large_alltoallv(void)
{
	size_t n = ((size_t)1 << 31) + 3;
	int w, r;
	int64_t *sc, *rc;
	uint8_t *b;

	grid_up(1);
	w = grid.world;
	r = grid.rank;
	sc = calloc((size_t)w, sizeof(*sc));
	rc = calloc((size_t)w, sizeof(*rc));
	/* rank 0 sends 2^31 + 3 bytes to the last rank (to itself at world 1) */
	if (r == 0)
		sc[w - 1] = (int64_t)n;
	if (r == w - 1)
		rc[0] = (int64_t)n;
	b = malloc(n);
	CU_ASSERT_PTR_NOT_NULL_FATAL(b);
	if (r == 0) {
		for (size_t i = 0; i < n; i++)
			b[i] = pattern(i, 2);
	}
	if (w == 1) {
		uint8_t *out = malloc(n);

		CU_ASSERT_PTR_NOT_NULL_FATAL(out);
		CU_ASSERT_EQUAL(comm_alltoallv(grid.world_g, b, sc, out, rc, COMM_BYTE), 0);
		CU_ASSERT_EQUAL(bad_bytes(out, n, 2, 0), 0);
		free(out);
	} else {
		uint8_t none[1];

		if (r == w - 1)
			memset(b, 0, n);
		CU_ASSERT_EQUAL(comm_alltoallv(grid.world_g, r == 0 ? b : none, sc, r == w - 1 ? b : none, rc,
					       COMM_BYTE), 0);
		if (r == w - 1)
			CU_ASSERT_EQUAL(bad_bytes(b, n, 2, 0), 0);
	}
	free(b);
	free(sc);
	free(rc);
	dist_free(&grid);
}

static void test_large_allgather(void)
{
	size_t n = ((size_t)1 << 30) + 5, bad = 0;
	uint8_t *recv;
	int w;

	grid_up(1);
	w = grid.world;
	recv = malloc((size_t)w * n);
	CU_ASSERT_PTR_NOT_NULL_FATAL(recv);
	for (size_t i = 0; i < n; i++)
		recv[(size_t)grid.rank * n + i] = pattern(i, 10 + grid.rank);
	CU_ASSERT_EQUAL(comm_allgather(grid.world_g, recv + (size_t)grid.rank * n, recv, n, COMM_BYTE), 0);
	for (int q = 0; q < w; q++)
		bad += bad_bytes(recv + (size_t)q * n, n, 10 + q, 0);
	CU_ASSERT_EQUAL(bad, 0);
	free(recv);
	dist_free(&grid);
}

/* ---- failing ranks (MOE_COMM_TEST_FAIL) ---- */

static void __attribute__((noreturn)) fail_mode(const char *mode)
{
	int r = comm_world_rank();

	grid_up(1);
	if (r == 1) {
		struct timespec ts = { 0, 300 * 1000 * 1000 };

		nanosleep(&ts, NULL); /* let rank 0 block first */
		fprintf(stderr, "rank 1: failing (%s)\n", mode);
		if (!strcmp(mode, "abort"))
			comm_abort(3, "failing on purpose (MOE_COMM_TEST_FAIL=abort)");
		if (!strcmp(mode, "kill"))
			raise(SIGKILL);
		if (!strcmp(mode, "segv"))
			raise(SIGSEGV);
		if (!strcmp(mode, "sigabrt"))
			abort();
		if (!strcmp(mode, "exit"))
			_exit(3); /* without MPI_Finalize (exit() would run it and wait for rank 0) */
	}
	if (!strcmp(mode, "mpierr")) {
		/* every rank sends 4 elements to every peer, but rank 0 expects 1 from rank 1: truncated */
		int w = grid.world;
		int64_t *sc = calloc((size_t)w, sizeof(*sc)), *rc = calloc((size_t)w, sizeof(*rc));
		double *s = calloc(4 * (size_t)w, sizeof(*s)), *rv = calloc(4 * (size_t)w, sizeof(*rv));

		for (int p = 0; p < w; p++)
			sc[p] = rc[p] = 4;
		if (r == 0 && w > 1)
			rc[1] = 1;
		comm_alltoallv(grid.world_g, s, sc, rv, rc, COMM_F64);
		comm_barrier(grid.world_g);
	} else {
		comm_barrier(grid.world_g);
	}
	/* Not reached when the job is torn down; if it were, hang so the script's timeout notices. */
	fprintf(stderr, "rank %d: the collective returned\n", r);
	sleep(120);
	exit(0);
}

void register_tests(void)
{
	static const struct test_case collectives[] = {
		{ "allreduce sum/avg/max/min f32/f64/i32/i64", test_allreduce },
		{ "broadcast from every root", test_broadcast },
		{ "allgather, also in place", test_allgather },
		{ "reduce_scatter", test_reduce_scatter },
		{ "alltoallv, uneven and zero counts", test_alltoallv },
		{ "allreduce, 2-element chunks", test_allreduce_chunked },
		{ "broadcast, 2-element chunks", test_broadcast_chunked },
		{ "allgather, 2-element chunks", test_allgather_chunked },
		{ "reduce_scatter, 2-element chunks", test_reduce_scatter_chunked },
		{ "alltoallv, point to point in 2-element chunks", test_alltoallv_chunked },
		{ "comm_seconds", test_seconds },
		{ "argument errors refused", test_refusals },
		{ NULL, NULL },
	};
	static const struct test_case grid_cases[] = {
		{ "(dp, ep) grid for every ep", test_grid },
		{ "ep=3 refused", test_ep3_refused },
		{ NULL, NULL },
	};
	static const struct test_case large[] = {
		{ "broadcast of 2^31 + 7 bytes", test_large_broadcast },
		{ "alltoallv of 2^31 + 3 bytes to one peer", test_large_alltoallv },
		{ "allgather of 2^30 + 5 bytes per rank, in place", test_large_allgather },
		{ NULL, NULL },
	};
	const char *fail = getenv("MOE_COMM_TEST_FAIL");
	const char *big = getenv("MOE_COMM_TEST_LARGE");

	if (comm_init(NULL, NULL))
		exit(2);
	atexit(comm_finalize);
	if (fail && *fail)
		fail_mode(fail);
	if (big && *big && strcmp(big, "0")) {
		add_suite("comm_large", large);
		return;
	}
	add_suite("comm_grid", grid_cases);
	add_suite("comm_mpi", collectives);
#ifdef MOE_HAVE_CUDA
	if (nccl_usable()) {
		static const struct test_case nccl[] = {
			{ "NCCL collectives over device buffers", test_nccl },
			{ NULL, NULL },
		};
		add_suite("comm_nccl", nccl);
	} else if (comm_world_rank() == 0) {
		printf("comm_nccl: skipped (needs one GPU per rank on the node)\n");
	}
#endif
}
