/*
 * tests/model/test_lora.c - LoRA adapters (model/lora.h): the gradients of A and B (and through the
 * adapters into the earlier layers) against central finite differences with the base frozen, step 0
 * equal to the base model, the adapters switched off, merging, dropout's determinism and the expert
 * slicing of the routed experts' adapters.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "model/decode.h"
#include "model/layers.h"
#include "model/lora.h"
#include "model/model.h"

static struct moe_model *make_model(enum test_variant v, int e0, int e1, uint64_t seed)
{
	struct model_config c = test_grad_config(v);
	char err[256];
	struct moe_model *m = model_create(&c, e0, e1, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	model_init_weights(m, seed);
	test_separate_routers(m, seed);
	return m;
}

static unsigned targets_of(const char *const *names)
{
	unsigned t = 0;
	for (; *names; names++) {
		int k = lora_target_parse(*names);
		CU_ASSERT_FATAL(k >= 0);
		t |= 1u << k;
	}
	return t;
}

static const char *const all_v3[] = { "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
				      "gate_proj", "up_proj", "down_proj", "experts.gate_proj",
				      "experts.up_proj", "experts.down_proj", NULL };
static const char *const all_v2[] = { "q_proj", "kv_b_proj", "o_proj", "experts.down_proj", "up_proj", NULL };

static struct lora *make_lora(struct moe_model *m, const char *const *names, double dropout, int rank)
{
	struct lora_spec s = { .rank = rank, .alpha = 2.0 * rank, .dropout = dropout, .targets = targets_of(names) };
	char err[256] = "";
	struct lora *l = lora_create(m, &s, err, sizeof(err));
	if (!l)
		printf("\n  %s", err);
	CU_ASSERT_PTR_NOT_NULL_FATAL(l);
	lora_init_weights(l, 77);
	return l;
}

static void make_batch(int *in, int *tgt, int N, int V)
{
	for (int i = 0; i < N; i++) {
		in[i] = (int)(test_rand_uniform(0, 1) * V) % V;
		tgt[i] = (int)(test_rand_uniform(0, 1) * V) % V;
	}
	tgt[1] = -1;
}

/* step 0 (B = 0) gives the base model's logits bit for bit; switched off, any adapters do */
static void test_step0_equals_base(void)
{
	struct moe_model *m = make_model(V3_LIKE, 0, 8, 5);
	int B = 2, T = 6, N = B * T, in[12], tgt[12];
	size_t nl = (size_t)N * m->cfg.vocab_size;
	make_batch(in, tgt, N, m->cfg.vocab_size);
	float base_loss = model_forward(m, in, tgt, B, T);
	float *base = malloc(sizeof(float) * nl);
	memcpy(base, model_logits(m), sizeof(float) * nl);

	struct lora *l = make_lora(m, all_v3, 0.0, 4);
	m->lora = l;
	CU_ASSERT_EQUAL(model_forward(m, in, tgt, B, T), base_loss);
	CU_ASSERT(memcmp(base, model_logits(m), sizeof(float) * nl) == 0);

	test_fill_randn(l->view.weights, l->view.n_weights, 0.3f);
	float adapted = model_forward(m, in, tgt, B, T);
	CU_ASSERT(adapted != base_loss);
	l->enabled = false;
	CU_ASSERT_EQUAL(model_forward(m, in, tgt, B, T), base_loss);
	CU_ASSERT(memcmp(base, model_logits(m), sizeof(float) * nl) == 0);
	printf("\n  step 0: loss %.6f = base; adapted %.6f; switched off = base", base_loss, adapted);
	m->lora = NULL;
	lora_free(l);
	free(base);
	model_free(m);
}

/* (L(w + h u) - L(w - h u)) / 2h over the adapter tensor w */
static double central_difference(struct moe_model *m, float *w, const float *w0, const float *u, size_t n,
				 float h, const int *in, const int *tgt, int B, int T)
{
	double l[2];
	for (int side = 0; side < 2; side++) {
		for (size_t j = 0; j < n; j++)
			w[j] = w0[j] + (side ? -h : h) * u[j];
		l[side] = model_forward(m, in, tgt, B, T);
	}
	memcpy(w, w0, sizeof(float) * n);
	return (l[0] - l[1]) / (2.0 * h);
}

/*
 * Every adapter tensor: g.u against the Richardson-extrapolated central difference along a random u
 * (as tests/model/test_model.c does for the base weights), with the base frozen (no gradient arena).
 * Dropout is on: its masks depend only on (seed, step, adapter, expert, row, column), so the
 * perturbed forwards see the mask the backward used.
 */
static void check_lora_gradient(enum test_variant v, const char *const *names, double dropout)
{
	struct moe_model *m = make_model(v, 0, 8, 900 + v);
	int B = 2, T = 7, N = B * T, in[14], tgt[14];
	make_batch(in, tgt, N, m->cfg.vocab_size);
	model_drop_grads(m);
	struct lora *l = make_lora(m, names, dropout, 3);
	m->lora = l;
	l->training = dropout > 0;
	l->dropout_seed = 99;
	l->dropout_step = 4;
	/* B != 0, so A has a gradient and the adapters change the activations the later layers see */
	for (int i = 0; i < l->n; i++) {
		const struct param *p = &l->view.params[l->ad[i].pb];
		test_fill_randn(l->view.weights + p->offset, p->numel, 0.2f);
	}
	model_zero_grad(m);
	model_forward(m, in, tgt, B, T);
	/* the perturbed forwards replay this routing: a selection flip is a step of the loss, not an error */
	const struct model_config *c = &m->cfg;
	int K = c->num_experts_per_tok;
	int *replay = calloc((size_t)c->num_hidden_layers * N * K, sizeof(int));
	for (int ly = 0; ly < c->num_hidden_layers; ly++)
		if (mc_layer_is_moe(c, ly))
			memcpy(replay + (size_t)ly * N * K, m->acts->layers[ly].moe.topk_idx, sizeof(int) * N * K);
	m->route_replay = replay;
	model_forward(m, in, tgt, B, T);
	model_backward(m, 1.0f);

	double worst = 0;
	const char *worst_name = "";
	for (int i = 0; i < l->view.n_params; i++) {
		const struct param *p = &l->view.params[i];
		float *w = l->view.weights + p->offset, *g = l->view.grads + p->offset;
		float *u = malloc(sizeof(float) * p->numel), *w0 = malloc(sizeof(float) * p->numel);
		double gu = 0;
		memcpy(w0, w, sizeof(float) * p->numel);
		test_fill_randn(u, p->numel, 1.0f);
		for (size_t j = 0; j < p->numel; j++)
			gu += (double)g[j] * u[j];
		float h = 2e-3f;
		double d1 = central_difference(m, w, w0, u, p->numel, h, in, tgt, B, T);
		double d2 = central_difference(m, w, w0, u, p->numel, h / 2, in, tgt, B, T);
		double fd = (4.0 * d2 - d1) / 3.0;
		double noise = 10.0 * fabs(model_forward(m, in, tgt, B, T)) * FLT_EPSILON / h;
		double err = fabs(fd - gu) / (1e-2 * fabs(gu) + noise);
		if (err > 1.0)
			printf("\n  %s: analytic %.6e numeric %.6e (rel %.2e)", p->name, gu, fd, err);
		if (err > worst) {
			worst = err;
			worst_name = p->name;
		}
		CU_ASSERT(fabs(gu) > 0);  /* every adapter takes part */
		free(u);
		free(w0);
	}
	printf("\n  %s, dropout %.2f: %d adapter tensors, worst error %.2f of tolerance (%s)",
	       test_variant_name[v], dropout, l->view.n_params, worst, worst_name);
	CU_ASSERT(worst <= 1.0);
	m->lora = NULL;
	m->route_replay = NULL;
	free(replay);
	lora_free(l);
	model_free(m);
}

static void test_grad_v3(void) { check_lora_gradient(V3_LIKE, all_v3, 0.0); }
static void test_grad_v3_dropout(void) { check_lora_gradient(V3_LIKE, all_v3, 0.25); }
static void test_grad_v2(void) { check_lora_gradient(V2_LIKE, all_v2, 0.0); }

/* the frozen base gets no gradient and holds no gradient arena; only the adapters change */
static void test_base_frozen(void)
{
	struct moe_model *m = make_model(V3_LIKE, 0, 8, 12);
	int in[12], tgt[12];
	make_batch(in, tgt, 12, m->cfg.vocab_size);
	model_drop_grads(m);
	struct lora *l = make_lora(m, all_v3, 0.0, 2);
	m->lora = l;
	model_zero_grad(m);
	model_forward(m, in, tgt, 2, 6);
	model_backward(m, 1.0f);
	CU_ASSERT_PTR_NULL(m->grads);
	double bsum = 0;
	for (int i = 0; i < l->n; i++) {
		const struct param *p = &l->view.params[l->ad[i].pb];
		for (size_t j = 0; j < p->numel; j++)
			bsum += fabs(l->view.grads[p->offset + j]);
	}
	CU_ASSERT(bsum > 0);  /* B's gradient at B = 0 is not zero (A's is) */
	size_t full = m->n_weights, ad = lora_trainable_floats(l);
	printf("\n  %zu adapter floats against %zu base floats (%.2f%%)", ad, full, 100.0 * ad / full);
	CU_ASSERT(ad < full / 2);  /* a tiny model: rank 2 is large next to its widths */
	m->lora = NULL;
	lora_free(l);
	model_free(m);
}

/* W + scale B A in the weights gives the adapted model's logits */
static void test_merge(void)
{
	struct moe_model *m = make_model(V3_LIKE, 0, 8, 31);
	int B = 2, T = 6, N = B * T, in[12], tgt[12];
	size_t nl = (size_t)N * m->cfg.vocab_size;
	make_batch(in, tgt, N, m->cfg.vocab_size);
	struct lora *l = make_lora(m, all_v3, 0.1, 4);
	test_fill_randn(l->view.weights, l->view.n_weights, 0.2f);
	m->lora = l;
	float la = model_forward(m, in, tgt, B, T);  /* not training: no dropout */
	float *adapted = malloc(sizeof(float) * nl);
	memcpy(adapted, model_logits(m), sizeof(float) * nl);
	m->lora = NULL;
	lora_merge(l, m);
	float lm = model_forward(m, in, tgt, B, T);
	double e = rel_err(model_logits(m), adapted, nl, 1.0);  /* logits are O(1) */
	printf("\n  adapted loss %.6f, merged %.6f, logits rel err %.2e", la, lm, e);
	CU_ASSERT(e < 1e-4);
	CU_ASSERT(fabs(la - lm) < 1e-5 * fabs(la));
	lora_free(l);
	free(adapted);
	model_free(m);
}

/* the routed experts' adapters of an expert slice are the same tensors as in the whole model */
static void test_expert_slice(void)
{
	struct moe_model *all = make_model(V3_LIKE, 0, 8, 3), *half = make_model(V3_LIKE, 4, 8, 3);
	struct lora *la = make_lora(all, all_v3, 0.0, 2), *lh = make_lora(half, all_v3, 0.0, 2);
	CU_ASSERT_EQUAL(la->view.n_params, lh->view.n_params);
	for (int i = 0; i < la->view.n_params; i++) {
		const struct param *pa = &la->view.params[i], *ph = &lh->view.params[i];
		CU_ASSERT_STRING_EQUAL(pa->name, ph->name);
		size_t skip = pa->expert_stacked ? pa->numel / 2 : 0;
		CU_ASSERT_EQUAL(ph->numel, pa->numel - skip);
		CU_ASSERT(memcmp(la->view.weights + pa->offset + skip, lh->view.weights + ph->offset,
				 sizeof(float) * ph->numel) == 0);
	}
	CU_ASSERT_PTR_NOT_NULL(strstr(la->view.params[la->view.n_params - 1].name, "mlp.experts."));
	lora_free(la);
	lora_free(lh);
	model_free(all);
	model_free(half);
}

/*
 * The decoder (model/decode.c: the latent cache, kv_b_proj absorbed into the queries and outputs, or
 * the naive form) with adapters attached gives model_forward's logits with them: what GRPO samples from.
 */
static void check_decode(enum test_variant v, const char *const *names)
{
	struct moe_model *m = make_model(v, 0, 8, 41 + v);
	int V = m->cfg.vocab_size, T = 12, tokens[12], slots[12], pos[12], tgt[12];
	make_batch(tokens, tgt, T, V);
	struct lora *l = make_lora(m, names, 0.0, 3);
	test_fill_randn(l->view.weights, l->view.n_weights, 0.3f);
	m->lora = l;
	model_forward(m, tokens, NULL, 1, T);
	float *ref = malloc(sizeof(float) * (size_t)T * V), *lg = malloc(sizeof(float) * V);
	memcpy(ref, model_logits(m), sizeof(float) * (size_t)T * V);
	l->enabled = false;
	model_forward(m, tokens, NULL, 1, T);
	double moved = rel_err(model_logits(m), ref, (size_t)T * V, 1.0);
	l->enabled = true;
	for (int t = 0; t < T; t++) {
		slots[t] = 0;
		pos[t] = t;
	}
	for (int naive = 0; naive < 2; naive++) {
		struct latent_cache *c = latent_cache_create(&m->cfg, 1, T);
		CU_ASSERT_PTR_NOT_NULL_FATAL(c);
		c->naive_attention = naive;
		double worst = 0;
		for (int t = 0; t < T; t++) {
			CU_ASSERT_EQUAL_FATAL(decode_step(m, c, &tokens[t], &slots[t], &t, 1, lg), 0);
			double e = rel_err(lg, ref + (size_t)t * V, V, 1.0);
			worst = e > worst ? e : worst;
		}
		latent_cache_reset(c, 0);
		float *all = malloc(sizeof(float) * (size_t)T * V);
		CU_ASSERT_EQUAL_FATAL(decode_step(m, c, tokens, slots, pos, T, all), 0);
		double chunk = rel_err(all, ref, (size_t)T * V, 1.0);
		printf("\n  %s, %s: decode vs forward with adapters %.2e (by token), %.2e (one call); adapters "
		       "move the logits by %.2e", test_variant_name[v], naive ? "naive" : "absorbed", worst, chunk,
		       moved);
		CU_ASSERT(worst < 1e-4 && chunk < 1e-4);
		CU_ASSERT(moved > 1e-2);
		free(all);
		latent_cache_free(c);
	}
	m->lora = NULL;
	lora_free(l);
	free(ref);
	free(lg);
	model_free(m);
}

static void test_decode_v3(void) { check_decode(V3_LIKE, all_v3); }
static void test_decode_v2(void) { check_decode(V2_LIKE, all_v2); }

/* a target the model lacks is refused with its name */
static void test_missing_target(void)
{
	struct moe_model *m = make_model(V3_LIKE, 0, 8, 3);
	struct lora_spec s = { .rank = 2, .alpha = 4, .targets = 1u << LORA_Q_PROJ };
	char err[256] = "";
	CU_ASSERT_PTR_NULL(lora_create(m, &s, err, sizeof(err)));
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "q_proj"));
	printf("\n  %s", err);
	CU_ASSERT_EQUAL(lora_target_parse("experts.up_proj"), LORA_EXPERTS_UP_PROJ);
	CU_ASSERT_EQUAL(lora_target_parse("lm_head"), -1);
	model_free(m);
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "step 0 equals the base model; switched off equals it", test_step0_equals_base },
		{ "gradients of A and B, v3-like, all targets", test_grad_v3 },
		{ "gradients of A and B with dropout", test_grad_v3_dropout },
		{ "gradients of A and B, v2-like (q_proj)", test_grad_v2 },
		{ "base frozen: no gradient arena", test_base_frozen },
		{ "merge equals the adapted model", test_merge },
		{ "expert slice of the adapters", test_expert_slice },
		{ "missing target refused", test_missing_target },
		{ "decode with adapters equals the forward, v3-like", test_decode_v3 },
		{ "decode with adapters equals the forward, v2-like", test_decode_v2 },
		{ NULL, NULL },
	};
	add_suite("lora", cases);
}
