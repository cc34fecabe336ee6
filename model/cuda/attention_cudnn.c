/*
 * model/cuda/attention_cudnn.c - the cuDNN path of attention_forward_cuda / attention_backward_cuda
 * (train.attention, ops_cuda.h): cuDNN loaded with dlopen (cudnn_graph.h), one handle on the backend's
 * stream, and per shape (B, T, H, dq, dv) a cache entry with its forward and backward graphs, planned once,
 * and the bf16 staging buffers the graphs read and write.
 *
 * The model keeps its activations in fp32, so a call converts: forward q, k, v -> bf16, the graph writes
 * bf16 O (-> fp32 out) and the fp32 stats straight into the caller's lse (same layout and meaning as our
 * kernel's, so either backward can follow either forward); backward q, k, v, out, dout -> bf16, then
 * dq += the graph's fp32 dQ accumulator, dk, dv += its bf16 dK, dV (the ops accumulate).
 *
 * A shape cuDNN cannot plan is remembered as failed and runs on our kernel (one line on stderr the first
 * time); so does a run that fails.  Not bit-reproducible run to run: cuDNN's backward accumulates dQ
 * with atomics.  train.attention=own keeps our deterministic kernel.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <string.h>

#include "model/cuda/attention_int.h"
#include "model/cuda/ops_cuda.h"

int attention_choose(const char *mode, const char *why_not)
{
	if (!strcmp(mode, "own"))
		return 0;
	if (!strcmp(mode, "auto"))
		return why_not ? 0 : 1;
	if (!strcmp(mode, "cudnn"))
		return why_not ? -1 : 1;
	return -1;
}

#ifdef MOE_HAVE_CUDNN_H

#include "model/cuda/cudnn_graph.h"

#define MAX_SHAPES 8 /* shapes cached; the oldest is dropped for a new one past this */

struct entry {
	struct cg_shape s;
	int state[2];                    /* forward, backward graph: 0 not built, 1 planned, -1 no plan */
	struct cudnn_graph g[2];
	uint16_t *q, *k, *v, *o, *dout;  /* bf16 staging */
	uint16_t *dq, *dk, *dv;
	float *ssum, *dqacc;
};

static struct {
	int impl;            /* 1: cuDNN replaces our kernel */
	int loaded;          /* api and handle ready */
	struct cudnn_api api;
	cudnnHandle_t h;
	struct entry ent[MAX_SHAPES];
	int n, next;         /* entries in use; the one to replace next when full */
} cu;

static size_t nq(const struct cg_shape *s) { return (size_t)(s->B * s->T * s->H * s->dq); }
static size_t nv(const struct cg_shape *s) { return (size_t)(s->B * s->T * s->H * s->dv); }

static void entry_free(struct entry *e)
{
	void *p[] = { e->q, e->k, e->v, e->o, e->dout, e->dq, e->dk, e->dv, e->ssum, e->dqacc };

	for (int i = 0; i < 2; i++)
		if (e->state[i] != 0)
			cudnn_graph_free(&e->g[i]);
	for (size_t i = 0; i < sizeof(p) / sizeof(p[0]); i++)
		moe_cuda_free(p[i]);
	memset(e, 0, sizeof(*e));
}

static void entry_alloc(struct entry *e)
{
	const size_t b2 = sizeof(uint16_t), q = nq(&e->s) * b2, v = nv(&e->s) * b2;

	e->q = moe_cuda_malloc(q);
	e->k = moe_cuda_malloc(q);
	e->v = moe_cuda_malloc(v);
	e->o = moe_cuda_malloc(v);
	e->dout = moe_cuda_malloc(v);
	e->dq = moe_cuda_malloc(q);
	e->dk = moe_cuda_malloc(q);
	e->dv = moe_cuda_malloc(v);
	e->ssum = moe_cuda_malloc((size_t)(e->s.B * e->s.H * e->s.T) * sizeof(float));
	e->dqacc = moe_cuda_malloc(nq(&e->s) * sizeof(float));
}

static struct entry *entry_get(const struct cg_shape *s)
{
	struct entry *e;

	for (int i = 0; i < cu.n; i++)
		if (!memcmp(&cu.ent[i].s, s, sizeof(*s)))
			return &cu.ent[i];
	if (cu.n < MAX_SHAPES) {
		e = &cu.ent[cu.n++];
	} else {
		e = &cu.ent[cu.next];
		cu.next = (cu.next + 1) % MAX_SHAPES;
		moe_cuda_synchronize(); /* its buffers may still be in use by queued work */
		entry_free(e);
	}
	e->s = *s;
	return e;
}

/* The planned graph (0 forward, 1 backward) of e, building it on first use; NULL if cuDNN has none. */
static struct cudnn_graph *graph(struct entry *e, int dir, int quiet)
{
	if (e->state[dir] == 0) {
		int rc = cudnn_graph_make(&e->g[dir], &cu.api, cu.h, dir ? CG_ATTN_BWD : CG_ATTN_FWD, &e->s);

		e->state[dir] = rc ? -1 : 1;
		if (rc && !quiet)
			fprintf(stderr, "attention: cuDNN has no %s plan for B=%lld T=%lld H=%lld dq=%lld dv=%lld, our "
				"kernel runs it: %s\n", dir ? "backward" : "forward", (long long)e->s.B,
				(long long)e->s.T, (long long)e->s.H, (long long)e->s.dq, (long long)e->s.dv,
				e->g[dir].err);
		if (rc)
			cudnn_graph_free(&e->g[dir]);
		else if (!e->q)
			entry_alloc(e);
	}
	return e->state[dir] == 1 ? &e->g[dir] : NULL;
}

/* A failed run: report once, and let our kernel run this shape from now on. */
static int run_failed(struct entry *e, int dir)
{
	fprintf(stderr, "attention: the cuDNN %s graph failed, our kernel runs this shape from now on: %s\n",
		dir ? "backward" : "forward", e->g[dir].err);
	cudnn_graph_free(&e->g[dir]);
	e->state[dir] = -1;
	return -1;
}

static struct entry *lookup(int B, int T, int H, int dq, int dv)
{
	struct cg_shape s = { B, T, H, dq, dv };

	if (!cu.impl || cudnn_graph_unsupported(&s))
		return NULL;
	return entry_get(&s);
}

/* q, k, v into e's bf16 staging, bound in p with the scale */
static void stage_qkv(struct entry *e, void *p[CG_NSLOTS], const float *q, const float *k, const float *v,
		      float *scale)
{
	attn_to_bf16(e->q, q, nq(&e->s));
	attn_to_bf16(e->k, k, nq(&e->s));
	attn_to_bf16(e->v, v, nv(&e->s));
	p[CG_Q] = e->q;
	p[CG_K] = e->k;
	p[CG_V] = e->v;
	p[CG_SCALE] = scale;
}

int attention_cudnn_forward(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T,
			    int H, int dq, int dv, float scale)
{
	struct entry *e = lookup(B, T, H, dq, dv);
	struct cudnn_graph *g = e ? graph(e, 0, 0) : NULL;
	void *p[CG_NSLOTS] = { 0 };

	if (!g)
		return -1;
	stage_qkv(e, p, q, k, v, &scale);
	p[CG_O] = e->o;
	p[CG_STATS] = lse;
	if (cudnn_graph_exec(g, p))
		return run_failed(e, 0);
	attn_from_bf16(out, e->o, nv(&e->s), 0);
	return 0;
}

int attention_cudnn_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
			     const float *lse, const float *q, const float *k, const float *v, int B, int T, int H,
			     int dq_dim, int dv_dim, float scale)
{
	struct entry *e = lookup(B, T, H, dq_dim, dv_dim);
	struct cudnn_graph *g = e ? graph(e, 1, 0) : NULL;
	void *p[CG_NSLOTS] = { 0 };

	if (!g)
		return -1;
	stage_qkv(e, p, q, k, v, &scale);
	attn_to_bf16(e->o, out, nv(&e->s));
	attn_to_bf16(e->dout, dout, nv(&e->s));
	p[CG_O] = e->o;
	p[CG_DO] = e->dout;
	p[CG_STATS] = (void *)lse; /* read only: the graph has it as an input */
	p[CG_DQ] = e->dq;
	p[CG_DK] = e->dk;
	p[CG_DV] = e->dv;
	p[CG_SSUM] = e->ssum;
	p[CG_DQACC] = e->dqacc;
	if (cudnn_graph_exec(g, p))
		return run_failed(e, 1);
	if (dq)
		attn_add_packed(dq, e->dqacc, B, T, H, dq_dim);
	if (dk)
		attn_from_bf16(dk, e->dk, nq(&e->s), 1);
	if (dv)
		attn_from_bf16(dv, e->dv, nv(&e->s), 1);
	return 0;
}

/* Load cuDNN and make the handle; NULL, or why not (kept for the next call too). */
static const char *load(void)
{
	static char why[640];
	cudnnStatus_t st;

	if (cu.loaded)
		return NULL;
	if (why[0])
		return why;
	if (cudnn_api_load(&cu.api, NULL, why, sizeof(why)))
		return why;
	st = cu.api.create(&cu.h);
	if (st == CUDNN_STATUS_SUCCESS)
		st = cu.api.set_stream(cu.h, (cudaStream_t)moe_cuda_stream());
	if (st != CUDNN_STATUS_SUCCESS) {
		snprintf(why, sizeof(why), "cudnnCreate / cudnnSetStream: %s", cu.api.error_string(st));
		cudnn_api_unload(&cu.api);
		return why;
	}
	cu.loaded = 1;
	return NULL;
}

/* Why cuDNN cannot run shape s (NULL: it can, both graphs planned). */
static const char *probe(const struct cg_shape *s, char *buf, size_t len)
{
	const char *why = load();
	struct entry *e;

	if (why)
		return why;
	if ((why = cudnn_graph_unsupported(s)))
		return why;
	e = entry_get(s);
	for (int dir = 0; dir < 2; dir++)
		if (!graph(e, dir, 1)) {
			snprintf(buf, len, "no %s plan: %s", dir ? "backward" : "forward", e->g[dir].err);
			return buf;
		}
	return NULL;
}

int attention_cuda_configure(const char *mode, int B, int T, int H, int dq, int dv, char *msg, size_t len)
{
	struct cg_shape s = { B, T, H, dq, dv };
	char buf[900];
	const char *why = strcmp(mode, "own") ? probe(&s, buf, sizeof(buf)) : "train.attention=own";
	int c = attention_choose(mode, why);

	if (c < 0) {
		snprintf(msg, len, "train.attention=%s: cuDNN cannot run attention at B=%d T=%d H=%d dq=%d dv=%d: %s",
			 mode, B, T, H, dq, dv, why ? why : "unknown mode (auto | cudnn | own)");
		return -1;
	}
	cu.impl = c;
	if (c) {
		struct entry *e = entry_get(&s);
		size_t v = cu.api.get_version();

		snprintf(msg, len, "attention: cuDNN %zu.%zu.%zu graphs (bf16, fp32 stats; engines fwd %lld bwd %lld, "
			 "workspace %.1f + %.1f MiB) at B=%d T=%d H=%d dq=%d dv=%d", v / 10000, v / 100 % 100, v % 100,
			 (long long)e->g[0].engine, (long long)e->g[1].engine, e->g[0].ws_bytes / 1048576.0,
			 e->g[1].ws_bytes / 1048576.0, B, T, H, dq, dv);
	} else {
		snprintf(msg, len, "attention: our kernel (%s%s)", strcmp(mode, "own") ? "auto: " : "", why);
	}
	return 0;
}

const char *attention_cuda_impl(void)
{
	return cu.impl ? "cudnn" : "own";
}

void attention_cuda_release(void)
{
	if (cu.n)
		moe_cuda_synchronize();
	for (int i = 0; i < cu.n; i++)
		entry_free(&cu.ent[i]);
	cu.n = cu.next = 0;
	cu.impl = 0;
	if (cu.loaded) {
		cu.api.destroy(cu.h);
		cudnn_api_unload(&cu.api);
		cu.loaded = 0;
	}
}

#else /* !MOE_HAVE_CUDNN_H: a build without cuDNN's headers (the emulator's) always runs our kernel */

int attention_cudnn_forward(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T,
			    int H, int dq, int dv, float scale)
{
	(void)out, (void)lse, (void)q, (void)k, (void)v, (void)B, (void)T, (void)H, (void)dq, (void)dv, (void)scale;
	return -1;
}

int attention_cudnn_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
			     const float *lse, const float *q, const float *k, const float *v, int B, int T, int H,
			     int dq_dim, int dv_dim, float scale)
{
	(void)dq, (void)dk, (void)dv, (void)dout, (void)out, (void)lse, (void)q, (void)k, (void)v, (void)B;
	(void)T, (void)H, (void)dq_dim, (void)dv_dim, (void)scale;
	return -1;
}

int attention_cuda_configure(const char *mode, int B, int T, int H, int dq, int dv, char *msg, size_t len)
{
	const char *why = strcmp(mode, "own") ? "this build has no cuDNN headers" : "train.attention=own";

	if (attention_choose(mode, why) < 0) {
		snprintf(msg, len, "train.attention=%s: cuDNN cannot run attention at B=%d T=%d H=%d dq=%d dv=%d: %s",
			 mode, B, T, H, dq, dv, strcmp(mode, "cudnn") ? "unknown mode (auto | cudnn | own)" : why);
		return -1;
	}
	snprintf(msg, len, "attention: our kernel (%s%s)", strcmp(mode, "own") ? "auto: " : "", why);
	return 0;
}

const char *attention_cuda_impl(void)
{
	return "own";
}

void attention_cuda_release(void)
{
}

#endif
