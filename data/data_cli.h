/*
 * data/data_cli.h - `moe data` subcommands for text: training a tokenizer, text to token shards, and
 * back, and the demo tasks.
 *
 *   moe data tokenizer --train FILES... --vocab N --out tokenizer.json [--special TOKEN]...
 *   moe data shards    --tokenizer T --in FILES... --out DIR [--val-frac F] [--shard-tokens N]
 *   moe data decode    --tokenizer T SHARD...
 *   moe data encode    --tokenizer T (--text STRING | FILE...)
 *   moe data task      arith --out DIR [options]            (data/task.h)
 *
 * A text file is one document; in a JSON Lines file (*.jsonl) each record's "text" is one.
 */
#ifndef MOE_DATA_DATA_CLI_H
#define MOE_DATA_DATA_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct tokenizer;

/* argv[0] is the subcommand ("tokenizer", "shards", "decode", "encode", "task").  Returns the exit
 * status: 0, 1 after an error (printed on stderr, naming the file), 2 after a usage message. */
int data_cli_main(int argc, char **argv);

/*
 * Token shards of a training and a validation split, written the way `moe data shards` writes them:
 * TRAIN_DIR/train_00000.bin, ... and VAL_DIR/val_00000.bin, ... (SPEC 3; 2-byte tokens when the
 * vocabulary fits, 4 otherwise), the documents of a split separated by the end-of-text id eot.  Each
 * shard is written to PATH.tmp and renamed when complete.  The functions returning int give 0, or -1
 * with err.  shard_set_free() of a set that was not finished removes every shard it wrote.
 */
struct shard_set;
struct shard_set *shard_set_new(struct tokenizer *t, const char *train_dir, const char *val_dir,
				uint32_t eot, char *err, size_t errlen);
/* One whole document (text of n bytes) into the validation split (val) or the training split. */
int shard_set_add(struct shard_set *s, bool val, const void *text, size_t n, char *err,
		  size_t errlen);
int shard_set_finish(struct shard_set *s, char *err, size_t errlen);
void shard_set_stats(const struct shard_set *s, bool val, int *shards, uint64_t *tokens,
		     uint64_t *docs);
void shard_set_free(struct shard_set *s);

#endif
