/*
 * tests/gpu/test_dist_cuda.c - expert and data parallelism of the GPU model (SPEC 6), run by
 * tests/gpu/test_dist_cuda.sh under mpirun with MOE_TEST_EP set (one process: the (1,1) layout).
 *
 *  - the device collectives (launch/cuda/comm_device.h) against the host ones on the same data: all-reduce,
 *    broadcast, all-gather, reduce-scatter and all-to-all-v over the world, ep and dp groups;
 *  - a step of the GPU model at this (dp, ep) layout, gradients reduced on the device: every rank's loss,
 *    global norm, expert loads and every gradient it holds equal those of ONE process running the GPU model
 *    with all experts on the whole global batch (relative error <= 1e-3), and those of the CPU model
 *    (bf16 tolerance: the GPU runs its matmuls in bf16, the CPU in fp32).
 *
 * The transport is host-staged MPI, or NCCL with MOE_TEST_NCCL=1 (every rank on its own GPU: local rank
 * modulo the visible devices).  Without a CUDA device (or the backend) the suite prints SKIP and passes.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "launch/comm.h"
#include "model/model.h"
#include "train/grad_sync.h"

#ifdef MOE_HAVE_CUDA
#include "launch/cuda/comm_device.h"
#include "launch/cuda/device.h"
#include "model/cuda/model_cuda.h"
#endif

static struct dist dist;

#ifdef MOE_HAVE_CUDA
/* tiny: under the emulator every kernel runs thread by thread, and the ranks share two cores */
static const int micro_batch = 2, seq_len = 8, grad_accum = 1;

static struct model_config dist_config(void)
{
	struct model_config c;
	test_ep_moe(&c, 32, 40, 16, 2);
	return c;
}

/* ---- the collectives ---- */

static float value(int rank, size_t i)
{
	return (float)((rank + 1) * 1000 + (int)(i % 997)) * 0.25f;
}

static float *to_device(const float *h, size_t n)
{
	float *d = moe_cuda_malloc(sizeof(float) * (n + 1));
	moe_cuda_memcpy_h2d(d, h, sizeof(float) * n);
	return d;
}

/* device result == host result, exactly (the same values, small integers times 1/4) */
static int same_as_host(const float *dev, const float *host, size_t n)
{
	float *back = test_xmalloc(sizeof(float) * (n + 1));
	moe_cuda_memcpy_d2h(back, dev, sizeof(float) * n);
	int ok = !memcmp(back, host, sizeof(float) * n);
	free(back);
	return ok;
}

static void check_group(struct comm_group *g, const char *name)
{
	int n = comm_size(g), r = comm_rank(g);
	size_t count = 1003;
	float *h = test_xmalloc(sizeof(float) * count * n), *hr = test_xmalloc(sizeof(float) * count * n);
	for (size_t i = 0; i < count * n; i++)
		h[i] = value(dist.rank, i);
	float *d = to_device(h, count * n), *dr = moe_cuda_malloc(sizeof(float) * count * n);

	/* all-reduce, in place */
	memcpy(hr, h, sizeof(float) * count);
	CU_ASSERT_EQUAL(comm_allreduce(g, hr, count, COMM_F32, COMM_SUM), 0);
	CU_ASSERT_EQUAL(dcomm_allreduce(g, d, count, COMM_F32, COMM_SUM), 0);
	CU_ASSERT(same_as_host(d, hr, count));
	/* broadcast from the last rank */
	moe_cuda_memcpy_h2d(d, h, sizeof(float) * count);
	memcpy(hr, h, sizeof(float) * count);
	CU_ASSERT_EQUAL(comm_broadcast(g, hr, count, COMM_F32, n - 1), 0);
	CU_ASSERT_EQUAL(dcomm_broadcast(g, d, count, COMM_F32, n - 1), 0);
	CU_ASSERT(same_as_host(d, hr, count));
	/* all-gather */
	moe_cuda_memcpy_h2d(d, h, sizeof(float) * count);
	CU_ASSERT_EQUAL(comm_allgather(g, h, hr, count, COMM_F32), 0);
	CU_ASSERT_EQUAL(dcomm_allgather(g, d, dr, count, COMM_F32), 0);
	CU_ASSERT(same_as_host(dr, hr, count * n));
	/* reduce-scatter */
	CU_ASSERT_EQUAL(comm_reduce_scatter(g, h, hr, count, COMM_F32, COMM_SUM), 0);
	CU_ASSERT_EQUAL(dcomm_reduce_scatter(g, d, dr, count, COMM_F32, COMM_SUM), 0);
	CU_ASSERT(same_as_host(dr, hr, count));
	/* all-to-all-v: peer p gets (r + p) % 5 * 7 + 1 elements from me (so counts differ by pair) */
	int64_t *sc = test_xmalloc(sizeof(int64_t) * n), *rc = test_xmalloc(sizeof(int64_t) * n);
	int64_t tot = 0;
	for (int p = 0; p < n; p++) {
		sc[p] = (r * 3 + p) % 5 * 7 + 1;
		tot += sc[p];
	}
	CU_ASSERT_EQUAL(comm_exchange_counts(g, sc, rc), 0);
	CU_ASSERT((size_t)tot <= count * n);
	CU_ASSERT_EQUAL(comm_alltoallv(g, h, sc, hr, rc, COMM_F32), 0);
	CU_ASSERT_EQUAL(dcomm_alltoallv(g, d, sc, dr, rc, COMM_F32), 0);
	int64_t rtot = 0;
	for (int p = 0; p < n; p++)
		rtot += rc[p];
	CU_ASSERT(same_as_host(dr, hr, (size_t)rtot));
	printf("\n  rank %d: %s group (size %d) over %s: done", dist.rank, name, n, dcomm_name());
	free(sc);
	free(rc);
	moe_cuda_free(d);
	moe_cuda_free(dr);
	free(h);
	free(hr);
}

static void test_collectives(void)
{
	check_group(dist.world_g, "world");
	check_group(dist.ep_g, "ep");
	check_group(dist.dp_g, "dp");
}

/* ---- the model ---- */

struct result {
	double loss, norm;
	int64_t *load;   /* [L*E] summed over the world */
};

static void grads_ready(void *ctx, int layer)
{
	grad_sync_layer_done(ctx, layer);
}

/* one step: this rank's micro-batches (a*W + rank)*B .., loss scale 1/(A*W); GPU or CPU.  overlap: the
 * last backward reduces overlap's buckets as it goes (grad_sync_overlap_arm), NULL: none */
static double step_overlap(struct moe_model *m, struct gpu_model *g, int rank, int W, int A,
			   struct grad_sync *overlap)
{
	int B = micro_batch, T = seq_len, LE = m->cfg.num_hidden_layers * m->cfg.n_routed_experts;
	int *in = test_xmalloc(sizeof(int) * B * T), *tgt = test_xmalloc(sizeof(int) * B * T);
	int64_t *load = calloc((size_t)LE, sizeof(int64_t));
	double loss = 0;
	float scale = 1.0f / ((float)A * W);
	if (g)
		gpu_model_zero_grad(g);
	else
		model_zero_grad(m);
	for (int a = 0; a < A; a++) {
		for (int b = 0; b < B; b++)
			test_sequence((a * W + rank) * B + b, T, in + b * T, tgt + b * T, m->cfg.vocab_size);
		if (g) {
			int armed = overlap && a == A - 1 &&
				    grad_sync_overlap_arm(overlap, m, gpu_model_grads(g), &dist) == 0;
			CU_ASSERT(!overlap || a < A - 1 || armed);
			loss += gpu_model_forward(g, in, tgt, B, T) * scale;
			if (armed)
				gpu_model_on_grads_ready(g, grads_ready, overlap);
			gpu_model_backward(g, scale);
			gpu_model_on_grads_ready(g, NULL, NULL);
		} else {
			loss += model_forward(m, in, tgt, B, T) * scale;
			model_backward(m, scale);
		}
		for (int i = 0; i < LE; i++)
			load[i] += m->expert_load[i];
	}
	memcpy(m->expert_load, load, sizeof(int64_t) * LE);  /* the step's loads, for the caller */
	free(load);
	free(in);
	free(tgt);
	return loss;
}

static double step(struct moe_model *m, struct gpu_model *g, int rank, int W, int A)
{
	return step_overlap(m, g, rank, W, A, NULL);
}

static struct moe_model *make_model(int e0, int e1)
{
	struct model_config c = dist_config();
	char err[256];
	struct moe_model *m = model_create(&c, e0, e1, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	model_init_weights(m, 99);
	test_separate_routers(m, 17);
	return m;
}

/* per tensor: worst ||a - ref|| / ||ref|| over this rank's slice of the reference's tensors */
static double worst_grad_err(const struct moe_model *m, const float *grads, const struct moe_model *ref,
			     const float *ref_grads, double tol, const char *vs)
{
	double worst = 0;
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i], *q = &ref->params[i];
		if (p->kind == PARAM_BUFFER)
			continue;
		size_t skip = p->expert_stacked ? (size_t)m->expert_begin * p->shape[1] * p->shape[2] : 0;
		double e = norm_rel_err(grads + p->offset, ref_grads + q->offset + skip, p->numel);
		if (!(e <= tol))
			printf("\n  rank %d: %s: rel err %.3e vs %s", dist.rank, p->name, e, vs);
		if (!(e <= worst))
			worst = e;
	}
	return worst;
}

/*
 * bf16 0: fp32 matmuls, so the CPU routes exactly alike and every gradient matches it to fp32 summation
 * order (1e-4, test_model_cuda.c's fp32 bound); bf16 1: the trainer's bf16 matmuls, against the one-process
 * GPU run as tightly, against the CPU on the loss, and on the gradients (0.1) where the routes agree (a
 * route flipped by bf16 rounding moves a whole expert's gradient by more than a bound that would still
 * catch a bug).
 */
static void check_layout(int bf16)
{
	struct model_config c = dist_config();
	int W = dist.world, El = c.n_routed_experts / dist.ep, LE = c.num_hidden_layers * c.n_routed_experts;
	char err[256];

	/* this layout on the GPU, gradients reduced on the device */
	struct moe_model *m = make_model(dist.ep_rank * El, (dist.ep_rank + 1) * El);
	if (dist.ep > 1)
		m->ep_group = dist.ep_g;
	struct gpu_model *g = gpu_model_create(m, bf16, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(g);
	struct grad_sync sync;
	CU_ASSERT_EQUAL_FATAL(grad_sync_init(&sync, m), 0);
	double loss = step(m, g, dist.rank, W, grad_accum);
	double norm = grad_sync_reduce_device(&sync, m, gpu_model_grads(g), &dist);
	gpu_model_download_grads(g);
	CU_ASSERT_EQUAL_FATAL(comm_allreduce(dist.world_g, &loss, 1, COMM_F64, COMM_SUM), 0);
	CU_ASSERT_EQUAL_FATAL(comm_allreduce(dist.world_g, m->expert_load, (size_t)LE, COMM_I64, COMM_SUM), 0);

	/* one process, every expert, the whole global batch, on the GPU and on the CPU: computed by rank 0
	 * and broadcast (every rank running it would only repeat the same numbers) */
	struct moe_model *ref = make_model(0, c.n_routed_experts), *cpu = make_model(0, c.n_routed_experts);
	int64_t *rload = test_xmalloc(sizeof(int64_t) * LE);
	double r[4] = { 0 };  /* loss, norm of the GPU run, of the CPU run */
	if (dist.rank == 0) {
		struct gpu_model *rg = gpu_model_create(ref, bf16, err, sizeof(err));
		CU_ASSERT_PTR_NOT_NULL_FATAL(rg);
		r[0] = step(ref, rg, 0, 1, grad_accum * W);
		struct grad_sync rsync, csync;
		CU_ASSERT_EQUAL_FATAL(grad_sync_init(&rsync, ref), 0);
		r[1] = grad_sync_reduce_device(&rsync, ref, gpu_model_grads(rg), NULL);
		gpu_model_download_grads(rg);
		memcpy(rload, ref->expert_load, sizeof(int64_t) * LE);
		r[2] = step(cpu, NULL, 0, 1, grad_accum * W);
		CU_ASSERT_EQUAL_FATAL(grad_sync_init(&csync, cpu), 0);
		r[3] = grad_sync_reduce(&csync, cpu, NULL);
		grad_sync_free(&rsync);
		grad_sync_free(&csync);
		gpu_model_free(rg);
	}
	CU_ASSERT_EQUAL_FATAL(comm_broadcast(dist.world_g, r, 4, COMM_F64, 0), 0);
	CU_ASSERT_EQUAL_FATAL(comm_broadcast(dist.world_g, ref->grads, ref->n_weights, COMM_F32, 0), 0);
	CU_ASSERT_EQUAL_FATAL(comm_broadcast(dist.world_g, cpu->grads, cpu->n_weights, COMM_F32, 0), 0);
	CU_ASSERT_EQUAL_FATAL(comm_broadcast(dist.world_g, rload, (size_t)LE, COMM_I64, 0), 0);
	CU_ASSERT_EQUAL_FATAL(comm_broadcast(dist.world_g, cpu->expert_load, (size_t)LE, COMM_I64, 0), 0);
	double rloss = r[0], rnorm = r[1], closs = r[2], cnorm = r[3];

	double gerr = worst_grad_err(m, m->grads, ref, ref->grads, 1e-3, "the one-process GPU run");
	double ctol = bf16 ? INFINITY : 1e-4;
	double cerr = worst_grad_err(m, m->grads, cpu, cpu->grads, ctol, "the CPU");
	double el = fabs(loss - rloss) / fabs(rloss), en = fabs(norm - rnorm) / rnorm;
	double cl = fabs(loss - closs) / fabs(closs), cn = fabs(norm - cnorm) / cnorm;
	int gl = !memcmp(rload, m->expert_load, sizeof(int64_t) * LE);
	int cload = !memcmp(cpu->expert_load, m->expert_load, sizeof(int64_t) * LE);
	printf("\n  rank %d of %d (dp %d, ep %d, %s, %s): vs 1-process GPU: loss rel %.1e, norm rel %.1e, worst "
	       "grad rel %.1e, loads %s; vs CPU: loss rel %.1e, norm rel %.1e, worst grad rel %.1e, loads %s",
	       dist.rank, W, dist.dp, dist.ep, dcomm_name(), bf16 ? "bf16" : "fp32", el, en, gerr,
	       gl ? "equal" : "DIFFER", cl, cn, cerr, cload ? "equal" : "differ");
	CU_ASSERT(el <= 1e-3 && en <= 1e-3 && gerr <= 1e-3);
	CU_ASSERT(gl);
	if (bf16) {
		/* bf16 tolerance; a gradient bound only where no route flipped (then one flip moves a whole
		 * expert's gradient) */
		CU_ASSERT(cl <= 5e-3);
		if (cload)
			CU_ASSERT(cn <= 1e-2 && cerr <= 0.1);
	} else {
		CU_ASSERT(cl <= 1e-5 && cn <= 1e-4 && cerr <= ctol);
		CU_ASSERT(cload);
	}
	free(rload);
	grad_sync_free(&sync);
	gpu_model_free(g);
	model_free(m);
	model_free(ref);
	model_free(cpu);
}

static void test_layout_fp32(void)
{
	check_layout(0);
}

static void test_layout_bf16(void)
{
	check_layout(1);
}

/*
 * Data parallelism without expert parallelism: the buckets reduced as the backward goes (tiny ones, so
 * that every layer closes some) give the gradients and the norm of the reduction after the backward.
 */
static void test_overlapped_buckets(void)
{
	if (dist.world == 1 || dist.ep > 1) {
		printf("\n  rank %d: (dp %d, ep %d): the buckets overlap only under data parallelism alone: not run",
		       dist.rank, dist.dp, dist.ep);
		return;
	}
	struct model_config c = dist_config();
	char err[256];
	struct moe_model *m = make_model(0, c.n_routed_experts);
	struct gpu_model *g = gpu_model_create(m, 0, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(g);
	struct grad_sync plain, buck;
	CU_ASSERT_EQUAL_FATAL(grad_sync_init(&plain, m), 0);
	CU_ASSERT_EQUAL_FATAL(grad_sync_init(&buck, m), 0);
	CU_ASSERT_EQUAL_FATAL(grad_bucket_plan(&buck, m, 0.002), 0);  /* ~2 KiB: several per layer */
	CU_ASSERT(buck.n_buckets > 2 * c.num_hidden_layers);

	step(m, g, dist.rank, dist.world, grad_accum);
	double n0 = grad_sync_reduce_device(&plain, m, gpu_model_grads(g), &dist);
	gpu_model_download_grads(g);
	float *g0 = test_xmalloc(sizeof(float) * m->n_weights);
	memcpy(g0, m->grads, sizeof(float) * m->n_weights);

	step_overlap(m, g, dist.rank, dist.world, grad_accum, &buck);
	CU_ASSERT_EQUAL(buck.launched, buck.n_buckets);  /* all started by the backward itself */
	double n1 = grad_sync_reduce_device(&buck, m, gpu_model_grads(g), &dist);
	gpu_model_download_grads(g);
	double e = norm_rel_err(m->grads, g0, m->n_weights);
	printf("\n  rank %d: %d buckets reduced in the backward (%s) vs after it: grads rel %.1e, norm %.9g vs %.9g",
	       dist.rank, buck.n_buckets, dcomm_name(), e, n1, n0);
	CU_ASSERT(e <= 1e-6);
	CU_ASSERT(fabs(n1 - n0) <= 1e-6 * n0);
	free(g0);
	grad_sync_free(&plain);
	grad_sync_free(&buck);
	gpu_model_free(g);
	model_free(m);
}
#endif

static void test_skip(void)
{
	printf("\nSKIP: no CUDA device (or a build without the CUDA backend)\n");
	CU_PASS("SKIP");
}

void register_tests(void)
{
	const char *ep = getenv("MOE_TEST_EP");
	char err[512];
	if (comm_init(NULL, NULL) || dist_setup(&dist, ep ? atoi(ep) : 1, err, sizeof(err))) {
		fprintf(stderr, "test_dist_cuda: %s\n", err);
		exit(2);
	}
	atexit(comm_finalize);
	static const struct test_case skip[] = { { "skip", test_skip }, { NULL, NULL } };
#ifdef MOE_HAVE_CUDA
	static const struct test_case cases[] = {
		{ "device collectives equal the host ones", test_collectives },
		{ "layout gives the one-process GPU and the CPU loss and gradients, fp32", test_layout_fp32 },
		{ "layout gives the one-process GPU loss and gradients, bf16", test_layout_bf16 },
		{ "gradient buckets reduced in the backward equal the reduction after it", test_overlapped_buckets },
		{ NULL, NULL },
	};
	int dev = moe_cuda_device_for_rank(dist.local_rank);
	if (dev >= 0) {
		const char *nccl = getenv("MOE_TEST_NCCL");
		if (moe_cuda_init(dev) ||
		    dcomm_init(&dist, nccl && !strcmp(nccl, "1") ? "nccl" : "mpi", err, sizeof(err))) {
			fprintf(stderr, "test_dist_cuda: rank %d: %s\n", dist.rank, err);
			comm_abort(1, "test_dist_cuda: the device or its collectives could not be set up");
		}
		add_suite("distributed GPU", cases);
		return;
	}
#endif
	add_suite("distributed GPU", skip);
}
