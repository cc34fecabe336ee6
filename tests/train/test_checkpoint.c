/*
 * tests/train/test_checkpoint.c - HDF5 checkpoints: bit-exact round trips, header and config, expert
 * slices, and every bad file (missing, not HDF5, truncated, corrupted data, mismatched model) refused
 * with a message that says what is wrong and without touching the model; training checkpoints (optimizer
 * moments and train state) round trip bit-exactly and load all or nothing; the checkpoint directory's
 * latest/prune; the streaming writer (pieces in any order, bad and missing pieces refused, nothing left
 * behind) and reader; a full disk (a file-size limit) at every point of a write.  No hdf5.h here: the
 * data of a tensor is found in the file by searching for its bytes.
 */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"

#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "model/model.h"
#include "train/checkpoint.h"
#include "train/config.h"

static char err[1024];

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
	test_small_moe(m);
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

static float *dup_floats(const float *x, size_t n)
{
	float *d = malloc((n ? n : 1) * sizeof(float));

	CU_ASSERT_PTR_NOT_NULL_FATAL(d);
	memcpy(d, x, n * sizeof(float));
	return d;
}

/*
 * Load must fail with a message containing needle and the path, leaving the model's weights (and opt and
 * st, when given) as they were.  Without opt and st this is checkpoint_load_model.
 */
static void expect_refused(const char *path, struct moe_model *m, struct adamw *opt,
			   struct train_state *st, const char *needle)
{
	float *w = dup_floats(m->weights, m->n_weights), *ea = NULL, *eq = NULL;
	struct train_state st_before;
	int64_t step_before = opt ? opt->step : 0;
	int r;

	if (st)
		st_before = *st;
	if (opt) {
		ea = dup_floats(opt->exp_avg, opt->n);
		eq = dup_floats(opt->exp_avg_sq, opt->n);
	}
	err[0] = 0;
	if (opt || st)
		r = checkpoint_load(path, m, opt, st, err, sizeof(err));
	else
		r = checkpoint_load_model(path, m, err, sizeof(err));
	CU_ASSERT_EQUAL(r, -1);
	if (!strstr(err, needle) || !strstr(err, path)) {
		fprintf(stderr, "\n  message \"%s\" lacks \"%s\" or the path\n", err, needle);
		CU_FAIL("message");
	}
	CU_ASSERT_EQUAL(memcmp(w, m->weights, m->n_weights * sizeof(float)), 0);
	if (opt) {
		CU_ASSERT_EQUAL(memcmp(ea, opt->exp_avg, opt->n * sizeof(float)), 0);
		CU_ASSERT_EQUAL(memcmp(eq, opt->exp_avg_sq, opt->n * sizeof(float)), 0);
		CU_ASSERT_EQUAL(opt->step, step_before);
	}
	if (st)
		CU_ASSERT_EQUAL(memcmp(&st_before, st, sizeof(*st)), 0);
	free(w);
	free(ea);
	free(eq);
}

static void expect_load_refused(const char *path, struct moe_model *m, const char *needle)
{
	expect_refused(path, m, NULL, NULL, needle);
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
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "HDF5 call H5Fcreate(...) failed at checkpoint_h5.c:"));
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

/* Offset in the file of 64 bytes of p's data in arena (weights or moment) from element `at`, or -1. */
static long find_data(const unsigned char *file, size_t n, const float *arena, const struct param *p,
		      size_t at)
{
	const unsigned char *needle = (const unsigned char *)(arena + p->offset + at);
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

/* A copy of file, flip.h5, with one byte of p's stored data in arena (element `at` + byte k) flipped. */
static const char *flip_copy(const unsigned char *file, size_t n, const float *arena,
			     const struct param *p, size_t at, int k)
{
	const char *bad = tmp_path("flip.h5");
	unsigned char *copy;
	long off;

	off = find_data(file, n, arena, p, at);
	CU_ASSERT_FATAL(off >= 0);
	copy = malloc(n);
	CU_ASSERT_PTR_NOT_NULL_FATAL(copy);
	memcpy(copy, file, n);
	copy[off + k] ^= 0x01;
	spit(bad, copy, n);
	free(copy);
	return bad;
}

/* Flip one byte of p's stored data (element `at` + byte k) in a copy of file and expect refusal. */
static void flip_and_refuse(const unsigned char *file, size_t n, struct moe_model *a,
			    const char *name, size_t at, int k, struct moe_model *victim)
{
	const struct param *p = model_find_param(a, name);
	const char *bad;
	char needle[160];

	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	bad = flip_copy(file, n, a->weights, p, at, k);
	snprintf(needle, sizeof(needle), "/model/%s failed (checksum mismatch or read error)", name);
	expect_load_refused(bad, victim, needle);
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

/*
 * HDF5 checksums its metadata (the file format of HDF5 1.10, which checkpoints use): a test that patches
 * an object header (an attribute's name or value) must then restore the header's checksum, which is Bob
 * Jenkins' lookup3 hashlittle (initval 0) over the header chunk up to the checksum itself.
 */
#define ROT32(x, k) (((x) << (k)) | ((x) >> (32 - (k))))

static uint32_t lookup3(const uint8_t *k, size_t len)
{
	uint32_t a, b, c;

	a = b = c = 0xdeadbeefu + (uint32_t)len;
	while (len > 12) {
		a += k[0] | (uint32_t)k[1] << 8 | (uint32_t)k[2] << 16 | (uint32_t)k[3] << 24;
		b += k[4] | (uint32_t)k[5] << 8 | (uint32_t)k[6] << 16 | (uint32_t)k[7] << 24;
		c += k[8] | (uint32_t)k[9] << 8 | (uint32_t)k[10] << 16 | (uint32_t)k[11] << 24;
		a -= c; a ^= ROT32(c, 4); c += b;
		b -= a; b ^= ROT32(a, 6); a += c;
		c -= b; c ^= ROT32(b, 8); b += a;
		a -= c; a ^= ROT32(c, 16); c += b;
		b -= a; b ^= ROT32(a, 19); a += c;
		c -= b; c ^= ROT32(b, 4); b += a;
		len -= 12;
		k += 12;
	}
	if (len == 0)
		return c;
	for (size_t i = len; i-- > 0;) {	/* the tail bytes, little-endian into a, b, c */
		uint32_t v = (uint32_t)k[i] << (8 * (i % 4));

		if (i < 4)
			a += v;
		else if (i < 8)
			b += v;
		else
			c += v;
	}
	c ^= b; c -= ROT32(b, 14);
	a ^= c; a -= ROT32(c, 11);
	b ^= a; b -= ROT32(a, 25);
	c ^= b; c -= ROT32(b, 16);
	a ^= c; a -= ROT32(c, 4);
	b ^= a; b -= ROT32(a, 14);
	c ^= b; c -= ROT32(b, 24);
	return c;
}

/*
 * The version-2 object header holding bytes[at] ("OHDR", version, flags, [times], [attribute phase
 * change], size of chunk 0, the messages, then the checksum): the offset of its checksum, or 0 when at is
 * not inside the first chunk of such a header.
 */
static size_t ohdr_checksum_at(const unsigned char *bytes, size_t n, size_t at)
{
	for (size_t o = at; o-- > 0;) {
		size_t p = o + 6, size = 0, width;
		unsigned flags;

		if (o + 6 > n || memcmp(bytes + o, "OHDR", 4) || bytes[o + 4] != 2)
			continue;
		flags = bytes[o + 5];
		p += (flags & 0x20) ? 16 : 0;
		p += (flags & 0x10) ? 4 : 0;
		width = (size_t)1 << (flags & 3);
		for (size_t i = 0; i < width && p + i < n; i++)
			size |= (size_t)bytes[p + i] << (8 * i);
		p += width + size;
		return at < p && p + 4 <= n ? p : 0;
	}
	return 0;
}

/* bytes[at] has been changed: give its object header the checksum of its new contents. */
static void fix_ohdr_checksum(unsigned char *bytes, size_t n, size_t at)
{
	size_t end = ohdr_checksum_at(bytes, n, at), start;
	uint32_t sum;

	CU_ASSERT_FATAL(end != 0);
	for (start = at; memcmp(bytes + start, "OHDR", 4); start--)
		;
	sum = lookup3(bytes + start, end - start);
	for (int i = 0; i < 4; i++)
		bytes[end + i] = (unsigned char)(sum >> (8 * i));
}

/* The checksum HDF5 wrote for the header holding bytes[at] is the one fix_ohdr_checksum computes. */
static void check_ohdr_checksum(const unsigned char *bytes, size_t n, size_t at)
{
	size_t end = ohdr_checksum_at(bytes, n, at), start;
	uint32_t stored = 0;

	CU_ASSERT_FATAL(end != 0);
	for (start = at; memcmp(bytes + start, "OHDR", 4); start--)
		;
	for (int i = 0; i < 4; i++)
		stored |= (uint32_t)bytes[end + i] << (8 * i);
	CU_ASSERT_EQUAL_FATAL(lookup3(bytes + start, end - start), stored);
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
	check_ohdr_checksum(bytes, n, (size_t)(hit - bytes));
	hit[13] = 'X';
	spit(bad, bytes, n);
	expect_load_refused(bad, a, "incorrect metadata checksum");	/* HDF5 sees the damage */
	fix_ohdr_checksum(bytes, n, (size_t)(hit - bytes));
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

/* ---- training checkpoints: optimizer state and train state ---- */

/*
 * Optimizer state for m filled with random moments (exp_avg_sq >= 0); a buffer's state is `buffer_fill`
 * (0 in a real run: it is not trained).
 */
static void make_optim(struct adamw *o, const struct moe_model *m, uint64_t seed, float buffer_fill)
{
	o->n = m->n_weights;
	o->exp_avg = malloc((o->n ? o->n : 1) * sizeof(float));
	o->exp_avg_sq = malloc((o->n ? o->n : 1) * sizeof(float));
	CU_ASSERT_PTR_NOT_NULL_FATAL(o->exp_avg);
	CU_ASSERT_PTR_NOT_NULL_FATAL(o->exp_avg_sq);
	test_rng_seed(seed);
	test_fill_randn(o->exp_avg, o->n, 0.01f);
	test_fill_randn(o->exp_avg_sq, o->n, 1e-4f);
	for (size_t i = 0; i < o->n; i++)
		o->exp_avg_sq[i] *= o->exp_avg_sq[i];
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];

		if (p->kind != PARAM_BUFFER)
			continue;
		for (size_t j = 0; j < p->numel; j++)
			o->exp_avg[p->offset + j] = o->exp_avg_sq[p->offset + j] = buffer_fill;
	}
	o->step = (int64_t)seed;
}

static void free_optim(struct adamw *o)
{
	free(o->exp_avg);
	free(o->exp_avg_sq);
}

static int same_optim(const struct adamw *a, const struct adamw *b)
{
	return a->n == b->n && a->step == b->step &&
	       memcmp(a->exp_avg, b->exp_avg, a->n * sizeof(float)) == 0 &&
	       memcmp(a->exp_avg_sq, b->exp_avg_sq, a->n * sizeof(float)) == 0;
}

static struct train_state sample_state(int64_t step)
{
	struct train_state st = {
		.step = step,
		.tokens_seen = 5678901234LL + step,
		.data_position = 0xFFFFFFFFFFFFFFF0ULL,	/* above INT64_MAX: stored unsigned */
		.data_seed = 0x9E3779B97F4A7C15ULL,
		.rng = { 1, 0xDEADBEEFCAFEBABEULL, UINT64_MAX, 42 },
		.elapsed_s = 3723.000123456789,
	};
	return st;
}

static int save_train(const char *path, const struct moe_model *m, const struct adamw *opt,
		      const struct run_config *rc, const struct train_state *st)
{
	int r = checkpoint_save(path, m, opt, rc, st, err, sizeof(err));

	if (r)
		fprintf(stderr, "\n  checkpoint_save: %s\n", err);
	return r;
}

static void test_train_round_trip(void)
{
	const char *path = tmp_path("train.h5");
	struct run_config rc;
	struct moe_model *a, *b, *c;
	struct adamw oa, ob;
	struct train_state sa = sample_state(1234), sb, zero;
	struct ckpt_meta meta;

	small_config(&rc, 512, 32, 2);
	a = make_model(&rc, 1);
	b = make_model(&rc, 2);
	c = make_model(&rc, 3);
	make_optim(&oa, a, 11, 0.0f);
	make_optim(&ob, b, 12, 1.0f);	/* buffers' state nonzero: the load zeroes it */
	oa.step = 1234;
	memset(&sb, 0x5a, sizeof(sb));
	CU_ASSERT_EQUAL_FATAL(save_train(path, a, &oa, &rc, &sa), 0);
	CU_ASSERT_EQUAL(count_files("train.h5.tmp"), 0);
	if (checkpoint_load(path, b, &ob, &sb, err, sizeof(err)))
		fprintf(stderr, "\n  checkpoint_load: %s\n", err);
	CU_ASSERT_TRUE(same_weights(a, b));
	CU_ASSERT_TRUE(same_optim(&oa, &ob));
	CU_ASSERT_EQUAL(memcmp(&sa, &sb, sizeof(sa)), 0);
	/* the root attributes mirror the state */
	CU_ASSERT_EQUAL(checkpoint_read_header(path, NULL, &meta, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(meta.step, 1234);
	CU_ASSERT_EQUAL(meta.tokens_seen, sa.tokens_seen);
	/* the weights alone, through either entry point */
	CU_ASSERT_EQUAL(checkpoint_load_model(path, c, err, sizeof(err)), 0);
	CU_ASSERT_TRUE(same_weights(a, c));
	model_init_weights(c, 3);
	CU_ASSERT_EQUAL(checkpoint_load(path, c, NULL, NULL, err, sizeof(err)), 0);
	CU_ASSERT_TRUE(same_weights(a, c));
	/* state without the optimizer, and the optimizer without the state */
	memset(&sb, 0, sizeof(sb));
	CU_ASSERT_EQUAL(checkpoint_load(path, c, NULL, &sb, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(memcmp(&sa, &sb, sizeof(sa)), 0);
	free_optim(&ob);
	make_optim(&ob, b, 13, 0.0f);
	CU_ASSERT_EQUAL(checkpoint_load(path, b, &ob, NULL, err, sizeof(err)), 0);
	CU_ASSERT_TRUE(same_optim(&oa, &ob));
	/* a file saved without optimizer and state: no /state to resume either */
	memset(&zero, 0, sizeof(zero));
	CU_ASSERT_EQUAL_FATAL(save_train(path, a, NULL, &rc, NULL), 0);
	CU_ASSERT_EQUAL(checkpoint_read_header(path, NULL, &meta, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(meta.step, 0);
	expect_refused(path, b, NULL, &sb, "missing group /state");
	free_optim(&oa);
	free_optim(&ob);
	model_free(a);
	model_free(b);
	model_free(c);
}

/* A rank holding experts [2, 4) reads its slice of the moments too. */
static void test_train_expert_slice(void)
{
	const char *path = tmp_path("train-slice.h5");
	struct run_config rc;
	struct moe_model *full, *part;
	struct adamw of, op;
	struct train_state st = sample_state(7), got;

	small_config(&rc, 512, 32, 2);
	full = make_model(&rc, 5);
	part = make_model_slice(&rc, 6, 2, 4);
	make_optim(&of, full, 21, 0.0f);
	make_optim(&op, part, 22, 0.0f);
	CU_ASSERT_EQUAL_FATAL(save_train(path, full, &of, &rc, &st), 0);
	CU_ASSERT_EQUAL_FATAL(checkpoint_load(path, part, &op, &got, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(op.step, of.step);
	for (int i = 0; i < part->n_params; i++) {
		const struct param *p = &part->params[i], *q = model_find_param(full, p->name);
		size_t from;

		CU_ASSERT_PTR_NOT_NULL_FATAL(q);
		from = q->offset + (p->expert_stacked ? 2 * (q->numel / (size_t)q->shape[0]) : 0);
		CU_ASSERT_EQUAL(memcmp(op.exp_avg + p->offset, of.exp_avg + from,
				       p->numel * sizeof(float)), 0);
		CU_ASSERT_EQUAL(memcmp(op.exp_avg_sq + p->offset, of.exp_avg_sq + from,
				       p->numel * sizeof(float)), 0);
	}
	free_optim(&of);
	free_optim(&op);
	model_free(full);
	model_free(part);
}

static void test_weights_only_not_resumable(void)
{
	const char *path = tmp_path("weights-only.h5"), *nostate = tmp_path("no-optim.h5");
	struct run_config rc;
	struct moe_model *a, *b;
	struct adamw oa, ob;
	struct train_state sa = sample_state(3), sb = sample_state(99);
	static const char msg[] = ": no optimizer state (/optim): a weights-only checkpoint cannot be "
				  "resumed; use train.init_checkpoint";

	small_config(&rc, 512, 32, 2);
	a = make_model(&rc, 1);
	b = make_model(&rc, 2);
	make_optim(&oa, a, 31, 0.0f);
	make_optim(&ob, b, 32, 0.0f);
	CU_ASSERT_EQUAL_FATAL(save(path, a, &rc, 5), 0);
	expect_refused(path, b, &ob, &sb, msg);
	expect_refused(path, b, &ob, NULL, msg);
	/* with st alone: the same file has no /state */
	expect_refused(path, b, NULL, &sb, "missing group /state");
	/* checkpoint_save without an optimizer: the same refusal, though /state is there */
	CU_ASSERT_EQUAL_FATAL(save_train(nostate, a, NULL, &rc, &sa), 0);
	expect_refused(nostate, b, &ob, &sb, msg);
	CU_ASSERT_EQUAL(checkpoint_load(nostate, b, NULL, &sb, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(memcmp(&sa, &sb, sizeof(sa)), 0);
	/* an optimizer of the wrong size is refused before the file is read */
	ob.n--;
	expect_refused(nostate, b, &ob, NULL, "internal error: the optimizer state holds");
	ob.n++;
	free_optim(&oa);
	free_optim(&ob);
	model_free(a);
	model_free(b);
}

/* A /state attribute renamed in the file (its name's bytes patched): refused, naming it. */
static void test_state_attr_missing(void)
{
	const char *path = tmp_path("state-src.h5"), *bad = tmp_path("state.h5");
	static const char attr[] = "data_position";
	struct run_config rc;
	struct moe_model *a, *b;
	struct adamw oa, ob;
	struct train_state sa = sample_state(3), sb = sample_state(4);
	unsigned char *bytes, *hit = NULL;
	size_t n;

	small_config(&rc, 512, 32, 2);
	a = make_model(&rc, 1);
	b = make_model(&rc, 2);
	make_optim(&oa, a, 41, 0.0f);
	make_optim(&ob, b, 42, 0.0f);
	CU_ASSERT_EQUAL_FATAL(save_train(path, a, &oa, &rc, &sa), 0);
	bytes = slurp(path, &n);
	for (size_t i = 0; i + sizeof(attr) - 1 <= n; i++) {
		if (!memcmp(bytes + i, attr, sizeof(attr) - 1)) {
			CU_ASSERT_PTR_NULL(hit);	/* unique */
			hit = bytes + i;
		}
	}
	CU_ASSERT_PTR_NOT_NULL_FATAL(hit);
	check_ohdr_checksum(bytes, n, (size_t)(hit - bytes));
	hit[6] = 'X';	/* data_pXsition */
	fix_ohdr_checksum(bytes, n, (size_t)(hit - bytes));
	spit(bad, bytes, n);
	expect_refused(bad, b, &ob, &sb, "/state attribute 'data_position' is missing");
	/* without st the state is not needed */
	CU_ASSERT_EQUAL(checkpoint_load(bad, b, &ob, NULL, err, sizeof(err)), 0);
	CU_ASSERT_TRUE(same_optim(&oa, &ob));
	free(bytes);
	free_optim(&oa);
	free_optim(&ob);
	model_free(a);
	model_free(b);
}

static void test_corrupt_optim(void)
{
	char path[400], needle[200];
	const char *lm = "lm_head.weight", *ex = "model.layers.1.mlp.experts.up_proj.weight", *bad;
	struct run_config rc;
	struct moe_model *a, *b;
	struct adamw oa, ob;
	struct train_state sa = sample_state(8), sb = sample_state(9);
	const struct param *p;
	unsigned char *bytes;
	size_t n;

	snprintf(path, sizeof(path), "%s", tmp_path("corrupt-optim.h5"));
	small_config(&rc, 4096, 32, 2);
	a = make_model(&rc, 1);
	b = make_model(&rc, 2);
	make_optim(&oa, a, 51, 0.0f);
	make_optim(&ob, b, 52, 0.0f);
	CU_ASSERT_EQUAL_FATAL(save_train(path, a, &oa, &rc, &sa), 0);
	bytes = slurp(path, &n);

	p = model_find_param(a, lm);
	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	bad = flip_copy(bytes, n, oa.exp_avg, p, p->numel / 3, 5);
	snprintf(needle, sizeof(needle), "/optim/%s/exp_avg failed (checksum mismatch or read error)",
		 lm);
	expect_refused(bad, b, &ob, &sb, needle);
	/* the weights are intact, and a weights-only load does not read /optim */
	CU_ASSERT_EQUAL(checkpoint_load_model(bad, b, err, sizeof(err)), 0);
	CU_ASSERT_TRUE(same_weights(a, b));
	model_init_weights(b, 2);

	p = model_find_param(a, ex);
	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	bad = flip_copy(bytes, n, oa.exp_avg_sq, p, p->numel * 3 / 4 + 1, 2);	/* expert 3 */
	snprintf(needle, sizeof(needle),
		 "/optim/%s/exp_avg_sq failed (checksum mismatch or read error)", ex);
	expect_refused(bad, b, &ob, &sb, needle);

	/* the untouched file still loads */
	CU_ASSERT_EQUAL(checkpoint_load(path, b, &ob, &sb, err, sizeof(err)), 0);
	CU_ASSERT_TRUE(same_weights(a, b));
	CU_ASSERT_TRUE(same_optim(&oa, &ob));
	CU_ASSERT_EQUAL(memcmp(&sa, &sb, sizeof(sa)), 0);
	free(bytes);
	free_optim(&oa);
	free_optim(&ob);
	model_free(a);
	model_free(b);
}

/* ---- the checkpoint directory ---- */

static int exists_in(const char *dir, const char *name)
{
	char path[600];

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	return access(path, F_OK) == 0;
}

static void touch_in(const char *dir, const char *name)
{
	char path[600];

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	spit(path, "x", 1);
}

static void test_latest_prune(void)
{
	char dir[400], path[600], want[600];
	static const char *const others[] = {
		"step_00000099.h5.old", "step_123.h5", "step_000000077.h5", "notes.txt",
		"step_00000088.h5.tmp.", "step_00000050.h5.tmp.12x",
	};
	static const int64_t steps[] = { 20, 5, 10 };
	struct run_config rc;
	struct moe_model *a;
	struct adamw oa;
	struct ckpt_meta meta;

	snprintf(dir, sizeof(dir), "%s", tmp_path("run-ckpts"));
	checkpoint_path(path, sizeof(path), "some/dir", 42);
	CU_ASSERT_STRING_EQUAL(path, "some/dir/step_00000042.h5");

	/* none yet: a missing directory, then an empty one */
	CU_ASSERT_EQUAL(checkpoint_latest(dir, path, sizeof(path), err, sizeof(err)), 1);
	CU_ASSERT_EQUAL(checkpoint_prune(dir, 2, INT64_MAX, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(mkdir(dir, 0755), 0);
	CU_ASSERT_EQUAL(checkpoint_latest(dir, path, sizeof(path), err, sizeof(err)), 1);

	small_config(&rc, 512, 32, 2);
	a = make_model(&rc, 1);
	make_optim(&oa, a, 61, 0.0f);
	for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
		struct train_state st = sample_state(steps[i]);

		checkpoint_path(path, sizeof(path), dir, steps[i]);
		CU_ASSERT_EQUAL_FATAL(save_train(path, a, &oa, &rc, &st), 0);
	}
	touch_in(dir, "step_00000030.h5.tmp.123");	/* an interrupted write of step 30 */
	for (size_t i = 0; i < sizeof(others) / sizeof(others[0]); i++)
		touch_in(dir, others[i]);

	snprintf(want, sizeof(want), "%s/step_00000020.h5", dir);
	CU_ASSERT_EQUAL(checkpoint_latest(dir, path, sizeof(path), err, sizeof(err)), 0);
	CU_ASSERT_STRING_EQUAL(path, want);
	CU_ASSERT_EQUAL(checkpoint_read_header(path, NULL, &meta, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(meta.step, 20);
	/* too small a buffer is an error, not a truncated path */
	CU_ASSERT_EQUAL(checkpoint_latest(dir, path, 10, err, sizeof(err)), -1);

	CU_ASSERT_EQUAL(checkpoint_prune(dir, 0, INT64_MAX, err, sizeof(err)), -1);
	CU_ASSERT_TRUE(exists_in(dir, "step_00000005.h5"));
	CU_ASSERT_EQUAL(checkpoint_prune(dir, 2, INT64_MAX, err, sizeof(err)), 0);
	CU_ASSERT_FALSE(exists_in(dir, "step_00000005.h5"));
	CU_ASSERT_TRUE(exists_in(dir, "step_00000010.h5"));
	CU_ASSERT_TRUE(exists_in(dir, "step_00000020.h5"));
	CU_ASSERT_FALSE(exists_in(dir, "step_00000030.h5.tmp.123"));
	for (size_t i = 0; i < sizeof(others) / sizeof(others[0]); i++)
		CU_ASSERT_TRUE(exists_in(dir, others[i]));
	CU_ASSERT_EQUAL(checkpoint_latest(dir, path, sizeof(path), err, sizeof(err)), 0);
	CU_ASSERT_STRING_EQUAL(path, want);
	/* pruning again changes nothing */
	CU_ASSERT_EQUAL(checkpoint_prune(dir, 2, INT64_MAX, err, sizeof(err)), 0);
	CU_ASSERT_TRUE(exists_in(dir, "step_00000010.h5"));
	/* a run at step 12 (resumed from 10 past a damaged 20): 20 neither counted nor deleted */
	CU_ASSERT_EQUAL(checkpoint_prune(dir, 1, 12, err, sizeof(err)), 0);
	CU_ASSERT_TRUE(exists_in(dir, "step_00000010.h5"));
	CU_ASSERT_TRUE(exists_in(dir, "step_00000020.h5"));

	/* only temporaries and other files left: none */
	snprintf(path, sizeof(path), "%s/step_00000010.h5", dir);
	unlink(path);
	unlink(want);
	touch_in(dir, "step_00000040.h5.tmp.77");
	CU_ASSERT_EQUAL(checkpoint_latest(dir, path, sizeof(path), err, sizeof(err)), 1);
	free_optim(&oa);
	model_free(a);
}

/* ---- streaming writer and reader ---- */

/* Piece `expert` of p (or all of it for -1) in m, with its shape. */
static const float *piece_of(const struct moe_model *m, const struct param *p, int expert,
			     int64_t *shape, int *ndim)
{
	const struct param *q = model_find_param(m, p->name);
	size_t per = q->numel / (p->expert_stacked ? (size_t)p->shape[0] : 1);

	*ndim = expert >= 0 ? p->ndim - 1 : p->ndim;
	memcpy(shape, expert >= 0 ? p->shape + 1 : p->shape, sizeof(int64_t) * *ndim);
	return m->weights + q->offset + (expert >= 0 ? (size_t)expert * per : 0);
}

static int put_piece(struct ckpt_writer *w, const struct moe_model *m, const struct param *p,
		     int expert)
{
	int64_t shape[MOE_MAX_DIMS];
	int ndim;
	const float *x = piece_of(m, p, expert, shape, &ndim);
	int r = ckpt_writer_put(w, p->name, shape, ndim, expert, x, err, sizeof(err));

	if (r)
		fprintf(stderr, "\n  put %s[%d]: %s\n", p->name, expert, err);
	return r;
}

/*
 * Every tensor of m through the streaming writer, in reverse order, the experts of each stacked tensor
 * backwards (but the first stacked tensor whole), skipping expert `skip` of the last stacked tensor
 * (none when skip < 0).  Returns the writer, still open.
 */
static struct ckpt_writer *stream_model(const char *path, const struct moe_model *m,
					const struct run_config *rc, int skip)
{
	struct ckpt_meta meta = { .step = 3, .tokens_seen = 300 };
	struct ckpt_writer *w = ckpt_writer_open(path, rc, &meta, err, sizeof(err));
	int whole_done = 0, n;
	struct param *params = ckpt_model_params(&rc->model, &n, err, sizeof(err));

	CU_ASSERT_PTR_NOT_NULL_FATAL(w);
	CU_ASSERT_PTR_NOT_NULL_FATAL(params);
	CU_ASSERT_EQUAL(n, m->n_params);
	for (int i = n - 1; i >= 0; i--) {
		const struct param *p = &params[i];

		if (!p->expert_stacked) {
			CU_ASSERT_EQUAL(put_piece(w, m, p, -1), 0);
			continue;
		}
		if (!whole_done && skip < 0) {
			whole_done = 1;
			CU_ASSERT_EQUAL(put_piece(w, m, p, -1), 0);
			continue;
		}
		for (int e = (int)p->shape[0] - 1; e >= 0; e--)
			if (e != skip)
				CU_ASSERT_EQUAL(put_piece(w, m, p, e), 0);
		skip = -1;
	}
	free(params);
	return w;
}

/* Streamed piece by piece, the file loads like checkpoint_save_model's, bit for bit. */
static void test_stream_writer(void)
{
	const char *path = tmp_path("stream.h5");
	struct run_config rc, back;
	struct ckpt_meta meta;
	struct moe_model *a, *b;
	struct ckpt_writer *w;
	char key[128];

	small_config(&rc, 512, 32, 3);
	a = make_model(&rc, 21);
	b = make_model(&rc, 22);
	w = stream_model(path, a, &rc, -1);
	CU_ASSERT_EQUAL(count_files("stream.h5"), 1);	/* only the temporary */
	CU_ASSERT_EQUAL(access(path, F_OK), -1);
	CU_ASSERT_EQUAL_FATAL(ckpt_writer_close(w, 1, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(count_files("stream.h5.tmp"), 0);
	CU_ASSERT_EQUAL(checkpoint_load_model(path, b, err, sizeof(err)), 0);
	CU_ASSERT_TRUE(same_weights(a, b));
	config_defaults(&back);
	CU_ASSERT_EQUAL(checkpoint_read_header(path, &back, &meta, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(config_model_diff(&rc.model, &back.model, key, sizeof(key)), 0);
	CU_ASSERT_EQUAL(meta.step, 3);
	CU_ASSERT_EQUAL(meta.tokens_seen, 300);
	model_free(a);
	model_free(b);
}

static void expect_put_refused(struct ckpt_writer *w, const char *name, const int64_t *shape,
			       int ndim, int expert, const float *x, const char *needle)
{
	CU_ASSERT_EQUAL(ckpt_writer_put(w, name, shape, ndim, expert, x, err, sizeof(err)), -1);
	if (!strstr(err, needle) || !strstr(err, "refuse.h5")) {
		fprintf(stderr, "\n  message \"%s\" lacks \"%s\" or the path\n", err, needle);
		CU_FAIL("message");
	}
}

/* Bad pieces are refused naming the file and tensor; an incomplete file is never committed. */
static void test_stream_writer_refuses(void)
{
	const char *path = tmp_path("refuse.h5");
	const char *up = "model.layers.1.mlp.experts.up_proj.weight";
	const int64_t slice[2] = { 16, 32 }, wrong[2] = { 16, 31 }, norm[1] = { 32 };
	struct run_config rc;
	struct moe_model *a;
	struct ckpt_writer *w;
	float x[16 * 32] = { 0 };

	small_config(&rc, 512, 32, 2);
	a = make_model(&rc, 23);
	w = ckpt_writer_open(path, &rc, NULL, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(w);
	expect_put_refused(w, "model.layers.9.mlp.gate.weight", slice, 2, -1, x,
			   "model.layers.9.mlp.gate.weight is not a parameter");
	expect_put_refused(w, up, wrong, 2, 1, x, "has shape [16, 31], the model expects [16, 32]");
	expect_put_refused(w, up, slice, 2, 4, x, "expert 4, but the model has 4");
	expect_put_refused(w, "model.norm.weight", norm, 1, 0, x, "not stacked by expert");
	CU_ASSERT_EQUAL(ckpt_writer_put(w, up, slice, 2, 1, x, err, sizeof(err)), 0);
	expect_put_refused(w, up, slice, 2, 1, x, "expert 1 written twice");
	CU_ASSERT_EQUAL(ckpt_writer_close(w, 1, err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "incomplete"));
	CU_ASSERT_EQUAL(count_files("refuse.h5"), 0);

	/* all but one expert: refused naming it, nothing left behind */
	w = stream_model(path, a, &rc, 2);
	CU_ASSERT_EQUAL(ckpt_writer_close(w, 1, err, sizeof(err)), -1);
	if (!strstr(err, "/model/model.layers.1.mlp.experts.down_proj.weight, expert 2 of 4, was "
		    "never written"))
		fprintf(stderr, "\n  message: %s\n", err);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "/model/model.layers.1.mlp.experts.down_proj.weight, "
				      "expert 2 of 4, was never written"));
	CU_ASSERT_EQUAL(count_files("refuse.h5"), 0);

	/* abandoned on purpose: nothing left either, and an existing file stays */
	CU_ASSERT_EQUAL_FATAL(save(path, a, &rc, 1), 0);
	w = stream_model(path, a, &rc, -1);
	CU_ASSERT_EQUAL(ckpt_writer_close(w, 0, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(count_files("refuse.h5"), 1);
	CU_ASSERT_EQUAL(checkpoint_load_model(path, a, err, sizeof(err)), 0);

	/* a writer into a missing directory fails at once */
	CU_ASSERT_PTR_NULL(ckpt_writer_open(tmp_path("no/such/dir/x.h5"), &rc, NULL, err,
					    sizeof(err)));
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "no/such/dir/x.h5"));
	model_free(a);
}

/* The reader gives every piece of a saved model bit for bit, and refuses what is not there. */
static void test_stream_reader(void)
{
	const char *path = tmp_path("reader.h5");
	struct run_config rc, back;
	struct moe_model *a;
	struct ckpt_reader *r;
	const struct param *params;
	float *buf;
	int n, bad = 0;
	char key[128];

	small_config(&rc, 512, 32, 3);
	a = make_model(&rc, 24);
	CU_ASSERT_EQUAL_FATAL(save(path, a, &rc, 9), 0);
	config_defaults(&back);
	r = ckpt_reader_open(path, &back, NULL, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(r);
	CU_ASSERT_EQUAL(config_model_diff(&rc.model, &back.model, key, sizeof(key)), 0);
	params = ckpt_reader_params(r, &n);
	CU_ASSERT_EQUAL_FATAL(n, a->n_params);
	buf = malloc(sizeof(float) * a->n_weights);
	CU_ASSERT_PTR_NOT_NULL_FATAL(buf);
	for (int i = 0; i < n; i++) {
		const struct param *p = &params[i];
		/* every expert of a stacked tensor, else the whole tensor (-1) */
		int first = p->expert_stacked ? 0 : -1, end = p->expert_stacked ? (int)p->shape[0] : 0;

		for (int e = first; e < end; e++) {
			int64_t shape[MOE_MAX_DIMS];
			int nd;
			const float *want = piece_of(a, p, e, shape, &nd);
			size_t numel = 1;

			for (int d = 0; d < nd; d++)
				numel *= (size_t)shape[d];
			CU_ASSERT_EQUAL(ckpt_reader_get(r, p->name, e, buf, err, sizeof(err)), 0);
			bad += memcmp(buf, want, numel * sizeof(float)) != 0;
		}
	}
	CU_ASSERT_EQUAL(bad, 0);
	CU_ASSERT_EQUAL(ckpt_reader_get(r, "model.layers.1.mlp.experts.up_proj.weight", 4, buf, err,
					sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "expert 4"));
	CU_ASSERT_EQUAL(ckpt_reader_get(r, "lm_head.bias", -1, buf, err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "lm_head.bias is not a parameter"));
	ckpt_reader_close(r);
	/* without a config to start from: the defaults, overridden by the file's */
	r = ckpt_reader_open(path, NULL, NULL, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL(r);
	ckpt_reader_close(r);
	CU_ASSERT_PTR_NULL(ckpt_reader_open(tmp_path("absent.h5"), NULL, NULL, err, sizeof(err)));
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "absent.h5"));
	free(buf);
	model_free(a);
}

/* ---- a full disk: writes that fail with EFBIG under a file-size limit (RLIMIT_FSIZE) ---- */

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	if (!d)
		return -1;
	while ((e = readdir(d)))
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

/* Every piece of m, whole tensors in order, through the streaming writer; its result. */
static int stream_all(const char *path, const struct moe_model *m, const struct run_config *rc)
{
	struct ckpt_writer *w = ckpt_writer_open(path, rc, NULL, err, sizeof(err));
	int n, r = 0;
	struct param *params = ckpt_model_params(&rc->model, &n, err, sizeof(err));

	if (!w || !params) {
		free(params);
		ckpt_writer_close(w, 0, err, sizeof(err));
		return -1;
	}
	for (int i = 0; i < n && !r; i++) {
		int64_t shape[MOE_MAX_DIMS];
		int ndim;
		const float *x = piece_of(m, &params[i], -1, shape, &ndim);

		r = ckpt_writer_put(w, params[i].name, shape, ndim, -1, x, err, sizeof(err));
	}
	free(params);
	if (r) {
		char keep[sizeof(err)];

		snprintf(keep, sizeof(keep), "%s", err);	/* the put's message, not the close's */
		ckpt_writer_close(w, 1, err, sizeof(err));
		snprintf(err, sizeof(err), "%s", keep);
		return -1;
	}
	return ckpt_writer_close(w, 1, err, sizeof(err));
}

enum { LIMIT_SAVE, LIMIT_STREAM };

/*
 * In a child process, with files limited to `limit` bytes: saving over path (which holds old[n_old])
 * fails with "File too large" naming path, leaves no temporary file and no descriptor open, and path as
 * it was; with the limit lifted the library still saves.  Exit status: 0, or the first check failed.
 */
static int limited_save(const char *path, const char *prefix, rlim_t limit, int how,
			const struct moe_model *m, const struct adamw *opt, const struct run_config *rc,
			const unsigned char *old, size_t n_old)
{
	struct train_state st = sample_state(7);
	struct rlimit rl, lifted;
	unsigned char *now;
	size_t n_now;
	FILE *fp;
	int fds = count_fds(), r;

	signal(SIGXFSZ, SIG_IGN);	/* the write fails with EFBIG instead of the process dying */
	getrlimit(RLIMIT_FSIZE, &lifted);
	rl = lifted;
	rl.rlim_cur = limit;
	if (setrlimit(RLIMIT_FSIZE, &rl))
		return 10;
	r = how == LIMIT_SAVE ? checkpoint_save(path, m, opt, rc, &st, err, sizeof(err)) :
				stream_all(path, m, rc);
	if (r != -1)
		return 11;
	if (!strstr(err, "File too large") || !strstr(err, path)) {
		fprintf(stderr, "\n  limit %llu: message \"%s\"\n", (unsigned long long)limit, err);
		return 12;
	}
	if (count_files(prefix) != 1)	/* path alone: no PATH.tmp.<pid> left */
		return 13;
	if (count_fds() != fds)
		return 14;
	if (setrlimit(RLIMIT_FSIZE, &lifted))
		return 15;
	fp = fopen(path, "rb");
	if (!fp)
		return 16;
	now = malloc(n_old + 1);
	n_now = now ? fread(now, 1, n_old + 1, fp) : 0;
	fclose(fp);
	if (n_now != n_old || memcmp(now, old, n_old))
		return 17;
	free(now);
	if (checkpoint_save(tmp_path("limit-after.h5"), m, opt, rc, &st, err, sizeof(err)) ||
	    unlink(tmp_path("limit-after.h5")))
		return 18;
	return 0;
}

/*
 * A full disk at every point of a write (the limit swept from a few bytes to just under the file's size:
 * the file's creation, a dataset's close, the file's close that flushes), for the training writer and
 * the streaming one.  A file id left open used to crash the process in HDF5's exit handler (SIGSEGV):
 * each save runs in a child whose exit status is checked.
 */
static void test_file_size_limit(void)
{
	const char *path = tmp_path("limit.h5");
	struct train_state st = sample_state(3);
	struct run_config rc;
	struct moe_model *m;
	struct adamw opt;
	unsigned char *old;
	size_t n_old, n_stream;
	int cases = 0;

	small_config(&rc, 512, 32, 2);
	m = make_model(&rc, 5);
	make_optim(&opt, m, 6, 0.0f);
	CU_ASSERT_EQUAL_FATAL(save_train(path, m, &opt, &rc, &st), 0);
	CU_ASSERT_EQUAL_FATAL(stream_all(tmp_path("limit-stream.h5"), m, &rc), 0);
	old = slurp(tmp_path("limit-stream.h5"), &n_stream);
	free(old);
	unlink(tmp_path("limit-stream.h5"));
	old = slurp(path, &n_old);
	for (int how = LIMIT_SAVE; how <= LIMIT_STREAM; how++) {
		const size_t size = how == LIMIT_SAVE ? n_old : n_stream;	/* what it writes */
		const rlim_t limits[] = { 1, 600, 4096, size / 8, size / 3, size / 2, size - size / 8,
					  size - 20000, size - 8192, size - 4096, size - 2048,
					  size - 1024, size - 512 };

		for (size_t k = 0; k < sizeof(limits) / sizeof(limits[0]); k++) {
			int status;
			pid_t pid;

			fflush(NULL);
			pid = fork();
			CU_ASSERT_FATAL(pid >= 0);
			if (pid == 0)	/* exit, not _exit: the exit handlers (HDF5's) run */
				exit(limited_save(path, "limit.h5", limits[k], how, m, &opt, &rc, old,
						  n_old));
			CU_ASSERT_EQUAL(waitpid(pid, &status, 0), pid);
			if (!WIFEXITED(status) || WEXITSTATUS(status)) {
				fprintf(stderr, "\n  %s, limit %llu bytes: %s %d\n",
					how == LIMIT_SAVE ? "checkpoint_save" : "streaming writer",
					(unsigned long long)limits[k],
					WIFEXITED(status) ? "check failed:" : "killed by signal",
					WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
				CU_FAIL("a write under a file-size limit");
			}
			cases++;
		}
	}
	CU_ASSERT_EQUAL(cases, 26);
	CU_ASSERT_EQUAL(count_files("limit.h5"), 1);
	free(old);
	free_optim(&opt);
	model_free(m);
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
		{ "training checkpoint round trip is bit-exact", test_train_round_trip },
		{ "moments read as an expert slice", test_train_expert_slice },
		{ "weights-only file cannot be resumed", test_weights_only_not_resumable },
		{ "missing /state attribute refused naming it", test_state_attr_missing },
		{ "flipped optimizer bytes refused (checksum)", test_corrupt_optim },
		{ "latest and prune in the checkpoint directory", test_latest_prune },
		{ "streaming writer: pieces in any order load bit-exactly", test_stream_writer },
		{ "streaming writer: bad or missing pieces refused", test_stream_writer_refuses },
		{ "streaming reader: every piece bit-exact", test_stream_reader },
		{ "full disk (a file-size limit) at every point of a write", test_file_size_limit },
		{ NULL, NULL },
	};

	add_suite("checkpoint", cases);
}
