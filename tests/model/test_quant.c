/*
 * tests/model/test_quant.c - int8 weights (model/quant.h): the quantisation's error bound, the int8
 * products against the fp32 ones on the same (dequantised) weights for every path (up to 3 rows straight
 * from int8, more through dequantised tiles on the stack or the heap, strided, transposed, serial), which tensors are
 * quantised and their bytes, and on a small model trained here for a few hundred steps: the eval loss
 * with int8 weights within 1% of fp32's, the decode path's int8 logits equal to the forward's, and greedy
 * int8 generation reproducible; every int8 path run with the fp32 copies of the quantised weights set to
 * NaN (what proves they read int8 only), and quant_drop_fp32.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "model/decode.h"
#include "model/layers.h"
#include "model/model.h"
#include "model/quant.h"
#include "optim/adamw.h"
#include "rl/generate.h"

static float *xrand(size_t n, uint64_t seed, float scale)
{
	float *p = malloc(sizeof(float) * (n + 1));
	uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 1;

	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	for (size_t i = 0; i < n; i++) {
		s = s * 6364136223846793005ULL + 1442695040888963407ULL;
		p[i] = scale * ((float)((s >> 40) & 0xffffff) / (float)0x1000000 * 2.0f - 1.0f);
	}
	return p;
}

static void test_quantize_rows(void)
{
	enum { R = 5, K = 37 };
	float *w = xrand(R * K, 1, 3.0f), s[R], back;
	int8_t q[R * K];

	for (int k = 0; k < K; k++)
		w[2 * K + k] = 0.0f;  /* an all-zero row */
	w[3 * K + 5] = -10.0f;    /* the absmax is negative */
	quantize_rows(q, s, w, R, K);
	CU_ASSERT_EQUAL(s[2], 0.0f);
	CU_ASSERT_DOUBLE_EQUAL(s[3], 10.0f / 127, 1e-7);
	CU_ASSERT_EQUAL(q[3 * K + 5], -127);
	for (int r = 0; r < R; r++)
		for (int k = 0; k < K; k++) {
			back = s[r] * q[r * K + k];
			CU_ASSERT(fabsf(back - w[r * K + k]) <= 0.5f * s[r] * 1.0001f + 1e-12f);
			CU_ASSERT(q[r * K + k] >= -127 && q[r * K + k] <= 127);
		}
	free(w);
}

/* the int8 product against linear_forward on the dequantised weights, for N rows */
static void check_product(int N, int in, int out, int ldx, int ldy, int serial)
{
	float *w = xrand((size_t)out * in, 2 + N, 0.5f), *x = xrand((size_t)N * ldx, 3 + N, 1.0f);
	float *s = malloc(sizeof(float) * out), *deq = malloc(sizeof(float) * (size_t)out * in);
	float *xc = malloc(sizeof(float) * (size_t)N * in), *ref = malloc(sizeof(float) * (size_t)N * out);
	float *y = malloc(sizeof(float) * (size_t)N * ldy), *yc = malloc(sizeof(float) * (size_t)N * out);
	int8_t *q = malloc((size_t)out * in);

	quantize_rows(q, s, w, out, in);
	for (size_t i = 0; i < (size_t)out * in; i++)
		deq[i] = s[i / in] * q[i];
	for (int i = 0; i < N; i++)
		memcpy(xc + (size_t)i * in, x + (size_t)i * ldx, sizeof(float) * in);
	linear_forward(ref, xc, deq, N, in, out);
	for (size_t i = 0; i < (size_t)N * ldy; i++)
		y[i] = 12345.0f;  /* the gaps between rows stay untouched */
	struct qmat m = { q, s };
	if (serial)
		qlinear_forward_serial(y, ldy, x, ldx, m, N, in, out);
	else
		qlinear_forward(y, ldy, x, ldx, m, N, in, out);
	for (int i = 0; i < N; i++) {
		memcpy(yc + (size_t)i * out, y + (size_t)i * ldy, sizeof(float) * out);
		for (int j = out; j < ldy; j++)
			CU_ASSERT_EQUAL(y[(size_t)i * ldy + j], 12345.0f);
	}
	double d = max_rel_err(yc, ref, (size_t)N * out);
	if (d >= 1e-5)
		fprintf(stderr, "\n  N %d in %d out %d: rel diff %.3g\n", N, in, out, d);
	CU_ASSERT(d < 1e-5);
	free(w);
	free(x);
	free(s);
	free(deq);
	free(xc);
	free(ref);
	free(y);
	free(yc);
	free(q);
}

static void test_products(void)
{
	static const int rows[] = { 1, 2, 3, 4, 5, 8, 17, 32, 33, 100 };

	for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
		check_product(rows[i], 64, 48, 64, 48, 0);
		check_product(rows[i], 37, 23, 41, 29, 0);   /* odd sizes, strided x and y */
		check_product(rows[i], 130, 70, 130, 70, 1);
	}
	check_product(7, 1000, 300, 1000, 300, 0);
	check_product(5, 5000, 9, 5000, 9, 1);  /* rows too long for the stack tile: on the heap */
	check_product(200, 96, 200, 96, 200, 0);
}

/* y = alpha x W (W: k rows of cols) against a double-precision loop on the dequantised rows */
static void test_transposed(void)
{
	enum { N = 3, KR = 9, COLS = 21, LDX = 12, LDY = 25 };
	float *w = xrand(KR * COLS, 9, 1.0f), *x = xrand(N * LDX, 10, 1.0f), s[KR], y[N * LDY];
	int8_t q[KR * COLS];

	quantize_rows(q, s, w, KR, COLS);
	qlinear_t_serial(y, LDY, x, LDX, (struct qmat){ q, s }, N, KR, COLS, 0.5f);
	for (int i = 0; i < N; i++)
		for (int j = 0; j < COLS; j++) {
			double ref = 0;
			for (int d = 0; d < KR; d++)
				ref += 0.5 * x[i * LDX + d] * s[d] * q[d * COLS + j];
			CU_ASSERT_DOUBLE_EQUAL(y[i * LDY + j], ref, 1e-5);
		}
	free(w);
	free(x);
}

/* ---------------------------------------------------------------- a trained small model */

static struct model_config tiny_config(void)
{
	struct model_config c = {
		.vocab_size = 48, .hidden_size = 64, .intermediate_size = 128, .moe_intermediate_size = 32,
		.num_hidden_layers = 2, .num_attention_heads = 4, .num_key_value_heads = 4,
		.n_shared_experts = 1, .n_routed_experts = 8, .routed_scaling_factor = 2.5,
		.kv_lora_rank = 32, .q_lora_rank = 32, .qk_rope_head_dim = 8, .qk_nope_head_dim = 16,
		.v_head_dim = 16, .n_group = 2, .topk_group = 1, .num_experts_per_tok = 2,
		.moe_layer_freq = 1, .first_k_dense_replace = 1, .norm_topk_prob = true,
		.scoring_func = MOE_SCORING_SIGMOID, .max_position_embeddings = 64,
		.initializer_range = 0.02, .rms_norm_eps = 1e-6, .rope_theta = 10000.0,
	};
	return c;
}

/* Sequences of a fixed random mapping with a random start: next = map[cur], noise 1 in 8. */
static void make_batch(int *in, int *tg, int B, int T, int V, uint64_t *s)
{
	for (int b = 0; b < B; b++) {
		int cur;

		*s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
		cur = (int)((*s >> 33) % V);
		for (int t = 0; t <= T; t++) {
			if (t < T)
				in[b * T + t] = cur;
			if (t > 0)
				tg[b * T + t - 1] = cur;
			*s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
			cur = (*s >> 33) % 8 == 0 ? (int)((*s >> 40) % V) : (cur * 7 + 3) % V;
		}
	}
}

static struct moe_model *trained;

static struct moe_model *trained_model(void)
{
	enum { B = 8, T = 32, STEPS = 300 };
	struct model_config c = tiny_config();
	struct adamw o;
	struct adamw_hparams h = { .lr = 3e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f };
	int in[B * T], tg[B * T];
	uint64_t s = 42;
	char err[256];
	float loss = 0;

	if (trained)
		return trained;
	trained = model_create(&c, 0, c.n_routed_experts, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(trained);
	model_init_weights(trained, 7);
	CU_ASSERT_EQUAL_FATAL(adamw_init(&o, trained->n_weights), 0);
	struct optim_segment seg = { 0, trained->n_weights, 0.0f, false };
	for (int step = 0; step < STEPS; step++) {
		make_batch(in, tg, B, T, c.vocab_size, &s);
		model_zero_grad(trained);
		loss = model_forward(trained, in, tg, B, T);
		model_backward(trained, 1.0f);
		adamw_update(&o, trained->weights, trained->grads, &seg, 1, &h);
	}
	fprintf(stderr, "[trained %d steps: loss %.3f] ", STEPS, loss);
	adamw_free(&o);
	return trained;
}

static float eval_loss(struct moe_model *m)
{
	enum { B = 16, T = 32 };
	int in[B * T], tg[B * T];
	uint64_t s = 999;  /* held-out sequences */
	double sum = 0;

	for (int k = 0; k < 4; k++) {
		make_batch(in, tg, B, T, m->cfg.vocab_size, &s);
		sum += model_forward(m, in, tg, B, T);
	}
	return (float)(sum / 4);
}

/* NaN in the fp32 copy of every tensor m->quant holds; returns the fp32 weights to restore */
static float *poison_fp32(struct moe_model *m)
{
	float *saved = malloc(sizeof(float) * m->n_weights);
	int poisoned = 0;

	CU_ASSERT_PTR_NOT_NULL_FATAL(saved);
	memcpy(saved, m->weights, sizeof(float) * m->n_weights);
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		float *w = m->weights + p->offset;

		if (p->ndim < 2 || !quant_find(m, w, (int)p->shape[p->ndim - 1]).q)
			continue;
		for (size_t k = 0; k < p->numel; k++)
			w[k] = NAN;
		poisoned++;
	}
	CU_ASSERT(poisoned >= 10);
	return saved;
}

static void unpoison(struct moe_model *m, float *saved)
{
	memcpy(m->weights, saved, sizeof(float) * m->n_weights);
	free(saved);
}

static void test_which_tensors(void)
{
	struct moe_model *m = trained_model();
	const struct layer_weights *l1 = &m->w.layers[1];
	int C = m->cfg.hidden_size, Im = m->cfg.moe_intermediate_size;

	CU_ASSERT_PTR_NULL(quant_find(m, l1->q_a_proj, C).q);  /* nothing attached yet */
	CU_ASSERT_EQUAL_FATAL(model_quantize(m), 0);
	CU_ASSERT_PTR_NOT_NULL(quant_find(m, l1->q_a_proj, C).q);
	CU_ASSERT_PTR_NOT_NULL(quant_find(m, m->w.layers[0].mlp_down_proj, m->cfg.intermediate_size).q);
	CU_ASSERT_PTR_NOT_NULL(quant_find(m, l1->shared_up_proj, C).q);
	/* expert 3's slice: its own rows and scales */
	struct qmat e0 = quant_find(m, l1->experts_gate_proj, C);
	struct qmat e3 = quant_find(m, l1->experts_gate_proj + (size_t)3 * Im * C, C);
	CU_ASSERT_PTR_NOT_NULL_FATAL(e3.q);
	CU_ASSERT_PTR_EQUAL(e3.q, e0.q + (size_t)3 * Im * C);
	CU_ASSERT_PTR_EQUAL(e3.scale, e0.scale + 3 * Im);
	CU_ASSERT_PTR_NULL(quant_find(m, l1->experts_gate_proj + 5, C).q);  /* not a row start */
	CU_ASSERT_PTR_NULL(quant_find(m, l1->gate, C).q);                    /* the router */
	CU_ASSERT_PTR_NULL(quant_find(m, m->w.lm_head, C).q);
	CU_ASSERT_PTR_NULL(quant_find(m, m->w.embed_tokens, C).q);
	CU_ASSERT_PTR_NULL(quant_find(m, l1->input_layernorm, C).q);
	struct quant_bytes b = quant_weight_bytes(m);
	double r = (double)b.linear_int8 / b.linear_full;
	fprintf(stderr, "[linear weights %zu -> %zu bytes (%.3f), all %zu -> %zu] ", b.linear_full, b.linear_int8,
		r, b.full, b.int8);
	CU_ASSERT(r > 0.25 && r < 0.3);  /* rows of 32 to 128: scales add 3-12% */
	CU_ASSERT_EQUAL(b.full - b.int8, b.linear_full - b.linear_int8);
	quant_free(m->quant);
	m->quant = NULL;
}

static void test_eval_loss(void)
{
	struct moe_model *m = trained_model();
	float full = eval_loss(m), q;

	CU_ASSERT_EQUAL_FATAL(model_quantize(m), 0);
	q = eval_loss(m);
	fprintf(stderr, "[eval loss fp32 %.5f, int8 %.5f: %+.3f%%] ", full, q, 100.0 * (q - full) / full);
	CU_ASSERT(full < 2.0f);  /* trained: log(48) = 3.87 untrained */
	CU_ASSERT(fabsf(q - full) / full < 0.01f);
	CU_ASSERT(q != full);    /* the int8 weights were read */
	/* and only they: with every quantised tensor's fp32 copy NaN, the same loss */
	float *saved = poison_fp32(m);
	CU_ASSERT_EQUAL(eval_loss(m), q);
	unpoison(m, saved);
	quant_free(m->quant);
	m->quant = NULL;
	CU_ASSERT_EQUAL(eval_loss(m), full);
}

/* decode_step over the latent cache with int8 weights gives the int8 forward's logits */
static void test_decode_matches_forward(void)
{
	enum { T = 12 };
	struct moe_model *m = trained_model();
	int V = m->cfg.vocab_size, in[T], tg[T], slots[T], pos[T];
	uint64_t s = 5;
	float *lg = malloc(sizeof(float) * T * V);

	CU_ASSERT_EQUAL_FATAL(model_quantize(m), 0);
	float *saved = poison_fp32(m);  /* the int8 paths read no fp32 copy of a quantised weight */
	make_batch(in, tg, 1, T, V, &s);
	model_forward(m, in, NULL, 1, T);
	for (int naive = 0; naive < 2; naive++) {
		struct latent_cache *c = latent_cache_create(&m->cfg, 1, T);

		c->naive_attention = naive;
		for (int t = 0; t < T; t++) {
			slots[t] = 0;
			pos[t] = t;
		}
		/* a prefill chunk of 5 (few rows), then one token a step */
		CU_ASSERT_EQUAL(decode_step(m, c, in, slots, pos, 5, lg), 0);
		for (int t = 5; t < T; t++)
			CU_ASSERT_EQUAL(decode_step(m, c, in + t, slots + t, pos + t, 1, lg + (size_t)t * V), 0);
		double d = max_rel_err(lg, model_logits(m), (size_t)T * V);
		fprintf(stderr, "[%s: %.2g] ", naive ? "naive" : "absorbed", d);
		CU_ASSERT(d < 1e-4);
		latent_cache_free(c);
	}
	unpoison(m, saved);
	quant_free(m->quant);
	m->quant = NULL;
	free(lg);
}

static void greedy(struct moe_model *m, int *out, int *len)
{
	static const int p0[] = { 3, 10, 29 }, p1[] = { 7 };
	const int *prompts[2] = { p0, p1 };
	int lens[2] = { 3, 1 };
	uint64_t seeds[2] = { 1, 2 };
	float lp[2 * 16];
	struct sample_params sp = sample_params_default();
	struct latent_cache *c = latent_cache_create(&m->cfg, 2, 3 + 16);

	sp.temperature = 0.0f;
	sp.max_new_tokens = 16;
	sp.eos_id = -1;
	CU_ASSERT_EQUAL(generate_cached(m, c, prompts, lens, 2, &sp, seeds, out, len, lp), 0);
	latent_cache_free(c);
}

static void test_greedy_reproducible(void)
{
	struct moe_model *m = trained_model();
	int a[32], b[32], f[32], la[2], lb[2], lf[2], same = 0;

	greedy(m, f, lf);
	CU_ASSERT_EQUAL_FATAL(model_quantize(m), 0);
	greedy(m, a, la);
	float *saved = poison_fp32(m);
	greedy(m, b, lb);
	unpoison(m, saved);
	CU_ASSERT_EQUAL(memcmp(a, b, sizeof(a)), 0);
	CU_ASSERT_EQUAL(memcmp(la, lb, sizeof(la)), 0);
	for (int i = 0; i < 32; i++)
		same += a[i] == f[i];
	fprintf(stderr, "[greedy int8 = fp32 on %d of 32 tokens] ", same);
	CU_ASSERT(same >= 24);  /* a trained mapping: the argmax rarely moves */
	quant_free(m->quant);
	m->quant = NULL;
}

/* quant_drop_fp32 (the last use of the trained model: its fp32 linear weights are gone after it) */
static void test_drop_fp32(void)
{
	struct moe_model *m = trained_model();
	const struct layer_weights *l1 = &m->w.layers[1];
	size_t mid = (size_t)4 * m->cfg.moe_intermediate_size * m->cfg.hidden_size;  /* expert 4's start */
	float q;

	CU_ASSERT_EQUAL_FATAL(model_quantize(m), 0);
	q = eval_loss(m);
	CU_ASSERT(l1->experts_up_proj[mid] != 0.0f);
	size_t dropped = quant_drop_fp32(m);
	struct quant_bytes b = quant_weight_bytes(m);
	fprintf(stderr, "[%zu of %zu fp32 bytes given back] ", dropped, b.linear_full);
	CU_ASSERT(dropped > b.linear_full / 2);
	CU_ASSERT_EQUAL(l1->experts_up_proj[mid], 0.0f);
	CU_ASSERT_EQUAL(eval_loss(m), q);
}

static void test_cleanup(void)
{
	model_free(trained);
	trained = NULL;
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "quantize_rows: |w - s q| <= s / 2", test_quantize_rows },
		{ "int8 products = fp32 on the dequantised weights", test_products },
		{ "transposed int8 product", test_transposed },
		{ "quantised tensors and their bytes", test_which_tensors },
		{ "eval loss of a trained model within 1% of fp32", test_eval_loss },
		{ "int8 decode = int8 forward", test_decode_matches_forward },
		{ "greedy int8 generation reproducible", test_greedy_reproducible },
		{ "quant_drop_fp32: fp32 copies given back, same loss", test_drop_fp32 },
		{ "free", test_cleanup },
		{ NULL, NULL },
	};

	add_suite("int8 weights", cases);
}
