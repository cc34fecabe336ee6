/*
 * tests/train/test_convert_fp8.c - DeepSeek-V3's block-scaled fp8 weights in `moe convert`.
 *
 * From HF: a directory written here with F8_E4M3 linear weights (random codes) and their
 * NAME_scale_inv (random scales, blocks of [16, 8] so that the blocks at the bottom and right edges are
 * partial), beside a twin directory holding the dequantised values as F32 (code value x scale, computed
 * here from E4M3's definition): both convert to the same checkpoint bit for bit, and the two models give
 * the same logits.  To HF: --dtype fp8 writes DeepSeek's layout (F8_E4M3 linear weights, F32 scales of
 * [ceil(rows/128), ceil(cols/128)], bf16 embeddings, norms, router and lm_head, f32 routing bias,
 * quantization_config in config.json), and reading it back gives every weight within E4M3's precision
 * of its block.  Refused, naming the tensor or the key: a missing scale, a scale of the wrong shape, a
 * scale without an fp8 weight, fp8 weights without quantization_config, and a quantization_config that
 * is not DeepSeek's fp8 (fmt e5m2, a one-number block, another quant_method).
 */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "model/model.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/convert.h"
#include "train/safetensors.h"
#include "train/train_cli.h"

static char err[2048];

static const char fp8_quant[] = "{\"activation_scheme\": \"dynamic\", \"fmt\": \"e4m3\", "
				"\"quant_method\": \"fp8\", \"weight_block_size\": [16, 8]}";

/* Two layers (dense, then MoE with 4 experts), q_lora on, sigmoid scoring; widths not multiples of
 * the blocks. */
static void fp8_config(struct run_config *rc, int hidden)
{
	struct model_config *m = &rc->model;

	config_defaults(rc);
	m->vocab_size = 40;
	m->hidden_size = hidden;
	m->intermediate_size = 44;
	m->moe_intermediate_size = 20;
	m->num_hidden_layers = 2;
	test_small_moe(m);
	m->kv_lora_rank = 12;
	m->q_lora_rank = 20;
	m->rope_theta = 5000.0;
	m->routed_scaling_factor = 1.5;
}

static struct moe_model *saved_model(const struct run_config *rc, const char *ckpt, uint64_t seed)
{
	struct moe_model *m = model_create(&rc->model, 0, rc->model.n_routed_experts, err,
					   sizeof(err));
	struct ckpt_meta meta = { 0, 0 };

	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	model_init_weights(m, seed);
	test_rng_seed(seed);
	for (int i = 0; i < m->n_params; i++)
		if (m->params[i].kind == PARAM_NORM || m->params[i].kind == PARAM_BUFFER)
			test_fill_randn(m->weights + m->params[i].offset, m->params[i].numel, 1.0f);
	CU_ASSERT_EQUAL(checkpoint_save_model(ckpt, m, rc, &meta, err, sizeof(err)), 0);
	return m;
}

static struct moe_model *load_model(const char *ckpt, struct run_config *rc)
{
	struct moe_model *m;

	config_defaults(rc);
	CU_ASSERT_EQUAL_FATAL(checkpoint_read_header(ckpt, rc, NULL, err, sizeof(err)), 0);
	m = model_create(&rc->model, 0, rc->model.n_routed_experts, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	CU_ASSERT_EQUAL(checkpoint_load_model(ckpt, m, err, sizeof(err)), 0);
	return m;
}

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

/* E4M3's definition, independent of the library's decoder. */
static double e4m3_value(int code)
{
	int s = code >> 7, e = (code >> 3) & 15, m = code & 7;
	double v = e ? ldexp(1.0 + m / 8.0, e - 7) : ldexp(m / 8.0, -6);

	return s ? -v : v;
}

static int ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), k = strlen(suffix);

	return n >= k && !strcmp(s + n - k, suffix);
}

/* DeepSeek's fp8 tensors: the linear layers' 2-D weights (not embeddings, lm_head, norms, router) */
static int is_linear(const struct st_tensor *t)
{
	return t->ndim == 2 && (ends_with(t->name, "_proj.weight") ||
				ends_with(t->name, "_proj_with_mqa.weight"));
}

static void write_text(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	CU_ASSERT_PTR_NOT_NULL_FATAL(f);
	fputs(text, f);
	fclose(f);
}

static char *read_text(const char *path)
{
	FILE *f = fopen(path, "r");
	char *buf;
	long n;

	CU_ASSERT_PTR_NOT_NULL_FATAL(f);
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	buf = test_xmalloc((size_t)n + 1);
	CU_ASSERT_EQUAL(fread(buf, 1, (size_t)n, f), (size_t)n);
	buf[n] = '\0';
	fclose(f);
	return buf;
}

static int mkdir_p_test(const char *dir)
{
	char cmd[600];

	snprintf(cmd, sizeof(cmd), "mkdir -p '%s'", dir);
	return system(cmd);
}

/* How a fixture is damaged. */
struct damage {
	const char *drop_scale;     /* this weight's scale left out */
	const char *short_scale;    /* this weight's scale one row short */
	const char *orphan_scale;   /* a scale for this non-fp8 tensor added */
	const char *quant;          /* quantization_config's JSON; NULL: none */
};

#define MAX_T 160

/*
 * From SRC (--to-hf f32, one shard): FP8 with every linear weight as F8_E4M3 codes and scales in blocks
 * of [br, bc], and REF (when not NULL) with the same weights dequantised, as F32.
 */
static void make_fp8_dirs(const char *src, const char *fp8, const char *ref, int br, int bc,
			  const struct damage *d, uint64_t seed)
{
	struct st_spec sq[2 * MAX_T], sr[MAX_T];
	float *dq[2 * MAX_T], *dr[MAX_T];
	char path[600], names[MAX_T][200];
	int nq = 0, nr = 0;
	struct st_writer *w;
	struct st_file f;
	cJSON *cfg;
	char *text;

	rm_dir(fp8);
	CU_ASSERT_EQUAL_FATAL(mkdir_p_test(fp8), 0);
	snprintf(path, sizeof(path), "%s/model.safetensors", src);
	CU_ASSERT_EQUAL_FATAL(st_open(&f, path, err, sizeof(err)), 0);
	CU_ASSERT_FATAL(f.n_tensors < MAX_T);
	test_rng_seed(seed);
	for (int i = 0; i < f.n_tensors; i++) {
		const struct st_tensor *t = &f.tensors[i];
		float *x = test_xmalloc(sizeof(float) * (t->numel + 1));

		CU_ASSERT_EQUAL(st_read_f32(&f, t, x, err, sizeof(err)), 0);
		sr[nr] = (struct st_spec){ t->name, ST_F32, t->ndim, { 0 } };
		memcpy(sr[nr].shape, t->shape, sizeof(t->shape));
		sq[nq] = sr[nr];
		dr[nr] = x;
		if (is_linear(t)) {
			int64_t rows = t->shape[0], cols = t->shape[1];
			int64_t sr0 = (rows + br - 1) / br, sc0 = (cols + bc - 1) / bc;
			float *codes = test_xmalloc(sizeof(float) * t->numel);
			float *scale = test_xmalloc(sizeof(float) * sr0 * sc0);

			for (int64_t k = 0; k < sr0 * sc0; k++)
				scale[k] = test_rand_uniform(0.5f, 2.0f) * 1e-4f;
			for (int64_t r = 0; r < rows; r++) {
				for (int64_t c = 0; c < cols; c++) {
					int code = (int)test_rand_uniform(0, 253.999f);

					code = code >= 0x7f ? code + 1 : code;  /* no NaN */
					codes[r * cols + c] = (float)e4m3_value(code);
					x[r * cols + c] = (float)e4m3_value(code) *
							  scale[(r / br) * sc0 + c / bc];
				}
			}
			sq[nq].dtype = ST_F8_E4M3;
			dq[nq++] = codes;
			snprintf(names[i], sizeof(names[i]), "%s_scale_inv", t->name);
			if (d && d->drop_scale && !strcmp(d->drop_scale, t->name)) {
				free(scale);
			} else {
				sq[nq] = (struct st_spec){ names[i], ST_F32, 2, { sr0, sc0 } };
				if (d && d->short_scale && !strcmp(d->short_scale, t->name))
					sq[nq].shape[0]--;
				dq[nq++] = scale;
			}
		} else {
			float *copy = test_xmalloc(sizeof(float) * (t->numel + 1));

			memcpy(copy, x, sizeof(float) * t->numel);
			dq[nq++] = copy;
			if (d && d->orphan_scale && !strcmp(d->orphan_scale, t->name)) {
				snprintf(names[i], sizeof(names[i]), "%s_scale_inv", t->name);
				sq[nq] = (struct st_spec){ names[i], ST_F32, 1, { 1 } };
				dq[nq] = test_xmalloc(sizeof(float));
				dq[nq++][0] = 1;
			}
		}
		nr++;
	}
	snprintf(path, sizeof(path), "%s/model.safetensors", fp8);
	w = st_writer_open(path, sq, nq, NULL, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(w);
	for (int i = 0; i < nq; i++) {
		CU_ASSERT_EQUAL(st_writer_append(w, dq[i], st_spec_bytes(&sq[i]) /
						 st_dtype_size(sq[i].dtype), err, sizeof(err)), 0);
		free(dq[i]);
	}
	CU_ASSERT_EQUAL_FATAL(st_writer_close(w, err, sizeof(err)), 0);
	if (ref) {
		rm_dir(ref);
		CU_ASSERT_EQUAL_FATAL(mkdir_p_test(ref), 0);
		snprintf(path, sizeof(path), "%s/model.safetensors", ref);
		w = st_writer_open(path, sr, nr, NULL, err, sizeof(err));
		CU_ASSERT_PTR_NOT_NULL_FATAL(w);
		for (int i = 0; i < nr; i++)
			CU_ASSERT_EQUAL(st_writer_append(w, dr[i], st_spec_bytes(&sr[i]) / 4, err,
							 sizeof(err)), 0);
		CU_ASSERT_EQUAL_FATAL(st_writer_close(w, err, sizeof(err)), 0);
	}
	for (int i = 0; i < nr; i++)
		free(dr[i]);
	st_close(&f);
	snprintf(path, sizeof(path), "%s/config.json", src);
	text = read_text(path);
	if (ref) {
		snprintf(path, sizeof(path), "%s/config.json", ref);
		write_text(path, text);
	}
	cfg = cJSON_Parse(text);
	free(text);
	if (d && d->quant)
		cJSON_AddItemToObject(cfg, "quantization_config", cJSON_Parse(d->quant));
	text = cJSON_Print(cfg);
	snprintf(path, sizeof(path), "%s/config.json", fp8);
	write_text(path, text);
	free(text);
	cJSON_Delete(cfg);
}

/* --to-hf f32 of a fresh model into test_tmpdir()/src-TAG; returns the model. */
static struct moe_model *source_dir(const struct run_config *rc, const char *tag, char *src,
				    size_t len)
{
	char ckpt[400];
	struct moe_model *m;

	snprintf(ckpt, sizeof(ckpt), "%s/src-%s.h5", test_tmpdir(), tag);
	snprintf(src, len, "%s/src-%s", test_tmpdir(), tag);
	rm_dir(src);
	m = saved_model(rc, ckpt, 17);
	CU_ASSERT_EQUAL_FATAL(run_convert("--to-hf", ckpt, "--out", src, NULL), 0);
	return m;
}

static void model_logits_of(struct moe_model *m, const int *ids, int T, float *out)
{
	model_forward(m, ids, NULL, 1, T);
	memcpy(out, model_logits(m), sizeof(float) * (size_t)T * m->cfg.vocab_size);
}

/* fp8 + scales and their dequantised F32 twin: the same checkpoint, the same logits. */
static void test_fp8_import(void)
{
	struct damage d = { .quant = fp8_quant };
	char src[400], fp8[400], ref[400], a[400], b[400];
	struct run_config rc, ra, rb;
	struct moe_model *m, *ma, *mb;
	int ids[12], T = 12, diff = 0;
	float *la, *lb;

	fp8_config(&rc, 36);
	m = source_dir(&rc, "imp", src, sizeof(src));
	model_free(m);
	snprintf(fp8, sizeof(fp8), "%s/fp8-imp", test_tmpdir());
	snprintf(ref, sizeof(ref), "%s/ref-imp", test_tmpdir());
	make_fp8_dirs(src, fp8, ref, 16, 8, &d, 5);
	snprintf(a, sizeof(a), "%s/imp-fp8.h5", test_tmpdir());
	snprintf(b, sizeof(b), "%s/imp-ref.h5", test_tmpdir());
	CU_ASSERT_EQUAL_FATAL(convert_from_hf(fp8, a, NULL, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(convert_from_hf(ref, b, NULL, err, sizeof(err)), 0);
	ma = load_model(a, &ra);
	mb = load_model(b, &rb);
	CU_ASSERT_EQUAL_FATAL(ma->n_weights, mb->n_weights);
	for (size_t i = 0; i < ma->n_weights; i++)
		diff += bits(ma->weights[i]) != bits(mb->weights[i]);
	CU_ASSERT_EQUAL(diff, 0);
	for (int t = 0; t < T; t++)
		ids[t] = (t * 7 + 3) % rc.model.vocab_size;
	la = test_xmalloc(sizeof(float) * T * rc.model.vocab_size);
	lb = test_xmalloc(sizeof(float) * T * rc.model.vocab_size);
	model_logits_of(ma, ids, T, la);
	model_logits_of(mb, ids, T, lb);
	diff = 0;
	for (int i = 0; i < T * rc.model.vocab_size; i++)
		diff += bits(la[i]) != bits(lb[i]) || !isfinite(la[i]);
	CU_ASSERT_EQUAL(diff, 0);
	free(la);
	free(lb);
	model_free(ma);
	model_free(mb);
}

/* The largest magnitude of w's block holding (r, c), blocks of 128 x 128. */
static float block_amax(const float *w, int64_t cols, int64_t rows, int64_t r, int64_t c)
{
	int64_t r0 = r / 128 * 128, c0 = c / 128 * 128;
	float a = 0;

	for (int64_t i = r0; i < r0 + 128 && i < rows; i++)
		for (int64_t j = c0; j < c0 + 128 && j < cols; j++)
			a = fmaxf(a, fabsf(w[i * cols + j]));
	return a;
}

static void check_layout(const char *dir)
{
	char path[600];
	struct st_file f;
	const struct st_tensor *t;
	cJSON *cfg, *q, *b;
	char *text;
	static const char *const bf16[] = {
		"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
		"model.layers.1.mlp.gate.weight", "model.layers.0.input_layernorm.weight",
		"model.layers.0.self_attn.kv_a_layernorm.weight", NULL,
	};

	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	CU_ASSERT_EQUAL_FATAL(st_open(&f, path, err, sizeof(err)), 0);
	for (int i = 0; bf16[i]; i++) {
		t = st_find(&f, bf16[i]);
		CU_ASSERT_FATAL(t != NULL);
		CU_ASSERT_EQUAL(t->dtype, ST_BF16);
	}
	t = st_find(&f, "model.layers.1.mlp.gate.e_score_correction_bias");
	CU_ASSERT_FATAL(t != NULL);
	CU_ASSERT_EQUAL(t->dtype, ST_F32);
	t = st_find(&f, "model.layers.1.mlp.experts.2.down_proj.weight");
	CU_ASSERT_FATAL(t != NULL);
	CU_ASSERT_EQUAL(t->dtype, ST_F8_E4M3);
	t = st_find(&f, "model.layers.0.mlp.down_proj.weight_scale_inv");  /* [130, 44] */
	CU_ASSERT_FATAL(t != NULL);
	CU_ASSERT_EQUAL(t->dtype, ST_F32);
	CU_ASSERT_EQUAL(t->ndim, 2);
	CU_ASSERT_EQUAL(t->shape[0], 2);
	CU_ASSERT_EQUAL(t->shape[1], 1);
	CU_ASSERT_EQUAL(t->begin % 4, 0);
	CU_ASSERT_PTR_NOT_NULL(st_find(&f, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"));
	CU_ASSERT_PTR_NULL(st_find(&f, "model.embed_tokens.weight_scale_inv"));
	CU_ASSERT_PTR_NULL(st_find(&f, "model.layers.1.mlp.gate.weight_scale_inv"));
	st_close(&f);
	snprintf(path, sizeof(path), "%s/config.json", dir);
	text = read_text(path);
	cfg = cJSON_Parse(text);
	free(text);
	q = cJSON_GetObjectItem(cfg, "quantization_config");
	CU_ASSERT_FATAL(cJSON_IsObject(q));
	CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItem(q, "fmt")->valuestring, "e4m3");
	CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItem(q, "quant_method")->valuestring, "fp8");
	CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItem(q, "activation_scheme")->valuestring, "dynamic");
	b = cJSON_GetObjectItem(q, "weight_block_size");
	CU_ASSERT_EQUAL(cJSON_GetArraySize(b), 2);
	CU_ASSERT_EQUAL(cJSON_GetArrayItem(b, 0)->valuedouble, 128);
	CU_ASSERT_EQUAL(cJSON_GetArrayItem(b, 1)->valuedouble, 128);
	CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItem(cfg, "torch_dtype")->valuestring, "bfloat16");
	cJSON_Delete(cfg);
}

/* --to-hf --dtype fp8 -> --from-hf: linear weights within half an E4M3 step of their block's scale,
 * the rest rounded to bf16 exactly (the routing bias exact). */
static void test_fp8_round_trip(void)
{
	char ckpt[400], dir[400], back[400];
	struct run_config rc, rc2;
	struct moe_model *m, *m2;
	int bad = 0, n_fp8 = 0;
	double worst = 0;

	fp8_config(&rc, 130);  /* hidden 130: two blocks of 128 rows / cols, the second partial */
	snprintf(ckpt, sizeof(ckpt), "%s", tmp_path("rt.h5"));
	snprintf(dir, sizeof(dir), "%s", tmp_path("rt-fp8"));
	snprintf(back, sizeof(back), "%s", tmp_path("rt-back.h5"));
	rm_dir(dir);
	m = saved_model(&rc, ckpt, 23);
	CU_ASSERT_EQUAL_FATAL(run_convert("--to-hf", ckpt, "--out", dir, "--dtype", "fp8", NULL), 0);
	check_layout(dir);
	CU_ASSERT_EQUAL_FATAL(run_convert("--from-hf", dir, "--out", back, NULL), 0);
	m2 = load_model(back, &rc2);
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		const float *a = m->weights + p->offset, *b = m2->weights + p->offset;
		int lin = p->ndim >= 2 && (ends_with(p->name, "_proj.weight") ||
					   ends_with(p->name, "_proj_with_mqa.weight"));
		int64_t rows = p->ndim >= 2 ? p->shape[p->ndim - 2] : 1, cols = p->shape[p->ndim - 1];

		n_fp8 += lin;
		for (size_t j = 0; j < p->numel; j++) {
			size_t mat = j / (size_t)(rows * cols), in = j % (size_t)(rows * cols);
			float want;

			if (p->kind == PARAM_BUFFER) {
				want = a[j];
			} else if (!lin) {
				want = st_bf16_to_f32(st_f32_to_bf16(a[j]));
			} else {
				/* E4M3 keeps 3 mantissa bits: relative error <= 2^-4 among normals; below
				 * 2^-6 x scale steps of 2^-9 x scale */
				float s = block_amax(a + mat * rows * cols, cols, rows,
						     (int64_t)in / cols, (int64_t)in % cols) / 448.0f;
				double tol = fmax(fabs(a[j]) * 0x1p-4, s * 0x1p-10) * (1 + 1e-5);

				if (fabs((double)b[j] - a[j]) > tol && !bad++)
					fprintf(stderr, "\n  %s[%zu]: %g, want %g +- %g\n", p->name, j,
						b[j], a[j], tol);
				if (a[j] != 0)
					worst = fmax(worst, fabs((double)b[j] - a[j]) / fabs(a[j]));
				continue;
			}
			if (bits(b[j]) != bits(want) && !bad++)
				fprintf(stderr, "\n  %s[%zu]: %g, want %g\n", p->name, j, b[j], want);
		}
	}
	CU_ASSERT_EQUAL(bad, 0);
	CU_ASSERT(n_fp8 >= 10);
	CU_ASSERT(worst > 0.01);  /* it is quantised, not kept in bf16 */
	model_free(m);
	model_free(m2);
}

static void expect_refused(const char *fp8, const char *w1, const char *w2)
{
	int rc = convert_from_hf(fp8, tmp_path("never.h5"), NULL, err, sizeof(err));

	CU_ASSERT_EQUAL(rc, -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, w1));
	if (w2)
		CU_ASSERT_PTR_NOT_NULL(strstr(err, w2));
	if (!strstr(err, w1) || (w2 && !strstr(err, w2)))
		fprintf(stderr, "\n  message: %s\n", err);
	CU_ASSERT_EQUAL(access(tmp_path("never.h5"), F_OK), -1);
}

static void test_fp8_refused(void)
{
	static const char *const q_attn = "model.layers.0.self_attn.q_b_proj.weight";
	static const char *const expert = "model.layers.1.mlp.experts.3.up_proj.weight";
	char src[400], fp8[400];
	struct run_config rc;
	struct damage d;
	struct moe_model *m;
	char *q;

	fp8_config(&rc, 36);
	m = source_dir(&rc, "bad", src, sizeof(src));
	model_free(m);
	snprintf(fp8, sizeof(fp8), "%s/fp8-bad", test_tmpdir());

	d = (struct damage){ .quant = fp8_quant, .drop_scale = expert };
	make_fp8_dirs(src, fp8, NULL, 16, 8, &d, 1);
	expect_refused(fp8, "tensor model.layers.1.mlp.experts.3.up_proj.weight is F8_E4M3",
		       "up_proj.weight_scale_inv");

	d = (struct damage){ .quant = fp8_quant, .short_scale = q_attn };
	make_fp8_dirs(src, fp8, NULL, 16, 8, &d, 1);
	expect_refused(fp8, "q_b_proj.weight_scale_inv has shape [1, 3]", "needs [2, 3]");

	d = (struct damage){ .quant = fp8_quant, .orphan_scale = "model.norm.weight" };
	make_fp8_dirs(src, fp8, NULL, 16, 8, &d, 1);
	expect_refused(fp8, "unexpected tensor model.norm.weight_scale_inv", NULL);

	d = (struct damage){ .quant = NULL };
	make_fp8_dirs(src, fp8, NULL, 16, 8, &d, 1);
	expect_refused(fp8, "is F8_E4M3, but config.json has no quantization_config", NULL);

	/* blocks of [128, 128] for scales made for [16, 8]: shapes disagree, not guessed */
	q = strdup(fp8_quant);
	memcpy(strstr(q, "[16, 8]"), "[8, 16]", 7);
	d = (struct damage){ .quant = q };
	make_fp8_dirs(src, fp8, NULL, 16, 8, &d, 1);
	expect_refused(fp8, "weight_scale_inv has shape", "in blocks of [8, 16]");
	free(q);

	d = (struct damage){ .quant = "{\"fmt\": \"e5m2\", \"quant_method\": \"fp8\", "
				      "\"weight_block_size\": [16, 8]}" };
	make_fp8_dirs(src, fp8, NULL, 16, 8, &d, 1);
	expect_refused(fp8, "model.quantization_config", "e4m3");

	d = (struct damage){ .quant = "{\"fmt\": \"e4m3\", \"quant_method\": \"fp8\", "
				      "\"weight_block_size\": [128]}" };
	make_fp8_dirs(src, fp8, NULL, 16, 8, &d, 1);
	expect_refused(fp8, "model.quantization_config", "weight_block_size");

	d = (struct damage){ .quant = "{\"quant_method\": \"gptq\", \"bits\": 4}" };
	make_fp8_dirs(src, fp8, NULL, 16, 8, &d, 1);
	expect_refused(fp8, "model.quantization_config", NULL);
}

/* A NaN in a weight cannot be given a block scale: --to-hf --dtype fp8 refuses it, leaving nothing. */
static void test_fp8_nonfinite(void)
{
	struct run_config rc;
	struct moe_model *m;
	struct ckpt_meta meta = { 0, 0 };
	const struct param *p;
	char dir[400];

	fp8_config(&rc, 36);
	m = saved_model(&rc, tmp_path("nan.h5"), 3);
	p = model_find_param(m, "model.layers.0.mlp.up_proj.weight");
	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	m->weights[p->offset + 5] = NAN;
	CU_ASSERT_EQUAL_FATAL(checkpoint_save_model(tmp_path("nan.h5"), m, &rc, &meta, err,
						    sizeof(err)), 0);
	snprintf(dir, sizeof(dir), "%s", tmp_path("nan-fp8"));
	rm_dir(dir);
	CU_ASSERT_EQUAL(convert_to_hf(tmp_path("nan.h5"), dir,
				      &(struct convert_to_hf_opts){ ST_F8_E4M3, 1ull << 30 }, NULL, err,
				      sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "model.layers.0.mlp.up_proj.weight"));
	CU_ASSERT_EQUAL(access(dir, F_OK), -1);
	model_free(m);
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "fp8 + block scales (partial edge blocks) = its dequantised weights, same logits",
		  test_fp8_import },
		{ "to-hf --dtype fp8: DeepSeek's layout; back within E4M3 precision", test_fp8_round_trip },
		{ "missing, misshapen, orphan scales and bad quantization_config refused",
		  test_fp8_refused },
		{ "a NaN weight is refused by --dtype fp8", test_fp8_nonfinite },
		{ NULL, NULL },
	};

	add_suite("convert_fp8", cases);
}
