/*
 * train/zero.h - ZeRO stage 1 (parallel.zero=1): the AdamW state sharded over the data-parallel ranks.
 *
 * The gradients of the replicated tensors are reduce-scattered over the world and those of the expert
 * tensors over the ranks holding the same experts; each rank updates its shard of the weights with its
 * shard of the AdamW moments, and the shards are all-gathered back.  Optimizer memory falls by the
 * number of ranks sharing each tensor; the update is the same elementwise AdamW, so results match
 * parallel.zero=0 up to the summation order of the gradient norm.
 */
#ifndef MOE_TRAIN_ZERO_H
#define MOE_TRAIN_ZERO_H

#include <stdbool.h>
#include <stddef.h>

#include "launch/comm.h"
#include "model/model.h"
#include "optim/adamw.h"

struct zero_space {                 /* the replicated or the expert tensors, packed */
	struct comm_group *g;       /* the ranks sharing them */
	int size, rank;
	size_t n, n_pad, shard;     /* packed floats, padded to size * shard */
	float *grad, *weight;       /* [n_pad] */
};

struct zero_device;

struct zero {
	struct zero_space rep, exp;
	struct comm_group *ep_g;    /* the expert space differs across it (NULL: ep = 1) */
	struct adamw opt;           /* over [rep shard | exp shard] */
	struct optim_segment *segs;
	int nsegs;
	float *shard_w, *shard_g;   /* [rep shard | exp shard] */
	struct zero_device *dev;    /* the GPU path's device copies (zero_device_init), or NULL */
};

int zero_init(struct zero *z, const struct moe_model *m, const struct dist *d, float weight_decay,
	      bool decay_embeddings);
void zero_free(struct zero *z);
/* Reduce-scatter m's gradients into the shards; returns the global gradient norm. */
double zero_reduce(struct zero *z, const struct moe_model *m);
/* Clip the shard gradients by factor, update the shards, all-gather the weights back into m. */
void zero_update(struct zero *z, struct moe_model *m, float clip_factor, const struct adamw_hparams *h);
/* The full AdamW state in m's arena layout (every rank gets all of it, for checkpoints) ... */
int zero_gather_state(struct zero *z, const struct moe_model *m, struct adamw *full);
/* ... and back: take this rank's shard of a full state (after loading a checkpoint). */
void zero_scatter_state(struct zero *z, const struct moe_model *m, const struct adamw *full);

/*
 * The GPU path (built with MOE_HAVE_CUDA): the same ZeRO-1 over the DEVICE arenas of the GPU model, with
 * the device collectives (launch/cuda/comm_device.h).  The shards' AdamW moments live on the device
 * (AdamW over the shard by optim/cuda, with the host's shard segments); z->opt stays the host copy that
 * checkpoints go through (zero_device_download_state before zero_gather_state; zero_device_init uploads
 * it, after zero_scatter_state).
 */
int zero_device_init(struct zero *z);
void zero_device_free(struct zero *z);
double zero_device_reduce(struct zero *z, const struct moe_model *m, float *dgrads);
void zero_device_update(struct zero *z, const struct moe_model *m, float *dweights, float clip_factor,
			const struct adamw_hparams *h);
void zero_device_download_state(struct zero *z);

#endif
