/*
 * tests/train/test_grad_sync.c - the plan of the gradient buckets that the GPU path reduces as the
 * backward goes (grad_bucket_plan): the buckets cover every parameter once, top of the model first, each
 * of about the asked size; their pieces of the packed replicated and expert spaces tile those spaces in
 * order; each bucket is ready at the earliest layer it holds (the embedding's at the very end, the output
 * head's with the last layer); and a parameter table whose order the backward does not follow gets no
 * plan.  The reduction itself is tested on the (emulated) GPU under mpirun by tests/gpu/test_dist_cuda.c.
 */
#include "harness.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "train/grad_sync.h"

static struct moe_model *make(void)
{
	struct model_config c;
	char err[256];
	test_ep_moe(&c, 24, 40, 12, 3);
	struct moe_model *m = model_create(&c, 0, c.n_routed_experts, err, sizeof(err));
	CU_ASSERT_PTR_NOT_NULL_FATAL(m);
	return m;
}

static size_t trained_bytes(const struct moe_model *m, int p0, int p1)
{
	size_t n = 0;
	for (int i = p0; i < p1; i++)
		if (m->params[i].kind != PARAM_BUFFER)
			n += sizeof(float) * m->params[i].numel;
	return n;
}

/* the plan's invariants for a cap of mb MiB; returns the number of buckets */
static int check_plan(struct moe_model *m, double mb)
{
	struct grad_sync s;
	CU_ASSERT_EQUAL_FATAL(grad_sync_init(&s, m), 0);
	CU_ASSERT_EQUAL_FATAL(grad_bucket_plan(&s, m, mb), 0);
	CU_ASSERT_FATAL(s.n_buckets > 0);
	size_t cap = (size_t)(mb * 1048576.0), rep_end = s.n_rep, exp_end = s.n_exp;
	int end = m->n_params, prev_ready = INT_MAX, L = m->cfg.num_hidden_layers;
	for (int b = 0; b < s.n_buckets; b++) {
		const struct grad_bucket *k = &s.buckets[b];
		CU_ASSERT_EQUAL(k->p_end, end);                 /* from the top down, no gap */
		CU_ASSERT(k->p_begin < k->p_end);
		CU_ASSERT(k->rep_off + k->rep_n == rep_end);   /* the packed spaces tiled in order */
		CU_ASSERT(k->exp_off + k->exp_n == exp_end);
		size_t bytes = trained_bytes(m, k->p_begin, k->p_end);
		CU_ASSERT_EQUAL(bytes, sizeof(float) * (k->rep_n + k->exp_n));
		/* at least the cap (but the last), and not one tensor more than it needed */
		if (k->p_begin > 0) {
			CU_ASSERT(bytes >= cap);
			CU_ASSERT(trained_bytes(m, k->p_begin + 1, k->p_end) < cap || !cap);
		}
		int want = INT_MAX;  /* the earliest layer it holds; -1 with the embedding, L-1 for the head */
		for (int i = k->p_begin; i < k->p_end; i++) {
			const struct param *p = &m->params[i];
			int r = p->layer >= 0 ? p->layer : (i == 0 ? -1 : L - 1);
			if (p->kind != PARAM_BUFFER && r < want)
				want = r;
		}
		CU_ASSERT_EQUAL(k->ready, want);
		CU_ASSERT(k->ready <= prev_ready);            /* complete in the order they are started */
		prev_ready = k->ready;
		end = k->p_begin;
		rep_end = k->rep_off;
		exp_end = k->exp_off;
	}
	CU_ASSERT_EQUAL(end, 0);
	CU_ASSERT_EQUAL(rep_end, 0);
	CU_ASSERT_EQUAL(exp_end, 0);
	CU_ASSERT_EQUAL(s.buckets[s.n_buckets - 1].ready, -1);  /* the embedding's comes last */
	int n = s.n_buckets;
	grad_sync_free(&s);
	return n;
}

static void test_plan_sizes(void)
{
	struct moe_model *m = make();
	size_t total = trained_bytes(m, 0, m->n_params);
	int trained = 0;
	for (int i = 0; i < m->n_params; i++)
		trained += m->params[i].kind != PARAM_BUFFER;
	CU_ASSERT_EQUAL(check_plan(m, 1e6), 1);                  /* larger than the model: one bucket */
	CU_ASSERT_EQUAL(check_plan(m, 1e-9), trained);          /* smaller than any tensor: one each */
	int mid = check_plan(m, (double)total / 5 / 1048576.0);  /* a fifth: about five */
	CU_ASSERT(mid >= 4 && mid <= 6);
	model_free(m);
}

/* a tensor the backward's order says nothing of (a layer beyond the decoder's, as an extra module
 * would add) leaves the reduction after the backward */
static void test_plan_refuses_unknown_order(void)
{
	struct moe_model *m = make();
	struct grad_sync s;
	CU_ASSERT_EQUAL_FATAL(grad_sync_init(&s, m), 0);
	int last = m->params[m->n_params - 1].layer;
	m->params[m->n_params - 1].layer = m->cfg.num_hidden_layers;
	CU_ASSERT_EQUAL(grad_bucket_plan(&s, m, 0.001), 0);
	CU_ASSERT_EQUAL(s.n_buckets, 0);
	m->params[m->n_params - 1].layer = last;
	/* a layer's tensor out of order (layer 0's between layer 2's) */
	int i = m->n_params - 3, l = m->params[i].layer;
	m->params[i].layer = 0;
	CU_ASSERT_EQUAL(grad_bucket_plan(&s, m, 0.001), 0);
	CU_ASSERT_EQUAL(s.n_buckets, 0);
	m->params[i].layer = l;
	CU_ASSERT_EQUAL(grad_bucket_plan(&s, m, 0.001), 0);
	CU_ASSERT(s.n_buckets > 0);
	grad_sync_free(&s);
	model_free(m);
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "buckets cover the model top down, each of about the cap", test_plan_sizes },
		{ "a parameter order the backward does not follow gets no plan", test_plan_refuses_unknown_order },
		{ NULL, NULL },
	};
	add_suite("gradient buckets", cases);
}
