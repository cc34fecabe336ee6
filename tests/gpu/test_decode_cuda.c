/*
 * tests/gpu/test_decode_cuda.c - latent-cache decoding on the GPU (model/cuda/decode_cuda.h) against the
 * CPU decode (model/decode.h) on the same weights and tokens: the logits at every position of a prefill of
 * two prompts (one shared by two slots: prefilled once, copied) and of the decode steps after it, for each
 * model variant, fp32 (tight) and bf16 matmuls (bf16 tolerance); the routes recorded; one sequence decoded
 * alone equal to the same sequence in the batch; the device sampler equal to the CPU's sample_token given
 * the same xoshiro streams (ids, log-probabilities and the streams' states after the draws), and
 * reproducible; GPU generation (rl/generate.h generate_cuda) equal to the CPU's generate_cached.
 *
 * Tiny shapes: the emulator (tests/gpu/emu) runs every kernel thread by thread.  The vocabulary is wider
 * than the sampler's block (256 threads) so that each thread sees several ids.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "model/decode.h"
#include "model/model.h"
#include "rl/generate.h"

#ifdef MOE_HAVE_CUDA
#include "model/cuda/decode_cuda.h"
#include "model/cuda/model_cuda.h"
#include "model/cuda/ops_cuda.h"
#endif
#include "gpu/gpu_suite.h"

#ifdef MOE_HAVE_CUDA

static struct model_config dec_config(enum test_variant v)
{
	struct model_config c = {
		.vocab_size = 300, .hidden_size = 32, .intermediate_size = 48, .moe_intermediate_size = 16,
		.num_hidden_layers = 2, .num_attention_heads = 2, .num_key_value_heads = 2,
		.n_shared_experts = 1, .n_routed_experts = 4, .routed_scaling_factor = 2.5,
		.kv_lora_rank = 16, .q_lora_rank = 12, .qk_rope_head_dim = 8, .qk_nope_head_dim = 8,
		.v_head_dim = 8, .n_group = 2, .topk_group = 1, .num_experts_per_tok = 2,
		.moe_layer_freq = 1, .first_k_dense_replace = 1, .norm_topk_prob = true,
		.scoring_func = MOE_SCORING_SIGMOID, .aux_loss_alpha = 0.0, .seq_aux = true,
		.max_position_embeddings = 32, .initializer_range = 0.1, .rms_norm_eps = 1e-6,
		.rope_theta = 10000.0,
	};
	test_apply_variant(&c, v, 8);
	return c;
}

static struct moe_model *dec_model(enum test_variant v, struct model_config *c)
{
	char err[256];
	*c = dec_config(v);
	struct moe_model *m = model_create(c, 0, c->n_routed_experts, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	model_init_weights(m, 5 + v);
	if (c->n_routed_experts)
		test_separate_routers(m, 9 + v);
	return m;
}

/*
 * The script of a decode: step 0 prefills prompt A (5 tokens, slot 0) and prompt B (3 tokens, slot 1) in
 * one call, then slot 2 takes slot 0's prefix; steps 1..3 feed one token to each of the three slots.
 */
#define N_STEPS 4
#define MAX_TOK 8
#define MAX_LEN 12
static const int prompt_a[5] = { 3, 141, 59, 265, 35 }, prompt_b[3] = { 89, 7, 293 };
static const int next_tok[N_STEPS][3] = { { 0 }, { 11, 200, 42 }, { 5, 97, 298 }, { 150, 1, 77 } };

/* step s's tokens, slots and positions; returns n */
static int script(int s, int *tok, int *slot, int *pos)
{
	if (s == 0) {
		for (int i = 0; i < 5; i++)
			tok[i] = prompt_a[i], slot[i] = 0, pos[i] = i;
		for (int i = 0; i < 3; i++)
			tok[5 + i] = prompt_b[i], slot[5 + i] = 1, pos[5 + i] = i;
		return 8;
	}
	static const int plen[3] = { 5, 3, 5 };
	for (int g = 0; g < 3; g++)
		tok[g] = next_tok[s][g], slot[g] = g, pos[g] = plen[g] + s - 1;
	return 3;
}

struct trace {
	float *logits[N_STEPS];   /* [n_s, V] */
	int n[N_STEPS];
	int *routes;              /* [L][3][MAX_LEN][K] */
};

static void trace_free(struct trace *t)
{
	for (int s = 0; s < N_STEPS; s++)
		free(t->logits[s]);
	free(t->routes);
}

static void cpu_trace(struct moe_model *m, struct trace *t)
{
	const struct model_config *c = &m->cfg;
	struct latent_cache *lc = latent_cache_create(c, 3, MAX_LEN);
	CU_ASSERT_PTR_NOT_NULL_FATAL(lc);
	int K = c->num_experts_per_tok, L = c->num_hidden_layers;
	if (c->n_routed_experts)
		CU_ASSERT_FATAL(latent_cache_enable_routes(lc, c) == 0);
	for (int s = 0; s < N_STEPS; s++) {
		int tok[MAX_TOK], slot[MAX_TOK], pos[MAX_TOK];
		int n = script(s, tok, slot, pos);
		t->n[s] = n;
		t->logits[s] = test_xmalloc(sizeof(float) * n * c->vocab_size);
		CU_ASSERT_FATAL(decode_step(m, lc, tok, slot, pos, n, t->logits[s]) == 0);
		if (s == 0)
			CU_ASSERT_FATAL(latent_cache_copy_prefix(lc, 2, 0, 5) == 0);
	}
	t->routes = test_xmalloc(sizeof(int) * ((size_t)L * 3 * MAX_LEN * K + 1));
	for (int l = 0; l < L; l++)
		for (int g = 0; g < 3; g++)
			for (int p = 0; p < MAX_LEN; p++) {
				const int *r = c->n_routed_experts ? latent_cache_route(lc, l, g, p) : NULL;
				for (int k = 0; k < K; k++)
					t->routes[(((size_t)l * 3 + g) * MAX_LEN + p) * K + k] = r ? r[k] : -1;
			}
	latent_cache_free(lc);
}

/* slots: only slot `only` (>= 0) decodes, alone, from a fresh decoder; -1 all three */
static void gpu_trace(struct moe_model *m, int bf16, int only, struct trace *t)
{
	const struct model_config *c = &m->cfg;
	char err[256];
	struct gpu_model *g = gpu_model_create(m, bf16, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(g);
	struct gpu_decoder *d = gpu_decoder_create(g, m, 3, MAX_LEN, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(d);
	int K = c->num_experts_per_tok, L = c->num_hidden_layers;
	if (c->n_routed_experts)
		CU_ASSERT_FATAL(gpu_decoder_enable_routes(d) == 0);
	for (int s = 0; s < N_STEPS; s++) {
		int tok[MAX_TOK], slot[MAX_TOK], pos[MAX_TOK], n = script(s, tok, slot, pos), k = 0;
		for (int i = 0; i < n; i++)  /* keep only's tokens (slot 2 is slot 0's copy) */
			if (only < 0 || slot[i] == only || (s == 0 && only == 2 && slot[i] == 0)) {
				tok[k] = tok[i], slot[k] = slot[i], pos[k] = pos[i];
				k++;
			}
		t->n[s] = k;
		t->logits[s] = test_xmalloc(sizeof(float) * k * c->vocab_size);
		CU_ASSERT_FATAL(gpu_decode_step(d, tok, slot, pos, k, NULL, 0) == 0);
		gpu_decoder_logits_to_host(d, t->logits[s]);
		if (s == 0 && (only < 0 || only == 2))
			CU_ASSERT_FATAL(gpu_decoder_copy_prefix(d, 2, 0, 5) == 0);
	}
	if (only < 0)
		CU_ASSERT(gpu_decoder_len(d, 0) == 8 && gpu_decoder_len(d, 2) == 8);
	t->routes = test_xmalloc(sizeof(int) * ((size_t)L * 3 * MAX_LEN * K + 1));
	for (int l = 0; l < L; l++)
		for (int gg = 0; gg < 3; gg++)
			for (int p = 0; p < MAX_LEN; p++) {
				const int *r = c->n_routed_experts ? gpu_decoder_route(d, l, gg, p) : NULL;
				for (int k = 0; k < K; k++)
					t->routes[(((size_t)l * 3 + gg) * MAX_LEN + p) * K + k] = r ? r[k] : -1;
			}
	gpu_decoder_free(d);
	gpu_model_free(g);
}

static float bf16_round(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	u += 0x7fffu + ((u >> 16) & 1u);  /* round to nearest even (the weights are finite) */
	u &= 0xffff0000u;
	memcpy(&f, &u, 4);
	return f;
}

/*
 * fp32: only summation order differs (tight).  bf16: how far a bf16 rounding moves the logits of a small
 * random model varies from row to row, so each row's bound is relative to a measured scale, as in
 * test_model_cuda.c: the CPU decode on bf16-rounded weights; the GPU (which also rounds the activation
 * operands) must stay within 2e-2 + 4 times that.  A wrong operand lands orders of magnitude outside.
 */
static void check_variant(enum test_variant v, int bf16)
{
	struct model_config c;
	struct moe_model *m = dec_model(v, &c);
	struct trace cpu = { 0 }, gpu = { 0 }, sens = { 0 };
	size_t V = (size_t)c.vocab_size;
	cpu_trace(m, &cpu);
	if (bf16) {
		float *w = test_xmalloc(sizeof(float) * m->n_weights);
		memcpy(w, m->weights, sizeof(float) * m->n_weights);
		for (size_t i = 0; i < m->n_weights; i++)
			m->weights[i] = bf16_round(w[i]);
		cpu_trace(m, &sens);
		memcpy(m->weights, w, sizeof(float) * m->n_weights);
		free(w);
	}
	gpu_trace(m, bf16, -1, &gpu);
	double worst = 0.0, worst_sens = 0.0, base = bf16 ? 2e-2 : 2e-5;
	int bad = 0;
	for (int s = 0; s < N_STEPS; s++) {
		CU_ASSERT_FATAL(gpu.n[s] == cpu.n[s]);
		for (int i = 0; i < cpu.n[s]; i++) {  /* every position of every step */
			double e = norm_rel_err(gpu.logits[s] + i * V, cpu.logits[s] + i * V, V);
			double es = bf16 ? norm_rel_err(sens.logits[s] + i * V, cpu.logits[s] + i * V, V) : 0.0;
			worst = e > worst || isnan(e) ? e : worst;
			worst_sens = es > worst_sens ? es : worst_sens;
			if (!(e < base + 4.0 * es)) {
				printf("\n      step %d row %d: logits rel err %.3e (bf16 weights alone %.3e)", s, i, e, es);
				bad++;
			}
		}
	}
	int route_diff = 0;
	size_t nr = (size_t)c.num_hidden_layers * 3 * MAX_LEN * c.num_experts_per_tok;
	for (size_t i = 0; i < nr; i++)
		route_diff += gpu.routes[i] != cpu.routes[i];
	printf("\n    %-10s %s: worst logits rel err %.2e (bf16 weights alone on the CPU %.2e), routes differ %d",
	       test_variant_name[v], bf16 ? "bf16" : "fp32", worst, worst_sens, route_diff);
	CU_ASSERT(bad == 0);
	if (!bf16)
		CU_ASSERT(route_diff == 0);
	trace_free(&cpu);
	trace_free(&gpu);
	trace_free(&sens);
	model_free(m);
}

static void test_logits_fp32(void)
{
	for (int v = 0; v < N_VARIANTS; v++)
		check_variant(v, 0);
}

static void test_logits_bf16(void)
{
	check_variant(V3_LIKE, 1);
	check_variant(V2_LIKE, 1);
}

/* a sequence decoded alone gives its logits in the batch (fp32: up to the products' summation order) */
static void test_batched_equals_alone(void)
{
	struct model_config c;
	struct moe_model *m = dec_model(V3_LIKE, &c);
	struct trace all = { 0 };
	size_t V = (size_t)c.vocab_size;
	gpu_trace(m, 0, -1, &all);
	for (int only = 1; only <= 2; only++) {
		struct trace one = { 0 };
		gpu_trace(m, 0, only, &one);
		double worst = 0.0;
		for (int s = 0; s < N_STEPS; s++) {
			/* the row of `only` in the batch: step 0 holds A's 5 rows then B's 3; later steps a row a slot */
			int row = s == 0 ? (only == 1 ? 7 : 4) : only, mine = s == 0 ? one.n[0] - 1 : 0;
			double e = norm_rel_err(one.logits[s] + mine * V, all.logits[s] + row * V, V);
			worst = e > worst || isnan(e) ? e : worst;
		}
		printf("\n    slot %d alone vs in the batch: worst logits rel err %.2e", only, worst);
		CU_ASSERT(worst < 1e-5);
		trace_free(&one);
	}
	trace_free(&all);
	model_free(m);
}

/* the device sampler against sample_token on the same logits and streams */
static void test_sampler_matches_cpu(void)
{
	struct model_config c;
	struct moe_model *m = dec_model(V3_LIKE, &c);
	char err[256];
	struct gpu_model *g = gpu_model_create(m, 0, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(g);
	struct gpu_decoder *d = gpu_decoder_create(g, m, 3, MAX_LEN, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(d);
	int tok[MAX_TOK], slot[MAX_TOK], pos[MAX_TOK], n = script(0, tok, slot, pos), V = c.vocab_size;
	const int rows[3] = { 4, 7, 0 }, row_slot[3] = { 0, 1, 2 };
	CU_ASSERT_FATAL(gpu_decode_step(d, tok, slot, pos, n, rows, 3) == 0);
	float *logits = test_xmalloc(sizeof(float) * 3 * V);
	gpu_decoder_logits_to_host(d, logits);
	struct { float t, p; int k; } modes[] = {
		{ 0.0f, 1.0f, 0 }, { 1.0f, 1.0f, 0 }, { 0.7f, 1.0f, 0 }, { 1.0f, 1.0f, 5 }, { 1.3f, 0.6f, 0 },
		{ 0.9f, 0.8f, 12 }, { 1.0f, 0.05f, 0 }, { 2.0f, 1.0f, 299 },
	};
	enum { DRAWS = 6 };
	for (size_t mi = 0; mi < sizeof(modes) / sizeof(modes[0]); mi++) {
		struct sample_params sp = sample_params_default();
		sp.temperature = modes[mi].t;
		sp.top_p = modes[mi].p;
		sp.top_k = modes[mi].k;
		struct gen_rng rng[3];
		uint64_t st[12], after[12];
		for (int r = 0; r < 3; r++) {
			gen_rng_seed(&rng[r], 1000 + 17 * mi + r);
			memcpy(st + 4 * r, rng[r].s, sizeof(rng[r].s));
		}
		int ids[DRAWS][3], again[DRAWS][3], same = 1, mism = 0;
		float lp[DRAWS][3], lp_worst = 0.0f;
		for (int pass = 0; pass < 2; pass++) {
			gpu_decoder_set_rng(d, st);
			for (int k = 0; k < DRAWS; k++)
				gpu_sample(d, row_slot, 3, sp.temperature, sp.top_p, sp.top_k, pass ? again[k] : ids[k],
					   lp[k]);
		}
		gpu_decoder_get_rng(d, after);
		for (int k = 0; k < DRAWS; k++)
			for (int r = 0; r < 3; r++) {
				float clp;
				int id = sample_token(logits + r * V, V, &sp, &rng[r], &clp);
				mism += id != ids[k][r];
				same &= again[k][r] == ids[k][r];
				if (id == ids[k][r] && fabsf(clp - lp[k][r]) > lp_worst)
					lp_worst = fabsf(clp - lp[k][r]);
			}
		int streams = 1;
		for (int r = 0; r < 3; r++)
			streams &= !memcmp(after + 4 * r, rng[r].s, sizeof(rng[r].s));
		printf("\n    T %.1f top_p %.2f top_k %3d: %d of %d ids differ from the CPU, logprob worst %.1e, "
		       "repeat %s, streams %s", sp.temperature, sp.top_p, sp.top_k, mism, DRAWS * 3, lp_worst,
		       same ? "same" : "DIFFERENT", streams ? "in step" : "DIFFER");
		CU_ASSERT(mism == 0);
		CU_ASSERT(lp_worst < 1e-4f);
		CU_ASSERT(same);
		CU_ASSERT(streams);
	}
	free(logits);
	gpu_decoder_free(d);
	gpu_model_free(g);
	model_free(m);
}

/*
 * generate_cuda against generate_cached (fp32, the same seeds): a group of three completions of a prompt
 * and one of two, sampled and greedy, an end-of-text id (greedy: one the CPU run samples early): the same tokens, lengths and routes, log-probabilities
 * within float rounding; a second call on the same decoder repeats the first.
 */
static void test_generate_matches_cpu(void)
{
	struct model_config c;
	struct moe_model *m = dec_model(V3_LIKE, &c);
	char err[256];
	struct gpu_model *g = gpu_model_create(m, 0, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(g);
	struct gpu_decoder *d = NULL;
	/* a group of three one-token prompts: more sequences than prefill tokens (logits rows repeat) */
	enum { G = 5, TN = 6 };
	static const int prompt_c[1] = { 42 };
	const int *prompts[G] = { prompt_c, prompt_c, prompt_c, prompt_b, prompt_b };
	const int lens[G] = { 1, 1, 1, 3, 3 };
	const uint64_t seeds[G] = { 11, 12, 13, 14, 15 };
	int L = c.num_hidden_layers, K = c.num_experts_per_tok;
	for (int mode = 0; mode < 2; mode++) {
		struct sample_params sp = sample_params_default();
		sp.max_new_tokens = TN;
		sp.temperature = mode ? 0.0f : 1.0f;
		sp.top_k = mode ? 0 : 40;
		sp.eos_id = 17;
		int ct[G * TN], cl[G], gt[G * TN], gl[G], rt[G * TN], rl[G];
		float clp[G * TN], glp[G * TN], rlp[G * TN];
		struct latent_cache *lc = latent_cache_create(&c, G, 5 + TN);
		CU_ASSERT_FATAL(lc && latent_cache_enable_routes(lc, &c) == 0);
		if (mode) {  /* greedy: stop at the token the CPU's fourth sequence decodes third */
			CU_ASSERT_FATAL(generate_cached(m, lc, prompts, lens, G, &sp, seeds, ct, cl, clp) == 0);
			sp.eos_id = ct[3 * TN + 2];
		}
		CU_ASSERT_FATAL(generate_cached(m, lc, prompts, lens, G, &sp, seeds, ct, cl, clp) == 0);
		CU_ASSERT_FATAL(generate_cuda(g, m, &d, 1, prompts, lens, G, &sp, seeds, gt, gl, glp) == 0);
		int tok_diff = 0, route_diff = 0, eos = 0;
		float lp_worst = 0.0f;
		for (int k = 0; k < G; k++) {
			tok_diff += cl[k] != gl[k];
			for (int t = 0; t < TN; t++) {
				tok_diff += ct[k * TN + t] != gt[k * TN + t];
				eos += ct[k * TN + t] == sp.eos_id;
				float e = fabsf(clp[k * TN + t] - glp[k * TN + t]);
				lp_worst = e > lp_worst ? e : lp_worst;
			}
			for (int l = 1; l < L; l++)  /* the MoE layers, every position that was an input */
				for (int p = 0; p < lens[k] + cl[k] - 1; p++)
					for (int e = 0; e < K; e++)
						route_diff += latent_cache_route(lc, l, k, p)[e] != gpu_decoder_route(d, l, k, p)[e];
		}
		CU_ASSERT_FATAL(generate_cuda(g, m, &d, 1, prompts, lens, G, &sp, seeds, rt, rl, rlp) == 0);
		int again = !memcmp(rt, gt, sizeof(gt)) && !memcmp(rl, gl, sizeof(gl)) && !memcmp(rlp, glp, sizeof(glp));
		printf("\n    %s: %d token/length differences, logprob worst %.1e, routes differ %d, eos sampled %d, "
		       "repeat %s", mode ? "greedy" : "T 1 top_k 40", tok_diff, lp_worst, route_diff, eos,
		       again ? "same" : "DIFFERENT");
		CU_ASSERT(tok_diff == 0);
		CU_ASSERT(lp_worst < 1e-4f);
		CU_ASSERT(route_diff == 0);
		CU_ASSERT(again);
		latent_cache_free(lc);
	}
	gpu_decoder_free(d);
	gpu_model_free(g);
	model_free(m);
}

/* bad arguments are refused before anything runs */
static void test_refuses_bad_steps(void)
{
	struct model_config c;
	struct moe_model *m = dec_model(V3_LIKE, &c);
	char err[256];
	struct gpu_model *g = gpu_model_create(m, 0, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(g);
	struct gpu_decoder *d = gpu_decoder_create(g, m, 2, 4, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(d);
	int tok[2] = { 1, 2 }, slot[2] = { 0, 0 }, pos[2] = { 0, 2 }, bad_tok = 300, row = 5;
	CU_ASSERT(gpu_decode_step(d, tok, slot, pos, 2, NULL, 0) == -1);     /* skips position 1 */
	CU_ASSERT(gpu_decode_step(d, &bad_tok, slot, pos, 1, NULL, 0) == -1); /* beyond the vocabulary */
	CU_ASSERT(gpu_decode_step(d, tok, slot, pos, 1, &row, 1) == -1);      /* a logits row beyond n */
	CU_ASSERT(gpu_decoder_len(d, 0) == 0);
	CU_ASSERT(gpu_decoder_copy_prefix(d, 1, 0, 1) == -1);                 /* slot 0 holds nothing */
	CU_ASSERT_PTR_NULL(gpu_decoder_create(g, m, 0, 4, err, sizeof(err)));
	gpu_decoder_free(d);
	gpu_model_free(g);
	model_free(m);
}

#endif /* MOE_HAVE_CUDA */

void register_tests(void)
{
#ifdef MOE_HAVE_CUDA
	static const struct test_case cases[] = {
		{"logits_fp32", test_logits_fp32},
		{"logits_bf16", test_logits_bf16},
		{"batched_equals_alone", test_batched_equals_alone},
		{"sampler_matches_cpu", test_sampler_matches_cpu},
		{"generate_matches_cpu", test_generate_matches_cpu},
		{"refuses_bad_steps", test_refuses_bad_steps},
		{NULL, NULL},
	};
	add_gpu_suite("decode_cuda", cases);
#else
	add_gpu_suite("decode_cuda", NULL);
#endif
}
