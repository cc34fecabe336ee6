/*
 * train/grad_sync.h - the data-parallel gradient reduction (SPEC 6).
 *
 * Each rank's backward runs with loss_scale 1/(grad_accum * world), so the gradient of the global mean
 * loss is the SUM over ranks: over the whole world for replicated tensors, over the ranks holding the same
 * experts (the dp group) for expert tensors.  Both kinds are packed into one buffer each, so a step costs
 * two all-reduces.
 */
#ifndef MOE_TRAIN_GRAD_SYNC_H
#define MOE_TRAIN_GRAD_SYNC_H

#include <stddef.h>

#include "launch/comm.h"
#include "model/model.h"

struct grad_sync {
	float *rep_buf, *exp_buf;
	size_t n_rep, n_exp;
};

int grad_sync_init(struct grad_sync *s, const struct moe_model *m);
/* Floats of the replicated (expert = 0) or the expert (expert = 1) trained tensors, packed in order. */
size_t grad_space_size(const struct moe_model *m, int expert);
/* Copy those tensors of an arena (m->grads, m->weights or a moment) to packed (to_packed) or back. */
void grad_pack(const struct moe_model *m, int expert, float *packed, float *arena, int to_packed);
void grad_sync_free(struct grad_sync *s);
/* Reduce m's gradients in place (d NULL or one rank: nothing to reduce) and return the global norm. */
double grad_sync_reduce(struct grad_sync *s, struct moe_model *m, const struct dist *d);

#endif
