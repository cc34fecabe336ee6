/*
 * model/moe_dispatch.h - internal to model/: moving routed tokens to the experts and back.
 *
 * Each rank sorts its (token, slot) pairs by expert (the "send order"); under expert parallelism the rows
 * for the experts of ep rank p go to p by one all-to-all, arriving source-major, and are permuted to
 * expert-major order so every local expert is one contiguous block (one BLAS call); the results travel
 * the same way back.  With all experts local (no group) the send order already is expert-major.
 */
#ifndef MOE_MODEL_MOE_DISPATCH_H
#define MOE_MODEL_MOE_DISPATCH_H

#include <stdint.h>

#include "launch/comm.h"

struct moe_dispatch {
	struct comm_group *g;     /* NULL: all experts local */
	int ep, ep_rank;
	int N, K, E, El;          /* tokens, slots per token, experts, local experts */
	int *send_row;            /* [N*K] send-order row of (token n, slot k) */
	int *send_token;          /* [N*K] token of each send row */
	int64_t *load;            /* [E] rows this rank routes to each expert */
	int64_t *next;            /* [E] scratch of the counting sort */
	int64_t *recv_counts;     /* [ep * El] rows from each source rank for each local expert */
	int64_t *peer_send, *peer_recv, *elem_send, *elem_recv; /* [ep] rows / floats per peer */
	int R;                    /* rows the local experts compute */
	int *offsets;             /* [El + 1] expert-major offsets */
	int *recv_to_expert;      /* [R] expert-major row of each received row */
	float *buf;               /* exchange buffer */
	size_t buf_cap;           /* in floats */
	int cap_R;                /* rows the caller's expert buffers hold (managed by the caller) */
};

/* Set up for N tokens (sizes fixed until the next call with other sizes). */
int dispatch_init(struct moe_dispatch *d, struct comm_group *g, int N, int K, int E, int expert_begin,
		  int expert_end);
void dispatch_free(struct moe_dispatch *d);
/* From this forward's topk_idx [N*K]: the send order, the counts exchange, R and the permutation. */
int dispatch_plan(struct moe_dispatch *d, const int *topk_idx);
/* rows [N*K, C] in send order -> rows [R, C] expert-major at the local experts */
int dispatch_to_experts(struct moe_dispatch *d, const float *send, float *expert_rows, int C);
/* rows [R, C] expert-major -> rows [N*K, C] in this rank's send order */
int dispatch_from_experts(struct moe_dispatch *d, const float *expert_rows, float *send, int C);

#endif
