/*
 * tests/harness.h - shared CUnit scaffolding.  Each tests/<dir>/test_*.c defines register_tests(), which
 * adds its suites; harness.c owns main(), runs them with the basic interface (whose Run Summary ctest
 * prints) and exits non-zero when any assertion failed.
 */
#ifndef MOE_TESTS_HARNESS_H
#define MOE_TESTS_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#include <CUnit/Basic.h>

void register_tests(void);

/* Add a suite of (name, function) pairs terminated by {NULL, NULL}. */
struct test_case {
	const char *name;
	void (*fn)(void);
};
void add_suite(const char *name, const struct test_case *cases);

/* malloc that ends the test run (exit 2) when memory runs out; never NULL (0 bytes: 1). */
void *test_xmalloc(size_t bytes);

/* Deterministic test randomness. */
void test_rng_seed(uint64_t seed);
float test_randn(void);
float test_rand_uniform(float lo, float hi);
void test_fill_randn(float *x, size_t n, float scale);

/*
 * Router weights and biases redrawn large (seeded with seed): the top-k choices are well separated, so
 * float rounding or a small weight step never flips a selection.  Every layer with a router; replicated
 * tensors only, so every expert slice of a model draws the same values.
 */
struct moe_model;
void test_separate_routers(struct moe_model *m, uint64_t seed);

/*
 * The model variants the model tests run, names in test_variant_name: DeepSeek-V3-like (sigmoid scores,
 * group-limited routing, q_lora, shared experts), V2-like (softmax, no q_lora, one group, no shared
 * experts, no norm_topk_prob, no balance loss), V2 with groups and 2 shared experts, dense only, and
 * V3 with YaRN RoPE over an original context of yarn_original positions.
 */
enum test_variant { V3_LIKE, V2_LIKE, V2_GROUPS, DENSE_ONLY, V3_YARN, N_VARIANTS };
extern const char *const test_variant_name[N_VARIANTS];
/* c: a V3-like config (each test picks its own sizes); turned into variant v */
struct model_config;
void test_apply_variant(struct model_config *c, enum test_variant v, int yarn_original);
/* The small V3-like shape the checkpoint and conversion tests share (sizes are the caller's): 2 heads,
 * 4 routed experts in 2 groups (1 picked), top-2, 1 shared expert, the first layer dense, q_lora and
 * kv_lora 16, head dims 8 (rope, nope, v). */
void test_small_moe(struct model_config *m);
/* The distributed tests' shape, sizes (hidden, intermediate, moe_intermediate, layers) the caller's:
 * 8 routed experts in 4 groups (2 picked), top-3, 1 shared, the first layer dense, sigmoid scores with
 * the sequence balance loss (alpha 0.01), q_lora 12, kv_lora 8, head dims rope 4 / nope 6 / v 6. */
void test_ep_moe(struct model_config *c, int hidden, int intermediate, int moe_intermediate, int layers);
/* Sequence i of a test batch, the same on every rank: T inputs and T targets in [0, V) */
void test_sequence(int i, int T, int *in, int *tgt, int V);
/* The gradient tests' small model (3 layers of 16, 8 routed experts top-2, 1 shared) in variant v. */
struct model_config test_grad_config(enum test_variant v);

/* max |a-b| / max(|b|, floor) over n elements */
double rel_err(const float *a, const float *b, size_t n, double floor);
/* max |a-b| / max |b| over n elements (b the reference); +inf if a holds a NaN */
double max_rel_err(const float *a, const float *b, size_t n);
/* ||a - b|| / ||b|| over n elements (b the reference); +inf if a holds a NaN or an infinity */
double norm_rel_err(const float *a, const float *b, size_t n);

/* A scratch directory for the test (created, unique per process); returns its path. */
const char *test_tmpdir(void);
/* test_tmpdir()/name; the result stays valid for the next 7 calls (a ring of buffers). */
const char *tmp_path(const char *name);
/* The source tree's rel ("tests/data/fixtures/x.json"): under $MOE_SRC when set (ctest sets it), else
 * under the tree this harness was compiled from; valid for the next 7 calls (a ring of buffers). */
const char *src_path(const char *rel);
/* The whole file at path, NUL-terminated (*n its length when n is given); ends the run (exit 2) when it
 * cannot be read, naming it. */
char *test_read_file(const char *path, size_t *n);

#endif
