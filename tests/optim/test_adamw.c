/*
 * tests/optim/test_adamw.c - AdamW against a hand-worked example and a double-precision reference,
 * the learning-rate schedules, and the deterministic global norm and clipping.
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "optim/adamw.h"

#define PI 3.14159265358979323846

static int close_rel(double got, double want, double tol)
{
	double d = fabs(got - want), s = fabs(want) > 1e-30 ? fabs(want) : 1e-30;

	if (d / s <= tol)
		return 1;
	fprintf(stderr, "\n  got %.12g, want %.12g (rel %.3g > %.3g)\n", got, want, d / s, tol);
	return 0;
}

#define ASSERT_REL(got, want, tol) CU_ASSERT(close_rel((got), (want), (tol)))

/* ---------------------------------------------------------------- AdamW, worked by hand */

/*
 * lr = 0.1, beta1 = 0.5, beta2 = 0.75, eps = 0.5 (large, so that it shows), six weights in three segments:
 *   A = w[0..2], weight decay 0.5 (so each step first multiplies by 1 - 0.1 * 0.5 = 0.95)
 *   B = w[3..4], frozen
 *   C = w[5],    weight decay 0
 * w0 = [1, -2, 0.5 | 3, -3 | 2], g1 = [0.5, -1, 2 | 7, 7 | -0.5], g2 = [1.5, 1, 0 | 7, 7 | 0.5].
 *
 * Step 1: bc1 = 1 - 0.5 = 0.5, bc2 = 1 - 0.75 = 0.25 (sqrt 0.5).
 *   m = 0.5 g1 = [0.25, -0.5, 1 | -0.25],  v = 0.25 g1^2 = [0.0625, 0.25, 1 | 0.0625]
 *   m/bc1 = g1 = [0.5, -1, 2 | -0.5],  sqrt(v/bc2) = |g1| = [0.5, 1, 2 | 0.5],  + eps = [1, 1.5, 2.5 | 1]
 *   update = 0.1 m^/denom = [0.05, -0.0666667, 0.08 | -0.05]
 *   A: 0.95 w0 = [0.95, -1.9, 0.475] -> w1 = [0.9, -1.8333333, 0.395];  C: 2 + 0.05 = 2.05
 * Step 2: bc1 = 1 - 0.25 = 0.75, bc2 = 1 - 0.5625 = 0.4375.
 *   m = 0.5 m + 0.5 g2 = [0.875, 0.25, 0.5 | 0.125]
 *   v = 0.75 v + 0.25 g2^2 = [0.609375, 0.4375, 0.75 | 0.109375]
 *   m/bc1 = [1.1666667, 0.3333333, 0.6666667 | 0.1666667]
 *   v/bc2 = [1.3928571, 1, 1.7142857 | 0.25], sqrt = [1.1801937, 1, 1.3093073 | 0.5]
 *   denom = [1.6801937, 1.5, 1.8093073 | 1]
 *   update = [0.0694364, 0.0222222, 0.0368465 | 0.0166667]
 *   A: 0.95 w1 = [0.855, -1.7416667, 0.37525] -> w2 = [0.7855636, -1.7638889, 0.3384035]
 *   C: 2.05 - 0.0166667 = 2.0333333
 * (the third weight's gradient is 0 at step 2: it still moves, by the momentum and the decay).
 * B keeps [3, -3] and zero state although its gradient is 7.
 */
static void test_adamw_hand(void)
{
	static const struct optim_segment segs[] = {
		{ .offset = 0, .numel = 3, .weight_decay = 0.5f },
		{ .offset = 3, .numel = 2, .weight_decay = 0.5f, .frozen = true },
		{ .offset = 5, .numel = 1, .weight_decay = 0.0f },
	};
	const struct adamw_hparams h = { .lr = 0.1f, .beta1 = 0.5f, .beta2 = 0.75f, .eps = 0.5f };
	float w[6] = { 1.0f, -2.0f, 0.5f, 3.0f, -3.0f, 2.0f };
	const float g1[6] = { 0.5f, -1.0f, 2.0f, 7.0f, 7.0f, -0.5f };
	const float g2[6] = { 1.5f, 1.0f, 0.0f, 7.0f, 7.0f, 0.5f };
	struct adamw o;

	CU_ASSERT_FATAL(adamw_init(&o, 6) == 0);
	CU_ASSERT_EQUAL(o.n, 6);
	CU_ASSERT_EQUAL(o.step, 0);
	for (int i = 0; i < 6; i++)
		CU_ASSERT(o.exp_avg[i] == 0.0f && o.exp_avg_sq[i] == 0.0f);

	adamw_update(&o, w, g1, segs, 3, &h);
	CU_ASSERT_EQUAL(o.step, 1);
	const double w1[6] = { 0.9, -1.8333333333333333, 0.395, 3.0, -3.0, 2.05 };
	const double m1[6] = { 0.25, -0.5, 1.0, 0, 0, -0.25 };
	const double v1[6] = { 0.0625, 0.25, 1.0, 0, 0, 0.0625 };

	for (int i = 0; i < 6; i++) {
		if (i == 3 || i == 4)
			continue;
		ASSERT_REL(w[i], w1[i], 1e-6);
		ASSERT_REL(o.exp_avg[i], m1[i], 1e-6);
		ASSERT_REL(o.exp_avg_sq[i], v1[i], 1e-6);
	}

	adamw_update(&o, w, g2, segs, 3, &h);
	CU_ASSERT_EQUAL(o.step, 2);
	/* the same arithmetic in double, to more places than the comment */
	const double w2[6] = { 0.855 - 0.1 * (0.875 / 0.75) / (sqrt(0.609375 / 0.4375) + 0.5),
			       -1.7416666666666667 - 0.1 * (0.25 / 0.75) / (1.0 + 0.5),
			       0.37525 - 0.1 * (0.5 / 0.75) / (sqrt(0.75 / 0.4375) + 0.5),
			       3.0, -3.0,
			       2.05 - 0.1 * (0.125 / 0.75) / (0.5 + 0.5) };
	const double m2[6] = { 0.875, 0.25, 0.5, 0, 0, 0.125 };
	const double v2[6] = { 0.609375, 0.4375, 0.75, 0, 0, 0.109375 };

	/* the closed forms agree with the rounded values worked out above */
	ASSERT_REL(w2[0], 0.7855636, 1e-7);
	ASSERT_REL(w2[1], -1.7638889, 1e-7);
	ASSERT_REL(w2[2], 0.3384035, 1e-7);
	ASSERT_REL(w2[5], 2.0333333, 1e-7);
	for (int i = 0; i < 6; i++) {
		if (i == 3 || i == 4)
			continue;
		ASSERT_REL(w[i], w2[i], 1e-6);
		ASSERT_REL(o.exp_avg[i], m2[i], 1e-6);
		ASSERT_REL(o.exp_avg_sq[i], v2[i], 1e-6);
	}

	/* the frozen segment: weights bit for bit, state still zero */
	CU_ASSERT(w[3] == 3.0f && w[4] == -3.0f);
	CU_ASSERT(o.exp_avg[3] == 0.0f && o.exp_avg[4] == 0.0f);
	CU_ASSERT(o.exp_avg_sq[3] == 0.0f && o.exp_avg_sq[4] == 0.0f);

	adamw_free(&o);
	CU_ASSERT_PTR_NULL(o.exp_avg);
	CU_ASSERT_PTR_NULL(o.exp_avg_sq);
}

/* ---------------------------------------------------------------- AdamW against a double reference */

/* Segments over N floats: big ones (split across threads), small ones, a frozen one, and a gap that no
 * segment covers (it must stay untouched too). */
#define RN 50000
static const struct optim_segment ref_segs[] = {
	{ .offset = 0, .numel = 20000, .weight_decay = 0.1f },
	{ .offset = 20000, .numel = 7, .weight_decay = 0.0f },
	{ .offset = 20007, .numel = 993, .weight_decay = 0.1f, .frozen = true },
	{ .offset = 21000, .numel = 18000, .weight_decay = 0.0f },
	{ .offset = 39000, .numel = 1, .weight_decay = 0.25f },
	/* 39001..39999 in no segment */
	{ .offset = 40000, .numel = 10000, .weight_decay = 0.01f },
};
#define NREF ((int)(sizeof(ref_segs) / sizeof(ref_segs[0])))

static void test_adamw_reference(void)
{
	const struct adamw_hparams h = { .lr = 3e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f };
	float *w = malloc(RN * sizeof(float)), *w0 = malloc(RN * sizeof(float));
	float *g = malloc(RN * sizeof(float));
	double *rw = malloc(RN * sizeof(double)), *rm = calloc(RN, sizeof(double));
	double *rv = calloc(RN, sizeof(double));
	float *fw = malloc(RN * sizeof(float)), *fm = malloc(RN * sizeof(float));
	float *fv = malloc(RN * sizeof(float));
	struct adamw o;

	CU_ASSERT_FATAL(w && w0 && g && rw && rm && rv && fw && fm && fv);
	CU_ASSERT_FATAL(adamw_init(&o, RN) == 0);
	test_rng_seed(7);
	test_fill_randn(w, RN, 1.0f);
	memcpy(w0, w, RN * sizeof(float));
	for (size_t i = 0; i < RN; i++)
		rw[i] = w[i];

	double worst_w = 0, worst_m = 0, worst_v = 0;

	for (int t = 1; t <= 10; t++) {
		/* gradients of varied scales, a few exactly zero */
		test_fill_randn(g, RN, t % 3 == 0 ? 1e-3f : 1.0f);
		for (size_t i = 0; i < RN; i += 997)
			g[i] = 0.0f;
		adamw_update(&o, w, g, ref_segs, NREF, &h);

		double lr = h.lr, b1 = h.beta1, b2 = h.beta2, eps = h.eps;
		double bc1 = 1 - pow(b1, t), bc2 = 1 - pow(b2, t);

		for (int s = 0; s < NREF; s++) {
			const struct optim_segment *sg = &ref_segs[s];

			if (sg->frozen)
				continue;
			for (size_t i = sg->offset; i < sg->offset + sg->numel; i++) {
				double gi = g[i];

				rw[i] -= lr * sg->weight_decay * rw[i];
				rm[i] = b1 * rm[i] + (1 - b1) * gi;
				rv[i] = b2 * rv[i] + (1 - b2) * gi * gi;
				rw[i] -= lr * (rm[i] / bc1) / (sqrt(rv[i] / bc2) + eps);
			}
		}
		for (size_t i = 0; i < RN; i++) {
			fw[i] = (float)rw[i];
			fm[i] = (float)rm[i];
			fv[i] = (float)rv[i];
		}
		/* floors: w ~ N(0, 1); m is a sum of terms ~ 0.1 |g| that can cancel to ~0 */
		double ew = rel_err(w, fw, RN, 1e-2), em = rel_err(o.exp_avg, fm, RN, 1e-1);
		double ev = rel_err(o.exp_avg_sq, fv, RN, 1e-6);

		worst_w = fmax(worst_w, ew);
		worst_m = fmax(worst_m, em);
		worst_v = fmax(worst_v, ev);
	}
	CU_ASSERT_EQUAL(o.step, 10);
	/* float32 against double: ~7e-7 on w, ~5e-7 on m and v here */
	if (worst_w > 2e-6 || worst_m > 2e-6 || worst_v > 2e-6)
		fprintf(stderr, "\n  rel err w %.3g m %.3g v %.3g\n", worst_w, worst_m, worst_v);
	CU_ASSERT(worst_w <= 2e-6);
	CU_ASSERT(worst_m <= 2e-6);
	CU_ASSERT(worst_v <= 2e-6);

	/* frozen and uncovered elements: untouched weights, zero state */
	int untouched = 1;

	for (size_t i = 20007; i < 21000; i++)
		untouched &= w[i] == w0[i] && o.exp_avg[i] == 0.0f && o.exp_avg_sq[i] == 0.0f;
	for (size_t i = 39001; i < 40000; i++)
		untouched &= w[i] == w0[i] && o.exp_avg[i] == 0.0f && o.exp_avg_sq[i] == 0.0f;
	CU_ASSERT(untouched);

	adamw_free(&o);
	free(w);
	free(w0);
	free(g);
	free(rw);
	free(rm);
	free(rv);
	free(fw);
	free(fm);
	free(fv);
}

/* The same updates on 1 and on 3 threads: the same bits. */
static void test_adamw_threads(void)
{
	const struct adamw_hparams h = { .lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f };
	const int saved = omp_get_max_threads();
	float *w[2], *g = malloc(RN * sizeof(float));
	struct adamw o[2];

	CU_ASSERT_FATAL(g != NULL);
	for (int k = 0; k < 2; k++) {
		w[k] = malloc(RN * sizeof(float));
		CU_ASSERT_FATAL(w[k] != NULL);
		CU_ASSERT_FATAL(adamw_init(&o[k], RN) == 0);
		test_rng_seed(11);
		test_fill_randn(w[k], RN, 0.5f);
	}
	for (int k = 0; k < 2; k++) {
		omp_set_num_threads(k ? 3 : 1);
		test_rng_seed(12);
		for (int t = 0; t < 4; t++) {
			test_fill_randn(g, RN, 1.0f);
			adamw_update(&o[k], w[k], g, ref_segs, NREF, &h);
		}
	}
	omp_set_num_threads(saved);
	CU_ASSERT(memcmp(w[0], w[1], RN * sizeof(float)) == 0);
	CU_ASSERT(memcmp(o[0].exp_avg, o[1].exp_avg, RN * sizeof(float)) == 0);
	CU_ASSERT(memcmp(o[0].exp_avg_sq, o[1].exp_avg_sq, RN * sizeof(float)) == 0);
	for (int k = 0; k < 2; k++) {
		adamw_free(&o[k]);
		free(w[k]);
	}
	free(g);
}

static void test_adamw_empty(void)
{
	struct adamw o;
	const struct adamw_hparams h = { .lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f };

	CU_ASSERT_FATAL(adamw_init(&o, 0) == 0);
	CU_ASSERT_EQUAL(o.n, 0);
	adamw_update(&o, NULL, NULL, NULL, 0, &h);
	CU_ASSERT_EQUAL(o.step, 1);
	adamw_free(&o);
}

/* ---------------------------------------------------------------- learning-rate schedules */

static void test_lr_warmup(void)
{
	for (int k = 0; k < 3; k++) {
		struct lr_schedule s = { .kind = (enum lr_schedule_kind)k, .lr = 1e-3, .min_lr = 1e-4,
					 .decay_frac = 0.2, .warmup_steps = 10, .total_steps = 100 };

		ASSERT_REL(lr_at(&s, 0), 1e-4, 1e-12);
		ASSERT_REL(lr_at(&s, 4), 5e-4, 1e-12);
		ASSERT_REL(lr_at(&s, 9), 1e-3, 1e-12);
		/* the first step after warmup is at the peak whatever the schedule */
		ASSERT_REL(lr_at(&s, 10), 1e-3, 1e-12);
	}
}

static void test_lr_cosine(void)
{
	struct lr_schedule s = { .kind = LR_COSINE, .lr = 1e-3, .min_lr = 1e-4, .warmup_steps = 10,
				 .total_steps = 110 };

	/* progress = (step - 10) / 100 */
	ASSERT_REL(lr_at(&s, 10), 1e-3, 1e-12);
	ASSERT_REL(lr_at(&s, 60), (1e-3 + 1e-4) / 2, 1e-12);
	ASSERT_REL(lr_at(&s, 35), 1e-4 + 9e-4 * (1 + cos(PI * 0.25)) / 2, 1e-12);
	ASSERT_REL(lr_at(&s, 110), 1e-4, 1e-12);
	ASSERT_REL(lr_at(&s, 500), 1e-4, 1e-12);

	int mono = 1;

	for (int64_t t = 11; t <= 110; t++)
		mono &= lr_at(&s, t) < lr_at(&s, t - 1);
	CU_ASSERT(mono);

	/* no warmup: starts at lr */
	s.warmup_steps = 0;
	ASSERT_REL(lr_at(&s, 0), 1e-3, 1e-12);
	ASSERT_REL(lr_at(&s, 55), (1e-3 + 1e-4) / 2, 1e-12);
}

static void test_lr_wsd(void)
{
	struct lr_schedule s = { .kind = LR_WSD, .lr = 1e-3, .min_lr = 1e-5, .decay_frac = 0.2,
				 .warmup_steps = 10, .total_steps = 100 };

	/* the last 20 steps (80..99) decay; 10..79 stay at lr */
	int flat = 1;

	for (int64_t t = 10; t < 80; t++)
		flat &= lr_at(&s, t) == 1e-3;
	CU_ASSERT(flat);
	CU_ASSERT(lr_at(&s, 80) < 1e-3);
	ASSERT_REL(lr_at(&s, 80), 1e-3 + (1e-5 - 1e-3) * 1 / 20, 1e-12);
	ASSERT_REL(lr_at(&s, 89), 1e-3 + (1e-5 - 1e-3) * 10 / 20, 1e-12);
	ASSERT_REL(lr_at(&s, 99), 1e-5, 1e-12);
	ASSERT_REL(lr_at(&s, 100), 1e-5, 1e-12);
	ASSERT_REL(lr_at(&s, 1000), 1e-5, 1e-12);

	/* linear: equal steps down */
	double d0 = lr_at(&s, 79) - lr_at(&s, 80);
	int linear = 1;

	for (int64_t t = 81; t < 100; t++)
		linear &= fabs((lr_at(&s, t - 1) - lr_at(&s, t)) - d0) < 1e-15;
	CU_ASSERT(linear);

	/* round(0.25 * 10) = 3 decay steps: 7, 8, 9 */
	struct lr_schedule r = { .kind = LR_WSD, .lr = 1.0, .min_lr = 0.0, .decay_frac = 0.25,
				 .total_steps = 10 };

	CU_ASSERT(lr_at(&r, 6) == 1.0);
	ASSERT_REL(lr_at(&r, 7), 2.0 / 3, 1e-12);
	ASSERT_REL(lr_at(&r, 8), 1.0 / 3, 1e-12);
	CU_ASSERT(lr_at(&r, 9) == 0.0);

	/* decay would begin inside warmup: it begins when warmup ends (step 5), reaching min_lr at 9 */
	struct lr_schedule e = { .kind = LR_WSD, .lr = 1.0, .min_lr = 0.5, .decay_frac = 0.8,
				 .warmup_steps = 5, .total_steps = 10 };

	ASSERT_REL(lr_at(&e, 4), 1.0, 1e-12);
	ASSERT_REL(lr_at(&e, 5), 0.9, 1e-12);
	ASSERT_REL(lr_at(&e, 7), 0.7, 1e-12);
	ASSERT_REL(lr_at(&e, 9), 0.5, 1e-12);

	/* decay_frac 0: no decay at all */
	r.decay_frac = 0;
	CU_ASSERT(lr_at(&r, 9) == 1.0 && lr_at(&r, 50) == 1.0);
}

static void test_lr_constant(void)
{
	struct lr_schedule s = { .kind = LR_CONSTANT, .lr = 2e-4, .min_lr = 1e-5, .decay_frac = 0.5,
				 .warmup_steps = 4, .total_steps = 20 };

	ASSERT_REL(lr_at(&s, 0), 5e-5, 1e-12);
	ASSERT_REL(lr_at(&s, 3), 2e-4, 1e-12);
	CU_ASSERT(lr_at(&s, 4) == 2e-4 && lr_at(&s, 19) == 2e-4 && lr_at(&s, 100) == 2e-4);
}

static void test_lr_parse(void)
{
	enum lr_schedule_kind k = LR_CONSTANT;

	CU_ASSERT(lr_schedule_parse("cosine", &k) == 0 && k == LR_COSINE);
	CU_ASSERT(lr_schedule_parse("wsd", &k) == 0 && k == LR_WSD);
	CU_ASSERT(lr_schedule_parse("constant", &k) == 0 && k == LR_CONSTANT);

	static const char *const bad[] = { "", "Cosine", "cosine ", "linear", "wsdx", "const", NULL };

	k = LR_WSD;
	for (int i = 0; bad[i]; i++) {
		CU_ASSERT_EQUAL(lr_schedule_parse(bad[i], &k), -1);
		CU_ASSERT_EQUAL(k, LR_WSD);	/* untouched on error */
	}
}

/* ---------------------------------------------------------------- global norm and clipping */

static double ref_norm(const float *g, size_t n)
{
	double s = 0;

	for (size_t i = 0; i < n; i++)
		s += (double)g[i] * g[i];
	return sqrt(s);
}

static void test_norm_reference(void)
{
	const size_t sizes[] = { 0, 1, 7, 65535, 65536, 65537, 3 * 65536 + 12345 };
	const size_t nmax = 3 * 65536 + 12345;
	float *g = malloc(nmax * sizeof(float));

	CU_ASSERT_FATAL(g != NULL);
	test_rng_seed(3);
	test_fill_randn(g, nmax, 0.1f);
	for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
		double got = grad_global_norm(g, sizes[k]), want = ref_norm(g, sizes[k]);

		if (sizes[k] == 0) {
			CU_ASSERT(got == 0.0);
		} else {
			ASSERT_REL(got, want, 1e-12);
		}
	}

	const float g34[2] = { 3.0f, -4.0f };

	CU_ASSERT(grad_global_norm(g34, 2) == 5.0);
	free(g);
}

static void test_norm_threads(void)
{
	const size_t n = 5 * 65536 + 999;
	const int saved = omp_get_max_threads();
	float *g = malloc(n * sizeof(float));
	double r[4];

	CU_ASSERT_FATAL(g != NULL);
	test_rng_seed(4);
	test_fill_randn(g, n, 1.0f);
	for (int k = 0; k < 4; k++) {
		omp_set_num_threads(k + 1);
		r[k] = grad_global_norm(g, n);
	}
	omp_set_num_threads(saved);
	/* threads 1, 2 (and 3, 4): the same bits */
	CU_ASSERT(memcmp(&r[0], &r[1], sizeof(double)) == 0);
	CU_ASSERT(memcmp(&r[0], &r[2], sizeof(double)) == 0);
	CU_ASSERT(memcmp(&r[0], &r[3], sizeof(double)) == 0);
	free(g);
}

static void test_clip(void)
{
	const size_t n = 40000;
	float *g = malloc(n * sizeof(float)), *g0 = malloc(n * sizeof(float));

	CU_ASSERT_FATAL(g && g0);
	test_rng_seed(5);
	test_fill_randn(g0, n, 1.0f);
	memcpy(g, g0, n * sizeof(float));

	/* norm above max_norm: scaled by max_norm / norm, and the new norm is max_norm */
	double norm = grad_global_norm(g, n);
	float f = grad_clip(g, n, norm, 1.0);

	ASSERT_REL(f, 1.0 / norm, 1e-7);
	int scaled = 1;

	for (size_t i = 0; i < n; i++)
		scaled &= g[i] == g0[i] * f;
	CU_ASSERT(scaled);
	ASSERT_REL(grad_global_norm(g, n), 1.0, 1e-6);

	/* no-ops: norm below or equal to max_norm, clipping off (0 or negative): factor 1, g bit for bit */
	memcpy(g, g0, n * sizeof(float));
	CU_ASSERT(grad_clip(g, n, norm, 2 * norm) == 1.0f);
	CU_ASSERT(grad_clip(g, n, norm, norm) == 1.0f);
	CU_ASSERT(grad_clip(g, n, norm, 0.0) == 1.0f);
	CU_ASSERT(grad_clip(g, n, norm, -1.0) == 1.0f);
	CU_ASSERT(grad_clip(g, n, 0.0, 1.0) == 1.0f);
	CU_ASSERT(memcmp(g, g0, n * sizeof(float)) == 0);

	/* hand-sized: [3, -4] has norm 5; clipped to 1 -> [0.6, -0.8] */
	float s[2] = { 3.0f, -4.0f };

	f = grad_clip(s, 2, grad_global_norm(s, 2), 1.0);
	ASSERT_REL(f, 0.2, 1e-7);
	ASSERT_REL(s[0], 0.6, 1e-7);
	ASSERT_REL(s[1], -0.8, 1e-7);
	free(g);
	free(g0);
}

static void test_nonfinite(void)
{
	const size_t n = 70000;
	float *g = malloc(n * sizeof(float)), *g0 = malloc(n * sizeof(float));

	CU_ASSERT_FATAL(g && g0);
	test_rng_seed(6);
	test_fill_randn(g, n, 1.0f);

	/* one NaN anywhere (here in the second chunk) makes the norm NaN, on any thread count */
	g[65536 + 17] = NAN;
	CU_ASSERT(isnan(grad_global_norm(g, n)));
	memcpy(g0, g, n * sizeof(float));

	/* clipping with a non-finite norm: NAN, g untouched (whether clipping is on or off) */
	CU_ASSERT(isnan(grad_clip(g, n, NAN, 1.0)));
	CU_ASSERT(isnan(grad_clip(g, n, INFINITY, 1.0)));
	CU_ASSERT(isnan(grad_clip(g, n, NAN, 0.0)));
	CU_ASSERT(memcmp(g, g0, n * sizeof(float)) == 0);

	/* an infinite gradient: an infinite norm */
	g[65536 + 17] = 1.0f;
	g[3] = -INFINITY;
	double norm = grad_global_norm(g, n);

	CU_ASSERT(isinf(norm) && norm > 0);
	free(g);
	free(g0);
}

void register_tests(void)
{
	static const struct test_case adamw_cases[] = {
		{ "hand-worked two steps, decay, frozen, wd=0", test_adamw_hand },
		{ "10 random steps vs double reference", test_adamw_reference },
		{ "bit-identical on 1 and 3 threads", test_adamw_threads },
		{ "empty optimizer", test_adamw_empty },
		{ NULL, NULL },
	};
	static const struct test_case sched_cases[] = {
		{ "warmup", test_lr_warmup },
		{ "cosine", test_lr_cosine },
		{ "wsd", test_lr_wsd },
		{ "constant", test_lr_constant },
		{ "parse", test_lr_parse },
		{ NULL, NULL },
	};
	static const struct test_case norm_cases[] = {
		{ "global norm vs double reference", test_norm_reference },
		{ "global norm bit-identical across threads", test_norm_threads },
		{ "clip scaling and no-ops", test_clip },
		{ "non-finite gradients", test_nonfinite },
		{ NULL, NULL },
	};

	add_suite("adamw", adamw_cases);
	add_suite("lr_schedule", sched_cases);
	add_suite("grad_norm", norm_cases);
}
