/*
 * rl/generate.c - batched generation over the latent cache: prefill, sampling, the decode loop.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "data/tokenizer.h"
#include "launch/rng.h"
#include "model/quant.h"
#include "model/vmath.h"
#include "rl/generate.h"
#include "train/checkpoint.h"
#include "train/config.h"

void gen_rng_seed(struct gen_rng *r, uint64_t seed)
{
	uint64_t st = seed;
	for (int i = 0; i < 4; i++)
		r->s[i] = splitmix64(&st);
}

static inline uint64_t rotl(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

uint64_t gen_rng_next(struct gen_rng *r)
{
	uint64_t *s = r->s;
	uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl(s[3], 45);
	return result;
}

double gen_rng_uniform(struct gen_rng *r)
{
	return (double)(gen_rng_next(r) >> 11) * 0x1.0p-53;
}

struct sample_params sample_params_default(void)
{
	struct sample_params p = {
		.temperature = 1.0f, .top_p = 1.0f, .top_k = 0, .max_new_tokens = 16, .eos_id = -1, .seed = 0,
	};
	return p;
}

struct keyed {
	float key;
	int id;
};

/* descending by key, ties toward the lower id */
static int cmp_desc(const void *a, const void *b)
{
	const struct keyed *x = a, *y = b;
	if (x->key > y->key)
		return -1;
	if (x->key < y->key)
		return 1;
	return (x->id > y->id) - (x->id < y->id);
}

/* whether x comes before y in cmp_desc's order (a strict total order: ids are distinct) */
static int goes_before(const struct keyed *x, const struct keyed *y)
{
	return x->key > y->key || (x->key == y->key && x->id < y->id);
}

/*
 * Moves the n first entries of a[0..V) in cmp_desc's order to a[0..n), in no particular order:
 * quickselect, O(V) on average, rather than sorting the whole vocabulary for a top-k of tens.
 */
static void select_first(struct keyed *a, int V, int n)
{
	int lo = 0, hi = V - 1, want = n - 1;
	while (lo < hi) {
		struct keyed pivot = a[lo + (hi - lo) / 2], tmp;
		int i = lo, j = hi;
		while (i <= j) {
			while (goes_before(&a[i], &pivot))
				i++;
			while (goes_before(&pivot, &a[j]))
				j--;
			if (i <= j) {
				tmp = a[i];
				a[i++] = a[j];
				a[j--] = tmp;
			}
		}
		if (want <= j)
			hi = j;
		else if (want >= i)
			lo = i;
		else
			break;
	}
}

/* sum over v < n of e^(x[v] * scale - shift), in double (8 lanes: the loop vectorises) */
static double sum_exp(const float *x, int n, float scale, float shift)
{
	double lane[8] = { 0 }, sum = 0.0;
	int v = 0;
	for (; v + 8 <= n; v += 8)
		for (int t = 0; t < 8; t++)
			lane[t] += exp_fast(x[v + t] * scale - shift);
	for (; v < n; v++)
		sum += exp_fast(x[v] * scale - shift);
	for (int t = 0; t < 8; t++)
		sum += lane[t];
	return sum;
}

#define SAMPLE_BLOCK 256

/* the id where the running sum of e^(logits * invT - mx) passes u (blocks of SAMPLE_BLOCK at a time) */
static int sample_plain(const float *logits, int V, float invT, float mx, double u)
{
	float e[SAMPLE_BLOCK];
	double acc = 0.0;
	for (int v0 = 0; v0 < V; v0 += SAMPLE_BLOCK) {
		int len = V - v0 < SAMPLE_BLOCK ? V - v0 : SAMPLE_BLOCK;
		for (int j = 0; j < len; j++)
			e[j] = exp_fast(logits[v0 + j] * invT - mx);
		double block = sum_of(e, (size_t)len);
		if (u >= acc + block) {
			acc += block;
			continue;
		}
		for (int j = 0; j < len; j++) {
			acc += e[j];
			if (u < acc)
				return v0 + j;
		}
	}
	return V - 1;  /* u at the very top, past the float rounding of the sums */
}

/*
 * Top-k / top-p: the first n ids in descending order of logits into idx[0..n) (sorted), their
 * probabilities (unnormalised) into pr; returns n, the nucleus size.  total: the sum over all V.
 */
static int nucleus(const float *logits, int V, const struct sample_params *p, float invT, float mx,
		   double total, struct keyed *idx, double *pr, double *kept)
{
	int use_k = p->top_k > 0 && p->top_k < V, use_p = p->top_p > 0.0f && p->top_p < 1.0f;
	for (int v = 0; v < V; v++) {
		idx[v].key = logits[v];   /* the order of logits / T for T > 0 */
		idx[v].id = v;
	}
	/* top-k: its k entries; top-p alone: the first c, c growing until their mass reaches top_p */
	int c = use_k ? p->top_k : V < 64 ? V : 64;
	for (;;) {
		if (c < V)
			select_first(idx, V, c);
		qsort(idx, (size_t)c, sizeof(*idx), cmp_desc);
		double sum = 0.0, target = use_k ? 0.0 : p->top_p * total;
		int m = 0;
		for (; m < c; m++) {
			pr[m] = exp_fast(idx[m].key * invT - mx);
			sum += pr[m];
			if (!use_k && sum >= target) {
				*kept = sum;
				return m + 1;
			}
		}
		if (use_k || c == V) {
			if (use_p) {  /* the smallest prefix of the top-k reaching top_p of its mass */
				double acc = 0.0;
				target = p->top_p * sum;
				for (m = 0; m < c;) {
					acc += pr[m++];
					if (acc >= target)
						break;
				}
				*kept = acc;
				return m;
			}
			*kept = sum;
			return c;
		}
		c = c > V / 4 ? V : c * 4;
	}
}

int sample_token(const float *logits, int V, const struct sample_params *p, struct gen_rng *rng,
		 float *logprob)
{
	if (p->temperature <= 0.0f) {
		int best = 0;
		for (int v = 1; v < V; v++)
			if (logits[v] > logits[best])
				best = v;
		if (logprob)
			*logprob = (float)-log(sum_exp(logits, V, 1.0f, logits[best]));
		return best;
	}

	float invT = 1.0f / p->temperature, mx = max_of(logits, (size_t)V) * invT;
	double total = sum_exp(logits, V, invT, mx);
	double lse = mx + log(total);
	int chosen;

	int use_k = p->top_k > 0 && p->top_k < V, use_p = p->top_p > 0.0f && p->top_p < 1.0f;
	if (!use_k && !use_p) {
		chosen = sample_plain(logits, V, invT, mx, gen_rng_uniform(rng) * total);
	} else {
		struct keyed *idx = malloc(sizeof(*idx) * (size_t)V);
		double *pr = malloc(sizeof(double) * (size_t)V), kept = 0.0;
		if (!idx || !pr) {
			free(idx);
			free(pr);
			return -1;
		}
		int n = nucleus(logits, V, p, invT, mx, total, idx, pr, &kept);
		double u = gen_rng_uniform(rng) * kept, acc = 0.0;
		chosen = idx[n - 1].id;
		for (int i = 0; i < n; i++) {
			acc += pr[i];
			if (u < acc) {
				chosen = idx[i].id;
				break;
			}
		}
		free(idx);
		free(pr);
	}
	if (logprob)
		*logprob = (float)(logits[chosen] * invT - lse);
	return chosen;
}

uint64_t gen_sequence_seed(uint64_t seed, int g)
{
	uint64_t st = seed ^ (0xd1b54a32d192ed03ULL * (uint64_t)(g + 1));
	return splitmix64(&st);
}

/* the number of prompt tokens, -1 when G or a length does not fit the cache */
static int prompt_total(const struct latent_cache *c, const int *lens, int G)
{
	int total = 0;
	if (G < 0 || G > c->n_slots)
		return -1;
	for (int g = 0; g < G; g++) {
		if (lens[g] < 1 || lens[g] > c->max_len)
			return -1;
		total += lens[g];
	}
	return total;
}

/* whether sequence g's prompt is sequence g-1's (GRPO's group: G completions of one prompt, side by side) */
static int same_prompt_as_previous(const int *const *prompts, const int *lens, int g)
{
	return g > 0 && lens[g] == lens[g - 1] &&
	       (prompts[g] == prompts[g - 1] || !memcmp(prompts[g], prompts[g - 1], sizeof(int) * lens[g]));
}

/*
 * The tokens of the prompts that are not a repeat of the one before (leader[g] = g), leader[g] the first
 * sequence of g's run otherwise; returns the token count.
 */
static int prefill_batch(const int *const *prompts, const int *lens, int G, int *leader, int *tok, int *slot,
			 int *pos)
{
	int k = 0;
	for (int g = 0; g < G; g++) {
		leader[g] = same_prompt_as_previous(prompts, lens, g) ? leader[g - 1] : g;
		for (int t = 0; leader[g] == g && t < lens[g]; t++, k++) {
			tok[k] = prompts[g][t];
			slot[k] = g;
			pos[k] = t;
		}
	}
	return k;
}

int prefill(struct moe_model *m, struct latent_cache *c, const int *const *prompts, const int *lens, int G,
	    float *last_logits)
{
	size_t V = (size_t)m->cfg.vocab_size;
	int total = prompt_total(c, lens, G);
	int bad = total < 0 || (G == 0 && !m->ep_group);
	int *tok = bad ? NULL : malloc(sizeof(int) * ((size_t)total * 3 + (size_t)G * 2 + 1));
	float *logits = last_logits && !bad ? malloc(sizeof(float) * ((size_t)total * V + 1)) : NULL;
	bad = bad || !tok || (last_logits && !logits);
	if (decode_any_rank(m, bad)) {
		free(tok);
		free(logits);
		return -1;
	}
	int *slot = tok + total, *pos = slot + total, *saved = pos + total, *leader = saved + G;
	int n = prefill_batch(prompts, lens, G, leader, tok, slot, pos);
	memcpy(saved, c->len, sizeof(int) * (size_t)G);
	for (int g = 0; g < G; g++)
		latent_cache_reset(c, g);
	int rc = decode_step(m, c, tok, slot, pos, n, logits);
	if (rc)
		memcpy(c->len, saved, sizeof(int) * (size_t)G);
	for (int g = 0, end = 0; !rc && g < G; g++) {
		if (leader[g] != g) {  /* a repeat: the leader's latents, routes and logits */
			latent_cache_copy_prefix(c, g, leader[g], lens[g]);
			if (last_logits)
				memcpy(last_logits + g * V, last_logits + leader[g] * V, sizeof(float) * V);
			continue;
		}
		end += lens[g];
		if (last_logits)
			memcpy(last_logits + g * V, logits + (size_t)(end - 1) * V, sizeof(float) * V);
	}
	free(tok);
	free(logits);
	return rc;
}

/* the state of one generate call */
struct gen_run {
	struct latent_cache *c, *own;  /* the cache used; own: made here (freed at the end) */
	float *logits;                 /* [G, V]: row i belongs to live[i] */
	int *tok, *slot, *pos, *live;  /* [G] each: the next step's batch */
	struct gen_rng *rng;           /* [G] */
};

static void gen_run_free(struct gen_run *r)
{
	latent_cache_free(r->own);
	free(r->logits);
	free(r->tok);
	free(r->rng);
}

static int gen_args_ok(const struct moe_model *m, const struct latent_cache *cache, const int *lens, int G,
		       const struct sample_params *p, int *maxp)
{
	*maxp = 0;
	if (G < 0 || (G == 0 && !m->ep_group) || p->max_new_tokens < 0)
		return 0;
	for (int g = 0; g < G; g++) {
		if (lens[g] < 1)
			return 0;
		*maxp = lens[g] > *maxp ? lens[g] : *maxp;
	}
	if (cache && p->max_new_tokens > 0 &&
	    (cache->n_slots < G || cache->max_len < *maxp + p->max_new_tokens - 1))
		return 0;
	return 1;
}

static int gen_run_init(struct gen_run *r, struct moe_model *m, struct latent_cache *cache, int G,
			int max_len, const struct sample_params *p, const uint64_t *seeds)
{
	size_t Gs = (size_t)(G > 0 ? G : 1);
	r->c = cache;
	if (!r->c)
		r->c = r->own = latent_cache_create(&m->cfg, (int)Gs, max_len);
	r->logits = malloc(sizeof(float) * Gs * (size_t)m->cfg.vocab_size);
	r->tok = malloc(sizeof(int) * Gs * 4);
	r->rng = malloc(sizeof(*r->rng) * Gs);
	if (!r->c || !r->logits || !r->tok || !r->rng)
		return -1;
	r->slot = r->tok + Gs;
	r->pos = r->slot + Gs;
	r->live = r->pos + Gs;
	for (int g = 0; g < G; g++) {
		gen_rng_seed(&r->rng[g], seeds ? seeds[g] : gen_sequence_seed(p->seed, g));
		r->live[g] = g;
	}
	return 0;
}

/*
 * Samples step t's token of the n live sequences and gathers those that go on into the next batch.
 * Returns how many go on, -1 when sampling failed (out of memory).
 */
static int sample_live(struct gen_run *r, int n, int t, int V, const int *lens, const struct sample_params *p,
		       int *out_tokens, int *out_lens, float *out_logprobs)
{
	int Tn = p->max_new_tokens, nn = 0;
	for (int i = 0; i < n; i++) {
		int g = r->live[i];
		float lp;
		int id = sample_token(r->logits + (size_t)i * V, V, p, &r->rng[g], &lp);
		if (id < 0)
			return -1;
		out_tokens[(size_t)g * Tn + t] = id;
		if (out_logprobs)
			out_logprobs[(size_t)g * Tn + t] = lp;
		out_lens[g] = t + 1;
		if (id == p->eos_id || t + 1 == Tn)
			continue;
		r->tok[nn] = id;
		r->slot[nn] = g;
		r->pos[nn] = lens[g] + t;
		r->live[nn++] = g;
	}
	return nn;
}

/*
 * Whether the decode loop goes on: this rank has live sequences, or (under expert parallelism) a peer
 * has.  *err: some rank failed (every rank then stops together).
 */
static int keep_going(const struct moe_model *m, int live, int *err)
{
	int f[2] = { live > 0, *err };
	if (m->ep_group && comm_allreduce(m->ep_group, f, 2, COMM_I32, COMM_MAX))
		f[1] = 1;
	*err = f[1];
	return f[0] && !f[1];
}

int generate_cached(struct moe_model *m, struct latent_cache *cache, const int *const *prompts,
		    const int *lens, int G, const struct sample_params *p, const uint64_t *seeds,
		    int *out_tokens, int *out_lens, float *out_logprobs)
{
	int maxp, Tn = p->max_new_tokens, V = m->cfg.vocab_size;
	int bad = !gen_args_ok(m, cache, lens, G, p, &maxp);
	for (int g = 0; g < G && !bad; g++) {
		out_lens[g] = 0;
		for (int t = 0; t < Tn; t++) {
			out_tokens[(size_t)g * Tn + t] = -1;
			if (out_logprobs)
				out_logprobs[(size_t)g * Tn + t] = 0.0f;
		}
	}
	if (!m->ep_group && (bad || Tn == 0))
		return bad ? -1 : 0;

	/* under expert parallelism a rank with nothing to sample still steps with its peers */
	struct gen_run r = { 0 };
	bad = bad || gen_run_init(&r, m, cache, G, maxp + Tn, p, seeds);
	if (decode_any_rank(m, bad)) {
		gen_run_free(&r);
		return -1;
	}
	int n = Tn > 0 ? G : 0, err = 0;
	int rc = prefill(m, r.c, prompts, lens, n, r.logits);
	for (int t = 0; !rc; t++) {
		n = sample_live(&r, n, t, V, lens, p, out_tokens, out_lens, out_logprobs);
		err = n < 0;
		if (!keep_going(m, n, &err))
			break;
		rc = decode_step(m, r.c, r.tok, r.slot, r.pos, n, r.logits);
	}
	gen_run_free(&r);
	return rc || err ? -1 : 0;
}

int generate(struct moe_model *m, const int *const *prompts, const int *lens, int G,
	     const struct sample_params *p, int *out_tokens, int *out_lens, float *out_logprobs)
{
	return generate_cached(m, NULL, prompts, lens, G, p, NULL, out_tokens, out_lens, out_logprobs);
}

/* ---------------------------------------------------------------- moe generate */


static void gen_usage(FILE *f)
{
	fprintf(f,
		"usage: moe generate --checkpoint CKPT.h5 (--prompt TEXT | --prompt-ids ID,ID,...)\n"
		"                    [--tokenizer tokenizer.json] [--max-new-tokens N (64)] [--temperature T (1)]\n"
		"                    [--top-p P (1)] [--top-k K (0: off)] [--seed S (0)] [--num-samples G (1)]\n"
		"                    [--eos ID] [--weights full|int8] [--set section.key=value ...]\n"
		"Samples G completions of the prompt with the MLA latent cache (temperature 0: greedy) and prints\n"
		"each (as text with a tokenizer, else as ids).  The tokenizer defaults to grpo.tokenizer; the stop\n"
		"id to the tokenizer's end of text (--eos -1: never stop early).  --weights int8: every linear\n"
		"layer's weight int8 with a scale per row (model/quant.h), quantised once at load.\n");
}

static int parse_int(const char *s, long lo, long hi, long *out)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi)
		return -1;
	*out = v;
	return 0;
}

static int parse_double(const char *s, double *out)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno || end == s || *end || !isfinite(v))
		return -1;
	*out = v;
	return 0;
}

int generate_cli_main(int argc, char **argv)
{
	const char *ckpt = NULL, *prompt = NULL, *prompt_ids = NULL, *tok_path = NULL;
	const char *sets[64];
	int nsets = 0, G = 1, eos_set = 0, int8 = 0;
	long eos = -1;
	struct sample_params sp = sample_params_default();
	sp.max_new_tokens = 64;

	for (int i = 0; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			gen_usage(stdout);
			return 0;
		}
		if (i + 1 >= argc) {
			fprintf(stderr, "moe generate: %s needs a value (or is unknown)\n", a);
			return 2;
		}
		const char *v = argv[++i];
		long iv;
		double dv;
		int bad = 0;
		if (!strcmp(a, "--checkpoint"))
			ckpt = v;
		else if (!strcmp(a, "--prompt"))
			prompt = v;
		else if (!strcmp(a, "--prompt-ids"))
			prompt_ids = v;
		else if (!strcmp(a, "--tokenizer"))
			tok_path = v;
		else if (!strcmp(a, "--max-new-tokens"))
			bad = parse_int(v, 0, 1 << 24, &iv) || ((sp.max_new_tokens = (int)iv), 0);
		else if (!strcmp(a, "--temperature"))
			bad = parse_double(v, &dv) || dv < 0 || ((sp.temperature = (float)dv), 0);
		else if (!strcmp(a, "--top-p"))
			bad = parse_double(v, &dv) || dv <= 0 || dv > 1 || ((sp.top_p = (float)dv), 0);
		else if (!strcmp(a, "--top-k"))
			bad = parse_int(v, 0, 1L << 30, &iv) || ((sp.top_k = (int)iv), 0);
		else if (!strcmp(a, "--seed"))
			bad = parse_int(v, 0, LONG_MAX, &iv) || ((sp.seed = (uint64_t)iv), 0);
		else if (!strcmp(a, "--num-samples"))
			bad = parse_int(v, 1, 4096, &iv) || ((G = (int)iv), 0);
		else if (!strcmp(a, "--eos"))
			bad = parse_int(v, -1, 1L << 30, &eos) || ((eos_set = 1), 0);
		else if (!strcmp(a, "--weights"))
			bad = strcmp(v, "full") && strcmp(v, "int8") ? 1 : ((int8 = !strcmp(v, "int8")), 0);
		else if (!strcmp(a, "--set")) {
			if (nsets == 64) {
				fprintf(stderr, "moe generate: too many --set options (at most 64)\n");
				return 2;
			}
			sets[nsets++] = v;
		} else {
			fprintf(stderr, "moe generate: unknown option %s\n", a);
			return 2;
		}
		if (bad) {
			fprintf(stderr, "moe generate: bad value for %s: %s\n", a, v);
			return 2;
		}
	}
	if (!ckpt || (!prompt == !prompt_ids)) {
		gen_usage(stderr);
		return 2;
	}

	char err[1024], key[128];
	struct run_config rc;
	config_defaults(&rc);
	if (checkpoint_read_header(ckpt, &rc, NULL, err, sizeof(err))) {
		fprintf(stderr, "moe generate: %s\n", err);
		return 1;
	}
	struct model_config saved = rc.model;
	for (int i = 0; i < nsets; i++)
		if (config_set(&rc, sets[i], err, sizeof(err))) {
			fprintf(stderr, "moe generate: %s\n", err);
			return 1;
		}
	if (config_model_diff(&saved, &rc.model, key, sizeof(key))) {
		fprintf(stderr, "moe generate: --set %s would change the checkpoint's model\n", key);
		return 1;
	}
	if (!tok_path && rc.grpo.tokenizer[0])
		tok_path = rc.grpo.tokenizer;

	int status = 1, V = rc.model.vocab_size;
	struct tokenizer *tok = NULL;
	struct moe_model *m = NULL;
	struct tok_ids ids = { 0 };
	int *prompt_tok = NULL, n_prompt = 0, *out = NULL, *lens = NULL;
	const int **prompts = NULL;
	if (tok_path) {
		tok = tokenizer_load(tok_path, err, sizeof(err));
		if (!tok && prompt) {
			fprintf(stderr, "moe generate: %s\n", err);
			goto done;
		}
		if (!tok)  /* ids in, ids out */
			fprintf(stderr, "moe generate: warning: %s; printing ids\n", err);
	}
	if (prompt) {
		if (!tok) {
			fprintf(stderr, "moe generate: --prompt TEXT needs --tokenizer (or grpo.tokenizer); "
					"--prompt-ids takes ids\n");
			goto done;
		}
		tokenizer_encode(tok, prompt, strlen(prompt), &ids);
		n_prompt = (int)ids.n;
		prompt_tok = malloc(sizeof(int) * (ids.n + 1));
		for (size_t i = 0; prompt_tok && i < ids.n; i++)
			prompt_tok[i] = (int)ids.v[i];
	} else {
		prompt_tok = malloc(sizeof(int) * (strlen(prompt_ids) / 2 + 2));
		for (const char *p = prompt_ids; prompt_tok && *p;) {
			char *end;
			long id = strtol(p, &end, 10);
			if (end == p || id < 0 || id >= V) {
				fprintf(stderr, "moe generate: --prompt-ids: bad id at \"%s\" (vocab %d)\n", p, V);
				goto done;
			}
			prompt_tok[n_prompt++] = (int)id;
			p = end;
			while (*p == ',' || *p == ' ')
				p++;
		}
	}
	if (!prompt_tok) {
		fprintf(stderr, "moe generate: out of memory\n");
		goto done;
	}
	if (n_prompt == 0) {
		fprintf(stderr, "moe generate: the prompt is empty\n");
		goto done;
	}
	for (int i = 0; i < n_prompt; i++)
		if (prompt_tok[i] >= V) {
			fprintf(stderr, "moe generate: prompt token %d is outside the model's vocab %d\n",
				prompt_tok[i], V);
			goto done;
		}
	sp.eos_id = eos_set ? (int)eos : (tok ? tokenizer_eot_id(tok) : -1);

	m = model_create(&rc.model, 0, rc.model.n_routed_experts, err, sizeof(err));
	if (!m || checkpoint_load_model(ckpt, m, err, sizeof(err))) {
		fprintf(stderr, "moe generate: %s\n", err);
		goto done;
	}
	if (int8 && model_quantize(m)) {
		fprintf(stderr, "moe generate: out of memory quantising the weights\n");
		goto done;
	}
	if (int8)
		quant_drop_fp32(m);  /* the fp32 linear weights are not read again */
	out = malloc(sizeof(int) * ((size_t)G * sp.max_new_tokens + 1));
	/* zeroed: with the sanitizers GCC cannot tell that the loop below fills them */
	lens = calloc((size_t)G * 2, sizeof(int));
	prompts = calloc((size_t)G, sizeof(*prompts));
	if (!out || !lens || !prompts) {
		fprintf(stderr, "moe generate: out of memory\n");
		goto done;
	}
	int *plens = lens + G;
	for (int g = 0; g < G; g++) {
		prompts[g] = prompt_tok;
		plens[g] = n_prompt;
	}
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (generate(m, prompts, plens, G, &sp, out, lens, NULL)) {
		fprintf(stderr, "moe generate: generation failed (out of memory?)\n");
		goto done;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	long total = 0;
	for (int g = 0; g < G; g++) {
		const int *o = out + (size_t)g * sp.max_new_tokens;
		total += lens[g];
		if (G > 1)
			printf("=== sample %d (%d tokens)\n", g, lens[g]);
		struct tok_bytes text = { 0 };
		uint32_t *u = tok ? malloc(sizeof(uint32_t) * ((size_t)lens[g] + 1)) : NULL;
		if (u) {
			for (int t = 0; t < lens[g]; t++)
				u[t] = (uint32_t)o[t];
		}
		if (u && !tokenizer_decode(tok, u, (size_t)lens[g], &text, err, sizeof(err))) {
			fwrite(text.v, 1, text.n, stdout);
			printf("\n");
		} else {
			for (int t = 0; t < lens[g]; t++)
				printf("%s%d", t ? " " : "", o[t]);
			printf("\n");
		}
		tok_bytes_free(&text);
		free(u);
	}
	double s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
	fprintf(stderr, "moe generate: %d sample(s), prompt %d tokens, %ld new tokens in %.2f s (%.1f tokens/s); "
		"latent cache %zu bytes per token\n", G, n_prompt, total, s, s > 0 ? total / s : 0.0,
		latent_cache_bytes_per_token(&rc.model));
	fflush(stdout);
	status = 0;
done:
	free(prompts);
	free(lens);
	free(out);
	free(prompt_tok);
	tok_ids_free(&ids);
	if (tok)
		tokenizer_free(tok);
	model_free(m);
	return status;
}
