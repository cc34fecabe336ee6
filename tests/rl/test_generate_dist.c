/*
 * tests/rl/test_generate_dist.c - decoding and generation under expert parallelism give the
 * single-process results.  Run by test_generate_dist.sh under mpirun with MOE_TEST_EP set (alone it runs
 * as one process).  The sequences are spread unevenly over the ranks (one rank has none): each rank's
 * decode logits and routes equal those of one process holding all experts for its sequences, and
 * generate() gives exactly the tokens of a single-process generate() over all the sequences (greedy
 * and seeded sampling); bad arguments on one rank make every rank fail together instead of hanging.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "launch/comm.h"
#include "model/decode.h"
#include "model/layers.h"
#include "model/model.h"
#include "rl/generate.h"

static struct dist dist;

#define MAXP 7                     /* longest prompt */
#define MAXX 6                     /* most tokens decoded after a prompt */
#define MAXT (MAXP + MAXX)

static struct model_config dist_config(void)
{
	struct model_config c = {
		.vocab_size = 37, .hidden_size = 16, .intermediate_size = 24, .moe_intermediate_size = 8,
		.num_hidden_layers = 3, .num_attention_heads = 2, .num_key_value_heads = 2,
		.n_shared_experts = 1, .n_routed_experts = 8, .routed_scaling_factor = 2.5,
		.kv_lora_rank = 12, .q_lora_rank = 8, .qk_rope_head_dim = 4, .qk_nope_head_dim = 6,
		.v_head_dim = 6, .n_group = 4, .topk_group = 2, .num_experts_per_tok = 2,
		.moe_layer_freq = 1, .first_k_dense_replace = 1, .norm_topk_prob = true,
		.scoring_func = MOE_SCORING_SIGMOID, .max_position_embeddings = 64, .initializer_range = 0.3,
		.rms_norm_eps = 1e-6, .rope_theta = 10000.0,
	};
	return c;
}

/* all experts (ref) or this rank's slice with the ep group; the same weights either way */
static struct moe_model *make_model(int ref, uint64_t seed)
{
	struct model_config c = dist_config();
	int El = c.n_routed_experts / dist.ep, e0 = ref ? 0 : dist.ep_rank * El;
	char err[256];
	struct moe_model *m = model_create(&c, e0, ref ? c.n_routed_experts : e0 + El, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	if (!ref && dist.ep > 1)
		m->ep_group = dist.ep_g;
	model_init_weights(m, seed);
	test_separate_routers(m, seed);
	return m;
}

/* The global sequences and this rank's share: rank r < W-1 has r + 2, the last rank none. */
static int rank_count(int r)
{
	if (dist.world == 1)
		return 4;
	return r == dist.world - 1 ? 0 : r + 2;
}

static int first_seq(int r)
{
	int f = 0;
	for (int q = 0; q < r; q++)
		f += rank_count(q);
	return f;
}

static int total_seqs(void)
{
	return first_seq(dist.world);
}

static int prompt_len(int j) { return 2 + (j * 3) % (MAXP - 1); }
static int extra_len(int j) { return 1 + (j * 5) % MAXX; }

/* sequence j's tokens (prompt and continuation), the same on every rank */
static void seq_tokens(int j, int *t)
{
	uint64_t s = 0x9e3779b97f4a7c15ULL * (uint64_t)(j + 1);
	for (int i = 0; i < MAXT; i++) {
		s = s * 6364136223846793005ULL + 1442695040888963407ULL;
		t[i] = (int)((s >> 33) % 37);
	}
}

/* every rank of the ep group steps max extra_len over all sequences times */
static int max_extra(void)
{
	int mx = 0;
	for (int j = 0; j < total_seqs(); j++)
		mx = extra_len(j) > mx ? extra_len(j) : mx;
	return mx;
}

struct local {
	int G, first;
	int seq[16][MAXT], lens[16];
	const int *prompts[16];
	float *ref;                    /* [G][MAXT][V] */
	int *ref_routes;               /* [G][L][MAXT][K] */
};

static void local_setup(struct local *lo, struct moe_model *ref)
{
	const struct model_config *c = &ref->cfg;
	int V = c->vocab_size, L = c->num_hidden_layers, K = c->num_experts_per_tok;
	lo->G = rank_count(dist.rank);
	lo->first = first_seq(dist.rank);
	lo->ref = calloc((size_t)(lo->G + 1) * MAXT * V, sizeof(float));
	lo->ref_routes = calloc((size_t)(lo->G + 1) * L * MAXT * K, sizeof(int));
	for (int g = 0; g < lo->G; g++) {
		int j = lo->first + g, T = prompt_len(j) + extra_len(j);
		seq_tokens(j, lo->seq[g]);
		lo->lens[g] = prompt_len(j);
		lo->prompts[g] = lo->seq[g];
		model_forward(ref, lo->seq[g], NULL, 1, T);
		memcpy(lo->ref + (size_t)g * MAXT * V, model_logits(ref), sizeof(float) * T * V);
		for (int l = c->first_k_dense_replace; l < L; l++)
			memcpy(lo->ref_routes + ((size_t)g * L + l) * MAXT * K,
			       ref->acts->layers[l].moe.topk_idx, sizeof(int) * T * K);
	}
}

static int routes_match(const struct local *lo, const struct latent_cache *lc, const struct model_config *c)
{
	int L = c->num_hidden_layers, K = c->num_experts_per_tok;
	for (int g = 0; g < lo->G; g++) {
		int j = lo->first + g;
		for (int l = c->first_k_dense_replace; l < L; l++)
			for (int t = 0; t < prompt_len(j) + extra_len(j); t++) {
				const int *want = lo->ref_routes + (((size_t)g * L + l) * MAXT + t) * K;
				if (memcmp(latent_cache_route(lc, l, g, t), want, sizeof(int) * K))
					return 0;
			}
	}
	return 1;
}

/* decode logits and routes on each rank == one process's for the rank's sequences */
static void test_decode_matches_single_process(void)
{
	struct moe_model *m = make_model(0, 7), *ref = make_model(1, 7);
	int V = m->cfg.vocab_size;
	struct local lo;
	local_setup(&lo, ref);
	struct latent_cache *lc = latent_cache_create(&m->cfg, lo.G, MAXT);  /* 0 slots on one rank */
	CU_ASSERT_PTR_NOT_NULL_FATAL(lc);
	CU_ASSERT_EQUAL_FATAL(latent_cache_enable_routes(lc, &m->cfg), 0);
	float *lg = malloc(sizeof(float) * (lo.G + 1) * V);
	double worst = 0.0;
	CU_ASSERT_EQUAL_FATAL(prefill(m, lc, lo.prompts, lo.lens, lo.G, lg), 0);
	for (int g = 0; g < lo.G; g++) {
		double e = max_rel_err(lg + (size_t)g * V, lo.ref + ((size_t)g * MAXT + lo.lens[g] - 1) * V, V);
		worst = e > worst ? e : worst;
	}
	for (int s = 0; s < max_extra(); s++) {
		int tok[16], slots[16], pos[16], n = 0;
		for (int g = 0; g < lo.G; g++)
			if (s < extra_len(lo.first + g)) {
				slots[n] = g;
				pos[n] = lo.lens[g] + s;
				tok[n] = lo.seq[g][pos[n]];
				n++;
			}
		CU_ASSERT_EQUAL_FATAL(decode_step(m, lc, tok, slots, pos, n, lg), 0);
		for (int i = 0; i < n; i++) {
			const float *want = lo.ref + ((size_t)slots[i] * MAXT + pos[i]) * V;
			double e = max_rel_err(lg + (size_t)i * V, want, V);
			worst = e > worst ? e : worst;
		}
	}
	int routes = routes_match(&lo, lc, &m->cfg);
	printf("\n  rank %d of %d (dp %d, ep %d): %d sequences, decode vs one process max rel err %.2e, "
	       "routes %s", dist.rank, dist.world, dist.dp, dist.ep, lo.G, worst,
	       routes ? "equal" : "DIFFER");
	CU_ASSERT(worst < 2e-5);
	CU_ASSERT(routes);
	free(lg);
	free(lo.ref);
	free(lo.ref_routes);
	latent_cache_free(lc);
	model_free(m);
	model_free(ref);
}

/* generate under expert parallelism: exactly the tokens of one process generating all the sequences */
static void check_generate(const struct sample_params *p, const char *what)
{
	struct moe_model *m = make_model(0, 9), *ref = make_model(1, 9);
	int S = total_seqs(), Tn = p->max_new_tokens, G = rank_count(dist.rank), f = first_seq(dist.rank);
	int (*seq)[MAXT] = malloc(sizeof(*seq) * S), *lens = malloc(sizeof(int) * S);
	const int **prompts = malloc(sizeof(*prompts) * S);
	uint64_t *seeds = malloc(sizeof(uint64_t) * S);
	int *ref_out = malloc(sizeof(int) * S * Tn), *ref_lens = malloc(sizeof(int) * S);
	int *out = malloc(sizeof(int) * (S + 1) * Tn), *out_lens = malloc(sizeof(int) * (S + 1));
	float *ref_lp = malloc(sizeof(float) * S * Tn), *lp = malloc(sizeof(float) * (S + 1) * Tn);
	for (int j = 0; j < S; j++) {
		seq_tokens(j, seq[j]);
		lens[j] = prompt_len(j);
		prompts[j] = seq[j];
		seeds[j] = 0xabcdefULL + 7919ULL * (uint64_t)j;
	}
	/* both with caches of their own that record the routes (as GRPO does) */
	struct latent_cache *rc = latent_cache_create(&ref->cfg, S, MAXP + Tn);
	struct latent_cache *lc = latent_cache_create(&m->cfg, G, MAXP + Tn);
	CU_ASSERT_FATAL(rc && lc && !latent_cache_enable_routes(rc, &ref->cfg) &&
			!latent_cache_enable_routes(lc, &m->cfg));
	CU_ASSERT_EQUAL_FATAL(generate_cached(ref, rc, prompts, lens, S, p, seeds, ref_out, ref_lens, ref_lp),
			      0);
	CU_ASSERT_EQUAL_FATAL(generate_cached(m, lc, prompts + f, lens + f, G, p, seeds + f, out, out_lens,
					      lp), 0);
	int same = !memcmp(out, ref_out + (size_t)f * Tn, sizeof(int) * G * Tn) &&
		   !memcmp(out_lens, ref_lens + f, sizeof(int) * G);
	int routes_same = 1;
	for (int g = 0; g < G && same; g++)
		for (int l = m->cfg.first_k_dense_replace; l < m->cfg.num_hidden_layers; l++)
			for (int t = 0; t < lens[f + g] + out_lens[g] - 1; t++)
				routes_same &= !memcmp(latent_cache_route(lc, l, g, t),
						       latent_cache_route(rc, l, f + g, t),
						       sizeof(int) * m->cfg.num_experts_per_tok);
	double lp_err = G ? max_rel_err(lp, ref_lp + (size_t)f * Tn, (size_t)G * Tn) : 0.0;
	int lsum = 0, lmin = Tn;
	for (int g = 0; g < G; g++) {
		lsum += out_lens[g];
		lmin = out_lens[g] < lmin ? out_lens[g] : lmin;
	}
	printf("\n  rank %d, %s: %d sequences, %d tokens (shortest %d), %s, routes %s, logprob rel err %.2e",
	       dist.rank, what, G, lsum, G ? lmin : 0, same ? "same tokens" : "TOKENS DIFFER",
	       routes_same ? "equal" : "DIFFER", lp_err);
	CU_ASSERT(same);
	CU_ASSERT(routes_same);
	CU_ASSERT(lp_err < 1e-4);
	latent_cache_free(rc);
	latent_cache_free(lc);
	free(seq);
	free(lens);
	free(prompts);
	free(seeds);
	free(ref_out);
	free(ref_lens);
	free(out);
	free(out_lens);
	free(ref_lp);
	free(lp);
	model_free(m);
	model_free(ref);
}

static void test_generate_greedy(void)
{
	struct sample_params p = sample_params_default();
	p.temperature = 0.0f;
	p.max_new_tokens = 10;
	check_generate(&p, "greedy");
}

static void test_generate_sampled(void)
{
	struct sample_params p = sample_params_default();
	p.temperature = 1.5f;
	p.max_new_tokens = 14;
	p.eos_id = 3;  /* sequences end at different steps, ranks finish at different times */
	check_generate(&p, "sampled, eos");
	p.temperature = 0.9f;
	p.top_k = 12;
	p.top_p = 0.9f;
	check_generate(&p, "top-k, top-p, eos");
}

/* one rank with bad arguments: every rank returns -1 (no hang), and the group goes on stepping */
static void test_bad_arguments_fail_together(void)
{
	struct moe_model *m = make_model(0, 11);
	struct latent_cache *lc = latent_cache_create(&m->cfg, 2, 8);
	int tok = 1, slot = 0, pos = 0, n = 1;
	if (dist.ep_rank == 0 || dist.ep == 1)
		tok = m->cfg.vocab_size;  /* out of the vocabulary */
	CU_ASSERT_EQUAL(decode_step(m, lc, &tok, &slot, &pos, n, NULL), -1);
	CU_ASSERT_EQUAL(lc->len[0], 0);
	tok = 1;
	n = dist.ep_rank % 2;  /* n = 0 only under expert parallelism */
	if (dist.ep == 1)
		n = 1;
	CU_ASSERT_EQUAL(decode_step(m, lc, &tok, &slot, &pos, n, NULL), 0);
	CU_ASSERT_EQUAL(lc->len[0], n);

	/* generate: a prompt of length 0 on ep rank 0 */
	int prompt[2] = { 1, 2 }, len = dist.ep_rank == 0 ? 0 : 2, out[4], out_len;
	const int *pp = prompt;
	struct sample_params p = sample_params_default();
	p.max_new_tokens = 4;
	CU_ASSERT_EQUAL(generate(m, &pp, &len, 1, &p, out, &out_len, NULL), -1);
	len = 2;
	CU_ASSERT_EQUAL(generate(m, &pp, &len, 1, &p, out, &out_len, NULL), 0);
	if (dist.ep > 1)  /* G = 0 is allowed only with an ep group */
		CU_ASSERT_EQUAL(generate(m, &pp, &len, dist.ep_rank == 1 ? 0 : 1, &p, out, &out_len, NULL),
				0);
	latent_cache_free(lc);
	model_free(m);
}

void register_tests(void)
{
	const char *ep = getenv("MOE_TEST_EP");
	char err[256];
	if (comm_init(NULL, NULL) || dist_setup(&dist, ep ? atoi(ep) : 1, err, sizeof(err))) {
		fprintf(stderr, "test_generate_dist: %s\n", err);
		exit(2);
	}
	atexit(comm_finalize);
	static const struct test_case cases[] = {
		{ "decode logits and routes == one process", test_decode_matches_single_process },
		{ "generate greedy == one process", test_generate_greedy },
		{ "generate sampled (per-sequence seeds) == one process", test_generate_sampled },
		{ "bad arguments on one rank fail every rank", test_bad_arguments_fail_together },
		{ NULL, NULL },
	};
	add_suite("generate_dist", cases);
}
