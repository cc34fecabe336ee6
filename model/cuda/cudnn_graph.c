/*
 * model/cuda/cudnn_graph.c - cuDNN's backend API through dlopen: the causal attention graphs, their plans
 * and runs (see cudnn_graph.h).  The graph pattern is cudnn-frontend's lowering of its SDPA nodes as of
 * cuDNN 9.19, written node by node against the documented backend descriptors; measured on an H100 with
 * cuDNN 9.14 by bench/bench_attention (bench/RESULTS.md).
 */
#ifdef MOE_HAVE_CUDNN_H
#define _POSIX_C_SOURCE 200809L

#include "model/cuda/cudnn_graph.h"

#include <dlfcn.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launch/cuda/device.h"

/* ---- loading ------------------------------------------------------------------------------------- */

/* *slot = dlsym(lib, name); a data pointer converted to a function pointer, as POSIX allows dlsym's */
static int sym(void *lib, const char *name, void *slot, char *err, size_t errlen)
{
	void *p = dlsym(lib, name);

	if (!p) {
		snprintf(err, errlen, "cuDNN: symbol %s missing (%s)", name, dlerror());
		return -1;
	}
	memcpy(slot, &p, sizeof(p));
	return 0;
}

int cudnn_api_load(struct cudnn_api *api, const char *path, char *err, size_t errlen)
{
	const char *env = getenv("MOE_CUDNN_LIB");

	memset(api, 0, sizeof(*api));
	if (!path)
		path = env && *env ? env : "libcudnn.so.9";
	api->lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!api->lib) {
		snprintf(err, errlen, "cannot load %s: %s", path, dlerror());
		return -1;
	}
	if (sym(api->lib, "cudnnGetVersion", &api->get_version, err, errlen) ||
	    sym(api->lib, "cudnnGetErrorString", &api->error_string, err, errlen) ||
	    sym(api->lib, "cudnnGetLastErrorString", &api->last_error, err, errlen) ||
	    sym(api->lib, "cudnnCreate", &api->create, err, errlen) ||
	    sym(api->lib, "cudnnDestroy", &api->destroy, err, errlen) ||
	    sym(api->lib, "cudnnSetStream", &api->set_stream, err, errlen) ||
	    sym(api->lib, "cudnnBackendCreateDescriptor", &api->create_desc, err, errlen) ||
	    sym(api->lib, "cudnnBackendDestroyDescriptor", &api->destroy_desc, err, errlen) ||
	    sym(api->lib, "cudnnBackendSetAttribute", &api->set_attr, err, errlen) ||
	    sym(api->lib, "cudnnBackendGetAttribute", &api->get_attr, err, errlen) ||
	    sym(api->lib, "cudnnBackendFinalize", &api->finalize, err, errlen) ||
	    sym(api->lib, "cudnnBackendExecute", &api->execute, err, errlen)) {
		cudnn_api_unload(api);
		return -1;
	}
	/* the backend API as used here is cuDNN 9's */
	if (api->get_version() < 90000) {
		snprintf(err, errlen, "%s is cuDNN %zu, older than 9.0", path, api->get_version());
		cudnn_api_unload(api);
		return -1;
	}
	return 0;
}

void cudnn_api_unload(struct cudnn_api *api)
{
	if (api->lib)
		dlclose(api->lib);
	memset(api, 0, sizeof(*api));
}

/* ---- errors -------------------------------------------------------------------------------------- */

/* Record a failed cuDNN call: the step, the status, the call, cuDNN's own last message. */
static int fail(struct cudnn_graph *g, cudnnStatus_t st, const char *call)
{
	char last[384] = "";

	if (g->api->last_error)
		g->api->last_error(last, sizeof(last));
	for (char *p = last; *p; p++)
		if (*p == '\n' || *p == '\r' || *p == '\t')
			*p = ' ';
	snprintf(g->err, sizeof(g->err), "%s: %s (%d) in %.64s%s%.300s", g->step,
		 g->api->error_string ? g->api->error_string(st) : "cuDNN error", (int)st, call,
		 last[0] ? "; cudnn: " : "", last);
	return -1;
}

static int fail_msg(struct cudnn_graph *g, const char *msg)
{
	snprintf(g->err, sizeof(g->err), "%s: %s", g->step, msg);
	return -1;
}

#define TRY(call)                                        \
	do {                                             \
		cudnnStatus_t st_ = (call);              \
		if (st_ != CUDNN_STATUS_SUCCESS)         \
			return fail(g, st_, #call);      \
	} while (0)

/* ---- descriptors --------------------------------------------------------------------------------- */

static int cg_new(struct cudnn_graph *g, cudnnBackendDescriptorType_t type, cudnnBackendDescriptor_t *d)
{
	if (g->nowned == CG_MAX_DESC)
		return fail_msg(g, "too many descriptors");
	TRY(g->api->create_desc(type, d));
	g->owned[g->nowned++] = *d;
	return 0;
}

static cudnnStatus_t set_d(struct cudnn_graph *g, cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a,
			   cudnnBackendDescriptor_t v)
{
	return g->api->set_attr(d, a, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &v);
}

static cudnnStatus_t set_i64(struct cudnn_graph *g, cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a,
			     int64_t n, const int64_t *v)
{
	return g->api->set_attr(d, a, CUDNN_TYPE_INT64, n, v);
}

static cudnnStatus_t set_dt(struct cudnn_graph *g, cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a,
			    cudnnDataType_t v)
{
	return g->api->set_attr(d, a, CUDNN_TYPE_DATA_TYPE, 1, &v);
}

static cudnnStatus_t set_bool(struct cudnn_graph *g, cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a,
			      bool v)
{
	return g->api->set_attr(d, a, CUDNN_TYPE_BOOLEAN, 1, &v);
}

enum { T_IO, T_VIRTUAL, T_BY_VALUE };

/* A 4-d tensor; T_IO and T_BY_VALUE ones enter the variant pack bound to slot (< 0: a constant). */
static int cg_tensor(struct cudnn_graph *g, cudnnDataType_t dt, const int64_t *dim, const int64_t *str,
		     int kind, int slot, cudnnBackendDescriptor_t *t)
{
	const int64_t align = 16, uid = ++g->uid;

	if (kind != T_VIRTUAL && g->nio == CG_MAX_IO)
		return fail_msg(g, "too many bound tensors");
	if (cg_new(g, CUDNN_BACKEND_TENSOR_DESCRIPTOR, t))
		return -1;
	TRY(set_dt(g, *t, CUDNN_ATTR_TENSOR_DATA_TYPE, dt));
	TRY(set_i64(g, *t, CUDNN_ATTR_TENSOR_DIMENSIONS, 4, dim));
	TRY(set_i64(g, *t, CUDNN_ATTR_TENSOR_STRIDES, 4, str));
	TRY(set_i64(g, *t, CUDNN_ATTR_TENSOR_UNIQUE_ID, 1, &uid));
	TRY(set_i64(g, *t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, 1, &align));
	TRY(set_bool(g, *t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, kind == T_VIRTUAL));
	if (kind == T_BY_VALUE)
		TRY(set_bool(g, *t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, true));
	TRY(g->api->finalize(*t));
	if (kind != T_VIRTUAL) {
		g->io_uid[g->nio] = uid;
		g->io_slot[g->nio++] = slot;
	}
	return 0;
}

static int cg_virt(struct cudnn_graph *g, cudnnDataType_t dt, const int64_t *dim, const int64_t *str,
		   cudnnBackendDescriptor_t *t)
{
	return cg_tensor(g, dt, dim, str, T_VIRTUAL, 0, t);
}

static int cg_io(struct cudnn_graph *g, cudnnDataType_t dt, const int64_t *dim, const int64_t *str, int slot,
		 cudnnBackendDescriptor_t *t)
{
	return cg_tensor(g, dt, dim, str, T_IO, slot, t);
}

enum { K_ONE, K_NEG_BIG };

/* a by-value fp32 scalar: a constant of the graph (which >= 0) or the caller's CG_SCALE (which < 0) */
static int cg_scalar(struct cudnn_graph *g, int which, cudnnBackendDescriptor_t *t)
{
	static const int64_t ones[4] = { 1, 1, 1, 1 };

	return cg_tensor(g, CUDNN_DATA_FLOAT, ones, ones, T_BY_VALUE, which >= 0 ? -1 - which : CG_SCALE, t);
}

static int cg_op_done(struct cudnn_graph *g, cudnnBackendDescriptor_t op)
{
	if (g->nops == CG_MAX_OPS)
		return fail_msg(g, "too many operations");
	TRY(g->api->finalize(op));
	g->ops[g->nops++] = op;
	return 0;
}

/* y = mode(x, b, t) computed in prec; b and t may be NULL; axis >= 0 only for GEN_INDEX. */
static int cg_pw(struct cudnn_graph *g, cudnnPointwiseMode_t mode, cudnnDataType_t prec, int64_t axis,
		 cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t t,
		 cudnnBackendDescriptor_t y)
{
	cudnnBackendDescriptor_t pw, op;

	if (cg_new(g, CUDNN_BACKEND_POINTWISE_DESCRIPTOR, &pw))
		return -1;
	TRY(g->api->set_attr(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode));
	TRY(set_dt(g, pw, CUDNN_ATTR_POINTWISE_MATH_PREC, prec));
	if (axis >= 0)
		TRY(set_i64(g, pw, CUDNN_ATTR_POINTWISE_AXIS, 1, &axis));
	TRY(g->api->finalize(pw));
	if (cg_new(g, CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, &op))
		return -1;
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw));
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x));
	if (b)
		TRY(set_d(g, op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b));
	if (t)
		TRY(set_d(g, op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t));
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y));
	return cg_op_done(g, op);
}

/* y = mode(x[, b]) in fp32 */
static int cg_pw2(struct cudnn_graph *g, cudnnPointwiseMode_t mode, cudnnBackendDescriptor_t x,
		  cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t y)
{
	return cg_pw(g, mode, CUDNN_DATA_FLOAT, -1, x, b, NULL, y);
}

static int cg_matmul(struct cudnn_graph *g, cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b,
		     cudnnBackendDescriptor_t c)
{
	cudnnBackendDescriptor_t mm, op;

	if (cg_new(g, CUDNN_BACKEND_MATMUL_DESCRIPTOR, &mm))
		return -1;
	TRY(set_dt(g, mm, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT));
	TRY(g->api->finalize(mm));
	if (cg_new(g, CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, &op))
		return -1;
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, a));
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, b));
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, c));
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_MATMUL_DESC, mm));
	return cg_op_done(g, op);
}

/* y = reduce(x) over the axes where y has extent 1, in fp32 */
static int cg_reduce(struct cudnn_graph *g, cudnnReduceTensorOp_t mode, cudnnBackendDescriptor_t x,
		     cudnnBackendDescriptor_t y)
{
	cudnnBackendDescriptor_t rd, op;

	if (cg_new(g, CUDNN_BACKEND_REDUCTION_DESCRIPTOR, &rd))
		return -1;
	TRY(g->api->set_attr(rd, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode));
	TRY(set_dt(g, rd, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_DATA_FLOAT));
	TRY(g->api->finalize(rd));
	if (cg_new(g, CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, &op))
		return -1;
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x));
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y));
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, rd));
	return cg_op_done(g, op);
}

/* y = x seen through y's dims and strides (the transposes of the backward) */
static int cg_reshape(struct cudnn_graph *g, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y)
{
	cudnnBackendDescriptor_t op;

	if (cg_new(g, CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR, &op))
		return -1;
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x));
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y));
	return cg_op_done(g, op);
}

/* ---- tensor layouts over our rows ----------------------------------------------------------------- */

struct lay {
	int64_t q[4], qs[4];   /* Q, K, dQ, dK [B, H, T, dq] over our [B*T, H, dq] rows */
	int64_t kt[4], kts[4]; /* K^T [B, H, dq, T] (same memory) */
	int64_t v[4], vs[4];   /* V, O, dO, dV [B, H, T, dv] */
	int64_t vt[4], vts[4]; /* V^T */
	int64_t s[4], ss[4];   /* scores [B, H, T, T], packed */
	int64_t sts[4];        /* the scores transposed: dims s, strides sts */
	int64_t r[4], rs[4];   /* row statistics [B, H, T, 1] == our lse [B, H, T] */
	int64_t qps[4];        /* [B, H, T, dq] packed (the fp32 dQ accumulator) */
	int64_t dos[4];        /* dO * O, strides as cudnn-frontend gives them */
};

static void set4(int64_t *d, int64_t a, int64_t b, int64_t c, int64_t e)
{
	d[0] = a;
	d[1] = b;
	d[2] = c;
	d[3] = e;
}

static void lay_init(struct lay *l, const struct cg_shape *s)
{
	const int64_t B = s->B, T = s->T, H = s->H, DQ = s->dq, DV = s->dv;

	set4(l->q, B, H, T, DQ);
	set4(l->qs, T * H * DQ, DQ, H * DQ, 1);
	set4(l->kt, B, H, DQ, T);
	set4(l->kts, T * H * DQ, DQ, 1, H * DQ);
	set4(l->v, B, H, T, DV);
	set4(l->vs, T * H * DV, DV, H * DV, 1);
	set4(l->vt, B, H, DV, T);
	set4(l->vts, T * H * DV, DV, 1, H * DV);
	set4(l->s, B, H, T, T);
	set4(l->ss, H * T * T, T * T, T, 1);
	set4(l->sts, H * T * T, T * T, 1, T);
	set4(l->r, B, H, T, 1);
	set4(l->rs, H * T, T, 1, 1);
	set4(l->qps, H * T * DQ, T * DQ, DQ, 1);
	set4(l->dos, H * T * DV, T * DV, H * DV, 1);
}

#define F32 CUDNN_DATA_FLOAT
#define BF16 CUDNN_DATA_BFLOAT16

/* ---- the composite causal graphs ------------------------------------------------------------------ */

/* y = row >= col ? x : -FLT_MAX over the scores x [B, H, T, T] */
static int cg_causal(struct cudnn_graph *g, const struct lay *l, cudnnBackendDescriptor_t x,
		     cudnnBackendDescriptor_t *y)
{
	cudnnBackendDescriptor_t row, col, keep, big;

	if (cg_virt(g, CUDNN_DATA_INT32, l->s, l->ss, &row) || cg_virt(g, CUDNN_DATA_INT32, l->s, l->ss, &col) ||
	    cg_virt(g, CUDNN_DATA_BOOLEAN, l->s, l->ss, &keep) || cg_virt(g, F32, l->s, l->ss, y) ||
	    cg_scalar(g, K_NEG_BIG, &big))
		return -1;
	if (cg_pw(g, CUDNN_POINTWISE_GEN_INDEX, g->index_prec, 2, x, NULL, NULL, row) ||
	    cg_pw(g, CUDNN_POINTWISE_GEN_INDEX, g->index_prec, 3, x, NULL, NULL, col) ||
	    cg_pw(g, CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, -1, row, col, NULL, keep))
		return -1;
	return cg_pw(g, CUDNN_POINTWISE_BINARY_SELECT, F32, -1, x, big, keep, *y);
}

/* stats = max + log(sum exp(x - max)), p = exp(x - max) / sum (bf16, for the P V product) */
static int cg_softmax(struct cudnn_graph *g, const struct lay *l, cudnnBackendDescriptor_t x,
		      cudnnBackendDescriptor_t stats, cudnnBackendDescriptor_t *p)
{
	cudnnBackendDescriptor_t m, xm, e, z, lz;

	if (cg_virt(g, F32, l->r, l->rs, &m) || cg_virt(g, F32, l->s, l->ss, &xm) ||
	    cg_virt(g, F32, l->s, l->ss, &e) || cg_virt(g, F32, l->r, l->rs, &z) ||
	    cg_virt(g, F32, l->r, l->rs, &lz) || cg_virt(g, BF16, l->s, l->ss, p))
		return -1;
	if (cg_reduce(g, CUDNN_REDUCE_TENSOR_MAX, x, m) || cg_pw2(g, CUDNN_POINTWISE_SUB, x, m, xm) ||
	    cg_pw2(g, CUDNN_POINTWISE_EXP, xm, NULL, e) || cg_reduce(g, CUDNN_REDUCE_TENSOR_ADD, e, z) ||
	    cg_pw2(g, CUDNN_POINTWISE_LOG, z, NULL, lz) || cg_pw2(g, CUDNN_POINTWISE_ADD, m, lz, stats))
		return -1;
	return cg_pw2(g, CUDNN_POINTWISE_DIV, e, z, *p);
}

/* O = softmax(causal(Q K^T * scale)) V, stats = row log-sum-exp */
static int build_fwd(struct cudnn_graph *g, const struct lay *l)
{
	cudnnBackendDescriptor_t q, kt, v, o, st, sc, s, s1, s2, p;

	g->step = "build the causal forward graph";
	if (cg_io(g, BF16, l->q, l->qs, CG_Q, &q) || cg_io(g, BF16, l->kt, l->kts, CG_K, &kt) ||
	    cg_io(g, BF16, l->v, l->vs, CG_V, &v) || cg_io(g, BF16, l->v, l->vs, CG_O, &o) ||
	    cg_io(g, F32, l->r, l->rs, CG_STATS, &st) || cg_scalar(g, -1, &sc))
		return -1;
	if (cg_virt(g, F32, l->s, l->ss, &s) || cg_matmul(g, q, kt, s) || cg_virt(g, F32, l->s, l->ss, &s1) ||
	    cg_pw2(g, CUDNN_POINTWISE_MUL, s, sc, s1) || cg_causal(g, l, s1, &s2) || cg_softmax(g, l, s2, st, &p))
		return -1;
	return cg_matmul(g, p, v, o);
}

/* the backward's inputs and outputs */
struct bwd_t {
	cudnnBackendDescriptor_t q, kt, vt, o, dO, st, dq, dk, dv, ssum, dqacc, sc;
};

static int bwd_tensors(struct cudnn_graph *g, const struct lay *l, struct bwd_t *t)
{
	return cg_io(g, BF16, l->q, l->qs, CG_Q, &t->q) || cg_io(g, BF16, l->kt, l->kts, CG_K, &t->kt) ||
	       cg_io(g, BF16, l->vt, l->vts, CG_V, &t->vt) || cg_io(g, BF16, l->v, l->vs, CG_O, &t->o) ||
	       cg_io(g, BF16, l->v, l->vs, CG_DO, &t->dO) || cg_io(g, F32, l->r, l->rs, CG_STATS, &t->st) ||
	       cg_io(g, BF16, l->q, l->qs, CG_DQ, &t->dq) || cg_io(g, BF16, l->q, l->qs, CG_DK, &t->dk) ||
	       cg_io(g, BF16, l->v, l->vs, CG_DV, &t->dv) || cg_io(g, F32, l->r, l->rs, CG_SSUM, &t->ssum) ||
	       cg_io(g, F32, l->q, l->qps, CG_DQACC, &t->dqacc) || cg_scalar(g, -1, &t->sc) ? -1 : 0;
}

/* ssum = rowsum(dO * O) * 1 (the frontend's dropout-free form) */
static int bwd_rowsum(struct cudnn_graph *g, const struct lay *l, const struct bwd_t *t)
{
	cudnnBackendDescriptor_t doo, d, one;

	if (cg_virt(g, F32, l->v, l->dos, &doo) || cg_virt(g, F32, l->r, l->rs, &d) || cg_scalar(g, K_ONE, &one))
		return -1;
	if (cg_pw2(g, CUDNN_POINTWISE_MUL, t->dO, t->o, doo) || cg_reduce(g, CUDNN_REDUCE_TENSOR_ADD, doo, d))
		return -1;
	return cg_pw2(g, CUDNN_POINTWISE_MUL, d, one, t->ssum);
}

/* p = exp(causal(Q K^T * scale - stats)), fp32 */
static int bwd_probs(struct cudnn_graph *g, const struct lay *l, const struct bwd_t *t, cudnnBackendDescriptor_t *p)
{
	cudnnBackendDescriptor_t s, s1, s2, s3;

	if (cg_virt(g, F32, l->s, l->ss, &s) || cg_virt(g, F32, l->s, l->ss, &s1) ||
	    cg_virt(g, F32, l->s, l->ss, &s2) || cg_virt(g, F32, l->s, l->ss, p))
		return -1;
	if (cg_matmul(g, t->q, t->kt, s) || cg_pw2(g, CUDNN_POINTWISE_MUL, s, t->sc, s1) ||
	    cg_pw2(g, CUDNN_POINTWISE_SUB, s1, t->st, s2) || cg_causal(g, l, s2, &s3))
		return -1;
	return cg_pw2(g, CUDNN_POINTWISE_EXP, s3, NULL, *p);
}

/* dV = P^T dO; dS = P (dO V^T - ssum) * scale, fp32 */
static int bwd_dv_ds(struct cudnn_graph *g, const struct lay *l, const struct bwd_t *t, cudnnBackendDescriptor_t p,
		     cudnnBackendDescriptor_t *ds)
{
	cudnnBackendDescriptor_t pt, dp, dp1, ds0;

	if (cg_virt(g, BF16, l->s, l->sts, &pt) || cg_virt(g, F32, l->s, l->ss, &dp) ||
	    cg_virt(g, F32, l->s, l->ss, &dp1) || cg_virt(g, F32, l->s, l->ss, &ds0) ||
	    cg_virt(g, F32, l->s, l->ss, ds))
		return -1;
	if (cg_reshape(g, p, pt) || cg_matmul(g, pt, t->dO, t->dv) || cg_matmul(g, t->dO, t->vt, dp) ||
	    cg_pw2(g, CUDNN_POINTWISE_SUB, dp, t->ssum, dp1) || cg_pw2(g, CUDNN_POINTWISE_MUL, dp1, p, ds0))
		return -1;
	return cg_pw2(g, CUDNN_POINTWISE_MUL, ds0, t->sc, *ds);
}

/* dK = dS^T Q; dQ = bf16(dQacc = dS K) */
static int bwd_dk_dq(struct cudnn_graph *g, const struct lay *l, const struct bwd_t *t, cudnnBackendDescriptor_t ds)
{
	cudnnBackendDescriptor_t dst, k;

	if (cg_virt(g, BF16, l->s, l->sts, &dst) || cg_virt(g, F32, l->q, l->qs, &k))
		return -1;
	if (cg_reshape(g, ds, dst) || cg_matmul(g, dst, t->q, t->dk) || cg_reshape(g, t->kt, k) ||
	    cg_matmul(g, ds, k, t->dqacc))
		return -1;
	return cg_pw2(g, CUDNN_POINTWISE_IDENTITY, t->dqacc, NULL, t->dq);
}

static int build_bwd(struct cudnn_graph *g, const struct lay *l)
{
	struct bwd_t t;
	cudnnBackendDescriptor_t p, ds;

	g->step = "build the causal backward graph";
	if (bwd_tensors(g, l, &t) || bwd_rowsum(g, l, &t) || bwd_probs(g, l, &t, &p) ||
	    bwd_dv_ds(g, l, &t, p, &ds) || bwd_dk_dq(g, l, &t, ds))
		return -1;
	/* the frontend zeroes the accumulator itself before 9.6 */
	g->clear_dqacc = g->api->get_version() < 90600;
	return 0;
}

/* ---- the fused SDPA operations (no mask in 9.19) ------------------------------------------------- */

static int build_sdpa_fwd(struct cudnn_graph *g, const struct lay *l)
{
	g->step = "build the fused SDPA_FWD op";
#if CUDNN_VERSION >= 91301
	cudnnBackendDescriptor_t q, k, v, o, st, sc, op;

	if (cg_io(g, BF16, l->q, l->qs, CG_Q, &q) || cg_io(g, BF16, l->q, l->qs, CG_K, &k) ||
	    cg_io(g, BF16, l->v, l->vs, CG_V, &v) || cg_io(g, BF16, l->v, l->vs, CG_O, &o) ||
	    cg_io(g, F32, l->r, l->rs, CG_STATS, &st) || cg_scalar(g, -1, &sc) ||
	    cg_new(g, CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR, &op))
		return -1;
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, q));
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, k));
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, v));
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, o));
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_SDPA_FWD_STATSDESC, st));
	TRY(set_d(g, op, CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC, sc));
	return cg_op_done(g, op);
#else
	(void)l;
	return fail_msg(g, "these cuDNN headers have no SDPA_FWD descriptor (< 9.13.1)");
#endif
}

static int build_sdpa_bwd(struct cudnn_graph *g, const struct lay *l)
{
	g->step = "build the fused SDPA_BWD op";
#if CUDNN_VERSION >= 91700
	cudnnBackendDescriptor_t t[10], op;
	static const cudnnBackendAttributeName_t attr[10] = {
		CUDNN_ATTR_OPERATION_SDPA_BWD_QDESC,  CUDNN_ATTR_OPERATION_SDPA_BWD_KDESC,
		CUDNN_ATTR_OPERATION_SDPA_BWD_VDESC,  CUDNN_ATTR_OPERATION_SDPA_BWD_ODESC,
		CUDNN_ATTR_OPERATION_SDPA_BWD_DODDESC, CUDNN_ATTR_OPERATION_SDPA_BWD_STATSDESC,
		CUDNN_ATTR_OPERATION_SDPA_BWD_DQDESC, CUDNN_ATTR_OPERATION_SDPA_BWD_DKDESC,
		CUDNN_ATTR_OPERATION_SDPA_BWD_DVDESC, CUDNN_ATTR_OPERATION_SDPA_BWD_SCALEDESC,
	};

	if (cg_io(g, BF16, l->q, l->qs, CG_Q, &t[0]) || cg_io(g, BF16, l->q, l->qs, CG_K, &t[1]) ||
	    cg_io(g, BF16, l->v, l->vs, CG_V, &t[2]) || cg_io(g, BF16, l->v, l->vs, CG_O, &t[3]) ||
	    cg_io(g, BF16, l->v, l->vs, CG_DO, &t[4]) || cg_io(g, F32, l->r, l->rs, CG_STATS, &t[5]) ||
	    cg_io(g, BF16, l->q, l->qs, CG_DQ, &t[6]) || cg_io(g, BF16, l->q, l->qs, CG_DK, &t[7]) ||
	    cg_io(g, BF16, l->v, l->vs, CG_DV, &t[8]) || cg_scalar(g, -1, &t[9]) ||
	    cg_new(g, CUDNN_BACKEND_OPERATION_SDPA_BWD_DESCRIPTOR, &op))
		return -1;
	for (int i = 0; i < 10; i++)
		TRY(set_d(g, op, attr[i], t[i]));
	return cg_op_done(g, op);
#else
	(void)l;
	return fail_msg(g, "these cuDNN headers have no SDPA_BWD descriptor (< 9.17)");
#endif
}

/* ---- graph, plan, run ----------------------------------------------------------------------------- */

const char *cudnn_graph_unsupported(const struct cg_shape *s)
{
	if (s->B < 1 || s->T < 1 || s->H < 1)
		return "an empty shape";
	if (s->dq % 8 || s->dv % 8)
		return "head dims not multiples of 8";
	if (s->dq > 256 || s->dv > 256)
		return "head dims over 256";
	return NULL;
}

int cudnn_graph_build(struct cudnn_graph *g, const struct cudnn_api *api, cudnnHandle_t h, enum cg_kind kind,
		      const struct cg_shape *s, int int32_index)
{
	struct lay l;
	const char *why = cudnn_graph_unsupported(s);
	int rc;

	memset(g, 0, sizeof(*g));
	g->api = api;
	g->h = h;
	g->kind = kind;
	g->shape = *s;
	g->engine = -1;
	g->index_prec = int32_index ? CUDNN_DATA_INT32 : CUDNN_DATA_FLOAT;
	g->consts[K_ONE] = 1.0f;
	g->consts[K_NEG_BIG] = -3.4028234663852886e38f; /* -FLT_MAX, cudnn-frontend's mask value */
	g->step = "shape";
	if (why)
		return fail_msg(g, why);
	lay_init(&l, s);
	switch (kind) {
	case CG_ATTN_FWD:
		rc = build_fwd(g, &l);
		break;
	case CG_ATTN_BWD:
		rc = build_bwd(g, &l);
		break;
	case CG_SDPA_FWD:
		rc = build_sdpa_fwd(g, &l);
		break;
	default:
		rc = build_sdpa_bwd(g, &l);
		break;
	}
	if (rc)
		return -1;
	g->step = "finalize the operation graph";
	if (cg_new(g, CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, &g->graph))
		return -1;
	TRY(api->set_attr(g->graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &g->h));
	TRY(api->set_attr(g->graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, g->nops, g->ops));
	TRY(api->finalize(g->graph));
	return 0;
}

#define CG_MAX_CFGS 64 /* engine configs fetched from one heuristics query */
#define CG_TRY_CFGS 8  /* of which the first ones tried */

static int64_t engine_index(struct cudnn_graph *g, cudnnBackendDescriptor_t cfg)
{
	cudnnBackendDescriptor_t eng;
	int64_t cnt = 0, idx = -1;

	if (cg_new(g, CUDNN_BACKEND_ENGINE_DESCRIPTOR, &eng))
		return -1;
	if (g->api->get_attr(cfg, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &cnt, &eng) ==
	    CUDNN_STATUS_SUCCESS)
		g->api->get_attr(eng, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &cnt, &idx);
	return idx;
}

/* The engine configs heuristics `mode` proposes, at most CG_MAX_CFGS, in cfg[0..*n). */
static int cg_heuristics(struct cudnn_graph *g, cudnnBackendHeurMode_t mode, cudnnBackendDescriptor_t *cfg,
			 int64_t *n)
{
	cudnnBackendDescriptor_t heur;
	int64_t avail = 0;

	*n = 0;
	if (cg_new(g, CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, &heur))
		return -1;
	TRY(set_d(g, heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, g->graph));
	TRY(g->api->set_attr(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode));
	TRY(g->api->finalize(heur));
	TRY(g->api->get_attr(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &avail, NULL));
	if (avail > CG_MAX_CFGS)
		avail = CG_MAX_CFGS;
	for (int64_t i = 0; i < avail; i++)
		if (cg_new(g, CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, &cfg[i]))
			return -1;
	if (avail > 0)
		TRY(g->api->get_attr(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, avail, n,
				     cfg));
	*n = *n < avail ? *n : avail;
	if (*n == 0)
		return fail_msg(g, "no engine config proposed");
	return 0;
}

static int cg_try_cfg(struct cudnn_graph *g, cudnnBackendDescriptor_t cfg)
{
	cudnnBackendDescriptor_t plan;
	int64_t cnt = 0;

	if (cg_new(g, CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &plan))
		return -1;
	TRY(g->api->set_attr(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &g->h));
	TRY(set_d(g, plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, cfg));
	TRY(g->api->finalize(plan));
	TRY(g->api->get_attr(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &cnt,
			     &g->ws_bytes));
	g->plan = plan;
	g->engine = engine_index(g, cfg);
	return 0;
}

/* Plan with the configs of one heuristics mode; g->err says why none finalized. */
static int cg_plan_mode(struct cudnn_graph *g, cudnnBackendHeurMode_t mode, const char *name)
{
	cudnnBackendDescriptor_t cfg[CG_MAX_CFGS];
	char step[64];
	int64_t n;

	snprintf(step, sizeof(step), "heuristics %s", name);
	g->step = step;
	if (cg_heuristics(g, mode, cfg, &n))
		goto out;
	for (int64_t i = 0; i < n && i < CG_TRY_CFGS; i++) {
		snprintf(step, sizeof(step), "finalize plan %d/%d of heuristics %s", (int)i + 1, (int)n, name);
		if (cg_try_cfg(g, cfg[i]) == 0)
			break;
	}
out:
	g->step = "plan"; /* step[] goes out of scope */
	return g->plan ? 0 : -1;
}

int cudnn_graph_plan(struct cudnn_graph *g)
{
	char first[sizeof(g->err)];

	if (!g->graph)
		return fail_msg(g, "no graph built");
	if (cg_plan_mode(g, CUDNN_HEUR_MODE_A, "A")) {
		snprintf(first, sizeof(first), "%s", g->err);
		if (cg_plan_mode(g, CUDNN_HEUR_MODE_FALLBACK, "FALLBACK")) {
			char second[sizeof(g->err)];

			snprintf(second, sizeof(second), "%s", g->err);
			snprintf(g->err, sizeof(g->err), "%.370s | %.370s", first, second);
			return -1;
		}
	}
	if (g->ws_bytes > 0)
		g->ws = moe_cuda_malloc((size_t)g->ws_bytes);
	return 0;
}

int cudnn_graph_make(struct cudnn_graph *g, const struct cudnn_api *api, cudnnHandle_t h, enum cg_kind kind,
		     const struct cg_shape *s)
{
	char first[sizeof(g->err)];

	if (cudnn_graph_build(g, api, h, kind, s, 0) == 0 && cudnn_graph_plan(g) == 0)
		return 0;
	if (cudnn_graph_unsupported(s) || (kind != CG_ATTN_FWD && kind != CG_ATTN_BWD))
		return -1;
	/* cudnn-frontend's sliding_window_mask (the form it emits for 9.19) computes the indices in FLOAT,
	 * its older causal_mask in INT32 */
	snprintf(first, sizeof(first), "%s", g->err);
	cudnn_graph_free(g);
	if (cudnn_graph_build(g, api, h, kind, s, 1) == 0 && cudnn_graph_plan(g) == 0)
		return 0;
	{
		char second[sizeof(g->err)];

		snprintf(second, sizeof(second), "%s", g->err);
		snprintf(g->err, sizeof(g->err), "%.380s || with INT32 mask index: %.300s", first, second);
	}
	return -1;
}

int cudnn_graph_uses(const struct cudnn_graph *g, enum cg_slot slot)
{
	for (int i = 0; i < g->nio; i++)
		if (g->io_slot[i] == (int)slot)
			return 1;
	return 0;
}

int cudnn_graph_exec(struct cudnn_graph *g, void *const ptr[CG_NSLOTS])
{
	void *p[CG_MAX_IO];
	cudnnBackendDescriptor_t pack;
	cudnnStatus_t st;
	int rc = 0;

	g->step = "execute";
	if (!g->plan)
		return fail_msg(g, "no plan");
	for (int i = 0; i < g->nio; i++) {
		int s = g->io_slot[i];

		p[i] = s < 0 ? (void *)&g->consts[-1 - s] : ptr[s];
		if (!p[i])
			return fail_msg(g, "a tensor the graph uses is not bound");
	}
	if (g->clear_dqacc) {
		const struct cg_shape *s = &g->shape;

		moe_cuda_memset_async(ptr[CG_DQACC], 0, (size_t)(s->B * s->H * s->T * s->dq) * sizeof(float));
	}
	/* the pack is the per-run binding; the plan is kept */
	st = g->api->create_desc(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &pack);
	if (st != CUDNN_STATUS_SUCCESS)
		return fail(g, st, "create the variant pack");
	if ((st = g->api->set_attr(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, g->nio, g->io_uid)) ||
	    (st = g->api->set_attr(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, g->nio, p)) ||
	    (st = g->api->set_attr(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &g->ws)) ||
	    (st = g->api->finalize(pack)))
		rc = fail(g, st, "set up the variant pack");
	else if ((st = g->api->execute(g->h, g->plan, pack)) != CUDNN_STATUS_SUCCESS)
		rc = fail(g, st, "cudnnBackendExecute");
	g->api->destroy_desc(pack);
	return rc;
}

void cudnn_graph_free(struct cudnn_graph *g)
{
	if (!g->api)
		return;
	while (g->nowned > 0)
		g->api->destroy_desc(g->owned[--g->nowned]);
	moe_cuda_free(g->ws);
	g->ws = NULL;
	g->graph = g->plan = NULL;
	g->nops = g->nio = 0;
}

#else /* !MOE_HAVE_CUDNN_H */
/* ISO C wants a translation unit to declare something */
typedef int moe_cudnn_graph_unused;
#endif
