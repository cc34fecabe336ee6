/*
 * data/tokenizer.c - byte-level BPE: pre-tokenizer, encoder (merges by rank, word cache), streaming
 * encoder, trainer (incremental pair counts), Hugging Face tokenizer.json reading and writing.
 *
 * The pre-tokenizer is the GPT-2 regex written out by hand (no regex library): each alternative is
 * tried at the current position in the regex's order, with the regex's greedy runs and backtracking.
 * It reports when it looked past the end of the bytes it was given, which is how the streaming
 * encoder and the trainer know which piece to keep back for the next chunk.
 */
#define _POSIX_C_SOURCE 200809L

#include "data/tokenizer.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

const char *const tokenizer_default_specials[TOKENIZER_N_DEFAULT_SPECIALS] = {
	"<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>",
};

#define TOK_MAX_ID (1 << 24)		/* ids beyond this are refused when reading a file */
#define CACHE_MAX_PIECE 128		/* longest piece kept in the word cache (bytes) */
#define CACHE_MAX_ENTRIES (1 << 18)	/* the cache is emptied when it holds this many words */
#define NO_RANK UINT32_MAX
#define DEAD UINT32_MAX

/* ---- memory ---------------------------------------------------------------------------------- */

static void *xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);

	if (!q) {
		fprintf(stderr, "tokenizer: out of memory (%zu bytes)\n", n);
		abort();
	}
	return q;
}

static void *xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);

	if (!p) {
		fprintf(stderr, "tokenizer: out of memory (%zu x %zu bytes)\n", n, size);
		abort();
	}
	return p;
}

/* Make room for need elements of elem bytes in *p (capacity *cap, doubled as needed). */
static void reserve(void **p, size_t *cap, size_t need, size_t elem)
{
	size_t c;

	if (need <= *cap)
		return;
	c = *cap ? *cap : 16;
	while (c < need)
		c *= 2;
	*p = xrealloc(*p, c * elem);
	*cap = c;
}

#define RESERVE(ptr, cap, need) reserve((void **)&(ptr), &(cap), (need), sizeof(*(ptr)))

static void ids_push(struct tok_ids *a, uint32_t id)
{
	if (a->n == a->cap)
		RESERVE(a->v, a->cap, a->n + 1);
	a->v[a->n++] = id;
}

static void bytes_append(struct tok_bytes *b, const void *p, size_t n)
{
	RESERVE(b->v, b->cap, b->n + n);
	if (n)
		memcpy(b->v + b->n, p, n);
	b->n += n;
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

static uint64_t mix64(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return x;
}

static uint64_t hash_bytes(const uint8_t *p, size_t n)
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

static void bmap_free(struct bmap *m)
{
	free(m->slot);
	free(m->e);
	free(m->arena);
	memset(m, 0, sizeof(*m));
}

static void bmap_clear(struct bmap *m)
{
	if (m->slot)
		memset(m->slot, 0, (m->mask + 1) * sizeof(*m->slot));
	m->n = 0;
	m->arena_n = 0;
}

static const uint8_t *bmap_key(const struct bmap *m, size_t i)
{
	return m->arena + m->e[i].off;
}

/* Entry index of key p[0..n), or -1. */
static long bmap_find(const struct bmap *m, const uint8_t *p, size_t n, uint64_t h)
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
	m->slot = xcalloc(slots, sizeof(*m->slot));
	m->mask = slots - 1;
	for (size_t k = 0; k < m->n; k++) {
		size_t i = m->e[k].hash & m->mask;

		while (m->slot[i])
			i = (i + 1) & m->mask;
		m->slot[i] = (uint32_t)(k + 1);
	}
}

/* Insert a key known to be absent; returns its entry index. */
static size_t bmap_insert(struct bmap *m, const uint8_t *p, size_t n, uint64_t h, uint64_t val)
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

/* (a, b) pair of ids -> uint32 value, open addressing. */
struct pmap {
	uint64_t *key;
	uint32_t *val;		/* UINT32_MAX = empty */
	size_t mask, n;
};

static uint64_t pair_key(uint32_t a, uint32_t b)
{
	return (uint64_t)a << 32 | b;
}

static void pmap_free(struct pmap *m)
{
	free(m->key);
	free(m->val);
	memset(m, 0, sizeof(*m));
}

static uint32_t pmap_get(const struct pmap *m, uint32_t a, uint32_t b)
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

	m->key = xcalloc(slots, sizeof(*m->key));
	m->val = xcalloc(slots, sizeof(*m->val));
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

/* Set (a, b) -> v unless present; returns the value now stored. */
static uint32_t pmap_put(struct pmap *m, uint32_t a, uint32_t b, uint32_t v)
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

/* ---- Unicode classes and UTF-8 --------------------------------------------------------------- */

enum { U_OTHER, U_L, U_N, U_WS, U_END };

struct urange {
	uint32_t lo, hi;
	uint8_t cls;
};

/*
 * Letters (\p{L}: Lu Ll Lt Lm Lo), numbers (\p{N}: Nd Nl No) and White_Space (\s) from U+0080 on,
 * Unicode 14.0 (generated from Python's unicodedata; ASCII is classified in cp_class()).
 */
static const struct urange uni_ranges[] = {
	{0x85, 0x85, U_WS}, {0xa0, 0xa0, U_WS}, {0xaa, 0xaa, U_L}, {0xb2, 0xb3, U_N}, {0xb5, 0xb5, U_L},
	{0xb9, 0xb9, U_N}, {0xba, 0xba, U_L}, {0xbc, 0xbe, U_N}, {0xc0, 0xd6, U_L}, {0xd8, 0xf6, U_L},
	{0xf8, 0x2c1, U_L}, {0x2c6, 0x2d1, U_L}, {0x2e0, 0x2e4, U_L}, {0x2ec, 0x2ec, U_L},
	{0x2ee, 0x2ee, U_L}, {0x370, 0x374, U_L}, {0x376, 0x377, U_L}, {0x37a, 0x37d, U_L},
	{0x37f, 0x37f, U_L}, {0x386, 0x386, U_L}, {0x388, 0x38a, U_L}, {0x38c, 0x38c, U_L},
	{0x38e, 0x3a1, U_L}, {0x3a3, 0x3f5, U_L}, {0x3f7, 0x481, U_L}, {0x48a, 0x52f, U_L},
	{0x531, 0x556, U_L}, {0x559, 0x559, U_L}, {0x560, 0x588, U_L}, {0x5d0, 0x5ea, U_L},
	{0x5ef, 0x5f2, U_L}, {0x620, 0x64a, U_L}, {0x660, 0x669, U_N}, {0x66e, 0x66f, U_L},
	{0x671, 0x6d3, U_L}, {0x6d5, 0x6d5, U_L}, {0x6e5, 0x6e6, U_L}, {0x6ee, 0x6ef, U_L},
	{0x6f0, 0x6f9, U_N}, {0x6fa, 0x6fc, U_L}, {0x6ff, 0x6ff, U_L}, {0x710, 0x710, U_L},
	{0x712, 0x72f, U_L}, {0x74d, 0x7a5, U_L}, {0x7b1, 0x7b1, U_L}, {0x7c0, 0x7c9, U_N},
	{0x7ca, 0x7ea, U_L}, {0x7f4, 0x7f5, U_L}, {0x7fa, 0x7fa, U_L}, {0x800, 0x815, U_L},
	{0x81a, 0x81a, U_L}, {0x824, 0x824, U_L}, {0x828, 0x828, U_L}, {0x840, 0x858, U_L},
	{0x860, 0x86a, U_L}, {0x870, 0x887, U_L}, {0x889, 0x88e, U_L}, {0x8a0, 0x8c9, U_L},
	{0x904, 0x939, U_L}, {0x93d, 0x93d, U_L}, {0x950, 0x950, U_L}, {0x958, 0x961, U_L},
	{0x966, 0x96f, U_N}, {0x971, 0x980, U_L}, {0x985, 0x98c, U_L}, {0x98f, 0x990, U_L},
	{0x993, 0x9a8, U_L}, {0x9aa, 0x9b0, U_L}, {0x9b2, 0x9b2, U_L}, {0x9b6, 0x9b9, U_L},
	{0x9bd, 0x9bd, U_L}, {0x9ce, 0x9ce, U_L}, {0x9dc, 0x9dd, U_L}, {0x9df, 0x9e1, U_L},
	{0x9e6, 0x9ef, U_N}, {0x9f0, 0x9f1, U_L}, {0x9f4, 0x9f9, U_N}, {0x9fc, 0x9fc, U_L},
	{0xa05, 0xa0a, U_L}, {0xa0f, 0xa10, U_L}, {0xa13, 0xa28, U_L}, {0xa2a, 0xa30, U_L},
	{0xa32, 0xa33, U_L}, {0xa35, 0xa36, U_L}, {0xa38, 0xa39, U_L}, {0xa59, 0xa5c, U_L},
	{0xa5e, 0xa5e, U_L}, {0xa66, 0xa6f, U_N}, {0xa72, 0xa74, U_L}, {0xa85, 0xa8d, U_L},
	{0xa8f, 0xa91, U_L}, {0xa93, 0xaa8, U_L}, {0xaaa, 0xab0, U_L}, {0xab2, 0xab3, U_L},
	{0xab5, 0xab9, U_L}, {0xabd, 0xabd, U_L}, {0xad0, 0xad0, U_L}, {0xae0, 0xae1, U_L},
	{0xae6, 0xaef, U_N}, {0xaf9, 0xaf9, U_L}, {0xb05, 0xb0c, U_L}, {0xb0f, 0xb10, U_L},
	{0xb13, 0xb28, U_L}, {0xb2a, 0xb30, U_L}, {0xb32, 0xb33, U_L}, {0xb35, 0xb39, U_L},
	{0xb3d, 0xb3d, U_L}, {0xb5c, 0xb5d, U_L}, {0xb5f, 0xb61, U_L}, {0xb66, 0xb6f, U_N},
	{0xb71, 0xb71, U_L}, {0xb72, 0xb77, U_N}, {0xb83, 0xb83, U_L}, {0xb85, 0xb8a, U_L},
	{0xb8e, 0xb90, U_L}, {0xb92, 0xb95, U_L}, {0xb99, 0xb9a, U_L}, {0xb9c, 0xb9c, U_L},
	{0xb9e, 0xb9f, U_L}, {0xba3, 0xba4, U_L}, {0xba8, 0xbaa, U_L}, {0xbae, 0xbb9, U_L},
	{0xbd0, 0xbd0, U_L}, {0xbe6, 0xbf2, U_N}, {0xc05, 0xc0c, U_L}, {0xc0e, 0xc10, U_L},
	{0xc12, 0xc28, U_L}, {0xc2a, 0xc39, U_L}, {0xc3d, 0xc3d, U_L}, {0xc58, 0xc5a, U_L},
	{0xc5d, 0xc5d, U_L}, {0xc60, 0xc61, U_L}, {0xc66, 0xc6f, U_N}, {0xc78, 0xc7e, U_N},
	{0xc80, 0xc80, U_L}, {0xc85, 0xc8c, U_L}, {0xc8e, 0xc90, U_L}, {0xc92, 0xca8, U_L},
	{0xcaa, 0xcb3, U_L}, {0xcb5, 0xcb9, U_L}, {0xcbd, 0xcbd, U_L}, {0xcdd, 0xcde, U_L},
	{0xce0, 0xce1, U_L}, {0xce6, 0xcef, U_N}, {0xcf1, 0xcf2, U_L}, {0xd04, 0xd0c, U_L},
	{0xd0e, 0xd10, U_L}, {0xd12, 0xd3a, U_L}, {0xd3d, 0xd3d, U_L}, {0xd4e, 0xd4e, U_L},
	{0xd54, 0xd56, U_L}, {0xd58, 0xd5e, U_N}, {0xd5f, 0xd61, U_L}, {0xd66, 0xd78, U_N},
	{0xd7a, 0xd7f, U_L}, {0xd85, 0xd96, U_L}, {0xd9a, 0xdb1, U_L}, {0xdb3, 0xdbb, U_L},
	{0xdbd, 0xdbd, U_L}, {0xdc0, 0xdc6, U_L}, {0xde6, 0xdef, U_N}, {0xe01, 0xe30, U_L},
	{0xe32, 0xe33, U_L}, {0xe40, 0xe46, U_L}, {0xe50, 0xe59, U_N}, {0xe81, 0xe82, U_L},
	{0xe84, 0xe84, U_L}, {0xe86, 0xe8a, U_L}, {0xe8c, 0xea3, U_L}, {0xea5, 0xea5, U_L},
	{0xea7, 0xeb0, U_L}, {0xeb2, 0xeb3, U_L}, {0xebd, 0xebd, U_L}, {0xec0, 0xec4, U_L},
	{0xec6, 0xec6, U_L}, {0xed0, 0xed9, U_N}, {0xedc, 0xedf, U_L}, {0xf00, 0xf00, U_L},
	{0xf20, 0xf33, U_N}, {0xf40, 0xf47, U_L}, {0xf49, 0xf6c, U_L}, {0xf88, 0xf8c, U_L},
	{0x1000, 0x102a, U_L}, {0x103f, 0x103f, U_L}, {0x1040, 0x1049, U_N}, {0x1050, 0x1055, U_L},
	{0x105a, 0x105d, U_L}, {0x1061, 0x1061, U_L}, {0x1065, 0x1066, U_L}, {0x106e, 0x1070, U_L},
	{0x1075, 0x1081, U_L}, {0x108e, 0x108e, U_L}, {0x1090, 0x1099, U_N}, {0x10a0, 0x10c5, U_L},
	{0x10c7, 0x10c7, U_L}, {0x10cd, 0x10cd, U_L}, {0x10d0, 0x10fa, U_L}, {0x10fc, 0x1248, U_L},
	{0x124a, 0x124d, U_L}, {0x1250, 0x1256, U_L}, {0x1258, 0x1258, U_L}, {0x125a, 0x125d, U_L},
	{0x1260, 0x1288, U_L}, {0x128a, 0x128d, U_L}, {0x1290, 0x12b0, U_L}, {0x12b2, 0x12b5, U_L},
	{0x12b8, 0x12be, U_L}, {0x12c0, 0x12c0, U_L}, {0x12c2, 0x12c5, U_L}, {0x12c8, 0x12d6, U_L},
	{0x12d8, 0x1310, U_L}, {0x1312, 0x1315, U_L}, {0x1318, 0x135a, U_L}, {0x1369, 0x137c, U_N},
	{0x1380, 0x138f, U_L}, {0x13a0, 0x13f5, U_L}, {0x13f8, 0x13fd, U_L}, {0x1401, 0x166c, U_L},
	{0x166f, 0x167f, U_L}, {0x1680, 0x1680, U_WS}, {0x1681, 0x169a, U_L}, {0x16a0, 0x16ea, U_L},
	{0x16ee, 0x16f0, U_N}, {0x16f1, 0x16f8, U_L}, {0x1700, 0x1711, U_L}, {0x171f, 0x1731, U_L},
	{0x1740, 0x1751, U_L}, {0x1760, 0x176c, U_L}, {0x176e, 0x1770, U_L}, {0x1780, 0x17b3, U_L},
	{0x17d7, 0x17d7, U_L}, {0x17dc, 0x17dc, U_L}, {0x17e0, 0x17e9, U_N}, {0x17f0, 0x17f9, U_N},
	{0x1810, 0x1819, U_N}, {0x1820, 0x1878, U_L}, {0x1880, 0x1884, U_L}, {0x1887, 0x18a8, U_L},
	{0x18aa, 0x18aa, U_L}, {0x18b0, 0x18f5, U_L}, {0x1900, 0x191e, U_L}, {0x1946, 0x194f, U_N},
	{0x1950, 0x196d, U_L}, {0x1970, 0x1974, U_L}, {0x1980, 0x19ab, U_L}, {0x19b0, 0x19c9, U_L},
	{0x19d0, 0x19da, U_N}, {0x1a00, 0x1a16, U_L}, {0x1a20, 0x1a54, U_L}, {0x1a80, 0x1a89, U_N},
	{0x1a90, 0x1a99, U_N}, {0x1aa7, 0x1aa7, U_L}, {0x1b05, 0x1b33, U_L}, {0x1b45, 0x1b4c, U_L},
	{0x1b50, 0x1b59, U_N}, {0x1b83, 0x1ba0, U_L}, {0x1bae, 0x1baf, U_L}, {0x1bb0, 0x1bb9, U_N},
	{0x1bba, 0x1be5, U_L}, {0x1c00, 0x1c23, U_L}, {0x1c40, 0x1c49, U_N}, {0x1c4d, 0x1c4f, U_L},
	{0x1c50, 0x1c59, U_N}, {0x1c5a, 0x1c7d, U_L}, {0x1c80, 0x1c88, U_L}, {0x1c90, 0x1cba, U_L},
	{0x1cbd, 0x1cbf, U_L}, {0x1ce9, 0x1cec, U_L}, {0x1cee, 0x1cf3, U_L}, {0x1cf5, 0x1cf6, U_L},
	{0x1cfa, 0x1cfa, U_L}, {0x1d00, 0x1dbf, U_L}, {0x1e00, 0x1f15, U_L}, {0x1f18, 0x1f1d, U_L},
	{0x1f20, 0x1f45, U_L}, {0x1f48, 0x1f4d, U_L}, {0x1f50, 0x1f57, U_L}, {0x1f59, 0x1f59, U_L},
	{0x1f5b, 0x1f5b, U_L}, {0x1f5d, 0x1f5d, U_L}, {0x1f5f, 0x1f7d, U_L}, {0x1f80, 0x1fb4, U_L},
	{0x1fb6, 0x1fbc, U_L}, {0x1fbe, 0x1fbe, U_L}, {0x1fc2, 0x1fc4, U_L}, {0x1fc6, 0x1fcc, U_L},
	{0x1fd0, 0x1fd3, U_L}, {0x1fd6, 0x1fdb, U_L}, {0x1fe0, 0x1fec, U_L}, {0x1ff2, 0x1ff4, U_L},
	{0x1ff6, 0x1ffc, U_L}, {0x2000, 0x200a, U_WS}, {0x2028, 0x2029, U_WS}, {0x202f, 0x202f, U_WS},
	{0x205f, 0x205f, U_WS}, {0x2070, 0x2070, U_N}, {0x2071, 0x2071, U_L}, {0x2074, 0x2079, U_N},
	{0x207f, 0x207f, U_L}, {0x2080, 0x2089, U_N}, {0x2090, 0x209c, U_L}, {0x2102, 0x2102, U_L},
	{0x2107, 0x2107, U_L}, {0x210a, 0x2113, U_L}, {0x2115, 0x2115, U_L}, {0x2119, 0x211d, U_L},
	{0x2124, 0x2124, U_L}, {0x2126, 0x2126, U_L}, {0x2128, 0x2128, U_L}, {0x212a, 0x212d, U_L},
	{0x212f, 0x2139, U_L}, {0x213c, 0x213f, U_L}, {0x2145, 0x2149, U_L}, {0x214e, 0x214e, U_L},
	{0x2150, 0x2182, U_N}, {0x2183, 0x2184, U_L}, {0x2185, 0x2189, U_N}, {0x2460, 0x249b, U_N},
	{0x24ea, 0x24ff, U_N}, {0x2776, 0x2793, U_N}, {0x2c00, 0x2ce4, U_L}, {0x2ceb, 0x2cee, U_L},
	{0x2cf2, 0x2cf3, U_L}, {0x2cfd, 0x2cfd, U_N}, {0x2d00, 0x2d25, U_L}, {0x2d27, 0x2d27, U_L},
	{0x2d2d, 0x2d2d, U_L}, {0x2d30, 0x2d67, U_L}, {0x2d6f, 0x2d6f, U_L}, {0x2d80, 0x2d96, U_L},
	{0x2da0, 0x2da6, U_L}, {0x2da8, 0x2dae, U_L}, {0x2db0, 0x2db6, U_L}, {0x2db8, 0x2dbe, U_L},
	{0x2dc0, 0x2dc6, U_L}, {0x2dc8, 0x2dce, U_L}, {0x2dd0, 0x2dd6, U_L}, {0x2dd8, 0x2dde, U_L},
	{0x2e2f, 0x2e2f, U_L}, {0x3000, 0x3000, U_WS}, {0x3005, 0x3006, U_L}, {0x3007, 0x3007, U_N},
	{0x3021, 0x3029, U_N}, {0x3031, 0x3035, U_L}, {0x3038, 0x303a, U_N}, {0x303b, 0x303c, U_L},
	{0x3041, 0x3096, U_L}, {0x309d, 0x309f, U_L}, {0x30a1, 0x30fa, U_L}, {0x30fc, 0x30ff, U_L},
	{0x3105, 0x312f, U_L}, {0x3131, 0x318e, U_L}, {0x3192, 0x3195, U_N}, {0x31a0, 0x31bf, U_L},
	{0x31f0, 0x31ff, U_L}, {0x3220, 0x3229, U_N}, {0x3248, 0x324f, U_N}, {0x3251, 0x325f, U_N},
	{0x3280, 0x3289, U_N}, {0x32b1, 0x32bf, U_N}, {0x3400, 0x4dbf, U_L}, {0x4e00, 0xa48c, U_L},
	{0xa4d0, 0xa4fd, U_L}, {0xa500, 0xa60c, U_L}, {0xa610, 0xa61f, U_L}, {0xa620, 0xa629, U_N},
	{0xa62a, 0xa62b, U_L}, {0xa640, 0xa66e, U_L}, {0xa67f, 0xa69d, U_L}, {0xa6a0, 0xa6e5, U_L},
	{0xa6e6, 0xa6ef, U_N}, {0xa717, 0xa71f, U_L}, {0xa722, 0xa788, U_L}, {0xa78b, 0xa7ca, U_L},
	{0xa7d0, 0xa7d1, U_L}, {0xa7d3, 0xa7d3, U_L}, {0xa7d5, 0xa7d9, U_L}, {0xa7f2, 0xa801, U_L},
	{0xa803, 0xa805, U_L}, {0xa807, 0xa80a, U_L}, {0xa80c, 0xa822, U_L}, {0xa830, 0xa835, U_N},
	{0xa840, 0xa873, U_L}, {0xa882, 0xa8b3, U_L}, {0xa8d0, 0xa8d9, U_N}, {0xa8f2, 0xa8f7, U_L},
	{0xa8fb, 0xa8fb, U_L}, {0xa8fd, 0xa8fe, U_L}, {0xa900, 0xa909, U_N}, {0xa90a, 0xa925, U_L},
	{0xa930, 0xa946, U_L}, {0xa960, 0xa97c, U_L}, {0xa984, 0xa9b2, U_L}, {0xa9cf, 0xa9cf, U_L},
	{0xa9d0, 0xa9d9, U_N}, {0xa9e0, 0xa9e4, U_L}, {0xa9e6, 0xa9ef, U_L}, {0xa9f0, 0xa9f9, U_N},
	{0xa9fa, 0xa9fe, U_L}, {0xaa00, 0xaa28, U_L}, {0xaa40, 0xaa42, U_L}, {0xaa44, 0xaa4b, U_L},
	{0xaa50, 0xaa59, U_N}, {0xaa60, 0xaa76, U_L}, {0xaa7a, 0xaa7a, U_L}, {0xaa7e, 0xaaaf, U_L},
	{0xaab1, 0xaab1, U_L}, {0xaab5, 0xaab6, U_L}, {0xaab9, 0xaabd, U_L}, {0xaac0, 0xaac0, U_L},
	{0xaac2, 0xaac2, U_L}, {0xaadb, 0xaadd, U_L}, {0xaae0, 0xaaea, U_L}, {0xaaf2, 0xaaf4, U_L},
	{0xab01, 0xab06, U_L}, {0xab09, 0xab0e, U_L}, {0xab11, 0xab16, U_L}, {0xab20, 0xab26, U_L},
	{0xab28, 0xab2e, U_L}, {0xab30, 0xab5a, U_L}, {0xab5c, 0xab69, U_L}, {0xab70, 0xabe2, U_L},
	{0xabf0, 0xabf9, U_N}, {0xac00, 0xd7a3, U_L}, {0xd7b0, 0xd7c6, U_L}, {0xd7cb, 0xd7fb, U_L},
	{0xf900, 0xfa6d, U_L}, {0xfa70, 0xfad9, U_L}, {0xfb00, 0xfb06, U_L}, {0xfb13, 0xfb17, U_L},
	{0xfb1d, 0xfb1d, U_L}, {0xfb1f, 0xfb28, U_L}, {0xfb2a, 0xfb36, U_L}, {0xfb38, 0xfb3c, U_L},
	{0xfb3e, 0xfb3e, U_L}, {0xfb40, 0xfb41, U_L}, {0xfb43, 0xfb44, U_L}, {0xfb46, 0xfbb1, U_L},
	{0xfbd3, 0xfd3d, U_L}, {0xfd50, 0xfd8f, U_L}, {0xfd92, 0xfdc7, U_L}, {0xfdf0, 0xfdfb, U_L},
	{0xfe70, 0xfe74, U_L}, {0xfe76, 0xfefc, U_L}, {0xff10, 0xff19, U_N}, {0xff21, 0xff3a, U_L},
	{0xff41, 0xff5a, U_L}, {0xff66, 0xffbe, U_L}, {0xffc2, 0xffc7, U_L}, {0xffca, 0xffcf, U_L},
	{0xffd2, 0xffd7, U_L}, {0xffda, 0xffdc, U_L}, {0x10000, 0x1000b, U_L}, {0x1000d, 0x10026, U_L},
	{0x10028, 0x1003a, U_L}, {0x1003c, 0x1003d, U_L}, {0x1003f, 0x1004d, U_L},
	{0x10050, 0x1005d, U_L}, {0x10080, 0x100fa, U_L}, {0x10107, 0x10133, U_N},
	{0x10140, 0x10178, U_N}, {0x1018a, 0x1018b, U_N}, {0x10280, 0x1029c, U_L},
	{0x102a0, 0x102d0, U_L}, {0x102e1, 0x102fb, U_N}, {0x10300, 0x1031f, U_L},
	{0x10320, 0x10323, U_N}, {0x1032d, 0x10340, U_L}, {0x10341, 0x10341, U_N},
	{0x10342, 0x10349, U_L}, {0x1034a, 0x1034a, U_N}, {0x10350, 0x10375, U_L},
	{0x10380, 0x1039d, U_L}, {0x103a0, 0x103c3, U_L}, {0x103c8, 0x103cf, U_L},
	{0x103d1, 0x103d5, U_N}, {0x10400, 0x1049d, U_L}, {0x104a0, 0x104a9, U_N},
	{0x104b0, 0x104d3, U_L}, {0x104d8, 0x104fb, U_L}, {0x10500, 0x10527, U_L},
	{0x10530, 0x10563, U_L}, {0x10570, 0x1057a, U_L}, {0x1057c, 0x1058a, U_L},
	{0x1058c, 0x10592, U_L}, {0x10594, 0x10595, U_L}, {0x10597, 0x105a1, U_L},
	{0x105a3, 0x105b1, U_L}, {0x105b3, 0x105b9, U_L}, {0x105bb, 0x105bc, U_L},
	{0x10600, 0x10736, U_L}, {0x10740, 0x10755, U_L}, {0x10760, 0x10767, U_L},
	{0x10780, 0x10785, U_L}, {0x10787, 0x107b0, U_L}, {0x107b2, 0x107ba, U_L},
	{0x10800, 0x10805, U_L}, {0x10808, 0x10808, U_L}, {0x1080a, 0x10835, U_L},
	{0x10837, 0x10838, U_L}, {0x1083c, 0x1083c, U_L}, {0x1083f, 0x10855, U_L},
	{0x10858, 0x1085f, U_N}, {0x10860, 0x10876, U_L}, {0x10879, 0x1087f, U_N},
	{0x10880, 0x1089e, U_L}, {0x108a7, 0x108af, U_N}, {0x108e0, 0x108f2, U_L},
	{0x108f4, 0x108f5, U_L}, {0x108fb, 0x108ff, U_N}, {0x10900, 0x10915, U_L},
	{0x10916, 0x1091b, U_N}, {0x10920, 0x10939, U_L}, {0x10980, 0x109b7, U_L},
	{0x109bc, 0x109bd, U_N}, {0x109be, 0x109bf, U_L}, {0x109c0, 0x109cf, U_N},
	{0x109d2, 0x109ff, U_N}, {0x10a00, 0x10a00, U_L}, {0x10a10, 0x10a13, U_L},
	{0x10a15, 0x10a17, U_L}, {0x10a19, 0x10a35, U_L}, {0x10a40, 0x10a48, U_N},
	{0x10a60, 0x10a7c, U_L}, {0x10a7d, 0x10a7e, U_N}, {0x10a80, 0x10a9c, U_L},
	{0x10a9d, 0x10a9f, U_N}, {0x10ac0, 0x10ac7, U_L}, {0x10ac9, 0x10ae4, U_L},
	{0x10aeb, 0x10aef, U_N}, {0x10b00, 0x10b35, U_L}, {0x10b40, 0x10b55, U_L},
	{0x10b58, 0x10b5f, U_N}, {0x10b60, 0x10b72, U_L}, {0x10b78, 0x10b7f, U_N},
	{0x10b80, 0x10b91, U_L}, {0x10ba9, 0x10baf, U_N}, {0x10c00, 0x10c48, U_L},
	{0x10c80, 0x10cb2, U_L}, {0x10cc0, 0x10cf2, U_L}, {0x10cfa, 0x10cff, U_N},
	{0x10d00, 0x10d23, U_L}, {0x10d30, 0x10d39, U_N}, {0x10e60, 0x10e7e, U_N},
	{0x10e80, 0x10ea9, U_L}, {0x10eb0, 0x10eb1, U_L}, {0x10f00, 0x10f1c, U_L},
	{0x10f1d, 0x10f26, U_N}, {0x10f27, 0x10f27, U_L}, {0x10f30, 0x10f45, U_L},
	{0x10f51, 0x10f54, U_N}, {0x10f70, 0x10f81, U_L}, {0x10fb0, 0x10fc4, U_L},
	{0x10fc5, 0x10fcb, U_N}, {0x10fe0, 0x10ff6, U_L}, {0x11003, 0x11037, U_L},
	{0x11052, 0x1106f, U_N}, {0x11071, 0x11072, U_L}, {0x11075, 0x11075, U_L},
	{0x11083, 0x110af, U_L}, {0x110d0, 0x110e8, U_L}, {0x110f0, 0x110f9, U_N},
	{0x11103, 0x11126, U_L}, {0x11136, 0x1113f, U_N}, {0x11144, 0x11144, U_L},
	{0x11147, 0x11147, U_L}, {0x11150, 0x11172, U_L}, {0x11176, 0x11176, U_L},
	{0x11183, 0x111b2, U_L}, {0x111c1, 0x111c4, U_L}, {0x111d0, 0x111d9, U_N},
	{0x111da, 0x111da, U_L}, {0x111dc, 0x111dc, U_L}, {0x111e1, 0x111f4, U_N},
	{0x11200, 0x11211, U_L}, {0x11213, 0x1122b, U_L}, {0x11280, 0x11286, U_L},
	{0x11288, 0x11288, U_L}, {0x1128a, 0x1128d, U_L}, {0x1128f, 0x1129d, U_L},
	{0x1129f, 0x112a8, U_L}, {0x112b0, 0x112de, U_L}, {0x112f0, 0x112f9, U_N},
	{0x11305, 0x1130c, U_L}, {0x1130f, 0x11310, U_L}, {0x11313, 0x11328, U_L},
	{0x1132a, 0x11330, U_L}, {0x11332, 0x11333, U_L}, {0x11335, 0x11339, U_L},
	{0x1133d, 0x1133d, U_L}, {0x11350, 0x11350, U_L}, {0x1135d, 0x11361, U_L},
	{0x11400, 0x11434, U_L}, {0x11447, 0x1144a, U_L}, {0x11450, 0x11459, U_N},
	{0x1145f, 0x11461, U_L}, {0x11480, 0x114af, U_L}, {0x114c4, 0x114c5, U_L},
	{0x114c7, 0x114c7, U_L}, {0x114d0, 0x114d9, U_N}, {0x11580, 0x115ae, U_L},
	{0x115d8, 0x115db, U_L}, {0x11600, 0x1162f, U_L}, {0x11644, 0x11644, U_L},
	{0x11650, 0x11659, U_N}, {0x11680, 0x116aa, U_L}, {0x116b8, 0x116b8, U_L},
	{0x116c0, 0x116c9, U_N}, {0x11700, 0x1171a, U_L}, {0x11730, 0x1173b, U_N},
	{0x11740, 0x11746, U_L}, {0x11800, 0x1182b, U_L}, {0x118a0, 0x118df, U_L},
	{0x118e0, 0x118f2, U_N}, {0x118ff, 0x11906, U_L}, {0x11909, 0x11909, U_L},
	{0x1190c, 0x11913, U_L}, {0x11915, 0x11916, U_L}, {0x11918, 0x1192f, U_L},
	{0x1193f, 0x1193f, U_L}, {0x11941, 0x11941, U_L}, {0x11950, 0x11959, U_N},
	{0x119a0, 0x119a7, U_L}, {0x119aa, 0x119d0, U_L}, {0x119e1, 0x119e1, U_L},
	{0x119e3, 0x119e3, U_L}, {0x11a00, 0x11a00, U_L}, {0x11a0b, 0x11a32, U_L},
	{0x11a3a, 0x11a3a, U_L}, {0x11a50, 0x11a50, U_L}, {0x11a5c, 0x11a89, U_L},
	{0x11a9d, 0x11a9d, U_L}, {0x11ab0, 0x11af8, U_L}, {0x11c00, 0x11c08, U_L},
	{0x11c0a, 0x11c2e, U_L}, {0x11c40, 0x11c40, U_L}, {0x11c50, 0x11c6c, U_N},
	{0x11c72, 0x11c8f, U_L}, {0x11d00, 0x11d06, U_L}, {0x11d08, 0x11d09, U_L},
	{0x11d0b, 0x11d30, U_L}, {0x11d46, 0x11d46, U_L}, {0x11d50, 0x11d59, U_N},
	{0x11d60, 0x11d65, U_L}, {0x11d67, 0x11d68, U_L}, {0x11d6a, 0x11d89, U_L},
	{0x11d98, 0x11d98, U_L}, {0x11da0, 0x11da9, U_N}, {0x11ee0, 0x11ef2, U_L},
	{0x11fb0, 0x11fb0, U_L}, {0x11fc0, 0x11fd4, U_N}, {0x12000, 0x12399, U_L},
	{0x12400, 0x1246e, U_N}, {0x12480, 0x12543, U_L}, {0x12f90, 0x12ff0, U_L},
	{0x13000, 0x1342e, U_L}, {0x14400, 0x14646, U_L}, {0x16800, 0x16a38, U_L},
	{0x16a40, 0x16a5e, U_L}, {0x16a60, 0x16a69, U_N}, {0x16a70, 0x16abe, U_L},
	{0x16ac0, 0x16ac9, U_N}, {0x16ad0, 0x16aed, U_L}, {0x16b00, 0x16b2f, U_L},
	{0x16b40, 0x16b43, U_L}, {0x16b50, 0x16b59, U_N}, {0x16b5b, 0x16b61, U_N},
	{0x16b63, 0x16b77, U_L}, {0x16b7d, 0x16b8f, U_L}, {0x16e40, 0x16e7f, U_L},
	{0x16e80, 0x16e96, U_N}, {0x16f00, 0x16f4a, U_L}, {0x16f50, 0x16f50, U_L},
	{0x16f93, 0x16f9f, U_L}, {0x16fe0, 0x16fe1, U_L}, {0x16fe3, 0x16fe3, U_L},
	{0x17000, 0x187f7, U_L}, {0x18800, 0x18cd5, U_L}, {0x18d00, 0x18d08, U_L},
	{0x1aff0, 0x1aff3, U_L}, {0x1aff5, 0x1affb, U_L}, {0x1affd, 0x1affe, U_L},
	{0x1b000, 0x1b122, U_L}, {0x1b150, 0x1b152, U_L}, {0x1b164, 0x1b167, U_L},
	{0x1b170, 0x1b2fb, U_L}, {0x1bc00, 0x1bc6a, U_L}, {0x1bc70, 0x1bc7c, U_L},
	{0x1bc80, 0x1bc88, U_L}, {0x1bc90, 0x1bc99, U_L}, {0x1d2e0, 0x1d2f3, U_N},
	{0x1d360, 0x1d378, U_N}, {0x1d400, 0x1d454, U_L}, {0x1d456, 0x1d49c, U_L},
	{0x1d49e, 0x1d49f, U_L}, {0x1d4a2, 0x1d4a2, U_L}, {0x1d4a5, 0x1d4a6, U_L},
	{0x1d4a9, 0x1d4ac, U_L}, {0x1d4ae, 0x1d4b9, U_L}, {0x1d4bb, 0x1d4bb, U_L},
	{0x1d4bd, 0x1d4c3, U_L}, {0x1d4c5, 0x1d505, U_L}, {0x1d507, 0x1d50a, U_L},
	{0x1d50d, 0x1d514, U_L}, {0x1d516, 0x1d51c, U_L}, {0x1d51e, 0x1d539, U_L},
	{0x1d53b, 0x1d53e, U_L}, {0x1d540, 0x1d544, U_L}, {0x1d546, 0x1d546, U_L},
	{0x1d54a, 0x1d550, U_L}, {0x1d552, 0x1d6a5, U_L}, {0x1d6a8, 0x1d6c0, U_L},
	{0x1d6c2, 0x1d6da, U_L}, {0x1d6dc, 0x1d6fa, U_L}, {0x1d6fc, 0x1d714, U_L},
	{0x1d716, 0x1d734, U_L}, {0x1d736, 0x1d74e, U_L}, {0x1d750, 0x1d76e, U_L},
	{0x1d770, 0x1d788, U_L}, {0x1d78a, 0x1d7a8, U_L}, {0x1d7aa, 0x1d7c2, U_L},
	{0x1d7c4, 0x1d7cb, U_L}, {0x1d7ce, 0x1d7ff, U_N}, {0x1df00, 0x1df1e, U_L},
	{0x1e100, 0x1e12c, U_L}, {0x1e137, 0x1e13d, U_L}, {0x1e140, 0x1e149, U_N},
	{0x1e14e, 0x1e14e, U_L}, {0x1e290, 0x1e2ad, U_L}, {0x1e2c0, 0x1e2eb, U_L},
	{0x1e2f0, 0x1e2f9, U_N}, {0x1e7e0, 0x1e7e6, U_L}, {0x1e7e8, 0x1e7eb, U_L},
	{0x1e7ed, 0x1e7ee, U_L}, {0x1e7f0, 0x1e7fe, U_L}, {0x1e800, 0x1e8c4, U_L},
	{0x1e8c7, 0x1e8cf, U_N}, {0x1e900, 0x1e943, U_L}, {0x1e94b, 0x1e94b, U_L},
	{0x1e950, 0x1e959, U_N}, {0x1ec71, 0x1ecab, U_N}, {0x1ecad, 0x1ecaf, U_N},
	{0x1ecb1, 0x1ecb4, U_N}, {0x1ed01, 0x1ed2d, U_N}, {0x1ed2f, 0x1ed3d, U_N},
	{0x1ee00, 0x1ee03, U_L}, {0x1ee05, 0x1ee1f, U_L}, {0x1ee21, 0x1ee22, U_L},
	{0x1ee24, 0x1ee24, U_L}, {0x1ee27, 0x1ee27, U_L}, {0x1ee29, 0x1ee32, U_L},
	{0x1ee34, 0x1ee37, U_L}, {0x1ee39, 0x1ee39, U_L}, {0x1ee3b, 0x1ee3b, U_L},
	{0x1ee42, 0x1ee42, U_L}, {0x1ee47, 0x1ee47, U_L}, {0x1ee49, 0x1ee49, U_L},
	{0x1ee4b, 0x1ee4b, U_L}, {0x1ee4d, 0x1ee4f, U_L}, {0x1ee51, 0x1ee52, U_L},
	{0x1ee54, 0x1ee54, U_L}, {0x1ee57, 0x1ee57, U_L}, {0x1ee59, 0x1ee59, U_L},
	{0x1ee5b, 0x1ee5b, U_L}, {0x1ee5d, 0x1ee5d, U_L}, {0x1ee5f, 0x1ee5f, U_L},
	{0x1ee61, 0x1ee62, U_L}, {0x1ee64, 0x1ee64, U_L}, {0x1ee67, 0x1ee6a, U_L},
	{0x1ee6c, 0x1ee72, U_L}, {0x1ee74, 0x1ee77, U_L}, {0x1ee79, 0x1ee7c, U_L},
	{0x1ee7e, 0x1ee7e, U_L}, {0x1ee80, 0x1ee89, U_L}, {0x1ee8b, 0x1ee9b, U_L},
	{0x1eea1, 0x1eea3, U_L}, {0x1eea5, 0x1eea9, U_L}, {0x1eeab, 0x1eebb, U_L},
	{0x1f100, 0x1f10c, U_N}, {0x1fbf0, 0x1fbf9, U_N}, {0x20000, 0x2a6df, U_L},
	{0x2a700, 0x2b738, U_L}, {0x2b740, 0x2b81d, U_L}, {0x2b820, 0x2cea1, U_L},
	{0x2ceb0, 0x2ebe0, U_L}, {0x2f800, 0x2fa1d, U_L}, {0x30000, 0x3134a, U_L},
};

static int cp_class(uint32_t cp)
{
	size_t lo = 0, hi = sizeof(uni_ranges) / sizeof(uni_ranges[0]);

	if (cp < 0x80) {
		if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z')
			return U_L;
		if (cp >= '0' && cp <= '9')
			return U_N;
		if (cp == ' ' || (cp >= 9 && cp <= 13))
			return U_WS;
		return U_OTHER;
	}
	while (lo < hi) {
		size_t mid = (lo + hi) / 2;

		if (cp > uni_ranges[mid].hi)
			lo = mid + 1;
		else if (cp < uni_ranges[mid].lo)
			hi = mid;
		else
			return uni_ranges[mid].cls;
	}
	return U_OTHER;
}

/*
 * The UTF-8 sequence at s[0..n): its length (> 0) and code point; 0 when s holds only a valid prefix
 * of a sequence cut by n; -1 when s[0] does not start a valid sequence (overlong forms, surrogates and
 * code points past U+10FFFF are invalid).
 */
static int utf8_decode(const uint8_t *s, size_t n, uint32_t *cp)
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

static size_t utf8_encode(uint32_t cp, uint8_t *out)
{
	if (cp < 0x80) {
		out[0] = (uint8_t)cp;
		return 1;
	}
	if (cp < 0x800) {
		out[0] = (uint8_t)(0xc0 | cp >> 6);
		out[1] = (uint8_t)(0x80 | (cp & 0x3f));
		return 2;
	}
	if (cp < 0x10000) {
		out[0] = (uint8_t)(0xe0 | cp >> 12);
		out[1] = (uint8_t)(0x80 | (cp >> 6 & 0x3f));
		out[2] = (uint8_t)(0x80 | (cp & 0x3f));
		return 3;
	}
	out[0] = (uint8_t)(0xf0 | cp >> 18);
	out[1] = (uint8_t)(0x80 | (cp >> 12 & 0x3f));
	out[2] = (uint8_t)(0x80 | (cp >> 6 & 0x3f));
	out[3] = (uint8_t)(0x80 | (cp & 0x3f));
	return 4;
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

/* Bytes -> the printable string of their characters (NUL-terminated, malloc'd). */
static char *bytes_to_visible(const uint8_t *p, size_t n)
{
	char *s = xrealloc(NULL, 2 * n + 1);
	size_t k = 0;

	for (size_t i = 0; i < n; i++)
		k += utf8_encode(tok_byte_to_cp(p[i]), (uint8_t *)s + k);
	s[k] = 0;
	return s;
}

/* A printable string -> bytes (into out, which holds strlen(s) bytes); -1 if a character has no byte. */
static long visible_to_bytes(const char *s, uint8_t *out)
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

/* ---- special (added) tokens and the scanner -------------------------------------------------- */

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

static int sp_cmp(const void *a, const void *b)
{
	const struct sp_tok *x = a, *y = b;

	if (x->len != y->len)
		return x->len > y->len ? -1 : 1;
	return x->id < y->id ? -1 : x->id > y->id;
}

static void specials_build(struct specials *sp)
{
	qsort(sp->tok, (size_t)sp->n, sizeof(*sp->tok), sp_cmp);
	memset(sp->first, 0, sizeof(sp->first));
	for (int k = 0; k < sp->n; k++)
		sp->first[sp->tok[k].s[0]] = true;
}

struct scan_cb {
	void (*piece)(void *ctx, const uint8_t *p, size_t n);
	void (*special)(void *ctx, uint32_t id);
	void *ctx;
};

/*
 * Cut s[0..n) at the added tokens and pre-tokenize the stretches between them, calling back for each
 * piece and added token in order.  final: n is the end of the text.  Otherwise stops before the first
 * piece whose extent depends on what follows n; returns the number of bytes consumed.
 */
static size_t scan(const struct specials *sp, enum tok_pretok mode, const uint8_t *s, size_t n,
		   bool final, const struct scan_cb *cb)
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
		for (p = pos; p < i;) {
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

/* ---- the tokenizer --------------------------------------------------------------------------- */

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

struct sym {
	uint32_t id;
	int prev, next;
};

struct hent {
	uint32_t rank;
	uint32_t pos;
};

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
	bool ignore_merges;
	char *warning;

	/* encoding scratch and the word cache */
	struct bmap cache;		/* piece -> (offset into cache_ids) << 8 | count */
	uint32_t *cache_ids;
	size_t cache_n, cache_cap;
	struct sym *sym;
	size_t sym_cap;
	struct hent *heap;
	size_t heap_cap;
};

static struct tokenizer *tok_alloc(void)
{
	struct tokenizer *t = xcalloc(1, sizeof(*t));

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
	free(t->warning);
	bmap_free(&t->cache);
	free(t->cache_ids);
	free(t->sym);
	free(t->heap);
	free(t);
}

/* Give id its bytes (the id must have none yet). */
static void tok_set(struct tokenizer *t, uint32_t id, const uint8_t *p, size_t n, int kind)
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

static const uint8_t *tok_ptr(const struct tokenizer *t, uint32_t id)
{
	return t->arena + t->tok[id].off;
}

static void tok_add_added(struct tokenizer *t, const struct added *a)
{
	RESERVE(t->added, t->added_cap, (size_t)t->n_added + 1);
	t->added[t->n_added++] = *a;
}

static void tok_add_merge(struct tokenizer *t, uint32_t a, uint32_t b, uint32_t r)
{
	RESERVE(t->merges, t->merges_cap, (size_t)t->n_merges + 1);
	t->merges[t->n_merges][0] = a;
	t->merges[t->n_merges][1] = b;
	t->merges[t->n_merges][2] = r;
	pmap_put(&t->rank_of, a, b, (uint32_t)t->n_merges);
	t->n_merges++;
}

/* Index the byte-level tokens by their bytes (the first id wins a tie). */
static void tok_index_vocab(struct tokenizer *t)
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

static long tok_lookup(const struct tokenizer *t, const uint8_t *p, size_t n)
{
	long e = bmap_find(&t->by_bytes, p, n, hash_bytes(p, n));

	return e < 0 ? -1 : (long)t->by_bytes.e[e].val;
}

/* After the vocabulary and the added tokens are in: the byte table and the added-token matcher. */
static int tok_finish_build(struct tokenizer *t, const char *name, char *err, size_t errlen)
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
	t->sp.tok = xcalloc((size_t)t->n_added, sizeof(*t->sp.tok));
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

int tokenizer_is_special(const struct tokenizer *t, uint32_t id)
{
	return id < (uint32_t)t->vocab_size && t->tok[id].kind == TK_ADDED;
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
	static const char *const names[] = { "<|endoftext|>", "<|end_of_text|>", "</s>" };

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

/* ---- encoding -------------------------------------------------------------------------------- */

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

	return scan(&t->sp, t->pretok, s, n, final, &cb);
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

/* ---- training -------------------------------------------------------------------------------- */

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
	tr = xcalloc(1, sizeof(*tr));
	tr->n_special = n_specials;
	tr->special = xcalloc((size_t)n_specials, sizeof(*tr->special));
	tr->sp.tok = xcalloc((size_t)n_specials, sizeof(*tr->sp.tok));
	for (int k = 0; k < n_specials; k++) {
		size_t n = strlen(specials[k]);

		tr->special[k] = xrealloc(NULL, n + 1);
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
	size_t used = scan(&tr->sp, TOK_PRETOK_GPT2, tr->buf, tr->len, final, &cb);

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

			st->pa = xrealloc(st->pa, cap * sizeof(*st->pa));
			st->pb = xrealloc(st->pb, cap * sizeof(*st->pb));
			st->pcount = xrealloc(st->pcount, cap * sizeof(*st->pcount));
			st->occ = xrealloc(st->occ, cap * sizeof(*st->occ));
			st->touched = xrealloc(st->touched, cap * sizeof(*st->touched));
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
		o->w = xrealloc(o->w, o->cap * sizeof(*o->w));
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
	st.start = xcalloc(st.n_words, sizeof(*st.start));
	st.len = xcalloc(st.n_words, sizeof(*st.len));
	st.count = xcalloc(st.n_words, sizeof(*st.count));
	st.stamp = xcalloc(st.n_words, sizeof(*st.stamp));
	for (size_t w = 0; w < st.n_words; w++) {
		st.start[w] = total;
		total += tr->words.e[w].len;
	}
	st.sym = xcalloc(total, sizeof(*st.sym));
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

/* ---- tokenizer.json -------------------------------------------------------------------------- */

static const char PAT_GPT2[] =
	"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char PAT_LLAMA3[] =
	"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
	"[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char PAT_QWEN2[] =
	"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
	"[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* A regex with literal CR and LF characters written as the escapes \r and \n (malloc'd). */
static char *escape_crlf(const char *s)
{
	size_t n = strlen(s), k = 0;
	char *o = xrealloc(NULL, 2 * n + 1);

	for (size_t i = 0; i < n; i++) {
		if (s[i] == '\r' || s[i] == '\n') {
			o[k++] = '\\';
			o[k++] = s[i] == '\r' ? 'r' : 'n';
		} else {
			o[k++] = s[i];
		}
	}
	o[k] = 0;
	return o;
}

static const char *json_type_name(const cJSON *v)
{
	if (!v || cJSON_IsNull(v))
		return "null";
	if (cJSON_IsBool(v))
		return "a boolean";
	if (cJSON_IsNumber(v))
		return "a number";
	if (cJSON_IsString(v))
		return "a string";
	if (cJSON_IsArray(v))
		return "an array";
	return "an object";
}

/* obj[key] as a boolean (absent or null: def); -1 when it is something else. */
static int json_bool(const cJSON *obj, const char *key, int def)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);

	if (!v || cJSON_IsNull(v))
		return def;
	if (!cJSON_IsBool(v))
		return -1;
	return cJSON_IsTrue(v);
}

/* A non-negative integral id below TOK_MAX_ID, or -1. */
static long json_id(const cJSON *v)
{
	double d;

	if (!cJSON_IsNumber(v))
		return -1;
	d = v->valuedouble;
	if (d < 0 || d >= TOK_MAX_ID || d != (double)(long)d)
		return -1;
	return (long)d;
}

struct load_ctx {
	const char *name;
	char *err;
	size_t errlen;
};

#define LOAD_ERR(L, ...) (snprintf((L)->err, (L)->errlen, __VA_ARGS__), -1)

static int load_added(struct tokenizer *t, const cJSON *root, struct load_ctx *L)
{
	const cJSON *list = cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), *it;
	int k = 0;

	if (!list || cJSON_IsNull(list))
		return 0;
	if (!cJSON_IsArray(list))
		return LOAD_ERR(L, "%s: added_tokens is %s, not an array", L->name, json_type_name(list));
	cJSON_ArrayForEach(it, list) {
		const cJSON *content = cJSON_GetObjectItemCaseSensitive(it, "content");
		long id = json_id(cJSON_GetObjectItemCaseSensitive(it, "id"));
		struct added a = { 0 };
		int f[5];

		if (!cJSON_IsObject(it) || id < 0)
			return LOAD_ERR(L, "%s: added_tokens[%d].id is missing or not an id in [0, %d)",
					L->name, k, TOK_MAX_ID);
		if (!cJSON_IsString(content))
			return LOAD_ERR(L, "%s: added_tokens[%d].content is %s, not a string", L->name, k,
					json_type_name(content));
		f[0] = json_bool(it, "special", 0);
		f[1] = json_bool(it, "single_word", 0);
		f[2] = json_bool(it, "lstrip", 0);
		f[3] = json_bool(it, "rstrip", 0);
		f[4] = json_bool(it, "normalized", 0);
		for (int j = 0; j < 5; j++)
			if (f[j] < 0)
				return LOAD_ERR(L, "%s: added_tokens[%d]: a flag is not a boolean", L->name,
						k);
		if (id < t->vocab_size && t->tok[id].kind != TK_NONE)
			return LOAD_ERR(L, "%s: added_tokens[%d]: id %ld is given twice", L->name, k, id);
		a = (struct added){ (uint32_t)id, f[0], f[1], f[2], f[3], f[4] };
		tok_set(t, (uint32_t)id, (const uint8_t *)content->valuestring,
			strlen(content->valuestring), TK_ADDED);
		t->tok[id].in_vocab = false;
		tok_add_added(t, &a);
		k++;
	}
	return 0;
}

static int load_vocab(struct tokenizer *t, const cJSON *model, struct load_ctx *L)
{
	const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab"), *it;
	uint8_t *buf = NULL;
	size_t cap = 0;

	if (!cJSON_IsObject(vocab))
		return LOAD_ERR(L, "%s: model.vocab is %s, not an object", L->name, json_type_name(vocab));
	cJSON_ArrayForEach(it, vocab) {
		long id = json_id(it);
		size_t n = strlen(it->string);
		long nb;

		if (id < 0) {
			free(buf);
			return LOAD_ERR(L, "%s: model.vocab[\"%s\"] is not an id in [0, %d)", L->name,
					it->string, TOK_MAX_ID);
		}
		if (id < t->vocab_size && t->tok[id].kind == TK_ADDED) {
			t->tok[id].in_vocab = true;
			continue;
		}
		if (id < t->vocab_size && t->tok[id].kind != TK_NONE) {
			free(buf);
			return LOAD_ERR(L, "%s: model.vocab: id %ld is given twice (\"%s\")", L->name, id,
					it->string);
		}
		RESERVE(buf, cap, n + 1);
		nb = visible_to_bytes(it->string, buf);
		if (nb >= 0)
			tok_set(t, (uint32_t)id, buf, (size_t)nb, TK_BYTES);
		else
			tok_set(t, (uint32_t)id, (const uint8_t *)it->string, n, TK_RAW);
	}
	free(buf);
	tok_index_vocab(t);
	return 0;
}

/* One half of a merge: the id of the byte-level token spelt s, or -1. */
static long merge_half(const struct tokenizer *t, const char *s, size_t n, uint8_t *buf)
{
	char *z = xrealloc(NULL, n + 1);
	long nb, id;

	memcpy(z, s, n);
	z[n] = 0;
	nb = visible_to_bytes(z, buf);
	free(z);
	if (nb < 0)
		return -1;
	id = tok_lookup(t, buf, (size_t)nb);
	return id;
}

static int load_merges(struct tokenizer *t, const cJSON *model, struct load_ctx *L)
{
	const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges"), *it;
	uint8_t *buf = NULL, *cat = NULL;
	size_t cap = 0, cat_cap = 0;
	int k = 0, rc = 0;

	if (!merges || cJSON_IsNull(merges))
		return 0;
	if (!cJSON_IsArray(merges))
		return LOAD_ERR(L, "%s: model.merges is %s, not an array", L->name,
				json_type_name(merges));
	cJSON_ArrayForEach(it, merges) {
		const char *sa, *sb;
		size_t na, nb;
		long a, b, r;

		if (cJSON_IsString(it)) {
			const char *sp = strchr(it->valuestring, ' ');

			sa = it->valuestring;
			if (!sp || strchr(sp + 1, ' ')) {
				rc = LOAD_ERR(L, "%s: model.merges[%d] \"%s\" is not two tokens separated by "
					      "one space", L->name, k, it->valuestring);
				break;
			}
			na = (size_t)(sp - sa);
			sb = sp + 1;
			nb = strlen(sb);
		} else if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 &&
			   cJSON_IsString(cJSON_GetArrayItem(it, 0)) &&
			   cJSON_IsString(cJSON_GetArrayItem(it, 1))) {
			sa = cJSON_GetArrayItem(it, 0)->valuestring;
			sb = cJSON_GetArrayItem(it, 1)->valuestring;
			na = strlen(sa);
			nb = strlen(sb);
		} else {
			rc = LOAD_ERR(L, "%s: model.merges[%d] is neither \"a b\" nor [\"a\", \"b\"]",
				      L->name, k);
			break;
		}
		RESERVE(buf, cap, na + nb + 1);
		a = merge_half(t, sa, na, buf);
		b = merge_half(t, sb, nb, buf);
		if (a < 0 || b < 0) {
			rc = LOAD_ERR(L, "%s: model.merges[%d]: \"%.*s\" is not a byte-level token of "
				      "model.vocab", L->name, k, (int)(a < 0 ? na : nb), a < 0 ? sa : sb);
			break;
		}
		RESERVE(cat, cat_cap, t->tok[a].len + t->tok[b].len);
		memcpy(cat, tok_ptr(t, (uint32_t)a), t->tok[a].len);
		memcpy(cat + t->tok[a].len, tok_ptr(t, (uint32_t)b), t->tok[b].len);
		r = tok_lookup(t, cat, t->tok[a].len + t->tok[b].len);
		if (r < 0) {
			rc = LOAD_ERR(L, "%s: model.merges[%d]: the merge of \"%.*s\" and \"%.*s\" is not in "
				      "model.vocab", L->name, k, (int)na, sa, (int)nb, sb);
			break;
		}
		if (pmap_get(&t->rank_of, (uint32_t)a, (uint32_t)b) == NO_RANK)
			tok_add_merge(t, (uint32_t)a, (uint32_t)b, (uint32_t)r);
		k++;
	}
	free(buf);
	free(cat);
	return rc;
}

static int load_model(struct tokenizer *t, const cJSON *root, struct load_ctx *L)
{
	const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model"), *v;
	static const char *const empty_keys[] = { "continuing_subword_prefix", "end_of_word_suffix" };
	int im;

	if (!cJSON_IsObject(model))
		return LOAD_ERR(L, "%s: model is %s, not an object", L->name, json_type_name(model));
	v = cJSON_GetObjectItemCaseSensitive(model, "type");
	if (v && !(cJSON_IsString(v) && !strcmp(v->valuestring, "BPE")))
		return LOAD_ERR(L, "%s: model.type is %s%s%s: only byte-level \"BPE\" is supported",
				L->name, cJSON_IsString(v) ? "\"" : "",
				cJSON_IsString(v) ? v->valuestring : json_type_name(v),
				cJSON_IsString(v) ? "\"" : "");
	if (!v && !cJSON_GetObjectItemCaseSensitive(model, "merges"))
		return LOAD_ERR(L, "%s: model.type is missing (and no model.merges): not a BPE model",
				L->name);
	v = cJSON_GetObjectItemCaseSensitive(model, "dropout");
	if (v && !cJSON_IsNull(v) && !(cJSON_IsNumber(v) && v->valuedouble == 0))
		return LOAD_ERR(L, "%s: model.dropout is set: BPE dropout is not supported", L->name);
	for (size_t k = 0; k < 2; k++) {
		v = cJSON_GetObjectItemCaseSensitive(model, empty_keys[k]);
		if (v && !cJSON_IsNull(v) && !(cJSON_IsString(v) && !v->valuestring[0]))
			return LOAD_ERR(L, "%s: model.%s is set: not supported by byte-level BPE", L->name,
					empty_keys[k]);
	}
	if (json_bool(model, "byte_fallback", 0) != 0)
		return LOAD_ERR(L, "%s: model.byte_fallback is set: a byte-fallback (sentencepiece-style) "
				"BPE is not byte-level BPE and is not supported", L->name);
	im = json_bool(model, "ignore_merges", 0);
	if (im < 0)
		return LOAD_ERR(L, "%s: model.ignore_merges is not a boolean", L->name);
	t->ignore_merges = im;
	if (load_vocab(t, model, L))
		return -1;
	return load_merges(t, model, L);
}

/* A ByteLevel pre-tokenizer step: checks its options; *use_regex is set from it. */
static int load_bytelevel(const cJSON *p, const char *key, int *use_regex, struct load_ctx *L)
{
	int aps = json_bool(p, "add_prefix_space", 0);

	if (aps != 0)
		return LOAD_ERR(L, "%s: %s.add_prefix_space is %s: only false is supported", L->name, key,
				aps < 0 ? "not a boolean" : "true");
	*use_regex = json_bool(p, "use_regex", 1);
	if (*use_regex < 0)
		return LOAD_ERR(L, "%s: %s.use_regex is not a boolean", L->name, key);
	return 0;
}

static int load_pretok(struct tokenizer *t, const cJSON *root, struct load_ctx *L)
{
	const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
	const cJSON *type = cJSON_GetObjectItemCaseSensitive(p, "type");
	const cJSON *list, *split, *bl, *pat, *rx;
	const char *s;
	char *e;
	int use_regex;

	if (!cJSON_IsObject(p) || !cJSON_IsString(type))
		return LOAD_ERR(L, "%s: pre_tokenizer is %s: a byte-level BPE needs a ByteLevel "
				"pre_tokenizer", L->name, cJSON_IsObject(p) ? "untyped" : json_type_name(p));
	if (!strcmp(type->valuestring, "ByteLevel")) {
		if (load_bytelevel(p, "pre_tokenizer", &use_regex, L))
			return -1;
		if (!use_regex)
			return LOAD_ERR(L, "%s: pre_tokenizer.use_regex is false: a ByteLevel pre-tokenizer "
					"without a split pattern is not supported", L->name);
		t->pretok = TOK_PRETOK_GPT2;
		return 0;
	}
	if (strcmp(type->valuestring, "Sequence"))
		return LOAD_ERR(L, "%s: pre_tokenizer.type is \"%s\": only ByteLevel, or a Sequence of a "
				"Split and a ByteLevel, is supported", L->name, type->valuestring);
	list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers");
	split = cJSON_GetArrayItem(list, 0);
	bl = cJSON_GetArrayItem(list, 1);
	if (!cJSON_IsArray(list) || cJSON_GetArraySize(list) != 2 || !cJSON_IsObject(split) ||
	    !cJSON_IsObject(bl) ||
	    !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(split, "type")) ||
	    strcmp(cJSON_GetObjectItemCaseSensitive(split, "type")->valuestring, "Split") ||
	    !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(bl, "type")) ||
	    strcmp(cJSON_GetObjectItemCaseSensitive(bl, "type")->valuestring, "ByteLevel"))
		return LOAD_ERR(L, "%s: pre_tokenizer.pretokenizers: only [Split, ByteLevel] is supported",
				L->name);
	if (load_bytelevel(bl, "pre_tokenizer.pretokenizers[1]", &use_regex, L))
		return -1;
	if (use_regex)
		return LOAD_ERR(L, "%s: pre_tokenizer.pretokenizers[1].use_regex is true after a Split: "
				"not supported", L->name);
	s = cJSON_IsString(cJSON_GetObjectItemCaseSensitive(split, "behavior")) ?
		    cJSON_GetObjectItemCaseSensitive(split, "behavior")->valuestring : "";
	if (strcmp(s, "Isolated") || json_bool(split, "invert", 0) != 0)
		return LOAD_ERR(L, "%s: pre_tokenizer.pretokenizers[0]: only behavior \"Isolated\" "
				"without invert is supported", L->name);
	pat = cJSON_GetObjectItemCaseSensitive(split, "pattern");
	rx = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
	if (!cJSON_IsString(rx))
		return LOAD_ERR(L, "%s: pre_tokenizer.pretokenizers[0].pattern.Regex is missing (a "
				"String pattern is not supported)", L->name);
	e = escape_crlf(rx->valuestring);
	if (!strcmp(e, PAT_GPT2))
		t->pretok = TOK_PRETOK_GPT2;
	else if (!strcmp(e, PAT_LLAMA3))
		t->pretok = TOK_PRETOK_LLAMA3;
	else if (!strcmp(e, PAT_QWEN2))
		t->pretok = TOK_PRETOK_QWEN2;
	else {
		snprintf(L->err, L->errlen, "%s: pre_tokenizer.pretokenizers[0].pattern.Regex \"%s\" is "
			 "not one of the supported patterns (GPT-2, Llama 3, Qwen2)", L->name, e);
		free(e);
		return -1;
	}
	free(e);
	return 0;
}

static int load_rest(struct tokenizer *t, const cJSON *root, struct load_ctx *L)
{
	const cJSON *norm = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
	const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
	const cJSON *type;

	if (norm && !cJSON_IsNull(norm)) {
		type = cJSON_GetObjectItemCaseSensitive(norm, "type");
		if (cJSON_IsString(type) && !strcmp(type->valuestring, "NFC")) {
			const char *w = "normalizer NFC is not applied (text already in NFC encodes "
					"identically)";

			t->warning = xrealloc(NULL, strlen(w) + 1);
			strcpy(t->warning, w);
		} else if (!(cJSON_IsString(type) && !strcmp(type->valuestring, "Sequence") &&
			     !cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(norm, "normalizers")))) {
			return LOAD_ERR(L, "%s: normalizer.type is %s%s%s: only no normalizer is supported",
					L->name, cJSON_IsString(type) ? "\"" : "",
					cJSON_IsString(type) ? type->valuestring : json_type_name(type),
					cJSON_IsString(type) ? "\"" : "");
		}
	}
	if (dec && !cJSON_IsNull(dec)) {
		type = cJSON_GetObjectItemCaseSensitive(dec, "type");
		if (!cJSON_IsString(type) || strcmp(type->valuestring, "ByteLevel"))
			return LOAD_ERR(L, "%s: decoder.type is %s%s%s: only ByteLevel is supported",
					L->name, cJSON_IsString(type) ? "\"" : "",
					cJSON_IsString(type) ? type->valuestring : json_type_name(type),
					cJSON_IsString(type) ? "\"" : "");
	}
	return 0;
}

struct tokenizer *tokenizer_parse(const char *json, size_t len, const char *name, char *err,
				  size_t errlen)
{
	struct load_ctx L = { name, err, errlen };
	struct tokenizer *t;
	cJSON *root = cJSON_ParseWithLength(json, len);

	if (!root) {
		const char *at = cJSON_GetErrorPtr();
		long off = at && at >= json && at <= json + len ? (long)(at - json) : -1;

		snprintf(err, errlen, "%s: not valid JSON (near byte %ld)", name, off);
		return NULL;
	}
	t = tok_alloc();
	if (!cJSON_IsObject(root)) {
		snprintf(err, errlen, "%s: not a JSON object", name);
		goto fail;
	}
	if (load_added(t, root, &L) || load_model(t, root, &L) || load_pretok(t, root, &L) ||
	    load_rest(t, root, &L) || tok_finish_build(t, name, err, errlen))
		goto fail;
	cJSON_Delete(root);
	return t;
fail:
	cJSON_Delete(root);
	tokenizer_free(t);
	return NULL;
}

struct tokenizer *tokenizer_load(const char *path, char *err, size_t errlen)
{
	FILE *fp = fopen(path, "rb");
	struct tokenizer *t;
	char *buf;
	long n;

	if (!fp) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return NULL;
	}
	if (fseek(fp, 0, SEEK_END) || (n = ftell(fp)) < 0 || fseek(fp, 0, SEEK_SET)) {
		snprintf(err, errlen, "%s: cannot read: %s", path, strerror(errno));
		fclose(fp);
		return NULL;
	}
	buf = xrealloc(NULL, (size_t)n + 1);
	if (fread(buf, 1, (size_t)n, fp) != (size_t)n) {
		snprintf(err, errlen, "%s: read error", path);
		free(buf);
		fclose(fp);
		return NULL;
	}
	fclose(fp);
	buf[n] = 0;
	t = tokenizer_parse(buf, (size_t)n, path, err, errlen);
	free(buf);
	return t;
}

/* A token's spelling in model.vocab: the byte-level characters, or the string itself. */
static char *vocab_string(const struct tokenizer *t, uint32_t id)
{
	const struct token *k = &t->tok[id];
	char *s;

	if (k->kind == TK_BYTES)
		return bytes_to_visible(tok_ptr(t, id), k->len);
	s = xrealloc(NULL, k->len + 1);
	memcpy(s, tok_ptr(t, id), k->len);
	s[k->len] = 0;
	return s;
}

static cJSON *bytelevel_json(bool add_prefix_space, bool trim_offsets, bool use_regex)
{
	cJSON *o = cJSON_CreateObject();

	cJSON_AddStringToObject(o, "type", "ByteLevel");
	cJSON_AddBoolToObject(o, "add_prefix_space", add_prefix_space);
	cJSON_AddBoolToObject(o, "trim_offsets", trim_offsets);
	cJSON_AddBoolToObject(o, "use_regex", use_regex);
	return o;
}

static cJSON *tokenizer_to_json(const struct tokenizer *t)
{
	cJSON *root = cJSON_CreateObject(), *added, *model, *vocab, *merges, *pre;

	cJSON_AddStringToObject(root, "version", "1.0");
	cJSON_AddNullToObject(root, "truncation");
	cJSON_AddNullToObject(root, "padding");
	added = cJSON_AddArrayToObject(root, "added_tokens");
	for (int k = 0; k < t->n_added; k++) {
		const struct added *a = &t->added[k];
		cJSON *o = cJSON_CreateObject();
		char *s = vocab_string(t, a->id);

		cJSON_AddNumberToObject(o, "id", a->id);
		cJSON_AddStringToObject(o, "content", s);
		cJSON_AddBoolToObject(o, "single_word", a->single_word);
		cJSON_AddBoolToObject(o, "lstrip", a->lstrip);
		cJSON_AddBoolToObject(o, "rstrip", a->rstrip);
		cJSON_AddBoolToObject(o, "normalized", a->normalized);
		cJSON_AddBoolToObject(o, "special", a->special);
		cJSON_AddItemToArray(added, o);
		free(s);
	}
	cJSON_AddNullToObject(root, "normalizer");
	if (t->pretok == TOK_PRETOK_GPT2) {
		pre = bytelevel_json(false, true, true);
	} else {
		cJSON *list, *split = cJSON_CreateObject(), *pat = cJSON_CreateObject();
		const char *rx = t->pretok == TOK_PRETOK_LLAMA3 ? PAT_LLAMA3 : PAT_QWEN2;

		pre = cJSON_CreateObject();
		cJSON_AddStringToObject(pre, "type", "Sequence");
		list = cJSON_AddArrayToObject(pre, "pretokenizers");
		cJSON_AddStringToObject(split, "type", "Split");
		cJSON_AddStringToObject(pat, "Regex", rx);
		cJSON_AddItemToObject(split, "pattern", pat);
		cJSON_AddStringToObject(split, "behavior", "Isolated");
		cJSON_AddBoolToObject(split, "invert", false);
		cJSON_AddItemToArray(list, split);
		cJSON_AddItemToArray(list, bytelevel_json(false, true, false));
	}
	cJSON_AddItemToObject(root, "pre_tokenizer", pre);
	cJSON_AddItemToObject(root, "post_processor", bytelevel_json(true, false, true));
	cJSON_AddItemToObject(root, "decoder", bytelevel_json(true, true, true));
	model = cJSON_AddObjectToObject(root, "model");
	cJSON_AddStringToObject(model, "type", "BPE");
	cJSON_AddNullToObject(model, "dropout");
	cJSON_AddNullToObject(model, "unk_token");
	cJSON_AddNullToObject(model, "continuing_subword_prefix");
	cJSON_AddNullToObject(model, "end_of_word_suffix");
	cJSON_AddBoolToObject(model, "fuse_unk", false);
	cJSON_AddBoolToObject(model, "byte_fallback", false);
	cJSON_AddBoolToObject(model, "ignore_merges", t->ignore_merges);
	vocab = cJSON_AddObjectToObject(model, "vocab");
	for (int id = 0; id < t->vocab_size; id++) {
		char *s;

		if (t->tok[id].kind == TK_NONE || !t->tok[id].in_vocab)
			continue;
		s = vocab_string(t, (uint32_t)id);
		cJSON_AddNumberToObject(vocab, s, id);
		free(s);
	}
	merges = cJSON_AddArrayToObject(model, "merges");
	for (int r = 0; r < t->n_merges; r++) {
		char *a = vocab_string(t, t->merges[r][0]), *b = vocab_string(t, t->merges[r][1]);
		size_t na = strlen(a), nb = strlen(b);
		char *m = xrealloc(NULL, na + nb + 2);

		memcpy(m, a, na);
		m[na] = ' ';
		memcpy(m + na + 1, b, nb + 1);
		cJSON_AddItemToArray(merges, cJSON_CreateString(m));
		free(a);
		free(b);
		free(m);
	}
	return root;
}

int tokenizer_save(const struct tokenizer *t, const char *path, char *err, size_t errlen)
{
	cJSON *root = tokenizer_to_json(t);
	char *text = cJSON_Print(root);
	size_t n = text ? strlen(text) : 0, plen = strlen(path);
	char *tmp = xrealloc(NULL, plen + 5);
	FILE *fp;
	int rc = -1;

	cJSON_Delete(root);
	if (!text) {
		snprintf(err, errlen, "%s: out of memory formatting the JSON", path);
		free(tmp);
		return -1;
	}
	memcpy(tmp, path, plen);
	memcpy(tmp + plen, ".tmp", 5);
	fp = fopen(tmp, "wb");
	if (!fp) {
		snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
	} else if (fwrite(text, 1, n, fp) != n || fputc('\n', fp) == EOF || fflush(fp) ||
		   fsync(fileno(fp))) {
		snprintf(err, errlen, "%s: write error: %s", tmp, strerror(errno));
		fclose(fp);
		unlink(tmp);
	} else if (fclose(fp)) {
		snprintf(err, errlen, "%s: write error: %s", tmp, strerror(errno));
		unlink(tmp);
	} else if (rename(tmp, path)) {
		snprintf(err, errlen, "%s: cannot rename %s: %s", path, tmp, strerror(errno));
		unlink(tmp);
	} else {
		rc = 0;
	}
	free(text);
	free(tmp);
	return rc;
}
