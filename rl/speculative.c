/*
 * rl/speculative.c - self-speculative greedy decoding with the multi-token-prediction head
 * (rl/generate.h).
 *
 * State between rounds: token x, known to be greedy's at position q but not yet run through the main
 * model, and the MTP head's draft d for position q + 1 (the head has seen every position < q).  A round
 * runs the main model over [x, d] at [q, q + 1]: its argmax a at q is greedy's token for q + 1.  a == d:
 * the row of d is valid too, its argmax b is greedy's token for q + 2, both go out, and the head reads
 * (h_q, d), (h_{q+1}, b) to draft for q + 3.  a != d: a goes out, the cache row of d is overwritten by the
 * next round (decode_step drops positions after the one it writes), and the head reads (h_q, a).
 */
#include <stdlib.h>
#include <string.h>

#include "rl/generate.h"

struct spec_run {
	struct latent_cache *lc, *mc;
	float *logits, *hidden;   /* [rows, V], [rows, C] */
	int *tok, *slot, *pos;    /* [rows] */
	int n_out, max_new, eos, done;
	int *out;
};

static void spec_free(struct spec_run *r)
{
	latent_cache_free(r->lc);
	latent_cache_free(r->mc);
	free(r->logits);
	free(r->hidden);
	free(r->tok);
	free(r->slot);
	free(r->pos);
}

static int argmax(const float *x, int V)
{
	int best = 0;
	for (int v = 1; v < V; v++)
		if (x[v] > x[best])
			best = v;
	return best;
}

/* out goes token t; done at the end-of-text id or max_new_tokens */
static void emit(struct spec_run *r, int t)
{
	r->out[r->n_out++] = t;
	r->done = t == r->eos || r->n_out >= r->max_new;
}

/* the n rows at positions q0.. of slot 0 */
static void rows_at(struct spec_run *r, int q0, int n)
{
	for (int i = 0; i < n; i++) {
		r->slot[i] = 0;
		r->pos[i] = q0 + i;
	}
}

/* the head over rows (hidden[i], tok[i]) at positions q0..; returns its draft after the last row */
static int draft(struct moe_model *m, struct spec_run *r, int q0, int n, struct spec_stats *st)
{
	rows_at(r, q0, n);
	if (mtp_draft_step(m, r->mc, r->hidden, r->tok, r->slot, r->pos, n, r->logits))
		return -1;
	st->mtp_steps++;
	return argmax(r->logits + (size_t)(n - 1) * m->cfg.vocab_size, m->cfg.vocab_size);
}

static int spec_init(struct spec_run *r, const struct moe_model *m, int len, const struct sample_params *p)
{
	const struct model_config *c = &m->cfg;
	int rows = len > 2 ? len : 2, max_len = len + p->max_new_tokens + 1;

	r->lc = latent_cache_create(c, 1, max_len);
	r->mc = mtp_cache_create(c, 1, max_len);
	r->logits = malloc(sizeof(float) * (size_t)rows * c->vocab_size);
	r->hidden = malloc(sizeof(float) * (size_t)rows * c->hidden_size);
	r->tok = malloc(sizeof(int) * (size_t)rows);
	r->slot = malloc(sizeof(int) * (size_t)rows);
	r->pos = malloc(sizeof(int) * (size_t)rows);
	r->max_new = p->max_new_tokens;
	r->eos = p->eos_id;
	return r->lc && r->mc && r->logits && r->hidden && r->tok && r->slot && r->pos ? 0 : -1;
}

/* the prompt through the main model and the head: greedy's first token out; returns the first draft */
static int spec_prefill(struct moe_model *m, struct spec_run *r, const int *prompt, int len,
			struct spec_stats *st)
{
	int V = m->cfg.vocab_size;

	rows_at(r, 0, len);
	if (decode_step_hidden(m, r->lc, prompt, r->slot, r->pos, len, r->logits, r->hidden))
		return -1;
	int x = argmax(r->logits + (size_t)(len - 1) * V, V);
	emit(r, x);
	if (r->done)
		return 0;
	/* row i pairs h_i with token i + 1: the prompt's, then x */
	memcpy(r->tok, prompt + 1, sizeof(int) * (size_t)(len - 1));
	r->tok[len - 1] = x;
	return draft(m, r, 0, len, st);
}

/* one round from (x at q, draft d); returns the next draft, q advanced */
static int spec_round(struct moe_model *m, struct spec_run *r, int *q, int d, struct spec_stats *st)
{
	int V = m->cfg.vocab_size, x = r->out[r->n_out - 1];

	r->tok[0] = x;
	r->tok[1] = d;
	rows_at(r, *q, 2);
	if (decode_step_hidden(m, r->lc, r->tok, r->slot, r->pos, 2, r->logits, r->hidden))
		return -1;
	st->main_steps++;
	st->drafted++;
	int a = argmax(r->logits, V);
	emit(r, a);
	if (a != d || r->done) {
		if (r->done)
			return 0;
		r->tok[0] = a;  /* (h_q, a) */
		(*q)++;
		return draft(m, r, *q - 1, 1, st);
	}
	st->accepted++;
	int b = argmax(r->logits + V, V);
	emit(r, b);
	if (r->done)
		return 0;
	r->tok[0] = d;  /* (h_q, d), (h_{q+1}, b) */
	r->tok[1] = b;
	*q += 2;
	return draft(m, r, *q - 2, 2, st);
}

int generate_speculative(struct moe_model *m, const int *prompt, int len, const struct sample_params *p,
			 int *out_tokens, int *out_len, struct spec_stats *st)
{
	struct spec_stats none;
	struct spec_run r = { 0 };
	int rc = -1;

	if (!st)
		st = &none;
	memset(st, 0, sizeof(*st));
	*out_len = 0;
	if (m->ep_group || m->cfg.num_nextn_predict_layers < 1 || p->temperature > 0.0f || len < 1 ||
	    p->max_new_tokens < 0)
		return -1;
	for (int t = 0; t < p->max_new_tokens; t++)
		out_tokens[t] = -1;
	if (p->max_new_tokens == 0)
		return 0;
	r.out = out_tokens;
	if (spec_init(&r, m, len, p))
		goto out;
	int d = spec_prefill(m, &r, prompt, len, st), q = len;
	while (d >= 0 && !r.done)
		d = spec_round(m, &r, &q, d, st);
	rc = d < 0 ? -1 : 0;
	*out_len = r.n_out;
out:
	spec_free(&r);
	return rc;
}
