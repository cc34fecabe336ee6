/*
 * moe.c - the `moe` command: one executable, one subcommand per job (SPEC 5).
 *
 *   moe train    --config FILE [--set k=v ...] [--resume PATH|latest]   pretraining / fine-tuning
 *   moe init     --config FILE [--set k=v ...] --out CKPT     write a freshly initialised model
 *   moe eval     --checkpoint CKPT --data SHARD [--set k=v]   loss of a model on a shard, read in order
 *   moe inspect  CKPT | --config FILE [--set k=v ...]          what a checkpoint holds / parameter counts
 *   moe grpo     --config FILE [--set k=v ...] [--resume PATH|latest] [--eval PROMPTS [--samples F]]
 *   moe plot     --metrics FILE --key K [--key K ...] --out PNG [--title T] [--size WxH]
 *   moe generate --checkpoint CKPT --prompt TEXT|--prompt-ids IDS [sampling options]
 *                (or --prompts P.jsonl --out-shard SHARD: the samples into a token shard)
 *   moe convert  --from-hf DIR --out CKPT | --to-hf CKPT --out DIR    Hugging Face interop
 *   moe lora     merge --checkpoint ADAPTERS.h5 --out MERGED.h5   fold LoRA adapters into their base
 *   moe data     tokenizer | shards | decode | encode | task | synth
 *
 * The first five share the options parsed here.  The others parse their own, in one commands file per
 * folder: plot and convert in train/train_cli.c, generate in rl/rl_cli.c, data in data/data_cli.c
 * (and data/task_arith.c).  No library file includes a commands header (tests/test_layering.sh).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/data_cli.h"
#include "data/shard.h"
#include "launch/comm.h"
#include "launch/startup.h"
#include "model/quant.h"
#include "rl/generate.h"
#include "rl/grpo.h"
#include "rl/rl_cli.h"
#include "model/model.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/eval.h"
#include "train/lora_run.h"
#include "train/train.h"
#include "train/train_cli.h"

#define MAX_SETS 64

struct cli {
	const char *config, *out, *checkpoint, *data, *resume, *positional, *eval, *samples, *weights;
	char *sets[MAX_SETS];
	int nsets;
	int help;
};

static void die(const char *fmt, const char *arg)
{
	fprintf(stderr, "moe: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "\n");
	exit(1);
}

/* Common options of every subcommand; anything else is an error naming it. */
static void parse_cli(struct cli *c, int argc, char **argv, const char *cmd)
{
	memset(c, 0, sizeof(*c));
	for (int i = 0; i < argc; i++) {
		const char *a = argv[i];
		const char **slot = NULL;
		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			c->help = 1;
			continue;
		}
		if (!strcmp(a, "--config"))
			slot = &c->config;
		else if (!strcmp(a, "--out"))
			slot = &c->out;
		else if (!strcmp(a, "--checkpoint"))
			slot = &c->checkpoint;
		else if (!strcmp(a, "--data"))
			slot = &c->data;
		else if (!strcmp(a, "--resume"))
			slot = &c->resume;
		else if (!strcmp(a, "--eval") && !strcmp(cmd, "grpo"))
			slot = &c->eval;
		else if (!strcmp(a, "--samples") && !strcmp(cmd, "grpo"))
			slot = &c->samples;
		else if (!strcmp(a, "--weights") && (!strcmp(cmd, "grpo") || !strcmp(cmd, "eval")))
			slot = &c->weights;
		if (slot || !strcmp(a, "--set")) {
			if (i + 1 >= argc)
				die("%s needs a value", a);
			if (slot) {
				*slot = argv[++i];
			} else {
				if (c->nsets == MAX_SETS)
					die("too many --set options (at most 64)%s", "");
				c->sets[c->nsets++] = argv[++i];
			}
		} else if (a[0] != '-' && !c->positional) {
			c->positional = a;
		} else {
			fprintf(stderr, "moe %s: unknown option '%s' (see moe %s --help)\n", cmd, a, cmd);
			exit(2);
		}
	}
	if (c->weights && strcmp(c->weights, "full") && strcmp(c->weights, "int8"))
		die("--weights %s: expected full or int8", c->weights);
}

static void load_config(struct run_config *rc, const struct cli *c)
{
	char err[1024];
	config_defaults(rc);
	if (config_load(rc, c->config, c->sets, c->nsets, err, sizeof(err)))
		die("%s", err);
}

static struct moe_model *new_model(const struct model_config *mc)
{
	char err[512];
	struct moe_model *m = model_create(mc, 0, mc->n_routed_experts, err, sizeof(err));
	if (!m)
		die("%s", err);
	return m;
}

/* Config, MPI and the (dp, ep) grid for train and grpo; then the job. */
static int run_job(struct cli *c, int argc, char **argv, int grpo)
{
	struct run_config rc;
	load_config(&rc, c);
	char err[1024];
	struct dist d;
	if (c->weights && !c->eval)
		die("--weights goes with moe grpo --eval (training's sampler: grpo.rollout_weights)%s", "");
	if (c->weights)  /* the evaluation samples with the rollout weights */
		snprintf(rc.grpo.rollout_weights, sizeof(rc.grpo.rollout_weights), "%s", c->weights);
	if (comm_init(&argc, &argv))
		die("cannot start MPI%s", "");
	if (config_validate(&rc, comm_world_size(), err, sizeof(err)) ||
	    dist_setup(&d, rc.parallel.ep, err, sizeof(err))) {
		fprintf(stderr, "moe: %s\n", err);
		comm_finalize();
		return 1;
	}
	int code = !grpo ? train_run(&rc, c->resume, &d) :
		   c->eval ? grpo_eval(&rc, c->resume, &d, c->eval, c->samples) : grpo_run(&rc, c->resume, &d);
	dist_free(&d);
	comm_finalize();
	return code;
}

static int cmd_train(int argc, char **argv)
{
	struct cli c;
	parse_cli(&c, argc, argv, "train");
	if (c.help || !c.config) {
		printf("usage: moe train --config FILE [--set section.key=value ...] [--resume PATH|latest]\n"
		       "Trains per the config (SPEC 3 keys: train.*, data.*, checkpoint.*, log.*).\n"
		       "  --resume latest   continue from the newest checkpoint in checkpoint.dir (fresh if none)\n"
		       "  --resume PATH     continue from that checkpoint (weights, AdamW state, data position)\n"
		       "  train.init_checkpoint=PATH starts a new run from a checkpoint's weights instead.\n"
		       "SIGINT/SIGTERM: finish the step, checkpoint, exit.\n");
		return c.help ? 0 : 2;
	}
	return run_job(&c, argc, argv, 0);
}

static int cmd_grpo(int argc, char **argv)
{
	struct cli c;
	parse_cli(&c, argc, argv, "grpo");
	if (c.help || !c.config) {
		printf("usage: moe grpo --config FILE [--set section.key=value ...] [--resume PATH|latest]\n"
		       "       moe grpo --config FILE --eval PROMPTS.jsonl [--samples OUT.jsonl] [--resume PATH]\n"
		       "                [--weights full|int8]\n"
		       "GRPO on grpo.prompts (JSON Lines with \"prompt\") scored by grpo.reward_cmd (SPEC 4),\n"
		       "starting from train.init_checkpoint (also the KL reference when grpo.beta > 0).\n"
		       "  --resume latest|PATH   continue a stopped run exactly (policy, AdamW, prompt position)\n"
		       "  --eval PROMPTS         greedy completions of every prompt, scored: mean reward and\n"
		       "                         accuracy (reward >= 1) of the policy (--resume, else\n"
		       "                         train.init_checkpoint); --samples writes them (one process);\n"
		       "                         --weights int8: with int8 linear weights (grpo.rollout_weights)\n"
		       "Keys: grpo.group_size, prompts_per_step, max_new_tokens, temperature, top_p, top_k, beta,\n"
		       "epsilon, epsilon_high, num_iterations, loss_type (grpo|bnpo|dr_grpo|dapo), scale_rewards\n"
		       "(group|batch|none), mask_truncated, routing_replay, sequence_ratio (GSPO), tokenizer,\n"
		       "reward_cmd, reward_timeout_s, rewards (a list of {name, cmd, weight, timeout_s}),\n"
		       "reward_norm (total|each), rollout_weights (full|int8); train.steps counts GRPO steps; train.micro_batch x\n"
		       "train.grad_accum x ranks completions make one optimizer update.\n"
		       "SIGINT/SIGTERM: finish the step, checkpoint, exit.\n");
		return c.help ? 0 : 2;
	}
	return run_job(&c, argc, argv, 1);
}

static int cmd_init(int argc, char **argv)
{
	struct cli c;
	parse_cli(&c, argc, argv, "init");
	if (c.help || !c.config || !c.out) {
		printf("usage: moe init --config FILE [--set section.key=value ...] --out CKPT.h5\n"
		       "Writes a freshly initialised model (seeded by train.seed) as an HDF5 checkpoint.\n");
		return c.help ? 0 : 2;
	}
	struct run_config rc;
	load_config(&rc, &c);
	struct moe_model *m = new_model(&rc.model);
	model_init_weights(m, (uint64_t)rc.train.seed);
	struct ckpt_meta meta = { 0, 0 };
	char err[1024];
	if (checkpoint_save_model(c.out, m, &rc, &meta, err, sizeof(err)))
		die("%s", err);
	int64_t total, act;
	model_count_params(&rc.model, &total, &act);
	printf("wrote %s: %lld parameters (%lld activated per token), seed %lld\n", c.out, (long long)total,
	       (long long)act, rc.train.seed);
	model_free(m);
	return 0;
}

/* The checkpoint's config, with --set overrides that must not change the model's shapes. */
static void checkpoint_config(struct run_config *rc, const struct cli *c)
{
	char err[1024], key[128];
	config_defaults(rc);
	if (checkpoint_read_header(c->checkpoint, rc, NULL, err, sizeof(err)))
		die("%s", err);
	struct model_config saved = rc->model;
	for (int i = 0; i < c->nsets; i++)
		if (config_set(rc, c->sets[i], err, sizeof(err)))
			die("%s", err);
	if (config_model_diff(&saved, &rc->model, key, sizeof(key)))
		die("--set %s would change the checkpoint's model", key);
	/* one process, whatever layout trained it */
	rc->parallel.ep = 1;
	rc->parallel.zero = 0;
	if (config_validate(rc, 1, err, sizeof(err)))
		die("%s", err);
}

static int cmd_eval(int argc, char **argv)
{
	struct cli c;
	parse_cli(&c, argc, argv, "eval");
	if (c.help || !c.checkpoint || !c.data) {
		printf("usage: moe eval --checkpoint CKPT.h5 --data SHARD [--weights full|int8] [--set ...]\n"
		       "Prints {\"loss\": L, \"tokens\": N}: the mean cross-entropy over the shard read in order\n"
		       "as sequences of train.seq_len tokens (targets shifted by one), train.micro_batch at a time.\n"
		       "--weights int8: every linear layer's weight int8 with a scale per row (model/quant.h).\n");
		return c.help ? 0 : 2;
	}
	struct run_config rc;
	checkpoint_config(&rc, &c);
	char err[1024];
	struct moe_model *m = new_model(&rc.model);
	struct lora *adapters = NULL;  /* an adapter checkpoint: its base with the adapters attached */
	if (lora_load_for_inference(c.checkpoint, &rc, m, &adapters, err, sizeof(err)))
		die("%s", err);
	if (c.weights && !strcmp(c.weights, "int8")) {
		if (adapters) {  /* the int8 copy is of the adapted weights: merged first */
			m->lora = NULL;
			lora_merge(adapters, m);
			lora_free(adapters);
			adapters = NULL;
		}
		if (model_quantize(m))
			die("out of memory quantising %s", c.checkpoint);
		quant_drop_fp32(m);  /* the fp32 linear weights are not read again */
	}
	struct shard s;
	if (shard_open(&s, c.data, rc.model.vocab_size, err, sizeof(err)))
		die("%s", err);
	double loss;
	int64_t tokens;
	if (eval_shard(m, &s, rc.train.seq_len, rc.train.micro_batch, 0, &loss, &tokens))
		die("%s: fewer tokens than one sequence of train.seq_len + 1", c.data);
	printf("{\"loss\": %.6f, \"tokens\": %lld}\n", loss, (long long)tokens);
	shard_close(&s);
	model_free(m);
	lora_free(adapters);
	return 0;
}

/* the MTP depths' own parameters (layers >= num_hidden_layers; the embedding and lm_head are shared) */
static void print_mtp_count(const struct model_config *mc)
{
	char err[256];
	int n = 0;
	int64_t sum = 0;
	struct param *p = model_param_table(mc, &n, err, sizeof(err));
	for (int i = 0; p && i < n; i++)
		sum += p[i].layer >= mc->num_hidden_layers ? (int64_t)p[i].numel : 0;
	free(p);
	printf("multi-token prediction: %d depth(s), %lld parameters more (%.2fB; embedding and lm_head "
	       "shared)\n", mc->num_nextn_predict_layers, (long long)sum, sum / 1e9);
}

static void print_counts(const struct model_config *mc)
{
	int64_t total, act;
	model_count_params(mc, &total, &act);
	printf("parameters: %lld total (%.2fB), %lld activated per token (%.3fB, without the input "
	       "embedding and the routers)\n", (long long)total, total / 1e9, (long long)act, act / 1e9);
	printf("layers: %d (%d dense, %d MoE), routed experts %d (top-%d), shared %d\n",
	       mc->num_hidden_layers, mc->first_k_dense_replace < mc->num_hidden_layers ?
	       mc->first_k_dense_replace : mc->num_hidden_layers,
	       mc->n_routed_experts > 0 ? mc->num_hidden_layers - mc->first_k_dense_replace : 0,
	       mc->n_routed_experts, mc->num_experts_per_tok, mc->n_shared_experts);
	if (mc->num_nextn_predict_layers > 0)
		print_mtp_count(mc);
}

static int cmd_inspect(int argc, char **argv)
{
	struct cli c;
	parse_cli(&c, argc, argv, "inspect");
	if (c.help || (!c.config && !c.positional)) {
		printf("usage: moe inspect CKPT.h5          what a checkpoint holds\n"
		       "       moe inspect --config FILE [--set k=v ...]   parameter counts of a config\n");
		return c.help ? 0 : 2;
	}
	struct run_config rc;
	if (c.config) {
		load_config(&rc, &c);
		printf("config %s\n", c.config);
		print_counts(&rc.model);
		return 0;
	}
	char err[1024];
	struct ckpt_meta meta;
	config_defaults(&rc);
	if (checkpoint_read_header(c.positional, &rc, &meta, err, sizeof(err)))
		die("%s", err);
	struct moe_model *base = new_model(&rc.model), *m = base;
	struct lora *adapters = NULL;
	if (rc.lora.rank > 0) {  /* adapters: list them (the base is not read) */
		adapters = lora_attach(base, &rc.lora, 0, 0, err, sizeof(err));
		if (!adapters)
			die("%s", err);
		m = &adapters->view;
	}
	if (checkpoint_load_model(c.positional, m, err, sizeof(err)))
		die("%s", err);
	printf("checkpoint %s: step %lld, tokens seen %lld\n", c.positional, (long long)meta.step,
	       (long long)meta.tokens_seen);
	print_counts(&rc.model);
	if (adapters)
		printf("LoRA adapters: rank %d, alpha %g, dropout %g, %zu parameters, on base %s (checksum %s)\n",
		       rc.lora.rank, rc.lora.alpha, rc.lora.dropout, lora_trainable_floats(adapters),
		       rc.lora.base, rc.lora.base_checksum[0] ? rc.lora.base_checksum : "unknown");
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		double ss = 0;
		for (size_t j = 0; j < p->numel; j++)
			ss += (double)m->weights[p->offset + j] * m->weights[p->offset + j];
		printf("  %-56s [", p->name);
		for (int d = 0; d < p->ndim; d++)
			printf("%s%lld", d ? ", " : "", (long long)p->shape[d]);
		printf("]  rms %.4g\n", p->numel ? sqrt(ss / p->numel) : 0.0);
	}
	model_free(base);
	lora_free(adapters);
	return 0;
}

static void usage(void)
{
	printf("moe - DeepSeek-style MoE training (MLA + DeepSeekMoE)\n\n"
	       "usage: moe <command> [options]   (moe <command> --help for each)\n\n"
	       "  train     pretraining / supervised fine-tuning, with checkpoints and resume\n"
	       "  init      write a freshly initialised model to an HDF5 checkpoint\n"
	       "  eval      loss of a checkpoint on a token shard\n"
	       "  inspect   what a checkpoint holds, or a config's parameter counts\n"
	       "  grpo      GRPO against a reward program; --eval scores a policy on a prompt set\n"
	       "  plot      line plots of a metrics file (JSON Lines) to a PNG\n"
	       "  generate  sample from a checkpoint (MLA latent cache, absorbed decode)\n"
	       "  convert   Hugging Face safetensors <-> HDF5 checkpoints\n"
	       "  lora      merge LoRA adapters into their base (moe lora merge)\n"
	       "  data      tokenizer (BPE) training, text to shards, decode, synthetic shards\n");
}

int main(int argc, char **argv)
{
	startup_fix_blas_kernels(argv);
	if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
		usage();
		return argc < 2 ? 2 : 0;
	}
	const char *cmd = argv[1];
	if (!strcmp(cmd, "train"))
		return cmd_train(argc - 2, argv + 2);
	if (!strcmp(cmd, "init"))
		return cmd_init(argc - 2, argv + 2);
	if (!strcmp(cmd, "eval"))
		return cmd_eval(argc - 2, argv + 2);
	if (!strcmp(cmd, "inspect"))
		return cmd_inspect(argc - 2, argv + 2);
	if (!strcmp(cmd, "plot"))
		return plot_cli_main(argc - 2, argv + 2);
	if (!strcmp(cmd, "grpo"))
		return cmd_grpo(argc - 2, argv + 2);
	if (!strcmp(cmd, "generate"))
		return generate_cli_main(argc - 2, argv + 2);
	if (!strcmp(cmd, "convert"))
		return convert_cli_main(argc - 2, argv + 2);
	if (!strcmp(cmd, "lora"))
		return lora_cli_main(argc - 2, argv + 2);
	if (!strcmp(cmd, "data"))
		return data_cli_main(argc - 2, argv + 2);
	fprintf(stderr, "moe: unknown command '%s'\n", cmd);
	usage();
	return 2;
}
