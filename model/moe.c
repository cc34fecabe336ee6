/*
 * model/moe.c - SwiGLU MLP and the DeepSeekMoE layer (DeepSeek-V3 section 2.1.2), forward and backward.
 *
 * Tokens are grouped by expert (a stable counting sort of the (token, slot) pairs), so each expert runs
 * as three BLAS products over its rows.  The experts, and the shared expert (one more task over all the
 * tokens), run as the tasks of one parallel region, each task single-threaded and writing only its own
 * rows and its own weight gradients: the results do not depend on the thread count.
 */
#include <stdlib.h>
#include <string.h>

#include "model/layers.h"
#include "model/quant.h"

/* flags: LIN_SERIAL inside the tasks of the MoE regions */
static void mlp_fwd(const struct moe_model *m, struct mlp_acts *a, float *y, const float *x, const float *wg,
		    const float *wu, const float *wd, int rows, int C, int I, int flags)
{
	model_linear(m, a->g, x, wg, rows, C, I, flags);
	model_linear(m, a->u, x, wu, rows, C, I, flags);
	swiglu_forward(a->a, a->g, a->u, (size_t)rows * I);
	model_linear(m, y, a->a, wd, rows, I, C, flags);
}

void mlp_forward(const struct moe_model *m, struct mlp_acts *a, float *y, const float *x, const float *wg,
		 const float *wu, const float *wd, int rows, int C, int I)
{
	mlp_fwd(m, a, y, x, wg, wu, wd, rows, C, I, 0);
}

/* dx is written (LIN_SET_DX in flags) or accumulated into; dg, du: [rows, I] scratch; dwg, dwu, dwd NULL:
 * frozen weights (LoRA) */
static void mlp_bwd(const struct moe_model *m, float *dx, float *dwg, float *dwu, float *dwd, float *dg,
		    float *du, const float *dy, const float *x, const struct mlp_acts *a, const float *wg,
		    const float *wu, const float *wd, int rows, int C, int I, int flags)
{
	/* d(silu(g) u) = dy Wd, into dg; then dg, du in place */
	model_linear_bwd(m, dg, dwd, dy, a->a, wd, rows, I, C, (flags & LIN_SERIAL) | LIN_SET_DX);
	swiglu_backward_set(dg, du, dg, a->g, a->u, (size_t)rows * I);
	model_linear_bwd(m, dx, dwg, dg, x, wg, rows, C, I, flags);
	model_linear_bwd(m, dx, dwu, du, x, wu, rows, C, I, flags & LIN_SERIAL);
}

void mlp_backward(const struct moe_model *m, float *dx, float *dwg, float *dwu, float *dwd, float *dg,
		  float *du, const float *dy, const float *x, const struct mlp_acts *a, const float *wg,
		  const float *wu, const float *wd, int rows, int C, int I)
{
	mlp_bwd(m, dx, dwg, dwu, dwd, dg, du, dy, x, a, wg, wu, wd, rows, C, I, LIN_SET_DX);
}

struct router_params moe_router_params(const struct model_config *c)
{
	struct router_params p = {
		.E = c->n_routed_experts, .K = c->num_experts_per_tok, .n_group = c->n_group,
		.topk_group = c->topk_group, .scoring = c->scoring_func,
		.norm_topk_prob = c->norm_topk_prob,
		.routed_scaling_factor = (float)c->routed_scaling_factor,
	};
	return p;
}

/* The task order of the parallel regions from a->offsets: the shared expert (task -1, all N rows) and
 * the local experts, largest first (the order only balances the threads). */
static void build_tasks(struct moe_acts *a, int El, int shared)
{
	int nt = 0;
	if (shared)
		a->tasks[nt++] = -1;
	for (int e = 0; e < El; e++) {
		int n = a->offsets[e + 1] - a->offsets[e], j = nt++;
		if (n == 0) {
			nt--;
			continue;
		}
		/* insertion sort by rows, descending; ties by expert index */
		while (j > 0 && a->tasks[j - 1] >= 0 &&
		       a->offsets[a->tasks[j - 1] + 1] - a->offsets[a->tasks[j - 1]] < n) {
			a->tasks[j] = a->tasks[j - 1];
			j--;
		}
		a->tasks[j] = e;
	}
	a->n_tasks = nt;
}

void moe_group_rows(const int *topk_idx, int N, int K, int E, int e0, int El, int64_t *load, int *offsets,
		    int *row_pair, int *row_of, int *fill)
{
	memset(load, 0, sizeof(int64_t) * E);
	for (int i = 0; i < N * K; i++)
		load[topk_idx[i]]++;
	offsets[0] = 0;
	for (int e = 0; e < El; e++)
		offsets[e + 1] = offsets[e] + (int)load[e0 + e];
	memcpy(fill, offsets, sizeof(int) * El);
	for (int i = 0; i < N * K; i++) {
		int e = topk_idx[i] - e0;
		if (e < 0 || e >= El) {
			row_of[i] = -1;
			continue;
		}
		int r = fill[e]++;
		row_of[i] = r;
		row_pair[r] = i;
	}
}

/* The sorted rows of this forward, then the task order of the parallel regions (see build_tasks). */
static void group_by_expert(const struct moe_model *m, struct moe_acts *a, int N, int64_t *load)
{
	int El = m->expert_end - m->expert_begin;

	/* a->tasks is scratch until the task order is built */
	moe_group_rows(a->topk_idx, N, m->cfg.num_experts_per_tok, m->cfg.n_routed_experts, m->expert_begin,
		       El, load, a->offsets, a->row_pair, a->row_of, a->tasks);
	build_tasks(a, El, m->cfg.n_shared_experts > 0);
}

/*
 * out[n] (+)= sum_k wk * rows[row[n*K + k]], slots in order (wk = weights[n*K + k], or 1 when weights is
 * NULL; a row index < 0 is skipped: an expert of another rank).  set: write out instead of adding.
 */
static void combine_rows(float *out, const float *rows, const int *row, const float *weights, int N, int K,
			 int C, int set)
{
#pragma omp parallel for schedule(static)
	for (int n = 0; n < N; n++) {
		float *o = out + (size_t)n * C;
		if (set)
			memset(o, 0, sizeof(float) * C);
		for (int k = 0; k < K; k++) {
			int r = row[n * K + k];
			if (r < 0)
				continue;
			const float *y = rows + (size_t)r * C;
			float wk = weights ? weights[n * K + k] : 1.0f;
			for (int i = 0; i < C; i++)
				o[i] += wk * y[i];
		}
	}
}

/* the shared experts over all N tokens, as one task of the expert region */
static void shared_fwd(const struct moe_model *m, const struct layer_weights *w, struct moe_acts *a,
		       float *out, const float *x, int N, int C, int Is)
{
	mlp_fwd(m, &a->shared, out, x, w->shared_gate_proj, w->shared_up_proj, w->shared_down_proj, N, C, Is,
		LIN_SERIAL);
}

static void shared_bwd(const struct moe_model *m, const struct layer_weights *w,
		       const struct layer_weights *g, const struct moe_acts *a, struct grad_scratch *s, float *dx, const float *dout,
		       const float *x, int N, int C, int Is)
{
	mlp_bwd(m, dx, g->shared_gate_proj, g->shared_up_proj, g->shared_down_proj, s->dg_shared, s->du_shared,
		dout, x, &a->shared, w->shared_gate_proj, w->shared_up_proj, w->shared_down_proj, N, C, Is,
		LIN_SERIAL | LIN_SET_DX);
}

/* local expert e over its n rows starting at r0: forward, and backward writing dx_rows */
static void expert_fwd(const struct moe_model *m, const struct layer_weights *w, int e, int r0, int n,
		       const float *x_rows, float *y_rows, const struct mlp_acts *acts, int C, int Im)
{
	size_t wo = (size_t)e * Im * C, ro = (size_t)r0 * Im;
	struct mlp_acts ea = { acts->g + ro, acts->u + ro, acts->a + ro };
	mlp_fwd(m, &ea, y_rows + (size_t)r0 * C, x_rows + (size_t)r0 * C, w->experts_gate_proj + wo,
		w->experts_up_proj + wo, w->experts_down_proj + wo, n, C, Im, LIN_SERIAL);
}

/* expert e's block of a stacked gradient, or NULL when it is frozen */
static float *expert_block(float *g, size_t wo)
{
	return g ? g + wo : NULL;
}

static void expert_bwd(const struct moe_model *m, const struct layer_weights *w,
		       const struct layer_weights *g, int e, int r0, int n, float *dx_rows, float *dg, float *du, const float *dy_rows,
		       const float *x_rows, const struct mlp_acts *acts, int C, int Im)
{
	size_t wo = (size_t)e * Im * C, ro = (size_t)r0 * Im;
	struct mlp_acts ea = { acts->g + ro, acts->u + ro, acts->a + ro };
	mlp_bwd(m, dx_rows + (size_t)r0 * C, expert_block(g->experts_gate_proj, wo),
		expert_block(g->experts_up_proj, wo), expert_block(g->experts_down_proj, wo), dg + ro, du + ro,
		dy_rows + (size_t)r0 * C, x_rows + (size_t)r0 * C, &ea, w->experts_gate_proj + wo,
		w->experts_up_proj + wo, w->experts_down_proj + wo, n, C, Im,
		LIN_SERIAL | LIN_SET_DX);
}

/* ---------------------------------------------------------------- expert parallelism */

static void moe_fail(const char *what)
{
	comm_abort(1, what);
}

/* grow-only buffers; on failure the job ends (an out-of-memory rank must not hang its peers) */
static float *grow(float *p, size_t floats)
{
	float *q = realloc(p, sizeof(float) * (floats + 1));
	if (!q)
		moe_fail("out of memory for the expert-parallel buffers");
	return q;
}

static void ensure_ep_acts(struct moe_acts *a, size_t R, int C, int Im)
{
	if (R <= a->cap_R && a->xr)
		return;
	R += R / 4 + 16;  /* headroom: the loads drift from step to step */
	a->xr = grow(a->xr, R * C);
	a->yr = grow(a->yr, R * C);
	a->er.g = grow(a->er.g, R * Im);
	a->er.u = grow(a->er.u, R * Im);
	a->er.a = grow(a->er.a, R * Im);
	a->cap_R = R;
}

static void ensure_ep_scratch(struct grad_scratch *s, size_t R, int C, int Im)
{
	if (R <= s->cap_R && s->dyr)
		return;
	R += R / 4 + 16;
	s->dyr = grow(s->dyr, R * C);
	s->dxr = grow(s->dxr, R * C);
	s->dgr = grow(s->dgr, R * Im);
	s->dur = grow(s->dur, R * Im);
	s->cap_R = R;
}

void moe_acts_free_ep(struct moe_acts *a)
{
	dispatch_free(&a->disp);
	free(a->xr);
	free(a->yr);
	free(a->er.g);
	free(a->er.u);
	free(a->er.a);
	a->xr = a->yr = a->er.g = a->er.u = a->er.a = NULL;
	a->cap_R = 0;
}

/*
 * The MoE layer under expert parallelism: this rank's (token, slot) rows go, in send order, to the ranks
 * holding their experts by all-to-all; the local experts compute the rows of the whole ep group; the
 * outputs come back the same way and are combined here.  Every rank of the group calls this together.
 */
static void moe_forward_ep(const struct moe_model *m, const struct layer_weights *w, struct moe_acts *a,
			   float *out, const float *x, int N, int64_t *load)
{
	const struct model_config *c = &m->cfg;
	int C = c->hidden_size, K = c->num_experts_per_tok, Im = c->moe_intermediate_size;
	int Is = c->n_shared_experts * Im, El = m->expert_end - m->expert_begin;
	struct moe_dispatch *d = &a->disp;

	if ((d->N != N || !d->send_row) &&
	    dispatch_init(d, m->ep_group, N, K, c->n_routed_experts, m->expert_begin, m->expert_end))
		moe_fail("out of memory for the expert dispatch");
	if (dispatch_plan(d, a->topk_idx))
		moe_fail("expert dispatch: exchanging the counts failed");
	memcpy(load, d->load, sizeof(int64_t) * c->n_routed_experts);
#pragma omp parallel for schedule(static)
	for (int i = 0; i < N * K; i++)
		memcpy(a->xe + (size_t)d->send_row[i] * C, x + (size_t)(i / K) * C, sizeof(float) * C);
	ensure_ep_acts(a, d->R, C, Im);
	if (dispatch_to_experts(d, a->xe, a->xr, C))
		moe_fail("expert dispatch: the all-to-all failed");
	memcpy(a->offsets, d->offsets, sizeof(int) * (El + 1));
	build_tasks(a, El, c->n_shared_experts > 0);
#pragma omp parallel for schedule(dynamic, 1)
	for (int t = 0; t < a->n_tasks; t++) {
		int e = a->tasks[t];
		if (e < 0) {  /* the shared expert writes out */
			shared_fwd(m, w, a, out, x, N, C, Is);
			continue;
		}
		int r0 = a->offsets[e];
		expert_fwd(m, w, e, r0, a->offsets[e + 1] - r0, a->xr, a->yr, &a->er, C, Im);
	}
	if (dispatch_from_experts(d, a->yr, a->ye, C))
		moe_fail("expert combine: the all-to-all failed");
	combine_rows(out, a->ye, d->send_row, a->topk_w, N, K, C, c->n_shared_experts == 0);
}

static void moe_backward_ep(const struct moe_model *m, const struct layer_weights *w,
			    const struct layer_weights *g, struct moe_acts *a, struct grad_scratch *s,
			    float *dx, const float *dout, const float *x, int N)
{
	const struct model_config *c = &m->cfg;
	int C = c->hidden_size, K = c->num_experts_per_tok, Im = c->moe_intermediate_size;
	int Is = c->n_shared_experts * Im;
	struct moe_dispatch *d = &a->disp;

	/* the combine: d topk_w = <dout, expert output>, d expert output = w_k dout, in send order */
#pragma omp parallel for schedule(static)
	for (int i = 0; i < N * K; i++) {
		int r = d->send_row[i];
		const float *dn = dout + (size_t)(i / K) * C, *y = a->ye + (size_t)r * C;
		float *dy = s->dye + (size_t)r * C, wk = a->topk_w[i], dot = 0.0f;
		for (int j = 0; j < C; j++) {
			dot += dn[j] * y[j];
			dy[j] = wk * dn[j];
		}
		s->dtopk_w[i] = dot;
	}
	ensure_ep_scratch(s, d->R, C, Im);
	if (dispatch_to_experts(d, s->dye, s->dyr, C))
		moe_fail("expert backward: the all-to-all failed");
#pragma omp parallel for schedule(dynamic, 1)
	for (int t = 0; t < a->n_tasks; t++) {
		int e = a->tasks[t];
		if (e < 0) {  /* the shared expert writes dx */
			shared_bwd(m, w, g, a, s, dx, dout, x, N, C, Is);
			continue;
		}
		int r0 = a->offsets[e];
		expert_bwd(m, w, g, e, r0, a->offsets[e + 1] - r0, s->dxr, s->dgr, s->dur, s->dyr, a->xr, &a->er,
			   C, Im);
	}
	if (dispatch_from_experts(d, s->dxr, s->dxe, C))
		moe_fail("expert backward: the all-to-all back failed");
	combine_rows(dx, s->dxe, d->send_row, NULL, N, K, C, c->n_shared_experts == 0);
}

/* ---------------------------------------------------------------- the layer */

float moe_forward(const struct moe_model *m, const struct layer_weights *w, struct moe_acts *a,
		  float *out, const float *x, int B, int T, int64_t *load)
{
	const struct model_config *c = &m->cfg;
	struct router_params rp = moe_router_params(c);
	int N = B * T, C = c->hidden_size, K = rp.K, Im = c->moe_intermediate_size;
	int Is = c->n_shared_experts * Im;

	linear_forward(a->logits, x, w->gate, N, C, rp.E);
	router_forward(a->scores, a->topk_idx, a->topk_w, a->logits, w->e_score_correction_bias, &rp, N);
	if (a->replay) {
		memcpy(a->topk_idx, a->replay, sizeof(int) * (size_t)N * K);
		router_replay_weights(a->topk_w, a->scores, a->topk_idx, &rp, N);
	}
	if (m->ep_group) {
		moe_forward_ep(m, w, a, out, x, N, load);
		goto balance;
	}
	group_by_expert(m, a, N, load);

	/* each task: gather its rows, then its MLP; the shared expert writes out = shared(x) */
#pragma omp parallel for schedule(dynamic, 1)
	for (int t = 0; t < a->n_tasks; t++) {
		int e = a->tasks[t];
		if (e < 0) {  /* the shared expert writes out */
			shared_fwd(m, w, a, out, x, N, C, Is);
			continue;
		}
		int r0 = a->offsets[e], n = a->offsets[e + 1] - r0;
		for (int r = r0; r < r0 + n; r++)
			memcpy(a->xe + (size_t)r * C, x + (size_t)(a->row_pair[r] / K) * C, sizeof(float) * C);
		expert_fwd(m, w, e, r0, n, a->xe, a->ye, &a->e, C, Im);
	}

	/* out = shared(x) + sum_k w_k expert_k(x), slots added in order */
	combine_rows(out, a->ye, a->row_of, a->topk_w, N, K, C, c->n_shared_experts == 0);
balance:
	if (c->aux_loss_alpha > 0)
		return balance_loss_forward(a->scores, a->topk_idx, B, T, rp.E, K, (float)c->aux_loss_alpha);
	return 0.0f;
}

void moe_backward(const struct moe_model *m, const struct layer_weights *w,
		  const struct layer_weights *g, struct moe_acts *a, struct grad_scratch *s,
		  float *dx, const float *dout, const float *x, int B, int T, float loss_scale)
{
	const struct model_config *c = &m->cfg;
	struct router_params rp = moe_router_params(c);
	int N = B * T, C = c->hidden_size, K = rp.K, E = rp.E, Im = c->moe_intermediate_size;
	int Is = c->n_shared_experts * Im;
	float *dscores = NULL;	/* declared before the label: C11 has no declaration after one */

	if (m->ep_group) {
		moe_backward_ep(m, w, g, a, s, dx, dout, x, N);
		goto router;
	}

	/* slots routed to experts of other ranks get no weight gradient here */
	memset(s->dtopk_w, 0, sizeof(float) * N * K);
#pragma omp parallel for schedule(dynamic, 1)
	for (int t = 0; t < a->n_tasks; t++) {
		int e = a->tasks[t];
		if (e < 0) {  /* the shared expert writes dx */
			shared_bwd(m, w, g, a, s, dx, dout, x, N, C, Is);
			continue;
		}
		int r0 = a->offsets[e], n = a->offsets[e + 1] - r0;
		/* the combine: d topk_w = <dout, expert output>, d expert output = w_k dout */
		for (int r = r0; r < r0 + n; r++) {
			int i = a->row_pair[r];
			const float *d = dout + (size_t)(i / K) * C, *y = a->ye + (size_t)r * C;
			float *dy = s->dye + (size_t)r * C, wk = a->topk_w[i], dot = 0.0f;
#pragma omp simd reduction(+ : dot)
			for (int j = 0; j < C; j++) {
				dot += d[j] * y[j];
				dy[j] = wk * d[j];
			}
			s->dtopk_w[i] = dot;
		}
		expert_bwd(m, w, g, e, r0, n, s->dxe, s->dg, s->du, s->dye, a->xe, &a->e, C, Im);
	}
	/* scatter the expert input gradients back to their tokens, slots in order */
	combine_rows(dx, s->dxe, a->row_of, NULL, N, K, C, c->n_shared_experts == 0);

router:
	/* router: through the weights (and the balance loss), never through the selection */
	if (c->aux_loss_alpha > 0) {
		dscores = s->dscores;
		memset(dscores, 0, sizeof(float) * N * E);
		balance_loss_backward(dscores, a->scores, a->topk_idx, B, T, E, K, (float)c->aux_loss_alpha,
				      loss_scale);
	}
	memset(s->dlogits, 0, sizeof(float) * N * E);
	router_backward(s->dlogits, s->dtopk_w, dscores, a->scores, a->topk_idx, &rp, N);
	linear_backward(dx, g->gate, s->dlogits, x, w->gate, N, C, E);
}
