/*
 * tests/train/test_checkpoint_dist.c - checkpoint_save_dist at whatever world size it is started with
 * (alone, or under mpirun -np 2 / 3 / 4: tests/train/test_checkpoint_dist.sh does that), for every ep
 * that divides the world, with 4, 6 and 2 routed experts (6 over ep 4 gives uneven slices, 2 over ep 3 or
 * 4 ranks that hold no expert at all, rank 0 among them).
 *
 *   round trip   each rank builds its expert slice (model_init_weights is slice-independent) and fills
 *                its AdamW moments with values that depend only on the GLOBAL element (parameter, expert,
 *                index within the expert); every copy a rank should NOT be the source of (replicated
 *                tensors on ranks other than 0, everything on dp groups other than 0, the step and the
 *                train state on ranks other than 0) is poisoned, so the file can only be right if exactly
 *                the designated writers wrote it.  Rank 0 then loads the file into a FULL model and checks
 *                every weight, moment, step and state field bit-exactly against a full model made the
 *                same way; every rank loads its own slice and checks it bit-exactly.  No temporary file is
 *                left.  With d == NULL (rank 0 alone, full model) the same call is checkpoint_save: that
 *                file is the reference the script compares every layout's file with (h5diff, h5dump -p).
 *   failures     (every rank returns -1 with the same message, no hang, no file, no temporary left, and
 *                a previous checkpoint at PATH untouched)
 *                - an unwritable directory (missing; a regular file as a directory)
 *                - the last rank's optimizer state laid out unlike its weights (a local check)
 *                - a writer other than rank 0 failing mid-save (rank 1's model has other expert shapes)
 *                - expert slices that do not tile [0, E) over the expert-parallel group
 *
 * Every rank runs the same collectives in the same order whatever its assertions find, so a failed
 * assertion never turns into a hang.  MOE_CKPT_DIST_DIR (shared by all ranks; the script's) keeps the
 * files for the script; without it rank 0's scratch directory is used and cleaned.
 */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "launch/comm.h"
#include "model/model.h"
#include "optim/adamw.h"
#include "train/checkpoint.h"
#include "train/config.h"

#define SEED 20240611u
#define POISON (-12345.5f)

static char dir[512];		/* shared by all ranks */
static int keep_files;		/* dir is the script's: leave the files there */
static int world, rank;

static void die(const char *what, const char *msg)
{
	char buf[1400];

	snprintf(buf, sizeof(buf), "test_checkpoint_dist: %s: %s", what, msg);
	comm_abort(2, buf);
}

/* 3 layers (dense, MoE, MoE), E routed experts, q_lora on. */
static void small_config(struct run_config *rc, int E, int moe_inter)
{
	struct model_config *m = &rc->model;

	config_defaults(rc);
	m->vocab_size = 64;
	m->hidden_size = 32;
	m->intermediate_size = 64;
	m->moe_intermediate_size = moe_inter;
	m->num_hidden_layers = 3;
	test_small_moe(m);
	m->n_routed_experts = E;
}

static struct moe_model *new_model(const struct run_config *rc, int begin, int end)
{
	char err[512];
	struct moe_model *m = model_create(&rc->model, begin, end, err, sizeof(err));

	if (!m)
		die("model_create", err);
	return m;
}

static void new_adamw(struct adamw *o, size_t n)
{
	if (adamw_init(o, n))
		die("adamw_init", "out of memory");
}

static uint64_t mix(uint64_t z)
{
	z += 0x9e3779b97f4a7c15ULL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* Moment `which` (1: exp_avg in [-1, 1), 2: exp_avg_sq in [0, 1)) of a global element. */
static float moment(int which, int param, int expert, size_t k)
{
	uint64_t h = mix(mix(mix(((uint64_t)which << 32) ^ (uint64_t)param) ^ (uint64_t)(expert + 1)) ^ k);
	float u = (float)((h >> 40) * (1.0 / 16777216.0));

	return which == 1 ? 2 * u - 1 : u;
}

/* Weights from the seed, moments from the global element, zero for buffers (they have none). */
static void fill_truth(struct moe_model *m, struct adamw *o, struct train_state *st)
{
	model_init_weights(m, SEED);
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		int El = m->expert_end - m->expert_begin;
		size_t per = p->expert_stacked ? (El ? p->numel / (size_t)El : 0) : p->numel;

		for (size_t j = 0; j < p->numel; j++) {
			int e = p->expert_stacked ? m->expert_begin + (int)(j / per) : -1;
			size_t k = p->expert_stacked ? j % per : j;
			int buffer = p->kind == PARAM_BUFFER;

			o->exp_avg[p->offset + j] = buffer ? 0 : moment(1, i, e, k);
			o->exp_avg_sq[p->offset + j] = buffer ? 0 : moment(2, i, e, k);
		}
	}
	o->step = 37;
	memset(st, 0, sizeof(*st));
	st->step = 37;
	st->tokens_seen = 37 * 4096;
	st->data_position = 1234567;
	st->data_seed = 0xfeedbeefcafef00dULL;
	for (int i = 0; i < 4; i++)
		st->rng[i] = mix((uint64_t)i + 99);
	st->elapsed_s = 3.25;
}

/* Overwrite what this rank must not be the source of in a distributed save. */
static void poison(struct moe_model *m, struct adamw *o, struct train_state *st, const struct dist *d)
{
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];

		if (d->dp_rank == 0 && (p->expert_stacked || d->rank == 0))
			continue;
		for (size_t j = 0; j < p->numel; j++)
			m->weights[p->offset + j] = o->exp_avg[p->offset + j] =
				o->exp_avg_sq[p->offset + j] = POISON;
	}
	if (d->rank != 0) {
		o->step = 999;
		st->step = st->tokens_seen = -1;
		st->data_position = st->data_seed = 7;
		st->elapsed_s = -1;
	}
}

static int same_floats(const float *a, const float *b, size_t n)
{
	return memcmp(a, b, n * sizeof(float)) == 0;
}

static int same_state(const struct train_state *a, const struct train_state *b)
{
	return a->step == b->step && a->tokens_seen == b->tokens_seen &&
	       a->data_position == b->data_position && a->data_seed == b->data_seed &&
	       !memcmp(a->rng, b->rng, sizeof(a->rng)) &&
	       !memcmp(&a->elapsed_s, &b->elapsed_s, sizeof(double));
}

/* Load path into a fresh model of experts [begin, end) and check it bit-exactly against the truth. */
static void check_load(const char *path, const struct run_config *rc, int begin, int end)
{
	struct moe_model *m = new_model(rc, begin, end), *t = new_model(rc, begin, end);
	struct adamw o, to;
	struct train_state st, tst;
	char err[1024] = "";
	int r;

	new_adamw(&o, m->n_weights);
	new_adamw(&to, t->n_weights);
	fill_truth(t, &to, &tst);
	memset(&st, 0, sizeof(st));
	r = checkpoint_load(path, m, &o, &st, err, sizeof(err));
	if (r)
		fprintf(stderr, "\n  rank %d: load [%d, %d): %s\n", rank, begin, end, err);
	CU_ASSERT_EQUAL(r, 0);
	CU_ASSERT(m->n_weights == t->n_weights);
	if (!r && m->n_weights == t->n_weights) {
		int w = same_floats(m->weights, t->weights, m->n_weights);
		int a = same_floats(o.exp_avg, to.exp_avg, o.n);
		int s = same_floats(o.exp_avg_sq, to.exp_avg_sq, o.n);

		if (!w || !a || !s)
			fprintf(stderr, "\n  rank %d: load [%d, %d) of %s differs:%s%s%s\n", rank, begin,
				end, path, w ? "" : " weights", a ? "" : " exp_avg", s ? "" : " exp_avg_sq");
		CU_ASSERT(w && a && s);
		CU_ASSERT_EQUAL(o.step, to.step);
		CU_ASSERT(same_state(&st, &tst));
	}
	adamw_free(&o);
	adamw_free(&to);
	model_free(m);
	model_free(t);
}

/* Names in dir containing ".tmp." (an unfinished or abandoned save). */
static int count_tmp(void)
{
	DIR *dp = opendir(dir);
	struct dirent *e;
	int n = 0;

	if (!dp)
		return -1;
	while ((e = readdir(dp)))
		n += strstr(e->d_name, ".tmp.") != NULL;
	closedir(dp);
	return n;
}

static int exists(const char *path)
{
	struct stat sb;

	return stat(path, &sb) == 0;
}

static void grid(struct dist *d, int ep)
{
	char err[256] = "";

	if (dist_setup(d, ep, err, sizeof(err)))
		die("dist_setup", err);
}

/* Whether every rank has ok set. */
static int all_ok(const struct dist *d, int ok)
{
	int32_t v = ok;

	if (comm_allreduce(d->world_g, &v, 1, COMM_I32, COMM_MIN))
		die("comm_allreduce", "failed");
	return v;
}

/* ---- the round trip ---- */

static void round_trip(int E, int ep)
{
	struct run_config rc;
	struct dist d;
	struct moe_model *m;
	struct adamw o;
	struct train_state st;
	char path[700], err[1024] = "";
	int begin, end, r;

	grid(&d, ep);
	small_config(&rc, E, 16);
	begin = d.ep_rank * E / ep;
	end = (d.ep_rank + 1) * E / ep;
	m = new_model(&rc, begin, end);
	new_adamw(&o, m->n_weights);
	fill_truth(m, &o, &st);
	poison(m, &o, &st, &d);
	snprintf(path, sizeof(path), "%s/w%d_ep%d_E%d.h5", dir, world, ep, E);

	r = checkpoint_save_dist(path, m, &o, &rc, &st, &d, err, sizeof(err));
	if (r)
		fprintf(stderr, "\n  rank %d: checkpoint_save_dist (world %d, ep %d, E %d): %s\n", rank,
			world, ep, E, err);
	CU_ASSERT_EQUAL(r, 0);
	CU_ASSERT(all_ok(&d, r == 0));	/* every rank succeeded */
	if (rank == 0) {
		CU_ASSERT(exists(path));
		CU_ASSERT_EQUAL(count_tmp(), 0);
		/* the whole file, as a single process with every expert sees it */
		check_load(path, &rc, 0, E);
	}
	/* every rank its own slice */
	check_load(path, &rc, begin, end);

	/* the reference: the same call without a grid is checkpoint_save of a process holding everything */
	if (rank == 0) {
		char ref[700];
		struct moe_model *full = new_model(&rc, 0, E);
		struct adamw fo;
		struct train_state fst;

		new_adamw(&fo, full->n_weights);
		fill_truth(full, &fo, &fst);
		snprintf(ref, sizeof(ref), "%s/ref_E%d.h5", dir, E);
		r = checkpoint_save_dist(ref, full, &fo, &rc, &fst, NULL, err, sizeof(err));
		if (r)
			fprintf(stderr, "\n  reference save: %s\n", err);
		CU_ASSERT_EQUAL(r, 0);
		check_load(ref, &rc, 0, E);
		adamw_free(&fo);
		model_free(full);
	}
	comm_barrier(d.world_g);
	adamw_free(&o);
	model_free(m);
	dist_free(&d);
}

static void for_each_ep(int E)
{
	for (int ep = 1; ep <= world; ep++)
		if (world % ep == 0)
			round_trip(E, ep);
}

static void test_round_trip_2(void)
{
	for_each_ep(2);
}

static void test_round_trip_4(void)
{
	for_each_ep(4);
}

static void test_round_trip_6(void)
{
	for_each_ep(6);
}

/* ---- failures ---- */

/*
 * Every rank got -1 and the same message, containing want (and "rank R: " first when world > 1), and
 * PATH is as before (absent, or loading as the truth with experts [0, E)).
 */
static void expect_failure(const struct dist *d, int r, const char *err, const char *path,
			   const char *want, int want_rank, int had_file, const struct run_config *rc)
{
	char *all = NULL, prefix[32];
	int same = 1;

	CU_ASSERT_EQUAL(r, -1);
	CU_ASSERT(!all_ok(d, r == 0));
	if (!strstr(err, want)) {
		fprintf(stderr, "\n  rank %d: the message '%s' does not contain '%s'\n", rank, err, want);
		CU_FAIL("message");
	}
	snprintf(prefix, sizeof(prefix), "rank %d: ", want_rank);
	if (want_rank >= 0 && world > 1 && strncmp(err, prefix, strlen(prefix)) != 0) {
		fprintf(stderr, "\n  rank %d: the message '%s' does not start with '%s'\n", rank, err,
			prefix);
		CU_FAIL("message names the failing rank");
	}
	/* the same message everywhere */
	if (!(all = calloc((size_t)world, 1024)))
		die("calloc", "out of memory");
	if (comm_allgather(d->world_g, err, all, 1024, COMM_BYTE))
		die("comm_allgather", "failed");
	for (int q = 1; q < world; q++)
		same &= strncmp(all, all + (size_t)q * 1024, 1024) == 0;
	CU_ASSERT(same);
	free(all);
	if (rank == 0) {
		CU_ASSERT_EQUAL(count_tmp(), 0);
		CU_ASSERT_EQUAL(exists(path), had_file);
		if (had_file)
			check_load(path, rc, 0, rc->model.n_routed_experts);
	}
	comm_barrier(d->world_g);
}

/* A save of the truth at path, the previous checkpoint a failed save must leave alone. */
static void good_save(const struct dist *d, const char *path, const struct run_config *rc)
{
	int E = rc->model.n_routed_experts;
	struct moe_model *m = new_model(rc, d->ep_rank * E / d->ep, (d->ep_rank + 1) * E / d->ep);
	struct adamw o;
	struct train_state st;
	char err[1024] = "";
	int r;

	new_adamw(&o, m->n_weights);
	fill_truth(m, &o, &st);
	r = checkpoint_save_dist(path, m, &o, rc, &st, d, err, sizeof(err));
	if (r)
		fprintf(stderr, "\n  rank %d: good save: %s\n", rank, err);
	CU_ASSERT(all_ok(d, r == 0));
	adamw_free(&o);
	model_free(m);
}

static void test_unwritable(void)
{
	static const char *const where[2] = { "no-such-dir/x.h5", "a-file/x.h5" };
	struct run_config rc;
	struct dist d;
	int ep = world % 2 ? 1 : 2;

	grid(&d, ep);
	small_config(&rc, 4, 16);
	if (rank == 0) {
		char f[700];
		FILE *fp;

		snprintf(f, sizeof(f), "%s/a-file", dir);
		fp = fopen(f, "w");
		CU_ASSERT_PTR_NOT_NULL(fp);
		if (fp)
			fclose(fp);
	}
	comm_barrier(d.world_g);
	for (int w = 0; w < 2; w++) {
		struct moe_model *m = new_model(&rc, d.ep_rank * 4 / ep, (d.ep_rank + 1) * 4 / ep);
		struct adamw o;
		struct train_state st;
		char path[700], err[1024] = "";
		int r;

		new_adamw(&o, m->n_weights);
		fill_truth(m, &o, &st);
		snprintf(path, sizeof(path), "%s/%s", dir, where[w]);
		r = checkpoint_save_dist(path, m, &o, &rc, &st, &d, err, sizeof(err));
		/* rank 0 creates the file: HDF5 names the failed call */
		expect_failure(&d, r, err, path, "H5Fcreate", 0, 0, &rc);
		CU_ASSERT_PTR_NOT_NULL(strstr(err, path));
		adamw_free(&o);
		model_free(m);
	}
	dist_free(&d);
}

static void test_bad_optim_layout(void)
{
	struct run_config rc;
	struct dist d;
	int ep = world % 2 ? 1 : 2, last = world - 1;
	struct moe_model *m;
	struct adamw o;
	struct train_state st;
	char path[700], err[1024] = "";
	int r;

	grid(&d, ep);
	small_config(&rc, 4, 16);
	snprintf(path, sizeof(path), "%s/optim_w%d.h5", dir, world);
	good_save(&d, path, &rc);
	m = new_model(&rc, d.ep_rank * 4 / ep, (d.ep_rank + 1) * 4 / ep);
	new_adamw(&o, m->n_weights - (rank == last));
	for (size_t i = 0; i < o.n; i++)
		o.exp_avg[i] = o.exp_avg_sq[i] = 1;
	memset(&st, 0, sizeof(st));
	r = checkpoint_save_dist(path, m, &o, &rc, &st, &d, err, sizeof(err));
	expect_failure(&d, r, err, path, "the optimizer state holds", last, 1, &rc);
	adamw_free(&o);
	model_free(m);
	dist_free(&d);
}

/* Rank 1 (a writer after rank 0) holds experts of another shape: its turn fails, after rank 0's. */
static void test_writer_fails_mid_save(void)
{
	struct run_config rc, other;
	struct dist d;
	struct moe_model *m;
	struct adamw o;
	struct train_state st;
	char path[700], err[1024] = "";
	int r;

	if (world % 2)	/* needs ep 2 */
		return;
	grid(&d, 2);
	small_config(&rc, 4, 16);
	small_config(&other, 4, 8);
	snprintf(path, sizeof(path), "%s/mid_w%d.h5", dir, world);
	good_save(&d, path, &rc);
	/* ep_rank 1 in every dp group, so that the replicas agree with each other */
	m = new_model(d.ep_rank == 1 ? &other : &rc, d.ep_rank * 2, d.ep_rank * 2 + 2);
	new_adamw(&o, m->n_weights);
	fill_truth(m, &o, &st);
	r = checkpoint_save_dist(path, m, &o, &rc, &st, &d, err, sizeof(err));
	expect_failure(&d, r, err, path, "the model expects", 1, 1, &rc);
	adamw_free(&o);
	model_free(m);
	dist_free(&d);
}

/* With ep 2 both writers hold all experts: refused before anything is written, same words everywhere. */
static void test_bad_slices(void)
{
	struct run_config rc;
	struct dist d;
	struct moe_model *m;
	char path[700], err[1024] = "";
	int r;

	if (world % 2)	/* needs ep 2 */
		return;
	grid(&d, 2);
	small_config(&rc, 4, 16);
	snprintf(path, sizeof(path), "%s/slices_w%d.h5", dir, world);
	m = new_model(&rc, 0, 4);
	model_init_weights(m, SEED);
	r = checkpoint_save_dist(path, m, NULL, &rc, NULL, &d, err, sizeof(err));
	expect_failure(&d, r, err, path, "not split over the expert-parallel group", -1, 0, &rc);
	model_free(m);
	dist_free(&d);
}

/* ---- setup ---- */

static void cleanup(void)
{
	char cmd[700];

	if (rank == 0 && !keep_files && dir[0]) {
		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
		if (system(cmd) != 0)
			fprintf(stderr, "cannot remove %s\n", dir);
	}
	comm_finalize();
}

void register_tests(void)
{
	static const struct test_case round[] = {
		{ "4 experts: every ep, rank 0 loads all, each rank its slice", test_round_trip_4 },
		{ "6 experts (uneven slices at ep 4)", test_round_trip_6 },
		{ "2 experts (ranks without experts at ep 3 and 4, rank 0 among them)", test_round_trip_2 },
		{ NULL, NULL },
	};
	static const struct test_case failures[] = {
		{ "unwritable directory: -1 and rank 0's message on every rank", test_unwritable },
		{ "the last rank's optimizer layout is wrong", test_bad_optim_layout },
		{ "a later writer fails mid-save: PATH untouched, no temporary", test_writer_fails_mid_save },
		{ "expert slices that do not tile the experts", test_bad_slices },
		{ NULL, NULL },
	};
	const char *env = getenv("MOE_CKPT_DIST_DIR");
	struct dist d;

	if (comm_init(NULL, NULL))
		exit(2);
	atexit(cleanup);
	world = comm_world_size();
	rank = comm_world_rank();
	grid(&d, 1);
	if (env && *env) {
		snprintf(dir, sizeof(dir), "%s", env);
		keep_files = 1;
	} else if (rank == 0) {
		snprintf(dir, sizeof(dir), "%s", test_tmpdir());
	}
	if (comm_broadcast(d.world_g, dir, sizeof(dir), COMM_BYTE, 0))
		die("comm_broadcast", "failed");
	dist_free(&d);
	add_suite("checkpoint_save_dist", round);
	add_suite("checkpoint_save_dist failures", failures);
}
