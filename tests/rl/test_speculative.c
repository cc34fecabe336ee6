/*
 * tests/rl/test_speculative.c - the multi-token-prediction head at decode time: mtp_draft_step's logits
 * equal the training forward's depth-1 logits (model/mtp.c) position by position; self-speculative
 * greedy decoding gives exactly greedy decoding's tokens (accepting and rejecting drafts both exercised),
 * stops at the end-of-text id, counts its drafts, and refuses sampling and models without MTP.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "model/decode.h"
#include "model/layers.h"
#include "model/model.h"
#include "rl/generate.h"

static struct moe_model *mtp_model(enum test_variant v, int vocab, uint64_t seed)
{
	struct model_config c = {
		.vocab_size = vocab, .hidden_size = 16, .intermediate_size = 24, .moe_intermediate_size = 8,
		.num_hidden_layers = 2, .num_attention_heads = 2, .num_key_value_heads = 2,
		.n_shared_experts = 1, .n_routed_experts = 8, .routed_scaling_factor = 2.5,
		.kv_lora_rank = 12, .q_lora_rank = 8, .qk_rope_head_dim = 4, .qk_nope_head_dim = 6,
		.v_head_dim = 6, .n_group = 4, .topk_group = 2, .num_experts_per_tok = 2,
		.moe_layer_freq = 1, .first_k_dense_replace = 1, .norm_topk_prob = true,
		.scoring_func = MOE_SCORING_SIGMOID, .max_position_embeddings = 128,
		.initializer_range = 0.3, .rms_norm_eps = 1e-6, .rope_theta = 10000.0,
		.num_nextn_predict_layers = 1,
	};
	char err[256];
	test_apply_variant(&c, v, 8);
	struct moe_model *m = model_create(&c, 0, c.n_routed_experts, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	model_init_weights(m, seed);
	test_separate_routers(m, seed);  /* float rounding never flips a selection */
	for (int i = 0; i < m->n_params; i++)
		if (m->params[i].kind == PARAM_NORM)
			for (size_t j = 0; j < m->params[i].numel; j++)
				m->weights[m->params[i].offset + j] = 1.0f + 0.2f * test_randn();
	return m;
}

/* Decoding: the main model's hidden states and the head's logits, the prompt in one chunk and then a token
 * at a time, against model_forward's depth-1 logits of the same sequence. */
static void check_head_matches_forward(enum test_variant v)
{
	struct moe_model *m = mtp_model(v, 37, 31 + v);
	const struct model_config *c = &m->cfg;
	enum { T = 12, P = 5 };
	int V = c->vocab_size, C = c->hidden_size, in[T], tgt[T], slot[T], pos[T];
	for (int i = 0; i < T; i++)
		in[i] = (int)(test_rand_uniform(0, 1) * V) % V;
	for (int i = 0; i < T; i++)
		tgt[i] = i + 1 < T ? in[i + 1] : 0;
	m->mtp_lambda = 1.0f;
	model_forward(m, in, tgt, 1, T);
	CU_ASSERT_FATAL(m->acts->mtp && m->acts->mtp->active);
	const float *want = m->acts->mtp->d[0].logits;  /* row i: from (h_i, t_{i+1}) */

	struct latent_cache *lc = latent_cache_create(c, 1, T), *mc = mtp_cache_create(c, 1, T);
	CU_ASSERT_PTR_NOT_NULL_FATAL(lc);
	CU_ASSERT_PTR_NOT_NULL_FATAL(mc);
	float *hidden = malloc(sizeof(float) * T * C), *logits = malloc(sizeof(float) * T * V);
	for (int i = 0; i < T; i++) {
		slot[i] = 0;
		pos[i] = i;
	}
	/* prefill rows 0..P-1, then one at a time up to T-2 (row T-1 has no next token) */
	CU_ASSERT_EQUAL_FATAL(decode_step_hidden(m, lc, in, slot, pos, P, NULL, hidden), 0);
	CU_ASSERT_EQUAL_FATAL(mtp_draft_step(m, mc, hidden, in + 1, slot, pos, P, logits), 0);
	double worst = 0.0;
	for (int i = 0; i < P * V; i++)
		worst = fmax(worst, fabs(logits[i] - want[i]));
	for (int i = P; i < T - 1; i++) {
		CU_ASSERT_EQUAL_FATAL(decode_step_hidden(m, lc, in + i, slot, pos + i, 1, NULL, hidden), 0);
		CU_ASSERT_EQUAL_FATAL(mtp_draft_step(m, mc, hidden, in + i + 1, slot, pos + i, 1, logits), 0);
		for (int k = 0; k < V; k++)
			worst = fmax(worst, fabs(logits[k] - want[(size_t)i * V + k]));
	}
	printf("\n  %s: head logits vs the training forward's: max |diff| %.2e", test_variant_name[v], worst);
	CU_ASSERT(worst < 1e-4);
	/* the main cache refuses the head's step and the head's cache the main model's */
	CU_ASSERT_EQUAL(decode_step(m, mc, in, slot, pos, 1, NULL), -1);
	CU_ASSERT_EQUAL(mtp_draft_step(m, lc, hidden, in, slot, pos, 1, NULL), -1);
	free(hidden);
	free(logits);
	latent_cache_free(lc);
	latent_cache_free(mc);
	model_free(m);
}

static void test_head_v3(void) { check_head_matches_forward(V3_LIKE); }
static void test_head_v2(void) { check_head_matches_forward(V2_LIKE); }
static void test_head_dense(void) { check_head_matches_forward(DENSE_ONLY); }

/* A small vocabulary, so that random drafts are accepted now and then: both branches run. */
static void test_speculative_equals_greedy(void)
{
	struct moe_model *m = mtp_model(V3_LIKE, 6, 7);
	struct sample_params p = sample_params_default();
	enum { N_NEW = 60 };
	int out[N_NEW], ref[N_NEW], n_out, ref_len, prompts = 0, same = 0;
	long long drafted = 0, accepted = 0;
	p.temperature = 0.0f;
	p.max_new_tokens = N_NEW;
	p.eos_id = -1;
	for (int k = 0; k < 6; k++) {
		int prompt[9], len = 1 + k;
		for (int i = 0; i < len; i++)
			prompt[i] = (k * 7 + i * 3) % m->cfg.vocab_size;
		const int *pp = prompt;
		struct spec_stats st;
		CU_ASSERT_EQUAL_FATAL(generate(m, &pp, &len, 1, &p, ref, &ref_len, NULL), 0);
		CU_ASSERT_EQUAL_FATAL(generate_speculative(m, prompt, len, &p, out, &n_out, &st), 0);
		prompts++;
		same += n_out == ref_len && !memcmp(out, ref, sizeof(int) * ref_len);
		CU_ASSERT_EQUAL(st.drafted, st.main_steps);
		CU_ASSERT(st.accepted <= st.drafted);
		/* the prefill's token, then one per draft and one more per accepted draft (the last round
		 * may stop after its first) */
		CU_ASSERT(n_out >= 1 + st.drafted + st.accepted - 1 && n_out <= 1 + st.drafted + st.accepted);
		drafted += st.drafted;
		accepted += st.accepted;
	}
	printf("\n  %d of %d prompts: the greedy tokens exactly; %lld of %lld drafts accepted", same, prompts,
	       accepted, drafted);
	CU_ASSERT_EQUAL(same, prompts);
	CU_ASSERT(accepted > 0 && accepted < drafted);

	/* an end-of-text token ends it where greedy's does */
	p.eos_id = ref[N_NEW / 2];
	int len = 3, prompt[3] = { 1, 2, 3 };
	const int *pp = prompt;
	CU_ASSERT_EQUAL(generate(m, &pp, &len, 1, &p, ref, &ref_len, NULL), 0);
	CU_ASSERT_EQUAL(generate_speculative(m, prompt, len, &p, out, &n_out, NULL), 0);
	CU_ASSERT(n_out == ref_len && !memcmp(out, ref, sizeof(int) * ref_len) && out[n_out - 1] == p.eos_id);

	/* greedy only; a model without MTP has no head */
	p.temperature = 0.7f;
	CU_ASSERT_EQUAL(generate_speculative(m, prompt, len, &p, out, &n_out, NULL), -1);
	model_free(m);
	struct model_config c = { 0 };
	CU_ASSERT_PTR_NULL(mtp_cache_create(&c, 1, 8));
}

void register_tests(void)
{
	static const struct test_case spec[] = {
		{ "MTP head at decode time == the training forward, v3-like", test_head_v3 },
		{ "MTP head at decode time == the training forward, v2-like", test_head_v2 },
		{ "MTP head at decode time == the training forward, dense", test_head_dense },
		{ "self-speculative greedy == greedy", test_speculative_equals_greedy },
		{ NULL, NULL },
	};
	add_suite("speculative", spec);
}
