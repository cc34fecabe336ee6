/*
 * tests/train/test_checkpoint.c - HDF5 checkpoints: bit-exact round trips, header and config, expert
 * slices, and every bad file (missing, not HDF5, truncated, corrupted data, mismatched model) refused with
 * a message that says what is wrong and without touching the model.  No hdf5.h here: the data of a
 * tensor is found in the file by searching for its bytes.
 */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"

#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "model/model.h"
#include "train/checkpoint.h"
#include "train/config.h"

static char err[1024];

static const char *tmp_path(const char *name)
{
	static char path[4][400];
	static int next;
	char *p = path[next++ & 3];

	snprintf(p, sizeof(path[0]), "%s/%s", test_tmpdir(), name);
	return p;
}

/* A small model: 2 layers (dense, then MoE with 4 experts), q_lora on. */
static void small_config(struct run_config *rc, int vocab, int hidden, int layers)
{
	struct model_config *m = &rc->model;

	config_defaults(rc);
	m->vocab_size = vocab;
	m->hidden_size = hidden;
	m->intermediate_size = 64;
	m->moe_intermediate_size = 16;
	m->num_hidden_layers = layers;
	m->num_attention_heads = 2;
	m->num_key_value_heads = 2;
	m->n_shared_experts = 1;
	m->n_routed_experts = 4;
	m->n_group = 2;
	m->topk_group = 1;
	m->num_experts_per_tok = 2;
	m->first_k_dense_replace = 1;
	m->kv_lora_rank = 16;
	m->q_lora_rank = 16;
	m->qk_rope_head_dim = 8;
	m->qk_nope_head_dim = 8;
	m->v_head_dim = 8;
}

static struct moe_model *make_model_slice(const struct run_config *rc, uint64_t seed, int begin,
					  int end)
{
	struct moe_model *m = model_create(&rc->model, begin, end, err, sizeof(err));

	if (!m)
		fprintf(stderr, "\n  model_create: %s\n", err);
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	model_init_weights(m, seed);
	return m;
}

static struct moe_model *make_model(const struct run_config *rc, uint64_t seed)
{
	return make_model_slice(rc, seed, 0, rc->model.n_routed_experts);
}

static int same_weights(const struct moe_model *a, const struct moe_model *b)
{
	return a->n_weights == b->n_weights &&
	       memcmp(a->weights, b->weights, a->n_weights * sizeof(float)) == 0;
}

static int save(const char *path, const struct moe_model *m, const struct run_config *rc,
		int64_t step)
{
	struct ckpt_meta meta = { .step = step, .tokens_seen = step * 1000 };
	int r = checkpoint_save_model(path, m, rc, &meta, err, sizeof(err));

	if (r)
		fprintf(stderr, "\n  save: %s\n", err);
	return r;
}

static unsigned char *slurp(const char *path, size_t *n)
{
	FILE *fp = fopen(path, "rb");
	unsigned char *buf = NULL;
	long len;

	CU_ASSERT_PTR_NOT_NULL_FATAL(fp);
	fseek(fp, 0, SEEK_END);
	len = ftell(fp);
	fseek(fp, 0, SEEK_SET);
	buf = malloc((size_t)len + 1);
	CU_ASSERT_PTR_NOT_NULL_FATAL(buf);
	CU_ASSERT_FATAL(fread(buf, 1, (size_t)len, fp) == (size_t)len);
	fclose(fp);
	*n = (size_t)len;
	return buf;
}

static void spit(const char *path, const void *data, size_t n)
{
	FILE *fp = fopen(path, "wb");

	CU_ASSERT_PTR_NOT_NULL_FATAL(fp);
	CU_ASSERT_FATAL(fwrite(data, 1, n, fp) == n);
	fclose(fp);
}

/* Load must fail with a message containing needle, leaving the model's weights as they were. */
static void expect_load_refused(const char *path, struct moe_model *m, const char *needle)
{
	float *before = malloc(m->n_weights * sizeof(float));

	CU_ASSERT_PTR_NOT_NULL_FATAL(before);
	memcpy(before, m->weights, m->n_weights * sizeof(float));
	err[0] = 0;
	CU_ASSERT_EQUAL(checkpoint_load_model(path, m, err, sizeof(err)), -1);
	if (!strstr(err, needle) || !strstr(err, path)) {
		fprintf(stderr, "\n  message \"%s\" lacks \"%s\" or the path\n", err, needle);
		CU_FAIL("message");
	}
	CU_ASSERT_EQUAL(memcmp(before, m->weights, m->n_weights * sizeof(float)), 0);
	free(before);
}

/* Count (and with unlink_them, delete) files in the scratch directory whose name starts with prefix. */
static int scan_files(const char *prefix, int unlink_them)
{
	DIR *d = opendir(test_tmpdir());
	struct dirent *e;
	int n = 0;

	CU_ASSERT_PTR_NOT_NULL_FATAL(d);
	while ((e = readdir(d))) {
		if (strncmp(e->d_name, prefix, strlen(prefix)))
			continue;
		n++;
		if (unlink_them)
			unlink(tmp_path(e->d_name));
	}
	closedir(d);
	return n;
}

static int count_files(const char *prefix)
{
	return scan_files(prefix, 0);
}

static void test_round_trip(void)
{
	const char *path = tmp_path("rt.h5");
	struct run_config rc;
	struct moe_model *a, *b;
	size_t n;
	unsigned char *bytes;

	small_config(&rc, 512, 32, 2);
	a = make_model(&rc, 1);
	b = make_model(&rc, 2);
	CU_ASSERT_FALSE(same_weights(a, b));
	CU_ASSERT_EQUAL_FATAL(save(path, a, &rc, 10), 0);
	CU_ASSERT_EQUAL(checkpoint_load_model(path, b, err, sizeof(err)), 0);
	CU_ASSERT_TRUE(same_weights(a, b));
	/* no temporary left behind; an HDF5 file by its signature */
	CU_ASSERT_EQUAL(count_files("rt.h5.tmp"), 0);
	bytes = slurp(path, &n);
	CU_ASSERT_EQUAL(memcmp(bytes, "\x89HDF\r\n\x1a\n", 8), 0);
	free(bytes);
	model_free(a);
	model_free(b);
}

static void test_overwrite(void)
{
	const char *path = tmp_path("over.h5");
	struct run_config rc;
	struct moe_model *a, *b, *c;

	small_config(&rc, 512, 32, 2);
	a = make_model(&rc, 1);
	b = make_model(&rc, 2);
	c = make_model(&rc, 3);
	CU_ASSERT_EQUAL_FATAL(save(path, a, &rc, 1), 0);
	CU_ASSERT_EQUAL_FATAL(save(path, b, &rc, 2), 0);
	CU_ASSERT_EQUAL(checkpoint_load_model(path, c, err, sizeof(err)), 0);
	CU_ASSERT_TRUE(same_weights(b, c));
	model_free(a);
	model_free(b);
	model_free(c);
}

static void test_header(void)
{
	const char *path = tmp_path("hdr.h5");
	struct run_config rc, back;
	struct ckpt_meta meta = { .step = 1234, .tokens_seen = 5678901234LL }, got;
	struct moe_model *a;
	char key[128];

	small_config(&rc, 384, 48, 3);
	rc.model.routed_scaling_factor = 1.75;
	rc.model.rms_norm_eps = 1e-5;
	rc.train.lr = 1.25e-3;
	rc.train.steps = 777;
	a = make_model(&rc, 4);
	CU_ASSERT_EQUAL_FATAL(checkpoint_save_model(path, a, &rc, &meta, err, sizeof(err)), 0);

	config_defaults(&back);
	CU_ASSERT_NOT_EQUAL(config_model_diff(&rc.model, &back.model, key, sizeof(key)), 0);
	memset(&got, 0, sizeof(got));
	if (checkpoint_read_header(path, &back, &got, err, sizeof(err)))
		fprintf(stderr, "\n  read_header: %s\n", err);
	CU_ASSERT_EQUAL(got.step, 1234);
	CU_ASSERT_EQUAL(got.tokens_seen, 5678901234LL);
	key[0] = 0;
	CU_ASSERT_EQUAL(config_model_diff(&rc.model, &back.model, key, sizeof(key)), 0);
	if (key[0])
		fprintf(stderr, "\n  config differs at %s\n", key);
	CU_ASSERT_EQUAL(back.train.steps, 777);
	CU_ASSERT_EQUAL(back.train.lr, 1.25e-3);

	/* either output may be skipped */
	CU_ASSERT_EQUAL(checkpoint_read_header(path, NULL, &got, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(checkpoint_read_header(path, &back, NULL, err, sizeof(err)), 0);
	model_free(a);
}

/* A rank holding experts [2, 4) reads exactly its slice of a full checkpoint. */
static void test_expert_slice(void)
{
	const char *path = tmp_path("slice.h5");
	struct run_config rc;
	struct moe_model *full, *part, *want;

	small_config(&rc, 512, 32, 2);
	full = make_model(&rc, 5);
	part = make_model_slice(&rc, 6, 2, 4);
	want = make_model_slice(&rc, 5, 2, 4);
	CU_ASSERT_EQUAL_FATAL(save(path, full, &rc, 1), 0);
	CU_ASSERT_FALSE(same_weights(part, want));
	CU_ASSERT_EQUAL(checkpoint_load_model(path, part, err, sizeof(err)), 0);
	CU_ASSERT_TRUE(same_weights(part, want));

	/* but a single-process save needs every expert */
	CU_ASSERT_EQUAL(checkpoint_save_model(tmp_path("slice2.h5"), part, &rc, NULL, err,
					      sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "holds experts [2, 4) of 4"));
	CU_ASSERT_EQUAL(count_files("slice2.h5"), 0);
	model_free(full);
	model_free(part);
	model_free(want);
}

static void test_missing_file(void)
{
	const char *path = tmp_path("no-such.h5");
	struct run_config rc;
	struct moe_model *m;

	small_config(&rc, 512, 32, 2);
	m = make_model(&rc, 1);
	expect_load_refused(path, m, "No such file or directory");
	CU_ASSERT_EQUAL(checkpoint_read_header(path, &rc, NULL, err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "No such file or directory"));
	model_free(m);
}

static void test_not_hdf5(void)
{
	const char *path = tmp_path("text.h5");
	struct run_config rc;
	struct moe_model *m;
	static const char text[] = "this is not an HDF5 file\n";

	small_config(&rc, 512, 32, 2);
	m = make_model(&rc, 1);
	spit(path, text, sizeof(text));
	expect_load_refused(path, m, "not a readable HDF5 file (truncated or corrupt?)");
	model_free(m);
}

static void test_save_to_missing_dir(void)
{
	const char *path = tmp_path("no-such-dir/x.h5");
	struct run_config rc;
	struct moe_model *m;

	small_config(&rc, 512, 32, 2);
	m = make_model(&rc, 1);
	CU_ASSERT_EQUAL(checkpoint_save_model(path, m, &rc, NULL, err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "HDF5 call H5Fcreate(...) failed at checkpoint.c:"));
	model_free(m);
}

static void test_truncated(void)
{
	const char *path = tmp_path("trunc-src.h5"), *cut = tmp_path("trunc.h5");
	struct run_config rc;
	struct moe_model *a, *b;
	unsigned char *bytes;
	size_t n;

	small_config(&rc, 512, 32, 2);
	a = make_model(&rc, 1);
	b = make_model(&rc, 2);
	CU_ASSERT_EQUAL_FATAL(save(path, a, &rc, 1), 0);
	bytes = slurp(path, &n);
	spit(cut, bytes, n / 2);
	expect_load_refused(cut, b, "not a readable HDF5 file (truncated or corrupt?)");
	/* other cut points: refused too, whatever the message */
	spit(cut, bytes, n - 1);
	expect_load_refused(cut, b, ": ");
	spit(cut, bytes, 1000);
	expect_load_refused(cut, b, ": ");
	spit(cut, bytes, 0);
	expect_load_refused(cut, b, "not a readable HDF5 file");
	free(bytes);
	model_free(a);
	model_free(b);
}

/* Offset in the file of the 64 bytes of p's data starting at element `at`, or -1. */
static long find_data(const unsigned char *file, size_t n, const struct moe_model *m,
		      const struct param *p, size_t at)
{
	const unsigned char *needle = (const unsigned char *)(m->weights + p->offset + at);
	const size_t len = 64;
	long found = -1;

	CU_ASSERT_FATAL(at + len / sizeof(float) <= p->numel);
	for (size_t i = 0; i + len <= n; i++) {
		if (file[i] == needle[0] && memcmp(file + i, needle, len) == 0) {
			CU_ASSERT_EQUAL(found, -1);	/* unique */
			found = (long)i;
		}
	}
	return found;
}

/* Flip one byte of p's stored data (element `at` + byte k) in a copy of file and expect refusal. */
static void flip_and_refuse(const unsigned char *file, size_t n, struct moe_model *a,
			    const char *name, size_t at, int k, struct moe_model *victim)
{
	const char *bad = tmp_path("flip.h5");
	const struct param *p = model_find_param(a, name);
	unsigned char *copy;
	char needle[160];
	long off;

	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	off = find_data(file, n, a, p, at);
	CU_ASSERT_FATAL(off >= 0);
	copy = malloc(n);
	CU_ASSERT_PTR_NOT_NULL_FATAL(copy);
	memcpy(copy, file, n);
	copy[off + k] ^= 0x01;
	spit(bad, copy, n);
	snprintf(needle, sizeof(needle), "/model/%s failed (checksum mismatch or read error)", name);
	expect_load_refused(bad, victim, needle);
	free(copy);
}

static void test_corrupt_data(void)
{
	char path[400];
	const char *lm = "lm_head.weight", *ex = "model.layers.1.mlp.experts.down_proj.weight";
	struct run_config rc;
	struct moe_model *a, *b;
	const struct param *p;
	unsigned char *bytes;
	size_t n;

	snprintf(path, sizeof(path), "%s", tmp_path("corrupt.h5"));
	/* a large last dataset (lm_head, 4096 x 32) */
	small_config(&rc, 4096, 32, 2);
	a = make_model(&rc, 1);
	b = make_model(&rc, 2);
	CU_ASSERT_EQUAL_FATAL(save(path, a, &rc, 1), 0);
	bytes = slurp(path, &n);
	p = model_find_param(a, lm);
	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	for (int i = 1; i <= 9; i += 2) {
		size_t at = p->numel / 10 * (size_t)i;

		flip_and_refuse(bytes, n, a, lm, at, (i * 7) % 64, b);
	}
	p = model_find_param(a, ex);
	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	flip_and_refuse(bytes, n, a, ex, p->numel / 2 + 5, 3, b);	/* inside expert 2 */
	flip_and_refuse(bytes, n, a, "model.embed_tokens.weight", 100, 1, b);
	/* the untouched file still loads */
	CU_ASSERT_EQUAL(checkpoint_load_model(path, b, err, sizeof(err)), 0);
	CU_ASSERT_TRUE(same_weights(a, b));
	free(bytes);
	model_free(a);
	model_free(b);
}

static void test_wrong_format(void)
{
	const char *path = tmp_path("fmt-src.h5"), *bad = tmp_path("fmt.h5");
	struct run_config rc;
	struct moe_model *a;
	unsigned char *bytes, *hit;
	size_t n;

	small_config(&rc, 512, 32, 2);
	a = make_model(&rc, 1);
	CU_ASSERT_EQUAL_FATAL(save(path, a, &rc, 1), 0);
	bytes = slurp(path, &n);
	hit = NULL;
	for (size_t i = 0; i + 14 <= n && !hit; i++)
		if (!memcmp(bytes + i, "moe-checkpoint", 14))
			hit = bytes + i;
	CU_ASSERT_PTR_NOT_NULL_FATAL(hit);
	hit[13] = 'X';
	spit(bad, bytes, n);
	expect_load_refused(bad, a, "not a moe checkpoint");
	free(bytes);
	model_free(a);
}

static void test_shape_mismatch(void)
{
	const char *path = tmp_path("shape.h5");
	struct run_config rc, rc2;
	struct moe_model *a, *b;

	small_config(&rc, 512, 32, 2);
	small_config(&rc2, 512, 48, 2);
	a = make_model(&rc, 1);
	b = make_model(&rc2, 2);
	CU_ASSERT_EQUAL_FATAL(save(path, a, &rc, 1), 0);
	expect_load_refused(path, b, "/model/model.embed_tokens.weight has shape [512, 32], "
			    "the model expects [512, 48]");
	model_free(a);
	model_free(b);
}

static void test_layer_mismatch(void)
{
	const char *p2 = tmp_path("layers2.h5"), *p3 = tmp_path("layers3.h5");
	struct run_config rc2, rc3;
	struct moe_model *m2, *m3;

	small_config(&rc2, 512, 32, 2);
	small_config(&rc3, 512, 32, 3);
	m2 = make_model(&rc2, 1);
	m3 = make_model(&rc3, 2);
	CU_ASSERT_EQUAL_FATAL(save(p2, m2, &rc2, 1), 0);
	CU_ASSERT_EQUAL_FATAL(save(p3, m3, &rc3, 1), 0);
	/* a file lacking a tensor */
	expect_load_refused(p2, m3, "missing dataset /model/model.layers.2.");
	/* a file with a tensor the model does not have */
	expect_load_refused(p3, m2, "/model/model.layers.2.");
	expect_load_refused(p3, m2, "is not a parameter of this model");
	model_free(m2);
	model_free(m3);
}

/* A stray temporary from a crashed writer does not affect the checkpoint it was replacing. */
static void test_stray_tmp(void)
{
	const char *path = tmp_path("crash.h5");
	char stray[600];
	struct run_config rc;
	struct moe_model *a, *b;

	small_config(&rc, 512, 32, 2);
	a = make_model(&rc, 1);
	b = make_model(&rc, 2);
	CU_ASSERT_EQUAL_FATAL(save(path, a, &rc, 1), 0);
	snprintf(stray, sizeof(stray), "%s.tmp.99999", path);
	spit(stray, "\x89HDF\r\n\x1a\n half-written", 21);
	CU_ASSERT_EQUAL(checkpoint_load_model(path, b, err, sizeof(err)), 0);
	CU_ASSERT_TRUE(same_weights(a, b));
	unlink(stray);
	model_free(a);
	model_free(b);
}

/* Kill a writer mid-save: PATH holds the old or the new checkpoint, whole, never a mixture. */
static void test_killed_writer(void)
{
	const char *path = tmp_path("killed.h5");
	struct run_config rc;
	struct moe_model *a, *b, *c;
	int outcomes[2] = { 0, 0 };

	small_config(&rc, 32768, 32, 2);	/* ~8 MiB file: a write takes a while */
	a = make_model(&rc, 1);
	b = make_model(&rc, 2);
	c = make_model(&rc, 3);
	CU_ASSERT_EQUAL_FATAL(save(path, a, &rc, 1), 0);
	for (int round = 0; round < 6; round++) {
		struct timespec ts = { 0, 1000000L * (1 + 4 * round) };
		int status;
		pid_t pid = fork();

		CU_ASSERT_FATAL(pid >= 0);
		if (pid == 0)
			_exit(save(path, round % 2 ? a : b, &rc, 2) ? 1 : 0);
		nanosleep(&ts, NULL);
		kill(pid, SIGKILL);
		waitpid(pid, &status, 0);
		CU_ASSERT_EQUAL(checkpoint_load_model(path, c, err, sizeof(err)), 0);
		if (same_weights(c, a))
			outcomes[0]++;
		else if (same_weights(c, b))
			outcomes[1]++;
		else
			CU_FAIL("checkpoint is neither the old nor the new one");
		/* and the next save still works over whatever was left */
		CU_ASSERT_EQUAL(save(path, a, &rc, 1), 0);
	}
	CU_ASSERT_EQUAL(outcomes[0] + outcomes[1], 6);
	scan_files("killed.h5.tmp.", 1);	/* the killed writers' leftovers */
	model_free(a);
	model_free(b);
	model_free(c);
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "save/load round trip is bit-exact", test_round_trip },
		{ "save over an existing checkpoint", test_overwrite },
		{ "header: step, tokens_seen, config", test_header },
		{ "expert slice read as a hyperslab", test_expert_slice },
		{ "missing file refused", test_missing_file },
		{ "non-HDF5 file refused", test_not_hdf5 },
		{ "save into a missing directory", test_save_to_missing_dir },
		{ "truncated file refused", test_truncated },
		{ "flipped data bytes refused (checksum)", test_corrupt_data },
		{ "wrong format attribute refused", test_wrong_format },
		{ "shape mismatch refused naming the dataset", test_shape_mismatch },
		{ "missing and extra datasets refused", test_layer_mismatch },
		{ "stray temporary leaves the checkpoint intact", test_stray_tmp },
		{ "killed writer leaves a whole checkpoint", test_killed_writer },
		{ NULL, NULL },
	};

	add_suite("checkpoint", cases);
}
