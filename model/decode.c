/*
 * model/decode.c - incremental decoding with the MLA latent cache, absorbed attention (see decode.h).
 *
 * Per head h, with W_UK_h = kv_b_proj rows [h(dn+dv), h(dn+dv)+dn) and W_UV_h = the dv rows after them
 * (each row kv_lora long):
 *   q_lat = W_UK_h^T q_nope_h                                   [kv_lora]
 *   s_j   = (q_lat . c_kv_j + q_pe_h . k_pe_j) / sqrt(dq)        j = 0..pos of the token's slot
 *   o_lat = sum_j softmax(s)_j c_kv_j;   o_h = W_UV_h o_lat      [dv]
 * which equals softmax(q k^T / sqrt(dq)) v with k_nope = W_UK c_kv, v = W_UV c_kv.
 */
#include <assert.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "model/decode.h"
#include "model/layers.h"

struct decode_scratch {
	int cap;                       /* tokens the buffers hold */
	float *arena;
	float *x, *mid, *ln, *out;     /* [N, C] */
	float *qa, *qa_n, *rstd;       /* [N, Rq], [N, Rq], [N] */
	float *q;                      /* [N, H*dq] */
	float *kva, *ckv, *ckv_n;      /* [N, Rkv+dr], [N, Rkv], [N, Rkv] */
	float *att;                    /* [N, H*dv] */
	float *g, *u, *a;              /* [N, max(I, S*Im)] */
	float *rlogits, *rscores;      /* [N, E] */
	float *topk_w;                 /* [N, K] */
	int *topk_idx;                 /* [N, K] */
};

size_t latent_cache_bytes_per_token(const struct model_config *c)
{
	return (size_t)(c->kv_lora_rank + c->qk_rope_head_dim) * (size_t)c->num_hidden_layers * sizeof(float);
}

struct latent_cache *latent_cache_create(const struct model_config *c, int n_slots, int max_len)
{
	if (n_slots <= 0 || max_len <= 0 || c->num_hidden_layers <= 0 || c->kv_lora_rank <= 0)
		return NULL;
	struct latent_cache *lc = calloc(1, sizeof(*lc));
	if (!lc)
		return NULL;
	lc->n_layers = c->num_hidden_layers;
	lc->n_slots = n_slots;
	lc->max_len = max_len;
	lc->kv_lora = c->kv_lora_rank;
	lc->dr = c->qk_rope_head_dim;
	size_t pos = (size_t)lc->n_layers * n_slots * max_len;
	lc->ckv = calloc(pos * lc->kv_lora, sizeof(float));
	lc->kpe = calloc(pos * (lc->dr > 0 ? lc->dr : 1), sizeof(float));
	lc->len = calloc((size_t)n_slots, sizeof(int));
	lc->scratch = calloc(1, sizeof(*lc->scratch));
	if (!lc->ckv || !lc->kpe || !lc->len || !lc->scratch) {
		latent_cache_free(lc);
		return NULL;
	}
	return lc;
}

void latent_cache_free(struct latent_cache *c)
{
	if (!c)
		return;
	if (c->scratch) {
		free(c->scratch->arena);
		free(c->scratch->topk_idx);
		free(c->scratch);
	}
	free(c->ckv);
	free(c->kpe);
	free(c->len);
	free(c);
}

void latent_cache_reset(struct latent_cache *c, int slot)
{
	if (slot >= 0 && slot < c->n_slots)
		c->len[slot] = 0;
}

static int ensure_scratch(struct decode_scratch *s, const struct model_config *c, int N)
{
	if (N <= s->cap)
		return 0;
	int C = c->hidden_size, H = c->num_attention_heads, dq = mc_qk_head_dim(c), dv = c->v_head_dim;
	int Rq = c->q_lora_rank, Rkv = c->kv_lora_rank, dr = c->qk_rope_head_dim;
	int E = c->n_routed_experts, K = c->num_experts_per_tok;
	int I = c->intermediate_size, Is = c->n_shared_experts * c->moe_intermediate_size;
	int W = I > Is ? I : Is;
	if (W < 1)
		W = 1;
	size_t n = (size_t)N;
	size_t sizes[] = {
		n * C, n * C, n * C, n * C,
		n * Rq, n * Rq, n,
		n * H * dq,
		n * (Rkv + dr), n * Rkv, n * Rkv,
		n * H * dv,
		n * W, n * W, n * W,
		n * E, n * E,
		n * K,
	};
	size_t total = 0;
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
		total += sizes[i] + 16;
	float *arena = malloc(total * sizeof(float));
	int *idx = malloc((n * K + 1) * sizeof(int));
	if (!arena || !idx) {
		free(arena);
		free(idx);
		return -1;
	}
	free(s->arena);
	free(s->topk_idx);
	s->arena = arena;
	s->topk_idx = idx;
	float **ptrs[] = {
		&s->x, &s->mid, &s->ln, &s->out,
		&s->qa, &s->qa_n, &s->rstd,
		&s->q,
		&s->kva, &s->ckv, &s->ckv_n,
		&s->att,
		&s->g, &s->u, &s->a,
		&s->rlogits, &s->rscores,
		&s->topk_w,
	};
	float *p = arena;
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		*ptrs[i] = p;
		p += sizes[i] + 16;
	}
	s->cap = N;
	return 0;
}

/* Absorbed attention of the n tokens of one layer over the cache; att [n, H*dv]. */
static int absorbed_attention(const struct model_config *c, const struct layer_weights *w,
			      const struct latent_cache *lc, int layer, const float *q, float *att,
			      const int *slots, const int *positions, int n)
{
	int H = c->num_attention_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
	int dv = c->v_head_dim, dq = dn + dr, Rkv = c->kv_lora_rank, dkv = dn + dv;
	float scale = 1.0f / sqrtf((float)dq);
	size_t slot_stride = (size_t)lc->max_len;
	const float *ckv_l = lc->ckv + (size_t)layer * lc->n_slots * slot_stride * Rkv;
	const float *kpe_l = lc->kpe + (size_t)layer * lc->n_slots * slot_stride * dr;
	int fail = 0;

#pragma omp parallel
	{
		double *buf = malloc(sizeof(double) * ((size_t)lc->max_len + 2 * (size_t)Rkv + 1));
		if (!buf) {
#pragma omp atomic write
			fail = 1;
		}
#pragma omp for schedule(dynamic, 1)
		for (int t = 0; t < n * H; t++) {
			if (!buf)
				continue;
			int i = t / H, h = t % H, P = positions[i] + 1;
			double *p = buf, *qlat = buf + lc->max_len, *olat = qlat + Rkv;
			const float *qn = q + ((size_t)i * H + h) * dq, *qpe = qn + dn;
			const float *wuk = w->kv_b_proj + (size_t)h * dkv * Rkv;
			const float *wuv = wuk + (size_t)dn * Rkv;
			const float *ck = ckv_l + (size_t)slots[i] * slot_stride * Rkv;
			const float *kp = kpe_l + (size_t)slots[i] * slot_stride * dr;

			for (int r = 0; r < Rkv; r++)
				qlat[r] = 0.0;
			for (int d = 0; d < dn; d++) {
				double qd = qn[d];
				const float *row = wuk + (size_t)d * Rkv;
				for (int r = 0; r < Rkv; r++)
					qlat[r] += qd * row[r];
			}
			double mx = -INFINITY;
			for (int j = 0; j < P; j++) {
				const float *cj = ck + (size_t)j * Rkv, *kj = kp + (size_t)j * dr;
				double s = 0.0;
				for (int r = 0; r < Rkv; r++)
					s += qlat[r] * cj[r];
				for (int d = 0; d < dr; d++)
					s += (double)qpe[d] * kj[d];
				s *= scale;
				p[j] = s;
				if (s > mx)
					mx = s;
			}
			double sum = 0.0;
			for (int j = 0; j < P; j++) {
				p[j] = exp(p[j] - mx);
				sum += p[j];
			}
			for (int r = 0; r < Rkv; r++)
				olat[r] = 0.0;
			for (int j = 0; j < P; j++) {
				const float *cj = ck + (size_t)j * Rkv;
				double pj = p[j] / sum;
				for (int r = 0; r < Rkv; r++)
					olat[r] += pj * cj[r];
			}
			float *o = att + ((size_t)i * H + h) * dv;
			for (int d = 0; d < dv; d++) {
				const float *row = wuv + (size_t)d * Rkv;
				double s = 0.0;
				for (int r = 0; r < Rkv; r++)
					s += row[r] * olat[r];
				o[d] = (float)s;
			}
		}
		free(buf);
	}
	return fail ? -1 : 0;
}

/* The MoE layer for n tokens: shared expert over all rows, then each token's K experts in slot order. */
static int moe_decode(const struct moe_model *m, const struct layer_weights *w, struct decode_scratch *s,
		      float *out, const float *x, int n)
{
	const struct model_config *c = &m->cfg;
	int C = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok;
	int Im = c->moe_intermediate_size, Is = c->n_shared_experts * Im;
	struct router_params rp = {
		.E = E, .K = K, .n_group = c->n_group, .topk_group = c->topk_group,
		.scoring = c->scoring_func, .norm_topk_prob = c->norm_topk_prob,
		.routed_scaling_factor = (float)c->routed_scaling_factor,
	};

	linear_forward(s->rlogits, x, w->gate, n, C, E);
	router_forward(s->rscores, s->topk_idx, s->topk_w, s->rlogits, w->e_score_correction_bias, &rp, n);
	if (Is > 0) {
		struct mlp_acts sa = { s->g, s->u, s->a };
		mlp_forward(&sa, out, x, w->shared_gate_proj, w->shared_up_proj, w->shared_down_proj, n, C, Is);
	} else {
		memset(out, 0, sizeof(float) * (size_t)n * C);
	}
	int fail = 0;
#pragma omp parallel
	{
		float *buf = malloc(sizeof(float) * (3 * (size_t)Im + C));
		if (!buf) {
#pragma omp atomic write
			fail = 1;
		}
#pragma omp for schedule(static)
		for (int i = 0; i < n; i++) {
			if (!buf)
				continue;
			float *g = buf, *u = g + Im, *a = u + Im, *y = a + Im;
			const float *xi = x + (size_t)i * C;
			float *o = out + (size_t)i * C;
			for (int k = 0; k < K; k++) {
				int e = s->topk_idx[i * K + k] - m->expert_begin;
				size_t wo = (size_t)e * Im * C;
				linear_fwd(g, xi, w->experts_gate_proj + wo, 1, C, Im, LIN_SERIAL);
				linear_fwd(u, xi, w->experts_up_proj + wo, 1, C, Im, LIN_SERIAL);
				swiglu_forward(a, g, u, (size_t)Im);
				linear_fwd(y, a, w->experts_down_proj + wo, 1, Im, C, LIN_SERIAL);
				float wk = s->topk_w[i * K + k];
				for (int j = 0; j < C; j++)
					o[j] += wk * y[j];
			}
		}
		free(buf);
	}
	return fail ? -1 : 0;
}

int decode_step(struct moe_model *m, struct latent_cache *lc, const int *tokens, const int *slots,
		const int *positions, int n, float *logits)
{
	const struct model_config *c = &m->cfg;
	assert(m->ep_group == NULL);
	if (m->ep_group || n <= 0 || lc->n_layers != c->num_hidden_layers || lc->kv_lora != c->kv_lora_rank ||
	    lc->dr != c->qk_rope_head_dim)
		return -1;
	if (c->n_routed_experts > 0 &&
	    (m->expert_begin != 0 || m->expert_end != c->n_routed_experts))
		return -1;  /* every expert must be local */

	/* validate against a copy of the lengths before touching the cache */
	int *len = malloc(sizeof(int) * (size_t)lc->n_slots);
	if (!len)
		return -1;
	memcpy(len, lc->len, sizeof(int) * (size_t)lc->n_slots);
	int bad = 0;
	for (int i = 0; i < n && !bad; i++) {
		int sl = slots[i], p = positions[i];
		if (tokens[i] < 0 || tokens[i] >= c->vocab_size || sl < 0 || sl >= lc->n_slots || p < 0 ||
		    p >= lc->max_len || p > len[sl])
			bad = 1;
		else
			len[sl] = p + 1;
	}
	if (bad || ensure_scratch(lc->scratch, c, n)) {
		free(len);
		return -1;
	}

	struct decode_scratch *s = lc->scratch;
	int C = c->hidden_size, V = c->vocab_size, L = c->num_hidden_layers, H = c->num_attention_heads;
	int dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dv = c->v_head_dim, dq = dn + dr;
	int Rq = c->q_lora_rank, Rkv = c->kv_lora_rank, Dkva = Rkv + dr;
	float eps = (float)c->rms_norm_eps, theta = (float)c->rope_theta;
	size_t NC = (size_t)n * C;
	int rc = 0;

	embedding_forward(s->x, tokens, m->w.embed_tokens, n, C);
	for (int l = 0; l < L && !rc; l++) {
		const struct layer_weights *w = &m->w.layers[l];

		/* attention: queries, this step's latents into the cache, absorbed attention */
		rmsnorm_forward(s->ln, s->rstd, s->x, w->input_layernorm, n, C, eps);
		if (Rq > 0) {
			linear_forward(s->qa, s->ln, w->q_a_proj, n, C, Rq);
			rmsnorm_forward(s->qa_n, s->rstd, s->qa, w->q_a_layernorm, n, Rq, eps);
			linear_forward(s->q, s->qa_n, w->q_b_proj, n, Rq, H * dq);
		} else {
			linear_forward(s->q, s->ln, w->q_proj, n, C, H * dq);
		}
		rope_forward(s->q + dn, positions, n, H, H * dq, dq, dr, theta);
		linear_forward(s->kva, s->ln, w->kv_a_proj_with_mqa, n, C, Dkva);
		for (int i = 0; i < n; i++)
			memcpy(s->ckv + (size_t)i * Rkv, s->kva + (size_t)i * Dkva, sizeof(float) * Rkv);
		rope_forward(s->kva + Rkv, positions, n, 1, Dkva, 0, dr, theta);
		rmsnorm_forward(s->ckv_n, s->rstd, s->ckv, w->kv_a_layernorm, n, Rkv, eps);
		for (int i = 0; i < n; i++) {
			size_t at = ((size_t)l * lc->n_slots + slots[i]) * lc->max_len + positions[i];
			memcpy(lc->ckv + at * Rkv, s->ckv_n + (size_t)i * Rkv, sizeof(float) * Rkv);
			memcpy(lc->kpe + at * dr, s->kva + (size_t)i * Dkva + Rkv, sizeof(float) * dr);
		}
		rc = absorbed_attention(c, w, lc, l, s->q, s->att, slots, positions, n);
		linear_forward(s->mid, s->att, w->o_proj, n, H * dv, C);
		vec_add(s->mid, s->x, NC);

		/* feed-forward */
		rmsnorm_forward(s->ln, s->rstd, s->mid, w->post_attention_layernorm, n, C, eps);
		if (mc_layer_is_moe(c, l)) {
			rc = moe_decode(m, w, s, s->out, s->ln, n);
		} else {
			struct mlp_acts ma = { s->g, s->u, s->a };
			mlp_forward(&ma, s->out, s->ln, w->mlp_gate_proj, w->mlp_up_proj, w->mlp_down_proj, n, C,
				    c->intermediate_size);
		}
		for (size_t k = 0; k < NC; k++)
			s->x[k] = s->mid[k] + s->out[k];
	}
	memcpy(lc->len, len, sizeof(int) * (size_t)lc->n_slots);
	free(len);
	if (rc)
		return -1;
	if (logits) {
		rmsnorm_forward(s->ln, s->rstd, s->x, m->w.norm, n, C, eps);
		linear_forward(logits, s->ln, m->w.lm_head, n, C, V);
	}
	return 0;
}
