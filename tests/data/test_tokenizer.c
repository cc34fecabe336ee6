/*
 * tests/data/test_tokenizer.c - byte-level BPE: the GPT-2 pre-tokenizer, lossless round trips on any
 * bytes, the first merges learnt from a hand-counted corpus, agreement with a hand-written
 * tokenizer.json (tests/data/fixtures), save -> load, special tokens, streaming = one-shot encoding,
 * training determinism and speed, and files refused with messages naming the file and the key.
 */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "data/tokenizer.h"

static char err[1024];

static uint64_t rng = 88172645463325252ULL;

static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

/* tests/data/fixtures/NAME in the source tree */
#define fixture(name) src_path("tests/data/fixtures/" name)

/* Encode, then check that decoding gives the bytes back; returns the ids (caller frees). */
static struct tok_ids round_trip(struct tokenizer *t, const void *text, size_t n)
{
	struct tok_ids ids = { 0 };
	struct tok_bytes back = { 0 };

	tokenizer_encode(t, text, n, &ids);
	CU_ASSERT_EQUAL_FATAL(tokenizer_decode(t, ids.v, ids.n, &back, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(back.n, n);
	if (back.n != n || (n && memcmp(back.v, text, n))) {
		fprintf(stderr, "\n  round trip differs (%zu bytes in, %zu out)\n", n, back.n);
		CU_FAIL("decode(encode(x)) != x");
	}
	tok_bytes_free(&back);
	return ids;
}

/* The ids of s with tokenizer t equal want[0..n). */
static void expect_ids(struct tokenizer *t, const char *s, const uint32_t *want, size_t n)
{
	struct tok_ids ids = round_trip(t, s, strlen(s));
	int same = ids.n == n && !memcmp(ids.v, want, n * sizeof(*want));

	if (!same) {
		fprintf(stderr, "\n  \"%s\": got", s);
		for (size_t i = 0; i < ids.n; i++)
			fprintf(stderr, " %u", ids.v[i]);
		fprintf(stderr, ", want");
		for (size_t i = 0; i < n; i++)
			fprintf(stderr, " %u", want[i]);
		fprintf(stderr, "\n");
	}
	CU_ASSERT(same);
	tok_ids_free(&ids);
}

#define EXPECT_IDS(t, s, ...)                                                                         \
	do {                                                                                          \
		const uint32_t want_[] = { __VA_ARGS__ };                                             \
		expect_ids(t, s, want_, sizeof(want_) / sizeof(want_[0]));                            \
	} while (0)

/* A corpus of a few hundred kB: words from a skewed vocabulary, punctuation, numbers, other scripts. */
static char *make_corpus(size_t bytes, uint64_t seed, size_t *n_out)
{
	static const char *const syll[] = { "th", "e", "an", "re", "in", "on", "at", "en", "nd", "ti",
					    "es", "or", "te", "of", "ed", "is", "it", "al", "ar", "st",
					    "ng", "ou", "le", "ve", "co", "me", "de", "hi", "ri", "ro" };
	static const char *const extra[] = { "日本語", "Привет", "😀", "naïve", "e\xcc\x81", "λόγος",
					     "1999", ",", ".", "!", "'s", "\n", "\t", "  " };
	char *s = malloc(bytes + 64);
	size_t n = 0;

	rng = seed;
	CU_ASSERT_FATAL(s != NULL);
	while (n < bytes) {
		uint64_t r = rnd();
		size_t w = (r % 1000) * (r % 1000) / 1000;	/* skewed towards small word ids */
		uint64_t h = w * 0x9e3779b97f4a7c15ULL;
		int k = 1 + (int)(h >> 62);

		if (r % 17 == 0) {
			const char *e = extra[(r >> 20) % (sizeof(extra) / sizeof(extra[0]))];
			size_t len = strlen(e);

			if (n + len + 1 > bytes)
				break;
			memcpy(s + n, e, len);
			n += len;
		}
		for (int j = 0; j < k && n + 3 < bytes; j++) {
			const char *y = syll[(h >> (8 * j)) % (sizeof(syll) / sizeof(syll[0]))];

			memcpy(s + n, y, strlen(y));
			n += strlen(y);
		}
		if (n + 1 < bytes)
			s[n++] = ' ';
		else
			break;
	}
	*n_out = n;
	return s;
}

static struct tokenizer *train_text(const char *text, size_t n, int vocab, size_t chunk)
{
	struct tok_trainer *tr = tok_trainer_new(NULL, 0, err, sizeof(err));
	struct tokenizer *t;

	CU_ASSERT_FATAL(tr != NULL);
	for (size_t i = 0; i < n; i += chunk)
		tok_trainer_feed(tr, text + i, n - i < chunk ? n - i : chunk);
	tok_trainer_end_doc(tr);
	t = tok_trainer_finish(tr, vocab, err, sizeof(err));
	tok_trainer_free(tr);
	if (!t)
		fprintf(stderr, "\n  training: %s\n", err);
	CU_ASSERT_FATAL(t != NULL);
	return t;
}

static struct tokenizer *corpus_tokenizer(void)
{
	static struct tokenizer *t;
	size_t n;
	char *s;

	if (t)
		return t;
	s = make_corpus(300000, 5, &n);
	t = train_text(s, n, 1200, 65536);
	free(s);
	return t;
}

/* ---- pre-tokenizer --------------------------------------------------------------------------- */

static void expect_pieces(enum tok_pretok mode, const char *s, const char *const *want, size_t nw)
{
	size_t ends[64], n = tok_pretokenize(mode, s, strlen(s), ends, 64), p = 0;
	int same = n == nw;

	for (size_t i = 0; same && i < n; i++) {
		same = ends[i] - p == strlen(want[i]) && !memcmp(s + p, want[i], ends[i] - p);
		p = ends[i];
	}
	if (!same) {
		fprintf(stderr, "\n  \"%s\" pieces:", s);
		p = 0;
		for (size_t i = 0; i < n && i < 64; p = ends[i], i++)
			fprintf(stderr, " [%.*s]", (int)(ends[i] - p), s + p);
		fprintf(stderr, "\n");
	}
	CU_ASSERT(same);
}

#define EXPECT_PIECES(mode, s, ...)                                                                   \
	do {                                                                                          \
		const char *const want_[] = { __VA_ARGS__ };                                          \
		expect_pieces(mode, s, want_, sizeof(want_) / sizeof(want_[0]));                      \
	} while (0)

/* Each split checked by hand against the regex (and against Python's regex module). */
static void test_pretokenize_gpt2(void)
{
	enum tok_pretok g = TOK_PRETOK_GPT2;

	EXPECT_PIECES(g, "Hello world", "Hello", " world");
	/* contractions are their own pieces; "'sup" still gives "'s" */
	EXPECT_PIECES(g, "it's we'll they're I've 'sup", "it", "'s", " we", "'ll", " they", "'re",
		      " I", "'ve", " '", "sup");
	/* case-sensitive in GPT-2: 'S is not a contraction */
	EXPECT_PIECES(g, "IT'S", "IT", "'", "S");
	/* a run of spaces leaves its last space to the next word; trailing spaces stay together */
	EXPECT_PIECES(g, "a   b  ", "a", "  ", " b", "  ");
	EXPECT_PIECES(g, "x\n\ny", "x", "\n", "\n", "y");
	EXPECT_PIECES(g, "x \n y", "x", " \n", " y");
	EXPECT_PIECES(g, "abc123 456!!?", "abc", "123", " 456", "!!?");
	/* letters of any script; a combining mark (Mn) is not a letter */
	EXPECT_PIECES(g, "日本語 naïve e\xcc\x81", "日本語", " naïve", " e", "\xcc\x81");
	EXPECT_PIECES(g, " 😀😀 ok", " 😀😀", " ok");
	/* invalid UTF-8 bytes are punctuation-like, one character each */
	EXPECT_PIECES(g, "a\xff\xfe b\xc3", "a", "\xff\xfe", " b", "\xc3");
}

static void test_pretokenize_llama3(void)
{
	EXPECT_PIECES(TOK_PRETOK_LLAMA3, "IT'S 12345 x", "IT", "'S", " ", "123", "45", " x");
	EXPECT_PIECES(TOK_PRETOK_QWEN2, "IT'S 123", "IT", "'S", " ", "1", "2", "3");
	EXPECT_PIECES(TOK_PRETOK_LLAMA3, "a.\n\n  b", "a", ".\n\n", " ", " b");
	EXPECT_PIECES(TOK_PRETOK_LLAMA3, "(hello) \n\n x", "(hello", ")", " \n\n", " x");
}

/* ---- round trips ----------------------------------------------------------------------------- */

static void test_round_trip_random_bytes(void)
{
	struct tokenizer *t = corpus_tokenizer();
	uint8_t buf[3000];

	rng = 12345;
	for (int it = 0; it < 300; it++) {
		size_t n = rnd() % sizeof(buf);
		int kind = it % 3;
		struct tok_ids ids;

		for (size_t i = 0; i < n; i++) {
			uint64_t r = rnd();

			if (kind == 0)
				buf[i] = (uint8_t)r;	/* anything: NULs, invalid UTF-8 */
			else if (kind == 1)
				buf[i] = "ab \n\x00\xc3\xa9\xe6\x97\xa5\xf0\x9f\x98\x80\xff'"[r % 16];
			else
				buf[i] = (uint8_t)(r % 8 ? 'a' + r % 26 : r % 3 ? ' ' : 0x80 + r % 64);
		}
		ids = round_trip(t, buf, n);
		tok_ids_free(&ids);
	}
	/* single bytes, and long runs of one class */
	for (int b = 0; b < 256; b++) {
		uint8_t c = (uint8_t)b;
		struct tok_ids ids = round_trip(t, &c, 1);

		CU_ASSERT_EQUAL(ids.n, 1);
		tok_ids_free(&ids);
	}
	for (int k = 0; k < 3; k++) {
		struct tok_ids ids;

		memset(buf, " e\xff"[k], sizeof(buf));
		ids = round_trip(t, buf, sizeof(buf));
		tok_ids_free(&ids);
	}
}

static void test_round_trip_unicode(void)
{
	static const char *const texts[] = {
		"日本語のテキストと中文文本，还有한국어 텍스트。",
		"emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 flags and ZWJ sequences",
		"combining: e\xcc\x81 a\xcc\x8a o\xcc\x88\xcc\x84 ñ vs n\xcc\x83, Zalgo t\xcc\xb7\xcd\x93\xcc\x9b",
		"RTL: שלום עולם مرحبا بالعالم", "math: ∀x∈ℝ, x² ≥ 0; ½ Ⅻ ٣",
		"spaces:\u00a0nbsp\u3000ideographic\u2028line sep\t\r\n", "",
	};
	struct tokenizer *t = corpus_tokenizer(), *fx;

	fx = tokenizer_load(fixture("tiny_tokenizer.json"), err, sizeof(err));
	CU_ASSERT_FATAL(fx != NULL);
	for (size_t k = 0; k < sizeof(texts) / sizeof(texts[0]); k++) {
		struct tok_ids a = round_trip(t, texts[k], strlen(texts[k]));
		struct tok_ids b = round_trip(fx, texts[k], strlen(texts[k]));

		tok_ids_free(&a);
		tok_ids_free(&b);
	}
	tokenizer_free(fx);
}

/* ---- training -------------------------------------------------------------------------------- */

static void expect_merge(struct tokenizer *t, int i, const char *a, const char *b)
{
	uint32_t ia, ib, ir;
	const uint8_t *p;
	size_t n;
	int ok;

	CU_ASSERT_FATAL(i < tokenizer_n_merges(t));
	tokenizer_merge(t, i, &ia, &ib, &ir);
	ok = !tokenizer_token_bytes(t, ia, &p, &n) && n == strlen(a) && !memcmp(p, a, n);
	ok = ok && !tokenizer_token_bytes(t, ib, &p, &n) && n == strlen(b) && !memcmp(p, b, n);
	ok = ok && !tokenizer_token_bytes(t, ir, &p, &n) && n == strlen(a) + strlen(b) &&
	     !memcmp(p, a, strlen(a)) && !memcmp(p + strlen(a), b, strlen(b));
	if (!ok)
		fprintf(stderr, "\n  merge %d is not \"%s\" + \"%s\"\n", i, a, b);
	CU_ASSERT(ok);
}

/*
 * Words: "low" x1, " low" x4, " lower" x2, " newest" x6, " widest" x3.  Pair counts: e s 9, s t 9,
 * w e 8, l o 7, o w 7, " " l 6, " " n 6, n e 6, e w 6, ...  So: (e, s) [9, ties with (s, t): "e" < "s"],
 * then (es, t) 9, (l, o) 7 [ties with (o, w)], (lo, w) 7, then five pairs at 6 in byte order:
 * (" ", low) < (" ", n); then (" n", e), (" ne", w), (" new", est).
 */
static void test_known_merges(void)
{
	static const char text[] = "low low low low low lower lower newest newest newest newest newest "
				   "newest widest widest widest";
	struct tokenizer *t = train_text(text, strlen(text), 256 + 9 + 4, 7);

	CU_ASSERT_EQUAL(tokenizer_n_merges(t), 9);
	expect_merge(t, 0, "e", "s");
	expect_merge(t, 1, "es", "t");
	expect_merge(t, 2, "l", "o");
	expect_merge(t, 3, "lo", "w");
	expect_merge(t, 4, " ", "low");
	expect_merge(t, 5, " ", "n");
	expect_merge(t, 6, " n", "e");
	expect_merge(t, 7, " ne", "w");
	expect_merge(t, 8, " new", "est");
	CU_ASSERT_EQUAL(tokenizer_vocab_size(t), 256 + 9 + 4);
	/* ids: bytes, then merges in order, then the specials */
	EXPECT_IDS(t, " newest lowest", 256 + 8, 256 + 4, 256 + 1);
	EXPECT_IDS(t, "low<|endoftext|>", 256 + 3, 256 + 9);
	tokenizer_free(t);
	/* "ab", " ab": (a, b) then (" ", ab); then no pair is left and the vocabulary stops growing */
	t = train_text("ab ab", 5, 1000, 1);
	CU_ASSERT_EQUAL(tokenizer_n_merges(t), 2);
	CU_ASSERT_EQUAL(tokenizer_vocab_size(t), 256 + 2 + 4);
	tokenizer_free(t);
}

static void test_training_determinism(void)
{
	size_t n;
	char *s = make_corpus(200000, 9, &n);
	struct tokenizer *a = train_text(s, n, 900, 1 << 20), *b = train_text(s, n, 900, 997);
	const char *pa = tmp_path("det_a.json"), *pb = tmp_path("det_b.json");
	FILE *fa, *fb;
	int same = 1, ca, cb;

	CU_ASSERT_EQUAL(tokenizer_n_merges(a), tokenizer_n_merges(b));
	for (int i = 0; i < tokenizer_n_merges(a) && i < tokenizer_n_merges(b); i++) {
		uint32_t x[3], y[3];

		tokenizer_merge(a, i, &x[0], &x[1], &x[2]);
		tokenizer_merge(b, i, &y[0], &y[1], &y[2]);
		same &= !memcmp(x, y, sizeof(x));
	}
	CU_ASSERT(same);
	CU_ASSERT_EQUAL_FATAL(tokenizer_save(a, pa, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(tokenizer_save(b, pb, err, sizeof(err)), 0);
	fa = fopen(pa, "rb");
	fb = fopen(pb, "rb");
	CU_ASSERT_FATAL(fa && fb);
	do {
		ca = fgetc(fa);
		cb = fgetc(fb);
	} while (ca == cb && ca != EOF);
	CU_ASSERT_EQUAL(ca, cb);	/* byte-identical files */
	fclose(fa);
	fclose(fb);
	tokenizer_free(a);
	tokenizer_free(b);
	free(s);
}

/* 2 MB of text with ~100k distinct words to a vocabulary of 4096: seconds, not minutes. */
static void test_training_speed(void)
{
	size_t n = 0, cap = 2000000;
	char *s = malloc(cap + 16);
	struct timespec t0, t1;
	struct tokenizer *t;
	double el;

	CU_ASSERT_FATAL(s != NULL);
	rng = 77;
	while (n + 12 < cap) {
		uint64_t r = rnd();
		int len = 2 + (int)(r % 9);

		for (int j = 0; j < len; j++)
			s[n++] = "etaoinshrdlucmfwypvbgkjqxz"[(r >> (5 * j + 4)) % 26 % (6 + j * 3)];
		s[n++] = r % 13 ? ' ' : '\n';
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	t = train_text(s, n, 4096, 1 << 20);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	el = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
	fprintf(stderr, "\n  trained 2 MB to vocab %d in %.2f s\n", tokenizer_vocab_size(t), el);
	CU_ASSERT_EQUAL(tokenizer_vocab_size(t), 4096);
	CU_ASSERT(el < 30.0);
	tokenizer_free(t);
	free(s);
}

/* ---- the hand-written tokenizer.json --------------------------------------------------------- */

/*
 * tests/data/fixtures/tiny_tokenizer.json: ids 0..255 are the bytes in GPT-2's order (printable ASCII
 * c is c - 33, so h=71 e=68 l=75 o=78 w=86 r=81 d=67 p=79 i=72 !=0; space "Ġ" 220, newline "Ċ" 198;
 * the bytes of é, C3 A9, are 127 and 102), then the merges by rank:
 *   256 he (h e)   257 ll (l l)   258 hell (he ll)   259 hello (hell o)   260 Ġw (Ġ w)   261 or (o r)
 *   262 Ġwor (Ġw or)   263 ld (l d)   264 Ġworld (Ġwor ld)   265 Ġh (Ġ h)   266 Ġhello (Ġ hello)
 * and 267 <|endoftext|>.  tiny_tokenizer_split.json is the same tokenizer with [a, b] merges and a
 * Sequence[Split(GPT-2 regex), ByteLevel] pre-tokenizer.
 */
static void check_fixture(struct tokenizer *t)
{
	CU_ASSERT_EQUAL(tokenizer_vocab_size(t), 268);
	CU_ASSERT_EQUAL(tokenizer_n_merges(t), 11);
	CU_ASSERT_EQUAL(tokenizer_eot_id(t), 267);
	EXPECT_IDS(t, "hello world", 259, 264);
	/* " hello": h e merges first (rank 0), so "Ġ h" (rank 9) never applies; then Ġ + hello */
	EXPECT_IDS(t, "hello hello", 259, 266);
	EXPECT_IDS(t, "help", 256, 75, 79);
	EXPECT_IDS(t, " hi", 265, 72);
	EXPECT_IDS(t, "world", 86, 261, 263);
	EXPECT_IDS(t, "hello<|endoftext|>\n", 259, 267, 198);
	EXPECT_IDS(t, "hello!!", 259, 0, 0);
	EXPECT_IDS(t, "é", 127, 102);
}

static void test_fixture(void)
{
	struct tokenizer *a = tokenizer_load(fixture("tiny_tokenizer.json"), err, sizeof(err));
	struct tokenizer *b;

	if (!a)
		fprintf(stderr, "\n  %s\n", err);
	CU_ASSERT_FATAL(a != NULL);
	check_fixture(a);
	b = tokenizer_load(fixture("tiny_tokenizer_split.json"), err, sizeof(err));
	if (!b)
		fprintf(stderr, "\n  %s\n", err);
	CU_ASSERT_FATAL(b != NULL);
	check_fixture(b);
	tokenizer_free(a);
	tokenizer_free(b);
}

/*
 * tiny_tokenizer_nospecials.json: the fixture without added tokens (267 is then an ordinary vocabulary
 * entry, never produced).  Encoding used to give no ids at all for any text (found by fuzz_tokenizer).
 */
static void test_no_specials(void)
{
	struct tokenizer *t = tokenizer_load(fixture("tiny_tokenizer_nospecials.json"), err, sizeof(err));
	struct tok_ids ids;

	if (!t)
		fprintf(stderr, "\n  %s\n", err);
	CU_ASSERT_FATAL(t != NULL);
	EXPECT_IDS(t, "hello world", 259, 264);
	EXPECT_IDS(t, "help", 256, 75, 79);
	ids = round_trip(t, "hello<|endoftext|>\n", 19);
	CU_ASSERT(ids.n > 3);
	for (size_t i = 0; i < ids.n; i++)
		CU_ASSERT(ids.v[i] < 267);
	tok_ids_free(&ids);
	tokenizer_free(t);
}

/* ---- save -> load ---------------------------------------------------------------------------- */

static void same_encodings(struct tokenizer *a, struct tokenizer *b, const char *text, size_t n)
{
	struct tok_ids x = { 0 }, y = { 0 };

	tokenizer_encode(a, text, n, &x);
	tokenizer_encode(b, text, n, &y);
	CU_ASSERT(x.n == y.n && !memcmp(x.v, y.v, x.n * sizeof(*x.v)));
	tok_ids_free(&x);
	tok_ids_free(&y);
}

static void test_save_load(void)
{
	struct tokenizer *t = corpus_tokenizer(), *u, *fx, *fy;
	const char *p = tmp_path("saved.json"), *q = tmp_path("fixture_saved.json");
	static const char chat[] = "<|user|>hi<|assistant|>hello<|endoftext|>\xff\x00 x";
	size_t n;
	char *s = make_corpus(50000, 31, &n);

	CU_ASSERT_EQUAL_FATAL(tokenizer_save(t, p, err, sizeof(err)), 0);
	u = tokenizer_load(p, err, sizeof(err));
	CU_ASSERT_FATAL(u != NULL);
	CU_ASSERT_EQUAL(tokenizer_vocab_size(u), tokenizer_vocab_size(t));
	CU_ASSERT_EQUAL(tokenizer_n_merges(u), tokenizer_n_merges(t));
	for (int i = 0; i < tokenizer_n_merges(t); i++) {
		uint32_t x[3], y[3];

		tokenizer_merge(t, i, &x[0], &x[1], &x[2]);
		tokenizer_merge(u, i, &y[0], &y[1], &y[2]);
		CU_ASSERT(!memcmp(x, y, sizeof(x)));
	}
	for (uint32_t id = 0; id < (uint32_t)tokenizer_vocab_size(t); id++) {
		const uint8_t *a, *b;
		size_t na, nb;

		CU_ASSERT_EQUAL(tokenizer_token_bytes(t, id, &a, &na), 0);
		CU_ASSERT_EQUAL(tokenizer_token_bytes(u, id, &b, &nb), 0);
		CU_ASSERT(na == nb && !memcmp(a, b, na));
		CU_ASSERT_EQUAL(tokenizer_is_special(t, id), tokenizer_is_special(u, id));
	}
	same_encodings(t, u, s, n);
	same_encodings(t, u, chat, sizeof(chat) - 1);
	tokenizer_free(u);

	/* a file read and written again keeps its encodings */
	fx = tokenizer_load(fixture("tiny_tokenizer_split.json"), err, sizeof(err));
	CU_ASSERT_FATAL(fx != NULL);
	CU_ASSERT_EQUAL_FATAL(tokenizer_save(fx, q, err, sizeof(err)), 0);
	fy = tokenizer_load(q, err, sizeof(err));
	CU_ASSERT_FATAL(fy != NULL);
	check_fixture(fy);
	same_encodings(fx, fy, s, n);
	tokenizer_free(fx);
	tokenizer_free(fy);
	free(s);
}

/* ---- special tokens and streaming ------------------------------------------------------------ */

static void test_special_tokens(void)
{
	struct tokenizer *t = corpus_tokenizer();
	int v = tokenizer_vocab_size(t);
	int eot = tokenizer_special_id(t, "<|endoftext|>"), pad = tokenizer_special_id(t, "<|pad|>");
	int user = tokenizer_special_id(t, "<|user|>"), asst = tokenizer_special_id(t, "<|assistant|>");
	static const char s[] = "ab<|user|>hi there<|assistant|><|pad|><|pad|>x<|endoftext|>";
	struct tok_ids ids;
	int seen[4] = { 0 };

	CU_ASSERT_EQUAL(eot, v - 4);
	CU_ASSERT_EQUAL(pad, v - 3);
	CU_ASSERT_EQUAL(user, v - 2);
	CU_ASSERT_EQUAL(asst, v - 1);
	CU_ASSERT_EQUAL(tokenizer_eot_id(t), eot);
	CU_ASSERT(tokenizer_is_special(t, (uint32_t)eot));
	CU_ASSERT(!tokenizer_is_special(t, 'a'));
	ids = round_trip(t, s, strlen(s));
	for (size_t i = 0; i < ids.n; i++)
		if (ids.v[i] >= (uint32_t)eot)
			seen[ids.v[i] - (uint32_t)eot]++;
	CU_ASSERT(seen[0] == 1 && seen[1] == 2 && seen[2] == 1 && seen[3] == 1);
	CU_ASSERT_EQUAL(ids.v[ids.n - 1], (uint32_t)eot);
	tok_ids_free(&ids);
	/* an incomplete or altered marker is ordinary text */
	ids = round_trip(t, "<|endoftext <|endoftext|", 24);
	for (size_t i = 0; i < ids.n; i++)
		CU_ASSERT(ids.v[i] < (uint32_t)eot);
	tok_ids_free(&ids);
}

/* Feeding any chunking of a text to a stream gives the one-shot encoding. */
static void test_streaming(void)
{
	struct tokenizer *t = corpus_tokenizer();
	size_t n;
	char *s = make_corpus(30000, 17, &n);
	static const char sp[] = "x<|endoftext|>y <|pad|><|pad|>\n\n  z's<|user|>";
	struct tok_ids whole = { 0 };

	/* specials and contractions where the chunks are cut */
	memcpy(s + 1000, sp, sizeof(sp) - 1);
	memcpy(s + 20000, "\xe6\x97\xa5\xf0\x9f\x98\x80 'll   \xff", 14);
	tokenizer_encode(t, s, n, &whole);
	rng = 4242;
	for (int it = 0; it < 40; it++) {
		struct tok_stream st;
		struct tok_ids got = { 0 };
		size_t max = it < 10 ? (size_t)it + 1 : 1 + rnd() % 5000;

		tok_stream_init(&st, t);
		for (size_t i = 0; i < n;) {
			size_t k = 1 + rnd() % max;

			if (k > n - i)
				k = n - i;
			tok_stream_feed(&st, s + i, k, &got);
			i += k;
		}
		tok_stream_finish(&st, &got);
		CU_ASSERT(got.n == whole.n && !memcmp(got.v, whole.v, got.n * sizeof(*got.v)));
		/* the stream is ready for another document */
		got.n = 0;
		tok_stream_feed(&st, "hello", 5, &got);
		tok_stream_finish(&st, &got);
		CU_ASSERT(got.n >= 1);
		tok_ids_free(&got);
		tok_stream_free(&st);
	}
	tok_ids_free(&whole);
	free(s);
}

/* ---- refused files --------------------------------------------------------------------------- */

static void expect_refused(const char *json, const char *needle)
{
	struct tokenizer *t = tokenizer_parse(json, strlen(json), "bad.json", err, sizeof(err));

	CU_ASSERT_PTR_NULL(t);
	if (t || !strstr(err, needle) || !strstr(err, "bad.json")) {
		fprintf(stderr, "\n  message \"%s\" lacks \"%s\" or the file name\n", t ? "" : err, needle);
		CU_FAIL("message");
	}
	tokenizer_free(t);
}

static void test_refused(void)
{
	const char *bl = "\"pre_tokenizer\": {\"type\": \"ByteLevel\"}";
	char buf[2048];
	struct tokenizer *t;
	struct tok_trainer *tr;

	t = tokenizer_load(tmp_path("missing.json"), err, sizeof(err));
	CU_ASSERT_PTR_NULL(t);
	CU_ASSERT(strstr(err, "missing.json") != NULL);
	expect_refused("{\"model\": ", "not valid JSON");
	expect_refused("[1, 2]", "not a JSON object");
	snprintf(buf, sizeof(buf), "{%s, \"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}", bl);
	expect_refused(buf, "model.type");
	snprintf(buf, sizeof(buf), "{%s, \"model\": {\"type\": \"Unigram\", \"vocab\": []}}", bl);
	expect_refused(buf, "model.type");
	snprintf(buf, sizeof(buf), "{%s, \"model\": {\"type\": \"BPE\", \"byte_fallback\": true, "
		 "\"vocab\": {}, \"merges\": []}}", bl);
	expect_refused(buf, "model.byte_fallback");
	snprintf(buf, sizeof(buf), "{%s, \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, "
		 "\"merges\": [\"a b\"]}}", bl);
	expect_refused(buf, "model.merges[0]");
	snprintf(buf, sizeof(buf), "{%s, \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, "
		 "\"ab\": 2}, \"merges\": [\"a b\"]}}", bl);
	expect_refused(buf, "model.vocab has no token for the byte");
	snprintf(buf, sizeof(buf), "{%s, \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -1}}}", bl);
	expect_refused(buf, "model.vocab[\"a\"]");
	expect_refused("{\"pre_tokenizer\": {\"type\": \"Metaspace\"}, \"model\": {\"type\": \"BPE\", "
		       "\"vocab\": {}, \"merges\": []}}", "pre_tokenizer.type");
	expect_refused("{\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true}, "
		       "\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}}",
		       "pre_tokenizer.add_prefix_space");
	expect_refused("{\"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": "
		       "\"Split\", \"pattern\": {\"Regex\": \"(\\\\w+\"}, \"behavior\": \"Isolated\", "
		       "\"invert\": false}, {\"type\": \"ByteLevel\", \"use_regex\": false}]}, "
		       "\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}}",
		       "pre_tokenizer.pretokenizers[0]: regex does not compile");
	expect_refused("{\"added_tokens\": [{\"id\": 0}], \"model\": {\"type\": \"BPE\"}}",
		       "added_tokens[0].content");
	/* training refuses a vocabulary too small for the bytes and the specials */
	tr = tok_trainer_new(NULL, 0, err, sizeof(err));
	CU_ASSERT_FATAL(tr != NULL);
	CU_ASSERT_PTR_NULL(tok_trainer_finish(tr, 100, err, sizeof(err)));
	CU_ASSERT(strstr(err, "vocabulary size 100") != NULL);
	tok_trainer_free(tr);
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "pretokenize_gpt2", test_pretokenize_gpt2 },
		{ "pretokenize_llama3", test_pretokenize_llama3 },
		{ "round_trip_random_bytes", test_round_trip_random_bytes },
		{ "round_trip_unicode", test_round_trip_unicode },
		{ "known_merges", test_known_merges },
		{ "training_determinism", test_training_determinism },
		{ "training_speed", test_training_speed },
		{ "fixture", test_fixture },
		{ "no special tokens", test_no_specials },
		{ "save_load", test_save_load },
		{ "special_tokens", test_special_tokens },
		{ "streaming", test_streaming },
		{ "refused", test_refused },
		{ NULL, NULL },
	};

	add_suite("tokenizer", cases);
}
