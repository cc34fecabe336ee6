/*
 * model/mtp.c - multi-token prediction depths (model/mtp.h): forward and backward on the CPU.
 *
 * The depths' buffers come from the model's activations (freed with them); the decoder layer is the
 * main model's decoder_layer_forward / _backward over layer index L + k - 1.
 */
#include "model/mtp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/layers.h"
#include "model/ops.h"

int mtp_active(const struct moe_model *m)
{
	return m->cfg.num_nextn_predict_layers > 0 && m->mtp_lambda > 0.0f && !m->token_weights &&
	       !m->route_replay;
}

#define MFALLOC(n) ((float *)model_acts_alloc(a, sizeof(float) * (size_t)(n)))
#define MIALLOC(n) ((int *)model_acts_alloc(a, sizeof(int) * (size_t)(n)))

static struct mtp_acts *mtp_acts_create(const struct moe_model *m, struct model_acts *a)
{
	const struct model_config *c = &m->cfg;
	size_t N = (size_t)a->B * a->T, C = c->hidden_size, V = c->vocab_size;
	int D = c->num_nextn_predict_layers;
	struct mtp_acts *t = calloc(1, sizeof(*t));
	if (!t || !(t->d = calloc(D, sizeof(*t->d)))) {
		fprintf(stderr, "moe: out of memory for the multi-token-prediction activations\n");
		exit(1);
	}
	for (int k = 0; k < D; k++) {
		struct mtp_depth_acts *d = &t->d[k];
		d->tok = MIALLOC(N);
		d->tgt = MIALLOC(N);
		d->emb = MFALLOC(N * C);
		d->e_n = MFALLOC(N * C);
		d->e_rstd = MFALLOC(N);
		d->h_n = MFALLOC(N * C);
		d->h_rstd = MFALLOC(N);
		d->cat = MFALLOC(N * 2 * C);
		d->x = MFALLOC(N * C);
		d->mid = MFALLOC(N * C);
		d->out = MFALLOC(N * C);
		d->lnf = MFALLOC(N * C);
		d->lnf_rstd = MFALLOC(N);
		d->logits = MFALLOC(N * V);
		d->losses = MFALLOC(N);
		model_layer_acts_alloc(m, a, &d->la, c->num_hidden_layers + k, N);
	}
	t->dh = MFALLOC(N * C);
	t->dcarry = MFALLOC(N * C);
	t->dcat = MFALLOC(N * 2 * C);
	t->de = MFALLOC(N * C);
	return t;
}

void mtp_acts_free(const struct model_config *c, struct mtp_acts *t)
{
	if (!t)
		return;
	for (int k = 0; k < c->num_nextn_predict_layers; k++)
		moe_acts_free_ep(&t->d[k].la.moe);
	free(t->d);
	free(t);
}

/* Row n = b*T + i of depth k embeds t_{i+k} and predicts t_{i+k+1} = targets[b*T + i + k]. */
static void depth_tokens(struct mtp_depth_acts *d, const int *inputs, const int *targets, int B, int T,
			 int k)
{
	for (int b = 0; b < B; b++)
		for (int i = 0; i < T; i++) {
			int n = b * T + i, j = i + k;
			d->tok[n] = j < T ? inputs[b * T + j] : 0;
			d->tgt[n] = j < T ? targets[b * T + j] : -1;
		}
}

/* rows [a | b] of widths C each */
static void concat_rows(float *cat, const float *a, const float *b, int N, int C)
{
	for (int n = 0; n < N; n++) {
		memcpy(cat + (size_t)n * 2 * C, a + (size_t)n * C, sizeof(float) * C);
		memcpy(cat + (size_t)n * 2 * C + C, b + (size_t)n * C, sizeof(float) * C);
	}
}

static void split_rows(float *a, float *b, const float *cat, int N, int C)
{
	for (int n = 0; n < N; n++) {
		memcpy(a + (size_t)n * C, cat + (size_t)n * 2 * C, sizeof(float) * C);
		memcpy(b + (size_t)n * C, cat + (size_t)n * 2 * C + C, sizeof(float) * C);
	}
}

float mtp_forward(struct moe_model *m, float *aux)
{
	const struct model_config *c = &m->cfg;
	struct model_acts *a = m->acts;
	int B = a->B, T = a->T, N = B * T, C = c->hidden_size, V = c->vocab_size;
	int L = c->num_hidden_layers, D = c->num_nextn_predict_layers;
	float eps = (float)c->rms_norm_eps;
	double sum = 0.0;

	if (!a->mtp)
		a->mtp = mtp_acts_create(m, a);
	const float *h = a->resid + (size_t)L * N * C;
	for (int k = 1; k <= D; k++) {
		struct mtp_depth_acts *d = &a->mtp->d[k - 1];
		const struct mtp_weights *w = &m->w.mtp[k - 1];

		depth_tokens(d, a->inputs, a->targets, B, T, k);
		embedding_forward(d->emb, d->tok, m->w.embed_tokens, N, C);
		rmsnorm_forward(d->e_n, d->e_rstd, d->emb, w->enorm, N, C, eps);
		rmsnorm_forward(d->h_n, d->h_rstd, h, w->hnorm, N, C, eps);
		concat_rows(d->cat, d->e_n, d->h_n, N, C);
		linear_forward(d->x, d->cat, w->eh_proj, N, 2 * C, C);
		d->la.moe.replay = NULL;
		*aux += decoder_layer_forward(m, L + k - 1, &d->la, d->out, d->mid, d->x, a->pos, B, T);
		rmsnorm_forward(d->lnf, d->lnf_rstd, d->out, w->shared_head_norm, N, C, eps);
		linear_forward(d->logits, d->lnf, m->w.lm_head, N, C, V);
		cross_entropy_forward(d->losses, d->logits, d->tgt, N, V);
		sum += ce_term(d->losses, d->tgt, NULL, N);
		h = d->out;
	}
	a->mtp->active = 1;
	return (float)(sum / D);
}

float mtp_depth_loss(const struct moe_model *m, int k)
{
	const struct model_acts *a = m->acts;
	if (!a || !a->mtp || !a->mtp->active || k < 1 || k > m->cfg.num_nextn_predict_layers)
		return 0.0f;
	const struct mtp_depth_acts *d = &a->mtp->d[k - 1];
	return ce_term(d->losses, d->tgt, NULL, a->B * a->T);
}

/* Walks the depths backward; t->dcarry holds d(h_k) from depth k + 1, t->dh ends with d(h_0). */
void mtp_backward(struct moe_model *m, float loss_scale)
{
	const struct model_config *c = &m->cfg;
	struct model_acts *a = m->acts;
	struct mtp_acts *t = a->mtp;
	struct grad_scratch *s = &a->gs;
	int B = a->B, T = a->T, N = B * T, C = c->hidden_size, V = c->vocab_size;
	int L = c->num_hidden_layers, D = c->num_nextn_predict_layers;

	for (int k = D; k >= 1; k--) {
		struct mtp_depth_acts *d = &t->d[k - 1];
		const struct mtp_weights *w = &m->w.mtp[k - 1], *g = &m->g.mtp[k - 1];
		const float *hprev = k == 1 ? a->resid + (size_t)L * N * C : t->d[k - 2].out;
		float dloss = ce_row_scale(d->tgt, NULL, N, loss_scale * m->mtp_lambda / D, 1.0f);

		cross_entropy_backward_rows(d->logits, d->logits, d->tgt, dloss, NULL, N, V);
		model_linear_bwd(m, s->dln, m->g.lm_head, d->logits, d->lnf, m->w.lm_head, N, C, V, LIN_SET_DX);
		rmsnorm_backward_set(s->dres, C, g->shared_head_norm, s->dln, d->out, w->shared_head_norm,
				     d->lnf_rstd, N, C);
		if (k < D)
			vec_add(s->dres, t->dcarry, (size_t)N * C);
		decoder_layer_backward(m, L + k - 1, &d->la, s, d->mid, d->x, a->pos, B, T, loss_scale);
		model_linear_bwd(m, t->dcat, g->eh_proj, s->dres, d->cat, w->eh_proj, N, 2 * C, C, LIN_SET_DX);
		split_rows(t->de, s->dln, t->dcat, N, C);
		rmsnorm_backward_set(s->dres, C, g->enorm, t->de, d->emb, w->enorm, d->e_rstd, N, C);
		if (m->g.embed_tokens)  /* NULL: frozen (LoRA) */
			embedding_backward(m->g.embed_tokens, s->dres, d->tok, N, C);
		rmsnorm_backward_set(k == 1 ? t->dh : t->dcarry, C, g->hnorm, s->dln, hprev, w->hnorm,
				     d->h_rstd, N, C);
	}
}
