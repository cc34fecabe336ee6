/*
 * rl/grpo_loss.c - the GRPO objective without the model: advantages, the loss types' weights, and the
 * clipped surrogate's gradient with respect to each token's log-probability (see grpo.h).
 *
 * The model turns dL/dlogp_t into parameter gradients: its loss with token weights w_t is
 * sum_t w_t * (-logp_t), so w_t = -dL/dlogp_t gives exactly dL/dtheta.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "rl/grpo.h"

int grpo_scale_from_name(const char *name)
{
	if (!strcmp(name, "group"))
		return GRPO_SCALE_GROUP;
	if (!strcmp(name, "batch"))
		return GRPO_SCALE_BATCH;
	if (!strcmp(name, "none"))
		return GRPO_SCALE_NONE;
	return -1;
}

int grpo_reward_norm_from_name(const char *name)
{
	if (!strcmp(name, "total"))
		return GRPO_NORM_TOTAL;
	if (!strcmp(name, "each"))
		return GRPO_NORM_EACH;
	return -1;
}

int grpo_loss_type_from_name(const char *name)
{
	static const char *const names[] = { "grpo", "bnpo", "dr_grpo", "dapo" };
	for (int i = 0; i < 4; i++)
		if (!strcmp(name, names[i]))
			return i;
	return -1;
}

/* mean and unbiased std of n values */
static void mean_std(const double *x, int n, double *mean, double *std)
{
	double s = 0.0, ss = 0.0;
	for (int i = 0; i < n; i++)
		s += x[i];
	*mean = s / n;
	for (int i = 0; i < n; i++)
		ss += (x[i] - *mean) * (x[i] - *mean);
	*std = n > 1 ? sqrt(ss / (n - 1)) : 0.0;
}

int grpo_advantages(const double *rewards, int P, int G, enum grpo_scale scale, float *adv)
{
	double batch_mean, batch_std;
	int zero_std = 0;

	mean_std(rewards, P * G, &batch_mean, &batch_std);
	for (int p = 0; p < P; p++) {
		const double *r = rewards + (size_t)p * G;
		double mean, std;
		int all_equal = 1;
		mean_std(r, G, &mean, &std);
		for (int g = 1; g < G; g++)
			all_equal &= r[g] == r[0];
		zero_std += all_equal;
		double denom = scale == GRPO_SCALE_GROUP ? std + GRPO_ADV_EPS :
			       scale == GRPO_SCALE_BATCH ? batch_std + GRPO_ADV_EPS : 1.0;
		for (int g = 0; g < G; g++)
			adv[(size_t)p * G + g] = all_equal ? 0.0f : (float)((r[g] - mean) / denom);
	}
	return zero_std;
}

int grpo_combined_advantages(const double *rewards, const double *weights, int R, int P, int G,
			     enum grpo_scale scale, enum grpo_reward_norm norm, double *total, float *adv)
{
	size_t PG = (size_t)P * G;
	float *one;
	int zero_std = 0;

	for (size_t j = 0; j < PG; j++) {
		total[j] = 0.0;
		for (int k = 0; k < R; k++)
			total[j] += weights[k] * rewards[k * PG + j];
	}
	if (norm == GRPO_NORM_TOTAL || R == 1)
		return grpo_advantages(total, P, G, scale, adv);
	one = malloc(sizeof(float) * PG);
	if (!one)
		return -1;
	memset(adv, 0, sizeof(float) * PG);
	for (int k = 0; k < R; k++) {
		grpo_advantages(rewards + k * PG, P, G, scale, one);
		for (size_t j = 0; j < PG; j++)
			adv[j] += (float)(weights[k] * one[j]);
	}
	free(one);
	for (int p = 0; p < P; p++) {
		int all_zero = 1;

		for (int g = 0; g < G; g++)
			all_zero &= adv[(size_t)p * G + g] == 0.0f;
		zero_std += all_zero;
	}
	return zero_std;
}

void grpo_sequence_coefs(enum grpo_loss_type t, int n, const int *mlen, int chunk, int max_new,
			 double *coef)
{
	long total = 0;
	for (int i = 0; i < n; i++)
		total += mlen[i];
	int n_chunks = chunk > 0 ? (n + chunk - 1) / chunk : 1;

	for (int i = 0; i < n; i++) {
		switch (t) {
		case GRPO_LOSS_GRPO:
			coef[i] = mlen[i] > 0 ? 1.0 / ((double)mlen[i] * n) : 0.0;
			break;
		case GRPO_LOSS_BNPO: {
			int c0 = chunk > 0 ? i / chunk * chunk : 0;
			int c1 = chunk > 0 && c0 + chunk < n ? c0 + chunk : n;
			long tok = 0;
			for (int j = c0; j < c1; j++)
				tok += mlen[j];
			coef[i] = 1.0 / ((double)(tok > 0 ? tok : 1) * n_chunks);
			break;
		}
		case GRPO_LOSS_DR_GRPO:
			coef[i] = 1.0 / ((double)n * max_new);
			break;
		default: /* dapo */
			coef[i] = 1.0 / (double)(total > 0 ? total : 1);
			break;
		}
	}
}

/* Whether the surrogate's min picks the clipped (constant) term: then no gradient flows through r. */
static int clipped_low(float r, float adv, float eps)
{
	return adv < 0 && r < 1.0f - eps;
}

static int clipped_high(float r, float adv, float eps_high)
{
	return adv > 0 && r > 1.0f + eps_high;
}

static double clip(double r, double lo, double hi)
{
	return r < lo ? lo : r > hi ? hi : r;
}

void grpo_sequence_grad(const struct grpo_loss_params *p, int n, const float *logp, const float *old,
			const float *ref, int counted, float adv, double coef, float *dlogp,
			struct grpo_stats *st)
{
	if (!counted || n <= 0) {
		memset(dlogp, 0, sizeof(float) * (size_t)(n > 0 ? n : 0));
		return;
	}
	double seq_ratio = 0.0;
	if (p->sequence_ratio) {
		double s = 0.0;
		for (int t = 0; t < n; t++)
			s += (double)logp[t] - old[t];
		seq_ratio = exp(s / n);
	}
	double lo = 1.0 - p->epsilon, hi = 1.0 + p->epsilon_high;
	for (int t = 0; t < n; t++) {
		double r = p->sequence_ratio ? seq_ratio : exp((double)logp[t] - old[t]);
		int low = clipped_low((float)r, adv, p->epsilon), high = clipped_high((float)r, adv, p->epsilon_high);
		double surr = fmin(r * adv, clip(r, lo, hi) * adv);
		double loss = -surr, g = (low || high) ? 0.0 : -r * adv;
		/* d(loss)/dlogp of the GSPO term: -A r / n from each of the n tokens' copies: -A r in all */
		if (p->beta > 0 && ref) {
			double d = (double)ref[t] - logp[t], k3 = exp(d) - d - 1.0;
			loss += p->beta * k3;
			g += p->beta * (1.0 - exp(d));
			st->kl += k3;
		}
		dlogp[t] = (float)(coef * g);
		st->loss += coef * loss;
		st->ratio += r;
		st->clip_low += low;
		st->clip_high += high;
	}
	st->tokens += n;
}
