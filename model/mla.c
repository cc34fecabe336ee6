/*
 * model/mla.c - Multi-head Latent Attention (DeepSeek-V2 section 2.1), forward and backward.
 *
 *   q   = q_b(RMSNorm(q_a x))  or  q_proj x             -> H heads of [q_nope dn | q_pe dr]
 *   [c_kv | k_pe] = kv_a_proj_with_mqa x;  kv = kv_b(RMSNorm(c_kv)) -> H heads of [k_nope dn | v dv]
 *   RoPE on q_pe and the one shared k_pe;  k = [k_nope | k_pe];  causal softmax(q k^T * scale) v
 *   (scale = dq^-0.5, times YaRN's mscale^2; the frequencies and scales: model/rope.h)
 *   out = o_proj(concat heads)
 */
#include <string.h>

#include "model/layers.h"
#include "model/quant.h"
#include "model/rope.h"

struct mla_dims {
	int C, H, dn, dr, dv, dq, Rq, Rkv, N;
};

static struct mla_dims mla_dims(const struct model_config *c, int N)
{
	struct mla_dims d = {
		.C = c->hidden_size, .H = c->num_attention_heads, .dn = c->qk_nope_head_dim,
		.dr = c->qk_rope_head_dim, .dv = c->v_head_dim, .dq = mc_qk_head_dim(c),
		.Rq = c->q_lora_rank, .Rkv = c->kv_lora_rank, .N = N,
	};
	return d;
}

/* k[n,h] = [kv[n,h,:dn] | k_pe[n]],  v[n,h] = kv[n,h,dn:] */
static void assemble_kv(const struct mla_dims *d, float *k, float *v, const float *kv, const float *kva)
{
	int dkv = d->dn + d->dv;
#pragma omp parallel for schedule(static)
	for (int n = 0; n < d->N; n++) {
		const float *kpe = kva + (size_t)n * (d->Rkv + d->dr) + d->Rkv;
		for (int h = 0; h < d->H; h++) {
			const float *src = kv + ((size_t)n * d->H + h) * dkv;
			float *kd = k + ((size_t)n * d->H + h) * d->dq;
			memcpy(kd, src, sizeof(float) * d->dn);
			memcpy(kd + d->dn, kpe, sizeof(float) * d->dr);
			memcpy(v + ((size_t)n * d->H + h) * d->dv, src + d->dn, sizeof(float) * d->dv);
		}
	}
}

void mla_forward(const struct moe_model *m, const struct layer_weights *w, struct mla_acts *a,
		 float *out, const float *x, const int *pos, int B, int T)
{
	const struct model_config *c = &m->cfg;
	struct mla_dims d = mla_dims(c, B * T);
	float eps = (float)c->rms_norm_eps;
	int N = d.N, Dkva = d.Rkv + d.dr;
	struct rope_freqs rf;

	mc_rope_freqs(c, &rf);
	if (d.Rq > 0) {
		model_linear(m, a->qa, x, w->q_a_proj, N, d.C, d.Rq, 0);
		rmsnorm_forward(a->qa_n, a->qa_rstd, a->qa, w->q_a_layernorm, N, d.Rq, eps);
		model_linear(m, a->q, a->qa_n, w->q_b_proj, N, d.Rq, d.H * d.dq, 0);
	} else {
		model_linear(m, a->q, x, w->q_proj, N, d.C, d.H * d.dq, 0);
	}
	rope_forward(a->q + d.dn, pos, N, d.H, d.H * d.dq, d.dq, d.dr, rf.inv_freq, rf.attention_factor);

	model_linear(m, a->kva, x, w->kv_a_proj_with_mqa, N, d.C, Dkva, 0);
	for (int n = 0; n < N; n++)
		memcpy(a->ckv + (size_t)n * d.Rkv, a->kva + (size_t)n * Dkva, sizeof(float) * d.Rkv);
	rope_forward(a->kva + d.Rkv, pos, N, 1, Dkva, 0, d.dr, rf.inv_freq, rf.attention_factor);  /* k_pe */
	rmsnorm_forward(a->ckv_n, a->ckv_rstd, a->ckv, w->kv_a_layernorm, N, d.Rkv, eps);
	model_linear(m, a->kv, a->ckv_n, w->kv_b_proj, N, d.Rkv, d.H * (d.dn + d.dv), 0);
	assemble_kv(&d, a->k, a->v, a->kv, a->kva);

	attention_forward(a->att, a->lse, a->q, a->k, a->v, B, T, d.H, d.dq, d.dv, mc_softmax_scale(c));
	model_linear(m, out, a->att, w->o_proj, N, d.H * d.dv, d.C, 0);
}

/* the transpose of assemble_kv: dkv from dk (nope part) and dv; dk_pe, summed over the heads, written to
 * dkpe (row stride ldpe) */
static void disassemble_dkv(const struct mla_dims *d, float *dkv, float *dkpe, int ldpe, const float *dk,
			    const float *dv)
{
	int dkvw = d->dn + d->dv;
#pragma omp parallel for schedule(static)
	for (int n = 0; n < d->N; n++) {
		float *dpe = dkpe + (size_t)n * ldpe;
		memset(dpe, 0, sizeof(float) * d->dr);
		for (int h = 0; h < d->H; h++) {
			const float *dkh = dk + ((size_t)n * d->H + h) * d->dq;
			float *dst = dkv + ((size_t)n * d->H + h) * dkvw;
			memcpy(dst, dkh, sizeof(float) * d->dn);
			memcpy(dst + d->dn, dv + ((size_t)n * d->H + h) * d->dv, sizeof(float) * d->dv);
			for (int i = 0; i < d->dr; i++)
				dpe[i] += dkh[d->dn + i];
		}
	}
}

/* writes dx */
void mla_backward(const struct moe_model *m, const struct layer_weights *w,
		  const struct layer_weights *g, const struct mla_acts *a, struct grad_scratch *s,
		  float *dx, const float *dout, const float *x, const int *pos, int B, int T)
{
	const struct model_config *c = &m->cfg;
	struct mla_dims d = mla_dims(c, B * T);
	int N = d.N, Dkva = d.Rkv + d.dr;
	struct rope_freqs rf;

	mc_rope_freqs(c, &rf);
	model_linear_bwd(m, s->datt, g->o_proj, dout, a->att, w->o_proj, N, d.H * d.dv, d.C, LIN_SET_DX);
	attention_backward_set(s->dq, s->dk, s->dv, s->datt, a->att, a->lse, a->q, a->k, a->v, B, T, d.H,
			       d.dq, d.dv, mc_softmax_scale(c));

	/* kv path: kv_b, its norm, then kv_a (whose output gradient is [dc_kv | dk_pe] = dkva) */
	disassemble_dkv(&d, s->dkv, s->dkva + d.Rkv, Dkva, s->dk, s->dv);
	rope_backward(s->dkva + d.Rkv, pos, N, 1, Dkva, 0, d.dr, rf.inv_freq, rf.attention_factor);
	model_linear_bwd(m, s->dckv_n, g->kv_b_proj, s->dkv, a->ckv_n, w->kv_b_proj, N, d.Rkv,
			 d.H * (d.dn + d.dv), LIN_SET_DX);
	rmsnorm_backward_set(s->dkva, Dkva, g->kv_a_layernorm, s->dckv_n, a->ckv, w->kv_a_layernorm,
			     a->ckv_rstd, N, d.Rkv);
	model_linear_bwd(m, dx, g->kv_a_proj_with_mqa, s->dkva, x, w->kv_a_proj_with_mqa, N, d.C, Dkva,
			 LIN_SET_DX);

	/* q path */
	rope_backward(s->dq + d.dn, pos, N, d.H, d.H * d.dq, d.dq, d.dr, rf.inv_freq, rf.attention_factor);
	if (d.Rq > 0) {
		model_linear_bwd(m, s->dqa_n, g->q_b_proj, s->dq, a->qa_n, w->q_b_proj, N, d.Rq, d.H * d.dq,
				 LIN_SET_DX);
		rmsnorm_backward_set(s->dqa, d.Rq, g->q_a_layernorm, s->dqa_n, a->qa, w->q_a_layernorm,
				     a->qa_rstd, N, d.Rq);
		model_linear_bwd(m, dx, g->q_a_proj, s->dqa, x, w->q_a_proj, N, d.C, d.Rq, 0);
	} else {
		model_linear_bwd(m, dx, g->q_proj, s->dq, x, w->q_proj, N, d.C, d.H * d.dq, 0);
	}
}
