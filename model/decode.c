/*
 * model/decode.c - incremental decoding with the MLA latent cache, absorbed attention (see decode.h).
 *
 * Per head h, with W_UK_h = kv_b_proj rows [h(dn+dv), h(dn+dv)+dn) and W_UV_h = the dv rows after them
 * (each row kv_lora long):
 *   q_lat = W_UK_h^T q_nope_h                                   [kv_lora]
 *   s_j   = (q_lat . c_kv_j + q_pe_h . k_pe_j) * scale           j = 0..pos of the token's slot
 *   o_lat = sum_j softmax(s)_j c_kv_j;   o_h = W_UV_h o_lat      [dv]
 * which equals softmax(q k^T * scale) v (scale = mc_softmax_scale: dq^-0.5, YaRN's mscale^2) with
 * k_nope = W_UK c_kv, v = W_UV c_kv.  The scores are
 * computed for all heads of a block at once over the cached rows [c_kv | k_pe] (two products per block),
 * with W_UK and W_UV applied as one product per head over the step's tokens.
 *
 * The MoE layer does what model/moe.c's moe_forward does: the (token, slot) rows are sorted by expert
 * (model/moe_dispatch.h, exchanged with the ep group under expert parallelism), each local expert and
 * the shared experts run as single-threaded tasks of one parallel region, and each token's output adds
 * its slots in order.  Every product is cut into pieces by a rule that depends on the shapes only, and
 * each piece is one single-threaded call, so the results do not depend on the thread count.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "model/decode.h"
#include "model/layers.h"
#include "model/lora.h"
#include "model/quant.h"
#include "model/rope.h"

#include <cblas.h>  /* after the headers above: it may bring complex.h's I */

struct decode_scratch {
	int cap;                       /* tokens the per-token buffers hold */
	float *arena;
	float *x, *mid, *ln, *out;     /* [N, C] */
	float *qa, *qa_n, *rstd;       /* [N, Rq], [N, Rq], [N] */
	float *q;                      /* [N, H*dq] */
	float *kva, *ckv, *ckv_n;      /* [N, Rkv+dr], [N, Rkv], [N, Rkv] */
	float *att;                    /* [N, H*dv] */
	float *ql, *ol;                /* [N, H, Rkv+dr]: scaled latent queries | q_pe; [N, H, Rkv]: o_lat */
	float *g, *u, *a;              /* [N, max(I, S*Im)]: the dense MLP, the shared experts */
	float *rlogits, *rscores;      /* [N, E] */
	float *topk_w;                 /* [N, K] */
	float *xe, *ye;                /* [N*K, C]: the routed rows in send order */
	int *topk_idx;                 /* [N, K] */
	int *tasks;                    /* [E + 1]: -1 the shared experts, else a local expert */
	struct attn_task *attn_tasks;  /* [N * H] */
	int *new_len;                  /* [n_slots]: the lengths after this step */
	/* the experts' side: the R rows they compute (under expert parallelism from the whole group) */
	size_t cap_R;
	float *xr, *yr, *eg, *eu, *ea; /* [R, C], [R, C], [R, Im] x 3 */
	/* attention: one buffer of attn_len floats per thread (attn_buf_len) */
	int attn_threads;
	size_t attn_len;
	float *attn_buf;
	struct moe_dispatch disp;
	int disp_cap;                  /* tokens disp was set up for (0: not yet) */
};

size_t latent_cache_bytes_per_token(const struct model_config *c)
{
	return (size_t)(c->kv_lora_rank + c->qk_rope_head_dim) * (size_t)c->num_hidden_layers * sizeof(float);
}

struct latent_cache *latent_cache_create(const struct model_config *c, int n_slots, int max_len)
{
	if (n_slots < 0 || max_len <= 0 || c->num_hidden_layers <= 0 || c->kv_lora_rank <= 0)
		return NULL;
	struct latent_cache *lc = calloc(1, sizeof(*lc));
	if (!lc)
		return NULL;
	lc->n_layers = c->num_hidden_layers;
	lc->n_slots = n_slots;
	lc->max_len = max_len;
	lc->kv_lora = c->kv_lora_rank;
	lc->dr = c->qk_rope_head_dim;
	size_t slots = n_slots > 0 ? (size_t)n_slots : 1;  /* no slots: still valid pointers */
	size_t pos = (size_t)lc->n_layers * slots * max_len;
	lc->kv = calloc(pos * (lc->kv_lora + lc->dr), sizeof(float));
	lc->len = calloc(slots, sizeof(int));
	lc->scratch = calloc(1, sizeof(*lc->scratch));
	if (lc->scratch)
		lc->scratch->new_len = calloc(slots, sizeof(int));
	if (!lc->kv || !lc->len || !lc->scratch || !lc->scratch->new_len) {
		latent_cache_free(lc);
		return NULL;
	}
	return lc;
}

static void scratch_free(struct decode_scratch *s)
{
	free(s->arena);
	free(s->topk_idx);
	free(s->tasks);
	free(s->attn_tasks);
	free(s->new_len);
	free(s->xr);
	free(s->yr);
	free(s->eg);
	free(s->eu);
	free(s->ea);
	free(s->attn_buf);
	dispatch_free(&s->disp);
	free(s);
}

void latent_cache_free(struct latent_cache *c)
{
	if (!c)
		return;
	if (c->scratch)
		scratch_free(c->scratch);
	free(c->kv);
	free(c->len);
	free(c->routes);
	free(c);
}

void latent_cache_reset(struct latent_cache *c, int slot)
{
	if (slot >= 0 && slot < c->n_slots)
		c->len[slot] = 0;
}

int latent_cache_enable_routes(struct latent_cache *c, const struct model_config *cfg)
{
	if (cfg->num_hidden_layers != c->n_layers || cfg->kv_lora_rank != c->kv_lora ||
	    cfg->num_experts_per_tok < 1)
		return -1;
	if (c->routes)
		return cfg->num_experts_per_tok == c->route_k ? 0 : -1;
	size_t n = (size_t)c->n_layers * c->n_slots * c->max_len * cfg->num_experts_per_tok;
	c->routes = malloc(sizeof(int) * (n + 1));
	if (!c->routes)
		return -1;
	for (size_t i = 0; i < n; i++)
		c->routes[i] = -1;
	c->route_k = cfg->num_experts_per_tok;
	return 0;
}

static int *route_at(const struct latent_cache *c, int layer, int slot, int pos)
{
	return c->routes + (((size_t)layer * c->n_slots + slot) * c->max_len + pos) * c->route_k;
}

const int *latent_cache_route(const struct latent_cache *c, int layer, int slot, int pos)
{
	if (!c->routes || layer < 0 || layer >= c->n_layers || slot < 0 || slot >= c->n_slots || pos < 0 ||
	    pos >= c->max_len)
		return NULL;
	return route_at(c, layer, slot, pos);
}

int latent_cache_copy_prefix(struct latent_cache *c, int dst, int src, int len)
{
	if (dst < 0 || dst >= c->n_slots || src < 0 || src >= c->n_slots || len < 0 || len > c->len[src])
		return -1;
	if (dst == src)
		return 0;
	size_t row = (size_t)c->kv_lora + c->dr;
	for (int l = 0; l < c->n_layers; l++) {
		size_t from = ((size_t)l * c->n_slots + src) * c->max_len;
		size_t to = ((size_t)l * c->n_slots + dst) * c->max_len;
		memcpy(c->kv + to * row, c->kv + from * row, sizeof(float) * row * (size_t)len);
		if (c->routes)
			memcpy(route_at(c, l, dst, 0), route_at(c, l, src, 0), sizeof(int) * c->route_k * (size_t)len);
	}
	c->len[dst] = len;
	return 0;
}

/* ---------------------------------------------------------------- scratch */

/* grow-only; 0 or -1 (the old buffer kept) */
static int grow(float **p, size_t floats)
{
	float *q = realloc(*p, sizeof(float) * (floats + 1));
	if (!q)
		return -1;
	*p = q;
	return 0;
}

/* the buffers of the R rows the local experts compute */
static int ensure_expert_rows(struct decode_scratch *s, size_t R, int C, int Im)
{
	if (R <= s->cap_R && s->xr)
		return 0;
	R += R / 4 + 16;  /* headroom: the rows arriving from the peers vary from step to step */
	if (grow(&s->xr, R * C) || grow(&s->yr, R * C) || grow(&s->eg, R * Im) || grow(&s->eu, R * Im) ||
	    grow(&s->ea, R * Im))
		return -1;
	s->cap_R = R;
	return 0;
}

/*
 * The attention of a step goes by tasks of at most ATTN_ROWS query rows (token, head) of one run: the
 * tokens of one slot at consecutive positions (a prompt in a prefill; a decode step's runs are single
 * tokens).  A task's scores over the run's positions are one product [rows, kv_lora + dr] x
 * [P, kv_lora + dr]^T and its latent outputs one product [rows, P] x [P, kv_lora], so each cached row is
 * read once per task, and a prompt's tokens share their reads.  A run of one token (every token of a
 * decode step) goes as two tasks of half its heads, so that a lone sequence keeps two threads busy.  The
 * tasks depend on the step's shapes only, never on the thread count, and neither do the logits.
 */
#define ATTN_ROWS 64
#define ATTN_CHUNK 256

struct attn_task {
	int i0;                        /* the run's first token */
	int r0, rows;                  /* its rows r0.. of the run's (token - i0) * H + head */
};

/*
 * floats of one thread's attention buffer: the scores of a task; in the naive form a position's scores
 * and the slot's expanded k_nope | v [P, H * (qk_nope + v)]
 */
static size_t attn_buf_len(const struct latent_cache *lc, const struct model_config *c)
{
	size_t len = (size_t)ATTN_ROWS * (size_t)lc->max_len;
	size_t naive = (size_t)lc->max_len * (1 + (size_t)c->num_attention_heads *
					      (c->qk_nope_head_dim + c->v_head_dim));
	return lc->naive_attention && naive > len ? naive : len;
}

/* one attention buffer per thread of the coming parallel regions */
static int ensure_attn_bufs(struct decode_scratch *s, const struct latent_cache *lc,
			    const struct model_config *c)
{
	int nt = omp_get_max_threads();
	size_t len = attn_buf_len(lc, c);
	if (nt <= s->attn_threads && len <= s->attn_len)
		return 0;
	float *b = malloc(sizeof(float) * len * nt);
	if (!b)
		return -1;
	free(s->attn_buf);
	s->attn_buf = b;
	s->attn_threads = nt;
	s->attn_len = len;
	return 0;
}

/* the per-token buffers for N tokens, carved from one arena */
static int ensure_tokens(struct decode_scratch *s, const struct model_config *c, int N)
{
	if (N <= s->cap)
		return 0;
	int C = c->hidden_size, H = c->num_attention_heads, dq = mc_qk_head_dim(c), dv = c->v_head_dim;
	int Rq = c->q_lora_rank, Rkv = c->kv_lora_rank, dr = c->qk_rope_head_dim;
	int E = c->n_routed_experts, K = c->num_experts_per_tok;
	int inter = c->intermediate_size, Is = c->n_shared_experts * c->moe_intermediate_size;
	int W = inter > Is ? inter : Is;
	if (W < 1)
		W = 1;
	size_t n = (size_t)N;
	struct {
		float **p;
		size_t floats;
	} bufs[] = {
		{ &s->x, n * C }, { &s->mid, n * C }, { &s->ln, n * C }, { &s->out, n * C },
		{ &s->qa, n * Rq }, { &s->qa_n, n * Rq }, { &s->rstd, n },
		{ &s->q, n * H * dq },
		{ &s->kva, n * (Rkv + dr) }, { &s->ckv, n * Rkv }, { &s->ckv_n, n * Rkv },
		{ &s->att, n * H * dv },
		{ &s->ql, n * H * (Rkv + dr) }, { &s->ol, n * H * Rkv },
		{ &s->g, n * W }, { &s->u, n * W }, { &s->a, n * W },
		{ &s->rlogits, n * E }, { &s->rscores, n * E },
		{ &s->topk_w, n * K },
		{ &s->xe, n * K * C }, { &s->ye, n * K * C },
	};
	size_t total = 0, nb = sizeof(bufs) / sizeof(bufs[0]);
	for (size_t i = 0; i < nb; i++)
		total += bufs[i].floats + 16;
	float *arena = malloc(total * sizeof(float));
	int *idx = malloc((n * K + 1) * sizeof(int));
	int *tasks = malloc(((size_t)E + 2) * sizeof(int));
	struct attn_task *at = malloc(n * H * sizeof(*at));
	if (!arena || !idx || !tasks || !at) {
		free(arena);
		free(idx);
		free(tasks);
		free(at);
		return -1;
	}
	free(s->arena);
	free(s->topk_idx);
	free(s->tasks);
	free(s->attn_tasks);
	s->arena = arena;
	s->topk_idx = idx;
	s->tasks = tasks;
	s->attn_tasks = at;
	float *p = arena;
	for (size_t i = 0; i < nb; i++) {
		*bufs[i].p = p;
		p += bufs[i].floats + 16;
	}
	s->cap = N;
	return 0;
}

/*
 * The expert dispatch, set up for at least N tokens.  dispatch_init sizes its per-token arrays for the
 * N it is given and only dispatch_plan's sort reads the token count, so a step with fewer tokens (none
 * at all, under expert parallelism) reuses them with disp.N lowered.
 */
static int ensure_dispatch(struct decode_scratch *s, const struct moe_model *m, int N)
{
	const struct model_config *c = &m->cfg;
	struct moe_dispatch *d = &s->disp;
	if (c->n_routed_experts <= 0)
		return 0;
	if (s->disp_cap >= N && d->g == m->ep_group && d->K == c->num_experts_per_tok &&
	    d->E == c->n_routed_experts && d->El == m->expert_end - m->expert_begin)
		return 0;
	s->disp_cap = 0;
	if (dispatch_init(d, m->ep_group, N, c->num_experts_per_tok, c->n_routed_experts, m->expert_begin,
			  m->expert_end))
		return -1;
	s->disp_cap = N;
	return 0;
}

static int ensure_scratch(struct latent_cache *lc, const struct moe_model *m, int n)
{
	const struct model_config *c = &m->cfg;
	struct decode_scratch *s = lc->scratch;
	int N = n > 0 ? n : 1;
	if (ensure_tokens(s, c, N) || ensure_attn_bufs(s, lc, c) || ensure_dispatch(s, m, N))
		return -1;
	/* without expert parallelism the experts compute exactly this rank's N*K rows */
	if (c->n_routed_experts > 0 && !m->ep_group &&
	    ensure_expert_rows(s, (size_t)N * c->num_experts_per_tok, c->hidden_size,
			       c->moe_intermediate_size))
		return -1;
	return 0;
}

/* ---------------------------------------------------------------- arguments */

/* the model holds its share of the experts: all of them, or ep rank r's El = E/ep starting at r*El */
static int experts_ok(const struct moe_model *m)
{
	int E = m->cfg.n_routed_experts, El = m->expert_end - m->expert_begin;
	if (E <= 0)
		return 1;
	if (!m->ep_group)
		return m->expert_begin == 0 && m->expert_end == E;
	return El > 0 && El * comm_size(m->ep_group) == E && m->expert_begin == comm_rank(m->ep_group) * El;
}

static int check_cache_args(const struct moe_model *m, const struct latent_cache *lc, int n_layers,
			    const int *tokens, const int *slots, const int *positions, int n);

/* 0 when the step's arguments are valid; fills scratch->new_len with the lengths after the step */
static int check_args(const struct moe_model *m, const struct latent_cache *lc, const int *tokens,
		      const int *slots, const int *positions, int n)
{
	if (n < 0 || (n == 0 && !m->ep_group) || !experts_ok(m))
		return -1;
	return check_cache_args(m, lc, m->cfg.num_hidden_layers, tokens, slots, positions, n);
}

/* the cache (of n_layers layers) fits the model and the tokens fit the cache */
static int check_cache_args(const struct moe_model *m, const struct latent_cache *lc, int n_layers,
			    const int *tokens, const int *slots, const int *positions, int n)
{
	const struct model_config *c = &m->cfg;
	if (lc->n_layers != n_layers || lc->kv_lora != c->kv_lora_rank || lc->dr != c->qk_rope_head_dim ||
	    (lc->routes && lc->route_k != c->num_experts_per_tok))
		return -1;
	int *len = lc->scratch->new_len;
	memcpy(len, lc->len, sizeof(int) * (size_t)lc->n_slots);
	for (int i = 0; i < n; i++) {
		int sl = slots[i], p = positions[i];
		if (tokens[i] < 0 || tokens[i] >= c->vocab_size || sl < 0 || sl >= lc->n_slots || p < 0 ||
		    p >= lc->max_len || p > len[sl])
			return -1;
		len[sl] = p + 1;
	}
	return 0;
}

int decode_any_rank(const struct moe_model *m, int flag)
{
	if (!m->ep_group)
		return flag;
	int f = flag ? 1 : 0;
	if (comm_allreduce(m->ep_group, &f, 1, COMM_I32, COMM_MAX))
		return 1;
	return f;
}

/* ---------------------------------------------------------------- products of a few rows */

/*
 * y [n, out] = x [n, in] w [out, in]^T for the few rows of a decode step.  OpenBLAS copies (packs) the
 * whole weight before a product unless out x n is small, which for a few rows costs as much as the
 * product itself; cut into tiles of at most SKINNY_ELEMS / n columns, each tile's product reads its
 * slice of the weight once, and the tiles are shared among the threads.  The tiles depend on the shapes
 * only, each is one single-threaded call (the region is always entered, as in ops_cpu.c's gemm_run), so
 * the results do not depend on the thread count.  Many rows (a prefill chunk): linear_forward.
 */
#define SKINNY_ROWS 32
#define SKINNY_ELEMS 512
#define SKINNY_MAX_COLS 128

/* columns per tile of a product of n rows */
static int skinny_cols(int n)
{
	int cols = SKINNY_ELEMS / (n > 0 ? n : 1);
	return cols > SKINNY_MAX_COLS ? SKINNY_MAX_COLS : cols < 16 ? 16 : cols / 16 * 16;
}

/* tile t of y = x w^T */
static void skinny_tile(float *y, const float *x, const float *w, int n, int in, int out, int cols, int t)
{
	int o0 = t * cols, len = out - o0 < cols ? out - o0 : cols;
	if (n > 0 && len > 0)
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, len, in, 1.0f, x, in,
			    w + (size_t)o0 * in, in, 0.0f, y + o0, out);
}

static void skinny_linear(const struct moe_model *m, float *y, const float *x, const float *w, int n, int in,
			  int out)
{
	struct qmat q = quant_find(m, w, in);

	if (q.q) {
		qlinear_forward(y, out, x, in, q, n, in, out);
	} else if (n > SKINNY_ROWS) {
		linear_forward(y, x, w, n, in, out);
	} else {
		int cols = skinny_cols(n), nt = (out + cols - 1) / cols;
#pragma omp parallel for schedule(static)
		for (int t = 0; t < nt; t++)
			skinny_tile(y, x, w, n, in, out, cols, t);
	}
	if (m->lora)
		lora_forward(m->lora, w, y, x, n, in, out, 0);
}

/* the same on the calling thread only (a task of a parallel region) */
static void skinny_linear_serial(const struct moe_model *m, float *y, const float *x, const float *w, int n,
				 int in, int out)
{
	struct qmat q = quant_find(m, w, in);

	if (q.q) {
		qlinear_forward_serial(y, out, x, in, q, n, in, out);
	} else if (n > SKINNY_ROWS) {
		linear_fwd(y, x, w, n, in, out, LIN_SERIAL);
	} else {
		int cols = skinny_cols(n);
		for (int t = 0; t * cols < out; t++)
			skinny_tile(y, x, w, n, in, out, cols, t);
	}
	if (m->lora)
		lora_forward(m->lora, w, y, x, n, in, out, LIN_SERIAL);
}

/* the dense SwiGLU MLP of a decode step */
static void skinny_mlp(const struct moe_model *m, struct decode_scratch *s, float *y, const float *x,
		       const float *wg, const float *wu, const float *wd, int n, int C, int inter)
{
	if (n > SKINNY_ROWS) {
		struct mlp_acts ma = { s->g, s->u, s->a };
		mlp_forward(m, &ma, y, x, wg, wu, wd, n, C, inter);
		return;
	}
	skinny_linear(m, s->g, x, wg, n, C, inter);
	skinny_linear(m, s->u, x, wu, n, C, inter);
	swiglu_forward(s->a, s->g, s->u, (size_t)n * inter);
	skinny_linear(m, y, s->a, wd, n, inter, C);
}

/* ---------------------------------------------------------------- attention */

/*
 * LoRA on kv_b_proj (model/lora.h), absorbed: with W' = W + s B A, head h's rows of B being B_k,h
 * (k_nope) and B_v,h (v), the latent query gains scale * s * (q_nope,h B_k,h) A and the output
 * s * B_v,h (A ol_h).  Small products (rank columns), by head.
 */
static void lora_latent_queries(const struct moe_model *m, const float *wkv_b, const float *q, float *ql,
				int n, float scale)
{
	const float *A, *Bm;
	if (!m->lora || n == 0 || !lora_factors(m->lora, wkv_b, &A, &Bm))
		return;
	const struct model_config *c = &m->cfg;
	int H = c->num_attention_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
	int dv = c->v_head_dim, Rkv = c->kv_lora_rank, dq = dn + dr, Dl = Rkv + dr, r = m->lora->spec.rank;
	float *t = malloc(sizeof(float) * (size_t)n * r);
	if (!t)
		abort();
	for (int h = 0; h < H; h++) {
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, r, dn, 1.0f, q + (size_t)h * dq, H * dq,
			    Bm + (size_t)h * (dn + dv) * r, r, 0.0f, t, r);
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, Rkv, r, scale * m->lora->scale, t, r,
			    A, Rkv, 1.0f, ql + (size_t)h * Dl, H * Dl);
	}
	free(t);
}

static void lora_latent_outputs(const struct moe_model *m, const float *wkv_b, const float *ol, float *att,
				int n)
{
	const float *A, *Bm;
	if (!m->lora || n == 0 || !lora_factors(m->lora, wkv_b, &A, &Bm))
		return;
	const struct model_config *c = &m->cfg;
	int H = c->num_attention_heads, dn = c->qk_nope_head_dim, dv = c->v_head_dim, Rkv = c->kv_lora_rank;
	int r = m->lora->spec.rank;
	float *u = malloc(sizeof(float) * (size_t)n * r);
	if (!u)
		abort();
	for (int h = 0; h < H; h++) {
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, r, Rkv, 1.0f, ol + (size_t)h * Rkv, H * Rkv,
			    A, Rkv, 0.0f, u, r);
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, dv, r, m->lora->scale, u, r,
			    Bm + ((size_t)h * (dn + dv) + dn) * r, r, 1.0f, att + (size_t)h * dv, H * dv);
	}
	free(u);
}

/*
 * Latent queries of the n tokens, one product per head over all tokens:
 * ql[i, h] = (W_UK_h^T q_nope[i, h] | q_pe[i, h]) * mc_softmax_scale, the softmax scale folded in.
 */
static void latent_queries(const struct moe_model *m, const float *wkv_b, const float *q, float *ql, int n)
{
	const struct model_config *c = &m->cfg;
	int H = c->num_attention_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
	int dv = c->v_head_dim, Rkv = c->kv_lora_rank, dq = dn + dr, Dl = Rkv + dr;
	float scale = mc_softmax_scale(c);

#pragma omp parallel for schedule(static)
	for (int h = 0; h < H; h++) {
		float *qh = ql + (size_t)h * Dl;
		const float *wuk = wkv_b + (size_t)h * (dn + dv) * Rkv;
		struct qmat quk = quant_find(m, wuk, Rkv);
		if (quk.q)
			qlinear_t_serial(qh, H * Dl, q + (size_t)h * dq, H * dq, quk, n, dn, Rkv, scale);
		else if (n > 0)
			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, Rkv, dn, scale,
				    q + (size_t)h * dq, H * dq, wuk, Rkv, 0.0f, qh, H * Dl);
		for (int i = 0; i < n; i++) {
			const float *qpe = q + ((size_t)i * H + h) * dq + dn;
			for (int d = 0; d < dr; d++)
				qh[(size_t)i * H * Dl + Rkv + d] = scale * qpe[d];
		}
	}
	lora_latent_queries(m, wkv_b, q, ql, n, scale);
}

/*
 * the rows of scores [rows, P] -> probabilities; row b covers positions < valid(b), the rest get 0.
 * Vectorised throughout (exp_fast, 16-lane max and sum): with glibc's expf, a call per element, the
 * softmax cost more than the two products around it (2.9 us against 1.7 for 8 heads x 65 positions).
 */
static void masked_softmax(float *s, const int *pos, int H, int r0, int rows, int P)
{
	for (int b = 0; b < rows; b++) {
		float *p = s + (size_t)b * P;
		int valid = pos[(r0 + b) / H] + 1;
		float mx = max_of(p, valid);
		for (int j = 0; j < valid; j++)
			p[j] = exp_fast(p[j] - mx);
		float inv = (float)(1.0 / sum_of(p, valid));
		for (int j = 0; j < valid; j++)
			p[j] *= inv;
		for (int j = valid; j < P; j++)
			p[j] = 0.0f;
	}
}

/*
 * The rows [r0, r0 + rows) of a run: ol [rows, Rkv] from ql [rows, Rkv + dr] over the slot's cached kv
 * [P, Rkv + dr]; pos: the run's positions.  The scores go by chunks of ATTN_CHUNK positions: a product
 * that small runs without copying the cached rows first (see skinny_linear).
 */
static void attend_rows(const float *ql, const float *kv, float *ol, float *s, const int *pos, int H, int r0,
			int rows, int Rkv, int dr)
{
	int Dl = Rkv + dr, P = pos[(r0 + rows - 1) / H] + 1;
	for (int j0 = 0; j0 < P; j0 += ATTN_CHUNK) {
		int len = P - j0 < ATTN_CHUNK ? P - j0 : ATTN_CHUNK;
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, len, Dl, 1.0f, ql, Dl,
			    kv + (size_t)j0 * Dl, Dl, 0.0f, s + j0, P);
	}
	masked_softmax(s, pos, H, r0, rows, P);
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, Rkv, P, 1.0f, s, P, kv, Dl, 0.0f, ol, Rkv);
}

/* the step's attention tasks (see ATTN_ROWS); returns their count */
static int attn_plan(struct attn_task *t, const int *slots, const int *positions, int n, int H)
{
	int nt = 0;
	for (int i0 = 0, i1; i0 < n; i0 = i1) {
		for (i1 = i0 + 1; i1 < n && slots[i1] == slots[i0] && positions[i1] == positions[i1 - 1] + 1; i1++)
			;
		int rows = (i1 - i0) * H, chunk = i1 - i0 == 1 ? (H + 1) / 2 : ATTN_ROWS;
		chunk = chunk > ATTN_ROWS ? ATTN_ROWS : chunk;
		for (int r0 = 0; r0 < rows; r0 += chunk)
			t[nt++] = (struct attn_task){ i0, r0, rows - r0 < chunk ? rows - r0 : chunk };
	}
	return nt;
}

/* att[i, h] = W_UV_h ol[i, h], one product per head over all tokens */
static void latent_outputs(const struct moe_model *m, const float *wkv_b, const float *ol, float *att, int n)
{
	const struct model_config *c = &m->cfg;
	int H = c->num_attention_heads, dn = c->qk_nope_head_dim, dv = c->v_head_dim, Rkv = c->kv_lora_rank;

#pragma omp parallel for schedule(static)
	for (int h = 0; h < H; h++) {
		const float *wuv = wkv_b + ((size_t)h * (dn + dv) + dn) * Rkv;
		struct qmat quv = quant_find(m, wuv, Rkv);
		if (quv.q)
			qlinear_forward_serial(att + (size_t)h * dv, H * dv, ol + (size_t)h * Rkv, H * Rkv, quv, n, Rkv,
					       dv);
		else if (n > 0)
			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, dv, Rkv, 1.0f,
				    ol + (size_t)h * Rkv, H * Rkv, wuv, Rkv, 0.0f, att + (size_t)h * dv,
				    H * dv);
	}
	lora_latent_outputs(m, wkv_b, ol, att, n);
}

/* Absorbed attention of the n tokens of one layer over the cache; att [n, H*dv]. */
static void absorbed_attention(const struct moe_model *m, const struct layer_weights *w,
			       const struct latent_cache *lc, int layer, struct decode_scratch *s,
			       const int *slots, const int *positions, int n)
{
	const struct model_config *c = &m->cfg;
	int H = c->num_attention_heads, Rkv = c->kv_lora_rank, dr = c->qk_rope_head_dim, Dl = Rkv + dr;
	const float *kv_l = lc->kv + (size_t)layer * lc->n_slots * lc->max_len * Dl;
	size_t buf_len = s->attn_len;
	int nt = attn_plan(s->attn_tasks, slots, positions, n, H);

	latent_queries(m, w->kv_b_proj, s->q, s->ql, n);
#pragma omp parallel for schedule(dynamic, 1)
	for (int t = 0; t < nt; t++) {
		const struct attn_task *a = &s->attn_tasks[t];
		size_t row = (size_t)a->i0 * H + a->r0;
		attend_rows(s->ql + row * Dl, kv_l + (size_t)slots[a->i0] * lc->max_len * Dl, s->ol + row * Rkv,
			    s->attn_buf + buf_len * omp_get_thread_num(), positions + a->i0, H, a->r0, a->rows,
			    Rkv, dr);
	}
	latent_outputs(m, w->kv_b_proj, s->ol, s->att, n);
}

/* kv [P, H * hw] += s B (A lat) for LoRA on kv_b_proj; lat rows of stride ld (the naive form's) */
static void lora_naive_kv(const struct moe_model *m, const float *wkv_b, const float *lat, int ld, float *kv,
			  int P)
{
	const float *A, *Bm;
	if (!m->lora || !lora_factors(m->lora, wkv_b, &A, &Bm))
		return;
	const struct model_config *c = &m->cfg;
	int Rkv = c->kv_lora_rank, out = c->num_attention_heads * (c->qk_nope_head_dim + c->v_head_dim);
	int r = m->lora->spec.rank;
	float *u = malloc(sizeof(float) * (size_t)P * r);
	if (!u)
		abort();
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, P, r, Rkv, m->lora->scale, lat, ld, A, Rkv, 0.0f,
		    u, r);
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, P, out, r, 1.0f, u, r, Bm, r, 1.0f, kv, out);
	free(u);
}

/*
 * The naive form (latent_cache.naive_attention): token i's slot's latents [P, kv_lora] expanded through
 * kv_b_proj into kv [P, H * (qk_nope + v)] (head h: k_nope then v), then per head
 * softmax(scale * (q_nope . k_nope + q_pe . k_pe)) over the positions, times v.  One token per task.
 */
static void naive_attention(const struct moe_model *m, const struct layer_weights *w,
			    const struct latent_cache *lc, int layer, struct decode_scratch *s,
			    const int *slots, const int *positions, int n)
{
	const struct model_config *c = &m->cfg;
	struct qmat qkv = quant_find(m, w->kv_b_proj, c->kv_lora_rank);
	int H = c->num_attention_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
	int dv = c->v_head_dim, Rkv = c->kv_lora_rank, Dl = Rkv + dr, dq = dn + dr, hw = dn + dv;
	const float *kv_l = lc->kv + (size_t)layer * lc->n_slots * lc->max_len * Dl;
	float scale = mc_softmax_scale(c);

#pragma omp parallel for schedule(dynamic, 1)
	for (int i = 0; i < n; i++) {
		const float *lat = kv_l + (size_t)slots[i] * lc->max_len * Dl;
		float *p = s->attn_buf + s->attn_len * omp_get_thread_num(), *kv = p + lc->max_len;
		int P = positions[i] + 1;
		if (qkv.q)
			qlinear_forward_serial(kv, H * hw, lat, Dl, qkv, P, Rkv, H * hw);
		else
			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, P, H * hw, Rkv, 1.0f, lat, Dl,
				    w->kv_b_proj, Rkv, 0.0f, kv, H * hw);
		lora_naive_kv(m, w->kv_b_proj, lat, Dl, kv, P);
		for (int h = 0; h < H; h++) {
			const float *q = s->q + ((size_t)i * H + h) * dq;
			float *o = s->att + ((size_t)i * H + h) * dv, mx = -INFINITY;
			for (int j = 0; j < P; j++) {
				const float *k = kv + (size_t)j * H * hw + (size_t)h * hw;
				const float *kpe = lat + (size_t)j * Dl + Rkv;
				float dot = 0.0f;
				for (int d = 0; d < dn; d++)
					dot += q[d] * k[d];
				for (int d = 0; d < dr; d++)
					dot += q[dn + d] * kpe[d];
				p[j] = scale * dot;
				mx = p[j] > mx ? p[j] : mx;
			}
			double sum = 0.0;
			for (int j = 0; j < P; j++) {
				p[j] = expf(p[j] - mx);
				sum += p[j];
			}
			for (int e = 0; e < dv; e++)
				o[e] = 0.0f;
			for (int j = 0; j < P; j++) {
				const float *v = kv + (size_t)j * H * hw + (size_t)h * hw + dn;
				float pj = (float)(p[j] / sum);
				for (int e = 0; e < dv; e++)
					o[e] += pj * v[e];
			}
		}
	}
}

/* queries, this step's latents into cache layer l, attention; s->mid = x + attention(x) */
static void attention_block(const struct moe_model *m, const struct layer_weights *w, struct latent_cache *lc,
			    int l, const int *slots, const int *positions, int n)
{
	const struct model_config *c = &m->cfg;
	struct decode_scratch *s = lc->scratch;
	int C = c->hidden_size, H = c->num_attention_heads, dn = c->qk_nope_head_dim;
	int dr = c->qk_rope_head_dim, dq = dn + dr, dv = c->v_head_dim, Rq = c->q_lora_rank;
	int Rkv = c->kv_lora_rank, Dkva = Rkv + dr;
	float eps = (float)c->rms_norm_eps;
	struct rope_freqs rf;

	mc_rope_freqs(c, &rf);
	rmsnorm_forward(s->ln, s->rstd, s->x, w->input_layernorm, n, C, eps);
	if (Rq > 0) {
		skinny_linear(m, s->qa, s->ln, w->q_a_proj, n, C, Rq);
		rmsnorm_forward(s->qa_n, s->rstd, s->qa, w->q_a_layernorm, n, Rq, eps);
		skinny_linear(m, s->q, s->qa_n, w->q_b_proj, n, Rq, H * dq);
	} else {
		skinny_linear(m, s->q, s->ln, w->q_proj, n, C, H * dq);
	}
	rope_forward(s->q + dn, positions, n, H, H * dq, dq, dr, rf.inv_freq, rf.attention_factor);
	skinny_linear(m, s->kva, s->ln, w->kv_a_proj_with_mqa, n, C, Dkva);
	for (int i = 0; i < n; i++)
		memcpy(s->ckv + (size_t)i * Rkv, s->kva + (size_t)i * Dkva, sizeof(float) * Rkv);
	rope_forward(s->kva + Rkv, positions, n, 1, Dkva, 0, dr, rf.inv_freq, rf.attention_factor);
	rmsnorm_forward(s->ckv_n, s->rstd, s->ckv, w->kv_a_layernorm, n, Rkv, eps);
	for (int i = 0; i < n; i++) {
		size_t at = ((size_t)l * lc->n_slots + slots[i]) * lc->max_len + positions[i];
		float *row = lc->kv + at * Dkva;
		memcpy(row, s->ckv_n + (size_t)i * Rkv, sizeof(float) * Rkv);
		memcpy(row + Rkv, s->kva + (size_t)i * Dkva + Rkv, sizeof(float) * dr);
	}
	if (lc->naive_attention)
		naive_attention(m, w, lc, l, s, slots, positions, n);
	else
		absorbed_attention(m, w, lc, l, s, slots, positions, n);
	skinny_linear(m, s->mid, s->att, w->o_proj, n, H * dv, C);
	vec_add(s->mid, s->x, (size_t)n * C);
}

/* ---------------------------------------------------------------- MoE */

/* the row copies and sums of a few tokens are not worth waking the threads for */
#define COPY_PARALLEL_MIN 65536

/* A failure after the ep group agreed on the step: the peers are inside collectives, so end the job. */
static int moe_fail(const struct moe_model *m, const char *what)
{
	if (m->ep_group)
		comm_abort(1, what);
	return -1;
}

/* SwiGLU MLP of `rows` rows, single-threaded (a task of the expert region) */
static void mlp_serial(const struct moe_model *m, float *y, const float *x, float *g, float *u, float *a,
		       const float *wg, const float *wu, const float *wd, int rows, int C, int inter)
{
	skinny_linear_serial(m, g, x, wg, rows, C, inter);
	skinny_linear_serial(m, u, x, wu, rows, C, inter);
	swiglu_forward(a, g, u, (size_t)rows * inter);
	skinny_linear_serial(m, y, a, wd, rows, inter, C);
}

/* the shared experts over the n tokens (out = shared(x)) and each local expert over its rows */
static void run_experts(const struct moe_model *m, const struct layer_weights *w, struct decode_scratch *s,
			float *out, const float *x, int n)
{
	const struct model_config *c = &m->cfg;
	int C = c->hidden_size, Im = c->moe_intermediate_size, Is = c->n_shared_experts * Im;
	int El = m->expert_end - m->expert_begin, nt = 0;
	const int *off = s->disp.offsets;

	if (Is > 0 && n > 0)
		s->tasks[nt++] = -1;
	for (int e = 0; e < El; e++)
		if (off[e + 1] > off[e])
			s->tasks[nt++] = e;
#pragma omp parallel for schedule(dynamic, 1)
	for (int t = 0; t < nt; t++) {
		int e = s->tasks[t];
		if (e < 0) {
			mlp_serial(m, out, x, s->g, s->u, s->a, w->shared_gate_proj, w->shared_up_proj,
				   w->shared_down_proj, n, C, Is);
			continue;
		}
		size_t wo = (size_t)e * Im * C, r0 = (size_t)off[e];
		mlp_serial(m, s->yr + r0 * C, s->xr + r0 * C, s->eg + r0 * Im, s->eu + r0 * Im, s->ea + r0 * Im,
			   w->experts_gate_proj + wo, w->experts_up_proj + wo, w->experts_down_proj + wo,
			   off[e + 1] - off[e], C, Im);
	}
}

/* out[i] (+)= sum_k w_ik * ye[send_row[i*K + k]], slots in order; set: out starts at 0 */
static void combine(float *out, const float *ye, const int *send_row, const float *topk_w, int n, int K,
		    int C, int set)
{
#pragma omp parallel for schedule(static) if ((size_t)n * K * C >= COPY_PARALLEL_MIN)
	for (int i = 0; i < n; i++) {
		float *o = out + (size_t)i * C;
		if (set)
			memset(o, 0, sizeof(float) * C);
		for (int k = 0; k < K; k++) {
			const float *y = ye + (size_t)send_row[i * K + k] * C;
			float wk = topk_w[i * K + k];
			for (int j = 0; j < C; j++)
				o[j] += wk * y[j];
		}
	}
}

static void record_routes(struct latent_cache *lc, int l, const int *idx, const int *slots,
			  const int *positions, int n, int K)
{
	if (!lc->routes)
		return;
	for (int i = 0; i < n; i++)
		memcpy(route_at(lc, l, slots[i], positions[i]), idx + (size_t)i * K, sizeof(int) * K);
}

/* The MoE layer for the n tokens x (n may be 0 under expert parallelism): out [n, C]. */
static int moe_decode(const struct moe_model *m, struct latent_cache *lc, int l, const int *slots,
		      const int *positions, float *out, const float *x, int n)
{
	const struct model_config *c = &m->cfg;
	const struct layer_weights *w = &m->w.layers[l];
	struct decode_scratch *s = lc->scratch;
	struct moe_dispatch *d = &s->disp;
	int C = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok;
	struct router_params rp = moe_router_params(c);

	skinny_linear(m, s->rlogits, x, w->gate, n, C, E);
	router_forward(s->rscores, s->topk_idx, s->topk_w, s->rlogits, w->e_score_correction_bias, &rp, n);
	record_routes(lc, l, s->topk_idx, slots, positions, n, K);

	d->N = n;  /* see ensure_dispatch */
	if (dispatch_plan(d, s->topk_idx))
		return moe_fail(m, "decode: exchanging the expert counts failed");
#pragma omp parallel for schedule(static) if ((size_t)n * K * C >= COPY_PARALLEL_MIN)
	for (int i = 0; i < n * K; i++)
		memcpy(s->xe + (size_t)d->send_row[i] * C, x + (size_t)(i / K) * C, sizeof(float) * C);
	if (ensure_expert_rows(s, (size_t)d->R, C, c->moe_intermediate_size))
		return moe_fail(m, "decode: out of memory for the expert rows");
	if (dispatch_to_experts(d, s->xe, s->xr, C))
		return moe_fail(m, "decode: the expert all-to-all failed");
	run_experts(m, w, s, out, x, n);
	if (dispatch_from_experts(d, s->yr, s->ye, C))
		return moe_fail(m, "decode: the expert all-to-all back failed");
	combine(out, s->ye, d->send_row, s->topk_w, n, K, C, c->n_shared_experts == 0);
	return 0;
}

/* ---------------------------------------------------------------- the step */

/* Decoder layer l (weights) over the step's rows s->x, its latents in cache layer cl: s->x = its output. */
static int layer_step(const struct moe_model *m, struct latent_cache *lc, int l, int cl, const int *slots,
		      const int *positions, int n)
{
	const struct model_config *c = &m->cfg;
	const struct layer_weights *w = &m->w.layers[l];
	struct decode_scratch *s = lc->scratch;
	int C = c->hidden_size;
	size_t NC = (size_t)n * C;

	attention_block(m, w, lc, cl, slots, positions, n);
	rmsnorm_forward(s->ln, s->rstd, s->mid, w->post_attention_layernorm, n, C, (float)c->rms_norm_eps);
	if (mc_layer_is_moe(c, l)) {
		if (moe_decode(m, lc, l, slots, positions, s->out, s->ln, n))
			return -1;  /* not reached: the buffers were sized before the step */
	} else {
		skinny_mlp(m, s, s->out, s->ln, w->mlp_gate_proj, w->mlp_up_proj, w->mlp_down_proj, n, C,
			   c->intermediate_size);
	}
	for (size_t k = 0; k < NC; k++)
		s->x[k] = s->mid[k] + s->out[k];
	return 0;
}

int decode_step(struct moe_model *m, struct latent_cache *lc, const int *tokens, const int *slots,
		const int *positions, int n, float *logits)
{
	return decode_step_hidden(m, lc, tokens, slots, positions, n, logits, NULL);
}

int decode_step_hidden(struct moe_model *m, struct latent_cache *lc, const int *tokens, const int *slots,
		       const int *positions, int n, float *logits, float *hidden)
{
	const struct model_config *c = &m->cfg;
	int bad = lc->mtp || check_args(m, lc, tokens, slots, positions, n) || ensure_scratch(lc, m, n);
	if (decode_any_rank(m, bad))
		return -1;

	struct decode_scratch *s = lc->scratch;
	int C = c->hidden_size, L = c->num_hidden_layers;
	float eps = (float)c->rms_norm_eps;

	embedding_forward(s->x, tokens, m->w.embed_tokens, n, C);
	for (int l = 0; l < L; l++)
		if (layer_step(m, lc, l, l, slots, positions, n))
			return -1;
	memcpy(lc->len, s->new_len, sizeof(int) * (size_t)lc->n_slots);
	if (hidden && n > 0)
		memcpy(hidden, s->x, sizeof(float) * (size_t)n * C);
	if (logits && n > 0) {
		rmsnorm_forward(s->ln, s->rstd, s->x, m->w.norm, n, C, eps);
		skinny_linear(m, logits, s->ln, m->w.lm_head, n, C, c->vocab_size);
	}
	return 0;
}

/* ---------------------------------------------------------------- multi-token prediction */

struct latent_cache *mtp_cache_create(const struct model_config *c, int n_slots, int max_len)
{
	struct model_config one = *c;

	if (c->num_nextn_predict_layers < 1)
		return NULL;
	one.num_hidden_layers = 1;  /* the cache of one layer: depth 1's */
	struct latent_cache *lc = latent_cache_create(&one, n_slots, max_len);
	if (lc)
		lc->mtp = 1;
	return lc;
}

/* rows [a | b] of C floats each */
static void concat_rows(float *cat, const float *a, const float *b, int n, int C)
{
	for (int i = 0; i < n; i++) {
		memcpy(cat + (size_t)i * 2 * C, a + (size_t)i * C, sizeof(float) * C);
		memcpy(cat + (size_t)i * 2 * C + C, b + (size_t)i * C, sizeof(float) * C);
	}
}

int mtp_draft_step(struct moe_model *m, struct latent_cache *mc, const float *hidden, const int *tokens,
		   const int *slots, const int *positions, int n, float *logits)
{
	const struct model_config *c = &m->cfg;
	int C = c->hidden_size, L = c->num_hidden_layers;
	float eps = (float)c->rms_norm_eps;

	if (!mc->mtp || m->ep_group || n < 1 || c->num_nextn_predict_layers < 1 || !experts_ok(m) ||
	    check_cache_args(m, mc, 1, tokens, slots, positions, n) || ensure_scratch(mc, m, n))
		return -1;
	struct decode_scratch *s = mc->scratch;
	const struct mtp_weights *w = &m->w.mtp[0];
	float *cat = malloc(sizeof(float) * (size_t)n * 2 * C);
	if (!cat)
		return -1;
	embedding_forward(s->ln, tokens, m->w.embed_tokens, n, C);
	rmsnorm_forward(s->mid, s->rstd, s->ln, w->enorm, n, C, eps);
	rmsnorm_forward(s->out, s->rstd, hidden, w->hnorm, n, C, eps);
	concat_rows(cat, s->mid, s->out, n, C);
	skinny_linear(m, s->x, cat, w->eh_proj, n, 2 * C, C);
	free(cat);
	if (layer_step(m, mc, L, 0, slots, positions, n))
		return -1;
	memcpy(mc->len, s->new_len, sizeof(int) * (size_t)mc->n_slots);
	if (logits) {
		rmsnorm_forward(s->ln, s->rstd, s->x, w->shared_head_norm, n, C, eps);
		skinny_linear(m, logits, s->ln, m->w.lm_head, n, C, c->vocab_size);
	}
	return 0;
}
