/*
 * optim/adamw.c - AdamW (PyTorch's torch.optim.AdamW, decoupled weight decay), learning-rate schedules and
 * global-norm gradient clipping.
 *
 * Everything here is deterministic whatever the thread count: the update treats each element on its own
 * (threads only split the elements), and the global norm is summed in fixed chunks added in a fixed order.
 */
#include "optim/adamw.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Below this many elements a loop runs on the calling thread (the result is the same either way). */
#define OPTIM_PAR_MIN 16384
/* grad_global_norm sums chunks of this many elements, each in double, and adds the chunk sums in order. */
#define NORM_CHUNK 65536
/* Independent partial sums inside a chunk (a fixed pattern, so still one fixed order of additions). */
#define NORM_LANES 8

static const double optim_pi = 3.14159265358979323846;

int adamw_init(struct adamw *o, size_t n)
{
	size_t alloc = n ? n : 1;

	memset(o, 0, sizeof(*o));
	o->exp_avg = calloc(alloc, sizeof(float));
	o->exp_avg_sq = calloc(alloc, sizeof(float));
	if (!o->exp_avg || !o->exp_avg_sq) {
		adamw_free(o);
		return -1;
	}
	o->n = n;
	return 0;
}

void adamw_free(struct adamw *o)
{
	free(o->exp_avg);
	free(o->exp_avg_sq);
	memset(o, 0, sizeof(*o));
}

/*
 * PyTorch's single-tensor AdamW, operation for operation:
 *   param.mul_(1 - lr * wd)                       (the scalar in double, the product in float)
 *   exp_avg.lerp_(grad, 1 - beta1)                (m += (1 - b1) (g - m))
 *   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
 *   step_size = lr / bc1;  denom = exp_avg_sq.sqrt() / sqrt(bc2) + eps
 *   param.addcdiv_(exp_avg, denom, value=-step_size)
 * with bc1 = 1 - beta1^step and bc2 = 1 - beta2^step in double.  PyTorch's lerp with a weight below 0.5
 * is m + w (g - m); with a weight of 0.5 or more it is g - (g - m)(1 - w): both are kept.
 */
void adamw_update(struct adamw *o, float *w, const float *g, const struct optim_segment *segs, int nsegs,
		  const struct adamw_hparams *h)
{
	o->step++;

	double lr = h->lr, b1 = h->beta1, b2 = h->beta2;
	double bc1 = 1.0 - pow(b1, (double)o->step);
	double bc2 = 1.0 - pow(b2, (double)o->step);
	const float one_m_b1 = (float)(1.0 - b1);
	const float lerp_hi = 1.0f - one_m_b1;	/* the lerp's upper branch */
	const bool lerp_low = one_m_b1 < 0.5f;
	const float beta2 = h->beta2;
	const float one_m_b2 = (float)(1.0 - b2);
	const float step_size = (float)(lr / bc1);
	const float bc2_sqrt = (float)sqrt(bc2);
	const float eps = h->eps;
	float *m = o->exp_avg, *v = o->exp_avg_sq;

	for (int s = 0; s < nsegs; s++) {
		const struct optim_segment *sg = &segs[s];

		if (sg->frozen || sg->numel == 0)
			continue;

		const float decay = (float)(1.0 - lr * (double)sg->weight_decay);
		const bool do_decay = sg->weight_decay != 0.0f;
		const ptrdiff_t lo = (ptrdiff_t)sg->offset;
		const ptrdiff_t hi = lo + (ptrdiff_t)sg->numel;

		#pragma omp parallel for schedule(static) if (sg->numel >= OPTIM_PAR_MIN)
		for (ptrdiff_t i = lo; i < hi; i++) {
			float wi = w[i], gi = g[i], mi = m[i], vi = v[i];

			if (do_decay)
				wi *= decay;
			if (lerp_low)
				mi = mi + one_m_b1 * (gi - mi);
			else
				mi = gi - (gi - mi) * lerp_hi;
			vi = vi * beta2 + one_m_b2 * gi * gi;
			float denom = sqrtf(vi) / bc2_sqrt + eps;

			w[i] = wi + -step_size * (mi / denom);
			m[i] = mi;
			v[i] = vi;
		}
	}
}

int lr_schedule_parse(const char *name, enum lr_schedule_kind *kind)
{
	static const struct {
		const char *name;
		enum lr_schedule_kind kind;
	} names[] = {
		{ "cosine", LR_COSINE },
		{ "wsd", LR_WSD },
		{ "constant", LR_CONSTANT },
	};

	if (!name)
		return -1;
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		if (strcmp(name, names[i].name) == 0) {
			*kind = names[i].kind;
			return 0;
		}
	}
	return -1;
}

static double clamp01(double x)
{
	return x < 0 ? 0 : (x > 1 ? 1 : x);
}

/*
 * warmup (step < warmup_steps): lr (step + 1) / warmup_steps.  Then
 *   cosine:   progress = (step - warmup) / max(1, total - warmup) in [0, 1],
 *             min_lr + (lr - min_lr) (1 + cos(pi progress)) / 2  (lr right after warmup, min_lr at total);
 *   wsd:      the decay covers the last round(decay_frac total) steps, from d0 = total - that (not before
 *             warmup ends); before d0, lr; from d0 on, lr + (min_lr - lr) (step - d0 + 1) / (total - d0):
 *             a straight line from lr (at d0 - 1, the last stable step) to min_lr at the last step,
 *             total - 1, and min_lr after it;
 *   constant: lr.
 */
double lr_at(const struct lr_schedule *s, int64_t step)
{
	int64_t warm = s->warmup_steps > 0 ? s->warmup_steps : 0;
	int64_t total = s->total_steps;

	if (step < 0)
		step = 0;
	if (step < warm)
		return s->lr * (double)(step + 1) / (double)warm;

	switch (s->kind) {
	case LR_COSINE: {
		int64_t span = total - warm > 1 ? total - warm : 1;
		double p = clamp01((double)(step - warm) / (double)span);

		return s->min_lr + (s->lr - s->min_lr) * (1.0 + cos(optim_pi * p)) / 2.0;
	}
	case LR_WSD: {
		double frac = s->decay_frac > 0 ? s->decay_frac : 0;
		int64_t decay = (int64_t)llround(frac * (double)total);
		int64_t d0 = total - decay;

		if (d0 < warm)
			d0 = warm;
		if (decay <= 0 || d0 >= total || step < d0)
			return s->lr;
		double p = clamp01((double)(step - d0 + 1) / (double)(total - d0));

		return s->lr + (s->min_lr - s->lr) * p;
	}
	case LR_CONSTANT:
	default:
		return s->lr;
	}
}

/* sum of squares of one chunk, in double, in a fixed order */
static double chunk_sumsq(const float *g, size_t n)
{
	double acc[NORM_LANES] = { 0 };
	size_t i = 0;

	for (; i + NORM_LANES <= n; i += NORM_LANES)
		for (int l = 0; l < NORM_LANES; l++)
			acc[l] += (double)g[i + l] * (double)g[i + l];
	for (int l = 0; i < n; i++, l++)
		acc[l] += (double)g[i] * (double)g[i];

	double s = 0;

	for (int l = 0; l < NORM_LANES; l++)
		s += acc[l];
	return s;
}

double grad_global_norm(const float *g, size_t n)
{
	size_t nchunks = (n + NORM_CHUNK - 1) / NORM_CHUNK;
	double total = 0;

	if (nchunks == 0)
		return 0;

	double *sums = malloc(nchunks * sizeof(double));

	if (!sums) {
		/* The same chunks in the same order, on one thread. */
		for (size_t c = 0; c < nchunks; c++) {
			size_t lo = c * NORM_CHUNK;
			size_t len = n - lo < NORM_CHUNK ? n - lo : NORM_CHUNK;

			total += chunk_sumsq(g + lo, len);
		}
		return sqrt(total);
	}

	#pragma omp parallel for schedule(static) if (nchunks > 1)
	for (ptrdiff_t c = 0; c < (ptrdiff_t)nchunks; c++) {
		size_t lo = (size_t)c * NORM_CHUNK;
		size_t len = n - lo < NORM_CHUNK ? n - lo : NORM_CHUNK;

		sums[c] = chunk_sumsq(g + lo, len);
	}
	for (size_t c = 0; c < nchunks; c++)
		total += sums[c];
	free(sums);
	return sqrt(total);
}

/*
 * A non-finite norm returns NAN and leaves g alone (the caller skips the step or stops); clipping off
 * (max_norm <= 0) or a norm within max_norm returns 1 and leaves g alone; otherwise g *= max_norm / norm
 * and that factor is returned.
 */
float grad_clip(float *g, size_t n, double norm, double max_norm)
{
	if (!isfinite(norm))
		return NAN;
	if (!(max_norm > 0) || !(norm > max_norm))
		return 1.0f;

	const float f = (float)(max_norm / norm);

	#pragma omp parallel for schedule(static) if (n >= OPTIM_PAR_MIN)
	for (ptrdiff_t i = 0; i < (ptrdiff_t)n; i++)
		g[i] *= f;
	return f;
}
