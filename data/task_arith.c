/*
 * data/task_arith.c - `moe data task arith`: a synthetic, verifiable arithmetic task ("37+58=" with the
 * answer "95") for supervised fine-tuning, then GRPO with rl/rewards/arith.py, and the tests.
 *
 * A problem is an operator drawn uniformly from --ops and two operands drawn uniformly from
 * 0 .. 10^digits - 1 (so they have 1 to --digits digits); "a-b" may be negative.  The evaluation
 * problems are drawn first, distinct from one another and at most half of all the possible problems;
 * every SFT example and GRPO prompt is then drawn, with replacement, from the problems not held out.
 * Each of the three draws has its own random stream derived from --seed, so the evaluation set does
 * not depend on --train or --prompts, and the same options give the same files, byte for byte.
 *
 * DIR gets tokenizer.json, train/train_*.bin, val/val_*.bin (the SFT text "37+58=95", documents
 * separated by <|endoftext|>, written by the shard set of data/shard.c), prompts.jsonl, eval.jsonl
 * and README.txt.  A DIR that already holds any of these is refused unless --force (which first
 * deletes them, and only them); a failed run deletes what it wrote.
 */
#define _POSIX_C_SOURCE 200809L

#include "data/task.h"

#include <errno.h>
#include <glob.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/shard.h"
#include "data/tokenizer.h"
#include "launch/rng.h"

#define PFX "moe data task arith: "
#define PATH_LEN 4096
#define MAX_DIGITS 9			/* a*b < 10^18 still fits a long long */
#define MAX_EXAMPLES 1000000000LL
#define MAX_EVAL 10000000LL
#define DEFAULT_VOCAB (256 + TOKENIZER_N_DEFAULT_SPECIALS)

static const char OPS[] = "+-*";	/* an operator's code is its index here */

enum stream { STREAM_EVAL = 1, STREAM_TRAIN, STREAM_PROMPTS };

struct arith_opts {
	const char *out;
	long long digits, train, prompts, eval, seed, vocab;
	double val_frac;
	bool force;
	char ops[4];			/* the operators in the order of OPS */
	int n_ops;
	uint64_t range;			/* 10^digits: operands are 0 .. range - 1 */
};

struct arith_paths {
	char tokenizer[PATH_LEN], train[PATH_LEN], val[PATH_LEN];
	char prompts[PATH_LEN], eval[PATH_LEN], readme[PATH_LEN];
};

struct arith_stats {
	int shards[2], vocab, merges;
	uint64_t tokens[2], docs[2];
};

struct problem {
	long long a, b;
	char op;
};

/* ---- random numbers, problems, the held-out set ----------------------------------------------- */

struct rng {
	uint64_t s;
};

static void rng_seed(struct rng *r, long long seed, enum stream stream)
{
	r->s = rng_stream_seed((uint64_t)seed, (uint64_t)stream);
}

static uint64_t rng_next(struct rng *r)
{
	return splitmix64(&r->s);
}

/* Uniform in 0 .. n - 1 (rejection, no modulo bias). */
static uint64_t rng_below(struct rng *r, uint64_t n)
{
	uint64_t lim = UINT64_MAX - UINT64_MAX % n, x;

	do
		x = rng_next(r);
	while (x >= lim);
	return x % n;
}

static void draw(struct rng *r, const struct arith_opts *o, struct problem *p)
{
	p->op = o->ops[rng_below(r, (uint64_t)o->n_ops)];
	p->a = (long long)rng_below(r, o->range);
	p->b = (long long)rng_below(r, o->range);
}

static uint64_t problem_key(const struct arith_opts *o, const struct problem *p)
{
	uint64_t op = (uint64_t)(strchr(OPS, p->op) - OPS);

	return (op * o->range + (uint64_t)p->a) * o->range + (uint64_t)p->b;
}

static long long answer(const struct problem *p)
{
	if (p->op == '+')
		return p->a + p->b;
	if (p->op == '-')
		return p->a - p->b;
	return p->a * p->b;
}

/* "37+58=" */
static void format_prompt(const struct problem *p, char *buf, size_t n)
{
	snprintf(buf, n, "%lld%c%lld=", p->a, p->op, p->b);
}

/* "37+58=95": returns its length */
static size_t format_doc(const struct problem *p, char *buf, size_t n)
{
	return (size_t)snprintf(buf, n, "%lld%c%lld=%lld", p->a, p->op, p->b, answer(p));
}

/* Open addressing over key + 1 (0 marks an empty slot), at most half full. */
struct keyset {
	uint64_t *slot;
	size_t mask;
};

static int keyset_init(struct keyset *s, long long n)
{
	size_t cap = 16;

	while (cap < 2 * (size_t)n + 2)
		cap <<= 1;
	s->slot = calloc(cap, sizeof(*s->slot));
	s->mask = cap - 1;
	return s->slot ? 0 : -1;
}

/* The slot holding key, or the empty slot where it would go. */
static uint64_t *keyset_find(const struct keyset *s, uint64_t key)
{
	size_t i = (size_t)mix64(key) & s->mask;

	while (s->slot[i] && s->slot[i] != key + 1)
		i = (i + 1) & s->mask;
	return &s->slot[i];
}

/* A problem that is not held out for evaluation. */
static void draw_kept(struct rng *r, const struct arith_opts *o, const struct keyset *held,
		      struct problem *p)
{
	do
		draw(r, o, p);
	while (*keyset_find(held, problem_key(o, p)));
}

/* ---- options ---------------------------------------------------------------------------------- */

static void usage(void)
{
	printf("usage: moe data task arith --out DIR [--digits N] [--ops STR] [--train N] [--prompts N]\n"
	       "                           [--eval N] [--seed S] [--vocab V] [--val-frac F] [--force]\n"
	       "Writes a synthetic arithmetic task (\"37+58=\" -> \"95\") for SFT then GRPO into DIR:\n"
	       "  tokenizer.json   byte-level BPE tokenizer (Hugging Face format)\n"
	       "  train/, val/     SFT token shards: documents \"37+58=95\" separated by <|endoftext|>\n"
	       "  prompts.jsonl    GRPO prompts {\"prompt\": \"37+58=\", \"answer\": \"95\"}\n"
	       "  eval.jsonl       held-out prompts, no problem of which is in train/, val/, prompts.jsonl\n"
	       "  README.txt       what the files are and the options used\n"
	       "Options:\n"
	       "  --digits N    operands have 1 to N digits, 0 .. 10^N - 1 (1 to %d; default 2)\n"
	       "  --ops STR     operators, a subset of \"+-*\" (default \"+\"; a-b may be negative)\n"
	       "  --train N     SFT examples, the validation ones included (default 20000)\n"
	       "  --prompts N   GRPO prompts (default 2000)\n"
	       "  --eval N      held-out evaluation prompts, distinct, at most half of all the problems\n"
	       "                (default 200)\n"
	       "  --seed S      random seed (default 1): the same options give the same files\n"
	       "  --vocab V     vocabulary size (default %d: the 256 bytes and %d special tokens, no\n"
	       "                merges); a larger V learns BPE merges from the SFT text\n"
	       "  --val-frac F  fraction of the SFT examples in val/ (0 to 0.5; default 0.02)\n"
	       "  --force       replace the files of a task already in DIR (other files are kept)\n"
	       "DIR is created if missing; one already holding a task's files is refused without --force.\n",
	       MAX_DIGITS, DEFAULT_VOCAB, TOKENIZER_N_DEFAULT_SPECIALS);
}

static bool parse_ll(const char *s, long long *v)
{
	char *end;

	errno = 0;
	*v = strtoll(s, &end, 10);
	return !errno && end != s && !*end;
}

static int int_opt(const char *name, const char *s, long long lo, long long hi, long long *v)
{
	if (parse_ll(s, v) && *v >= lo && *v <= hi)
		return 0;
	fprintf(stderr, PFX "%s %s: must be an integer from %lld to %lld\n", name, s, lo, hi);
	return -1;
}

static int frac_opt(const char *name, const char *s, double hi, double *v)
{
	char *end;

	errno = 0;
	*v = strtod(s, &end);
	if (!errno && end != s && !*end && *v >= 0 && *v <= hi)
		return 0;
	fprintf(stderr, PFX "%s %s: must be a number from 0 to %g\n", name, s, hi);
	return -1;
}

/* The operators of s, deduplicated, in the order of OPS. */
static int ops_opt(const char *s, struct arith_opts *o)
{
	bool seen[sizeof(OPS) - 1] = { false };

	if (!*s) {
		fprintf(stderr, PFX "--ops \"\": give a subset of \"%s\"\n", OPS);
		return -1;
	}
	for (const char *p = s; *p; p++) {
		const char *q = strchr(OPS, *p);

		if (!q) {
			fprintf(stderr, PFX "--ops \"%s\": '%c' is not an operator (use a subset of "
				"\"%s\")\n", s, *p, OPS);
			return -1;
		}
		seen[q - OPS] = true;
	}
	o->n_ops = 0;
	for (size_t k = 0; k < sizeof(seen); k++)
		if (seen[k])
			o->ops[o->n_ops++] = OPS[k];
	o->ops[o->n_ops] = '\0';
	return 0;
}

/* One option and its value (argv[*i] and argv[*i + 1]): 0, -1 after a bad value, -2 if unknown. */
static int set_opt(struct arith_opts *o, const char *name, const char *v)
{
	if (!strcmp(name, "--out")) {
		o->out = v;
		return 0;
	}
	if (!strcmp(name, "--digits"))
		return int_opt(name, v, 1, MAX_DIGITS, &o->digits);
	if (!strcmp(name, "--ops"))
		return ops_opt(v, o);
	if (!strcmp(name, "--train"))
		return int_opt(name, v, 1, MAX_EXAMPLES, &o->train);
	if (!strcmp(name, "--prompts"))
		return int_opt(name, v, 0, MAX_EXAMPLES, &o->prompts);
	if (!strcmp(name, "--eval"))
		return int_opt(name, v, 0, MAX_EVAL, &o->eval);
	if (!strcmp(name, "--seed"))
		return int_opt(name, v, 0, INT64_MAX, &o->seed);
	if (!strcmp(name, "--vocab"))
		return int_opt(name, v, DEFAULT_VOCAB, 1 << 24, &o->vocab);
	if (!strcmp(name, "--val-frac"))
		return frac_opt(name, v, 0.5, &o->val_frac);
	return -2;
}

static const char *const VALUED[] = { "--out", "--digits", "--ops", "--train", "--prompts",
				       "--eval", "--seed", "--vocab", "--val-frac" };

static bool takes_value(const char *a)
{
	for (size_t k = 0; k < sizeof(VALUED) / sizeof(VALUED[0]); k++)
		if (!strcmp(a, VALUED[k]))
			return true;
	return false;
}

/* Returns -1 when the options are good, else the exit status (a message printed). */
static int parse_args(int argc, char **argv, struct arith_opts *o)
{
	*o = (struct arith_opts){ .digits = 2, .train = 20000, .prompts = 2000, .eval = 200,
				  .seed = 1, .vocab = DEFAULT_VOCAB, .val_frac = 0.02,
				  .ops = "+", .n_ops = 1 };
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];

		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			usage();
			return 0;
		} else if (!strcmp(a, "--force")) {
			o->force = true;
		} else if (!takes_value(a)) {
			fprintf(stderr, PFX "unknown option \"%s\" (see --help)\n", a);
			return 2;
		} else if (i + 1 >= argc) {
			fprintf(stderr, PFX "%s: missing value (see --help)\n", a);
			return 2;
		} else if (set_opt(o, a, argv[++i])) {
			return 1;
		}
	}
	if (!o->out) {
		fprintf(stderr, PFX "--out DIR is required (see --help)\n");
		return 2;
	}
	o->range = 1;
	for (long long k = 0; k < o->digits; k++)
		o->range *= 10;
	return -1;
}

/* The evaluation problems must be distinct and leave at least half of the problems for training. */
static int check_counts(const struct arith_opts *o)
{
	uint64_t total = (uint64_t)o->n_ops * o->range * o->range;

	if ((uint64_t)o->eval <= total / 2)
		return 0;
	fprintf(stderr, PFX "--eval %lld: --digits %lld --ops '%s' give only %llu distinct problems, "
		"and at most half of them (%llu) can be held out for evaluation, disjoint from the "
		"training problems: lower --eval, or raise --digits or add --ops\n", o->eval, o->digits,
		o->ops, (unsigned long long)total, (unsigned long long)(total / 2));
	return -1;
}

/* The options as a command line (--out left out: README.txt does not depend on where DIR is). */
static void format_opts(const struct arith_opts *o, char *buf, size_t n)
{
	snprintf(buf, n, "--digits %lld --ops '%s' --train %lld --prompts %lld --eval %lld --seed %lld "
		 "--vocab %lld --val-frac %g", o->digits, o->ops, o->train, o->prompts, o->eval,
		 o->seed, o->vocab, o->val_frac);
}

/* ---- the output directory --------------------------------------------------------------------- */

static const char *const OUTPUTS[] = { "tokenizer.json", "train/train_*.bin", "val/val_*.bin",
				       "prompts.jsonl", "eval.jsonl", "README.txt" };

/* The task's files in dir (names + suffix): counted, the first copied to first, deleted if remove. */
static int scan_outputs(const char *dir, const char *suffix, bool remove, char *first, size_t n)
{
	int found = 0;

	for (size_t k = 0; k < sizeof(OUTPUTS) / sizeof(OUTPUTS[0]); k++) {
		char pat[PATH_LEN + 64];
		glob_t g;

		snprintf(pat, sizeof(pat), "%s/%s%s", dir, OUTPUTS[k], suffix);
		if (glob(pat, 0, NULL, &g))
			continue;
		for (size_t j = 0; j < g.gl_pathc; j++) {
			if (!found++ && first)
				snprintf(first, n, "%s", g.gl_pathv[j]);
			if (remove)
				unlink(g.gl_pathv[j]);
		}
		globfree(&g);
	}
	return found;
}

/* Delete what a failed run wrote (the names are the task's: a DIR holding them was refused). */
static void remove_outputs(const struct arith_opts *o, const struct arith_paths *pa)
{
	scan_outputs(o->out, "", true, NULL, 0);
	scan_outputs(o->out, ".tmp", true, NULL, 0);
	rmdir(pa->train);
	rmdir(pa->val);
}

/* mkdir -p */
static int make_dir(const char *path, char *err, size_t errlen)
{
	char p[PATH_LEN];
	struct stat st;

	snprintf(p, sizeof(p), "%s", path);
	for (char *s = p + 1; *s; s++) {
		if (*s != '/')
			continue;
		*s = '\0';
		if (mkdir(p, 0777) && errno != EEXIST) {
			snprintf(err, errlen, "cannot create %s: %s", p, strerror(errno));
			return -1;
		}
		*s = '/';
	}
	if (mkdir(p, 0777) && errno != EEXIST) {
		snprintf(err, errlen, "cannot create %s: %s", p, strerror(errno));
		return -1;
	}
	if (stat(p, &st) || !S_ISDIR(st.st_mode)) {
		snprintf(err, errlen, "%s: not a directory", p);
		return -1;
	}
	return 0;
}

static int make_paths(const char *dir, struct arith_paths *pa)
{
	if (strlen(dir) > PATH_LEN - 64) {
		fprintf(stderr, PFX "--out %s: the path is too long\n", dir);
		return -1;
	}
	snprintf(pa->tokenizer, PATH_LEN, "%s/tokenizer.json", dir);
	snprintf(pa->train, PATH_LEN, "%s/train", dir);
	snprintf(pa->val, PATH_LEN, "%s/val", dir);
	snprintf(pa->prompts, PATH_LEN, "%s/prompts.jsonl", dir);
	snprintf(pa->eval, PATH_LEN, "%s/eval.jsonl", dir);
	snprintf(pa->readme, PATH_LEN, "%s/README.txt", dir);
	return 0;
}

static int prepare_dir(const struct arith_opts *o, const struct arith_paths *pa)
{
	char err[PATH_LEN + 128], first[PATH_LEN + 64];

	if (make_dir(o->out, err, sizeof(err))) {
		fprintf(stderr, PFX "--out %s: %s\n", o->out, err);
		return -1;
	}
	if (o->force) {
		scan_outputs(o->out, "", true, NULL, 0);
		scan_outputs(o->out, ".tmp", true, NULL, 0);
	} else if (scan_outputs(o->out, "", false, first, sizeof(first))) {
		fprintf(stderr, PFX "--out %s: already holds a task (%s): remove it, choose another "
			"--out, or pass --force\n", o->out, first);
		return -1;
	}
	if (make_dir(pa->train, err, sizeof(err)) || make_dir(pa->val, err, sizeof(err))) {
		fprintf(stderr, PFX "--out %s: %s\n", o->out, err);
		return -1;
	}
	return 0;
}

/* ---- writing the files ------------------------------------------------------------------------ */

/* Files are written to PATH.tmp and renamed once complete. */
static FILE *open_out(const char *path, char *err, size_t errlen)
{
	char tmp[PATH_LEN + 8];
	FILE *fp;

	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	fp = fopen(tmp, "w");
	if (!fp)
		snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
	return fp;
}

static int close_out(FILE *fp, const char *path, char *err, size_t errlen)
{
	char tmp[PATH_LEN + 8];
	bool bad = fflush(fp) || ferror(fp);

	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	if (bad)
		snprintf(err, errlen, "%s: write failed: %s", tmp, strerror(errno));
	if (fclose(fp) && !bad) {
		snprintf(err, errlen, "%s: close failed: %s", tmp, strerror(errno));
		bad = true;
	}
	if (!bad && rename(tmp, path)) {
		snprintf(err, errlen, "%s: cannot rename to %s: %s", tmp, path, strerror(errno));
		bad = true;
	}
	if (bad)
		unlink(tmp);
	return bad ? -1 : 0;
}

static void write_record(FILE *fp, const struct problem *p)
{
	char prompt[64];

	format_prompt(p, prompt, sizeof(prompt));
	fprintf(fp, "{\"prompt\": \"%s\", \"answer\": \"%lld\"}\n", prompt, answer(p));
}

/* Draws the distinct evaluation problems into held and writes them. */
static int write_eval(const struct arith_opts *o, const char *path, struct keyset *held, char *err,
		      size_t errlen)
{
	FILE *fp = open_out(path, err, errlen);
	struct rng r;
	struct problem p;

	if (!fp)
		return -1;
	rng_seed(&r, o->seed, STREAM_EVAL);
	for (long long i = 0; i < o->eval;) {
		uint64_t *slot;

		draw(&r, o, &p);
		slot = keyset_find(held, problem_key(o, &p));
		if (*slot)
			continue;
		*slot = problem_key(o, &p) + 1;
		write_record(fp, &p);
		i++;
	}
	return close_out(fp, path, err, errlen);
}

static int write_prompts(const struct arith_opts *o, const char *path, const struct keyset *held,
			 char *err, size_t errlen)
{
	FILE *fp = open_out(path, err, errlen);
	struct rng r;
	struct problem p;

	if (!fp)
		return -1;
	rng_seed(&r, o->seed, STREAM_PROMPTS);
	for (long long i = 0; i < o->prompts; i++) {
		draw_kept(&r, o, held, &p);
		write_record(fp, &p);
	}
	return close_out(fp, path, err, errlen);
}

/* The default vocabulary has no merges; a larger one learns them from the SFT documents. */
static struct tokenizer *make_tokenizer(const struct arith_opts *o, const struct keyset *held,
					char *err, size_t errlen)
{
	struct tok_trainer *tr = tok_trainer_new(NULL, 0, err, errlen);
	struct tokenizer *t;
	struct rng r;
	struct problem p;
	char doc[96];

	if (!tr)
		return NULL;
	rng_seed(&r, o->seed, STREAM_TRAIN);
	for (long long i = 0; o->vocab > DEFAULT_VOCAB && i < o->train; i++) {
		draw_kept(&r, o, held, &p);
		tok_trainer_feed(tr, doc, format_doc(&p, doc, sizeof(doc)));
		tok_trainer_end_doc(tr);
	}
	t = tok_trainer_finish(tr, (int)o->vocab, err, errlen);
	tok_trainer_free(tr);
	return t;
}

/* How many SFT examples go to val/: round(train * val_frac), at least 1, leaving 1 for train/. */
static long long val_count(const struct arith_opts *o)
{
	long long k = (long long)((double)o->train * o->val_frac + 0.5);

	if (o->val_frac <= 0 || o->train < 2)
		return 0;
	if (k < 1)
		k = 1;
	return k < o->train ? k : o->train - 1;
}

/* Example i of n is a validation one when i * k / n steps up: k of them, evenly spread. */
static bool is_val(long long i, long long k, long long n)
{
	return (uint64_t)(i + 1) * (uint64_t)k / (uint64_t)n != (uint64_t)i * (uint64_t)k / (uint64_t)n;
}

static int write_shards(const struct arith_opts *o, const struct arith_paths *pa,
			const struct keyset *held, struct tokenizer *t, struct arith_stats *st,
			char *err, size_t errlen)
{
	long long n_val = val_count(o);
	int eot = tokenizer_eot_id(t), rc = 0;
	struct shard_set *set;
	struct rng r;
	struct problem p;
	char doc[96];

	if (eot < 0) {
		snprintf(err, errlen, "%s: no end-of-text token", pa->tokenizer);
		return -1;
	}
	set = shard_set_new(t, pa->train, pa->val, SHARD_SET_DEFAULT_TOKENS, (uint32_t)eot, err,
			     errlen);
	if (!set)
		return -1;
	rng_seed(&r, o->seed, STREAM_TRAIN);
	for (long long i = 0; !rc && i < o->train; i++) {
		draw_kept(&r, o, held, &p);
		rc = shard_set_add(set, is_val(i, n_val, o->train), doc,
				   format_doc(&p, doc, sizeof(doc)), err, errlen);
	}
	if (!rc)
		rc = shard_set_finish(set, err, errlen);
	for (int k = 0; !rc && k < 2; k++)
		shard_set_stats(set, k, &st->shards[k], &st->tokens[k], &st->docs[k]);
	shard_set_free(set);
	return rc;
}

static int write_readme(const struct arith_opts *o, const struct arith_paths *pa,
			const struct arith_stats *st, char *err, size_t errlen)
{
	FILE *fp = open_out(pa->readme, err, errlen);
	char opts[512];

	if (!fp)
		return -1;
	format_opts(o, opts, sizeof(opts));
	fprintf(fp, "Arithmetic task (moe data task arith): problems like \"37+58=\" with the answer \"95\".\n"
		"Operators '%s'; operands 0 .. %llu, drawn uniformly.\n\n"
		"tokenizer.json  byte-level BPE tokenizer (Hugging Face format): vocab %d, %d merges,\n"
		"                end of text <|endoftext|>\n"
		"train/          SFT token shards (data.train = train/*.bin): %llu examples \"37+58=95\",\n"
		"                separated by <|endoftext|>\n"
		"val/            validation shards (data.val = val/*.bin): %llu examples of the same kind\n"
		"prompts.jsonl   %lld GRPO prompts (grpo.prompts), one {\"prompt\": \"37+58=\", "
		"\"answer\": \"95\"} a line;\n"
		"                reward program: rl/rewards/arith.py\n"
		"eval.jsonl      %lld held-out evaluation prompts in the same format, distinct, none of\n"
		"                them in train/, val/ or prompts.jsonl\n"
		"README.txt      this file\n\n"
		"Made by: moe data task arith %s --out <this directory>\n",
		o->ops, (unsigned long long)o->range - 1, st->vocab, st->merges,
		(unsigned long long)st->docs[0], (unsigned long long)st->docs[1], o->prompts, o->eval,
		opts);
	return close_out(fp, pa->readme, err, errlen);
}

/* ---- the command ------------------------------------------------------------------------------ */

static int write_task(const struct arith_opts *o, const struct arith_paths *pa,
		      struct arith_stats *st, char *err, size_t errlen)
{
	struct keyset held;
	struct tokenizer *t = NULL;
	int rc;

	if (keyset_init(&held, o->eval)) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	rc = write_eval(o, pa->eval, &held, err, errlen);
	if (!rc && !(t = make_tokenizer(o, &held, err, errlen)))
		rc = -1;
	if (!rc) {
		st->vocab = tokenizer_vocab_size(t);
		st->merges = tokenizer_n_merges(t);
		rc = tokenizer_save(t, pa->tokenizer, err, errlen);
	}
	if (!rc)
		rc = write_shards(o, pa, &held, t, st, err, errlen);
	if (!rc)
		rc = write_prompts(o, pa->prompts, &held, err, errlen);
	if (!rc)
		rc = write_readme(o, pa, st, err, errlen);
	tokenizer_free(t);
	free(held.slot);
	return rc;
}

static void print_summary(const struct arith_opts *o, const struct arith_paths *pa,
			  const struct arith_stats *st)
{
	char opts[512], dir[PATH_LEN + 2];

	format_opts(o, opts, sizeof(opts));
	printf("arith task in %s (%s)\n", o->out, opts);
	printf("  %-24s vocab %d (%d merges, %d special tokens)\n", pa->tokenizer, st->vocab,
	       st->merges, TOKENIZER_N_DEFAULT_SPECIALS);
	for (int k = 0; k < 2; k++) {
		snprintf(dir, sizeof(dir), "%s/", k ? pa->val : pa->train);
		printf("  %-24s %llu SFT examples, %llu tokens, %d shard(s)\n", dir,
		       (unsigned long long)st->docs[k], (unsigned long long)st->tokens[k],
		       st->shards[k]);
	}
	printf("  %-24s %lld GRPO prompts\n", pa->prompts, o->prompts);
	printf("  %-24s %lld held-out evaluation prompts\n", pa->eval, o->eval);
	printf("  %s\n", pa->readme);
	if (st->vocab < o->vocab)
		printf("note: no pair was left to merge: the vocabulary stops at %d (--vocab %lld)\n",
		       st->vocab, o->vocab);
}

int task_arith_main(int argc, char **argv)
{
	struct arith_opts o;
	struct arith_paths *pa;
	struct arith_stats st = { 0 };
	char err[PATH_LEN + 256];
	int rc = parse_args(argc, argv, &o);

	if (rc >= 0)
		return rc;
	if (check_counts(&o))
		return 1;
	pa = malloc(sizeof(*pa));
	if (!pa) {
		fprintf(stderr, PFX "out of memory\n");
		return 1;
	}
	rc = 1;
	if (make_paths(o.out, pa) || prepare_dir(&o, pa))
		goto out;
	if (write_task(&o, pa, &st, err, sizeof(err))) {
		fprintf(stderr, PFX "%s\n", err);
		remove_outputs(&o, pa);
		goto out;
	}
	print_summary(&o, pa, &st);
	rc = 0;
out:
	free(pa);
	return rc;
}
