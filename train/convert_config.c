/*
 * train/convert_config.c - a Hugging Face config.json and the run configuration, both ways, for
 * train/convert.c (see convert.h): transformers' defaults for the keys a file lacks, rope_parameters,
 * the bookkeeping keys dropped; and the DeepseekV3 config.json written for a model.
 */
#include "train/convert.h"
#include "launch/errmsg.h"

#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "model/rope.h"
#include "train/convert_fp8.h"

/* ---------------------------------------------------------------- config.json -> run_config */

/* transformers' defaults (DeepseekV3Config / DeepseekV2Config) for keys a config.json lacks. */
static const char v3_defaults[] =
	"{\"vocab_size\": 129280, \"hidden_size\": 7168, \"intermediate_size\": 18432, "
	"\"moe_intermediate_size\": 2048, \"num_hidden_layers\": 61, \"num_attention_heads\": 128, "
	"\"num_key_value_heads\": 128, \"n_shared_experts\": 1, \"n_routed_experts\": 256, "
	"\"routed_scaling_factor\": 2.5, \"kv_lora_rank\": 512, \"q_lora_rank\": 1536, "
	"\"qk_rope_head_dim\": 64, \"v_head_dim\": 128, \"qk_nope_head_dim\": 128, \"n_group\": 8, "
	"\"topk_group\": 4, \"num_experts_per_tok\": 8, \"first_k_dense_replace\": 3, "
	"\"norm_topk_prob\": true, \"max_position_embeddings\": 4096, \"initializer_range\": 0.02, "
	"\"rms_norm_eps\": 1e-6, \"bos_token_id\": 0, \"eos_token_id\": 1, "
	"\"tie_word_embeddings\": false, \"rope_theta\": 10000.0, \"attention_bias\": false, "
	"\"scoring_func\": \"sigmoid\", \"moe_layer_freq\": 1}";

static const char v2_defaults[] =
	"{\"vocab_size\": 102400, \"hidden_size\": 4096, \"intermediate_size\": 11008, "
	"\"moe_intermediate_size\": 1407, \"num_hidden_layers\": 32, \"num_attention_heads\": 32, "
	"\"num_key_value_heads\": null, \"n_shared_experts\": 2, \"n_routed_experts\": 64, "
	"\"routed_scaling_factor\": 1.0, \"kv_lora_rank\": 512, \"q_lora_rank\": 1536, "
	"\"qk_rope_head_dim\": 64, \"v_head_dim\": 128, \"qk_nope_head_dim\": 128, \"n_group\": null, "
	"\"topk_group\": null, \"num_experts_per_tok\": null, \"first_k_dense_replace\": 0, "
	"\"norm_topk_prob\": false, \"max_position_embeddings\": 2048, \"initializer_range\": 0.02, "
	"\"rms_norm_eps\": 1e-6, \"bos_token_id\": 1, \"eos_token_id\": 2, "
	"\"tie_word_embeddings\": false, \"rope_theta\": 10000.0, \"attention_bias\": false, "
	"\"scoring_func\": \"softmax\", \"moe_layer_freq\": 1}";

/* Keys of transformers' PretrainedConfig (and generation settings of old files): bookkeeping only. */
static const char *const hf_ignored[] = {
	"_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
	"output_router_logits", "router_aux_loss_coef", "num_mtp_layers", "output_attentions",
	"output_hidden_states", "return_dict", "torchscript", "chunk_size_feed_forward",
	"is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
	"tie_encoder_decoder", "problem_type", "id2label", "label2id", "tokenizer_class", "prefix",
	"sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task",
	"use_bfloat16", "pruned_heads", "tf_legacy_loss", "max_length", "min_length", "do_sample",
	"early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
	"top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
	"encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
	"return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
	"remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
	"begin_suppress_tokens",
};

static int is_ignored(const char *key)
{
	for (size_t i = 0; i < sizeof(hf_ignored) / sizeof(hf_ignored[0]); i++)
		if (!strcmp(key, hf_ignored[i]))
			return 1;
	return 0;
}

/* The keys of a rope_parameters object that the config loader's rope_scaling takes (besides
 * rope_theta, which becomes the top-level key). */
static const char *const rope_scaling_keys[] = {
	"rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
	"mscale", "mscale_all_dim", "attention_factor", "truncate",
};

static int is_rope_scaling_key(const char *key)
{
	for (size_t i = 0; i < sizeof(rope_scaling_keys) / sizeof(rope_scaling_keys[0]); i++)
		if (!strcmp(key, rope_scaling_keys[i]))
			return 1;
	return 0;
}

/* rope_parameters' rope_theta -> rope_theta (which it must agree with when both are given) */
static int take_rope_theta(cJSON *obj, cJSON *rp, const char *origin, char *err, size_t errlen)
{
	cJSON *theta = cJSON_DetachItemFromObjectCaseSensitive(rp, "rope_theta");
	const cJSON *top = cJSON_GetObjectItemCaseSensitive(obj, "rope_theta");
	int rc = 0;

	if (!theta)
		return 0;
	if (!cJSON_IsNumber(theta))
		rc = set_err(err, errlen, "%s: model.rope_parameters.rope_theta: expected a number", origin);
	else if (top && (!cJSON_IsNumber(top) || top->valuedouble != theta->valuedouble))
		rc = set_err(err, errlen, "%s: model.rope_theta disagrees with "
			     "model.rope_parameters.rope_theta", origin);
	else if (!top)
		cJSON_AddNumberToObject(obj, "rope_theta", theta->valuedouble);
	cJSON_Delete(theta);
	return rc;
}

/* {"rope_type": "default"} alone: no scaling */
static int rope_is_default(const cJSON *rp)
{
	const cJSON *t = cJSON_GetObjectItemCaseSensitive(rp, "rope_type");

	if (!t)
		t = cJSON_GetObjectItemCaseSensitive(rp, "type");
	return cJSON_GetArraySize(rp) == (t ? 1 : 0) && (!t || (cJSON_IsString(t) &&
							      !strcmp(t->valuestring, "default")));
}

/*
 * rope_parameters (transformers 5): rope_theta -> rope_theta, the rest (rope_type "yarn", factor, ...)
 * -> rope_scaling, which the config loader reads (DeepSeek's own files write rope_scaling directly).
 */
static int take_rope_parameters(cJSON *obj, const char *origin, char *err, size_t errlen)
{
	cJSON *rp = cJSON_DetachItemFromObjectCaseSensitive(obj, "rope_parameters"), *e;
	const cJSON *old = cJSON_GetObjectItemCaseSensitive(obj, "rope_scaling");
	int rc = 0;

	if (!rp || cJSON_IsNull(rp))
		goto out;
	if (!cJSON_IsObject(rp)) {
		rc = set_err(err, errlen, "%s: model.rope_parameters: expected an object", origin);
		goto out;
	}
	rc = take_rope_theta(obj, rp, origin, err, errlen);
	cJSON_ArrayForEach(e, rp) {
		int type = !strcmp(e->string, "rope_type") || !strcmp(e->string, "type");

		if (rc)
			break;
		if (!is_rope_scaling_key(e->string))
			rc = set_err(err, errlen, "%s: model.rope_parameters.%s is not supported", origin,
				     e->string);
		else if (type && (!cJSON_IsString(e) || (strcmp(e->valuestring, "default") &&
							 strcmp(e->valuestring, "yarn"))))
			rc = set_err(err, errlen, "%s: model.rope_parameters.%s=%s: only \"default\" and "
				     "\"yarn\" RoPE are supported", origin, e->string,
				     cJSON_IsString(e) ? e->valuestring : "?");
	}
	if (rc || rope_is_default(rp))
		goto out;
	if (old && !cJSON_IsNull(old)) {
		rc = set_err(err, errlen, "%s: model.rope_parameters and model.rope_scaling are both given",
			     origin);
		goto out;
	}
	cJSON_DeleteItemFromObjectCaseSensitive(obj, "rope_scaling");
	cJSON_AddItemToObject(obj, "rope_scaling", rp);
	rp = NULL;
out:
	cJSON_Delete(rp);
	return rc;
}

/* HF-only spellings that the config loader does not take, made into ours (or dropped). */
static int normalise_hf_keys(cJSON *obj, const char *origin, FILE *notes, char *err, size_t errlen)
{
	cJSON *e, *next;

	if (take_rope_parameters(obj, origin, err, errlen))
		return -1;
	for (e = obj->child; e; e = next) {
		next = e->next;
		if (is_ignored(e->string)) {
			cJSON_Delete(cJSON_DetachItemViaPointer(obj, e));
		} else if (!strcmp(e->string, "mlp_bias")) {
			if (!cJSON_IsFalse(e))
				return set_err(err, errlen, "%s: model.mlp_bias: must be false (no biases)",
					       origin);
			cJSON_Delete(cJSON_DetachItemViaPointer(obj, e));
		} else if (!strcmp(e->string, "eos_token_id") && cJSON_IsArray(e)) {
			cJSON *first = cJSON_GetArrayItem(e, 0);

			if (!cJSON_IsNumber(first))
				return set_err(err, errlen, "%s: model.eos_token_id: expected an integer",
					       origin);
			print_note(notes, "%s: eos_token_id is a list: taking its first id, %d", origin,
			     (int)first->valuedouble);
			cJSON_ReplaceItemViaPointer(obj, e, cJSON_CreateNumber(first->valuedouble));
		} else if ((!strcmp(e->string, "eos_token_id") || !strcmp(e->string, "bos_token_id")) &&
			   cJSON_IsNull(e)) {
			print_note(notes, "%s: %s is null: keeping the default", origin, e->string);
			cJSON_Delete(cJSON_DetachItemViaPointer(obj, e));
		}
	}
	return 0;
}

static const char *json_string(const cJSON *obj, const char *key)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);

	return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* {"model": obj} over rc. */
static int apply_model_object(struct run_config *rc, cJSON *obj, const char *origin, char *err,
			      size_t errlen)
{
	cJSON *wrap = cJSON_CreateObject();
	char *text;
	int ret;

	if (!wrap)
		return set_err(err, errlen, "%s: out of memory", origin);
	cJSON_AddItemReferenceToObject(wrap, "model", obj);
	text = cJSON_PrintUnformatted(wrap);
	cJSON_Delete(wrap);
	if (!text)
		return set_err(err, errlen, "%s: out of memory", origin);
	ret = config_apply_json(rc, text, origin, err, errlen);
	free(text);
	return ret;
}

int convert_hf_config(struct run_config *rc, const char *json_text, const char *origin,
		      FILE *notes, char *err, size_t errlen)
{
	struct run_config tmp = *rc;
	const char *end = NULL, *type, *topk;
	cJSON *obj = cJSON_ParseWithOpts(json_text, &end, 1), *defs = NULL, *d, *qk;
	char why[768];
	int ret = -1, v2;

	if (!obj)
		return set_err(err, errlen, "%s: malformed JSON", origin);
	if (!cJSON_IsObject(obj)) {
		set_err(err, errlen, "%s: expected a JSON object", origin);
		goto out;
	}
	type = json_string(obj, "model_type");
	if (!type || (strcmp(type, "deepseek_v3") && strcmp(type, "deepseek_v2"))) {
		set_err(err, errlen, "%s: model_type %s%s%s: only deepseek_v3 and deepseek_v2 models convert",
		        origin, type ? "\"" : "", type ? type : "missing", type ? "\"" : "");
		goto out;
	}
	v2 = !strcmp(type, "deepseek_v2");
	defs = cJSON_Parse(v2 ? v2_defaults : v3_defaults);
	if (!defs || apply_model_object(&tmp, defs, "transformers defaults", err, errlen))
		goto out;
	cJSON_ArrayForEach(d, defs) {
		/* scoring_func and moe_layer_freq are DeepSeek's keys, implied by model_type */
		if (cJSON_GetObjectItemCaseSensitive(obj, d->string) ||
		    !strcmp(d->string, "scoring_func") || !strcmp(d->string, "moe_layer_freq") ||
		    (!strcmp(d->string, "rope_theta") &&
		     cJSON_GetObjectItemCaseSensitive(obj, "rope_parameters")))
			continue;
		print_note(notes, "%s: no %s: transformers' %s default", origin, d->string, type);
	}
	if (normalise_hf_keys(obj, origin, notes, err, errlen))
		goto out;
	qk = cJSON_DetachItemFromObjectCaseSensitive(obj, "qk_head_dim");
	if (apply_model_object(&tmp, obj, origin, err, errlen)) {
		cJSON_Delete(qk);
		goto out;
	}
	if (qk && (!cJSON_IsNumber(qk) || qk->valuedouble != mc_qk_head_dim(&tmp.model))) {
		cJSON_Delete(qk);
		set_err(err, errlen, "%s: model.qk_head_dim must be qk_nope_head_dim + qk_rope_head_dim = %d",
		        origin, mc_qk_head_dim(&tmp.model));
		goto out;
	}
	cJSON_Delete(qk);
	topk = json_string(obj, "topk_method");
	if (v2 && (!topk || !strcmp(topk, "greedy"))) {
		/* greedy: top-K over all experts, whatever n_group says */
		if (tmp.model.n_group > 1)
			print_note(notes, "%s: topk_method greedy: ignoring n_group=%d", origin,
			     tmp.model.n_group);
		tmp.model.n_group = 1;
		tmp.model.topk_group = 1;
	}
	if (tmp.model.num_key_value_heads == 0)
		tmp.model.num_key_value_heads = tmp.model.num_attention_heads;
	if (config_validate(&tmp, 0, why, sizeof(why))) {
		set_err(err, errlen, "%s: %s", origin, why);
		goto out;
	}
	*rc = tmp;
	ret = 0;
out:
	cJSON_Delete(defs);
	cJSON_Delete(obj);
	return ret;
}

/* ---------------------------------------------------------------- run_config -> config.json */

static int by_key(const void *a, const void *b)
{
	return strcmp((*(cJSON *const *)a)->string, (*(cJSON *const *)b)->string);
}

void convert_json_sort(cJSON *obj)
{
	int n = cJSON_GetArraySize(obj), i = 0;
	cJSON **items = malloc(sizeof(cJSON *) * (n ? n : 1));

	if (!items)
		return;
	while (obj->child)
		items[i++] = cJSON_DetachItemViaPointer(obj, obj->child);
	qsort(items, n, sizeof(cJSON *), by_key);
	for (i = 0; i < n; i++)
		cJSON_AddItemToObject(obj, items[i]->string, items[i]);
	free(items);
}

static void set_item(cJSON *obj, const char *key, cJSON *v)
{
	if (cJSON_GetObjectItemCaseSensitive(obj, key))
		cJSON_ReplaceItemInObjectCaseSensitive(obj, key, v);
	else
		cJSON_AddItemToObject(obj, key, v);
}

/*
 * rope_scaling as DeepSeek's files write it, with factor and original_max_position_embeddings always
 * given (transformers requires both; the config leaves them 0 for "derived").
 */
static int hf_rope_scaling(cJSON *m, const struct model_config *mc)
{
	cJSON *rs = cJSON_GetObjectItemCaseSensitive(m, "rope_scaling");
	int omax = mc->rope_scaling.original_max_position_embeddings;

	if (!cJSON_IsObject(rs))
		return -1;
	set_item(rs, "factor", cJSON_CreateNumber(mc_rope_factor(mc)));
	set_item(rs, "original_max_position_embeddings",
		 cJSON_CreateNumber(omax > 0 ? omax : mc->max_position_embeddings));
	convert_json_sort(rs);
	return 0;
}

/* DeepSeek-V3's quantization_config, for the weights --to-hf --dtype fp8 writes. */
static int hf_fp8_config(cJSON *m)
{
	cJSON *q = cJSON_CreateObject(), *b;

	if (!q)
		return -1;
	set_item(m, "quantization_config", q);
	b = cJSON_AddArrayToObject(q, "weight_block_size");
	if (!cJSON_AddStringToObject(q, "activation_scheme", "dynamic") ||
	    !cJSON_AddStringToObject(q, "fmt", "e4m3") || !cJSON_AddStringToObject(q, "quant_method", "fp8") ||
	    !b)
		return -1;
	cJSON_AddItemToArray(b, cJSON_CreateNumber(FP8_BLOCK));
	cJSON_AddItemToArray(b, cJSON_CreateNumber(FP8_BLOCK));
	convert_json_sort(q);
	return 0;
}

char *convert_hf_config_json(const struct model_config *mc, enum st_dtype dtype)
{
	struct run_config rc;
	cJSON *root, *m, *arch;
	const char *topk;
	char *text, num[32];

	config_defaults(&rc);
	rc.model = *mc;
	text = config_to_json(&rc);
	if (!text)
		return NULL;
	root = cJSON_Parse(text);
	free(text);
	m = root ? cJSON_DetachItemFromObjectCaseSensitive(root, "model") : NULL;
	cJSON_Delete(root);
	if (!m)
		return NULL;
	arch = cJSON_CreateArray();
	cJSON_AddItemToArray(arch, cJSON_CreateString("DeepseekV3ForCausalLM"));
	set_item(m, "architectures", arch);
	set_item(m, "model_type", cJSON_CreateString("deepseek_v3"));
	set_item(m, "torch_dtype", cJSON_CreateString(dtype == ST_F32 ? "float32" : "bfloat16"));
	if (dtype == ST_F8_E4M3 && hf_fp8_config(m))
		goto oom;
	set_item(m, "hidden_act", cJSON_CreateString("silu"));
	set_item(m, "attention_dropout", cJSON_CreateRaw("0.0"));
	set_item(m, "rope_interleave", cJSON_CreateTrue());
	set_item(m, "use_cache", cJSON_CreateTrue());
	if (mc->scoring_func == MOE_SCORING_SIGMOID)
		topk = "noaux_tc";
	else
		topk = mc->n_group > 1 ? "group_limited_greedy" : "greedy";
	set_item(m, "topk_method", cJSON_CreateString(topk));
	if (mc->q_lora_rank == 0)
		set_item(m, "q_lora_rank", cJSON_CreateNull());
	if (mc->num_key_value_heads == 0) {
		snprintf(num, sizeof(num), "%d", mc->num_attention_heads);
		set_item(m, "num_key_value_heads", cJSON_CreateRaw(num));
	}
	if (mc->rope_scaling.type == ROPE_YARN && hf_rope_scaling(m, mc))
		goto oom;
	if (mc->n_routed_experts == 0) {
		/* transformers builds MoE layers from first_k_dense_replace on: none here */
		snprintf(num, sizeof(num), "%d", mc->num_hidden_layers);
		set_item(m, "first_k_dense_replace", cJSON_CreateRaw(num));
	}
	convert_json_sort(m);
	text = cJSON_Print(m);
	cJSON_Delete(m);
	return text;
oom:
	cJSON_Delete(m);
	return NULL;
}
