/*
 * rl/rl_cli.h - the `moe` subcommands of rl/ that parse their own options (moe grpo shares moe.c's).
 */
#ifndef MOE_RL_RL_CLI_H
#define MOE_RL_RL_CLI_H

/*
 * moe generate --checkpoint CKPT.h5 (--prompt TEXT [--tokenizer tokenizer.json] | --prompt-ids 1,2,3)
 *              [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]
 *              [--num-samples G] [--eos ID] [--set section.key=value ...]
 * Prints each completion (text with a tokenizer, else the ids) and a summary on stderr.  The tokenizer
 * defaults to grpo.tokenizer of the checkpoint's config; the stop id to the tokenizer's end of text
 * (none without a tokenizer; --eos -1 disables it).  Returns the process exit status.
 */
int generate_cli_main(int argc, char **argv);

#endif
