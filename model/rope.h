/*
 * model/rope.h - RoPE's frequency table and the attention scales, from the config: the one place that
 * reads config.rope_theta and config.rope_scaling.
 *
 * Without scaling: inv_freq[i] = rope_theta^(-2i/dr), cos/sin unscaled, softmax scale dq^-0.5 (SPEC 1).
 * YaRN, as transformers' _compute_yarn_parameters (modeling_rope_utils.py) and DeepseekV3's
 * yarn_apply_mscale, with dim = dr, base = rope_theta, s = factor, m(s, k) = s <= 1 ? 1 : 0.1 k ln(s) + 1:
 *   corr(r)      = dim ln(original_max_position_embeddings / (2 pi r)) / (2 ln base)
 *   low, high    = max(floor(corr(beta_fast)), 0), min(ceil(corr(beta_slow)), dim - 1)  (no floor/ceil
 *                  when truncate is false; high += 0.001 when low == high)
 *   ramp[i]      = clamp((i - low) / (high - low), 0, 1)
 *   inv_freq[i]  = base^(-2i/dim) * (ramp[i] / s + 1 - ramp[i])
 *   cos/sin x attention_factor = m(s, mscale) / m(s, mscale_all_dim) when both are given, else m(s, 1)
 *                  (or the config's attention_factor);
 *   softmax scale = dq^-0.5 * m(s, mscale_all_dim)^2 when mscale_all_dim is given.
 * The frequencies stay in double (angles pos * inv_freq reach 1e5 radians at DeepSeek's context lengths);
 * the multipliers are floats.
 */
#ifndef MOE_MODEL_ROPE_H
#define MOE_MODEL_ROPE_H

#include "model/config.h"

/* The frequencies and the cos/sin multiplier for rope_forward / rope_backward (model/ops.h). */
struct rope_freqs {
	double inv_freq[MC_ROPE_MAX_DIM / 2];   /* qk_rope_head_dim / 2 used */
	float attention_factor;                 /* 1 without scaling */
};

/* The YaRN factor in effect (factor, or max_position_embeddings / original_max_position_embeddings);
 * 1 without scaling. */
double mc_rope_factor(const struct model_config *c);
/* inv_freq[0 .. qk_rope_head_dim / 2) */
void mc_rope_inv_freq(const struct model_config *c, double *inv_freq);
/* the multiplier of cos and sin (so of the roped q_pe and k_pe) */
float mc_rope_attention_factor(const struct model_config *c);
void mc_rope_freqs(const struct model_config *c, struct rope_freqs *f);
/* the factor of q.k in the softmax: dq^-0.5, times mscale^2 under YaRN with mscale_all_dim */
float mc_softmax_scale(const struct model_config *c);

#endif
