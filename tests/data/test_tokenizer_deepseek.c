/*
 * tests/data/test_tokenizer_deepseek.c - DeepSeek-V3's kind of tokenizer.json (a Sequence of three Split
 * regexes and a ByteLevel, its added tokens, special and not) against Hugging Face `tokenizers` itself:
 * tests/data/fixtures/deepseek_v3_tokenizer.json and deepseek_v3_texts.jsonl were written by that
 * library (make_deepseek_v3_tokenizer.py, tokenizers 0.23.3) with the ids it gives each text (digits,
 * CJK, kana, Hangul, emoji with joiners, combining marks, CRLF, NEL/NBSP/ideographic spaces,
 * punctuation runs, added tokens mid-text).  moe must give the same ids, decode them to the same text,
 * give them again when the text is streamed in small chunks, and again after saving and reloading the
 * tokenizer.  Unknown or broken Split patterns are refused naming the key.  The post_processor's
 * TemplateProcessing (a BOS before each text, what add_special_tokens=True adds) is read, kept on
 * saving, applied by the shard writer around each document, and refused when malformed.
 */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "data/shard.h"
#include "data/tokenizer.h"

static char err[1024];

static void tok_ids_push_test(struct tok_ids *a, uint32_t id)
{
	if (a->n == a->cap) {
		a->cap = a->cap ? 2 * a->cap : 64;
		a->v = realloc(a->v, a->cap * sizeof(*a->v));
		CU_ASSERT_PTR_NOT_NULL_FATAL(a->v);
	}
	a->v[a->n++] = id;
}

/* tests/data/fixtures/NAME in the source tree */
#define fixture(name) src_path("tests/data/fixtures/" name)

struct sample {
	char *text;
	uint32_t *ids;
	size_t n;
};

static struct sample *samples;
static int n_samples;

static void load_samples(void)
{
	FILE *f = fopen(fixture("deepseek_v3_texts.jsonl"), "r");
	char *line = NULL;
	size_t cap = 0;

	CU_ASSERT_PTR_NOT_NULL_FATAL(f);
	n_samples = 0;
	while (getline(&line, &cap, f) > 0) {
		cJSON *o = cJSON_Parse(line), *ids, *e;
		struct sample *s;

		CU_ASSERT_PTR_NOT_NULL_FATAL(o);
		samples = realloc(samples, sizeof(*samples) * (n_samples + 1));
		s = &samples[n_samples++];
		s->text = strdup(cJSON_GetObjectItem(o, "text")->valuestring);
		ids = cJSON_GetObjectItem(o, "ids");
		s->n = (size_t)cJSON_GetArraySize(ids);
		s->ids = test_xmalloc(sizeof(uint32_t) * (s->n + 1));
		s->n = 0;
		cJSON_ArrayForEach(e, ids)
			s->ids[s->n++] = (uint32_t)e->valuedouble;
		/* what the library decodes the ids to is the text itself (checked when written) */
		CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItem(o, "decoded")->valuestring, s->text);
		cJSON_Delete(o);
	}
	free(line);
	fclose(f);
	CU_ASSERT(n_samples >= 20);
}

static void free_samples(void)
{
	for (int i = 0; i < n_samples; i++) {
		free(samples[i].text);
		free(samples[i].ids);
	}
	free(samples);
	samples = NULL;
	n_samples = 0;
}

static int same_ids(const struct tok_ids *a, const struct sample *s, const char *how)
{
	/* the empty sample: a->v (and back.v below) may be NULL, which memcmp must not get, even for 0 bytes */
	if (a->n == s->n && (!s->n || !memcmp(a->v, s->ids, sizeof(uint32_t) * s->n)))
		return 1;
	fprintf(stderr, "\n  %s: \"%s\": %zu ids, `tokenizers` gives %zu\n   moe:", how, s->text, a->n,
		s->n);
	for (size_t i = 0; i < a->n && i < 40; i++)
		fprintf(stderr, " %u", a->v[i]);
	fprintf(stderr, "\n   hf: ");
	for (size_t i = 0; i < s->n && i < 40; i++)
		fprintf(stderr, " %u", s->ids[i]);
	fprintf(stderr, "\n");
	return 0;
}

/* Every sample: the ids, the text decoded, and the ids again streamed in chunks of 1..7 bytes. */
static int check_all(struct tokenizer *t)
{
	int bad = 0;

	for (int i = 0; i < n_samples; i++) {
		const struct sample *s = &samples[i];
		size_t len = strlen(s->text);
		struct tok_ids ids = { 0 }, st = { 0 };
		struct tok_bytes back = { 0 };
		struct tok_stream ts;

		tokenizer_encode(t, s->text, len, &ids);
		bad += !same_ids(&ids, s, "encode");
		CU_ASSERT_EQUAL(tokenizer_decode(t, s->ids, s->n, &back, err, sizeof(err)), 0);
		if (back.n != len || (len && memcmp(back.v, s->text, len))) {
			fprintf(stderr, "\n  decode of \"%s\" differs\n", s->text);
			bad++;
		}
		tok_stream_init(&ts, t);
		for (size_t p = 0, step = 1 + (size_t)i % 7; p < len; p += step)
			tok_stream_feed(&ts, s->text + p, p + step <= len ? step : len - p, &st);
		tok_stream_finish(&ts, &st);
		tok_stream_free(&ts);
		bad += !same_ids(&st, s, "streamed");
		tok_ids_free(&ids);
		tok_ids_free(&st);
		tok_bytes_free(&back);
	}
	return bad;
}

static void test_matches_hf(void)
{
	struct tokenizer *t = tokenizer_load(fixture("deepseek_v3_tokenizer.json"), err, sizeof(err));

	if (!t)
		fprintf(stderr, "\n  %s\n", err);
	CU_ASSERT_PTR_NOT_NULL_FATAL(t);
	CU_ASSERT_EQUAL(tokenizer_pretok(t), TOK_PRETOK_SPLITS);
	CU_ASSERT_EQUAL(tokenizer_special_id(t, "<｜begin▁of▁sentence｜>"), 0);
	CU_ASSERT_EQUAL(tokenizer_special_id(t, "<｜end▁of▁sentence｜>"), 1);
	CU_ASSERT(tokenizer_is_special(t, 0));
	CU_ASSERT(tokenizer_special_id(t, "<think>") > 0);  /* added, not special: see save_reload */
	CU_ASSERT(tokenizer_is_added(t, (uint32_t)tokenizer_special_id(t, "<think>")));
	CU_ASSERT(!tokenizer_is_special(t, (uint32_t)tokenizer_special_id(t, "<think>")));
	CU_ASSERT(tokenizer_is_added(t, 1) && tokenizer_is_special(t, 1));
	CU_ASSERT(!tokenizer_is_added(t, 42) && !tokenizer_is_special(t, 42));
	/* nothing of the file is left unapplied: the post_processor's BOS is the template */
	CU_ASSERT_PTR_NULL(tokenizer_warning(t));
	load_samples();
	CU_ASSERT_EQUAL(check_all(t), 0);
	free_samples();
	tokenizer_free(t);
}

/* The added tokens keep their flags: <think> is added but not special, the BOS special. */
static void check_flags(const char *path)
{
	char *text = test_read_file(path, NULL);
	cJSON *root, *e;
	int seen = 0;

	root = cJSON_Parse(text);
	cJSON_ArrayForEach(e, cJSON_GetObjectItem(root, "added_tokens")) {
		const char *c = cJSON_GetObjectItem(e, "content")->valuestring;

		if (!strcmp(c, "<think>")) {
			seen++;
			CU_ASSERT(cJSON_IsFalse(cJSON_GetObjectItem(e, "special")));
		}
		if (!strcmp(c, "<｜begin▁of▁sentence｜>")) {
			seen++;
			CU_ASSERT(cJSON_IsTrue(cJSON_GetObjectItem(e, "special")));
		}
	}
	CU_ASSERT_EQUAL(seen, 2);
	CU_ASSERT_EQUAL(cJSON_GetArraySize(cJSON_GetObjectItem(cJSON_GetObjectItem(root,
					"pre_tokenizer"), "pretokenizers")), 4);
	cJSON_Delete(root);
	free(text);
}

/* Saved by moe and read back: the same Splits, the same ids. */
static void test_save_reload(void)
{
	struct tokenizer *t = tokenizer_load(fixture("deepseek_v3_tokenizer.json"), err, sizeof(err));
	struct tokenizer *u;

	CU_ASSERT_PTR_NOT_NULL_FATAL(t);
	CU_ASSERT_EQUAL_FATAL(tokenizer_save(t, tmp_path("ds.json"), err, sizeof(err)), 0);
	check_flags(tmp_path("ds.json"));
	u = tokenizer_load(tmp_path("ds.json"), err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(u);
	CU_ASSERT_EQUAL(tokenizer_pretok(u), TOK_PRETOK_SPLITS);
	load_samples();
	CU_ASSERT_EQUAL(check_all(u), 0);
	free_samples();
	tokenizer_free(t);
	tokenizer_free(u);
}

/* Bytes that are not UTF-8 (which `tokenizers` cannot take) still encode, and decode back. */
static void test_invalid_utf8(void)
{
	static const char text[] = "ok\xff\xfe 12\xc3(\x80\xe4\xb8 深\xe5\xba";
	struct tokenizer *t = tokenizer_load(fixture("deepseek_v3_tokenizer.json"), err, sizeof(err));
	struct tok_ids ids = { 0 };
	struct tok_bytes back = { 0 };

	CU_ASSERT_PTR_NOT_NULL_FATAL(t);
	tokenizer_encode(t, text, sizeof(text) - 1, &ids);
	CU_ASSERT(ids.n > 0);
	CU_ASSERT_EQUAL(tokenizer_decode(t, ids.v, ids.n, &back, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(back.n, sizeof(text) - 1);
	CU_ASSERT(back.n == sizeof(text) - 1 && !memcmp(back.v, text, back.n));
	tok_ids_free(&ids);
	tok_bytes_free(&back);
	tokenizer_free(t);
}

/* The template's ids: the BOS (id 0) before a text, nothing after. */
static void check_template(const struct tokenizer *t)
{
	const uint32_t *pre, *post;
	size_t n_pre, n_post;

	tokenizer_template(t, &pre, &n_pre, &post, &n_post);
	CU_ASSERT_EQUAL_FATAL(n_pre, 1);
	CU_ASSERT_EQUAL(pre[0], 0);
	CU_ASSERT_EQUAL(n_post, 0);
}

static void test_template(void)
{
	struct tokenizer *t = tokenizer_load(fixture("deepseek_v3_tokenizer.json"), err, sizeof(err));
	struct tokenizer *u;

	CU_ASSERT_PTR_NOT_NULL_FATAL(t);
	check_template(t);
	CU_ASSERT_EQUAL(tokenizer_eot_id(t), 1);  /* <｜end▁of▁sentence｜> */
	CU_ASSERT_EQUAL_FATAL(tokenizer_save(t, tmp_path("ds_tmpl.json"), err, sizeof(err)), 0);
	u = tokenizer_load(tmp_path("ds_tmpl.json"), err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(u);
	check_template(u);
	tokenizer_free(u);
	tokenizer_free(t);
}

/* Two documents through the shard writer: BOS doc EOS BOS doc, and without the template doc EOS doc. */
static void check_shard_docs(struct tokenizer *t, bool templ)
{
	static const char *const docs[] = { "Hello world!", "The end.\n" };
	struct tok_ids want = { 0 }, ids = { 0 };
	struct shard_set *set = shard_set_new(t, tmp_path(""), tmp_path(""), 1000, 1, err, sizeof(err));
	struct shard sh;

	CU_ASSERT_PTR_NOT_NULL_FATAL(set);
	if (!templ)
		shard_set_no_template(set);
	for (int d = 0; d < 2; d++) {
		CU_ASSERT_EQUAL(shard_set_add(set, false, docs[d], strlen(docs[d]), err, sizeof(err)), 0);
		if (d)
			tok_ids_push_test(&want, 1);
		if (templ)
			tok_ids_push_test(&want, 0);
		tokenizer_encode(t, docs[d], strlen(docs[d]), &ids);
		for (size_t i = 0; i < ids.n; i++)
			tok_ids_push_test(&want, ids.v[i]);
		ids.n = 0;
	}
	CU_ASSERT_EQUAL_FATAL(shard_set_finish(set, err, sizeof(err)), 0);
	shard_set_free(set);
	CU_ASSERT_EQUAL_FATAL(shard_open(&sh, tmp_path("train_00000.bin"), 0, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(sh.n_tokens, want.n);
	for (uint64_t i = 0; i < sh.n_tokens && i < want.n; i++)
		CU_ASSERT_EQUAL(shard_token(&sh, i), want.v[i]);
	shard_close(&sh);
	unlink(tmp_path("train_00000.bin"));
	tok_ids_free(&want);
	tok_ids_free(&ids);
}

static void test_template_in_shards(void)
{
	struct tokenizer *t = tokenizer_load(fixture("deepseek_v3_tokenizer.json"), err, sizeof(err));

	CU_ASSERT_PTR_NOT_NULL_FATAL(t);
	check_shard_docs(t, true);
	check_shard_docs(t, false);
	tokenizer_free(t);
}

/* The fixture with its post_processor.single replaced by single (JSON): refused naming want. */
static void check_bad_template(const char *single, const char *want)
{
	char *text = test_read_file(fixture("deepseek_v3_tokenizer.json"), NULL), *out;
	cJSON *root, *post;
	struct tokenizer *t;

	root = cJSON_Parse(text);
	post = cJSON_GetObjectItem(root, "post_processor");
	cJSON_ReplaceItemInObject(post, "single", cJSON_Parse(single));
	out = cJSON_PrintUnformatted(root);
	t = tokenizer_parse(out, strlen(out), "bad.json", err, sizeof(err));
	CU_ASSERT_PTR_NULL(t);
	if (!strstr(err, want))
		fprintf(stderr, "\n  error \"%s\" does not name \"%s\"\n", err, want);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "bad.json"));
	CU_ASSERT_PTR_NOT_NULL(strstr(err, want));
	tokenizer_free(t);
	free(out);
	cJSON_Delete(root);
	free(text);
}

static void test_template_refused(void)
{
	check_bad_template("{}", "post_processor.single is an object");
	check_bad_template("[{\"SpecialToken\": {\"id\": \"<x>\"}}, {\"Sequence\": {\"id\": \"A\"}}]",
			   "post_processor.single[0] names \"<x>\"");
	check_bad_template("[{\"Sequence\": {\"id\": \"B\"}}]", "post_processor.single[0]");
	check_bad_template("[{\"Sequence\": {\"id\": \"A\"}}, {\"Sequence\": {\"id\": \"A\"}}]",
			   "post_processor.single[1]");
	check_bad_template("[{\"SpecialToken\": {\"id\": \"<｜begin▁of▁sentence｜>\"}}]",
			   "post_processor.single holds no sequence");
	check_bad_template("[{\"Other\": {}}, {\"Sequence\": {\"id\": \"A\"}}]",
			   "post_processor.single[0] is neither");
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "DeepSeek-V3's Splits + added tokens: ids and text as HF tokenizers", test_matches_hf },
		{ "saved and reloaded: the same ids", test_save_reload },
		{ "invalid UTF-8 still round trips", test_invalid_utf8 },
		{ "post_processor template: BOS before a text, kept on saving", test_template },
		{ "the shard writer puts the template around each document", test_template_in_shards },
		{ "malformed post_processor templates refused naming the key", test_template_refused },
		{ NULL, NULL },
	};

	add_suite("tokenizer_deepseek", cases);
}
