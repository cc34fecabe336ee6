/*
 * tests/data/test_shard.c - token shards: round trips, and every malformed file refused with a message
 * that names the file and the problem.
 */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "data/shard.h"

static char err[512];

static void write_bytes(const char *path, const void *data, size_t n)
{
	FILE *fp = fopen(path, "wb");

	CU_ASSERT_FATAL(fp != NULL);
	CU_ASSERT_FATAL(fwrite(data, 1, n, fp) == n);
	fclose(fp);
}

/* A valid header for n tokens of tb bytes each. */
static void make_header(uint8_t *h, uint32_t version, uint32_t tb, uint64_t count)
{
	memset(h, 0, SHARD_HEADER_BYTES);
	memcpy(h, "MOESHARD", 8);
	for (int i = 0; i < 4; i++) {
		h[8 + i] = (uint8_t)(version >> (8 * i));
		h[12 + i] = (uint8_t)(tb >> (8 * i));
	}
	for (int i = 0; i < 8; i++)
		h[16 + i] = (uint8_t)(count >> (8 * i));
}

/* Write a header + n zero tokens of tb bytes; returns the path. */
static const char *write_shard_raw(const char *name, const uint8_t *h, size_t payload)
{
	const char *path = tmp_path(name);
	size_t n = SHARD_HEADER_BYTES + payload;
	uint8_t *buf = calloc(1, n);

	CU_ASSERT_FATAL(buf != NULL);
	memcpy(buf, h, SHARD_HEADER_BYTES);
	write_bytes(path, buf, n);
	free(buf);
	return path;
}

static void expect_refused(const char *path, int vocab, const char *needle)
{
	struct shard s;

	err[0] = 0;
	CU_ASSERT_EQUAL(shard_open(&s, path, vocab, err, sizeof(err)), -1);
	if (!strstr(err, needle) || !strstr(err, path)) {
		fprintf(stderr, "\n  message \"%s\" lacks \"%s\" or the path\n", err, needle);
		CU_FAIL("message");
	}
	CU_ASSERT_EQUAL(s.map, NULL);
	CU_ASSERT_EQUAL(s.fd, -1);
}

static void round_trip(int tb, uint32_t max_token)
{
	enum { N = 20011 };
	uint32_t *tok = malloc(N * sizeof(*tok));
	const char *path = tmp_path(tb == 2 ? "rt2.bin" : "rt4.bin");
	struct shard s;

	CU_ASSERT_FATAL(tok != NULL);
	test_rng_seed(7 + (uint64_t)tb);
	for (int i = 0; i < N; i++)
		tok[i] = (uint32_t)test_rand_uniform(0, (float)max_token);
	tok[0] = 0;
	tok[1] = max_token;
	CU_ASSERT_EQUAL_FATAL(shard_write(path, tok, N, tb, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(shard_open(&s, path, (int)(max_token + 1), err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(s.token_bytes, tb);
	CU_ASSERT_EQUAL(s.n_tokens, N);
	CU_ASSERT_EQUAL(s.map_bytes, SHARD_HEADER_BYTES + (size_t)tb * N);
	int bad = 0;
	for (int i = 0; i < N; i++)
		bad += shard_token(&s, (uint64_t)i) != tok[i];
	CU_ASSERT_EQUAL(bad, 0);
	/* little-endian on disk, whatever the host */
	const uint8_t *p = s.tokens + (size_t)tb;
	CU_ASSERT_EQUAL(p[0], (uint8_t)max_token);
	CU_ASSERT_EQUAL(p[1], (uint8_t)(max_token >> 8));
	shard_close(&s);
	CU_ASSERT_EQUAL(access(tmp_path(tb == 2 ? "rt2.bin.tmp" : "rt4.bin.tmp"), F_OK), -1);
	free(tok);
}

static void test_round_trip_2(void)
{
	round_trip(2, 65535);
}

static void test_round_trip_4(void)
{
	round_trip(4, 129279u + 70000u);
}

static void test_streaming_writer(void)
{
	const char *path = tmp_path("stream.bin");
	struct shard_writer w;
	struct shard s;
	uint32_t a[3] = { 1, 2, 3 }, b[2] = { 4, 70000 };

	CU_ASSERT_EQUAL_FATAL(shard_writer_open(&w, path, 4, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(shard_writer_append(&w, a, 3, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(shard_writer_append(&w, b, 0, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(shard_writer_append(&w, b, 2, err, sizeof(err)), 0);
	/* not visible under its final name until closed */
	CU_ASSERT_EQUAL(access(path, F_OK), -1);
	CU_ASSERT_EQUAL_FATAL(shard_writer_close(&w, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(shard_open(&s, path, 0, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(s.n_tokens, 5);
	CU_ASSERT_EQUAL(shard_token(&s, 4), 70000);
	shard_close(&s);
}

static void test_empty_shard(void)
{
	const char *path = tmp_path("empty.bin");
	struct shard s;

	CU_ASSERT_EQUAL_FATAL(shard_write(path, NULL, 0, 2, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(shard_open(&s, path, 10, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(s.n_tokens, 0);
	shard_close(&s);
}

static void test_missing_file(void)
{
	expect_refused(tmp_path("no-such-shard.bin"), 0, "No such file or directory");
}

static void test_short_file(void)
{
	const char *path = tmp_path("short.bin");

	write_bytes(path, "MOESHARD\1\0\0\0", 12);
	expect_refused(path, 0, "shorter than the 64-byte header");
}

static void test_bad_magic(void)
{
	uint8_t h[SHARD_HEADER_BYTES];

	make_header(h, 1, 2, 4);
	memcpy(h, "MOESHARX", 8);
	expect_refused(write_shard_raw("magic.bin", h, 8), 0, "not a token shard");
}

static void test_bad_version(void)
{
	uint8_t h[SHARD_HEADER_BYTES];

	make_header(h, 2, 2, 4);
	expect_refused(write_shard_raw("version.bin", h, 8), 0, "unsupported shard format version 2");
}

static void test_bad_token_bytes(void)
{
	uint8_t h[SHARD_HEADER_BYTES];

	make_header(h, 1, 3, 4);
	expect_refused(write_shard_raw("tb3.bin", h, 12), 0, "bytes per token is 3, must be 2 or 4");
	make_header(h, 1, 8, 4);
	expect_refused(write_shard_raw("tb8.bin", h, 32), 0, "bytes per token is 8");
}

static void test_reserved_bytes(void)
{
	uint8_t h[SHARD_HEADER_BYTES];

	make_header(h, 1, 2, 4);
	h[40] = 0x5a;
	expect_refused(write_shard_raw("reserved.bin", h, 8), 0, "reserved header byte 40");
}

static void test_size_mismatch(void)
{
	uint8_t h[SHARD_HEADER_BYTES];

	make_header(h, 1, 2, 500);
	expect_refused(write_shard_raw("size.bin", h, 936), 0,
		       "file has 1000 bytes, header says 64 + 2*500");
	make_header(h, 1, 4, 10);
	expect_refused(write_shard_raw("size2.bin", h, 44), 0, "file has 108 bytes, header says 64 + 4*10");
	/* a count so large that 64 + tb*count overflows */
	make_header(h, 1, 4, UINT64_MAX / 2);
	expect_refused(write_shard_raw("size3.bin", h, 8), 0, "file has 72 bytes");
}

static void test_token_out_of_vocab(void)
{
	const char *path = tmp_path("vocab.bin");
	uint32_t tok[100];
	struct shard s;

	for (int i = 0; i < 100; i++)
		tok[i] = (uint32_t)i;
	tok[56] = 1234;
	CU_ASSERT_EQUAL_FATAL(shard_write(path, tok, 100, 2, err, sizeof(err)), 0);
	expect_refused(path, 512, "token 1234 at index 56 >= vocab_size 512");
	/* without a vocabulary check it opens */
	CU_ASSERT_EQUAL(shard_open(&s, path, 0, err, sizeof(err)), 0);
	shard_close(&s);
	CU_ASSERT_EQUAL(shard_open(&s, path, 1235, err, sizeof(err)), 0);
	shard_close(&s);
}

static void test_writer_refuses_large_token(void)
{
	const char *path = tmp_path("large.bin");
	uint32_t ok[2] = { 1, 65535 }, bad[3] = { 5, 65536, 7 };
	struct shard_writer w;
	struct shard s;

	err[0] = 0;
	CU_ASSERT_EQUAL(shard_write(path, bad, 3, 2, err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "token 65536 at index 1 does not fit in 2 bytes"));
	CU_ASSERT_EQUAL(access(path, F_OK), -1);
	CU_ASSERT_EQUAL(access(tmp_path("large.bin.tmp"), F_OK), -1);

	/* a refused append writes nothing of its batch; the writer stays usable */
	CU_ASSERT_EQUAL_FATAL(shard_writer_open(&w, path, 2, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(shard_writer_append(&w, ok, 2, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(shard_writer_append(&w, bad, 3, err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "at index 3 "));
	CU_ASSERT_EQUAL(shard_writer_close(&w, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(shard_open(&s, path, 0, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(s.n_tokens, 2);
	shard_close(&s);

	CU_ASSERT_EQUAL(shard_writer_open(&w, path, 3, err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "must be 2 or 4"));
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "round trip, 2-byte tokens", test_round_trip_2 },
		{ "round trip, 4-byte tokens", test_round_trip_4 },
		{ "streaming writer", test_streaming_writer },
		{ "empty shard", test_empty_shard },
		{ "missing file", test_missing_file },
		{ "file shorter than header", test_short_file },
		{ "wrong magic", test_bad_magic },
		{ "unsupported version", test_bad_version },
		{ "bytes per token not 2 or 4", test_bad_token_bytes },
		{ "nonzero reserved bytes", test_reserved_bytes },
		{ "size disagrees with header", test_size_mismatch },
		{ "token >= vocab_size", test_token_out_of_vocab },
		{ "writer refuses a token too large", test_writer_refuses_large_token },
		{ NULL, NULL },
	};

	add_suite("shard", cases);
}
