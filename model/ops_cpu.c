/*
 * model/ops_cpu.c - CPU reference implementation of model/ops.h.
 *
 * float32, deterministic: every reduction runs in a fixed order whatever the thread count (OpenMP loops
 * split independent rows; sums across rows run serially).
 *
 * Matrix products go through cblas_sgemm, always single-threaded: the project links the OpenMP build of
 * OpenBLAS, and a product issued inside one of our (active) parallel regions runs on the calling thread.
 * A large product is cut into tiles by a rule that depends on its shape only, and the tiles are shared
 * among the threads: OpenBLAS's own threading is not used, because its kernels may round an element
 * differently depending on where the thread partition falls (seen with the Haswell and Zen kernels),
 * which would make the results depend on the thread count.
 */
#include "model/ops.h"

#include "model/layers.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ATTN_QBLOCK 64  /* query rows per attention block: scratch is ATTN_QBLOCK x T per thread */

/* ---------------------------------------------------------------- tiled products */

/* C[M,N] = alpha op(A)[M,K] op(B)[K,N] + beta C, row-major, cut into ntiles blocks of chunk rows (split_m)
 * or columns */
struct gemm_job {
	enum CBLAS_TRANSPOSE ta, tb;
	int M, N, K, lda, ldb, ldc;
	float alpha, beta;
	const float *A, *B;
	float *C;
	int split_m, chunk, ntiles;
};

#define GEMM_TILE_MIN_FLOPS 16e6  /* a tile is at least this much work (about 0.1 ms on one core) */
#define GEMM_MAX_TILES 16

/*
 * The tiling, from the shape alone.  The larger output dimension is cut, so each tile re-packs the
 * smaller operand; the tile count keeps that re-packing under 1/256 of the product's flops.
 */
static struct gemm_job gemm_job(enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb, int M, int N, int K,
				float alpha, const float *A, int lda, const float *B, int ldb, float beta, float *C,
				int ldc)
{
	struct gemm_job g = { ta, tb, M, N, K, lda, ldb, ldc, alpha, beta, A, B, C, M >= N, M >= N ? M : N, 1 };
	double flops = 2.0 * M * N * K, repack = g.split_m ? (double)K * N : (double)M * K;
	int dim = g.chunk;
	double nt = flops / GEMM_TILE_MIN_FLOPS;
	if (repack > 0 && nt > flops / (256.0 * repack))
		nt = flops / (256.0 * repack);
	if (nt > GEMM_MAX_TILES)
		nt = GEMM_MAX_TILES;
	if (nt > dim / 16)
		nt = dim / 16;
	if (nt >= 2) {
		int chunk = (dim + (int)nt - 1) / (int)nt;
		g.chunk = (chunk + 15) / 16 * 16;
		g.ntiles = (dim + g.chunk - 1) / g.chunk;
	}
	return g;
}

static void gemm_tile(const struct gemm_job *g, int t)
{
	int dim = g->split_m ? g->M : g->N, o = t * g->chunk;
	int len = dim - o < g->chunk ? dim - o : g->chunk;
	const float *A = g->A, *B = g->B;
	float *C = g->C;
	int M = g->M, N = g->N;
	if (g->split_m) {
		A += g->ta == CblasNoTrans ? (size_t)o * g->lda : (size_t)o;
		C += (size_t)o * g->ldc;
		M = len;
	} else {
		B += g->tb == CblasNoTrans ? (size_t)o : (size_t)o * g->ldb;
		C += o;
		N = len;
	}
	if (M > 0 && N > 0)
		cblas_sgemm(CblasRowMajor, g->ta, g->tb, M, N, g->K, g->alpha, A, g->lda, B, g->ldb, g->beta, C,
			    g->ldc);
}

/*
 * The tiles of independent products, shared among the threads.  The region is entered whatever the tile
 * count, so that OpenBLAS, called inside it, stays single-threaded; nested in an active region (a task of
 * the layers), the tiles run in turn on the calling thread.
 */
static void gemm_run(const struct gemm_job *jobs, int njobs)
{
	int start[4] = { 0 }, total = 0;
	for (int j = 0; j < njobs; j++) {
		start[j] = total;
		total += jobs[j].ntiles;
	}
#pragma omp parallel for schedule(dynamic, 1)
	for (int t = 0; t < total; t++) {
		int j = njobs - 1;
		while (t < start[j])
			j--;
		gemm_tile(&jobs[j], t - start[j]);
	}
}

void linear_fwd(float *y, const float *x, const float *w, int N, int in, int out, int flags)
{
	struct gemm_job g = gemm_job(CblasNoTrans, CblasTrans, N, out, in, 1.0f, x, in, w, in,
				     flags & LIN_ACC ? 1.0f : 0.0f, y, out);
	if (flags & LIN_SERIAL) {
		g.ntiles = 1;
		g.chunk = g.split_m ? N : out;
		gemm_tile(&g, 0);
		return;
	}
	gemm_run(&g, 1);
}

void linear_bwd(float *dx, float *dw, const float *dy, const float *x, const float *w, int N, int in, int out,
		int flags)
{
	struct gemm_job jobs[2];
	int nj = 0;
	if (dx)
		jobs[nj++] = gemm_job(CblasNoTrans, CblasNoTrans, N, in, out, 1.0f, dy, out, w, in,
				      flags & LIN_SET_DX ? 0.0f : 1.0f, dx, in);
	if (dw)
		jobs[nj++] = gemm_job(CblasTrans, CblasNoTrans, out, in, N, 1.0f, dy, out, x, in, 1.0f, dw, in);
	if (flags & LIN_SERIAL) {
		for (int j = 0; j < nj; j++) {
			jobs[j].ntiles = 1;
			jobs[j].chunk = jobs[j].split_m ? jobs[j].M : jobs[j].N;
			gemm_tile(&jobs[j], 0);
		}
		return;
	}
	gemm_run(jobs, nj);
}

void linear_forward(float *y, const float *x, const float *w, int N, int in, int out)
{
	linear_fwd(y, x, w, N, in, out, 0);
}

void linear_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
		     int N, int in, int out)
{
	linear_bwd(dx, dw, dy, x, w, N, in, out, 0);
}

void embedding_forward(float *out, const int *ids, const float *table, int N, int C)
{
#pragma omp parallel for schedule(static)
	for (int n = 0; n < N; n++)
		memcpy(out + (size_t)n * C, table + (size_t)ids[n] * C, sizeof(float) * C);
}

/* Threads split the columns; each walks the tokens in order, so repeated ids add in token order. */
#define COL_CHUNK 64

void embedding_backward(float *dtable, const float *dout, const int *ids, int N, int C)
{
	int nchunks = (C + COL_CHUNK - 1) / COL_CHUNK;
#pragma omp parallel for schedule(static) if (nchunks > 1 && (size_t)N * C > 16384)
	for (int ch = 0; ch < nchunks; ch++) {
		int c0 = ch * COL_CHUNK, c1 = c0 + COL_CHUNK < C ? c0 + COL_CHUNK : C;
		for (int n = 0; n < N; n++) {
			float *row = dtable + (size_t)ids[n] * C;
			const float *d = dout + (size_t)n * C;
			for (int c = c0; c < c1; c++)
				row[c] += d[c];
		}
	}
}

void rmsnorm_forward(float *y, float *rstd, const float *x, const float *w, int N, int C, float eps)
{
#pragma omp parallel for schedule(static)
	for (int n = 0; n < N; n++) {
		const float *xr = x + (size_t)n * C;
		float *yr = y + (size_t)n * C;
		float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
		for (int c = 0; c < C; c++)
			ss += xr[c] * xr[c];
		float r = 1.0f / sqrtf(ss / C + eps);
		rstd[n] = r;
		for (int c = 0; c < C; c++)
			yr[c] = xr[c] * r * w[c];
	}
}

/* dx rows (stride ldx) are written when set, else accumulated into */
static void rmsnorm_backward_impl(float *dx, int ldx, int set, float *dw, const float *dy, const float *x,
				  const float *w, const float *rstd, int N, int C)
{
	if (dx) {
#pragma omp parallel for schedule(static) if ((size_t)N * C > 8192)
		for (int n = 0; n < N; n++) {
			const float *xr = x + (size_t)n * C, *dyr = dy + (size_t)n * C;
			float *dxr = dx + (size_t)n * ldx;
			float r = rstd[n], dot = 0.0f;
#pragma omp simd reduction(+ : dot)
			for (int c = 0; c < C; c++)
				dot += dyr[c] * w[c] * xr[c];
			float k = dot * r * r * r / C;
			if (set) {
				for (int c = 0; c < C; c++)
					dxr[c] = dyr[c] * w[c] * r - xr[c] * k;
			} else {
				for (int c = 0; c < C; c++)
					dxr[c] += dyr[c] * w[c] * r - xr[c] * k;
			}
		}
	}
	if (dw) {
		/* threads split the columns; each sums over the rows in order */
		enum { CH = 16 };
		int nchunks = (C + CH - 1) / CH;
#pragma omp parallel for schedule(static) if (nchunks > 1 && (size_t)N * C > 8192)
		for (int ch = 0; ch < nchunks; ch++) {
			int c0 = ch * CH, nc = C - c0 < CH ? C - c0 : CH;
			float acc[CH] = { 0 };
			for (int n = 0; n < N; n++) {
				const float *xr = x + (size_t)n * C + c0, *dyr = dy + (size_t)n * C + c0;
				float r = rstd[n];
				for (int c = 0; c < nc; c++)
					acc[c] += dyr[c] * xr[c] * r;
			}
			for (int c = 0; c < nc; c++)
				dw[c0 + c] += acc[c];
		}
	}
}

void rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
		      const float *rstd, int N, int C)
{
	rmsnorm_backward_impl(dx, C, 0, dw, dy, x, w, rstd, N, C);
}

void rmsnorm_backward_set(float *dx, int ldx, float *dw, const float *dy, const float *x, const float *w,
			  const float *rstd, int N, int C)
{
	rmsnorm_backward_impl(dx, ldx, 1, dw, dy, x, w, rstd, N, C);
}

/*
 * sign = +1 rotates forward, -1 applies the inverse (the transpose); both multiply by attention_factor.
 * The (cos, sin) pairs are computed once per call for each distinct position (a table over [min pos,
 * max pos], or per row when the positions are sparser than the rows), in double, then applied to every
 * head.
 */
static void rope_apply(float *x, const int *pos, int N, int nheads, int row_stride, int head_stride,
		       int dr, const double *inv_freq, float attention_factor, float sign)
{
	int half = dr / 2;
	if (N <= 0 || half <= 0)
		return;
	int pmin = pos[0], pmax = pos[0];
	for (int n = 1; n < N; n++) {
		pmin = pos[n] < pmin ? pos[n] : pmin;
		pmax = pos[n] > pmax ? pos[n] : pmax;
	}
	int by_pos = (int64_t)pmax - pmin + 1 <= N;
	int rows = by_pos ? pmax - pmin + 1 : N;
	double scale = attention_factor;
	float *cs = malloc(sizeof(float) * 2 * (size_t)rows * half);
#pragma omp parallel for schedule(static) if (rows * half > 4096)
	for (int r = 0; r < rows; r++) {
		int p = by_pos ? pmin + r : pos[r];
		float *t = cs + (size_t)2 * r * half;
		for (int i = 0; i < half; i++) {
			double angle = (double)p * inv_freq[i];
			t[i] = (float)(scale * cos(angle));
			t[half + i] = sign * (float)(scale * sin(angle));
		}
	}
#pragma omp parallel for schedule(static) if ((size_t)N * nheads * dr > 16384)
	for (int n = 0; n < N; n++) {
		const float *t = cs + (size_t)2 * (by_pos ? pos[n] - pmin : n) * half;
		for (int h = 0; h < nheads; h++) {
			float *p = x + (size_t)n * row_stride + (size_t)h * head_stride;
			for (int i = 0; i < half; i++) {
				float c = t[i], s = t[half + i];
				float a = p[2 * i], b = p[2 * i + 1];
				p[2 * i] = a * c - b * s;
				p[2 * i + 1] = a * s + b * c;
			}
		}
	}
	free(cs);
}

void rope_forward(float *x, const int *pos, int N, int nheads, int row_stride, int head_stride,
		  int dr, const double *inv_freq, float attention_factor)
{
	rope_apply(x, pos, N, nheads, row_stride, head_stride, dr, inv_freq, attention_factor, 1.0f);
}

void rope_backward(float *dx, const int *pos, int N, int nheads, int row_stride, int head_stride,
		   int dr, const double *inv_freq, float attention_factor)
{
	rope_apply(dx, pos, N, nheads, row_stride, head_stride, dr, inv_freq, attention_factor, -1.0f);
}

/* largest of row[0, n) (-inf for n = 0) */
static inline float row_max(const float *row, int n)
{
	float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
	for (int j = 0; j < n; j++)
		mx = row[j] > mx ? row[j] : mx;
	return mx;
}

/* S = scale * Q[i0 : i0+nq] K[0 : nk]^T for one (b, h): [nq, nk] */
static void attn_block_scores(float *S, const float *qh, const float *kh, int ldq, int i0, int nq, int nk,
			      int dq, float scale)
{
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, dq, scale, qh + (size_t)i0 * ldq, ldq,
		    kh, ldq, 0.0f, S, nk);
}

void attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
		       int B, int T, int H, int dq, int dv, float scale)
{
	int nblocks = (T + ATTN_QBLOCK - 1) / ATTN_QBLOCK;
	int ldq = H * dq, ldv = H * dv;
	size_t scratch = ((sizeof(float) * ATTN_QBLOCK * T + 63) / 64) * 64;
#pragma omp parallel
	{
		float *P = aligned_alloc(64, scratch);
		float inv[ATTN_QBLOCK];
		/* largest blocks first: better balance under the dynamic schedule */
#pragma omp for schedule(dynamic, 1)
		for (int task = 0; task < B * H * nblocks; task++) {
			int blk = nblocks - 1 - task / (B * H), bh = task % (B * H), b = bh / H, h = bh % H;
			int i0 = blk * ATTN_QBLOCK;
			int nq = T - i0 < ATTN_QBLOCK ? T - i0 : ATTN_QBLOCK;
			int nk = i0 + nq;
			size_t base = (size_t)b * T * H + h;
			float *lse_bh = lse + (size_t)bh * T;
			attn_block_scores(P, q + base * dq, k + base * dq, ldq, i0, nq, nk, dq, scale);
			/* P = exp(S - rowmax) on the causal part, 0 above it; lse = rowmax + log(rowsum) */
			for (int r = 0; r < nq; r++) {
				float *row = P + (size_t)r * nk;
				int valid = i0 + r + 1;  /* keys 0..i */
				float mx = row_max(row, valid), sum = 0.0f;
#pragma omp simd reduction(+ : sum)
				for (int j = 0; j < valid; j++) {
					float e = exp_fast(row[j] - mx);
					row[j] = e;
					sum += e;
				}
				for (int j = valid; j < nk; j++)
					row[j] = 0.0f;
				lse_bh[i0 + r] = mx + logf(sum);
				inv[r] = 1.0f / sum;
			}
			float *ob = out + (base + (size_t)i0 * H) * dv;
			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, dv, nk, 1.0f, P, nk,
				    v + base * dv, ldv, 0.0f, ob, ldv);
			for (int r = 0; r < nq; r++) {
				float *o = ob + (size_t)r * ldv;
				for (int d = 0; d < dv; d++)
					o[d] *= inv[r];
			}
		}
		free(P);
	}
}

/*
 * With set, the gradients are written rather than accumulated into.  The query blocks run last to first:
 * the last block sees every key, so with set its dK, dV products (beta 0) initialise all of them.
 */
static void attention_backward_impl(float *grad_q, float *grad_k, float *grad_v, const float *dout,
				    const float *out, const float *lse, const float *q, const float *k,
				    const float *v, int B, int T, int H, int dq_dim, int dv_dim, float scale,
				    int set)
{
	int ldq = H * dq_dim, ldv = H * dv_dim;
	int nblocks = (T + ATTN_QBLOCK - 1) / ATTN_QBLOCK;
	size_t scratch = ((sizeof(float) * ATTN_QBLOCK * T + 63) / 64) * 64;
	/* one task per (b, h): dk and dv sum over the query blocks in a fixed order */
#pragma omp parallel
	{
		float *P = aligned_alloc(64, scratch);
		float *dP = aligned_alloc(64, scratch);
#pragma omp for schedule(dynamic, 1)
		for (int bh = 0; bh < B * H; bh++) {
			int b = bh / H, h = bh % H;
			size_t base = (size_t)b * T * H + h;
			const float *qh = q + base * dq_dim, *kh = k + base * dq_dim, *vh = v + base * dv_dim;
			const float *doh = dout + base * dv_dim, *oh = out + base * dv_dim;
			const float *lse_bh = lse + (size_t)bh * T;
			for (int blk = nblocks - 1; blk >= 0; blk--) {
				int i0 = blk * ATTN_QBLOCK;
				int nq = T - i0 < ATTN_QBLOCK ? T - i0 : ATTN_QBLOCK;
				float beta_kv = set && blk == nblocks - 1 ? 0.0f : 1.0f, beta_q = set ? 0.0f : 1.0f;
				int nk = i0 + nq;
				attn_block_scores(P, qh, kh, ldq, i0, nq, nk, dq_dim, scale);
				const float *dob = doh + (size_t)i0 * ldv;
				/* dP = dO V^T */
				cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, dv_dim, 1.0f, dob, ldv,
					    vh, ldv, 0.0f, dP, nk);
				/* P = exp(S - lse); dS = P * (dP - rowsum(dO * O)), times the scale */
				for (int r = 0; r < nq; r++) {
					const float *o_r = oh + (size_t)(i0 + r) * ldv, *do_r = dob + (size_t)r * ldv;
					float D = 0.0f;
#pragma omp simd reduction(+ : D)
					for (int d = 0; d < dv_dim; d++)
						D += do_r[d] * o_r[d];
					float *pr = P + (size_t)r * nk, *dpr = dP + (size_t)r * nk;
					float m = lse_bh[i0 + r];
					int valid = i0 + r + 1;
#pragma omp simd
					for (int j = 0; j < valid; j++) {
						float pj = exp_fast(pr[j] - m);
						pr[j] = pj;
						dpr[j] = pj * (dpr[j] - D) * scale;
					}
					for (int j = valid; j < nk; j++) {
						pr[j] = 0.0f;
						dpr[j] = 0.0f;
					}
				}
				/* dV += P^T dO; dQ += dS K; dK += dS^T Q */
				cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, dv_dim, nq, 1.0f, P, nk,
					    dob, ldv, beta_kv, grad_v + base * dv_dim, ldv);
				cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, dq_dim, nk, 1.0f, dP, nk,
					    kh, ldq, beta_q, grad_q + (base + (size_t)i0 * H) * dq_dim, ldq);
				cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, dq_dim, nq, 1.0f, dP, nk,
					    qh + (size_t)i0 * ldq, ldq, beta_kv, grad_k + base * dq_dim, ldq);
			}
		}
		free(P);
		free(dP);
	}
}

void attention_backward(float *grad_q, float *grad_k, float *grad_v, const float *dout,
			const float *out, const float *lse, const float *q, const float *k, const float *v,
			int B, int T, int H, int dq_dim, int dv_dim, float scale)
{
	attention_backward_impl(grad_q, grad_k, grad_v, dout, out, lse, q, k, v, B, T, H, dq_dim, dv_dim,
				scale, 0);
}

void attention_backward_set(float *grad_q, float *grad_k, float *grad_v, const float *dout,
			    const float *out, const float *lse, const float *q, const float *k,
			    const float *v, int B, int T, int H, int dq_dim, int dv_dim, float scale)
{
	attention_backward_impl(grad_q, grad_k, grad_v, dout, out, lse, q, k, v, B, T, H, dq_dim, dv_dim,
				scale, 1);
}

/* the router's sigmoid: libm expf (the routing decisions stay as they were) */
static inline float sigmoidf(float x)
{
	return 1.0f / (1.0f + expf(-x));
}

/* the SwiGLU sigmoid, vectorisable */
static inline float sigmoid_fast(float x)
{
	return 1.0f / (1.0f + exp_fast(-x));
}

/*
 * The SwiGLU loops: n elements, cut into one chunk per thread when there are enough of them, each chunk
 * one vectorised loop.  (GCC 12 compiled `parallel for simd if (...)` so that the serial case, every
 * decode step's few rows, ran the scalar loop: 4.6 ns an element against 0.5.)  Every element is computed
 * alone, so neither the cut nor the vector width changes a result.
 */
#define ELEMWISE_PARALLEL_MIN 16384

static int elemwise_chunks(size_t n)
{
	return n > ELEMWISE_PARALLEL_MIN ? omp_get_max_threads() : 1;
}

static void swiglu_fwd_range(float *out, const float *gate, const float *up, size_t i0, size_t i1)
{
#pragma omp simd
	for (size_t i = i0; i < i1; i++)
		out[i] = gate[i] * sigmoid_fast(gate[i]) * up[i];
}

void swiglu_forward(float *out, const float *gate, const float *up, size_t n)
{
	int nc = elemwise_chunks(n);
	if (nc == 1) {  /* not even a team of one: a decode step calls this for a few hundred elements */
		swiglu_fwd_range(out, gate, up, 0, n);
		return;
	}
#pragma omp parallel for schedule(static)
	for (int c = 0; c < nc; c++)
		swiglu_fwd_range(out, gate, up, n * c / nc, n * (c + 1) / nc);
}

/* set: dgate, dup = the gradients (both given); else they accumulate (either may be NULL) */
static void swiglu_bwd_range(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
			     size_t i0, size_t i1, int set)
{
	if (set) {
#pragma omp simd
		for (size_t i = i0; i < i1; i++) {
			float g = gate[i], s = sigmoid_fast(g), d = dout[i];
			dgate[i] = d * up[i] * s * (1.0f + g * (1.0f - s));
			dup[i] = d * g * s;
		}
	} else if (dgate && dup) {
#pragma omp simd
		for (size_t i = i0; i < i1; i++) {
			float g = gate[i], s = sigmoid_fast(g);
			dgate[i] += dout[i] * up[i] * s * (1.0f + g * (1.0f - s));
			dup[i] += dout[i] * g * s;
		}
	} else if (dgate) {
#pragma omp simd
		for (size_t i = i0; i < i1; i++) {
			float g = gate[i], s = sigmoid_fast(g);
			dgate[i] += dout[i] * up[i] * s * (1.0f + g * (1.0f - s));
		}
	} else if (dup) {
#pragma omp simd
		for (size_t i = i0; i < i1; i++) {
			float g = gate[i], s = sigmoid_fast(g);
			dup[i] += dout[i] * g * s;
		}
	}
}

static void swiglu_bwd(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
		       size_t n, int set)
{
	int nc = elemwise_chunks(n);
	if (nc == 1) {
		swiglu_bwd_range(dgate, dup, dout, gate, up, 0, n, set);
		return;
	}
#pragma omp parallel for schedule(static)
	for (int c = 0; c < nc; c++)
		swiglu_bwd_range(dgate, dup, dout, gate, up, n * c / nc, n * (c + 1) / nc, set);
}

void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
		     size_t n)
{
	swiglu_bwd(dgate, dup, dout, gate, up, n, 0);
}

void swiglu_backward_set(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
			 size_t n)
{
	swiglu_bwd(dgate, dup, dout, gate, up, n, 1);
}

static float row_logsumexp(const float *row, int V)
{
	float mx = row_max(row, V), sum = 0.0f;
#pragma omp simd reduction(+ : sum)
	for (int j = 0; j < V; j++)
		sum += exp_fast(row[j] - mx);
	return mx + logf(sum);
}

void cross_entropy_forward(float *losses, const float *logits, const int *targets, int N, int V)
{
#pragma omp parallel for schedule(static)
	for (int n = 0; n < N; n++) {
		const float *row = logits + (size_t)n * V;
		losses[n] = targets[n] < 0 ? 0.0f : row_logsumexp(row, V) - row[targets[n]];
	}
}

void cross_entropy_backward_rows(float *dlogits, const float *logits, const int *targets, float dloss,
				 const float *row_scale, int N, int V)
{
#pragma omp parallel for schedule(static)
	for (int n = 0; n < N; n++) {
		const float *row = logits + (size_t)n * V;
		float *drow = dlogits + (size_t)n * V;
		float d = row_scale ? dloss * row_scale[n] : dloss;
		if (targets[n] < 0) {
			memset(drow, 0, sizeof(float) * V);
			continue;
		}
		float lse = row_logsumexp(row, V);
#pragma omp simd
		for (int j = 0; j < V; j++)  /* reads row[j] before writing drow[j]: in place is fine */
			drow[j] = d * exp_fast(row[j] - lse);
		drow[targets[n]] -= d;
	}
}

void cross_entropy_backward(float *dlogits, const float *logits, const int *targets, float dloss,
			    int N, int V)
{
	cross_entropy_backward_rows(dlogits, logits, targets, dloss, NULL, N, V);
}

/* index of the largest value among the allowed ones; ties go to the lower index */
static int argmax_allowed(const float *v, const unsigned char *allowed, int n)
{
	int best = -1;
	for (int i = 0; i < n; i++)
		if (allowed[i] && (best < 0 || v[i] > v[best]))
			best = i;
	return best;
}

static float group_score(const float *choice, int g0, int gsize, enum moe_scoring scoring)
{
	float m1 = -INFINITY, m2 = -INFINITY;
	for (int i = g0; i < g0 + gsize; i++) {
		if (choice[i] > m1) {
			m2 = m1;
			m1 = choice[i];
		} else if (choice[i] > m2) {
			m2 = choice[i];
		}
	}
	/* V2 (softmax): the group's best expert; V3 (sigmoid): the sum of its best two */
	return scoring == MOE_SCORING_SIGMOID ? m1 + m2 : m1;
}

static void route_token(const float *s, const float *bias, const struct router_params *p, float *choice,
			unsigned char *allowed, int *idx, float *w)
{
	int E = p->E, K = p->K, gsize = E / p->n_group;
	for (int e = 0; e < E; e++)
		choice[e] = s[e] + (bias ? bias[e] : 0.0f);
	if (p->n_group > 1 && p->topk_group < p->n_group) {
		float gs[256];  /* n_group is small (DeepSeek: 8); validated <= 256 */
		unsigned char gallowed[256], keep[256];
		for (int g = 0; g < p->n_group; g++) {
			gs[g] = group_score(choice, g * gsize, gsize, p->scoring);
			gallowed[g] = 1;
			keep[g] = 0;
		}
		for (int t = 0; t < p->topk_group; t++) {
			int g = argmax_allowed(gs, gallowed, p->n_group);
			keep[g] = 1;
			gallowed[g] = 0;
		}
		for (int e = 0; e < E; e++)
			allowed[e] = keep[e / gsize];
	} else {
		memset(allowed, 1, E);
	}
	float sum = 0.0f;
	for (int k = 0; k < K; k++) {
		int e = argmax_allowed(choice, allowed, E);
		allowed[e] = 0;
		idx[k] = e;
		w[k] = s[e];
		sum += s[e];
	}
	float c = p->routed_scaling_factor / (p->norm_topk_prob ? sum + 1e-20f : 1.0f);
	for (int k = 0; k < K; k++)
		w[k] *= c;
}

void router_forward(float *scores, int *topk_idx, float *topk_w, const float *logits, const float *bias,
		    const struct router_params *p, int N)
{
	int E = p->E;
#pragma omp parallel
	{
		float *choice = malloc(sizeof(float) * E);
		unsigned char *allowed = malloc(E);
#pragma omp for schedule(static)
		for (int n = 0; n < N; n++) {
			const float *l = logits + (size_t)n * E;
			float *s = scores + (size_t)n * E;
			if (p->scoring == MOE_SCORING_SOFTMAX) {
				float mx = -INFINITY, sum = 0.0f;
				for (int e = 0; e < E; e++)
					mx = l[e] > mx ? l[e] : mx;
				for (int e = 0; e < E; e++)
					sum += (s[e] = expf(l[e] - mx));
				for (int e = 0; e < E; e++)
					s[e] /= sum;
			} else {
				for (int e = 0; e < E; e++)
					s[e] = sigmoidf(l[e]);
			}
			route_token(s, bias, p, choice, allowed, topk_idx + (size_t)n * p->K,
				    topk_w + (size_t)n * p->K);
		}
		free(choice);
		free(allowed);
	}
}

void router_replay_weights(float *topk_w, const float *scores, const int *topk_idx,
			   const struct router_params *p, int N)
{
	int K = p->K;
	for (int n = 0; n < N; n++) {
		const float *s = scores + (size_t)n * p->E;
		const int *idx = topk_idx + (size_t)n * K;
		float *w = topk_w + (size_t)n * K, sum = 0.0f;
		for (int k = 0; k < K; k++) {
			w[k] = s[idx[k]];
			sum += s[idx[k]];
		}
		float c = p->routed_scaling_factor / (p->norm_topk_prob ? sum + 1e-20f : 1.0f);
		for (int k = 0; k < K; k++)
			w[k] *= c;
	}
}

void router_backward(float *dlogits, const float *dtopk_w, const float *dscores, const float *scores,
		     const int *topk_idx, const struct router_params *p, int N)
{
	int E = p->E, K = p->K;
	float c = p->routed_scaling_factor;
#pragma omp parallel
	{
		float *ds = malloc(sizeof(float) * E);
#pragma omp for schedule(static)
		for (int n = 0; n < N; n++) {
			const float *s = scores + (size_t)n * E;
			const int *idx = topk_idx + (size_t)n * K;
			const float *dw = dtopk_w + (size_t)n * K;
			for (int e = 0; e < E; e++)
				ds[e] = dscores ? dscores[(size_t)n * E + e] : 0.0f;
			if (p->norm_topk_prob) {
				/* w_k = c u_k / S, S = sum_j u_j: du_j = c (dw_j / S - sum_k dw_k u_k / S^2) */
				float S = 1e-20f, dot = 0.0f;
				for (int k = 0; k < K; k++) {
					S += s[idx[k]];
					dot += dw[k] * s[idx[k]];
				}
				for (int k = 0; k < K; k++)
					ds[idx[k]] += c * (dw[k] / S - dot / (S * S));
			} else {
				for (int k = 0; k < K; k++)
					ds[idx[k]] += c * dw[k];
			}
			float *dl = dlogits + (size_t)n * E;
			if (p->scoring == MOE_SCORING_SOFTMAX) {
				float dot = 0.0f;
				for (int e = 0; e < E; e++)
					dot += s[e] * ds[e];
				for (int e = 0; e < E; e++)
					dl[e] += s[e] * (ds[e] - dot);
			} else {
				for (int e = 0; e < E; e++)
					dl[e] += ds[e] * s[e] * (1.0f - s[e]);
			}
		}
		free(ds);
	}
}

/* f_i of one sequence: E/(K T) times the number of its tokens routed to expert i */
static void balance_f(float *f, const int *idx, int T, int E, int K)
{
	memset(f, 0, sizeof(float) * E);
	for (int t = 0; t < T * K; t++)
		f[idx[t]] += 1.0f;
	for (int e = 0; e < E; e++)
		f[e] *= (float)E / ((float)K * T);
}

float balance_loss_forward(const float *scores, const int *topk_idx, int B, int T, int E, int K,
			   float alpha)
{
	float *f = malloc(sizeof(float) * E);
	double total = 0.0;
	for (int b = 0; b < B; b++) {
		balance_f(f, topk_idx + (size_t)b * T * K, T, E, K);
		for (int t = 0; t < T; t++) {
			const float *s = scores + ((size_t)b * T + t) * E;
			double Z = 0.0, fs = 0.0;
			for (int e = 0; e < E; e++) {
				Z += s[e];
				fs += (double)f[e] * s[e];
			}
			total += fs / Z / T;
		}
	}
	free(f);
	return (float)(alpha * total / B);
}

void balance_loss_backward(float *dscores, const float *scores, const int *topk_idx, int B, int T,
			   int E, int K, float alpha, float dloss)
{
	float *f = malloc(sizeof(float) * E);
	float g = dloss * alpha / ((float)B * T);
	for (int b = 0; b < B; b++) {
		balance_f(f, topk_idx + (size_t)b * T * K, T, E, K);
		for (int t = 0; t < T; t++) {
			size_t row = ((size_t)b * T + t) * E;
			const float *s = scores + row;
			float Z = 0.0f, fs = 0.0f;
			for (int e = 0; e < E; e++) {
				Z += s[e];
				fs += f[e] * s[e];
			}
			/* d/ds_j of (sum_i f_i s_i / Z) = (f_j - sum_i f_i s_i / Z) / Z */
			for (int e = 0; e < E; e++)
				dscores[row + e] += g * (f[e] - fs / Z) / Z;
		}
	}
	free(f);
}

void vec_add(float *dst, const float *src, size_t n)
{
#pragma omp parallel for schedule(static)
	for (size_t i = 0; i < n; i++)
		dst[i] += src[i];
}
