/*
 * data/tokenizer.c - byte-level BPE (see tokenizer.h): the tokenizer's memory, its hash maps, GPT-2's
 * byte <-> printable character table, the building blocks of a tokenizer, and the queries.  The other
 * pieces (data/tokenizer_int.h lists them): the Unicode tables, encoding, training, tokenizer.json.
 */
#define _POSIX_C_SOURCE 200809L

#include "data/tokenizer_int.h"

#include <stdio.h>
#include <stdlib.h>

const char *const tokenizer_default_specials[TOKENIZER_N_DEFAULT_SPECIALS] = {
	"<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>",
};

/* ---- memory ---------------------------------------------------------------------------------- */

void *tok_xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);

	if (!q) {
		fprintf(stderr, "tokenizer: out of memory (%zu bytes)\n", n);
		abort();
	}
	return q;
}

void *tok_xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);

	if (!p) {
		fprintf(stderr, "tokenizer: out of memory (%zu x %zu bytes)\n", n, size);
		abort();
	}
	return p;
}

void tok_reserve(void **p, size_t *cap, size_t need, size_t elem)
{
	size_t c;

	if (need <= *cap)
		return;
	c = *cap ? *cap : 16;
	while (c < need)
		c *= 2;
	*p = tok_xrealloc(*p, c * elem);
	*cap = c;
}

void tok_ids_free(struct tok_ids *a)
{
	free(a->v);
	a->v = NULL;
	a->n = a->cap = 0;
}

void tok_bytes_free(struct tok_bytes *b)
{
	free(b->v);
	b->v = NULL;
	b->n = b->cap = 0;
}

/* ---- hashing --------------------------------------------------------------------------------- */

void bmap_free(struct bmap *m)
{
	free(m->slot);
	free(m->e);
	free(m->arena);
	memset(m, 0, sizeof(*m));
}

void bmap_clear(struct bmap *m)
{
	if (m->slot)
		memset(m->slot, 0, (m->mask + 1) * sizeof(*m->slot));
	m->n = 0;
	m->arena_n = 0;
}

long bmap_find(const struct bmap *m, const uint8_t *p, size_t n, uint64_t h)
{
	if (!m->slot)
		return -1;
	for (size_t i = h & m->mask;; i = (i + 1) & m->mask) {
		uint32_t s = m->slot[i];
		const struct bmap_entry *e;

		if (!s)
			return -1;
		e = &m->e[s - 1];
		if (e->hash == h && e->len == n && !memcmp(m->arena + e->off, p, n))
			return (long)(s - 1);
	}
}

static void bmap_rehash(struct bmap *m, size_t slots)
{
	free(m->slot);
	m->slot = tok_xcalloc(slots, sizeof(*m->slot));
	m->mask = slots - 1;
	for (size_t k = 0; k < m->n; k++) {
		size_t i = m->e[k].hash & m->mask;

		while (m->slot[i])
			i = (i + 1) & m->mask;
		m->slot[i] = (uint32_t)(k + 1);
	}
}

size_t bmap_insert(struct bmap *m, const uint8_t *p, size_t n, uint64_t h, uint64_t val)
{
	size_t k = m->n, i;

	if (!m->slot || 2 * (m->n + 1) > m->mask + 1)
		bmap_rehash(m, m->slot ? 2 * (m->mask + 1) : 1024);
	RESERVE(m->e, m->cap, m->n + 1);
	RESERVE(m->arena, m->arena_cap, m->arena_n + n);
	if (n)
		memcpy(m->arena + m->arena_n, p, n);
	m->e[k] = (struct bmap_entry){ .hash = h, .val = val, .off = m->arena_n, .len = n };
	m->arena_n += n;
	m->n++;
	for (i = h & m->mask; m->slot[i]; i = (i + 1) & m->mask)
		;
	m->slot[i] = (uint32_t)(k + 1);
	return k;
}

static uint64_t pair_key(uint32_t a, uint32_t b)
{
	return (uint64_t)a << 32 | b;
}

void pmap_free(struct pmap *m)
{
	free(m->key);
	free(m->val);
	memset(m, 0, sizeof(*m));
}

uint32_t pmap_get(const struct pmap *m, uint32_t a, uint32_t b)
{
	uint64_t k = pair_key(a, b);

	if (!m->key)
		return UINT32_MAX;
	for (size_t i = mix64(k) & m->mask;; i = (i + 1) & m->mask) {
		if (m->val[i] == UINT32_MAX)
			return UINT32_MAX;
		if (m->key[i] == k)
			return m->val[i];
	}
}

static void pmap_grow(struct pmap *m)
{
	size_t old = m->key ? m->mask + 1 : 0, slots = old ? 2 * old : 1024;
	uint64_t *key = m->key;
	uint32_t *val = m->val;

	m->key = tok_xcalloc(slots, sizeof(*m->key));
	m->val = tok_xcalloc(slots, sizeof(*m->val));
	memset(m->val, 0xff, slots * sizeof(*m->val));
	m->mask = slots - 1;
	for (size_t j = 0; j < old; j++) {
		size_t i;

		if (val[j] == UINT32_MAX)
			continue;
		for (i = mix64(key[j]) & m->mask; m->val[i] != UINT32_MAX; i = (i + 1) & m->mask)
			;
		m->key[i] = key[j];
		m->val[i] = val[j];
	}
	free(key);
	free(val);
}

uint32_t pmap_put(struct pmap *m, uint32_t a, uint32_t b, uint32_t v)
{
	uint64_t k = pair_key(a, b);
	size_t i;

	if (!m->key || 2 * (m->n + 1) > m->mask + 1)
		pmap_grow(m);
	for (i = mix64(k) & m->mask; m->val[i] != UINT32_MAX; i = (i + 1) & m->mask)
		if (m->key[i] == k)
			return m->val[i];
	m->key[i] = k;
	m->val[i] = v;
	m->n++;
	return v;
}

/* ---- the GPT-2 byte <-> character table ------------------------------------------------------ */

/* Printable bytes stand for themselves; the others (0..32, 127..160, 173) for 256, 257, ... in order. */
uint32_t tok_byte_to_cp(uint8_t b)
{
	uint32_t k = 0;

	if ((b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || b >= 0xae)
		return b;
	/* count the non-printable bytes below b */
	if (b <= 32)
		k = b;
	else if (b <= 160)
		k = 33 + (b - 127);
	else
		k = 33 + 34;	/* 173 */
	return 256 + k;
}

/* The byte a character stands for, or -1. */
static int cp_to_byte(uint32_t cp)
{
	if ((cp >= '!' && cp <= '~') || (cp >= 0xa1 && cp <= 0xac) || (cp >= 0xae && cp <= 0xff))
		return (int)cp;
	if (cp < 256 || cp > 256 + 67)
		return -1;
	cp -= 256;
	if (cp <= 32)
		return (int)cp;
	if (cp <= 33 + 33)
		return (int)(127 + cp - 33);
	return 173;
}

char *bytes_to_visible(const uint8_t *p, size_t n)
{
	char *s = tok_xrealloc(NULL, 2 * n + 1);
	size_t k = 0;

	for (size_t i = 0; i < n; i++)
		k += utf8_encode(tok_byte_to_cp(p[i]), (uint8_t *)s + k);
	s[k] = 0;
	return s;
}

long visible_to_bytes(const char *s, uint8_t *out)
{
	const uint8_t *p = (const uint8_t *)s;
	size_t n = strlen(s), i = 0;
	long k = 0;

	while (i < n) {
		uint32_t cp;
		int len = utf8_decode(p + i, n - i, &cp);
		int b;

		if (len <= 0 || (b = cp_to_byte(cp)) < 0)
			return -1;
		out[k++] = (uint8_t)b;
		i += (size_t)len;
	}
	return k;
}

/* ---- added tokens ---------------------------------------------------------------------------- */

static int sp_cmp(const void *a, const void *b)
{
	const struct sp_tok *x = a, *y = b;

	if (x->len != y->len)
		return x->len > y->len ? -1 : 1;
	return x->id < y->id ? -1 : x->id > y->id;
}

void specials_build(struct specials *sp)
{
	qsort(sp->tok, (size_t)sp->n, sizeof(*sp->tok), sp_cmp);
	memset(sp->first, 0, sizeof(sp->first));
	for (int k = 0; k < sp->n; k++)
		sp->first[sp->tok[k].s[0]] = true;
}

/* ---- the tokenizer --------------------------------------------------------------------------- */

struct tokenizer *tok_alloc(void)
{
	struct tokenizer *t = tok_xcalloc(1, sizeof(*t));

	t->pretok = TOK_PRETOK_GPT2;
	return t;
}

void tokenizer_free(struct tokenizer *t)
{
	if (!t)
		return;
	free(t->tok);
	free(t->arena);
	bmap_free(&t->by_bytes);
	free(t->merges);
	pmap_free(&t->rank_of);
	free(t->added);
	free(t->sp.tok);
	tok_splits_free(t->splits);
	free(t->warning);
	tok_ids_free(&t->tmpl_pre);
	tok_ids_free(&t->tmpl_post);
	free(t->tmpl_json);
	bmap_free(&t->cache);
	free(t->cache_ids);
	free(t->sym);
	free(t->heap);
	free(t);
}

void tok_set(struct tokenizer *t, uint32_t id, const uint8_t *p, size_t n, int kind)
{
	if (id >= (uint32_t)t->vocab_size) {
		size_t old = (size_t)t->vocab_size;

		RESERVE(t->tok, t->tok_cap, (size_t)id + 1);
		memset(t->tok + old, 0, ((size_t)id + 1 - old) * sizeof(*t->tok));
		t->vocab_size = (int)id + 1;
	}
	RESERVE(t->arena, t->arena_cap, t->arena_n + n);
	if (n)
		memcpy(t->arena + t->arena_n, p, n);
	t->tok[id] = (struct token){ .off = t->arena_n, .len = (uint32_t)n, .kind = (uint8_t)kind,
				     .in_vocab = true };
	t->arena_n += n;
}

void tok_add_added(struct tokenizer *t, const struct added *a)
{
	RESERVE(t->added, t->added_cap, (size_t)t->n_added + 1);
	t->added[t->n_added++] = *a;
}

void tok_add_merge(struct tokenizer *t, uint32_t a, uint32_t b, uint32_t r)
{
	RESERVE(t->merges, t->merges_cap, (size_t)t->n_merges + 1);
	t->merges[t->n_merges][0] = a;
	t->merges[t->n_merges][1] = b;
	t->merges[t->n_merges][2] = r;
	pmap_put(&t->rank_of, a, b, (uint32_t)t->n_merges);
	t->n_merges++;
}

void tok_index_vocab(struct tokenizer *t)
{
	bmap_free(&t->by_bytes);
	for (int id = 0; id < t->vocab_size; id++) {
		const struct token *k = &t->tok[id];
		const uint8_t *p = tok_ptr(t, (uint32_t)id);
		uint64_t h;

		if (k->kind != TK_BYTES)
			continue;
		h = hash_bytes(p, k->len);
		if (bmap_find(&t->by_bytes, p, k->len, h) < 0)
			bmap_insert(&t->by_bytes, p, k->len, h, (uint64_t)id);
	}
}

long tok_lookup(const struct tokenizer *t, const uint8_t *p, size_t n)
{
	long e = bmap_find(&t->by_bytes, p, n, hash_bytes(p, n));

	return e < 0 ? -1 : (long)t->by_bytes.e[e].val;
}

int tok_finish_build(struct tokenizer *t, const char *name, char *err, size_t errlen)
{
	for (int b = 0; b < 256; b++) {
		uint8_t c = (uint8_t)b;
		long id = tok_lookup(t, &c, 1);

		if (id < 0) {
			char *v = bytes_to_visible(&c, 1);

			snprintf(err, errlen, "%s: model.vocab has no token for the byte 0x%02x (\"%s\"): "
				 "not a byte-level BPE", name, b, v);
			free(v);
			return -1;
		}
		t->byte_id[b] = (uint32_t)id;
	}
	free(t->sp.tok);
	t->sp.tok = tok_xcalloc((size_t)t->n_added, sizeof(*t->sp.tok));
	t->sp.n = 0;
	for (int k = 0; k < t->n_added; k++) {
		uint32_t id = t->added[k].id;

		if (!t->tok[id].len)
			continue;	/* an empty added token never matches */
		t->sp.tok[t->sp.n++] = (struct sp_tok){ .s = tok_ptr(t, id), .len = t->tok[id].len,
							.id = id };
	}
	specials_build(&t->sp);
	return 0;
}

const char *tokenizer_warning(const struct tokenizer *t)
{
	return t->warning;
}

int tokenizer_vocab_size(const struct tokenizer *t)
{
	return t->vocab_size;
}

int tokenizer_n_merges(const struct tokenizer *t)
{
	return t->n_merges;
}

void tokenizer_merge(const struct tokenizer *t, int i, uint32_t *a, uint32_t *b, uint32_t *result)
{
	*a = t->merges[i][0];
	*b = t->merges[i][1];
	*result = t->merges[i][2];
}

int tokenizer_token_bytes(const struct tokenizer *t, uint32_t id, const uint8_t **p, size_t *n)
{
	if (id >= (uint32_t)t->vocab_size || t->tok[id].kind == TK_NONE)
		return -1;
	*p = tok_ptr(t, id);
	*n = t->tok[id].len;
	return 0;
}

int tokenizer_is_added(const struct tokenizer *t, uint32_t id)
{
	return id < (uint32_t)t->vocab_size && t->tok[id].kind == TK_ADDED;
}

int tokenizer_is_special(const struct tokenizer *t, uint32_t id)
{
	if (!tokenizer_is_added(t, id))
		return 0;
	for (int k = 0; k < t->n_added; k++)
		if (t->added[k].id == id)
			return t->added[k].special;
	return 0;
}

void tokenizer_template(const struct tokenizer *t, const uint32_t **pre, size_t *n_pre,
			const uint32_t **post, size_t *n_post)
{
	*pre = t->tmpl_pre.v;
	*n_pre = t->tmpl_pre.n;
	*post = t->tmpl_post.v;
	*n_post = t->tmpl_post.n;
}

int tokenizer_special_id(const struct tokenizer *t, const char *content)
{
	size_t n = strlen(content);

	for (int k = 0; k < t->n_added; k++) {
		uint32_t id = t->added[k].id;

		if (t->tok[id].len == n && !memcmp(tok_ptr(t, id), content, n))
			return (int)id;
	}
	return -1;
}

int tokenizer_token_id(const struct tokenizer *t, const void *bytes, size_t n)
{
	long id = tok_lookup(t, bytes, n);

	if (id >= 0)
		return (int)id;
	for (int k = 0; k < t->n_added; k++) {
		uint32_t a = t->added[k].id;

		if (t->tok[a].len == n && !memcmp(tok_ptr(t, a), bytes, n))
			return (int)a;
	}
	return -1;
}

int tokenizer_eot_id(const struct tokenizer *t)
{
	static const char *const names[] = {
		"<|endoftext|>", "<|end_of_text|>", "</s>",
		"<\xef\xbd\x9c" "end\xe2\x96\x81" "of\xe2\x96\x81" "sentence\xef\xbd\x9c>",  /* DeepSeek's */
	};

	for (size_t k = 0; k < sizeof(names) / sizeof(names[0]); k++) {
		int id = tokenizer_special_id(t, names[k]);

		if (id >= 0)
			return id;
	}
	return -1;
}

enum tok_pretok tokenizer_pretok(const struct tokenizer *t)
{
	return t->pretok;
}
