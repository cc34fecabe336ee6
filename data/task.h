/*
 * data/task.h - `moe data task NAME`: synthetic, verifiable tasks for the end-to-end demo (supervised
 * fine-tuning, then GRPO) and the tests.  Each writes a directory with a tokenizer, SFT token shards,
 * GRPO prompts and held-out evaluation prompts.
 *
 *   moe data task arith --out DIR [--digits N] [--ops STR] [--train N] [--prompts N] [--eval N]
 *                       [--seed S] [--vocab V] [--val-frac F] [--force]      (data/task_arith.c)
 */
#ifndef MOE_DATA_TASK_H
#define MOE_DATA_TASK_H

/* `moe data task arith` (dispatched by data/data_cli.c): argv[0] is "arith".  Returns the exit status:
 * 0 (also after --help), 1 after an error (printed on stderr, naming the option or the file), 2 after
 * a usage error. */
int task_arith_main(int argc, char **argv);

#endif
