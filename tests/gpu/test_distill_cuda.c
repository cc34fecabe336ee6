/*
 * tests/gpu/test_distill_cuda.c - distillation on the GPU (train/distill.h's *_gpu functions, the KL
 * kernels of model/cuda/ops_cuda.h) against the CPU path on the same weights and tokens:
 *   - the KL kernels row by row against distill_row_lse / distill_row_kl / distill_row_grad (rows of
 *     large and small logits, an ignored row, both directions, the gradient written in place);
 *   - a whole distillation step (teacher forward, student forward, KL, backward) with fp32 matmuls:
 *     loss, CE and KL, and every gradient of the student, forward and reverse KL, with an ignored target;
 *   - the same with bf16 matmuls, at bf16 tolerances.
 * The GPU outputs are poisoned before each run.  Without a device: one test printing SKIP.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "model/model.h"
#include "train/distill.h"

#ifdef MOE_HAVE_CUDA
#include "launch/cuda/device.h"
#include "model/cuda/model_cuda.h"
#include "model/cuda/ops_cuda.h"
#endif
#include "gpu/gpu_suite.h"

#ifdef MOE_HAVE_CUDA

static void *dev_copy(const void *h, size_t bytes)
{
	void *d = moe_cuda_malloc(bytes);
	moe_cuda_memcpy_h2d(d, h, bytes);
	return d;
}

static void check_kernels(enum distill_dir dir, double T)
{
	enum { N = 5, V = 301 };
	float *zs = test_xmalloc(sizeof(float) * N * V), *zt = test_xmalloc(sizeof(float) * N * V);
	float *g = test_xmalloc(sizeof(float) * N * V), *ref = test_xmalloc(sizeof(float) * V);
	double kl[N], ls[N], lt[N];
	int tgt[N] = { 3, 0, -1, 300, 7 };
	test_rng_seed(11 + dir);
	test_fill_randn(zs, (size_t)N * V, 2.0f);
	test_fill_randn(zt, (size_t)N * V, 2.0f);
	for (int j = 0; j < V; j++)
		zs[4 * V + j] *= 20.0f;  /* a peaked row: the max subtraction matters */
	float *dzs = dev_copy(zs, sizeof(float) * N * V), *dzt = dev_copy(zt, sizeof(float) * N * V);
	int *dt = dev_copy(tgt, sizeof(tgt));
	double *dkl = moe_cuda_malloc(sizeof(kl)), *dls = moe_cuda_malloc(sizeof(ls)), *dlt = moe_cuda_malloc(sizeof(lt));
	int rev = dir == DISTILL_REVERSE;
	kl_div_rows_cuda(dkl, dls, dlt, dzs, dzt, dt, N, V, T, rev);
	kl_div_grad_rows_cuda(dzt, dzs, dzt, dt, dls, dlt, dkl, N, V, T, rev, 0.3);  /* in place */
	moe_cuda_memcpy_d2h(kl, dkl, sizeof(kl));
	moe_cuda_memcpy_d2h(g, dzt, sizeof(float) * N * V);
	double worst_kl = 0, worst_g = 0;
	for (int n = 0; n < N; n++) {
		const float *s = zs + (size_t)n * V, *t = zt + (size_t)n * V;
		if (tgt[n] < 0) {
			CU_ASSERT_EQUAL(kl[n], 0.0);
			for (int j = 0; j < V; j++)
				CU_ASSERT_EQUAL(g[(size_t)n * V + j], 0.0f);
			continue;
		}
		double lse_s = distill_row_lse(s, V, T), lse_t = distill_row_lse(t, V, T);
		double k = distill_row_kl(s, t, V, T, dir, lse_s, lse_t);
		distill_row_grad(ref, s, t, V, T, dir, lse_s, lse_t, k, 0.3);
		double ek = fabs(kl[n] - k) / (k > 1e-3 ? k : 1e-3), eg = norm_rel_err(g + (size_t)n * V, ref, V);
		worst_kl = ek > worst_kl ? ek : worst_kl;
		worst_g = eg > worst_g ? eg : worst_g;
	}
	printf("\n  KL(%s), T %.1f: kernel vs CPU: kl rel %.1e, grad rel %.1e", rev ? "s||t" : "t||s", T, worst_kl,
	       worst_g);
	CU_ASSERT(worst_kl <= 1e-6);  /* double sums and log-probabilities, as on the CPU */
	CU_ASSERT(worst_g <= 1e-6);
	moe_cuda_free(dzs);
	moe_cuda_free(dzt);
	moe_cuda_free(dt);
	moe_cuda_free(dkl);
	moe_cuda_free(dls);
	moe_cuda_free(dlt);
	free(zs);
	free(zt);
	free(g);
	free(ref);
}

static void test_kernels_forward(void)
{
	check_kernels(DISTILL_FORWARD, 2.0);
	check_kernels(DISTILL_FORWARD, 0.7);
}

static void test_kernels_reverse(void)
{
	check_kernels(DISTILL_REVERSE, 2.0);
}

/* student dense-and-MoE, teacher wider and deeper with more experts, the same vocabulary */
static struct moe_model *make(int hidden, int layers, int experts, uint64_t seed, int grads)
{
	struct model_config c;
	char err[256];
	test_ep_moe(&c, hidden, 2 * hidden, hidden / 2, layers);
	c.n_routed_experts = experts;
	c.n_group = experts / 2;
	c.topk_group = 1;
	c.num_experts_per_tok = 2;
	struct moe_model *m = model_create(&c, 0, experts, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	model_init_weights(m, seed);
	test_separate_routers(m, seed + 1);
	if (!grads)
		model_drop_grads(m);
	return m;
}

struct outcome {
	float loss;
	double ce, kl;
	float *grads;
};

static struct outcome run(int gpu, int bf16, enum distill_dir dir, const int *in, const int *tgt, int B, int T)
{
	struct moe_model *m = make(16, 2, 4, 5, 1), *teacher = make(24, 3, 8, 6, 0);
	struct distill ds;
	struct outcome o;
	char err[256];
	CU_ASSERT_FATAL(distill_init(&ds, teacher, 0.6, 2.0, dir, B * T) == 0);
	struct gpu_model *g = NULL;
	if (gpu) {
		g = gpu_model_create(m, bf16, err, sizeof(err));
		CU_ASSERT_PTR_NOT_NULL_FATAL(g);
		CU_ASSERT_FATAL(distill_to_device(&ds, bf16, "test") == 0);
		gpu_model_zero_grad(g);
	} else {
		model_zero_grad(m);
	}
	o.loss = distill_forward_gpu(&ds, m, g, in, tgt, B, T);
	distill_backward_begin(&ds, m, g);
	if (g)
		gpu_model_backward(g, 1.0f);
	else
		model_backward(m, 1.0f);
	distill_backward_end(&ds, m, g);
	CU_ASSERT_PTR_NULL(m->token_weights);
	CU_ASSERT_PTR_NULL(m->logit_term);
	if (g) {
		for (size_t i = 0; i < m->n_weights; i++)
			m->grads[i] = NAN;  /* a gradient the download misses stays NaN */
		gpu_model_download_grads(g);
		gpu_model_free(g);
	}
	o.ce = ds.last_ce;
	o.kl = ds.last_kl;
	o.grads = test_xmalloc(sizeof(float) * m->n_weights);
	memcpy(o.grads, m->grads, sizeof(float) * m->n_weights);
	distill_close(&ds);
	model_free(m);
	return o;
}

static void check_step(enum distill_dir dir, int bf16)
{
	enum { B = 2, T = 6, N = B * T };
	int in[N], tgt[N];
	for (int i = 0; i < N; i++) {
		in[i] = (i * 7 + 3) % 37;
		tgt[i] = (i * 5 + 1) % 37;
	}
	tgt[4] = -1;  /* an ignored target: neither CE nor KL */
	struct outcome c = run(0, 0, dir, in, tgt, B, T), g = run(1, bf16, dir, in, tgt, B, T);
	struct moe_model *shape = make(16, 2, 4, 5, 1);
	double el = fabs(g.loss - c.loss) / fabs(c.loss), ece = fabs(g.ce - c.ce) / c.ce, ekl = fabs(g.kl - c.kl) / c.kl;
	double eg = norm_rel_err(g.grads, c.grads, shape->n_weights);
	printf("\n  KL(%s), %s: GPU vs CPU: loss rel %.1e, ce %.1e, kl %.1e (kl %.4f), grads rel %.1e",
	       dir == DISTILL_REVERSE ? "s||t" : "t||s", bf16 ? "bf16" : "fp32", el, ece, ekl, c.kl, eg);
	double tol = bf16 ? 3e-2 : 1e-4;
	CU_ASSERT(c.kl > 1e-3);
	CU_ASSERT(el <= tol && ece <= tol && ekl <= (bf16 ? 0.1 : 1e-4));
	CU_ASSERT(eg <= (bf16 ? 0.1 : 1e-4));
	model_free(shape);
	free(c.grads);
	free(g.grads);
}

static void test_step_forward_fp32(void) { check_step(DISTILL_FORWARD, 0); }
static void test_step_reverse_fp32(void) { check_step(DISTILL_REVERSE, 0); }
static void test_step_forward_bf16(void) { check_step(DISTILL_FORWARD, 1); }

static const struct test_case cases[] = {
	{ "KL kernels equal the CPU rows, forward KL", test_kernels_forward },
	{ "KL kernels equal the CPU rows, reverse KL", test_kernels_reverse },
	{ "a distillation step equals the CPU's, forward KL, fp32", test_step_forward_fp32 },
	{ "a distillation step equals the CPU's, reverse KL, fp32", test_step_reverse_fp32 },
	{ "a distillation step equals the CPU's, forward KL, bf16", test_step_forward_bf16 },
	{ NULL, NULL },
};
#endif

void register_tests(void)
{
#ifdef MOE_HAVE_CUDA
	add_gpu_suite("distillation on the GPU", cases);
#else
	add_gpu_suite("distillation on the GPU", NULL);
#endif
}
