/*
 * tests/gpu/test_adamw_cuda.c - the GPU optimizer (optim/cuda/adamw_cuda.h) against its CPU reference
 * (optim/adamw.h) on the same random inputs.
 *
 *  - AdamW: several steps of adamw_update vs adamw_cuda_update over segments of mixed decay, tiny ones,
 *    a frozen one and a gap, given out of order, with n not a multiple of the block size, clipping on
 *    some steps (the CPU clips a copy of g with grad_clip, the GPU gets the factor as grad_scale) and both
 *    branches of PyTorch's lerp (beta1 0.9 and 0.3).  Weights and both moments are compared after every
 *    step (the kernel avoids contracted multiply-adds, so they should even agree bit for bit: the count of
 *    differing elements is printed); the frozen segment and the gap must stay exactly as they were.
 *  - The bf16 copy is poisoned (0xFFFF) before each step and must equal, bit for bit, the round-to-nearest-
 *    even bf16 of the GPU weights; with w_bf16 NULL it stays untouched.
 *  - The global norm against grad_global_norm (rel err 1e-10: the summation orders differ) and bit-identical
 *    across two calls; vec_scale; the state's upload / download round trip, and an update from an
 *    uploaded state; bad segment tables are refused.
 * NaN never passes a comparison; every result that should be finite is checked to be.
 * Without the CUDA backend, or without a device, the suite is one test that prints "SKIP: no CUDA device"
 * and passes.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "optim/adamw.h"

#ifdef MOE_HAVE_CUDA
#include "launch/cuda/device.h"
#include "optim/cuda/adamw_cuda.h"
#endif
#include "gpu/gpu_suite.h"

#ifdef MOE_HAVE_CUDA

/* fp32 on both sides, the same operations in the same order: anything above rounding noise is a bug */
#define TOL 1e-6
/* the norm's two summation orders (both in double) */
#define NORM_TOL 1e-10

/* ---- helpers ---- */

static float *h_randn(size_t n, float scale)
{
	float *p = test_xmalloc(sizeof(float) * n);
	test_fill_randn(p, n, scale);
	return p;
}

static float *h_copy(const float *src, size_t n)
{
	float *p = test_xmalloc(sizeof(float) * n);
	memcpy(p, src, sizeof(float) * n);
	return p;
}

static float *d_floats(const float *host, size_t n)
{
	float *d = moe_cuda_malloc(sizeof(float) * n);
	moe_cuda_memcpy_h2d(d, host, sizeof(float) * n);
	return d;
}

static float *h_from_dev(const float *d, size_t n)
{
	float *h = test_xmalloc(sizeof(float) * n);
	moe_cuda_memcpy_d2h(h, d, sizeof(float) * n);
	return h;
}

static int all_finite(const float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (!isfinite(x[i]))
			return 0;
	return 1;
}

/* the bits of a float in bf16, rounded to nearest even (what __float2bfloat16 does; NaN -> 0x7FFF) */
static uint16_t bf16_bits(float f)
{
	uint32_t u;

	memcpy(&u, &f, sizeof(u));
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return 0x7fff;
	u += 0x7fffu + ((u >> 16) & 1u);
	return (uint16_t)(u >> 16);
}

static void report_end(void)
{
	printf("\n  ");
}

/*
 * A host copy of a GPU result against the CPU reference: max |gpu - cpu| / max(|cpu|, rms(cpu)), and
 * the number of elements whose bits differ (printed, for information).  Returns the error.
 */
static double expect_close(const char *what, const float *gpu, const float *cpu, size_t n, double tol)
{
	double ss = 0.0;
	size_t diff = 0;

	for (size_t i = 0; i < n; i++) {
		ss += (double)cpu[i] * cpu[i];
		diff += memcmp(&gpu[i], &cpu[i], sizeof(float)) != 0;
	}
	double floor = n ? sqrt(ss / n) : 0.0;
	if (floor < 1e-30)
		floor = 1e-30;
	double err = rel_err(gpu, cpu, n, floor);
	int ok = all_finite(gpu, n) && all_finite(cpu, n);
	printf("\n    %-30s n=%-7zu rel err %-9.3g bits differ %zu", what, n, err, diff);
	if (!(err <= tol) || !ok)
		printf("  FAIL (tol %.1g%s)", tol, ok ? "" : ", not finite");
	CU_ASSERT(ok);
	CU_ASSERT(err <= tol);
	return err;
}

/* ---- AdamW ---- */

/*
 * The segment table (given out of order): decayed matrices, an undecayed "norm", one-element and
 * two-element segments (several spans inside one thread's tile), a frozen segment and a gap of 7
 * elements that no segment covers.
 */
#define NSEGS 7
#define FROZEN_LO 30064
#define FROZEN_HI 50000
#define GAP_LO 50003
#define GAP_HI 50010
static const struct optim_segment test_segs[NSEGS] = {
	{ .offset = 50010, .numel = 100003 - 50010, .weight_decay = 0.05f },
	{ .offset = 30000, .numel = 64, .weight_decay = 0.0f },
	{ .offset = 0, .numel = 30000, .weight_decay = 0.1f },
	{ .offset = FROZEN_LO, .numel = FROZEN_HI - FROZEN_LO, .weight_decay = 0.1f, .frozen = true },
	{ .offset = 50000, .numel = 1, .weight_decay = 0.1f },
	{ .offset = 50001, .numel = 2, .weight_decay = 0.0f },
	{ .offset = 50003, .numel = 0, .weight_decay = 0.1f },   /* empty: ignored */
};
#define TEST_N 100003

/* the frozen segment and the gap: weights exactly as they started, moments exactly 0 */
static void expect_untouched(const float *w, const float *w0, const float *m, const float *v)
{
	size_t bad = 0;
	size_t ranges[2][2] = { { FROZEN_LO, FROZEN_HI }, { GAP_LO, GAP_HI } };

	for (int r = 0; r < 2; r++)
		for (size_t i = ranges[r][0]; i < ranges[r][1]; i++)
			bad += memcmp(&w[i], &w0[i], sizeof(float)) != 0 || m[i] != 0.0f || v[i] != 0.0f;
	if (bad)
		printf("\n    FAIL: %zu frozen / gap elements changed", bad);
	CU_ASSERT(bad == 0);
}

/* the bf16 copy against the GPU weights (or, when none was asked for, still all poison) */
static void expect_bf16(const uint16_t *d_wb, const float *w, size_t n, int written)
{
	uint16_t *wb = test_xmalloc(sizeof(uint16_t) * n);
	size_t bad = 0, first = 0;

	moe_cuda_memcpy_d2h(wb, d_wb, sizeof(uint16_t) * n);
	for (size_t i = 0; i < n; i++) {
		uint16_t want = written ? bf16_bits(w[i]) : 0xffff;
		if (wb[i] != want && bad++ == 0)
			first = i;
	}
	printf("\n    %-30s n=%-7zu mismatches %zu", written ? "bf16 copy" : "bf16 untouched (NULL)", n, bad);
	if (bad)
		printf("  FAIL: first at %zu: gpu 0x%04x want 0x%04x", first, wb[first],
		       written ? bf16_bits(w[first]) : 0xffff);
	CU_ASSERT(bad == 0);
	free(wb);
}

/*
 * One step on both sides.  clip_frac > 0 clips to that fraction of the gradient's norm (the CPU scales a
 * copy of g, the GPU gets the factor); 0 does not clip.
 */
static void step_both(struct adamw *cpu, float *w, struct adamw_cuda *gpu, float *d_w, float *d_g,
		      uint16_t *d_wb, const float *g, const struct adamw_hparams *h, double clip_frac, int bf16)
{
	const size_t n = TEST_N;
	float *gc = h_copy(g, n);
	float scale = 1.0f;

	if (clip_frac > 0) {
		double norm = grad_global_norm(gc, n);
		scale = grad_clip(gc, n, norm, clip_frac * norm);
		CU_ASSERT(scale < 1.0f && scale > 0.0f);
	}
	adamw_update(cpu, w, gc, test_segs, NSEGS, h);

	moe_cuda_memcpy_h2d(d_g, g, sizeof(float) * n);
	moe_cuda_memset(d_wb, 0xFF, sizeof(uint16_t) * n);
	adamw_cuda_update(gpu, d_w, d_g, h, scale, bf16 ? d_wb : NULL);
	moe_cuda_synchronize();
	free(gc);
}

static void compare_state(const struct adamw *cpu, const float *w, const float *w0,
			  const struct adamw_cuda *gpu, const float *d_w, const uint16_t *d_wb, int bf16)
{
	const size_t n = TEST_N;
	float *gw = h_from_dev(d_w, n), *gm = h_from_dev(gpu->exp_avg, n), *gv = h_from_dev(gpu->exp_avg_sq, n);

	CU_ASSERT(gpu->step == cpu->step);
	expect_close("weights", gw, w, n, TOL);
	expect_close("exp_avg", gm, cpu->exp_avg, n, TOL);
	expect_close("exp_avg_sq", gv, cpu->exp_avg_sq, n, TOL);
	expect_untouched(gw, w0, gm, gv);
	expect_bf16(d_wb, gw, n, bf16);
	free(gw);
	free(gm);
	free(gv);
}

static void adamw_case(const char *name, const struct adamw_hparams *h, uint64_t seed)
{
	const size_t n = TEST_N;
	const int steps = 5;
	struct adamw cpu;
	struct adamw_cuda gpu;

	printf("\n  %s (lr %g, beta1 %g, beta2 %g, eps %g)", name, h->lr, h->beta1, h->beta2, h->eps);
	test_rng_seed(seed);
	float *w = h_randn(n, 0.5f), *w0 = h_copy(w, n);
	CU_ASSERT_FATAL(adamw_init(&cpu, n) == 0);
	CU_ASSERT_FATAL(adamw_cuda_init(&gpu, n, test_segs, NSEGS) == 0);
	float *d_w = d_floats(w, n), *d_g = moe_cuda_malloc(sizeof(float) * n);
	uint16_t *d_wb = moe_cuda_malloc(sizeof(uint16_t) * n);

	for (int s = 0; s < steps; s++) {
		/* the gradient's scale varies (v's history matters); clip on odd steps; no bf16 on step 3 */
		float *g = h_randn(n, s == 2 ? 10.0f : 1.0f);
		int bf16 = s != 3;

		step_both(&cpu, w, &gpu, d_w, d_g, d_wb, g, h, s % 2 ? 0.5 : 0.0, bf16);
		printf("\n   step %d%s%s", s + 1, s % 2 ? " (clipped)" : "", bf16 ? "" : " (w_bf16 NULL)");
		compare_state(&cpu, w, w0, &gpu, d_w, d_wb, bf16);
		free(g);
	}
	adamw_cuda_free(&gpu);
	adamw_cuda_free(&gpu); /* a second free is harmless */
	adamw_free(&cpu);
	moe_cuda_free(d_w);
	moe_cuda_free(d_g);
	moe_cuda_free(d_wb);
	free(w);
	free(w0);
}

static void test_adamw(void)
{
	const struct adamw_hparams lerp_low = { .lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f };
	const struct adamw_hparams lerp_high = { .lr = 3e-2f, .beta1 = 0.3f, .beta2 = 0.999f, .eps = 1e-6f };

	adamw_case("beta1 0.9 (lerp m + w (g - m))", &lerp_low, 21);
	adamw_case("beta1 0.3 (lerp g - (g - m)(1 - w))", &lerp_high, 22);
	report_end();
}

/* ---- state round trip ---- */

static void test_state(void)
{
	const size_t n = TEST_N;
	const struct adamw_hparams h = { .lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f };
	struct adamw a, b;
	struct adamw_cuda gpu;

	test_rng_seed(31);
	CU_ASSERT_FATAL(adamw_init(&a, n) == 0 && adamw_init(&b, n) == 0);
	CU_ASSERT_FATAL(adamw_cuda_init(&gpu, n, test_segs, NSEGS) == 0);
	/* a state as if trained: second moments positive, frozen elements 0 as the CPU keeps them */
	test_fill_randn(a.exp_avg, n, 0.1f);
	test_fill_randn(a.exp_avg_sq, n, 0.1f);
	for (size_t i = 0; i < n; i++) {
		a.exp_avg_sq[i] *= a.exp_avg_sq[i];
		if ((i >= FROZEN_LO && i < FROZEN_HI) || (i >= GAP_LO && i < GAP_HI))
			a.exp_avg[i] = a.exp_avg_sq[i] = 0.0f;
	}
	a.step = 7;

	adamw_cuda_upload_state(&gpu, &a);
	memset(b.exp_avg, 0xFF, sizeof(float) * n);
	memset(b.exp_avg_sq, 0xFF, sizeof(float) * n);
	b.step = -1;
	adamw_cuda_download_state(&gpu, &b);
	int same = b.step == 7 && memcmp(a.exp_avg, b.exp_avg, sizeof(float) * n) == 0 &&
		   memcmp(a.exp_avg_sq, b.exp_avg_sq, sizeof(float) * n) == 0;
	printf("\n    %-30s n=%-7zu %s", "upload / download", n, same ? "bit-identical" : "FAIL: differs");
	CU_ASSERT(same);

	/* one step from the uploaded state (step 8's bias corrections) on both sides */
	float *w = h_randn(n, 0.5f), *w0 = h_copy(w, n), *g = h_randn(n, 1.0f);
	float *d_w = d_floats(w, n), *d_g = moe_cuda_malloc(sizeof(float) * n);
	uint16_t *d_wb = moe_cuda_malloc(sizeof(uint16_t) * n);
	step_both(&a, w, &gpu, d_w, d_g, d_wb, g, &h, 0.0, 1);
	CU_ASSERT(a.step == 8);
	compare_state(&a, w, w0, &gpu, d_w, d_wb, 1);

	adamw_cuda_free(&gpu);
	adamw_free(&a);
	adamw_free(&b);
	moe_cuda_free(d_w);
	moe_cuda_free(d_g);
	moe_cuda_free(d_wb);
	free(w);
	free(w0);
	free(g);
	report_end();
}

/* ---- segment tables that adamw_cuda_init must refuse ---- */

static void test_bad_segments(void)
{
	const struct optim_segment overlap[2] = {
		{ .offset = 0, .numel = 10, .weight_decay = 0.1f },
		{ .offset = 9, .numel = 5, .weight_decay = 0.0f },
	};
	const struct optim_segment past_end[1] = { { .offset = 90, .numel = 11 } };
	struct adamw_cuda o;

	printf("\n    (two refusals on stderr are expected)");
	CU_ASSERT(adamw_cuda_init(&o, 100, overlap, 2) == -1);
	CU_ASSERT(o.exp_avg == NULL && o.n == 0);
	CU_ASSERT(adamw_cuda_init(&o, 100, past_end, 1) == -1);
	/* empty: a valid optimizer of nothing, whose update only counts the step */
	CU_ASSERT_FATAL(adamw_cuda_init(&o, 0, NULL, 0) == 0);
	adamw_cuda_update(&o, NULL, NULL, &(struct adamw_hparams){ 1e-3f, 0.9f, 0.95f, 1e-8f }, 1.0f, NULL);
	CU_ASSERT(o.step == 1);
	adamw_cuda_free(&o);
	report_end();
}

/* ---- global norm, vec_scale ---- */

static void norm_case(size_t n, float scale)
{
	float *g = h_randn(n, scale);
	float *d_g = d_floats(g, n);
	double cpu = grad_global_norm(g, n);
	double a = grad_global_norm_cuda(d_g, n), b = grad_global_norm_cuda(d_g, n);
	double err = fabs(a - cpu) / (cpu > 0 ? cpu : 1.0);
	int same = memcmp(&a, &b, sizeof(double)) == 0;

	printf("\n    norm n=%-8zu gpu %.17g cpu %.17g rel err %.3g %s", n, a, cpu, err,
	       same ? "bit-identical" : "FAIL: calls differ");
	CU_ASSERT(isfinite(a) && isfinite(cpu) && a > 0);
	CU_ASSERT(err <= NORM_TOL);
	CU_ASSERT(same);
	moe_cuda_free(d_g);
	free(g);
}

static void test_norm(void)
{
	test_rng_seed(41);
	norm_case(1, 1.0f);
	norm_case(257, 3.0f);
	norm_case(TEST_N, 1.0f);
	norm_case(300001, 1e-3f);   /* more blocks than the grid: the strided loop */
	CU_ASSERT(grad_global_norm_cuda(NULL, 0) == 0.0);
	report_end();
}

static void test_vec_scale(void)
{
	const size_t n = 10007;
	const float s = 0.37f;

	test_rng_seed(51);
	float *x = h_randn(n, 1.0f), *d_x = d_floats(x, n);
	for (size_t i = 0; i < n; i++)
		x[i] *= s;
	vec_scale_cuda(d_x, s, n);
	float *gx = h_from_dev(d_x, n);
	expect_close("vec_scale", gx, x, n, 0.0);
	moe_cuda_free(d_x);
	free(x);
	free(gx);
	report_end();
}

#endif /* MOE_HAVE_CUDA */

void register_tests(void)
{
#ifdef MOE_HAVE_CUDA
	static const struct test_case cases[] = {
		{"adamw", test_adamw},
		{"state", test_state},
		{"bad_segments", test_bad_segments},
		{"norm", test_norm},
		{"vec_scale", test_vec_scale},
		{NULL, NULL},
	};
	add_gpu_suite("adamw_cuda", cases);
#else
	add_gpu_suite("adamw_cuda", NULL);
#endif
}
