/*
 * model/layers.h - internal to model/: the saved activations of one forward and the layer functions
 * (MLA in mla.c, SwiGLU MLP and DeepSeekMoE in moe.c) that model.c strings together.
 */
#ifndef MOE_MODEL_LAYERS_H
#define MOE_MODEL_LAYERS_H

#include "model/model.h"
#include "model/ops.h"

struct mla_acts {
	float *qa, *qa_n, *qa_rstd;   /* q_lora_rank > 0 only */
	float *q;                     /* [N, H, dq], q_pe roped */
	float *kva;                   /* [N, kv_lora + dr] */
	float *ckv, *ckv_n, *ckv_rstd;/* latent and its norm: what generation caches (with k_pe) */
	float *kv;                    /* [N, H, dn + dv] */
	float *k, *v;                 /* [N, H, dq], [N, H, dv] */
	float *att, *lse;             /* [N, H, dv], [B, H, T] */
};

struct mlp_acts {
	float *g, *u, *a;             /* gate, up, silu(gate) * up */
};

struct moe_acts {
	float *logits, *scores;       /* [N, E] */
	int *topk_idx;                /* [N, K] */
	float *topk_w;                /* [N, K] */
	int *offsets;                 /* [E_local + 1]: rows of each local expert in the sorted order */
	int *row_token;               /* [N*K] token of each sorted row */
	int *row_of;                  /* [N*K] sorted row of (token n, slot k), -1 if not local */
	float *xe, *ye;               /* [N*K, C] expert inputs (gathered) and outputs */
	struct mlp_acts e;            /* [N*K, I_moe] */
	struct mlp_acts shared;       /* [N, S*I_moe] */
};

struct layer_acts {
	float *ln1, *ln1_rstd, *ln2, *ln2_rstd;
	struct mla_acts mla;
	struct mlp_acts mlp;
	struct moe_acts moe;
};

/* Backward scratch, shared by all layers. */
struct grad_scratch {
	float *dres, *dln;
	float *datt, *dq, *dk, *dv, *dkv, *dkpe, *dckv_n, *dckv, *dkva, *dqa_n, *dqa;
	float *dg, *du, *da;
	float *dye, *dxe, *dlogits, *dscores, *dtopk_w;
};

struct model_acts {
	int B, T;
	int *pos;                     /* [N] position of each token */
	int *targets;                 /* [N] copy (-1: none) */
	int *inputs;                  /* [N] copy */
	int has_targets;
	float *resid;                 /* [L+1, N, C]: the residual stream entering each layer, then the last */
	float *h_mid;                 /* [L, N, C]: after attention */
	struct layer_acts *layers;
	float *lnf, *lnf_rstd, *logits, *losses;
	struct grad_scratch gs;
	int n_allocs;
	void *allocs[1024];
};

void model_acts_free(struct moe_model *m);

void mla_forward(const struct model_config *c, const struct layer_weights *w, struct mla_acts *a,
		 float *out, const float *x, const int *pos, int B, int T);
void mla_backward(const struct model_config *c, const struct layer_weights *w,
		  const struct layer_weights *g, const struct mla_acts *a, struct grad_scratch *s,
		  float *dx, const float *dout, const float *x, const int *pos, int B, int T);

void mlp_forward(struct mlp_acts *a, float *y, const float *x, const float *wg, const float *wu,
		 const float *wd, int rows, int C, int I);
void mlp_backward(float *dx, float *dwg, float *dwu, float *dwd, float *dg, float *du, float *da,
		  const float *dy, const float *x, const struct mlp_acts *a, const float *wg,
		  const float *wu, const float *wd, int rows, int C, int I);

/* Returns the layer's balance loss (0 when aux_loss_alpha is 0); fills load[E] with tokens per expert. */
float moe_forward(const struct moe_model *m, const struct layer_weights *w, struct moe_acts *a,
		  float *out, const float *x, int B, int T, int64_t *load);
void moe_backward(const struct moe_model *m, const struct layer_weights *w,
		  const struct layer_weights *g, const struct moe_acts *a, struct grad_scratch *s,
		  float *dx, const float *dout, const float *x, int B, int T, float loss_scale);

#endif
