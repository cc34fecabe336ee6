/*
 * model/moe.c - SwiGLU MLP and the DeepSeekMoE layer (DeepSeek-V3 section 2.1.2), forward and backward.
 *
 * Tokens are grouped by expert (a stable counting sort of the (token, slot) pairs), so each expert runs
 * as three BLAS products over its rows; experts run in parallel, each product single-threaded.
 */
#include <stdlib.h>
#include <string.h>

#include "model/layers.h"

void mlp_forward(struct mlp_acts *a, float *y, const float *x, const float *wg, const float *wu,
		 const float *wd, int rows, int C, int I)
{
	linear_forward(a->g, x, wg, rows, C, I);
	linear_forward(a->u, x, wu, rows, C, I);
	swiglu_forward(a->a, a->g, a->u, (size_t)rows * I);
	linear_forward(y, a->a, wd, rows, I, C);
}

void mlp_backward(float *dx, float *dwg, float *dwu, float *dwd, float *dg, float *du, float *da,
		  const float *dy, const float *x, const struct mlp_acts *a, const float *wg,
		  const float *wu, const float *wd, int rows, int C, int I)
{
	size_t n = (size_t)rows * I;
	memset(da, 0, sizeof(float) * n);
	linear_backward(da, dwd, dy, a->a, wd, rows, I, C);
	memset(dg, 0, sizeof(float) * n);
	memset(du, 0, sizeof(float) * n);
	swiglu_backward(dg, du, da, a->g, a->u, n);
	linear_backward(dx, dwg, dg, x, wg, rows, C, I);
	linear_backward(dx, dwu, du, x, wu, rows, C, I);
}

static struct router_params router_params(const struct model_config *c)
{
	struct router_params p = {
		.E = c->n_routed_experts, .K = c->num_experts_per_tok, .n_group = c->n_group,
		.topk_group = c->topk_group, .scoring = c->scoring_func,
		.norm_topk_prob = c->norm_topk_prob,
		.routed_scaling_factor = (float)c->routed_scaling_factor,
	};
	return p;
}

/* Stable counting sort of the (token, slot) pairs routed to local experts: offsets, row_token, row_of. */
static void group_by_expert(const struct moe_model *m, struct moe_acts *a, int N, int64_t *load)
{
	int E = m->cfg.n_routed_experts, K = m->cfg.num_experts_per_tok;
	int e0 = m->expert_begin, El = m->expert_end - m->expert_begin;

	memset(load, 0, sizeof(int64_t) * E);
	for (int i = 0; i < N * K; i++)
		load[a->topk_idx[i]]++;
	a->offsets[0] = 0;
	for (int e = 0; e < El; e++)
		a->offsets[e + 1] = a->offsets[e] + (int)load[e0 + e];
	int *fill = malloc(sizeof(int) * (El + 1));
	memcpy(fill, a->offsets, sizeof(int) * (El + 1));
	for (int i = 0; i < N * K; i++) {
		int e = a->topk_idx[i] - e0;
		if (e < 0 || e >= El) {
			a->row_of[i] = -1;
			continue;
		}
		int r = fill[e]++;
		a->row_of[i] = r;
		a->row_token[r] = i / K;
	}
	free(fill);
}

float moe_forward(const struct moe_model *m, const struct layer_weights *w, struct moe_acts *a,
		  float *out, const float *x, int B, int T, int64_t *load)
{
	const struct model_config *c = &m->cfg;
	struct router_params rp = router_params(c);
	int N = B * T, C = c->hidden_size, K = rp.K, Im = c->moe_intermediate_size;
	int El = m->expert_end - m->expert_begin;

	linear_forward(a->logits, x, w->gate, N, C, rp.E);
	router_forward(a->scores, a->topk_idx, a->topk_w, a->logits, w->e_score_correction_bias, &rp, N);
	group_by_expert(m, a, N, load);

	int rows = a->offsets[El];
#pragma omp parallel for schedule(static)
	for (int r = 0; r < rows; r++)
		memcpy(a->xe + (size_t)r * C, x + (size_t)a->row_token[r] * C, sizeof(float) * C);
#pragma omp parallel for schedule(dynamic, 1)
	for (int e = 0; e < El; e++) {
		int r0 = a->offsets[e], n = a->offsets[e + 1] - r0;
		if (n == 0)
			continue;
		size_t wo = (size_t)e * Im * C;
		struct mlp_acts ea = { a->e.g + (size_t)r0 * Im, a->e.u + (size_t)r0 * Im,
				       a->e.a + (size_t)r0 * Im };
		mlp_forward(&ea, a->ye + (size_t)r0 * C, a->xe + (size_t)r0 * C, w->experts_gate_proj + wo,
			    w->experts_up_proj + wo, w->experts_down_proj + wo, n, C, Im);
	}

	/* out = shared(x) + sum_k w_k expert_k(x), slots added in order */
	if (c->n_shared_experts > 0)
		mlp_forward(&a->shared, out, x, w->shared_gate_proj, w->shared_up_proj, w->shared_down_proj,
			    N, C, c->n_shared_experts * Im);
	else
		memset(out, 0, sizeof(float) * N * C);
#pragma omp parallel for schedule(static)
	for (int n = 0; n < N; n++) {
		float *o = out + (size_t)n * C;
		for (int k = 0; k < K; k++) {
			int r = a->row_of[n * K + k];
			if (r < 0)
				continue;
			const float *y = a->ye + (size_t)r * C;
			float wk = a->topk_w[n * K + k];
			for (int i = 0; i < C; i++)
				o[i] += wk * y[i];
		}
	}
	if (c->aux_loss_alpha > 0)
		return balance_loss_forward(a->scores, a->topk_idx, B, T, rp.E, K, (float)c->aux_loss_alpha);
	return 0.0f;
}

void moe_backward(const struct moe_model *m, const struct layer_weights *w,
		  const struct layer_weights *g, const struct moe_acts *a, struct grad_scratch *s,
		  float *dx, const float *dout, const float *x, int B, int T, float loss_scale)
{
	const struct model_config *c = &m->cfg;
	struct router_params rp = router_params(c);
	int N = B * T, C = c->hidden_size, K = rp.K, E = rp.E, Im = c->moe_intermediate_size;
	int El = m->expert_end - m->expert_begin, rows = a->offsets[El];

	/* the combine: d topk_w = <dout, expert output>, d expert output = w_k dout */
#pragma omp parallel for schedule(static)
	for (int n = 0; n < N; n++) {
		const float *d = dout + (size_t)n * C;
		for (int k = 0; k < K; k++) {
			int r = a->row_of[n * K + k];
			float dot = 0.0f;
			if (r >= 0) {
				const float *y = a->ye + (size_t)r * C;
				float *dy = s->dye + (size_t)r * C, wk = a->topk_w[n * K + k];
				for (int i = 0; i < C; i++) {
					dot += d[i] * y[i];
					dy[i] = wk * d[i];
				}
			}
			s->dtopk_w[n * K + k] = dot;
		}
	}
	memset(s->dxe, 0, sizeof(float) * rows * C);
#pragma omp parallel for schedule(dynamic, 1)
	for (int e = 0; e < El; e++) {
		int r0 = a->offsets[e], n = a->offsets[e + 1] - r0;
		if (n == 0)
			continue;
		size_t wo = (size_t)e * Im * C, ro = (size_t)r0 * Im;
		struct mlp_acts ea = { a->e.g + ro, a->e.u + ro, a->e.a + ro };
		mlp_backward(s->dxe + (size_t)r0 * C, g->experts_gate_proj + wo, g->experts_up_proj + wo,
			     g->experts_down_proj + wo, s->dg + ro, s->du + ro, s->da + ro,
			     s->dye + (size_t)r0 * C, a->xe + (size_t)r0 * C, &ea, w->experts_gate_proj + wo,
			     w->experts_up_proj + wo, w->experts_down_proj + wo, n, C, Im);
	}
	/* scatter the expert input gradients back to their tokens, slots in order */
#pragma omp parallel for schedule(static)
	for (int n = 0; n < N; n++) {
		float *d = dx + (size_t)n * C;
		for (int k = 0; k < K; k++) {
			int r = a->row_of[n * K + k];
			if (r < 0)
				continue;
			const float *src = s->dxe + (size_t)r * C;
			for (int i = 0; i < C; i++)
				d[i] += src[i];
		}
	}

	/* router: through the weights (and the balance loss), never through the selection */
	float *dscores = NULL;
	if (c->aux_loss_alpha > 0) {
		dscores = s->dscores;
		memset(dscores, 0, sizeof(float) * N * E);
		balance_loss_backward(dscores, a->scores, a->topk_idx, B, T, E, K, (float)c->aux_loss_alpha,
				      loss_scale);
	}
	memset(s->dlogits, 0, sizeof(float) * N * E);
	router_backward(s->dlogits, s->dtopk_w, dscores, a->scores, a->topk_idx, &rp, N);
	linear_backward(dx, g->gate, s->dlogits, x, w->gate, N, C, E);

	if (c->n_shared_experts > 0)
		mlp_backward(dx, g->shared_gate_proj, g->shared_up_proj, g->shared_down_proj, s->dg, s->du,
			     s->da, dout, x, &a->shared, w->shared_gate_proj, w->shared_up_proj,
			     w->shared_down_proj, N, C, c->n_shared_experts * Im);
}
