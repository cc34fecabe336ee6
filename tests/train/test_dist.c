/*
 * tests/train/test_dist.c - data and expert parallelism give the single-process result (SPEC 6).
 * Run by test_dist.sh under mpirun with MOE_TEST_EP set: for a fixed seed and global batch, every rank's
 * loss and every gradient it holds (after the gradient reduction) equal those of one process computing
 * the whole global batch with all experts, to float32 rounding; with a multi-token-prediction depth too.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "launch/comm.h"
#include "model/model.h"
#include "train/grad_sync.h"

static struct dist dist;
static int micro_batch = 2, seq_len = 9, grad_accum = 2;

static struct model_config dist_config(void)
{
	struct model_config c;
	test_ep_moe(&c, 24, 40, 12, 3);
	return c;
}

/* one step's loss and gradients: this rank's micro-batches (a*W + r)*B .., loss scale 1/(A*W) */
static double step(struct moe_model *m, int rank, int W)
{
	int B = micro_batch, T = seq_len;
	int *in = malloc(sizeof(int) * B * T), *tgt = malloc(sizeof(int) * B * T);
	double loss = 0;
	float scale = 1.0f / ((float)grad_accum * W);
	model_zero_grad(m);
	for (int a = 0; a < grad_accum; a++) {
		for (int b = 0; b < B; b++)
			test_sequence((a * W + rank) * B + b, T, in + b * T, tgt + b * T, m->cfg.vocab_size);
		loss += model_forward(m, in, tgt, B, T) * scale;
		model_backward(m, scale);
	}
	free(in);
	free(tgt);
	return loss;
}

/* mtp: with a multi-token-prediction depth (its MoE layer's experts split like the others) */
static void check_layout(int mtp)
{
	struct model_config c = dist_config();
	char err[256];
	c.num_nextn_predict_layers = mtp;
	int W = dist.world, El = c.n_routed_experts / dist.ep;
	struct moe_model *m = model_create(&c, dist.ep_rank * El, (dist.ep_rank + 1) * El, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	if (dist.ep > 1)
		m->ep_group = dist.ep_g;
	model_init_weights(m, 99);
	m->mtp_lambda = mtp ? 0.5f : 0.0f;
	struct grad_sync sync;
	CU_ASSERT_EQUAL_FATAL(grad_sync_init(&sync, m), 0);
	double loss = step(m, dist.rank, W);
	CU_ASSERT_EQUAL_FATAL(comm_allreduce(dist.world_g, &loss, 1, COMM_F64, COMM_SUM), 0);
	double norm = grad_sync_reduce(&sync, m, &dist);

	/* the reference: one process, all experts, the same global batch as W*A micro-batches */
	struct moe_model *ref = model_create(&c, 0, c.n_routed_experts, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(ref);
	model_init_weights(ref, 99);
	ref->mtp_lambda = m->mtp_lambda;
	struct grad_sync ref_sync;
	grad_sync_init(&ref_sync, ref);
	int saved = grad_accum;
	grad_accum = saved * W;
	double ref_loss = step(ref, 0, 1);
	grad_accum = saved;
	double ref_norm = grad_sync_reduce(&ref_sync, ref, NULL);

	CU_ASSERT(fabs(loss - ref_loss) <= 1e-5 * fabs(ref_loss));
	CU_ASSERT(fabs(norm - ref_norm) <= 1e-4 * ref_norm);
	double worst = 0;
	int checked = 0;
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i], *q = &ref->params[i];
		if (p->kind == PARAM_BUFFER)
			continue;
		size_t skip = p->expert_stacked ? (size_t)m->expert_begin * p->shape[1] * p->shape[2] : 0;
		double e = rel_err(m->grads + p->offset, ref->grads + q->offset + skip, p->numel, 1e-3);
		if (e > 1e-3)
			printf("\n  rank %d: %s rel err %.3e", dist.rank, p->name, e);
		worst = e > worst ? e : worst;
		checked++;
	}
	printf("\n  rank %d of %d (dp %d, ep %d)%s: loss %.7f vs %.7f, norm %.6f vs %.6f, %d gradients, worst "
	       "rel err %.2e", dist.rank, W, dist.dp, dist.ep, mtp ? " + MTP" : "", loss, ref_loss, norm, ref_norm, checked, worst);
	CU_ASSERT(worst < 1e-3);
	CU_ASSERT(checked == m->n_params - (mc_n_layers(&c) - c.first_k_dense_replace));
	CU_ASSERT(!mtp || (m->last_mtp_loss > 0 && ref->last_mtp_loss > 0));
	grad_sync_free(&sync);
	grad_sync_free(&ref_sync);
	model_free(m);
	model_free(ref);
}

static void test_layout_matches_single_process(void)
{
	check_layout(0);
}

static void test_layout_mtp(void)
{
	check_layout(1);
}

/* the experts' loads seen over the world equal the single-process loads */
static void test_global_loads(void)
{
	struct model_config c = dist_config();
	char err[256];
	int El = c.n_routed_experts / dist.ep, L = c.num_hidden_layers, E = c.n_routed_experts;
	struct moe_model *m = model_create(&c, dist.ep_rank * El, (dist.ep_rank + 1) * El, err, sizeof(err));
	struct moe_model *ref = model_create(&c, 0, E, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	CU_ASSERT_PTR_NOT_NULL_FATAL(ref);
	if (dist.ep > 1)
		m->ep_group = dist.ep_g;
	model_init_weights(m, 5);
	model_init_weights(ref, 5);
	int B = micro_batch, T = seq_len, W = dist.world;
	int *in = malloc(sizeof(int) * B * T * W), *tgt = malloc(sizeof(int) * B * T * W);
	for (int b = 0; b < B * W; b++)
		test_sequence(b, seq_len, in + b * T, tgt + b * T, c.vocab_size);
	model_forward(m, in + dist.rank * B * T, tgt + dist.rank * B * T, B, T);
	int64_t *load = malloc(sizeof(int64_t) * L * E);
	memcpy(load, m->expert_load, sizeof(int64_t) * L * E);
	comm_allreduce(dist.world_g, load, (size_t)L * E, COMM_I64, COMM_SUM);
	model_forward(ref, in, tgt, B * W, T);
	CU_ASSERT(!memcmp(load, ref->expert_load, sizeof(int64_t) * L * E));
	free(load);
	free(in);
	free(tgt);
	model_free(m);
	model_free(ref);
}

void register_tests(void)
{
	const char *ep = getenv("MOE_TEST_EP");
	char err[256];
	if (comm_init(NULL, NULL) || dist_setup(&dist, ep ? atoi(ep) : 1, err, sizeof(err))) {
		fprintf(stderr, "test_dist: %s\n", err);
		exit(2);
	}
	atexit(comm_finalize);
	static const struct test_case cases[] = {
		{ "layout gives the single-process loss and gradients", test_layout_matches_single_process },
		{ "... with a multi-token-prediction depth", test_layout_mtp },
		{ "global expert loads", test_global_loads },
		{ NULL, NULL },
	};
	add_suite("distributed", cases);
}
