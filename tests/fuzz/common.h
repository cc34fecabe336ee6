/*
 * tests/fuzz/common.h - what the fuzzers share: a scratch directory of their own and the input
 * written to a file in it (the parsers under test read files).
 */
#ifndef MOE_TESTS_FUZZ_COMMON_H
#define MOE_TESTS_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* $TMPDIR/moe-fuzz.<pid>/name (created on first use, removed at exit). */
const char *fuzz_path(const char *name);
/* data[0..n) into fuzz_path(name); the path, or NULL (then the input is skipped). */
const char *fuzz_write(const char *name, const uint8_t *data, size_t n);
/* data[0..n) as a NUL-terminated string (malloc'd); NULL when out of memory. */
char *fuzz_string(const uint8_t *data, size_t n);

struct run_config;
struct moe_model;
/* tests/fuzz/micro.json: the tiny model the checkpoint and safetensors fuzzers use (aborts on error). */
void fuzz_micro_config(struct run_config *rc);
/* A model of that config, initialised with its train.seed (aborts on error). */
struct moe_model *fuzz_micro_model(const struct run_config *rc);

#endif
