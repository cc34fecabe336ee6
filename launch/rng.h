/*
 * launch/rng.h - the one seeded random-number core every layer draws from: SplitMix64 (Steele, Lea and
 * Flood, 2014) and the derivation of independent streams from one seed.
 *
 *   mix64(x)                 the SplitMix64 finaliser: a bijective 64-bit hash (also the hash of hash tables)
 *   splitmix64(&state)       advance the state by the golden gamma, return the mix of it
 *   rng_stream_seed(s, k)    the seed of stream k of seed s (per rank, per purpose, per sequence...)
 *   rng_uniform(u)           the top 53 bits of a draw as a double in [0, 1)
 *
 * Everything is a pure function of its arguments: the same seed gives the same numbers on every machine,
 * every rank layout and every build, which is what makes runs reproducible and resumable exactly.  Callers
 * keep their own derivations where a saved file or a test pins the numbers they produce.
 */
#ifndef MOE_LAUNCH_RNG_H
#define MOE_LAUNCH_RNG_H

#include <stdint.h>

#define RNG_GOLDEN_GAMMA 0x9e3779b97f4a7c15ULL /* 2^64 / golden ratio, odd */

static inline uint64_t mix64(uint64_t x)
{
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static inline uint64_t splitmix64(uint64_t *state)
{
	return mix64(*state += RNG_GOLDEN_GAMMA);
}

/* Streams k != k' of one seed are unrelated; stream k of seeds s != s' too. */
static inline uint64_t rng_stream_seed(uint64_t seed, uint64_t stream)
{
	return mix64(seed ^ mix64(RNG_GOLDEN_GAMMA * stream));
}

static inline double rng_uniform(uint64_t draw)
{
	return (double)(draw >> 11) * 0x1p-53;
}

#endif
