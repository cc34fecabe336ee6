/*
 * tests/train/test_config.c - the run configuration: loading, --set, errors that name the key,
 * validation of impossible combinations, and the exact config_to_json round trip.
 */
#include "harness.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/config.h"

static char err[1024];

static const char *config_path(const char *name)
{
	char rel[1024];

	snprintf(rel, sizeof(rel), "configs/%s", name);
	return src_path(rel);
}

/* Write text to a scratch file; returns its path (static buffer). */
static const char *write_tmp(const char *name, const char *text)
{
	static char path[1024];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", test_tmpdir(), name);
	f = fopen(path, "w");
	CU_ASSERT_PTR_NOT_NULL_FATAL(f);
	fputs(text, f);
	fclose(f);
	return path;
}

static bool contains(const char *s, const char *sub)
{
	if (!strstr(s, sub)) {
		fprintf(stderr, "\n    message \"%s\" lacks \"%s\"\n", s, sub);
		return false;
	}
	return true;
}

/* Load a JSON text from a scratch file; expect failure with each of the needles in the message. */
static void expect_load_error(const char *json, const char *needle1, const char *needle2)
{
	struct run_config c;
	const char *path = write_tmp("bad.json", json);

	err[0] = '\0';
	CU_ASSERT_EQUAL(config_load(&c, path, NULL, 0, err, sizeof(err)), -1);
	CU_ASSERT(contains(err, path));
	if (needle1)
		CU_ASSERT(contains(err, needle1));
	if (needle2)
		CU_ASSERT(contains(err, needle2));
}

/* Defaults plus one --set, then validate; expect failure naming needle. */
static void expect_invalid(const char *set, int world, const char *needle)
{
	struct run_config c;

	config_defaults(&c);
	CU_ASSERT_EQUAL_FATAL(config_set(&c, set, err, sizeof(err)), 0);
	err[0] = '\0';
	CU_ASSERT_EQUAL(config_validate(&c, world, err, sizeof(err)), -1);
	CU_ASSERT(contains(err, needle));
}

static void expect_set_error(const char *set, const char *needle1, const char *needle2)
{
	struct run_config c;

	config_defaults(&c);
	err[0] = '\0';
	CU_ASSERT_EQUAL(config_set(&c, set, err, sizeof(err)), -1);
	CU_ASSERT(contains(err, needle1));
	if (needle2)
		CU_ASSERT(contains(err, needle2));
}

/* to_json, apply over fresh defaults, and compare bit for bit. */
static void check_round_trip(const struct run_config *c)
{
	struct run_config d;
	char key[64];
	char *text = config_to_json(c), *again;

	CU_ASSERT_PTR_NOT_NULL_FATAL(text);
	config_defaults(&d);
	CU_ASSERT_EQUAL_FATAL(config_apply_json(&d, text, "round-trip", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(config_model_diff(&c->model, &d.model, key, sizeof(key)), 0);
	CU_ASSERT_EQUAL(memcmp(c, &d, sizeof(d)), 0);
	again = config_to_json(&d);
	CU_ASSERT_STRING_EQUAL(text, again);
	free(again);
	free(text);
}

/* ---- multi-token prediction ---- */

static void test_mtp_keys(void)
{
	struct run_config c;

	config_defaults(&c);
	CU_ASSERT_EQUAL(c.model.num_nextn_predict_layers, 0);
	CU_ASSERT_EQUAL(c.train.mtp_lambda.n, 1);
	CU_ASSERT_EQUAL(piecewise_at(&c.train.mtp_lambda, 12345), 0.3);
	CU_ASSERT_EQUAL_FATAL(config_set(&c, "model.num_nextn_predict_layers=2", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(c.model.num_nextn_predict_layers, 2);
	/* V3's schedule: 0.3 for the first 10T tokens, then 0.1 */
	CU_ASSERT_EQUAL_FATAL(config_set(&c, "train.mtp_lambda={\"steps\": [0, 100, 250], "
					 "\"values\": [0.3, 0.1, 0]}", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(c.train.mtp_lambda.n, 3);
	CU_ASSERT_EQUAL(piecewise_at(&c.train.mtp_lambda, 0), 0.3);
	CU_ASSERT_EQUAL(piecewise_at(&c.train.mtp_lambda, 99), 0.3);
	CU_ASSERT_EQUAL(piecewise_at(&c.train.mtp_lambda, 100), 0.1);
	CU_ASSERT_EQUAL(piecewise_at(&c.train.mtp_lambda, 249), 0.1);
	CU_ASSERT_EQUAL(piecewise_at(&c.train.mtp_lambda, 250), 0.0);
	CU_ASSERT_EQUAL(config_validate(&c, 1, err, sizeof(err)), 0);
	check_round_trip(&c);
	CU_ASSERT_EQUAL_FATAL(config_set(&c, "train.mtp_lambda=0.25", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(c.train.mtp_lambda.n, 1);
	CU_ASSERT_EQUAL(piecewise_at(&c.train.mtp_lambda, 7), 0.25);
	check_round_trip(&c);

	expect_set_error("train.mtp_lambda=-1", "train.mtp_lambda", ">= 0");
	expect_set_error("train.mtp_lambda=big", "train.mtp_lambda", "cannot parse");
	expect_set_error("train.mtp_lambda=[0.3]", "train.mtp_lambda", "expected a number or an object");
	expect_set_error("train.mtp_lambda={\"steps\": [0, 5]}", "train.mtp_lambda", "needs both");
	expect_set_error("train.mtp_lambda={\"steps\": [0, 5], \"values\": [1]}", "train.mtp_lambda",
			 "2 steps but 1 values");
	expect_set_error("train.mtp_lambda={\"steps\": [1], \"values\": [1]}", "steps[0]=1 must be 0",
			 NULL);
	expect_set_error("train.mtp_lambda={\"steps\": [0, 5, 5], \"values\": [1, 2, 3]}",
			 "steps[2]=5 must be > steps[1]", NULL);
	expect_set_error("train.mtp_lambda={\"steps\": [0, 2.5], \"values\": [1, 2]}", "steps[1]=2.5",
			 "integer");
	expect_set_error("train.mtp_lambda={\"steps\": [0], \"values\": [-0.1]}", "values[0]=-0.1",
			 ">= 0");
	expect_set_error("train.mtp_lambda={\"steps\": [0], \"values\": [1], \"x\": 1}",
			 "unknown key \"x\"", NULL);
	expect_invalid("model.num_nextn_predict_layers=-1", 1, "model.num_nextn_predict_layers=-1 must be >= 0");
	expect_invalid("model.num_nextn_predict_layers=9", 1, "model.num_nextn_predict_layers=9");
}

/* ---- loading ---- */

static void test_defaults(void)
{
	struct run_config c;

	config_defaults(&c);
	CU_ASSERT_EQUAL(config_validate(&c, 1, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(c.train.steps, 100);
	CU_ASSERT_EQUAL(c.train.seq_len, 64);
	CU_ASSERT_DOUBLE_EQUAL(c.train.lr, 3e-4, 0);
	CU_ASSERT_STRING_EQUAL(c.train.schedule, "cosine");
	CU_ASSERT_STRING_EQUAL(c.train.on_nonfinite, "stop");
	CU_ASSERT_STRING_EQUAL(c.checkpoint.dir, "checkpoints");
	CU_ASSERT_EQUAL(c.checkpoint.keep, 3);
	CU_ASSERT_EQUAL(c.grpo.group_size, 8);
	CU_ASSERT_DOUBLE_EQUAL(c.grpo.epsilon_high, 0.2, 0);
	CU_ASSERT_STRING_EQUAL(c.grpo.loss_type, "dapo");
	CU_ASSERT_STRING_EQUAL(c.grpo.scale_rewards, "group");
	CU_ASSERT_EQUAL(c.grpo.reward_cmd_argc, 0);
	CU_ASSERT_EQUAL(c.parallel.ep, 1);
	CU_ASSERT_STRING_EQUAL(c.distill.teacher, "");  /* no distillation */
	CU_ASSERT_DOUBLE_EQUAL(c.distill.alpha, 0.5, 0);
	CU_ASSERT_DOUBLE_EQUAL(c.distill.temperature, 1.0, 0);
	CU_ASSERT_STRING_EQUAL(c.distill.kl, "forward");
	CU_ASSERT(mc_layer_is_moe(&c.model, 1));
	CU_ASSERT(!mc_layer_is_moe(&c.model, 0));
}

static void test_load_every_config(void)
{
	char dir[1024];
	DIR *d;
	struct dirent *e;
	int n = 0;

	snprintf(dir, sizeof(dir), "%s", src_path("configs"));
	d = opendir(dir);
	CU_ASSERT_PTR_NOT_NULL_FATAL(d);
	while ((e = readdir(d))) {
		size_t len = strlen(e->d_name);
		struct run_config c;

		if (len < 5 || strcmp(e->d_name + len - 5, ".json"))
			continue;
		err[0] = '\0';
		if (config_load(&c, config_path(e->d_name), NULL, 0, err, sizeof(err)))
			fprintf(stderr, "\n    %s\n", err);
		CU_ASSERT_EQUAL(config_load(&c, config_path(e->d_name), NULL, 0, err, sizeof(err)), 0);
		CU_ASSERT_EQUAL(config_validate(&c, 1, err, sizeof(err)), 0);
		check_round_trip(&c);
		n++;
	}
	closedir(d);
	CU_ASSERT(n >= 4);
}

static void test_published_models(void)
{
	struct run_config c;

	CU_ASSERT_EQUAL_FATAL(config_load(&c, config_path("deepseek-v3.json"), NULL, 0, err,
					  sizeof(err)), 0);
	CU_ASSERT_EQUAL(c.model.hidden_size, 7168);
	CU_ASSERT_EQUAL(c.model.n_routed_experts, 256);
	CU_ASSERT_EQUAL(c.model.first_k_dense_replace, 3);
	CU_ASSERT_EQUAL(c.model.q_lora_rank, 1536);
	CU_ASSERT_EQUAL(c.model.num_key_value_heads, 128);
	CU_ASSERT_EQUAL(c.model.scoring_func, MOE_SCORING_SIGMOID);
	CU_ASSERT_DOUBLE_EQUAL(c.model.routed_scaling_factor, 2.5, 0);
	CU_ASSERT_EQUAL(c.model.rope_scaling.type, ROPE_YARN);  /* DeepSeek's rope_scaling, as published */
	CU_ASSERT_EQUAL(c.model.rope_scaling.factor, 40);
	CU_ASSERT_EQUAL(c.model.rope_scaling.original_max_position_embeddings, 4096);
	CU_ASSERT_EQUAL(c.model.rope_scaling.beta_fast, 32);
	CU_ASSERT_EQUAL(c.model.rope_scaling.beta_slow, 1);
	CU_ASSERT_EQUAL(c.model.rope_scaling.mscale, 1.0);
	CU_ASSERT_EQUAL(c.model.rope_scaling.mscale_all_dim, 1.0);
	CU_ASSERT(!c.model.rope_scaling.no_truncate);
	CU_ASSERT_EQUAL(config_validate(&c, 64, err, sizeof(err)), 0);

	CU_ASSERT_EQUAL_FATAL(config_load(&c, config_path("deepseek-v2-lite.json"), NULL, 0, err,
					  sizeof(err)), 0);
	CU_ASSERT_EQUAL(c.model.q_lora_rank, 0);  /* null in the HF file */
	CU_ASSERT_EQUAL(c.model.n_routed_experts, 64);
	CU_ASSERT_EQUAL(c.model.n_shared_experts, 2);
	CU_ASSERT_EQUAL(c.model.scoring_func, MOE_SCORING_SOFTMAX);
	CU_ASSERT(!c.model.norm_topk_prob);
	CU_ASSERT_EQUAL(c.model.eos_token_id, 100001);
	CU_ASSERT_EQUAL(c.model.rope_scaling.type, ROPE_YARN);
	CU_ASSERT_EQUAL(c.model.rope_scaling.mscale, 0.707);
	CU_ASSERT_EQUAL(c.model.rope_scaling.mscale_all_dim, 0.707);

	CU_ASSERT_EQUAL_FATAL(config_load(&c, config_path("tiny.json"), NULL, 0, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(c.model.vocab_size, 256);
	CU_ASSERT_EQUAL(c.train.seq_len, 32);
	CU_ASSERT_STRING_EQUAL(c.data.train, "data/tiny/train_*.bin");
}

static void test_hf_nulls_and_ignored_keys(void)
{
	struct run_config c;
	const char *path = write_tmp("hf.json",
		"{\"model\": {\"num_attention_heads\": 8, \"num_key_value_heads\": null,\n"
		" \"n_routed_experts\": null, \"n_shared_experts\": null, \"q_lora_rank\": null,\n"
		" \"architectures\": [\"DeepseekV2ForCausalLM\"], \"model_type\": \"deepseek_v2\",\n"
		" \"torch_dtype\": \"bfloat16\", \"use_cache\": true, \"pretraining_tp\": 1,\n"
		" \"attention_dropout\": 0.0, \"hidden_act\": \"silu\", \"topk_method\": \"greedy\",\n"
		" \"ep_size\": 1, \"num_nextn_predict_layers\": 0, \"rope_scaling\": null,\n"
		" \"quantization_config\": {\"activation_scheme\": \"dynamic\", \"fmt\": \"e4m3\",\n"
		" \"quant_method\": \"fp8\", \"weight_block_size\": [128, 128]},\n"
		" \"auto_map\": {\"AutoConfig\": \"x\"}, \"transformers_version\": \"4.33.1\"}}\n");

	CU_ASSERT_EQUAL_FATAL(config_load(&c, path, NULL, 0, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(c.model.num_key_value_heads, 8);
	CU_ASSERT_EQUAL(c.model.n_routed_experts, 0);
	CU_ASSERT_EQUAL(c.model.q_lora_rank, 0);
	CU_ASSERT(!mc_layer_is_moe(&c.model, 1));

	/* heads changed by --set with kv heads null: still equal */
	{
		char *sets[] = { "model.num_key_value_heads=null", "model.num_attention_heads=2" };

		CU_ASSERT_EQUAL(config_load(&c, config_path("tiny.json"), sets, 2, err, sizeof(err)),
				0);
		CU_ASSERT_EQUAL(c.model.num_key_value_heads, 2);
	}
}

static void test_hf_rejections(void)
{
	expect_load_error("{\"model\": {\"rope_scaling\": {\"type\": \"linear\", \"factor\": 4}}}",
			  "model.rope_scaling.type", "\"linear\" is not supported (only \"yarn\"");
	/* DeepSeek's fp8 quantization_config describes its files and is accepted (test_hf_keys);
	 * anything else is refused naming what is wrong */
	expect_load_error("{\"model\": {\"quantization_config\": {\"quant_method\": \"fp8\"}}}",
			  "model.quantization_config", "fmt missing");
	expect_load_error("{\"model\": {\"quantization_config\": {\"quant_method\": \"awq\", "
			  "\"fmt\": \"e4m3\", \"weight_block_size\": [128, 128]}}}",
			  "model.quantization_config", "quant_method must be \"fp8\"");
	expect_load_error("{\"model\": {\"quantization_config\": {\"quant_method\": \"fp8\", "
			  "\"fmt\": \"e4m3\", \"weight_block_size\": [128, 0]}}}",
			  "model.quantization_config", "weight_block_size");
	expect_load_error("{\"model\": {\"hidden_act\": \"gelu\"}}", "model.hidden_act", NULL);
	expect_load_error("{\"model\": {\"attention_dropout\": 0.1}}", "model.attention_dropout", NULL);
	expect_load_error("{\"model\": {\"topk_method\": \"random\"}}", "model.topk_method", NULL);
	expect_load_error("{\"model\": {\"tie_word_embeddings\": true}}", "model.tie_word_embeddings",
			  NULL);
	expect_load_error("{\"model\": {\"attention_bias\": true}}", "model.attention_bias", NULL);
	expect_load_error("{\"model\": {\"moe_layer_freq\": 2}}", "model.moe_layer_freq", NULL);
	expect_load_error("{\"model\": {\"num_key_value_heads\": 1}}", "model.num_key_value_heads",
			  NULL);
}

/* ---- model.rope_scaling (YaRN) ---- */

/* DeepSeek's old spelling ("type") and transformers' ("rope_type"); null numbers are 0 (HF's defaults) */
static void test_rope_scaling_load(void)
{
	struct run_config c;
	const struct rope_scaling *rs = &c.model.rope_scaling;

	CU_ASSERT_EQUAL_FATAL(config_load(&c, write_tmp("yarn.json",
		"{\"model\": {\"max_position_embeddings\": 32768,\n"
		" \"rope_scaling\": {\"rope_type\": \"yarn\", \"type\": \"yarn\", \"factor\": null,\n"
		" \"original_max_position_embeddings\": 4096, \"beta_fast\": 16, \"mscale_all_dim\": 0.5,\n"
		" \"attention_factor\": 1.25, \"truncate\": false}}}\n"), NULL, 0, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(rs->type, ROPE_YARN);
	CU_ASSERT_EQUAL(rs->factor, 0);
	CU_ASSERT_EQUAL(rs->original_max_position_embeddings, 4096);
	CU_ASSERT_EQUAL(rs->beta_fast, 16);
	CU_ASSERT_EQUAL(rs->beta_slow, 0);
	CU_ASSERT_EQUAL(rs->mscale, 0);
	CU_ASSERT_EQUAL(rs->mscale_all_dim, 0.5);
	CU_ASSERT_EQUAL(rs->attention_factor, 1.25);
	CU_ASSERT(rs->no_truncate);
	check_round_trip(&c);

	/* "default" is no scaling, like null */
	CU_ASSERT_EQUAL_FATAL(config_load(&c, write_tmp("yarn.json",
		"{\"model\": {\"rope_scaling\": {\"rope_type\": \"default\"}}}"), NULL, 0, err,
		sizeof(err)), 0);
	CU_ASSERT_EQUAL(rs->type, ROPE_DEFAULT);
}

/* --set the whole object, or one of its keys (the others kept); null clears it */
static void test_rope_scaling_set(void)
{
	struct run_config c;
	const struct rope_scaling *rs = &c.model.rope_scaling;
	char *whole[] = { "model.rope_scaling={\"type\": \"yarn\", \"factor\": 40, "
			  "\"original_max_position_embeddings\": 4096, \"mscale\": 1, \"mscale_all_dim\": 1}",
			  "model.rope_scaling.factor=8", "model.rope_scaling.truncate=false" };
	char *keys[] = { "model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
			 "model.rope_scaling.original_max_position_embeddings=16" };
	char *text;

	CU_ASSERT_EQUAL_FATAL(config_load(&c, NULL, whole, 3, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(rs->type, ROPE_YARN);
	CU_ASSERT_EQUAL(rs->factor, 8);
	CU_ASSERT_EQUAL(rs->original_max_position_embeddings, 4096);
	CU_ASSERT_EQUAL(rs->mscale_all_dim, 1);
	CU_ASSERT(rs->no_truncate);
	check_round_trip(&c);
	text = config_to_json(&c);
	CU_ASSERT_PTR_NOT_NULL_FATAL(text);
	CU_ASSERT(contains(text, "\"type\":\t\"yarn\""));
	CU_ASSERT(contains(text, "\"factor\":\t8"));
	CU_ASSERT(contains(text, "\"truncate\":\tfalse"));
	CU_ASSERT(!strstr(text, "attention_factor"));  /* 0: left out, transformers derives it */
	free(text);
	CU_ASSERT_EQUAL(config_set(&c, "model.rope_scaling=null", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(rs->type, ROPE_DEFAULT);
	CU_ASSERT_EQUAL(rs->factor, 0);
	CU_ASSERT(!rs->no_truncate);
	text = config_to_json(&c);
	CU_ASSERT(contains(text, "\"rope_scaling\":\tnull"));
	free(text);

	CU_ASSERT_EQUAL_FATAL(config_load(&c, NULL, keys, 3, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(rs->type, ROPE_YARN);
	CU_ASSERT_EQUAL(rs->factor, 4);
	CU_ASSERT_EQUAL(rs->original_max_position_embeddings, 16);
	check_round_trip(&c);
}

static void test_rope_scaling_errors(void)
{
	/* each names the key */
	expect_load_error("{\"model\": {\"rope_scaling\": {\"type\": \"yarn\", \"factr\": 40}}}",
			  "model.rope_scaling.factr: unknown key", "factor");
	expect_load_error("{\"model\": {\"rope_scaling\": {\"type\": \"yarn\", \"factor\": \"40\"}}}",
			  "model.rope_scaling.factor: expected a number, got string", NULL);
	expect_load_error("{\"model\": {\"rope_scaling\": {\"type\": \"yarn\", "
			  "\"original_max_position_embeddings\": 4096.5}}}",
			  "model.rope_scaling.original_max_position_embeddings: expected an integer", NULL);
	expect_load_error("{\"model\": {\"rope_scaling\": {\"type\": \"yarn\", \"truncate\": 0}}}",
			  "model.rope_scaling.truncate: expected true or false", NULL);
	expect_load_error("{\"model\": {\"rope_scaling\": {\"type\": \"yarn\", \"rope_type\": \"linear\"}}}",
			  "model.rope_scaling.rope_type", "disagrees");
	expect_load_error("{\"model\": {\"rope_scaling\": {\"factor\": 40}}}", "model.rope_scaling",
			  "no \"type\"");
	expect_load_error("{\"model\": {\"rope_scaling\": \"yarn\"}}", "model.rope_scaling",
			  "expected an object");
	expect_load_error("{\"model\": {\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4, "
			  "\"factor\": 8}}}", "model.rope_scaling.factor: duplicate key", NULL);
	expect_load_error("{\"model\": {\"rope_scaling\": {\"type\": \"yarn\", \"factor\": -40}}}",
			  "model.rope_scaling.factor=-40 must be >= 0", NULL);
	expect_load_error("{\"model\": {\"rope_scaling\": {\"type\": \"yarn\", \"beta_slow\": -1}}}",
			  "model.rope_scaling.beta_slow=-1", NULL);
	expect_load_error("{\"model\": {\"rope_theta\": 1, \"rope_scaling\": {\"type\": \"yarn\"}}}",
			  "model.rope_theta=1 must be > 1 with YaRN", NULL);
	expect_set_error("model.rope_scaling.beta=3", "model.rope_scaling.beta: unknown key", NULL);
	expect_set_error("model.rope_scaling.type=ntk", "model.rope_scaling.type", "ntk");
	expect_set_error("model.rope_scaling.factor=big", "model.rope_scaling.factor", "expected a number");
	expect_set_error("model.rope_scaling=yarn", "model.rope_scaling", "JSON object");
	/* YaRN's numbers without type yarn would be lost: refused */
	expect_invalid("model.rope_scaling.factor=4", 1,
		       "model.rope_scaling.factor=4 is given but model.rope_scaling.type is not \"yarn\"");
	expect_invalid("model.qk_rope_head_dim=258", 1, "model.qk_rope_head_dim=258 must be <= 256");
}

/* ---- --set ---- */

static void test_set_each_type(void)
{
	struct run_config c;
	char *sets[] = {
		"train.steps=7",
		"train.lr=1.5e-3",
		"train.min_lr=0",
		"data.shuffle=true",
		"checkpoint.dir=/tmp/run dir",
		"data.train=\"quoted_*.bin\"",
		"train.seed=9007199254740991",
		"grpo.reward_cmd=[\"python3\",\"r.py\"]",
		"grpo.epsilon_high=0.28",
		"model.scoring_func=softmax",
		"model.q_lora_rank=null",
		"model.topk_method=greedy",
	};

	CU_ASSERT_EQUAL_FATAL(config_load(&c, config_path("tiny.json"), sets,
					  (int)(sizeof(sets) / sizeof(sets[0])), err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(c.train.steps, 7);
	CU_ASSERT_DOUBLE_EQUAL(c.train.lr, 1.5e-3, 0);
	CU_ASSERT(c.data.shuffle);
	CU_ASSERT_STRING_EQUAL(c.checkpoint.dir, "/tmp/run dir");
	CU_ASSERT_STRING_EQUAL(c.data.train, "quoted_*.bin");
	CU_ASSERT_EQUAL(c.train.seed, 9007199254740991LL);
	CU_ASSERT_EQUAL(c.grpo.reward_cmd_argc, 2);
	CU_ASSERT_STRING_EQUAL(c.grpo.reward_cmd[0], "python3");
	CU_ASSERT_STRING_EQUAL(c.grpo.reward_cmd[1], "r.py");
	CU_ASSERT_DOUBLE_EQUAL(c.grpo.epsilon_high, 0.28, 0);
	CU_ASSERT_EQUAL(c.model.scoring_func, MOE_SCORING_SOFTMAX);
	CU_ASSERT_EQUAL(c.model.q_lora_rank, 0);
	check_round_trip(&c);

	/* a later --set wins; a shorter list clears the tail */
	CU_ASSERT_EQUAL(config_set(&c, "grpo.reward_cmd=[\"./reward\"]", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(c.grpo.reward_cmd_argc, 1);
	CU_ASSERT_STRING_EQUAL(c.grpo.reward_cmd[1], "");
	CU_ASSERT_EQUAL(config_set(&c, "data.shuffle=false", err, sizeof(err)), 0);
	CU_ASSERT(!c.data.shuffle);
}

static void test_set_errors(void)
{
	expect_set_error("train.steps", "expected section.key=value", NULL);
	expect_set_error("steps=3", "expected section.key=value", NULL);
	expect_set_error("train.lrr=1", "unknown key train.lrr", "did you mean train.lr");
	expect_set_error("trian.lr=1", "unknown section trian", NULL);
	expect_set_error("train.steps=abc", "train.steps", "cannot parse 'abc' as an integer");
	expect_set_error("train.steps=2.5", "train.steps", "expected an integer, got 2.5");
	expect_set_error("train.steps=1e12", "train.steps", "out of range");
	expect_set_error("train.lr=fast", "train.lr", "as a number");
	expect_set_error("train.lr=1e-3x", "train.lr", "as a number");
	expect_set_error("data.shuffle=yes", "data.shuffle", "boolean");
	expect_set_error("data.shuffle=1", "data.shuffle", "expected true or false");
	expect_set_error("grpo.reward_cmd=python3 r.py", "grpo.reward_cmd", "JSON array");
	expect_set_error("grpo.reward_cmd=[\"a\", 3]", "grpo.reward_cmd", "argument 1");
	expect_set_error("model.scoring_func=relu", "model.scoring_func", "relu");
	expect_set_error("model.hidden_size=null", "model.hidden_size", "got null");
	expect_set_error("model.topk_method=random", "model.topk_method", NULL);
}

/* ---- file errors ---- */

static void test_unknown_key(void)
{
	expect_load_error("{\"model\": {\"hiden_size\": 64}}", "unknown key model.hiden_size",
			  "did you mean model.hidden_size");
	expect_load_error("{\"train\": {\"learning_rate\": 0.1}}", "unknown key train.learning_rate",
			  NULL);
	expect_load_error("{\"optimizer\": {}}", "unknown section optimizer", NULL);
	expect_load_error("{\"train\": {\"lr\": 0.1, \"lr\": 0.2}}", "duplicate key train.lr", NULL);
}

static void test_wrong_type(void)
{
	expect_load_error("{\"train\": {\"lr\": \"fast\"}}", "train.lr: expected a number, got string",
			  NULL);
	expect_load_error("{\"train\": {\"steps\": 2.5}}", "train.steps: expected an integer, got 2.5",
			  NULL);
	expect_load_error("{\"data\": {\"shuffle\": 1}}", "data.shuffle", "got number");
	expect_load_error("{\"data\": {\"train\": 5}}", "data.train: expected a string, got number",
			  NULL);
	expect_load_error("{\"grpo\": {\"reward_cmd\": \"python3 r.py\"}}", "grpo.reward_cmd",
			  "got string");
	expect_load_error("{\"model\": {\"scoring_func\": \"tanh\"}}", "model.scoring_func", NULL);
	expect_load_error("{\"train\": 3}", "train: expected an object", NULL);
	expect_load_error("[1, 2]", "top level", NULL);
	expect_load_error("{\"train\": {\"lr\": 1e999}}", "train.lr", NULL);
}

static void test_malformed_json(void)
{
	struct run_config c;

	expect_load_error("{\n  \"train\": {\"lr\": 0.1,}\n}\n", ":2:", "malformed JSON");
	expect_load_error("{\"train\": {}} trailing", "malformed JSON", NULL);
	expect_load_error("", "malformed JSON", NULL);
	err[0] = '\0';
	CU_ASSERT_EQUAL(config_load(&c, "/nonexistent/cfg.json", NULL, 0, err, sizeof(err)), -1);
	CU_ASSERT(contains(err, "/nonexistent/cfg.json"));
}

/* ---- validation ---- */

static void test_expert_parallel(void)
{
	struct run_config c;
	char *sets[] = { "parallel.ep=3" };
	const char *path = config_path("tiny.json");

	err[0] = '\0';
	CU_ASSERT_EQUAL(config_load(&c, path, sets, 1, err, sizeof(err)), -1);
	CU_ASSERT(contains(err, "model.n_routed_experts=8 is not divisible by parallel.ep=3"));
	CU_ASSERT(contains(err, path));

	expect_invalid("parallel.ep=2", 3, "parallel.ep=2 does not divide the world size 3");
	config_defaults(&c);
	CU_ASSERT_EQUAL(config_set(&c, "parallel.ep=4", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(config_validate(&c, 8, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(config_validate(&c, 0, err, sizeof(err)), 0);
	expect_invalid("parallel.ep=0", 1, "parallel.ep");
	expect_invalid("parallel.zero=2", 1, "parallel.zero");
}

static void test_validate_model(void)
{
	expect_invalid("model.qk_rope_head_dim=7", 1, "model.qk_rope_head_dim");
	expect_invalid("model.kv_lora_rank=0", 1, "model.kv_lora_rank");
	expect_invalid("model.hidden_size=0", 1, "model.hidden_size");
	expect_invalid("model.n_group=3", 1, "model.n_routed_experts=8 is not divisible by model.n_group=3");
	expect_invalid("model.topk_group=3", 1, "model.topk_group");
	expect_invalid("model.num_experts_per_tok=9", 1, "model.num_experts_per_tok");
	expect_invalid("model.num_experts_per_tok=5", 1, "model.num_experts_per_tok");  /* 1 group of 4 */
	expect_invalid("model.n_group=8", 1, "model.n_group");  /* sigmoid: groups of 1 */
	expect_invalid("model.first_k_dense_replace=3", 1, "model.first_k_dense_replace");
	expect_invalid("model.intermediate_size=0", 1, "model.intermediate_size");
	expect_invalid("model.moe_intermediate_size=0", 1, "model.moe_intermediate_size");
	expect_invalid("model.rms_norm_eps=0", 1, "model.rms_norm_eps");
	expect_invalid("model.eos_token_id=256", 1, "model.eos_token_id");
}

static void test_validate_train(void)
{
	expect_invalid("train.schedule=linear", 1, "train.schedule");
	expect_invalid("train.device=tpu", 1, "train.device");
	expect_invalid("train.on_nonfinite=ignore", 1, "train.on_nonfinite");
	expect_invalid("train.min_lr=1", 1, "train.min_lr");
	expect_invalid("train.lr=-1", 1, "train.lr");
	expect_invalid("train.beta1=1", 1, "train.beta1");
	expect_invalid("train.beta2=-0.5", 1, "train.beta2");
	expect_invalid("train.eps=0", 1, "train.eps");
	expect_invalid("train.warmup_steps=-1", 1, "train.warmup_steps");
	expect_invalid("train.steps=-1", 1, "train.steps");
	expect_invalid("train.seq_len=0", 1, "train.seq_len");
	expect_invalid("train.micro_batch=0", 1, "train.micro_batch");
	expect_invalid("train.grad_accum=0", 1, "train.grad_accum");
	expect_invalid("checkpoint.keep=0", 1, "checkpoint.keep");
	expect_invalid("grpo.group_size=1", 1, "grpo.group_size");
	expect_invalid("grpo.loss_type=ppo", 1, "grpo.loss_type");
	expect_invalid("grpo.scale_rewards=global", 1, "grpo.scale_rewards");
	expect_invalid("grpo.top_p=1.5", 1, "grpo.top_p");
	expect_invalid("distill.alpha=1.01", 1, "distill.alpha");
	expect_invalid("distill.alpha=-0.1", 1, "distill.alpha");
	expect_invalid("distill.temperature=0", 1, "distill.temperature");
	expect_invalid("distill.kl=jsd", 1, "distill.kl");
}

/* ---- output ---- */

static void test_round_trip_exact(void)
{
	struct run_config c;
	char *text;

	config_defaults(&c);
	c.train.lr = 0.1 + 0.2;                 /* not the double nearest 0.3 */
	c.train.min_lr = 1.0 / 3.0 * 1e-5;
	c.model.rms_norm_eps = 5e-324;          /* smallest subnormal */
	c.model.rope_theta = 1e300;
	c.grpo.temperature = 0.7;
	c.train.seed = -4503599627370497LL;
	c.model.scoring_func = MOE_SCORING_SOFTMAX;
	CU_ASSERT_EQUAL(config_set(&c, "grpo.reward_cmd=[\"python3\", \"a \\\"b\\\"\", \"\\u00e9\"]",
				   err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(config_set(&c, "grpo.tokenizer=tok\\en.json", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(config_set(&c, "distill.teacher=runs/big/step_00000100.h5", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(config_set(&c, "distill.kl=reverse", err, sizeof(err)), 0);
	c.distill.alpha = 0.1 + 0.2;
	c.distill.temperature = 2.5;
	check_round_trip(&c);

	text = config_to_json(&c);
	CU_ASSERT_PTR_NOT_NULL_FATAL(text);
	CU_ASSERT(contains(text, "\"model\""));
	CU_ASSERT(contains(text, "\"grpo\""));
	CU_ASSERT(contains(text, "\"checkpoint\""));
	CU_ASSERT(contains(text, "\"scoring_func\":\t\"softmax\""));
	CU_ASSERT(contains(text, "\"hidden_size\":\t64"));
	CU_ASSERT(contains(text, "\"temperature\":\t0.7"));
	free(text);
}

/* lora: the section read, validated (each refusal naming the key and the bad name) and written back exactly */
static void expect_lora_invalid(const char *const *sets, int n, const char *needle)
{
	struct run_config c;
	config_defaults(&c);
	CU_ASSERT_EQUAL_FATAL(config_set(&c, "lora.rank=8", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(config_set(&c, "train.init_checkpoint=base.h5", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(config_set(&c, "lora.targets=[\"o_proj\"]", err, sizeof(err)), 0);
	for (int i = 0; i < n; i++)
		CU_ASSERT_EQUAL_FATAL(config_set(&c, sets[i], err, sizeof(err)), 0);
	err[0] = '\0';
	CU_ASSERT_EQUAL(config_validate(&c, 1, err, sizeof(err)), -1);
	if (!contains(err, needle))
		printf("\n  expected '%s' in: %s", needle, err);
	CU_ASSERT(contains(err, needle));
}

static void test_lora_section(void)
{
	struct run_config c;
	config_defaults(&c);
	CU_ASSERT_EQUAL(c.lora.rank, 0);
	CU_ASSERT_EQUAL(config_validate(&c, 1, err, sizeof(err)), 0);  /* off: nothing else is checked */
	const char *sets[] = { "lora.rank=16", "lora.alpha=32", "lora.dropout=0.05",
			       "lora.targets=[\"q_a_proj\", \"kv_b_proj\", \"experts.up_proj\"]",
			       "lora.base=runs/base/step_00000100.h5", "lora.base_checksum=0123456789abcdef" };
	for (size_t i = 0; i < sizeof(sets) / sizeof(sets[0]); i++)
		CU_ASSERT_EQUAL(config_set(&c, sets[i], err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(c.lora.n_targets, 3);
	CU_ASSERT_STRING_EQUAL(c.lora.targets[2], "experts.up_proj");
	CU_ASSERT_EQUAL(config_validate(&c, 1, err, sizeof(err)), 0);
	check_round_trip(&c);

	const char *unknown[] = { "lora.targets=[\"o_proj\", \"lm_head\"]" };
	expect_lora_invalid(unknown, 1, "lora.targets: unknown module 'lm_head' (known: q_a_proj");
	const char *twice[] = { "lora.targets=[\"o_proj\", \"o_proj\"]" };
	expect_lora_invalid(twice, 1, "'o_proj' is named twice");
	const char *none[] = { "lora.targets=[]" };
	expect_lora_invalid(none, 1, "lora.targets is empty");
	const char *drop[] = { "lora.dropout=1" };
	expect_lora_invalid(drop, 1, "lora.dropout=1 must be in [0, 1)");
	const char *nobase[] = { "train.init_checkpoint=" };
	expect_lora_invalid(nobase, 1, "needs the base model");
	const char *zero[] = { "parallel.zero=1" };
	expect_lora_invalid(zero, 1, "parallel.zero=1 with lora");
	const char *gpu[] = { "train.device=cuda" };
	expect_lora_invalid(gpu, 1, "train.device=cuda with lora");
	expect_set_error("lora.alpha=\"x\"", "lora.alpha", NULL);
	expect_invalid("lora.rank=-1", 1, "lora.rank");
}

/* grpo.rewards: the list read, defaults filled, written back exactly; its errors name the entry */
static void test_grpo_rewards(void)
{
	struct run_config c;

	config_defaults(&c);
	CU_ASSERT_STRING_EQUAL(c.grpo.reward_norm, "total");
	CU_ASSERT_STRING_EQUAL(c.grpo.rollout_weights, "full");
	CU_ASSERT_EQUAL_FATAL(config_set(&c, "grpo.rewards=[{\"name\": \"correct\", \"cmd\": [\"python3\", "
				   "\"r.py\"]}, {\"name\": \"len.v2\", \"cmd\": [\"sh\", \"l.sh\", \"x\"], "
				   "\"weight\": -0.1, \"timeout_s\": 2.5}]", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(c.grpo.n_rewards, 2);
	CU_ASSERT_STRING_EQUAL(c.grpo.rewards[0].name, "correct");
	CU_ASSERT_EQUAL(c.grpo.rewards[0].cmd_argc, 2);
	CU_ASSERT_EQUAL(c.grpo.rewards[0].weight, 1.0);
	CU_ASSERT_EQUAL(c.grpo.rewards[0].timeout_s, 0.0);  /* grpo.reward_timeout_s */
	CU_ASSERT_STRING_EQUAL(c.grpo.rewards[1].cmd[2], "x");
	CU_ASSERT_EQUAL(c.grpo.rewards[1].weight, -0.1);
	CU_ASSERT_EQUAL(c.grpo.rewards[1].timeout_s, 2.5);
	CU_ASSERT_EQUAL(config_set(&c, "grpo.reward_norm=each", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(config_set(&c, "grpo.rollout_weights=int8", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(config_validate(&c, 1, err, sizeof(err)), 0);
	check_round_trip(&c);

	expect_set_error("grpo.rewards={\"name\": \"a\"}", "grpo.rewards", "expected an array");
	expect_set_error("grpo.rewards=[{\"cmd\": [\"sh\"]}]", "grpo.rewards: [0]", "no \"name\"");
	expect_set_error("grpo.rewards=[{\"name\": \"a\", \"cmd\": [\"sh\"]}, {\"name\": \"b\"}]",
			 "grpo.rewards: [1] (b)", "no \"cmd\"");
	expect_set_error("grpo.rewards=[{\"name\": \"a\", \"cmd\": []}]", "[0].cmd", "non-empty array");
	expect_set_error("grpo.rewards=[{\"name\": \"a\", \"cmd\": [\"sh\"], \"weight\": \"1\"}]",
			 "[0].weight", "expected a number, got string");
	expect_set_error("grpo.rewards=[{\"name\": \"a\", \"cmd\": [\"sh\"], \"timeout_s\": 0}]",
			 "[0].timeout_s", "must be > 0");
	expect_set_error("grpo.rewards=[{\"name\": \"a b\", \"cmd\": [\"sh\"]}]", "[0].name", "letters");
	expect_set_error("grpo.rewards=[{\"name\": \"a\", \"cmd\": [\"sh\"], \"wieght\": 2}]",
			 "[0]: unknown key wieght", NULL);
	expect_invalid("grpo.reward_norm=sum", 1, "grpo.reward_norm=\"sum\" must be one of: total, each");
	expect_invalid("grpo.rewards=[{\"name\": \"a\", \"cmd\": [\"sh\"]}, {\"name\": \"a\", \"cmd\": [\"sh\"]}]",
		       1, "grpo.rewards[1].name: \"a\" is also the name of grpo.rewards[0]");
	config_defaults(&c);
	CU_ASSERT_EQUAL(config_set(&c, "grpo.reward_cmd=[\"sh\"]", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(config_set(&c, "grpo.rewards=[{\"name\": \"a\", \"cmd\": [\"sh\"]}]", err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(config_validate(&c, 1, err, sizeof(err)), -1);
	CU_ASSERT(contains(err, "grpo.rewards and grpo.reward_cmd are both given"));
	expect_load_error("{\"grpo\": {\"rewards\": [{\"name\": \"a\", \"cmd\": [\"sh\"], \"weight\": null}]}}",
			  "grpo.rewards: [0].weight", "got null");
}

static void test_model_diff(void)
{
	struct run_config a, b;
	char key[64];

	config_defaults(&a);
	config_defaults(&b);
	CU_ASSERT_EQUAL(config_model_diff(&a.model, &b.model, key, sizeof(key)), 0);
	b.train.lr = 1;  /* not a model key */
	CU_ASSERT_EQUAL(config_model_diff(&a.model, &b.model, key, sizeof(key)), 0);
	b.model.hidden_size = 128;
	CU_ASSERT_EQUAL(config_model_diff(&a.model, &b.model, key, sizeof(key)), 1);
	CU_ASSERT_STRING_EQUAL(key, "model.hidden_size");
	b = a;
	b.model.rms_norm_eps = 1e-5;
	CU_ASSERT_EQUAL(config_model_diff(&a.model, &b.model, key, sizeof(key)), 1);
	CU_ASSERT_STRING_EQUAL(key, "model.rms_norm_eps");
	b = a;
	b.model.scoring_func = MOE_SCORING_SOFTMAX;
	CU_ASSERT_EQUAL(config_model_diff(&a.model, &b.model, key, sizeof(key)), 1);
	CU_ASSERT_STRING_EQUAL(key, "model.scoring_func");
	b = a;
	b.model.attention_bias = true;
	CU_ASSERT_EQUAL(config_model_diff(&a.model, &b.model, key, sizeof(key)), 1);
	CU_ASSERT_STRING_EQUAL(key, "model.attention_bias");
	b = a;
	b.model.rope_scaling.type = ROPE_YARN;
	CU_ASSERT_EQUAL(config_model_diff(&a.model, &b.model, key, sizeof(key)), 1);
	CU_ASSERT_STRING_EQUAL(key, "model.rope_scaling");
	a = b;
	b.model.rope_scaling.mscale_all_dim = 0.707;
	CU_ASSERT_EQUAL(config_model_diff(&a.model, &b.model, key, sizeof(key)), 1);
	CU_ASSERT_STRING_EQUAL(key, "model.rope_scaling");
}

void register_tests(void)
{
	static const struct test_case load[] = {
		{ "defaults", test_defaults },
		{ "load every config in configs/", test_load_every_config },
		{ "published models", test_published_models },
		{ "HF nulls and ignored keys", test_hf_nulls_and_ignored_keys },
		{ "HF rejections", test_hf_rejections },
		{ "rope_scaling (YaRN)", test_rope_scaling_load },
		{ NULL, NULL },
	};
	static const struct test_case set[] = {
		{ "set each type", test_set_each_type },
		{ "set errors", test_set_errors },
		{ "set rope_scaling", test_rope_scaling_set },
		{ NULL, NULL },
	};
	static const struct test_case errors[] = {
		{ "unknown key", test_unknown_key },
		{ "wrong type", test_wrong_type },
		{ "malformed JSON", test_malformed_json },
		{ "expert parallel divisibility", test_expert_parallel },
		{ "validate model", test_validate_model },
		{ "validate train/grpo", test_validate_train },
		{ "rope_scaling errors", test_rope_scaling_errors },
		{ NULL, NULL },
	};
	static const struct test_case out[] = {
		{ "round trip exact", test_round_trip_exact },
		{ "grpo.rewards, reward_norm, rollout_weights", test_grpo_rewards },
		{ "lora section", test_lora_section },
		{ "model diff", test_model_diff },
		{ "num_nextn_predict_layers, train.mtp_lambda", test_mtp_keys },
		{ NULL, NULL },
	};

	add_suite("config load", load);
	add_suite("config set", set);
	add_suite("config errors", errors);
	add_suite("config output", out);
}
