/*
 * model/cuda/decode_cuda.h - incremental decoding with the MLA latent cache on the GPU: model/decode.h's
 * latent cache and absorbed attention, for a batch of sequences at once, plus a device sampler.
 *
 * A gpu_decoder runs the weights of a gpu_model IN PLACE (its fp32 arena, or its bf16 copy when the model
 * was made with bf16 matmuls: the same precision as the training forward), so rollouts need no weight copy
 * and no sync: whatever the optimizer last wrote is what the next step decodes with.  It holds
 *   - the latent cache: per layer, slot and position only RMSNorm_kv(c_kv) [kv_lora_rank] and the roped
 *     k_pe [qk_rope_head_dim], fp32, on the device;
 *   - per slot the sampler's xoshiro256** state (the stream rl/generate.c's CPU sampler draws from), so a
 *     sequence draws the same uniforms on either device;
 *   - optionally the routing record (the experts each MoE layer chose per token) on the host, for GRPO's
 *     routing replay: the top-k comes back to the host once per MoE layer anyway, to group the step's rows
 *     by expert.
 * A step runs n tokens of any slots (a prefill chunk of several prompts, or one token of every live
 * sequence): the MoE layers group all n*K (token, slot) rows by expert across the batch and run each
 * expert as three GEMMs over its rows; attention is the absorbed form (a latent query per head, scores
 * over the cached rows, W_UV applied to the latent output), one block per (token, head).
 *
 * Plain C (includable from C11 files); only built with the CUDA backend (MOE_HAVE_CUDA).  One process, every
 * expert local, as gpu_model.  Calls wait for the device only where they return host values.
 */
#ifndef MOE_MODEL_DECODE_CUDA_H
#define MOE_MODEL_DECODE_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "model/model.h"

#ifdef __cplusplus
extern "C" {
#endif

struct gpu_model;
struct gpu_decoder;

/* A cache of n_slots sequences of up to max_len positions over g's device weights (m: the host model g was
 * made from).  NULL and err filled on bad sizes. */
struct gpu_decoder *gpu_decoder_create(struct gpu_model *g, struct moe_model *m, int n_slots, int max_len,
				       char *err, size_t errlen);
void gpu_decoder_free(struct gpu_decoder *d);
int gpu_decoder_slots(const struct gpu_decoder *d);
int gpu_decoder_max_len(const struct gpu_decoder *d);
/* positions 0..len-1 of the slot are filled (host copy) */
int gpu_decoder_len(const struct gpu_decoder *d, int slot);
void gpu_decoder_reset(struct gpu_decoder *d, int slot);

/* As latent_cache_copy_prefix: slot dst takes src's first len positions (latents and recorded routes). */
int gpu_decoder_copy_prefix(struct gpu_decoder *d, int dst, int src, int len);

/* Start recording routes (latent_cache_enable_routes); 0 or -1 (out of host memory). */
int gpu_decoder_enable_routes(struct gpu_decoder *d);
/* As latent_cache_route: the K experts layer `layer` chose for (slot, pos); NULL when not recorded. */
const int *gpu_decoder_route(const struct gpu_decoder *d, int layer, int slot, int pos);

/*
 * As decode_step: token i (a HOST array) goes to slot slots[i] at position positions[i], its latents into
 * the cache, then it attends to the slot's positions 0..positions[i].  The logits of the tokens listed in
 * logit_rows [n_logits] (host indices into 0..n-1, repeats allowed: the sequences sharing a prefilled
 * prompt; NULL: all n) are left on the device, row r for token logit_rows[r] (gpu_decoder_logits).  0, or -1 on bad arguments (nothing is run).
 */
int gpu_decode_step(struct gpu_decoder *d, const int *tokens, const int *slots, const int *positions, int n,
		    const int *logit_rows, int n_logits);
/* The last step's logits [n_logits, V] on the device; gpu_decoder_logits_to_host copies them (waits). */
const float *gpu_decoder_logits(const struct gpu_decoder *d);
void gpu_decoder_logits_to_host(const struct gpu_decoder *d, float *dst);

/* The sampler streams: states [n_slots][4] (xoshiro256**, as struct gen_rng), uploaded. */
void gpu_decoder_set_rng(struct gpu_decoder *d, const uint64_t *states);
/* ... and back (waits): the states after the draws so far. */
void gpu_decoder_get_rng(const struct gpu_decoder *d, uint64_t *states);

/*
 * One token from each of the last step's n_rows logits rows (n_rows <= its n_logits), on the device, the
 * CPU sampler's rule (rl/generate.c sample_token): temperature <= 0 greedy (ties to the lower id); else
 * softmax(logits / temperature) truncated to the top_k highest logits (top_k <= 0: off) then to the
 * smallest prefix (in descending order of logits, ties to the lower id) holding top_p of the mass (>= 1:
 * off), one uniform of row r's slot row_slot[r]'s stream (not drawn when greedy) picking the token where
 * the running mass passes it: in id order without truncation, in the descending order with.  ids [n_rows],
 * logprobs [n_rows] (may be NULL: the log-probability of the token under softmax(logits / temperature),
 * before truncation; softmax(logits) when greedy) are HOST arrays (waits).
 */
void gpu_sample(struct gpu_decoder *d, const int *row_slot, int n_rows, float temperature, float top_p,
		int top_k, int *ids, float *logprobs);

#ifdef __cplusplus
}
#endif

#endif
