/*
 * train/eval.h - evaluation loss over a token shard read in order.
 */
#ifndef MOE_TRAIN_EVAL_H
#define MOE_TRAIN_EVAL_H

#include <stdint.h>

#include "data/shard.h"
#include "model/model.h"

/*
 * Mean cross-entropy over the shard read as consecutive sequences of T tokens: sequence i has inputs
 * tokens [i*T, i*T+T) and targets shifted by one, so n_seq = (n_tokens - 1) / T sequences; B sequences per
 * forward (the last batch may be smaller).  max_seqs > 0 stops after that many sequences.
 * Returns 0 and fills *loss and *tokens (the number of predicted tokens), or -1 when the shard holds
 * no complete sequence.
 */
int eval_shard(struct moe_model *m, const struct shard *s, int T, int B, int64_t max_seqs, double *loss,
	       int64_t *tokens);

#endif
