#include "model/moe_dispatch.h"

#include <stdlib.h>
#include <string.h>

void dispatch_free(struct moe_dispatch *d)
{
	free(d->send_row);
	free(d->send_token);
	free(d->load);
	free(d->next);
	free(d->recv_counts);
	free(d->peer_send);
	free(d->peer_recv);
	free(d->elem_send);
	free(d->elem_recv);
	free(d->offsets);
	free(d->recv_to_expert);
	free(d->buf);
	memset(d, 0, sizeof(*d));
}

int dispatch_init(struct moe_dispatch *d, struct comm_group *g, int N, int K, int E, int expert_begin,
		  int expert_end)
{
	dispatch_free(d);
	d->g = g;
	d->ep = g ? comm_size(g) : 1;
	d->ep_rank = g ? comm_rank(g) : 0;
	d->N = N;
	d->K = K;
	d->E = E;
	d->El = expert_end - expert_begin;
	d->send_row = malloc(sizeof(int) * N * K);
	d->send_token = malloc(sizeof(int) * N * K);
	d->load = malloc(sizeof(int64_t) * E);
	d->next = malloc(sizeof(int64_t) * E);
	d->recv_counts = malloc(sizeof(int64_t) * d->ep * d->El);
	d->peer_send = malloc(sizeof(int64_t) * d->ep);
	d->peer_recv = malloc(sizeof(int64_t) * d->ep);
	d->elem_send = malloc(sizeof(int64_t) * d->ep);
	d->elem_recv = malloc(sizeof(int64_t) * d->ep);
	d->offsets = malloc(sizeof(int) * (d->El + 1));
	if (!d->send_row || !d->send_token || !d->load || !d->next || !d->recv_counts || !d->peer_send ||
	    !d->peer_recv || !d->elem_send || !d->elem_recv || !d->offsets)
		return -1;
	return 0;
}

/* stable counting sort of the (token, slot) pairs by expert */
static void sort_by_expert(struct moe_dispatch *d, const int *topk_idx)
{
	int NK = d->N * d->K;
	int64_t *next = d->next;
	memset(d->load, 0, sizeof(int64_t) * d->E);
	for (int i = 0; i < NK; i++)
		d->load[topk_idx[i]]++;
	int64_t acc = 0;
	for (int e = 0; e < d->E; e++) {
		next[e] = acc;
		acc += d->load[e];
	}
	for (int i = 0; i < NK; i++) {
		int r = (int)next[topk_idx[i]]++;
		d->send_row[i] = r;
		d->send_token[r] = i / d->K;
	}
}

static int ensure_buf(struct moe_dispatch *d, size_t floats)
{
	if (floats <= d->buf_cap)
		return 0;
	float *b = realloc(d->buf, sizeof(float) * floats);
	if (!b)
		return -1;
	d->buf = b;
	d->buf_cap = floats;
	return 0;
}

int dispatch_plan(struct moe_dispatch *d, const int *topk_idx)
{
	int ep = d->ep, El = d->El;
	sort_by_expert(d, topk_idx);
	if (!d->g || ep == 1) {
		d->offsets[0] = 0;
		for (int e = 0; e < El; e++)
			d->offsets[e + 1] = d->offsets[e] + (int)d->load[e];
		d->R = d->offsets[El];
		return 0;
	}
	/* rank p holds experts [p*El, (p+1)*El): the counts for them go to p */
	int64_t *counts_each = d->elem_send;
	for (int p = 0; p < ep; p++)
		counts_each[p] = El;
	if (comm_alltoallv(d->g, d->load, counts_each, d->recv_counts, counts_each, COMM_I64))
		return -1;
	for (int p = 0; p < ep; p++) {
		d->peer_send[p] = 0;
		d->peer_recv[p] = 0;
		for (int e = 0; e < El; e++) {
			d->peer_send[p] += d->load[p * El + e];
			d->peer_recv[p] += d->recv_counts[p * El + e];
		}
	}
	/* expert-major: expert e's rows come from source 0, then 1, ... */
	d->offsets[0] = 0;
	for (int e = 0; e < El; e++) {
		int64_t n = 0;
		for (int p = 0; p < ep; p++)
			n += d->recv_counts[p * El + e];
		d->offsets[e + 1] = d->offsets[e] + (int)n;
	}
	d->R = d->offsets[El];
	int *r2e = realloc(d->recv_to_expert, sizeof(int) * (d->R + 1));
	if (!r2e)
		return -1;
	d->recv_to_expert = r2e;
	int i = 0;
	for (int p = 0; p < ep; p++) {
		for (int e = 0; e < El; e++) {
			int64_t before = 0;  /* rows of expert e from sources before p */
			for (int q = 0; q < p; q++)
				before += d->recv_counts[q * El + e];
			for (int64_t j = 0; j < d->recv_counts[p * El + e]; j++)
				r2e[i++] = d->offsets[e] + (int)(before + j);
		}
	}
	return 0;
}

static void scale_counts(int64_t *out, const int64_t *rows, int n, int C)
{
	for (int p = 0; p < n; p++)
		out[p] = rows[p] * C;
}

int dispatch_to_experts(struct moe_dispatch *d, const float *send, float *expert_rows, int C)
{
	if (!d->g || d->ep == 1) {
		memcpy(expert_rows, send, sizeof(float) * (size_t)d->R * C);
		return 0;
	}
	if (ensure_buf(d, (size_t)d->R * C + 1))
		return -1;
	scale_counts(d->elem_send, d->peer_send, d->ep, C);
	scale_counts(d->elem_recv, d->peer_recv, d->ep, C);
	if (comm_alltoallv(d->g, send, d->elem_send, d->buf, d->elem_recv, COMM_F32))
		return -1;
#pragma omp parallel for schedule(static)
	for (int i = 0; i < d->R; i++)
		memcpy(expert_rows + (size_t)d->recv_to_expert[i] * C, d->buf + (size_t)i * C, sizeof(float) * C);
	return 0;
}

int dispatch_from_experts(struct moe_dispatch *d, const float *expert_rows, float *send, int C)
{
	if (!d->g || d->ep == 1) {
		memcpy(send, expert_rows, sizeof(float) * (size_t)d->R * C);
		return 0;
	}
	if (ensure_buf(d, (size_t)d->R * C + 1))
		return -1;
#pragma omp parallel for schedule(static)
	for (int i = 0; i < d->R; i++)
		memcpy(d->buf + (size_t)i * C, expert_rows + (size_t)d->recv_to_expert[i] * C, sizeof(float) * C);
	scale_counts(d->elem_send, d->peer_send, d->ep, C);
	scale_counts(d->elem_recv, d->peer_recv, d->ep, C);
	/* the way back: what arrived from p returns to p */
	if (comm_alltoallv(d->g, d->buf, d->elem_recv, send, d->elem_send, COMM_F32))
		return -1;
	return 0;
}
