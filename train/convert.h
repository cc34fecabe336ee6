/*
 * train/convert.h - Hugging Face checkpoints (config.json + safetensors) to and from our HDF5
 * checkpoints (SPEC 2).
 *
 *   moe convert --from-hf DIR --out CKPT.h5
 *   moe convert --to-hf CKPT.h5 --out DIR [--dtype bf16|f32] [--shard-size BYTES]
 *
 * Names map one to one (our names are HF DeepseekV3's), except the routed experts: HF keeps one tensor
 * per expert, model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight, we stack them along a leading
 * [E] axis as model.layers.N.mlp.experts.{gate,up,down}_proj.weight.  No weight is permuted: see the
 * RoPE note in convert.c.
 *
 * Both directions stream, one tensor (or one expert's slice) at a time, so a model larger than memory
 * converts: peak memory is about the largest tensor in float32.  A failed conversion leaves no output.
 */
#ifndef MOE_TRAIN_CONVERT_H
#define MOE_TRAIN_CONVERT_H

#include <stdint.h>
#include <stdio.h>

#include "train/config.h"
#include "train/safetensors.h"

/* HF's default: shards of at most 5 GB. */
#define CONVERT_DEFAULT_SHARD_BYTES 5000000000ULL

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

/* Reorder an object's members by key, as transformers writes them (config.json, the shards' index). */
struct cJSON;
void convert_json_sort(struct cJSON *obj);

/* HF directory -> HDF5 checkpoint (step 0, the other config sections at their defaults).  Every header
 * is checked before any data is read; out_path is written atomically (untouched on failure). */
int convert_from_hf(const char *dir, const char *out_path, FILE *notes, char *err, size_t errlen);

struct convert_to_hf_opts {
	enum st_dtype dtype;        /* ST_F32, ST_BF16 or ST_F8_E4M3 (DeepSeek-V3's layout: fp8 linear
				     * weights with block scales, the rest BF16); e_score_correction_bias
				     * stays F32 */
	uint64_t shard_bytes;       /* at most this many bytes of tensor data per file */
};

/* HDF5 checkpoint -> HF directory (created when missing; refused when it already holds weights).  On
 * failure the shards already written are removed, and the directory when it was created here. */
int convert_to_hf(const char *ckpt_path, const char *dir, const struct convert_to_hf_opts *opts,
		  FILE *notes, char *err, size_t errlen);

/*
 * An adapter checkpoint (train/lora_run.h) -> PEFT's layout in dir: adapter_config.json (peft_type LORA,
 * r, lora_alpha, lora_dropout, target_modules, base_model_name_or_path = lora.base, task_type
 * CAUSAL_LM) and adapter_model.safetensors, tensors named as PEFT names them on transformers'
 * DeepseekV3ForCausalLM: base_model.model.model.layers.N.self_attn.q_a_proj.lora_A.weight [r, in],
 * ...lora_B.weight [out, r]; a routed expert's as base_model.model.model.layers.N.mlp.experts.E.
 * gate_proj.lora_A.weight.  dtype ST_F32 or ST_BF16.  convert_to_hf calls it for adapter checkpoints.
 */
int convert_lora_to_peft(const char *ckpt_path, const char *dir, enum st_dtype dtype, FILE *notes,
			 char *err, size_t errlen);

/* The helpers of the writers (convert.c): mkdir -p; refuse a directory holding weights; a text file
 * written atomically (PATH.tmp, fsync, rename).  0, or -1 with err. */
int convert_mkdir_p(const char *dir, char *err, size_t errlen);
int convert_check_out_dir(const char *dir, char *err, size_t errlen);
int convert_write_text(const char *path, const char *text, char *err, size_t errlen);

#endif
