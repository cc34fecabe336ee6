/*
 * rl/rl_cli.c - `moe generate`: its options, the checkpoint's config and weights, the tokenizer, the
 * completions printed (rl/generate.c samples them).
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "data/shard.h"
#include "data/tokenizer.h"
#include "model/quant.h"
#include "rl/generate.h"
#include "rl/prompts.h"
#include "rl/rl_cli.h"
#include "train/checkpoint.h"
#include "train/lora_run.h"
#include "train/config.h"

static void gen_usage(FILE *f)
{
	fprintf(f,
		"usage: moe generate --checkpoint CKPT.h5 (--prompt TEXT | --prompt-ids ID,ID,... |\n"
		"                    --prompts FILE.jsonl --out-shard SHARD.bin)\n"
		"                    [--tokenizer tokenizer.json] [--max-new-tokens N (64)] [--temperature T (1)]\n"
		"                    [--top-p P (1)] [--top-k K (0: off)] [--seed S (0)] [--num-samples G (1)]\n"
		"                    [--eos ID] [--weights full|int8] [--speculative] [--set section.key=value ...]\n"
		"Samples G completions of the prompt with the MLA latent cache (temperature 0: greedy) and prints\n"
		"each (as text with a tokenizer, else as ids).  The tokenizer defaults to grpo.tokenizer; the stop\n"
		"id to the tokenizer's end of text (--eos -1: never stop early).  --weights int8: every linear\n"
		"layer's weight int8 with a scale per row (model/quant.h), quantised once at load.\n"
		"--prompts (JSON Lines with a \"prompt\" string per line, as grpo.prompts) and --out-shard: for\n"
		"every prompt, G completions written to a token shard that moe train reads, each sample as its\n"
		"prompt's tokens, the completion's, then the end-of-text id (sequence-level distillation from a\n"
		"teacher).  Prompt i's samples are seeded by (seed, i).\n"
		"--speculative: self-speculative greedy decoding (--temperature 0, one sample, a checkpoint with\n"
		"model.num_nextn_predict_layers >= 1): the multi-token-prediction head drafts each next token and\n"
		"the main model verifies it; the tokens are greedy decoding's, the acceptance rate is printed.\n");
}

static int parse_int(const char *s, long lo, long hi, long *out)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi)
		return -1;
	*out = v;
	return 0;
}

static int parse_double(const char *s, double *out)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno || end == s || *end || !isfinite(v))
		return -1;
	*out = v;
	return 0;
}

static struct moe_model *load_model(const char *ckpt, const struct run_config *rc, int int8)
{
	char err[1024];
	struct moe_model *m = model_create(&rc->model, 0, rc->model.n_routed_experts, err, sizeof(err));
	/* an adapter checkpoint: its base with the adapters merged (decode absorbs kv_b_proj) */
	if (!m || lora_load_for_inference(ckpt, rc, m, NULL, err, sizeof(err))) {
		fprintf(stderr, "moe generate: %s\n", err);
		model_free(m);
		return NULL;
	}
	if (int8 && model_quantize(m)) {
		fprintf(stderr, "moe generate: out of memory quantising the weights\n");
		model_free(m);
		return NULL;
	}
	if (int8)
		quant_drop_fp32(m);  /* the fp32 linear weights are not read again */
	return m;
}

/* One prompt's G samples into the shard: prompt, completion (without its eos), the end-of-text id. */
static int write_samples(struct shard_writer *w, const int *prompt, int n_prompt, const int *out,
			 const int *lens, int G, int max_new, int eos, uint32_t eot, uint64_t *new_tokens)
{
	char err[1024];
	uint32_t *buf = malloc(sizeof(uint32_t) * ((size_t)n_prompt + max_new + 1));
	if (!buf) {
		fprintf(stderr, "moe generate: out of memory\n");
		return -1;
	}
	for (int g = 0; g < G; g++) {
		const int *o = out + (size_t)g * max_new;
		int n = 0, len = lens[g];
		if (len > 0 && o[len - 1] == eos)
			len--;
		for (int i = 0; i < n_prompt; i++)
			buf[n++] = (uint32_t)prompt[i];
		for (int i = 0; i < len; i++)
			buf[n++] = (uint32_t)o[i];
		buf[n++] = eot;
		*new_tokens += (uint64_t)len;
		if (shard_writer_append(w, buf, (size_t)n, err, sizeof(err))) {
			fprintf(stderr, "moe generate: --out-shard: %s\n", err);
			free(buf);
			return -1;
		}
	}
	free(buf);
	return 0;
}

/*
 * --prompts FILE --out-shard PATH: G samples of every prompt into one shard (written to PATH.tmp,
 * renamed when complete).  0 or -1 after printing why.
 */
static int prompts_to_shard(struct moe_model *m, struct tokenizer *tok, const char *prompts_path,
			    const char *out_path, int G, const struct sample_params *sp0)
{
	char err[1024];
	struct prompt_set ps = { 0 };
	struct shard_writer w;
	struct tok_ids ids = { 0 };
	int V = m->cfg.vocab_size, rc = -1, opened = 0;
	int *out = malloc(sizeof(int) * ((size_t)G * sp0->max_new_tokens + 1));
	int *lens = calloc((size_t)G * 2, sizeof(int)), *ptok = NULL;
	const int **prompts = calloc((size_t)G, sizeof(*prompts));
	uint64_t new_tokens = 0;
	if (!out || !lens || !prompts) {
		fprintf(stderr, "moe generate: out of memory\n");
		goto done;
	}
	if (tokenizer_eot_id(tok) < 0) {
		fprintf(stderr, "moe generate: --out-shard: the tokenizer has no end-of-text token to separate "
			"the samples\n");
		goto done;
	}
	if (prompt_set_load(&ps, prompts_path, err, sizeof(err))) {
		fprintf(stderr, "moe generate: --prompts: %s\n", err);
		goto done;
	}
	if (shard_writer_open(&w, out_path, V <= 65536 ? 2 : 4, err, sizeof(err))) {
		fprintf(stderr, "moe generate: --out-shard: %s\n", err);
		goto done;
	}
	opened = 1;
	for (int i = 0; i < ps.n; i++) {
		ids.n = 0;  /* tokenizer_encode appends */
		tokenizer_encode(tok, ps.text[i], strlen(ps.text[i]), &ids);
		free(ptok);
		ptok = malloc(sizeof(int) * (ids.n + 1));
		if (!ptok) {
			fprintf(stderr, "moe generate: out of memory\n");
			goto done;
		}
		for (size_t k = 0; k < ids.n; k++) {
			if (ids.v[k] >= (uint32_t)V) {
				fprintf(stderr, "moe generate: %s:%d: token %u is outside the model's vocab %d\n",
					ps.path, ps.line[i], (unsigned)ids.v[k], V);
				goto done;
			}
			ptok[k] = (int)ids.v[k];
		}
		int *plens = lens + G;
		for (int g = 0; g < G; g++) {
			prompts[g] = ptok;
			plens[g] = (int)ids.n;
		}
		struct sample_params sp = *sp0;
		sp.seed = gen_sequence_seed(sp0->seed, i);
		if (generate(m, prompts, plens, G, &sp, out, lens, NULL)) {
			fprintf(stderr, "moe generate: %s:%d: generation failed (a prompt of %zu tokens plus "
				"%d new ones longer than model.max_position_embeddings, or out of memory)\n",
				ps.path, ps.line[i], ids.n, sp.max_new_tokens);
			goto done;
		}
		if (write_samples(&w, ptok, (int)ids.n, out, lens, G, sp.max_new_tokens, sp.eos_id,
				  (uint32_t)tokenizer_eot_id(tok), &new_tokens))
			goto done;
	}
	uint64_t total = w.n_tokens;
	opened = 0;
	if (shard_writer_close(&w, err, sizeof(err))) {
		fprintf(stderr, "moe generate: --out-shard: %s\n", err);
		goto done;
	}
	fprintf(stderr, "moe generate: %d prompts x %d samples: %llu tokens (%llu generated) into %s\n", ps.n,
		G, (unsigned long long)total, (unsigned long long)new_tokens, out_path);
	rc = 0;
done:
	if (opened)
		shard_writer_abort(&w);
	tok_ids_free(&ids);
	prompt_set_free(&ps);
	free(ptok);
	free(out);
	free(lens);
	free(prompts);
	return rc;
}

int generate_cli_main(int argc, char **argv)
{
	const char *ckpt = NULL, *prompt = NULL, *prompt_ids = NULL, *tok_path = NULL;
	const char *prompts_path = NULL, *out_shard = NULL;
	const char *sets[64];
	int nsets = 0, G = 1, eos_set = 0, int8 = 0, speculative = 0;
	long eos = -1;
	struct sample_params sp = sample_params_default();
	sp.max_new_tokens = 64;

	for (int i = 0; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--speculative")) {
			speculative = 1;
			continue;
		}
		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			gen_usage(stdout);
			return 0;
		}
		if (i + 1 >= argc) {
			fprintf(stderr, "moe generate: %s needs a value (or is unknown)\n", a);
			return 2;
		}
		const char *v = argv[++i];
		long iv;
		double dv;
		int bad = 0;
		if (!strcmp(a, "--checkpoint"))
			ckpt = v;
		else if (!strcmp(a, "--prompt"))
			prompt = v;
		else if (!strcmp(a, "--prompt-ids"))
			prompt_ids = v;
		else if (!strcmp(a, "--prompts"))
			prompts_path = v;
		else if (!strcmp(a, "--out-shard"))
			out_shard = v;
		else if (!strcmp(a, "--tokenizer"))
			tok_path = v;
		else if (!strcmp(a, "--max-new-tokens"))
			bad = parse_int(v, 0, 1 << 24, &iv) || ((sp.max_new_tokens = (int)iv), 0);
		else if (!strcmp(a, "--temperature"))
			bad = parse_double(v, &dv) || dv < 0 || ((sp.temperature = (float)dv), 0);
		else if (!strcmp(a, "--top-p"))
			bad = parse_double(v, &dv) || dv <= 0 || dv > 1 || ((sp.top_p = (float)dv), 0);
		else if (!strcmp(a, "--top-k"))
			bad = parse_int(v, 0, 1L << 30, &iv) || ((sp.top_k = (int)iv), 0);
		else if (!strcmp(a, "--seed"))
			bad = parse_int(v, 0, LONG_MAX, &iv) || ((sp.seed = (uint64_t)iv), 0);
		else if (!strcmp(a, "--num-samples"))
			bad = parse_int(v, 1, 4096, &iv) || ((G = (int)iv), 0);
		else if (!strcmp(a, "--eos"))
			bad = parse_int(v, -1, 1L << 30, &eos) || ((eos_set = 1), 0);
		else if (!strcmp(a, "--weights"))
			bad = strcmp(v, "full") && strcmp(v, "int8") ? 1 : ((int8 = !strcmp(v, "int8")), 0);
		else if (!strcmp(a, "--set")) {
			if (nsets == 64) {
				fprintf(stderr, "moe generate: too many --set options (at most 64)\n");
				return 2;
			}
			sets[nsets++] = v;
		} else {
			fprintf(stderr, "moe generate: unknown option %s\n", a);
			return 2;
		}
		if (bad) {
			fprintf(stderr, "moe generate: bad value for %s: %s\n", a, v);
			return 2;
		}
	}
	if (!ckpt || (!!prompt + !!prompt_ids + !!prompts_path) != 1) {
		gen_usage(stderr);
		return 2;
	}
	if (!prompts_path != !out_shard) {
		fprintf(stderr, "moe generate: --prompts and --out-shard go together\n");
		return 2;
	}
	if (speculative && (sp.temperature > 0.0f || G != 1 || prompts_path)) {
		fprintf(stderr, "moe generate: --speculative is greedy decoding of one prompt: it takes "
			"--temperature 0, one sample and --prompt or --prompt-ids\n");
		return 2;
	}

	char err[1024], key[128];
	struct run_config rc;
	config_defaults(&rc);
	if (checkpoint_read_header(ckpt, &rc, NULL, err, sizeof(err))) {
		fprintf(stderr, "moe generate: %s\n", err);
		return 1;
	}
	if (speculative && rc.model.num_nextn_predict_layers < 1) {
		fprintf(stderr, "moe generate: --speculative: %s has no multi-token-prediction layer "
			"(model.num_nextn_predict_layers = 0)\n", ckpt);
		return 1;
	}
	struct model_config saved = rc.model;
	for (int i = 0; i < nsets; i++)
		if (config_set(&rc, sets[i], err, sizeof(err))) {
			fprintf(stderr, "moe generate: %s\n", err);
			return 1;
		}
	if (config_model_diff(&saved, &rc.model, key, sizeof(key))) {
		fprintf(stderr, "moe generate: --set %s would change the checkpoint's model\n", key);
		return 1;
	}
	if (!tok_path && rc.grpo.tokenizer[0])
		tok_path = rc.grpo.tokenizer;

	int status = 1, V = rc.model.vocab_size;
	struct tokenizer *tok = NULL;
	struct moe_model *m = NULL;
	struct tok_ids ids = { 0 };
	int *prompt_tok = NULL, n_prompt = 0, *out = NULL, *lens = NULL;
	const int **prompts = NULL;
	if (tok_path) {
		tok = tokenizer_load(tok_path, err, sizeof(err));
		if (!tok && prompt) {
			fprintf(stderr, "moe generate: %s\n", err);
			goto done;
		}
		if (!tok)  /* ids in, ids out */
			fprintf(stderr, "moe generate: warning: %s; printing ids\n", err);
	}
	if (prompts_path) {
		if (!tok) {
			fprintf(stderr, "moe generate: --prompts needs --tokenizer (or grpo.tokenizer)\n");
			goto done;
		}
		sp.eos_id = eos_set ? (int)eos : tokenizer_eot_id(tok);
		m = load_model(ckpt, &rc, int8);
		if (m && !prompts_to_shard(m, tok, prompts_path, out_shard, G, &sp))
			status = 0;
		goto done;
	}
	if (prompt) {
		if (!tok) {
			fprintf(stderr, "moe generate: --prompt TEXT needs --tokenizer (or grpo.tokenizer); "
					"--prompt-ids takes ids\n");
			goto done;
		}
		tokenizer_encode(tok, prompt, strlen(prompt), &ids);
		n_prompt = (int)ids.n;
		prompt_tok = malloc(sizeof(int) * (ids.n + 1));
		for (size_t i = 0; prompt_tok && i < ids.n; i++)
			prompt_tok[i] = (int)ids.v[i];
	} else {
		prompt_tok = malloc(sizeof(int) * (strlen(prompt_ids) / 2 + 2));
		for (const char *p = prompt_ids; prompt_tok && *p;) {
			char *end;
			long id = strtol(p, &end, 10);
			if (end == p || id < 0 || id >= V) {
				fprintf(stderr, "moe generate: --prompt-ids: bad id at \"%s\" (vocab %d)\n", p, V);
				goto done;
			}
			prompt_tok[n_prompt++] = (int)id;
			p = end;
			while (*p == ',' || *p == ' ')
				p++;
		}
	}
	if (!prompt_tok) {
		fprintf(stderr, "moe generate: out of memory\n");
		goto done;
	}
	if (n_prompt == 0) {
		fprintf(stderr, "moe generate: the prompt is empty\n");
		goto done;
	}
	for (int i = 0; i < n_prompt; i++)
		if (prompt_tok[i] >= V) {
			fprintf(stderr, "moe generate: prompt token %d is outside the model's vocab %d\n",
				prompt_tok[i], V);
			goto done;
		}
	sp.eos_id = eos_set ? (int)eos : (tok ? tokenizer_eot_id(tok) : -1);

	m = load_model(ckpt, &rc, int8);
	if (!m)
		goto done;
	out = malloc(sizeof(int) * ((size_t)G * sp.max_new_tokens + 1));
	/* zeroed: with the sanitizers GCC cannot tell that the loop below fills them */
	lens = calloc((size_t)G * 2, sizeof(int));
	prompts = calloc((size_t)G, sizeof(*prompts));
	if (!out || !lens || !prompts) {
		fprintf(stderr, "moe generate: out of memory\n");
		goto done;
	}
	int *plens = lens + G;
	for (int g = 0; g < G; g++) {
		prompts[g] = prompt_tok;
		plens[g] = n_prompt;
	}
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	struct spec_stats st;
	if (speculative ? generate_speculative(m, prompt_tok, n_prompt, &sp, out, lens, &st) :
			  generate(m, prompts, plens, G, &sp, out, lens, NULL)) {
		fprintf(stderr, "moe generate: generation failed (out of memory?)\n");
		goto done;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	if (speculative)
		fprintf(stderr, "moe generate: speculative: %lld of %lld drafts accepted (%.1f%%), %lld main-model "
			"steps after the prompt\n", st.accepted, st.drafted,
			st.drafted ? 100.0 * st.accepted / st.drafted : 0.0, st.main_steps);
	long total = 0;
	for (int g = 0; g < G; g++) {
		const int *o = out + (size_t)g * sp.max_new_tokens;
		total += lens[g];
		if (G > 1)
			printf("=== sample %d (%d tokens)\n", g, lens[g]);
		struct tok_bytes text = { 0 };
		uint32_t *u = tok ? malloc(sizeof(uint32_t) * ((size_t)lens[g] + 1)) : NULL;
		if (u) {
			for (int t = 0; t < lens[g]; t++)
				u[t] = (uint32_t)o[t];
		}
		if (u && !tokenizer_decode(tok, u, (size_t)lens[g], &text, err, sizeof(err))) {
			fwrite(text.v, 1, text.n, stdout);
			printf("\n");
		} else {
			for (int t = 0; t < lens[g]; t++)
				printf("%s%d", t ? " " : "", o[t]);
			printf("\n");
		}
		tok_bytes_free(&text);
		free(u);
	}
	double s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
	fprintf(stderr, "moe generate: %d sample(s), prompt %d tokens, %ld new tokens in %.2f s (%.1f tokens/s); "
		"latent cache %zu bytes per token\n", G, n_prompt, total, s, s > 0 ? total / s : 0.0,
		latent_cache_bytes_per_token(&rc.model));
	fflush(stdout);
	status = 0;
done:
	free(prompts);
	free(lens);
	free(out);
	free(prompt_tok);
	tok_ids_free(&ids);
	if (tok)
		tokenizer_free(tok);
	model_free(m);
	return status;
}
