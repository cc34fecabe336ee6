/*
 * train/checkpoint_int.h - what the files of the checkpoint module share (internal, no HDF5 here):
 * the context of one operation, for its messages, and the checks of the arrays that a writer or a
 * reader is handed (train/checkpoint_layout.c).
 *
 *   checkpoint.c         the file layout: tensor sets, writers, readers, streaming
 *   checkpoint_h5.c      the HDF5 helper: scopes of ids, files, attributes, groups (checkpoint_h5.h)
 *   checkpoint_layout.c  the parallel-layout checks and the failure agreement of a distributed save
 *   checkpoint_dir.c     a run's checkpoint directory: names, latest, prune
 */
#ifndef MOE_TRAIN_CHECKPOINT_INT_H
#define MOE_TRAIN_CHECKPOINT_INT_H

#include <stddef.h>
#include <stdio.h>

#include "train/checkpoint.h"

#define CKPT_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define CKPT_TMP_SUFFIX ".tmp."	/* PATH.tmp.<pid> while being written */

/* What an operation is working on, for its messages. */
struct ckctx {
	const char *path;
	const char *what;	/* dataset or attribute being handled, or NULL */
	char *err;
	size_t errlen;
};

#define CKERR(...) snprintf(c->err, c->errlen, __VA_ARGS__)

/* ---- checkpoint_layout.c ---- */

/* p's slice in this rank's arena (its experts of a stacked tensor) is p->numel floats inside it. */
int ckpt_check_local_numel(struct ckctx *c, const struct moe_model *m, const struct param *p);
/* The optimizer's arrays are laid out like the weights. */
int ckpt_check_optim_layout(struct ckctx *c, const struct moe_model *m, const struct adamw *opt);
/* A single-process writer holds every expert. */
int ckpt_check_writer_holds_all(struct ckctx *c, const struct moe_model *m);
/* Every parameter's slice and (with opt) the optimizer's layout. */
int ckpt_check_writer_arrays(struct ckctx *c, const struct moe_model *m, const struct adamw *opt);
/*
 * Collective over the world, with the same verdict (and message) on every rank: the ranks agree on the
 * grid, the experts and the optimizer state, and the writers' slices cover the experts (see the .c).
 */
int ckpt_check_dist_layout(struct ckctx *c, const struct moe_model *m, const struct adamw *opt,
			   const struct dist *d);
/*
 * Collective over the world, after every phase of a distributed save: 0 when no rank failed, else -1 on
 * every rank, each with the message of the lowest failing rank, as "rank R: MESSAGE".
 */
int ckpt_sync_failure(struct ckctx *c, const struct dist *d, int failed);

#endif
