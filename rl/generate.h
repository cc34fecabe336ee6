/*
 * rl/generate.h - batched generation with the MLA latent cache (model/decode.h), CPU.
 *
 * G prompts of different lengths are prefilled together (one decode_step over all their tokens), then
 * decoded one token per unfinished sequence per step.  Sampling: temperature (0: greedy argmax, ties to
 * the lower id), top-k, top-p (nucleus), max_new_tokens, stop at an end-of-text id.  Each sequence g draws
 * from its own xoshiro256** stream (seeded by gen_sequence_seed(seed, g), or by a seed the caller gives
 * it), so a sequence's sample does not depend on what else is in the batch.
 *
 * Expert parallelism (m->ep_group set): prefill and generate are collectives of the ep group, like
 * decode_step.  Every rank of the group calls them together, each with its own prompts (G may differ
 * between ranks, and may be 0); a rank whose sequences are done keeps stepping with nothing to decode
 * until every peer's are done.  With per-sequence seeds the tokens do not depend on how the sequences
 * are split over the ranks (the logits differ from one process's by float rounding only).  Bad
 * arguments or out of memory on any rank make every rank return -1.
 */
#ifndef MOE_RL_GENERATE_H
#define MOE_RL_GENERATE_H

#include <stdint.h>

#include "model/decode.h"
#include "model/model.h"

struct gen_rng {
	uint64_t s[4];
};

void gen_rng_seed(struct gen_rng *r, uint64_t seed);
uint64_t gen_rng_next(struct gen_rng *r);       /* xoshiro256** */
double gen_rng_uniform(struct gen_rng *r);      /* [0, 1), 53 bits */

struct sample_params {
	float temperature;   /* <= 0: greedy */
	float top_p;         /* in (0, 1]; >= 1: off */
	int top_k;           /* <= 0: off */
	int max_new_tokens;
	int eos_id;          /* < 0: never stop early */
	uint64_t seed;
};

/* temperature 1, no top-k/top-p, 16 new tokens, no eos, seed 0 */
struct sample_params sample_params_default(void);

/* The stream seed of sequence g when the caller gives none: splitmix64 of (seed, g). */
uint64_t gen_sequence_seed(uint64_t seed, int g);

/*
 * One token from logits [V] (a scratch of V floats and ints is allocated when sorting is needed).  When
 * logprob is not NULL it receives the log-probability of the chosen token under softmax(logits /
 * temperature) (softmax(logits) when greedy), before top-k/top-p truncation.  Returns the id.
 */
int sample_token(const float *logits, int V, const struct sample_params *p, struct gen_rng *rng,
		 float *logprob);

/*
 * Prefill: resets slots 0..G-1 and runs all prompt tokens (prompts[g][0..lens[g]-1], lens[g] >= 1) in one
 * decode_step; last_logits [G, V] (may be NULL) receives the logits after each prompt's last token.  A
 * prompt equal to the one before it (GRPO's G completions of a prompt) is run once and its cache rows
 * copied (latent_cache_copy_prefix).
 * Returns 0, -1 on bad arguments or out of memory.  Under expert parallelism a collective of the ep
 * group (G = 0 allowed).
 */
int prefill(struct moe_model *m, struct latent_cache *c, const int *const *prompts, const int *lens, int G,
	    float *last_logits);

/*
 * Generates up to p->max_new_tokens after each of the G prompts.  out_tokens [G, max_new_tokens] receives
 * the completions (the eos token, when sampled, is included and ends the sequence; the rest of the row is
 * filled with -1); out_lens [G] their lengths; out_logprobs [G, max_new_tokens] (may be NULL) the
 * log-probability of each sampled token (see sample_token).  Returns 0, -1 on bad arguments or out of
 * memory.  G >= 1, or G >= 0 under expert parallelism (see above).  generate_cached(.., NULL, .., NULL, ..).
 */
int generate(struct moe_model *m, const int *const *prompts, const int *lens, int G,
	     const struct sample_params *p, int *out_tokens, int *out_lens, float *out_logprobs);

/*
 * generate with a cache and seeds of the caller's:
 * cache: NULL, a cache of its own; else this one, which must have n_slots >= G and max_len >= max(lens) +
 * max_new_tokens - 1: slots 0..G-1 are reset and left holding the prompts and completions, e.g. to read
 * the routes (latent_cache_enable_routes) for routing replay.  Every token that was an input is
 * recorded: the prompt at positions 0..lens[g]-1 and completion tokens 0..out_lens[g]-2 at positions
 * lens[g]+t (the last sampled token never runs through the model).  With max_new_tokens = 0 nothing is
 * computed.
 * seeds: [G], sequence g samples from the stream gen_rng_seed(seeds[g]) (GRPO derives it from the run's
 * seed, the step and the completion's global index); NULL: gen_sequence_seed(p->seed, g).
 */
int generate_cached(struct moe_model *m, struct latent_cache *cache, const int *const *prompts,
		    const int *lens, int G, const struct sample_params *p, const uint64_t *seeds,
		    int *out_tokens, int *out_lens, float *out_logprobs);

/*
 * Self-speculative greedy decoding (rl/speculative.c) with the model's first multi-token-prediction
 * depth (model.num_nextn_predict_layers >= 1): after the main model has produced token x at position q,
 * the MTP head drafts d for q + 1; one main step over [x, d] then verifies it (accepted when the main
 * model's argmax at q is d, which also gives the token after d for free) or replaces it.  The tokens are
 * greedy decoding's (temperature <= 0 required; top-k/top-p are irrelevant to an argmax): the same as
 * generate() with temperature 0, up to the float rounding of a 2-row product against a 1-row one (an
 * argmax tie within rounding; none seen in the tests).  One sequence, no expert parallelism.
 * out_tokens [max_new_tokens], *out_len as generate().  st (may be NULL) counts drafts and acceptances.
 * Returns 0, -1 on bad arguments (no MTP depth, sampling, ep) or out of memory.
 */
struct spec_stats {
	long long drafted;       /* drafts verified by the main model */
	long long accepted;      /* of them, the main model's own choice */
	long long main_steps;    /* main-model decode steps after the prefill */
	long long mtp_steps;     /* MTP-head steps after its prefill */
};

int generate_speculative(struct moe_model *m, const int *prompt, int len, const struct sample_params *p,
			 int *out_tokens, int *out_len, struct spec_stats *st);

#endif
