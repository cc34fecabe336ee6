/*
 * model/ops_cpu.c - CPU reference implementation of model/ops.h.
 *
 * float32, deterministic: every reduction runs in a fixed order whatever the thread count (OpenMP loops
 * split independent rows; sums across rows run serially).  Matrix products go through cblas_sgemm; the
 * project links the OpenMP build of OpenBLAS, so a product issued inside one of our parallel regions runs
 * single-threaded there instead of oversubscribing the cores.
 */
#include "model/ops.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define ATTN_QBLOCK 64  /* query rows per attention block: scratch is ATTN_QBLOCK x T per thread */

void linear_forward(float *y, const float *x, const float *w, int N, int in, int out)
{
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
}

void linear_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
		     int N, int in, int out)
{
	if (dx)
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in, out, 1.0f, dy, out, w, in,
			    1.0f, dx, in);
	if (dw)
		cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, N, 1.0f, dy, out, x, in,
			    1.0f, dw, in);
}

void embedding_forward(float *out, const int *ids, const float *table, int N, int C)
{
#pragma omp parallel for schedule(static)
	for (int n = 0; n < N; n++)
		memcpy(out + (size_t)n * C, table + (size_t)ids[n] * C, sizeof(float) * C);
}

void embedding_backward(float *dtable, const float *dout, const int *ids, int N, int C)
{
	/* serial over tokens: repeated ids add in token order */
	for (int n = 0; n < N; n++) {
		float *row = dtable + (size_t)ids[n] * C;
		const float *d = dout + (size_t)n * C;
		for (int c = 0; c < C; c++)
			row[c] += d[c];
	}
}

void rmsnorm_forward(float *y, float *rstd, const float *x, const float *w, int N, int C, float eps)
{
#pragma omp parallel for schedule(static)
	for (int n = 0; n < N; n++) {
		const float *xr = x + (size_t)n * C;
		float *yr = y + (size_t)n * C;
		float ss = 0.0f;
		for (int c = 0; c < C; c++)
			ss += xr[c] * xr[c];
		float r = 1.0f / sqrtf(ss / C + eps);
		rstd[n] = r;
		for (int c = 0; c < C; c++)
			yr[c] = xr[c] * r * w[c];
	}
}

void rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
		      const float *rstd, int N, int C)
{
	if (dx) {
#pragma omp parallel for schedule(static)
		for (int n = 0; n < N; n++) {
			const float *xr = x + (size_t)n * C, *dyr = dy + (size_t)n * C;
			float *dxr = dx + (size_t)n * C;
			float r = rstd[n], dot = 0.0f;
			for (int c = 0; c < C; c++)
				dot += dyr[c] * w[c] * xr[c];
			float k = dot * r * r * r / C;
			for (int c = 0; c < C; c++)
				dxr[c] += dyr[c] * w[c] * r - xr[c] * k;
		}
	}
	if (dw) {
		for (int n = 0; n < N; n++) {
			const float *xr = x + (size_t)n * C, *dyr = dy + (size_t)n * C;
			float r = rstd[n];
			for (int c = 0; c < C; c++)
				dw[c] += dyr[c] * xr[c] * r;
		}
	}
}

/* sign = +1 rotates forward, -1 applies the inverse (the transpose) */
static void rope_apply(float *x, const int *pos, int N, int nheads, int row_stride, int head_stride,
		       int dr, float theta, float sign)
{
	int half = dr / 2;
#pragma omp parallel for schedule(static)
	for (int n = 0; n < N; n++) {
		for (int i = 0; i < half; i++) {
			double inv_freq = pow((double)theta, -2.0 * i / dr);
			double angle = (double)pos[n] * inv_freq;
			float c = (float)cos(angle), s = sign * (float)sin(angle);
			for (int h = 0; h < nheads; h++) {
				float *p = x + (size_t)n * row_stride + (size_t)h * head_stride + 2 * i;
				float a = p[0], b = p[1];
				p[0] = a * c - b * s;
				p[1] = a * s + b * c;
			}
		}
	}
}

void rope_forward(float *x, const int *pos, int N, int nheads, int row_stride, int head_stride,
		  int dr, float theta)
{
	rope_apply(x, pos, N, nheads, row_stride, head_stride, dr, theta, 1.0f);
}

void rope_backward(float *dx, const int *pos, int N, int nheads, int row_stride, int head_stride,
		   int dr, float theta)
{
	rope_apply(dx, pos, N, nheads, row_stride, head_stride, dr, theta, -1.0f);
}

/*
 * Scaled scores of query rows [i0, i0+nq) against keys [0, nk) of one (b, h), then the causal mask and
 * P = exp(S - lse).  With lse NULL the row's log-sum-exp is computed (forward) and written to lse_out.
 */
static void attn_block_probs(float *P, const float *qh, const float *kh, int ldq, int i0, int nq, int nk,
			     int dq, float scale, const float *lse, float *lse_out)
{
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, dq, scale, qh + (size_t)i0 * ldq, ldq,
		    kh, ldq, 0.0f, P, nk);
	for (int r = 0; r < nq; r++) {
		float *row = P + (size_t)r * nk;
		int valid = i0 + r + 1;  /* keys 0..i */
		float m;
		if (lse) {
			m = lse[i0 + r];
		} else {
			float mx = -INFINITY, sum = 0.0f;
			for (int j = 0; j < valid; j++)
				mx = row[j] > mx ? row[j] : mx;
			for (int j = 0; j < valid; j++)
				sum += expf(row[j] - mx);
			m = mx + logf(sum);
			lse_out[i0 + r] = m;
		}
		for (int j = 0; j < valid; j++)
			row[j] = expf(row[j] - m);
		for (int j = valid; j < nk; j++)
			row[j] = 0.0f;
	}
}

void attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
		       int B, int T, int H, int dq, int dv, float scale)
{
	int nblocks = (T + ATTN_QBLOCK - 1) / ATTN_QBLOCK;
	int ldq = H * dq, ldv = H * dv;
#pragma omp parallel
	{
		float *P = malloc(sizeof(float) * ATTN_QBLOCK * T);
#pragma omp for schedule(dynamic, 1)
		for (int task = 0; task < B * H * nblocks; task++) {
			int blk = task % nblocks, bh = task / nblocks, b = bh / H, h = bh % H;
			int i0 = blk * ATTN_QBLOCK;
			int nq = T - i0 < ATTN_QBLOCK ? T - i0 : ATTN_QBLOCK;
			int nk = i0 + nq;
			size_t base = (size_t)b * T * H + h;
			attn_block_probs(P, q + base * dq, k + base * dq, ldq, i0, nq, nk, dq, scale, NULL,
					 lse + (size_t)bh * T);
			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, dv, nk, 1.0f, P, nk,
				    v + base * dv, ldv, 0.0f, out + (base + (size_t)i0 * H) * dv, ldv);
		}
		free(P);
	}
}

void attention_backward(float *grad_q, float *grad_k, float *grad_v, const float *dout,
			const float *out, const float *lse, const float *q, const float *k, const float *v,
			int B, int T, int H, int dq_dim, int dv_dim, float scale)
{
	int ldq = H * dq_dim, ldv = H * dv_dim;
	/* one task per (b, h): dk and dv sum over the query blocks in a fixed order */
#pragma omp parallel
	{
		float *P = malloc(sizeof(float) * ATTN_QBLOCK * T);
		float *dP = malloc(sizeof(float) * ATTN_QBLOCK * T);
#pragma omp for schedule(dynamic, 1)
		for (int bh = 0; bh < B * H; bh++) {
			int b = bh / H, h = bh % H;
			size_t base = (size_t)b * T * H + h;
			const float *qh = q + base * dq_dim, *kh = k + base * dq_dim, *vh = v + base * dv_dim;
			const float *doh = dout + base * dv_dim, *oh = out + base * dv_dim;
			for (int i0 = 0; i0 < T; i0 += ATTN_QBLOCK) {
				int nq = T - i0 < ATTN_QBLOCK ? T - i0 : ATTN_QBLOCK;
				int nk = i0 + nq;
				attn_block_probs(P, qh, kh, ldq, i0, nq, nk, dq_dim, scale,
						 lse + (size_t)bh * T, NULL);
				const float *dob = doh + (size_t)i0 * ldv;
				/* dP = dO V^T */
				cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, dv_dim, 1.0f, dob, ldv,
					    vh, ldv, 0.0f, dP, nk);
				/* dS = P * (dP - rowsum(dO * O)), times the scale */
				for (int r = 0; r < nq; r++) {
					const float *o_r = oh + (size_t)(i0 + r) * ldv, *do_r = dob + (size_t)r * ldv;
					float D = 0.0f;
					for (int d = 0; d < dv_dim; d++)
						D += do_r[d] * o_r[d];
					float *pr = P + (size_t)r * nk, *dpr = dP + (size_t)r * nk;
					for (int j = 0; j < nk; j++)
						dpr[j] = pr[j] * (dpr[j] - D) * scale;
				}
				/* dV += P^T dO; dQ += dS K; dK += dS^T Q */
				cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, dv_dim, nq, 1.0f, P, nk,
					    dob, ldv, 1.0f, grad_v + base * dv_dim, ldv);
				cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, dq_dim, nk, 1.0f, dP, nk,
					    kh, ldq, 1.0f, grad_q + (base + (size_t)i0 * H) * dq_dim, ldq);
				cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, dq_dim, nq, 1.0f, dP, nk,
					    qh + (size_t)i0 * ldq, ldq, 1.0f, grad_k + base * dq_dim, ldq);
			}
		}
		free(P);
		free(dP);
	}
}

static inline float sigmoidf(float x)
{
	return 1.0f / (1.0f + expf(-x));
}

void swiglu_forward(float *out, const float *gate, const float *up, size_t n)
{
#pragma omp parallel for schedule(static)
	for (size_t i = 0; i < n; i++)
		out[i] = gate[i] * sigmoidf(gate[i]) * up[i];
}

void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
		     size_t n)
{
#pragma omp parallel for schedule(static)
	for (size_t i = 0; i < n; i++) {
		float g = gate[i], s = sigmoidf(g);
		if (dgate)
			dgate[i] += dout[i] * up[i] * s * (1.0f + g * (1.0f - s));
		if (dup)
			dup[i] += dout[i] * g * s;
	}
}

static float row_logsumexp(const float *row, int V)
{
	float mx = -INFINITY, sum = 0.0f;
	for (int j = 0; j < V; j++)
		mx = row[j] > mx ? row[j] : mx;
	for (int j = 0; j < V; j++)
		sum += expf(row[j] - mx);
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

void cross_entropy_backward(float *dlogits, const float *logits, const int *targets, float dloss,
			    int N, int V)
{
#pragma omp parallel for schedule(static)
	for (int n = 0; n < N; n++) {
		const float *row = logits + (size_t)n * V;
		float *drow = dlogits + (size_t)n * V;
		if (targets[n] < 0) {
			memset(drow, 0, sizeof(float) * V);
			continue;
		}
		float lse = row_logsumexp(row, V);
		for (int j = 0; j < V; j++)  /* reads row[j] before writing drow[j]: in place is fine */
			drow[j] = dloss * expf(row[j] - lse);
		drow[targets[n]] -= dloss;
	}
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
