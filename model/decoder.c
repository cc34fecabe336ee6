/*
 * model/decoder.c - what the main model (model.c) and the multi-token-prediction depths (mtp.c) share:
 * one decoder layer's forward and backward, the buffers of its activations, the cross-entropy term.
 */
#include <stdio.h>
#include <stdlib.h>

#include "model/layers.h"
#include "model/ops.h"

void *model_acts_alloc(struct model_acts *a, size_t bytes)
{
	if (a->n_allocs == (int)(sizeof(a->allocs) / sizeof(a->allocs[0]))) {
		fprintf(stderr, "moe: too many activation buffers\n");
		abort();
	}
	void *p = a->mem.alloc(bytes);
	if (!p) {
		fprintf(stderr, "moe: out of memory allocating %zu bytes of activations\n", bytes);
		exit(1);
	}
	a->allocs[a->n_allocs++] = p;
	return p;
}

#define FALLOC(n) ((float *)model_acts_alloc(a, sizeof(float) * (size_t)(n)))
#define IALLOC(n) ((int *)model_acts_alloc(a, sizeof(int) * (size_t)(n)))

void model_layer_acts_alloc(const struct moe_model *m, struct model_acts *a, struct layer_acts *la,
			    int l, size_t N)
{
	const struct model_config *c = &m->cfg;
	size_t C = c->hidden_size, H = c->num_attention_heads, dq = mc_qk_head_dim(c);
	size_t Rq = c->q_lora_rank, Rkv = c->kv_lora_rank, dr = c->qk_rope_head_dim;
	struct mla_acts *ma = &la->mla;

	la->ln1 = FALLOC(N * C);
	la->ln1_rstd = FALLOC(N);
	la->ln2 = FALLOC(N * C);
	la->ln2_rstd = FALLOC(N);
	if (Rq) {
		ma->qa = FALLOC(N * Rq);
		ma->qa_n = FALLOC(N * Rq);
		ma->qa_rstd = FALLOC(N);
	}
	ma->q = FALLOC(N * H * dq);
	ma->kva = FALLOC(N * (Rkv + dr));
	ma->ckv = FALLOC(N * Rkv);
	ma->ckv_n = FALLOC(N * Rkv);
	ma->ckv_rstd = FALLOC(N);
	ma->kv = FALLOC(N * H * (c->qk_nope_head_dim + c->v_head_dim));
	ma->k = FALLOC(N * H * dq);
	ma->v = FALLOC(N * H * c->v_head_dim);
	ma->att = FALLOC(N * H * c->v_head_dim);
	ma->lse = FALLOC(N * H);
	if (!mc_layer_is_moe(c, l)) {
		size_t I = c->intermediate_size;
		la->mlp.g = FALLOC(N * I);
		la->mlp.u = FALLOC(N * I);
		la->mlp.a = FALLOC(N * I);
		return;
	}
	struct moe_acts *mo = &la->moe;
	size_t E = c->n_routed_experts, K = c->num_experts_per_tok, Im = c->moe_intermediate_size;
	size_t Is = c->n_shared_experts * Im;
	mo->logits = FALLOC(N * E);
	mo->scores = FALLOC(N * E);
	mo->topk_idx = IALLOC(N * K);
	mo->topk_w = FALLOC(N * K);
	mo->offsets = IALLOC(m->expert_end - m->expert_begin + 1);
	mo->tasks = IALLOC(m->expert_end - m->expert_begin + 1);
	mo->row_pair = IALLOC(N * K);
	mo->row_of = IALLOC(N * K);
	mo->xe = FALLOC(N * K * C);
	mo->ye = FALLOC(N * K * C);
	mo->e.g = FALLOC(N * K * Im);
	mo->e.u = FALLOC(N * K * Im);
	mo->e.a = FALLOC(N * K * Im);
	if (Is) {
		mo->shared.g = FALLOC(N * Is);
		mo->shared.u = FALLOC(N * Is);
		mo->shared.a = FALLOC(N * Is);
	}
}

/*
 * One decoder layer l: x -> mid = x + MLA(norm(x)) -> out = mid + FFN(norm(mid)).  Returns the layer's
 * balance loss (MoE layers; la->moe.replay set by the caller).
 */
float decoder_layer_forward(struct moe_model *m, int l, struct layer_acts *la, float *out, float *mid,
			    const float *x, const int *pos, int B, int T)
{
	const struct model_config *c = &m->cfg;
	const struct layer_weights *w = &m->w.layers[l];
	int N = B * T, C = c->hidden_size;
	float eps = (float)c->rms_norm_eps, aux = 0.0f;

	rmsnorm_forward(la->ln1, la->ln1_rstd, x, w->input_layernorm, N, C, eps);
	mla_forward(m, w, &la->mla, mid, la->ln1, pos, B, T);
	vec_add(mid, x, (size_t)N * C);
	rmsnorm_forward(la->ln2, la->ln2_rstd, mid, w->post_attention_layernorm, N, C, eps);
	if (mc_layer_is_moe(c, l))
		aux = moe_forward(m, w, &la->moe, out, la->ln2, B, T,
				  m->expert_load + (size_t)l * c->n_routed_experts);
	else
		mlp_forward(m, &la->mlp, out, la->ln2, w->mlp_gate_proj, w->mlp_up_proj, w->mlp_down_proj,
			    N, C, c->intermediate_size);
	vec_add(out, mid, (size_t)N * C);
	return aux;
}

/* The backward of decoder_layer_forward: s->dres holds d(out) on entry and d(x) on return. */
void decoder_layer_backward(struct moe_model *m, int l, struct layer_acts *la, struct grad_scratch *s,
			    const float *mid, const float *x, const int *pos, int B, int T, float loss_scale)
{
	const struct model_config *c = &m->cfg;
	const struct layer_weights *w = &m->w.layers[l], *g = &m->g.layers[l];
	int N = B * T, C = c->hidden_size;

	/* the layer backwards write s->dln; the norms' backwards add into s->dres */
	if (mc_layer_is_moe(c, l))
		moe_backward(m, w, g, &la->moe, s, s->dln, s->dres, la->ln2, B, T, loss_scale);
	else
		mlp_backward(m, s->dln, g->mlp_gate_proj, g->mlp_up_proj, g->mlp_down_proj, s->dg, s->du,
			     s->dres, la->ln2, &la->mlp, w->mlp_gate_proj, w->mlp_up_proj,
			     w->mlp_down_proj, N, C, c->intermediate_size);
	rmsnorm_backward(s->dres, g->post_attention_layernorm, s->dln, mid, w->post_attention_layernorm,
			 la->ln2_rstd, N, C);
	mla_backward(m, w, g, &la->mla, s, s->dln, s->dres, la->ln1, pos, B, T);
	rmsnorm_backward(s->dres, g->input_layernorm, s->dln, x, w->input_layernorm, la->ln1_rstd, N, C);
}

float ce_term(const float *losses, const int *targets, const float *w, int N)
{
	double sum = 0.0;
	int count = 0;
	for (int n = 0; n < N; n++) {
		if (targets[n] >= 0) {
			sum += w ? (double)w[n] * losses[n] : losses[n];
			count++;
		}
	}
	if (w)
		return (float)sum;
	return count ? (float)(sum / count) : 0.0f;
}

float ce_row_scale(const int *targets, const float *w, int N, float loss_scale, float temperature)
{
	int count = 0;
	for (int n = 0; n < N; n++)
		count += targets[n] >= 0;
	float dloss = w ? loss_scale : count ? loss_scale / count : 0.0f;
	return dloss / temperature;
}
