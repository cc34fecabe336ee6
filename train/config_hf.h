/*
 * train/config_hf.h - Hugging Face config.json keys in the model section (SPEC 2, 3), for the config
 * loader (train/config.c).  The model section uses HF DeepseekV3's names; of the other keys a
 * config.json holds, the bookkeeping that does not change the math (architectures, torch_dtype,
 * hidden_act "silu", ...) is accepted without a field of its own, each value checked.  Whole config.json
 * files are translated by train/convert_config.c (convert.h).
 */
#ifndef MOE_TRAIN_CONFIG_HF_H
#define MOE_TRAIN_CONFIG_HF_H

#include <stddef.h>

struct cJSON;

/* An HF key the section accepts without a field of its own (only in "model"); NULL when not one. */
struct hf_key;
const struct hf_key *config_hf_key(const char *section, const char *name);
/* Whether its value v is acceptable: 0, or -1 with "ORIGIN: model.KEY: why not" in err. */
int config_hf_check(const struct hf_key *h, const struct cJSON *v, const char *origin, char *err,
		    size_t errlen);

/*
 * A quantization_config object: DeepSeek's fp8 (quant_method "fp8", fmt "e4m3", activation_scheme
 * "dynamic", weight_block_size [rows, cols]).  NULL and the block's shape (either pointer may be NULL),
 * or why not.
 */
const char *config_hf_fp8(const struct cJSON *v, int *block_rows, int *block_cols);

#endif
