/*
 * launch/comm.h - processes, the (dp, ep) grid and the collectives the rest of moe uses (SPEC 6).
 *
 * World size W = dp * ep.  Ranks [g*ep, (g+1)*ep) form expert-parallel group g (they exchange tokens by
 * all-to-all); ranks with the same ep_rank across the dp groups hold the same experts (their expert
 * gradients are reduced together).  Only launch/ includes MPI or NCCL headers: everything else sees the
 * opaque groups below.  Two implementations sit behind this interface: MPI (host buffers, the CPU
 * backend) and NCCL (device buffers, the CUDA backend).
 *
 * Every collective returns 0, or -1 with the reason printed; a failure anywhere ends the whole job
 * (comm_abort), never hangs it.
 */
#ifndef MOE_LAUNCH_COMM_H
#define MOE_LAUNCH_COMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct comm_group;

enum comm_dtype { COMM_F32, COMM_F64, COMM_I32, COMM_I64, COMM_BYTE };
enum comm_op { COMM_SUM, COMM_AVG, COMM_MAX, COMM_MIN };

struct dist {
	int rank, world;            /* in MPI_COMM_WORLD */
	int local_rank, local_size; /* on this node (shared-memory communicator) */
	int dp, ep;                 /* grid sizes: world = dp * ep */
	int dp_rank, ep_rank;       /* rank = dp_rank * ep + ep_rank */
	struct comm_group *world_g; /* all ranks */
	struct comm_group *ep_g;    /* my expert-parallel group (size ep), ordered by ep_rank */
	struct comm_group *dp_g;    /* the ranks holding my experts (size dp), ordered by dp_rank */
};

/* Start MPI (a single process needs no mpirun), read rank/world/local rank.  Call once, first. */
int comm_init(int *argc, char ***argv);
/* Build the (dp, ep) grid over the world; error (naming parallel.ep) when ep does not divide it. */
int dist_setup(struct dist *d, int ep, char *err, size_t errlen);
void dist_free(struct dist *d);
void comm_finalize(void);
/* End every rank of the job now, with this rank's message on stderr. */
void comm_abort(int code, const char *msg) __attribute__((noreturn));

/* Bytes of one element of t. */
size_t comm_dtype_size(enum comm_dtype t);

int comm_world_rank(void);
int comm_world_size(void);
int comm_size(const struct comm_group *g);
int comm_rank(const struct comm_group *g);

/* In place over a group.  COMM_AVG is defined for floating types only. */
int comm_allreduce(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, enum comm_op op);
int comm_broadcast(struct comm_group *g, void *buf, size_t count, enum comm_dtype t, int root);
/* recv[r*count ..] = rank r's send[0..count) */
int comm_allgather(struct comm_group *g, const void *send, void *recv, size_t count, enum comm_dtype t);
/* recv[0..count) = op over ranks of their send[rank*count ..]; send and recv must not overlap.
 * In comm_allgather, send == recv + rank*count (in place) is allowed. */
int comm_reduce_scatter(struct comm_group *g, const void *send, void *recv, size_t count,
			enum comm_dtype t, enum comm_op op);
/* Per-peer counts (in elements; zero allowed); displacements are the prefix sums of the counts. */
int comm_alltoallv(struct comm_group *g, const void *send, const int64_t *send_counts, void *recv,
		   const int64_t *recv_counts, enum comm_dtype t);
/* recv_counts[p] = peer p's send_counts[my rank]: what comm_alltoallv will deliver from each peer. */
int comm_exchange_counts(struct comm_group *g, const int64_t *send_counts, int64_t *recv_counts);
int comm_barrier(struct comm_group *g);

/* Seconds spent inside collectives since the last reset (for the communication share in benchmarks). */
double comm_seconds(void);
void comm_reset_seconds(void);
/* Add time spent in collectives outside this file (the NCCL variant). */
void comm_add_seconds(double s);

/*
 * Counts are size_t / int64_t everywhere; MPI takes int.  Transfers larger than the chunk (default:
 * 1 GiB worth of elements, never more than INT_MAX) are split into several MPI calls.  Tests set a tiny
 * chunk to exercise that path; 0 restores the default.  Every rank must use the same value.
 */
void comm_set_chunk(size_t elems);

#ifdef __cplusplus
}
#endif

#endif
