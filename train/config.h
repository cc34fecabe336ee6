/*
 * train/config.h - the run configuration (SPEC 3): one JSON file with sections model, train, data,
 * parallel, checkpoint, log, grpo, distill; `--set section.key=value` overrides.  Unknown keys, wrong types and
 * impossible combinations are errors naming the key.
 */
#ifndef MOE_TRAIN_CONFIG_H
#define MOE_TRAIN_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

#include "model/config.h"

#define CFG_STR 512
#define CFG_MAX_ARGV 16
#define CFG_MAX_REWARDS 8
#define CFG_REWARD_NAME 64

/*
 * A value that changes with the step (train.mtp_lambda): values[i] from step steps[i] until the next
 * one; steps[0] = 0, strictly increasing.  In the config a plain number (n = 1) or
 * {"steps": [0, S, ...], "values": [v0, v1, ...]}.
 */
#define CFG_MAX_PIECES 16
struct piecewise {
	int n;
	long long steps[CFG_MAX_PIECES];
	double values[CFG_MAX_PIECES];
};

/* The value at (0-based) step `step`. */
double piecewise_at(const struct piecewise *p, long long step);

struct train_config {
	int steps;
	int stop_at;                /* stop (with a checkpoint) after this step, resumable (0: off) */
	int seq_len;
	int micro_batch;            /* sequences per rank per micro-step */
	int grad_accum;
	double lr, min_lr;
	int warmup_steps;
	char schedule[16];          /* cosine | wsd | constant */
	double decay_frac;          /* wsd: fraction of steps spent decaying at the end */
	double weight_decay;
	bool decay_embeddings;      /* weight decay on the input embedding table too */
	double beta1, beta2, eps;
	double grad_clip;           /* 0: off */
	double bias_update_speed;   /* aux-loss-free balancing (0: off) */
	long long seed;
	char device[8];             /* auto | cpu | cuda */
	int eval_every;             /* 0: off */
	int eval_batches;           /* validation sequences batches per eval (0: whole split) */
	char init_checkpoint[CFG_STR];
	char on_nonfinite[8];       /* skip | stop */
	struct piecewise mtp_lambda;/* weight of the multi-token-prediction loss (model.num_nextn_predict_layers) */
	char attention[8];          /* auto | cudnn | own: the GPU path's attention (ops_cuda.h) */
};

struct data_config {
	char train[CFG_STR];        /* glob of shards */
	char val[CFG_STR];
	bool shuffle;
};

struct parallel_config {
	int ep;                     /* expert-parallel size */
	int zero;                   /* 0 | 1 */
	char comm[8];               /* auto | nccl | mpi: the GPU path's device collectives */
	double bucket_mb;           /* the GPU path's gradient buckets (MiB), reduced as the backward goes */
};

struct checkpoint_config {
	char dir[CFG_STR];
	int every;                  /* 0: only at the end */
	int keep;
};

struct log_config {
	char metrics[CFG_STR];      /* JSON Lines path ("" = none) */
	int every;
};

/* One of grpo.rewards: a reward program and its weight in the total. */
struct reward_config {
	char name[CFG_REWARD_NAME];  /* [A-Za-z0-9_.-]+, unique: metrics reward/<name> */
	int cmd_argc;
	char cmd[CFG_MAX_ARGV][CFG_STR];  /* argv list, run without a shell */
	double weight;              /* finite; 0 scores and logs it without training on it */
	double timeout_s;           /* > 0; 0 (absent): grpo.reward_timeout_s */
};

struct grpo_config {
	char prompts[CFG_STR];
	int reward_cmd_argc;
	char reward_cmd[CFG_MAX_ARGV][CFG_STR];  /* argv list, run without a shell */
	double reward_timeout_s;
	int group_size;
	int prompts_per_step;
	int max_new_tokens;
	double temperature, top_p;
	int top_k;
	double beta;
	double epsilon, epsilon_high;
	int num_iterations;
	char loss_type[16];         /* grpo | bnpo | dr_grpo | dapo */
	char scale_rewards[16];     /* group | batch | none */
	char tokenizer[CFG_STR];
	bool mask_truncated;
	bool routing_replay;
	bool sequence_ratio;        /* GSPO */
	int n_rewards;              /* grpo.rewards (or 0: the one grpo.reward_cmd) */
	struct reward_config rewards[CFG_MAX_REWARDS];
	char reward_norm[8];        /* total | each */
	char rollout_weights[8];    /* full | int8: the weights sampling reads */
};

/* Knowledge distillation (train/distill.h): on when teacher is set. */
struct distill_config {
	char teacher[CFG_STR];      /* checkpoint of the teacher ("": no distillation) */
	double alpha;               /* loss = (1 - alpha) * CE + alpha * T^2 * KL, alpha in [0, 1] */
	double temperature;         /* T > 0: both distributions are softmax(logits / T) */
	char kl[16];                /* forward: KL(teacher || student) | reverse: KL(student || teacher) */
};

/* LoRA fine-tuning (model/lora.h, train/lora_run.h): on when rank > 0. */
struct lora_config {
	int rank;                   /* 0: off */
	double alpha;               /* the adapters' scale is alpha / rank */
	int n_targets;
	char targets[CFG_MAX_ARGV][CFG_STR];  /* HF module names (model/lora.h) */
	double dropout;             /* on the adapters' input, in [0, 1) */
	char base[CFG_STR];         /* the base checkpoint ("": train.init_checkpoint) */
	char base_checksum[24];     /* written by moe train: the base file's checksum, hex ("": unknown) */
};

struct run_config {
	struct model_config model;
	struct train_config train;
	struct data_config data;
	struct parallel_config parallel;
	struct checkpoint_config checkpoint;
	struct log_config log;
	struct grpo_config grpo;
	struct distill_config distill;
	struct lora_config lora;
};

/* Defaults for every key (a tiny model). */
void config_defaults(struct run_config *c);

/* Load `path` over the defaults, then apply each "section.key=value" of sets[0..nsets), then validate.
 * Returns 0, or -1 with a message naming the file and key in err.  path may be NULL (defaults + sets).
 * model.num_key_value_heads absent, null or 0 resolves to model.num_attention_heads.  The world-size
 * check is left to the caller: config_validate(c, world_size, ...) once the world is known. */
int config_load(struct run_config *c, const char *path, char *const *sets, int nsets,
		char *err, size_t errlen);

/* Apply a JSON text (the whole config, as written by config_to_json) over c; no validation. */
int config_apply_json(struct run_config *c, const char *json_text, const char *origin,
		      char *err, size_t errlen);
/* Apply one "section.key=value" override. */
int config_set(struct run_config *c, const char *assignment, char *err, size_t errlen);
/* Check types' ranges and combinations (divisibility, group sizes, ...); world_size for parallel.ep
 * (world_size <= 0: skip that one check). */
int config_validate(const struct run_config *c, int world_size, char *err, size_t errlen);

/* The full resolved config as JSON text (malloc'd; caller frees). */
char *config_to_json(const struct run_config *c);

/* Compare the model sections of two configs: returns 0 when equal, else 1 and the first differing
 * key ("model.hidden_size") in key. */
int config_model_diff(const struct model_config *a, const struct model_config *b, char *key,
		      size_t keylen);

#endif
