/*
 * tests/model/test_model.c - the whole model: gradients of every variant against central finite
 * differences, causality, deterministic (and slicing-independent) initialisation, parameter counts.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "model/layers.h"
#include "model/model.h"
#include "train/config.h"

/* A model with well separated router choices, so small weight steps never change the selection;
 * mtp_depths multi-token-prediction depths (their loss weighted by mtp_lambda). */
static struct moe_model *make_model_mtp(enum test_variant v, uint64_t seed, int mtp_depths, float mtp_lambda)
{
	struct model_config c = test_grad_config(v);
	char err[256];
	c.num_nextn_predict_layers = mtp_depths;
	struct moe_model *m = model_create(&c, 0, c.n_routed_experts, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	model_init_weights(m, seed);
	test_separate_routers(m, seed);
	/* norms away from 1 so their gradients are exercised with generic values */
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		if (p->kind == PARAM_NORM)
			for (size_t j = 0; j < p->numel; j++)
				m->weights[p->offset + j] = 1.0f + 0.2f * test_randn();
	}
	m->mtp_lambda = mtp_lambda;
	return m;
}

static struct moe_model *make_model(enum test_variant v, uint64_t seed)
{
	return make_model_mtp(v, seed, 0, 0.0f);
}

/* the activations of layer l: the main model's, or an MTP depth's of the last forward */
static const struct layer_acts *layer_acts_of(const struct moe_model *m, int l)
{
	int L = m->cfg.num_hidden_layers;
	if (l < L)
		return &m->acts->layers[l];
	return m->acts->mtp && m->acts->mtp->active ? &m->acts->mtp->d[l - L].la : NULL;
}

static void make_batch(int *in, int *tgt, int B, int T, int V)
{
	for (int i = 0; i < B * T; i++) {
		in[i] = (int)(test_rand_uniform(0, 1) * V) % V;
		tgt[i] = (int)(test_rand_uniform(0, 1) * V) % V;
	}
	tgt[1] = -1;  /* an ignored target */
}

/* the experts chosen by every MoE layer, to tell a selection flip from a gradient error */
static void routing_snapshot(const struct moe_model *m, int *out, int N)
{
	const struct model_config *c = &m->cfg;
	int K = c->num_experts_per_tok, off = 0;
	for (int l = 0; l < mc_n_layers(c); l++) {
		if (!mc_layer_is_moe(c, l) || !layer_acts_of(m, l))
			continue;
		memcpy(out + off, layer_acts_of(m, l)->moe.topk_idx, sizeof(int) * N * K);
		off += N * K;
	}
}

struct fd_stats {
	int checked, flips;
	double worst;
	char worst_name[MOE_MAX_NAME];
};

/* (L(w + h u) - L(w - h u)) / 2h; *flipped set when either step changed an expert selection */
static double central_difference(struct moe_model *m, float *w, const float *w0, const float *u, size_t n,
				 float h, const int *in, const int *tgt, int B, int T, const int *route0,
				 int *route, int route_n, int *flipped)
{
	double l[2];
	*flipped = 0;
	for (int side = 0; side < 2; side++) {
		float step = side ? -h : h;
		for (size_t j = 0; j < n; j++)
			w[j] = w0[j] + step * u[j];
		l[side] = model_forward(m, in, tgt, B, T);
		routing_snapshot(m, route, B * T);
		*flipped |= memcmp(route, route0, sizeof(int) * route_n) != 0;
	}
	memcpy(w, w0, sizeof(float) * n);
	return (l[0] - l[1]) / (2.0 * h);
}

/*
 * For each trainable tensor: a random direction u over its entries; compare g.u with the central
 * difference along u, Richardson-extrapolated from steps h and h/2 (removing the h^2 term).  The sum
 * over many entries keeps the float32 loss noise small relative to the derivative.  A step that changes
 * an expert selection (a discontinuity of the loss, not an error) is retried smaller.
 */
static void check_param_directional(struct moe_model *m, const struct param *p, const int *in,
				    const int *tgt, int B, int T, const int *route0, int *route,
				    int route_n, struct fd_stats *st)
{
	float *w = m->weights + p->offset, *g = m->grads + p->offset;
	float *u = malloc(sizeof(float) * p->numel), *w0 = malloc(sizeof(float) * p->numel);
	double gu = 0.0, d1 = 0, d2 = 0;
	memcpy(w0, w, sizeof(float) * p->numel);
	test_fill_randn(u, p->numel, 1.0f);
	for (size_t j = 0; j < p->numel; j++)
		gu += (double)g[j] * u[j];
	float h = 4e-3f;
	for (int attempt = 0; attempt < 4; attempt++, h *= 0.25f) {
		int f1, f2;
		d1 = central_difference(m, w, w0, u, p->numel, h, in, tgt, B, T, route0, route, route_n, &f1);
		d2 = central_difference(m, w, w0, u, p->numel, h / 2, in, tgt, B, T, route0, route, route_n,
					&f2);
		if (!f1 && !f2)
			break;
		st->flips++;
	}
	double fd = (4.0 * d2 - d1) / 3.0;
	/* 1% of the derivative, plus the float32 rounding of the loss divided by the step */
	double loss = fabs(model_forward(m, in, tgt, B, T));
	double noise = 10.0 * loss * FLT_EPSILON / h;
	double err = fabs(fd - gu) / (1e-2 * fabs(gu) + noise);
	if (err > st->worst) {
		st->worst = err;
		snprintf(st->worst_name, sizeof(st->worst_name), "%s", p->name);
	}
	if (err > 1.0)
		printf("\n  %s: analytic %.6e numeric %.6e (rel %.2e)", p->name, gu, fd, err);
	st->checked++;
	free(u);
	free(w0);
}

static void check_gradient(enum test_variant v, int mtp_depths, float mtp_lambda)
{
	struct moe_model *m = make_model_mtp(v, 1000 + v, mtp_depths, mtp_lambda);
	const struct model_config *c = &m->cfg;
	int B = 2, T = 7, N = B * T;
	int in[14], tgt[14];
	make_batch(in, tgt, B, T, c->vocab_size);

	model_zero_grad(m);
	float loss = model_forward(m, in, tgt, B, T);
	CU_ASSERT(isfinite(loss));
	int route_n = N * c->num_experts_per_tok * mc_n_layers(c), buffers = 0;
	int *route0 = calloc(route_n + 1, sizeof(int)), *route = calloc(route_n + 1, sizeof(int));
	routing_snapshot(m, route0, N);
	route_n = 0;
	for (int l = 0; l < mc_n_layers(c); l++)
		route_n += mc_layer_is_moe(c, l) ? N * c->num_experts_per_tok : 0;
	if (mtp_depths) {
		CU_ASSERT(m->last_mtp_loss > 0.0f);
		CU_ASSERT(fabsf(loss - (m->last_ce_loss + m->last_aux_loss + mtp_lambda * m->last_mtp_loss)) <
			  1e-5f * fabsf(loss));
	}
	model_backward(m, 1.0f);

	struct fd_stats st = { 0 };
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		if (p->kind == PARAM_BUFFER) {
			buffers++;
			continue;
		}
		check_param_directional(m, p, in, tgt, B, T, route0, route, route_n, &st);
	}
	printf("\n  %s%s: %d tensors, worst error %.2f of tolerance (%s), %d selection flips avoided",
	       test_variant_name[v], mtp_depths ? " + MTP" : "", st.checked, st.worst, st.worst_name, st.flips);
	CU_ASSERT(st.worst <= 1.0);
	CU_ASSERT(buffers == (v == DENSE_ONLY ? 0 : mc_n_layers(c) - c->first_k_dense_replace));
	CU_ASSERT(st.checked == m->n_params - buffers);
	free(route0);
	free(route);
	model_free(m);
}

static void test_grad_v3_like(void) { check_gradient(V3_LIKE, 0, 0.0f); }
static void test_grad_v2_like(void) { check_gradient(V2_LIKE, 0, 0.0f); }
static void test_grad_v2_groups(void) { check_gradient(V2_GROUPS, 0, 0.0f); }
static void test_grad_dense_only(void) { check_gradient(DENSE_ONLY, 0, 0.0f); }
static void test_grad_v3_yarn(void) { check_gradient(V3_YARN, 0, 0.0f); }
/* two multi-token-prediction depths (MoE layers), and one in a dense-only model */
static void test_grad_mtp(void) { check_gradient(V3_LIKE, 2, 0.7f); }
static void test_grad_mtp_dense(void) { check_gradient(DENSE_ONLY, 1, 0.5f); }

/* The largest single gradient entry of every tensor as well, to catch errors a sum could hide. */
static void test_grad_single_entries(void)
{
	struct moe_model *m = make_model(V3_LIKE, 77);
	const struct model_config *c = &m->cfg;
	int B = 2, T = 7, N = B * T, in[14], tgt[14];
	make_batch(in, tgt, B, T, c->vocab_size);
	model_zero_grad(m);
	model_forward(m, in, tgt, B, T);
	int route_n = N * c->num_experts_per_tok * (c->num_hidden_layers - c->first_k_dense_replace);
	int *route0 = malloc(sizeof(int) * route_n), *route = malloc(sizeof(int) * route_n);
	routing_snapshot(m, route0, N);
	model_backward(m, 1.0f);
	float *grads = malloc(sizeof(float) * m->n_weights);
	memcpy(grads, m->grads, sizeof(float) * m->n_weights);
	int bad = 0, checked = 0;
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		if (p->kind == PARAM_BUFFER)
			continue;
		size_t best = 0;
		for (size_t j = 1; j < p->numel; j++)
			if (fabsf(grads[p->offset + j]) > fabsf(grads[p->offset + best]))
				best = j;
		float *w = m->weights + p->offset + best, w0 = *w, one = 1.0f, h = 4e-3f;
		double fd = 0;
		int flipped = 1;
		for (int attempt = 0; attempt < 4 && flipped; attempt++, h *= 0.25f) {
			int f2;
			double d1 = central_difference(m, w, &w0, &one, 1, h, in, tgt, B, T, route0, route,
						       route_n, &flipped);
			double d2 = central_difference(m, w, &w0, &one, 1, h / 2, in, tgt, B, T, route0, route,
						       route_n, &f2);
			flipped |= f2;
			fd = (4.0 * d2 - d1) / 3.0;
		}
		double an = grads[p->offset + best];
		double err = fabs(fd - an) / fmax(fabs(an), 1e-3);
		checked++;
		if (err > 2e-2) {
			printf("\n  %s[%zu]: analytic %.6e numeric %.6e", p->name, best, an, fd);
			bad++;
		}
	}
	CU_ASSERT(checked > 20);
	CU_ASSERT(bad == 0);
	free(route0);
	free(route);
	free(grads);
	model_free(m);
}

/* max |a-b| / max |b|: the size of a change against the scale of the logits */
static double scaled_err(const float *a, const float *b, size_t n)
{
	double d = 0, s = 0;
	for (size_t i = 0; i < n; i++) {
		d = fmax(d, fabs((double)a[i] - (double)b[i]));
		s = fmax(s, fabs((double)b[i]));
	}
	return s > 0 ? d / s : d;
}

/*
 * Changing token t+1 leaves the logits of positions <= t unchanged, and does change later ones.
 * "Unchanged" is up to rounding, against the logits' scale: the changed token moves rows between experts,
 * and the expert GEMMs' blocking (hence the rounding of every row they hold) depends on their row count
 * (seen: 9.5e-7 on logits of magnitude 4 with OpenBLAS's AVX-512 kernels, 3.6e-4 relative on a logit near
 * zero).  A leak of the future moves the logits by a fraction of their own size.
 */
static void test_causality(void)
{
	for (int v = 0; v < N_VARIANTS; v++) {
		struct moe_model *m = make_model(v, 5);
		const struct model_config *c = &m->cfg;
		int B = 2, T = 70, N = B * T, V = c->vocab_size;  /* T > one attention block of 64 */
		int *in = malloc(sizeof(int) * N), *tgt = malloc(sizeof(int) * N);
		make_batch(in, tgt, B, T, V);
		model_forward(m, in, NULL, B, T);
		float *ref = malloc(sizeof(float) * N * V);
		memcpy(ref, model_logits(m), sizeof(float) * N * V);
		int ts[] = { 0, 30, 63, 64, 68 };
		for (size_t i = 0; i < sizeof(ts) / sizeof(ts[0]); i++) {
			int t = ts[i];
			in[T + t + 1] = (in[T + t + 1] + 1 + v) % V;   /* sequence 1, token t+1 */
			model_forward(m, in, NULL, B, T);
			const float *lg = model_logits(m);
			/* sequence 0 untouched, sequence 1 unchanged up to t */
			double before = scaled_err(lg, ref, (size_t)(T + t + 1) * V);
			if (before >= 1e-5)
				printf("\n  %s: t=%d logits before t+1 changed by %.2e of their scale",
				       test_variant_name[v], t, before);
			CU_ASSERT(before < 1e-5);
			CU_ASSERT(rel_err(lg + (size_t)(T + t + 1) * V, ref + (size_t)(T + t + 1) * V, V, 1e-3)
				  > 1e-4);
			memcpy(ref, lg, sizeof(float) * N * V);
		}
		free(in);
		free(tgt);
		free(ref);
		model_free(m);
	}
}

/* Same seed, same weights; an expert slice initialises exactly as the full model's slice. */
static void test_init_deterministic(void)
{
	struct model_config c = test_grad_config(V3_LIKE);
	char err[256];
	struct moe_model *a = model_create(&c, 0, 8, err, sizeof(err));
	struct moe_model *b = model_create(&c, 0, 8, err, sizeof(err));
	struct moe_model *s = model_create(&c, 4, 6, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(a);
	CU_ASSERT_PTR_NOT_NULL_FATAL(s);
	model_init_weights(a, 42);
	model_init_weights(b, 42);
	model_init_weights(s, 42);
	CU_ASSERT(!memcmp(a->weights, b->weights, sizeof(float) * a->n_weights));
	model_init_weights(b, 43);
	CU_ASSERT(memcmp(a->weights, b->weights, sizeof(float) * a->n_weights) != 0);
	CU_ASSERT(s->n_weights < a->n_weights);
	int compared = 0;
	for (int i = 0; i < a->n_params; i++) {
		const struct param *pa = &a->params[i], *ps = &s->params[i];
		CU_ASSERT_STRING_EQUAL(pa->name, ps->name);
		size_t skip = pa->expert_stacked ? (size_t)4 * pa->shape[1] * pa->shape[2] : 0;
		CU_ASSERT(!memcmp(a->weights + pa->offset + skip, s->weights + ps->offset,
				  sizeof(float) * ps->numel));
		compared += pa->expert_stacked;
	}
	CU_ASSERT(compared == 3 * (c.num_hidden_layers - 1));
	/* initializer_range is the standard deviation of the linear weights */
	const struct param *p = model_find_param(a, "model.layers.1.mlp.experts.gate_proj.weight");
	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	double ss = 0;
	for (size_t j = 0; j < p->numel; j++)
		ss += (double)a->weights[p->offset + j] * a->weights[p->offset + j];
	CU_ASSERT(fabs(sqrt(ss / p->numel) - c.initializer_range) < 0.05 * c.initializer_range);
	model_free(a);
	model_free(b);
	model_free(s);
}

/* The table's names and shapes follow Hugging Face DeepseekV3 and agree with model_count_params. */
static void test_param_table(void)
{
	for (int v = 0; v < N_VARIANTS; v++) {
		struct model_config c = test_grad_config(v);
		char err[256];
		struct moe_model *m = model_create(&c, 0, c.n_routed_experts, err, sizeof(err));
		CU_ASSERT_PTR_NOT_NULL_FATAL(m);
		int64_t total, act, sum = 0;
		model_count_params(&c, &total, &act);
		for (int i = 0; i < m->n_params; i++)
			sum += (int64_t)m->params[i].numel;
		CU_ASSERT_EQUAL(sum, total);
		CU_ASSERT_EQUAL((int64_t)m->n_weights, total);
		CU_ASSERT_PTR_NOT_NULL(model_find_param(m, "model.embed_tokens.weight"));
		CU_ASSERT_PTR_NOT_NULL(model_find_param(m, "lm_head.weight"));
		CU_ASSERT_PTR_NOT_NULL(model_find_param(m, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"));
		CU_ASSERT((model_find_param(m, "model.layers.0.self_attn.q_proj.weight") != NULL) ==
			  (c.q_lora_rank == 0));
		if (v == V3_LIKE) {
			const struct param *p = model_find_param(m, "model.layers.2.mlp.experts.down_proj.weight");
			CU_ASSERT_PTR_NOT_NULL_FATAL(p);
			CU_ASSERT(p->ndim == 3 && p->shape[0] == 8 && p->shape[1] == 16 && p->shape[2] == 8);
			CU_ASSERT_PTR_NOT_NULL(model_find_param(m, "model.layers.2.mlp.gate.e_score_correction_bias"));
			CU_ASSERT_PTR_NOT_NULL(model_find_param(m, "model.layers.1.mlp.shared_experts.up_proj.weight"));
			CU_ASSERT_PTR_NULL(model_find_param(m, "model.layers.0.mlp.gate.weight"));
		}
		model_free(m);
	}
}

/* the whole model's parameter table (model_param_table) covers every counted parameter */
static void check_table_total(const struct model_config *c, int64_t total)
{
	char err[512];
	int n = 0;
	struct param *p = model_param_table(c, &n, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	int64_t sum = 0;
	/* the routing biases too, as the published counts have them; the MTP depths not (V3: 671B) */
	for (int i = 0; i < n; i++)
		sum += p[i].layer < c->num_hidden_layers ? (int64_t)p[i].numel : 0;
	CU_ASSERT_EQUAL(sum, total);
	free(p);
}

static void count_config(const char *file, int64_t *total, int64_t *act)
{
	char path[1024], err[512];
	snprintf(path, sizeof(path), "configs/%s", file);
	const char *cfg = src_path(path);
	struct run_config rc;
	config_defaults(&rc);
	int rcode = config_load(&rc, cfg, NULL, 0, err, sizeof(err));
	if (rcode)
		printf("\n  %s\n", err);
	CU_ASSERT_EQUAL_FATAL(rcode, 0);
	model_count_params(&rc.model, total, act);
	printf("\n  %s: %.3fB total, %.3fB activated", file, *total / 1e9, *act / 1e9);
	/* without weights: V3's would be 2.7 TB of float32 (and model_create's arenas as much address space) */
	check_table_total(&rc.model, *total);
}

/* DeepSeek's published sizes: V2-Lite 15.7B / 2.4B, V3 671B / 37B; the parameter tables agree. */
static void test_published_counts(void)
{
	int64_t total, act;
	count_config("deepseek-v2-lite.json", &total, &act);
	CU_ASSERT(fabs(total / 15.7e9 - 1.0) < 0.01);
	CU_ASSERT(llround(act / 1e8) == 24);
	count_config("deepseek-v3.json", &total, &act);
	CU_ASSERT(fabs(total / 671e9 - 1.0) < 0.01);
	CU_ASSERT(llround(act / 1e9) == 37);
}

void register_tests(void)
{
	static const struct test_case grads[] = {
		{ "gradient v3-like (sigmoid, q_lora, groups, shared, bias, balance loss)", test_grad_v3_like },
		{ "gradient v2-like (softmax, q_proj, no shared, scaled)", test_grad_v2_like },
		{ "gradient v2 with groups and shared experts", test_grad_v2_groups },
		{ "gradient dense only", test_grad_dense_only },
		{ "gradient v3-like with YaRN RoPE", test_grad_v3_yarn },
		{ "gradient single largest entries", test_grad_single_entries },
		{ "gradient multi-token prediction (2 MoE depths)", test_grad_mtp },
		{ "gradient multi-token prediction (dense)", test_grad_mtp_dense },
		{ NULL, NULL },
	};
	static const struct test_case model[] = {
		{ "causality", test_causality },
		{ "deterministic init, slice independent", test_init_deterministic },
		{ "parameter table", test_param_table },
		{ "published parameter counts", test_published_counts },
		{ NULL, NULL },
	};
	add_suite("model gradients", grads);
	add_suite("model", model);
}
