/*
 * train/checkpoint.h - HDF5 checkpoints (SPEC 2).  The only module that includes HDF5.
 *
 *   /            attributes: format = "moe-checkpoint", format_version, step, tokens_seen, config (JSON)
 *   /model/NAME  float32 master weights, HF DeepseekV3 names and shapes (experts stacked)
 *   /optim/...   AdamW state (training issue)
 *   /state/...   loader position, RNG (training issue)
 * Datasets are chunked with the Fletcher32 checksum filter.  Files are written to a temporary name,
 * flushed, fsync'd and renamed, so a crash leaves the previous checkpoint intact.  Loading reads only this
 * rank's slice of the stacked experts (a hyperslab), so the file is independent of the parallel layout.
 */
#ifndef MOE_TRAIN_CHECKPOINT_H
#define MOE_TRAIN_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "model/model.h"
#include "train/config.h"

#define CKPT_FORMAT "moe-checkpoint"
#define CKPT_FORMAT_VERSION 1

struct ckpt_meta {
	int64_t step;
	int64_t tokens_seen;
};

/* Write the model weights (this rank's arena, holding ALL experts: single-process writer) plus metadata
 * and config to path, atomically.  Returns 0 or -1 with err. */
int checkpoint_save_model(const char *path, const struct moe_model *m, const struct run_config *cfg,
			  const struct ckpt_meta *meta, char *err, size_t errlen);

/* Read the root attributes: the config (applied over *cfg) and metadata.  Validates the format.
 * cfg or meta may be NULL. */
int checkpoint_read_header(const char *path, struct run_config *cfg, struct ckpt_meta *meta,
			   char *err, size_t errlen);

/* Load /model into m (its expert slice), checking that every parameter exists with the right shape and
 * that the checksums hold.  Nothing in m is changed unless the whole load succeeds. */
int checkpoint_load_model(const char *path, struct moe_model *m, char *err, size_t errlen);

#endif
