/*
 * data/loader.c - the training data stream: every shard matching a glob, cut into sequences of T+1
 * tokens, addressed by one global sequence index k (epoch = k / n_seqs).
 *
 * Shard s contributes floor((n_tokens - 1) / T) sequences; its sequence i reads inputs
 * [i*T, i*T+T) and targets [i*T+1, i*T+T+1), so no sequence crosses a shard boundary.  Shuffled, the
 * order within epoch e is a Fisher-Yates permutation driven by a counter-based generator keyed by
 * (seed, e): any epoch's order is recomputed from those two numbers alone, which is what lets a resumed
 * run (seed and position from the checkpoint) continue exactly where it stopped.
 */
#define _POSIX_C_SOURCE 200809L

#include "data/loader.h"

#include <errno.h>
#include <glob.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launch/rng.h"

#define EPOCH_MIX 0xd6e8feb86659fd93ULL	/* odd: spreads epochs across the key space */

/* ---- permutation ---- */

/* Counter-based stream: draw i is mix(key + (i + 1) * gamma); key depends only on (seed, epoch). */
struct perm_rng {
	uint64_t key;
	uint64_t ctr;
};

static uint64_t perm_rng_next(struct perm_rng *r)
{
	r->ctr++;
	return mix64(r->key + r->ctr * RNG_GOLDEN_GAMMA);
}

/* Uniform in [0, n), n >= 1, without modulo bias. */
static uint64_t perm_rng_below(struct perm_rng *r, uint64_t n)
{
	uint64_t threshold = (0 - n) % n;	/* 2^64 mod n */
	uint64_t x;

	do
		x = perm_rng_next(r);
	while (x < threshold);
	return x % n;
}

static void build_perm(struct loader *l, uint64_t epoch)
{
	struct perm_rng r = {
		.key = mix64(l->seed ^ (epoch * EPOCH_MIX)),
		.ctr = 0,
	};
	uint64_t *p = l->perm;

	for (uint64_t i = 0; i < l->n_seqs; i++)
		p[i] = i;
	for (uint64_t i = l->n_seqs; i > 1; i--) {
		uint64_t j = perm_rng_below(&r, i);
		uint64_t t = p[i - 1];

		p[i - 1] = p[j];
		p[j] = t;
	}
	l->perm_epoch = epoch;
}

/* ---- open / close ---- */

static uint64_t shard_seqs(const struct shard *s, int T)
{
	return s->n_tokens < 1 ? 0 : (s->n_tokens - 1) / (uint64_t)T;
}

void loader_close(struct loader *l)
{
	if (l->shards) {
		for (int i = 0; i < l->n_shards; i++)
			shard_close(&l->shards[i]);
	}
	free(l->shards);
	free(l->first_seq);
	free(l->perm);
	memset(l, 0, sizeof(*l));
}

static int glob_shards(glob_t *g, const char *pattern, char *err, size_t errlen)
{
	int rc = glob(pattern, GLOB_ERR, NULL, g);

	switch (rc) {
	case 0:
		break;
	case GLOB_NOMATCH:
		snprintf(err, errlen, "no shard matches '%s'", pattern);
		return -1;
	case GLOB_ABORTED:
		snprintf(err, errlen, "'%s': read error while expanding the pattern: %s", pattern,
			 strerror(errno));
		return -1;
	default:
		snprintf(err, errlen, "'%s': out of memory expanding the pattern", pattern);
		return -1;
	}
	if (g->gl_pathc > (size_t)INT_MAX) {
		snprintf(err, errlen, "'%s': %zu shards match, too many", pattern, g->gl_pathc);
		return -1;
	}
	return 0;
}

int loader_open(struct loader *l, const char *pattern, int T, int vocab_size, bool shuffle, uint64_t seed,
		char *err, size_t errlen)
{
	glob_t g;
	int n;

	memset(l, 0, sizeof(*l));
	l->T = T;
	l->shuffle = shuffle;
	l->seed = seed;
	if (T <= 0) {
		snprintf(err, errlen, "'%s': sequence length %d must be positive", pattern, T);
		return -1;
	}
	memset(&g, 0, sizeof(g));
	if (glob_shards(&g, pattern, err, errlen)) {
		globfree(&g);
		return -1;
	}
	n = (int)g.gl_pathc;
	l->shards = calloc((size_t)n, sizeof(*l->shards));
	l->first_seq = calloc((size_t)n + 1, sizeof(*l->first_seq));
	if (!l->shards || !l->first_seq) {
		snprintf(err, errlen, "'%s': out of memory for %d shards", pattern, n);
		goto fail;
	}
	/* glob(3) returns the paths sorted (no GLOB_NOSORT). */
	for (int i = 0; i < n; i++) {
		const char *path = g.gl_pathv[i];

		if (strlen(path) >= sizeof(l->shards[i].path)) {
			snprintf(err, errlen, "%s: path too long", path);
			goto fail;
		}
		if (shard_open(&l->shards[i], path, vocab_size, err, errlen))
			goto fail;
		l->n_shards = i + 1;
		l->first_seq[i + 1] = l->first_seq[i] + shard_seqs(&l->shards[i], T);
	}
	l->n_seqs = l->first_seq[n];
	if (l->n_seqs == 0) {
		snprintf(err, errlen, "'%s': no shard holds a complete sequence of T+1 = %lld tokens "
			 "(T = %d)", pattern, (long long)T + 1, T);
		goto fail;
	}
	if (shuffle) {
		if (l->n_seqs > SIZE_MAX / sizeof(*l->perm) ||
		    !(l->perm = malloc((size_t)l->n_seqs * sizeof(*l->perm)))) {
			snprintf(err, errlen, "'%s': out of memory for a permutation of %" PRIu64
				 " sequences", pattern, l->n_seqs);
			goto fail;
		}
		build_perm(l, 0);
	}
	globfree(&g);
	return 0;
fail:
	globfree(&g);
	loader_close(l);
	return -1;
}

/* ---- reading ---- */

/* The shard holding global sequence g: first_seq[s] <= g < first_seq[s + 1]. */
static int find_shard(const struct loader *l, uint64_t g)
{
	int lo = 0, hi = l->n_shards;	/* first_seq[lo] <= g < first_seq[hi] */

	while (hi - lo > 1) {
		int mid = lo + (hi - lo) / 2;

		if (l->first_seq[mid] <= g)
			lo = mid;
		else
			hi = mid;
	}
	return lo;
}

void loader_get(struct loader *l, uint64_t k, int *inputs, int *targets)
{
	uint64_t epoch = k / l->n_seqs;
	uint64_t j = k % l->n_seqs;
	uint64_t g = j;
	const struct shard *s;
	uint64_t base;
	int si;

	if (l->shuffle) {
		if (epoch != l->perm_epoch)
			build_perm(l, epoch);
		g = l->perm[j];
	}
	si = find_shard(l, g);
	s = &l->shards[si];
	base = (g - l->first_seq[si]) * (uint64_t)l->T;
	for (int t = 0; t < l->T; t++) {
		inputs[t] = (int)shard_token(s, base + (uint64_t)t);
		targets[t] = (int)shard_token(s, base + (uint64_t)t + 1);
	}
}
