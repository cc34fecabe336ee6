/*
 * tests/model/test_ops.c - every op of model/ops.h (CPU reference backend) against references written here
 * in double and against central finite differences of L = sum(r * f(x)) (tests/gradcheck.h).  Also checks
 * that backward functions accumulate (a buffer prefilled with c ends at c + 2 g after two calls), except
 * cross_entropy_backward, which writes.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "harness.h"
#include "model/ops.h"
#include "model/rope.h"

#define FD_TOL	 1e-2	/* relative tolerance of analytic vs numeric gradients */
#define ACC_FILL 0.375f	/* prefill of the accumulation checks */

static float *falloc(size_t n)
{
	float *p = calloc(n ? n : 1, sizeof(float));

	if (!p)
		abort();
	return p;
}

static double *dalloc(size_t n)
{
	double *p = calloc(n ? n : 1, sizeof(double));

	if (!p)
		abort();
	return p;
}

static int *ialloc(size_t n)
{
	int *p = calloc(n ? n : 1, sizeof(int));

	if (!p)
		abort();
	return p;
}

static float *fdup(const float *x, size_t n)
{
	float *p = falloc(n);

	memcpy(p, x, n * sizeof(float));
	return p;
}

static void ffill(float *x, size_t n, float v)
{
	for (size_t i = 0; i < n; i++)
		x[i] = v;
}

/* max |a - b| / max(|b|, floor) with b in double */
static double rel_err_d(const float *a, const double *b, size_t n, double floor)
{
	double worst = 0;

	for (size_t i = 0; i < n; i++) {
		double s = fabs(b[i]) > floor ? fabs(b[i]) : floor;
		double e = fabs((double)a[i] - b[i]) / s;

		if (!(e <= worst))
			worst = isnan(e) ? INFINITY : e;
	}
	return worst;
}

static int check_close(const char *what, double err, double tol)
{
	if (!(err <= tol)) {
		fprintf(stderr, "\n  %s: rel err %.3g > %.3g\n", what, err, tol);
		return 0;
	}
	return 1;
}

/* buf was prefilled with ACC_FILL and then received gradient g twice: it must hold ACC_FILL + 2 g. */
static int check_accum(const char *what, const float *buf, const float *g, size_t n)
{
	float *want = falloc(n);
	double e;

	for (size_t i = 0; i < n; i++)
		want[i] = ACC_FILL + 2.0f * g[i];
	e = rel_err(buf, want, n, 1.0);
	free(want);
	return check_close(what, e, 1e-5);
}

/* ------------------------------------------------------------------------------------------------ */
/* linear */

struct linear_ctx {
	float *x, *w, *y;
	const float *r;
	int N, in, out;
};

static double linear_loss(void *p)
{
	struct linear_ctx *c = p;

	linear_forward(c->y, c->x, c->w, c->N, c->in, c->out);
	return gc_dot(c->r, c->y, (size_t)c->N * c->out);
}

static void test_linear(void)
{
	static const int shapes[][3] = { { 5, 7, 6 }, { 1, 3, 4 }, { 9, 16, 5 }, { 4, 1, 1 } };

	test_rng_seed(1);
	for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
		int N = shapes[s][0], in = shapes[s][1], out = shapes[s][2];
		size_t nx = (size_t)N * in, nw = (size_t)out * in, ny = (size_t)N * out;
		float *x = falloc(nx), *w = falloc(nw), *y = falloc(ny), *r = falloc(ny);
		float *dx = falloc(nx), *dw = falloc(nw), *dx2 = falloc(nx), *dw2 = falloc(nw);
		double *ref = dalloc(ny), *num = dalloc(nx > nw ? nx : nw);
		struct linear_ctx c = { x, w, y, r, N, in, out };

		test_fill_randn(x, nx, 1.0f);
		test_fill_randn(w, nw, 0.5f);
		test_fill_randn(r, ny, 1.0f);

		linear_forward(y, x, w, N, in, out);
		for (int n = 0; n < N; n++)
			for (int o = 0; o < out; o++) {
				double acc = 0;

				for (int i = 0; i < in; i++)
					acc += (double)x[n * in + i] * w[o * in + i];
				ref[n * out + o] = acc;
			}
		CU_ASSERT(check_close("linear forward", rel_err_d(y, ref, ny, 1.0), 1e-5));

		linear_backward(dx, dw, r, x, w, N, in, out);
		gc_numeric_grad(num, x, nx, 1e-2f, linear_loss, &c);
		CU_ASSERT(gc_check("linear dx", dx, num, nx, FD_TOL, 1e-6));
		gc_numeric_grad(num, w, nw, 1e-2f, linear_loss, &c);
		CU_ASSERT(gc_check("linear dw", dw, num, nw, FD_TOL, 1e-6));

		/* accumulation */
		ffill(dx2, nx, ACC_FILL);
		ffill(dw2, nw, ACC_FILL);
		linear_backward(dx2, dw2, r, x, w, N, in, out);
		linear_backward(dx2, dw2, r, x, w, N, in, out);
		CU_ASSERT(check_accum("linear dx accumulate", dx2, dx, nx));
		CU_ASSERT(check_accum("linear dw accumulate", dw2, dw, nw));

		/* NULL gradients are skipped, the other one is still produced */
		memset(dx2, 0, nx * sizeof(float));
		memset(dw2, 0, nw * sizeof(float));
		linear_backward(NULL, dw2, r, x, w, N, in, out);
		linear_backward(dx2, NULL, r, x, w, N, in, out);
		CU_ASSERT(rel_err(dx2, dx, nx, 1.0) <= 1e-6);
		CU_ASSERT(rel_err(dw2, dw, nw, 1.0) <= 1e-6);

		free(x); free(w); free(y); free(r); free(dx); free(dw); free(dx2); free(dw2);
		free(ref); free(num);
	}
}

/* ------------------------------------------------------------------------------------------------ */
/* embedding */

struct emb_ctx {
	float *table, *out;
	const float *r;
	const int *ids;
	int N, C;
};

static double emb_loss(void *p)
{
	struct emb_ctx *c = p;

	embedding_forward(c->out, c->ids, c->table, c->N, c->C);
	return gc_dot(c->r, c->out, (size_t)c->N * c->C);
}

static void test_embedding(void)
{
	enum { V = 7, C = 5, N = 10 };
	/* repeated ids (3 three times, 0 twice), ids 2 and 5 unused */
	static const int ids[N] = { 3, 0, 6, 3, 1, 4, 3, 0, 6, 1 };
	float *table = falloc(V * C), *out = falloc(N * C), *r = falloc(N * C);
	float *dt = falloc(V * C), *dt2 = falloc(V * C);
	double *num = dalloc(V * C);
	struct emb_ctx c = { table, out, r, ids, N, C };

	test_rng_seed(2);
	test_fill_randn(table, V * C, 1.0f);
	test_fill_randn(r, N * C, 1.0f);

	embedding_forward(out, ids, table, N, C);
	CU_ASSERT(memcmp(out + 2 * C, table + 6 * C, C * sizeof(float)) == 0);
	for (int n = 0; n < N; n++)
		CU_ASSERT(memcmp(out + n * C, table + ids[n] * C, C * sizeof(float)) == 0);

	embedding_backward(dt, r, ids, N, C);
	gc_numeric_grad(num, table, V * C, 1e-2f, emb_loss, &c);
	CU_ASSERT(gc_check("embedding dtable", dt, num, V * C, FD_TOL, 1e-6));
	/* the row of id 3 sums three output rows */
	for (int j = 0; j < C; j++) {
		double want = (double)r[0 * C + j] + r[3 * C + j] + r[6 * C + j];

		CU_ASSERT(fabs(dt[3 * C + j] - want) <= 1e-5);
	}

	ffill(dt2, V * C, ACC_FILL);
	embedding_backward(dt2, r, ids, N, C);
	embedding_backward(dt2, r, ids, N, C);
	CU_ASSERT(check_accum("embedding accumulate", dt2, dt, V * C));
	/* unused rows untouched */
	for (int j = 0; j < C; j++) {
		CU_ASSERT(dt2[2 * C + j] == ACC_FILL);
		CU_ASSERT(dt2[5 * C + j] == ACC_FILL);
	}

	free(table); free(out); free(r); free(dt); free(dt2); free(num);
}

/* ------------------------------------------------------------------------------------------------ */
/* rmsnorm */

struct rms_ctx {
	float *x, *w, *y, *rstd;
	const float *r;
	int N, C;
	float eps;
};

static double rms_loss(void *p)
{
	struct rms_ctx *c = p;

	rmsnorm_forward(c->y, c->rstd, c->x, c->w, c->N, c->C, c->eps);
	return gc_dot(c->r, c->y, (size_t)c->N * c->C);
}

static void test_rmsnorm(void)
{
	static const int shapes[][2] = { { 6, 9 }, { 1, 2 }, { 3, 32 } };
	const float eps = 1e-5f;

	test_rng_seed(3);
	for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
		int N = shapes[s][0], C = shapes[s][1];
		size_t nx = (size_t)N * C;
		float *x = falloc(nx), *w = falloc(C), *y = falloc(nx), *rstd = falloc(N), *r = falloc(nx);
		float *dx = falloc(nx), *dw = falloc(C), *dx2 = falloc(nx), *dw2 = falloc(C);
		double *ref = dalloc(nx), *rref = dalloc(N), *num = dalloc(nx);
		struct rms_ctx c = { x, w, y, rstd, r, N, C, eps };

		test_fill_randn(x, nx, 1.0f);
		for (int i = 0; i < C; i++)
			w[i] = 1.0f + 0.3f * test_randn();
		test_fill_randn(r, nx, 1.0f);

		rmsnorm_forward(y, rstd, x, w, N, C, eps);
		for (int n = 0; n < N; n++) {
			double ss = 0;

			for (int i = 0; i < C; i++)
				ss += (double)x[n * C + i] * x[n * C + i];
			rref[n] = 1.0 / sqrt(ss / C + eps);
			for (int i = 0; i < C; i++)
				ref[n * C + i] = x[n * C + i] * rref[n] * w[i];
		}
		CU_ASSERT(check_close("rmsnorm forward", rel_err_d(y, ref, nx, 1.0), 1e-5));
		CU_ASSERT(check_close("rmsnorm rstd", rel_err_d(rstd, rref, N, 1.0), 1e-5));

		rmsnorm_backward(dx, dw, r, x, w, rstd, N, C);
		gc_numeric_grad(num, x, nx, 3e-3f, rms_loss, &c);
		CU_ASSERT(gc_check("rmsnorm dx", dx, num, nx, FD_TOL, 1e-4));
		gc_numeric_grad(num, w, C, 1e-2f, rms_loss, &c);
		CU_ASSERT(gc_check("rmsnorm dw", dw, num, C, FD_TOL, 1e-4));

		rmsnorm_forward(y, rstd, x, w, N, C, eps);
		ffill(dx2, nx, ACC_FILL);
		ffill(dw2, C, ACC_FILL);
		rmsnorm_backward(dx2, dw2, r, x, w, rstd, N, C);
		rmsnorm_backward(dx2, dw2, r, x, w, rstd, N, C);
		CU_ASSERT(check_accum("rmsnorm dx accumulate", dx2, dx, nx));
		CU_ASSERT(check_accum("rmsnorm dw accumulate", dw2, dw, C));

		memset(dx2, 0, nx * sizeof(float));
		memset(dw2, 0, C * sizeof(float));
		rmsnorm_backward(NULL, dw2, r, x, w, rstd, N, C);
		rmsnorm_backward(dx2, NULL, r, x, w, rstd, N, C);
		CU_ASSERT(rel_err(dx2, dx, nx, 1.0) <= 1e-6);
		CU_ASSERT(rel_err(dw2, dw, C, 1.0) <= 1e-6);

		free(x); free(w); free(y); free(rstd); free(r); free(dx); free(dw); free(dx2); free(dw2);
		free(ref); free(rref); free(num);
	}

	/*
	 * C = 1: y = x w / sqrt(x^2 + eps) is nearly sign(x) w, too flat (or, for small x, too curved) for
	 * finite differences; check dx = dy w eps / (x^2 + eps)^1.5 directly.  The op's float cancellation
	 * in dy w r (1 - x^2 r^2) costs a few ulp of dy w r.
	 */
	for (int i = 0; i < 8; i++) {
		float x = 0.5f * test_randn(), w = 1.0f + 0.3f * test_randn(), dy = test_randn();
		float y, rstd, dx = 0, dw = 0;
		double d = (double)x * x + eps, want = dy * (double)w * eps / (d * sqrt(d));

		rmsnorm_forward(&y, &rstd, &x, &w, 1, 1, eps);
		CU_ASSERT(fabs(y - x * w / sqrt(d)) <= 1e-6 * (1 + fabs(w)));
		rmsnorm_backward(&dx, &dw, &dy, &x, &w, &rstd, 1, 1);
		CU_ASSERT(fabs(dx - want) <= 1e-3 * fabs(want) + 5e-7 * fabs(dy * w / sqrt(d)));
		CU_ASSERT(fabs(dw - dy * x / sqrt(d)) <= 1e-5 * (1 + fabs(dy)));
	}
}

/* ------------------------------------------------------------------------------------------------ */
/* rope */

/*
 * A rope layout inside a bigger buffer: rope slots at buf + off + n*row_stride + h*head_stride.
 * period 0: sparse positions (range wider than N, one (cos, sin) row per token); period p: positions
 * 3 + (7 n mod p), a shuffled range that fits in N, as in a batch of sequences (a table per position).
 */
struct rope_layout {
	const char *name;
	int N, nheads, row_stride, head_stride, off, dr;
	int period;
	bool fd;	/* finite-difference the backward (small layouts only) */
};

static size_t rope_buf_len(const struct rope_layout *L)
{
	return (size_t)L->N * L->row_stride;
}

static bool rope_slot(const struct rope_layout *L, size_t idx, int *n, int *h, int *j)
{
	for (int hh = 0; hh < L->nheads; hh++) {
		long rel = (long)(idx % L->row_stride) - L->off - (long)hh * L->head_stride;

		if (rel >= 0 && rel < L->dr) {
			*n = (int)(idx / L->row_stride);
			*h = hh;
			*j = (int)rel;
			return true;
		}
	}
	return false;
}

struct rope_ctx {
	const struct rope_layout *L;
	const float *x, *r;
	float *tmp;
	const int *pos;
	const double *inv_freq;
	float af;	/* attention_factor: the cos/sin multiplier */
};

static double rope_loss(void *p)
{
	struct rope_ctx *c = p;
	size_t n = rope_buf_len(c->L);

	memcpy(c->tmp, c->x, n * sizeof(float));
	rope_forward(c->tmp + c->L->off, c->pos, c->L->N, c->L->nheads, c->L->row_stride,
		     c->L->head_stride, c->L->dr, c->inv_freq, c->af);
	return gc_dot(c->r, c->tmp, n);
}

static void rope_positions(const struct rope_layout *L, int *pos, int *pmax)
{
	int pmod = L->N * 4 > 300 ? L->N * 4 : 300;

	*pmax = 0;
	for (int i = 0; i < L->N; i++) {
		if (L->period)
			pos[i] = 3 + (i * 7) % L->period;	/* period coprime to 7: a shuffled range */
		else
			pos[i] = i == 0 ? 0 : (i * 37 + 5) % pmod;	/* includes 0, not monotone */
		*pmax = pos[i] > *pmax ? pos[i] : *pmax;
	}
}

/* forward vs the interleaved formula (rotation by pos * inv_freq[i], times af); untouched outside the
 * rope slots; the norm of each pair scaled by af exactly */
static void rope_check_forward(const struct rope_layout *L, const float *x, const float *y, const int *pos,
			       const double *inv_freq, float af, double tol)
{
	size_t n = rope_buf_len(L), touched = 0;
	double worst = 0, worst_norm = 0;

	for (size_t i = 0; i < n; i++) {
		int tn, th, tj;

		if (!rope_slot(L, i, &tn, &th, &tj)) {
			touched += y[i] != x[i];
			continue;
		}
		size_t i0 = i - (tj & 1);
		double a = pos[tn] * inv_freq[tj / 2];
		double x0 = x[i0], x1 = x[i0 + 1];
		double want = af * ((tj & 1) ? x0 * sin(a) + x1 * cos(a) : x0 * cos(a) - x1 * sin(a));
		double e = fabs(y[i] - want);

		if (e > worst)
			worst = e;
		if (!(tj & 1)) {
			double n0 = af * hypot(x0, x1), n1 = hypot(y[i], y[i + 1]);
			double en = fabs(n1 - n0) / (n0 > 1e-3 ? n0 : 1e-3);

			if (en > worst_norm)
				worst_norm = en;
		}
	}
	if (touched)
		fprintf(stderr, "\n  rope %s: %zu numbers outside the rope slots changed\n", L->name, touched);
	CU_ASSERT(touched == 0);
	if (!(worst <= tol))
		fprintf(stderr, "\n  rope %s forward: max abs err %.3g\n", L->name, worst);
	CU_ASSERT(worst <= tol);
	if (!(worst_norm <= 1e-5))
		fprintf(stderr, "\n  rope %s norm: max rel err %.3g\n", L->name, worst_norm);
	CU_ASSERT(worst_norm <= 1e-5);
	/* pos 0 (token 0 of the sparse pattern) is multiplication by af */
	for (int h = 0; h < (pos[0] == 0 ? L->nheads : 0); h++)
		for (int j = 0; j < L->dr; j++) {
			size_t i = (size_t)L->off + (size_t)h * L->head_stride + j;

			CU_ASSERT(fabs(y[i] - (double)af * x[i]) <= 2e-7 * (1 + fabsf(x[i])));
		}
}

static void test_rope_layout(const struct rope_layout *L, const double *inv_freq, float af)
{
	size_t n = rope_buf_len(L);
	float *x = falloc(n), *y = falloc(n), *r = falloc(n), *dx = falloc(n), *tmp = falloc(n);
	double *num = dalloc(n);
	int *pos = ialloc(L->N), pmax;
	struct rope_ctx c = { L, x, r, tmp, pos, inv_freq, af };

	test_fill_randn(x, n, 1.0f);
	test_fill_randn(r, n, 1.0f);
	rope_positions(L, pos, &pmax);

	/* a float32 angle pos * freq may be off by ~ulp(pos): allow it */
	memcpy(y, x, n * sizeof(float));
	rope_forward(y + L->off, pos, L->N, L->nheads, L->row_stride, L->head_stride, L->dr, inv_freq, af);
	rope_check_forward(L, x, y, pos, inv_freq, af, 2e-4 + 2e-7 * pmax);

	/* backward = transpose of the forward's Jacobian (identity outside the rope slots): with af != 1
	 * the inverse rotation times af, not divided by it */
	if (L->fd) {
		char what[96];

		memcpy(dx, r, n * sizeof(float));
		rope_backward(dx + L->off, pos, L->N, L->nheads, L->row_stride, L->head_stride, L->dr,
			      inv_freq, af);
		gc_numeric_grad(num, x, n, 1e-2f, rope_loss, &c);
		snprintf(what, sizeof(what), "rope %s (af %g) backward", L->name, af);
		CU_ASSERT(gc_check(what, dx, num, n, FD_TOL, 1e-6));
	}

	/* backward after forward: af^2 x in the rope slots (the rotations cancel), x elsewhere */
	rope_backward(y + L->off, pos, L->N, L->nheads, L->row_stride, L->head_stride, L->dr, inv_freq, af);
	for (size_t i = 0; i < n; i++) {
		int tn, th, tj;

		tmp[i] = rope_slot(L, i, &tn, &th, &tj) ? (float)((double)af * af * x[i]) : x[i];
	}
	CU_ASSERT(check_close("rope round trip", rel_err(y, tmp, n, 1.0), 1e-5));

	free(x); free(y); free(r); free(dx); free(tmp); free(num); free(pos);
}

/* the unscaled table rope_theta^(-2i/dr), computed here */
static void plain_inv_freq(double *inv_freq, int dr, double theta)
{
	for (int i = 0; i < dr / 2; i++)
		inv_freq[i] = pow(theta, -2.0 * i / dr);
}

/* A YaRN table from model/rope.h (its values are tested in rope_yarn_table): factor 4 over an original
 * context of 64, so that some frequencies are interpolated, some kept, some on the ramp. */
static float yarn_inv_freq(double *inv_freq, int dr)
{
	struct model_config mc = {
		.qk_rope_head_dim = dr, .qk_nope_head_dim = 4, .rope_theta = 10000.0,
		.max_position_embeddings = 256,
		.rope_scaling = { .type = ROPE_YARN, .factor = 4, .original_max_position_embeddings = 64 },
	};
	struct rope_freqs f;

	mc_rope_freqs(&mc, &f);
	memcpy(inv_freq, f.inv_freq, sizeof(double) * (dr / 2));
	return f.attention_factor;
}

static void test_rope(void)
{
	static const struct rope_layout layouts[] = {
		/* q rows [H, dn + dr], rope at offset dn of each head */
		{ "q [N,H,dn+dr]", 7, 3, 3 * (4 + 8), 4 + 8, 4, 8, 0, true },
		{ "q [N,H,dn+dr] pos range 3", 7, 3, 3 * (4 + 8), 4 + 8, 4, 8, 3, true },
		/* kv_a output rows [kv_lora + dr], one shared k_pe at offset kv_lora */
		{ "k_pe [N,kvl+dr]", 6, 1, 5 + 6, 0, 5, 6, 0, true },
		{ "k_pe [N,kvl+dr] pos range 4", 8, 1, 5 + 6, 0, 5, 6, 4, true },
		/* contiguous heads of dr */
		{ "[N,H*dr]", 4, 2, 2 * 10, 10, 0, 10, 0, true },
		/* single pair */
		{ "dr=2", 5, 2, 7, 3, 1, 2, 0, true },
		/* big enough for the threaded paths: B=2 sequences of 300, and sparse positions */
		{ "big q pos range 300", 600, 4, 4 * (8 + 32), 8 + 32, 8, 32, 300, false },
		{ "big q sparse", 600, 4, 4 * (8 + 32), 8 + 32, 8, 32, 0, false },
		{ "big k_pe pos range 300", 600, 1, 16 + 64, 0, 16, 64, 300, false },
	};
	double inv_freq[MC_ROPE_MAX_DIM / 2];
	float af;

	test_rng_seed(4);
	for (size_t i = 0; i < sizeof(layouts) / sizeof(layouts[0]); i++) {
		const struct rope_layout *L = &layouts[i];

		plain_inv_freq(inv_freq, L->dr, i == 4 ? 500.0 : 10000.0);
		test_rope_layout(L, inv_freq, 1.0f);
		/* YaRN: its frequencies and a cos/sin multiplier != 1 */
		af = yarn_inv_freq(inv_freq, L->dr);
		CU_ASSERT(fabsf(af - 1.0f) > 0.1f);
		test_rope_layout(L, inv_freq, af);
		test_rope_layout(L, inv_freq, 0.75f);
	}
}

/*
 * model/rope.h against transformers.  The expected numbers were printed by transformers 5's own
 * _compute_yarn_parameters (modeling_rope_utils.py: inv_freq, attention_factor) for a DeepseekV3Config
 * with qk_rope_head_dim 64 and the rope_parameters below, and by modeling_deepseek_v3.yarn_apply_mscale
 * (rope_parameters, 192 ** -0.5) for the softmax scale (qk_head_dim 192), as float32 with "%.9g".
 */
struct yarn_case {
	const char *name;
	double theta;
	int max_pos;
	struct rope_scaling rs;
	float attention_factor, softmax_scale;
	float inv_freq[32];
};

static const struct yarn_case yarn_cases[] = {
	{ "DeepSeek-V3: factor 40, original 4096, beta 32/1, mscale 1/1", 10000.0, 163840,
	  { .type = ROPE_YARN, .factor = 40, .original_max_position_embeddings = 4096, .beta_fast = 32,
	    .beta_slow = 1, .mscale = 1.0, .mscale_all_dim = 1.0 },
	  1.0f, 0.135233775f,
	  { 1, 0.749894202, 0.562341332, 0.421696514,
	    0.316227764, 0.237137362, 0.177827939, 0.133352146,
	    0.100000001, 0.0749894157, 0.0562341288, 0.0390069261,
	    0.0268793609, 0.0183781441, 0.012447956, 0.0083345091,
	    0.00550000044, 0.00356199732, 0.00224936521, 0.00137051346,
	    0.000790569407, 0.000414990413, 0.00017782794, 3.3338034e-05,
	    2.49999994e-05, 1.87473543e-05, 1.40585325e-05, 1.05424124e-05,
	    7.90569447e-06, 5.92843435e-06, 4.44569832e-06, 3.33380353e-06 } },
	{ "theta 5000, factor 4, original 256, mscale 0.707 / mscale_all_dim 1", 5000.0, 163840,
	  { .type = ROPE_YARN, .factor = 4, .original_max_position_embeddings = 256, .beta_fast = 32,
	    .beta_slow = 1, .mscale = 0.707, .mscale_all_dim = 1.0 },
	  0.964326915f, 0.093565166f,
	  { 1, 0.725262225, 0.524319947, 0.377686441,
	    0.270952672, 0.193478078, 0.137416437, 0.0969907492,
	    0.0679546893, 0.0471926816, 0.0324232988, 0.0219795555,
	    0.0146463104, 0.00954013132, 0.00602061208, 0.00461368356,
	    0.00353553402, 0.00270933192, 0.00207620091, 0.00159102341,
	    0.00121922465, 0.00093430985, 0.000715975475, 0.00054866256,
	    0.000420448196, 0.000322195672, 0.000246903306, 0.000189205632,
	    0.000144991063, 0.000111108799, 8.5144311e-05, 6.52473391e-05 } },
	/* factor null: max_position_embeddings / original = 8; betas default; no mscale: 0.1 ln 8 + 1 */
	{ "factor from 32768 / 4096, truncate false, no mscale", 10000.0, 32768,
	  { .type = ROPE_YARN, .original_max_position_embeddings = 4096, .no_truncate = true },
	  1.20794415f, 0.0721687824f,
	  { 1, 0.749894202, 0.562341332, 0.421696514,
	    0.316227764, 0.237137362, 0.177827939, 0.133352146,
	    0.100000001, 0.0749894157, 0.0562341288, 0.0405524112,
	    0.0281120818, 0.0193578731, 0.0132241333, 0.0089476686,
	    0.00598313287, 0.00394178974, 0.00254728785, 0.00160376146,
	    0.000972857641, 0.000557219319, 0.00028863296, 0.000166690181,
	    0.000125000006, 9.37367731e-05, 7.02926627e-05, 5.2712061e-05,
	    3.95284733e-05, 2.96421731e-05, 2.22284925e-05, 1.66690188e-05 } },
};

static struct model_config rope_config(double theta, int max_pos, const struct rope_scaling *rs)
{
	struct model_config mc = {
		.qk_rope_head_dim = 64, .qk_nope_head_dim = 128, .rope_theta = theta,
		.max_position_embeddings = max_pos,
	};

	if (rs)
		mc.rope_scaling = *rs;
	return mc;
}

static void test_rope_yarn_table(void)
{
	double got[32], want[32];

	for (size_t c = 0; c < sizeof(yarn_cases) / sizeof(yarn_cases[0]); c++) {
		const struct yarn_case *y = &yarn_cases[c];
		struct model_config mc = rope_config(y->theta, y->max_pos, &y->rs);
		double worst = 0;

		mc_rope_inv_freq(&mc, got);
		for (int i = 0; i < 32; i++) {
			double e = fabs(got[i] - y->inv_freq[i]) / y->inv_freq[i];

			worst = e > worst ? e : worst;
		}
		if (!(worst <= 1e-6))
			fprintf(stderr, "\n  yarn %s: inv_freq rel err %.3g\n", y->name, worst);
		CU_ASSERT(worst <= 1e-6);
		CU_ASSERT(fabsf(mc_rope_attention_factor(&mc) - y->attention_factor) <= 1e-6f);
		CU_ASSERT(fabsf(mc_softmax_scale(&mc) - y->softmax_scale) <= 1e-6f * y->softmax_scale);
	}

	/* an explicit attention_factor wins; without scaling: theta^(-2i/64), 1, 192^-0.5 */
	{
		struct rope_scaling rs = yarn_cases[0].rs;
		struct model_config mc;

		rs.attention_factor = 0.5;
		mc = rope_config(10000.0, 163840, &rs);
		CU_ASSERT_EQUAL(mc_rope_attention_factor(&mc), 0.5f);
		CU_ASSERT(fabs(mc_rope_factor(&mc) - 40) == 0);
		mc = rope_config(10000.0, 163840, NULL);
		mc_rope_inv_freq(&mc, got);
		plain_inv_freq(want, 64, 10000.0);
		CU_ASSERT(memcmp(got, want, sizeof(got)) == 0);
		CU_ASSERT_EQUAL(mc_rope_attention_factor(&mc), 1.0f);
		CU_ASSERT_EQUAL(mc_rope_factor(&mc), 1.0);
		CU_ASSERT_EQUAL(mc_softmax_scale(&mc), (float)(1.0 / sqrt(192.0)));
	}
}

/* ------------------------------------------------------------------------------------------------ */
/* attention */

/* naive O(T^2) causal softmax attention in double; lse [B,H,T] */
static void attn_ref(double *out, double *lse, const float *q, const float *k, const float *v,
		     int B, int T, int H, int dq, int dv, double scale)
{
	double *sc = dalloc(T);

	for (int b = 0; b < B; b++)
		for (int h = 0; h < H; h++)
			for (int t = 0; t < T; t++) {
				const float *qt = q + ((size_t)(b * T + t) * H + h) * dq;
				double m = -INFINITY, sum = 0;

				for (int s = 0; s <= t; s++) {
					const float *ks = k + ((size_t)(b * T + s) * H + h) * dq;
					double d = 0;

					for (int i = 0; i < dq; i++)
						d += (double)qt[i] * ks[i];
					sc[s] = d * scale;
					if (sc[s] > m)
						m = sc[s];
				}
				for (int s = 0; s <= t; s++)
					sum += exp(sc[s] - m);
				double l = m + log(sum);

				lse[((size_t)b * H + h) * T + t] = l;
				double *o = out + ((size_t)(b * T + t) * H + h) * dv;

				for (int j = 0; j < dv; j++)
					o[j] = 0;
				for (int s = 0; s <= t; s++) {
					const float *vs = v + ((size_t)(b * T + s) * H + h) * dv;
					double p = exp(sc[s] - l);

					for (int j = 0; j < dv; j++)
						o[j] += p * vs[j];
				}
			}
	free(sc);
}

struct attn_ctx {
	float *q, *k, *v, *out, *lse;
	const float *r;
	int B, T, H, dq, dv;
	float scale;
};

static double attn_loss(void *p)
{
	struct attn_ctx *c = p;

	attention_forward(c->out, c->lse, c->q, c->k, c->v, c->B, c->T, c->H, c->dq, c->dv, c->scale);
	return gc_dot(c->r, c->out, (size_t)c->B * c->T * c->H * c->dv);
}

static void attn_case(int B, int T, int H, int dq, int dv, float scale, bool grads)
{
	size_t nq = (size_t)B * T * H * dq, nv = (size_t)B * T * H * dv, nl = (size_t)B * H * T;
	float *q = falloc(nq), *k = falloc(nq), *v = falloc(nv), *out = falloc(nv), *lse = falloc(nl);
	float *r = falloc(nv), *gq = falloc(nq), *gk = falloc(nq), *gv = falloc(nv);
	double *oref = dalloc(nv), *lref = dalloc(nl), *num = dalloc(nq > nv ? nq : nv);
	struct attn_ctx c = { q, k, v, out, lse, r, B, T, H, dq, dv, scale };
	char what[96];

	test_fill_randn(q, nq, 1.5f);
	test_fill_randn(k, nq, 1.5f);
	test_fill_randn(v, nv, 1.0f);
	test_fill_randn(r, nv, 1.0f);

	attention_forward(out, lse, q, k, v, B, T, H, dq, dv, scale);
	attn_ref(oref, lref, q, k, v, B, T, H, dq, dv, scale);
	snprintf(what, sizeof(what), "attention T=%d forward out", T);
	CU_ASSERT(check_close(what, rel_err_d(out, oref, nv, 1.0), 1e-5));
	snprintf(what, sizeof(what), "attention T=%d forward lse", T);
	CU_ASSERT(check_close(what, rel_err_d(lse, lref, nl, 1.0), 1e-5));

	if (grads) {
		attention_backward(gq, gk, gv, r, out, lse, q, k, v, B, T, H, dq, dv, scale);
		gc_numeric_grad(num, q, nq, 1e-2f, attn_loss, &c);
		snprintf(what, sizeof(what), "attention T=%d dq", T);
		CU_ASSERT(gc_check(what, gq, num, nq, FD_TOL, 1e-3));
		gc_numeric_grad(num, k, nq, 1e-2f, attn_loss, &c);
		snprintf(what, sizeof(what), "attention T=%d dk", T);
		CU_ASSERT(gc_check(what, gk, num, nq, FD_TOL, 1e-3));
		gc_numeric_grad(num, v, nv, 1e-2f, attn_loss, &c);
		snprintf(what, sizeof(what), "attention T=%d dv", T);
		CU_ASSERT(gc_check(what, gv, num, nv, FD_TOL, 1e-3));

		float *aq = falloc(nq), *ak = falloc(nq), *av = falloc(nv);

		attention_forward(out, lse, q, k, v, B, T, H, dq, dv, scale);
		ffill(aq, nq, ACC_FILL);
		ffill(ak, nq, ACC_FILL);
		ffill(av, nv, ACC_FILL);
		attention_backward(aq, ak, av, r, out, lse, q, k, v, B, T, H, dq, dv, scale);
		attention_backward(aq, ak, av, r, out, lse, q, k, v, B, T, H, dq, dv, scale);
		CU_ASSERT(check_accum("attention dq accumulate", aq, gq, nq));
		CU_ASSERT(check_accum("attention dk accumulate", ak, gk, nq));
		CU_ASSERT(check_accum("attention dv accumulate", av, gv, nv));
		free(aq); free(ak); free(av);
	}

	free(q); free(k); free(v); free(out); free(lse); free(r); free(gq); free(gk); free(gv);
	free(oref); free(lref); free(num);
}

static void test_attention_forward(void)
{
	static const int Ts[] = { 1, 2, 3, 16, 31, 33, 64, 65, 67, 70, 129 };

	test_rng_seed(5);
	for (size_t i = 0; i < sizeof(Ts) / sizeof(Ts[0]); i++)
		attn_case(2, Ts[i], 2, 5, 3, 0.37f, false);
	attn_case(1, 20, 3, 8, 8, 1.0f / sqrtf(8.0f), false);
}

static void test_attention_backward(void)
{
	test_rng_seed(6);
	attn_case(2, 67, 2, 3, 2, 0.37f, true);	/* one full block of 64 and a partial one */
	attn_case(2, 3, 2, 4, 6, 0.6f, true);
	attn_case(1, 1, 1, 3, 2, 0.5f, true);
}

/* ------------------------------------------------------------------------------------------------ */
/* swiglu */

struct swiglu_ctx {
	float *gate, *up, *out;
	const float *r;
	size_t n;
};

static double swiglu_loss(void *p)
{
	struct swiglu_ctx *c = p;

	swiglu_forward(c->out, c->gate, c->up, c->n);
	return gc_dot(c->r, c->out, c->n);
}

static void test_swiglu(void)
{
	enum { n = 37 };
	static const float extreme[] = { -200.0f, -90.0f, -30.0f, 30.0f, 90.0f, 200.0f };
	const size_t ne = sizeof(extreme) / sizeof(extreme[0]);
	float *gate = falloc(n), *up = falloc(n), *out = falloc(n), *r = falloc(n);
	float *dg = falloc(n), *du = falloc(n), *dg2 = falloc(n), *du2 = falloc(n);
	double *ref = dalloc(n), *num = dalloc(n);
	struct swiglu_ctx c = { gate, up, out, r, n };

	test_rng_seed(7);
	test_fill_randn(gate, n, 2.0f);
	test_fill_randn(up, n, 1.0f);
	test_fill_randn(r, n, 1.0f);

	swiglu_forward(out, gate, up, n);
	for (int i = 0; i < n; i++)
		ref[i] = gate[i] / (1.0 + exp(-(double)gate[i])) * up[i];
	CU_ASSERT(check_close("swiglu forward", rel_err_d(out, ref, n, 1.0), 1e-5));

	swiglu_backward(dg, du, r, gate, up, n);
	gc_numeric_grad(num, gate, n, 1e-2f, swiglu_loss, &c);
	CU_ASSERT(gc_check("swiglu dgate", dg, num, n, FD_TOL, 1e-6));
	gc_numeric_grad(num, up, n, 1e-2f, swiglu_loss, &c);
	CU_ASSERT(gc_check("swiglu dup", du, num, n, FD_TOL, 1e-6));

	ffill(dg2, n, ACC_FILL);
	ffill(du2, n, ACC_FILL);
	swiglu_backward(dg2, du2, r, gate, up, n);
	swiglu_backward(dg2, du2, r, gate, up, n);
	CU_ASSERT(check_accum("swiglu dgate accumulate", dg2, dg, n));
	CU_ASSERT(check_accum("swiglu dup accumulate", du2, du, n));

	/* large |gate|: finite, silu(x) -> x or 0, silu'(x) -> 1 or 0 */
	for (size_t i = 0; i < ne; i++) {
		gate[i] = extreme[i];
		up[i] = 1.0f;
		r[i] = 1.0f;
	}
	swiglu_forward(out, gate, up, ne);
	memset(dg, 0, ne * sizeof(float));
	memset(du, 0, ne * sizeof(float));
	swiglu_backward(dg, du, r, gate, up, ne);
	for (size_t i = 0; i < ne; i++) {
		double want = extreme[i] > 0 ? extreme[i] : 0;
		double dwant = extreme[i] > 0 ? 1 : 0;

		CU_ASSERT(isfinite(out[i]) && isfinite(dg[i]) && isfinite(du[i]));
		CU_ASSERT(fabs(out[i] - want) <= 1e-5 * (1 + fabs(want)));
		CU_ASSERT(fabs(dg[i] - dwant) <= 1e-5);
		CU_ASSERT(fabs(du[i] - want) <= 1e-5 * (1 + fabs(want)));
	}

	free(gate); free(up); free(out); free(r); free(dg); free(du); free(dg2); free(du2);
	free(ref); free(num);
}

/* ------------------------------------------------------------------------------------------------ */
/* cross entropy */

struct ce_ctx {
	float *logits, *losses;
	const int *targets;
	int N, V;
	float dloss;
};

static double ce_loss(void *p)
{
	struct ce_ctx *c = p;
	double s = 0;

	cross_entropy_forward(c->losses, c->logits, c->targets, c->N, c->V);
	for (int n = 0; n < c->N; n++)
		s += c->losses[n];
	return c->dloss * s;
}

static void test_cross_entropy(void)
{
	enum { N = 7, V = 11 };
	static const int targets[N] = { 3, -1, 0, 10, -100, 3, 7 };
	float *logits = falloc(N * V), *losses = falloc(N), *dl = falloc(N * V), *buf;
	double *ref = dalloc(N), *num = dalloc(N * V);
	const float dloss = 0.6f;
	struct ce_ctx c = { logits, losses, targets, N, V, dloss };

	test_rng_seed(8);
	test_fill_randn(logits, N * V, 2.0f);
	/* one row with a huge offset: must stay finite (max subtracted) */
	for (int j = 0; j < V; j++)
		logits[6 * V + j] += 1000.0f;

	cross_entropy_forward(losses, logits, targets, N, V);
	for (int n = 0; n < N; n++) {
		const float *row = logits + n * V;
		double m = -INFINITY, s = 0;

		if (targets[n] < 0) {
			ref[n] = 0;
			continue;
		}
		for (int j = 0; j < V; j++)
			m = row[j] > m ? row[j] : m;
		for (int j = 0; j < V; j++)
			s += exp(row[j] - m);
		ref[n] = m + log(s) - row[targets[n]];
	}
	CU_ASSERT(check_close("cross_entropy forward", rel_err_d(losses, ref, 6, 1.0), 1e-5));
	/* row 6 is the difference of two numbers near 1000: a few ulp(1000) = 6e-5 */
	CU_ASSERT(check_close("cross_entropy forward big offset", fabs(losses[6] - ref[6]), 2e-4));
	CU_ASSERT(losses[1] == 0.0f && losses[4] == 0.0f);

	/* writes, not accumulates: prefill with garbage */
	ffill(dl, N * V, 123.0f);
	cross_entropy_backward(dl, logits, targets, dloss, N, V);
	for (int j = 0; j < V; j++) {
		CU_ASSERT(dl[1 * V + j] == 0.0f);
		CU_ASSERT(dl[4 * V + j] == 0.0f);
	}
	/* rows sum to zero (softmax - onehot) */
	for (int n = 0; n < N; n++) {
		double s = 0;

		for (int j = 0; j < V; j++)
			s += dl[n * V + j];
		/* row 6: lse ~ 1000 carries float rounding of ulp(1000) = 6e-5 */
		double tol = n == 6 ? 2e-4 : 1e-5;

		if (!(fabs(s) <= tol))
			fprintf(stderr, "\n  cross_entropy row %d: dlogits sum %.3g\n", n, s);
		CU_ASSERT(fabs(s) <= tol);
	}
	/* the huge-offset row is excluded from FD (float spacing at 1000 is 6e-5); check it directly */
	{
		const float *row = logits + 6 * V;
		double m = -INFINITY, s = 0, worst = 0;

		for (int j = 0; j < V; j++)
			m = row[j] > m ? row[j] : m;
		for (int j = 0; j < V; j++)
			s += exp((double)row[j] - m);
		for (int j = 0; j < V; j++) {
			double want = dloss * (exp((double)row[j] - m) / s - (j == targets[6]));
			double e = fabs(dl[6 * V + j] - want);

			worst = e > worst ? e : worst;
		}
		CU_ASSERT(check_close("cross_entropy big-offset row", worst, 1e-4));
	}
	gc_numeric_grad(num, logits, 6 * V, 1e-2f, ce_loss, &c);
	CU_ASSERT(gc_check("cross_entropy dlogits", dl, num, 6 * V, FD_TOL, 1e-6));

	/* in place over the logits */
	buf = fdup(logits, N * V);
	cross_entropy_backward(buf, buf, targets, dloss, N, V);
	CU_ASSERT(check_close("cross_entropy in place", rel_err(buf, dl, N * V, 1e-3), 1e-6));

	free(logits); free(losses); free(dl); free(buf); free(ref); free(num);
}

/* ------------------------------------------------------------------------------------------------ */
/* router */

static void ref_scores(double *s, const float *logit, int E, enum moe_scoring scoring)
{
	if (scoring == MOE_SCORING_SIGMOID) {
		for (int e = 0; e < E; e++)
			s[e] = 1.0 / (1.0 + exp(-(double)logit[e]));
		return;
	}
	double m = -INFINITY, sum = 0;

	for (int e = 0; e < E; e++)
		m = logit[e] > m ? logit[e] : m;
	for (int e = 0; e < E; e++)
		sum += exp(logit[e] - m);
	for (int e = 0; e < E; e++)
		s[e] = exp(logit[e] - m) / sum;
}

/* group score: max of choice (softmax), best pair sum by brute force (sigmoid) */
static double ref_group_score(const double *choice, int g0, int gs, enum moe_scoring scoring)
{
	double best = -INFINITY;

	if (scoring == MOE_SCORING_SOFTMAX || gs == 1) {
		for (int e = g0; e < g0 + gs; e++)
			best = choice[e] > best ? choice[e] : best;
		return best;
	}
	for (int a = g0; a < g0 + gs; a++)
		for (int b = a + 1; b < g0 + gs; b++)
			best = choice[a] + choice[b] > best ? choice[a] + choice[b] : best;
	return best;
}

/* "a ranks above b": greater value, ties to the lower index */
static bool ranks_above(double va, int a, double vb, int b)
{
	return va > vb || (va == vb && a < b);
}

/*
 * Brute-force group-limited selection by rank counting: a group is kept when fewer than topk_group groups
 * rank above it; an expert is chosen when its group is kept and fewer than K experts of kept groups rank
 * above it.  w[e] is its weight (0 when not chosen).
 */
static void ref_route(bool *chosen, double *w, const double *s, const double *choice,
		      const struct router_params *p)
{
	int E = p->E, G = p->n_group, gs = E / G;
	double gsc[64];
	bool kept[64];
	double sum = 0;

	for (int g = 0; g < G; g++)
		gsc[g] = ref_group_score(choice, g * gs, gs, p->scoring);
	for (int g = 0; g < G; g++) {
		int above = 0;

		for (int h = 0; h < G; h++)
			above += h != g && ranks_above(gsc[h], h, gsc[g], g);
		kept[g] = above < p->topk_group;
	}
	for (int e = 0; e < E; e++) {
		int above = 0;

		chosen[e] = false;
		w[e] = 0;
		if (!kept[e / gs])
			continue;
		for (int f = 0; f < E; f++)
			above += f != e && kept[f / gs] && ranks_above(choice[f], f, choice[e], e);
		if (above < p->K) {
			chosen[e] = true;
			w[e] = s[e];
			sum += s[e];
		}
	}
	for (int e = 0; e < E; e++) {
		if (p->norm_topk_prob)
			w[e] /= sum;
		w[e] *= p->routed_scaling_factor;
	}
}

/* smallest gap between any two choice values and between any two group scores */
static double choice_gap(const double *choice, const struct router_params *p)
{
	int E = p->E, G = p->n_group, gs = E / G;
	double gap = INFINITY, gsc[64];

	for (int a = 0; a < E; a++)
		for (int b = a + 1; b < E; b++)
			gap = fmin(gap, fabs(choice[a] - choice[b]));
	for (int g = 0; g < G; g++)
		gsc[g] = ref_group_score(choice, g * gs, gs, p->scoring);
	for (int a = 0; a < G; a++)
		for (int b = a + 1; b < G; b++)
			gap = fmin(gap, fabs(gsc[a] - gsc[b]));
	return gap;
}

/* random logits whose choice values (and group scores) are at least min_gap apart */
static void gen_router_logits(float *logits, const float *bias, const struct router_params *p, int N,
			      float scale, double min_gap)
{
	double s[64], choice[64];

	for (int n = 0; n < N; n++) {
		float *row = logits + (size_t)n * p->E;
		int tries = 0;

		do {
			CU_ASSERT_FATAL(++tries < 100000);
			test_fill_randn(row, p->E, scale);
			ref_scores(s, row, p->E, p->scoring);
			for (int e = 0; e < p->E; e++)
				choice[e] = s[e] + (bias ? bias[e] : 0);
		} while (choice_gap(choice, p) < min_gap);
	}
}

/* compare router_forward's output for N tokens with the brute-force reference */
static int check_router(const struct router_params *p, const float *logits, const float *bias, int N,
			const float *scores, const int *idx, const float *w, const char *what)
{
	double s[64], choice[64], wref[64];
	bool chosen[64], seen[64];
	int ok = 1;

	for (int n = 0; n < N; n++) {
		ref_scores(s, logits + (size_t)n * p->E, p->E, p->scoring);
		for (int e = 0; e < p->E; e++)
			choice[e] = s[e] + (bias ? bias[e] : 0);
		ref_route(chosen, wref, s, choice, p);
		if (!(rel_err_d(scores + (size_t)n * p->E, s, p->E, 1e-2) <= 1e-5)) {
			fprintf(stderr, "\n  router %s: token %d scores differ from the reference\n", what, n);
			ok = 0;
		}
		memset(seen, 0, sizeof(seen));
		for (int k = 0; k < p->K; k++) {
			int e = idx[n * p->K + k];
			float we = w[n * p->K + k];

			if (e < 0 || e >= p->E || seen[e] || !chosen[e]) {
				fprintf(stderr, "\n  router %s: token %d slot %d picked expert %d (not in the reference set)\n",
					what, n, k, e);
				ok = 0;
				continue;
			}
			seen[e] = true;
			if (!(fabs(we - wref[e]) <= 1e-5 * fmax(fabs(wref[e]), 1e-2))) {
				fprintf(stderr, "\n  router %s: token %d expert %d weight %.8g, want %.8g\n", what, n,
					e, (double)we, wref[e]);
				ok = 0;
			}
		}
	}
	return ok;
}

static void test_router_forward(void)
{
	static const struct router_params ps[] = {
		{ 16, 4, 4, 2, MOE_SCORING_SOFTMAX, false, 1.0f },
		{ 16, 4, 4, 2, MOE_SCORING_SOFTMAX, true, 16.0f },
		{ 16, 4, 4, 2, MOE_SCORING_SIGMOID, true, 2.5f },
		{ 16, 4, 4, 2, MOE_SCORING_SIGMOID, false, 1.0f },
		{ 16, 6, 8, 3, MOE_SCORING_SIGMOID, true, 2.5f },
		{ 24, 5, 4, 1, MOE_SCORING_SIGMOID, true, 1.0f },
		{ 8, 2, 1, 1, MOE_SCORING_SOFTMAX, true, 1.0f },
		{ 12, 3, 1, 1, MOE_SCORING_SIGMOID, false, 16.0f },
		{ 6, 6, 1, 1, MOE_SCORING_SOFTMAX, false, 1.0f },	/* K = E */
	};
	enum { N = 24 };

	test_rng_seed(9);
	for (size_t c = 0; c < sizeof(ps) / sizeof(ps[0]); c++) {
		const struct router_params *p = &ps[c];
		size_t ne = (size_t)N * p->E, nk = (size_t)N * p->K;
		float *logits = falloc(ne), *scores = falloc(ne), *w = falloc(nk), *bias = falloc(p->E);
		int *idx = ialloc(nk);
		float bscale = p->scoring == MOE_SCORING_SOFTMAX ? 0.05f : 0.3f;
		char what[64];

		/* without bias */
		gen_router_logits(logits, NULL, p, N, 1.5f, 1e-5);
		router_forward(scores, idx, w, logits, NULL, p, N);
		snprintf(what, sizeof(what), "case %zu", c);
		CU_ASSERT(check_router(p, logits, NULL, N, scores, idx, w, what));

		/* with a random bias of the order of the scores */
		test_fill_randn(bias, p->E, bscale);
		gen_router_logits(logits, bias, p, N, 1.5f, 1e-5);
		router_forward(scores, idx, w, logits, bias, p, N);
		snprintf(what, sizeof(what), "case %zu + bias", c);
		CU_ASSERT(check_router(p, logits, bias, N, scores, idx, w, what));

		free(logits); free(scores); free(w); free(bias); free(idx);
	}
}

/* A large bias on a fixed set chooses it whatever the scores; the weights still come from the scores. */
static void test_router_bias(void)
{
	static const struct router_params ps[] = {
		{ 16, 4, 4, 2, MOE_SCORING_SIGMOID, true, 2.5f },
		{ 16, 4, 4, 2, MOE_SCORING_SOFTMAX, false, 1.0f },
		{ 8, 3, 1, 1, MOE_SCORING_SOFTMAX, true, 1.0f },
		{ 8, 3, 1, 1, MOE_SCORING_SIGMOID, false, 3.0f },
	};
	/* the forced experts: spread over two groups of 4 in the grouped cases */
	static const int forced[] = { 1, 6, 5, 2 };
	enum { N = 16 };

	test_rng_seed(10);
	for (size_t c = 0; c < sizeof(ps) / sizeof(ps[0]); c++) {
		const struct router_params *p = &ps[c];
		size_t ne = (size_t)N * p->E, nk = (size_t)N * p->K;
		float *logits = falloc(ne), *s0 = falloc(ne), *s1 = falloc(ne), *w0 = falloc(nk);
		float *w1 = falloc(nk), *bias = falloc(p->E);
		int *i0 = ialloc(nk), *i1 = ialloc(nk);
		int changed = 0;

		for (int k = 0; k < p->K; k++)
			bias[forced[k]] = 10.0f;
		gen_router_logits(logits, NULL, p, N, 2.0f, 1e-5);
		router_forward(s0, i0, w0, logits, NULL, p, N);
		router_forward(s1, i1, w1, logits, bias, p, N);
		CU_ASSERT(memcmp(s0, s1, ne * sizeof(float)) == 0);	/* scores carry no bias */
		CU_ASSERT(check_router(p, logits, bias, N, s1, i1, w1, "forced"));
		for (int n = 0; n < N; n++) {
			double sum = 0;

			for (int k = 0; k < p->K; k++)
				sum += s1[n * p->E + forced[k]];
			for (int k = 0; k < p->K; k++) {
				int e = i1[n * p->K + k], j;
				double want;

				for (j = 0; j < p->K; j++)
					if (forced[j] == e)
						break;
				CU_ASSERT(j < p->K);
				want = s1[n * p->E + e] / (p->norm_topk_prob ? sum : 1.0) * p->routed_scaling_factor;
				CU_ASSERT(fabs(w1[n * p->K + k] - want) <= 1e-5 * fmax(fabs(want), 1e-2));
				changed += i0[n * p->K + k] != e;
			}
		}
		CU_ASSERT(changed > 0);	/* the bias did change the selection */

		free(logits); free(s0); free(s1); free(w0); free(w1); free(bias); free(i0); free(i1);
	}
}

/* exact ties break toward the lower expert (and group) index */
static void test_router_ties(void)
{
	static const struct router_params ps[] = {
		{ 16, 3, 4, 2, MOE_SCORING_SOFTMAX, false, 1.0f },
		{ 16, 3, 4, 2, MOE_SCORING_SIGMOID, true, 2.0f },
		{ 8, 5, 1, 1, MOE_SCORING_SIGMOID, false, 1.0f },
	};
	enum { N = 3 };

	for (size_t c = 0; c < sizeof(ps) / sizeof(ps[0]); c++) {
		const struct router_params *p = &ps[c];
		float logits[N * 16] = { 0 }, scores[N * 16], w[N * 8];
		int idx[N * 8];

		router_forward(scores, idx, w, logits, NULL, p, N);
		for (int n = 0; n < N; n++) {
			bool seen[16] = { false };

			for (int k = 0; k < p->K; k++) {
				int e = idx[n * p->K + k];

				CU_ASSERT(e >= 0 && e < p->K);
				if (e >= 0 && e < p->K) {
					CU_ASSERT(!seen[e]);
					seen[e] = true;
				}
				double want = (p->scoring == MOE_SCORING_SOFTMAX ? 1.0 / p->E : 0.5);

				if (p->norm_topk_prob)
					want = 1.0 / p->K;
				want *= p->routed_scaling_factor;
				CU_ASSERT(fabs(w[n * p->K + k] - want) <= 1e-6 * want);
			}
		}
	}
}

struct router_ctx {
	const struct router_params *p;
	float *logits, *scores, *w;
	int *idx;
	const int *idx0;
	const float *r, *r2;
	int N;
	int selection_changed;
};

static double router_loss(void *q)
{
	struct router_ctx *c = q;
	size_t nk = (size_t)c->N * c->p->K, ne = (size_t)c->N * c->p->E;
	double L;

	router_forward(c->scores, c->idx, c->w, c->logits, NULL, c->p, c->N);
	if (memcmp(c->idx, c->idx0, nk * sizeof(int)))
		c->selection_changed++;
	L = gc_dot(c->r, c->w, nk);
	if (c->r2)
		L += gc_dot(c->r2, c->scores, ne);
	return L;
}

static void test_router_backward(void)
{
	static const struct router_params ps[] = {
		{ 8, 3, 4, 2, MOE_SCORING_SOFTMAX, false, 2.5f },
		{ 8, 3, 4, 2, MOE_SCORING_SOFTMAX, true, 2.5f },
		{ 8, 3, 4, 2, MOE_SCORING_SIGMOID, false, 2.5f },
		{ 8, 3, 4, 2, MOE_SCORING_SIGMOID, true, 2.5f },
		{ 6, 2, 1, 1, MOE_SCORING_SOFTMAX, true, 1.0f },
		{ 6, 2, 1, 1, MOE_SCORING_SIGMOID, true, 1.0f },
	};
	enum { N = 6 };

	test_rng_seed(11);
	for (size_t c = 0; c < sizeof(ps) / sizeof(ps[0]); c++) {
		const struct router_params *p = &ps[c];
		size_t ne = (size_t)N * p->E, nk = (size_t)N * p->K;
		float *logits = falloc(ne), *scores = falloc(ne), *w = falloc(nk), *r = falloc(nk);
		float *r2 = falloc(ne), *dl = falloc(ne), *dl2 = falloc(ne), *s0 = falloc(ne);
		int *idx = ialloc(nk), *idx0 = ialloc(nk);
		double *num = dalloc(ne);
		struct router_ctx ctx = { p, logits, scores, w, idx, idx0, r, NULL, N, 0 };
		char what[64];

		gen_router_logits(logits, NULL, p, N, 1.5f, 1e-2);
		test_fill_randn(r, nk, 1.0f);
		test_fill_randn(r2, ne, 1.0f);
		router_forward(s0, idx0, w, logits, NULL, p, N);

		for (int with_ds = 0; with_ds < 2; with_ds++) {
			ctx.r2 = with_ds ? r2 : NULL;
			memset(dl, 0, ne * sizeof(float));
			router_backward(dl, r, ctx.r2, s0, idx0, p, N);
			ctx.selection_changed = 0;
			gc_numeric_grad(num, logits, ne, 4e-3f, router_loss, &ctx);
			CU_ASSERT(ctx.selection_changed == 0);
			snprintf(what, sizeof(what), "router case %zu dlogits%s", c, with_ds ? " (+dscores)" : "");
			CU_ASSERT(gc_check(what, dl, num, ne, FD_TOL, 1e-6));

			ffill(dl2, ne, ACC_FILL);
			router_backward(dl2, r, ctx.r2, s0, idx0, p, N);
			router_backward(dl2, r, ctx.r2, s0, idx0, p, N);
			CU_ASSERT(check_accum("router accumulate", dl2, dl, ne));
		}

		free(logits); free(scores); free(w); free(r); free(r2); free(dl); free(dl2); free(s0);
		free(idx); free(idx0); free(num);
	}
}

/* ------------------------------------------------------------------------------------------------ */
/* balance loss */

static double balance_ref(const float *scores, const int *idx, int B, int T, int E, int K, double alpha)
{
	double total = 0;

	for (int b = 0; b < B; b++) {
		double f[64] = { 0 }, P[64] = { 0 }, sum = 0;

		for (int t = 0; t < T; t++) {
			const float *s = scores + (size_t)(b * T + t) * E;
			double st = 0;

			for (int k = 0; k < K; k++)
				f[idx[(b * T + t) * K + k]] += (double)E / ((double)K * T);
			for (int e = 0; e < E; e++)
				st += s[e];
			for (int e = 0; e < E; e++)
				P[e] += s[e] / st / T;
		}
		for (int e = 0; e < E; e++)
			sum += f[e] * P[e];
		total += sum;
	}
	return alpha * total / B;
}

struct bal_ctx {
	float *scores;
	const int *idx;
	int B, T, E, K;
	float alpha, dloss;
};

static double bal_loss(void *p)
{
	struct bal_ctx *c = p;

	return (double)c->dloss * balance_loss_forward(c->scores, c->idx, c->B, c->T, c->E, c->K, c->alpha);
}

static void test_balance_loss(void)
{
	enum { B = 2, T = 9, E = 6, K = 2 };
	const float alpha = 0.3f, dloss = 0.7f;
	size_t ne = (size_t)B * T * E;
	float *scores = falloc(ne), *ds = falloc(ne), *ds2 = falloc(ne);
	int *idx = ialloc((size_t)B * T * K);
	double *num = dalloc(ne);
	struct bal_ctx c = { scores, idx, B, T, E, K, alpha, dloss };
	float L;
	double want;

	test_rng_seed(12);
	for (size_t i = 0; i < ne; i++)
		scores[i] = test_rand_uniform(0.1f, 1.0f);
	/* distinct pairs, expert 5 never picked in sequence 0 */
	for (int n = 0; n < B * T; n++) {
		int m = n < T ? E - 1 : E;
		int a = (int)test_rand_uniform(0, (float)m) % m;
		int d = 1 + (int)test_rand_uniform(0, (float)(m - 1)) % (m - 1);

		idx[n * K] = a;
		idx[n * K + 1] = (a + d) % m;
	}

	L = balance_loss_forward(scores, idx, B, T, E, K, alpha);
	want = balance_ref(scores, idx, B, T, E, K, alpha);
	CU_ASSERT(check_close("balance_loss forward", fabs(L - want) / fabs(want), 1e-5));
	/* perfectly uniform scores and load give alpha */
	{
		float *u = falloc(ne);
		int *ui = ialloc((size_t)B * T * K);

		ffill(u, ne, 0.25f);
		for (int n = 0; n < B * T; n++)
			for (int k = 0; k < K; k++)
				ui[n * K + k] = (n * K + k) % E;
		/* T*K = 18 = 3 E: every expert picked exactly 3 times per sequence */
		CU_ASSERT(fabs(balance_loss_forward(u, ui, B, T, E, K, alpha) - alpha) <= 1e-6);
		free(u);
		free(ui);
	}

	balance_loss_backward(ds, scores, idx, B, T, E, K, alpha, dloss);
	gc_numeric_grad(num, scores, ne, 1e-2f, bal_loss, &c);
	CU_ASSERT(gc_check("balance_loss dscores", ds, num, ne, FD_TOL, 1e-8));

	ffill(ds2, ne, ACC_FILL);
	balance_loss_backward(ds2, scores, idx, B, T, E, K, alpha, dloss);
	balance_loss_backward(ds2, scores, idx, B, T, E, K, alpha, dloss);
	CU_ASSERT(check_accum("balance_loss accumulate", ds2, ds, ne));

	free(scores); free(ds); free(ds2); free(idx); free(num);
}

/* ------------------------------------------------------------------------------------------------ */
/* sizes past the ops' threading / chunking thresholds, against references in double */

/* naive causal attention backward in double, from dout */
static void attn_ref_backward(double *gq, double *gk, double *gv, const float *dout, const float *q,
			      const float *k, const float *v, int B, int T, int H, int dq, int dv, double scale)
{
	double *P = dalloc(T), *dP = dalloc(T);

	memset(gq, 0, sizeof(double) * B * T * H * dq);
	memset(gk, 0, sizeof(double) * B * T * H * dq);
	memset(gv, 0, sizeof(double) * B * T * H * dv);
	for (int b = 0; b < B; b++)
		for (int h = 0; h < H; h++)
			for (int t = 0; t < T; t++) {
				size_t qi = ((size_t)(b * T + t) * H + h) * dq, oi = ((size_t)(b * T + t) * H + h) * dv;
				double m = -INFINITY, sum = 0, D = 0;

				for (int s = 0; s <= t; s++) {
					size_t ki = ((size_t)(b * T + s) * H + h) * dq;
					double d = 0;

					for (int i = 0; i < dq; i++)
						d += (double)q[qi + i] * k[ki + i];
					P[s] = d * scale;
					m = P[s] > m ? P[s] : m;
				}
				for (int s = 0; s <= t; s++)
					sum += exp(P[s] - m);
				for (int s = 0; s <= t; s++) {
					size_t vi = ((size_t)(b * T + s) * H + h) * dv;

					P[s] = exp(P[s] - m) / sum;
					dP[s] = 0;
					for (int j = 0; j < dv; j++) {
						dP[s] += (double)dout[oi + j] * v[vi + j];
						gv[vi + j] += P[s] * dout[oi + j];
					}
					D += P[s] * dP[s];
				}
				for (int s = 0; s <= t; s++) {
					size_t ki = ((size_t)(b * T + s) * H + h) * dq;
					double dS = P[s] * (dP[s] - D) * scale;

					for (int i = 0; i < dq; i++) {
						gq[qi + i] += dS * k[ki + i];
						gk[ki + i] += dS * q[qi + i];
					}
				}
			}
	free(P);
	free(dP);
}

static void test_large_attention(void)
{
	enum { B = 2, T = 150, H = 2, DQ = 6, DV = 4 };	/* three query blocks of 64, the last partial */
	const float scale = 0.45f;
	size_t nq = (size_t)B * T * H * DQ, nv = (size_t)B * T * H * DV, nl = (size_t)B * H * T;
	float *q = falloc(nq), *k = falloc(nq), *v = falloc(nv), *out = falloc(nv), *lse = falloc(nl);
	float *dout = falloc(nv), *gq = falloc(nq), *gk = falloc(nq), *gv = falloc(nv);
	double *rq = dalloc(nq), *rk = dalloc(nq), *rv = dalloc(nv);

	test_rng_seed(14);
	test_fill_randn(q, nq, 1.5f);
	test_fill_randn(k, nq, 1.5f);
	test_fill_randn(v, nv, 1.0f);
	test_fill_randn(dout, nv, 1.0f);
	attention_forward(out, lse, q, k, v, B, T, H, DQ, DV, scale);
	attention_backward(gq, gk, gv, dout, out, lse, q, k, v, B, T, H, DQ, DV, scale);
	attn_ref_backward(rq, rk, rv, dout, q, k, v, B, T, H, DQ, DV, scale);
	CU_ASSERT(gc_check("attention T=150 dq vs reference", gq, rq, nq, 1e-4, 1e-6));
	CU_ASSERT(gc_check("attention T=150 dk vs reference", gk, rk, nq, 1e-4, 1e-6));
	CU_ASSERT(gc_check("attention T=150 dv vs reference", gv, rv, nv, 1e-4, 1e-6));

	free(q); free(k); free(v); free(out); free(lse); free(dout); free(gq); free(gk); free(gv);
	free(rq); free(rk); free(rv);
}

static void test_large_linear(void)
{
	enum { N = 70, IN = 96, OUT = 80 };
	float *x = falloc(N * IN), *w = falloc(OUT * IN), *y = falloc(N * OUT), *dy = falloc(N * OUT);
	float *dx = falloc(N * IN), *dw = falloc(OUT * IN);
	double *ry = dalloc(N * OUT), *rdx = dalloc(N * IN), *rdw = dalloc(OUT * IN);

	test_rng_seed(15);
	test_fill_randn(x, N * IN, 1.0f);
	test_fill_randn(w, OUT * IN, 0.1f);
	test_fill_randn(dy, N * OUT, 1.0f);
	ffill(dx, N * IN, ACC_FILL);
	ffill(dw, OUT * IN, ACC_FILL);
	linear_forward(y, x, w, N, IN, OUT);
	linear_backward(dx, dw, dy, x, w, N, IN, OUT);
	for (int n = 0; n < N; n++)
		for (int i = 0; i < IN; i++)
			rdx[n * IN + i] = ACC_FILL;
	for (int o = 0; o < OUT; o++)
		for (int i = 0; i < IN; i++)
			rdw[o * IN + i] = ACC_FILL;
	for (int n = 0; n < N; n++)
		for (int o = 0; o < OUT; o++) {
			double acc = 0, g = dy[n * OUT + o];

			for (int i = 0; i < IN; i++) {
				acc += (double)x[n * IN + i] * w[o * IN + i];
				rdx[n * IN + i] += g * w[o * IN + i];
				rdw[o * IN + i] += g * x[n * IN + i];
			}
			ry[n * OUT + o] = acc;
		}
	CU_ASSERT(check_close("linear large forward", rel_err_d(y, ry, N * OUT, 1.0), 1e-5));
	CU_ASSERT(check_close("linear large dx", rel_err_d(dx, rdx, N * IN, 1.0), 1e-5));
	CU_ASSERT(check_close("linear large dw", rel_err_d(dw, rdw, OUT * IN, 1.0), 1e-5));

	free(x); free(w); free(y); free(dy); free(dx); free(dw); free(ry); free(rdx); free(rdw);
}

static void test_large_embedding(void)
{
	enum { V = 17, C = 130, N = 200 };	/* three column chunks of 64, N*C past the threading threshold */
	float *table = falloc(V * C), *out = falloc(N * C), *dout = falloc(N * C), *dt = falloc(V * C);
	double *ref = dalloc(V * C);
	int *ids = ialloc(N);

	test_rng_seed(16);
	test_fill_randn(table, V * C, 1.0f);
	test_fill_randn(dout, N * C, 1.0f);
	for (int n = 0; n < N; n++)
		ids[n] = (int)test_rand_uniform(0, V - 1);	/* id V-1 never used */
	embedding_forward(out, ids, table, N, C);
	for (int n = 0; n < N; n++)
		CU_ASSERT(memcmp(out + (size_t)n * C, table + (size_t)ids[n] * C, C * sizeof(float)) == 0);
	ffill(dt, V * C, ACC_FILL);
	embedding_backward(dt, dout, ids, N, C);
	for (int i = 0; i < V * C; i++)
		ref[i] = ACC_FILL;
	for (int n = 0; n < N; n++)
		for (int c = 0; c < C; c++)
			ref[ids[n] * C + c] += dout[n * C + c];
	CU_ASSERT(check_close("embedding large backward", rel_err_d(dt, ref, V * C, 1.0), 1e-5));
	for (int c = 0; c < C; c++)
		CU_ASSERT(dt[(V - 1) * C + c] == ACC_FILL);

	free(table); free(out); free(dout); free(dt); free(ref); free(ids);
}

static void test_large_rmsnorm(void)
{
	enum { N = 160, C = 130 };
	const float eps = 1e-6f;
	float *x = falloc(N * C), *w = falloc(C), *y = falloc(N * C), *rstd = falloc(N), *dy = falloc(N * C);
	float *dx = falloc(N * C), *dw = falloc(C);
	double *ry = dalloc(N * C), *rdx = dalloc(N * C), *rdw = dalloc(C);

	test_rng_seed(17);
	test_fill_randn(x, N * C, 1.0f);
	for (int i = 0; i < C; i++)
		w[i] = 1.0f + 0.3f * test_randn();
	test_fill_randn(dy, N * C, 1.0f);
	rmsnorm_forward(y, rstd, x, w, N, C, eps);
	ffill(dx, N * C, ACC_FILL);
	ffill(dw, C, ACC_FILL);
	rmsnorm_backward(dx, dw, dy, x, w, rstd, N, C);
	for (int i = 0; i < C; i++)
		rdw[i] = ACC_FILL;
	for (int n = 0; n < N; n++) {
		const float *xr = x + n * C, *dyr = dy + n * C;
		double ss = 0, dot = 0, r;

		for (int i = 0; i < C; i++) {
			ss += (double)xr[i] * xr[i];
			dot += (double)dyr[i] * w[i] * xr[i];
		}
		r = 1.0 / sqrt(ss / C + eps);
		for (int i = 0; i < C; i++) {
			ry[n * C + i] = xr[i] * r * w[i];
			rdx[n * C + i] = ACC_FILL + r * w[i] * dyr[i] - xr[i] * r * r * r * dot / C;
			rdw[i] += (double)dyr[i] * xr[i] * r;
		}
	}
	CU_ASSERT(check_close("rmsnorm large forward", rel_err_d(y, ry, N * C, 1.0), 1e-5));
	CU_ASSERT(check_close("rmsnorm large dx", rel_err_d(dx, rdx, N * C, 1.0), 1e-5));
	CU_ASSERT(check_close("rmsnorm large dw", rel_err_d(dw, rdw, C, 1.0), 1e-5));

	free(x); free(w); free(y); free(rstd); free(dy); free(dx); free(dw); free(ry); free(rdx); free(rdw);
}

/* forward and the three backward variants (both, dgate only, dup only) vs double */
static void swiglu_check_ref(size_t n)
{
	float *g = falloc(n), *u = falloc(n), *o = falloc(n), *dout = falloc(n);
	float *dg = falloc(n), *du = falloc(n), *dg1 = falloc(n), *du1 = falloc(n);
	double *ro = dalloc(n), *rdg = dalloc(n), *rdu = dalloc(n);
	char what[64];

	test_fill_randn(g, n, 3.0f);
	test_fill_randn(u, n, 1.0f);
	test_fill_randn(dout, n, 1.0f);
	for (size_t i = 0; i < n; i++) {
		double s = 1.0 / (1.0 + exp(-(double)g[i]));

		ro[i] = g[i] * s * u[i];
		rdg[i] = ACC_FILL + (double)dout[i] * u[i] * s * (1 + g[i] * (1 - s));
		rdu[i] = ACC_FILL + (double)dout[i] * g[i] * s;
	}
	swiglu_forward(o, g, u, n);
	snprintf(what, sizeof(what), "swiglu n=%zu forward", n);
	CU_ASSERT(check_close(what, rel_err_d(o, ro, n, 1.0), 1e-5));
	ffill(dg, n, ACC_FILL);
	ffill(du, n, ACC_FILL);
	ffill(dg1, n, ACC_FILL);
	ffill(du1, n, ACC_FILL);
	swiglu_backward(dg, du, dout, g, u, n);
	swiglu_backward(dg1, NULL, dout, g, u, n);
	swiglu_backward(NULL, du1, dout, g, u, n);
	snprintf(what, sizeof(what), "swiglu n=%zu dgate", n);
	CU_ASSERT(check_close(what, rel_err_d(dg, rdg, n, 1.0), 1e-5));
	snprintf(what, sizeof(what), "swiglu n=%zu dup", n);
	CU_ASSERT(check_close(what, rel_err_d(du, rdu, n, 1.0), 1e-5));
	snprintf(what, sizeof(what), "swiglu n=%zu dgate only", n);
	CU_ASSERT(check_close(what, rel_err_d(dg1, rdg, n, 1.0), 1e-5));
	snprintf(what, sizeof(what), "swiglu n=%zu dup only", n);
	CU_ASSERT(check_close(what, rel_err_d(du1, rdu, n, 1.0), 1e-5));

	free(g); free(u); free(o); free(dout); free(dg); free(du); free(dg1); free(du1);
	free(ro); free(rdg); free(rdu);
}

static void test_large_swiglu(void)
{
	test_rng_seed(18);
	swiglu_check_ref(5);
	swiglu_check_ref(37);
	swiglu_check_ref(40001);
}

/* ------------------------------------------------------------------------------------------------ */

static void test_vec_add(void)
{
	enum { n = 13 };
	float a[n], b[n], want[n];

	test_rng_seed(13);
	test_fill_randn(a, n, 1.0f);
	test_fill_randn(b, n, 1.0f);
	for (int i = 0; i < n; i++)
		want[i] = a[i] + b[i];
	vec_add(a, b, n);
	CU_ASSERT(memcmp(a, want, sizeof(a)) == 0);
	vec_add(a, b, 0);
	CU_ASSERT(memcmp(a, want, sizeof(a)) == 0);

	/* big enough to be threaded */
	{
		size_t nb = 50001;
		float *x = falloc(nb), *y = falloc(nb), *z = falloc(nb);

		test_fill_randn(x, nb, 1.0f);
		test_fill_randn(y, nb, 1.0f);
		for (size_t i = 0; i < nb; i++)
			z[i] = x[i] + y[i];
		vec_add(x, y, nb);
		CU_ASSERT(memcmp(x, z, nb * sizeof(float)) == 0);
		free(x); free(y); free(z);
	}
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "linear", test_linear },
		{ "embedding", test_embedding },
		{ "rmsnorm", test_rmsnorm },
		{ "rope", test_rope },
		{ "rope_yarn_table", test_rope_yarn_table },
		{ "attention_forward", test_attention_forward },
		{ "attention_backward", test_attention_backward },
		{ "swiglu", test_swiglu },
		{ "cross_entropy", test_cross_entropy },
		{ "router_forward", test_router_forward },
		{ "router_bias", test_router_bias },
		{ "router_ties", test_router_ties },
		{ "router_backward", test_router_backward },
		{ "balance_loss", test_balance_loss },
		{ "large_attention", test_large_attention },
		{ "large_linear", test_large_linear },
		{ "large_embedding", test_large_embedding },
		{ "large_rmsnorm", test_large_rmsnorm },
		{ "large_swiglu", test_large_swiglu },
		{ "vec_add", test_vec_add },
		{ NULL, NULL },
	};

	add_suite("ops_cpu", cases);
}
