/*
 * train/config_hf.c - the Hugging Face config.json keys that the config loader (train/config.c) takes in
 * its model section without a field of their own: bookkeeping that does not change the math, each
 * checked (a value that would change it is refused, naming the key).
 */
#include "train/config_hf.h"
#include "launch/errmsg.h"

#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include <cjson/cJSON.h>

static const char *hf_string_in(const cJSON *v, const char *const *allowed, const char *what)
{
	if (!cJSON_IsString(v))
		return "expected a string";
	for (int i = 0; allowed[i]; i++)
		if (!strcmp(v->valuestring, allowed[i]))
			return NULL;
	return what;
}

static const char *hf_any_string(const cJSON *v)
{
	return cJSON_IsString(v) ? NULL : "expected a string";
}

static const char *hf_any_bool(const cJSON *v)
{
	return cJSON_IsBool(v) ? NULL : "expected true or false";
}

static const char *hf_object(const cJSON *v)
{
	return cJSON_IsObject(v) ? NULL : "expected an object";
}

static const char *hf_string_list(const cJSON *v)
{
	const cJSON *e;

	if (!cJSON_IsArray(v))
		return "expected an array of strings";
	cJSON_ArrayForEach(e, v)
		if (!cJSON_IsString(e))
			return "expected an array of strings";
	return NULL;
}

static bool is_int_at_least(const cJSON *v, int lo)
{
	return cJSON_IsNumber(v) && v->valuedouble == floor(v->valuedouble) &&
	       v->valuedouble >= lo && v->valuedouble <= INT_MAX;
}

static const char *hf_positive_int(const cJSON *v)
{
	return is_int_at_least(v, 1) ? NULL : "expected an integer >= 1";
}

static const char *hf_int_or_null(const cJSON *v)
{
	return cJSON_IsNull(v) || is_int_at_least(v, 0) ? NULL : "expected an integer >= 0 or null";
}

static const char *hf_model_type(const cJSON *v)
{
	static const char *const ok[] = { "deepseek_v3", "deepseek_v2", NULL };

	return hf_string_in(v, ok, "must be \"deepseek_v3\" or \"deepseek_v2\"");
}

static const char *hf_hidden_act(const cJSON *v)
{
	static const char *const ok[] = { "silu", NULL };

	return hf_string_in(v, ok, "must be \"silu\" (SwiGLU is the only activation)");
}

static const char *hf_topk_method(const cJSON *v)
{
	static const char *const ok[] = { "greedy", "group_limited_greedy", "noaux_tc", NULL };

	return hf_string_in(v, ok, "must be \"greedy\", \"group_limited_greedy\" or \"noaux_tc\"");
}

static const char *hf_attention_dropout(const cJSON *v)
{
	if (!cJSON_IsNumber(v))
		return "expected a number";
	return v->valuedouble == 0 ? NULL : "must be 0 (attention dropout is not supported)";
}

/*
 * DeepSeek-V3's {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
 * "weight_block_size": [128, 128]}: how its files store the weights (convert.c dequantises them), not
 * a change to the model, which trains in float32 / bf16.
 */
const char *config_hf_fp8(const cJSON *v, int *block_rows, int *block_cols)
{
	static const char *const method[] = { "fp8", NULL }, *const fmt[] = { "e4m3", NULL };
	static const char *const act[] = { "dynamic", NULL };
	const cJSON *e, *b;

	if (!cJSON_IsObject(v))
		return "expected an object (DeepSeek's fp8 quantization_config) or null";
	cJSON_ArrayForEach(e, v) {
		const char *why = NULL;

		if (!strcmp(e->string, "quant_method"))
			why = hf_string_in(e, method, "quant_method must be \"fp8\"");
		else if (!strcmp(e->string, "fmt"))
			why = hf_string_in(e, fmt, "fmt must be \"e4m3\" (the only fp8 format read)");
		else if (!strcmp(e->string, "activation_scheme"))
			why = hf_string_in(e, act, "activation_scheme must be \"dynamic\"");
		else if (strcmp(e->string, "weight_block_size"))
			why = "unknown key in quantization_config (quant_method, fmt, activation_scheme, "
			      "weight_block_size)";
		if (why)
			return why;
	}
	if (!cJSON_GetObjectItemCaseSensitive(v, "quant_method"))
		return "quant_method missing (\"fp8\")";
	if (!cJSON_GetObjectItemCaseSensitive(v, "fmt"))
		return "fmt missing (\"e4m3\")";
	b = cJSON_GetObjectItemCaseSensitive(v, "weight_block_size");
	if (!cJSON_IsArray(b) || cJSON_GetArraySize(b) != 2 || !is_int_at_least(b->child, 1) ||
	    !is_int_at_least(b->child->next, 1))
		return "weight_block_size must be two integers >= 1 ([rows, cols] of a scale's block)";
	if (block_rows)
		*block_rows = (int)b->child->valuedouble;
	if (block_cols)
		*block_cols = (int)b->child->next->valuedouble;
	return NULL;
}

static const char *hf_quantization(const cJSON *v)
{
	return cJSON_IsNull(v) ? NULL : config_hf_fp8(v, NULL, NULL);
}

static const char *hf_rope_interleave(const cJSON *v)
{
	if (!cJSON_IsBool(v))
		return "expected true or false";
	return cJSON_IsTrue(v) ? NULL : "must be true (RoPE rotates adjacent pairs)";
}

struct hf_key {
	const char *name;
	const char *(*check)(const cJSON *v);  /* NULL when acceptable, else why not */
};

static const struct hf_key hf_keys[] = {
	{ "architectures", hf_string_list },
	{ "model_type", hf_model_type },
	{ "auto_map", hf_object },
	{ "torch_dtype", hf_any_string },
	{ "dtype", hf_any_string },
	{ "transformers_version", hf_any_string },
	{ "use_cache", hf_any_bool },
	{ "pretraining_tp", hf_positive_int },
	{ "attention_dropout", hf_attention_dropout },
	{ "hidden_act", hf_hidden_act },
	{ "topk_method", hf_topk_method },
	{ "ep_size", hf_positive_int },
	{ "rope_interleave", hf_rope_interleave },
	{ "head_dim", hf_positive_int },
	{ "pad_token_id", hf_int_or_null },
	{ "quantization_config", hf_quantization },
};

const struct hf_key *config_hf_key(const char *section, const char *name)
{
	if (strcmp(section, "model"))
		return NULL;
	for (size_t i = 0; i < sizeof(hf_keys) / sizeof(hf_keys[0]); i++)
		if (!strcmp(hf_keys[i].name, name))
			return &hf_keys[i];
	return NULL;
}

int config_hf_check(const struct hf_key *h, const cJSON *v, const char *origin, char *err,
		    size_t errlen)
{
	const char *why = h->check(v);

	if (!why)
		return 0;
	return set_err(err, errlen, "%s: model.%s: %s", origin, h->name, why);
}
