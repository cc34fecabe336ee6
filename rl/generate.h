/*
 * rl/generate.h - batched generation with the MLA latent cache (model/decode.h), CPU, single process.
 *
 * G prompts of different lengths are prefilled together (one decode_step over all their tokens), then
 * decoded one token per unfinished sequence per step.  Sampling: temperature (0: greedy argmax, ties to
 * the lower id), top-k, top-p (nucleus), max_new_tokens, stop at an end-of-text id.  Each sequence g draws
 * from its own xoshiro256** stream seeded by splitmix64 from (seed, g), so a sequence's sample does not
 * depend on what else is in the batch.
 */
#ifndef MOE_RL_GENERATE_H
#define MOE_RL_GENERATE_H

#include <stdint.h>

#include "model/decode.h"
#include "model/model.h"

struct gen_rng {
	uint64_t s[4];
};

uint64_t splitmix64(uint64_t *state);
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

/*
 * One token from logits [V] (a scratch of V floats and ints is allocated when sorting is needed).  When
 * logprob is not NULL it receives the log-probability of the chosen token under softmax(logits /
 * temperature) (softmax(logits) when greedy), before top-k/top-p truncation.  Returns the id.
 */
int sample_token(const float *logits, int V, const struct sample_params *p, struct gen_rng *rng,
		 float *logprob);

/*
 * Prefill: resets slots 0..G-1 and runs all prompt tokens (prompts[g][0..lens[g]-1], lens[g] >= 1) in one
 * decode_step; last_logits [G, V] (may be NULL) receives the logits after each prompt's last token.
 * Returns 0, -1 on bad arguments or out of memory.
 */
int prefill(struct moe_model *m, struct latent_cache *c, const int *const *prompts, const int *lens, int G,
	    float *last_logits);

/*
 * Generates up to p->max_new_tokens after each of the G prompts.  out_tokens [G, max_new_tokens] receives
 * the completions (the eos token, when sampled, is included and ends the sequence; the rest of the row is
 * filled with -1); out_lens [G] their lengths; out_logprobs [G, max_new_tokens] (may be NULL) the
 * log-probability of each sampled token (see sample_token).  Returns 0, -1 on bad arguments or out of memory.
 */
int generate(struct moe_model *m, const int *const *prompts, const int *lens, int G,
	     const struct sample_params *p, int *out_tokens, int *out_lens, float *out_logprobs);

/*
 * moe generate --checkpoint CKPT.h5 (--prompt TEXT [--tokenizer tokenizer.json] | --prompt-ids 1,2,3)
 *              [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]
 *              [--num-samples G] [--eos ID] [--set section.key=value ...]
 * Prints each completion (text with a tokenizer, else the ids) and a summary on stderr.  The tokenizer
 * defaults to grpo.tokenizer of the checkpoint's config; the stop id to the tokenizer's end of text
 * (none without a tokenizer; --eos -1 disables it).  Returns the process exit status.
 */
int generate_cli_main(int argc, char **argv);

#endif
