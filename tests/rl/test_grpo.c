/*
 * tests/rl/test_grpo.c - the GRPO objective (rl/grpo_loss.c) and the model's loss options it rides on:
 * advantages on hand-worked groups, each loss type's weights, k3, the surrogate's gradient against
 * finite differences (per token and, through the model, per parameter), routing replay.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "model/layers.h"
#include "model/model.h"
#include "rl/grpo.h"
#include "train/config.h"

static void test_advantages_group(void)
{
	/* group 0: one success in four; group 1: all equal (zero std) */
	double r[8] = { 1, 0, 0, 0, 0.5, 0.5, 0.5, 0.5 };
	float adv[8];
	int zero = grpo_advantages(r, 2, 4, GRPO_SCALE_GROUP, adv);
	CU_ASSERT_EQUAL(zero, 1);
	/* mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5 */
	CU_ASSERT_DOUBLE_EQUAL(adv[0], 0.75 / (0.5 + 1e-4), 1e-6);
	for (int i = 1; i < 4; i++)
		CU_ASSERT_DOUBLE_EQUAL(adv[i], -0.25 / (0.5 + 1e-4), 1e-6);
	for (int i = 4; i < 8; i++)
		CU_ASSERT_EQUAL(adv[i], 0.0f);
}

static void test_advantages_batch_none(void)
{
	double r[4] = { 2, 0, 1, 1 };
	float adv[4];
	/* batch: mean 1, unbiased std sqrt(2 / 3); group means 1 and 1 */
	int zero = grpo_advantages(r, 2, 2, GRPO_SCALE_BATCH, adv);
	double s = sqrt(2.0 / 3.0) + 1e-4;
	CU_ASSERT_EQUAL(zero, 1);
	CU_ASSERT_DOUBLE_EQUAL(adv[0], 1 / s, 1e-6);
	CU_ASSERT_DOUBLE_EQUAL(adv[1], -1 / s, 1e-6);
	CU_ASSERT_EQUAL(adv[2], 0.0f);
	grpo_advantages(r, 2, 2, GRPO_SCALE_NONE, adv);
	CU_ASSERT_DOUBLE_EQUAL(adv[0], 1.0, 1e-7);
	CU_ASSERT_DOUBLE_EQUAL(adv[1], -1.0, 1e-7);
}

/*
 * Two programs, two groups of 4.  Group 0: A (weight 1) = 1 0 0 0, B (weight 0.5) = 10 20 30 40;
 * group 1: both constant (teaches nothing either way).
 */
static const double two_rewards[16] = { 1, 0, 0, 0, 2, 2, 2, 2, 10, 20, 30, 40, 7, 7, 7, 7 };
static const double two_weights[2] = { 1.0, 0.5 };

static void test_advantages_total(void)
{
	double total[8];
	float adv[8];
	int zero = grpo_combined_advantages(two_rewards, two_weights, 2, 2, 4, GRPO_SCALE_GROUP,
					    GRPO_NORM_TOTAL, total, adv);
	/* totals 6 10 15 20: mean 12.75, unbiased std sqrt(110.75 / 3) */
	double t[4] = { 6, 10, 15, 20 }, sd = sqrt(110.75 / 3) + 1e-4;
	CU_ASSERT_EQUAL(zero, 1);
	for (int i = 0; i < 4; i++) {
		CU_ASSERT_DOUBLE_EQUAL(total[i], t[i], 1e-12);
		CU_ASSERT_DOUBLE_EQUAL(adv[i], (t[i] - 12.75) / sd, 1e-5);
	}
	CU_ASSERT_DOUBLE_EQUAL(total[4], 2 + 3.5, 1e-12);
	for (int i = 4; i < 8; i++)
		CU_ASSERT_EQUAL(adv[i], 0.0f);
}

static void test_advantages_each(void)
{
	double total[8], big[16];
	float adv[8], adv_big[8], adv_total_big[8];
	int zero = grpo_combined_advantages(two_rewards, two_weights, 2, 2, 4, GRPO_SCALE_GROUP,
					    GRPO_NORM_EACH, total, adv);
	/* A: mean 0.25, std 0.5; B: mean 25, std sqrt(500 / 3) */
	double sa = 0.5 + 1e-4, sb = sqrt(500.0 / 3) + 1e-4;
	CU_ASSERT_EQUAL(zero, 1);
	for (int i = 0; i < 4; i++)
		CU_ASSERT_DOUBLE_EQUAL(adv[i], (two_rewards[i] - 0.25) / sa + 0.5 * (two_rewards[8 + i] - 25) / sb,
				       1e-5);
	CU_ASSERT_DOUBLE_EQUAL(total[0], 6, 1e-12);  /* the total is the weighted sum either way */
	for (int i = 4; i < 8; i++)
		CU_ASSERT_EQUAL(adv[i], 0.0f);
	/* each: B's rewards x 100 change nothing (its say is its weight); total: B takes over */
	memcpy(big, two_rewards, sizeof(big));
	for (int i = 8; i < 16; i++)
		big[i] *= 100;
	grpo_combined_advantages(big, two_weights, 2, 2, 4, GRPO_SCALE_GROUP, GRPO_NORM_EACH, total, adv_big);
	grpo_combined_advantages(big, two_weights, 2, 2, 4, GRPO_SCALE_GROUP, GRPO_NORM_TOTAL, total,
				 adv_total_big);
	for (int i = 0; i < 4; i++)
		CU_ASSERT_DOUBLE_EQUAL(adv_big[i], adv[i], 1e-4);
	/* under total, success on A (completion 0) is drowned by B: the lowest advantage */
	CU_ASSERT(adv_total_big[0] < adv_total_big[1]);
	CU_ASSERT(adv[0] > adv[1]);  /* under each it still counts: 1.5 - 0.58 against -0.5 - 0.19 */
}

/* One program: both ways are grpo_advantages; batch scaling applies per program under each. */
static void test_advantages_one_and_batch(void)
{
	double w1 = 1.0, total[8];
	float a[8], b[8], c[8];
	grpo_advantages(two_rewards + 8, 2, 4, GRPO_SCALE_GROUP, a);
	grpo_combined_advantages(two_rewards + 8, &w1, 1, 2, 4, GRPO_SCALE_GROUP, GRPO_NORM_EACH, total, b);
	grpo_combined_advantages(two_rewards + 8, &w1, 1, 2, 4, GRPO_SCALE_GROUP, GRPO_NORM_TOTAL, total, c);
	CU_ASSERT_EQUAL(memcmp(a, b, sizeof(a)), 0);
	CU_ASSERT_EQUAL(memcmp(a, c, sizeof(a)), 0);
	grpo_combined_advantages(two_rewards, two_weights, 2, 2, 4, GRPO_SCALE_BATCH, GRPO_NORM_EACH, total, b);
	grpo_advantages(two_rewards, 2, 4, GRPO_SCALE_BATCH, a);
	grpo_advantages(two_rewards + 8, 2, 4, GRPO_SCALE_BATCH, c);
	for (int i = 0; i < 8; i++)
		CU_ASSERT_DOUBLE_EQUAL(b[i], a[i] + 0.5 * c[i], 1e-6);
}

static void test_loss_type_weights(void)
{
	int mlen[4] = { 2, 4, 0, 2 };
	double c[4];
	grpo_sequence_coefs(GRPO_LOSS_GRPO, 4, mlen, 2, 5, c);
	CU_ASSERT_DOUBLE_EQUAL(c[0], 1.0 / 8, 1e-12);
	CU_ASSERT_DOUBLE_EQUAL(c[1], 1.0 / 16, 1e-12);
	CU_ASSERT_DOUBLE_EQUAL(c[2], 0.0, 1e-12);
	CU_ASSERT_DOUBLE_EQUAL(c[3], 1.0 / 8, 1e-12);
	grpo_sequence_coefs(GRPO_LOSS_BNPO, 4, mlen, 2, 5, c);  /* chunks of 6 and 2 tokens, 2 chunks */
	CU_ASSERT_DOUBLE_EQUAL(c[0], 1.0 / 12, 1e-12);
	CU_ASSERT_DOUBLE_EQUAL(c[1], 1.0 / 12, 1e-12);
	CU_ASSERT_DOUBLE_EQUAL(c[3], 1.0 / 4, 1e-12);
	grpo_sequence_coefs(GRPO_LOSS_DR_GRPO, 4, mlen, 2, 5, c);
	CU_ASSERT_DOUBLE_EQUAL(c[1], 1.0 / 20, 1e-12);
	grpo_sequence_coefs(GRPO_LOSS_DAPO, 4, mlen, 2, 5, c);
	CU_ASSERT_DOUBLE_EQUAL(c[0], 1.0 / 8, 1e-12);
	CU_ASSERT_DOUBLE_EQUAL(c[2], 1.0 / 8, 1e-12);
	CU_ASSERT_EQUAL(grpo_loss_type_from_name("dr_grpo"), GRPO_LOSS_DR_GRPO);
	CU_ASSERT_EQUAL(grpo_scale_from_name("batch"), GRPO_SCALE_BATCH);
	CU_ASSERT_EQUAL(grpo_loss_type_from_name("ppo"), -1);
}

static void test_k3(void)
{
	enum { n = 64 };
	float logp[n], ref[n], old[n], d[n];
	struct grpo_loss_params p = { 0.2f, 0.2f, 1.0f, false };
	struct grpo_stats st = { 0 };
	test_rng_seed(5);
	for (int i = 0; i < n; i++)
		logp[i] = old[i] = ref[i] = -fabsf(test_randn()) - 0.1f;
	grpo_sequence_grad(&p, n, logp, old, ref, 1, 0.0f, 1.0, d, &st);
	CU_ASSERT_EQUAL(st.kl, 0.0);                       /* pi = pi_ref: zero */
	for (int i = 0; i < n; i++)
		CU_ASSERT_EQUAL(d[i], 0.0f);
	for (int i = 0; i < n; i++)
		ref[i] = logp[i] + 2.0f * test_randn();
	memset(&st, 0, sizeof(st));
	grpo_sequence_grad(&p, n, logp, old, ref, 1, 0.0f, 1.0, d, &st);
	CU_ASSERT(st.kl > 0);
	for (int i = 0; i < n; i++) {                      /* every term >= 0 */
		struct grpo_stats one = { 0 };
		grpo_sequence_grad(&p, 1, logp + i, old + i, ref + i, 1, 0.0f, 1.0, d, &one);
		CU_ASSERT(one.kl >= 0);
	}
}

/* The loss of one completion as a function of its log-probabilities. */
static double seq_loss(const struct grpo_loss_params *p, int n, const float *logp, const float *old,
		       const float *ref, float adv, double coef)
{
	float d[64];
	struct grpo_stats st = { 0 };
	grpo_sequence_grad(p, n, logp, old, ref, 1, adv, coef, d, &st);
	return st.loss;
}

static void check_token_fd(bool seq_ratio, float adv)
{
	enum { n = 12 };
	float logp[n], old[n], ref[n], d[n];
	struct grpo_loss_params p = { 0.2f, 0.28f, 0.05f, seq_ratio };
	struct grpo_stats st = { 0 };
	int clipped = 0, free_ = 0;
	test_rng_seed(seq_ratio ? 11 : 12);
	for (int i = 0; i < n; i++) {
		logp[i] = -1.0f - fabsf(test_randn());
		old[i] = logp[i] + 0.4f * test_randn();   /* ratios on both sides of the clip range */
		ref[i] = logp[i] + 0.3f * test_randn();
	}
	grpo_sequence_grad(&p, n, logp, old, ref, 1, adv, 0.37, d, &st);
	for (int i = 0; i < n; i++) {
		float h = 1e-3f, save = logp[i];
		double r0 = exp((double)logp[i] - old[i]);
		if (!seq_ratio)
			(adv > 0 ? r0 > 1 + p.epsilon_high : r0 < 1 - p.epsilon) ? clipped++ : free_++;
		if (!seq_ratio && (fabs(r0 - (1 - p.epsilon)) < 1e-2 || fabs(r0 - (1 + p.epsilon_high)) < 1e-2))
			continue;  /* a step across the clip boundary measures the kink, not the gradient */
		logp[i] = save + h;
		double up = seq_loss(&p, n, logp, old, ref, adv, 0.37);
		logp[i] = save - h;
		double dn = seq_loss(&p, n, logp, old, ref, adv, 0.37);
		logp[i] = save;
		double fd = (up - dn) / (2.0 * h);
		CU_ASSERT_DOUBLE_EQUAL(d[i], fd, 2e-3 * (fabs(fd) + 0.05));
		if (fabs(d[i] - fd) > 2e-3 * (fabs(fd) + 0.05))
			fprintf(stderr, "\n  seq %d adv %g token %d: analytic %.8g, fd %.8g, r %g\n", seq_ratio, adv, i,
				d[i], fd, exp((double)logp[i] - old[i]));
	}
	if (!seq_ratio) {  /* the check saw both regimes */
		CU_ASSERT(clipped > 0);
		CU_ASSERT(free_ > 0);
		CU_ASSERT_EQUAL(st.clip_low + st.clip_high, clipped);
	}
}

static void test_surrogate_fd(void)
{
	check_token_fd(false, 0.8f);
	check_token_fd(false, -1.3f);
	check_token_fd(true, 0.8f);
	check_token_fd(true, -1.3f);
}

/* ---------------------------------------------------------------- through the model */

static struct moe_model *tiny_model(void)
{
	struct run_config rc;
	char err[256];
	config_defaults(&rc);
	rc.model.aux_loss_alpha = 0;
	struct moe_model *m = model_create(&rc.model, 0, rc.model.n_routed_experts, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	model_init_weights(m, 7);
	return m;
}

struct fd_case {
	int B, T, plen;
	int *inputs, *targets;
	float *old, *ref, *adv;
	double *coef;
	struct grpo_loss_params lp;
};

/* L(theta): forward, then the GRPO loss of the completion tokens (positions plen-1 .. T-1 of each row). */
static double model_grpo_loss(struct moe_model *m, const struct fd_case *c, float *weights)
{
	int n = c->T - c->plen + 1;
	float logp[64], d[64];
	struct grpo_stats st = { 0 };
	model_forward(m, c->inputs, c->targets, c->B, c->T);
	const float *ce = model_token_losses(m);
	if (weights)
		memset(weights, 0, sizeof(float) * (size_t)c->B * c->T);
	for (int b = 0; b < c->B; b++) {
		const float *row = ce + (size_t)b * c->T + c->plen - 1;
		for (int i = 0; i < n; i++)
			logp[i] = -row[i];
		grpo_sequence_grad(&c->lp, n, logp, c->old + b * n, c->ref + b * n, 1, c->adv[b], c->coef[b], d,
				   &st);
		for (int i = 0; weights && i < n; i++)
			weights[(size_t)b * c->T + c->plen - 1 + i] = -d[i];
	}
	return st.loss;
}

static void check_model_fd(enum grpo_loss_type type, bool seq_ratio, bool replay)
{
	struct moe_model *m = tiny_model();
	enum { B = 2, T = 7, PL = 3, NC = T - PL + 1 };
	const struct model_config *mc = &m->cfg;
	int K = mc->num_experts_per_tok, L = mc->num_hidden_layers, V = mc->vocab_size;
	int inputs[B * T], targets[B * T], mlen[B] = { NC, NC };
	float old[B * NC], ref[B * NC], adv[B] = { 0.9f, -0.6f }, weights[B * T];
	double coef[B];
	int *routes = malloc(sizeof(int) * (size_t)L * B * T * K);
	struct fd_case c = { B, T, PL, inputs, targets, old, ref, adv, coef, { 0.2f, 0.2f, 0.04f, seq_ratio } };

	test_rng_seed(100 + type);
	for (int i = 0; i < B * T; i++) {
		inputs[i] = rand() % V;
		targets[i] = i % T >= PL - 1 ? rand() % V : -1;
	}
	grpo_sequence_coefs(type, B, mlen, 1, 8, coef);
	m->logit_temperature = 0.7f;
	model_forward(m, inputs, targets, B, T);
	const float *ce = model_token_losses(m);
	for (int b = 0; b < B; b++)
		for (int i = 0; i < NC; i++) {
			float lp = -ce[b * T + PL - 1 + i];
			old[b * NC + i] = lp + 0.05f * test_randn();
			ref[b * NC + i] = lp + 0.2f * test_randn();
		}
	if (replay) {  /* this forward's own routes, so replay must not change anything but fixes routing */
		for (int l = 0; l < L; l++)
			if (mc_layer_is_moe(mc, l))
				memcpy(routes + (size_t)l * B * T * K, m->acts->layers[l].moe.topk_idx,
				       sizeof(int) * B * T * K);
			else
				for (int i = 0; i < B * T * K; i++)
					routes[(size_t)l * B * T * K + i] = i % K;
		m->route_replay = routes;
	}

	/* analytic: token weights from the forward, then the backward */
	model_zero_grad(m);
	double L0 = model_grpo_loss(m, &c, weights);
	m->token_weights = weights;
	model_backward(m, 1.0f);
	m->token_weights = NULL;

	/* per tensor: directional central differences, Richardson-extrapolated from steps h and h/2 */
	static const char *const names[] = {
		"lm_head.weight", "model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.mlp.gate.weight",
		"model.layers.1.mlp.experts.up_proj.weight", "model.layers.0.self_attn.q_b_proj.weight",
		"model.embed_tokens.weight",
	};
	CU_ASSERT(L0 != 0.0);
	for (size_t t = 0; t < sizeof(names) / sizeof(names[0]); t++) {
		const struct param *p = model_find_param(m, names[t]);
		CU_ASSERT_PTR_NOT_NULL_FATAL(p);
		float *w = m->weights + p->offset, *u = malloc(sizeof(float) * p->numel);
		float *w0 = malloc(sizeof(float) * p->numel);
		double gu = 0.0, d[2];
		memcpy(w0, w, sizeof(float) * p->numel);
		test_fill_randn(u, p->numel, 1.0f);
		for (size_t j = 0; j < p->numel; j++)
			gu += (double)m->grads[p->offset + j] * u[j];
		for (int k = 0; k < 2; k++) {
			float h = k ? 2e-3f : 4e-3f;
			double l[2];
			for (int s = 0; s < 2; s++) {
				for (size_t j = 0; j < p->numel; j++)
					w[j] = w0[j] + (s ? -h : h) * u[j];
				l[s] = model_grpo_loss(m, &c, NULL);
			}
			d[k] = (l[0] - l[1]) / (2.0 * h);
		}
		memcpy(w, w0, sizeof(float) * p->numel);
		double fd = (4.0 * d[1] - d[0]) / 3.0, tol = 2e-2 * fabs(fd) + 1e-4;
		CU_ASSERT_DOUBLE_EQUAL(gu, fd, tol);
		if (fabs(gu - fd) > tol)
			fprintf(stderr, "\n  loss type %d seq %d replay %d, %s: analytic %.8g, finite differences "
				"%.8g\n", type, seq_ratio, replay, names[t], gu, fd);
		free(u);
		free(w0);
	}
	free(routes);
	model_free(m);
}

static void test_model_gradient(void)
{
	check_model_fd(GRPO_LOSS_GRPO, false, true);
	check_model_fd(GRPO_LOSS_BNPO, false, true);
	check_model_fd(GRPO_LOSS_DR_GRPO, false, true);
	check_model_fd(GRPO_LOSS_DAPO, false, true);
	check_model_fd(GRPO_LOSS_GRPO, true, true);
	/* without replay a step may flip a routing choice (a jump, not a slope): tests/model covers routing */
}

static void test_replay_is_identity_on_own_routes(void)
{
	struct moe_model *m = tiny_model();
	const struct model_config *mc = &m->cfg;
	enum { B = 2, T = 9 };
	int K = mc->num_experts_per_tok, L = mc->num_hidden_layers, V = mc->vocab_size, inputs[B * T];
	size_t nl = (size_t)B * T * V;
	int *routes = calloc((size_t)L * B * T * K, sizeof(int));
	float *logits = malloc(sizeof(float) * nl);
	for (int i = 0; i < B * T; i++)
		inputs[i] = (i * 37 + 5) % V;
	model_forward(m, inputs, NULL, B, T);
	memcpy(logits, model_logits(m), sizeof(float) * nl);
	for (int l = 0; l < L; l++)
		if (mc_layer_is_moe(mc, l))
			memcpy(routes + (size_t)l * B * T * K, m->acts->layers[l].moe.topk_idx,
			       sizeof(int) * B * T * K);
	m->route_replay = routes;
	model_forward(m, inputs, NULL, B, T);
	CU_ASSERT_EQUAL(memcmp(logits, model_logits(m), sizeof(float) * nl), 0);
	/* other experts: the output changes */
	for (int l = 0; l < L; l++)
		for (int i = 0; i < B * T; i++)
			for (int k = 0; k < K; k++)
				routes[((size_t)l * B * T + i) * K + k] = (i + k) % mc->n_routed_experts;
	model_forward(m, inputs, NULL, B, T);
	CU_ASSERT(rel_err(model_logits(m), logits, nl, 1e-3) > 1e-3);
	free(routes);
	free(logits);
	model_free(m);
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "advantages: groups, zero std", test_advantages_group },
		{ "advantages: batch and no scaling", test_advantages_batch_none },
		{ "advantages of weighted rewards: total", test_advantages_total },
		{ "advantages of weighted rewards: each", test_advantages_each },
		{ "advantages of weighted rewards: one program, batch scale", test_advantages_one_and_batch },
		{ "loss types' weights", test_loss_type_weights },
		{ "k3 >= 0, zero at pi = pi_ref", test_k3 },
		{ "clipped surrogate + k3 gradient vs finite differences", test_surrogate_fd },
		{ "parameter gradient through the model vs finite differences", test_model_gradient },
		{ "routing replay", test_replay_is_identity_on_own_routes },
		{ NULL, NULL },
	};
	add_suite("grpo", cases);
}
