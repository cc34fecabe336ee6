/*
 * data/tokenizer.h - byte-level BPE (GPT-2 style): training, encoding, decoding, and the Hugging Face
 * tokenizer.json format.
 *
 * Text is first cut at the added (special) tokens, which are never split and encode to their own ids;
 * each stretch between them is pre-tokenized with the GPT-2 regex
 *     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * (or, for tokenizers read from a file, the Llama 3 / Qwen2 pattern they name), and the merges are
 * applied to each piece's bytes by rank.  Every byte has a token, so any byte string (invalid UTF-8 and
 * NUL included) encodes, and decode(encode(x)) == x.  Bytes that are not valid UTF-8 pre-tokenize as
 * punctuation, one byte per character.
 *
 * Ids of a trained tokenizer: 0..255 the single bytes (id = byte value), then the merged tokens in the
 * order they were learnt, then the special tokens.
 *
 * A tokenizer keeps a cache of encoded words and scratch space: encoding is not thread-safe (use one
 * tokenizer per thread); decoding and the queries are.
 */
#ifndef MOE_DATA_TOKENIZER_H
#define MOE_DATA_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

struct tokenizer;

/* The special tokens a trained tokenizer gets unless told otherwise (end of text, padding, chat turns). */
#define TOKENIZER_N_DEFAULT_SPECIALS 4
extern const char *const tokenizer_default_specials[TOKENIZER_N_DEFAULT_SPECIALS];

/* Pre-tokenizer patterns. */
enum tok_pretok {
	TOK_PRETOK_GPT2,	/* the GPT-2 regex above (ByteLevel use_regex=true) */
	TOK_PRETOK_LLAMA3,	/* (?i:'s|..)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|... (cl100k) */
	TOK_PRETOK_QWEN2,	/* the same with \p{N} (one digit a piece) */
	TOK_PRETOK_SPLITS,	/* a Sequence of Split regexes (DeepSeek-V3's three), by PCRE2 */
};

/* Growable arrays (zero-initialise; the functions below append). */
struct tok_ids {
	uint32_t *v;
	size_t n, cap;
};
struct tok_bytes {
	uint8_t *v;
	size_t n, cap;
};
void tok_ids_free(struct tok_ids *a);
void tok_bytes_free(struct tok_bytes *b);

/*
 * Training.  Feed the documents' bytes in chunks of any size (a document may be fed piecewise; only
 * the current pre-token is kept back), closing each document with tok_trainer_end_doc().  finish()
 * merges the most frequent pair (ties: the pair whose first token's bytes, then second token's bytes,
 * are lexicographically smallest) until the vocabulary holds vocab_size tokens, 256 bytes and the
 * specials included, or no pair is left.  specials == NULL means the defaults.
 */
struct tok_trainer;
struct tok_trainer *tok_trainer_new(const char *const *specials, int n_specials, char *err,
				    size_t errlen);
void tok_trainer_feed(struct tok_trainer *tr, const void *text, size_t n);
void tok_trainer_end_doc(struct tok_trainer *tr);
uint64_t tok_trainer_n_words(const struct tok_trainer *tr);	/* distinct pre-tokens so far */
struct tokenizer *tok_trainer_finish(struct tok_trainer *tr, int vocab_size, char *err, size_t errlen);
void tok_trainer_free(struct tok_trainer *tr);

/* Hugging Face tokenizer.json (byte-level BPE).  Reading accepts merges as "a b" strings or [a, b]
 * pairs and the pre_tokenizer as ByteLevel or Sequence[Split(Regex, Isolated)..., ByteLevel] (the known
 * GPT-2 / Llama 3 / Qwen2 patterns by hand, any others, such as DeepSeek-V3's three, by PCRE2); anything
 * else is refused with a message naming the file and the key.  Writing is atomic (PATH.tmp, renamed). */
struct tokenizer *tokenizer_load(const char *path, char *err, size_t errlen);
struct tokenizer *tokenizer_parse(const char *json, size_t len, const char *name, char *err,
				  size_t errlen);
int tokenizer_save(const struct tokenizer *t, const char *path, char *err, size_t errlen);
void tokenizer_free(struct tokenizer *t);

/* A note about something accepted but not applied (an NFC normalizer), or NULL. */
const char *tokenizer_warning(const struct tokenizer *t);

int tokenizer_vocab_size(const struct tokenizer *t);	/* the largest id + 1 */
int tokenizer_n_merges(const struct tokenizer *t);
/* The i-th merge (rank i): the ids of its two halves and of the result. */
void tokenizer_merge(const struct tokenizer *t, int i, uint32_t *a, uint32_t *b, uint32_t *result);
/* A token's bytes (a special token's content); -1 for an id that has no token. */
int tokenizer_token_bytes(const struct tokenizer *t, uint32_t id, const uint8_t **p, size_t *n);
/* An added token (tokenizer.json's added_tokens, matched before pre-tokenization); one flagged
 * "special" there (DeepSeek's BOS and EOS are, R1's <think> is not). */
int tokenizer_is_added(const struct tokenizer *t, uint32_t id);
int tokenizer_is_special(const struct tokenizer *t, uint32_t id);
/* The id of an added token by content, or of the ordinary token with these bytes; -1 if none. */
int tokenizer_special_id(const struct tokenizer *t, const char *content);
/*
 * The ids a tokenizer.json's post_processor (TemplateProcessing, its "single" template) puts around an
 * encoded text when Hugging Face encodes with add_special_tokens=True: pre[0..n_pre) before the text,
 * post[0..n_post) after it (DeepSeek's: the BOS before).  None (n 0) without such a post_processor.
 * tokenizer_encode() never adds them: it encodes as add_special_tokens=False does.
 */
void tokenizer_template(const struct tokenizer *t, const uint32_t **pre, size_t *n_pre,
			const uint32_t **post, size_t *n_post);
int tokenizer_token_id(const struct tokenizer *t, const void *bytes, size_t n);
/* End of text: "<|endoftext|>", else "<|end_of_text|>", else "</s>", else DeepSeek's
 * "<｜end▁of▁sentence｜>"; -1 if none. */
int tokenizer_eot_id(const struct tokenizer *t);
enum tok_pretok tokenizer_pretok(const struct tokenizer *t);

/* Encode a whole text (appended to out). */
void tokenizer_encode(struct tokenizer *t, const void *text, size_t n, struct tok_ids *out);

/* Decode (appended to out): every id's bytes concatenated.  An id without a token: -1 with err. */
int tokenizer_decode(const struct tokenizer *t, const uint32_t *ids, size_t n, struct tok_bytes *out,
		     char *err, size_t errlen);

/*
 * Streaming encoding of one document fed in chunks: the ids are exactly those of tokenizer_encode() on
 * the concatenation.  feed() appends the ids of the pieces that are complete; finish() the rest, after
 * which the stream is ready for the next document.  Only the unfinished pre-token is kept back.
 */
struct tok_stream {
	struct tokenizer *t;
	uint8_t *buf;
	size_t len, cap;
	size_t need;	/* retry the held-back bytes once len reaches this */
};
void tok_stream_init(struct tok_stream *s, struct tokenizer *t);
void tok_stream_feed(struct tok_stream *s, const void *text, size_t n, struct tok_ids *out);
void tok_stream_finish(struct tok_stream *s, struct tok_ids *out);
void tok_stream_free(struct tok_stream *s);

/* Pre-tokenize a whole text (no special tokens): the end offsets of its pieces, at most max of them;
 * returns the number of pieces (which may exceed max). */
size_t tok_pretokenize(enum tok_pretok mode, const void *text, size_t n, size_t *ends, size_t max);

/* The GPT-2 byte <-> printable character table (byte b stands for code point tok_byte_to_cp(b)). */
uint32_t tok_byte_to_cp(uint8_t b);

#endif
