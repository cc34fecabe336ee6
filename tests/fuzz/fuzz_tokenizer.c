/*
 * tests/fuzz/fuzz_tokenizer.c - tokenizer.json (tokenizer_parse): the input is the file.  An accepted
 * tokenizer encodes a fixed text and the input itself (as bytes); whatever decodes must decode to the
 * text, and streaming in pieces gives the ids of encoding whole.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/tokenizer.h"
#include "common.h"

static void check_text(struct tokenizer *t, const void *text, size_t n)
{
	struct tok_ids ids = { 0 }, streamed = { 0 };
	struct tok_bytes back = { 0 };
	struct tok_stream st;
	char err[256];

	tokenizer_encode(t, text, n, &ids);
	if (tokenizer_decode(t, ids.v, ids.n, &back, err, sizeof(err)) == 0 &&
	    (back.n != n || memcmp(back.v, text, n))) {
		fprintf(stderr, "decode(encode(x)) != x for %zu bytes\n", n);
		for (size_t i = 0; i < ids.n; i++)
			fprintf(stderr, "%u ", ids.v[i]);
		fprintf(stderr, "\n%.*s\n", (int)back.n, (const char *)back.v);
		abort();
	}
	tok_stream_init(&st, t);
	for (size_t o = 0; o < n; o += 7)
		tok_stream_feed(&st, (const char *)text + o, n - o < 7 ? n - o : 7, &streamed);
	tok_stream_finish(&st, &streamed);
	tok_stream_free(&st);
	if (streamed.n != ids.n || (ids.n && memcmp(streamed.v, ids.v, ids.n * sizeof(*ids.v)))) {
		fprintf(stderr, "streamed ids differ from the whole text's\n");
		abort();
	}
	tok_ids_free(&ids);
	tok_ids_free(&streamed);
	tok_bytes_free(&back);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
	static const char text[] = "Hello, world! 12345 <|endoftext|> caf\xc3\xa9 \xff\xfe  \n\tend";
	char err[1024];
	struct tokenizer *t = tokenizer_parse((const char *)data, n, "tokenizer.json", err, sizeof(err));

	if (!t)
		return 0;
	for (int i = 0; i < tokenizer_vocab_size(t) && i < 4096; i++) {
		const uint8_t *p;
		size_t len;

		if (tokenizer_token_bytes(t, (uint32_t)i, &p, &len) == 0 && len)
			tokenizer_token_id(t, p, len);
	}
	check_text(t, text, sizeof(text) - 1);
	check_text(t, data, n < 512 ? n : 512);
	tokenizer_free(t);
	return 0;
}
