/*
 * data/shard.c - token shards: validation, memory-mapped reading, atomic streaming writing; shard sets
 * (text documents tokenized into the shards of a training and a validation split).
 *
 * Layout (SPEC 3): bytes 0..7 "MOESHARD", 8..11 uint32 version, 12..15 uint32 bytes per token,
 * 16..23 uint64 token count, 24..63 zero; then the tokens.  Every integer is little-endian and is encoded
 * and decoded byte by byte, so the host's byte order never matters.
 */
#define _POSIX_C_SOURCE 200809L

#include "data/shard.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/tokenizer.h"

#define SHARD_WRITE_BUF 8192	/* tokens encoded per fwrite */

static uint32_t get_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint64_t get_le64(const uint8_t *p)
{
	return (uint64_t)get_le32(p) | ((uint64_t)get_le32(p + 4) << 32);
}

static void put_le(uint8_t *p, uint64_t v, int bytes)
{
	for (int i = 0; i < bytes; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void shard_reset(struct shard *s)
{
	s->fd = -1;
	s->map = NULL;
	s->map_bytes = 0;
	s->token_bytes = 0;
	s->n_tokens = 0;
	s->tokens = NULL;
}

/* Check the 64 header bytes against the file size. */
static int check_header(struct shard *s, const uint8_t *h, uint64_t file_bytes, char *err,
			size_t errlen)
{
	uint32_t version = get_le32(h + 8);
	uint32_t tb = get_le32(h + 12);
	uint64_t count = get_le64(h + 16);

	if (memcmp(h, SHARD_MAGIC, 8) != 0) {
		snprintf(err, errlen, "%s: not a token shard (the first 8 bytes are not \"%s\")",
			 s->path, SHARD_MAGIC);
		return -1;
	}
	if (version != SHARD_VERSION) {
		snprintf(err, errlen, "%s: unsupported shard format version %" PRIu32
			 " (this build reads version %d)", s->path, version, SHARD_VERSION);
		return -1;
	}
	if (tb != 2 && tb != 4) {
		snprintf(err, errlen, "%s: bytes per token is %" PRIu32 ", must be 2 or 4",
			 s->path, tb);
		return -1;
	}
	for (int i = 24; i < SHARD_HEADER_BYTES; i++) {
		if (h[i]) {
			snprintf(err, errlen, "%s: reserved header byte %d is 0x%02x, must be zero",
				 s->path, i, h[i]);
			return -1;
		}
	}
	if (count > (UINT64_MAX - SHARD_HEADER_BYTES) / tb ||
	    file_bytes != SHARD_HEADER_BYTES + tb * count) {
		snprintf(err, errlen, "%s: file has %" PRIu64 " bytes, header says %d + %" PRIu32
			 "*%" PRIu64, s->path, file_bytes, SHARD_HEADER_BYTES, tb, count);
		return -1;
	}
	s->token_bytes = (int)tb;
	s->n_tokens = count;
	return 0;
}

static int check_vocab(const struct shard *s, int vocab_size, char *err, size_t errlen)
{
	uint32_t limit = (uint32_t)vocab_size;

	for (uint64_t i = 0; i < s->n_tokens; i++) {
		uint32_t t = shard_token(s, i);

		if (t >= limit) {
			snprintf(err, errlen, "%s: token %" PRIu32 " at index %" PRIu64
				 " >= vocab_size %d", s->path, t, i, vocab_size);
			return -1;
		}
	}
	return 0;
}

int shard_open(struct shard *s, const char *path, int vocab_size, char *err, size_t errlen)
{
	struct stat st;

	shard_reset(s);
	snprintf(s->path, sizeof(s->path), "%s", path);
	s->fd = open(path, O_RDONLY | O_CLOEXEC);
	if (s->fd < 0) {
		snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
		goto fail;
	}
	if (fstat(s->fd, &st) != 0) {
		snprintf(err, errlen, "%s: cannot stat: %s", path, strerror(errno));
		goto fail;
	}
	if (!S_ISREG(st.st_mode)) {
		snprintf(err, errlen, "%s: not a regular file", path);
		goto fail;
	}
	if (st.st_size < SHARD_HEADER_BYTES) {
		snprintf(err, errlen, "%s: file has %lld bytes, shorter than the %d-byte header",
			 path, (long long)st.st_size, SHARD_HEADER_BYTES);
		goto fail;
	}
	if ((uint64_t)st.st_size > SIZE_MAX) {
		snprintf(err, errlen, "%s: file too large to map", path);
		goto fail;
	}
	s->map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, s->fd, 0);
	if (s->map == MAP_FAILED) {
		s->map = NULL;
		snprintf(err, errlen, "%s: mmap failed: %s", path, strerror(errno));
		goto fail;
	}
	s->map_bytes = (size_t)st.st_size;
	if (check_header(s, s->map, (uint64_t)st.st_size, err, errlen))
		goto fail;
	s->tokens = (const uint8_t *)s->map + SHARD_HEADER_BYTES;
	if (vocab_size > 0 && check_vocab(s, vocab_size, err, errlen))
		goto fail;
	return 0;
fail:
	shard_close(s);
	return -1;
}

void shard_close(struct shard *s)
{
	if (s->map)
		munmap(s->map, s->map_bytes);
	if (s->fd >= 0)
		close(s->fd);
	shard_reset(s);
}

/* ---- writer ---- */

static void writer_reset(struct shard_writer *w)
{
	w->fp = NULL;
	w->n_tokens = 0;
}

void shard_writer_abort(struct shard_writer *w)
{
	if (w->fp) {
		fclose(w->fp);
		unlink(w->tmp_path);
	}
	writer_reset(w);
}

static void make_header(uint8_t *h, int token_bytes, uint64_t count)
{
	memset(h, 0, SHARD_HEADER_BYTES);
	memcpy(h, SHARD_MAGIC, 8);
	put_le(h + 8, SHARD_VERSION, 4);
	put_le(h + 12, (uint64_t)token_bytes, 4);
	put_le(h + 16, count, 8);
}

int shard_writer_open(struct shard_writer *w, const char *path, int token_bytes, char *err,
		      size_t errlen)
{
	uint8_t h[SHARD_HEADER_BYTES];

	writer_reset(w);
	if (token_bytes != 2 && token_bytes != 4) {
		snprintf(err, errlen, "%s: bytes per token is %d, must be 2 or 4", path, token_bytes);
		return -1;
	}
	if (strlen(path) >= sizeof(w->path)) {
		snprintf(err, errlen, "%s: path too long", path);
		return -1;
	}
	snprintf(w->path, sizeof(w->path), "%s", path);
	snprintf(w->tmp_path, sizeof(w->tmp_path), "%s.tmp", path);
	w->token_bytes = token_bytes;
	w->fp = fopen(w->tmp_path, "wb");
	if (!w->fp) {
		snprintf(err, errlen, "%s: cannot create: %s", w->tmp_path, strerror(errno));
		return -1;
	}
	make_header(h, token_bytes, 0);
	if (fwrite(h, 1, sizeof(h), w->fp) != sizeof(h)) {
		snprintf(err, errlen, "%s: write failed: %s", w->tmp_path, strerror(errno));
		shard_writer_abort(w);
		return -1;
	}
	return 0;
}

/* Refuse the whole batch before writing any of it, so a refused append leaves the writer usable. */
static int check_fit(const struct shard_writer *w, const uint32_t *tokens, size_t n, char *err,
		     size_t errlen)
{
	if (w->token_bytes == 4)
		return 0;
	for (size_t i = 0; i < n; i++) {
		if (tokens[i] > UINT16_MAX) {
			snprintf(err, errlen, "%s: token %" PRIu32 " at index %" PRIu64
				 " does not fit in %d bytes per token", w->path, tokens[i],
				 w->n_tokens + i, w->token_bytes);
			return -1;
		}
	}
	return 0;
}

int shard_writer_append(struct shard_writer *w, const uint32_t *tokens, size_t n, char *err,
			size_t errlen)
{
	uint8_t buf[SHARD_WRITE_BUF * 4];
	int tb = w->token_bytes;

	if (!w->fp) {
		snprintf(err, errlen, "%s: shard writer is not open", w->path);
		return -1;
	}
	if (check_fit(w, tokens, n, err, errlen))
		return -1;
	for (size_t done = 0; done < n;) {
		size_t k = n - done < SHARD_WRITE_BUF ? n - done : SHARD_WRITE_BUF;

		for (size_t i = 0; i < k; i++)
			put_le(buf + i * tb, tokens[done + i], tb);
		if (fwrite(buf, (size_t)tb, k, w->fp) != k) {
			snprintf(err, errlen, "%s: write failed: %s", w->tmp_path, strerror(errno));
			return -1;
		}
		done += k;
		w->n_tokens += k;
	}
	return 0;
}

/* Patch the count, flush to disk, rename over the final name. */
int shard_writer_close(struct shard_writer *w, char *err, size_t errlen)
{
	uint8_t h[SHARD_HEADER_BYTES];
	FILE *fp = w->fp;

	if (!fp) {
		snprintf(err, errlen, "%s: shard writer is not open", w->path);
		return -1;
	}
	make_header(h, w->token_bytes, w->n_tokens);
	if (fseek(fp, 0, SEEK_SET) != 0 || fwrite(h, 1, sizeof(h), fp) != sizeof(h) ||
	    fflush(fp) != 0 || fsync(fileno(fp)) != 0) {
		snprintf(err, errlen, "%s: write failed: %s", w->tmp_path, strerror(errno));
		goto fail;
	}
	w->fp = NULL;
	if (fclose(fp) != 0) {
		snprintf(err, errlen, "%s: close failed: %s", w->tmp_path, strerror(errno));
		unlink(w->tmp_path);
		return -1;
	}
	if (rename(w->tmp_path, w->path) != 0) {
		snprintf(err, errlen, "%s: cannot rename to %s: %s", w->tmp_path, w->path,
			 strerror(errno));
		unlink(w->tmp_path);
		return -1;
	}
	return 0;
fail:
	shard_writer_abort(w);
	return -1;
}

int shard_write(const char *path, const uint32_t *tokens, size_t n, int token_bytes, char *err,
		size_t errlen)
{
	struct shard_writer w;

	if (shard_writer_open(&w, path, token_bytes, err, errlen))
		return -1;
	if (shard_writer_append(&w, tokens, n, err, errlen)) {
		shard_writer_abort(&w);
		return -1;
	}
	return shard_writer_close(&w, err, errlen);
}

/* ---- token shards of two splits (struct shard_set) ------------------------------------------- */

struct split {
	const char *name;
	const char *dir;
	bool open;
	struct shard_writer w;
	int index;			/* the shard being written */
	uint64_t in_shard, tokens, docs;
};

struct shard_set {
	struct tokenizer *t;
	struct tok_stream stream;
	struct tok_ids ids;
	int token_bytes;
	uint64_t shard_tokens;
	uint32_t eot;
	bool no_template;		/* documents without the tokenizer's template ids */
	bool finished;
	struct split split[2];		/* train, val */
	struct split *cur;
	char **written;			/* shards completed, removed if the run fails */
	int n_written;
	char *err;
	size_t errlen;
};

static void set_init(struct shard_set *s, struct tokenizer *t, const char *train_dir,
		     const char *val_dir, uint64_t shard_tokens, uint32_t eot)
{
	memset(s, 0, sizeof(*s));
	s->t = t;
	s->token_bytes = tokenizer_vocab_size(t) <= 65536 ? 2 : 4;
	s->shard_tokens = shard_tokens;
	s->eot = eot;
	s->split[0].name = "train";
	s->split[0].dir = train_dir;
	s->split[1].name = "val";
	s->split[1].dir = val_dir;
	tok_stream_init(&s->stream, t);
}

static int split_close(struct shard_set *c, struct split *s)
{
	char **w;

	s->open = false;
	if (shard_writer_close(&s->w, c->err, c->errlen))
		return -1;
	w = realloc(c->written, (size_t)(c->n_written + 1) * sizeof(*w));
	if (!w || !(w[c->n_written] = strdup(s->w.path))) {
		c->written = w ? w : c->written;
		snprintf(c->err, c->errlen, "out of memory");
		return -1;
	}
	c->written = w;
	c->n_written++;
	s->index++;
	s->in_shard = 0;
	return 0;
}

static int emit(struct shard_set *c, const uint32_t *ids, size_t n)
{
	struct split *s = c->cur;

	while (n) {
		size_t take;

		if (!s->open) {
			char path[1024];

			snprintf(path, sizeof(path), "%s/%s_%05d.bin", s->dir, s->name, s->index);
			if (shard_writer_open(&s->w, path, c->token_bytes, c->err, c->errlen))
				return -1;
			s->open = true;
		}
		take = n;
		if (take > c->shard_tokens - s->in_shard)
			take = (size_t)(c->shard_tokens - s->in_shard);
		if (shard_writer_append(&s->w, ids, take, c->err, c->errlen)) {
			shard_writer_abort(&s->w);
			s->open = false;
			return -1;
		}
		s->in_shard += take;
		s->tokens += take;
		ids += take;
		n -= take;
		if (s->in_shard == c->shard_tokens && split_close(c, s))
			return -1;
	}
	return 0;
}

/* A document starts in a split: after the split's first, the end-of-text token separates it. */
static int set_begin(struct shard_set *c, bool val)
{
	const uint32_t *pre, *post;
	size_t n_pre, n_post;

	c->cur = &c->split[val];
	if (c->cur->docs && emit(c, &c->eot, 1))
		return -1;
	c->cur->docs++;
	tokenizer_template(c->t, &pre, &n_pre, &post, &n_post);
	return c->no_template ? 0 : emit(c, pre, n_pre);
}

static int flush_ids(struct shard_set *c)
{
	int rc = emit(c, c->ids.v, c->ids.n);

	c->ids.n = 0;
	return rc;
}

static int set_data(struct shard_set *c, const uint8_t *p, size_t n)
{
	tok_stream_feed(&c->stream, p, n, &c->ids);
	return flush_ids(c);
}

static int set_end(struct shard_set *c)
{
	const uint32_t *pre, *post;
	size_t n_pre, n_post;

	tok_stream_finish(&c->stream, &c->ids);
	if (flush_ids(c))
		return -1;
	tokenizer_template(c->t, &pre, &n_pre, &post, &n_post);
	return c->no_template ? 0 : emit(c, post, n_post);
}

/* Close the open shards; the set is finished (its shards kept) only if every one closes. */
static int set_finish(struct shard_set *c)
{
	for (int k = 0; k < 2; k++)
		if (c->split[k].open && split_close(c, &c->split[k]))
			return -1;
	c->finished = true;
	return 0;
}

/* Free the set; one not finished loses its shards (the open ones aborted, the closed ones removed). */
static void set_release(struct shard_set *c)
{
	for (int k = 0; k < 2; k++) {
		if (c->split[k].open)
			shard_writer_abort(&c->split[k].w);
		c->split[k].open = false;
	}
	for (int k = 0; k < c->n_written; k++) {
		if (!c->finished)
			unlink(c->written[k]);
		free(c->written[k]);
	}
	free(c->written);
	tok_stream_free(&c->stream);
	tok_ids_free(&c->ids);
}

/* The caller's error buffer for what follows. */
static void set_err_buf(struct shard_set *s, char *err, size_t errlen)
{
	s->err = err;
	s->errlen = errlen;
}

struct shard_set *shard_set_new(struct tokenizer *t, const char *train_dir, const char *val_dir,
				uint64_t shard_tokens, uint32_t eot, char *err, size_t errlen)
{
	struct shard_set *s = malloc(sizeof(*s));

	if (!s) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	set_init(s, t, train_dir, val_dir, shard_tokens, eot);
	return s;
}

void shard_set_no_template(struct shard_set *s)
{
	s->no_template = true;
}

int shard_set_begin(struct shard_set *s, bool val, char *err, size_t errlen)
{
	set_err_buf(s, err, errlen);
	return set_begin(s, val);
}

int shard_set_feed(struct shard_set *s, const void *text, size_t n, char *err, size_t errlen)
{
	set_err_buf(s, err, errlen);
	return set_data(s, text, n);
}

int shard_set_end(struct shard_set *s, char *err, size_t errlen)
{
	set_err_buf(s, err, errlen);
	return set_end(s);
}

int shard_set_add(struct shard_set *s, bool val, const void *text, size_t n, char *err,
		  size_t errlen)
{
	set_err_buf(s, err, errlen);
	if (s->finished) {
		snprintf(err, errlen, "shard set already finished");
		return -1;
	}
	if (set_begin(s, val) || set_data(s, text, n) || set_end(s))
		return -1;
	return 0;
}

int shard_set_finish(struct shard_set *s, char *err, size_t errlen)
{
	set_err_buf(s, err, errlen);
	return set_finish(s);
}

void shard_set_stats(const struct shard_set *s, bool val, int *shards, uint64_t *tokens,
		     uint64_t *docs)
{
	const struct split *sp = &s->split[val];

	*shards = sp->index + sp->open;
	*tokens = sp->tokens;
	*docs = sp->docs;
}

void shard_set_free(struct shard_set *s)
{
	if (!s)
		return;
	set_release(s);
	free(s);
}
