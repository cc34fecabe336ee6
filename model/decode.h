/*
 * model/decode.h - incremental decoding with the MLA latent cache (SPEC 1), CPU, single process.
 *
 * The cache holds, per layer, sequence slot and position, only RMSNorm_kv(c_kv) [kv_lora_rank] and the
 * roped k_pe [qk_rope_head_dim]: (kv_lora_rank + qk_rope_head_dim) * num_hidden_layers floats per token.
 * Attention runs in the absorbed form: kv_b_proj's k_nope rows are folded into the query (a latent query
 * [kv_lora_rank] per head) and its v rows into the output, so k and v are never materialised.  The logits
 * equal model_forward's (the non-absorbed path) up to float rounding.
 */
#ifndef MOE_MODEL_DECODE_H
#define MOE_MODEL_DECODE_H

#include <stddef.h>

#include "model/model.h"

struct decode_scratch;             /* private to decode.c, grown as needed */

struct latent_cache {
	int n_layers, n_slots, max_len;
	int kv_lora, dr;
	float *ckv;                    /* [L][n_slots][max_len][kv_lora]: RMSNorm_kv(c_kv) */
	float *kpe;                    /* [L][n_slots][max_len][dr]: roped k_pe */
	int *len;                      /* [n_slots]: positions 0..len-1 are filled */
	struct decode_scratch *scratch;
};

/* Bytes of cache one token takes: (kv_lora_rank + qk_rope_head_dim) * num_hidden_layers * 4. */
size_t latent_cache_bytes_per_token(const struct model_config *c);

/* A cache of n_slots sequences of up to max_len positions each; NULL when out of memory or bad sizes. */
struct latent_cache *latent_cache_create(const struct model_config *c, int n_slots, int max_len);
void latent_cache_free(struct latent_cache *c);
/* Forget a slot's positions (len = 0). */
void latent_cache_reset(struct latent_cache *c, int slot);

/*
 * Runs the model for n new tokens: token i goes to sequence slot slots[i] at position positions[i]; its
 * latents are written into the cache (the slot's len becomes positions[i] + 1, dropping any later
 * positions), then it attends to the slot's positions 0..positions[i].  Several tokens of the same slot
 * may come in one call (a prefill chunk), in increasing positions; a position may not skip ahead of the
 * slot's filled length.  logits [n, V] are written (may be NULL).  The model must hold all experts
 * (m->ep_group == NULL).  Returns 0, or -1 on bad arguments (the cache is then unchanged) or out of memory.
 */
int decode_step(struct moe_model *m, struct latent_cache *c, const int *tokens, const int *slots,
		const int *positions, int n, float *logits);

#endif
