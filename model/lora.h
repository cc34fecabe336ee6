/*
 * model/lora.h - LoRA adapters (Hu et al. 2021, as PEFT implements them) on the model's linear layers.
 *
 * For a targeted weight W [out, in]:  y = W x + (alpha / rank) * B (A drop(x)),  A [rank, in] drawn
 * like PEFT's kaiming-uniform (U(-1/sqrt(in), 1/sqrt(in)), seeded per tensor and expert), B [out, rank]
 * zero, so the adapted model starts as the base model.  drop() is inverted dropout on the adapter's
 * input only (lora.dropout), applied while training; its mask is a hash of (seed, step, adapter, expert,
 * row, column), so the backward regenerates it instead of storing it and the run is reproducible.
 *
 * Targets are Hugging Face module names: q_a_proj, q_b_proj, q_proj, kv_a_proj_with_mqa, kv_b_proj,
 * o_proj (attention), gate_proj, up_proj, down_proj (the dense MLPs and the shared experts), and
 * experts.gate_proj, experts.up_proj, experts.down_proj for the routed experts (PEFT's name of those
 * modules ends in the same word, but adapting every expert multiplies the adapter's size by E, so they
 * are opt-in here).  A routed expert's adapters are stacked along the expert axis like its weights and
 * sliced the same way under expert parallelism.
 *
 * The adapters present themselves as a parameter table of their own (struct lora.view: a moe_model
 * holding only params, weights, grads and the expert slice), so the gradient reduction, AdamW's
 * segments and the checkpoint module handle them as they handle a model.  Tensor names are PEFT's
 * without its "base_model.model." prefix: model.layers.N.self_attn.q_a_proj.lora_A.weight, and for the
 * stacked experts model.layers.N.mlp.experts.gate_proj.lora_A.weight [E, rank, in].
 *
 * The base model reads its adapters through moe_model.lora (NULL: none); the base weights are frozen
 * (the caller drops their gradient arena with model_drop_grads, and gives AdamW only the adapters).
 */
#ifndef MOE_MODEL_LORA_H
#define MOE_MODEL_LORA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/model.h"

enum lora_target {
	LORA_Q_A_PROJ, LORA_Q_B_PROJ, LORA_Q_PROJ, LORA_KV_A_PROJ, LORA_KV_B_PROJ, LORA_O_PROJ,
	LORA_GATE_PROJ, LORA_UP_PROJ, LORA_DOWN_PROJ,
	LORA_EXPERTS_GATE_PROJ, LORA_EXPERTS_UP_PROJ, LORA_EXPERTS_DOWN_PROJ,
	LORA_N_TARGETS
};

/* The target's name (as in lora.targets) */
const char *lora_target_name(enum lora_target t);
/* The target of a name, or -1 */
int lora_target_parse(const char *name);
/* "q_a_proj, q_b_proj, ...": every name, for messages */
const char *lora_target_list(void);

struct lora_spec {
	int rank;              /* > 0 */
	double alpha;          /* scale = alpha / rank */
	double dropout;        /* [0, 1) on the adapter's input while training */
	unsigned targets;      /* bit (1u << enum lora_target) per adapted module */
};

struct lora_adapter {
	enum lora_target target;
	int layer;
	const float *base;     /* the adapted weight in the model (a stacked one: its first local expert) */
	size_t base_stride;    /* floats between two experts' weights (0: not stacked) */
	int n_experts;         /* local experts (1: not stacked) */
	int in, out;
	int pa, pb;            /* the indices of lora_A and lora_B in view.params */
};

struct lora {
	struct lora_spec spec;
	float scale;           /* alpha / rank */
	int n;
	struct lora_adapter *ad;
	struct moe_model view; /* the adapters' parameter table and arenas (see above) */
	/*
	 * enabled: false runs the base model alone (GRPO's reference policy, without a copy of the
	 * weights).  training: dropout applies; dropout_seed and dropout_step pick its masks (the trainer
	 * sets dropout_step before each forward; its backward must follow with the same value).
	 */
	bool enabled, training;
	uint64_t dropout_seed, dropout_step;
};

/* The adapters of spec for model m (its expert slice), zeroed (call lora_init_weights), grads allocated.
 * NULL and err filled when a target does not exist in this model (q_proj with q_lora_rank > 0, experts
 * without routed experts, ...) or out of memory. */
struct lora *lora_create(const struct moe_model *m, const struct lora_spec *spec, char *err, size_t errlen);
void lora_free(struct lora *l);
/* A: kaiming-uniform like PEFT, per (seed, tensor name, expert), so any expert slicing draws the same;
 * B = 0 */
void lora_init_weights(struct lora *l, uint64_t seed);
void lora_zero_grad(struct lora *l);

/* The adapters' trainable floats on this rank (each has a gradient and two AdamW moments), for the
 * memory report against the base's n_weights. */
size_t lora_trainable_floats(const struct lora *l);

/*
 * The hooks of model_linear and model_linear_bwd: when w is an adapted weight (or one expert's block of
 * a stacked one), y += scale * B A drop(x); and its backward: dx += d/dx (dx is written by the base first),
 * dA, dB accumulate.  Anything else: nothing.  flags as linear_fwd's (LIN_SERIAL inside a task).
 */
void lora_forward(const struct lora *l, const float *w, float *y, const float *x, int N, int in, int out,
		  int flags);
void lora_backward(const struct lora *l, const float *w, float *dx, const float *dy, const float *x, int N,
		   int in, int out, int flags);

/*
 * The adapter of weight w (one expert's block of a stacked one): its A [rank, in] and B [out, rank], or
 * 0 when w has none (or the adapters are switched off).  For the decoder's absorbed attention, which
 * uses kv_b_proj by heads instead of as one product.
 */
int lora_factors(const struct lora *l, const float *w, const float **A, const float **B);

/* W += scale * B A for every adapter, into m's weights (m holds the same expert slice as l was made for). */
void lora_merge(const struct lora *l, struct moe_model *m);

#endif
