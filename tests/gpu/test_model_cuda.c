/*
 * tests/gpu/test_model_cuda.c - the whole model on the GPU (model/cuda/model_cuda.h) against the CPU model
 * on the same weights and tokens: the loss and its parts, the logits, the expert loads and every
 * parameter's gradient, for each model variant, in fp32 (tight: only summation order differs) and with
 * bf16 matmuls (bf16 tolerances), and two forward/backward calls accumulating like model_backward.
 *
 * The GPU's outputs are poisoned (NaN) before each run, so a buffer it forgets to write fails.  Without
 * the CUDA backend, or without a device, the suite is one test that prints "SKIP: no CUDA device".
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "model/model.h"

#ifdef MOE_HAVE_CUDA
#include "model/cuda/model_cuda.h"
#include "model/cuda/ops_cuda.h"
#endif
#include "gpu/gpu_suite.h"

#ifdef MOE_HAVE_CUDA

/* The shapes of tests/model/test_model.c, wider, with DeepSeek's head dims ratio (dq 192 / dv 128 is
 * what the attention kernel is sized for; a smaller pair exercises its masking). */
static struct model_config gpu_config(enum test_variant v)
{
	struct model_config c = {
		.vocab_size = 97, .hidden_size = 64, .intermediate_size = 96, .moe_intermediate_size = 32,
		.num_hidden_layers = 3, .num_attention_heads = 4, .num_key_value_heads = 4,
		.n_shared_experts = 1, .n_routed_experts = 8, .routed_scaling_factor = 2.5,
		.kv_lora_rank = 32, .q_lora_rank = 24, .qk_rope_head_dim = 8, .qk_nope_head_dim = 16,
		.v_head_dim = 16, .n_group = 4, .topk_group = 2, .num_experts_per_tok = 2,
		.moe_layer_freq = 1, .first_k_dense_replace = 1, .norm_topk_prob = true,
		.scoring_func = MOE_SCORING_SIGMOID, .aux_loss_alpha = 0.05, .seq_aux = true,
		.max_position_embeddings = 64, .initializer_range = 0.1, .rms_norm_eps = 1e-6,
		.rope_theta = 10000.0,
	};
	test_apply_variant(&c, v, 8);
	return c;
}

struct run {
	float loss, ce, aux;
	float *logits;     /* [N, V] */
	float *grads;      /* [n_weights] */
	int64_t *load;     /* [L, E] */
	float *tok;        /* [N] per-token losses */
};

static void run_free(struct run *r)
{
	free(r->tok);
	free(r->logits);
	free(r->grads);
	free(r->load);
}

/* logits NULL: the GPU model held them in chunks (g_logit_rows), nothing to compare */
static void keep(struct run *r, const struct moe_model *m, float loss, const float *logits, size_t NV)
{
	size_t LE = (size_t)m->cfg.num_hidden_layers * m->cfg.n_routed_experts;
	r->loss = loss;
	r->ce = m->last_ce_loss;
	r->aux = m->last_aux_loss;
	r->logits = NULL;
	if (logits) {
		r->logits = test_xmalloc(sizeof(float) * NV);
		memcpy(r->logits, logits, sizeof(float) * NV);
	}
	r->load = test_xmalloc(sizeof(int64_t) * (LE ? LE : 1));
	memcpy(r->load, m->expert_load, sizeof(int64_t) * LE);
	r->grads = test_xmalloc(sizeof(float) * m->n_weights);
}

/* the per-token losses of the last forward (a HOST array) */
static void keep_token_losses(struct run *r, const float *tok, size_t N)
{
	r->tok = test_xmalloc(sizeof(float) * N);
	memcpy(r->tok, tok, sizeof(float) * N);
}

/* `calls` forward/backward pairs (each with its own tokens, loss_scale 1/calls) on the CPU */
static void run_cpu(struct moe_model *m, const int *in, const int *tg, int B, int T, int calls, struct run *r)
{
	size_t NV = (size_t)B * T * m->cfg.vocab_size;
	model_zero_grad(m);
	float loss = 0.0f;
	for (int i = 0; i < calls; i++) {
		loss = model_forward(m, in + (size_t)i * B * T, tg + (size_t)i * B * T, B, T);
		if (i == calls - 1) {
			keep(r, m, loss, model_logits(m), NV);
			keep_token_losses(r, model_token_losses(m), (size_t)B * T);
		}
		model_backward(m, 1.0f / calls);
	}
	memcpy(r->grads, m->grads, sizeof(float) * m->n_weights);
}

/* the GPU model's gpu_model_logit_rows for run_gpu: -1 its default (every test shape fits: all rows) */
static int g_logit_rows = -1;

static void run_gpu(struct moe_model *m, int bf16, const int *in, const int *tg, int B, int T, int calls,
		    struct run *r)
{
	size_t NV = (size_t)B * T * m->cfg.vocab_size;
	char err[256];
	struct gpu_model *g = gpu_model_create(m, bf16, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(g);
	gpu_model_logit_rows(g, g_logit_rows);
	/* poison: the gradient arena must be written by zero_grad + backward, the logits by the forward */
	moe_cuda_memset(gpu_model_grads(g), 0xFF, sizeof(float) * m->n_weights);
	gpu_model_zero_grad(g);
	memset(m->expert_load, 0xFF, sizeof(int64_t) * (size_t)m->cfg.num_hidden_layers * m->cfg.n_routed_experts);
	float *logits = test_xmalloc(sizeof(float) * NV);
	float loss = 0.0f;
	for (int i = 0; i < calls; i++) {
		if (i > 0 && gpu_model_logits(g))  /* the activations persist between calls: poison the last logits */
			moe_cuda_memset((void *)gpu_model_logits(g), 0xFF, sizeof(float) * NV);
		loss = gpu_model_forward(g, in + (size_t)i * B * T, tg + (size_t)i * B * T, B, T);
		if (i == calls - 1) {
			int held = gpu_model_logits(g) != NULL;
			CU_ASSERT_EQUAL(held, g_logit_rows < 0 || g_logit_rows == 0 || g_logit_rows >= B * T);
			if (held)
				moe_cuda_memcpy_d2h(logits, gpu_model_logits(g), sizeof(float) * NV);
			keep(r, m, loss, held ? logits : NULL, NV);
			keep_token_losses(r, gpu_model_token_losses(g), (size_t)B * T);
		}
		gpu_model_backward(g, 1.0f / calls);
	}
	moe_cuda_synchronize();
	float *host_grads = m->grads;  /* download into r->grads without touching the CPU's arena */
	m->grads = r->grads;
	gpu_model_download_grads(g);
	m->grads = host_grads;
	free(logits);
	gpu_model_free(g);
}

/*
 * Tolerances.  fp32 differs from the CPU only in summation order.  bf16 rounds every matmul operand to 8
 * significant bits; how far that moves a gradient depends on the model (cancellation in small random
 * models amplifies it), so the bound is relative to a measured scale: the same CPU run with its weights
 * rounded to bf16 (one bf16 rounding, of the weights only).  The GPU, which also rounds the activation
 * operands, must stay within `scale` times that per tensor, plus `grad`.  A wrong operand (a weight
 * offset, a transposed product) lands orders of magnitude outside.
 */
struct tol {
	double loss, aux, logits, grad, scale;  /* aux: the balance loss counts routes, a flip moves it */
};

static uint16_t bf16_bits(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((u >> 16) | 0x40);
	u += 0x7fffu + ((u >> 16) & 1u);  /* round to nearest even */
	return (uint16_t)(u >> 16);
}

static float bf16_round(float f)
{
	uint32_t u = (uint32_t)bf16_bits(f) << 16;
	memcpy(&f, &u, 4);
	return f;
}

/* err(gpu) < base + scale * err(sens), the sens term only with a sensitivity run */
static int within(double e, double base, const struct tol *t, const struct run *sens, double es)
{
	return e < base + (sens ? t->scale * es : 0.0);
}

static double scalar_rel(float a, float b)
{
	return b != 0 ? fabs((double)a - b) / fabs((double)b) : fabs((double)a);
}

static void compare(const struct moe_model *m, const struct run *gpu, const struct run *cpu,
		    const struct run *sens, size_t NV, const char *what, const struct tol *t)
{
	const struct model_config *c = &m->cfg;
	size_t LE = (size_t)c->num_hidden_layers * c->n_routed_experts;
	double el = scalar_rel(gpu->loss, cpu->loss), ea = scalar_rel(gpu->aux, cpu->aux);
	double elog = gpu->logits ? norm_rel_err(gpu->logits, cpu->logits, NV) : 0.0;  /* NULL: held in chunks */
	double sl = sens ? scalar_rel(sens->loss, cpu->loss) : 0, sa = sens ? scalar_rel(sens->aux, cpu->aux) : 0;
	double slog = sens && sens->logits ? norm_rel_err(sens->logits, cpu->logits, NV) : 0;
	int load_diff = 0;
	for (size_t i = 0; i < LE; i++)
		load_diff += gpu->load[i] != cpu->load[i];
	printf("\n    %-20s loss %.7f gpu %.7f rel %.1e  aux rel %.1e  logits %.1e  loads differ %d", what, cpu->loss,
	       gpu->loss, el, ea, elog, load_diff);
	if (sens)
		printf("\n    %-20s (bf16 weights alone, on the CPU: loss %.1e aux %.1e logits %.1e)", "", sl, sa, slog);
	CU_ASSERT(isfinite(gpu->loss) && within(el, t->loss, t, sens, sl));
	CU_ASSERT(within(ea, t->aux, t, sens, sa));
	CU_ASSERT(within(elog, t->logits, t, sens, slog));
	if (!sens)  /* fp32: the same routing, exactly */
		CU_ASSERT(load_diff == 0);

	double worst = 0.0;
	const char *worst_name = "";
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		if (p->kind == PARAM_BUFFER)
			continue;
		double e = norm_rel_err(gpu->grads + p->offset, cpu->grads + p->offset, p->numel);
		double es = sens ? norm_rel_err(sens->grads + p->offset, cpu->grads + p->offset, p->numel) : 0;
		if (!within(e, t->grad, t, sens, es))
			printf("\n      %s: grad rel err %.3e (bf16 weights alone %.3e)", p->name, e, es);
		CU_ASSERT(within(e, t->grad, t, sens, es));
		if (!(e <= worst)) {
			worst = e;
			worst_name = p->name;
		}
	}
	printf("\n    %-20s worst grad %.2e (%s)", "", worst, worst_name);
}

static void check_variant(enum test_variant v, int bf16, int calls)
{
	struct model_config c = gpu_config(v);
	char err[256], what[64];
	struct moe_model *m = model_create(&c, 0, c.n_routed_experts, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	model_init_weights(m, 7 + v);
	if (c.n_routed_experts)
		test_separate_routers(m, 11 + v);

	const int B = 2, T = 24;
	int *in = test_xmalloc(sizeof(int) * B * T * calls), *tg = test_xmalloc(sizeof(int) * B * T * calls);
	test_rng_seed(100 + v);
	for (int i = 0; i < B * T * calls; i++) {
		in[i] = (int)(test_rand_uniform(0, 1) * c.vocab_size) % c.vocab_size;
		tg[i] = i % 7 == 3 ? -1 : (int)(test_rand_uniform(0, 1) * c.vocab_size) % c.vocab_size;
	}
	struct run cpu = { 0 }, gpu = { 0 }, sens = { 0 };
	run_cpu(m, in, tg, B, T, calls, &cpu);
	if (bf16) {  /* the scale of a bf16 rounding: the CPU run on bf16-rounded weights */
		float *w = test_xmalloc(sizeof(float) * m->n_weights);
		memcpy(w, m->weights, sizeof(float) * m->n_weights);
		for (size_t i = 0; i < m->n_weights; i++)
			m->weights[i] = bf16_round(w[i]);
		run_cpu(m, in, tg, B, T, calls, &sens);
		memcpy(m->weights, w, sizeof(float) * m->n_weights);
		free(w);
	}
	run_gpu(m, bf16, in, tg, B, T, calls, &gpu);
	snprintf(what, sizeof(what), "%s %s%s", test_variant_name[v], bf16 ? "bf16" : "fp32", calls > 1 ? " x2" : "");
	struct tol fp32 = { 1e-5, 1e-5, 1e-5, 1e-4, 0 }, half = { 5e-3, 5e-2, 2e-2, 2e-2, 4.0 };
	compare(m, &gpu, &cpu, bf16 ? &sens : NULL, (size_t)B * T * c.vocab_size, what, bf16 ? &half : &fp32);
	run_free(&cpu);
	run_free(&gpu);
	run_free(&sens);
	free(in);
	free(tg);
	model_free(m);
}

static void test_fp32(void)
{
	for (int v = 0; v < N_VARIANTS; v++)
		check_variant(v, 0, 1);
}

static void test_bf16(void)
{
	for (int v = 0; v < N_VARIANTS; v++)
		check_variant(v, 1, 1);
}

/* two forward/backward pairs accumulate into the gradients as model_backward does */
static void test_accumulate(void)
{
	check_variant(V3_LIKE, 0, 2);
	check_variant(V2_GROUPS, 1, 2);
}

/*
 * GRPO's loss options (model.h) as on the CPU, fp32: per-token weights (some negative, as advantages
 * make them), a logit temperature and routing replay (experts unlike the router's choice): loss, every
 * per-token loss, logits, loads and every gradient
 */
static void test_loss_options(void)
{
	static const enum test_variant vs[] = { V3_LIKE, V2_GROUPS };
	for (size_t k = 0; k < sizeof(vs) / sizeof(vs[0]); k++) {
		struct model_config c = gpu_config(vs[k]);
		char err[256];
		struct moe_model *m = model_create(&c, 0, c.n_routed_experts, err, sizeof(err));
		CU_ASSERT_PTR_NOT_NULL_FATAL(m);
		model_init_weights(m, 31 + k);
		test_separate_routers(m, 37 + k);
		const int B = 2, T = 24, N = B * T, L = c.num_hidden_layers, K = c.num_experts_per_tok;
		int *in = test_xmalloc(sizeof(int) * N), *tg = test_xmalloc(sizeof(int) * N);
		int *routes = test_xmalloc(sizeof(int) * (size_t)L * N * K);
		float *tw = test_xmalloc(sizeof(float) * N);
		test_rng_seed(200 + k);
		for (int i = 0; i < N; i++) {
			in[i] = (int)(test_rand_uniform(0, 1) * c.vocab_size) % c.vocab_size;
			tg[i] = i % 5 == 2 ? -1 : (int)(test_rand_uniform(0, 1) * c.vocab_size) % c.vocab_size;
			tw[i] = test_rand_uniform(-1.0f, 1.0f) / N;
		}
		for (int i = 0; i < L * N; i++) {  /* K distinct experts from a random first one */
			int first = (int)(test_rand_uniform(0, 1) * c.n_routed_experts) % c.n_routed_experts;
			for (int e = 0; e < K; e++)
				routes[(size_t)i * K + e] = (first + e) % c.n_routed_experts;
		}
		m->token_weights = tw;
		m->logit_temperature = 0.7f;
		m->route_replay = routes;
		struct run cpu = { 0 }, gpu = { 0 };
		run_cpu(m, in, tg, B, T, 1, &cpu);
		run_gpu(m, 0, in, tg, B, T, 1, &gpu);
		struct tol fp32 = { 1e-5, 1e-5, 1e-5, 1e-4, 0 };
		char what[64];
		snprintf(what, sizeof(what), "%s options", test_variant_name[vs[k]]);
		compare(m, &gpu, &cpu, NULL, (size_t)N * c.vocab_size, what, &fp32);
		double etok = norm_rel_err(gpu.tok, cpu.tok, N);
		printf("\n    %-20s token losses rel %.1e", "", etok);
		CU_ASSERT(etok < 1e-5);
		m->token_weights = NULL;
		m->route_replay = NULL;
		m->logit_temperature = 0.0f;
		run_free(&cpu);
		run_free(&gpu);
		free(in);
		free(tg);
		free(routes);
		free(tw);
		model_free(m);
	}
}

/* the GPU model refuses what it does not hold, naming why */
static void test_refuses_ep_slice(void)
{
	struct model_config c = gpu_config(V3_LIKE);
	char err[256] = "";
	struct moe_model *m = model_create(&c, 0, 4, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	CU_ASSERT_PTR_NULL(gpu_model_create(m, 1, err, sizeof(err)));
	CU_ASSERT(strstr(err, "expert") != NULL);
	model_free(m);
}

/* the lm_head and cross-entropy in chunks of 7 rows (N = 48: six full chunks and one of 6), the backward
 * recomputing each chunk's logits: loss, token losses, loads and every gradient as with all rows held,
 * with two accumulated calls, bf16, token weights, a temperature and routing replay */
static void test_logit_chunks(void)
{
	g_logit_rows = 7;
	check_variant(V3_LIKE, 0, 1);
	check_variant(V2_GROUPS, 1, 2);
	test_loss_options();
	g_logit_rows = -1;
}

/* the experts' per-expert GEMM loop (gpu_model_grouped_gemm(0)) against the CPU, as the grouped GEMMs
 * of every other test are */
static void test_per_expert_gemms(void)
{
	gpu_model_grouped_gemm(0);
	CU_ASSERT_PTR_NOT_NULL(strstr(gpu_model_experts_gemm(), "asked for"));
	check_variant(V3_LIKE, 1, 1);
	check_variant(V2_GROUPS, 0, 1);
	gpu_model_grouped_gemm(1);
	printf("\n    experts: %s", gpu_model_experts_gemm());
}

/* Last (the refusal is remembered for the process): under the emulator, a cuBLAS that refuses the
 * grouped call (EMU_NO_GROUPED_GEMM=1, as before 12.5) falls back to the loop by itself. */
static void test_grouped_refused(void)
{
	char name[96], pci[32];

	moe_cuda_describe(name, sizeof(name), pci, sizeof(pci));
	if (!strstr(name, "emulator")) {
		printf("\n    SKIP: only the emulator can make cuBLAS refuse the grouped call");
		return;
	}
	setenv("EMU_NO_GROUPED_GEMM", "1", 1);
	check_variant(V2_LIKE, 1, 1);
	unsetenv("EMU_NO_GROUPED_GEMM");
	CU_ASSERT_PTR_NOT_NULL(strstr(gpu_model_experts_gemm(), "refused"));
}

#endif /* MOE_HAVE_CUDA */

void register_tests(void)
{
#ifdef MOE_HAVE_CUDA
	static const struct test_case cases[] = {
		{"fp32", test_fp32},
		{"bf16", test_bf16},
		{"accumulate", test_accumulate},
		{"loss_options", test_loss_options},
		{"refuses_ep_slice", test_refuses_ep_slice},
		{"logit_chunks", test_logit_chunks},
		{"per_expert_gemms", test_per_expert_gemms},
		{"grouped_refused", test_grouped_refused},
		{NULL, NULL},
	};
	add_gpu_suite("model_cuda", cases);
#else
	add_gpu_suite("model_cuda", NULL);
#endif
}
