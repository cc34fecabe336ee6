/*
 * model/model.h - the DeepSeek-V2/V3 model (MLA + DeepSeekMoE): parameters, forward, backward.
 *
 * All weights live in one float32 arena, all gradients in a second arena of the same layout, so the
 * optimizer and the collectives see one flat vector.  Each tensor has a Hugging Face DeepseekV3 name and
 * shape ([out, in] for a linear layer; routed experts stacked along a leading [E] axis).
 */
#ifndef MOE_MODEL_H
#define MOE_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "launch/comm.h"
#include "model/config.h"

#define MOE_MAX_NAME 96
#define MOE_MAX_DIMS 3

enum param_kind {
	PARAM_LINEAR = 0,  /* weight matrix: decayed */
	PARAM_NORM,        /* RMSNorm gain: not decayed */
	PARAM_EMBEDDING,   /* input embedding table: not decayed by default */
	PARAM_BUFFER,      /* not trained (e_score_correction_bias): no gradient */
};

struct param {
	char name[MOE_MAX_NAME];
	int ndim;
	int64_t shape[MOE_MAX_DIMS];  /* full (global) shape, as stored in a checkpoint */
	enum param_kind kind;
	int expert_stacked;           /* 1: shape[0] is the routed-expert axis (sliced under expert parallelism) */
	int layer;                    /* -1 for embed/norm/lm_head */
	size_t offset;                /* in floats, into weights/grads (local slice) */
	size_t numel;                 /* local numel (expert slice when expert_stacked) */
};

/* AdamW's decoupled weight decay applies to the matrices; norms and the untrained buffer never decay,
 * the input embedding table only when asked (train.decay_embeddings). */
static inline float param_weight_decay(const struct param *p, float wd, bool decay_embeddings)
{
	return p->kind == PARAM_LINEAR || (p->kind == PARAM_EMBEDDING && decay_embeddings) ? wd : 0.0f;
}

/* The weights of one layer: pointers into the arena (NULL where the variant lacks the tensor). */
struct layer_weights {
	float *input_layernorm;        /* [C] */
	float *q_proj;                 /* [H*dq, C]            q_lora_rank == 0 */
	float *q_a_proj;               /* [q_lora, C]          q_lora_rank > 0 */
	float *q_a_layernorm;          /* [q_lora] */
	float *q_b_proj;               /* [H*dq, q_lora] */
	float *kv_a_proj_with_mqa;     /* [kv_lora + dr, C] */
	float *kv_a_layernorm;         /* [kv_lora] */
	float *kv_b_proj;              /* [H*(dn+dv), kv_lora] */
	float *o_proj;                 /* [C, H*dv] */
	float *post_attention_layernorm; /* [C] */
	/* dense layers */
	float *mlp_gate_proj, *mlp_up_proj, *mlp_down_proj;   /* [I, C], [I, C], [C, I] */
	/* MoE layers */
	float *gate;                   /* [E, C] router */
	float *e_score_correction_bias;/* [E] (buffer) */
	float *experts_gate_proj;      /* [E_local, I_moe, C] */
	float *experts_up_proj;        /* [E_local, I_moe, C] */
	float *experts_down_proj;      /* [E_local, C, I_moe] */
	float *shared_gate_proj, *shared_up_proj, *shared_down_proj; /* [S*I_moe, C], .., [C, S*I_moe] */
};

/* One multi-token-prediction depth besides its decoder layer (model/mtp.c). */
struct mtp_weights {
	float *enorm, *hnorm;          /* [C]: RMSNorm of the embedding of token t+k, of h_{k-1} */
	float *eh_proj;                /* [C, 2C]: their concatenation [enorm(emb) | hnorm(h)] projected */
	float *shared_head_norm;       /* [C]: before the shared lm_head */
};

struct model_weights {
	float *embed_tokens;           /* [V, C] */
	struct layer_weights *layers;  /* [L + D]: the main model's, then the MTP depths' decoder layers */
	float *norm;                   /* [C] */
	float *lm_head;                /* [V, C] */
	struct mtp_weights *mtp;       /* [D] (NULL when D = 0) */
};

struct model_acts;                 /* activation buffers, private to model.c */
struct model_quant;                /* int8 copies of the linear weights (model/quant.h) */
struct lora;                       /* LoRA adapters (model/lora.h) */

/*
 * A loss term of the logits besides the cross-entropy (distillation: train/distill.h), whose value the
 * caller adds to the loss.  model_backward calls grad on chunks of rows [row0, row0 + nrows) of the last
 * forward's logits (as stored: divided by logit_temperature) before the cross-entropy's gradient
 * overwrites them; it writes d(term)/d(those logits) into grad [nrows, V], and the model adds loss_scale
 * times it to the cross-entropy's gradient.  Chunks of at most MODEL_LOGIT_TERM_ROWS rows, so no second
 * [B*T, V] buffer is needed.  Read by the CPU model only (model/cuda's gpu_model_backward does not yet).
 */
#define MODEL_LOGIT_TERM_ROWS 16
struct logit_term {
	void (*grad)(void *ctx, int row0, int nrows, const float *logits, float *grad);
	void *ctx;
};

struct moe_model {
	struct model_config cfg;
	int expert_begin, expert_end;  /* routed experts held by this rank: [begin, end) */
	struct comm_group *ep_group;   /* expert-parallel group exchanging tokens (NULL: all experts local) */
	int n_params;
	struct param *params;
	size_t n_weights;              /* floats in each arena */
	float *weights;
	float *grads;
	struct model_weights w;        /* views into weights */
	struct model_weights g;        /* views into grads (same layout) */
	struct model_acts *acts;       /* sized for the last (B, T) seen */
	/*
	 * NULL, or the int8 copy of the linear weights (model/quant.h) that every CPU forward then reads in
	 * their place (the backward still uses the fp32 weights: attach it for inference only).
	 */
	struct model_quant *quant;
	/*
	 * NULL, or LoRA adapters (model/lora.h) that every CPU forward and backward adds to the linear
	 * layers they adapt.  Owned by the caller (model_free leaves it).
	 */
	struct lora *lora;
	/*
	 * Options of the loss (GRPO sets them; all off after model_create).  token_weights [B*T]: the loss
	 * is sum_n w[n] * CE_n over the targets instead of their mean; model_forward's value uses the
	 * array as it is then, model_backward's gradient as it is then (GRPO sets it from the forward's
	 * per-token losses in between).  logit_temperature: CE_n is taken of softmax(logits / temperature)
	 * (0 or 1: plain), read by model_forward.  route_replay [L][B*T][K], read by model_forward: every
	 * MoE layer routes token n to route_replay[l][n][0..K) instead of its router's top-K (the gate
	 * weights still come from the router's scores of those experts, so the router keeps a gradient).
	 */
	const float *token_weights;
	float logit_temperature;
	const int *route_replay;
	const struct logit_term *logit_term;  /* NULL, or read by model_backward (above) */
	/*
	 * Weight of the multi-token-prediction loss (model/mtp.h; 0 after model_create): when > 0 and the
	 * model has D = num_nextn_predict_layers > 0, a forward with targets and without token_weights or
	 * route_replay also runs the D MTP depths and adds mtp_lambda * last_mtp_loss to the loss.
	 */
	float mtp_lambda;
	/* statistics of the last forward */
	float last_mtp_loss;           /* mean over the D depths of their mean cross-entropy (0: not run) */
	float last_ce_loss;            /* mean cross-entropy over target tokens */
	float last_aux_loss;           /* sequence-wise balance loss, summed over MoE layers */
	int64_t *expert_load;          /* [L + D][E] tokens routed to each expert in the last forward */
};

/* Build the parameter table and allocate arenas for experts [expert_begin, expert_end).  Returns NULL and
 * fills err on failure (a bad shape, out of memory). */
struct moe_model *model_create(const struct model_config *cfg, int expert_begin, int expert_end,
			       char *err, size_t errlen);
void model_free(struct moe_model *m);

/* The parameter table of a whole model (every expert; offsets as in a single-process model) without
 * allocating its weights: what a tool needs to read or write a checkpoint of any size.  n_params entries,
 * free() it; NULL and err filled on a bad shape or out of memory. */
struct param *model_param_table(const struct model_config *cfg, int *n_params, char *err, size_t errlen);

/* Deterministic initialisation: every tensor (every expert of a stacked one) draws from its own stream,
 * seeded by (seed, name, expert), so any expert slicing gives the same weights. */
void model_init_weights(struct moe_model *m, uint64_t seed);

/* Parameter counts for a config, without allocating: total, and activated per token the way DeepSeek
 * counts it, of the main model (the MTP depths left out, as DeepSeek's 671B of V3 leaves out its 14B);
 * counts it (routed experts: K of E; the input embedding table and the routers excluded). */
void model_count_params(const struct model_config *cfg, int64_t *total, int64_t *activated);
/* Model FLOPs of a training step (forward + backward) per token at sequence length T: 6 x activated
 * (as model_count_params) + causal attention (mean context (T + 1) / 2).  See model.c for what is counted. */
double model_train_flops_per_token(const struct model_config *cfg, int T);

const struct param *model_find_param(const struct moe_model *m, const char *name);

/* Forward over B sequences of T tokens.  targets may be NULL (no loss).  Returns the training loss
 * (mean cross-entropy + aux balance loss [+ mtp_lambda * MTP loss]) or 0 when targets is NULL.  The logits of the last call stay
 * readable through model_logits() until the next forward. */
float model_forward(struct moe_model *m, const int *inputs, const int *targets, int B, int T);
const float *model_logits(const struct moe_model *m);   /* [B*T, V] */

/* Backward of loss_scale * (the last forward's loss), which must have had targets: accumulates into
 * m->grads (loss_scale = 1/grad_accum for gradient accumulation).  Overwrites the logits. */
void model_backward(struct moe_model *m, float loss_scale);
/* CE_n = -log p(target_n) of each of the last forward's B*T tokens (0 where the target is < 0), at
 * logit_temperature: the per-token log-probabilities GRPO needs.  NULL before a forward with targets. */
const float *model_token_losses(const struct moe_model *m);
/* Number of targets >= 0 in the last forward. */
int model_count_targets(const struct moe_model *m);
void model_zero_grad(struct moe_model *m);
/* A model that only runs forwards (a distillation teacher): frees the gradient arena; model_backward and
 * model_zero_grad must not be called on it afterwards, unless it has LoRA adapters (model/lora.h): then
 * the base is frozen and the backward computes the adapters' gradients only. */
void model_drop_grads(struct moe_model *m);

#endif
