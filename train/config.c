/*
 * train/config.c - the run configuration (SPEC 3).
 *
 * One table, cfg_keys[], lists every key with its section, type and place in struct run_config.  JSON
 * loading, `--set`, config_to_json, config_model_diff and the generic range checks all walk that table;
 * only the checks that tie keys together are written out by hand (config_validate).  The Hugging Face
 * keys the model section takes without a field of its own are train/config_hf.c's.
 */
#include "train/config.h"
#include "launch/errmsg.h"
#include "model/mtp.h"
#include "train/config_hf.h"
#include "train/config_rewards.h"
#include "model/lora.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

enum cfg_type {
	CT_INT,         /* int */
	CT_I64,         /* long long (|value| <= 2^53: JSON numbers are doubles) */
	CT_DBL,         /* double, finite */
	CT_BOOL,        /* bool */
	CT_STR,         /* char[size] */
	CT_ARGV,        /* char[CFG_MAX_ARGV][CFG_STR] with an int count at aux */
	CT_SCORING,     /* enum moe_scoring as "softmax" | "sigmoid" */
	CT_ROPE,        /* struct rope_scaling as HF's rope_scaling object, or null */
	CT_REWARDS,     /* grpo.rewards: the list of reward programs (config_rewards.c) */
	CT_PIECEWISE,   /* struct piecewise: a number or {"steps": [...], "values": [...]} */
};

enum {
	CF_NULL = 1u << 0,  /* JSON null reads as 0 / "" (HF writes null for absent features) */
	CF_POS = 1u << 1,   /* must be > 0 */
	CF_NNEG = 1u << 2,  /* must be >= 0 */
};

struct cfg_key {
	const char *section;
	const char *name;
	enum cfg_type type;
	unsigned flags;
	size_t off;                     /* in struct run_config */
	size_t size;                    /* of the field */
	size_t aux;                     /* CT_ARGV: offset of the count */
	const char *const *choices;     /* CT_STR: allowed values (NULL-terminated), checked by validate */
};

#define FSZ(sec, f) sizeof(((struct run_config *)0)->sec.f)
#define OFF(sec, f) offsetof(struct run_config, sec.f)
/* 0, or a compile error when cond is false (the field's type disagrees with the table). */
#define CHK(cond) (0 * sizeof(char[(cond) ? 1 : -1]))
#define KEY(sec, f, t, fl, sz_ok) \
	{ .section = #sec, .name = #f, .type = t, .flags = fl, .off = OFF(sec, f), \
	  .size = FSZ(sec, f) + CHK(sz_ok) }

#define K_INT(sec, f, fl) KEY(sec, f, CT_INT, fl, FSZ(sec, f) == sizeof(int))
#define K_I64(sec, f, fl) KEY(sec, f, CT_I64, fl, FSZ(sec, f) == sizeof(long long))
#define K_DBL(sec, f, fl) KEY(sec, f, CT_DBL, fl, FSZ(sec, f) == sizeof(double))
#define K_BOOL(sec, f) KEY(sec, f, CT_BOOL, 0, FSZ(sec, f) == sizeof(bool))
/* 1 when the field is a char array (not a pointer) */
#define IS_CHARS(sec, f) \
	_Generic(&((struct run_config *)0)->sec.f, char (*)[FSZ(sec, f)]: 1, default: 0)
#define K_STR(sec, f, fl) KEY(sec, f, CT_STR, fl, IS_CHARS(sec, f))
#define K_ENUM(sec, f, ch) \
	{ .section = #sec, .name = #f, .type = CT_STR, .off = OFF(sec, f), \
	  .size = FSZ(sec, f) + CHK(IS_CHARS(sec, f)), .choices = ch }
#define K_SCORING(sec, f) KEY(sec, f, CT_SCORING, 0, FSZ(sec, f) == sizeof(enum moe_scoring))
#define K_ROPE(sec, f) KEY(sec, f, CT_ROPE, 0, FSZ(sec, f) == sizeof(struct rope_scaling))
#define K_PIECEWISE(sec, f) KEY(sec, f, CT_PIECEWISE, 0, FSZ(sec, f) == sizeof(struct piecewise))
/* grpo.rewards only: its handlers take the whole grpo section (the list and its count) */
#define K_REWARDS(sec, f) \
	KEY(sec, f, CT_REWARDS, 0, FSZ(sec, f) == sizeof(struct reward_config) * CFG_MAX_REWARDS)
#define K_ARGV(sec, f, count) \
	{ .section = #sec, .name = #f, .type = CT_ARGV, .off = OFF(sec, f), \
	  .size = FSZ(sec, f) + CHK(FSZ(sec, f) == CFG_MAX_ARGV * CFG_STR), \
	  .aux = OFF(sec, count) + CHK(FSZ(sec, count) == sizeof(int)) }

static const char *const schedules[] = { "cosine", "wsd", "constant", NULL };
static const char *const devices[] = { "auto", "cpu", "cuda", NULL };
static const char *const comms[] = { "auto", "nccl", "mpi", NULL };
static const char *const nonfinite[] = { "skip", "stop", NULL };
static const char *const attentions[] = { "auto", "cudnn", "own", NULL };
static const char *const loss_types[] = { "grpo", "bnpo", "dr_grpo", "dapo", NULL };
static const char *const reward_scalings[] = { "group", "batch", "none", NULL };
static const char *const reward_norms[] = { "total", "each", NULL };
static const char *const weight_formats[] = { "full", "int8", NULL };
static const char *const kl_directions[] = { "forward", "reverse", NULL };

static const struct cfg_key cfg_keys[] = {
	/* model: Hugging Face DeepseekV3 names */
	K_INT(model, vocab_size, CF_POS),
	K_INT(model, hidden_size, CF_POS),
	K_INT(model, intermediate_size, CF_NNEG),
	K_INT(model, moe_intermediate_size, CF_NNEG),
	K_INT(model, num_hidden_layers, CF_POS),
	K_INT(model, num_attention_heads, CF_POS),
	K_INT(model, num_key_value_heads, CF_NULL | CF_NNEG),  /* 0/null: equal to the heads */
	K_INT(model, n_shared_experts, CF_NULL | CF_NNEG),
	K_INT(model, n_routed_experts, CF_NULL | CF_NNEG),
	K_DBL(model, routed_scaling_factor, CF_POS),
	K_INT(model, kv_lora_rank, CF_POS),
	K_INT(model, q_lora_rank, CF_NULL | CF_NNEG),
	K_INT(model, qk_rope_head_dim, CF_POS),
	K_INT(model, qk_nope_head_dim, CF_POS),
	K_INT(model, v_head_dim, CF_POS),
	K_INT(model, n_group, CF_NULL | CF_NNEG),
	K_INT(model, topk_group, CF_NULL | CF_NNEG),
	K_INT(model, num_experts_per_tok, CF_NULL | CF_NNEG),
	K_INT(model, moe_layer_freq, CF_POS),
	K_INT(model, first_k_dense_replace, CF_NNEG),
	K_BOOL(model, norm_topk_prob),
	K_SCORING(model, scoring_func),
	K_DBL(model, aux_loss_alpha, CF_NNEG),
	K_BOOL(model, seq_aux),
	K_INT(model, max_position_embeddings, CF_POS),
	K_DBL(model, initializer_range, CF_POS),
	K_DBL(model, rms_norm_eps, CF_POS),
	K_DBL(model, rope_theta, CF_POS),
	K_ROPE(model, rope_scaling),
	K_INT(model, bos_token_id, CF_NNEG),
	K_INT(model, eos_token_id, CF_NNEG),
	K_BOOL(model, tie_word_embeddings),
	K_BOOL(model, attention_bias),
	K_INT(model, num_nextn_predict_layers, CF_NULL | CF_NNEG),
	/* train */
	K_INT(train, steps, CF_NNEG),
	K_INT(train, stop_at, CF_NNEG),
	K_INT(train, seq_len, CF_POS),
	K_INT(train, micro_batch, CF_POS),
	K_INT(train, grad_accum, CF_POS),
	K_DBL(train, lr, CF_NNEG),
	K_DBL(train, min_lr, CF_NNEG),
	K_INT(train, warmup_steps, CF_NNEG),
	K_ENUM(train, schedule, schedules),
	K_DBL(train, decay_frac, CF_NNEG),
	K_DBL(train, weight_decay, CF_NNEG),
	K_BOOL(train, decay_embeddings),
	K_DBL(train, beta1, CF_NNEG),
	K_DBL(train, beta2, CF_NNEG),
	K_DBL(train, eps, CF_POS),
	K_DBL(train, grad_clip, CF_NNEG),
	K_DBL(train, bias_update_speed, CF_NNEG),
	K_I64(train, seed, 0),
	K_ENUM(train, device, devices),
	K_INT(train, eval_every, CF_NNEG),
	K_INT(train, eval_batches, CF_NNEG),
	K_STR(train, init_checkpoint, CF_NULL),
	K_ENUM(train, on_nonfinite, nonfinite),
	K_PIECEWISE(train, mtp_lambda),
	K_ENUM(train, attention, attentions),
	/* data */
	K_STR(data, train, CF_NULL),
	K_STR(data, val, CF_NULL),
	K_BOOL(data, shuffle),
	/* parallel */
	K_INT(parallel, ep, CF_POS),
	K_INT(parallel, zero, CF_NNEG),
	K_ENUM(parallel, comm, comms),
	K_DBL(parallel, bucket_mb, CF_POS),
	/* checkpoint */
	K_STR(checkpoint, dir, 0),
	K_INT(checkpoint, every, CF_NNEG),
	K_INT(checkpoint, keep, CF_POS),
	/* log */
	K_STR(log, metrics, CF_NULL),
	K_INT(log, every, CF_POS),
	/* grpo */
	K_STR(grpo, prompts, CF_NULL),
	K_ARGV(grpo, reward_cmd, reward_cmd_argc),
	K_DBL(grpo, reward_timeout_s, CF_POS),
	K_INT(grpo, group_size, CF_POS),
	K_INT(grpo, prompts_per_step, CF_POS),
	K_INT(grpo, max_new_tokens, CF_POS),
	K_DBL(grpo, temperature, CF_POS),
	K_DBL(grpo, top_p, CF_POS),
	K_INT(grpo, top_k, CF_NNEG),
	K_DBL(grpo, beta, CF_NNEG),
	K_DBL(grpo, epsilon, CF_NNEG),
	K_DBL(grpo, epsilon_high, CF_NNEG),
	K_INT(grpo, num_iterations, CF_POS),
	K_ENUM(grpo, loss_type, loss_types),
	K_ENUM(grpo, scale_rewards, reward_scalings),
	K_STR(grpo, tokenizer, CF_NULL),
	K_BOOL(grpo, mask_truncated),
	K_BOOL(grpo, routing_replay),
	K_BOOL(grpo, sequence_ratio),
	K_REWARDS(grpo, rewards),
	K_ENUM(grpo, reward_norm, reward_norms),
	K_ENUM(grpo, rollout_weights, weight_formats),
	/* distill */
	K_STR(distill, teacher, CF_NULL),
	K_DBL(distill, alpha, CF_NNEG),
	K_DBL(distill, temperature, CF_POS),
	K_ENUM(distill, kl, kl_directions),
	/* lora */
	K_INT(lora, rank, CF_NNEG),
	K_DBL(lora, alpha, CF_POS),
	K_ARGV(lora, targets, n_targets),
	K_DBL(lora, dropout, CF_NNEG),
	K_STR(lora, base, CF_NULL),
	K_STR(lora, base_checksum, CF_NULL),
};

#define N_KEYS (sizeof(cfg_keys) / sizeof(cfg_keys[0]))

/* ---- errors ---- */

/* "ORIGIN: section.key: message" */
static int key_fail(char *err, size_t errlen, const char *origin, const struct cfg_key *k,
		    const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	return set_err(err, errlen, "%s: %s.%s: %s", origin, k->section, k->name, msg);
}

/* Shortest %g form that reads back as exactly d. */
static void fmt_double(char *buf, size_t n, double d)
{
	if (!isfinite(d)) {
		snprintf(buf, n, "null");
		return;
	}
	for (int prec = 15; prec <= 17; prec++) {
		snprintf(buf, n, "%.*g", prec, d);
		if (strtod(buf, NULL) == d)
			return;
	}
}

/* ---- the table ---- */

static void *field(void *base, const struct cfg_key *k)
{
	return (char *)base + k->off;
}

static const void *cfield(const void *base, const struct cfg_key *k)
{
	return (const char *)base + k->off;
}

static const struct cfg_key *find_key(const char *section, const char *name)
{
	for (size_t i = 0; i < N_KEYS; i++)
		if (!strcmp(cfg_keys[i].section, section) && !strcmp(cfg_keys[i].name, name))
			return &cfg_keys[i];
	return NULL;
}

static bool known_section(const char *section)
{
	for (size_t i = 0; i < N_KEYS; i++)
		if (!strcmp(cfg_keys[i].section, section))
			return true;
	return false;
}

/* ---- "did you mean" ---- */

static int edit_distance(const char *a, const char *b)
{
	int row[64] = { 0 }, n = (int)strlen(b);

	if (n >= 64 || strlen(a) >= 64)
		return 99;
	for (int j = 0; j <= n; j++)
		row[j] = j;
	for (int i = 1; a[i - 1]; i++) {
		int diag = row[0];

		row[0] = i;
		for (int j = 1; j <= n; j++) {
			int up = row[j];
			int best = diag + (a[i - 1] != b[j - 1]);

			if (up + 1 < best)
				best = up + 1;
			if (row[j - 1] + 1 < best)
				best = row[j - 1] + 1;
			row[j] = best;
			diag = up;
		}
	}
	return row[n];
}

/* The closest known key of the section (or section, when section is NULL), if close enough. */
static const char *suggest(const char *section, const char *name)
{
	const char *best = NULL;
	int best_d = (int)strlen(name) / 3 + 2;  /* suggest only within about a third */

	for (size_t i = 0; i < N_KEYS; i++) {
		const char *cand = section ? cfg_keys[i].name : cfg_keys[i].section;
		int d;

		if (section && strcmp(cfg_keys[i].section, section))
			continue;
		d = edit_distance(name, cand);
		if (d < best_d) {
			best_d = d;
			best = cand;
		}
	}
	return best;
}

static int unknown_key(const char *origin, const char *section, const char *name, char *err,
		       size_t errlen)
{
	const char *s;

	if (!known_section(section)) {
		s = suggest(NULL, section);
		if (s)
			return set_err(err, errlen, "%s: unknown section %s (did you mean %s?)", origin,
				       section, s);
		return set_err(err, errlen, "%s: unknown section %s (sections: model, train, data, "
			       "parallel, checkpoint, log, grpo, distill, lora)", origin, section);
	}
	s = suggest(section, name);
	if (s)
		return set_err(err, errlen, "%s: unknown key %s.%s (did you mean %s.%s?)", origin, section,
			       name, section, s);
	return set_err(err, errlen, "%s: unknown key %s.%s", origin, section, name);
}

/* ---- setting one key from a JSON value ---- */

static int get_integer(const struct cfg_key *k, const cJSON *v, double lo, double hi, double *out,
		       const char *origin, char *err, size_t errlen)
{
	char num[40];

	if (cJSON_IsNull(v) && (k->flags & CF_NULL)) {
		*out = 0;
		return 0;
	}
	if (!cJSON_IsNumber(v))
		return key_fail(err, errlen, origin, k, "expected an integer, got %s", json_type(v));
	fmt_double(num, sizeof(num), v->valuedouble);
	if (!isfinite(v->valuedouble) || v->valuedouble != floor(v->valuedouble))
		return key_fail(err, errlen, origin, k, "expected an integer, got %s", num);
	if (v->valuedouble < lo || v->valuedouble > hi)
		return key_fail(err, errlen, origin, k, "integer %s is out of range", num);
	*out = v->valuedouble;
	return 0;
}

static int set_string(const struct cfg_key *k, char *dst, size_t size, const cJSON *v,
		      const char *origin, char *err, size_t errlen)
{
	const char *s = "";

	if (cJSON_IsString(v))
		s = v->valuestring;
	else if (!cJSON_IsNull(v) || !(k->flags & CF_NULL))
		return key_fail(err, errlen, origin, k, "expected a string, got %s", json_type(v));
	if (strlen(s) >= size)
		return key_fail(err, errlen, origin, k, "string longer than %zu bytes", size - 1);
	memset(dst, 0, size);
	memcpy(dst, s, strlen(s));
	return 0;
}

static int set_argv(struct run_config *c, const struct cfg_key *k, const cJSON *v,
		    const char *origin, char *err, size_t errlen)
{
	char (*argv)[CFG_STR] = field(c, k);
	int *argc = (int *)((char *)c + k->aux);
	const cJSON *e;
	int n = 0;

	if (!cJSON_IsArray(v))
		return key_fail(err, errlen, origin, k,
				"expected an array of strings such as [\"python3\", \"reward.py\"], got %s",
				json_type(v));
	if (cJSON_GetArraySize(v) > CFG_MAX_ARGV)
		return key_fail(err, errlen, origin, k, "more than %d arguments", CFG_MAX_ARGV);
	cJSON_ArrayForEach(e, v) {
		if (!cJSON_IsString(e))
			return key_fail(err, errlen, origin, k, "argument %d: expected a string, got %s",
					n, json_type(e));
		if (strlen(e->valuestring) >= CFG_STR)
			return key_fail(err, errlen, origin, k, "argument %d is longer than %d bytes", n,
					CFG_STR - 1);
		n++;
	}
	memset(argv, 0, k->size);
	n = 0;
	cJSON_ArrayForEach(e, v)
		memcpy(argv[n++], e->valuestring, strlen(e->valuestring));
	*argc = n;
	return 0;
}

static int set_scoring(const struct cfg_key *k, enum moe_scoring *dst, const cJSON *v,
		       const char *origin, char *err, size_t errlen)
{
	if (!cJSON_IsString(v))
		return key_fail(err, errlen, origin, k, "expected a string, got %s", json_type(v));
	if (!strcmp(v->valuestring, "softmax"))
		*dst = MOE_SCORING_SOFTMAX;
	else if (!strcmp(v->valuestring, "sigmoid"))
		*dst = MOE_SCORING_SIGMOID;
	else
		return key_fail(err, errlen, origin, k, "\"%s\" is neither \"softmax\" nor \"sigmoid\"",
				v->valuestring);
	return 0;
}

static int set_number(const struct cfg_key *k, double *dst, const cJSON *v, const char *origin,
		      char *err, size_t errlen)
{
	if (cJSON_IsNull(v) && (k->flags & CF_NULL)) {
		*dst = 0;
		return 0;
	}
	if (!cJSON_IsNumber(v))
		return key_fail(err, errlen, origin, k, "expected a number, got %s", json_type(v));
	if (!isfinite(v->valuedouble))
		return key_fail(err, errlen, origin, k, "number out of range");
	*dst = v->valuedouble;
	return 0;
}

static int set_bool(const struct cfg_key *k, bool *dst, const cJSON *v, const char *origin,
		    char *err, size_t errlen)
{
	if (!cJSON_IsBool(v))
		return key_fail(err, errlen, origin, k, "expected true or false, got %s", json_type(v));
	*dst = cJSON_IsTrue(v);
	return 0;
}

/* an earlier member of obj has item's name */
static bool has_duplicate(const cJSON *obj, const cJSON *item)
{
	for (const cJSON *s = obj->child; s && s != item; s = s->next)
		if (!strcmp(s->string, item->string))
			return true;
	return false;
}

/* ---- model.rope_scaling: Hugging Face's rope_scaling object ---- */

/* Its numbers, by HF name; 0 (null or absent) stands for transformers' default (model/config.h). */
struct rope_num {
	const char *name;
	size_t off;                     /* in struct rope_scaling */
	bool is_int;
};

#define RNUM(f, i) { #f, offsetof(struct rope_scaling, f), i }
static const struct rope_num rope_nums[] = {
	RNUM(factor, false),
	RNUM(original_max_position_embeddings, true),
	RNUM(beta_fast, false),
	RNUM(beta_slow, false),
	RNUM(mscale, false),
	RNUM(mscale_all_dim, false),
	RNUM(attention_factor, false),
};
#define N_ROPE_NUMS (sizeof(rope_nums) / sizeof(rope_nums[0]))

static double rope_num_get(const struct rope_scaling *rs, const struct rope_num *r)
{
	const char *p = (const char *)rs + r->off;

	return r->is_int ? *(const int *)p : *(const double *)p;
}

static void rope_num_put(struct rope_scaling *rs, const struct rope_num *r, double v)
{
	char *p = (char *)rs + r->off;

	if (r->is_int)
		*(int *)p = (int)v;
	else
		*(double *)p = v;
}

/* "ORIGIN: model.rope_scaling.SUB: message" */
static int rope_fail(char *err, size_t errlen, const char *origin, const char *sub, const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	return set_err(err, errlen, "%s: model.rope_scaling.%s: %s", origin, sub, msg);
}

/* "type" (DeepSeek's files) or "rope_type" (transformers'); both given must agree */
static int rope_set_type(struct rope_scaling *rs, const cJSON *v, const char **seen, const char *origin,
			 char *err, size_t errlen)
{
	if (!cJSON_IsString(v))
		return rope_fail(err, errlen, origin, v->string, "expected a string, got %s", json_type(v));
	if (*seen && strcmp(*seen, v->valuestring))
		return rope_fail(err, errlen, origin, v->string, "\"%s\" disagrees with \"%s\"",
				 v->valuestring, *seen);
	*seen = v->valuestring;
	if (!strcmp(v->valuestring, "yarn"))
		rs->type = ROPE_YARN;
	else if (!strcmp(v->valuestring, "default"))
		rs->type = ROPE_DEFAULT;
	else
		return rope_fail(err, errlen, origin, v->string, "\"%s\" is not supported (only \"yarn\"; "
				 "\"default\" or a null rope_scaling: no scaling)", v->valuestring);
	return 0;
}

static int rope_set_number(struct rope_scaling *rs, const struct rope_num *r, const cJSON *v,
			   const char *origin, char *err, size_t errlen)
{
	char num[48];
	double d;

	if (cJSON_IsNull(v)) {
		rope_num_put(rs, r, 0);
		return 0;
	}
	if (!cJSON_IsNumber(v))
		return rope_fail(err, errlen, origin, r->name, "expected a number, got %s", json_type(v));
	d = v->valuedouble;
	if (!isfinite(d))
		return rope_fail(err, errlen, origin, r->name, "number out of range");
	fmt_double(num, sizeof(num), d);
	if (r->is_int && (d != floor(d) || d < INT_MIN || d > INT_MAX))
		return rope_fail(err, errlen, origin, r->name, "expected an integer, got %s", num);
	rope_num_put(rs, r, d);
	return 0;
}

static int rope_set_item(struct rope_scaling *rs, const cJSON *e, const char **seen, const char *origin,
			 char *err, size_t errlen)
{
	if (!strcmp(e->string, "type") || !strcmp(e->string, "rope_type"))
		return rope_set_type(rs, e, seen, origin, err, errlen);
	if (!strcmp(e->string, "truncate")) {
		if (!cJSON_IsBool(e) && !cJSON_IsNull(e))
			return rope_fail(err, errlen, origin, e->string, "expected true or false, got %s",
					 json_type(e));
		rs->no_truncate = cJSON_IsFalse(e);
		return 0;
	}
	for (size_t i = 0; i < N_ROPE_NUMS; i++)
		if (!strcmp(e->string, rope_nums[i].name))
			return rope_set_number(rs, &rope_nums[i], e, origin, err, errlen);
	return rope_fail(err, errlen, origin, e->string, "unknown key (rope_scaling takes type, factor, "
			 "original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim, "
			 "attention_factor, truncate)");
}

/* An object replaces the whole setting, or with merge changes only the keys it names; null: no scaling. */
static int set_rope_scaling(const struct cfg_key *k, struct rope_scaling *dst, const cJSON *v, bool merge,
			    const char *origin, char *err, size_t errlen)
{
	struct rope_scaling rs;
	const char *seen = NULL;
	const cJSON *e;

	memset(&rs, 0, sizeof(rs));
	if (cJSON_IsNull(v) && !merge) {
		memcpy(dst, &rs, sizeof(rs));
		return 0;
	}
	if (!cJSON_IsObject(v))
		return key_fail(err, errlen, origin, k, "expected an object such as {\"type\": \"yarn\", "
				"\"factor\": 40, \"original_max_position_embeddings\": 4096} or null, got %s",
				json_type(v));
	if (merge)
		memcpy(&rs, dst, sizeof(rs));
	cJSON_ArrayForEach(e, v) {
		if (has_duplicate(v, e))
			return rope_fail(err, errlen, origin, e->string, "duplicate key");
		if (rope_set_item(&rs, e, &seen, origin, err, errlen))
			return -1;
	}
	if (!merge && !seen)
		return key_fail(err, errlen, origin, k, "no \"type\" (\"yarn\")");
	memcpy(dst, &rs, sizeof(rs));
	return 0;
}

static cJSON *rope_json(const struct rope_scaling *rs)
{
	cJSON *o;
	char num[48];

	if (rs->type != ROPE_YARN)
		return cJSON_CreateNull();
	o = cJSON_CreateObject();
	if (!o || !cJSON_AddStringToObject(o, "type", "yarn"))
		goto oom;
	for (size_t i = 0; i < N_ROPE_NUMS; i++) {
		double v = rope_num_get(rs, &rope_nums[i]);

		if (v == 0)
			continue;
		if (rope_nums[i].is_int)
			snprintf(num, sizeof(num), "%d", (int)v);
		else
			fmt_double(num, sizeof(num), v);
		if (!cJSON_AddRawToObject(o, rope_nums[i].name, num))
			goto oom;
	}
	if (rs->no_truncate && !cJSON_AddFalseToObject(o, "truncate"))
		goto oom;
	return o;
oom:
	cJSON_Delete(o);
	return NULL;
}

/* every field, numbers bit for bit */
static bool rope_equal(const struct rope_scaling *a, const struct rope_scaling *b)
{
	if (a->type != b->type || a->no_truncate != b->no_truncate)
		return false;
	for (size_t i = 0; i < N_ROPE_NUMS; i++) {
		double va = rope_num_get(a, &rope_nums[i]), vb = rope_num_get(b, &rope_nums[i]);

		if (memcmp(&va, &vb, sizeof(va)))
			return false;
	}
	return true;
}

/* ---- piecewise values (train.mtp_lambda) ---- */

double piecewise_at(const struct piecewise *p, long long step)
{
	int i = 0;
	while (i + 1 < p->n && step >= p->steps[i + 1])
		i++;
	return p->n ? p->values[i] : 0.0;
}

/* one array member of a schedule object: its numbers, checked, into out[] (n of them) */
static int piecewise_array(const struct cfg_key *k, const cJSON *arr, const char *what, bool steps,
			   double *out, int *n, const char *origin, char *err, size_t errlen)
{
	const cJSON *e;
	char num[48];
	int i = 0;

	if (!cJSON_IsArray(arr) || cJSON_GetArraySize(arr) < 1 || cJSON_GetArraySize(arr) > CFG_MAX_PIECES)
		return key_fail(err, errlen, origin, k, "\"%s\" must be an array of 1 to %d numbers", what,
				CFG_MAX_PIECES);
	cJSON_ArrayForEach(e, arr) {
		if (!cJSON_IsNumber(e) || !isfinite(e->valuedouble))
			return key_fail(err, errlen, origin, k, "%s[%d]: expected a number, got %s", what, i,
					json_type(e));
		double d = e->valuedouble;
		fmt_double(num, sizeof(num), d);
		if (d < 0)
			return key_fail(err, errlen, origin, k, "%s[%d]=%s must be >= 0", what, i, num);
		if (steps && (d != floor(d) || d > 9007199254740992.0))
			return key_fail(err, errlen, origin, k, "%s[%d]=%s: expected an integer step", what, i,
					num);
		if (steps && i == 0 && d != 0)
			return key_fail(err, errlen, origin, k, "steps[0]=%s must be 0 (the value from the "
					"start)", num);
		if (steps && i > 0 && d <= out[i - 1])
			return key_fail(err, errlen, origin, k, "steps[%d]=%s must be > steps[%d]", i, num,
					i - 1);
		out[i++] = d;
	}
	*n = i;
	return 0;
}

static int set_piecewise(const struct cfg_key *k, struct piecewise *dst, const cJSON *v, const char *origin,
			 char *err, size_t errlen)
{
	struct piecewise p;
	double steps[CFG_MAX_PIECES];
	int ns = 0, nv = 0;
	const cJSON *e;

	memset(&p, 0, sizeof(p));
	if (cJSON_IsNumber(v)) {
		if (!isfinite(v->valuedouble) || v->valuedouble < 0)
			return key_fail(err, errlen, origin, k, "must be a finite number >= 0");
		p.n = 1;
		p.values[0] = v->valuedouble;
		memcpy(dst, &p, sizeof(p));  /* the padding too: configs compare bit for bit */
		return 0;
	}
	if (!cJSON_IsObject(v))
		return key_fail(err, errlen, origin, k, "expected a number or an object such as "
				"{\"steps\": [0, 1000], \"values\": [0.3, 0.1]}, got %s", json_type(v));
	cJSON_ArrayForEach(e, v) {
		int rc;
		if (has_duplicate(v, e))
			return key_fail(err, errlen, origin, k, "duplicate key \"%s\"", e->string);
		if (!strcmp(e->string, "steps"))
			rc = piecewise_array(k, e, "steps", true, steps, &ns, origin, err, errlen);
		else if (!strcmp(e->string, "values"))
			rc = piecewise_array(k, e, "values", false, p.values, &nv, origin, err, errlen);
		else
			rc = key_fail(err, errlen, origin, k, "unknown key \"%s\" (takes steps and values)",
				      e->string);
		if (rc)
			return -1;
	}
	if (!ns || !nv)
		return key_fail(err, errlen, origin, k, "needs both \"steps\" and \"values\"");
	if (ns != nv)
		return key_fail(err, errlen, origin, k, "%d steps but %d values", ns, nv);
	p.n = ns;
	for (int i = 0; i < ns; i++)
		p.steps[i] = (long long)steps[i];
	memcpy(dst, &p, sizeof(p));
	return 0;
}

static cJSON *piecewise_json(const struct piecewise *p)
{
	char num[48];
	cJSON *o, *s, *v;

	if (p->n == 1) {
		fmt_double(num, sizeof(num), p->values[0]);
		return cJSON_CreateRaw(num);
	}
	o = cJSON_CreateObject();
	s = cJSON_AddArrayToObject(o, "steps");
	v = cJSON_AddArrayToObject(o, "values");
	if (!o || !s || !v)
		goto oom;
	for (int i = 0; i < p->n; i++) {
		snprintf(num, sizeof(num), "%lld", p->steps[i]);
		cJSON *a = cJSON_CreateRaw(num);
		if (!a || !cJSON_AddItemToArray(s, a))
			goto oom;
		fmt_double(num, sizeof(num), p->values[i]);
		a = cJSON_CreateRaw(num);
		if (!a || !cJSON_AddItemToArray(v, a))
			goto oom;
	}
	return o;
oom:
	cJSON_Delete(o);
	return NULL;
}

static int apply_value(struct run_config *c, const struct cfg_key *k, const cJSON *v,
		       const char *origin, char *err, size_t errlen)
{
	void *p = field(c, k);
	double d;

	switch (k->type) {
	case CT_INT:
		if (get_integer(k, v, INT_MIN, INT_MAX, &d, origin, err, errlen))
			return -1;
		*(int *)p = (int)d;
		return 0;
	case CT_I64:
		if (get_integer(k, v, -9007199254740992.0, 9007199254740992.0, &d, origin, err,
				errlen))
			return -1;
		*(long long *)p = (long long)d;
		return 0;
	case CT_DBL:
		return set_number(k, p, v, origin, err, errlen);
	case CT_BOOL:
		return set_bool(k, p, v, origin, err, errlen);
	case CT_STR:
		return set_string(k, p, k->size, v, origin, err, errlen);
	case CT_ARGV:
		return set_argv(c, k, v, origin, err, errlen);
	case CT_SCORING:
		return set_scoring(k, p, v, origin, err, errlen);
	case CT_ROPE:
		return set_rope_scaling(k, p, v, false, origin, err, errlen);
	case CT_PIECEWISE:
		return set_piecewise(k, p, v, origin, err, errlen);
	case CT_REWARDS: {
		char msg[400];

		if (config_rewards_set(&c->grpo, v, msg, sizeof(msg)))
			return key_fail(err, errlen, origin, k, "%s", msg);
		return 0;
	}
	}
	return key_fail(err, errlen, origin, k, "internal error: bad key type");
}

/* ---- JSON documents ---- */

static int apply_section(struct run_config *c, const cJSON *sec, const char *origin, char *err,
			 size_t errlen)
{
	const cJSON *item;

	if (!cJSON_IsObject(sec))
		return set_err(err, errlen, "%s: %s: expected an object, got %s", origin, sec->string,
			       json_type(sec));
	cJSON_ArrayForEach(item, sec) {
		const struct cfg_key *k = find_key(sec->string, item->string);
		const struct hf_key *h;

		if (has_duplicate(sec, item))
			return set_err(err, errlen, "%s: duplicate key %s.%s", origin, sec->string,
				       item->string);
		if (k) {
			if (apply_value(c, k, item, origin, err, errlen))
				return -1;
			continue;
		}
		h = config_hf_key(sec->string, item->string);
		if (!h)
			return unknown_key(origin, sec->string, item->string, err, errlen);
		if (config_hf_check(h, item, origin, err, errlen))
			return -1;
	}
	return 0;
}

/* "FILE:LINE:COL: malformed JSON near '...'" from cJSON's error position. */
static int parse_error(const char *text, const char *at, const char *origin, char *err,
		       size_t errlen)
{
	int line = 1, col = 1;
	char near[41];
	size_t n = 0;

	if (!at || at < text || at > text + strlen(text))
		at = text;
	for (const char *p = text; p < at; p++) {
		if (*p == '\n') {
			line++;
			col = 1;
		} else {
			col++;
		}
	}
	while (at[n] && at[n] != '\n' && n < sizeof(near) - 1) {
		near[n] = at[n];
		n++;
	}
	near[n] = '\0';
	if (!n)
		return set_err(err, errlen, "%s:%d:%d: malformed JSON (unexpected end of input)", origin,
			       line, col);
	return set_err(err, errlen, "%s:%d:%d: malformed JSON near '%s'", origin, line, col, near);
}

int config_apply_json(struct run_config *c, const char *json_text, const char *origin, char *err,
		      size_t errlen)
{
	const char *end = NULL;
	cJSON *root, *sec;
	int rc = 0;

	if (!origin)
		origin = "config";
	if (!json_text)
		return set_err(err, errlen, "%s: no JSON text", origin);
	root = cJSON_ParseWithOpts(json_text, &end, 1);
	if (!root)
		return parse_error(json_text, end, origin, err, errlen);
	if (!cJSON_IsObject(root)) {
		rc = set_err(err, errlen, "%s: expected a JSON object at the top level, got %s", origin,
			     json_type(root));
		goto out;
	}
	cJSON_ArrayForEach(sec, root) {
		if (has_duplicate(root, sec)) {
			rc = set_err(err, errlen, "%s: duplicate section %s", origin, sec->string);
			break;
		}
		if (!known_section(sec->string)) {
			rc = unknown_key(origin, sec->string, "", err, errlen);
			break;
		}
		rc = apply_section(c, sec, origin, err, errlen);
		if (rc)
			break;
	}
out:
	cJSON_Delete(root);
	return rc;
}

/* ---- --set ---- */

/* The value text of a --set as JSON for key k: strings may be written bare. */
static cJSON *set_value_json(enum cfg_type type, const char *text)
{
	const char *end;

	if ((type == CT_STR || type == CT_SCORING) && text[0] != '"')
		return cJSON_CreateString(text);
	return cJSON_ParseWithOpts(text, &end, 1);
}

static const char *type_phrase(enum cfg_type type)
{
	switch (type) {
	case CT_INT:
	case CT_I64:
		return "an integer";
	case CT_DBL:
		return "a number";
	case CT_BOOL:
		return "a boolean (true or false)";
	case CT_ARGV:
		return "a JSON array of strings such as [\"python3\",\"reward.py\"]";
	case CT_ROPE:
		return "a JSON object such as {\"type\":\"yarn\",\"factor\":40} or null";
	case CT_PIECEWISE:
		return "a number or a JSON object such as {\"steps\":[0,1000],\"values\":[0.3,0.1]}";
	case CT_REWARDS:
		return "a JSON array such as [{\"name\":\"ok\",\"cmd\":[\"sh\",\"r.sh\"],\"weight\":1}]";
	default:
		return "a string";
	}
}

static int set_hf_key(const struct hf_key *h, const char *text, char *err, size_t errlen)
{
	const char *end;
	cJSON *v = cJSON_ParseWithOpts(text, &end, 1);
	int rc;

	if (!v)
		v = cJSON_CreateString(text);
	if (!v)
		return set_err(err, errlen, "--set: out of memory");
	rc = config_hf_check(h, v, "--set", err, errlen);
	cJSON_Delete(v);
	return rc;
}

/* --set model.rope_scaling.SUB=VALUE: one key of the object, the others kept */
static int set_rope_key(struct run_config *c, const char *sub, const char *text, char *err, size_t errlen)
{
	const struct cfg_key *k = find_key("model", "rope_scaling");
	const char *end;
	cJSON *obj = cJSON_CreateObject(), *v = cJSON_ParseWithOpts(text, &end, 1);
	int rc;

	if (!v)
		v = cJSON_CreateString(text);
	if (!obj || !v || !cJSON_AddItemToObject(obj, sub, v)) {
		cJSON_Delete(obj);
		cJSON_Delete(v);
		return set_err(err, errlen, "--set: out of memory");
	}
	rc = set_rope_scaling(k, field(c, k), obj, true, "--set", err, errlen);
	cJSON_Delete(obj);
	return rc;
}

int config_set(struct run_config *c, const char *assignment, char *err, size_t errlen)
{
	const char *eq = strchr(assignment, '=');
	const char *dot = strchr(assignment, '.');
	char section[64], name[128];
	const struct cfg_key *k;
	const struct hf_key *h;
	cJSON *v;
	int rc;

	if (!eq || !dot || dot > eq || dot == assignment || dot + 1 == eq)
		return set_err(err, errlen, "--set %s: expected section.key=value", assignment);
	if ((size_t)(dot - assignment) >= sizeof(section) || (size_t)(eq - dot - 1) >= sizeof(name))
		return set_err(err, errlen, "--set: unknown key %.*s", (int)(eq - assignment), assignment);
	snprintf(section, sizeof(section), "%.*s", (int)(dot - assignment), assignment);
	snprintf(name, sizeof(name), "%.*s", (int)(eq - dot - 1), dot + 1);
	if (!strcmp(section, "model") && !strncmp(name, "rope_scaling.", 13))
		return set_rope_key(c, name + 13, eq + 1, err, errlen);
	k = find_key(section, name);
	if (!k) {
		h = config_hf_key(section, name);
		if (h)
			return set_hf_key(h, eq + 1, err, errlen);
		return unknown_key("--set", section, name, err, errlen);
	}
	v = set_value_json(k->type, eq + 1);
	if (!v)
		return key_fail(err, errlen, "--set", k, "cannot parse '%s' as %s", eq + 1,
				type_phrase(k->type));
	rc = apply_value(c, k, v, "--set", err, errlen);
	cJSON_Delete(v);
	return rc;
}

/* ---- output ---- */

static cJSON *value_json(const void *base, const struct cfg_key *k)
{
	const void *p = cfield(base, k);
	char num[48];

	switch (k->type) {
	case CT_INT:
		snprintf(num, sizeof(num), "%d", *(const int *)p);
		return cJSON_CreateRaw(num);
	case CT_I64:
		snprintf(num, sizeof(num), "%lld", *(const long long *)p);
		return cJSON_CreateRaw(num);
	case CT_DBL:
		fmt_double(num, sizeof(num), *(const double *)p);
		return cJSON_CreateRaw(num);
	case CT_BOOL:
		return cJSON_CreateBool(*(const bool *)p);
	case CT_STR:
		return cJSON_CreateString(p);
	case CT_SCORING:
		return cJSON_CreateString(*(const enum moe_scoring *)p == MOE_SCORING_SIGMOID ?
					  "sigmoid" : "softmax");
	case CT_ROPE:
		return rope_json(p);
	case CT_PIECEWISE:
		return piecewise_json(p);
	case CT_REWARDS:
		return config_rewards_json(&((const struct run_config *)base)->grpo);
	case CT_ARGV: {
		int argc = *(const int *)((const char *)base + k->aux);
		cJSON *a = cJSON_CreateArray();

		for (int i = 0; a && i < argc && i < CFG_MAX_ARGV; i++)
			cJSON_AddItemToArray(a, cJSON_CreateString((const char *)p + i * CFG_STR));
		return a;
	}
	}
	return cJSON_CreateNull();
}

char *config_to_json(const struct run_config *c)
{
	cJSON *root = cJSON_CreateObject(), *sec = NULL;
	const char *cur = NULL;
	char *text;

	if (!root)
		return NULL;
	for (size_t i = 0; i < N_KEYS; i++) {
		const struct cfg_key *k = &cfg_keys[i];

		if (!cur || strcmp(cur, k->section)) {
			cur = k->section;
			sec = cJSON_AddObjectToObject(root, cur);
		}
		if (!sec || !cJSON_AddItemToObject(sec, k->name, value_json(c, k))) {
			cJSON_Delete(root);
			return NULL;
		}
	}
	text = cJSON_Print(root);
	cJSON_Delete(root);
	return text;
}

/* ---- comparison ---- */

static bool field_equal(const void *a, const void *b, const struct cfg_key *k)
{
	const void *pa = cfield(a, k), *pb = cfield(b, k);

	if (k->type == CT_STR)
		return !strcmp(pa, pb);
	if (k->type == CT_ROPE)
		return rope_equal(pa, pb);
	if (k->type == CT_PIECEWISE) {
		const struct piecewise *x = pa, *y = pb;
		return x->n == y->n && !memcmp(x->steps, y->steps, sizeof(x->steps)) &&
		       !memcmp(x->values, y->values, sizeof(x->values));
	}
	if (k->type == CT_REWARDS)
		return config_rewards_equal(&((const struct run_config *)a)->grpo,
					    &((const struct run_config *)b)->grpo);
	if (k->type == CT_ARGV) {
		int na = *(const int *)((const char *)a + k->aux);
		int nb = *(const int *)((const char *)b + k->aux);
		const char *va = pa, *vb = pb;

		if (na != nb)
			return false;
		for (int i = 0; i < na && i < CFG_MAX_ARGV; i++)
			if (strcmp(va + i * CFG_STR, vb + i * CFG_STR))
				return false;
		return true;
	}
	return !memcmp(pa, pb, k->size);  /* numbers bit for bit */
}

int config_model_diff(const struct model_config *a, const struct model_config *b, char *key,
		      size_t keylen)
{
	/* Model keys' offsets are into struct run_config, whose first member is the model. */
	_Static_assert(offsetof(struct run_config, model) == 0, "model must come first");
	const void *ra = a, *rb = b;

	for (size_t i = 0; i < N_KEYS; i++) {
		const struct cfg_key *k = &cfg_keys[i];

		if (strcmp(k->section, "model"))
			continue;
		if (field_equal(ra, rb, k))
			continue;
		if (key && keylen)
			snprintf(key, keylen, "model.%s", k->name);
		return 1;
	}
	if (key && keylen)
		key[0] = '\0';
	return 0;
}

/* ---- defaults ---- */

static const struct run_config defaults = {
	.model = {
		.vocab_size = 256,
		.hidden_size = 64,
		.intermediate_size = 128,
		.moe_intermediate_size = 32,
		.num_hidden_layers = 2,
		.num_attention_heads = 4,
		.num_key_value_heads = 0,          /* resolved to num_attention_heads by config_load */
		.n_shared_experts = 1,
		.n_routed_experts = 8,
		.routed_scaling_factor = 2.5,
		.kv_lora_rank = 32,
		.q_lora_rank = 32,
		.qk_rope_head_dim = 8,
		.qk_nope_head_dim = 16,
		.v_head_dim = 16,
		.n_group = 2,
		.topk_group = 1,
		.num_experts_per_tok = 2,
		.moe_layer_freq = 1,
		.first_k_dense_replace = 1,
		.norm_topk_prob = true,
		.scoring_func = MOE_SCORING_SIGMOID,
		.aux_loss_alpha = 0.0,
		.seq_aux = true,
		.max_position_embeddings = 2048,
		.initializer_range = 0.02,
		.rms_norm_eps = 1e-6,
		.rope_theta = 10000.0,
		.bos_token_id = 0,
		.eos_token_id = 1,
		.tie_word_embeddings = false,
		.attention_bias = false,
	},
	.train = {
		.steps = 100,
		.seq_len = 64,
		.micro_batch = 4,
		.grad_accum = 1,
		.lr = 3e-4,
		.min_lr = 3e-5,
		.warmup_steps = 10,
		.schedule = "cosine",
		.decay_frac = 0.2,
		.weight_decay = 0.1,
		.decay_embeddings = false,
		.stop_at = 0,
		.beta1 = 0.9,
		.beta2 = 0.95,
		.eps = 1e-8,
		.grad_clip = 1.0,
		.bias_update_speed = 0.001,
		.seed = 1234,
		.device = "auto",
		.eval_every = 0,
		.eval_batches = 0,
		.init_checkpoint = "",
		.on_nonfinite = "stop",
		.mtp_lambda = { .n = 1, .values = { 0.3 } },  /* DeepSeek-V3's first phase */
		.attention = "auto",
	},
	.data = { .train = "", .val = "", .shuffle = false },
	.parallel = { .ep = 1, .zero = 0, .comm = "auto", .bucket_mb = 25 },
	.checkpoint = { .dir = "checkpoints", .every = 0, .keep = 3 },
	.log = { .metrics = "", .every = 1 },
	.grpo = {
		.prompts = "",
		.reward_cmd_argc = 0,
		.reward_timeout_s = 30.0,
		.group_size = 8,
		.prompts_per_step = 4,
		.max_new_tokens = 64,
		.temperature = 1.0,
		.top_p = 1.0,
		.top_k = 0,
		.beta = 0.0,
		.epsilon = 0.2,
		.epsilon_high = 0.2,
		.num_iterations = 1,
		.loss_type = "dapo",
		.scale_rewards = "group",
		.tokenizer = "",
		.mask_truncated = false,
		.routing_replay = false,
		.sequence_ratio = false,
		.n_rewards = 0,
		.reward_norm = "total",
		.rollout_weights = "full",
	},
	.distill = { .teacher = "", .alpha = 0.5, .temperature = 1.0, .kl = "forward" },
	.lora = { .rank = 0, .alpha = 16.0, .n_targets = 0, .dropout = 0.0, .base = "", .base_checksum = "" },
};

void config_defaults(struct run_config *c)
{
	/* A static object's padding and unused string bytes are zero: memcmp-comparable configs. */
	memcpy(c, &defaults, sizeof(*c));
}

/* ---- validation ---- */

static int check_range(const struct run_config *c, const struct cfg_key *k, char *err,
		       size_t errlen)
{
	const void *p = cfield(c, k);
	double v;
	char num[48];

	if (k->type == CT_INT)
		v = *(const int *)p;
	else if (k->type == CT_DBL)
		v = *(const double *)p;
	else
		return 0;
	fmt_double(num, sizeof(num), v);
	if (!isfinite(v))
		return set_err(err, errlen, "%s.%s=%s must be finite", k->section, k->name, num);
	if ((k->flags & CF_POS) && !(v > 0))
		return set_err(err, errlen, "%s.%s=%s must be > 0", k->section, k->name, num);
	if ((k->flags & CF_NNEG) && !(v >= 0))
		return set_err(err, errlen, "%s.%s=%s must be >= 0", k->section, k->name, num);
	return 0;
}

static int check_choice(const struct run_config *c, const struct cfg_key *k, char *err,
			size_t errlen)
{
	const char *v = cfield(c, k);
	char list[128] = "";

	if (!k->choices)
		return 0;
	for (int i = 0; k->choices[i]; i++) {
		if (!strcmp(v, k->choices[i]))
			return 0;
		snprintf(list + strlen(list), sizeof(list) - strlen(list), "%s%s", i ? ", " : "",
			 k->choices[i]);
	}
	return set_err(err, errlen, "%s.%s=\"%s\" must be one of: %s", k->section, k->name, v, list);
}

#define REQUIRE(cond, ...) \
	do { \
		if (!(cond)) \
			return set_err(err, errlen, __VA_ARGS__); \
	} while (0)

static int validate_attention(const struct model_config *m, char *err, size_t errlen)
{
	REQUIRE(m->num_key_value_heads == 0 || m->num_key_value_heads == m->num_attention_heads,
		"model.num_key_value_heads=%d must equal model.num_attention_heads=%d (MLA)",
		m->num_key_value_heads, m->num_attention_heads);
	REQUIRE(m->qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim=%d must be even",
		m->qk_rope_head_dim);
	REQUIRE(m->qk_rope_head_dim <= MC_ROPE_MAX_DIM, "model.qk_rope_head_dim=%d must be <= %d",
		m->qk_rope_head_dim, MC_ROPE_MAX_DIM);
	REQUIRE(!m->attention_bias, "model.attention_bias=true is not supported");
	REQUIRE(!m->tie_word_embeddings,
		"model.tie_word_embeddings=true is not supported (lm_head is untied)");
	REQUIRE(m->bos_token_id < m->vocab_size, "model.bos_token_id=%d must be < model.vocab_size=%d",
		m->bos_token_id, m->vocab_size);
	REQUIRE(m->eos_token_id < m->vocab_size, "model.eos_token_id=%d must be < model.vocab_size=%d",
		m->eos_token_id, m->vocab_size);
	return 0;
}

/* YaRN's numbers are >= 0 (0: transformers' default) and are given only with type "yarn" */
static int validate_rope(const struct model_config *m, char *err, size_t errlen)
{
	const struct rope_scaling *rs = &m->rope_scaling;
	bool yarn = rs->type == ROPE_YARN;
	char a[48];

	for (size_t i = 0; i < N_ROPE_NUMS; i++) {
		double v = rope_num_get(rs, &rope_nums[i]);

		fmt_double(a, sizeof(a), v);
		REQUIRE(isfinite(v) && v >= 0, "model.rope_scaling.%s=%s must be >= 0 (0 or null: "
			"transformers' default)", rope_nums[i].name, a);
		REQUIRE(yarn || v == 0, "model.rope_scaling.%s=%s is given but model.rope_scaling.type is "
			"not \"yarn\"", rope_nums[i].name, a);
	}
	REQUIRE(yarn || !rs->no_truncate,
		"model.rope_scaling.truncate is given but model.rope_scaling.type is not \"yarn\"");
	fmt_double(a, sizeof(a), m->rope_theta);
	REQUIRE(!yarn || m->rope_theta > 1, "model.rope_theta=%s must be > 1 with YaRN (model.rope_scaling)",
		a);
	return 0;
}

static int validate_layers(const struct model_config *m, char *err, size_t errlen)
{
	bool dense = m->first_k_dense_replace > 0 || m->n_routed_experts == 0;

	REQUIRE(m->moe_layer_freq == 1, "model.moe_layer_freq=%d is not supported (only 1)",
		m->moe_layer_freq);
	REQUIRE(m->first_k_dense_replace <= m->num_hidden_layers,
		"model.first_k_dense_replace=%d exceeds model.num_hidden_layers=%d",
		m->first_k_dense_replace, m->num_hidden_layers);
	REQUIRE(m->num_nextn_predict_layers <= MTP_MAX_DEPTH,
		"model.num_nextn_predict_layers=%d: at most %d multi-token-prediction depths",
		m->num_nextn_predict_layers, MTP_MAX_DEPTH);
	REQUIRE(!dense || m->intermediate_size > 0,
		"model.intermediate_size=%d must be > 0: there are dense layers "
		"(model.first_k_dense_replace=%d, model.n_routed_experts=%d)",
		m->intermediate_size, m->first_k_dense_replace, m->n_routed_experts);
	return 0;
}

static int validate_routing(const struct model_config *m, char *err, size_t errlen)
{
	int e = m->n_routed_experts, per_group;

	if (e == 0 || m->first_k_dense_replace >= m->num_hidden_layers)
		return 0;  /* no MoE layer */
	REQUIRE(m->moe_intermediate_size > 0,
		"model.moe_intermediate_size=%d must be > 0: there are MoE layers",
		m->moe_intermediate_size);
	REQUIRE(m->n_group >= 1, "model.n_group=%d must be >= 1", m->n_group);
	REQUIRE(e % m->n_group == 0, "model.n_routed_experts=%d is not divisible by model.n_group=%d",
		e, m->n_group);
	REQUIRE(m->topk_group >= 1 && m->topk_group <= m->n_group,
		"model.topk_group=%d must be in [1, model.n_group=%d]", m->topk_group, m->n_group);
	per_group = e / m->n_group;
	REQUIRE(m->scoring_func != MOE_SCORING_SIGMOID || m->n_group == 1 || per_group >= 2,
		"model.n_group=%d leaves %d expert per group: sigmoid group scores sum the top 2",
		m->n_group, per_group);
	REQUIRE(m->num_experts_per_tok >= 1 && m->num_experts_per_tok <= e,
		"model.num_experts_per_tok=%d must be in [1, model.n_routed_experts=%d]",
		m->num_experts_per_tok, e);
	REQUIRE(m->num_experts_per_tok <= m->topk_group * per_group,
		"model.num_experts_per_tok=%d exceeds the %d experts in model.topk_group=%d groups "
		"of %d", m->num_experts_per_tok, m->topk_group * per_group, m->topk_group, per_group);
	return 0;
}

static int validate_train(const struct train_config *t, char *err, size_t errlen)
{
	char a[48], b[48];

	fmt_double(a, sizeof(a), t->min_lr);
	fmt_double(b, sizeof(b), t->lr);
	REQUIRE(t->min_lr <= t->lr, "train.min_lr=%s must be <= train.lr=%s", a, b);
	fmt_double(a, sizeof(a), t->beta1);
	REQUIRE(t->beta1 < 1, "train.beta1=%s must be in [0, 1)", a);
	fmt_double(a, sizeof(a), t->beta2);
	REQUIRE(t->beta2 < 1, "train.beta2=%s must be in [0, 1)", a);
	fmt_double(a, sizeof(a), t->decay_frac);
	REQUIRE(t->decay_frac <= 1, "train.decay_frac=%s must be in [0, 1]", a);
	return 0;
}

static int validate_parallel(const struct run_config *c, int world_size, char *err, size_t errlen)
{
	int ep = c->parallel.ep, e = c->model.n_routed_experts;

	REQUIRE(c->parallel.zero == 0 || c->parallel.zero == 1, "parallel.zero=%d must be 0 or 1",
		c->parallel.zero);
	REQUIRE(world_size <= 0 || world_size % ep == 0,
		"parallel.ep=%d does not divide the world size %d", ep, world_size);
	REQUIRE(ep == 1 || e > 0, "parallel.ep=%d needs routed experts (model.n_routed_experts=0)",
		ep);
	REQUIRE(e % ep == 0, "model.n_routed_experts=%d is not divisible by parallel.ep=%d", e, ep);
	return 0;
}

static int validate_grpo(const struct grpo_config *g, char *err, size_t errlen)
{
	char a[48];

	REQUIRE(g->group_size >= 2, "grpo.group_size=%d must be >= 2 (advantages compare a group)",
		g->group_size);
	fmt_double(a, sizeof(a), g->top_p);
	REQUIRE(g->top_p <= 1, "grpo.top_p=%s must be in (0, 1]", a);
	REQUIRE(g->reward_cmd_argc >= 0 && g->reward_cmd_argc <= CFG_MAX_ARGV,
		"grpo.reward_cmd has %d arguments (at most %d)", g->reward_cmd_argc, CFG_MAX_ARGV);
	return config_rewards_validate(g, err, errlen);
}

static int validate_distill(const struct distill_config *d, char *err, size_t errlen)
{
	char a[48];

	fmt_double(a, sizeof(a), d->alpha);
	REQUIRE(d->alpha <= 1, "distill.alpha=%s must be in [0, 1]", a);
	return 0;
}

/* lora.targets: known names, each once; the base and the paths LoRA does not take yet */
static int validate_lora(const struct run_config *c, char *err, size_t errlen)
{
	const struct lora_config *l = &c->lora;
	char a[48];
	unsigned seen = 0;

	if (l->rank == 0)
		return 0;
	REQUIRE(l->n_targets > 0, "lora.targets is empty: name the modules to adapt (%s)",
		lora_target_list());
	for (int i = 0; i < l->n_targets; i++) {
		int t = lora_target_parse(l->targets[i]);
		REQUIRE(t >= 0, "lora.targets: unknown module '%s' (known: %s)", l->targets[i],
			lora_target_list());
		REQUIRE(!(seen & (1u << t)), "lora.targets: '%s' is named twice", l->targets[i]);
		seen |= 1u << t;
	}
	fmt_double(a, sizeof(a), l->dropout);
	REQUIRE(l->dropout < 1, "lora.dropout=%s must be in [0, 1)", a);
	REQUIRE(l->base[0] || c->train.init_checkpoint[0],
		"lora.rank=%d needs the base model: set train.init_checkpoint (or lora.base) to its checkpoint",
		l->rank);
	REQUIRE(!c->parallel.zero, "parallel.zero=1 with lora: the adapters' AdamW state is small and is "
		"not sharded; set parallel.zero=0");
	REQUIRE(strcmp(c->train.device, "cuda"), "train.device=cuda with lora: the GPU model has no LoRA "
		"adapters yet; use train.device=cpu (or auto)");
	/* the MTP depths' backward reads base gradients that LoRA leaves out */
	REQUIRE(c->model.num_nextn_predict_layers == 0, "lora with model.num_nextn_predict_layers=%d: "
		"LoRA does not adapt the multi-token-prediction depths yet; fine-tune a model without them "
		"(model.num_nextn_predict_layers=0)", c->model.num_nextn_predict_layers);
	return 0;
}

int config_validate(const struct run_config *c, int world_size, char *err, size_t errlen)
{
	for (size_t i = 0; i < N_KEYS; i++) {
		if (check_range(c, &cfg_keys[i], err, errlen) ||
		    check_choice(c, &cfg_keys[i], err, errlen))
			return -1;
	}
	if (validate_attention(&c->model, err, errlen) || validate_rope(&c->model, err, errlen) ||
	    validate_layers(&c->model, err, errlen) ||
	    validate_routing(&c->model, err, errlen) || validate_train(&c->train, err, errlen) ||
	    validate_parallel(c, world_size, err, errlen) || validate_grpo(&c->grpo, err, errlen) ||
	    validate_distill(&c->distill, err, errlen) || validate_lora(c, err, errlen))
		return -1;
	return 0;
}

/* ---- loading ---- */

static char *read_file(const char *path, char *err, size_t errlen)
{
	FILE *f = fopen(path, "rb");
	size_t len = 0, cap = 0, n;
	char *buf = NULL, *nb;

	if (!f) {
		set_err(err, errlen, "config %s: %s", path, strerror(errno));
		return NULL;
	}
	do {
		if (cap - len < 2) {
			cap = cap ? 2 * cap : 8192;
			nb = realloc(buf, cap);
			if (!nb) {
				set_err(err, errlen, "config %s: out of memory", path);
				goto bad;
			}
			buf = nb;
		}
		n = fread(buf + len, 1, cap - len - 1, f);
		len += n;
	} while (n > 0);
	if (ferror(f)) {
		set_err(err, errlen, "config %s: read error", path);
		goto bad;
	}
	buf[len] = '\0';
	if (strlen(buf) != len) {
		set_err(err, errlen, "config %s: contains a NUL byte (not a JSON text file)", path);
		goto bad;
	}
	fclose(f);
	return buf;
bad:
	free(buf);
	fclose(f);
	return NULL;
}

static int load_file(struct run_config *c, const char *path, char *err, size_t errlen)
{
	char *text = read_file(path, err, errlen);
	int rc;

	if (!text)
		return -1;
	rc = config_apply_json(c, text, path, err, errlen);
	free(text);
	return rc;
}

int config_load(struct run_config *c, const char *path, char *const *sets, int nsets, char *err,
		size_t errlen)
{
	char why[768];

	config_defaults(c);
	if (path && load_file(c, path, err, errlen))
		return -1;
	for (int i = 0; i < nsets; i++)
		if (config_set(c, sets[i], err, errlen))
			return -1;
	if (c->model.num_key_value_heads == 0)
		c->model.num_key_value_heads = c->model.num_attention_heads;
	if (config_validate(c, 0, why, sizeof(why)))
		return set_err(err, errlen, "%s: %s", path ? path : "config", why);
	return 0;
}
