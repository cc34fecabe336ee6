/*
 * tests/train/test_convert_peft.c - `moe convert --to-hf` of an adapter checkpoint (train/convert_peft.c):
 * PEFT's adapter_config.json and adapter_model.safetensors, every tensor's PEFT name, shape and values
 * (f32 exactly, bf16 rounded), the routed experts one tensor per expert, and target_modules (a list when
 * it says exactly what is adapted, else the regular expression).
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "model/lora.h"
#include "model/model.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/convert.h"
#include "train/safetensors.h"

/* the defaults with these lora.targets */
static void set_targets(struct run_config *rc, const char *const *names)
{
	config_defaults(rc);
	rc->lora.n_targets = 0;
	for (; *names; names++)
		snprintf(rc->lora.targets[rc->lora.n_targets++], CFG_STR, "%s", *names);
}

/* an adapter checkpoint of random adapters; returns them (attached to *m) */
static struct lora *write_adapters(const char *path, struct run_config *rc, struct moe_model **m)
{
	char err[1024];
	test_small_moe(&rc->model);
	rc->lora.rank = 3;
	rc->lora.alpha = 6;
	rc->lora.dropout = 0.05;
	snprintf(rc->lora.base, sizeof(rc->lora.base), "/models/base.h5");
	*m = model_create(&rc->model, 0, rc->model.n_routed_experts, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(*m);
	struct lora_spec s = { .rank = 3, .alpha = 6, .dropout = 0.05 };
	for (int i = 0; i < rc->lora.n_targets; i++)
		s.targets |= 1u << lora_target_parse(rc->lora.targets[i]);
	struct lora *l = lora_create(*m, &s, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(l);
	test_fill_randn(l->view.weights, l->view.n_weights, 0.5f);
	struct ckpt_meta meta = { 7, 100 };
	if (checkpoint_save_model(path, &l->view, rc, &meta, err, sizeof(err)))
		printf("\n  %s", err);
	return l;
}

/* PEFT's name of expert e's block (-1: not stacked) */
static void peft_of(char *out, size_t len, const char *name, int e)
{
	const char *at = strstr(name, ".mlp.experts.");
	if (e < 0 || !at) {
		snprintf(out, len, "base_model.model.%s", name);
		return;
	}
	int head = (int)(at - name) + 13;
	snprintf(out, len, "base_model.model.%.*s%d.%s", head, name, e, name + head);
}

static cJSON *read_json(const char *path)
{
	size_t n;
	char *txt = test_read_file(path, &n);
	CU_ASSERT_PTR_NOT_NULL_FATAL(txt);
	cJSON *j = cJSON_Parse(txt);
	free(txt);
	CU_ASSERT_PTR_NOT_NULL_FATAL(j);
	return j;
}

static void check_layout(const char *const *names, enum st_dtype dtype, const char *want_targets)
{
	static int run;
	char ck[256], dir[256], path[300], err[1024], pname[256];
	struct run_config rc;
	struct moe_model *m;
	snprintf(ck, sizeof(ck), "%s", tmp_path("adapters.h5"));
	snprintf(dir, sizeof(dir), "%s_%d", tmp_path("peft"), run++);
	set_targets(&rc, names);
	struct lora *l = write_adapters(ck, &rc, &m);
	struct convert_to_hf_opts o = { dtype, CONVERT_DEFAULT_SHARD_BYTES };
	int r = convert_to_hf(ck, dir, &o, NULL, err, sizeof(err));
	if (r)
		printf("\n  %s", err);
	CU_ASSERT_EQUAL_FATAL(r, 0);

	snprintf(path, sizeof(path), "%s/adapter_model.safetensors", dir);
	struct st_file f;
	CU_ASSERT_EQUAL_FATAL(st_open(&f, path, err, sizeof(err)), 0);
	int expected = 0, experts = 0;
	double worst = 0;
	for (int i = 0; i < l->view.n_params; i++) {
		const struct param *p = &l->view.params[i];
		int E = p->expert_stacked ? (int)p->shape[0] : 1;
		size_t per = p->numel / E;
		for (int e = 0; e < E; e++, expected++) {
			peft_of(pname, sizeof(pname), p->name, p->expert_stacked ? e : -1);
			const struct st_tensor *t = st_find(&f, pname);
			CU_ASSERT_PTR_NOT_NULL_FATAL(t);
			CU_ASSERT_EQUAL(t->dtype, dtype);
			CU_ASSERT_EQUAL(t->ndim, 2);
			/* lora_A [r, in], lora_B [out, r], as PEFT's nn.Linear weights */
			int is_a = strstr(pname, ".lora_A.weight") != NULL;
			CU_ASSERT_EQUAL(is_a ? t->shape[0] : t->shape[1], 3);
			CU_ASSERT_EQUAL((size_t)(t->shape[0] * t->shape[1]), per);
			float *x = malloc(sizeof(float) * per);
			CU_ASSERT_EQUAL(st_read_f32(&f, t, x, err, sizeof(err)), 0);
			const float *w = l->view.weights + p->offset + e * per;
			for (size_t j = 0; j < per; j++) {
				double d = fabs((double)x[j] - w[j]) / (fabs(w[j]) + 1e-30);
				worst = d > worst ? d : worst;
			}
			free(x);
			experts += p->expert_stacked;
		}
	}
	CU_ASSERT_EQUAL(f.n_tensors, expected);
	/* spelled out once, as PEFT names them on DeepseekV3ForCausalLM */
	CU_ASSERT_PTR_NOT_NULL(st_find(&f, "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"));
	CU_ASSERT_PTR_NOT_NULL(st_find(&f, "base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_A.weight"));
	CU_ASSERT(dtype == ST_F32 ? worst == 0 : worst <= 1.0 / 256);
	st_close(&f);

	snprintf(path, sizeof(path), "%s/adapter_config.json", dir);
	cJSON *j = read_json(path);
	CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItem(j, "peft_type")->valuestring, "LORA");
	CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItem(j, "task_type")->valuestring, "CAUSAL_LM");
	CU_ASSERT_EQUAL(cJSON_GetObjectItem(j, "r")->valueint, 3);
	CU_ASSERT_EQUAL(cJSON_GetObjectItem(j, "lora_alpha")->valuedouble, 6.0);
	CU_ASSERT(fabs(cJSON_GetObjectItem(j, "lora_dropout")->valuedouble - 0.05) < 1e-12);
	CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItem(j, "base_model_name_or_path")->valuestring, "/models/base.h5");
	char *tm = cJSON_PrintUnformatted(cJSON_GetObjectItem(j, "target_modules"));
	CU_ASSERT_STRING_EQUAL(tm, want_targets);
	printf("\n  %d tensors (%d of routed experts), %s, max rel err %.1e; target_modules %s", expected, experts,
	       dtype == ST_F32 ? "f32" : "bf16", worst, tm);
	free(tm);
	cJSON_Delete(j);
	/* a second conversion into the same directory is refused (it holds weights) */
	CU_ASSERT_NOT_EQUAL(convert_to_hf(ck, dir, &o, NULL, err, sizeof(err)), 0);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "already holds weights"));
	lora_free(l);
	model_free(m);
}

static void test_peft_list(void)
{
	static const char *const t[] = { "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
					 "gate_proj", "up_proj", "down_proj", "experts.gate_proj",
					 "experts.up_proj", "experts.down_proj", NULL };
	check_layout(t, ST_F32, "[\"q_a_proj\",\"q_b_proj\",\"kv_a_proj_with_mqa\",\"kv_b_proj\",\"o_proj\","
		     "\"gate_proj\",\"up_proj\",\"down_proj\"]");
}

static void test_peft_regex(void)
{
	static const char *const t[] = { "kv_b_proj", "o_proj", "gate_proj", "experts.down_proj", NULL };
	check_layout(t, ST_BF16, "\".*\\\\.(self_attn\\\\.(kv_b_proj|o_proj)|mlp\\\\.(shared_experts\\\\.)?gate_proj|"
		     "mlp\\\\.experts\\\\.\\\\d+\\\\.down_proj)\"");
}

static void test_peft_fp8_refused(void)
{
	static const char *const t[] = { "o_proj", NULL };
	char ck[256], err[1024];
	struct run_config rc;
	struct moe_model *m;
	snprintf(ck, sizeof(ck), "%s", tmp_path("adapters8.h5"));
	set_targets(&rc, t);
	struct lora *l = write_adapters(ck, &rc, &m);
	struct convert_to_hf_opts o = { ST_F8_E4M3, CONVERT_DEFAULT_SHARD_BYTES };
	CU_ASSERT_NOT_EQUAL(convert_to_hf(ck, tmp_path("peft8"), &o, NULL, err, sizeof(err)), 0);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "LoRA adapters are written f32 or bf16"));
	lora_free(l);
	model_free(m);
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "PEFT layout, every target (f32, list)", test_peft_list },
		{ "PEFT layout, some targets (bf16, regex)", test_peft_regex },
		{ "PEFT layout: fp8 refused", test_peft_fp8_refused },
		{ NULL, NULL },
	};
	add_suite("convert to PEFT", cases);
}
