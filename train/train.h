/*
 * train/train.h - `moe train`: the training loop (pretraining / supervised fine-tuning).
 */
#ifndef MOE_TRAIN_TRAIN_H
#define MOE_TRAIN_TRAIN_H

#include "launch/comm.h"
#include "train/config.h"

/*
 * Train per cfg.  resume: NULL (fresh run, or train.init_checkpoint), "latest" (the newest checkpoint in
 * checkpoint.dir; a fresh run when there is none) or a checkpoint path.  Returns 0, or 1 after printing
 * an error (bad input, non-finite values with on_nonfinite=stop).  d: the ranks' (dp, ep) grid, NULL for
 * one process; every rank calls this, and a failure on any rank ends every rank's call.
 */
int train_run(const struct run_config *cfg, const char *resume, const struct dist *d);

#endif
