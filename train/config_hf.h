/*
 * train/config_hf.h - Hugging Face config.json keys (SPEC 2, 3).  The model section of our config uses
 * HF DeepseekV3's names; what else a config.json holds is either accepted without a field of its own
 * (bookkeeping that does not change the math: architectures, torch_dtype, hidden_act "silu", ...) or
 * refused naming the key, and convert_hf_config / convert_hf_config_json translate a whole config.json
 * (transformers' defaults, rope_parameters, bookkeeping keys) to and from a run configuration.
 */
#ifndef MOE_TRAIN_CONFIG_HF_H
#define MOE_TRAIN_CONFIG_HF_H

#include <stddef.h>
#include <stdio.h>

#include "train/config.h"
#include "train/safetensors.h"

struct cJSON;

/* An HF key the section accepts without a field of its own (only in "model"); NULL when not one. */
struct hf_key;
const struct hf_key *config_hf_key(const char *section, const char *name);
/* Whether its value v is acceptable: 0, or -1 with "ORIGIN: model.KEY: why not" in err. */
int config_hf_check(const struct hf_key *h, const struct cJSON *v, const char *origin, char *err,
		    size_t errlen);

/*
 * A Hugging Face config.json's text (model_type deepseek_v3 or deepseek_v2) into rc's model section:
 * the keys the file lacks take transformers' defaults for that model_type (not ours), HF bookkeeping
 * keys are dropped, transformers 5's rope_parameters {rope_type, rope_theta, factor, ...} becomes
 * rope_theta and (rope_type yarn) rope_scaling, the old spelling that DeepSeek's files use and the
 * config loader reads.  Every other section of rc is left as it was.  Validated.  Notes (keys dropped,
 * defaults filled) go to notes (may be NULL).  Returns 0 or -1 with a message naming origin and the key.
 */
int convert_hf_config(struct run_config *rc, const char *json_text, const char *origin,
		      FILE *notes, char *err, size_t errlen);

/* config.json text (malloc'd) for a model: HF DeepseekV3 keys, architectures, model_type, torch_dtype;
 * YaRN as rope_scaling {"type": "yarn", "factor", "original_max_position_embeddings", ...}. */
char *convert_hf_config_json(const struct model_config *mc, enum st_dtype dtype);

/* Reorder an object's members by key, as transformers writes them. */
void hf_json_sort(struct cJSON *obj);

#endif
