/*
 * data/data_cli.c - `moe data tokenizer|shards|decode|encode|task|synth`: text in, streaming (inputs
 * are read in chunks, a JSON Lines file a record at a time, so they may be larger than memory), token
 * shards out.  The shard writing (struct shard_set) is data/shard.c's, shared with the task generators
 * (data/task.h).
 */
#define _POSIX_C_SOURCE 200809L

#include "data/data_cli.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <glob.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "data/shard.h"
#include "data/task.h"
#include "data/tokenizer.h"
#include "launch/rng.h"

#define CHUNK_BYTES (1 << 20)		/* text read per fread */
#define MAX_SPECIALS 256

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- arguments ------------------------------------------------------------------------------- */

/* The values after argv[*i] up to the next option; *i is left on the last one. */
static int take_list(int argc, char **argv, int *i, char ***list)
{
	int start = *i + 1, n = 0;

	while (start + n < argc && strncmp(argv[start + n], "--", 2))
		n++;
	*list = argv + start;
	*i += n;
	return n;
}

static bool parse_ll(const char *s, long long *v)
{
	char *end;

	errno = 0;
	*v = strtoll(s, &end, 10);
	return !errno && end != s && !*end;
}

static bool parse_double(const char *s, double *v)
{
	char *end;

	errno = 0;
	*v = strtod(s, &end);
	return !errno && end != s && !*end;
}

/* ---- reading documents ----------------------------------------------------------------------- */

/* What is done with the documents: each callback returns 0, or -1 having written err. */
struct doc_sink {
	int (*begin)(void *ctx);
	int (*data)(void *ctx, const uint8_t *p, size_t n);
	int (*end)(void *ctx);
	void *ctx;
};

struct progress {
	const char *what;
	uint64_t total, done;
	double t0, last;
	bool tty;
};

static void progress_show(struct progress *pr, bool final)
{
	double t = now_s(), el = t - pr->t0, mb = 1e-6 * (double)pr->done;

	if (!final && t - pr->last < 1.0)
		return;
	pr->last = t;
	fprintf(stderr, "%s: %.1f / %.1f MB (%.1f%%), %.1f MB/s%s", pr->what, mb,
		1e-6 * (double)pr->total, pr->total ? 100.0 * (double)pr->done / (double)pr->total : 100.0,
		el > 0 ? mb / el : 0.0, final ? "\n" : pr->tty ? "\r" : "\n");
	fflush(stderr);
}

static bool is_jsonl(const char *path)
{
	size_t n = strlen(path);

	return n >= 6 && !strcmp(path + n - 6, ".jsonl");
}

/* Every input must be a readable regular file; their total size goes to the progress line. */
static int check_inputs(char **files, int n, uint64_t *total, char *err, size_t errlen)
{
	*total = 0;
	if (!n) {
		snprintf(err, errlen, "no input files");
		return -1;
	}
	for (int k = 0; k < n; k++) {
		struct stat st;

		if (stat(files[k], &st)) {
			snprintf(err, errlen, "%s: %s", files[k], strerror(errno));
			return -1;
		}
		if (!S_ISREG(st.st_mode)) {
			snprintf(err, errlen, "%s: not a regular file", files[k]);
			return -1;
		}
		if (access(files[k], R_OK)) {
			snprintf(err, errlen, "%s: %s", files[k], strerror(errno));
			return -1;
		}
		*total += (uint64_t)st.st_size;
	}
	return 0;
}

/* True when a JSON text holds the escape \u0000 (which cJSON's C strings cannot carry). */
static bool has_nul_escape(const char *s, size_t n)
{
	for (size_t i = 0; i + 1 < n; i++) {
		if (s[i] != '\\')
			continue;
		if (s[i + 1] == 'u' && i + 5 < n && !memcmp(s + i + 2, "0000", 4))
			return true;
		i++;	/* skip the escaped character */
	}
	return false;
}

static int read_text(const char *path, FILE *fp, const struct doc_sink *sink, struct progress *pr,
		     uint8_t *buf, char *err, size_t errlen)
{
	size_t n;

	if (sink->begin(sink->ctx))
		return -1;
	while ((n = fread(buf, 1, CHUNK_BYTES, fp)) > 0) {
		if (sink->data(sink->ctx, buf, n))
			return -1;
		pr->done += n;
		progress_show(pr, false);
	}
	if (ferror(fp)) {
		snprintf(err, errlen, "%s: read error: %s", path, strerror(errno));
		return -1;
	}
	return sink->end(sink->ctx);
}

static int read_jsonl(const char *path, FILE *fp, const struct doc_sink *sink, struct progress *pr,
		      char *err, size_t errlen)
{
	char *line = NULL;
	size_t cap = 0;
	ssize_t n;
	unsigned long lineno = 0;
	int rc = 0;

	while (!rc && (n = getline(&line, &cap, fp)) >= 0) {
		const cJSON *text;
		cJSON *rec;
		size_t k = 0;

		lineno++;
		pr->done += (uint64_t)n;
		while (k < (size_t)n && strchr(" \t\r\n", line[k]))
			k++;
		if (k == (size_t)n)
			continue;	/* a blank line */
		rec = cJSON_ParseWithLength(line, (size_t)n);
		if (!rec || !cJSON_IsObject(rec)) {
			snprintf(err, errlen, "%s:%lu: not a JSON object", path, lineno);
			rc = -1;
		} else if (!cJSON_IsString(text = cJSON_GetObjectItemCaseSensitive(rec, "text"))) {
			snprintf(err, errlen, "%s:%lu: no \"text\" string in the record", path, lineno);
			rc = -1;
		} else if (has_nul_escape(line, (size_t)n)) {
			snprintf(err, errlen, "%s:%lu: a \\u0000 (NUL) escape is not supported", path,
				 lineno);
			rc = -1;
		} else if (sink->begin(sink->ctx) ||
			   sink->data(sink->ctx, (const uint8_t *)text->valuestring,
				      strlen(text->valuestring)) ||
			   sink->end(sink->ctx)) {
			rc = -1;
		}
		cJSON_Delete(rec);
		progress_show(pr, false);
	}
	if (!rc && ferror(fp)) {
		snprintf(err, errlen, "%s: read error: %s", path, strerror(errno));
		rc = -1;
	}
	free(line);
	return rc;
}

static int read_documents(char **files, int n, const struct doc_sink *sink, struct progress *pr,
			  char *err, size_t errlen)
{
	uint8_t *buf = malloc(CHUNK_BYTES);
	int rc = 0;

	if (!buf) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	pr->t0 = pr->last = now_s();
	pr->tty = isatty(2);
	for (int k = 0; !rc && k < n; k++) {
		FILE *fp = fopen(files[k], "rb");

		if (!fp) {
			snprintf(err, errlen, "%s: %s", files[k], strerror(errno));
			rc = -1;
			break;
		}
		if (is_jsonl(files[k]))
			rc = read_jsonl(files[k], fp, sink, pr, err, errlen);
		else
			rc = read_text(files[k], fp, sink, pr, buf, err, errlen);
		fclose(fp);
	}
	if (!rc)
		progress_show(pr, true);
	else if (pr->tty)
		fputc('\n', stderr);
	free(buf);
	return rc;
}

/* ---- moe data tokenizer ---------------------------------------------------------------------- */

static int train_begin(void *ctx)
{
	(void)ctx;
	return 0;
}

static int train_data(void *ctx, const uint8_t *p, size_t n)
{
	tok_trainer_feed(ctx, p, n);
	return 0;
}

static int train_end(void *ctx)
{
	tok_trainer_end_doc(ctx);
	return 0;
}

static int usage_tokenizer(void)
{
	printf("usage: moe data tokenizer --train FILES... --vocab N --out tokenizer.json\n"
	       "                          [--special TOKEN]... [--no-default-specials]\n"
	       "Trains a byte-level BPE tokenizer (GPT-2 pre-tokenizer) on the files (text: one document\n"
	       "a file; *.jsonl: each record's \"text\") and writes it as a Hugging Face tokenizer.json.\n"
	       "N counts every token: the 256 bytes, the merges and the special tokens, which are\n"
	       "<|endoftext|> <|pad|> <|user|> <|assistant|> and those given with --special.\n");
	return 2;
}

static int cmd_tokenizer(int argc, char **argv)
{
	const char *specials[MAX_SPECIALS], *out = NULL;
	char **files = NULL, err[1024];
	int n_files = 0, n_sp = 0, n_user = 0, help = 0, rc = 1;
	bool defaults = true;
	long long vocab = 0;
	const char *user[MAX_SPECIALS];
	struct tok_trainer *tr;
	struct tokenizer *t;
	struct progress pr = { .what = "tokenizer" };
	struct doc_sink sink = { train_begin, train_data, train_end, NULL };
	uint64_t total;
	double t0 = now_s();

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];

		if (!strcmp(a, "--train"))
			n_files = take_list(argc, argv, &i, &files);
		else if (!strcmp(a, "--vocab") && i + 1 < argc && parse_ll(argv[i + 1], &vocab))
			i++;
		else if (!strcmp(a, "--out") && i + 1 < argc)
			out = argv[++i];
		else if (!strcmp(a, "--special") && i + 1 < argc && n_user < MAX_SPECIALS)
			user[n_user++] = argv[++i];
		else if (!strcmp(a, "--no-default-specials"))
			defaults = false;
		else
			help = 1;
	}
	if (help || !n_files || vocab <= 0 || !out)
		return usage_tokenizer();
	if (defaults)
		for (int k = 0; k < TOKENIZER_N_DEFAULT_SPECIALS; k++)
			specials[n_sp++] = tokenizer_default_specials[k];
	for (int k = 0; k < n_user; k++) {
		bool dup = false;

		for (int j = 0; j < n_sp; j++)
			dup |= !strcmp(specials[j], user[k]);
		if (!dup)
			specials[n_sp++] = user[k];
	}
	if (vocab < 256 + n_sp || vocab > (1 << 24)) {
		fprintf(stderr, "moe data tokenizer: --vocab %lld: must be at least 256 + %d special "
			"tokens and at most %d\n", vocab, n_sp, 1 << 24);
		return 1;
	}
	if (check_inputs(files, n_files, &total, err, sizeof(err))) {
		fprintf(stderr, "moe data tokenizer: %s\n", err);
		return 1;
	}
	tr = tok_trainer_new(specials, n_sp, err, sizeof(err));
	if (!tr) {
		fprintf(stderr, "moe data tokenizer: %s\n", err);
		return 1;
	}
	sink.ctx = tr;
	pr.total = total;
	if (read_documents(files, n_files, &sink, &pr, err, sizeof(err))) {
		fprintf(stderr, "moe data tokenizer: %s\n", err);
		tok_trainer_free(tr);
		return 1;
	}
	fprintf(stderr, "tokenizer: %llu distinct words; merging\n",
		(unsigned long long)tok_trainer_n_words(tr));
	t = tok_trainer_finish(tr, (int)vocab, err, sizeof(err));
	tok_trainer_free(tr);
	if (!t) {
		fprintf(stderr, "moe data tokenizer: %s\n", err);
		return 1;
	}
	if (tokenizer_save(t, out, err, sizeof(err))) {
		fprintf(stderr, "moe data tokenizer: %s\n", err);
	} else {
		if (tokenizer_vocab_size(t) < vocab)
			fprintf(stderr, "tokenizer: no pair left to merge: the vocabulary stops at %d\n",
				tokenizer_vocab_size(t));
		printf("wrote %s: vocab %d (%d merges, %d special tokens) in %.1f s\n", out,
		       tokenizer_vocab_size(t), tokenizer_n_merges(t), n_sp, now_s() - t0);
		rc = 0;
	}
	tokenizer_free(t);
	return rc;
}

/* ---- moe data shards ------------------------------------------------------------------------- */

/* Document i goes to the validation split when a hash of i, as a fraction of 2^64, is below f. */
static bool doc_is_val(uint64_t i, double f)
{
	return rng_uniform(mix64(i + RNG_GOLDEN_GAMMA)) < f;
}

struct shards_cmd {
	struct shard_set *set;
	double val_frac;
	uint64_t doc;			/* index of the current document */
	char *err;
	size_t errlen;
};

static int shards_begin(void *ctx)
{
	struct shards_cmd *c = ctx;

	return shard_set_begin(c->set, doc_is_val(c->doc, c->val_frac), c->err, c->errlen);
}

static int shards_data(void *ctx, const uint8_t *p, size_t n)
{
	struct shards_cmd *c = ctx;

	return shard_set_feed(c->set, p, n, c->err, c->errlen);
}

static int shards_end(void *ctx)
{
	struct shards_cmd *c = ctx;

	c->doc++;
	return shard_set_end(c->set, c->err, c->errlen);
}

static int usage_shards(void)
{
	printf("usage: moe data shards --tokenizer T --in FILES... --out DIR [--val-frac F]\n"
	       "                       [--shard-tokens N] [--eot TOKEN] [--no-template]\n"
	       "Encodes the files (text: one document a file; *.jsonl: each record's \"text\") into token\n"
	       "shards DIR/train_00000.bin, ... and DIR/val_00000.bin, ... (SPEC 3), the documents of a\n"
	       "split joined by the end-of-text token (<|endoftext|>, <|end_of_text|>, </s> or DeepSeek's\n"
	       "<\uff5cend\u2581of\u2581sentence\uff5c>, or --eot).  Each document gets the special tokens of the\n"
	       "tokenizer.json's post_processor template (DeepSeek's: a BOS before it), as Hugging Face\n"
	       "encodes with add_special_tokens=True; --no-template leaves them out.\n"
	       "A document goes to the validation split with probability F (default 0), by a hash of\n"
	       "its index.  N tokens a shard at most (default %lld).  Inputs are streamed.\n",
	       (long long)SHARD_SET_DEFAULT_TOKENS);
	return 2;
}

/* Refuse an output directory that already holds shards (a glob over DIR would mix old and new). */
static int prepare_dir(const char *dir, char *err, size_t errlen)
{
	static const char *const pats[] = { "train_*.bin", "val_*.bin" };
	struct stat st;

	if (mkdir(dir, 0777) && errno != EEXIST) {
		snprintf(err, errlen, "%s: cannot create the directory: %s", dir, strerror(errno));
		return -1;
	}
	if (stat(dir, &st) || !S_ISDIR(st.st_mode)) {
		snprintf(err, errlen, "%s: not a directory", dir);
		return -1;
	}
	for (int k = 0; k < 2; k++) {
		char pat[1100];
		glob_t g;

		snprintf(pat, sizeof(pat), "%s/%s", dir, pats[k]);
		if (!glob(pat, 0, NULL, &g)) {
			snprintf(err, errlen, "%s: already holds shards (%s): remove them or choose another "
				 "--out", dir, g.gl_pathv[0]);
			globfree(&g);
			return -1;
		}
	}
	return 0;
}

static struct tokenizer *load_tokenizer(const char *cmd, const char *path)
{
	char err[1024];
	struct tokenizer *t = tokenizer_load(path, err, sizeof(err));

	if (!t)
		fprintf(stderr, "moe data %s: %s\n", cmd, err);
	else if (tokenizer_warning(t))
		fprintf(stderr, "moe data %s: %s: %s\n", cmd, path, tokenizer_warning(t));
	return t;
}

/* After a finished set: what each split got. */
static void shards_report(const struct shards_cmd *c)
{
	static const char *const names[] = { "train", "val" };
	uint64_t tokens, docs[2];
	int shards;

	for (int k = 0; k < 2; k++) {
		shard_set_stats(c->set, k, &shards, &tokens, &docs[k]);
		printf("%s: %d shard(s), %llu tokens, %llu documents\n", names[k], shards,
		       (unsigned long long)tokens, (unsigned long long)docs[k]);
	}
	if (c->val_frac > 0 && !docs[1])
		fprintf(stderr, "moe data shards: warning: no document fell into the validation "
			"split (%llu documents, --val-frac %g)\n", (unsigned long long)c->doc,
			c->val_frac);
	if (!docs[0])
		fprintf(stderr, "moe data shards: warning: no document fell into the training split\n");
}

static int cmd_shards(int argc, char **argv)
{
	const char *tok_path = NULL, *dir = NULL, *eot_name = NULL;
	char **files = NULL, err[1024];
	int n_files = 0, help = 0, rc = 1, eot, no_template = 0;
	long long shard_tokens = (long long)SHARD_SET_DEFAULT_TOKENS;
	double val_frac = 0;
	uint64_t total;
	struct tokenizer *t;
	struct shards_cmd c = { 0 };
	struct progress pr = { .what = "shards" };
	struct doc_sink sink = { shards_begin, shards_data, shards_end, &c };

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];

		if (!strcmp(a, "--in"))
			n_files = take_list(argc, argv, &i, &files);
		else if (!strcmp(a, "--tokenizer") && i + 1 < argc)
			tok_path = argv[++i];
		else if (!strcmp(a, "--out") && i + 1 < argc)
			dir = argv[++i];
		else if (!strcmp(a, "--eot") && i + 1 < argc)
			eot_name = argv[++i];
		else if (!strcmp(a, "--no-template"))
			no_template = 1;
		else if (!strcmp(a, "--val-frac") && i + 1 < argc && parse_double(argv[i + 1], &val_frac))
			i++;
		else if (!strcmp(a, "--shard-tokens") && i + 1 < argc &&
			 parse_ll(argv[i + 1], &shard_tokens))
			i++;
		else
			help = 1;
	}
	if (help || !tok_path || !n_files || !dir)
		return usage_shards();
	if (!(val_frac >= 0 && val_frac < 1) || shard_tokens <= 0) {
		fprintf(stderr, "moe data shards: --val-frac must be in [0, 1) and --shard-tokens > 0\n");
		return 1;
	}
	if (check_inputs(files, n_files, &total, err, sizeof(err))) {
		fprintf(stderr, "moe data shards: %s\n", err);
		return 1;
	}
	t = load_tokenizer("shards", tok_path);
	if (!t)
		return 1;
	eot = eot_name ? tokenizer_special_id(t, eot_name) : tokenizer_eot_id(t);
	if (eot < 0) {
		if (eot_name)
			fprintf(stderr, "moe data shards: %s: no added token \"%s\" (--eot)\n", tok_path,
				eot_name);
		else
			fprintf(stderr, "moe data shards: %s: no end-of-text token (<|endoftext|>, "
				"<|end_of_text|>, </s>, <\uff5cend\u2581of\u2581sentence\uff5c>): name one "
				"with --eot\n", tok_path);
		goto out;
	}
	if (prepare_dir(dir, err, sizeof(err))) {
		fprintf(stderr, "moe data shards: %s\n", err);
		goto out;
	}
	c.set = shard_set_new(t, dir, dir, (uint64_t)shard_tokens, (uint32_t)eot, err, sizeof(err));
	if (!c.set) {
		fprintf(stderr, "moe data shards: %s\n", err);
		goto out;
	}
	if (no_template)
		shard_set_no_template(c.set);
	c.err = err;
	c.errlen = sizeof(err);
	c.val_frac = val_frac;
	pr.total = total;
	rc = read_documents(files, n_files, &sink, &pr, err, sizeof(err));
	if (!rc)
		rc = shard_set_finish(c.set, err, sizeof(err));
	if (rc) {
		fprintf(stderr, "moe data shards: %s\n", err);
		rc = 1;
	} else {
		shards_report(&c);
	}
	shard_set_free(c.set);
out:
	tokenizer_free(t);
	return rc;
}

/* ---- moe data decode / encode ---------------------------------------------------------------- */

static int cmd_decode(int argc, char **argv)
{
	const char *tok_path = NULL;
	char **shards = calloc((size_t)argc + 1, sizeof(*shards)), err[1024];
	int n_shards = 0, help = 0, rc = 0;
	struct tokenizer *t;

	if (!shards)
		return 1;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc)
			tok_path = argv[++i];
		else if (strncmp(argv[i], "--", 2))
			shards[n_shards++] = argv[i];
		else
			help = 1;
	}
	if (help || !tok_path || !n_shards) {
		printf("usage: moe data decode --tokenizer T SHARD...\n"
		       "Prints the shards' tokens as text (a special token as its content).\n");
		free(shards);
		return 2;
	}
	t = load_tokenizer("decode", tok_path);
	if (!t) {
		free(shards);
		return 1;
	}
	for (int k = 0; !rc && k < n_shards; k++) {
		struct shard s;

		if (shard_open(&s, shards[k], tokenizer_vocab_size(t), err, sizeof(err))) {
			fprintf(stderr, "moe data decode: %s (tokenizer %s)\n", err, tok_path);
			rc = 1;
			break;
		}
		for (uint64_t i = 0; i < s.n_tokens; i++) {
			const uint8_t *p;
			size_t n;
			uint32_t id = shard_token(&s, i);

			if (tokenizer_token_bytes(t, id, &p, &n)) {
				fprintf(stderr, "moe data decode: %s: token %llu: id %u has no token in %s\n",
					shards[k], (unsigned long long)i, id, tok_path);
				rc = 1;
				break;
			}
			if (fwrite(p, 1, n, stdout) != n) {
				fprintf(stderr, "moe data decode: writing the output: %s\n",
					strerror(errno));
				rc = 1;
				break;
			}
		}
		shard_close(&s);
	}
	if (fflush(stdout) && !rc) {
		fprintf(stderr, "moe data decode: writing the output: %s\n", strerror(errno));
		rc = 1;
	}
	tokenizer_free(t);
	free(shards);
	return rc;
}

static void print_ids(const struct tok_ids *ids)
{
	for (size_t i = 0; i < ids->n; i++)
		printf(i ? " %u" : "%u", ids->v[i]);
	printf("\n");
}

static int encode_file(struct tokenizer *t, const char *path, char *err, size_t errlen)
{
	FILE *fp = fopen(path, "rb");
	uint8_t buf[65536];
	struct tok_stream s;
	struct tok_ids ids = { 0 };
	size_t n;
	int rc = 0;

	if (!fp) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return -1;
	}
	tok_stream_init(&s, t);
	while ((n = fread(buf, 1, sizeof(buf), fp)) > 0)
		tok_stream_feed(&s, buf, n, &ids);
	if (ferror(fp)) {
		snprintf(err, errlen, "%s: read error: %s", path, strerror(errno));
		rc = -1;
	} else {
		tok_stream_finish(&s, &ids);
		print_ids(&ids);
	}
	fclose(fp);
	tok_stream_free(&s);
	tok_ids_free(&ids);
	return rc;
}

static int cmd_encode(int argc, char **argv)
{
	const char *tok_path = NULL, *text = NULL;
	char **files = calloc((size_t)argc + 1, sizeof(*files)), err[1024];
	int n_files = 0, help = 0, rc = 0;
	struct tokenizer *t;

	if (!files)
		return 1;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc)
			tok_path = argv[++i];
		else if (!strcmp(argv[i], "--text") && i + 1 < argc)
			text = argv[++i];
		else if (strncmp(argv[i], "--", 2))
			files[n_files++] = argv[i];
		else
			help = 1;
	}
	if (help || !tok_path || (!text && !n_files) || (text && n_files)) {
		printf("usage: moe data encode --tokenizer T (--text STRING | FILE...)\n"
		       "Prints the token ids of the text, or of each file on a line.\n");
		free(files);
		return 2;
	}
	t = load_tokenizer("encode", tok_path);
	if (!t) {
		free(files);
		return 1;
	}
	if (text) {
		struct tok_ids ids = { 0 };

		tokenizer_encode(t, text, strlen(text), &ids);
		print_ids(&ids);
		tok_ids_free(&ids);
	}
	for (int k = 0; !rc && k < n_files; k++) {
		if (encode_file(t, files[k], err, sizeof(err))) {
			fprintf(stderr, "moe data encode: %s\n", err);
			rc = 1;
		}
	}
	tokenizer_free(t);
	free(files);
	return rc;
}

/* ---- moe data task -------------------------------------------------------------------------- */

static int cmd_task(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "arith"))
		return task_arith_main(argc - 1, argv + 1);
	printf("usage: moe data task NAME --out DIR [options]   (moe data task NAME --help)\n"
	       "Writes a synthetic, verifiable task: a tokenizer, SFT token shards, GRPO prompts and\n"
	       "held-out evaluation prompts.  Tasks:\n"
	       "  arith   integer arithmetic, \"37+58=\" -> \"95\"\n");
	if (argc > 1 && strcmp(argv[1], "--help") && strcmp(argv[1], "-h")) {
		fprintf(stderr, "moe data task: unknown task \"%s\"\n", argv[1]);
		return 2;
	}
	return argc > 1 ? 0 : 2;
}

/* ---- moe data synth -------------------------------------------------------------------------- */

/* xorshift64: the synthetic shards' own stream (tests and configs pin the shards it gives) */
static uint64_t next_rand(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

/* A shard of `repeat` (a short random phrase repeated: learnable) or `random` tokens. */
static int cmd_synth(int argc, char **argv)
{
	const char *out = NULL, *pattern = "repeat";
	long long vocab = 0, ntok = 0, seed = 1, period = 17;
	int help = argc < 1;

	for (int i = 1; i < argc; i++) {
		if (i + 1 < argc && !strcmp(argv[i], "--out")) out = argv[++i];
		else if (i + 1 < argc && !strcmp(argv[i], "--vocab")) vocab = atoll(argv[++i]);
		else if (i + 1 < argc && !strcmp(argv[i], "--tokens")) ntok = atoll(argv[++i]);
		else if (i + 1 < argc && !strcmp(argv[i], "--seed")) seed = atoll(argv[++i]);
		else if (i + 1 < argc && !strcmp(argv[i], "--period")) period = atoll(argv[++i]);
		else if (i + 1 < argc && !strcmp(argv[i], "--pattern")) pattern = argv[++i];
		else help = 1;
	}
	if (help || !out || vocab <= 0 || ntok <= 0 || period <= 0 ||
	    (strcmp(pattern, "repeat") && strcmp(pattern, "random"))) {
		printf("usage: moe data tokenizer|shards|decode|encode ...   (moe data <command> --help)\n"
		       "       moe data synth --out SHARD --vocab V --tokens N [--pattern repeat|random]\n"
		       "                      [--period P] [--seed S]\n"
		       "Writes a synthetic token shard (SPEC 3): 'repeat' repeats a random phrase of P tokens\n"
		       "(a model can learn it), 'random' draws every token uniformly.\n");
		return 2;
	}
	uint32_t *tok = malloc(sizeof(uint32_t) * ntok);
	uint64_t s = 0x9e3779b97f4a7c15ULL ^ (uint64_t)seed;
	char err[1024];

	if (!tok) {
		fprintf(stderr, "moe: out of memory\n");
		return 1;
	}
	for (long long i = 0; i < ntok; i++) {
		if (!strcmp(pattern, "random") || i < period)
			tok[i] = (uint32_t)(next_rand(&s) % (uint64_t)vocab);
		else
			tok[i] = tok[i - period];
	}
	if (shard_write(out, tok, ntok, vocab <= 65536 ? 2 : 4, err, sizeof(err))) {
		fprintf(stderr, "moe: %s\n", err);
		free(tok);
		return 1;
	}
	printf("wrote %s: %lld tokens\n", out, ntok);
	free(tok);
	return 0;
}

int data_cli_main(int argc, char **argv)
{
	const char *cmd = argc > 0 ? argv[0] : "";

	if (argc < 1 || !strcmp(cmd, "synth"))
		return cmd_synth(argc, argv);
	if (!strcmp(cmd, "tokenizer"))
		return cmd_tokenizer(argc, argv);
	if (!strcmp(cmd, "shards"))
		return cmd_shards(argc, argv);
	if (!strcmp(cmd, "decode"))
		return cmd_decode(argc, argv);
	if (!strcmp(cmd, "encode"))
		return cmd_encode(argc, argv);
	if (!strcmp(cmd, "task"))
		return cmd_task(argc, argv);
	printf("usage: moe data tokenizer --train FILES... --vocab N --out tokenizer.json [--special T]...\n"
	       "       moe data shards --tokenizer T --in FILES... --out DIR [--val-frac F]\n"
	       "       moe data decode --tokenizer T SHARD...\n"
	       "       moe data encode --tokenizer T (--text STRING | FILE...)\n"
	       "       moe data task arith --out DIR [options]\n");
	return 2;
}
