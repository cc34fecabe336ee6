/*
 * model/quant.c - int8 weights with one fp32 scale per output row (quant.h).
 *
 * A decode step multiplies a few rows of activations by every weight once: it is bound by the bytes of
 * weight read, a quarter in int8.  Up to QDIRECT_ROWS rows of x go through the direct kernel: 4 weight
 * rows at a time against one x row (4 running sums, each x value loaded once for the 4), plain loops the
 * compiler vectorises for the target (-march=native: AVX-512 or AVX2 with FMA, int8 -> fp32 conversion
 * in registers; any other target gets its own vector or scalar code from the same source); the scale is
 * applied once per output.  From 4 rows of x on, the products have enough reuse of each weight that
 * BLAS on a small dequantised tile (64 KiB, in L1/L2, re-filled tile by tile) beats the direct kernel:
 * measured on configs/small.json, 8 sequences: 1.34x fp32's tokens/s against 1.02x for a 4 x 4 blocked
 * direct kernel (bench/RESULTS.md).  Memory still only ever holds the int8 weights and one tile.
 */
#define _DEFAULT_SOURCE		/* madvise */

#include "model/quant.h"

#include <math.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

#include "model/layers.h"
#include "model/lora.h"

#include <cblas.h>  /* after the headers above: it may bring complex.h's I */

#define QTILE 16	/* output rows per task of the direct kernel */
#define QDIRECT_ROWS 3	/* rows of x the direct kernel takes; more: dequantised tiles and BLAS */
#define QBUF 16384	/* floats of a dequantised tile (on the stack: 64 KiB) */
#define QBUF_MAX_TILE 64

struct qtensor {
	size_t off, numel;	/* in floats, into the model's weights */
	int cols;		/* row length (the weight's in) */
	size_t qoff, soff;	/* into q and scale */
};

struct model_quant {
	int n;
	struct qtensor *t;	/* sorted by off */
	int8_t *q;
	float *scale;
	size_t nq, ns;
};

/* ---------------------------------------------------------------- quantisation */

void quantize_rows(int8_t *q, float *scale, const float *w, size_t rows, int cols)
{
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
	for (size_t r = 0; r < rows; r++) {
		const float *wr = w + r * cols;
		int8_t *qr = q + r * cols;
		float mx = 0.0f;

		for (int k = 0; k < cols; k++)
			mx = fmaxf(mx, fabsf(wr[k]));
		scale[r] = mx / 127.0f;
		float inv = mx > 0 ? 127.0f / mx : 0.0f;
		for (int k = 0; k < cols; k++) {
			long v = lrintf(wr[k] * inv);
			qr[k] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
		}
	}
}

/* ---------------------------------------------------------------- the skinny kernel */

/* s[c] = x . w_c for the 4 weight rows w at stride in */
static void dot_r1_o4(const float *restrict x, const int8_t *restrict w, int in, float s[4])
{
	const int8_t *w0 = w, *w1 = w + in, *w2 = w + 2 * (size_t)in, *w3 = w + 3 * (size_t)in;
	float a0 = 0, a1 = 0, a2 = 0, a3 = 0;

#pragma omp simd reduction(+ : a0, a1, a2, a3)
	for (int k = 0; k < in; k++) {
		float xk = x[k];
		a0 += xk * (float)w0[k];
		a1 += xk * (float)w1[k];
		a2 += xk * (float)w2[k];
		a3 += xk * (float)w3[k];
	}
	s[0] = a0;
	s[1] = a1;
	s[2] = a2;
	s[3] = a3;
}

static float dot_r1_o1(const float *restrict x, const int8_t *restrict w, int in)
{
	float a = 0;

#pragma omp simd reduction(+ : a)
	for (int k = 0; k < in; k++)
		a += x[k] * (float)w[k];
	return a;
}

/* output rows [o0, o1) of the product, straight from int8 */
static void skinny_tile(float *y, int ldy, const float *x, int ldx, struct qmat w, int N, int in, int o0, int o1)
{
	int o = o0;

	for (; o + 4 <= o1; o += 4) {
		const int8_t *wq = w.q + (size_t)o * in;
		const float *sc = w.scale + o;

		for (int i = 0; i < N; i++) {
			float s[4];

			dot_r1_o4(x + (size_t)i * ldx, wq, in, s);
			for (int c = 0; c < 4; c++)
				y[(size_t)i * ldy + o + c] = s[c] * sc[c];
		}
	}
	for (; o < o1; o++) {
		const int8_t *wq = w.q + (size_t)o * in;

		for (int i = 0; i < N; i++)
			y[(size_t)i * ldy + o] = dot_r1_o1(x + (size_t)i * ldx, wq, in) * w.scale[o];
	}
}

/* ---------------------------------------------------------------- many rows: dequantised tiles + BLAS */

static void big_tile(float *y, int ldy, const float *x, int ldx, struct qmat w, int N, int in, int o0, int o1,
		     float *buf)
{
	int len = o1 - o0;

	for (int r = 0; r < len; r++) {
		const int8_t *qr = w.q + (size_t)(o0 + r) * in;
		float s = w.scale[o0 + r], *br = buf + (size_t)r * in;
#pragma omp simd
		for (int k = 0; k < in; k++)
			br[k] = s * (float)qr[k];
	}
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, len, in, 1.0f, x, ldx, buf, in, 0.0f, y + o0, ldy);
}

/*
 * Weight rows per task: the direct kernel takes QTILE; a dequantised tile as many rows of in floats as
 * QBUF holds (4 to 64, a multiple of 4; at least 4 for very long rows, then on the heap).  Shapes only.
 */
static int tile_rows(int N, int in)
{
	int rows = QBUF / (in > 0 ? in : 1);

	if (N <= QDIRECT_ROWS)
		return QTILE;
	rows = rows > QBUF_MAX_TILE ? QBUF_MAX_TILE : rows;
	return rows < 4 ? 4 : rows / 4 * 4;
}

/* tile t; stack: QBUF floats of scratch */
static void run_tile(float *y, int ldy, const float *x, int ldx, struct qmat w, int N, int in, int out, int t,
		     float *stack)
{
	int rows = tile_rows(N, in), o0 = t * rows, o1 = o0 + rows < out ? o0 + rows : out;
	float *buf = stack;

	if (N <= QDIRECT_ROWS) {
		skinny_tile(y, ldy, x, ldx, w, N, in, o0, o1);
		return;
	}
	if ((size_t)rows * in > QBUF && !(buf = malloc(sizeof(float) * (size_t)rows * in)))
		comm_abort(1, "out of memory for an int8 product");
	big_tile(y, ldy, x, ldx, w, N, in, o0, o1, buf);
	if (buf != stack)
		free(buf);
}

void qlinear_forward_serial(float *y, int ldy, const float *x, int ldx, struct qmat w, int N, int in, int out)
{
	int rows = tile_rows(N, in), nt = (out + rows - 1) / rows;
	float stack[QBUF];

	for (int t = 0; N > 0 && t < nt; t++)
		run_tile(y, ldy, x, ldx, w, N, in, out, t, stack);
}

void qlinear_forward(float *y, int ldy, const float *x, int ldx, struct qmat w, int N, int in, int out)
{
	int rows = tile_rows(N, in), nt = (out + rows - 1) / rows;

	if (N <= 0)
		return;
#pragma omp parallel
	{
		float stack[QBUF];

#pragma omp for schedule(static)
		for (int t = 0; t < nt; t++)
			run_tile(y, ldy, x, ldx, w, N, in, out, t, stack);
	}
}

void qlinear_t_serial(float *y, int ldy, const float *x, int ldx, struct qmat w, int N, int k, int cols,
		      float alpha)
{
	for (int i = 0; i < N; i++) {
		float *yr = y + (size_t)i * ldy;

		memset(yr, 0, sizeof(float) * cols);
		for (int d = 0; d < k; d++) {
			const int8_t *qr = w.q + (size_t)d * cols;
			float a = alpha * x[(size_t)i * ldx + d] * w.scale[d];
#pragma omp simd
			for (int j = 0; j < cols; j++)
				yr[j] += a * (float)qr[j];
		}
	}
}

/* ---------------------------------------------------------------- the model's copy */

/* The tensors read as linear layers: not the router, the embeddings, the lm_head. */
static int is_quantised(const struct moe_model *m, const struct param *p)
{
	const float *w = m->weights + p->offset;

	if (p->kind != PARAM_LINEAR || p->ndim < 2 || p->numel == 0 || w == m->w.lm_head)
		return 0;
	for (int l = 0; l < mc_n_layers(&m->cfg); l++)
		if (w == m->w.layers[l].gate)
			return 0;
	return 1;
}

static int by_offset(const void *a, const void *b)
{
	const struct qtensor *x = a, *y = b;

	return x->off < y->off ? -1 : x->off > y->off;
}

struct model_quant *quant_create(const struct moe_model *m)
{
	struct model_quant *q = calloc(1, sizeof(*q));

	if (!q || !(q->t = calloc((size_t)m->n_params, sizeof(*q->t))))
		goto oom;
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		struct qtensor *t = &q->t[q->n];

		if (!is_quantised(m, p))
			continue;
		t->off = p->offset;
		t->numel = p->numel;
		t->cols = (int)p->shape[p->ndim - 1];
		t->qoff = q->nq;
		t->soff = q->ns;
		q->nq += p->numel;
		q->ns += p->numel / (size_t)t->cols;
		q->n++;
	}
	qsort(q->t, (size_t)q->n, sizeof(*q->t), by_offset);
	q->q = malloc(q->nq + 1);
	q->scale = malloc(sizeof(float) * (q->ns + 1));
	if (!q->q || !q->scale)
		goto oom;
	quant_update(q, m);
	return q;
oom:
	quant_free(q);
	return NULL;
}

void quant_update(struct model_quant *q, const struct moe_model *m)
{
	for (int i = 0; i < q->n; i++) {
		const struct qtensor *t = &q->t[i];

		quantize_rows(q->q + t->qoff, q->scale + t->soff, m->weights + t->off, t->numel / (size_t)t->cols,
			      t->cols);
	}
}

void quant_free(struct model_quant *q)
{
	if (!q)
		return;
	free(q->t);
	free(q->q);
	free(q->scale);
	free(q);
}

int model_quantize(struct moe_model *m)
{
	struct model_quant *q = quant_create(m);

	if (!q)
		return -1;
	quant_free(m->quant);
	m->quant = q;
	return 0;
}

size_t quant_drop_fp32(struct moe_model *m)
{
	const struct model_quant *q = m->quant;
	uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
	size_t dropped = 0;

	for (int i = 0; q && i < q->n; i++) {
		uintptr_t a = (uintptr_t)(m->weights + q->t[i].off), b = a + sizeof(float) * q->t[i].numel;

		a = (a + page - 1) / page * page;
		b = b / page * page;
		if (b > a && !madvise((void *)a, b - a, MADV_DONTNEED))
			dropped += b - a;
	}
	return dropped;
}

struct qmat quant_find(const struct moe_model *m, const float *w, int in)
{
	const struct model_quant *q = m->quant;
	struct qmat none = { NULL, NULL };
	size_t off;
	int lo = 0, hi;

	if (!q || w < m->weights || w >= m->weights + m->n_weights)
		return none;
	off = (size_t)(w - m->weights);
	hi = q->n - 1;
	while (lo <= hi) {	/* the last tensor starting at or before off */
		int mid = (lo + hi) / 2;

		if (q->t[mid].off <= off)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	if (hi < 0)
		return none;
	const struct qtensor *t = &q->t[hi];
	size_t at = off - t->off;
	if (at >= t->numel || t->cols != in || at % (size_t)in)
		return none;
	return (struct qmat){ q->q + t->qoff + at, q->scale + t->soff + at / (size_t)in };
}

struct quant_bytes quant_weight_bytes(const struct moe_model *m)
{
	struct quant_bytes b = { 0 };
	struct model_quant *own = m->quant ? NULL : quant_create(m);
	const struct model_quant *q = m->quant ? m->quant : own;

	b.full = sizeof(float) * m->n_weights;
	if (!q)
		return b;
	b.linear_full = sizeof(float) * q->nq;
	b.linear_int8 = q->nq + sizeof(float) * q->ns;
	b.int8 = b.full - b.linear_full + b.linear_int8;
	quant_free(own);
	return b;
}

void model_linear(const struct moe_model *m, float *y, const float *x, const float *w, int N, int in, int out,
		  int flags)
{
	struct qmat q = quant_find(m, w, in);

	if (!q.q)
		linear_fwd(y, x, w, N, in, out, flags);
	else if (flags & LIN_SERIAL)
		qlinear_forward_serial(y, out, x, in, q, N, in, out);
	else
		qlinear_forward(y, out, x, in, q, N, in, out);
	if (m->lora)
		lora_forward(m->lora, w, y, x, N, in, out, flags);
}
