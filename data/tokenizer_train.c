/*
 * data/tokenizer_train.c - byte-level BPE training: documents are pre-tokenized (the added tokens cut
 * out) into counted words, then pairs are merged by count with incremental pair counts.
 */
#define _POSIX_C_SOURCE 200809L

#include "data/tokenizer_int.h"

#include <stdio.h>
#include <stdlib.h>

struct tok_trainer {
	int n_special;
	char **special;
	struct specials sp;
	struct bmap words;		/* pre-token -> count */
	uint8_t *buf;			/* the current document's held-back bytes */
	size_t len, cap, need;
};

struct tok_trainer *tok_trainer_new(const char *const *specials, int n_specials, char *err,
				    size_t errlen)
{
	struct tok_trainer *tr;

	if (!specials) {
		specials = tokenizer_default_specials;
		n_specials = TOKENIZER_N_DEFAULT_SPECIALS;
	}
	for (int k = 0; k < n_specials; k++) {
		if (!specials[k][0]) {
			snprintf(err, errlen, "special token %d is empty", k);
			return NULL;
		}
		for (int j = 0; j < k; j++) {
			if (!strcmp(specials[j], specials[k])) {
				snprintf(err, errlen, "special token \"%s\" is given twice", specials[k]);
				return NULL;
			}
		}
	}
	tr = tok_xcalloc(1, sizeof(*tr));
	tr->n_special = n_specials;
	tr->special = tok_xcalloc((size_t)n_specials, sizeof(*tr->special));
	tr->sp.tok = tok_xcalloc((size_t)n_specials, sizeof(*tr->sp.tok));
	for (int k = 0; k < n_specials; k++) {
		size_t n = strlen(specials[k]);

		tr->special[k] = tok_xrealloc(NULL, n + 1);
		memcpy(tr->special[k], specials[k], n + 1);
		tr->sp.tok[k] = (struct sp_tok){ (const uint8_t *)tr->special[k], n, (uint32_t)k };
	}
	tr->sp.n = n_specials;
	specials_build(&tr->sp);
	return tr;
}

void tok_trainer_free(struct tok_trainer *tr)
{
	if (!tr)
		return;
	for (int k = 0; k < tr->n_special; k++)
		free(tr->special[k]);
	free(tr->special);
	free(tr->sp.tok);
	bmap_free(&tr->words);
	free(tr->buf);
	free(tr);
}

static void count_piece(void *ctx, const uint8_t *p, size_t n)
{
	struct bmap *m = ctx;
	uint64_t h = hash_bytes(p, n);
	long e = bmap_find(m, p, n, h);

	if (e >= 0)
		m->e[e].val++;
	else
		bmap_insert(m, p, n, h, 1);
}

static void skip_special(void *ctx, uint32_t id)
{
	(void)ctx;
	(void)id;
}

static void trainer_scan(struct tok_trainer *tr, bool final)
{
	struct scan_cb cb = { count_piece, skip_special, &tr->words };
	size_t used = tok_scan(&tr->sp, TOK_PRETOK_GPT2, NULL, tr->buf, tr->len, final, &cb);

	memmove(tr->buf, tr->buf + used, tr->len - used);
	tr->len -= used;
	tr->need = 2 * tr->len;
}

void tok_trainer_feed(struct tok_trainer *tr, const void *text, size_t n)
{
	RESERVE(tr->buf, tr->cap, tr->len + n);
	if (n)
		memcpy(tr->buf + tr->len, text, n);
	tr->len += n;
	if (tr->len >= tr->need)
		trainer_scan(tr, false);
}

void tok_trainer_end_doc(struct tok_trainer *tr)
{
	trainer_scan(tr, true);
	tr->len = 0;
	tr->need = 0;
}

uint64_t tok_trainer_n_words(const struct tok_trainer *tr)
{
	return tr->words.n;
}

/*
 * The merge loop's state.  Each distinct word is an array of symbols (token ids) with its count; each
 * pair of adjacent symbols has a total count and a list of the words it may occur in (entries go stale
 * as words change; a word is visited at most once per merge).  A max-heap of (count, pair) is updated
 * lazily: an entry whose count is no longer the pair's is re-pushed with the current count when popped.
 */
struct pair_occ {
	uint32_t *w;
	uint32_t n, cap;
};

struct train_state {
	struct tokenizer *t;		/* the tokens so far (bytes) and the merges */
	size_t n_words;
	uint32_t *sym;			/* every word's symbols */
	uint64_t *start;		/* [n_words]: the word's first symbol in sym */
	uint32_t *len;			/* [n_words]: symbols now */
	uint64_t *count;		/* [n_words] */
	uint32_t *stamp;		/* [n_words]: the last merge that visited the word + 1 */

	struct pmap pair_ix;		/* (a, b) -> pair index */
	uint32_t *pa, *pb;
	int64_t *pcount;
	struct pair_occ *occ;
	bool *touched;
	size_t n_pairs, pairs_cap;
	uint32_t *touched_list;
	size_t n_touched, touched_cap;

	struct theap {
		int64_t count;
		uint32_t pair;
	} *heap;
	size_t n_heap, heap_cap;
};

static uint32_t pair_get_or_add(struct train_state *st, uint32_t a, uint32_t b)
{
	uint32_t pi = pmap_put(&st->pair_ix, a, b, (uint32_t)st->n_pairs);

	if (pi == st->n_pairs) {
		if (st->n_pairs == st->pairs_cap) {
			size_t cap = st->pairs_cap ? 2 * st->pairs_cap : 4096;

			st->pa = tok_xrealloc(st->pa, cap * sizeof(*st->pa));
			st->pb = tok_xrealloc(st->pb, cap * sizeof(*st->pb));
			st->pcount = tok_xrealloc(st->pcount, cap * sizeof(*st->pcount));
			st->occ = tok_xrealloc(st->occ, cap * sizeof(*st->occ));
			st->touched = tok_xrealloc(st->touched, cap * sizeof(*st->touched));
			st->pairs_cap = cap;
		}
		st->pa[pi] = a;
		st->pb[pi] = b;
		st->pcount[pi] = 0;
		st->occ[pi] = (struct pair_occ){ 0 };
		st->touched[pi] = false;
		st->n_pairs++;
	}
	return pi;
}

/* Lexicographic order of two tokens' bytes. */
static int tok_bytes_cmp(const struct tokenizer *t, uint32_t x, uint32_t y)
{
	size_t nx = t->tok[x].len, ny = t->tok[y].len;
	int c = memcmp(tok_ptr(t, x), tok_ptr(t, y), nx < ny ? nx : ny);

	if (c)
		return c;
	return nx < ny ? -1 : nx > ny;
}

/* Heap order: higher count first, then the pair whose bytes (first token, then second) are smaller. */
static bool theap_before(const struct train_state *st, const struct theap *x, const struct theap *y)
{
	int c;

	if (x->count != y->count)
		return x->count > y->count;
	c = tok_bytes_cmp(st->t, st->pa[x->pair], st->pa[y->pair]);
	if (!c)
		c = tok_bytes_cmp(st->t, st->pb[x->pair], st->pb[y->pair]);
	return c < 0;
}

static void theap_push(struct train_state *st, int64_t count, uint32_t pair)
{
	size_t i = st->n_heap++;

	RESERVE(st->heap, st->heap_cap, st->n_heap);
	st->heap[i] = (struct theap){ count, pair };
	while (i) {
		size_t up = (i - 1) / 2;
		struct theap tmp;

		if (!theap_before(st, &st->heap[i], &st->heap[up]))
			break;
		tmp = st->heap[i];
		st->heap[i] = st->heap[up];
		st->heap[up] = tmp;
		i = up;
	}
}

static struct theap theap_pop(struct train_state *st)
{
	struct theap top = st->heap[0];
	size_t i = 0, n = --st->n_heap;

	st->heap[0] = st->heap[n];
	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, m = i;
		struct theap tmp;

		if (l < n && theap_before(st, &st->heap[l], &st->heap[m]))
			m = l;
		if (r < n && theap_before(st, &st->heap[r], &st->heap[m]))
			m = r;
		if (m == i)
			break;
		tmp = st->heap[i];
		st->heap[i] = st->heap[m];
		st->heap[m] = tmp;
		i = m;
	}
	return top;
}

static void occ_add(struct pair_occ *o, uint32_t w)
{
	if (o->n && o->w[o->n - 1] == w)
		return;
	if (o->n == o->cap) {
		o->cap = o->cap ? 2 * o->cap : 4;
		o->w = tok_xrealloc(o->w, o->cap * sizeof(*o->w));
	}
	o->w[o->n++] = w;
}

/* Add delta to the count of (a, b); a pair that gains is remembered in word w and for the heap. */
static void pair_delta(struct train_state *st, uint32_t a, uint32_t b, int64_t delta, uint32_t w)
{
	uint32_t pi = pair_get_or_add(st, a, b);

	st->pcount[pi] += delta;
	if (delta > 0) {
		occ_add(&st->occ[pi], w);
		if (!st->touched[pi]) {
			st->touched[pi] = true;
			RESERVE(st->touched_list, st->touched_cap, st->n_touched + 1);
			st->touched_list[st->n_touched++] = pi;
		}
	}
}

/* Replace every (a, b) in word w by c, left to right, updating the neighbouring pairs' counts. */
static void merge_word(struct train_state *st, uint32_t w, uint32_t a, uint32_t b, uint32_t c)
{
	uint32_t *s = st->sym + st->start[w];
	uint32_t n = st->len[w], i = 0, o = 0;
	int64_t wc = (int64_t)st->count[w];

	while (i < n) {
		if (i + 1 < n && s[i] == a && s[i + 1] == b) {
			if (o > 0) {
				pair_delta(st, s[o - 1], a, -wc, w);
				pair_delta(st, s[o - 1], c, wc, w);
			}
			if (i + 2 < n) {
				pair_delta(st, b, s[i + 2], -wc, w);
				pair_delta(st, c, s[i + 2], wc, w);
			}
			s[o++] = c;
			i += 2;
		} else {
			s[o++] = s[i++];
		}
	}
	st->len[w] = o;
}

static void train_state_free(struct train_state *st)
{
	free(st->sym);
	free(st->start);
	free(st->len);
	free(st->count);
	free(st->stamp);
	pmap_free(&st->pair_ix);
	for (size_t k = 0; k < st->n_pairs; k++)
		free(st->occ[k].w);
	free(st->pa);
	free(st->pb);
	free(st->pcount);
	free(st->occ);
	free(st->touched);
	free(st->touched_list);
	free(st->heap);
}

struct tokenizer *tok_trainer_finish(struct tok_trainer *tr, int vocab_size, char *err, size_t errlen)
{
	struct train_state st = { 0 };
	struct tokenizer *t;
	uint64_t total = 0;
	uint8_t *cat = NULL;
	size_t cat_cap = 0;
	int target = vocab_size - tr->n_special;

	if (tr->len)
		tok_trainer_end_doc(tr);
	if (vocab_size < 256 + tr->n_special || vocab_size > TOK_MAX_ID) {
		snprintf(err, errlen, "vocabulary size %d: must be at least 256 + %d special tokens "
			 "and at most %d", vocab_size, tr->n_special, TOK_MAX_ID);
		return NULL;
	}
	t = tok_alloc();
	st.t = t;
	for (int b = 0; b < 256; b++) {
		uint8_t c = (uint8_t)b;

		tok_set(t, (uint32_t)b, &c, 1, TK_BYTES);
	}
	tok_index_vocab(t);

	/* the words, as byte symbols, and the pair counts */
	st.n_words = tr->words.n;
	st.start = tok_xcalloc(st.n_words, sizeof(*st.start));
	st.len = tok_xcalloc(st.n_words, sizeof(*st.len));
	st.count = tok_xcalloc(st.n_words, sizeof(*st.count));
	st.stamp = tok_xcalloc(st.n_words, sizeof(*st.stamp));
	for (size_t w = 0; w < st.n_words; w++) {
		st.start[w] = total;
		total += tr->words.e[w].len;
	}
	st.sym = tok_xcalloc(total, sizeof(*st.sym));
	for (size_t w = 0; w < st.n_words; w++) {
		const uint8_t *p = bmap_key(&tr->words, w);
		uint32_t n = (uint32_t)tr->words.e[w].len;

		st.len[w] = n;
		st.count[w] = tr->words.e[w].val;
		for (uint32_t i = 0; i < n; i++)
			st.sym[st.start[w] + i] = p[i];
		for (uint32_t i = 0; i + 1 < n; i++)
			pair_delta(&st, p[i], p[i + 1], (int64_t)st.count[w], (uint32_t)w);
	}
	for (size_t k = 0; k < st.n_touched; k++) {
		uint32_t pi = st.touched_list[k];

		st.touched[pi] = false;
		theap_push(&st, st.pcount[pi], pi);
	}
	st.n_touched = 0;

	while (t->vocab_size < target && st.n_heap) {
		struct theap top = theap_pop(&st);
		uint32_t pi = top.pair, a, b, c;
		struct pair_occ list;
		size_t na, nb;
		long id;

		if (st.pcount[pi] != top.count) {
			if (st.pcount[pi] > 0 && st.pcount[pi] < top.count)
				theap_push(&st, st.pcount[pi], pi);
			continue;
		}
		if (top.count <= 0)
			break;
		a = st.pa[pi];
		b = st.pb[pi];
		na = t->tok[a].len;
		nb = t->tok[b].len;
		RESERVE(cat, cat_cap, na + nb);
		memcpy(cat, tok_ptr(t, a), na);
		memcpy(cat + na, tok_ptr(t, b), nb);
		id = tok_lookup(t, cat, na + nb);
		if (id < 0) {
			id = t->vocab_size;
			tok_set(t, (uint32_t)id, cat, na + nb, TK_BYTES);
			bmap_insert(&t->by_bytes, cat, na + nb, hash_bytes(cat, na + nb), (uint64_t)id);
		}
		c = (uint32_t)id;
		tok_add_merge(t, a, b, c);

		list = st.occ[pi];
		st.occ[pi] = (struct pair_occ){ 0 };
		for (uint32_t k = 0; k < list.n; k++) {
			uint32_t w = list.w[k];

			if (st.stamp[w] == (uint32_t)t->n_merges)
				continue;
			st.stamp[w] = (uint32_t)t->n_merges;
			merge_word(&st, w, a, b, c);
		}
		free(list.w);
		st.pcount[pi] = 0;
		for (size_t k = 0; k < st.n_touched; k++) {
			uint32_t q = st.touched_list[k];

			st.touched[q] = false;
			if (st.pcount[q] > 0)
				theap_push(&st, st.pcount[q], q);
		}
		st.n_touched = 0;
	}
	free(cat);
	train_state_free(&st);

	for (int k = 0; k < tr->n_special; k++) {
		struct added a = { .id = (uint32_t)t->vocab_size, .special = true };

		tok_set(t, a.id, (const uint8_t *)tr->special[k], strlen(tr->special[k]), TK_ADDED);
		tok_add_added(t, &a);
	}
	if (tok_finish_build(t, "training", err, errlen)) {
		tokenizer_free(t);
		return NULL;
	}
	return t;
}
