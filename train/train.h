/*
 * train/train.h - `moe train`: the training loop (pretraining / supervised fine-tuning).
 */
#ifndef MOE_TRAIN_TRAIN_H
#define MOE_TRAIN_TRAIN_H

#include "train/config.h"

/*
 * Train per cfg.  resume: NULL (fresh run, or train.init_checkpoint), "latest" (the newest checkpoint in
 * checkpoint.dir; a fresh run when there is none) or a checkpoint path.  Returns 0, or 1 after printing
 * an error (bad input, non-finite values with on_nonfinite=stop).
 */
int train_run(const struct run_config *cfg, const char *resume);

#endif
