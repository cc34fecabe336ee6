/*
 * model/config.h - the model's hyper-parameters, in Hugging Face DeepseekV3 key names.
 *
 * Pure data: parsing the JSON file lives in train/config.c, so model/ knows nothing of files.
 */
#ifndef MOE_MODEL_CONFIG_H
#define MOE_MODEL_CONFIG_H

#include <stdbool.h>

enum moe_scoring { MOE_SCORING_SOFTMAX = 0, MOE_SCORING_SIGMOID = 1 };

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
	int bos_token_id;
	int eos_token_id;
	bool tie_word_embeddings;   /* must be false: lm_head is untied */
	bool attention_bias;        /* must be false */
};

static inline int mc_qk_head_dim(const struct model_config *c)
{
	return c->qk_nope_head_dim + c->qk_rope_head_dim;
}

static inline bool mc_layer_is_moe(const struct model_config *c, int layer)
{
	return c->n_routed_experts > 0 && layer >= c->first_k_dense_replace;
}

#endif
