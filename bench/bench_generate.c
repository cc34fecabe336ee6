/*
 * bench/bench_generate.c - generation with the MLA latent cache on the CPU (rl/generate.h).
 *
 * A model from a config file (default configs/small.json), randomly initialised (model_init_weights),
 * random prompts.  Every timing is repeated --reps times and the median reported (the machine is shared
 * and noisy).  Three measurements:
 *
 * (a) throughput: G sequences (8, 16, 32 and 64) of --new tokens after a --prompt-token prompt,
 *     generated batched (one generate() call: one decode step per token position for all G) vs one at a
 *     time (G generate() calls); new tokens / s of each and their ratio.  Target: batched >= 4x.
 * (b) the cost of one decode step at a context of 64, 256 and 1024 positions, for one sequence and for a
 *     batch of G = 8 (the cache is filled with random latents: a step's cost does not depend on their
 *     values), against recomputing the prefix with model_forward (what decoding without a cache costs)
 *     and against the naive form of attention over the same cache (latent_cache.naive_attention).
 *     Target: one sequence's step at 1024 costs < 4x its step at 64.
 * (c) cache bytes per token: latent_cache_bytes_per_token == (kv_lora_rank + qk_rope_head_dim) x layers x 4
 *     and equal to what latent_cache_create allocates per position.  A mismatch exits with status 1.
 * (d) one GRPO group: 16 completions of one 256-token prompt (prefilled once) against 16 different
 *     prompts of that length.
 * (e) a GRPO step's sampling as `moe grpo` does it: grpo.prompts_per_step prompts x grpo.group_size
 *     completions (configs/small.json: 8 x 8), all in one batch with each group's prompt prefilled once,
 *     against generating the same sequences one at a time.  Target (the issue's): batched >= 4x.
 * (f) int8 weights (model/quant.h) against fp32 in the same run: the weights' bytes, a decode step at a
 *     context of 64 for one sequence and for a batch of 8 (fp32 and int8 timed in alternating rounds, so
 *     the machine's load hits both alike), and whole generate() runs of 1 and 8 sequences.  Target: int8
 *     decodes faster than fp32 (a decode step is bound by the weight bytes it reads).  `--only int8`
 *     runs (f) alone.
 * (g) self-speculative decoding with the multi-token-prediction head (rl/generate.h,
 *     generate_speculative) against plain greedy decoding, one sequence at a time: --new tokens after
 *     each of 8 prompts of --prompt tokens (windows of --shard FILE when given, else random), the
 *     acceptance rate of the drafts, tokens per main-model step, tokens/s of each and their ratio, and
 *     whether every completion equals greedy's.  Meaningful with a trained MTP model: --checkpoint FILE
 *     (its config; without it the --config model, randomly initialised, gets one MTP depth).
 *     `--only speculative` runs (g) alone.
 *
 * Not a test: run it by hand (see bench/RESULTS.md).
 */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "launch/startup.h"
#include "model/decode.h"
#include "model/quant.h"
#include "model/model.h"
#include "data/shard.h"
#include "rl/generate.h"
#include "train/checkpoint.h"
#include "train/config.h"

#define MAX_REPS 64

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof(double), cmp_double);
	return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static uint64_t rng_state = 0x853c49e6748fea9bULL;

static uint32_t rng_u32(void)
{
	rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
	return (uint32_t)(rng_state >> 33);
}

struct opts {
	const char *config;
	int reps, prompt, new_tokens, threads;
	uint64_t seed;
	const char *only;
	const char *checkpoint, *shard;
};

/* ---------------------------------------------------------------- (a) throughput */

/* seconds to generate G sequences batched (one_at_a_time = 0) or one generate() call each */
static double time_generate(struct moe_model *m, const int *const *prompts, const int *lens, int G,
			    const struct sample_params *p, const uint64_t *seeds, int one_at_a_time, int *out,
			    int *out_lens)
{
	double t0 = now_s();
	if (!one_at_a_time) {
		if (generate_cached(m, NULL, prompts, lens, G, p, seeds, out, out_lens, NULL))
			return -1.0;
		return now_s() - t0;
	}
	for (int g = 0; g < G; g++)
		if (generate_cached(m, NULL, prompts + g, lens + g, 1, p, seeds + g,
				    out + (size_t)g * p->max_new_tokens, out_lens + g, NULL))
			return -1.0;
	return now_s() - t0;
}

/*
 * tokens/s batched and one at a time for G sequences, each run of `group` of them completing one prompt
 * (group 1: G different prompts); returns the ratio (0 on failure)
 */
static double bench_throughput(struct moe_model *m, const struct opts *o, int G, int group)
{
	int V = m->cfg.vocab_size, Tn = o->new_tokens;
	int *tok = malloc(sizeof(int) * (size_t)G * o->prompt), *lens = malloc(sizeof(int) * G);
	const int **prompts = malloc(sizeof(*prompts) * G);
	uint64_t *seeds = malloc(sizeof(uint64_t) * G);
	int *out[2] = { malloc(sizeof(int) * G * Tn), malloc(sizeof(int) * G * Tn) };
	int *out_lens[2] = { malloc(sizeof(int) * G), malloc(sizeof(int) * G) };
	double t[2][MAX_REPS], med[2];
	for (int g = 0; g < G; g++) {
		for (int i = 0; i < o->prompt; i++)
			tok[g * o->prompt + i] = (int)(rng_u32() % (uint32_t)V);
		prompts[g] = tok + g / group * o->prompt;
		lens[g] = o->prompt;
		seeds[g] = o->seed + (uint64_t)g;
	}
	struct sample_params p = sample_params_default();
	p.max_new_tokens = Tn;  /* temperature 1, no eos: every sequence runs Tn tokens */
	for (int r = 0; r < o->reps; r++)
		for (int mode = 0; mode < 2; mode++)
			t[mode][r] = time_generate(m, prompts, lens, G, &p, seeds, mode, out[mode],
						   out_lens[mode]);
	for (int mode = 0; mode < 2; mode++)
		med[mode] = median(t[mode], o->reps);
	int same = !memcmp(out[0], out[1], sizeof(int) * G * Tn);
	double tps[2] = { G * Tn / med[0], G * Tn / med[1] };
	if (group == 1)
		printf("(a) G = %2d, %d new tokens each: ", G, Tn);
	else
		printf("(e) %d prompt%s x G = %d, %d new tokens each: ", G / group, G > group ? "s" : "", group,
		       Tn);
	printf("batched %8.1f tokens/s, one at a time %8.1f tokens/s, ratio %.2fx (tokens %s)\n", tps[0],
	       tps[1], tps[0] / tps[1], same ? "identical" : "differ by float rounding");
	free(tok);
	free(lens);
	free(prompts);
	free(seeds);
	for (int mode = 0; mode < 2; mode++) {
		free(out[mode]);
		free(out_lens[mode]);
	}
	return med[0] > 0 && med[1] > 0 ? tps[0] / tps[1] : 0.0;
}

/*
 * (d) one GRPO group: G completions of one prompt of P tokens (prefilled once, its cache rows copied)
 * against G different prompts of the same length (P x G prompt tokens to run); new tokens / s of each.
 */
static void bench_group(struct moe_model *m, const struct opts *o, int G, int P)
{
	int V = m->cfg.vocab_size, Tn = o->new_tokens;
	int *tok = malloc(sizeof(int) * (size_t)G * P), *lens = malloc(sizeof(int) * G);
	const int **prompts = malloc(sizeof(*prompts) * G);
	uint64_t *seeds = malloc(sizeof(uint64_t) * G);
	int *out = malloc(sizeof(int) * G * Tn), *out_lens = malloc(sizeof(int) * G);
	double t[2][MAX_REPS], med[2];
	for (size_t i = 0; i < (size_t)G * P; i++)
		tok[i] = (int)(rng_u32() % (uint32_t)V);
	struct sample_params p = sample_params_default();
	p.max_new_tokens = Tn;
	for (int r = 0; r < o->reps; r++)
		for (int shared = 0; shared < 2; shared++) {
			for (int g = 0; g < G; g++) {
				prompts[g] = tok + (shared ? 0 : (size_t)g * P);
				lens[g] = P;
				seeds[g] = o->seed + (uint64_t)g;
			}
			double t0 = now_s();
			if (generate_cached(m, NULL, prompts, lens, G, &p, seeds, out, out_lens, NULL))
				t[shared][r] = -1.0;
			else
				t[shared][r] = now_s() - t0;
		}
	for (int k = 0; k < 2; k++)
		med[k] = median(t[k], o->reps);
	printf("(d) G = %d completions of %d new tokens after a %d-token prompt: one shared prompt %8.1f "
	       "tokens/s, %d different prompts %8.1f tokens/s, %.2fx\n", G, Tn, P, G * Tn / med[1], G,
	       G * Tn / med[0], med[0] / med[1]);
	free(tok);
	free(lens);
	free(prompts);
	free(seeds);
	free(out);
	free(out_lens);
}

/* ---------------------------------------------------------------- (b) cost per step */

/* fill slots 0..n_slots-1 of every layer with ctx positions of random latents */
static void fill_cache(struct latent_cache *lc, int ctx)
{
	size_t row = (size_t)lc->kv_lora + lc->dr;
	for (int l = 0; l < lc->n_layers; l++)
		for (int s = 0; s < lc->n_slots; s++) {
			float *kv = lc->kv + ((size_t)l * lc->n_slots + s) * lc->max_len * row;
			for (size_t i = 0; i < (size_t)ctx * row; i++)
				kv[i] = (float)(rng_u32() % 2001) / 1000.0f - 1.0f;
		}
	for (int s = 0; s < lc->n_slots; s++)
		lc->len[s] = ctx;
}

/* median seconds of one decode step of n tokens, each at position ctx of its own slot */
static double time_step(struct moe_model *m, struct latent_cache *lc, int n, int ctx, int reps)
{
	int tok[64], slots[64], pos[64];
	double t[MAX_REPS];
	for (int i = 0; i < n; i++) {
		tok[i] = (int)(rng_u32() % (uint32_t)m->cfg.vocab_size);
		slots[i] = i;
		pos[i] = ctx;
	}
	decode_step(m, lc, tok, slots, pos, n, NULL);  /* warm-up: buffers sized */
	for (int r = 0; r < reps; r++) {
		double t0 = now_s();
		if (decode_step(m, lc, tok, slots, pos, n, NULL))
			return -1.0;
		t[r] = now_s() - t0;
	}
	for (int i = 0; i < n; i++)
		lc->len[i] = ctx;
	return median(t, reps);
}

/* median seconds of model_forward over a prefix of ctx + 1 tokens (the next token's logits, uncached) */
static double time_forward(struct moe_model *m, int ctx, int reps)
{
	int *tok = malloc(sizeof(int) * (ctx + 1));
	double t[MAX_REPS];
	for (int i = 0; i <= ctx; i++)
		tok[i] = (int)(rng_u32() % (uint32_t)m->cfg.vocab_size);
	model_forward(m, tok, NULL, 1, ctx + 1);
	for (int r = 0; r < reps; r++) {
		double t0 = now_s();
		model_forward(m, tok, NULL, 1, ctx + 1);
		t[r] = now_s() - t0;
	}
	free(tok);
	return median(t, reps);
}

/* the table of (b); returns the ratio of one sequence's step at the largest to the smallest context */
static double bench_step_cost(struct moe_model *m, const struct opts *o, int G)
{
	static const int ctxs[] = { 64, 256, 1024 };
	int nc = 3;
	double one[3], batch[3], fwd[3], naive[3];
	struct latent_cache *lc = latent_cache_create(&m->cfg, G, ctxs[nc - 1] + 1);
	if (!lc)
		return 1e30;
	printf("(b) context | step, 1 sequence | step, batch of %d (per token) | "
	       "model_forward of the prefix | naive form, 1 sequence\n", G);
	for (int i = 0; i < nc; i++) {
		fill_cache(lc, ctxs[i]);
		one[i] = time_step(m, lc, 1, ctxs[i], 4 * o->reps);
		batch[i] = time_step(m, lc, G, ctxs[i], 4 * o->reps);
		fwd[i] = time_forward(m, ctxs[i], o->reps);
		lc->naive_attention = 1;
		naive[i] = time_step(m, lc, 1, ctxs[i], 4 * o->reps);
		lc->naive_attention = 0;
		printf("    %7d | %9.3f ms     | %9.3f ms (%7.3f ms)          | %9.2f ms                 | "
		       "%9.3f ms\n", ctxs[i], 1e3 * one[i], 1e3 * batch[i], 1e3 * batch[i] / G, 1e3 * fwd[i],
		       1e3 * naive[i]);
	}
	printf("    cost at %d / cost at %d: decode %.2fx (1 sequence), %.2fx (batch of %d); model_forward "
	       "%.2fx\n", ctxs[nc - 1], ctxs[0], one[nc - 1] / one[0], batch[nc - 1] / batch[0], G,
	       fwd[nc - 1] / fwd[0]);
	latent_cache_free(lc);
	return one[nc - 1] / one[0];
}

/* ---------------------------------------------------------------- (c) cache size */

static int check_cache_bytes(const struct model_config *c)
{
	size_t want = (size_t)(c->kv_lora_rank + c->qk_rope_head_dim) * c->num_hidden_layers * 4;
	size_t got = latent_cache_bytes_per_token(c);
	struct latent_cache *lc = latent_cache_create(c, 2, 8);
	/* what the cache holds per (slot, position): kv_lora + dr floats in every layer */
	size_t held = lc ? (size_t)lc->n_layers * (lc->kv_lora + lc->dr) * sizeof(float) : 0;
	latent_cache_free(lc);
	int ok = got == want && held == want;
	printf("(c) cache bytes per token: %zu (= (%d + %d) x %d layers x 4 = %zu; cache holds %zu); %s\n",
	       got, c->kv_lora_rank, c->qk_rope_head_dim, c->num_hidden_layers, want, held,
	       ok ? "PASS" : "FAIL");
	size_t kv = (size_t)c->num_attention_heads * (mc_qk_head_dim(c) + c->v_head_dim);
	kv *= (size_t)c->num_hidden_layers;
	printf("    (caching k and v instead: heads x (qk_head_dim + v_head_dim) x layers x 4 = %zu bytes)\n",
	       kv * 4);
	return ok;
}

/* ---------------------------------------------------------------- main */

static void usage(const char *prog)
{
	fprintf(stderr, "usage: %s [--config FILE (configs/small.json)] [--reps N (5)] [--prompt T (16)]\n"
			"          [--new N (32)] [--threads N] [--seed S] [--only int8|speculative]\n"
			"          [--checkpoint FILE] [--shard FILE]\n", prog);
}

/* ---------------------------------------------------------------- (f) int8 weights */

/* median seconds of a whole generate() of G sequences of o->new_tokens after o->prompt tokens */
static double time_whole_generate(struct moe_model *m, const struct opts *o, int G)
{
	int V = m->cfg.vocab_size, *tok = malloc(sizeof(int) * (size_t)G * o->prompt), lens[64], olens[64];
	int *out = malloc(sizeof(int) * (size_t)G * o->new_tokens);
	const int *prompts[64];
	uint64_t seeds[64];
	double t[MAX_REPS];
	struct sample_params p = sample_params_default();

	p.max_new_tokens = o->new_tokens;
	p.eos_id = -1;
	for (int g = 0; g < G; g++) {
		for (int i = 0; i < o->prompt; i++)
			tok[g * o->prompt + i] = (int)(rng_u32() % (uint32_t)V);
		prompts[g] = tok + (size_t)g * o->prompt;
		lens[g] = o->prompt;
		seeds[g] = o->seed + g;
	}
	for (int r = 0; r < o->reps; r++) {
		double t0 = now_s();
		generate_cached(m, NULL, prompts, lens, G, &p, seeds, out, olens, NULL);
		t[r] = now_s() - t0;
	}
	free(tok);
	free(out);
	return median(t, o->reps);
}

static void bench_int8(struct moe_model *m, const struct opts *o)
{
	enum { CTX = 64, ROUNDS = 5 };
	struct quant_bytes b = quant_weight_bytes(m);
	struct model_quant *q = quant_create(m);
	struct latent_cache *lc = latent_cache_create(&m->cfg, 8, CTX + 1);
	double step[2][2][ROUNDS], gen[2][2], speedup = 0;
	static const int ns[2] = { 1, 8 };

	if (!q || !lc)
		return;
	printf("(f) weights: fp32 %.2f MB, int8 %.2f MB (%.3f); the quantised linear layers %.2f -> %.2f MB "
	       "(%.3f)\n", b.full / 1e6, b.int8 / 1e6, (double)b.int8 / b.full, b.linear_full / 1e6,
	       b.linear_int8 / 1e6, (double)b.linear_int8 / b.linear_full);
	fill_cache(lc, CTX);
	for (int r = 0; r < ROUNDS; r++)
		for (int w = 0; w < 2; w++) {
			m->quant = w ? q : NULL;
			for (int k = 0; k < 2; k++)
				step[w][k][r] = time_step(m, lc, ns[k], CTX, 4 * o->reps);
		}
	for (int w = 0; w < 2; w++) {
		m->quant = w ? q : NULL;
		for (int k = 0; k < 2; k++)
			gen[w][k] = time_whole_generate(m, o, ns[k]);
	}
	m->quant = NULL;
	printf("    decode step at context %d | fp32                | int8                | int8 / fp32\n", CTX);
	for (int k = 0; k < 2; k++) {
		double f = median(step[0][k], ROUNDS), i8 = median(step[1][k], ROUNDS);

		if (k == 0)
			speedup = f / i8;
		printf("    %2d sequence%s              | %7.3f ms %6.0f tok/s | %7.3f ms %6.0f tok/s | %.2fx\n",
		       ns[k], ns[k] > 1 ? "s" : " ", 1e3 * f, ns[k] / f, 1e3 * i8, ns[k] / i8, f / i8);
	}
	printf("    generate(), %d + %d tokens | fp32 tokens/s | int8 tokens/s | int8 / fp32\n", o->prompt,
	       o->new_tokens);
	for (int k = 0; k < 2; k++)
		printf("    %2d sequence%s              | %9.0f     | %9.0f     | %.2fx\n", ns[k],
		       ns[k] > 1 ? "s" : " ", ns[k] * o->new_tokens / gen[0][k], ns[k] * o->new_tokens / gen[1][k],
		       gen[0][k] / gen[1][k]);
	printf("    %s: int8 decodes faster than fp32 (1 sequence: %.2fx)\n", speedup > 1 ? "PASS" : "FAIL",
	       speedup);
	latent_cache_free(lc);
	quant_free(q);
}

/* ---------------------------------------------------------------- (g) speculative decoding */

enum { SPEC_PROMPTS = 8 };

/* SPEC_PROMPTS prompts of o->prompt tokens: windows of the shard at random offsets, else random ids */
static int spec_prompts(const struct opts *o, int V, int *tok)
{
	struct shard sh;
	char err[600];
	if (!o->shard) {
		for (int i = 0; i < SPEC_PROMPTS * o->prompt; i++)
			tok[i] = (int)(rng_u32() % (uint32_t)V);
		return 0;
	}
	if (shard_open(&sh, o->shard, V, err, sizeof(err))) {
		fprintf(stderr, "bench_generate: %s\n", err);
		return -1;
	}
	if (sh.n_tokens <= (uint64_t)o->prompt) {
		fprintf(stderr, "bench_generate: %s: fewer than %d tokens\n", o->shard, o->prompt + 1);
		shard_close(&sh);
		return -1;
	}
	for (int g = 0; g < SPEC_PROMPTS; g++) {
		uint64_t at = ((uint64_t)rng_u32() << 32 | rng_u32()) % (sh.n_tokens - (uint64_t)o->prompt);
		for (int i = 0; i < o->prompt; i++)
			tok[g * o->prompt + i] = (int)shard_token(&sh, at + (uint64_t)i);
	}
	shard_close(&sh);
	return 0;
}

/* seconds of one pass over the prompts, plain greedy (spec 0) or speculative; out [SPEC_PROMPTS, new] */
static double spec_pass(struct moe_model *m, const struct opts *o, const int *tok, int spec, int *out,
			struct spec_stats *sum)
{
	struct sample_params p = sample_params_default();
	int len = o->prompt, n;
	p.temperature = 0.0f;
	p.max_new_tokens = o->new_tokens;
	p.eos_id = -1;
	memset(sum, 0, sizeof(*sum));
	double t0 = now_s();
	for (int g = 0; g < SPEC_PROMPTS; g++) {
		const int *pr = tok + (size_t)g * len;
		int *row = out + (size_t)g * o->new_tokens;
		struct spec_stats st;
		if (spec ? generate_speculative(m, pr, len, &p, row, &n, &st) :
			   generate(m, &pr, &len, 1, &p, row, &n, NULL))
			return -1.0;
		if (spec) {
			sum->drafted += st.drafted;
			sum->accepted += st.accepted;
			sum->main_steps += st.main_steps;
			sum->mtp_steps += st.mtp_steps;
		}
	}
	return now_s() - t0;
}

/* median seconds of a step of n tokens (1 or 2) at positions ctx.. of slot 0, logits included: the main
 * model's (head 0) or the MTP head's (head 1; hidden holds its input rows) */
static double spec_step_time(struct moe_model *m, struct latent_cache *lc, int head, int n, int ctx, int reps,
			     float *logits, float *hidden)
{
	int tok[2], slot[2] = { 0, 0 }, pos[2] = { ctx, ctx + 1 };
	double t[MAX_REPS];
	for (int r = 0; r <= reps; r++) {  /* round 0 warms up */
		/* other tokens every time: two tokens route to more experts than one */
		tok[0] = (int)(rng_u32() % (uint32_t)m->cfg.vocab_size);
		tok[1] = (int)(rng_u32() % (uint32_t)m->cfg.vocab_size);
		lc->len[0] = ctx;
		double t0 = now_s();
		if (head ? mtp_draft_step(m, lc, hidden, tok, slot, pos, n, logits) :
			   decode_step_hidden(m, lc, tok, slot, pos, n, logits, hidden))
			return -1.0;
		if (r)
			t[r - 1] = now_s() - t0;
	}
	return median(t, reps);
}

/* what a round costs, in plain decode steps: the main model over 2 tokens, the head over 1 or 2 */
static void spec_costs(struct moe_model *m, const struct opts *o)
{
	int ctx = o->prompt + o->new_tokens / 2, reps = 4 * o->reps;
	struct latent_cache *lc = latent_cache_create(&m->cfg, 1, ctx + 2), *mc = mtp_cache_create(&m->cfg, 1, ctx + 2);
	float *logits = malloc(sizeof(float) * 2 * m->cfg.vocab_size), *hidden = calloc(2, sizeof(float) * m->cfg.hidden_size);
	if (lc && mc && logits && hidden) {
		fill_cache(lc, ctx);
		fill_cache(mc, ctx);
		double one = spec_step_time(m, lc, 0, 1, ctx, reps, logits, hidden);
		double two = spec_step_time(m, lc, 0, 2, ctx, reps, logits, hidden);
		double h1 = spec_step_time(m, mc, 1, 1, ctx, reps, logits, hidden);
		double h2 = spec_step_time(m, mc, 1, 2, ctx, reps, logits, hidden);
		printf("    at context %d, in plain steps (%.3f ms): the main model over 2 tokens %.2f, the head over 1 "
		       "%.2f, over 2 %.2f\n", ctx, 1e3 * one, two / one, h1 / one, h2 / one);
	}
	latent_cache_free(lc);
	latent_cache_free(mc);
	free(logits);
	free(hidden);
}

static int bench_speculative(struct moe_model *m, const struct opts *o)
{
	int V = m->cfg.vocab_size, N = SPEC_PROMPTS * o->new_tokens;
	int *tok = malloc(sizeof(int) * SPEC_PROMPTS * (size_t)o->prompt);
	int *ref = malloc(sizeof(int) * (size_t)N), *out = malloc(sizeof(int) * (size_t)N);
	double tp[MAX_REPS], ts[MAX_REPS];
	struct spec_stats st = { 0 }, none;
	int rc = 1;

	if (!tok || !ref || !out || spec_prompts(o, V, tok))
		goto out;
	/* alternating rounds, so the machine's load hits both alike */
	for (int r = 0; r < o->reps; r++) {
		tp[r] = spec_pass(m, o, tok, 0, ref, &none);
		ts[r] = spec_pass(m, o, tok, 1, out, &st);
		if (tp[r] < 0 || ts[r] < 0) {
			fprintf(stderr, "bench_generate: generation failed (a model without an MTP depth?)\n");
			goto out;
		}
	}
	double plain = median(tp, o->reps), spec = median(ts, o->reps);
	int same = !memcmp(ref, out, sizeof(int) * (size_t)N);
	printf("(g) self-speculative greedy decoding (MTP depth 1 drafts, the main model verifies), %d prompts "
	       "of %d tokens%s%s, %d new tokens each\n", SPEC_PROMPTS, o->prompt,
	       o->shard ? " from " : " (random)", o->shard ? o->shard : "", o->new_tokens);
	printf("    drafts accepted: %lld of %lld (%.1f%%); %.2f tokens per main-model step (plain: 1)\n",
	       st.accepted, st.drafted, st.drafted ? 100.0 * st.accepted / st.drafted : 0.0,
	       (double)N / (SPEC_PROMPTS + st.main_steps));
	printf("    plain greedy %.0f tokens/s, speculative %.0f tokens/s: %.2fx\n", N / plain, N / spec,
	       plain / spec);
	spec_costs(m, o);
	printf("    %s: the speculative completions equal plain greedy's\n", same ? "PASS" : "FAIL");
	rc = same ? 0 : 1;
out:
	free(tok);
	free(ref);
	free(out);
	return rc;
}

static int parse_args(int argc, char **argv, struct opts *o)
{
	*o = (struct opts){ "configs/small.json", 5, 16, 32, 0, 1234, NULL, NULL, NULL };
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!v)
			return -1;
		if (!strcmp(a, "--config"))
			o->config = v;
		else if (!strcmp(a, "--reps"))
			o->reps = atoi(v);
		else if (!strcmp(a, "--prompt"))
			o->prompt = atoi(v);
		else if (!strcmp(a, "--new"))
			o->new_tokens = atoi(v);
		else if (!strcmp(a, "--threads"))
			o->threads = atoi(v);
		else if (!strcmp(a, "--seed"))
			o->seed = strtoull(v, NULL, 10);
		else if (!strcmp(a, "--only") && (!strcmp(v, "int8") || !strcmp(v, "speculative")))
			o->only = v;
		else if (!strcmp(a, "--checkpoint"))
			o->checkpoint = v;
		else if (!strcmp(a, "--shard"))
			o->shard = v;
		else
			return -1;
		i++;
	}
	return o->reps < 1 || o->reps > MAX_REPS / 4 || o->prompt < 1 || o->new_tokens < 1 ? -1 : 0;
}

static struct moe_model *load_model(const struct opts *o, struct grpo_config *grpo)
{
	struct run_config rc;
	char err[1024];
	config_defaults(&rc);
	if (o->checkpoint ? checkpoint_read_header(o->checkpoint, &rc, NULL, err, sizeof(err)) :
			    config_load(&rc, o->config, NULL, 0, err, sizeof(err))) {
		fprintf(stderr, "bench_generate: %s\n", err);
		return NULL;
	}
	if (!o->checkpoint && o->only && !strcmp(o->only, "speculative") && !rc.model.num_nextn_predict_layers)
		rc.model.num_nextn_predict_layers = 1;
	struct moe_model *m = model_create(&rc.model, 0, rc.model.n_routed_experts, err, sizeof(err));
	if (!m) {
		fprintf(stderr, "bench_generate: %s\n", err);
		return NULL;
	}
	model_init_weights(m, o->seed);
	if (o->checkpoint && checkpoint_load_model(o->checkpoint, m, err, sizeof(err))) {
		fprintf(stderr, "bench_generate: %s\n", err);
		model_free(m);
		return NULL;
	}
	*grpo = rc.grpo;
	int64_t total, active;
	model_count_params(&rc.model, &total, &active);
	const struct model_config *c = &m->cfg;
	printf("model %s: %.2fM parameters (%.2fM activated), hidden %d, %d layers, %d heads, kv_lora %d, "
	       "q_lora %d, %d experts top-%d + %d shared, vocab %d; %d threads\n", o->config, total / 1e6,
	       active / 1e6, c->hidden_size, c->num_hidden_layers, c->num_attention_heads, c->kv_lora_rank,
	       c->q_lora_rank, c->n_routed_experts, c->num_experts_per_tok, c->n_shared_experts,
	       c->vocab_size, omp_get_max_threads());
	if (c->num_nextn_predict_layers)
		printf("    + %d multi-token-prediction depth(s)%s\n", c->num_nextn_predict_layers,
		       o->checkpoint ? "" : " (random weights)");
	return m;
}

int main(int argc, char **argv)
{
	startup_fix_blas_kernels(argv);
	struct opts o;
	if (parse_args(argc, argv, &o)) {
		usage(argv[0]);
		return 2;
	}
	if (o.threads > 0)
		omp_set_num_threads(o.threads);
	struct grpo_config grpo;
	struct moe_model *m = load_model(&o, &grpo);
	if (!m)
		return 1;
	const char *core = getenv("OPENBLAS_CORETYPE");
	printf("median of %d repetitions; prompts of %d tokens; OPENBLAS_CORETYPE=%s\n", o.reps, o.prompt,
	       core ? core : "(unset)");
	if (o.only) {
		int rc = 0;
		if (!strcmp(o.only, "int8"))
			bench_int8(m, &o);
		else
			rc = bench_speculative(m, &o);
		model_free(m);
		return rc;
	}
	/* 8 and 16: common GRPO group sizes (DeepSeek-R1 samples 16); 64: DeepSeekMath's */
	static const int groups[] = { 8, 16, 32, 64 };
	double ratio[4];
	for (int i = 0; i < 4; i++)
		ratio[i] = bench_throughput(m, &o, groups[i], 1);
	for (int i = 0; i < 4; i++)
		printf("    %s: batched generation of %d sequences >= 4x one at a time (%.2fx)\n",
		       ratio[i] >= 4.0 ? "PASS" : "FAIL", groups[i], ratio[i]);
	double grow = bench_step_cost(m, &o, 8);
	printf("    %s: a decode step at context 1024 costs < 4x the step at 64 (%.2fx)\n",
	       grow < 4.0 ? "PASS" : "FAIL", grow);
	int ok = check_cache_bytes(&m->cfg);
	bench_group(m, &o, 16, 256);
	/* what `moe grpo` samples in one step: prompts_per_step groups of group_size, in one batch */
	int G = grpo.group_size, n = grpo.prompts_per_step * G;
	bench_throughput(m, &o, G, G);  /* one group alone, for comparison with (a) */
	double step = bench_throughput(m, &o, n, G);
	printf("    %s: a GRPO step's sampling batched >= 4x one at a time (%.2fx)\n",
	       step >= 4.0 ? "PASS" : "FAIL", step);
	bench_int8(m, &o);
	model_free(m);
	return ok ? 0 : 1;
}
