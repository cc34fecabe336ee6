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
	float *d_rep, *d_exp;       /* the GPU path's device buckets (grad_sync_reduce_device), or NULL */
};

int grad_sync_init(struct grad_sync *s, const struct moe_model *m);
/* Floats of the replicated (expert = 0) or the expert (expert = 1) trained tensors, packed in order. */
size_t grad_space_size(const struct moe_model *m, int expert);
/* Copy those tensors of an arena (m->grads, m->weights or a moment) to packed (to_packed) or back. */
void grad_pack(const struct moe_model *m, int expert, float *packed, float *arena, int to_packed);
void grad_sync_free(struct grad_sync *s);
/* Reduce m's gradients in place (d NULL or one rank: nothing to reduce) and return the global norm. */
double grad_sync_reduce(struct grad_sync *s, struct moe_model *m, const struct dist *d);

/*
 * The GPU path (built with MOE_HAVE_CUDA): the same reduction over m's DEVICE gradient arena dgrads (the
 * layout of m->grads) with the device collectives (launch/cuda/comm_device.h): the replicated and the
 * expert tensors are packed on the device into one bucket each, all-reduced (world / dp group) and
 * unpacked; the norm is summed on the device, the experts' squares over the ep group.  Returns the global
 * norm.  The buckets are allocated at the first call, freed by grad_sync_free.
 */
double grad_sync_reduce_device(struct grad_sync *s, const struct moe_model *m, float *dgrads,
			       const struct dist *d);
/* Copy those tensors between a DEVICE arena and a DEVICE packed buffer (queued on the stream). */
void grad_pack_device(const struct moe_model *m, int expert, float *packed, float *arena, int to_packed);

#endif
