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

/* A run of consecutive parameters (index order) reduced as one message: its floats in the packed
 * replicated and expert spaces, and the backward's layer after which all its gradients are complete. */
struct grad_bucket {
	int p_begin, p_end;         /* params [p_begin, p_end) */
	int ready;                  /* complete once the backward has done layer `ready` (-1: the embedding) */
	size_t rep_off, rep_n, exp_off, exp_n;
};

struct grad_sync {
	float *rep_buf, *exp_buf;
	size_t n_rep, n_exp;
	float *d_rep, *d_exp;       /* the GPU path's device buckets (grad_sync_reduce_device), or NULL */
	/* the overlapped reduction (grad_sync_overlap_arm): buckets of about bucket_mb, the top one first */
	struct grad_bucket *buckets;
	int n_buckets;
	int armed, launched;        /* armed for this backward; buckets started so far */
	const struct moe_model *om; /* what the armed reduction works on */
	float *odgrads;
	const struct dist *od;
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

/*
 * The same reduction overlapped with the backward (data parallelism without expert parallelism, whose
 * all-to-alls share the backward's stream): cut the packed spaces into buckets of about bucket_mb MiB
 * (grad_bucket_plan; 0 buckets where the parameter order does not allow it), then before the LAST
 * micro-batch's backward call grad_sync_overlap_arm and, from the model's grads-ready callback,
 * grad_sync_layer_done(s, l): each bucket is packed and its all-reduce started as soon as its layers are
 * done (with NCCL it travels on a second stream while the backward goes on; the staged MPI path reduces
 * it there and then).  grad_sync_reduce_device then waits for them, unpacks and returns the norm: the
 * same numbers as without buckets.  arm returns 0 when it armed, -1 when the reduction stays at the end.
 */
int grad_bucket_plan(struct grad_sync *s, const struct moe_model *m, double bucket_mb);
int grad_sync_overlap_arm(struct grad_sync *s, const struct moe_model *m, float *dgrads, const struct dist *d);
void grad_sync_layer_done(struct grad_sync *s, int layer);

#endif
