/*
 * data/tokenizer_int.h - what the pieces of the tokenizer share (not for use outside data/tokenizer*.c):
 * the memory and hash-map helpers, the Unicode classes and UTF-8, the GPT-2 byte table, the added-token
 * scanner, and struct tokenizer itself.
 *
 *   tokenizer_regex.c    a Sequence of Split regexes (PCRE2); uses none of the others
 *   tokenizer_unicode.c  Unicode letter/number/space classes (the table), UTF-8
 *   tokenizer.c          memory, hash maps, the GPT-2 byte table, a tokenizer's building blocks, queries
 *   tokenizer_encode.c   the pre-tokenizer, the added-token scanner, BPE encoding, decoding, streaming
 *   tokenizer_train.c    BPE training (incremental pair counts)
 *   tokenizer_json.c     Hugging Face tokenizer.json reading and writing
 * in that order: each uses only the ones above it (tests/test_layering.sh checks that no two files use
 * each other).
 */
#ifndef MOE_DATA_TOKENIZER_INT_H
#define MOE_DATA_TOKENIZER_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "data/tokenizer.h"
#include "launch/rng.h"

#define TOK_MAX_ID (1 << 24)		/* ids beyond this are refused when reading a file */
#define NO_RANK UINT32_MAX

/* ---- memory (out of memory aborts, naming the size) ------------------------------------------ */

void *tok_xrealloc(void *p, size_t n);
void *tok_xcalloc(size_t n, size_t size);
/* Make room for need elements of elem bytes in *p (capacity *cap, doubled as needed). */
void tok_reserve(void **p, size_t *cap, size_t need, size_t elem);
#define RESERVE(ptr, cap, need) tok_reserve((void **)&(ptr), &(cap), (need), sizeof(*(ptr)))

static inline void ids_push(struct tok_ids *a, uint32_t id)
{
	if (a->n == a->cap)
		RESERVE(a->v, a->cap, a->n + 1);
	a->v[a->n++] = id;
}

static inline void bytes_append(struct tok_bytes *b, const void *p, size_t n)
{
	RESERVE(b->v, b->cap, b->n + n);
	if (n)
		memcpy(b->v + b->n, p, n);
	b->n += n;
}

/* ---- hash maps ------------------------------------------------------------------------------- */

static inline uint64_t hash_bytes(const uint8_t *p, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ULL ^ n;

	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ULL;
	return mix64(h);
}

/* Byte string -> uint64 value, open addressing; the keys live in an arena. */
struct bmap_entry {
	uint64_t hash;
	uint64_t val;
	uint64_t off;
	size_t len;
};

struct bmap {
	uint32_t *slot;		/* entry index + 1; 0 = empty */
	size_t mask;
	struct bmap_entry *e;
	size_t n, cap;
	uint8_t *arena;
	size_t arena_n, arena_cap;
};

void bmap_free(struct bmap *m);
void bmap_clear(struct bmap *m);
/* Entry index of key p[0..n), or -1. */
long bmap_find(const struct bmap *m, const uint8_t *p, size_t n, uint64_t h);
/* Insert a key known to be absent; returns its entry index. */
size_t bmap_insert(struct bmap *m, const uint8_t *p, size_t n, uint64_t h, uint64_t val);

static inline const uint8_t *bmap_key(const struct bmap *m, size_t i)
{
	return m->arena + m->e[i].off;
}

/* (a, b) pair of ids -> uint32 value, open addressing. */
struct pmap {
	uint64_t *key;
	uint32_t *val;		/* UINT32_MAX = empty */
	size_t mask, n;
};

void pmap_free(struct pmap *m);
uint32_t pmap_get(const struct pmap *m, uint32_t a, uint32_t b);
/* Set (a, b) -> v unless present; returns the value now stored. */
uint32_t pmap_put(struct pmap *m, uint32_t a, uint32_t b, uint32_t v);

/* ---- Unicode classes and UTF-8 (tokenizer_unicode.c), the GPT-2 byte table (tokenizer.c) ------- */

enum { U_OTHER, U_L, U_N, U_WS, U_END };

int uni_class(uint32_t cp);

/* The pre-tokenizer asks this of every character: ASCII without a call. */
static inline int cp_class(uint32_t cp)
{
	if (cp < 0x80) {
		if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z')
			return U_L;
		if (cp >= '0' && cp <= '9')
			return U_N;
		if (cp == ' ' || (cp >= 9 && cp <= 13))
			return U_WS;
		return U_OTHER;
	}
	return uni_class(cp);
}

/*
 * The UTF-8 sequence at s[0..n): its length (> 0) and code point; 0 when s holds only a valid prefix
 * of a sequence cut by n; -1 when s[0] does not start a valid sequence (overlong forms, surrogates and
 * code points past U+10FFFF are invalid).
 */
static inline int utf8_decode(const uint8_t *s, size_t n, uint32_t *cp)
{
	uint8_t c = s[0];
	uint32_t v;
	int len;

	if (c < 0x80) {
		*cp = c;
		return 1;
	}
	if (c >= 0xc2 && c <= 0xdf) {
		len = 2;
		v = c & 0x1f;
	} else if (c >= 0xe0 && c <= 0xef) {
		len = 3;
		v = c & 0x0f;
	} else if (c >= 0xf0 && c <= 0xf4) {
		len = 4;
		v = c & 0x07;
	} else {
		return -1;
	}
	for (int i = 1; i < len; i++) {
		uint8_t d;

		if ((size_t)i >= n)
			return 0;
		d = s[i];
		if ((d & 0xc0) != 0x80)
			return -1;
		if (i == 1 && ((c == 0xe0 && d < 0xa0) || (c == 0xed && d > 0x9f) ||
			       (c == 0xf0 && d < 0x90) || (c == 0xf4 && d > 0x8f)))
			return -1;
		v = v << 6 | (d & 0x3f);
	}
	*cp = v;
	return len;
}

size_t utf8_encode(uint32_t cp, uint8_t *out);
/* Bytes -> the printable string of their characters (NUL-terminated, malloc'd). */
char *bytes_to_visible(const uint8_t *p, size_t n);
/* A printable string -> bytes (into out, which holds strlen(s) bytes); -1 if a character has no byte. */
long visible_to_bytes(const char *s, uint8_t *out);

/* ---- a Sequence of Split pre-tokenizers (tokenizer_regex.c) ---------------------------------- */

#define TOK_MAX_SPLITS 8

struct tok_splits;
/* Compile the patterns (copied); NULL with err when one does not compile. */
struct tok_splits *tok_splits_new(const char *const *patterns, int n, char *err, size_t errlen);
void tok_splits_free(struct tok_splits *sp);
int tok_splits_count(const struct tok_splits *sp);
const char *tok_splits_pattern(const struct tok_splits *sp, int i);
/* The pieces of s[0..n): their end offsets in *ends (valid until the next call); returns their count. */
size_t tok_splits_run(struct tok_splits *sp, const uint8_t *s, size_t n, const size_t **ends);

/* ---- added tokens (tokenizer.c) and the scanner (tokenizer_encode.c) ------------------------ */

struct sp_tok {
	const uint8_t *s;
	size_t len;
	uint32_t id;
};

/* The added tokens, longest first, for leftmost-longest matching. */
struct specials {
	int n;
	struct sp_tok *tok;
	bool first[256];
};

void specials_build(struct specials *sp);

struct scan_cb {
	void (*piece)(void *ctx, const uint8_t *p, size_t n);
	void (*special)(void *ctx, uint32_t id);
	void *ctx;
};

/*
 * Cut s[0..n) at the added tokens and pre-tokenize the stretches between them, calling back for each
 * piece and added token in order.  final: n is the end of the text.  Otherwise stops before the first
 * piece whose extent depends on what follows n; returns the number of bytes consumed.  splits: the
 * regexes of mode TOK_PRETOK_SPLITS (NULL for the others).
 */
size_t tok_scan(const struct specials *sp, enum tok_pretok mode, struct tok_splits *splits,
		const uint8_t *s, size_t n, bool final, const struct scan_cb *cb);

/* ---- the tokenizer ---------------------------------------------------------------------------- */

enum { TK_NONE, TK_BYTES, TK_RAW, TK_ADDED };

struct token {
	uint64_t off;		/* bytes in the arena */
	uint32_t len;
	uint8_t kind;		/* TK_BYTES: byte-level; TK_RAW: a vocab string that is not byte-level */
	bool in_vocab;		/* listed in model.vocab (added tokens may be only in added_tokens) */
};

struct added {
	uint32_t id;
	bool special, single_word, lstrip, rstrip, normalized;
};

struct sym;			/* the encoder's scratch (tokenizer_encode.c) */
struct hent;

struct tokenizer {
	int vocab_size;
	struct token *tok;
	size_t tok_cap;
	uint8_t *arena;
	size_t arena_n, arena_cap;
	struct bmap by_bytes;		/* TK_BYTES tokens: bytes -> id */
	uint32_t byte_id[256];

	int n_merges;
	size_t merges_cap;
	uint32_t (*merges)[3];		/* a, b, result; index = rank */
	struct pmap rank_of;		/* (a, b) -> rank */

	int n_added;
	size_t added_cap;
	struct added *added;		/* in file order */
	struct specials sp;

	enum tok_pretok pretok;
	struct tok_splits *splits;	/* TOK_PRETOK_SPLITS: the regexes */
	bool ignore_merges;
	char *warning;

	/* post_processor TemplateProcessing: the ids its "single" template puts before and after a
	 * text ($A), and the post_processor object as read (written back by tokenizer_save) */
	struct tok_ids tmpl_pre, tmpl_post;
	char *tmpl_json;

	/* encoding scratch and the word cache */
	struct bmap cache;		/* piece -> (offset into cache_ids) << 8 | count */
	uint32_t *cache_ids;
	size_t cache_n, cache_cap;
	struct sym *sym;
	size_t sym_cap;
	struct hent *heap;
	size_t heap_cap;
};

struct tokenizer *tok_alloc(void);
/* Give id its bytes (the id must have none yet). */
void tok_set(struct tokenizer *t, uint32_t id, const uint8_t *p, size_t n, int kind);
void tok_add_added(struct tokenizer *t, const struct added *a);
void tok_add_merge(struct tokenizer *t, uint32_t a, uint32_t b, uint32_t r);
/* Index the byte-level tokens by their bytes (the first id wins a tie). */
void tok_index_vocab(struct tokenizer *t);
long tok_lookup(const struct tokenizer *t, const uint8_t *p, size_t n);
/* After the vocabulary and the added tokens are in: the byte table and the added-token matcher. */
int tok_finish_build(struct tokenizer *t, const char *name, char *err, size_t errlen);

static inline const uint8_t *tok_ptr(const struct tokenizer *t, uint32_t id)
{
	return t->arena + t->tok[id].off;
}

#endif
