/*
 * train/train_cli.h - the `moe` subcommands of train/ that parse their own options (moe train, init,
 * eval and inspect share moe.c's):
 *
 *   moe plot    --metrics FILE --key K [--key K2 ...] --out FILE.png [--title T] [--size WxH]
 *   moe convert --from-hf DIR --out CKPT.h5
 *   moe convert --to-hf CKPT.h5 --out DIR [--dtype bf16|f32] [--shard-size BYTES]
 *   moe lora merge --checkpoint ADAPTERS.h5 --out MERGED.h5
 */
#ifndef MOE_TRAIN_TRAIN_CLI_H
#define MOE_TRAIN_TRAIN_CLI_H

/* moe plot --metrics FILE --key K [--key K2 ...] --out FILE.png [--title T] [--size WxH]; --help.
 * Returns the exit status: 0, 1 on error, 2 on bad usage. */
int plot_cli_main(int argc, char **argv);

/* `moe convert ...`: argv holds the arguments after "convert".  Returns the exit code. */
int convert_cli_main(int argc, char **argv);

/* `moe lora merge --checkpoint ADAPTERS.h5 --out MERGED.h5` (train/lora_run.h): argv after "lora". */
int lora_cli_main(int argc, char **argv);

#endif
