/*
 * tests/rl/test_generate.c - incremental decoding with the MLA latent cache (absorbed attention) against
 * the full forward (non-absorbed), batched decoding against decoding alone, the cache size, and
 * generation: greedy equals the forward's argmax, sampling is reproducible for a seed.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "model/decode.h"
#include "model/model.h"
#include "rl/generate.h"
#include "train/checkpoint.h"
#include "train/config.h"

enum variant { V3_LIKE, V2_LIKE, DENSE_ONLY };

static struct model_config small_config(enum variant v)
{
	struct model_config c = {
		.vocab_size = 37, .hidden_size = 16, .intermediate_size = 24, .moe_intermediate_size = 8,
		.num_hidden_layers = 3, .num_attention_heads = 2, .num_key_value_heads = 2,
		.n_shared_experts = 1, .n_routed_experts = 8, .routed_scaling_factor = 2.5,
		.kv_lora_rank = 12, .q_lora_rank = 8, .qk_rope_head_dim = 4, .qk_nope_head_dim = 6,
		.v_head_dim = 6, .n_group = 4, .topk_group = 2, .num_experts_per_tok = 2,
		.moe_layer_freq = 1, .first_k_dense_replace = 1, .norm_topk_prob = true,
		.scoring_func = MOE_SCORING_SIGMOID, .aux_loss_alpha = 0.0, .seq_aux = true,
		.max_position_embeddings = 64, .initializer_range = 0.3, .rms_norm_eps = 1e-6,
		.rope_theta = 10000.0,
	};
	if (v == V2_LIKE) {
		c.scoring_func = MOE_SCORING_SOFTMAX;
		c.q_lora_rank = 0;
		c.n_group = 1;
		c.topk_group = 1;
		c.n_shared_experts = 0;
		c.norm_topk_prob = false;
		c.routed_scaling_factor = 16.0;
	} else if (v == DENSE_ONLY) {
		c.n_routed_experts = 0;
		c.first_k_dense_replace = c.num_hidden_layers;
	}
	return c;
}

static struct moe_model *make_model(enum variant v, uint64_t seed)
{
	struct model_config c = small_config(v);
	char err[256];
	struct moe_model *m = model_create(&c, 0, c.n_routed_experts, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	model_init_weights(m, seed);
	test_rng_seed(seed);
	for (int l = 0; l < c.num_hidden_layers; l++) {
		struct layer_weights *w = &m->w.layers[l];
		if (!w->gate)
			continue;
		/* well separated router choices: float rounding never flips a selection */
		test_fill_randn(w->gate, (size_t)c.n_routed_experts * c.hidden_size, 2.0f);
		test_fill_randn(w->e_score_correction_bias, c.n_routed_experts, 0.3f);
	}
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		if (p->kind == PARAM_NORM)
			for (size_t j = 0; j < p->numel; j++)
				m->weights[p->offset + j] = 1.0f + 0.2f * test_randn();
	}
	return m;
}

/* max |a - b| / max |b| */
static double max_rel(const float *a, const float *b, size_t n)
{
	double d = 0.0, s = 1e-30;
	for (size_t i = 0; i < n; i++) {
		double e = fabs((double)a[i] - b[i]);
		if (isnan(e))
			return INFINITY;
		if (e > d)
			d = e;
		if (fabs(b[i]) > s)
			s = fabs(b[i]);
	}
	return d / s;
}

static void random_tokens(int *t, int n, int V)
{
	for (int i = 0; i < n; i++)
		t[i] = (int)(test_rand_uniform(0, 1) * V) % V;
}

/* (1) token-by-token decode_step logits == model_forward logits at every position */
static void check_decode_matches_forward(enum variant v)
{
	struct moe_model *m = make_model(v, 11 + v);
	int V = m->cfg.vocab_size, T = 20;
	int tokens[20];
	random_tokens(tokens, T, V);
	model_forward(m, tokens, NULL, 1, T);
	const float *ref = model_logits(m);

	struct latent_cache *c = latent_cache_create(&m->cfg, 1, T);
	CU_ASSERT_PTR_NOT_NULL_FATAL(c);
	float *lg = malloc(sizeof(float) * V);
	double worst = 0.0;
	for (int t = 0; t < T; t++) {
		int slot = 0;
		CU_ASSERT_EQUAL_FATAL(decode_step(m, c, &tokens[t], &slot, &t, 1, lg), 0);
		double e = max_rel(lg, ref + (size_t)t * V, V);
		if (e > worst)
			worst = e;
	}
	CU_ASSERT_EQUAL(c->len[0], T);
	printf("\n  variant %d: decode vs forward max rel err %.3g\n", v, worst);
	CU_ASSERT(worst < 1e-4);

	/* a whole-prompt chunk in one call gives the same logits too */
	latent_cache_reset(c, 0);
	float *all = malloc(sizeof(float) * (size_t)T * V);
	int slots[20], pos[20];
	for (int t = 0; t < T; t++) {
		slots[t] = 0;
		pos[t] = t;
	}
	CU_ASSERT_EQUAL_FATAL(decode_step(m, c, tokens, slots, pos, T, all), 0);
	CU_ASSERT(max_rel(all, ref, (size_t)T * V) < 1e-4);
	free(all);
	free(lg);
	latent_cache_free(c);
	model_free(m);
}

static void test_decode_v3(void) { check_decode_matches_forward(V3_LIKE); }
static void test_decode_v2(void) { check_decode_matches_forward(V2_LIKE); }
static void test_decode_dense(void) { check_decode_matches_forward(DENSE_ONLY); }

/* bad arguments are refused and leave the cache unchanged */
static void test_decode_bad_args(void)
{
	struct moe_model *m = make_model(V3_LIKE, 5);
	struct latent_cache *c = latent_cache_create(&m->cfg, 2, 4);
	int tok = 1, slot = 0, pos = 1;
	CU_ASSERT_EQUAL(decode_step(m, c, &tok, &slot, &pos, 1, NULL), -1);  /* skips position 0 */
	pos = 0;
	slot = 2;
	CU_ASSERT_EQUAL(decode_step(m, c, &tok, &slot, &pos, 1, NULL), -1);  /* no such slot */
	slot = 0;
	tok = m->cfg.vocab_size;
	CU_ASSERT_EQUAL(decode_step(m, c, &tok, &slot, &pos, 1, NULL), -1);  /* bad token */
	CU_ASSERT_EQUAL(c->len[0], 0);
	tok = 1;
	CU_ASSERT_EQUAL(decode_step(m, c, &tok, &slot, &pos, 1, NULL), 0);
	CU_ASSERT_EQUAL(c->len[0], 1);
	pos = 4;
	CU_ASSERT_EQUAL(decode_step(m, c, &tok, &slot, &pos, 1, NULL), -1);  /* past max_len */
	latent_cache_free(c);
	model_free(m);
}

/* (2) 3 sequences of different prompt lengths, batched, == each decoded alone */
static void test_batched_equals_alone(void)
{
	for (int v = V3_LIKE; v <= V2_LIKE; v++) {
		struct moe_model *m = make_model((enum variant)v, 21 + v);
		int V = m->cfg.vocab_size, G = 3, lens[3] = { 3, 7, 5 }, extra = 6, maxT = 7 + 6;
		int seq[3][13];
		for (int g = 0; g < G; g++)
			random_tokens(seq[g], maxT, V);

		/* alone: token by token, one slot */
		float *alone = calloc((size_t)G * maxT * V, sizeof(float));
		for (int g = 0; g < G; g++) {
			struct latent_cache *c = latent_cache_create(&m->cfg, 1, maxT);
			for (int t = 0; t < lens[g] + extra; t++) {
				int slot = 0;
				CU_ASSERT_EQUAL_FATAL(decode_step(m, c, &seq[g][t], &slot, &t, 1,
								  alone + ((size_t)g * maxT + t) * V), 0);
			}
			latent_cache_free(c);
		}

		/* batched: one prefill step over all prompts, then one token per sequence per step */
		struct latent_cache *c = latent_cache_create(&m->cfg, G, maxT);
		const int *prompts[3] = { seq[0], seq[1], seq[2] };
		float *last = malloc(sizeof(float) * G * V), *lg = malloc(sizeof(float) * G * V);
		CU_ASSERT_EQUAL_FATAL(prefill(m, c, prompts, lens, G, last), 0);
		double worst = 0.0;
		for (int g = 0; g < G; g++) {
			double e = max_rel(last + (size_t)g * V, alone + ((size_t)g * maxT + lens[g] - 1) * V, V);
			worst = e > worst ? e : worst;
		}
		for (int s = 0; s < extra; s++) {
			int tok[3], slots[3], pos[3];
			for (int g = 0; g < G; g++) {
				slots[g] = 2 - g;  /* any order */
				pos[g] = lens[2 - g] + s;
				tok[g] = seq[2 - g][pos[g]];
			}
			CU_ASSERT_EQUAL_FATAL(decode_step(m, c, tok, slots, pos, G, lg), 0);
			for (int g = 0; g < G; g++) {
				double e = max_rel(lg + (size_t)g * V,
						   alone + ((size_t)slots[g] * maxT + pos[g]) * V, V);
				worst = e > worst ? e : worst;
			}
		}
		printf("\n  variant %d: batched vs alone max rel err %.3g\n", v, worst);
		CU_ASSERT(worst < 3e-5);
		free(last);
		free(lg);
		free(alone);
		latent_cache_free(c);
		model_free(m);
	}
}

/* (3) bytes per token */
static void test_cache_bytes(void)
{
	struct model_config c = small_config(V3_LIKE);
	CU_ASSERT_EQUAL(latent_cache_bytes_per_token(&c), (size_t)(12 + 4) * 3 * 4);
	c.kv_lora_rank = 512;
	c.qk_rope_head_dim = 64;
	c.num_hidden_layers = 61;
	CU_ASSERT_EQUAL(latent_cache_bytes_per_token(&c), (size_t)576 * 61 * 4);  /* DeepSeek-V3 */
	struct latent_cache *lc = latent_cache_create(&c, 2, 3);
	CU_ASSERT_PTR_NOT_NULL_FATAL(lc);
	CU_ASSERT_EQUAL(lc->n_slots, 2);
	CU_ASSERT_EQUAL(lc->max_len, 3);
	latent_cache_free(lc);
}

/* (4) greedy == argmax of model_forward step by step; seeded sampling is reproducible */
static int argmax(const float *x, int n)
{
	int b = 0;
	for (int i = 1; i < n; i++)
		if (x[i] > x[b])
			b = i;
	return b;
}

static void test_greedy_matches_forward(void)
{
	for (int v = V3_LIKE; v <= V2_LIKE; v++) {
		struct moe_model *m = make_model((enum variant)v, 31 + v);
		int V = m->cfg.vocab_size, G = 3, lens[3] = { 2, 6, 4 }, Tn = 8;
		int seq[3][6];
		for (int g = 0; g < G; g++)
			random_tokens(seq[g], 6, V);
		const int *prompts[3] = { seq[0], seq[1], seq[2] };
		struct sample_params p = sample_params_default();
		p.temperature = 0.0f;
		p.max_new_tokens = Tn;
		int out[3 * 8], out_lens[3], out2[3 * 8], out_lens2[3];
		float lp[3 * 8];
		CU_ASSERT_EQUAL_FATAL(generate(m, prompts, lens, G, &p, out, out_lens, lp), 0);
		CU_ASSERT_EQUAL_FATAL(generate(m, prompts, lens, G, &p, out2, out_lens2, NULL), 0);
		CU_ASSERT(memcmp(out, out2, sizeof(out)) == 0);
		for (int g = 0; g < G; g++) {
			CU_ASSERT_EQUAL(out_lens[g], Tn);
			int T = lens[g] + Tn, full[14];
			memcpy(full, seq[g], sizeof(int) * lens[g]);
			memcpy(full + lens[g], out + g * Tn, sizeof(int) * Tn);
			model_forward(m, full, NULL, 1, T);
			const float *ref = model_logits(m);
			for (int t = 0; t < Tn; t++) {
				const float *row = ref + (size_t)(lens[g] - 1 + t) * V;
				CU_ASSERT_EQUAL(out[g * Tn + t], argmax(row, V));
				double mx = row[argmax(row, V)], s = 0.0;
				for (int i = 0; i < V; i++)
					s += exp(row[i] - mx);
				CU_ASSERT(fabs(lp[g * Tn + t] + log(s)) < 1e-4);
			}
		}

		/* an eos id stops a sequence: pick the first greedy token of sequence 1 */
		p.eos_id = out[1 * Tn];
		CU_ASSERT_EQUAL_FATAL(generate(m, prompts, lens, G, &p, out2, out_lens2, NULL), 0);
		CU_ASSERT_EQUAL(out_lens2[1], 1);
		CU_ASSERT_EQUAL(out2[1 * Tn + 1], -1);
		for (int g = 0; g < G; g++) {
			int stop = Tn;
			for (int t = 0; t < Tn; t++)
				if (out[g * Tn + t] == p.eos_id) {
					stop = t + 1;
					break;
				}
			CU_ASSERT_EQUAL(out_lens2[g], stop);
			CU_ASSERT(memcmp(out2 + g * Tn, out + g * Tn, sizeof(int) * stop) == 0);
		}
		model_free(m);
	}
}

static void test_sampling_reproducible(void)
{
	struct moe_model *m = make_model(V3_LIKE, 41);
	int V = m->cfg.vocab_size, G = 3, lens[3] = { 3, 1, 5 }, Tn = 10;
	int seq[3][5];
	for (int g = 0; g < G; g++)
		random_tokens(seq[g], 5, V);
	const int *prompts[3] = { seq[0], seq[1], seq[2] };
	struct sample_params cases[3] = { sample_params_default(), sample_params_default(),
					  sample_params_default() };
	cases[0].temperature = 1.3f;
	cases[1].temperature = 0.8f;
	cases[1].top_k = 5;
	cases[2].temperature = 1.0f;
	cases[2].top_p = 0.7f;
	cases[2].top_k = 20;
	for (int k = 0; k < 3; k++) {
		struct sample_params p = cases[k];
		p.max_new_tokens = Tn;
		p.seed = 1234;
		int a[30], b[30], c[30], la[3], lb[3], lc[3];
		CU_ASSERT_EQUAL_FATAL(generate(m, prompts, lens, G, &p, a, la, NULL), 0);
		CU_ASSERT_EQUAL_FATAL(generate(m, prompts, lens, G, &p, b, lb, NULL), 0);
		CU_ASSERT(memcmp(a, b, sizeof(a)) == 0);
		CU_ASSERT(memcmp(la, lb, sizeof(la)) == 0);
		/* each sequence's stream is its own: sequence 0 alone samples the same */
		int a0[10], l0;
		CU_ASSERT_EQUAL_FATAL(generate(m, prompts, lens, 1, &p, a0, &l0, NULL), 0);
		CU_ASSERT(memcmp(a0, a, sizeof(a0)) == 0);
		p.seed = 99;
		CU_ASSERT_EQUAL_FATAL(generate(m, prompts, lens, G, &p, c, lc, NULL), 0);
		CU_ASSERT(memcmp(a, c, sizeof(a)) != 0);
	}
	model_free(m);
}

/* sample_token: top-k = 1 is greedy; top-k / top-p never pick outside their set; frequencies follow p */
static void test_sample_token(void)
{
	float logits[6] = { 0.1f, 2.0f, -1.0f, 1.5f, 0.0f, 1.9f };
	struct sample_params p = sample_params_default();
	struct gen_rng r;
	gen_rng_seed(&r, 7);
	p.top_k = 1;
	for (int i = 0; i < 50; i++)
		CU_ASSERT_EQUAL(sample_token(logits, 6, &p, &r, NULL), 1);
	p.top_k = 3;
	for (int i = 0; i < 500; i++) {
		int id = sample_token(logits, 6, &p, &r, NULL);
		CU_ASSERT(id == 1 || id == 5 || id == 3);
	}
	/* top_p: probs of {1, 5} at T=1 hold 0.35 and 0.67 of the total; 0.5 keeps exactly those two */
	p.top_k = 0;
	p.top_p = 0.5f;
	for (int i = 0; i < 500; i++) {
		int id = sample_token(logits, 6, &p, &r, NULL);
		CU_ASSERT(id == 1 || id == 5);
	}
	/* plain sampling frequencies */
	p.top_p = 1.0f;
	int counts[6] = { 0 }, n = 200000;
	for (int i = 0; i < n; i++)
		counts[sample_token(logits, 6, &p, &r, NULL)]++;
	double z = 0.0;
	for (int i = 0; i < 6; i++)
		z += exp(logits[i]);
	for (int i = 0; i < 6; i++)
		CU_ASSERT(fabs(counts[i] / (double)n - exp(logits[i]) / z) < 0.01);
}

/* moe generate's entry point on a saved checkpoint */
static void test_cli(void)
{
	struct run_config rc;
	config_defaults(&rc);
	char err[512], path[1024];
	struct moe_model *m = model_create(&rc.model, 0, rc.model.n_routed_experts, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	model_init_weights(m, 3);
	snprintf(path, sizeof(path), "%s/gen.h5", test_tmpdir());
	struct ckpt_meta meta = { 0, 0 };
	CU_ASSERT_EQUAL_FATAL(checkpoint_save_model(path, m, &rc, &meta, err, sizeof(err)), 0);
	model_free(m);

	char *ok[] = { "--checkpoint", path, "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
		       "--temperature", "0", "--num-samples", "2" };
	CU_ASSERT_EQUAL(generate_cli_main(10, ok), 0);
	char *sampled[] = { "--checkpoint", path, "--prompt-ids", "4 5", "--top-p", "0.9", "--top-k", "7",
			    "--seed", "5", "--max-new-tokens", "3", "--eos", "2" };
	CU_ASSERT_EQUAL(generate_cli_main(14, sampled), 0);
	char *help[] = { "--help" };
	CU_ASSERT_EQUAL(generate_cli_main(1, help), 0);
	char *no_prompt[] = { "--checkpoint", path };
	CU_ASSERT_NOT_EQUAL(generate_cli_main(2, no_prompt), 0);
	char *bad_id[] = { "--checkpoint", path, "--prompt-ids", "1,x" };
	CU_ASSERT_NOT_EQUAL(generate_cli_main(4, bad_id), 0);
	char *bad_opt[] = { "--checkpoint", path, "--prompt-ids", "1", "--bogus", "1" };
	CU_ASSERT_NOT_EQUAL(generate_cli_main(6, bad_opt), 0);
	char *text_no_tok[] = { "--checkpoint", path, "--prompt", "hello" };
	CU_ASSERT_NOT_EQUAL(generate_cli_main(4, text_no_tok), 0);
	char *missing[] = { "--checkpoint", "/nonexistent/x.h5", "--prompt-ids", "1" };
	CU_ASSERT_NOT_EQUAL(generate_cli_main(4, missing), 0);
}

void register_tests(void)
{
	static const struct test_case decode[] = {
		{ "decode_step == model_forward, v3-like (q_lora, sigmoid groups, shared)", test_decode_v3 },
		{ "decode_step == model_forward, v2-like (q_proj, softmax)", test_decode_v2 },
		{ "decode_step == model_forward, dense only", test_decode_dense },
		{ "decode_step refuses bad arguments", test_decode_bad_args },
		{ "batched decoding == decoding alone", test_batched_equals_alone },
		{ "cache bytes per token", test_cache_bytes },
		{ NULL, NULL },
	};
	static const struct test_case gen[] = {
		{ "greedy == argmax of model_forward, eos stops", test_greedy_matches_forward },
		{ "seeded sampling reproducible", test_sampling_reproducible },
		{ "sample_token top-k, top-p, frequencies", test_sample_token },
		{ "moe generate entry point", test_cli },
		{ NULL, NULL },
	};
	add_suite("decode", decode);
	add_suite("generate", gen);
}
