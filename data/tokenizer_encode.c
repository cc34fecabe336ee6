/*
 * data/tokenizer_encode.c - encoding: the pre-tokenizer, the added-token scanner, BPE merges by rank
 * with a word cache, decoding, and the streaming encoder.
 *
 * The pre-tokenizer is the GPT-2 regex written out by hand (no regex library): each alternative is
 * tried at the current position in the regex's order, with the regex's greedy runs and backtracking.
 * It reports when it looked past the end of the bytes it was given, which is how the streaming
 * encoder and the trainer know which piece to keep back for the next chunk.
 */
#define _POSIX_C_SOURCE 200809L

#include "data/tokenizer_int.h"

#include <stdio.h>
#include <stdlib.h>

#define CACHE_MAX_PIECE 128		/* longest piece kept in the word cache (bytes) */
#define CACHE_MAX_ENTRIES (1 << 18)	/* the cache is emptied when it holds this many words */
#define DEAD UINT32_MAX

/* ---- the pre-tokenizer ----------------------------------------------------------------------- */

/* A view of s[0..n); final: n is the end of the text, else more may follow (looking there sets hit). */
struct cur {
	const uint8_t *s;
	size_t n;
	bool final;
	bool hit;
};

/* A byte that does not start valid UTF-8: one character of class U_OTHER. */
#define CP_INVALID 0x110000u

/* The character at i: its class (U_END past the end or at a cut sequence), code point and length. */
static int cur_char(struct cur *c, size_t i, uint32_t *cp, size_t *len)
{
	int l;

	*cp = 0;
	*len = 0;
	if (i >= c->n) {
		if (!c->final)
			c->hit = true;
		return U_END;
	}
	l = utf8_decode(c->s + i, c->n - i, cp);
	if (l == 0 && !c->final) {
		c->hit = true;
		return U_END;
	}
	if (l <= 0) {
		*cp = CP_INVALID;
		*len = 1;
		return U_OTHER;
	}
	*len = (size_t)l;
	return cp_class(*cp);
}

/* The end of the run of class-k characters from i. */
static size_t run_of(struct cur *c, size_t i, int k)
{
	uint32_t cp;
	size_t len;

	while (cur_char(c, i, &cp, &len) == k)
		i += len;
	return i;
}

/* \s+(?!\S)|\s+ at p (a whitespace character); with crlf, \s*[\r\n]+ first (Llama 3). */
static size_t match_space(struct cur *c, size_t p, bool crlf)
{
	size_t i = p, last = p, len, nl = SIZE_MAX;
	int k, nchars = 0;
	uint32_t cp;

	while ((k = cur_char(c, i, &cp, &len)) == U_WS) {
		if (cp == '\r' || cp == '\n')
			nl = i;
		last = i;
		i += len;
		nchars++;
	}
	if (crlf && nl != SIZE_MAX)
		return nl + 1;
	if (k == U_END || nchars < 2)
		return i;
	return last;	/* the last space goes with what follows */
}

/* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static size_t match_gpt2(struct cur *c, size_t p)
{
	uint32_t c0, c1, c2;
	size_t l0, l1, l2;
	int k0 = cur_char(c, p, &c0, &l0), k1;

	if (k0 == U_END)
		return p;
	if (c0 == '\'') {
		cur_char(c, p + 1, &c1, &l1);
		if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd')
			return p + 2;
		if (c1 == 'r' || c1 == 'v' || c1 == 'l') {
			cur_char(c, p + 2, &c2, &l2);
			if (c2 == (c1 == 'l' ? 'l' : 'e'))
				return p + 3;
		}
	}
	if (c0 == ' ') {
		k1 = cur_char(c, p + 1, &c1, &l1);
		if (k1 == U_L || k1 == U_N || k1 == U_OTHER)
			return run_of(c, p + 1, k1);
	} else if (k0 != U_WS) {
		return run_of(c, p, k0);
	}
	return match_space(c, p, false);
}

static uint32_t fold(uint32_t cp)
{
	if (cp >= 'A' && cp <= 'Z')
		return cp + 32;
	if (cp == 0x17f)	/* LATIN SMALL LETTER LONG S folds to s */
		return 's';
	return cp;
}

/*
 * (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}| ?[^\s\p{L}\p{N}]+[\r\n]*|
 * \s*[\r\n]+|\s+(?!\S)|\s+
 */
static size_t match_llama3(struct cur *c, size_t p, int max_digits)
{
	uint32_t c0, c1, c2;
	size_t l0, l1, l2, q, i;
	int k0 = cur_char(c, p, &c0, &l0), k1;

	if (k0 == U_END)
		return p;
	if (c0 == '\'') {
		cur_char(c, p + 1, &c1, &l1);
		c1 = fold(c1);
		if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd')
			return p + 1 + l1;
		if (c1 == 'r' || c1 == 'v' || c1 == 'l') {
			cur_char(c, p + 1 + l1, &c2, &l2);
			if (fold(c2) == (c1 == 'l' ? 'l' : 'e'))
				return p + 1 + l1 + l2;
		}
	}
	if (k0 == U_L)
		return run_of(c, p, U_L);
	if (k0 != U_N && c0 != '\r' && c0 != '\n') {
		k1 = cur_char(c, p + l0, &c1, &l1);
		if (k1 == U_L)
			return run_of(c, p + l0, U_L);
	}
	if (k0 == U_N) {
		i = p;
		for (int d = 0; d < max_digits && cur_char(c, i, &c1, &l1) == U_N; d++)
			i += l1;
		return i;
	}
	q = p;
	if (c0 == ' ' && cur_char(c, p + 1, &c1, &l1) == U_OTHER)
		q = p + 1;
	if (q > p || k0 == U_OTHER) {
		i = run_of(c, q, U_OTHER);
		while (cur_char(c, i, &c1, &l1) != U_END && (c1 == '\r' || c1 == '\n'))
			i += l1;
		return i;
	}
	return match_space(c, p, true);
}

static size_t match_piece(enum tok_pretok mode, struct cur *c, size_t p)
{
	switch (mode) {
	case TOK_PRETOK_LLAMA3:
		return match_llama3(c, p, 3);
	case TOK_PRETOK_QWEN2:
		return match_llama3(c, p, 1);
	default:
		return match_gpt2(c, p);
	}
}

size_t tok_pretokenize(enum tok_pretok mode, const void *text, size_t n, size_t *ends, size_t max)
{
	struct cur c = { .s = text, .n = n, .final = true };
	size_t p = 0, k = 0;

	while (p < n) {
		p = match_piece(mode, &c, p);
		if (k < max)
			ends[k] = p;
		k++;
	}
	return k;
}

/* ---- the added-token scanner ----------------------------------------------------------------- */

/*
 * The pieces of the stretch s[pos, end) by the Split regexes.  Not final: the last two pieces are kept
 * back (the last may grow with more text, and a match ending just before it may depend on what
 * follows); a restart at a piece's start gives the same pieces, every Split level's matches starting
 * afresh there.  Returns where the pieces handed over end.
 */
static size_t scan_splits(struct tok_splits *splits, const uint8_t *s, size_t pos, size_t end,
			  bool final, const struct scan_cb *cb)
{
	const size_t *ends;
	size_t k = tok_splits_run(splits, s + pos, end - pos, &ends), p = pos;
	size_t keep = final ? k : (k > 2 ? k - 2 : 0);

	for (size_t j = 0; j < keep; j++) {
		cb->piece(cb->ctx, s + p, pos + ends[j] - p);
		p = pos + ends[j];
	}
	return final ? end : p;
}

size_t tok_scan(const struct specials *sp, enum tok_pretok mode, struct tok_splits *splits,
		const uint8_t *s, size_t n, bool final, const struct scan_cb *cb)
{
	size_t pos = 0;

	while (pos < n) {
		size_t i = sp->n ? pos : n, p;	/* without special tokens the text is one stretch */
		const struct sp_tok *hit = NULL;
		bool partial = false;
		struct cur c;

		for (; i < n; i++) {
			if (!sp->first[s[i]])
				continue;
			for (int k = 0; k < sp->n; k++) {
				const struct sp_tok *t = &sp->tok[k];

				if (t->s[0] != s[i])
					continue;
				if (n - i >= t->len) {
					if (!memcmp(s + i, t->s, t->len)) {
						hit = t;
						break;
					}
				} else if (!final && !memcmp(s + i, t->s, n - i)) {
					partial = true;	/* may be a longer one: wait */
					break;
				}
			}
			if (hit || partial)
				break;
		}
		c = (struct cur){ .s = s, .n = i, .final = final || hit };
		if (mode == TOK_PRETOK_SPLITS) {
			p = scan_splits(splits, s, pos, i, c.final, cb);
			if (p < i)
				return p;
		}
		for (p = mode == TOK_PRETOK_SPLITS ? i : pos; p < i;) {
			size_t e = match_piece(mode, &c, p);

			if (c.hit)
				return p;
			cb->piece(cb->ctx, s + p, e - p);
			p = e;
		}
		if (!hit)
			return i;
		cb->special(cb->ctx, hit->id);
		pos = i + hit->len;
	}
	return pos;
}

/* ---- encoding -------------------------------------------------------------------------------- */

/* A piece's symbols while merging, a doubly linked list over the piece's bytes. */
struct sym {
	uint32_t id;
	int prev, next;
};

/* A mergeable pair on the heap: its rank, its left symbol. */
struct hent {
	uint32_t rank;
	uint32_t pos;
};

static bool hent_less(const struct hent *x, const struct hent *y)
{
	return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}

static void heap_push(struct tokenizer *t, size_t *n, uint32_t rank, uint32_t pos)
{
	size_t i = (*n)++;

	RESERVE(t->heap, t->heap_cap, *n);
	t->heap[i] = (struct hent){ rank, pos };
	while (i) {
		size_t up = (i - 1) / 2;
		struct hent tmp;

		if (!hent_less(&t->heap[i], &t->heap[up]))
			break;
		tmp = t->heap[i];
		t->heap[i] = t->heap[up];
		t->heap[up] = tmp;
		i = up;
	}
}

static struct hent heap_pop(struct tokenizer *t, size_t *n)
{
	struct hent top = t->heap[0];
	size_t i = 0;

	t->heap[0] = t->heap[--*n];
	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, m = i;
		struct hent tmp;

		if (l < *n && hent_less(&t->heap[l], &t->heap[m]))
			m = l;
		if (r < *n && hent_less(&t->heap[r], &t->heap[m]))
			m = r;
		if (m == i)
			break;
		tmp = t->heap[i];
		t->heap[i] = t->heap[m];
		t->heap[m] = tmp;
		i = m;
	}
	return top;
}

/* Merge the piece's bytes by rank: always the lowest-ranked adjacent pair, leftmost first. */
static void bpe_merge(struct tokenizer *t, const uint8_t *p, size_t n, struct tok_ids *out)
{
	struct sym *s;
	size_t nh = 0;

	RESERVE(t->sym, t->sym_cap, n);
	s = t->sym;
	for (size_t i = 0; i < n; i++)
		s[i] = (struct sym){ t->byte_id[p[i]], (int)i - 1, i + 1 < n ? (int)i + 1 : -1 };
	for (size_t i = 0; i + 1 < n; i++) {
		uint32_t r = pmap_get(&t->rank_of, s[i].id, s[i + 1].id);

		if (r != NO_RANK)
			heap_push(t, &nh, r, (uint32_t)i);
	}
	while (nh) {
		struct hent h = heap_pop(t, &nh);
		int i = (int)h.pos, j = s[i].next;

		if (s[i].id == DEAD || j < 0 || pmap_get(&t->rank_of, s[i].id, s[j].id) != h.rank)
			continue;
		s[i].id = t->merges[h.rank][2];
		s[i].next = s[j].next;
		if (s[j].next >= 0)
			s[s[j].next].prev = i;
		s[j].id = DEAD;
		if (s[i].prev >= 0) {
			uint32_t r = pmap_get(&t->rank_of, s[s[i].prev].id, s[i].id);

			if (r != NO_RANK)
				heap_push(t, &nh, r, (uint32_t)s[i].prev);
		}
		if (s[i].next >= 0) {
			uint32_t r = pmap_get(&t->rank_of, s[i].id, s[s[i].next].id);

			if (r != NO_RANK)
				heap_push(t, &nh, r, (uint32_t)i);
		}
	}
	for (int i = 0; i >= 0; i = s[i].next)
		ids_push(out, s[i].id);
}

static void encode_piece(void *ctx, const uint8_t *p, size_t n)
{
	struct tokenizer *t = ((void **)ctx)[0];
	struct tok_ids *out = ((void **)ctx)[1];
	size_t first = out->n;
	uint64_t h = 0;
	long e;

	if (n == 1) {
		ids_push(out, t->byte_id[p[0]]);
		return;
	}
	if (t->ignore_merges && (e = tok_lookup(t, p, n)) >= 0) {
		ids_push(out, (uint32_t)e);
		return;
	}
	if (n <= CACHE_MAX_PIECE) {
		h = hash_bytes(p, n);
		e = bmap_find(&t->cache, p, n, h);
		if (e >= 0) {
			uint64_t v = t->cache.e[e].val;
			size_t off = (size_t)(v >> 8), cnt = (size_t)(v & 0xff);

			RESERVE(out->v, out->cap, out->n + cnt);
			memcpy(out->v + out->n, t->cache_ids + off, cnt * sizeof(uint32_t));
			out->n += cnt;
			return;
		}
	}
	bpe_merge(t, p, n, out);
	if (n <= CACHE_MAX_PIECE) {
		size_t cnt = out->n - first;

		if (t->cache.n >= CACHE_MAX_ENTRIES) {
			bmap_clear(&t->cache);
			t->cache_n = 0;
		}
		RESERVE(t->cache_ids, t->cache_cap, t->cache_n + cnt);
		memcpy(t->cache_ids + t->cache_n, out->v + first, cnt * sizeof(uint32_t));
		bmap_insert(&t->cache, p, n, h, (uint64_t)t->cache_n << 8 | cnt);
		t->cache_n += cnt;
	}
}

static void encode_special(void *ctx, uint32_t id)
{
	ids_push(((void **)ctx)[1], id);
}

static size_t encode_some(struct tokenizer *t, const uint8_t *s, size_t n, bool final,
			  struct tok_ids *out)
{
	void *ctx[2] = { t, out };
	struct scan_cb cb = { encode_piece, encode_special, ctx };

	return tok_scan(&t->sp, t->pretok, t->splits, s, n, final, &cb);
}

void tokenizer_encode(struct tokenizer *t, const void *text, size_t n, struct tok_ids *out)
{
	encode_some(t, text, n, true, out);
}

int tokenizer_decode(const struct tokenizer *t, const uint32_t *ids, size_t n, struct tok_bytes *out,
		     char *err, size_t errlen)
{
	for (size_t i = 0; i < n; i++) {
		const uint8_t *p;
		size_t len;

		if (tokenizer_token_bytes(t, ids[i], &p, &len)) {
			snprintf(err, errlen, "token %zu: id %u is not in the vocabulary (size %d)", i,
				 ids[i], t->vocab_size);
			return -1;
		}
		bytes_append(out, p, len);
	}
	return 0;
}

/* ---- streaming ------------------------------------------------------------------------------- */

void tok_stream_init(struct tok_stream *s, struct tokenizer *t)
{
	memset(s, 0, sizeof(*s));
	s->t = t;
}

void tok_stream_feed(struct tok_stream *s, const void *text, size_t n, struct tok_ids *out)
{
	size_t used;

	RESERVE(s->buf, s->cap, s->len + n);
	if (n)
		memcpy(s->buf + s->len, text, n);
	s->len += n;
	if (s->len < s->need)
		return;
	used = encode_some(s->t, s->buf, s->len, false, out);
	memmove(s->buf, s->buf + used, s->len - used);
	s->len -= used;
	/* a long piece is retried only once the bytes held have doubled: linear time overall */
	s->need = 2 * s->len;
}

void tok_stream_finish(struct tok_stream *s, struct tok_ids *out)
{
	encode_some(s->t, s->buf, s->len, true, out);
	s->len = 0;
	s->need = 0;
}

void tok_stream_free(struct tok_stream *s)
{
	free(s->buf);
	memset(s, 0, sizeof(*s));
}
