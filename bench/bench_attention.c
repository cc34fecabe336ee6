/*
 * bench/bench_attention.c - causal attention on the GPU: our FlashAttention-2-style fp32 kernels against
 * cuDNN's graph API in bf16, at the DeepSeek-V2-Lite attention shape (H = 16, q/k head dim 192, v head dim
 * 128, causal, scale 1/sqrt(192)) for (B, T) = (4, 1024), (2, 2048), (1, 4096).
 *
 * One table row per path and shape, printed as soon as it is measured (so a run cut short still reports):
 *  ours            attention_forward_cuda / attention_backward_cuda (fp32 in, out and arithmetic).
 *  cudnn graph     cuDNN's backend API, bf16 in/out, fp32 softmax and accumulation, causal: the composite
 *                  flash-attention pattern built node by node, as cudnn-frontend lowers its SDPA nodes for
 *                  cuDNN < 9.21 (forward: Q K^T, * scale, causal mask (GEN_INDEX row/col, CMP_GE,
 *                  BINARY_SELECT), max / sub / exp / sum / log + add -> stats, div, P V; backward: the
 *                  frontend's dO.O row sums, recomputed P = exp(S - stats), P^T dO, dO V^T, dS, dS^T Q,
 *                  dS K through an fp32 dQ accumulator).  The backward is fed our O (rounded to bf16) and
 *                  our lse as its stats, so it runs, and compares, even if the forward graph does not.
 *  cudnn sdpa-op   the fused CUDNN_BACKEND_OPERATION_SDPA_FWD/BWD descriptors.  cuDNN 9.19 gives them no
 *                  mask (the mask subgraph attribute comes with 9.21), so these rows run WITHOUT the causal
 *                  mask: twice the work, their FLOPs counted as such, no error against ours.  Skipped when
 *                  the time budget is spent.
 *  cublas 2-gemm   only for a shape where no cuDNN forward ran: the two products Q K^T and P V
 *                  (cublasGemmStridedBatchedEx, bf16 in, fp32 compute, full T x T, no softmax), the lower
 *                  bound an unfused path would pay.
 * Layouts: cuDNN sees [B, H, T, d] tensors with strides (T*H*d, d, H*d, 1), i.e. our [B*T, H, d] rows: no
 * transposes anywhere.  Inputs are uniform in [-1, 1), rounded to bf16, so both paths see the same values.
 *
 * Columns: ms per call (cudaEvents around --reps calls after --warmup untimed ones, on the backend's stream),
 * TFLOP/s = FLOPs / time with fwd = 2*pairs*(dq+dv), bwd = 2*pairs*(3*dq+2*dv) (its five products: Q K^T
 * recomputed, dO V^T, P^T dO, dS K, dS^T Q; 2.6x the forward here), pairs = B*H*T*(T+1)/2 for causal rows and
 * B*H*T*T for the no-mask ones; err = max|x - ours| / max|ours| (fwd: O; bwd: the largest of dQ, dK, dV).
 * After the table, one "ratio" line per shape (cuDNN graph time / ours) for tests/gpu/run_bundle.sh's note.
 *
 * Every cuDNN / CUDA failure in the cuDNN part is reported in the row's note (the step, the status name, the
 * call and cudnnGetLastErrorString) and the bench goes on with the next item; a CUDA error that leaves the
 * context unusable stops the measuring, the rows already printed stand.  cuDNN items that would start after
 * --budget-s seconds (default 90) are skipped, so the whole run stays near that.  It returns 0 whenever a
 * device was there (1 only if one is visible but cannot be initialised, 2 for a bad argument).  Without a
 * device, or in a build without the CUDA backend, it says so and returns 0.  The cuDNN handle is created only
 * once a device is known to exist.  CMake defines MOE_HAVE_CUDNN when it found cuDNN (linked into this bench
 * only); without it the cuDNN rows are replaced by the cuBLAS lower bound.
 *
 *   bench_attention [--reps N] [--warmup N] [--budget-s S] [--no-cudnn] [--no-sdpa-op]
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef MOE_HAVE_CUDA

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	printf("bench_attention: no CUDA build (configure with -DMOE_CUDA=ON); nothing measured\n");
	return 0;
}

#else /* MOE_HAVE_CUDA */

#include <cuda_runtime.h>

#include "launch/cuda/cuda_check.h"
#include "model/cuda/ops_cuda.h"
#ifdef MOE_HAVE_CUDNN
#include <cudnn.h>
#endif

enum { NH = 16, DQ = 192, DV = 128, NSHAPES = 3 };
static const int shape_bt[NSHAPES][2] = { { 4, 1024 }, { 2, 2048 }, { 1, 4096 } };

static struct {
	int warmup, reps;
	double budget_s; /* cuDNN items starting after this many seconds are skipped (0: no limit) */
	bool cudnn, sdpa_op;
} opt = { 2, 10, 90.0, true, true };

static float scale;      /* 1 / sqrt(DQ) */
static double t_start;   /* seconds, CLOCK_MONOTONIC */
static bool cuda_dead;   /* a CUDA error was reported: the context is unusable, measure nothing more */
static char err_note[768];
static cudaEvent_t ev0, ev1;

/* ---- small helpers ------------------------------------------------------------------------------- */

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static bool over_budget(void)
{
	return opt.budget_s > 0 && now_s() - t_start > opt.budget_s;
}

static void *xmalloc(size_t bytes)
{
	void *p = malloc(bytes);

	if (!p) {
		fprintf(stderr, "bench_attention: out of host memory (%zu bytes)\n", bytes);
		exit(1);
	}
	return p;
}

static cudaStream_t stream(void)
{
	return (cudaStream_t)moe_cuda_stream();
}

static int cuda_fail(cudaError_t e, const char *what)
{
	snprintf(err_note, sizeof(err_note), "%s: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
	return -1;
}

#define CUDA_TRY(call)                                   \
	do {                                             \
		cudaError_t e_ = (call);                 \
		if (e_ != cudaSuccess)                   \
			return cuda_fail(e_, #call);     \
	} while (0)

static uint16_t f2bf(float f) /* round to nearest even; inputs are finite */
{
	uint32_t u;

	memcpy(&u, &f, sizeof(u));
	u += 0x7fffu + ((u >> 16) & 1u);
	return (uint16_t)(u >> 16);
}

static float bf2f(uint16_t b)
{
	uint32_t u = (uint32_t)b << 16;
	float f;

	memcpy(&f, &u, sizeof(f));
	return f;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static float urand(void) /* uniform in [-1, 1), xorshift64* */
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return (float)((rng_state * 0x2545f4914f6cdd1dull) >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

/* ---- FLOPs and the table ------------------------------------------------------------------------- */

/* query-key pairs of all heads: causal counts the diagonal */
static double pairs(int B, int T, bool causal)
{
	return (double)B * NH * (causal ? (double)T * (T + 1) / 2.0 : (double)T * T);
}

static double flops(int B, int T, bool causal, int bwd)
{
	return 2.0 * pairs(B, T, causal) * (bwd ? 3.0 * DQ + 2.0 * DV : (double)(DQ + DV));
}

struct row {
	const char *path;
	int B, T;
	bool causal;
	double ms[2];  /* forward, backward; < 0: not measured */
	double err[2]; /* max relative error against ours; < 0: none; NAN: non-finite output */
	char note[1024];
};

static void row_init(struct row *r, const char *path, int B, int T, bool causal)
{
	memset(r, 0, sizeof(*r));
	r->path = path;
	r->B = B;
	r->T = T;
	r->causal = causal;
	r->ms[0] = r->ms[1] = r->err[0] = r->err[1] = -1.0;
}

static void row_note(struct row *r, const char *what, const char *msg)
{
	size_t len = strlen(r->note);

	snprintf(r->note + len, sizeof(r->note) - len, "%s%s%s", len ? "; " : "", what, msg);
}

static void cell(char *buf, size_t n, double v, const char *fmt)
{
	if (isnan(v))
		snprintf(buf, n, "NaN");
	else if (v < 0)
		snprintf(buf, n, "-");
	else
		snprintf(buf, n, fmt, v);
}

static void print_columns(void)
{
	printf("%-30s %2s %5s %9s %9s %8s %8s %8s %8s  %s\n", "path", "B", "T", "fwd ms", "bwd ms", "fwd TF/s",
	       "bwd TF/s", "fwd err", "bwd err", "note");
}

static void print_row(const struct row *r)
{
	char c[6][24];

	for (int i = 0; i < 2; i++) {
		double tf = r->ms[i] > 0 ? flops(r->B, r->T, r->causal, i) / (r->ms[i] * 1e-3) / 1e12 : -1.0;

		cell(c[i], sizeof(c[i]), r->ms[i], "%.3f");
		cell(c[2 + i], sizeof(c[2 + i]), tf, "%.1f");
		cell(c[4 + i], sizeof(c[4 + i]), r->err[i], "%.1e");
	}
	printf("%-30s %2d %5d %9s %9s %8s %8s %8s %8s%s%s\n", r->path, r->B, r->T, c[0], c[1], c[2], c[3], c[4],
	       c[5], strlen(r->note) > 80 ? "\n    " : "  ", r->note); /* a long note (a failure) on its own line */
	fflush(stdout);
}

/* ---- timing -------------------------------------------------------------------------------------- */

typedef int (*step_fn)(void *ctx); /* queue one call on the backend's stream; 0 or -1 with err_note */

/* Mean ms per call over opt.reps calls after opt.warmup untimed ones (cudaEvents on the backend's stream).
 * A CUDA error here means the context is gone: cuda_dead. */
static int time_ms(step_fn fn, void *ctx, double *ms)
{
	float f = 0.0f;
	cudaError_t e;

	for (int i = 0; i < opt.warmup; i++)
		if (fn(ctx))
			return -1;
	CUDA_TRY(cudaEventRecord(ev0, stream()));
	for (int i = 0; i < opt.reps; i++)
		if (fn(ctx))
			return -1;
	CUDA_TRY(cudaEventRecord(ev1, stream()));
	e = cudaEventSynchronize(ev1);
	if (e != cudaSuccess) {
		cuda_dead = true;
		return cuda_fail(e, "cudaEventSynchronize after the timed calls");
	}
	CUDA_TRY(cudaEventElapsedTime(&f, ev0, ev1));
	*ms = (double)f / opt.reps;
	return 0;
}

static int d2h(void *dst, const void *src, size_t bytes)
{
	cudaError_t e = cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);

	if (e != cudaSuccess) {
		cuda_dead = true;
		return cuda_fail(e, "cudaMemcpy device to host");
	}
	return 0;
}

static uint16_t *upload_bf16(const uint16_t *h, size_t n)
{
	uint16_t *d = moe_cuda_malloc(n * sizeof(uint16_t));

	moe_cuda_memcpy_h2d(d, h, n * sizeof(uint16_t));
	return d;
}

/* After a cuDNN or cuBLAS item: an error still pending on the stream means the context may be gone. */
static void check_context(struct row *r)
{
	cudaError_t e = cudaStreamSynchronize(stream());

	if (e != cudaSuccess)
		cuda_dead = true;
	else
		e = cudaGetLastError(); /* clear a non-sticky error so that later checks do not report it */
	if (e != cudaSuccess) {
		cuda_fail(e, cuda_dead ? "synchronising after this item (CUDA context lost)" : "pending CUDA error");
		row_note(r, "", err_note);
	}
}

/* ---- our kernels --------------------------------------------------------------------------------- */

struct shape {
	int B, T;
	size_t nq, nv, nl;              /* elements of q (k, dq, dk), of v (out, dout, dv), of lse */
	float *q, *k, *v, *dout;        /* device inputs: fp32 holding bf16-exact values */
	float *out, *lse, *dq, *dk, *dv; /* device results of ours (dq, dk, dv: one backward from zero) */
	uint16_t *hq, *hk, *hv, *hdo;   /* host bf16 copies of the inputs */
	double ms[2];                   /* ours: forward, backward */
};

static void fill_input(float **dptr, uint16_t **hptr, size_t n)
{
	float *tmp = xmalloc(n * sizeof(float));
	uint16_t *h = xmalloc(n * sizeof(uint16_t));

	for (size_t i = 0; i < n; i++) {
		h[i] = f2bf(urand());
		tmp[i] = bf2f(h[i]);
	}
	*dptr = moe_cuda_malloc(n * sizeof(float));
	moe_cuda_memcpy_h2d(*dptr, tmp, n * sizeof(float));
	free(tmp);
	*hptr = h;
}

static void shape_init(struct shape *s, int B, int T)
{
	memset(s, 0, sizeof(*s));
	s->B = B;
	s->T = T;
	s->nq = (size_t)B * T * NH * DQ;
	s->nv = (size_t)B * T * NH * DV;
	s->nl = (size_t)B * NH * T;
	fill_input(&s->q, &s->hq, s->nq);
	fill_input(&s->k, &s->hk, s->nq);
	fill_input(&s->v, &s->hv, s->nv);
	fill_input(&s->dout, &s->hdo, s->nv);
	s->out = moe_cuda_malloc(s->nv * sizeof(float));
	s->lse = moe_cuda_malloc(s->nl * sizeof(float));
	s->dq = moe_cuda_malloc(s->nq * sizeof(float));
	s->dk = moe_cuda_malloc(s->nq * sizeof(float));
	s->dv = moe_cuda_malloc(s->nv * sizeof(float));
	s->ms[0] = s->ms[1] = -1.0;
}

static void shape_free(struct shape *s)
{
	float *d[] = { s->q, s->k, s->v, s->dout, s->out, s->lse, s->dq, s->dk, s->dv };

	for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++)
		moe_cuda_free(d[i]);
	free(s->hq);
	free(s->hk);
	free(s->hv);
	free(s->hdo);
}

static int ours_fwd(void *p)
{
	struct shape *s = p;

	attention_forward_cuda(s->out, s->lse, s->q, s->k, s->v, s->B, s->T, NH, DQ, DV, scale);
	return 0;
}

static int ours_bwd(void *p)
{
	struct shape *s = p;

	attention_backward_cuda(s->dq, s->dk, s->dv, s->dout, s->out, s->lse, s->q, s->k, s->v, s->B, s->T, NH,
				DQ, DV, scale);
	return 0;
}

/* Time ours; leaves the reference out/lse and dq/dk/dv (one backward from zero: the op accumulates). */
static void run_ours(struct shape *s)
{
	struct row r;

	row_init(&r, "ours fp32 (FA2 kernel)", s->B, s->T, true);
	if (time_ms(ours_fwd, s, &r.ms[0]) || time_ms(ours_bwd, s, &r.ms[1])) {
		row_note(&r, "", err_note);
	} else {
		moe_cuda_memset(s->dq, 0, s->nq * sizeof(float));
		moe_cuda_memset(s->dk, 0, s->nq * sizeof(float));
		moe_cuda_memset(s->dv, 0, s->nv * sizeof(float));
		ours_bwd(s);
		moe_cuda_synchronize();
		row_note(&r, "reference", "");
	}
	s->ms[0] = r.ms[0];
	s->ms[1] = r.ms[1];
	print_row(&r);
}

/* ---- comparisons against ours -------------------------------------------------------------------- */

/* max |got - ref| / max |ref|; got bf16 and ref fp32, both on the device.  NAN if got is not finite,
 * -1 (with err_note) if the copy failed. */
static double rel_err(const uint16_t *got_d, const float *ref_d, size_t n)
{
	uint16_t *got = xmalloc(n * sizeof(uint16_t));
	float *ref = xmalloc(n * sizeof(float));
	double dmax = 0.0, rmax = 0.0;

	if (d2h(got, got_d, n * sizeof(uint16_t)) || d2h(ref, ref_d, n * sizeof(float))) {
		dmax = -1.0;
		rmax = 1.0;
	}
	for (size_t i = 0; dmax >= 0.0 && i < n; i++) {
		double g = bf2f(got[i]), d = fabs(g - ref[i]);

		if (!isfinite(g)) {
			dmax = NAN;
			break;
		}
		dmax = d > dmax ? d : dmax;
		rmax = fabs(ref[i]) > rmax ? fabs(ref[i]) : rmax;
	}
	free(got);
	free(ref);
	return isnan(dmax) || dmax < 0.0 ? dmax : dmax / (rmax > 0.0 ? rmax : 1.0);
}

static double max_err(double a, double b)
{
	if (isnan(a) || isnan(b))
		return NAN;
	return a > b ? a : b;
}

/* max |a - b| of two fp32 device arrays (cuDNN's stats against our lse) */
static double abs_diff(const float *a_d, const float *b_d, size_t n)
{
	float *a = xmalloc(n * sizeof(float)), *b = xmalloc(n * sizeof(float));
	double m = 0.0;

	if (d2h(a, a_d, n * sizeof(float)) || d2h(b, b_d, n * sizeof(float)))
		m = -1.0;
	for (size_t i = 0; m >= 0.0 && i < n; i++)
		m = isfinite(a[i]) ? fmax(m, fabs((double)a[i] - b[i])) : NAN;
	free(a);
	free(b);
	return m;
}

#ifdef MOE_HAVE_CUDNN
/* =================================================================================================== */
/* cuDNN's backend (graph) API                                                                          */
/* =================================================================================================== */

static const char *cudnn_step = "";

/* Record a failed cuDNN call: the step, the status, the call, cuDNN's own last message. */
static int cudnn_fail(cudnnStatus_t st, const char *call, int line)
{
	char last[512] = "";

	cudnnGetLastErrorString(last, sizeof(last));
	for (char *p = last; *p; p++)
		if (*p == '\n' || *p == '\r' || *p == '\t')
			*p = ' ';
	snprintf(err_note, sizeof(err_note), "%s: %s (%d) at bench line %d [%.64s]%s%.240s", cudnn_step,
		 cudnnGetErrorString(st), (int)st, line, call, last[0] ? "; cudnn: " : "", last);
	return -1;
}

#define CUDNN_TRY(call)                                                  \
	do {                                                             \
		cudnnStatus_t st_ = (call);                              \
		if (st_ != CUDNN_STATUS_SUCCESS)                         \
			return cudnn_fail(st_, #call, __LINE__);         \
	} while (0)

#define CG_MAX_DESC 512
#define CG_MAX_OPS 48
#define CG_MAX_IO 16
#define CG_MAX_CFGS 64 /* engine configs fetched from one heuristics query */
#define CG_TRY_CFGS 8  /* of which the first ones tried */

/* One graph under construction, its plan and variant pack, and every descriptor it owns. */
struct cg {
	cudnnHandle_t h;
	cudnnBackendDescriptor_t owned[CG_MAX_DESC];
	int nowned;
	cudnnBackendDescriptor_t ops[CG_MAX_OPS];
	int nops;
	int64_t uid;                 /* last tensor unique id handed out */
	int64_t io_uid[CG_MAX_IO];   /* the variant pack: non-virtual and by-value tensors */
	void *io_ptr[CG_MAX_IO];
	int nio;
	cudnnBackendDescriptor_t graph, plan, pack;
	int64_t ws_bytes, engine;
	void *ws;
	void *clear;                 /* zeroed before each execute when not NULL (pre-9.6 dQ accumulator) */
	size_t clear_bytes;
	float one, scale, neg_big;   /* by-value scalars: the pack points at them, so a cg must not move */
};

static void cg_init(struct cg *g, cudnnHandle_t h)
{
	memset(g, 0, sizeof(*g));
	g->h = h;
	g->engine = -1;
	g->one = 1.0f;
	g->scale = scale;
	g->neg_big = -3.4028234663852886e38f; /* -FLT_MAX, cudnn-frontend's mask value */
}

static void cg_free(struct cg *g)
{
	while (g->nowned > 0)
		cudnnBackendDestroyDescriptor(g->owned[--g->nowned]);
	if (g->ws && !cuda_dead)
		cudaFree(g->ws);
	g->ws = NULL;
}

static int cg_new(struct cg *g, cudnnBackendDescriptorType_t type, cudnnBackendDescriptor_t *d)
{
	if (g->nowned == CG_MAX_DESC) {
		snprintf(err_note, sizeof(err_note), "%s: more than %d descriptors", cudnn_step, CG_MAX_DESC);
		return -1;
	}
	CUDNN_TRY(cudnnBackendCreateDescriptor(type, d));
	g->owned[g->nowned++] = *d;
	return 0;
}

static cudnnStatus_t set_d(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a, cudnnBackendDescriptor_t v)
{
	return cudnnBackendSetAttribute(d, a, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &v);
}

static cudnnStatus_t set_i64(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a, int64_t n,
			     const int64_t *v)
{
	return cudnnBackendSetAttribute(d, a, CUDNN_TYPE_INT64, n, v);
}

static cudnnStatus_t set_dt(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a, cudnnDataType_t v)
{
	return cudnnBackendSetAttribute(d, a, CUDNN_TYPE_DATA_TYPE, 1, &v);
}

static cudnnStatus_t set_bool(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a, bool v)
{
	return cudnnBackendSetAttribute(d, a, CUDNN_TYPE_BOOLEAN, 1, &v);
}

static int cg_bind(struct cg *g, int64_t uid, void *ptr)
{
	if (g->nio == CG_MAX_IO) {
		snprintf(err_note, sizeof(err_note), "%s: more than %d bound tensors", cudnn_step, CG_MAX_IO);
		return -1;
	}
	g->io_uid[g->nio] = uid;
	g->io_ptr[g->nio++] = ptr;
	return 0;
}

enum { T_IO, T_VIRTUAL, T_BY_VALUE };

/* A 4-d tensor; T_IO and T_BY_VALUE ones enter the variant pack with ptr (a host pointer for by-value). */
static int cg_tensor(struct cg *g, cudnnDataType_t dt, const int64_t *dim, const int64_t *str, int kind,
		     void *ptr, cudnnBackendDescriptor_t *t)
{
	const int64_t align = 16, uid = ++g->uid;

	if (cg_new(g, CUDNN_BACKEND_TENSOR_DESCRIPTOR, t))
		return -1;
	CUDNN_TRY(set_dt(*t, CUDNN_ATTR_TENSOR_DATA_TYPE, dt));
	CUDNN_TRY(set_i64(*t, CUDNN_ATTR_TENSOR_DIMENSIONS, 4, dim));
	CUDNN_TRY(set_i64(*t, CUDNN_ATTR_TENSOR_STRIDES, 4, str));
	CUDNN_TRY(set_i64(*t, CUDNN_ATTR_TENSOR_UNIQUE_ID, 1, &uid));
	CUDNN_TRY(set_i64(*t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, 1, &align));
	CUDNN_TRY(set_bool(*t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, kind == T_VIRTUAL));
	if (kind == T_BY_VALUE)
		CUDNN_TRY(set_bool(*t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, true));
	CUDNN_TRY(cudnnBackendFinalize(*t));
	return kind == T_VIRTUAL ? 0 : cg_bind(g, uid, ptr);
}

static int cg_virt(struct cg *g, cudnnDataType_t dt, const int64_t *dim, const int64_t *str,
		   cudnnBackendDescriptor_t *t)
{
	return cg_tensor(g, dt, dim, str, T_VIRTUAL, NULL, t);
}

static int cg_io(struct cg *g, cudnnDataType_t dt, const int64_t *dim, const int64_t *str, void *ptr,
		 cudnnBackendDescriptor_t *t)
{
	return cg_tensor(g, dt, dim, str, T_IO, ptr, t);
}

static int cg_scalar(struct cg *g, float *value, cudnnBackendDescriptor_t *t)
{
	static const int64_t ones[4] = { 1, 1, 1, 1 };

	return cg_tensor(g, CUDNN_DATA_FLOAT, ones, ones, T_BY_VALUE, value, t);
}

static int cg_op_done(struct cg *g, cudnnBackendDescriptor_t op)
{
	if (g->nops == CG_MAX_OPS) {
		snprintf(err_note, sizeof(err_note), "%s: more than %d operations", cudnn_step, CG_MAX_OPS);
		return -1;
	}
	CUDNN_TRY(cudnnBackendFinalize(op));
	g->ops[g->nops++] = op;
	return 0;
}

/* y = mode(x, b, t) computed in prec; b and t may be NULL; axis >= 0 only for GEN_INDEX. */
static int cg_pw(struct cg *g, cudnnPointwiseMode_t mode, cudnnDataType_t prec, int64_t axis,
		 cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t t,
		 cudnnBackendDescriptor_t y)
{
	cudnnBackendDescriptor_t pw, op;

	if (cg_new(g, CUDNN_BACKEND_POINTWISE_DESCRIPTOR, &pw))
		return -1;
	CUDNN_TRY(cudnnBackendSetAttribute(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode));
	CUDNN_TRY(set_dt(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, prec));
	if (axis >= 0)
		CUDNN_TRY(set_i64(pw, CUDNN_ATTR_POINTWISE_AXIS, 1, &axis));
	CUDNN_TRY(cudnnBackendFinalize(pw));
	if (cg_new(g, CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, &op))
		return -1;
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw));
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x));
	if (b)
		CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b));
	if (t)
		CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t));
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y));
	return cg_op_done(g, op);
}

/* y = mode(x[, b]) in fp32 */
static int cg_pw2(struct cg *g, cudnnPointwiseMode_t mode, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t b,
		  cudnnBackendDescriptor_t y)
{
	return cg_pw(g, mode, CUDNN_DATA_FLOAT, -1, x, b, NULL, y);
}

static int cg_matmul(struct cg *g, cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b,
		     cudnnBackendDescriptor_t c)
{
	cudnnBackendDescriptor_t mm, op;

	if (cg_new(g, CUDNN_BACKEND_MATMUL_DESCRIPTOR, &mm))
		return -1;
	CUDNN_TRY(set_dt(mm, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT));
	CUDNN_TRY(cudnnBackendFinalize(mm));
	if (cg_new(g, CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, &op))
		return -1;
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, a));
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, b));
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, c));
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, mm));
	return cg_op_done(g, op);
}

/* y = reduce(x) over the axes where y has extent 1, in fp32 */
static int cg_reduce(struct cg *g, cudnnReduceTensorOp_t mode, cudnnBackendDescriptor_t x,
		     cudnnBackendDescriptor_t y)
{
	cudnnBackendDescriptor_t rd, op;

	if (cg_new(g, CUDNN_BACKEND_REDUCTION_DESCRIPTOR, &rd))
		return -1;
	CUDNN_TRY(cudnnBackendSetAttribute(rd, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1,
					   &mode));
	CUDNN_TRY(set_dt(rd, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_DATA_FLOAT));
	CUDNN_TRY(cudnnBackendFinalize(rd));
	if (cg_new(g, CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, &op))
		return -1;
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x));
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y));
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, rd));
	return cg_op_done(g, op);
}

/* y = x seen through y's dims and strides (the transposes of the backward) */
static int cg_reshape(struct cg *g, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y)
{
	cudnnBackendDescriptor_t op;

	if (cg_new(g, CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR, &op))
		return -1;
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x));
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y));
	return cg_op_done(g, op);
}

/* ---- plan: heuristics A, then FALLBACK; the first engine config that finalizes ---------------------- */

static int64_t engine_index(cudnnBackendDescriptor_t cfg)
{
	cudnnBackendDescriptor_t eng;
	int64_t cnt = 0, idx = -1;

	if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINE_DESCRIPTOR, &eng) != CUDNN_STATUS_SUCCESS)
		return -1;
	if (cudnnBackendGetAttribute(cfg, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &cnt,
				     &eng) == CUDNN_STATUS_SUCCESS)
		cudnnBackendGetAttribute(eng, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &cnt, &idx);
	cudnnBackendDestroyDescriptor(eng);
	return idx;
}

/* The engine configs heuristics `mode` proposes, at most CG_MAX_CFGS, in cfg[0..*n). */
static int cg_heuristics(struct cg *g, cudnnBackendHeurMode_t mode, cudnnBackendDescriptor_t *cfg, int64_t *n)
{
	cudnnBackendDescriptor_t heur;
	int64_t avail = 0;

	*n = 0;
	if (cg_new(g, CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, &heur))
		return -1;
	CUDNN_TRY(set_d(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, g->graph));
	CUDNN_TRY(cudnnBackendSetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode));
	CUDNN_TRY(cudnnBackendFinalize(heur));
	CUDNN_TRY(cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0,
					   &avail, NULL));
	if (avail > CG_MAX_CFGS)
		avail = CG_MAX_CFGS;
	for (int64_t i = 0; i < avail; i++)
		if (cg_new(g, CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, &cfg[i]))
			return -1;
	if (avail > 0)
		CUDNN_TRY(cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
						   avail, n, cfg));
	*n = *n < avail ? *n : avail;
	if (*n == 0) {
		snprintf(err_note, sizeof(err_note), "%s: no engine config proposed", cudnn_step);
		return -1;
	}
	return 0;
}

static int cg_try_cfg(struct cg *g, cudnnBackendDescriptor_t cfg)
{
	cudnnBackendDescriptor_t plan;
	int64_t cnt = 0;

	if (cg_new(g, CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &plan))
		return -1;
	CUDNN_TRY(cudnnBackendSetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &g->h));
	CUDNN_TRY(set_d(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, cfg));
	CUDNN_TRY(cudnnBackendFinalize(plan));
	CUDNN_TRY(cudnnBackendGetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &cnt,
					   &g->ws_bytes));
	g->plan = plan;
	g->engine = engine_index(cfg);
	return 0;
}

/* Plan with the configs of one heuristics mode; err_note says why none finalized. */
static int cg_plan_mode(struct cg *g, cudnnBackendHeurMode_t mode, const char *name)
{
	cudnnBackendDescriptor_t cfg[CG_MAX_CFGS];
	char step[64];
	int64_t n;

	snprintf(step, sizeof(step), "heuristics %s", name);
	cudnn_step = step;
	if (cg_heuristics(g, mode, cfg, &n))
		return -1;
	for (int64_t i = 0; i < n && i < CG_TRY_CFGS; i++) {
		snprintf(step, sizeof(step), "finalize plan %d/%d of heuristics %s", (int)i + 1, (int)n, name);
		if (cg_try_cfg(g, cfg[i]) == 0)
			return 0;
	}
	return -1; /* err_note: the last config's failure */
}

static int cg_plan(struct cg *g)
{
	char first[sizeof(err_note)];

	if (cg_plan_mode(g, CUDNN_HEUR_MODE_A, "A") == 0)
		return 0;
	snprintf(first, sizeof(first), "%s", err_note);
	if (cg_plan_mode(g, CUDNN_HEUR_MODE_FALLBACK, "FALLBACK") == 0)
		return 0;
	{
		char second[sizeof(err_note)];

		snprintf(second, sizeof(second), "%s", err_note);
		snprintf(err_note, sizeof(err_note), "%.380s | %.380s", first, second);
	}
	return -1;
}

/* Finalize the graph, pick a plan, allocate its workspace, build the variant pack. */
static int cg_finish(struct cg *g)
{
	cudnn_step = "finalize the operation graph";
	if (cg_new(g, CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, &g->graph))
		return -1;
	CUDNN_TRY(cudnnBackendSetAttribute(g->graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &g->h));
	CUDNN_TRY(cudnnBackendSetAttribute(g->graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
					   g->nops, g->ops));
	CUDNN_TRY(cudnnBackendFinalize(g->graph));
	if (cg_plan(g))
		return -1;
	cudnn_step = "workspace and variant pack";
	if (g->ws_bytes > 0)
		CUDA_TRY(cudaMalloc(&g->ws, (size_t)g->ws_bytes));
	if (cg_new(g, CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &g->pack))
		return -1;
	CUDNN_TRY(set_i64(g->pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, g->nio, g->io_uid));
	CUDNN_TRY(cudnnBackendSetAttribute(g->pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
					   g->nio, g->io_ptr));
	CUDNN_TRY(cudnnBackendSetAttribute(g->pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1,
					   &g->ws));
	CUDNN_TRY(cudnnBackendFinalize(g->pack));
	return 0;
}

static int cg_exec(void *p)
{
	struct cg *g = p;

	if (g->clear)
		CUDA_TRY(cudaMemsetAsync(g->clear, 0, g->clear_bytes, stream()));
	cudnn_step = "execute";
	CUDNN_TRY(cudnnBackendExecute(g->h, g->plan, g->pack));
	return 0;
}

/* ---- tensor layouts and device buffers of one shape ---------------------------------------------- */

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

static void lay_init(struct lay *l, int64_t B, int64_t T)
{
	const int64_t H = NH;

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

struct dbufs {
	uint16_t *q, *k, *v, *dout;  /* bf16 inputs */
	uint16_t *o, *oref;          /* cuDNN's forward output; ours rounded to bf16 (the backward's O) */
	uint16_t *dq, *dk, *dv;      /* cuDNN's gradients */
	float *stats, *ssum, *dqacc; /* forward stats; backward row sums and dQ accumulator */
	float *lse;                  /* ours (not owned): the backward's stats */
};

static void dbufs_init(struct dbufs *b, const struct shape *s)
{
	float *o = xmalloc(s->nv * sizeof(float));
	uint16_t *ob = xmalloc(s->nv * sizeof(uint16_t));

	b->q = upload_bf16(s->hq, s->nq);
	b->k = upload_bf16(s->hk, s->nq);
	b->v = upload_bf16(s->hv, s->nv);
	b->dout = upload_bf16(s->hdo, s->nv);
	moe_cuda_memcpy_d2h(o, s->out, s->nv * sizeof(float));
	for (size_t i = 0; i < s->nv; i++)
		ob[i] = f2bf(o[i]);
	b->oref = upload_bf16(ob, s->nv);
	free(o);
	free(ob);
	b->o = moe_cuda_malloc(s->nv * sizeof(uint16_t));
	b->dq = moe_cuda_malloc(s->nq * sizeof(uint16_t));
	b->dk = moe_cuda_malloc(s->nq * sizeof(uint16_t));
	b->dv = moe_cuda_malloc(s->nv * sizeof(uint16_t));
	b->stats = moe_cuda_malloc(s->nl * sizeof(float));
	b->ssum = moe_cuda_malloc(s->nl * sizeof(float));
	b->dqacc = moe_cuda_malloc(s->nq * sizeof(float));
	b->lse = s->lse;
}

static void dbufs_free(struct dbufs *b)
{
	void *d[] = { b->q, b->k, b->v, b->dout, b->o, b->oref, b->dq, b->dk, b->dv, b->stats, b->ssum, b->dqacc };

	for (size_t i = 0; i < sizeof(d) / sizeof(d[0]) && !cuda_dead; i++)
		moe_cuda_free(d[i]);
}

/* ---- the composite causal graphs ----------------------------------------------------------------- */

#define F32 CUDNN_DATA_FLOAT
#define BF16 CUDNN_DATA_BFLOAT16

/* The causal mask's GEN_INDEX math: cudnn-frontend's sliding_window_mask (right bound 0, the form it emits
 * for cuDNN 9.19) computes it in FLOAT, its older causal_mask in INT32.  A graph that gets no plan with the
 * first is tried once more with the second. */
static cudnnDataType_t index_prec = CUDNN_DATA_FLOAT;

/* y = row >= col ? x : -FLT_MAX over the scores x [B, H, T, T] */
static int cg_causal(struct cg *g, const struct lay *l, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t *y)
{
	cudnnBackendDescriptor_t row, col, keep, big;

	if (cg_virt(g, CUDNN_DATA_INT32, l->s, l->ss, &row) || cg_virt(g, CUDNN_DATA_INT32, l->s, l->ss, &col) ||
	    cg_virt(g, CUDNN_DATA_BOOLEAN, l->s, l->ss, &keep) || cg_virt(g, F32, l->s, l->ss, y) ||
	    cg_scalar(g, &g->neg_big, &big))
		return -1;
	if (cg_pw(g, CUDNN_POINTWISE_GEN_INDEX, index_prec, 2, x, NULL, NULL, row) ||
	    cg_pw(g, CUDNN_POINTWISE_GEN_INDEX, index_prec, 3, x, NULL, NULL, col) ||
	    cg_pw(g, CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, -1, row, col, NULL, keep))
		return -1;
	return cg_pw(g, CUDNN_POINTWISE_BINARY_SELECT, F32, -1, x, big, keep, *y);
}

/* stats = max + log(sum exp(x - max)), p = exp(x - max) / sum (bf16, for the P V product) */
static int cg_softmax(struct cg *g, const struct lay *l, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t stats,
		      cudnnBackendDescriptor_t *p)
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
static int build_fwd(struct cg *g, const struct lay *l, struct dbufs *b)
{
	cudnnBackendDescriptor_t q, kt, v, o, st, sc, s, s1, s2, p;

	cudnn_step = "build the causal forward graph";
	if (cg_io(g, BF16, l->q, l->qs, b->q, &q) || cg_io(g, BF16, l->kt, l->kts, b->k, &kt) ||
	    cg_io(g, BF16, l->v, l->vs, b->v, &v) || cg_io(g, BF16, l->v, l->vs, b->o, &o) ||
	    cg_io(g, F32, l->r, l->rs, b->stats, &st) || cg_scalar(g, &g->scale, &sc))
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

static int bwd_tensors(struct cg *g, const struct lay *l, struct dbufs *b, struct bwd_t *t)
{
	return cg_io(g, BF16, l->q, l->qs, b->q, &t->q) || cg_io(g, BF16, l->kt, l->kts, b->k, &t->kt) ||
	       cg_io(g, BF16, l->vt, l->vts, b->v, &t->vt) || cg_io(g, BF16, l->v, l->vs, b->oref, &t->o) ||
	       cg_io(g, BF16, l->v, l->vs, b->dout, &t->dO) || cg_io(g, F32, l->r, l->rs, b->lse, &t->st) ||
	       cg_io(g, BF16, l->q, l->qs, b->dq, &t->dq) || cg_io(g, BF16, l->q, l->qs, b->dk, &t->dk) ||
	       cg_io(g, BF16, l->v, l->vs, b->dv, &t->dv) || cg_io(g, F32, l->r, l->rs, b->ssum, &t->ssum) ||
	       cg_io(g, F32, l->q, l->qps, b->dqacc, &t->dqacc) || cg_scalar(g, &g->scale, &t->sc) ? -1 : 0;
}

/* ssum = rowsum(dO * O) * 1 (the frontend's dropout-free form) */
static int bwd_rowsum(struct cg *g, const struct lay *l, const struct bwd_t *t)
{
	cudnnBackendDescriptor_t doo, d, one;

	if (cg_virt(g, F32, l->v, l->dos, &doo) || cg_virt(g, F32, l->r, l->rs, &d) || cg_scalar(g, &g->one, &one))
		return -1;
	if (cg_pw2(g, CUDNN_POINTWISE_MUL, t->dO, t->o, doo) || cg_reduce(g, CUDNN_REDUCE_TENSOR_ADD, doo, d))
		return -1;
	return cg_pw2(g, CUDNN_POINTWISE_MUL, d, one, t->ssum);
}

/* p = exp(causal(Q K^T * scale - stats)), fp32 */
static int bwd_probs(struct cg *g, const struct lay *l, const struct bwd_t *t, cudnnBackendDescriptor_t *p)
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
static int bwd_dv_ds(struct cg *g, const struct lay *l, const struct bwd_t *t, cudnnBackendDescriptor_t p,
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
static int bwd_dk_dq(struct cg *g, const struct lay *l, const struct bwd_t *t, cudnnBackendDescriptor_t ds)
{
	cudnnBackendDescriptor_t dst, k;

	if (cg_virt(g, BF16, l->s, l->sts, &dst) || cg_virt(g, F32, l->q, l->qs, &k))
		return -1;
	if (cg_reshape(g, ds, dst) || cg_matmul(g, dst, t->q, t->dk) || cg_reshape(g, t->kt, k) ||
	    cg_matmul(g, ds, k, t->dqacc))
		return -1;
	return cg_pw2(g, CUDNN_POINTWISE_IDENTITY, t->dqacc, NULL, t->dq);
}

static int build_bwd(struct cg *g, const struct lay *l, struct dbufs *b, size_t dqacc_bytes)
{
	struct bwd_t t;
	cudnnBackendDescriptor_t p, ds;

	cudnn_step = "build the causal backward graph";
	if (bwd_tensors(g, l, b, &t) || bwd_rowsum(g, l, &t) || bwd_probs(g, l, &t, &p) ||
	    bwd_dv_ds(g, l, &t, p, &ds) || bwd_dk_dq(g, l, &t, ds))
		return -1;
	if (cudnnGetVersion() < 90600) { /* the frontend zeroes the accumulator itself before 9.6 */
		g->clear = b->dqacc;
		g->clear_bytes = dqacc_bytes;
	}
	return 0;
}

/* ---- the fused SDPA operations (no mask in 9.19) ------------------------------------------------- */

static int build_sdpa_fwd(struct cg *g, const struct lay *l, struct dbufs *b)
{
#if CUDNN_VERSION >= 91301
	cudnnBackendDescriptor_t q, k, v, o, st, sc, op;

	cudnn_step = "build the fused SDPA_FWD op";
	if (cg_io(g, BF16, l->q, l->qs, b->q, &q) || cg_io(g, BF16, l->q, l->qs, b->k, &k) ||
	    cg_io(g, BF16, l->v, l->vs, b->v, &v) || cg_io(g, BF16, l->v, l->vs, b->o, &o) ||
	    cg_io(g, F32, l->r, l->rs, b->stats, &st) || cg_scalar(g, &g->scale, &sc) ||
	    cg_new(g, CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR, &op))
		return -1;
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, q));
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, k));
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, v));
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, o));
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_SDPA_FWD_STATSDESC, st));
	CUDNN_TRY(set_d(op, CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC, sc));
	return cg_op_done(g, op);
#else
	(void)g, (void)l, (void)b;
	snprintf(err_note, sizeof(err_note), "this cuDNN's headers have no SDPA_FWD descriptor (< 9.13.1)");
	return -1;
#endif
}

/* uses the fused forward's O and stats (b->o, b->stats) */
static int build_sdpa_bwd(struct cg *g, const struct lay *l, struct dbufs *b)
{
#if CUDNN_VERSION >= 91700
	cudnnBackendDescriptor_t t[10], op;
	static const cudnnBackendAttributeName_t attr[10] = {
		CUDNN_ATTR_OPERATION_SDPA_BWD_QDESC,  CUDNN_ATTR_OPERATION_SDPA_BWD_KDESC,
		CUDNN_ATTR_OPERATION_SDPA_BWD_VDESC,  CUDNN_ATTR_OPERATION_SDPA_BWD_ODESC,
		CUDNN_ATTR_OPERATION_SDPA_BWD_DODDESC, CUDNN_ATTR_OPERATION_SDPA_BWD_STATSDESC,
		CUDNN_ATTR_OPERATION_SDPA_BWD_DQDESC, CUDNN_ATTR_OPERATION_SDPA_BWD_DKDESC,
		CUDNN_ATTR_OPERATION_SDPA_BWD_DVDESC, CUDNN_ATTR_OPERATION_SDPA_BWD_SCALEDESC,
	};

	cudnn_step = "build the fused SDPA_BWD op";
	if (cg_io(g, BF16, l->q, l->qs, b->q, &t[0]) || cg_io(g, BF16, l->q, l->qs, b->k, &t[1]) ||
	    cg_io(g, BF16, l->v, l->vs, b->v, &t[2]) || cg_io(g, BF16, l->v, l->vs, b->o, &t[3]) ||
	    cg_io(g, BF16, l->v, l->vs, b->dout, &t[4]) || cg_io(g, F32, l->r, l->rs, b->stats, &t[5]) ||
	    cg_io(g, BF16, l->q, l->qs, b->dq, &t[6]) || cg_io(g, BF16, l->q, l->qs, b->dk, &t[7]) ||
	    cg_io(g, BF16, l->v, l->vs, b->dv, &t[8]) || cg_scalar(g, &g->scale, &t[9]) ||
	    cg_new(g, CUDNN_BACKEND_OPERATION_SDPA_BWD_DESCRIPTOR, &op))
		return -1;
	for (int i = 0; i < 10; i++)
		CUDNN_TRY(set_d(op, attr[i], t[i]));
	return cg_op_done(g, op);
#else
	(void)g, (void)l, (void)b;
	snprintf(err_note, sizeof(err_note), "this cuDNN's headers have no SDPA_BWD descriptor (< 9.17)");
	return -1;
#endif
}

/* ---- running the cuDNN items --------------------------------------------------------------------- */

typedef int (*build_fn)(struct cg *g, const struct lay *l, struct dbufs *b);

struct ctx {
	cudnnHandle_t h;
	struct shape *s;
	struct dbufs b;
	struct lay l;
};

/* Build, plan and time one graph; 0 with *ms and the engine/workspace in the row's note. */
static int run_graph(struct ctx *c, struct cg *g, build_fn build, double *ms, struct row *r, const char *what)
{
	char msg[96];

	cg_init(g, c->h);
	if (over_budget()) {
		snprintf(err_note, sizeof(err_note), "skipped: past the %.0f s budget (--budget-s)", opt.budget_s);
		return -1;
	}
	if (build(g, &c->l, &c->b) || cg_finish(g) || time_ms(cg_exec, g, ms))
		return -1;
	snprintf(msg, sizeof(msg), "engine %lld, ws %.1f MB%s", (long long)g->engine, g->ws_bytes / 1048576.0,
		 index_prec == CUDNN_DATA_INT32 ? ", INT32 mask index" : "");
	row_note(r, what, msg);
	return 0;
}

/* run_graph for the composite causal graphs: without a plan (g->plan NULL), once more with the other
 * mask-index math; both failures go into the note. */
static int run_causal(struct ctx *c, struct cg *g, build_fn build, double *ms, struct row *r, const char *what)
{
	char first[sizeof(err_note)];

	if (run_graph(c, g, build, ms, r, what) == 0)
		return 0;
	if (g->plan || cuda_dead || over_budget())
		return -1;
	snprintf(first, sizeof(first), "%s", err_note);
	cg_free(g);
	index_prec = CUDNN_DATA_INT32;
	if (run_graph(c, g, build, ms, r, what) == 0)
		return 0;
	index_prec = CUDNN_DATA_FLOAT;
	{
		char second[sizeof(err_note)];

		snprintf(second, sizeof(second), "%s", err_note);
		snprintf(err_note, sizeof(err_note), "%.380s || with INT32 mask index: %.300s", first, second);
	}
	return -1;
}

static int build_bwd_fn(struct cg *g, const struct lay *l, struct dbufs *b)
{
	return build_bwd(g, l, b, (size_t)(l->q[0] * l->q[1] * l->q[2] * l->q[3]) * sizeof(float));
}

static void graph_fwd(struct ctx *c, struct row *r)
{
	struct cg g;
	char msg[64];

	if (run_causal(c, &g, build_fwd, &r->ms[0], r, "fwd: ") == 0) {
		double lse = abs_diff(c->b.stats, c->s->lse, c->s->nl);

		r->err[0] = rel_err(c->b.o, c->s->out, c->s->nv);
		snprintf(msg, sizeof(msg), "%.1e", lse);
		row_note(r, "stats-lse max abs ", msg);
	} else {
		row_note(r, "fwd FAILED: ", err_note);
	}
	cg_free(&g);
	check_context(r);
}

static void graph_bwd(struct ctx *c, struct row *r)
{
	struct cg g;
	struct shape *s = c->s;
	char msg[96];

	if (run_causal(c, &g, build_bwd_fn, &r->ms[1], r, "bwd: ") == 0) {
		double e[3] = { rel_err(c->b.dq, s->dq, s->nq), rel_err(c->b.dk, s->dk, s->nq),
				rel_err(c->b.dv, s->dv, s->nv) };

		r->err[1] = max_err(max_err(e[0], e[1]), e[2]);
		snprintf(msg, sizeof(msg), "dq %.1e dk %.1e dv %.1e", e[0], e[1], e[2]);
		row_note(r, "", msg);
	} else {
		row_note(r, "bwd FAILED: ", err_note);
	}
	cg_free(&g);
	check_context(r);
}

/* the fused ops: no causal mask, so no error against ours; their outputs are only checked finite */
static void sdpa_rows(struct ctx *c, struct row *r)
{
	struct cg g;

	if (run_graph(c, &g, build_sdpa_fwd, &r->ms[0], r, "fwd: ") == 0) {
		double e = rel_err(c->b.o, c->s->out, c->s->nv);

		row_note(r, isnan(e) ? "O NOT FINITE" : "O finite", "");
	} else {
		row_note(r, "fwd FAILED: ", err_note);
	}
	cg_free(&g);
	check_context(r);
	if (cuda_dead)
		return;
	if (r->ms[0] < 0) {
		row_note(r, "bwd not run: ", "needs the fused forward's O and stats");
		return;
	}
	if (run_graph(c, &g, build_sdpa_bwd, &r->ms[1], r, "bwd: ") != 0)
		row_note(r, "bwd FAILED: ", err_note);
	cg_free(&g);
	check_context(r);
}
#endif /* MOE_HAVE_CUDNN */

/* ---- the unfused lower bound: cuBLAS Q K^T and P V ----------------------------------------------- */

struct gemm_ctx {
	cublasHandle_t h;
	const struct shape *s;
	const uint16_t *q, *k, *v;
	float *S;        /* [H, T, T] fp32 scores of one batch */
	uint16_t *P, *O; /* [H, T, T] bf16 "probabilities" (zeros), [T, H, dv] bf16 output of one batch */
};

/* S_h = Q_h K_h^T and O_h = P_h V_h for every head of every batch (column-major views of our rows) */
static int gemm_step(void *p)
{
	struct gemm_ctx *g = p;
	const int T = g->s->T;
	const float one = 1.0f, zero = 0.0f;

	for (int b = 0; b < g->s->B; b++) {
		const uint16_t *q = g->q + (size_t)b * T * NH * DQ, *k = g->k + (size_t)b * T * NH * DQ;
		const uint16_t *v = g->v + (size_t)b * T * NH * DV;

		if (cublasGemmStridedBatchedEx(g->h, CUBLAS_OP_T, CUBLAS_OP_N, T, T, DQ, &one, k, CUDA_R_16BF,
					       NH * DQ, DQ, q, CUDA_R_16BF, NH * DQ, DQ, &zero, g->S, CUDA_R_32F,
					       T, (long long)T * T, NH, CUBLAS_COMPUTE_32F,
					       CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS ||
		    cublasGemmStridedBatchedEx(g->h, CUBLAS_OP_N, CUBLAS_OP_N, DV, T, T, &one, v, CUDA_R_16BF,
					       NH * DV, DV, g->P, CUDA_R_16BF, T, (long long)T * T, &zero, g->O,
					       CUDA_R_16BF, NH * DV, DV, NH, CUBLAS_COMPUTE_32F,
					       CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
			snprintf(err_note, sizeof(err_note), "cublasGemmStridedBatchedEx failed");
			return -1;
		}
	}
	return 0;
}

static int gemm_alloc(struct gemm_ctx *g)
{
	const size_t tt = (size_t)NH * g->s->T * g->s->T;

	CUDA_TRY(cudaMalloc((void **)&g->S, tt * sizeof(float)));
	CUDA_TRY(cudaMalloc((void **)&g->P, tt * sizeof(uint16_t)));
	CUDA_TRY(cudaMalloc((void **)&g->O, (size_t)g->s->T * NH * DV * sizeof(uint16_t)));
	CUDA_TRY(cudaMemsetAsync(g->P, 0, tt * sizeof(uint16_t), stream()));
	return 0;
}

static void gemm_run(struct gemm_ctx *g, struct row *r)
{
	if (cublasCreate(&g->h) != CUBLAS_STATUS_SUCCESS) {
		row_note(r, "FAILED: ", "cublasCreate");
		return;
	}
	cublasSetStream(g->h, stream());
	if (gemm_alloc(g) || time_ms(gemm_step, g, &r->ms[0]))
		row_note(r, "FAILED: ", err_note);
	else
		row_note(r, "lower bound of an unfused forward: QK^T + PV only, full TxT, no softmax", "");
	check_context(r);
	cublasDestroy(g->h);
}

/* the cuBLAS row of one shape, on bf16 copies of its inputs */
static void run_cublas(const struct shape *s)
{
	struct gemm_ctx g = { .s = s };
	struct row r;
	uint16_t *q = upload_bf16(s->hq, s->nq), *k = upload_bf16(s->hk, s->nq), *v = upload_bf16(s->hv, s->nv);

	g.q = q;
	g.k = k;
	g.v = v;
	row_init(&r, "cublas 2-gemm bf16 (no mask)", s->B, s->T, false);
	gemm_run(&g, &r);
	print_row(&r);
	if (cuda_dead)
		return;
	cudaFree(g.S);
	cudaFree(g.P);
	cudaFree(g.O);
	moe_cuda_free(q);
	moe_cuda_free(k);
	moe_cuda_free(v);
}

/* ---- the cuDNN phase ----------------------------------------------------------------------------- */

static double graph_ms[NSHAPES][2]; /* cuDNN graph rows, for the summary; < 0: none */

#ifdef MOE_HAVE_CUDNN
static void cudnn_shape(cudnnHandle_t h, struct shape *s, int i)
{
	struct ctx c = { .h = h, .s = s };
	struct row r, f;

	lay_init(&c.l, s->B, s->T);
	dbufs_init(&c.b, s);
	row_init(&r, "cudnn graph bf16 causal", s->B, s->T, true);
	graph_fwd(&c, &r);
	if (!cuda_dead)
		graph_bwd(&c, &r);
	print_row(&r);
	graph_ms[i][0] = r.ms[0];
	graph_ms[i][1] = r.ms[1];
	row_init(&f, "cudnn sdpa-op bf16 (NO mask)", s->B, s->T, false);
	if (opt.sdpa_op && !cuda_dead) {
		sdpa_rows(&c, &f);
		print_row(&f);
	}
	if (r.ms[0] < 0 && f.ms[0] < 0 && !cuda_dead && !over_budget())
		run_cublas(s);
	dbufs_free(&c.b);
}

/* The cuDNN rows of every shape; -1 when cuDNN could not even be initialised. */
static int run_cudnn(struct shape *sh)
{
	cudnnHandle_t h;
	cudnnStatus_t st = cudnnCreate(&h);

	if (st != CUDNN_STATUS_SUCCESS) {
		cudnn_step = "cudnnCreate";
		cudnn_fail(st, "cudnnCreate(&h)", __LINE__);
		printf("cudnn: FAILED: %s\n", err_note);
		return -1;
	}
	st = cudnnSetStream(h, stream());
	if (st != CUDNN_STATUS_SUCCESS) {
		cudnn_step = "cudnnSetStream";
		cudnn_fail(st, "cudnnSetStream(h, stream())", __LINE__);
		printf("cudnn: FAILED: %s\n", err_note);
	} else {
		for (int i = 0; i < NSHAPES && !cuda_dead; i++)
			cudnn_shape(h, &sh[i], i);
	}
	cudnnDestroy(h);
	return st == CUDNN_STATUS_SUCCESS ? 0 : -1;
}
#endif

/* ---- main ---------------------------------------------------------------------------------------- */

static int parse(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		bool val = i + 1 < argc;

		if (!strcmp(a, "--no-cudnn"))
			opt.cudnn = false;
		else if (!strcmp(a, "--no-sdpa-op"))
			opt.sdpa_op = false;
		else if (val && !strcmp(a, "--reps"))
			opt.reps = atoi(argv[++i]);
		else if (val && !strcmp(a, "--warmup"))
			opt.warmup = atoi(argv[++i]);
		else if (val && !strcmp(a, "--budget-s"))
			opt.budget_s = atof(argv[++i]);
		else
			return -1;
	}
	opt.reps = opt.reps < 1 ? 1 : opt.reps;
	opt.warmup = opt.warmup < 0 ? 0 : opt.warmup;
	return 0;
}

static void print_header(void)
{
	struct cudaDeviceProp p;
	int rt = 0, drv = 0;

	memset(&p, 0, sizeof(p));
	cudaGetDeviceProperties(&p, 0);
	cudaRuntimeGetVersion(&rt);
	cudaDriverGetVersion(&drv);
	printf("bench_attention: %s (sm_%d%d, %d SMs, %.0f GiB), CUDA runtime %d, driver %d\n", p.name, p.major,
	       p.minor, p.multiProcessorCount, p.totalGlobalMem / 1073741824.0, rt, drv);
#ifdef MOE_HAVE_CUDNN
	printf("cuDNN: library %zu (built with cudart %zu), headers %d\n", cudnnGetVersion(), cudnnGetCudartVersion(),
	       CUDNN_VERSION);
#else
	printf("cuDNN: not linked into this build (CMake found no libcudnn / cudnn.h)\n");
#endif
	printf("shape: H=%d dq=%d dv=%d, causal, scale 1/sqrt(%d); mean of %d calls after %d warm-ups "
	       "(cudaEvent)\n", NH, DQ, DV, DQ, opt.reps, opt.warmup);
	printf("FLOPs: fwd 2*pairs*(dq+dv), bwd 2*pairs*(3*dq+2*dv) (QK^T, dO V^T, P^T dO, dS K, dS^T Q), pairs = "
	       "B*H*T*(T+1)/2 (causal) or B*H*T*T (rows marked no mask)\n");
	printf("err: max|x - ours| / max|ours| (fwd O; bwd max over dQ, dK, dV); cuDNN bf16 vs ours fp32 on the "
	       "same bf16-exact inputs\n\n");
	print_columns();
}

/* per shape: cuDNN graph time / ours; "ratio" lines are what tests/gpu/run_bundle.sh quotes */
static void print_summary(const struct shape *sh)
{
	int faster = 0, measured = 0;

	printf("\n");
	for (int i = 0; i < NSHAPES; i++) {
		char d[2][16];

		for (int j = 0; j < 2; j++)
			cell(d[j], sizeof(d[j]), graph_ms[i][j] > 0 && sh[i].ms[j] > 0 ? graph_ms[i][j] / sh[i].ms[j] : -1.0,
			     "%.3f");
		if (graph_ms[i][0] > 0 || graph_ms[i][1] > 0)
			printf("ratio B=%d T=%d cudnn-graph/ours time: fwd %s bwd %s\n", sh[i].B, sh[i].T, d[0], d[1]);
		if (graph_ms[i][0] <= 0 || graph_ms[i][1] <= 0 || sh[i].ms[0] <= 0 || sh[i].ms[1] <= 0)
			continue;
		measured++;
		faster += graph_ms[i][0] + graph_ms[i][1] < sh[i].ms[0] + sh[i].ms[1];
	}
	if (measured == 0)
		printf("ratio none: no shape has both cuDNN graph directions measured\n");
	else
		printf("faster fwd+bwd: cudnn graph at %d of %d shapes measured\n", faster, measured);
	printf("elapsed %.1f s%s\n", now_s() - t_start, cuda_dead ? " (stopped after a CUDA error)" : "");
}

static int cudnn_rows(struct shape *sh)
{
#ifdef MOE_HAVE_CUDNN
	return run_cudnn(sh);
#else
	(void)sh;
	printf("cudnn: not linked into this build\n");
	return -1;
#endif
}

static int bench(void)
{
	struct shape sh[NSHAPES];

	CUDA_CHECK(cudaEventCreate(&ev0));
	CUDA_CHECK(cudaEventCreate(&ev1));
	print_header();
	for (int i = 0; i < NSHAPES; i++) {
		graph_ms[i][0] = graph_ms[i][1] = -1.0;
		shape_init(&sh[i], shape_bt[i][0], shape_bt[i][1]);
		run_ours(&sh[i]);
	}
	if (opt.cudnn && cudnn_rows(sh) != 0) /* no cuDNN at all: the unfused lower bound instead */
		for (int i = 0; i < NSHAPES && !cuda_dead && !over_budget(); i++)
			run_cublas(&sh[i]);
	print_summary(sh);
	if (cuda_dead)
		return 0; /* the context is unusable: freeing would abort */
	for (int i = 0; i < NSHAPES; i++)
		shape_free(&sh[i]);
	cudaEventDestroy(ev0);
	cudaEventDestroy(ev1);
	moe_cuda_shutdown();
	return 0;
}

int main(int argc, char **argv)
{
	t_start = now_s();
	scale = 1.0f / sqrtf((float)DQ);
	if (parse(argc, argv)) {
		fprintf(stderr, "usage: %s [--reps N] [--warmup N] [--budget-s S] [--no-cudnn] [--no-sdpa-op]\n",
			argv[0]);
		return 2;
	}
	if (moe_cuda_device_count() <= 0) {
		printf("bench_attention: no CUDA device visible (moe_cuda_device_count() = 0); nothing measured\n");
		return 0;
	}
	if (moe_cuda_init(0) != 0) {
		printf("bench_attention: moe_cuda_init(0) failed although a device is visible (see stderr)\n");
		return 1;
	}
	return bench();
}

#endif /* MOE_HAVE_CUDA */
