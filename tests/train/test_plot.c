/*
 * tests/train/test_plot.c - `moe plot`: a metrics file with two keys (one decreasing, one increasing
 * and absent on some lines, a blank line between) plots into a PNG that this test reads back on its
 * own: the signature, IHDR (size, 8-bit RGB), every chunk's CRC-32 (computed bit by bit here), the
 * stored deflate blocks inflated and the zlib adler32 checked, then the pixels: white dominant, both
 * line colours present, the decreasing line high on the left and low on the right (the other the
 * opposite).  Constant and single-point series plot; a bad line names file:line, a missing key and a
 * missing file are named and leave no PNG; the command line works.
 */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "train/plot.h"
#include "train/train_cli.h"

static char err[1024];

struct image {
	int w, h;
	unsigned char *rgb;
};

static uint32_t rd32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint32_t crc_bitwise(const unsigned char *p, size_t n)
{
	uint32_t c = 0xffffffffu;

	for (size_t i = 0; i < n; i++) {
		c ^= p[i];
		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (0xedb88320u & -(c & 1));
	}
	return ~c;
}

static unsigned char *slurp(const char *path, size_t *n)
{
	FILE *f = fopen(path, "rb");
	unsigned char *b;

	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	*n = (size_t)ftell(f);
	rewind(f);
	b = malloc(*n + 1);
	if (fread(b, 1, *n, f) != *n) {
		free(b);
		b = NULL;
	}
	fclose(f);
	return b;
}

/* A zlib stream of stored blocks to *out (malloc'd); checks the header, LEN/NLEN and adler32. */
static int inflate_stored(const unsigned char *z, size_t n, unsigned char **out, size_t *outn)
{
	size_t p = 2, m = 0;
	uint32_t a = 1, b = 0;
	int final = 0;

	*out = malloc(n);
	CU_ASSERT_FATAL(n >= 6 && *out != NULL);
	CU_ASSERT_EQUAL((z[0] & 0x0f), 8);		/* deflate */
	CU_ASSERT_EQUAL((z[0] << 8 | z[1]) % 31, 0);	/* FCHECK */
	while (!final) {
		CU_ASSERT_FATAL(p + 5 <= n);
		final = z[p] & 1;
		CU_ASSERT_FATAL(((z[p] >> 1) & 3) == 0);	/* stored */
		size_t len = z[p + 1] | z[p + 2] << 8, nlen = z[p + 3] | z[p + 4] << 8;

		CU_ASSERT_FATAL((len ^ 0xffff) == nlen && p + 5 + len <= n);
		memcpy(*out + m, z + p + 5, len);
		m += len;
		p += 5 + len;
	}
	CU_ASSERT_FATAL(p + 4 == n);
	for (size_t i = 0; i < m; i++) {
		a = (a + (*out)[i]) % 65521;
		b = (b + a) % 65521;
	}
	CU_ASSERT_EQUAL(rd32(z + p), b << 16 | a);
	*outn = m;
	return 0;
}

/* The IHDR fields and the chunk CRCs checked; the IDAT data concatenated. */
static unsigned char *png_chunks(const unsigned char *d, size_t n, struct image *im, size_t *zn)
{
	static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
	unsigned char *z = malloc(n);
	size_t p = 8;
	int seen_end = 0;

	*zn = 0;
	CU_ASSERT_FATAL(n > 8 && !memcmp(d, sig, 8));
	while (p + 12 <= n && !seen_end) {
		uint32_t len = rd32(d + p);

		CU_ASSERT_FATAL(p + 12 + len <= n);
		CU_ASSERT_EQUAL(rd32(d + p + 8 + len), crc_bitwise(d + p + 4, 4 + len));
		if (!memcmp(d + p + 4, "IHDR", 4)) {
			CU_ASSERT_FATAL(p == 8 && len == 13);
			im->w = (int)rd32(d + p + 8);
			im->h = (int)rd32(d + p + 12);
			CU_ASSERT_EQUAL(d[p + 16], 8);	/* bit depth */
			CU_ASSERT_EQUAL(d[p + 17], 2);	/* RGB */
			CU_ASSERT(!d[p + 18] && !d[p + 19] && !d[p + 20]);
		} else if (!memcmp(d + p + 4, "IDAT", 4)) {
			memcpy(z + *zn, d + p + 8, len);
			*zn += len;
		}
		seen_end = !memcmp(d + p + 4, "IEND", 4);
		p += 12 + len;
	}
	CU_ASSERT(seen_end && p == n);
	return z;
}

/* Reads a PNG as written by plot.c (stored blocks, filter 0) into im. */
static void png_read(const char *path, struct image *im)
{
	size_t n = 0, zn = 0, rn = 0;
	unsigned char *d = slurp(path, &n), *z, *raw;

	CU_ASSERT_FATAL(d != NULL);
	z = png_chunks(d, n, im, &zn);
	inflate_stored(z, zn, &raw, &rn);
	CU_ASSERT_FATAL(rn == (size_t)im->h * (1 + 3 * (size_t)im->w));
	im->rgb = malloc((size_t)im->w * im->h * 3);
	for (int y = 0; y < im->h; y++) {
		CU_ASSERT_EQUAL(raw[y * (1 + 3 * (size_t)im->w)], 0);
		memcpy(im->rgb + (size_t)y * im->w * 3, raw + y * (1 + 3 * (size_t)im->w) + 1,
		       (size_t)im->w * 3);
	}
	free(raw);
	free(z);
	free(d);
}

static void write_text(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	CU_ASSERT_FATAL(f != NULL);
	fputs(text, f);
	fclose(f);
}

/* 60 steps: loss falls from 5 to about 2, reward_mean (every other step) rises; a blank line. */
static const char *write_metrics(void)
{
	const char *path = tmp_path("metrics.jsonl");
	FILE *f = fopen(path, "w");

	CU_ASSERT_FATAL(f != NULL);
	for (int s = 1; s <= 60; s++) {
		fprintf(f, "{\"step\": %d, \"loss\": %.4f, \"lr\": 0.001", s, 5.0 - 0.05 * s);
		if (s % 2)
			fprintf(f, ", \"reward_mean\": %.4f", 0.05 * s);
		fprintf(f, "}\n%s", s == 30 ? "\n" : "");
	}
	fclose(f);
	return path;
}

/* Median row of the pixels of colour rgb in columns [x0, x1); -1 when none. */
static int median_row(const struct image *im, const unsigned char *rgb, int x0, int x1, long *count)
{
	int *rows = malloc(sizeof(int) * (size_t)im->w * im->h), n = 0, med;

	for (int y = 0; y < im->h; y++)
		for (int x = x0; x < x1; x++)
			if (!memcmp(im->rgb + ((size_t)y * im->w + x) * 3, rgb, 3))
				rows[n++] = y;
	med = n ? rows[n / 2] : -1;	/* rows are in increasing order */
	if (count)
		*count = n;
	free(rows);
	return med;
}

static void test_plot_png(void)
{
	const char *keys[] = {"loss", "reward_mean"}, *png = tmp_path("plot.png");
	unsigned char c0[3], c1[3], white[3] = {255, 255, 255};
	struct image im = {0};
	long n0, n1, nw;
	int w3;

	CU_ASSERT_EQUAL_FATAL(plot_metrics(write_metrics(), keys, 2, "Loss and reward", png, 640, 400,
					   err, sizeof(err)), 0);
	png_read(png, &im);
	CU_ASSERT_FATAL(im.w == 640 && im.h == 400);
	plot_key_color(0, c0);
	plot_key_color(1, c1);
	CU_ASSERT(memcmp(c0, c1, 3) != 0);
	median_row(&im, c0, 0, im.w, &n0);
	median_row(&im, c1, 0, im.w, &n1);
	median_row(&im, white, 0, im.w, &nw);
	CU_ASSERT(n0 > 300 && n1 > 300);
	CU_ASSERT(nw > (long)im.w * im.h / 2);
	w3 = im.w / 3;
	CU_ASSERT(median_row(&im, c0, 0, w3, NULL) < median_row(&im, c0, 2 * w3, im.w, NULL) - 100);
	CU_ASSERT(median_row(&im, c1, 0, w3, NULL) > median_row(&im, c1, 2 * w3, im.w, NULL) + 50);
	free(im.rgb);
}

/* A constant series and a single point still plot (the ranges widen); a large image scales up. */
static void test_plot_degenerate(void)
{
	const char *m = tmp_path("flat.jsonl"), *png = tmp_path("flat.png");
	const char *keys[] = {"a", "b"};
	struct image im = {0};
	unsigned char c0[3];

	write_text(m, "{\"step\": 5, \"a\": 1.5, \"b\": 2}\n{\"step\": 6, \"a\": 1.5}\n");
	CU_ASSERT_EQUAL_FATAL(plot_metrics(m, keys, 2, NULL, png, 200, 160, err, sizeof(err)), 0);
	png_read(png, &im);
	plot_key_color(0, c0);
	CU_ASSERT(im.w == 200 && im.h == 160 && median_row(&im, c0, 0, im.w, NULL) > 0);
	free(im.rgb);
	write_text(m, "{\"step\": 7, \"a\": 1e-7}\n{\"step\": 9, \"a\": 3e-7}\n");
	CU_ASSERT_EQUAL(plot_metrics(m, keys, 1, "tiny values", png, 1800, 1100, err, sizeof(err)), 0);
	png_read(png, &im);
	CU_ASSERT(im.w == 1800 && im.h == 1100);
	free(im.rgb);
}

static void expect_error(const char *metrics, const char *key, const char *want)
{
	const char *keys[] = {"loss", key}, *png = tmp_path("err.png");

	unlink(png);
	CU_ASSERT_EQUAL(plot_metrics(metrics, keys, 2, "t", png, 320, 240, err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, want));
	CU_ASSERT(access(png, F_OK) != 0);
}

static void test_plot_errors(void)
{
	const char *m = tmp_path("bad.jsonl");
	char want[512];

	write_text(m, "{\"step\": 1, \"loss\": 2}\n\nnot json\n");
	snprintf(want, sizeof(want), "%s:3", m);
	expect_error(m, "loss", want);
	write_text(m, "{\"step\": 1, \"loss\": 2}\n{\"loss\": 3}\n");
	snprintf(want, sizeof(want), "%s:2", m);
	expect_error(m, "loss", want);
	write_text(m, "{\"step\": 1, \"loss\": 2}\n[1, 2]\n");
	expect_error(m, "loss", want);
	write_text(m, "{\"step\": 1, \"loss\": 2, \"val_loss\": null}\n");
	expect_error(m, "val_loss", "\"val_loss\"");
	expect_error(tmp_path("no_such.jsonl"), "loss", tmp_path("no_such.jsonl"));
}

static void test_plot_cli(void)
{
	char *ok[] = {"--metrics", (char *)write_metrics(), "--key", "loss", "--key", "lr",
		      "--out", (char *)tmp_path("cli.png"), "--title", "cli", "--size", "300x200"};
	char *bad_size[] = {"--metrics", "m", "--key", "loss", "--out", "o.png", "--size", "300"};
	char *no_out[] = {"--metrics", "m", "--key", "loss"};
	char *help[] = {"--help"};
	char *missing[] = {"--metrics", (char *)tmp_path("absent.jsonl"), "--key", "loss", "--out",
			   (char *)tmp_path("absent.png")};
	struct image im = {0};

	CU_ASSERT_EQUAL(plot_cli_main(12, ok), 0);
	png_read(tmp_path("cli.png"), &im);
	CU_ASSERT(im.w == 300 && im.h == 200);
	free(im.rgb);
	CU_ASSERT_EQUAL(plot_cli_main(1, help), 0);
	CU_ASSERT_EQUAL(plot_cli_main(8, bad_size), 2);
	CU_ASSERT_EQUAL(plot_cli_main(4, no_out), 2);
	CU_ASSERT_EQUAL(plot_cli_main(6, missing), 1);
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{"png", test_plot_png},
		{"degenerate", test_plot_degenerate},
		{"errors", test_plot_errors},
		{"cli", test_plot_cli},
		{NULL, NULL},
	};
	add_suite("plot", cases);
}
