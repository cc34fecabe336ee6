/*
 * tests/rl/test_generate.c - incremental decoding with the MLA latent cache (absorbed attention) against
 * the full forward (non-absorbed), batched decoding (experts grouped over the batch) against the forward
 * and against decoding alone, the routing record, the cache size, and generation: greedy equals the
 * forward's argmax, sampling is reproducible for a seed and each sequence's seed is its own.  Decoding
 * matches the forward with YaRN RoPE too (its frequencies, cos/sin multiplier and softmax scale).
 */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "model/decode.h"
#include "model/layers.h"
#include "model/model.h"
#include "rl/generate.h"
#include "rl/rl_cli.h"
#include "train/checkpoint.h"
#include "train/config.h"

static struct model_config small_config(enum test_variant v)
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
	test_apply_variant(&c, v, 8);  /* YaRN: positions past 8 */
	return c;
}

static struct moe_model *model_from(const struct model_config *cfg, uint64_t seed);

static struct moe_model *make_model(enum test_variant v, uint64_t seed)
{
	struct model_config c = small_config(v);
	return model_from(&c, seed);
}

static struct moe_model *model_from(const struct model_config *cfg, uint64_t seed)
{
	struct model_config c = *cfg;
	char err[256];
	struct moe_model *m = model_create(&c, 0, c.n_routed_experts, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	model_init_weights(m, seed);
	test_separate_routers(m, seed);  /* float rounding never flips a selection */
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		if (p->kind == PARAM_NORM)
			for (size_t j = 0; j < p->numel; j++)
				m->weights[p->offset + j] = 1.0f + 0.2f * test_randn();
	}
	return m;
}

static void random_tokens(int *t, int n, int V)
{
	for (int i = 0; i < n; i++)
		t[i] = (int)(test_rand_uniform(0, 1) * V) % V;
}

/*
 * (1) token-by-token decode_step logits == model_forward logits at every position, in the absorbed form
 * and in the naive one (k and v expanded from the latents); a whole prompt in one call as well
 */
static void check_decode_matches_forward(enum test_variant v)
{
	struct moe_model *m = make_model(v, 11 + v);
	int V = m->cfg.vocab_size, T = 20;
	int tokens[20], slots[20], pos[20];
	random_tokens(tokens, T, V);
	model_forward(m, tokens, NULL, 1, T);
	const float *ref = model_logits(m);
	float *lg = malloc(sizeof(float) * V), *all = malloc(sizeof(float) * (size_t)T * V);
	for (int t = 0; t < T; t++) {
		slots[t] = 0;
		pos[t] = t;
	}

	for (int naive = 0; naive < 2; naive++) {
		struct latent_cache *c = latent_cache_create(&m->cfg, 1, T);
		CU_ASSERT_PTR_NOT_NULL_FATAL(c);
		c->naive_attention = naive;
		double worst = 0.0;
		for (int t = 0; t < T; t++) {
			CU_ASSERT_EQUAL_FATAL(decode_step(m, c, &tokens[t], &slots[t], &t, 1, lg), 0);
			double e = max_rel_err(lg, ref + (size_t)t * V, V);
			if (e > worst)
				worst = e;
		}
		CU_ASSERT_EQUAL(c->len[0], T);
		latent_cache_reset(c, 0);
		CU_ASSERT_EQUAL_FATAL(decode_step(m, c, tokens, slots, pos, T, all), 0);
		double chunk = max_rel_err(all, ref, (size_t)T * V);
		printf("\n  variant %d, %s: decode vs forward max rel err %.3g (token by token), %.3g (one call)",
		       v, naive ? "naive" : "absorbed", worst, chunk);
		CU_ASSERT(worst < 1e-4);
		CU_ASSERT(chunk < 1e-4);
		latent_cache_free(c);
	}
	printf("\n");
	free(all);
	free(lg);
	model_free(m);
}

/*
 * (1b) batched decoding, the MoE's experts grouped over the batch: 3 sequences prefilled together, then
 * decoded together (the batch shrinking as they end), every logits row == model_forward's, and the
 * recorded routes == the forward's top-K; for q_lora 0 / > 0, softmax / sigmoid scoring (both with
 * groups), shared experts 0 / 1.
 */
#define BG 3
#define BMAX 14

struct batch_case {
	int lens[BG], extra[BG];
	int seq[BG][BMAX];
	float *ref;                    /* [BG][BMAX][V]: model_forward over each whole sequence */
	int *ref_routes;               /* [BG][L][BMAX][K] */
};

static void batch_reference(struct moe_model *m, struct batch_case *bc)
{
	const struct model_config *c = &m->cfg;
	int V = c->vocab_size, L = c->num_hidden_layers, K = c->num_experts_per_tok;
	bc->ref = calloc((size_t)BG * BMAX * V, sizeof(float));
	bc->ref_routes = malloc(sizeof(int) * BG * L * BMAX * K);
	for (int g = 0; g < BG; g++) {
		int T = bc->lens[g] + bc->extra[g];
		model_forward(m, bc->seq[g], NULL, 1, T);
		memcpy(bc->ref + (size_t)g * BMAX * V, model_logits(m), sizeof(float) * T * V);
		for (int l = 0; l < L; l++)
			if (mc_layer_is_moe(c, l))
				memcpy(bc->ref_routes + ((size_t)g * L + l) * BMAX * K,
				       m->acts->layers[l].moe.topk_idx, sizeof(int) * T * K);
	}
}

/* max rel err of the batched decode over all positions; routes compared exactly */
static double batch_decode(struct moe_model *m, struct batch_case *bc, int *routes_equal)
{
	const struct model_config *c = &m->cfg;
	int V = c->vocab_size, L = c->num_hidden_layers, K = c->num_experts_per_tok;
	struct latent_cache *lc = latent_cache_create(c, BG, BMAX);
	CU_ASSERT_PTR_NOT_NULL_FATAL(lc);
	CU_ASSERT_EQUAL_FATAL(latent_cache_enable_routes(lc, c), 0);
	const int *prompts[BG] = { bc->seq[0], bc->seq[1], bc->seq[2] };
	float *lg = malloc(sizeof(float) * BG * V);
	CU_ASSERT_EQUAL_FATAL(prefill(m, lc, prompts, bc->lens, BG, lg), 0);
	double worst = 0.0;
	for (int g = 0; g < BG; g++) {
		double e = max_rel_err(lg + (size_t)g * V, bc->ref + ((size_t)g * BMAX + bc->lens[g] - 1) * V, V);
		worst = e > worst ? e : worst;
	}
	for (int s = 0;; s++) {
		int tok[BG], slots[BG], pos[BG], n = 0;
		for (int g = BG - 1; g >= 0; g--)  /* any order */
			if (s < bc->extra[g]) {
				slots[n] = g;
				pos[n] = bc->lens[g] + s;
				tok[n++] = bc->seq[g][bc->lens[g] + s];
			}
		if (n == 0)
			break;
		CU_ASSERT_EQUAL_FATAL(decode_step(m, lc, tok, slots, pos, n, lg), 0);
		for (int i = 0; i < n; i++) {
			const float *want = bc->ref + ((size_t)slots[i] * BMAX + pos[i]) * V;
			double e = max_rel_err(lg + (size_t)i * V, want, V);
			worst = e > worst ? e : worst;
		}
	}
	*routes_equal = 1;
	for (int g = 0; g < BG; g++)
		for (int l = 0; l < L; l++)
			for (int t = 0; t < bc->lens[g] + bc->extra[g]; t++) {
				const int *r = latent_cache_route(lc, l, g, t);
				const int *want = bc->ref_routes + (((size_t)g * L + l) * BMAX + t) * K;
				for (int k = 0; k < K; k++)
					if (r[k] != (mc_layer_is_moe(c, l) ? want[k] : -1))
						*routes_equal = 0;
			}
	CU_ASSERT_PTR_NULL(latent_cache_route(lc, L, 0, 0));
	CU_ASSERT_PTR_NULL(latent_cache_route(lc, 0, BG, 0));
	CU_ASSERT_PTR_NULL(latent_cache_route(lc, 0, 0, BMAX));
	free(lg);
	latent_cache_free(lc);
	return worst;
}

static void test_batched_grouped_experts(void)
{
	for (int v = 0; v < 8; v++) {
		struct model_config c = small_config(V3_LIKE);
		c.q_lora_rank = v & 1 ? 0 : 8;
		c.scoring_func = v & 2 ? MOE_SCORING_SOFTMAX : MOE_SCORING_SIGMOID;
		c.n_shared_experts = v & 4 ? 0 : 1;
		c.norm_topk_prob = !(v & 2);
		struct moe_model *m = model_from(&c, 51 + v);
		struct batch_case bc = { .lens = { 3, 7, 5 }, .extra = { 6, 3, 5 } };
		for (int g = 0; g < BG; g++)
			random_tokens(bc.seq[g], BMAX, c.vocab_size);
		batch_reference(m, &bc);
		int routes_equal;
		double worst = batch_decode(m, &bc, &routes_equal);
		printf("\n  q_lora %d, %s, shared %d: batched decode vs forward max rel err %.3g, routes %s",
		       c.q_lora_rank, v & 2 ? "softmax" : "sigmoid", c.n_shared_experts, worst,
		       routes_equal ? "equal" : "DIFFER");
		CU_ASSERT(worst < 2e-5);
		CU_ASSERT(routes_equal);
		free(bc.ref);
		free(bc.ref_routes);
		model_free(m);
	}
	printf("\n");
}

/* the logits do not depend on the thread count: 1 thread and 2 threads give the same bits */
static void test_decode_thread_independent(void)
{
	struct moe_model *m = make_model(V3_LIKE, 61);
	int V = m->cfg.vocab_size, lens[BG] = { 9, 4, 12 }, seq[BG][12];
	for (int g = 0; g < BG; g++)
		random_tokens(seq[g], 12, V);
	const int *prompts[BG] = { seq[0], seq[1], seq[2] };
	float *a = malloc(sizeof(float) * BG * V * 2), *b = a + BG * V;
	int saved = omp_get_max_threads();
	for (int run = 0; run < 2; run++) {
		omp_set_num_threads(run ? 2 : 1);
		struct latent_cache *lc = latent_cache_create(&m->cfg, BG, 16);
		CU_ASSERT_EQUAL_FATAL(prefill(m, lc, prompts, lens, BG, run ? b : a), 0);
		latent_cache_free(lc);
	}
	omp_set_num_threads(saved);
	CU_ASSERT(memcmp(a, b, sizeof(float) * BG * V) == 0);
	free(a);
	model_free(m);
}

static void test_decode_v3(void) { check_decode_matches_forward(V3_LIKE); }
static void test_decode_v2(void) { check_decode_matches_forward(V2_LIKE); }
static void test_decode_v2_groups(void) { check_decode_matches_forward(V2_GROUPS); }
static void test_decode_dense(void) { check_decode_matches_forward(DENSE_ONLY); }
static void test_decode_yarn(void) { check_decode_matches_forward(V3_YARN); }

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
	pos = 1;
	CU_ASSERT_EQUAL(decode_step(m, c, &tok, &slot, &pos, 0, NULL), -1);  /* n = 0: only under EP */
	CU_ASSERT_EQUAL(c->len[0], 1);
	/* a cache without slots is valid (a rank with no sequences under expert parallelism) */
	struct latent_cache *none = latent_cache_create(&m->cfg, 0, 4);
	CU_ASSERT_PTR_NOT_NULL(none);
	CU_ASSERT_EQUAL(latent_cache_enable_routes(none, &m->cfg), 0);
	CU_ASSERT_PTR_NULL(latent_cache_route(none, 1, 0, 0));
	latent_cache_free(none);
	CU_ASSERT_PTR_NULL(latent_cache_create(&m->cfg, -1, 4));
	/* G = 0 likewise */
	struct sample_params p = sample_params_default();
	int out[16], out_len;
	CU_ASSERT_EQUAL(generate(m, NULL, NULL, 0, &p, out, &out_len, NULL), -1);
	latent_cache_free(c);
	model_free(m);
}

/* (2) 3 sequences of different prompt lengths, batched, == each decoded alone */
static void test_batched_equals_alone(void)
{
	for (int v = V3_LIKE; v <= V2_LIKE; v++) {
		struct moe_model *m = make_model((enum test_variant)v, 21 + v);
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
			double e = max_rel_err(last + (size_t)g * V, alone + ((size_t)g * maxT + lens[g] - 1) * V, V);
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
				double e = max_rel_err(lg + (size_t)g * V,
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

/*
 * A GRPO batch: prompts A A B B' C (the second A the same pointer, B' an equal copy).  The repeats are
 * prefilled once: their cache rows, routes and last logits are the leader's, bit for bit; every
 * sequence's logits agree with prefilling it alone; and a latent_cache_copy_prefix past the source's
 * length is refused.
 */
static void test_shared_prompt_prefill(void)
{
	struct moe_model *m = make_model(V3_LIKE, 44);
	int V = m->cfg.vocab_size, G = 5, lens[5] = { 6, 6, 4, 4, 6 }, L = m->cfg.num_hidden_layers;
	int a[6], b[4], b2[4], cc[6];
	random_tokens(a, 6, V);
	random_tokens(b, 4, V);
	memcpy(b2, b, sizeof(b));
	random_tokens(cc, 6, V);
	const int *prompts[5] = { a, a, b, b2, cc };
	struct latent_cache *c = latent_cache_create(&m->cfg, G, 8);
	CU_ASSERT_PTR_NOT_NULL_FATAL(c);
	CU_ASSERT_EQUAL_FATAL(latent_cache_enable_routes(c, &m->cfg), 0);
	float *last = malloc(sizeof(float) * G * V), *alone = malloc(sizeof(float) * V);
	CU_ASSERT_EQUAL_FATAL(prefill(m, c, prompts, lens, G, last), 0);

	size_t row = (size_t)c->kv_lora + c->dr;
	static const int rep[][2] = { { 1, 0 }, { 3, 2 } };  /* (repeat, leader) */
	for (int r = 0; r < 2; r++) {
		int g = rep[r][0], f = rep[r][1];
		CU_ASSERT_EQUAL(c->len[g], lens[g]);
		CU_ASSERT(memcmp(last + (size_t)g * V, last + (size_t)f * V, sizeof(float) * V) == 0);
		for (int l = 0; l < L; l++) {
			const float *kg = c->kv + ((size_t)l * G + g) * c->max_len * row;
			const float *kf = c->kv + ((size_t)l * G + f) * c->max_len * row;
			CU_ASSERT(memcmp(kg, kf, sizeof(float) * row * lens[g]) == 0);
			for (int t = 0; mc_layer_is_moe(&m->cfg, l) && t < lens[g]; t++)
				CU_ASSERT(memcmp(latent_cache_route(c, l, g, t), latent_cache_route(c, l, f, t),
						 sizeof(int) * c->route_k) == 0);
		}
	}
	double worst = 0.0;
	for (int g = 0; g < G; g++) {
		struct latent_cache *one = latent_cache_create(&m->cfg, 1, 8);
		CU_ASSERT_EQUAL_FATAL(prefill(m, one, prompts + g, lens + g, 1, alone), 0);
		double e = max_rel_err(last + (size_t)g * V, alone, V);
		worst = e > worst ? e : worst;
		latent_cache_free(one);
	}
	printf("\n  shared prefill vs alone: max rel err %.3g\n", worst);
	CU_ASSERT(worst < 3e-5);
	CU_ASSERT_EQUAL(latent_cache_copy_prefix(c, 4, 2, 5), -1);  /* slot 2 holds 4 positions */
	CU_ASSERT_EQUAL(latent_cache_copy_prefix(c, G, 2, 1), -1);
	free(last);
	free(alone);
	latent_cache_free(c);
	model_free(m);
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
		struct moe_model *m = make_model((enum test_variant)v, 31 + v);
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

/* per-sequence seeds: a sequence's completion depends on its seed only, not on the batch around it */
static void test_sequence_seeds(void)
{
	struct moe_model *m = make_model(V3_LIKE, 43);
	int V = m->cfg.vocab_size, lens[3] = { 4, 2, 6 }, Tn = 9, seq[3][6];
	for (int g = 0; g < 3; g++)
		random_tokens(seq[g], 6, V);
	struct sample_params p = sample_params_default();
	p.max_new_tokens = Tn;
	p.temperature = 1.2f;
	p.top_p = 0.95f;
	p.seed = 77;
	const int *prompts[3] = { seq[0], seq[1], seq[2] };
	uint64_t seeds[3] = { 0x1111, 0x2222, 0x3333 };
	int a[27], la[3], b[18], lb[2], d[27], ld[3];
	float lpa[27], lpb[18];
	CU_ASSERT_EQUAL_FATAL(generate_cached(m, NULL, prompts, lens, 3, &p, seeds, a, la, lpa), 0);
	/* sequences 2 and 0 in a batch of their own, in another order, with their seeds */
	const int *sub[2] = { seq[2], seq[0] };
	int sub_lens[2] = { lens[2], lens[0] };
	uint64_t sub_seeds[2] = { seeds[2], seeds[0] };
	CU_ASSERT_EQUAL_FATAL(generate_cached(m, NULL, sub, sub_lens, 2, &p, sub_seeds, b, lb, lpb), 0);
	CU_ASSERT(memcmp(b, a + 2 * Tn, sizeof(int) * Tn) == 0);
	CU_ASSERT(memcmp(b + Tn, a, sizeof(int) * Tn) == 0);
	CU_ASSERT_EQUAL(lb[0], la[2]);
	CU_ASSERT_EQUAL(lb[1], la[0]);
	CU_ASSERT(max_rel_err(lpb, lpa + 2 * Tn, Tn) < 1e-4);
	/* the same seed for every sequence of one prompt: identical completions */
	const int *same[3] = { seq[1], seq[1], seq[1] };
	int same_lens[3] = { lens[1], lens[1], lens[1] };
	uint64_t same_seeds[3] = { seeds[1], seeds[1], seeds[1] };
	CU_ASSERT_EQUAL_FATAL(generate_cached(m, NULL, same, same_lens, 3, &p, same_seeds, d, ld, NULL), 0);
	for (int g = 0; g < 3; g++)
		CU_ASSERT(memcmp(d + g * Tn, a + Tn, sizeof(int) * Tn) == 0);
	/* no seeds = gen_sequence_seed(p.seed, g) */
	uint64_t derived[3];
	for (int g = 0; g < 3; g++)
		derived[g] = gen_sequence_seed(p.seed, g);
	CU_ASSERT_EQUAL_FATAL(generate(m, prompts, lens, 3, &p, a, la, NULL), 0);
	CU_ASSERT_EQUAL_FATAL(generate_cached(m, NULL, prompts, lens, 3, &p, derived, d, ld, NULL), 0);
	CU_ASSERT(memcmp(a, d, sizeof(a)) == 0);
	model_free(m);
}

/* generate_cached with the caller's cache: the routes of every input token == model_forward's top-K */
static void test_generate_routes(void)
{
	struct moe_model *m = make_model(V3_LIKE, 47);
	const struct model_config *c = &m->cfg;
	int V = c->vocab_size, L = c->num_hidden_layers, K = c->num_experts_per_tok;
	int lens[2] = { 5, 3 }, Tn = 7, seq[2][5], out[14], out_lens[2];
	for (int g = 0; g < 2; g++)
		random_tokens(seq[g], 5, V);
	const int *prompts[2] = { seq[0], seq[1] };
	struct sample_params p = sample_params_default();
	p.max_new_tokens = Tn;
	p.seed = 5;
	struct latent_cache *small = latent_cache_create(c, 2, 5 + Tn - 2);
	CU_ASSERT_EQUAL(generate_cached(m, small, prompts, lens, 2, &p, NULL, out, out_lens, NULL), -1);
	latent_cache_free(small);
	struct latent_cache *lc = latent_cache_create(c, 2, 5 + Tn - 1);
	CU_ASSERT_EQUAL_FATAL(latent_cache_enable_routes(lc, c), 0);
	CU_ASSERT_EQUAL_FATAL(generate_cached(m, lc, prompts, lens, 2, &p, NULL, out, out_lens, NULL), 0);
	int mismatches = 0, checked = 0;
	for (int g = 0; g < 2; g++) {
		int T = lens[g] + out_lens[g] - 1, full[12];
		CU_ASSERT_EQUAL(lc->len[g], T);
		memcpy(full, seq[g], sizeof(int) * lens[g]);
		memcpy(full + lens[g], out + g * Tn, sizeof(int) * (out_lens[g] - 1));
		model_forward(m, full, NULL, 1, T);
		for (int l = 0; l < L; l++) {
			if (!mc_layer_is_moe(c, l))
				continue;
			const int *want = m->acts->layers[l].moe.topk_idx;
			for (int t = 0; t < T; t++, checked++)
				mismatches += !!memcmp(latent_cache_route(lc, l, g, t), want + t * K,
						       sizeof(int) * K);
		}
	}
	CU_ASSERT_EQUAL(mismatches, 0);
	CU_ASSERT(checked > 0);
	latent_cache_free(lc);
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

/* the reference order of test_sample_large: logits descending, ties to the lower id */
static const float *sort_logits;
static int cmp_ref(const void *a, const void *b)
{
	int x = *(const int *)a, y = *(const int *)b;
	if (sort_logits[x] != sort_logits[y])
		return sort_logits[x] > sort_logits[y] ? -1 : 1;
	return x - y;
}

/*
 * sample_token over a vocabulary larger than its blocks and first selections (quickselect, growing
 * nucleus): every draw inside the top-k / top-p set computed by a full sort in double, frequencies
 * within 0.01 of the renormalised probabilities, logprob = log p
 */
static void test_sample_large(void)
{
	enum { V = 1000, DRAWS = 60000 };
	static float logits[V];
	static int order[V], counts[V];
	static double prob[V];
	test_rng_seed(17);
	for (int v = 0; v < V; v++) {
		logits[v] = 2.0f * test_randn();
		order[v] = v;
	}
	sort_logits = logits;
	qsort(order, V, sizeof(int), cmp_ref);
	double z = 0.0;
	for (int v = 0; v < V; v++)
		z += exp((double)logits[v] - logits[order[0]]);
	for (int v = 0; v < V; v++)
		prob[v] = exp((double)logits[v] - logits[order[0]]) / z;
	struct { int top_k; float top_p; } cases[] = { { 0, 1.0f }, { 20, 1.0f }, { 0, 0.6f }, { 300, 0.6f } };
	struct gen_rng r;
	gen_rng_seed(&r, 5);
	for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
		struct sample_params p = sample_params_default();
		p.top_k = cases[k].top_k;
		p.top_p = cases[k].top_p;
		/* the reference set: the top-k, then its smallest prefix holding top_p of the top-k's mass */
		int n = p.top_k > 0 ? p.top_k : V, outside = 0;
		double mass = 0.0, worst = 0.0, worst_lp = 0.0;
		for (int i = 0; i < n; i++)
			mass += prob[order[i]];
		if (p.top_p < 1.0f) {
			double target = p.top_p * mass;
			for (n = 0, mass = 0.0; mass < target;)
				mass += prob[order[n++]];
		}
		memset(counts, 0, sizeof(counts));
		for (int i = 0; i < DRAWS; i++) {
			float lp;
			int id = sample_token(logits, V, &p, &r, &lp);
			CU_ASSERT_FATAL(id >= 0 && id < V);
			counts[id]++;
			double e = fabs(lp - log(prob[id]));
			worst_lp = e > worst_lp ? e : worst_lp;
		}
		for (int i = 0; i < V; i++) {
			int id = order[i];
			if (i >= n) {
				outside += counts[id];
				continue;
			}
			double e = fabs(counts[id] / (double)DRAWS - prob[id] / mass);
			worst = e > worst ? e : worst;
		}
		printf("\n  top_k %d top_p %.1f: nucleus %d, draws outside %d, worst frequency error %.4f, "
		       "worst logprob error %.2g", p.top_k, p.top_p, n, outside, worst, worst_lp);
		CU_ASSERT_EQUAL(outside, 0);
		CU_ASSERT(worst < 0.01);
		CU_ASSERT(worst_lp < 1e-5);
	}
	printf("\n");
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
		{ "decode_step == model_forward, v2 with groups, 2 shared experts", test_decode_v2_groups },
		{ "decode_step == model_forward, dense only", test_decode_dense },
		{ "decode_step == model_forward, v3-like with YaRN RoPE", test_decode_yarn },
		{ "decode_step refuses bad arguments", test_decode_bad_args },
		{ "batched decoding == decoding alone", test_batched_equals_alone },
		{ "a repeated prompt is prefilled once (GRPO groups)", test_shared_prompt_prefill },
		{ "batched decoding (grouped experts) == model_forward, routes recorded",
		  test_batched_grouped_experts },
		{ "decoding does not depend on the thread count", test_decode_thread_independent },
		{ "cache bytes per token", test_cache_bytes },
		{ NULL, NULL },
	};
	static const struct test_case gen[] = {
		{ "greedy == argmax of model_forward, eos stops", test_greedy_matches_forward },
		{ "seeded sampling reproducible", test_sampling_reproducible },
		{ "per-sequence seeds: a completion does not depend on its batch", test_sequence_seeds },
		{ "generate_cached records every input token's routes", test_generate_routes },
		{ "sample_token top-k, top-p, frequencies", test_sample_token },
		{ "sample_token over a large vocabulary vs a full sort", test_sample_large },
		{ "moe generate entry point", test_cli },
		{ NULL, NULL },
	};
	add_suite("decode", decode);
	add_suite("generate", gen);
}
