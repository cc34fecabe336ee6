/*
 * data/shard.h - token shards (SPEC 3): a 64-byte header ("MOESHARD", uint32 version 1, uint32 bytes per
 * token 2|4, uint64 token count, 40 zero bytes), then the tokens little-endian; read by memory mapping.
 */
#ifndef MOE_DATA_SHARD_H
#define MOE_DATA_SHARD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SHARD_HEADER_BYTES 64
#define SHARD_MAGIC "MOESHARD"
#define SHARD_VERSION 1

struct shard {
	char path[512];
	int fd;
	void *map;            /* whole file */
	size_t map_bytes;
	int token_bytes;      /* 2 or 4 */
	uint64_t n_tokens;
	const uint8_t *tokens;/* map + 64 */
};

/* Open and validate (magic, version, token size, size agreeing with the header).  vocab_size > 0 also
 * scans every token and refuses an id >= vocab_size, naming its index.  Returns 0 or -1 with err. */
int shard_open(struct shard *s, const char *path, int vocab_size, char *err, size_t errlen);
void shard_close(struct shard *s);
static inline uint32_t shard_token(const struct shard *s, uint64_t i)
{
	if (s->token_bytes == 2)
		return (uint32_t)s->tokens[2 * i] | ((uint32_t)s->tokens[2 * i + 1] << 8);
	const uint8_t *p = s->tokens + 4 * i;
	return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* Streaming writer: header patched with the final count on close; written to PATH.tmp and renamed. */
struct shard_writer {
	char path[512];
	char tmp_path[530];
	void *fp;             /* FILE* */
	int token_bytes;
	uint64_t n_tokens;
};
int shard_writer_open(struct shard_writer *w, const char *path, int token_bytes, char *err, size_t errlen);
int shard_writer_append(struct shard_writer *w, const uint32_t *tokens, size_t n, char *err, size_t errlen);
int shard_writer_close(struct shard_writer *w, char *err, size_t errlen);
/* Drop an open writer: close and delete PATH.tmp (after a refused append, say).  PATH is untouched. */
void shard_writer_abort(struct shard_writer *w);

/* Whole-array convenience. */
int shard_write(const char *path, const uint32_t *tokens, size_t n, int token_bytes, char *err,
		size_t errlen);

/*
 * Token shards of a training and a validation split, written the way `moe data shards` writes them:
 * TRAIN_DIR/train_00000.bin, ... and VAL_DIR/val_00000.bin, ... (SPEC 3; 2-byte tokens when the
 * vocabulary fits, 4 otherwise; at most shard_tokens tokens a shard), the documents of a split
 * separated by the end-of-text id eot, each document inside the ids of the tokenizer's template
 * (tokenizer_template: DeepSeek's BOS before it, as Hugging Face's add_special_tokens=True) unless
 * shard_set_no_template() was called.  Each shard is written to PATH.tmp and renamed when complete.
 * The functions returning int give 0, or -1 with err.  shard_set_free() of a set that was not
 * finished removes every shard it wrote.
 */
#define SHARD_SET_DEFAULT_TOKENS 100000000ULL

struct tokenizer;
struct shard_set;
struct shard_set *shard_set_new(struct tokenizer *t, const char *train_dir, const char *val_dir,
				uint64_t shard_tokens, uint32_t eot, char *err, size_t errlen);
/* Documents without the tokenizer's template ids (before the first document). */
void shard_set_no_template(struct shard_set *s);
/* One whole document (text of n bytes) into the validation split (val) or the training split. */
int shard_set_add(struct shard_set *s, bool val, const void *text, size_t n, char *err,
		  size_t errlen);
/* The same streamed: begin a document in a split, feed its text in pieces, end it. */
int shard_set_begin(struct shard_set *s, bool val, char *err, size_t errlen);
int shard_set_feed(struct shard_set *s, const void *text, size_t n, char *err, size_t errlen);
int shard_set_end(struct shard_set *s, char *err, size_t errlen);
int shard_set_finish(struct shard_set *s, char *err, size_t errlen);
/* Shards written (the open one included), tokens and documents of a split so far. */
void shard_set_stats(const struct shard_set *s, bool val, int *shards, uint64_t *tokens,
		     uint64_t *docs);
void shard_set_free(struct shard_set *s);

#endif
