/*
 * train/lora_run.h - LoRA runs (the lora section; the adapters themselves: model/lora.h).
 *
 * An adapter checkpoint is a checkpoint (train/checkpoint.h) whose /model holds only the adapters (the
 * parameter table of struct lora.view, PEFT's tensor names) and whose /optim the adapters' AdamW state;
 * its config carries the lora section with lora.base, the base checkpoint's path, and
 * lora.base_checksum, the checksum of that file's bytes when the adapters were trained.  Loading one
 * loads the base first and refuses a base whose checksum differs.
 */
#ifndef MOE_TRAIN_LORA_RUN_H
#define MOE_TRAIN_LORA_RUN_H

#include <stddef.h>
#include <stdint.h>

#include "model/lora.h"
#include "model/model.h"
#include "train/config.h"

/* lora.base, or train.init_checkpoint when it is empty */
const char *lora_base_path(const struct run_config *c);

/* FNV-1a (64 bits) of a file's bytes as 16 hex digits into hex[17]; 0, or -1 with err naming the file. */
int lora_file_checksum(const char *path, char *hex, char *err, size_t errlen);

/* The model's adapter spec of a validated lora section. */
void lora_spec_of(const struct lora_config *lc, struct lora_spec *s);

/* Adapters of lc for m, initialised from seed, attached to m (m->lora); freeze: m's gradient arena is
 * dropped (the base is not trained).  NULL and err on failure (a target the model lacks). */
struct lora *lora_attach(struct moe_model *m, const struct lora_config *lc, uint64_t seed, int freeze,
			 char *err, size_t errlen);

/* The base of an adapter checkpoint's config: its file's checksum must be the one recorded.  0, or -1
 * with err naming both checksums. */
int lora_check_base(const struct run_config *saved, char *err, size_t errlen);

/*
 * The weights of checkpoint path (header read into *rc) for a model that runs forwards: a full
 * checkpoint into m; an adapter checkpoint: its base into m (the checksum checked), then the adapters,
 * attached to m and returned in *adapters (the caller frees them after m is done), or merged into m's
 * weights when adapters is NULL.  0, or -1 with err.
 */
int lora_load_for_inference(const char *path, const struct run_config *rc, struct moe_model *m,
			    struct lora **adapters, char *err, size_t errlen);

#endif
