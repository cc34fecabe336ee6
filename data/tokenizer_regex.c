/*
 * data/tokenizer_regex.c - a Sequence of Split pre-tokenizers (Hugging Face's Split with behavior
 * "Isolated"), by PCRE2: each Split cuts every piece the one before it produced into its matches and
 * the stretches between them, each a piece of its own; a match never crosses a piece's edges (the
 * piece is the whole subject, so a lookahead sees the piece's end as the text's end), as in `tokenizers`.
 *
 * Patterns compile with PCRE2_UTF | PCRE2_UCP (\p{..} and \s, \w, \d by Unicode properties) and
 * PCRE2_MATCH_INVALID_UTF: bytes that are not valid UTF-8 (which `tokenizers` never sees, its input
 * being a str) match nothing and stay pieces between the matches, so every byte string still encodes.
 * Oniguruma (the regex engine of `tokenizers`) and PCRE2 agree on these patterns' constructs (\s under
 * UCP matches U+0085 and the Z separators in both, checked); their Unicode versions may differ (PCRE2
 * 10.42: Unicode 14), which moves only characters assigned since.
 *
 * This file uses nothing of the other tokenizer files (they use it): its memory is its own.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#define _POSIX_C_SOURCE 200809L

#include "data/tokenizer_int.h"

#include <stdio.h>
#include <stdlib.h>

#include <pcre2.h>

struct tok_splits {
	int n;
	char *pattern[TOK_MAX_SPLITS];	/* as given (for writing tokenizer.json back) */
	pcre2_code *re[TOK_MAX_SPLITS];
	pcre2_match_data *md;
	size_t *a, *b;			/* piece ends, ping-pong between the levels */
	size_t cap;
};

static void *xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);

	if (!q) {
		fprintf(stderr, "tokenizer: out of memory (%zu bytes)\n", n);
		abort();
	}
	return q;
}

struct tok_splits *tok_splits_new(const char *const *patterns, int n, char *err, size_t errlen)
{
	struct tok_splits *sp;

	if (n < 1 || n > TOK_MAX_SPLITS) {
		snprintf(err, errlen, "%d Split pre-tokenizers (1 to %d are supported)", n,
			 TOK_MAX_SPLITS);
		return NULL;
	}
	sp = xrealloc(NULL, sizeof(*sp));
	memset(sp, 0, sizeof(*sp));
	for (int i = 0; i < n; i++) {
		int code;
		PCRE2_SIZE at;

		sp->pattern[i] = xrealloc(NULL, strlen(patterns[i]) + 1);
		strcpy(sp->pattern[i], patterns[i]);
		sp->n = i + 1;
		sp->re[i] = pcre2_compile((PCRE2_SPTR)patterns[i], PCRE2_ZERO_TERMINATED,
					  PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &code, &at,
					  NULL);
		if (!sp->re[i]) {
			PCRE2_UCHAR msg[256];

			pcre2_get_error_message(code, msg, sizeof(msg));
			snprintf(err, errlen, "pretokenizers[%d]: regex does not compile: %s (at %zu)",
				 i, (const char *)msg, (size_t)at);
			tok_splits_free(sp);
			return NULL;
		}
		pcre2_jit_compile(sp->re[i], PCRE2_JIT_COMPLETE);  /* optional: a speed-up */
	}
	sp->md = pcre2_match_data_create(1, NULL);
	return sp;
}

void tok_splits_free(struct tok_splits *sp)
{
	if (!sp)
		return;
	for (int i = 0; i < sp->n; i++) {
		free(sp->pattern[i]);
		pcre2_code_free(sp->re[i]);
	}
	pcre2_match_data_free(sp->md);
	free(sp->a);
	free(sp->b);
	free(sp);
}

int tok_splits_count(const struct tok_splits *sp)
{
	return sp->n;
}

const char *tok_splits_pattern(const struct tok_splits *sp, int i)
{
	return sp->pattern[i];
}

/* Room for k + 1 ends in both arrays (the level being read and the one being written). */
static void reserve(struct tok_splits *sp, size_t k)
{
	if (k < sp->cap)
		return;
	sp->cap = sp->cap ? 2 * sp->cap : 256;
	sp->a = xrealloc(sp->a, sp->cap * sizeof(size_t));
	sp->b = xrealloc(sp->b, sp->cap * sizeof(size_t));
}

static void emit(struct tok_splits *sp, int to_b, size_t *k, size_t end)
{
	reserve(sp, *k);
	(to_b ? sp->b : sp->a)[(*k)++] = end;
}

/* The ends of the matches of the level's regex in s[lo, hi) and of the stretches between them. */
static void split_piece(struct tok_splits *sp, int level, const uint8_t *s, size_t lo, size_t hi,
			int to_b, size_t *k)
{
	PCRE2_SIZE *ov = pcre2_get_ovector_pointer(sp->md);
	size_t at = 0, len = hi - lo, last = 0;

	while (at < len) {
		int rc = pcre2_match(sp->re[level], (PCRE2_SPTR)(s + lo), len, at, 0, sp->md, NULL);

		if (rc < 0)
			break;
		if (ov[1] == ov[0]) {	/* an empty match cuts nothing: look one character on */
			at = ov[1] + 1;
			while (at < len && (s[lo + at] & 0xc0) == 0x80)
				at++;
			continue;
		}
		if (ov[0] > last)
			emit(sp, to_b, k, lo + ov[0]);
		emit(sp, to_b, k, lo + ov[1]);
		last = at = ov[1];
	}
	if (last < len)
		emit(sp, to_b, k, hi);
}

size_t tok_splits_run(struct tok_splits *sp, const uint8_t *s, size_t n, const size_t **ends)
{
	size_t k = 0;
	int in_b = 0;

	reserve(sp, 0);
	*ends = sp->a;
	if (!n)
		return 0;
	sp->a[k++] = n;
	for (int level = 0; level < sp->n; level++) {
		size_t m = 0, lo = 0;

		for (size_t i = 0; i < k; i++) {
			size_t hi = (in_b ? sp->b : sp->a)[i];

			split_piece(sp, level, s, lo, hi, !in_b, &m);
			lo = hi;
		}
		k = m;
		in_b = !in_b;
	}
	*ends = in_b ? sp->b : sp->a;
	return k;
}
