/*
 * tests/train/test_distill.c - knowledge distillation (train/distill.h): the KL of a row and its
 * gradient (both directions, with temperature) against a float64 reference and central differences,
 * and the whole student's gradient of (1 - alpha) * CE + alpha * T^2 * KL against finite differences.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "harness.h"
#include "model/model.h"
#include "train/distill.h"

/* ---------------------------------------------------------------- one row, float64 reference */

/* T^2 * KL of a row, all in double */
static double ref_kl(const double *zs, const float *zt, int V, double T, enum distill_dir dir)
{
	double ms = -INFINITY, mt = -INFINITY, ss = 0, st = 0, kl = 0;
	for (int j = 0; j < V; j++) {
		ms = fmax(ms, zs[j] / T);
		mt = fmax(mt, zt[j] / T);
	}
	for (int j = 0; j < V; j++) {
		ss += exp(zs[j] / T - ms);
		st += exp(zt[j] / T - mt);
	}
	for (int j = 0; j < V; j++) {
		double ls = zs[j] / T - ms - log(ss), lt = zt[j] / T - mt - log(st);
		kl += dir == DISTILL_FORWARD ? exp(lt) * (lt - ls) : exp(ls) * (ls - lt);
	}
	return T * T * kl;
}

static void check_row(enum distill_dir dir, double T, int V)
{
	float *zs = test_xmalloc(sizeof(float) * V), *zt = test_xmalloc(sizeof(float) * V);
	float *g = test_xmalloc(sizeof(float) * V);
	double *zd = test_xmalloc(sizeof(double) * V), *num = test_xmalloc(sizeof(double) * V);
	test_fill_randn(zs, V, 2.0f);
	test_fill_randn(zt, V, 2.0f);
	for (int j = 0; j < V; j++)
		zd[j] = zs[j];

	double lse_s = distill_row_lse(zs, V, T), lse_t = distill_row_lse(zt, V, T);
	double kl = distill_row_kl(zs, zt, V, T, dir, lse_s, lse_t);
	double ref = ref_kl(zd, zt, V, T, dir) / (T * T);
	CU_ASSERT(kl > 0);
	CU_ASSERT(fabs(kl - ref) <= 1e-9 * fabs(ref) + 1e-12);

	/* central differences of the float64 reference, h = 1e-5: truncation ~1e-10 */
	const double h = 1e-5, scale = 0.37;
	for (int j = 0; j < V; j++) {
		double z0 = zd[j];
		zd[j] = z0 + h;
		double lp = ref_kl(zd, zt, V, T, dir);
		zd[j] = z0 - h;
		double lm = ref_kl(zd, zt, V, T, dir);
		zd[j] = z0;
		num[j] = scale * (lp - lm) / (2 * h);
	}
	distill_row_grad(g, zs, zt, V, T, dir, lse_s, lse_t, kl, scale);
	char what[64];
	snprintf(what, sizeof(what), "%s KL, T=%g, V=%d", dir == DISTILL_FORWARD ? "forward" : "reverse", T, V);
	CU_ASSERT(gc_check(what, g, num, V, 1e-5, 1e-6));

	/* a student equal to the teacher: no divergence, no gradient */
	double l2 = distill_row_lse(zt, V, T);
	CU_ASSERT(distill_row_kl(zt, zt, V, T, dir, l2, l2) < 1e-12);
	distill_row_grad(g, zt, zt, V, T, dir, l2, l2, 0.0, 1.0);
	for (int j = 0; j < V; j++)
		CU_ASSERT(fabs(g[j]) < 1e-7);
	free(zs);
	free(zt);
	free(g);
	free(zd);
	free(num);
}

static void test_row_forward(void)
{
	test_rng_seed(11);
	check_row(DISTILL_FORWARD, 1.0, 37);
	check_row(DISTILL_FORWARD, 2.5, 37);
	check_row(DISTILL_FORWARD, 0.5, 300);
}

static void test_row_reverse(void)
{
	test_rng_seed(12);
	check_row(DISTILL_REVERSE, 1.0, 37);
	check_row(DISTILL_REVERSE, 2.5, 37);
	check_row(DISTILL_REVERSE, 0.5, 300);
}

/* forward and reverse differ (KL is not symmetric) and the temperature flattens both */
static void test_row_asymmetry(void)
{
	float zs[5] = { 3, 0, 0, 0, -2 }, zt[5] = { 0, 2, 0, 1, 0 };
	double ls = distill_row_lse(zs, 5, 1), lt = distill_row_lse(zt, 5, 1);
	double f = distill_row_kl(zs, zt, 5, 1, DISTILL_FORWARD, ls, lt);
	double r = distill_row_kl(zs, zt, 5, 1, DISTILL_REVERSE, ls, lt);
	CU_ASSERT(fabs(f - r) > 1e-3);
	double ls4 = distill_row_lse(zs, 5, 4), lt4 = distill_row_lse(zt, 5, 4);
	CU_ASSERT(distill_row_kl(zs, zt, 5, 4, DISTILL_FORWARD, ls4, lt4) < f);
}

/* ---------------------------------------------------------------- the whole student */

static struct model_config tiny_config(int hidden, int layers, int experts)
{
	struct model_config c = {
		.vocab_size = 23, .hidden_size = hidden, .intermediate_size = 2 * hidden,
		.moe_intermediate_size = hidden, .num_hidden_layers = layers, .num_attention_heads = 2,
		.num_key_value_heads = 2, .n_shared_experts = 1, .n_routed_experts = experts,
		.routed_scaling_factor = 1.0, .kv_lora_rank = 8, .q_lora_rank = 0, .qk_rope_head_dim = 4,
		.qk_nope_head_dim = 4, .v_head_dim = 4, .n_group = 1, .topk_group = 1,
		.num_experts_per_tok = experts ? 2 : 0, .moe_layer_freq = 1, .first_k_dense_replace = 1,
		.norm_topk_prob = true, .scoring_func = MOE_SCORING_SIGMOID, .aux_loss_alpha = 0.0,
		.max_position_embeddings = 64, .initializer_range = 0.3, .rms_norm_eps = 1e-6,
		.rope_theta = 10000.0,
	};
	return c;
}

struct whole_ctx {
	struct distill *ds;
	struct moe_model *m;
	const int *in, *tgt;
	int B, T;
};

/* directional derivative of the distillation loss along u over the tensor w (Richardson from h, h/2) */
static double directional(struct whole_ctx *x, float *w, const float *u, size_t n, float h)
{
	float *w0 = test_xmalloc(sizeof(float) * n);
	double d[2];
	memcpy(w0, w, sizeof(float) * n);
	for (int k = 0; k < 2; k++) {
		float hk = k ? h / 2 : h;
		double l[2];
		for (int side = 0; side < 2; side++) {
			for (size_t j = 0; j < n; j++)
				w[j] = w0[j] + (side ? -hk : hk) * u[j];
			l[side] = distill_forward(x->ds, x->m, x->in, x->tgt, x->B, x->T);
		}
		d[k] = (l[0] - l[1]) / (2.0 * hk);
	}
	memcpy(w, w0, sizeof(float) * n);
	free(w0);
	return (4.0 * d[1] - d[0]) / 3.0;
}

static void check_whole(enum distill_dir dir, double alpha, double T)
{
	char err[256];
	/* the student dense (no routing to flip under a step); the teacher wider, deeper, with experts */
	struct model_config cs = tiny_config(16, 2, 0), ct = tiny_config(24, 3, 4);
	cs.first_k_dense_replace = 2;
	struct moe_model *m = model_create(&cs, 0, 0, err, sizeof(err));
	struct moe_model *teacher = model_create(&ct, 0, 4, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	CU_ASSERT_PTR_NOT_NULL_FATAL(teacher);
	model_init_weights(m, 5);
	model_init_weights(teacher, 6);
	model_drop_grads(teacher);
	struct distill ds;
	int B = 2, T_len = 5, N = B * T_len;
	CU_ASSERT_FATAL(distill_init(&ds, teacher, alpha, T, dir, N) == 0);
	int in[10], tgt[10];
	for (int i = 0; i < N; i++) {
		in[i] = (i * 7 + 3) % cs.vocab_size;
		tgt[i] = (i * 5 + 1) % cs.vocab_size;
	}
	tgt[3] = -1;  /* an ignored target: neither CE nor KL */

	model_zero_grad(m);
	distill_forward(&ds, m, in, tgt, B, T_len);
	CU_ASSERT(ds.last_kl > 0);
	CU_ASSERT(ds.kl[3] == 0);
	distill_backward(&ds, m, 1.0f);
	CU_ASSERT_PTR_NULL(m->logit_term);
	CU_ASSERT_PTR_NULL(m->token_weights);

	struct whole_ctx x = { &ds, m, in, tgt, B, T_len };
	const char *names[] = { "lm_head.weight", "model.embed_tokens.weight", "model.norm.weight",
				"model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.up_proj.weight" };
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		const struct param *p = model_find_param(m, names[i]);
		CU_ASSERT_PTR_NOT_NULL_FATAL(p);
		float *u = test_xmalloc(sizeof(float) * p->numel);
		test_fill_randn(u, p->numel, 1.0f);
		double gu = 0;
		for (size_t j = 0; j < p->numel; j++)
			gu += (double)m->grads[p->offset + j] * u[j];
		double fd = directional(&x, m->weights + p->offset, u, p->numel, 4e-3f);
		double loss = fabs(distill_forward(&ds, m, in, tgt, B, T_len));
		double tol = 1e-2 * fabs(gu) + 10.0 * loss * FLT_EPSILON / 4e-3;
		if (!(fabs(fd - gu) <= tol))
			printf("\n  %s (%s, alpha %g, T %g): analytic %.6e numeric %.6e", names[i],
			       dir == DISTILL_FORWARD ? "forward" : "reverse", alpha, T, gu, fd);
		CU_ASSERT(fabs(fd - gu) <= tol);
		free(u);
	}
	distill_close(&ds);
	model_free(m);
}

static void test_whole_forward(void)
{
	test_rng_seed(21);
	check_whole(DISTILL_FORWARD, 0.5, 2.0);
	check_whole(DISTILL_FORWARD, 1.0, 1.0);
}

static void test_whole_reverse(void)
{
	test_rng_seed(22);
	check_whole(DISTILL_REVERSE, 0.7, 1.5);
}

/*
 * alpha = 0: the student's loss and gradient are those of plain training bit for bit (the teacher runs,
 * its term adds zeros); alpha > 0 changes them.
 */
static void test_alpha_zero_is_plain(void)
{
	char err[256];
	struct model_config cs = tiny_config(16, 2, 4), ct = tiny_config(24, 2, 4);
	struct moe_model *a = model_create(&cs, 0, 4, err, sizeof(err));
	struct moe_model *b = model_create(&cs, 0, 4, err, sizeof(err));
	struct moe_model *teacher = model_create(&ct, 0, 4, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(a);
	CU_ASSERT_PTR_NOT_NULL_FATAL(b);
	CU_ASSERT_PTR_NOT_NULL_FATAL(teacher);
	model_init_weights(a, 7);
	model_init_weights(b, 7);
	model_init_weights(teacher, 8);
	struct distill ds;
	int B = 2, T = 6, N = B * T;
	CU_ASSERT_FATAL(distill_init(&ds, teacher, 0.0, 2.0, DISTILL_REVERSE, N) == 0);
	int in[12], tgt[12];
	for (int i = 0; i < N; i++) {
		in[i] = (i * 3 + 1) % cs.vocab_size;
		tgt[i] = (i * 11 + 2) % cs.vocab_size;
	}
	tgt[0] = -1;
	model_zero_grad(a);
	model_zero_grad(b);
	float la = model_forward(a, in, tgt, B, T);
	model_backward(a, 0.5f);
	float lb = distill_forward(&ds, b, in, tgt, B, T);
	CU_ASSERT(ds.last_kl > 0);
	distill_backward(&ds, b, 0.5f);
	CU_ASSERT(memcmp(&la, &lb, sizeof(float)) == 0);
	CU_ASSERT(memcmp(a->grads, b->grads, sizeof(float) * a->n_weights) == 0);

	ds.alpha = 0.5;
	model_zero_grad(b);
	float lc = distill_forward(&ds, b, in, tgt, B, T);
	distill_backward(&ds, b, 0.5f);
	CU_ASSERT(lc != la);
	CU_ASSERT(memcmp(a->grads, b->grads, sizeof(float) * a->n_weights) != 0);
	distill_close(&ds);
	model_free(a);
	model_free(b);
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "KL(teacher || student) of a row vs float64 central differences", test_row_forward },
		{ "KL(student || teacher) of a row vs float64 central differences", test_row_reverse },
		{ "the two directions differ; the temperature flattens", test_row_asymmetry },
		{ "whole student, forward KL: gradient vs finite differences", test_whole_forward },
		{ "whole student, reverse KL: gradient vs finite differences", test_whole_reverse },
		{ "alpha = 0 is plain training bit for bit", test_alpha_zero_is_plain },
		{ NULL, NULL },
	};
	add_suite("distill", cases);
}
