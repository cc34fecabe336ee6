/*
 * model/config.h - the model's hyper-parameters, in Hugging Face DeepseekV3 key names.
 *
 * Pure data: parsing the JSON file lives in train/config.c, so model/ knows nothing of files.
 */
#ifndef MOE_MODEL_CONFIG_H
#define MOE_MODEL_CONFIG_H

#include <stdbool.h>

enum moe_scoring { MOE_SCORING_SOFTMAX = 0, MOE_SCORING_SIGMOID = 1 };

/* Largest qk_rope_head_dim (the frequency table is a fixed-size array: a CUDA kernel argument). */
#define MC_ROPE_MAX_DIM 256

enum rope_type { ROPE_DEFAULT = 0, ROPE_YARN = 1 };

/*
 * HF rope_scaling (rope_parameters in transformers 5), read only when type is ROPE_YARN.  Every number
 * left 0 (null or absent in the file) takes transformers' default, so a zeroed struct is "no scaling"
 * and a zeroed YaRN struct is transformers' YaRN defaults.  The math: model/rope.h.
 */
struct rope_scaling {
	enum rope_type type;
	double factor;                          /* 0: max_position_embeddings / original_max_... */
	int original_max_position_embeddings;   /* 0: max_position_embeddings */
	double beta_fast;                       /* 0: 32 */
	double beta_slow;                       /* 0: 1 */
	double mscale;                          /* 0: absent */
	double mscale_all_dim;                  /* 0: absent (no softmax-scale correction) */
	double attention_factor;                /* 0: from factor, mscale and mscale_all_dim */
	bool no_truncate;                       /* HF "truncate": false (default true: floor/ceil the
						   correction range) */
};

struct model_config {
	int vocab_size;
	int hidden_size;
	int intermediate_size;      /* dense SwiGLU width (layers < first_k_dense_replace) */
	int moe_intermediate_size;  /* width of one routed (and one shared) expert */
	int num_hidden_layers;
	int num_attention_heads;
	int num_key_value_heads;    /* HF key; MLA requires it to equal num_attention_heads */
	int n_shared_experts;
	int n_routed_experts;
	double routed_scaling_factor;
	int kv_lora_rank;
	int q_lora_rank;            /* 0: plain q_proj */
	int qk_rope_head_dim;
	int qk_nope_head_dim;
	int v_head_dim;
	int n_group;
	int topk_group;
	int num_experts_per_tok;
	int moe_layer_freq;         /* only 1 is supported (every layer after the dense ones) */
	int first_k_dense_replace;
	bool norm_topk_prob;
	enum moe_scoring scoring_func;
	double aux_loss_alpha;      /* sequence-wise balance loss weight (0: off) */
	bool seq_aux;
	int max_position_embeddings;
	double initializer_range;
	double rms_norm_eps;
	double rope_theta;
	struct rope_scaling rope_scaling;
	int bos_token_id;
	int eos_token_id;
	bool tie_word_embeddings;   /* must be false: lm_head is untied */
	bool attention_bias;        /* must be false */
	/*
	 * D, DeepSeek-V3's multi-token prediction depths (model/mtp.h): D more decoder layers, stored as
	 * layers num_hidden_layers .. num_hidden_layers + D - 1 (Hugging Face's model.layers.{L+k-1}).
	 */
	int num_nextn_predict_layers;
};

static inline int mc_qk_head_dim(const struct model_config *c)
{
	return c->qk_nope_head_dim + c->qk_rope_head_dim;
}

/* The decoder layers with weights: the main model's, then the D multi-token-prediction layers. */
static inline int mc_n_layers(const struct model_config *c)
{
	return c->num_hidden_layers + c->num_nextn_predict_layers;
}

static inline bool mc_layer_is_moe(const struct model_config *c, int layer)
{
	return c->n_routed_experts > 0 && layer >= c->first_k_dense_replace;
}

#endif
