/*
 * rl/generate.c - batched generation over the latent cache: prefill, sampling, the decode loop.
 * (The `moe generate` command around it is rl/rl_cli.c.)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launch/rng.h"
#include "model/quant.h"
#include "model/vmath.h"
#include "rl/generate.h"

#ifdef MOE_HAVE_CUDA
#include "model/cuda/decode_cuda.h"
#endif

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
	int *ids;                      /* [G]: a step's samples */
	float *lps;                    /* [G]: their log-probabilities */
	struct gen_rng *rng;           /* [G] */
};

static void gen_run_free(struct gen_run *r)
{
	latent_cache_free(r->own);
	free(r->logits);
	free(r->tok);
	free(r->lps);
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
	r->tok = malloc(sizeof(int) * Gs * 5);
	r->lps = malloc(sizeof(float) * Gs);
	r->rng = malloc(sizeof(*r->rng) * Gs);
	if (!r->c || !r->logits || !r->tok || !r->lps || !r->rng)
		return -1;
	r->slot = r->tok + Gs;
	r->pos = r->slot + Gs;
	r->live = r->pos + Gs;
	r->ids = r->live + Gs;
	for (int g = 0; g < G; g++) {
		gen_rng_seed(&r->rng[g], seeds ? seeds[g] : gen_sequence_seed(p->seed, g));
		r->live[g] = g;
	}
	return 0;
}

/*
 * Records step t's tokens ids[i] (log-probabilities lps[i]) of the n live sequences r->live[i] and gathers
 * those that go on into the next batch (r->tok, slot, pos, live); returns how many go on.
 */
static int take_samples(struct gen_run *r, int n, int t, const int *lens, const struct sample_params *p,
			const int *ids, const float *lps, int *out_tokens, int *out_lens, float *out_logprobs)
{
	int Tn = p->max_new_tokens, nn = 0;
	for (int i = 0; i < n; i++) {
		int g = r->live[i], id = ids[i];
		out_tokens[(size_t)g * Tn + t] = id;
		if (out_logprobs)
			out_logprobs[(size_t)g * Tn + t] = lps[i];
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
 * Samples step t's token of the n live sequences on the CPU and gathers those that go on into the next
 * batch.  Returns how many go on, -1 when sampling failed (out of memory).
 */
static int sample_live(struct gen_run *r, int n, int t, int V, const int *lens, const struct sample_params *p,
		       int *out_tokens, int *out_lens, float *out_logprobs)
{
	for (int i = 0; i < n; i++) {
		r->ids[i] = sample_token(r->logits + (size_t)i * V, V, p, &r->rng[r->live[i]], &r->lps[i]);
		if (r->ids[i] < 0)
			return -1;
	}
	return take_samples(r, n, t, lens, p, r->ids, r->lps, out_tokens, out_lens, out_logprobs);
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

#ifdef MOE_HAVE_CUDA
/* ---------------------------------------------------------------- on the GPU */

/* prompt tokens a prefill step takes at most (whole prompts; a longer prompt goes alone) */
#define GPU_PREFILL_TOKENS 8192

/* the decoder, made or remade when G sequences of up to max_len positions outgrow it */
static int gpu_decoder_fit(struct gpu_model *g, struct moe_model *m, struct gpu_decoder **dec, int routes,
			   int G, int max_len)
{
	char err[256];
	struct gpu_decoder *d = *dec;
	if (d && gpu_decoder_slots(d) >= G && gpu_decoder_max_len(d) >= max_len)
		return routes ? gpu_decoder_enable_routes(d) : 0;
	gpu_decoder_free(d);
	*dec = d = gpu_decoder_create(g, m, G, max_len, err, sizeof(err));
	if (!d) {
		fprintf(stderr, "generate: %s\n", err);
		return -1;
	}
	return routes ? gpu_decoder_enable_routes(d) : 0;
}

/*
 * The prompts into slots 0..G-1, a chunk of whole prompts per step (a run of equal prompts is prefilled
 * once and copied, never split between chunks), and each sequence's first token sampled from its
 * leader's last logits: ids [G], lps [G].
 */
static int prefill_cuda(struct gpu_decoder *d, const int *const *prompts, const int *lens, int G,
			const struct sample_params *p, int *ids, float *lps, int *scratch)
{
	int total = 0;
	for (int g = 0; g < G; g++)
		total += lens[g];
	int *tok = scratch, *slot = tok + total, *pos = slot + total, *rows = pos + total, *seq = rows + G;
	int *leader = seq + G;
	for (int g = 0; g < G; g++)
		gpu_decoder_reset(d, g);
	for (int g0 = 0, g1; g0 < G; g0 = g1) {
		int k = 0, nr = 0, last = -1;
		for (g1 = g0; g1 < G; g1++) {
			if (g1 == g0 || !same_prompt_as_previous(prompts, lens, g1)) {
				if (k > 0 && k + lens[g1] > GPU_PREFILL_TOKENS)
					break;
				for (int t = 0; t < lens[g1]; t++, k++) {
					tok[k] = prompts[g1][t];
					slot[k] = g1;
					pos[k] = t;
				}
				leader[g1] = g1;
				last = k - 1;
			} else {
				leader[g1] = leader[g1 - 1];
			}
			rows[nr] = last;
			seq[nr++] = g1;
		}
		if (gpu_decode_step(d, tok, slot, pos, k, rows, nr)) {
			fprintf(stderr, "generate: the GPU prefill of sequences %d..%d was refused\n", g0, g1 - 1);
			return -1;
		}
		for (int g = g0; g < g1; g++)
			if (leader[g] != g && gpu_decoder_copy_prefix(d, g, leader[g], lens[g]))
				return -1;
		gpu_sample(d, seq, nr, p->temperature, p->top_p, p->top_k, ids + g0, lps + g0);
	}
	return 0;
}

int generate_cuda(struct gpu_model *g, struct moe_model *m, struct gpu_decoder **dec, int routes,
		  const int *const *prompts, const int *lens, int G, const struct sample_params *p,
		  const uint64_t *seeds, int *out_tokens, int *out_lens, float *out_logprobs)
{
	int maxp, Tn = p->max_new_tokens, rc = -1;
	if (m->ep_group || !gen_args_ok(m, NULL, lens, G, p, &maxp))
		return -1;
	for (int g = 0; g < G; g++) {
		out_lens[g] = 0;
		for (int t = 0; t < Tn; t++) {
			out_tokens[(size_t)g * Tn + t] = -1;
			if (out_logprobs)
				out_logprobs[(size_t)g * Tn + t] = 0.0f;
		}
	}
	if (Tn == 0)
		return 0;
	if (gpu_decoder_fit(g, m, dec, routes, G, maxp + Tn))
		return -1;
	struct gpu_decoder *d = *dec;
	int total = 0;
	for (int k = 0; k < G; k++)
		total += lens[k];
	size_t ns = (size_t)gpu_decoder_slots(d);
	uint64_t *st = calloc(ns * 4, sizeof(uint64_t));
	int *scratch = malloc(sizeof(int) * ((size_t)total * 3 + (size_t)G * 3 + 1));
	struct gen_run r = { 0 };
	r.tok = malloc(sizeof(int) * (size_t)G * 5);
	float *lps = malloc(sizeof(float) * (size_t)G);
	int *ids = r.tok ? r.tok + (size_t)G * 4 : NULL;
	if (!st || !scratch || !r.tok || !lps)
		goto out;
	r.slot = r.tok + G;
	r.pos = r.slot + G;
	r.live = r.pos + G;
	for (int k = 0; k < G; k++) {
		struct gen_rng rng;
		gen_rng_seed(&rng, seeds ? seeds[k] : gen_sequence_seed(p->seed, k));
		memcpy(st + (size_t)k * 4, rng.s, sizeof(rng.s));
		r.live[k] = k;
	}
	gpu_decoder_set_rng(d, st);
	if (prefill_cuda(d, prompts, lens, G, p, ids, lps, scratch))
		goto out;
	for (int t = 0, n = G;; t++) {
		n = take_samples(&r, n, t, lens, p, ids, lps, out_tokens, out_lens, out_logprobs);
		if (n == 0)
			break;
		if (gpu_decode_step(d, r.tok, r.slot, r.pos, n, NULL, 0)) {
			fprintf(stderr, "generate: the GPU decode step of position %d was refused\n", t);
			goto out;
		}
		gpu_sample(d, r.live, n, p->temperature, p->top_p, p->top_k, ids, lps);
	}
	rc = 0;
out:
	free(st);
	free(scratch);
	free(r.tok);
	free(lps);
	return rc;
}
#endif
