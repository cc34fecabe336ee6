/*
 * train/train_cli.c - the `moe` subcommands of train/ that parse their own options: plot (train/plot.c
 * draws) and convert (train/convert.c converts).  moe train, init, eval and inspect share moe.c's
 * options.
 */
#define _POSIX_C_SOURCE 200809L

#include "train/train_cli.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/checkpoint.h"
#include "train/convert.h"
#include "train/lora_run.h"
#include "train/plot.h"

/* ---- moe plot ------------------------------------------------------------------------------ */

static int plot_usage(int status)
{
	fprintf(status ? stderr : stdout, "usage: moe plot --metrics FILE --key K [--key K2 ...] --out FILE.png [--title T]\n"
	       "                [--size WxH]\n"
	       "Plots the keys of a metrics file (JSON Lines with a \"step\" per line, as train and grpo\n"
	       "write under log.metrics) against the step into a PNG; up to %d keys, default size 800x500.\n",
	       PLOT_MAX_KEYS);
	return status;
}

int plot_cli_main(int argc, char **argv)
{
	const char *metrics = NULL, *out = NULL, *title = NULL, *keys[PLOT_MAX_KEYS];
	int nkeys = 0, w = 800, h = 500;
	char err[1024], tail;

	for (int i = 0; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(a, "--help") || !strcmp(a, "-h"))
			return plot_usage(0);
		if (!v || (strcmp(a, "--metrics") && strcmp(a, "--key") && strcmp(a, "--out") &&
			   strcmp(a, "--title") && strcmp(a, "--size"))) {
			fprintf(stderr, "moe plot: %s '%s'\n", v ? "unknown option" : "no value for", a);
			return plot_usage(2);
		}
		i++;
		if (!strcmp(a, "--metrics"))
			metrics = v;
		else if (!strcmp(a, "--out"))
			out = v;
		else if (!strcmp(a, "--title"))
			title = v;
		else if (!strcmp(a, "--key") && nkeys < PLOT_MAX_KEYS)
			keys[nkeys++] = v;
		else if (strcmp(a, "--size") || sscanf(v, "%dx%d%c", &w, &h, &tail) != 2) {
			fprintf(stderr, "moe plot: %s '%s': %s\n", a, v,
				strcmp(a, "--key") ? "want WxH" : "too many keys");
			return plot_usage(2);
		}
	}
	if (!metrics || !out || !nkeys) {
		fprintf(stderr, "moe plot: --metrics, --out and at least one --key are needed\n");
		return plot_usage(2);
	}
	if (plot_metrics(metrics, keys, nkeys, title, out, w, h, err, sizeof(err))) {
		fprintf(stderr, "moe plot: %s\n", err);
		return 1;
	}
	printf("wrote %s (%dx%d, %d key%s)\n", out, w, h, nkeys, nkeys > 1 ? "s" : "");
	return 0;
}

/* ---- moe convert --------------------------------------------------------------------------- */

/* "5000000000", "5GB", "500MB", "64KiB", ... (HF's units: GB = 10^9, GiB = 2^30). */
static int parse_size(const char *s, uint64_t *out)
{
	static const struct {
		const char *unit;
		uint64_t mul;
	} units[] = {
		{ "", 1 }, { "B", 1 }, { "KB", 1000 }, { "MB", 1000000 }, { "GB", 1000000000 },
		{ "KiB", 1 << 10 }, { "MiB", 1 << 20 }, { "GiB", 1 << 30 },
	};
	char *end;
	unsigned long long v;

	if (*s < '0' || *s > '9')
		return -1;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno)
		return -1;
	for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
		if (strcmp(end, units[i].unit))
			continue;
		if (v > UINT64_MAX / units[i].mul)
			return -1;
		*out = v * units[i].mul;
		return *out ? 0 : -1;
	}
	return -1;
}

static int convert_usage(int code)
{
	FILE *f = code ? stderr : stdout;

	fprintf(f, "usage: moe convert --from-hf DIR --out CKPT.h5\n"
		"       moe convert --to-hf CKPT.h5 --out DIR [--dtype f32|bf16|fp8] [--shard-size BYTES]\n"
		"--from-hf: a Hugging Face DeepseekV3/V2 directory (config.json, *.safetensors, with\n"
		"  model.safetensors.index.json when sharded) to an HDF5 checkpoint (step 0); F32, BF16,\n"
		"  F16 and DeepSeek's block-scaled F8_E4M3 weights (NAME_scale_inv, blocks of\n"
		"  quantization_config.weight_block_size) dequantised, per-expert tensors stacked.\n"
		"  The num_nextn_predict_layers multi-token-prediction layers (model.layers.N,\n"
		"  N >= num_hidden_layers) are imported; their embed_tokens / shared_head.head copies\n"
		"  are the model's own (shape-checked, not read) and are written back by --to-hf.\n"
		"  Missing, unexpected or misshapen tensors are refused by name; rotary inv_freq\n"
		"  buffers and layers beyond the config's MTP depths are skipped.\n"
		"--to-hf: a checkpoint's weights to DIR (created; it must not hold weights already):\n"
		"  config.json (DeepseekV3ForCausalLM), model.safetensors or shards of at most\n"
		"  --shard-size bytes of data (default 5GB; units B, KB, MB, GB, KiB, MiB, GiB) with\n"
		"  model.safetensors.index.json.  --dtype f32 (default, lossless), bf16 (rounded to\n"
		"  nearest even; the routing bias stays f32) or fp8 (DeepSeek-V3's layout: linear\n"
		"  weights F8_E4M3 with one f32 scale per 128 x 128 block, embeddings, norms, router\n"
		"  and lm_head bf16, the routing bias f32; quantization_config in config.json).\n");
	return code;
}

int convert_cli_main(int argc, char **argv)
{
	const char *from = NULL, *to = NULL, *out = NULL, *dtype = "f32", *shard = NULL;
	struct convert_to_hf_opts o = { ST_F32, CONVERT_DEFAULT_SHARD_BYTES };
	char err[2048];

	for (int i = 0; i < argc; i++) {
		const char *a = argv[i], **slot = NULL;

		if (!strcmp(a, "--help") || !strcmp(a, "-h"))
			return convert_usage(0);
		if (!strcmp(a, "--from-hf"))
			slot = &from;
		else if (!strcmp(a, "--to-hf"))
			slot = &to;
		else if (!strcmp(a, "--out"))
			slot = &out;
		else if (!strcmp(a, "--dtype"))
			slot = &dtype;
		else if (!strcmp(a, "--shard-size"))
			slot = &shard;
		if (!slot) {
			fprintf(stderr, "moe convert: unknown option '%s'\n", a);
			return convert_usage(2);
		}
		if (i + 1 >= argc) {
			fprintf(stderr, "moe convert: %s needs a value\n", a);
			return 2;
		}
		*slot = argv[++i];
	}
	if (!!from == !!to || !out) {
		fprintf(stderr, "moe convert: give one of --from-hf DIR or --to-hf CKPT, and --out\n");
		return convert_usage(2);
	}
	if (from) {
		if (shard || strcmp(dtype, "f32")) {
			fprintf(stderr, "moe convert: --dtype and --shard-size go with --to-hf\n");
			return 2;
		}
		if (convert_from_hf(from, out, stderr, err, sizeof(err))) {
			fprintf(stderr, "moe convert: %s\n", err);
			return 1;
		}
		printf("wrote %s from %s\n", out, from);
		return 0;
	}
	if (!strcmp(dtype, "bf16")) {
		o.dtype = ST_BF16;
	} else if (!strcmp(dtype, "fp8")) {
		o.dtype = ST_F8_E4M3;
	} else if (strcmp(dtype, "f32")) {
		fprintf(stderr, "moe convert: --dtype %s: expected f32, bf16 or fp8\n", dtype);
		return 2;
	}
	if (shard && parse_size(shard, &o.shard_bytes)) {
		fprintf(stderr, "moe convert: --shard-size %s: expected a positive byte count such as "
			"5GB or 1000000\n", shard);
		return 2;
	}
	if (convert_to_hf(to, out, &o, stderr, err, sizeof(err))) {
		fprintf(stderr, "moe convert: %s\n", err);
		return 1;
	}
	printf("wrote %s from %s\n", out, to);
	return 0;
}

/* ---------------------------------------------------------------- moe lora merge */

static int merge_usage(FILE *f)
{
	fprintf(f, "usage: moe lora merge --checkpoint ADAPTERS.h5 --out MERGED.h5\n"
		"Folds the LoRA adapters of an adapter checkpoint into its base (W += alpha/rank * B A) and\n"
		"writes a full weights-only checkpoint, which runs without the lora section.\n");
	return f == stdout ? 0 : 2;
}

static int lora_merge_main(int argc, char **argv)
{
	const char *in = NULL, *out = NULL;
	for (int i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h"))
			return merge_usage(stdout);
		if (!strcmp(argv[i], "--checkpoint") && i + 1 < argc)
			in = argv[++i];
		else if (!strcmp(argv[i], "--out") && i + 1 < argc)
			out = argv[++i];
		else {
			fprintf(stderr, "moe lora merge: unknown argument %s\n", argv[i]);
			return merge_usage(stderr);
		}
	}
	if (!in || !out)
		return merge_usage(stderr);
	char err[1024];
	struct run_config rc;
	struct ckpt_meta meta;
	config_defaults(&rc);
	if (checkpoint_read_header(in, &rc, &meta, err, sizeof(err))) {
		fprintf(stderr, "moe lora merge: %s\n", err);
		return 1;
	}
	if (rc.lora.rank == 0) {
		fprintf(stderr, "moe lora merge: %s holds no LoRA adapters (its config has lora.rank = 0)\n", in);
		return 1;
	}
	struct moe_model *m = model_create(&rc.model, 0, rc.model.n_routed_experts, err, sizeof(err));
	int rcode = 1;
	if (!m || lora_load_for_inference(in, &rc, m, NULL, err, sizeof(err)))
		goto out;
	/* the merged model is a plain one */
	rc.lora.rank = 0;
	rc.lora.n_targets = 0;
	rc.lora.base[0] = rc.lora.base_checksum[0] = 0;
	rc.train.init_checkpoint[0] = 0;
	if (checkpoint_save_model(out, m, &rc, &meta, err, sizeof(err)))
		goto out;
	printf("merged the adapters of %s into its base: wrote %s\n", in, out);
	rcode = 0;
out:
	if (rcode)
		fprintf(stderr, "moe lora merge: %s\n", err);
	model_free(m);
	return rcode;
}

int lora_cli_main(int argc, char **argv)
{
	if (argc >= 1 && !strcmp(argv[0], "merge"))
		return lora_merge_main(argc - 1, argv + 1);
	fprintf(stderr, "usage: moe lora merge --checkpoint ADAPTERS.h5 --out MERGED.h5\n");
	return argc >= 1 && (!strcmp(argv[0], "--help") || !strcmp(argv[0], "-h")) ? 0 : 2;
}
