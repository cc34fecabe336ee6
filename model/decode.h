/*
 * model/decode.h - incremental decoding with the MLA latent cache (SPEC 1), CPU.
 *
 * The cache holds, per layer, sequence slot and position, only RMSNorm_kv(c_kv) [kv_lora_rank] and the
 * roped k_pe [qk_rope_head_dim]: (kv_lora_rank + qk_rope_head_dim) * num_hidden_layers floats per token.
 * Attention runs in the absorbed form: kv_b_proj's k_nope rows are folded into the query (a latent query
 * [kv_lora_rank] per head) and its v rows into the output, so k and v are never materialised.  The MoE
 * layers group the step's (token, slot) rows by expert and run each expert as one product over its rows,
 * as model_forward does; under expert parallelism (m->ep_group) the rows travel to the ranks holding
 * their experts by all-to-all.  The logits equal model_forward's (the non-absorbed path) up to float
 * rounding, and do not depend on the thread count.
 */
#ifndef MOE_MODEL_DECODE_H
#define MOE_MODEL_DECODE_H

#include <stddef.h>

#include "model/model.h"

struct decode_scratch;             /* private to decode.c, grown as needed */

struct latent_cache {
	int n_layers, n_slots, max_len;
	int kv_lora, dr;
	float *kv;                     /* [L][n_slots][max_len][kv_lora + dr]: RMSNorm_kv(c_kv), roped k_pe */
	int *len;                      /* [n_slots]: positions 0..len-1 are filled */
	/*
	 * The routing record (NULL unless latent_cache_enable_routes): routes [L][n_slots][max_len][K], the
	 * K expert ids (global, in the router's slot order) each MoE layer chose for the token decoded at
	 * (slot, pos); -1 where nothing was recorded (dense layers, positions never decoded).  Read it with
	 * latent_cache_route().
	 */
	int route_k;
	int *routes;
	/*
	 * 0 (the default): attention in the absorbed form.  1: the naive form, the reference for the other:
	 * every step expands the slot's cached latents into each head's k_nope and v through kv_b_proj and
	 * attends with q = [q_nope | q_pe] over k = [k_nope | k_pe], as model_forward does (per token:
	 * positions x heads x (qk_nope + v) x kv_lora multiply-adds more, and a buffer of positions x heads x
	 * (qk_nope + v) floats per thread).  Both give model_forward's logits up to float rounding.
	 */
	int naive_attention;
	int mtp;                       /* 1: the cache of the MTP depth-1 layer (mtp_cache_create) */
	struct decode_scratch *scratch;
};

/* Bytes of cache one token takes: (kv_lora_rank + qk_rope_head_dim) * num_hidden_layers * 4. */
size_t latent_cache_bytes_per_token(const struct model_config *c);

/*
 * A cache of n_slots sequences of up to max_len positions each; NULL when out of memory or bad sizes.
 * n_slots may be 0: the cache of a rank with no sequences that steps along with its expert-parallel
 * group (decode_step with n = 0).
 */
struct latent_cache *latent_cache_create(const struct model_config *c, int n_slots, int max_len);
void latent_cache_free(struct latent_cache *c);
/* Forget a slot's positions (len = 0). */
void latent_cache_reset(struct latent_cache *c, int slot);

/*
 * Start recording the routes (for GRPO's routing replay): allocates c->routes, num_hidden_layers *
 * n_slots * max_len * num_experts_per_tok ints, all -1.  Every later decode_step writes, for each MoE
 * layer and token, the experts it routed the token to.  Returns 0 (also when already enabled), -1 when
 * out of memory or when cfg is not the cache's model.
 */
int latent_cache_enable_routes(struct latent_cache *c, const struct model_config *cfg);
/*
 * The K expert ids layer `layer` chose for the token at (slot, pos), the K of model_forward's top-K in
 * the same order; NULL when routes are not recorded or (layer, slot, pos) is out of range.  Meaningful
 * for MoE layers and pos < len[slot] (a later decode of the same position overwrites it); otherwise -1s.
 */
const int *latent_cache_route(const struct latent_cache *c, int layer, int slot, int pos);

/*
 * Slot dst takes slot src's first len positions: every layer's latents and, when recorded, the routes
 * (dst's len becomes len).  Sequences that share a prompt are prefilled once and copied.  0, or -1 on bad
 * arguments (len beyond src's filled length, a slot out of range).
 */
int latent_cache_copy_prefix(struct latent_cache *c, int dst, int src, int len);

/*
 * Under expert parallelism (m->ep_group set): 1 when flag is set on any rank of the ep group, or when the
 * agreement itself failed; without it, flag.  A collective: the ranks of a decode agree on a failure
 * before anyone enters the step.
 */
int decode_any_rank(const struct moe_model *m, int flag);

/*
 * Runs the model for n new tokens: token i goes to sequence slot slots[i] at position positions[i]; its
 * latents are written into the cache (the slot's len becomes positions[i] + 1, dropping any later
 * positions), then it attends to the slot's positions 0..positions[i].  Several tokens of the same slot
 * may come in one call (a prefill chunk), in increasing positions; a position may not skip ahead of the
 * slot's filled length.  logits [n, V] are written (may be NULL).  Returns 0, or -1 on bad arguments
 * (the cache is then unchanged) or out of memory (found before anything is computed).
 *
 * Without expert parallelism (m->ep_group NULL) the model must hold all experts and n >= 1.
 *
 * With expert parallelism (m->ep_group set, the model holding experts [expert_begin, expert_end) =
 * the ep rank's 1/ep of them) decode_step is a collective of the ep group: every rank of the group
 * must call it the same number of times, in the same order, each with its own tokens, slots and cache.
 * A rank with nothing to decode calls it with n = 0 (allowed only here): it still computes its experts
 * for the peers' rows in every MoE layer's all-to-all.  The ranks first agree on the arguments (one
 * allreduce of an error flag): when any rank finds bad arguments or runs out of memory, every rank
 * returns -1 together, its cache unchanged.  A failure after that point (memory for the rows arriving
 * from the peers, a collective) ends the whole job (comm_abort), as in training: peers never hang.
 */
int decode_step(struct moe_model *m, struct latent_cache *c, const int *tokens, const int *slots,
		const int *positions, int n, float *logits);
/* decode_step, and when hidden is not NULL the last layer's output (before model.norm) of each token
 * into hidden [n, C]: what the multi-token-prediction head reads. */
int decode_step_hidden(struct moe_model *m, struct latent_cache *c, const int *tokens, const int *slots,
		       const int *positions, int n, float *logits, float *hidden);

/*
 * Self-speculative decoding with the model's first multi-token-prediction depth (model/mtp.h): its own
 * latent cache of one layer (NULL when the model has no MTP depth or out of memory; free it with
 * latent_cache_free).  mtp_draft_step runs depth 1 for n rows: row i pairs the main model's hidden state
 * hidden[i] (decode_step_hidden's) of the token at (slots[i], positions[i]) with the token that follows
 * it, tokens[i], and is cached at that position; logits [n, V] (may be NULL) are the depth's predictions
 * of the token after tokens[i].  The same rules for positions as decode_step; no expert parallelism.
 * Returns 0, -1 on bad arguments or out of memory.
 */
struct latent_cache *mtp_cache_create(const struct model_config *c, int n_slots, int max_len);
int mtp_draft_step(struct moe_model *m, struct latent_cache *mc, const float *hidden, const int *tokens,
		   const int *slots, const int *positions, int n, float *logits);

#endif
