/*
 * tests/data/test_loader.c - the data loader: sequences are exact consecutive slices of the shards in
 * sorted path order, shuffled epochs are permutations that depend only on (seed, epoch), and every
 * failure to open is refused with a message naming the pattern or the file.
 */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "data/loader.h"
#include "data/shard.h"

static char err[1024];

/* A fresh directory under the test's scratch directory. */
static const char *make_dir(const char *name)
{
	static char dir[4][400];
	static int next;
	char *d = dir[next++ & 3];

	snprintf(d, sizeof(dir[0]), "%s/%s", test_tmpdir(), name);
	CU_ASSERT_FATAL(mkdir(d, 0755) == 0);
	return d;
}

/* Write dir/name holding the n tokens base, base+1, ... */
static void write_seq_shard(const char *dir, const char *name, uint32_t base, size_t n, int tb)
{
	char path[512];
	uint32_t *tok = malloc((n ? n : 1) * sizeof(*tok));

	CU_ASSERT_FATAL(tok != NULL);
	for (size_t i = 0; i < n; i++)
		tok[i] = base + (uint32_t)i;
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	if (shard_write(path, tok, n, tb, err, sizeof(err)) != 0) {
		fprintf(stderr, "\n  shard_write: %s\n", err);
		CU_FAIL_FATAL("shard_write");
	}
	free(tok);
}

static void expect_message(const char *needle)
{
	if (!strstr(err, needle)) {
		fprintf(stderr, "\n  message \"%s\" lacks \"%s\"\n", err, needle);
		CU_FAIL("message");
	}
}

/* ---- in order ---- */

/*
 * T = 8.  Created out of order so that sorted order is not creation order:
 *   s0: 25 tokens -> 3 sequences (one token left over is the last target)
 *   s1:  5 tokens -> 0 sequences (shorter than T+1)
 *   s2: 21 tokens -> 2 sequences (4 tokens unused)
 *   s3:  9 tokens -> 1 sequence  (exactly T+1)
 * plus a file the pattern does not match.
 */
static void test_in_order(void)
{
	enum { T = 8 };
	static const struct {
		uint32_t base;
		uint64_t start;   /* first token of the sequence within its shard */
	} want[] = {
		{ 0, 0 }, { 0, 8 }, { 0, 16 },
		{ 2000, 0 }, { 2000, 8 },
		{ 3000, 0 },
	};
	const int n_want = (int)(sizeof(want) / sizeof(want[0]));
	const char *dir = make_dir("in_order");
	char pattern[512];
	struct loader l;
	int in[T], tg[T];

	write_seq_shard(dir, "s3.bin", 3000, 9, 4);
	write_seq_shard(dir, "s1.bin", 1000, 5, 2);
	write_seq_shard(dir, "s0.bin", 0, 25, 2);
	write_seq_shard(dir, "s2.bin", 2000, 21, 4);
	write_seq_shard(dir, "zz.other", 9000, 100, 4);
	snprintf(pattern, sizeof(pattern), "%s/s*.bin", dir);

	if (loader_open(&l, pattern, T, 65536, false, 1234, err, sizeof(err)) != 0) {
		fprintf(stderr, "\n  loader_open: %s\n", err);
		CU_FAIL_FATAL("loader_open");
	}
	CU_ASSERT_EQUAL(l.n_shards, 4);
	CU_ASSERT_EQUAL(l.n_seqs, (uint64_t)n_want);
	CU_ASSERT_PTR_NULL(l.perm);
	CU_ASSERT_PTR_NOT_NULL(strstr(l.shards[0].path, "s0.bin"));
	CU_ASSERT_PTR_NOT_NULL(strstr(l.shards[3].path, "s3.bin"));

	/* Three epochs, walked in order: epoch e repeats epoch 0. */
	for (uint64_t k = 0; k < 3 * (uint64_t)n_want; k++) {
		int j = (int)(k % (uint64_t)n_want);
		int ok = 1;

		memset(in, 0xff, sizeof(in));
		memset(tg, 0xff, sizeof(tg));
		loader_get(&l, k, in, tg);
		for (int t = 0; t < T; t++) {
			int x = (int)(want[j].base + want[j].start + (uint64_t)t);

			ok &= in[t] == x;
			ok &= tg[t] == x + 1;
		}
		if (!ok)
			fprintf(stderr, "\n  sequence k=%llu wrong (inputs[0]=%d)\n",
				(unsigned long long)k, in[0]);
		CU_ASSERT(ok);
	}
	/* Random access agrees with the walk. */
	loader_get(&l, 4, in, tg);
	CU_ASSERT_EQUAL(in[0], 2008);
	CU_ASSERT_EQUAL(tg[T - 1], 2016);
	loader_get(&l, 1000 * (uint64_t)n_want + 2, in, tg);
	CU_ASSERT_EQUAL(in[0], 16);
	CU_ASSERT_EQUAL(tg[T - 1], 24);
	loader_close(&l);
	CU_ASSERT_PTR_NULL(l.shards);
	CU_ASSERT_EQUAL(l.n_shards, 0);
}

/* ---- shuffled ---- */

enum { ST = 4, S_SEQS = 23 + 31 + 3 };

/* Three shards (T = 4) of 23, 31 and 3 sequences; every token distinct, so inputs[0] names a sequence. */
static const char *shuffle_pattern(void)
{
	static char pattern[512];

	if (!pattern[0]) {
		const char *dir = make_dir("shuffled");

		write_seq_shard(dir, "a.bin", 0, 23 * ST + 1, 4);
		write_seq_shard(dir, "b.bin", 100000, 31 * ST + 3, 4);
		write_seq_shard(dir, "c.bin", 60000, 3 * ST + 1, 2);
		snprintf(pattern, sizeof(pattern), "%s/*.bin", dir);
	}
	return pattern;
}

static void open_shuffled(struct loader *l, uint64_t seed)
{
	if (loader_open(l, shuffle_pattern(), ST, 1 << 20, true, seed, err, sizeof(err)) != 0) {
		fprintf(stderr, "\n  loader_open: %s\n", err);
		CU_FAIL_FATAL("loader_open");
	}
	CU_ASSERT_EQUAL_FATAL(l->n_seqs, S_SEQS);
	CU_ASSERT_PTR_NOT_NULL_FATAL(l->perm);
}

/* The in-order index of a sequence given its first input token, checking the whole sequence. */
static int seq_index(const int *in, const int *tg)
{
	static const struct {
		int base;
		int n;
	} shard[] = { { 0, 23 }, { 100000, 31 }, { 60000, 3 } };
	int first = 0;

	for (int s = 0; s < 3; s++) {
		int off = in[0] - shard[s].base;

		if (off >= 0 && off < shard[s].n * ST && off % ST == 0) {
			for (int t = 0; t < ST; t++) {
				if (in[t] != in[0] + t || tg[t] != in[0] + t + 1)
					return -1;
			}
			return first + off / ST;
		}
		first += shard[s].n;
	}
	return -1;
}

/* Order of epoch e: order[j] = in-order index of the j-th sequence visited. */
static void epoch_order(struct loader *l, uint64_t e, int *order)
{
	int in[ST], tg[ST];

	for (int j = 0; j < S_SEQS; j++) {
		loader_get(l, e * S_SEQS + (uint64_t)j, in, tg);
		order[j] = seq_index(in, tg);
	}
}

static int is_permutation(const int *order)
{
	int seen[S_SEQS] = { 0 };

	for (int j = 0; j < S_SEQS; j++) {
		if (order[j] < 0 || order[j] >= S_SEQS || seen[order[j]]++)
			return 0;
	}
	return 1;
}

static int same_order(const int *a, const int *b)
{
	return memcmp(a, b, S_SEQS * sizeof(*a)) == 0;
}

static void test_shuffled_permutations(void)
{
	enum { EPOCHS = 4 };
	struct loader l;
	int order[EPOCHS][S_SEQS];
	int identity = 1;

	open_shuffled(&l, 42);
	for (int e = 0; e < EPOCHS; e++) {
		epoch_order(&l, (uint64_t)e, order[e]);
		CU_ASSERT(is_permutation(order[e]));
	}
	for (int e = 0; e < EPOCHS; e++) {
		for (int f = e + 1; f < EPOCHS; f++)
			CU_ASSERT(!same_order(order[e], order[f]));
	}
	for (int j = 0; j < S_SEQS; j++)
		identity &= order[0][j] == j;
	CU_ASSERT(!identity);

	/* Going back to an earlier epoch regenerates the same order. */
	{
		int again[S_SEQS];

		epoch_order(&l, 1, again);
		CU_ASSERT(same_order(again, order[1]));
		epoch_order(&l, 0, again);
		CU_ASSERT(same_order(again, order[0]));
	}
	loader_close(&l);
	CU_ASSERT_PTR_NULL(l.perm);
}

static void test_shuffled_seeds(void)
{
	struct loader a, b, c;
	int oa[S_SEQS], ob[S_SEQS], oc[S_SEQS];

	open_shuffled(&a, 7);
	open_shuffled(&b, 7);
	open_shuffled(&c, 8);
	for (uint64_t e = 0; e < 3; e++) {
		epoch_order(&a, e, oa);
		epoch_order(&b, e, ob);
		epoch_order(&c, e, oc);
		CU_ASSERT(same_order(oa, ob));
		CU_ASSERT(!same_order(oa, oc));
		CU_ASSERT(is_permutation(oc));
	}
	loader_close(&a);
	loader_close(&b);
	loader_close(&c);
}

/* A loader opened fresh and asked for k directly returns what one that walked to k returned. */
static void test_shuffled_resume(void)
{
	enum { WALK = 3 * S_SEQS + 11 };
	static const int resume_at[] = { 0, 5, S_SEQS - 1, S_SEQS, S_SEQS + 13, 2 * S_SEQS + 1,
					 WALK - 1 };
	static int walked[WALK][2 * ST];
	struct loader l;
	int in[ST], tg[ST];

	open_shuffled(&l, 99);
	for (int k = 0; k < WALK; k++)
		loader_get(&l, (uint64_t)k, walked[k], walked[k] + ST);
	loader_close(&l);

	for (size_t r = 0; r < sizeof(resume_at) / sizeof(resume_at[0]); r++) {
		int k0 = resume_at[r];

		open_shuffled(&l, 99);
		for (int k = k0; k < WALK; k++) {
			loader_get(&l, (uint64_t)k, in, tg);
			CU_ASSERT(memcmp(in, walked[k], sizeof(in)) == 0);
			CU_ASSERT(memcmp(tg, walked[k] + ST, sizeof(tg)) == 0);
		}
		loader_close(&l);
	}
}

/* ---- errors ---- */

static void expect_open_fails(const char *pattern, int T, int vocab)
{
	struct loader l;

	err[0] = 0;
	CU_ASSERT_EQUAL(loader_open(&l, pattern, T, vocab, true, 1, err, sizeof(err)), -1);
	CU_ASSERT_PTR_NULL(l.shards);
	CU_ASSERT_PTR_NULL(l.first_seq);
	CU_ASSERT_PTR_NULL(l.perm);
	CU_ASSERT_EQUAL(l.n_shards, 0);
}

static void test_no_match(void)
{
	const char *dir = make_dir("no_match");
	char pattern[512];

	write_seq_shard(dir, "a.bin", 0, 100, 2);
	snprintf(pattern, sizeof(pattern), "%s/*.shard", dir);
	expect_open_fails(pattern, 8, 1000);
	expect_message(pattern);
	expect_message("no shard matches");

	snprintf(pattern, sizeof(pattern), "%s/missing/*.bin", dir);
	expect_open_fails(pattern, 8, 1000);
	expect_message(pattern);
}

static void test_bad_shard(void)
{
	const char *dir = make_dir("bad_shard");
	char pattern[512], bad[512];
	FILE *fp;

	write_seq_shard(dir, "a.bin", 0, 100, 2);
	write_seq_shard(dir, "c.bin", 0, 100, 2);
	snprintf(bad, sizeof(bad), "%s/b.bin", dir);
	fp = fopen(bad, "wb");
	CU_ASSERT_FATAL(fp != NULL);
	for (int i = 0; i < 80; i++)
		fputc('x', fp);
	fclose(fp);
	snprintf(pattern, sizeof(pattern), "%s/*.bin", dir);
	expect_open_fails(pattern, 8, 1000);
	expect_message(bad);
	expect_message("not a token shard");
}

static void test_token_out_of_vocab(void)
{
	const char *dir = make_dir("out_of_vocab");
	char pattern[512], bad[512];

	write_seq_shard(dir, "a.bin", 0, 50, 2);
	write_seq_shard(dir, "b.bin", 90, 20, 4);	/* tokens 90..109 */
	snprintf(bad, sizeof(bad), "%s/b.bin", dir);
	snprintf(pattern, sizeof(pattern), "%s/*.bin", dir);
	expect_open_fails(pattern, 8, 100);
	expect_message(bad);
	expect_message("vocab_size 100");

	/* The same set opens with a large enough vocabulary. */
	{
		struct loader l;

		CU_ASSERT_EQUAL(loader_open(&l, pattern, 8, 110, false, 0, err, sizeof(err)), 0);
		CU_ASSERT_EQUAL(l.n_seqs, 6 + 2);
		loader_close(&l);
	}
}

static void test_all_too_short(void)
{
	const char *dir = make_dir("too_short");
	char pattern[512];

	write_seq_shard(dir, "a.bin", 0, 8, 2);	/* T tokens: one short of a sequence */
	write_seq_shard(dir, "b.bin", 0, 1, 2);
	write_seq_shard(dir, "c.bin", 0, 0, 4);
	snprintf(pattern, sizeof(pattern), "%s/*.bin", dir);
	expect_open_fails(pattern, 8, 1000);
	expect_message(pattern);
	expect_message("T = 8");

	/* One more token makes a sequence. */
	write_seq_shard(dir, "a.bin", 0, 9, 2);
	{
		struct loader l;

		CU_ASSERT_EQUAL(loader_open(&l, pattern, 8, 1000, true, 3, err, sizeof(err)), 0);
		CU_ASSERT_EQUAL(l.n_seqs, 1);
		loader_close(&l);
	}
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "in order: consecutive slices, sorted shards, wrap-around", test_in_order },
		{ "shuffled: each epoch a permutation, epochs differ", test_shuffled_permutations },
		{ "shuffled: order depends on the seed only", test_shuffled_seeds },
		{ "shuffled: resume at k matches the walk", test_shuffled_resume },
		{ "no shard matches", test_no_match },
		{ "a bad shard in the set", test_bad_shard },
		{ "token >= vocab_size", test_token_out_of_vocab },
		{ "every shard too short", test_all_too_short },
		{ NULL, NULL },
	};

	add_suite("loader", cases);
}
