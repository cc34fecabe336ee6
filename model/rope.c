/*
 * model/rope.c - RoPE's frequencies and the attention scales from the config (the math: model/rope.h).
 */
#include "model/rope.h"

#include <math.h>

#define TWO_PI 6.283185307179586476925

static bool is_yarn(const struct model_config *c)
{
	return c->rope_scaling.type == ROPE_YARN;
}

/* transformers' get_mscale */
static double yarn_mscale(double scale, double mscale)
{
	return scale <= 1 ? 1.0 : 0.1 * mscale * log(scale) + 1.0;
}

static double original_max_pos(const struct model_config *c)
{
	int n = c->rope_scaling.original_max_position_embeddings;

	return n > 0 ? n : c->max_position_embeddings;
}

double mc_rope_factor(const struct model_config *c)
{
	if (!is_yarn(c))
		return 1.0;
	if (c->rope_scaling.factor > 0)
		return c->rope_scaling.factor;
	return c->max_position_embeddings / original_max_pos(c);
}

/* the dimension whose wavelength turns `rotations` times over the original context */
static double correction_dim(const struct model_config *c, double rotations)
{
	return c->qk_rope_head_dim * log(original_max_pos(c) / (rotations * TWO_PI)) /
	       (2 * log(c->rope_theta));
}

/* the ramp's ends: from pair `low` on the frequencies are interpolated, fully from `high` on */
static void correction_range(const struct model_config *c, double *low, double *high)
{
	const struct rope_scaling *rs = &c->rope_scaling;
	double lo = correction_dim(c, rs->beta_fast > 0 ? rs->beta_fast : 32);
	double hi = correction_dim(c, rs->beta_slow > 0 ? rs->beta_slow : 1);

	if (!rs->no_truncate) {
		lo = floor(lo);
		hi = ceil(hi);
	}
	*low = lo > 0 ? lo : 0;
	*high = hi < c->qk_rope_head_dim - 1 ? hi : c->qk_rope_head_dim - 1;
	if (*low == *high)
		*high += 0.001;
}

void mc_rope_inv_freq(const struct model_config *c, double *inv_freq)
{
	int dim = c->qk_rope_head_dim;
	double base = c->rope_theta, factor = mc_rope_factor(c), low = 0, high = 1;

	if (is_yarn(c))
		correction_range(c, &low, &high);
	for (int i = 0; i < dim / 2; i++) {
		double extra = pow(base, -2.0 * i / dim), ramp;

		if (!is_yarn(c)) {
			inv_freq[i] = extra;
			continue;
		}
		ramp = (i - low) / (high - low);
		ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
		inv_freq[i] = extra / factor * ramp + extra * (1 - ramp);
	}
}

float mc_rope_attention_factor(const struct model_config *c)
{
	const struct rope_scaling *rs = &c->rope_scaling;
	double s = mc_rope_factor(c);

	if (!is_yarn(c))
		return 1.0f;
	if (rs->attention_factor > 0)
		return (float)rs->attention_factor;
	if (rs->mscale > 0 && rs->mscale_all_dim > 0)
		return (float)(yarn_mscale(s, rs->mscale) / yarn_mscale(s, rs->mscale_all_dim));
	return (float)yarn_mscale(s, 1.0);
}

void mc_rope_freqs(const struct model_config *c, struct rope_freqs *f)
{
	mc_rope_inv_freq(c, f->inv_freq);
	f->attention_factor = mc_rope_attention_factor(c);
}

float mc_softmax_scale(const struct model_config *c)
{
	double scale = 1.0 / sqrt((double)mc_qk_head_dim(c));

	if (is_yarn(c) && c->rope_scaling.mscale_all_dim > 0) {
		double m = yarn_mscale(mc_rope_factor(c), c->rope_scaling.mscale_all_dim);

		scale = scale * m * m;
	}
	return (float)scale;
}
