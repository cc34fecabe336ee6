/*
 * tests/model/test_cudnn_graph.c - model/cuda/cudnn_graph.c without a GPU: the attention graphs are built
 * against a fake cuDNN (a struct cudnn_api that records every descriptor and attribute), so the tensor
 * layouts over our rows, the operations, the variant pack's bindings, the plan's retry with the INT32 mask
 * index and every error path (each cuDNN call failing in turn: an error naming the step, nothing leaked)
 * are checked here; and the train.attention choice (attention_choose).  The same graphs run on cuDNN in
 * tests/gpu/test_attention_cudnn.c (hardware only).
 */
#include <float.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

#if defined(MOE_HAVE_CUDA) && defined(MOE_HAVE_CUDNN_H)

#include "model/cuda/cudnn_graph.h"
#include "model/cuda/ops_cuda.h"

/* ---- the fake cuDNN ---- */

#define FAKE_MAX 4096
#define FAKE_ATTR 24

struct fattr {
	cudnnBackendAttributeName_t name;
	int64_t n;
	int64_t v[48];  /* INT64 values, data types, modes, booleans, descriptor / pointer bits */
};

struct fdesc {
	cudnnBackendDescriptorType_t type;
	int finalized, destroyed;
	struct fattr a[FAKE_ATTR];
	int na;
};

static struct {
	struct fdesc d[FAKE_MAX];
	int n, live;
	long calls, fail_at;    /* the fail_at-th call fails (0: none) */
	int reject_float_index; /* plans of graphs whose mask index math is FLOAT do not finalize */
	int reject_plans;
	cudnnDataType_t last_index_prec;
	size_t version;
	int executed;
	struct fdesc pack;      /* the last executed variant pack */
} fk;

static struct fdesc *fd(cudnnBackendDescriptor_t d)
{
	return (struct fdesc *)d;
}

static int fail_now(void)
{
	return fk.fail_at && ++fk.calls == fk.fail_at;
}

static const struct fattr *attr(const struct fdesc *d, cudnnBackendAttributeName_t name)
{
	for (int i = 0; i < d->na; i++)
		if (d->a[i].name == name)
			return &d->a[i];
	return NULL;
}

static size_t f_version(void) { return fk.version; }
static const char *f_errstr(cudnnStatus_t st) { return st ? "FAKE_FAILURE" : "OK"; }
static void f_last(char *m, size_t n) { snprintf(m, n, "fake last error"); }

static cudnnStatus_t f_create(cudnnBackendDescriptorType_t type, cudnnBackendDescriptor_t *d)
{
	if (fail_now() || fk.n == FAKE_MAX)
		return CUDNN_STATUS_ALLOC_FAILED;
	memset(&fk.d[fk.n], 0, sizeof(fk.d[0]));
	fk.d[fk.n].type = type;
	*d = (cudnnBackendDescriptor_t)&fk.d[fk.n++];
	fk.live++;
	return CUDNN_STATUS_SUCCESS;
}

static cudnnStatus_t f_destroy(cudnnBackendDescriptor_t d)
{
	CU_ASSERT_FALSE(fd(d)->destroyed);
	if (fd(d)->type == CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)
		fk.pack = *fd(d);
	fd(d)->destroyed = 1;
	fk.live--;
	return CUDNN_STATUS_SUCCESS;
}

static cudnnStatus_t f_set(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t name,
			   cudnnBackendAttributeType_t type, int64_t n, const void *v)
{
	struct fdesc *x = fd(d);
	struct fattr *a;

	if (fail_now())
		return CUDNN_STATUS_BAD_PARAM;
	CU_ASSERT_FALSE(x->finalized);
	if (x->na == FAKE_ATTR || n > 48)
		return CUDNN_STATUS_NOT_SUPPORTED;
	a = &x->a[x->na++];
	a->name = name;
	a->n = n;
	for (int64_t i = 0; i < n; i++) {
		switch (type) {
		case CUDNN_TYPE_INT64:
			a->v[i] = ((const int64_t *)v)[i];
			break;
		case CUDNN_TYPE_BOOLEAN:
			a->v[i] = ((const bool *)v)[i];
			break;
		case CUDNN_TYPE_BACKEND_DESCRIPTOR:
		case CUDNN_TYPE_VOID_PTR:
		case CUDNN_TYPE_HANDLE:
			a->v[i] = (int64_t)(intptr_t)((void *const *)v)[i];
			break;
		default: /* the enum types: data type, pointwise mode, reduction, heuristics mode */
			a->v[i] = ((const int *)v)[i];
			break;
		}
	}
	return CUDNN_STATUS_SUCCESS;
}

static cudnnStatus_t f_finalize(cudnnBackendDescriptor_t d)
{
	struct fdesc *x = fd(d);
	const struct fattr *m;

	if (fail_now())
		return CUDNN_STATUS_BAD_PARAM;
	if (x->type == CUDNN_BACKEND_POINTWISE_DESCRIPTOR && (m = attr(x, CUDNN_ATTR_POINTWISE_MODE)) &&
	    m->v[0] == CUDNN_POINTWISE_GEN_INDEX)
		fk.last_index_prec = (cudnnDataType_t)attr(x, CUDNN_ATTR_POINTWISE_MATH_PREC)->v[0];
	if (x->type == CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR &&
	    (fk.reject_plans || (fk.reject_float_index && fk.last_index_prec == CUDNN_DATA_FLOAT)))
		return CUDNN_STATUS_NOT_SUPPORTED;
	x->finalized = 1;
	return CUDNN_STATUS_SUCCESS;
}

static cudnnStatus_t f_get(cudnnBackendDescriptor_t const d, cudnnBackendAttributeName_t name,
			   cudnnBackendAttributeType_t type, int64_t req, int64_t *n, void *v)
{
	(void)d, (void)type;
	if (fail_now())
		return CUDNN_STATUS_BAD_PARAM;
	switch (name) {
	case CUDNN_ATTR_ENGINEHEUR_RESULTS: /* three engine configs proposed */
		*n = req < 3 ? req : 3;
		if (!v)
			*n = 3;
		break;
	case CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE:
		*n = 1;
		*(int64_t *)v = 0; /* no device memory in a CPU test */
		break;
	case CUDNN_ATTR_ENGINE_GLOBAL_INDEX:
		*n = 1;
		*(int64_t *)v = 7;
		break;
	default:
		*n = 1;
		break;
	}
	return CUDNN_STATUS_SUCCESS;
}

static cudnnStatus_t f_exec(cudnnHandle_t h, cudnnBackendDescriptor_t plan, cudnnBackendDescriptor_t pack)
{
	(void)h;
	CU_ASSERT(fd(plan)->finalized);
	CU_ASSERT(fd(pack)->finalized);
	fk.executed++;
	return CUDNN_STATUS_SUCCESS;
}

static const struct cudnn_api fake_api = {
	.get_version = f_version, .error_string = f_errstr, .last_error = f_last,
	.create_desc = f_create, .destroy_desc = f_destroy, .set_attr = f_set, .get_attr = f_get,
	.finalize = f_finalize, .execute = f_exec,
};

static void fake_reset(void)
{
	memset(&fk, 0, sizeof(fk));
	fk.version = 91400;
}

static const struct cg_shape v2lite = { 2, 64, 16, 192, 128 };

/* the tensor descriptor bound to slot s (its uid in the graph's pack list) */
static const struct fdesc *tensor_of(const struct cudnn_graph *g, int slot)
{
	for (int i = 0; i < g->nio; i++) {
		if (g->io_slot[i] != slot)
			continue;
		for (int j = 0; j < fk.n; j++) {
			const struct fattr *u = attr(&fk.d[j], CUDNN_ATTR_TENSOR_UNIQUE_ID);

			if (fk.d[j].type == CUDNN_BACKEND_TENSOR_DESCRIPTOR && u && u->v[0] == g->io_uid[i])
				return &fk.d[j];
		}
	}
	return NULL;
}

static void check_tensor(const struct fdesc *t, cudnnDataType_t dt, const int64_t *dim, const int64_t *str)
{
	CU_ASSERT_PTR_NOT_NULL_FATAL(t);
	CU_ASSERT_EQUAL(attr(t, CUDNN_ATTR_TENSOR_DATA_TYPE)->v[0], dt);
	CU_ASSERT_EQUAL(attr(t, CUDNN_ATTR_TENSOR_IS_VIRTUAL)->v[0], 0);
	CU_ASSERT(t->finalized);
	for (int i = 0; i < 4; i++) {
		CU_ASSERT_EQUAL(attr(t, CUDNN_ATTR_TENSOR_DIMENSIONS)->v[i], dim[i]);
		CU_ASSERT_EQUAL(attr(t, CUDNN_ATTR_TENSOR_STRIDES)->v[i], str[i]);
	}
}

static int count_type(cudnnBackendDescriptorType_t type)
{
	int n = 0;

	for (int i = 0; i < fk.n; i++)
		n += fk.d[i].type == type && !fk.d[i].destroyed;
	return n;
}

/* every tensor's unique id differs */
static int uids_unique(void)
{
	for (int i = 0; i < fk.n; i++) {
		const struct fattr *a = attr(&fk.d[i], CUDNN_ATTR_TENSOR_UNIQUE_ID);

		for (int j = i + 1; a && j < fk.n; j++) {
			const struct fattr *b = attr(&fk.d[j], CUDNN_ATTR_TENSOR_UNIQUE_ID);

			if (b && a->v[0] == b->v[0])
				return 0;
		}
	}
	return 1;
}

static void test_forward_graph(void)
{
	static struct cudnn_graph g;
	const int64_t B = 2, T = 64, H = 16, dq = 192, dv = 128;
	const int64_t qd[4] = { B, H, T, dq }, qs[4] = { T * H * dq, dq, H * dq, 1 };
	const int64_t kd[4] = { B, H, dq, T }, ks[4] = { T * H * dq, dq, 1, H * dq };
	const int64_t vd[4] = { B, H, T, dv }, vs[4] = { T * H * dv, dv, H * dv, 1 };
	const int64_t sd[4] = { B, H, T, 1 }, ss[4] = { H * T, T, 1, 1 };

	fake_reset();
	CU_ASSERT_EQUAL_FATAL(cudnn_graph_make(&g, &fake_api, NULL, CG_ATTN_FWD, &v2lite), 0);
	/* Q K^T, scale, two GEN_INDEX, CMP_GE, SELECT, max, sub, exp, sum, log, add, div, P V */
	CU_ASSERT_EQUAL(g.nops, 14);
	CU_ASSERT_EQUAL(count_type(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR), 2);
	CU_ASSERT_EQUAL(count_type(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR), 2);
	CU_ASSERT_EQUAL(g.nio, 7); /* Q K V O stats, the scale, the mask value */
	check_tensor(tensor_of(&g, CG_Q), CUDNN_DATA_BFLOAT16, qd, qs);
	check_tensor(tensor_of(&g, CG_K), CUDNN_DATA_BFLOAT16, kd, ks);
	check_tensor(tensor_of(&g, CG_V), CUDNN_DATA_BFLOAT16, vd, vs);
	check_tensor(tensor_of(&g, CG_O), CUDNN_DATA_BFLOAT16, vd, vs);
	check_tensor(tensor_of(&g, CG_STATS), CUDNN_DATA_FLOAT, sd, ss);
	CU_ASSERT_EQUAL(attr(tensor_of(&g, CG_SCALE), CUDNN_ATTR_TENSOR_IS_BY_VALUE)->v[0], 1);
	CU_ASSERT(uids_unique());
	CU_ASSERT_EQUAL(g.engine, 7);
	CU_ASSERT_EQUAL(g.index_prec, CUDNN_DATA_FLOAT);
	CU_ASSERT_PTR_NOT_NULL(g.plan);
	CU_ASSERT(fd(g.graph)->finalized);
	CU_ASSERT_EQUAL(attr(fd(g.graph), CUDNN_ATTR_OPERATIONGRAPH_OPS)->n, 14);
	CU_ASSERT(cudnn_graph_uses(&g, CG_Q) && cudnn_graph_uses(&g, CG_SCALE));
	CU_ASSERT_FALSE(cudnn_graph_uses(&g, CG_DO) || cudnn_graph_uses(&g, CG_DQACC));
	cudnn_graph_free(&g);
	CU_ASSERT_EQUAL(fk.live, 0);
}

/* the variant pack: each uid with the caller's pointer, the constants with the graph's own values */
static void test_exec_binds(void)
{
	static struct cudnn_graph g;
	char buf[5][16];
	float scale = 0.125f;
	void *p[CG_NSLOTS] = { 0 };
	int live;

	fake_reset();
	CU_ASSERT_EQUAL_FATAL(cudnn_graph_make(&g, &fake_api, NULL, CG_ATTN_FWD, &v2lite), 0);
	live = fk.live;
	for (int s = CG_Q; s <= CG_STATS; s++)
		p[s] = buf[s];
	/* one used slot unbound: refused before cuDNN runs anything */
	CU_ASSERT_EQUAL(cudnn_graph_exec(&g, p), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(g.err, "not bound"));
	CU_ASSERT_EQUAL(fk.executed, 0);
	p[CG_SCALE] = &scale;
	CU_ASSERT_EQUAL_FATAL(cudnn_graph_exec(&g, p), 0);
	CU_ASSERT_EQUAL(fk.executed, 1);
	CU_ASSERT_EQUAL(fk.live, live); /* the pack is destroyed after the run */
	{
		const struct fattr *ids = attr(&fk.pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS);
		const struct fattr *ptr = attr(&fk.pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS);
		int consts = 0;

		CU_ASSERT_PTR_NOT_NULL_FATAL(ids);
		CU_ASSERT_PTR_NOT_NULL_FATAL(ptr);
		CU_ASSERT_EQUAL(ids->n, 7);
		for (int i = 0; i < g.nio; i++) {
			void *got = (void *)(intptr_t)ptr->v[i];

			CU_ASSERT_EQUAL(ids->v[i], g.io_uid[i]);
			if (g.io_slot[i] >= 0) {
				CU_ASSERT_PTR_EQUAL(got, p[g.io_slot[i]]);
			} else {
				CU_ASSERT_EQUAL(*(float *)got, -FLT_MAX);
				consts++;
			}
		}
		CU_ASSERT_EQUAL(consts, 1);
	}
	cudnn_graph_free(&g);
	CU_ASSERT_EQUAL(fk.live, 0);
}

static void test_backward_graph(void)
{
	static struct cudnn_graph g;
	const int64_t B = 2, T = 64, H = 16, dq = 192;
	const int64_t ad[4] = { B, H, T, dq }, as[4] = { H * T * dq, T * dq, dq, 1 };

	fake_reset();
	CU_ASSERT_EQUAL_FATAL(cudnn_graph_make(&g, &fake_api, NULL, CG_ATTN_BWD, &v2lite), 0);
	/* 13 in, out and scratch tensors (+ scale, one, the mask value) */
	CU_ASSERT_EQUAL(g.nio, 14);
	for (int s = 0; s < CG_NSLOTS; s++)
		CU_ASSERT(cudnn_graph_uses(&g, s));
	check_tensor(tensor_of(&g, CG_DQACC), CUDNN_DATA_FLOAT, ad, as);
	CU_ASSERT_EQUAL(count_type(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR), 5);
	CU_ASSERT_EQUAL(count_type(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR), 3);
	CU_ASSERT_EQUAL(g.clear_dqacc, 0);
	CU_ASSERT(uids_unique());
	cudnn_graph_free(&g);
	fk.version = 90500; /* before 9.6 the accumulator is ours to zero */
	CU_ASSERT_EQUAL_FATAL(cudnn_graph_make(&g, &fake_api, NULL, CG_ATTN_BWD, &v2lite), 0);
	CU_ASSERT_EQUAL(g.clear_dqacc, 1);
	cudnn_graph_free(&g);
	CU_ASSERT_EQUAL(fk.live, 0);
}

/* no plan with the FLOAT mask index: the INT32 one is tried; no plan at all: both failures reported */
static void test_plan_retry(void)
{
	static struct cudnn_graph g;

	fake_reset();
	fk.reject_float_index = 1;
	CU_ASSERT_EQUAL(cudnn_graph_make(&g, &fake_api, NULL, CG_ATTN_FWD, &v2lite), 0);
	CU_ASSERT_EQUAL(g.index_prec, CUDNN_DATA_INT32);
	cudnn_graph_free(&g);
	fk.reject_plans = 1;
	CU_ASSERT_EQUAL(cudnn_graph_make(&g, &fake_api, NULL, CG_ATTN_BWD, &v2lite), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(g.err, "FALLBACK"));
	CU_ASSERT_PTR_NOT_NULL(strstr(g.err, "INT32"));
	CU_ASSERT_PTR_NOT_NULL(strstr(g.err, "FAKE_FAILURE"));
	cudnn_graph_free(&g);
	CU_ASSERT_EQUAL(fk.live, 0);
}

/*
 * Each cuDNN call of building and planning fails in turn.  While building, every failure must end it: -1
 * and a message with cuDNN's status.  While planning, a failure may be routed around (heuristics A fails,
 * FALLBACK plans; the engine index is informational), but the result is either a finalized plan or -1 with
 * the message.  Nothing leaks either way.
 */
static void test_every_failure(void)
{
	static struct cudnn_graph g;
	int bad = 0;

	for (int kind = CG_ATTN_FWD; kind <= CG_ATTN_BWD; kind++) {
		long build_calls, total;

		fake_reset();
		fk.fail_at = -1; /* count only */
		CU_ASSERT_EQUAL(cudnn_graph_build(&g, &fake_api, NULL, kind, &v2lite, 0), 0);
		build_calls = fk.calls;
		CU_ASSERT_EQUAL(cudnn_graph_plan(&g), 0);
		total = fk.calls;
		cudnn_graph_free(&g);
		CU_ASSERT(build_calls > 100 && total > build_calls);
		for (long n = 1; n <= total; n++) {
			int rc;

			fake_reset();
			fk.fail_at = n;
			rc = cudnn_graph_build(&g, &fake_api, NULL, kind, &v2lite, 0);
			if (n <= build_calls)
				bad += rc == 0;
			else if (rc == 0)
				rc = cudnn_graph_plan(&g);
			if (rc)
				bad += !strstr(g.err, "FAKE_FAILURE");
			else
				bad += !g.plan || !fd(g.plan)->finalized;
			cudnn_graph_free(&g);
			bad += fk.live != 0;
		}
	}
	CU_ASSERT_EQUAL(bad, 0);
}

static void test_unsupported_shape(void)
{
	static struct cudnn_graph g;
	const struct cg_shape small = { 2, 16, 4, 12, 12 }, big = { 1, 8, 2, 264, 128 };

	fake_reset();
	CU_ASSERT_PTR_NULL(cudnn_graph_unsupported(&v2lite));
	CU_ASSERT_PTR_NOT_NULL(cudnn_graph_unsupported(&small));
	CU_ASSERT_PTR_NOT_NULL(cudnn_graph_unsupported(&big));
	CU_ASSERT_EQUAL(cudnn_graph_make(&g, &fake_api, NULL, CG_ATTN_FWD, &small), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(g.err, "multiples of 8"));
	CU_ASSERT_EQUAL(fk.n, 0);
	cudnn_graph_free(&g);
}

static void test_choose(void)
{
	CU_ASSERT_EQUAL(attention_choose("own", NULL), 0);
	CU_ASSERT_EQUAL(attention_choose("own", "no library"), 0);
	CU_ASSERT_EQUAL(attention_choose("auto", NULL), 1);
	CU_ASSERT_EQUAL(attention_choose("auto", "no library"), 0);
	CU_ASSERT_EQUAL(attention_choose("cudnn", NULL), 1);
	CU_ASSERT_EQUAL(attention_choose("cudnn", "no library"), -1);
	CU_ASSERT_EQUAL(attention_choose("flash", NULL), -1);
	/* before any configuration our kernel runs */
	CU_ASSERT_STRING_EQUAL(attention_cuda_impl(), "own");
}

static void test_load_errors(void)
{
	struct cudnn_api api;
	char err[256] = "";

	CU_ASSERT_EQUAL(cudnn_api_load(&api, "/nonexistent/libcudnn.so.9", err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "/nonexistent/libcudnn.so.9"));
	CU_ASSERT_PTR_NULL(api.lib);
	/* a library that is not cuDNN: the first missing entry point is named */
	CU_ASSERT_EQUAL(cudnn_api_load(&api, "libm.so.6", err, sizeof(err)), -1);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "cudnnGetVersion"));
	CU_ASSERT_PTR_NULL(api.lib);
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "forward graph: layouts over our rows, 14 ops, planned", test_forward_graph },
		{ "variant pack binds the caller's pointers", test_exec_binds },
		{ "backward graph: 5 products, fp32 dQ accumulator", test_backward_graph },
		{ "no plan with FLOAT mask index: INT32 retried", test_plan_retry },
		{ "every failing cuDNN call: an error, nothing leaked", test_every_failure },
		{ "unsupported head dims refused before cuDNN", test_unsupported_shape },
		{ "train.attention choice", test_choose },
		{ "loading errors name the library and symbol", test_load_errors },
		{ NULL, NULL },
	};

	add_suite("cudnn graph", cases);
}

#else /* no CUDA backend or no cuDNN headers in this build: nothing of cudnn_graph.c to test */

static void test_absent(void)
{
	fprintf(stderr, "[skipped: this build has no cuDNN headers] ");
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "cudnn_graph not in this build", test_absent },
		{ NULL, NULL },
	};

	add_suite("cudnn graph", cases);
}

#endif
