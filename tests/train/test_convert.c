/*
 * tests/train/test_convert.c - `moe convert`: a tiny model written with --to-hf (sharded, f32 and bf16)
 * and read back with --from-hf gives every weight back bit for bit (f32) or rounded to bf16 exactly;
 * config.json round trips (YaRN's rope_scaling too), and a transformers-written config.json loads (YaRN
 * in DeepSeek's rope_scaling and transformers 5's rope_parameters spellings); missing, unexpected and
 * misshapen tensors are refused naming them, multi-token-prediction layers are skipped, an index that
 * disagrees with its files is refused, and a DeepSeek-V2 directory without routing bias loads.  Both
 * directions stream: a ~66 MB model converts with a peak resident set well under its size (measured in
 * a child process), and a conversion failing half-way leaves nothing behind.
 */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"

#include <glob.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "model/model.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/convert.h"
#include "train/safetensors.h"
#include "train/train_cli.h"

static char err[2048];

/* AddressSanitizer keeps freed memory in quarantine: peak memory means nothing under it. */
#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif
#ifndef UNDER_ASAN
#define UNDER_ASAN 0
#endif

/* Two layers (dense, then MoE with 4 experts), q_lora on, sigmoid scoring. */
static void tiny_config(struct run_config *rc)
{
	struct model_config *m = &rc->model;

	config_defaults(rc);
	m->vocab_size = 48;
	m->hidden_size = 32;
	m->intermediate_size = 40;
	m->moe_intermediate_size = 16;
	m->num_hidden_layers = 2;
	test_small_moe(m);
	m->rope_theta = 5000.0;
	m->routed_scaling_factor = 1.5;
}

/* A model with random weights everywhere (the routing bias too), saved to ckpt. */
static struct moe_model *saved_model(const struct run_config *rc, const char *ckpt, uint64_t seed)
{
	struct moe_model *m = model_create(&rc->model, 0, rc->model.n_routed_experts, err,
					   sizeof(err));
	struct ckpt_meta meta = { 0, 0 };

	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	model_init_weights(m, seed);
	test_rng_seed(seed);
	for (int l = 0; l < mc_n_layers(&rc->model); l++)
		if (m->w.layers[l].e_score_correction_bias)
			test_fill_randn(m->w.layers[l].e_score_correction_bias,
					rc->model.n_routed_experts, 0.1f);
	for (int i = 0; i < m->n_params; i++)  /* norms are 1 at init: make them say something */
		if (m->params[i].kind == PARAM_NORM)
			test_fill_randn(m->weights + m->params[i].offset, m->params[i].numel, 1.0f);
	if (checkpoint_save_model(ckpt, m, rc, &meta, err, sizeof(err)))
		fprintf(stderr, "\n  save: %s\n", err);
	return m;
}

static struct moe_model *load_model(const char *ckpt, struct run_config *rc)
{
	struct moe_model *m;

	config_defaults(rc);
	if (checkpoint_read_header(ckpt, rc, NULL, err, sizeof(err)))
		fprintf(stderr, "\n  header: %s\n", err);
	m = model_create(&rc->model, 0, rc->model.n_routed_experts, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	if (checkpoint_load_model(ckpt, m, err, sizeof(err))) {
		fprintf(stderr, "\n  load: %s\n", err);
		CU_FAIL("checkpoint_load_model");
	}
	return m;
}

/* moe convert ARGS... (NULL-terminated); returns the exit code. */
static int run_convert(const char *a0, ...)
{
	char *argv[16];
	int argc = 0;
	va_list ap;

	va_start(ap, a0);
	for (const char *a = a0; a && argc < 16; a = va_arg(ap, const char *))
		argv[argc++] = (char *)a;
	va_end(ap);
	return convert_cli_main(argc, argv);
}

static int count_files(const char *dir, const char *pattern)
{
	char pat[512];
	glob_t g;
	int n;

	snprintf(pat, sizeof(pat), "%s/%s", dir, pattern);
	n = glob(pat, 0, NULL, &g) ? 0 : (int)g.gl_pathc;
	globfree(&g);
	return n;
}

static void rm_dir(const char *dir)
{
	char cmd[600];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	CU_ASSERT_EQUAL(system(cmd), 0);
}

static uint32_t bits(float f)
{
	uint32_t u;

	memcpy(&u, &f, sizeof(u));
	return u;
}

/* ---- round trips ---- */

/* The HF layout of MTP layer l: its own tensors, the shared copies of the embedding and lm_head
 * ([V, C], as bf16 or f32 as the rest), no fp8 eh_proj; config.json's num_nextn_predict_layers. */
static void check_hf_mtp(const char *dir, int l, int D, enum st_dtype want)
{
	static const char *const names[] = { "eh_proj.weight", "enorm.weight", "hnorm.weight",
		"shared_head.norm.weight", "shared_head.head.weight", "embed_tokens.weight",
		"self_attn.kv_b_proj.weight", "mlp.experts.3.down_proj.weight" };
	char path[600], name[128];
	struct st_file f;
	struct run_config rc;
	FILE *cf;
	char text[8192];
	size_t n;

	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	CU_ASSERT_EQUAL_FATAL(st_open(&f, path, err, sizeof(err)), 0);
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		snprintf(name, sizeof(name), "model.layers.%d.%s", l, names[i]);
		const struct st_tensor *t = st_find(&f, name);
		CU_ASSERT_PTR_NOT_NULL(t);
		if (t && i >= 4 && i <= 5)
			CU_ASSERT(t->ndim == 2 && t->shape[0] == 48 && t->shape[1] == 32);
		if (t && i == 0)
			CU_ASSERT(t->dtype == want && t->shape[0] == 32 && t->shape[1] == 64);
	}
	snprintf(name, sizeof(name), "model.layers.%d.eh_proj.weight_scale_inv", l);
	CU_ASSERT_PTR_NULL(st_find(&f, name));
	st_close(&f);
	snprintf(path, sizeof(path), "%s/config.json", dir);
	cf = fopen(path, "rb");
	CU_ASSERT_PTR_NOT_NULL_FATAL(cf);
	n = fread(text, 1, sizeof(text) - 1, cf);
	text[n] = '\0';
	fclose(cf);
	config_defaults(&rc);
	CU_ASSERT_EQUAL(convert_hf_config(&rc, text, "config.json", NULL, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(rc.model.num_nextn_predict_layers, D);
}

static void round_trip_mtp(const char *dtype, const char *tag, int mtp_depths)
{
	char dir[400], ckpt[400], back[400];
	struct run_config rc, rc2;
	struct moe_model *m, *m2;
	char key[128];
	int bf16 = !strcmp(dtype, "bf16"), mismatched = 0;

	tiny_config(&rc);
	rc.model.num_nextn_predict_layers = mtp_depths;
	snprintf(ckpt, sizeof(ckpt), "%s", tmp_path("orig.h5"));
	snprintf(dir, sizeof(dir), "%s/hf-%s", test_tmpdir(), tag);
	snprintf(back, sizeof(back), "%s/back-%s.h5", test_tmpdir(), tag);
	m = saved_model(&rc, ckpt, 11);
	CU_ASSERT_EQUAL_FATAL(run_convert("--to-hf", ckpt, "--out", dir, "--dtype", dtype,
					  "--shard-size", mtp_depths ? "1GB" : "20KB", NULL), 0);
	if (mtp_depths)
		check_hf_mtp(dir, rc.model.num_hidden_layers, mtp_depths, bf16 ? ST_BF16 : ST_F32);
	CU_ASSERT(count_files(dir, "model-*-of-*.safetensors") >= 2 || mtp_depths);
	CU_ASSERT_EQUAL(count_files(dir, "model.safetensors.index.json"), !mtp_depths);
	CU_ASSERT_EQUAL(count_files(dir, "config.json"), 1);
	CU_ASSERT_EQUAL_FATAL(run_convert("--from-hf", dir, "--out", back, NULL), 0);
	m2 = load_model(back, &rc2);
	CU_ASSERT_EQUAL(config_model_diff(&rc.model, &rc2.model, key, sizeof(key)), 0);
	CU_ASSERT_EQUAL_FATAL(m2->n_weights, m->n_weights);
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		const float *a = m->weights + p->offset, *b = m2->weights + p->offset;
		int exact_f32 = !bf16 || p->kind == PARAM_BUFFER;

		for (size_t j = 0; j < p->numel; j++) {
			float want = exact_f32 ? a[j] : st_bf16_to_f32(st_f32_to_bf16(a[j]));

			if (bits(b[j]) != bits(want)) {
				if (!mismatched++)
					fprintf(stderr, "\n  %s[%zu]: %g, want %g\n", p->name, j, b[j],
						want);
			}
		}
	}
	CU_ASSERT_EQUAL(mismatched, 0);
	model_free(m);
	model_free(m2);
}

static void test_round_trip_f32(void)
{
	round_trip_mtp("f32", "f32", 0);
}

static void test_round_trip_bf16(void)
{
	round_trip_mtp("bf16", "bf16", 0);
}

/* with a multi-token-prediction depth (and two): its tensors under HF's names, back bit for bit */
static void test_round_trip_mtp(void)
{
	round_trip_mtp("f32", "mtp-f32", 1);
	round_trip_mtp("bf16", "mtp-bf16", 2);
}

/* The shards hold HF's per-expert tensors and nothing stacked; the index covers them all. */
static void test_hf_layout(void)
{
	char dir[400], path[600];
	struct run_config rc;
	struct moe_model *m;
	struct st_file f;
	const struct st_tensor *t;

	tiny_config(&rc);
	m = saved_model(&rc, tmp_path("layout.h5"), 5);
	snprintf(dir, sizeof(dir), "%s", tmp_path("hf-layout"));
	CU_ASSERT_EQUAL_FATAL(run_convert("--to-hf", tmp_path("layout.h5"), "--out", dir, "--dtype",
					  "bf16", NULL), 0);
	CU_ASSERT_EQUAL(count_files(dir, "*.safetensors"), 1);  /* one shard: no index */
	CU_ASSERT_EQUAL(count_files(dir, "model.safetensors.index.json"), 0);
	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	CU_ASSERT_EQUAL_FATAL(st_open(&f, path, err, sizeof(err)), 0);
	CU_ASSERT_STRING_EQUAL(st_metadata(&f, "format"), "pt");
	t = st_find(&f, "model.layers.1.mlp.experts.3.down_proj.weight");
	CU_ASSERT_PTR_NOT_NULL_FATAL(t);
	CU_ASSERT_EQUAL(t->dtype, ST_BF16);
	CU_ASSERT_EQUAL(t->ndim, 2);
	CU_ASSERT_EQUAL(t->shape[0], 32);
	CU_ASSERT_EQUAL(t->shape[1], 16);
	CU_ASSERT_PTR_NULL(st_find(&f, "model.layers.1.mlp.experts.down_proj.weight"));
	t = st_find(&f, "model.layers.1.mlp.gate.e_score_correction_bias");
	CU_ASSERT_PTR_NOT_NULL_FATAL(t);
	CU_ASSERT_EQUAL(t->dtype, ST_F32);
	CU_ASSERT_EQUAL(t->begin % 4, 0);
	CU_ASSERT_EQUAL(f.n_tensors, m->n_params - 3 + 3 * 4);
	st_close(&f);
	/* converting into a directory that already holds weights is refused */
	CU_ASSERT_EQUAL(run_convert("--to-hf", tmp_path("layout.h5"), "--out", dir, NULL), 1);
	model_free(m);
}

/* ---- config.json ---- */

static void config_round_trip(struct run_config *rc)
{
	struct run_config back;
	char key[128], *json = convert_hf_config_json(&rc->model, ST_BF16);
	cJSON *obj;

	CU_ASSERT_PTR_NOT_NULL_FATAL(json);
	obj = cJSON_Parse(json);
	CU_ASSERT_PTR_NOT_NULL_FATAL(obj);
	CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItem(obj, "model_type")->valuestring, "deepseek_v3");
	CU_ASSERT_STRING_EQUAL(cJSON_GetArrayItem(cJSON_GetObjectItem(obj, "architectures"), 0)
			       ->valuestring, "DeepseekV3ForCausalLM");
	CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItem(obj, "torch_dtype")->valuestring, "bfloat16");
	CU_ASSERT(cJSON_IsTrue(cJSON_GetObjectItem(obj, "rope_interleave")));
	if (rc->model.q_lora_rank == 0)
		CU_ASSERT(cJSON_IsNull(cJSON_GetObjectItem(obj, "q_lora_rank")));
	cJSON_Delete(obj);
	config_defaults(&back);
	back.model.vocab_size = 7;  /* everything must come from the file */
	if (convert_hf_config(&back, json, "config.json", NULL, err, sizeof(err)))
		fprintf(stderr, "\n  %s\n", err);
	CU_ASSERT_EQUAL(config_model_diff(&rc->model, &back.model, key, sizeof(key)), 0);
	if (config_model_diff(&rc->model, &back.model, key, sizeof(key)))
		fprintf(stderr, "\n  differs: %s\n", key);
	free(json);
}

static void test_config_round_trip(void)
{
	struct run_config rc;

	tiny_config(&rc);
	config_round_trip(&rc);
	rc.model.q_lora_rank = 0;
	rc.model.scoring_func = MOE_SCORING_SOFTMAX;
	rc.model.norm_topk_prob = false;
	rc.model.aux_loss_alpha = 0.001;
	rc.model.rms_norm_eps = 1e-5;
	config_round_trip(&rc);
	/* YaRN with every key given */
	rc.model.rope_scaling = (struct rope_scaling){
		.type = ROPE_YARN, .factor = 40, .original_max_position_embeddings = 4096, .beta_fast = 24,
		.beta_slow = 2, .mscale = 0.707, .mscale_all_dim = 1.0, .attention_factor = 0.9,
		.no_truncate = true };
	config_round_trip(&rc);
}

/* --to-hf writes YaRN as DeepSeek's rope_scaling, with factor and original_max_position_embeddings
 * always given (transformers requires both), which read back as the same model. */
static void test_yarn_to_hf(void)
{
	struct run_config rc, back;
	cJSON *obj, *rs;
	char *json;

	tiny_config(&rc);
	rc.model.max_position_embeddings = 32768;
	rc.model.rope_scaling = (struct rope_scaling){ .type = ROPE_YARN, .mscale = 1, .mscale_all_dim = 1 };
	json = convert_hf_config_json(&rc.model, ST_F32);
	CU_ASSERT_PTR_NOT_NULL_FATAL(json);
	obj = cJSON_Parse(json);
	rs = cJSON_GetObjectItem(obj, "rope_scaling");
	CU_ASSERT_FATAL(cJSON_IsObject(rs));
	CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItem(rs, "type")->valuestring, "yarn");
	CU_ASSERT_EQUAL(cJSON_GetObjectItem(rs, "factor")->valuedouble, 1.0);  /* 32768 / 32768 */
	CU_ASSERT_EQUAL(cJSON_GetObjectItem(rs, "original_max_position_embeddings")->valuedouble, 32768);
	CU_ASSERT_EQUAL(cJSON_GetObjectItem(rs, "mscale_all_dim")->valuedouble, 1.0);
	CU_ASSERT_PTR_NULL(cJSON_GetObjectItem(rs, "beta_fast"));  /* transformers' default, 32 */
	CU_ASSERT_PTR_NULL(cJSON_GetObjectItem(rs, "truncate"));
	cJSON_Delete(obj);
	config_defaults(&back);
	CU_ASSERT_EQUAL(convert_hf_config(&back, json, "config.json", NULL, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(back.model.rope_scaling.type, ROPE_YARN);
	CU_ASSERT_EQUAL(back.model.rope_scaling.factor, 1.0);
	CU_ASSERT_EQUAL(back.model.rope_scaling.original_max_position_embeddings, 32768);
	CU_ASSERT_EQUAL(back.model.rope_scaling.mscale, 1.0);
	free(json);

	rc.model.rope_scaling.original_max_position_embeddings = 4096;  /* factor 8 */
	json = convert_hf_config_json(&rc.model, ST_F32);
	obj = cJSON_Parse(json);
	rs = cJSON_GetObjectItem(obj, "rope_scaling");
	CU_ASSERT_EQUAL(cJSON_GetObjectItem(rs, "factor")->valuedouble, 8.0);
	cJSON_Delete(obj);
	free(json);

	rc.model.rope_scaling.type = ROPE_DEFAULT;  /* none: null, as transformers writes */
	rc.model.rope_scaling.mscale = rc.model.rope_scaling.mscale_all_dim = 0;
	rc.model.rope_scaling.original_max_position_embeddings = 0;
	json = convert_hf_config_json(&rc.model, ST_F32);
	obj = cJSON_Parse(json);
	CU_ASSERT(cJSON_IsNull(cJSON_GetObjectItem(obj, "rope_scaling")));
	cJSON_Delete(obj);
	free(json);
}

/* What transformers 5 writes for a DeepseekV3Config (rope_parameters, qk_head_dim, ...). */
static const char hf_config[] =
	"{\"architectures\": [\"DeepseekV3ForCausalLM\"], \"attention_bias\": false,"
	" \"attention_dropout\": 0.0, \"bos_token_id\": 0, \"dtype\": \"float32\","
	" \"eos_token_id\": 1, \"first_k_dense_replace\": 1, \"head_dim\": 8, \"hidden_act\": \"silu\","
	" \"hidden_size\": 32, \"initializer_range\": 0.02, \"intermediate_size\": 48,"
	" \"kv_lora_rank\": 16, \"max_position_embeddings\": 128, \"model_type\": \"deepseek_v3\","
	" \"moe_intermediate_size\": 16, \"n_group\": 2, \"n_routed_experts\": 4,"
	" \"n_shared_experts\": 1, \"norm_topk_prob\": true, \"num_attention_heads\": 2,"
	" \"num_experts_per_tok\": 2, \"num_hidden_layers\": 2, \"num_key_value_heads\": 2,"
	" \"num_nextn_predict_layers\": 1, \"output_router_logits\": false, \"pad_token_id\": null,"
	" \"pretraining_tp\": 1, \"q_lora_rank\": 16, \"qk_head_dim\": 16, \"qk_nope_head_dim\": 8,"
	" \"qk_rope_head_dim\": 8, \"rms_norm_eps\": 1e-06, \"rope_interleave\": true,"
	" \"rope_parameters\": {\"rope_theta\": 20000.0, \"rope_type\": \"default\"},"
	" \"routed_scaling_factor\": 2.5, \"tie_word_embeddings\": false, \"topk_group\": 1,"
	" \"transformers_version\": \"5.23.0\", \"use_cache\": true, \"v_head_dim\": 8,"
	" \"vocab_size\": 64}";

static void test_transformers_config(void)
{
	struct run_config rc;
	char *text = strdup(hf_config), *p;

	config_defaults(&rc);
	CU_ASSERT_EQUAL_FATAL(convert_hf_config(&rc, text, "config.json", NULL, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(rc.model.vocab_size, 64);
	CU_ASSERT_EQUAL(rc.model.intermediate_size, 48);
	CU_ASSERT_EQUAL(rc.model.rope_theta, 20000.0);
	CU_ASSERT_EQUAL(rc.model.scoring_func, MOE_SCORING_SIGMOID);
	CU_ASSERT_EQUAL(rc.model.n_group, 2);
	CU_ASSERT_EQUAL(rc.model.rope_scaling.type, ROPE_DEFAULT);
	/* another RoPE type, a wrong qk_head_dim, rope_interleave=false, another model: refused naming
	 * the key */
	p = strstr(text, "\"default\"");
	memcpy(p, "\"linear\" ", 9);
	CU_ASSERT_EQUAL(convert_hf_config(&rc, text, "config.json", NULL, err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "rope_type"));
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "linear"));
	memcpy(p, "\"default\"", 9);
	p = strstr(text, "\"qk_head_dim\": 16");
	p[16] = '7';
	CU_ASSERT_EQUAL(convert_hf_config(&rc, text, "config.json", NULL, err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "qk_head_dim"));
	p[16] = '6';
	p = strstr(text, "\"rope_interleave\": true");
	memcpy(p + 19, "false,", 6);  /* "true, " -> "false," */
	CU_ASSERT_EQUAL(convert_hf_config(&rc, text, "config.json", NULL, err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "rope_interleave"));
	CU_ASSERT_EQUAL(convert_hf_config(&rc, "{\"model_type\": \"llama\"}", "config.json", NULL, err,
					  sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "llama"));
	free(text);
}

/*
 * DeepSeek-V3's own config.json spells YaRN rope_scaling {"type": "yarn", ...}; transformers 5 writes
 * rope_parameters {"rope_type": "yarn", "rope_theta", ...} (DeepSeek-V2-Lite's numbers below, with both
 * type keys, as transformers 5 saves them).  Both load; bad keys are refused naming them.
 */
static const char yarn_v3_old[] =
	"{\"model_type\": \"deepseek_v3\", \"max_position_embeddings\": 163840, \"rope_theta\": 10000,"
	" \"rope_scaling\": {\"beta_fast\": 32, \"beta_slow\": 1, \"factor\": 40, \"mscale\": 1.0,"
	" \"mscale_all_dim\": 1.0, \"original_max_position_embeddings\": 4096, \"type\": \"yarn\"}}";

static const char yarn_v2_new[] =
	"{\"model_type\": \"deepseek_v2\", \"max_position_embeddings\": 163840, \"num_experts_per_tok\": 6,"
	" \"rope_parameters\": {\"beta_fast\": 32, \"beta_slow\": 1, \"factor\": 40, \"mscale\": 0.707,"
	" \"mscale_all_dim\": 0.707, \"original_max_position_embeddings\": 4096, \"rope_theta\": 5000,"
	" \"rope_type\": \"yarn\", \"type\": \"yarn\"}}";

static void expect_convert_error(const char *text, const char *needle1, const char *needle2)
{
	struct run_config rc;

	config_defaults(&rc);
	err[0] = '\0';
	CU_ASSERT_EQUAL(convert_hf_config(&rc, text, "config.json", NULL, err, sizeof(err)), -1);
	if (!strstr(err, needle1) || (needle2 && !strstr(err, needle2)))
		fprintf(stderr, "\n  message \"%s\" lacks \"%s\" / \"%s\"\n", err, needle1,
			needle2 ? needle2 : "");
	CU_ASSERT_PTR_NOT_NULL(strstr(err, needle1));
	if (needle2)
		CU_ASSERT_PTR_NOT_NULL(strstr(err, needle2));
}

/* text with the first `from` replaced by `to` (malloc'd) */
static char *replaced(const char *text, const char *from, const char *to)
{
	const char *p = strstr(text, from);
	size_t n = strlen(text) - strlen(from) + strlen(to) + 1;
	char *out = malloc(n);

	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	CU_ASSERT_PTR_NOT_NULL_FATAL(out);
	snprintf(out, n, "%.*s%s%s", (int)(p - text), text, to, p + strlen(from));
	return out;
}

static void test_yarn_from_hf(void)
{
	static const struct { const char *from, *to, *needle1, *needle2; } bad[] = {
		{ "\"mscale\": 1.0", "\"mscal\": 1.0", "model.rope_scaling.mscal", "unknown key" },
		{ "\"factor\": 40", "\"factor\": \"40\"", "model.rope_scaling.factor", "expected a number" },
		{ "\"type\": \"yarn\"", "\"type\": \"dynamic\"", "model.rope_scaling.type", "dynamic" },
		{ "\"beta_slow\": 1", "\"beta_slow\": -1", "model.rope_scaling.beta_slow=-1", NULL },
	};
	static const struct { const char *from, *to, *needle1, *needle2; } bad_new[] = {
		{ "\"rope_type\": \"yarn\"", "\"rope_type\": \"llama3\"",
		  "model.rope_parameters.rope_type=llama3", "only \"default\" and \"yarn\"" },
		{ "\"beta_fast\": 32", "\"partial_rotary_factor\": 0.5",
		  "model.rope_parameters.partial_rotary_factor is not supported", NULL },
		{ "\"rope_theta\": 5000", "\"rope_theta\": \"5000\"", "model.rope_parameters.rope_theta",
		  NULL },
		{ "\"model_type\": \"deepseek_v2\",", "\"model_type\": \"deepseek_v2\", \"rope_scaling\": "
		  "{\"type\": \"yarn\"},", "rope_parameters and model.rope_scaling are both given", NULL },
	};
	struct run_config rc;
	const struct rope_scaling *rs = &rc.model.rope_scaling;

	config_defaults(&rc);
	CU_ASSERT_EQUAL_FATAL(convert_hf_config(&rc, yarn_v3_old, "config.json", NULL, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(rs->type, ROPE_YARN);
	CU_ASSERT_EQUAL(rs->factor, 40);
	CU_ASSERT_EQUAL(rs->original_max_position_embeddings, 4096);
	CU_ASSERT_EQUAL(rs->beta_fast, 32);
	CU_ASSERT_EQUAL(rs->beta_slow, 1);
	CU_ASSERT_EQUAL(rs->mscale, 1.0);
	CU_ASSERT_EQUAL(rs->mscale_all_dim, 1.0);
	CU_ASSERT_EQUAL(rc.model.max_position_embeddings, 163840);

	config_defaults(&rc);
	if (convert_hf_config(&rc, yarn_v2_new, "config.json", NULL, err, sizeof(err)))
		fprintf(stderr, "\n  %s\n", err);
	CU_ASSERT_EQUAL(rs->type, ROPE_YARN);
	CU_ASSERT_EQUAL(rs->factor, 40);
	CU_ASSERT_EQUAL(rs->original_max_position_embeddings, 4096);
	CU_ASSERT_EQUAL(rs->mscale, 0.707);
	CU_ASSERT_EQUAL(rs->mscale_all_dim, 0.707);
	CU_ASSERT_EQUAL(rc.model.rope_theta, 5000);
	CU_ASSERT_EQUAL(rc.model.scoring_func, MOE_SCORING_SOFTMAX);

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char *text = replaced(yarn_v3_old, bad[i].from, bad[i].to);

		expect_convert_error(text, bad[i].needle1, bad[i].needle2);
		free(text);
	}
	for (size_t i = 0; i < sizeof(bad_new) / sizeof(bad_new[0]); i++) {
		char *text = replaced(yarn_v2_new, bad_new[i].from, bad_new[i].to);

		expect_convert_error(text, bad_new[i].needle1, bad_new[i].needle2);
		free(text);
	}
}

/* Keys a file lacks take transformers' defaults for its model_type, not ours. */
static void test_config_defaults(void)
{
	struct run_config rc;
	FILE *notes = tmpfile();
	char buf[4096];
	size_t n;

	config_defaults(&rc);
	CU_ASSERT_EQUAL_FATAL(convert_hf_config(&rc, "{\"model_type\": \"deepseek_v3\"}", "c.json",
						notes, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(rc.model.hidden_size, 7168);
	CU_ASSERT_EQUAL(rc.model.n_routed_experts, 256);
	CU_ASSERT_EQUAL(rc.model.num_hidden_layers, 61);
	rewind(notes);
	n = fread(buf, 1, sizeof(buf) - 1, notes);
	buf[n] = '\0';
	CU_ASSERT_PTR_NOT_NULL(strstr(buf, "no hidden_size"));
	fclose(notes);
	config_defaults(&rc);
	CU_ASSERT_EQUAL_FATAL(convert_hf_config(&rc, "{\"model_type\": \"deepseek_v2\", "
						"\"num_experts_per_tok\": 6, \"n_group\": 8}", "c.json",
						NULL, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(rc.model.scoring_func, MOE_SCORING_SOFTMAX);
	CU_ASSERT_EQUAL(rc.model.n_group, 1);  /* topk_method greedy */
	CU_ASSERT_EQUAL(rc.model.num_key_value_heads, 32);
}

/* ---- damaged directories ---- */

/*
 * Rewrite DIR/model.safetensors (made by --to-hf with one shard): without `drop`, with `rename_from`
 * renamed to `rename_to`, and with an extra tensor `extra` of shape [n].
 */
static void rewrite(const char *dir, const char *drop, const char *rename_from, const char *rename_to,
		    const char *extra, int64_t n)
{
	char path[600];
	struct st_file f;
	struct st_spec specs[128];
	float *bufs[128];
	int k = 0;
	struct st_writer *w;

	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	CU_ASSERT_EQUAL_FATAL(st_open(&f, path, err, sizeof(err)), 0);
	CU_ASSERT_FATAL(f.n_tensors < 127);
	for (int i = 0; i < f.n_tensors; i++) {
		const struct st_tensor *t = &f.tensors[i];

		if (drop && !strcmp(t->name, drop))
			continue;
		specs[k].name = rename_from && !strcmp(t->name, rename_from) ? rename_to : t->name;
		specs[k].dtype = ST_F32;
		specs[k].ndim = t->ndim;
		memcpy(specs[k].shape, t->shape, sizeof(t->shape));
		bufs[k] = malloc(sizeof(float) * (t->numel + 1));
		CU_ASSERT_EQUAL(st_read_f32(&f, t, bufs[k], err, sizeof(err)), 0);
		k++;
	}
	if (extra) {
		specs[k].name = extra;
		specs[k].dtype = ST_F32;
		specs[k].ndim = 1;
		specs[k].shape[0] = n;
		bufs[k] = calloc(n + 1, sizeof(float));
		k++;
	}
	w = st_writer_open(tmp_path("rewrite.safetensors"), specs, k, NULL, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(w);
	for (int i = 0; i < k; i++) {
		uint64_t numel = 1;

		for (int d = 0; d < specs[i].ndim; d++)
			numel *= (uint64_t)specs[i].shape[d];
		CU_ASSERT_EQUAL(st_writer_write(w, specs[i].name, bufs[i], numel, err, sizeof(err)), 0);
		free(bufs[i]);
	}
	CU_ASSERT_EQUAL_FATAL(st_writer_close(w, err, sizeof(err)), 0);
	st_close(&f);
	CU_ASSERT_EQUAL(rename(tmp_path("rewrite.safetensors"), path), 0);
}

static void fresh_hf_dir(char *dir, size_t len, const char *tag, struct run_config *rc)
{
	char ckpt[400];
	struct moe_model *m;

	snprintf(dir, len, "%s/dmg-%s", test_tmpdir(), tag);
	snprintf(ckpt, sizeof(ckpt), "%s/dmg-%s.h5", test_tmpdir(), tag);
	rm_dir(dir);
	m = saved_model(rc, ckpt, 3);
	model_free(m);
	CU_ASSERT_EQUAL_FATAL(run_convert("--to-hf", ckpt, "--out", dir, NULL), 0);
}

static void expect_from_hf_fails(const char *dir, const char *w1, const char *w2)
{
	int rc = convert_from_hf(dir, tmp_path("never.h5"), NULL, err, sizeof(err));

	CU_ASSERT_EQUAL(rc, -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, w1));
	if (w2)
		CU_ASSERT_PTR_NOT_NULL(strstr(err, w2));
	if (!strstr(err, w1) || (w2 && !strstr(err, w2)))
		fprintf(stderr, "\n  message: %s\n", err);
	CU_ASSERT_EQUAL(access(tmp_path("never.h5"), F_OK), -1);
}

static void test_missing_tensor(void)
{
	struct run_config rc;
	char dir[400];

	tiny_config(&rc);
	fresh_hf_dir(dir, sizeof(dir), "missing", &rc);
	rewrite(dir, "model.layers.1.mlp.experts.2.up_proj.weight", NULL, NULL, NULL, 0);
	expect_from_hf_fails(dir, "missing tensor model.layers.1.mlp.experts.2.up_proj.weight", NULL);
	fresh_hf_dir(dir, sizeof(dir), "missing2", &rc);
	rewrite(dir, "lm_head.weight", NULL, NULL, NULL, 0);
	expect_from_hf_fails(dir, "missing tensor lm_head.weight", NULL);
	/* the command line says so too, with exit code 1 */
	CU_ASSERT_EQUAL(run_convert("--from-hf", dir, "--out", tmp_path("never.h5"), NULL), 1);
}

static void test_unexpected_tensor(void)
{
	struct run_config rc;
	char dir[400];

	tiny_config(&rc);
	fresh_hf_dir(dir, sizeof(dir), "extra", &rc);
	rewrite(dir, NULL, NULL, NULL, "model.layers.0.mlp.router_bias", 4);
	expect_from_hf_fails(dir, "unexpected tensor model.layers.0.mlp.router_bias", NULL);
	fresh_hf_dir(dir, sizeof(dir), "expert9", &rc);
	rewrite(dir, NULL, NULL, NULL, "model.layers.1.mlp.experts.9.up_proj.weight", 4);
	expect_from_hf_fails(dir, "model.layers.1.mlp.experts.9.up_proj.weight", "n_routed_experts=4");
}

static void test_shape_mismatch(void)
{
	struct run_config rc;
	char dir[400];

	tiny_config(&rc);
	fresh_hf_dir(dir, sizeof(dir), "shape", &rc);
	rewrite(dir, "model.norm.weight", NULL, NULL, "model.norm.weight", 31);
	expect_from_hf_fails(dir, "tensor model.norm.weight has shape [31]", "[32]");
}

/* A tensor of a dtype that does not convert (I32 here, in a second file) is refused naming it. */
static void test_bad_dtype(void)
{
	static const char header[] = "{\"model.norm.weight\":{\"dtype\":\"I32\",\"shape\":[32],"
				     "\"data_offsets\":[0,128]}}";
	struct run_config rc;
	char dir[400], path[600];
	unsigned char len8[8];
	FILE *f;

	tiny_config(&rc);
	fresh_hf_dir(dir, sizeof(dir), "dtype", &rc);
	rewrite(dir, "model.norm.weight", NULL, NULL, NULL, 0);
	snprintf(path, sizeof(path), "%s/extra.safetensors", dir);
	f = fopen(path, "wb");
	CU_ASSERT_PTR_NOT_NULL_FATAL(f);
	for (int i = 0; i < 8; i++)
		len8[i] = (unsigned char)((sizeof(header) - 1) >> (8 * i));
	fwrite(len8, 1, 8, f);
	fwrite(header, 1, sizeof(header) - 1, f);
	for (int i = 0; i < 128; i++)
		fputc(0, f);
	fclose(f);
	expect_from_hf_fails(dir, "extra.safetensors: tensor model.norm.weight: dtype I32", NULL);
}

/* MTP layers (N >= num_hidden_layers) and rotary buffers are skipped; a V2 file lacks the bias. */
static void test_skipped_and_v2(void)
{
	struct run_config rc, back;
	char dir[400], path[600], *text;
	struct moe_model *m;
	FILE *notes = tmpfile();
	char buf[4096];
	size_t n;
	cJSON *obj;

	tiny_config(&rc);
	fresh_hf_dir(dir, sizeof(dir), "mtp", &rc);
	rewrite(dir, NULL, NULL, NULL, "model.layers.2.eh_proj.weight", 8);
	rewrite(dir, NULL, NULL, NULL, "model.layers.0.self_attn.rotary_emb.inv_freq", 4);
	CU_ASSERT_EQUAL(convert_from_hf(dir, tmp_path("mtp.h5"), notes, err, sizeof(err)), 0);
	rewind(notes);
	n = fread(buf, 1, sizeof(buf) - 1, notes);
	buf[n] = '\0';
	fclose(notes);
	CU_ASSERT_PTR_NOT_NULL(strstr(buf, "skipped 1 tensors of layers >= num_hidden_layers + "
				       "num_nextn_predict_layers = 2"));
	CU_ASSERT_PTR_NOT_NULL(strstr(buf, "rotary"));

	/* DeepSeek-V2: softmax, greedy top-k, no e_score_correction_bias in the files */
	rc.model.scoring_func = MOE_SCORING_SOFTMAX;
	rc.model.n_group = 1;
	rc.model.topk_group = 1;
	rc.model.norm_topk_prob = false;
	fresh_hf_dir(dir, sizeof(dir), "v2", &rc);
	rewrite(dir, "model.layers.1.mlp.gate.e_score_correction_bias", NULL, NULL, NULL, 0);
	snprintf(path, sizeof(path), "%s/config.json", dir);
	text = NULL;
	{
		FILE *f = fopen(path, "rb");
		long len;

		CU_ASSERT_PTR_NOT_NULL_FATAL(f);
		fseek(f, 0, SEEK_END);
		len = ftell(f);
		rewind(f);
		text = calloc(len + 1, 1);
		CU_ASSERT_EQUAL(fread(text, 1, len, f), (size_t)len);
		fclose(f);
	}
	obj = cJSON_Parse(text);
	free(text);
	cJSON_ReplaceItemInObject(obj, "model_type", cJSON_CreateString("deepseek_v2"));
	cJSON_DeleteItemFromObject(obj, "topk_method");
	cJSON_DeleteItemFromObject(obj, "scoring_func");
	text = cJSON_Print(obj);
	cJSON_Delete(obj);
	{
		FILE *f = fopen(path, "wb");

		fputs(text, f);
		fclose(f);
	}
	free(text);
	CU_ASSERT_EQUAL_FATAL(convert_from_hf(dir, tmp_path("v2.h5"), NULL, err, sizeof(err)), 0);
	m = load_model(tmp_path("v2.h5"), &back);
	CU_ASSERT_EQUAL(back.model.scoring_func, MOE_SCORING_SOFTMAX);
	CU_ASSERT_EQUAL(m->w.layers[1].e_score_correction_bias[0], 0.0f);
	model_free(m);
}

static void test_index_disagrees(void)
{
	struct run_config rc;
	char ckpt[400], dir[400], path[600], *text, *p;
	struct moe_model *m;
	FILE *f;
	long len;

	tiny_config(&rc);
	snprintf(ckpt, sizeof(ckpt), "%s", tmp_path("idx.h5"));
	snprintf(dir, sizeof(dir), "%s", tmp_path("hf-idx"));
	m = saved_model(&rc, ckpt, 9);
	model_free(m);
	CU_ASSERT_EQUAL_FATAL(run_convert("--to-hf", ckpt, "--out", dir, "--shard-size", "20000",
					  NULL), 0);
	snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
	f = fopen(path, "rb");
	CU_ASSERT_PTR_NOT_NULL_FATAL(f);
	fseek(f, 0, SEEK_END);
	len = ftell(f);
	rewind(f);
	text = calloc(len + 1, 1);
	CU_ASSERT_EQUAL(fread(text, 1, len, f), (size_t)len);
	fclose(f);
	/* map the embedding to the last shard instead of the first */
	p = strstr(text, "\"model.embed_tokens.weight\"");
	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	p = strstr(p, "model-00001-of-");
	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	p[10] = '2';
	f = fopen(path, "wb");
	fputs(text, f);
	fclose(f);
	free(text);
	expect_from_hf_fails(dir, "model.embed_tokens.weight", "index.json");
}

/* ---- streaming: memory, and nothing left behind ---- */

/* A cheap deterministic fill (a hash of the position), so that a large fixture is quick to make. */
static void fill_hash(float *x, size_t n, uint64_t seed)
{
	for (size_t i = 0; i < n; i++) {
		uint64_t h = (i + 1) * 0x9e3779b97f4a7c15ULL ^ seed;

		h ^= h >> 29;
		h *= 0xbf58476d1ce4e5b9ULL;
		x[i] = (float)((h >> 40) & 0xffff) / 32768.0f - 1.0f;
	}
}

/* Every tensor of rc's model written with the streaming writer, piece by piece; returns its bytes. */
static uint64_t write_fixture(const char *path, const struct run_config *rc, uint64_t seed)
{
	struct ckpt_writer *w = ckpt_writer_open(path, rc, NULL, err, sizeof(err));
	struct param *params;
	uint64_t bytes = 0;
	size_t most = 1;
	float *buf;
	int n;

	CU_ASSERT_PTR_NOT_NULL_FATAL(w);
	params = ckpt_model_params(&rc->model, &n, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(params);
	for (int i = 0; i < n; i++)
		if (params[i].numel > most)
			most = params[i].numel;
	buf = malloc(sizeof(float) * most);
	CU_ASSERT_PTR_NOT_NULL_FATAL(buf);
	for (int i = 0; i < n; i++) {
		const struct param *p = &params[i];

		/* stacked tensors a piece at a time: the fixture's own memory stays small too */
		for (int e = p->expert_stacked ? 0 : -1; e < (p->expert_stacked ? p->shape[0] : 0);
		     e++) {
			int sub = e >= 0;
			size_t k = sub ? p->numel / (size_t)p->shape[0] : p->numel;

			fill_hash(buf, k, seed + (uint64_t)i * 1000 + (uint64_t)(e + 1));
			CU_ASSERT_EQUAL_FATAL(ckpt_writer_put(w, p->name, p->shape + sub, p->ndim - sub,
							      e, buf, err, sizeof(err)), 0);
		}
		bytes += p->numel * sizeof(float);
	}
	CU_ASSERT_EQUAL_FATAL(ckpt_writer_close(w, 1, err, sizeof(err)), 0);
	free(buf);
	free(params);
	return bytes;
}

/* Same parameters and every piece bit for bit, read a piece at a time. */
static int same_checkpoints(const char *a, const char *b)
{
	struct ckpt_reader *ra = ckpt_reader_open(a, NULL, NULL, err, sizeof(err));
	struct ckpt_reader *rb = ckpt_reader_open(b, NULL, NULL, err, sizeof(err));
	const struct param *pa, *pb;
	int na = 0, nb = 0, diff = 0;
	float *x = NULL, *y = NULL;
	size_t most = 1;

	CU_ASSERT_PTR_NOT_NULL_FATAL(ra);
	CU_ASSERT_PTR_NOT_NULL_FATAL(rb);
	pa = ckpt_reader_params(ra, &na);
	pb = ckpt_reader_params(rb, &nb);
	diff = na != nb;
	for (int i = 0; i < na; i++)
		if (pa[i].numel > most)
			most = pa[i].numel;
	x = malloc(sizeof(float) * most);
	y = malloc(sizeof(float) * most);
	CU_ASSERT_FATAL(x && y);
	for (int i = 0; i < na && !diff; i++) {
		diff = strcmp(pa[i].name, pb[i].name) != 0 ||
		       ckpt_reader_get(ra, pa[i].name, -1, x, err, sizeof(err)) ||
		       ckpt_reader_get(rb, pa[i].name, -1, y, err, sizeof(err)) ||
		       memcmp(x, y, sizeof(float) * pa[i].numel) != 0;
		if (diff)
			fprintf(stderr, "\n  %s differs\n", pa[i].name);
	}
	free(x);
	free(y);
	ckpt_reader_close(ra);
	ckpt_reader_close(rb);
	return !diff;
}

/* A value of /proc/self/status in kB, or -1. */
static long long status_kb(const char *key)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	long long v = -1;
	size_t k = strlen(key);

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, key, k) && line[k] == ':')
			v = atoll(line + k + 1);
	fclose(f);
	return v;
}

static long long maxrss_kb(void)
{
	struct rusage ru;

	return getrusage(RUSAGE_SELF, &ru) ? -1 : (long long)ru.ru_maxrss;
}

struct conv_job {
	int to_hf;
	const char *from, *to;
};

static int run_job(const struct conv_job *j)
{
	struct convert_to_hf_opts o = { ST_F32, 16000000 };

	if (j->to_hf)
		return convert_to_hf(j->from, j->to, &o, NULL, err, sizeof(err));
	return convert_from_hf(j->from, j->to, NULL, err, sizeof(err));
}

/*
 * The conversion in a child process: how much its resident set grew at the peak, in bytes (the child
 * starts as a copy of this process, so only what the conversion itself touches counts), or -1.
 */
static long long peak_growth(const struct conv_job *j)
{
	long long out = -1;
	int fds[2], status;
	pid_t pid;

	CU_ASSERT_EQUAL_FATAL(pipe(fds), 0);
	fflush(NULL);
	pid = fork();
	CU_ASSERT_FATAL(pid >= 0);
	if (pid == 0) {
		FILE *cr = fopen("/proc/self/clear_refs", "w");
		long long base, peak;

		if (cr) {	/* reset the high-water mark to the current size (Linux) */
			fputs("5", cr);
			fclose(cr);
		}
		base = status_kb("VmRSS") >= 0 ? status_kb("VmRSS") : maxrss_kb();
		if (run_job(j) == 0) {
			peak = status_kb("VmHWM") >= 0 ? status_kb("VmHWM") : maxrss_kb();
			out = (peak - base) * 1024;
		} else {
			fprintf(stderr, "\n  convert: %s\n", err);
		}
		if (write(fds[1], &out, sizeof(out)) != sizeof(out))
			_exit(1);
		_exit(0);
	}
	close(fds[1]);
	if (read(fds[0], &out, sizeof(out)) != sizeof(out))
		out = -1;
	close(fds[0]);
	CU_ASSERT_EQUAL(waitpid(pid, &status, 0), pid);
	return out;
}

/* Peak growth under 40% of the model's size (the old, whole-model conversions took 100-200%). */
static void check_growth(const char *what, long long growth, uint64_t model_bytes)
{
	const long long limit = (long long)(model_bytes * 2 / 5);

	CU_ASSERT(growth >= 0);
	if (UNDER_ASAN)
		return;
	if (growth < 0 || growth >= limit)
		fprintf(stderr, "\n  %s: peak RSS growth %.1f MB, model %.1f MB\n", what, growth / 1e6,
			model_bytes / 1e6);
	CU_ASSERT(growth < limit);
}

/*
 * A model of ~66 MB (64 routed experts in 3 layers; its largest tensor 0.5 MB) converts both ways with
 * a peak resident set well under its size: the conversions stream a tensor at a time.
 */
static void test_streaming_memory(void)
{
	char ckpt[400], dir[400], back[400];
	struct run_config rc;
	struct model_config *m = &rc.model;
	struct conv_job to = { 1, ckpt, dir }, from = { 0, dir, back };
	long long g_to, g_from;
	uint64_t bytes;

	tiny_config(&rc);
	m->vocab_size = 512;
	m->hidden_size = 256;
	m->moe_intermediate_size = 112;
	m->num_hidden_layers = 4;
	m->n_routed_experts = 64;
	m->n_group = 8;
	m->topk_group = 2;
	m->num_experts_per_tok = 4;
	snprintf(ckpt, sizeof(ckpt), "%s", tmp_path("big.h5"));
	snprintf(dir, sizeof(dir), "%s", tmp_path("hf-big"));
	snprintf(back, sizeof(back), "%s", tmp_path("big-back.h5"));
	rm_dir(dir);
	bytes = write_fixture(ckpt, &rc, 77);
	CU_ASSERT_FATAL(bytes > 60000000);
	g_to = peak_growth(&to);
	CU_ASSERT_EQUAL_FATAL(count_files(dir, "model-*-of-*.safetensors") >= 3, 1);
	g_from = peak_growth(&from);
	CU_ASSERT_TRUE(same_checkpoints(ckpt, back));
	check_growth("--to-hf", g_to, bytes);
	check_growth("--from-hf", g_from, bytes);
	unlink(ckpt);
	unlink(back);
	rm_dir(dir);
}

/* lm_head (the last tensor) holds 0.375 everywhere; one byte of it flipped in the file. */
static void corrupt_checkpoint(const char *ckpt, const struct run_config *rc)
{
	struct moe_model *m = model_create(&rc->model, 0, rc->model.n_routed_experts, err,
					   sizeof(err));
	const struct param *p;
	const float pattern[4] = { 0.375f, 0.375f, 0.375f, 0.375f };
	unsigned char *bytes, *hit = NULL;
	struct ckpt_meta meta = { 0, 0 };
	long len;
	FILE *f;

	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	model_init_weights(m, 4);
	p = model_find_param(m, "lm_head.weight");
	for (size_t i = 0; i < p->numel; i++)
		m->weights[p->offset + i] = 0.375f;
	CU_ASSERT_EQUAL_FATAL(checkpoint_save_model(ckpt, m, rc, &meta, err, sizeof(err)), 0);
	model_free(m);
	f = fopen(ckpt, "r+b");
	CU_ASSERT_PTR_NOT_NULL_FATAL(f);
	fseek(f, 0, SEEK_END);
	len = ftell(f);
	rewind(f);
	bytes = malloc((size_t)len);
	CU_ASSERT_FATAL(bytes && fread(bytes, 1, (size_t)len, f) == (size_t)len);
	for (long i = 0; i + 16 <= len && !hit; i++)
		if (!memcmp(bytes + i, pattern, sizeof(pattern)))
			hit = bytes + i;
	CU_ASSERT_PTR_NOT_NULL_FATAL(hit);
	hit[5] ^= 0x40;
	rewind(f);
	CU_ASSERT_EQUAL(fwrite(bytes, 1, (size_t)len, f), (size_t)len);
	fclose(f);
	free(bytes);
}

/* --to-hf failing half-way (some shards written) leaves no weights, nor the directory it made. */
static void test_to_hf_failure_leaves_nothing(void)
{
	char ckpt[400], dir[400];
	struct run_config rc;

	tiny_config(&rc);
	snprintf(ckpt, sizeof(ckpt), "%s", tmp_path("corrupt.h5"));
	snprintf(dir, sizeof(dir), "%s", tmp_path("hf-fail"));
	corrupt_checkpoint(ckpt, &rc);
	rm_dir(dir);
	CU_ASSERT_EQUAL(convert_to_hf(ckpt, dir, &(struct convert_to_hf_opts){ ST_F32, 20000 }, NULL,
				      err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "lm_head.weight"));
	CU_ASSERT_PTR_NOT_NULL(strstr(err, ckpt));
	CU_ASSERT_EQUAL(access(dir, F_OK), -1);
	/* into an existing directory: it stays, empty of weights */
	CU_ASSERT_EQUAL_FATAL(mkdir(dir, 0777), 0);
	CU_ASSERT_EQUAL(run_convert("--to-hf", ckpt, "--out", dir, "--shard-size", "20KB", NULL), 1);
	CU_ASSERT_EQUAL(access(dir, F_OK), 0);
	CU_ASSERT_EQUAL(count_files(dir, "*"), 0);
	rm_dir(dir);
}

static void test_cli_usage(void)
{
	CU_ASSERT_EQUAL(run_convert("--to-hf", "x.h5", NULL), 2);
	CU_ASSERT_EQUAL(run_convert("--to-hf", "x.h5", "--from-hf", "d", "--out", "y", NULL), 2);
	CU_ASSERT_EQUAL(run_convert("--to-hf", "x.h5", "--out", "d", "--dtype", "f16", NULL), 2);
	CU_ASSERT_EQUAL(run_convert("--to-hf", "x.h5", "--out", "d", "--shard-size", "lots", NULL), 2);
	CU_ASSERT_EQUAL(run_convert("--bogus", NULL), 2);
	CU_ASSERT_EQUAL(run_convert("--to-hf", tmp_path("absent.h5"), "--out", tmp_path("o"), NULL),
			1);
	CU_ASSERT_EQUAL(run_convert("--from-hf", tmp_path("absent-dir"), "--out", tmp_path("o.h5"),
				    NULL), 1);
}

/* ---- DeepSeek's published config.json files ---- */

static char *read_fixture(const char *name)
{
	char rel[1024];

	snprintf(rel, sizeof(rel), "tests/train/fixtures/hf_configs/%s", name);
	return test_read_file(src_path(rel), NULL);
}

/*
 * tests/train/fixtures/hf_configs: DeepSeek-V2-Lite's, V3's and R1's config.json as published (YaRN
 * rope_scaling, V3/R1's fp8 quantization_config, num_nextn_predict_layers, seq_aux, aux_loss_alpha,
 * auto_map, ...) load as they are, both through --from-hf's translation and as a run config's model
 * section, with the published parameter counts (FACTS: 15.7B / 2.4B, 671B / 37B; the MTP layer is not
 * part of the model).
 */
static void test_published_configs(void)
{
	static const struct {
		const char *file;
		double total, active;   /* billions */
		int layers, experts, yarn;
	} want[] = {
		{ "deepseek-v2-lite.config.json", 15.71, 2.45, 27, 64, 1 },
		{ "deepseek-v3.config.json", 671.0, 36.5, 61, 256, 1 },
		{ "deepseek-r1.config.json", 671.0, 36.5, 61, 256, 1 },
	};

	for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		char *text = read_fixture(want[i].file), *wrapped;
		struct run_config rc, direct;
		int64_t total = 0, active = 0;

		config_defaults(&rc);
		if (convert_hf_config(&rc, text, want[i].file, NULL, err, sizeof(err)))
			fprintf(stderr, "\n  %s\n", err);
		CU_ASSERT_EQUAL_FATAL(convert_hf_config(&rc, text, want[i].file, NULL, err, sizeof(err)),
				      0);
		CU_ASSERT_EQUAL(rc.model.num_hidden_layers, want[i].layers);
		CU_ASSERT_EQUAL(rc.model.n_routed_experts, want[i].experts);
		CU_ASSERT_EQUAL(rc.model.rope_scaling.type == ROPE_YARN, want[i].yarn);
		model_count_params(&rc.model, &total, &active);
		CU_ASSERT(fabs(total / 1e9 - want[i].total) < 0.01 * want[i].total);
		CU_ASSERT(fabs(active / 1e9 - want[i].active) < 0.01 * want[i].active);
		if (fabs(total / 1e9 - want[i].total) >= 0.01 * want[i].total ||
		    fabs(active / 1e9 - want[i].active) >= 0.01 * want[i].active)
			fprintf(stderr, "\n  %s: %.2fB / %.2fB\n", want[i].file, total / 1e9,
				active / 1e9);
		/* the same keys as a run configuration's model section */
		wrapped = test_xmalloc(strlen(text) + 16);
		sprintf(wrapped, "{\"model\": %s}", text);
		config_defaults(&direct);
		if (config_apply_json(&direct, wrapped, want[i].file, err, sizeof(err)))
			fprintf(stderr, "\n  %s\n", err);
		CU_ASSERT_EQUAL(direct.model.hidden_size, rc.model.hidden_size);
		free(wrapped);
		free(text);
	}
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "to-hf sharded f32 -> from-hf is bit-exact", test_round_trip_f32 },
		{ "to-hf sharded bf16 -> from-hf rounds exactly", test_round_trip_bf16 },
		{ "multi-token-prediction layers to-hf -> from-hf (shared copies written, ignored)", test_round_trip_mtp },
		{ "HF layout: per-expert tensors, f32 bias, one file", test_hf_layout },
		{ "config.json round trip", test_config_round_trip },
		{ "a transformers 5 config.json loads", test_transformers_config },
		{ "YaRN: DeepSeek's rope_scaling and transformers' rope_parameters load",
		  test_yarn_from_hf },
		{ "YaRN: --to-hf writes rope_scaling", test_yarn_to_hf },
		{ "missing keys take transformers' defaults", test_config_defaults },
		{ "DeepSeek-V2-Lite's, V3's, R1's published config.json load", test_published_configs },
		{ "missing tensor refused naming it", test_missing_tensor },
		{ "unexpected tensor refused naming it", test_unexpected_tensor },
		{ "shape mismatch refused naming it", test_shape_mismatch },
		{ "unsupported dtype refused naming it", test_bad_dtype },
		{ "MTP layers and rotary buffers skipped; V2 without bias", test_skipped_and_v2 },
		{ "index disagreeing with the files refused", test_index_disagrees },
		{ "command-line usage errors", test_cli_usage },
		{ "streamed: peak memory well under the model's size", test_streaming_memory },
		{ "to-hf failing half-way leaves nothing", test_to_hf_failure_leaves_nothing },
		{ NULL, NULL },
	};

	add_suite("convert", cases);
}
