/*
 * model/layers.h - internal to model/: the saved activations of one forward and the layer functions
 * (MLA in mla.c, SwiGLU MLP and DeepSeekMoE in moe.c) that model.c strings together.
 */
#ifndef MOE_MODEL_LAYERS_H
#define MOE_MODEL_LAYERS_H

#include "model/model.h"
#include "model/moe_dispatch.h"
#include "model/ops.h"
#include "model/vmath.h"


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
	const int *replay;            /* [N, K] experts to use instead of the router's (NULL: route) */
	int *offsets;                 /* [E_local + 1]: rows of each local expert in the sorted order */
	int *row_pair;                /* [N*K] (token, slot) pair n*K + k of each sorted row */
	int *tasks, n_tasks;          /* [E_local + 1]: the parallel tasks, -1 the shared expert */
	int *row_of;                  /* [N*K] sorted row of (token n, slot k), -1 if not local */
	float *xe, *ye;               /* [N*K, C] expert inputs (gathered) and outputs */
	struct mlp_acts e;            /* [N*K, I_moe] */
	struct mlp_acts shared;       /* [N, S*I_moe] */
	/*
	 * Expert parallelism (m->ep_group set): xe and ye hold this rank's rows in send order; the rows
	 * the local experts compute arrive from the whole ep group into the buffers below, R of them,
	 * grown as needed (never per step once the loads settle).
	 */
	struct moe_dispatch disp;
	size_t cap_R;
	float *xr, *yr;               /* [R, C] */
	struct mlp_acts er;           /* [R, I_moe] */
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
	float *datt, *dq, *dk, *dv, *dkv, *dckv_n, *dkva, *dqa_n, *dqa;
	float *dg, *du;               /* [max(N I, N K I_moe)] */
	float *dg_shared, *du_shared; /* [N S I_moe] */
	float *dye, *dxe, *dlogits, *dscores, *dtopk_w;
	/* expert parallelism: the experts' side, [R, C] and [R, I_moe], grown as needed */
	size_t cap_R;
	float *dyr, *dxr, *dgr, *dur;
};

/* Where a model_acts' buffers come from: host memory (calloc) for the CPU model, device memory for the
 * GPU one (model/cuda/model_cuda.cu); alloc returns zeroed memory or NULL. */
struct acts_memory {
	void *(*alloc)(size_t bytes);
	void (*release)(void *p);
	int logit_rows;               /* rows of logits held at once: 0 (or >= N) all N, else a chunk (GPU) */
};

/* One multi-token-prediction depth k of a forward (model/mtp.c): its rows n = b*T + i. */
struct mtp_depth_acts {
	int *tok;                     /* [N] token t_{i+k} embedded at row n (0 past the sequence) */
	int *tgt;                     /* [N] t_{i+k+1}, the depth's target (-1: none) */
	float *emb, *e_n, *e_rstd;    /* [N, C] embedding, its enorm, [N] */
	float *h_n, *h_rstd;          /* [N, C] hnorm(h_{k-1}), [N] */
	float *cat;                   /* [N, 2C] [e_n | h_n] */
	float *x, *mid, *out;         /* [N, C] eh_proj's output (the layer's input), after attention, h_k */
	float *lnf, *lnf_rstd;        /* shared_head.norm(h_k) */
	float *logits, *losses;       /* [N, V], [N] */
	struct layer_acts la;
};

struct mtp_acts {
	int active;                   /* the last forward ran the depths (model_backward then does too) */
	struct mtp_depth_acts *d;     /* [D] */
	float *dh;                    /* [N, C] d(loss)/d(h_0) of the last mtp_backward, for model_backward */
	float *dcarry, *dcat, *de;    /* backward scratch: d(h_k), [N, 2C], [N, C] */
};

struct model_acts {
	struct acts_memory mem;
	int B, T;
	int *pos;                     /* [N] position of each token */
	int *targets;                 /* [N] copy (-1: none) */
	int *inputs;                  /* [N] copy */
	int has_targets;
	float *resid;                 /* [L+1, N, C]: the residual stream entering each layer, then the last */
	float *h_mid;                 /* [L, N, C]: after attention */
	struct layer_acts *layers;
	float *lnf, *lnf_rstd, *logits, *losses;
	int logit_rows;               /* rows logits holds: N, or a chunk the GPU model walks the rows in */
	float temperature;            /* the loss's logit temperature (1: plain) */
	struct grad_scratch gs;
	struct mtp_acts *mtp;         /* NULL until a forward runs the MTP depths (model/mtp.c) */
	int n_allocs;
	void *allocs[1024];
};

/* Every buffer of one (B, T), from mem (pos is left zero: the caller fills it).  The expert-parallel
 * buffers are grown later, on the host. */
struct model_acts *model_acts_create(const struct moe_model *m, int B, int T, const struct acts_memory *mem);
void model_acts_destroy(const struct model_config *c, struct model_acts *a);
void model_acts_free(struct moe_model *m);   /* m->acts, then NULL */
/* One zeroed buffer from a's memory, freed with a (exits when out of memory, as model_forward would) */
void *model_acts_alloc(struct model_acts *a, size_t bytes);
/* The buffers of layer l's activations over N rows, from a's memory */
void model_layer_acts_alloc(const struct moe_model *m, struct model_acts *a, struct layer_acts *la,
			    int l, size_t N);

/*
 * One decoder layer l (of the main model or an MTP depth): out = mid + FFN(norm(mid)), mid = x +
 * MLA(norm(x)); returns its balance loss and counts its routing in m->expert_load[l].  The backward
 * takes d(out) in s->dres and leaves d(x) there, accumulating the weight gradients.
 */
float decoder_layer_forward(struct moe_model *m, int l, struct layer_acts *la, float *out, float *mid,
			    const float *x, const int *pos, int B, int T);
void decoder_layer_backward(struct moe_model *m, int l, struct layer_acts *la, struct grad_scratch *s,
			    const float *mid, const float *x, const int *pos, int B, int T, float loss_scale);

/*
 * The layer backwards (mla_backward, mlp_backward, moe_backward) WRITE dx: they do not accumulate into it.
 * Weight gradients accumulate.
 */
/* The forwards read m's int8 weights when it has them (m->quant, model/quant.h). */
void mla_forward(const struct moe_model *m, const struct layer_weights *w, struct mla_acts *a,
		 float *out, const float *x, const int *pos, int B, int T);
void mla_backward(const struct moe_model *m, const struct layer_weights *w,
		  const struct layer_weights *g, const struct mla_acts *a, struct grad_scratch *s,
		  float *dx, const float *dout, const float *x, const int *pos, int B, int T);

void mlp_forward(const struct moe_model *m, struct mlp_acts *a, float *y, const float *x, const float *wg,
		 const float *wu, const float *wd, int rows, int C, int I);
void mlp_backward(const struct moe_model *m, float *dx, float *dwg, float *dwu, float *dwd, float *dg,
		  float *du, const float *dy, const float *x, const struct mlp_acts *a, const float *wg,
		  const float *wu, const float *wd, int rows, int C, int I);

/* The router's parameters (ops.h) from the config: what moe.c and the GPU model route with. */
struct router_params moe_router_params(const struct model_config *c);

/*
 * Stable counting sort of the (token, slot) pairs i = n*K + k by expert: load[E] = pairs per expert (all
 * E), offsets[El + 1] = the first sorted row of each local expert e0 + e, row_pair[r] = the pair of sorted
 * row r, row_of[i] = the sorted row of pair i (-1: an expert outside [e0, e0 + El)).  fill: El ints of
 * scratch.  Host arrays.
 */
void moe_group_rows(const int *topk_idx, int N, int K, int E, int e0, int El, int64_t *load, int *offsets,
		    int *row_pair, int *row_of, int *fill);

/* Returns the layer's balance loss (0 when aux_loss_alpha is 0); fills load[E] with tokens per expert. */
float moe_forward(const struct moe_model *m, const struct layer_weights *w, struct moe_acts *a,
		  float *out, const float *x, int B, int T, int64_t *load);
/* the expert-parallel buffers of moe_acts (the rest is freed with the activations) */
void moe_acts_free_ep(struct moe_acts *a);
void moe_backward(const struct moe_model *m, const struct layer_weights *w,
		  const struct layer_weights *g, struct moe_acts *a, struct grad_scratch *s,
		  float *dx, const float *dout, const float *x, int B, int T, float loss_scale);

/*
 * CPU-internal variants of ops.h (in ops_cpu.c) for the layers.
 *
 * linear_fwd / linear_bwd are linear_forward / linear_backward with flags: LIN_SET_DX writes dx instead of
 * accumulating into it (dw always accumulates); LIN_SERIAL issues each product as one single-threaded
 * call, for the tasks of the layers' own parallel regions (the same call whatever the thread count).
 */
enum { LIN_SET_DX = 1, LIN_SERIAL = 2, LIN_ACC = 4 };   /* LIN_ACC: linear_fwd adds into y */
void linear_fwd(float *y, const float *x, const float *w, int N, int in, int out, int flags);
void linear_bwd(float *dx, float *dw, const float *dy, const float *x, const float *w, int N, int in, int out,
		int flags);
/*
 * linear_bwd of a model weight w, its gradient dw (NULL: frozen) plus, when the model has LoRA adapters on
 * w (model/lora.h), their backward: dx gets their term too, their gradients accumulate.
 */
void model_linear_bwd(const struct moe_model *m, float *dx, float *dw, const float *dy, const float *x,
		      const float *w, int N, int in, int out, int flags);
/* The _set variants WRITE their outputs instead of accumulating, so the layers skip zeroing passes. */
/* dx rows have stride ldx; dw still accumulates */
void rmsnorm_backward_set(float *dx, int ldx, float *dw, const float *dy, const float *x, const float *w,
			  const float *rstd, int N, int C);
void attention_backward_set(float *grad_q, float *grad_k, float *grad_v, const float *dout,
			    const float *out, const float *lse, const float *q, const float *k,
			    const float *v, int B, int T, int H, int dq_dim, int dv_dim, float scale);
/* dgate may be dout (in place) */
void swiglu_backward_set(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
			 size_t n);

/*
 * The cross-entropy term of the loss (model.h, shared with the GPU model): sum_n w[n] CE_n over the
 * targets with token weights w, else their mean (0 without targets).
 */
float ce_term(const float *losses, const int *targets, const float *w, int N);
/*
 * The factor of a target row's d(loss_scale * that term)/d(raw logits), before its token weight:
 * loss_scale with token weights, else loss_scale / the target count; over the temperature, as the
 * logits buffer holds logits / temperature.
 */
float ce_row_scale(const int *targets, const float *w, int N, float loss_scale, float temperature);

#endif
