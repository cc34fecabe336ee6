/*
 * data/loader.h - the training data: all shards matching a glob, cut into sequences of T+1 tokens
 * (inputs [i*T, i*T+T), targets shifted by one; a sequence never crosses a shard boundary), addressed by
 * one global sequence index.  In order (data.shuffle=false) the global batch at step s is sequences
 * s*G .. s*G+G-1; shuffled, each epoch visits the sequences in a permutation drawn from (seed, epoch).
 * The loader's whole state is (seed, position): the checkpoint records both.
 */
#ifndef MOE_DATA_LOADER_H
#define MOE_DATA_LOADER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "data/shard.h"

struct loader {
	int n_shards;
	struct shard *shards;   /* sorted by path */
	uint64_t *first_seq;    /* [n_shards + 1]: global index of each shard's first sequence */
	uint64_t n_seqs;        /* sequences in one epoch */
	int T;
	bool shuffle;
	uint64_t seed;
	uint64_t perm_epoch;    /* epoch the permutation below belongs to */
	uint64_t *perm;         /* [n_seqs] when shuffling */
};

/* Open every shard matching pattern (glob(3)); each is validated (token ids < vocab_size).  No match,
 * or no complete sequence in any shard, is an error naming the pattern. */
int loader_open(struct loader *l, const char *pattern, int T, int vocab_size, bool shuffle, uint64_t seed,
		char *err, size_t errlen);
void loader_close(struct loader *l);

/* The k-th sequence of the stream (k counts from 0 across epochs: epoch = k / n_seqs): T inputs and T
 * targets. */
void loader_get(struct loader *l, uint64_t k, int *inputs, int *targets);

#endif
