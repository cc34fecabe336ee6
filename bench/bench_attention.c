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
 * once a device is known to exist.  The graphs are model/cuda/cudnn_graph.c's, the very code behind the GPU
 * model's attention (train.attention), with cuDNN loaded by dlopen; without cuDNN's headers at build time
 * (MOE_HAVE_CUDNN_H) or the library at run time the cuDNN rows are replaced by the cuBLAS lower bound.
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
#include "model/cuda/cudnn_graph.h"

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

#ifdef MOE_HAVE_CUDNN_H
/* =================================================================================================== */
/* cuDNN's graphs: model/cuda/cudnn_graph.c, the code the GPU model's attention runs (train.attention)  */
/* =================================================================================================== */

static struct cudnn_api api; /* dlopen'ed libcudnn */

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

struct ctx {
	cudnnHandle_t h;
	struct shape *s;
	struct dbufs b;
	struct cg_shape cs;
};

/* one graph and its bindings, for time_ms */
struct run {
	struct cudnn_graph g;
	void *ptr[CG_NSLOTS];
};

static int run_exec(void *p)
{
	struct run *r = p;

	if (cudnn_graph_exec(&r->g, r->ptr) == 0)
		return 0;
	snprintf(err_note, sizeof(err_note), "%s", r->g.err);
	return -1;
}

/* the slots of kind: the composite backward reads our O and lse, the fused one its forward's */
static void bind(struct run *r, struct ctx *c, enum cg_kind kind)
{
	struct dbufs *b = &c->b;

	memset(r->ptr, 0, sizeof(r->ptr));
	r->ptr[CG_Q] = b->q;
	r->ptr[CG_K] = b->k;
	r->ptr[CG_V] = b->v;
	r->ptr[CG_SCALE] = &scale;
	r->ptr[CG_O] = kind == CG_ATTN_BWD ? b->oref : b->o;
	r->ptr[CG_STATS] = kind == CG_ATTN_BWD ? b->lse : b->stats;
	r->ptr[CG_DO] = b->dout;
	r->ptr[CG_DQ] = b->dq;
	r->ptr[CG_DK] = b->dk;
	r->ptr[CG_DV] = b->dv;
	r->ptr[CG_SSUM] = b->ssum;
	r->ptr[CG_DQACC] = b->dqacc;
}

/* Build, plan and time one graph; 0 with *ms and the engine/workspace in the row's note. */
static int run_graph(struct ctx *c, struct run *r, enum cg_kind kind, double *ms, struct row *row,
		     const char *what)
{
	char msg[96];

	memset(&r->g, 0, sizeof(r->g));
	if (over_budget()) {
		snprintf(err_note, sizeof(err_note), "skipped: past the %.0f s budget (--budget-s)", opt.budget_s);
		return -1;
	}
	bind(r, c, kind);
	if (cudnn_graph_make(&r->g, &api, c->h, kind, &c->cs)) {
		snprintf(err_note, sizeof(err_note), "%s", r->g.err);
		return -1;
	}
	if (time_ms(run_exec, r, ms))
		return -1;
	snprintf(msg, sizeof(msg), "engine %lld, ws %.1f MB%s", (long long)r->g.engine, r->g.ws_bytes / 1048576.0,
		 r->g.index_prec == CUDNN_DATA_INT32 ? ", INT32 mask index" : "");
	row_note(row, what, msg);
	return 0;
}

static void run_free(struct run *r)
{
	if (!cuda_dead) /* freeing the workspace in a lost context would abort */
		cudnn_graph_free(&r->g);
}

static void graph_fwd(struct ctx *c, struct row *r)
{
	static struct run g;
	char msg[64];

	if (run_graph(c, &g, CG_ATTN_FWD, &r->ms[0], r, "fwd: ") == 0) {
		double lse = abs_diff(c->b.stats, c->s->lse, c->s->nl);

		r->err[0] = rel_err(c->b.o, c->s->out, c->s->nv);
		snprintf(msg, sizeof(msg), "%.1e", lse);
		row_note(r, "stats-lse max abs ", msg);
	} else {
		row_note(r, "fwd FAILED: ", err_note);
	}
	run_free(&g);
	check_context(r);
}

static void graph_bwd(struct ctx *c, struct row *r)
{
	static struct run g;
	struct shape *s = c->s;
	char msg[96];

	if (run_graph(c, &g, CG_ATTN_BWD, &r->ms[1], r, "bwd: ") == 0) {
		double e[3] = { rel_err(c->b.dq, s->dq, s->nq), rel_err(c->b.dk, s->dk, s->nq),
				rel_err(c->b.dv, s->dv, s->nv) };

		r->err[1] = max_err(max_err(e[0], e[1]), e[2]);
		snprintf(msg, sizeof(msg), "dq %.1e dk %.1e dv %.1e", e[0], e[1], e[2]);
		row_note(r, "", msg);
	} else {
		row_note(r, "bwd FAILED: ", err_note);
	}
	run_free(&g);
	check_context(r);
}

/* the fused ops: no causal mask, so no error against ours; their outputs are only checked finite */
static void sdpa_rows(struct ctx *c, struct row *r)
{
	static struct run g;

	if (run_graph(c, &g, CG_SDPA_FWD, &r->ms[0], r, "fwd: ") == 0) {
		double e = rel_err(c->b.o, c->s->out, c->s->nv);

		row_note(r, isnan(e) ? "O NOT FINITE" : "O finite", "");
	} else {
		row_note(r, "fwd FAILED: ", err_note);
	}
	run_free(&g);
	check_context(r);
	if (cuda_dead)
		return;
	if (r->ms[0] < 0) {
		row_note(r, "bwd not run: ", "needs the fused forward's O and stats");
		return;
	}
	if (run_graph(c, &g, CG_SDPA_BWD, &r->ms[1], r, "bwd: ") != 0)
		row_note(r, "bwd FAILED: ", err_note);
	run_free(&g);
	check_context(r);
}
#endif /* MOE_HAVE_CUDNN_H */

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

#ifdef MOE_HAVE_CUDNN_H
static void cudnn_shape(cudnnHandle_t h, struct shape *s, int i)
{
	struct ctx c = { .h = h, .s = s, .cs = { s->B, s->T, NH, DQ, DV } };
	struct row r, f;

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

/* The cuDNN rows of every shape; -1 when cuDNN could not even be loaded or initialised. */
static int run_cudnn(struct shape *sh)
{
	cudnnHandle_t h;
	cudnnStatus_t st;

	if (!api.lib) {
		printf("cudnn: FAILED: %s\n", err_note);
		return -1;
	}
	st = api.create(&h);
	if (st == CUDNN_STATUS_SUCCESS) {
		st = api.set_stream(h, stream());
		if (st == CUDNN_STATUS_SUCCESS)
			for (int i = 0; i < NSHAPES && !cuda_dead; i++)
				cudnn_shape(h, &sh[i], i);
		api.destroy(h);
	}
	if (st != CUDNN_STATUS_SUCCESS)
		printf("cudnn: FAILED: cudnnCreate / cudnnSetStream: %s\n", api.error_string(st));
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
#ifdef MOE_HAVE_CUDNN_H
	if (cudnn_api_load(&api, NULL, err_note, sizeof(err_note)) == 0)
		printf("cuDNN: library %zu (loaded with dlopen), headers %d\n", api.get_version(), CUDNN_VERSION);
	else
		printf("cuDNN: not loaded: %s\n", err_note);
#else
	printf("cuDNN: this build has no cuDNN headers (CMake found no cudnn_backend.h)\n");
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
#ifdef MOE_HAVE_CUDNN_H
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
