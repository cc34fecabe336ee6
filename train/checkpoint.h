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
#include "optim/adamw.h"
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

/* Everything besides weights and optimizer moments that a bit-exact resume needs (/state). */
struct train_state {
	int64_t step;               /* optimizer steps done */
	int64_t tokens_seen;
	uint64_t data_position;     /* sequences consumed from the training stream */
	uint64_t data_seed;         /* the shuffle permutation's seed */
	uint64_t rng[4];            /* the run's random generator (sampling, GRPO) */
	double elapsed_s;           /* training wall time so far */
	uint64_t ref_checksum;      /* GRPO: checksum of the reference weights (0: no reference) */
};

/*
 * A training checkpoint: /model, /optim (exp_avg and exp_avg_sq per parameter under
 * /optim/NAME/exp_avg, /optim/NAME/exp_avg_sq, and the step count as /optim attribute "step"), /state
 * (the fields of train_state as attributes) and the root attributes (step and tokens_seen mirror
 * train_state).  Atomic like checkpoint_save_model.  opt may be NULL (no /optim group).
 */
int checkpoint_save(const char *path, const struct moe_model *m, const struct adamw *opt,
		    const struct run_config *cfg, const struct train_state *st, char *err, size_t errlen);

struct dist;

/*
 * checkpoint_save for a job of several ranks (launch/comm.h): called by EVERY rank, with its own slice
 * of the experts (ep_rank r holds the r-th consecutive slice; ranks with the same ep_rank hold the same
 * experts) and identical replicated tensors, optimizer step, config and state.  Writes the same file as
 * checkpoint_save of a single process holding everything.  Only expert-parallel group 0 (dp_rank 0)
 * writes: world rank 0 everything but the other ranks' experts, which those ranks then add in turn; the
 * other dp groups' copies are not read.  Atomic like checkpoint_save.  Returns 0 on every rank, or -1
 * on every rank with the same message, never a hang: that of the lowest failing rank ("rank R: ..."),
 * or, for slices that do not fit together (checked first, before anything is written), the same words
 * found by every rank.  d == NULL or a world of 1: exactly checkpoint_save.
 */
int checkpoint_save_dist(const char *path, const struct moe_model *m, const struct adamw *opt,
			 const struct run_config *cfg, const struct train_state *st, const struct dist *d,
			 char *err, size_t errlen);

/* Load weights and, when opt is not NULL, the optimizer state (a file without /optim is then refused),
 * and, when st is not NULL, /state.  All or nothing: on failure m, opt and st are unchanged. */
int checkpoint_load(const char *path, struct moe_model *m, struct adamw *opt, struct train_state *st,
		    char *err, size_t errlen);

/*
 * Streaming: a weights-only checkpoint (/model and the root attributes, the file checkpoint_save_model
 * writes) written or read one tensor, or one expert of a stacked tensor, at a time, so that a model
 * larger than memory passes through (`moe convert`).  A "piece" is a whole tensor (expert = -1) or the
 * block [expert] of a stacked one, whose shape is the tensor's without the leading expert axis.
 */

/* The parameters (names, full shapes, kinds) of a model of this config, in the model's order, each with
 * numel = its whole tensor's element count and offset 0: malloc'd, *n of them.  No weights are held. */
struct param *ckpt_model_params(const struct model_config *mc, int *n, char *err, size_t errlen);

struct ckpt_writer;

/* Create PATH.tmp.<pid> with the root attributes (config, meta; meta may be NULL) and an empty /model.
 * Returns NULL with err on failure (nothing is left behind). */
struct ckpt_writer *ckpt_writer_open(const char *path, const struct run_config *cfg,
				     const struct ckpt_meta *meta, char *err, size_t errlen);
/*
 * Write one piece of parameter `name`: shape[ndim] is the shape of data, which must be the piece's.
 * A stacked tensor's dataset is created at its full shape [E, ...] with its first piece and filled by
 * hyperslabs; pieces come in any order, each at most once.  Errors name the file and the tensor; after
 * a failed HDF5 write the writer refuses everything and can only be closed (and is not committed).
 */
int ckpt_writer_put(struct ckpt_writer *w, const char *name, const int64_t *shape, int ndim,
		    int expert, const float *data, char *err, size_t errlen);
/*
 * commit != 0: check that every piece of every parameter was written (else fail naming the first one
 * missing), flush, fsync and rename to PATH atomically, like checkpoint_save_model.  commit == 0, or any
 * failure: the temporary file is removed and PATH is untouched.  Frees w.  Returns 0 or -1 with err.
 */
int ckpt_writer_close(struct ckpt_writer *w, int commit, char *err, size_t errlen);

struct ckpt_reader;

/* Open a checkpoint for reading pieces of /model: the header is read (the config applied over *cfg
 * when cfg is not NULL, else over the defaults; meta may be NULL) and every dataset of /model checked
 * (present, float32, the config's shapes, nothing else) before any data is read. */
struct ckpt_reader *ckpt_reader_open(const char *path, struct run_config *cfg,
				     struct ckpt_meta *meta, char *err, size_t errlen);
/* The model's parameters, as from ckpt_model_params (owned by r). */
const struct param *ckpt_reader_params(const struct ckpt_reader *r, int *n);
/* One piece of parameter `name` into out (its element count), checksums verified. */
int ckpt_reader_get(struct ckpt_reader *r, const char *name, int expert, float *out, char *err,
		    size_t errlen);
void ckpt_reader_close(struct ckpt_reader *r);

/* Checkpoints of a run live in one directory as step_%08lld.h5. */
void checkpoint_path(char *out, size_t len, const char *dir, int64_t step);
/* The newest complete checkpoint in dir: 0 and its path, 1 when there is none, -1 on error. Temporary
 * files of an interrupted write are ignored. */
int checkpoint_latest(const char *dir, char *out, size_t len, char *err, size_t errlen);
/* The newest complete checkpoint in dir of a step below `before` (the next one to try when a newer one
 * is damaged): 0 with its path and step (step may be NULL), 1 when there is none, -1 on error. */
int checkpoint_before(const char *dir, int64_t before, char *out, size_t len, int64_t *step,
		      char *err, size_t errlen);
/*
 * Delete all but the newest `keep` checkpoints of steps <= upto (and stale temporary files) in dir.
 * Those of later steps are neither counted nor deleted: a run resumed past damaged newer checkpoints
 * (--resume latest) would otherwise keep them and delete the good ones it wrote since.  They are
 * left as they are until the run reaches their steps and writes over them.
 */
int checkpoint_prune(const char *dir, int keep, int64_t upto, char *err, size_t errlen);

#endif
