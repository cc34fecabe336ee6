/*
 * data/data_cli.h - `moe data` subcommands for text: training a tokenizer, text to token shards, and
 * back, and the demo tasks.
 *
 *   moe data tokenizer --train FILES... --vocab N --out tokenizer.json [--special TOKEN]...
 *   moe data shards    --tokenizer T --in FILES... --out DIR [--val-frac F] [--shard-tokens N]
 *   moe data decode    --tokenizer T SHARD...
 *   moe data encode    --tokenizer T (--text STRING | FILE...)
 *   moe data task      arith --out DIR [options]            (data/task.h)
 *   moe data synth     --out SHARD --vocab V --tokens N [--pattern repeat|random] [--period P] [--seed S]
 *
 * A text file is one document; in a JSON Lines file (*.jsonl) each record's "text" is one.
 */
#ifndef MOE_DATA_DATA_CLI_H
#define MOE_DATA_DATA_CLI_H

/* argv[0] is the subcommand ("tokenizer", "shards", "decode", "encode", "task", "synth").  Returns the exit
 * status: 0, 1 after an error (printed on stderr, naming the file), 2 after a usage message. */
int data_cli_main(int argc, char **argv);

#endif
