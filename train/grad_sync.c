#include "train/grad_sync.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "optim/adamw.h"
#ifdef MOE_HAVE_CUDA
#include "launch/cuda/comm_device.h"
#include "launch/cuda/device.h"
#include "optim/cuda/adamw_cuda.h"
#endif

size_t grad_space_size(const struct moe_model *m, int expert)
{
	size_t n = 0;
	for (int i = 0; i < m->n_params; i++)
		if (m->params[i].kind != PARAM_BUFFER && m->params[i].expert_stacked == expert)
			n += m->params[i].numel;
	return n;
}

void grad_pack(const struct moe_model *m, int expert, float *packed, float *arena, int to_packed)
{
	size_t off = 0;
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		if (p->kind == PARAM_BUFFER || p->expert_stacked != expert)
			continue;
		if (to_packed)
			memcpy(packed + off, arena + p->offset, sizeof(float) * p->numel);
		else
			memcpy(arena + p->offset, packed + off, sizeof(float) * p->numel);
		off += p->numel;
	}
}

int grad_sync_init(struct grad_sync *s, const struct moe_model *m)
{
	memset(s, 0, sizeof(*s));
	s->n_rep = grad_space_size(m, 0);
	s->n_exp = grad_space_size(m, 1);
	s->rep_buf = malloc(sizeof(float) * (s->n_rep + 1));
	s->exp_buf = malloc(sizeof(float) * (s->n_exp + 1));
	return s->rep_buf && s->exp_buf ? 0 : -1;
}

/*
 * The backward's layer after which param i's gradient is complete: its own layer's; the tensors before
 * every layer (the embedding) at the very end (-1), those after every layer (final norm, output head)
 * before the last layer's.  INT_MIN for a tensor the backward's order is not known of (between layers,
 * or a layer beyond the decoder's).
 */
static int ready_layer(const struct moe_model *m, int i, int first_layered, int last_layered)
{
	int l = m->params[i].layer, L = m->cfg.num_hidden_layers;
	if (l >= 0)
		return l < L ? l : INT_MIN;
	if (i < first_layered)
		return -1;
	return i > last_layered ? L - 1 : INT_MIN;
}

int grad_bucket_plan(struct grad_sync *s, const struct moe_model *m, double bucket_mb)
{
	int n = m->n_params, first = n, last = -1, prev = INT_MIN;
	size_t cap = (size_t)(bucket_mb * 1048576.0), acc = 0, rep = 0, exp = 0;
	free(s->buckets);
	s->buckets = NULL;
	s->n_buckets = 0;
	for (int i = 0; i < n; i++)
		if (m->params[i].layer >= 0) {
			first = i < first ? i : first;
			last = i;
		}
	for (int i = 0; i < n; i++) {  /* the order the buckets rely on: complete in reverse index order */
		int r = ready_layer(m, i, first, last);
		if (m->params[i].kind == PARAM_BUFFER)
			continue;
		if (r == INT_MIN || r < prev)
			return 0;
		prev = r;
	}
	s->buckets = calloc((size_t)n + 1, sizeof(*s->buckets));
	if (!s->buckets)
		return -1;
	int end = n;
	for (int i = n - 1; i >= 0; i--) {  /* from the top: the backward's order */
		const struct param *p = &m->params[i];
		if (p->kind != PARAM_BUFFER)
			acc += sizeof(float) * p->numel;
		if (i > 0 && (acc < cap || !acc))  /* no bucket of buffers alone */
			continue;
		s->buckets[s->n_buckets++] = (struct grad_bucket){ .p_begin = i, .p_end = end };
		end = i;
		acc = 0;
	}
	/* offsets in the packed spaces (index order), and each bucket's earliest layer */
	for (int b = s->n_buckets - 1; b >= 0; b--) {
		struct grad_bucket *k = &s->buckets[b];
		k->rep_off = rep;
		k->exp_off = exp;
		k->ready = INT_MAX;
		for (int i = k->p_begin; i < k->p_end; i++) {
			const struct param *p = &m->params[i];
			if (p->kind == PARAM_BUFFER)
				continue;
			int r = ready_layer(m, i, first, last);
			k->ready = r < k->ready ? r : k->ready;
			*(p->expert_stacked ? &exp : &rep) += p->numel;
		}
		k->rep_n = rep - k->rep_off;
		k->exp_n = exp - k->exp_off;
	}
	return 0;
}

void grad_sync_free(struct grad_sync *s)
{
#ifdef MOE_HAVE_CUDA
	moe_cuda_free(s->d_rep);
	moe_cuda_free(s->d_exp);
#endif
	free(s->rep_buf);
	free(s->exp_buf);
	free(s->buckets);
	memset(s, 0, sizeof(*s));
}

double grad_sync_reduce(struct grad_sync *s, struct moe_model *m, const struct dist *d)
{
	grad_pack(m, 0, s->rep_buf, m->grads, 1);
	grad_pack(m, 1, s->exp_buf, m->grads, 1);
	if (d && d->world > 1) {
		if (comm_allreduce(d->world_g, s->rep_buf, s->n_rep, COMM_F32, COMM_SUM) ||
		    (d->dp > 1 && comm_allreduce(d->dp_g, s->exp_buf, s->n_exp, COMM_F32, COMM_SUM)))
			comm_abort(1, "gradient all-reduce failed");
		grad_pack(m, 0, s->rep_buf, m->grads, 0);
		grad_pack(m, 1, s->exp_buf, m->grads, 0);
	}
	double rep = grad_global_norm(s->rep_buf, s->n_rep), exp = grad_global_norm(s->exp_buf, s->n_exp);
	double exp_sq = exp * exp;
	/* the experts are split over the ep group: their squares add up across it */
	if (d && d->ep > 1 && comm_allreduce(d->ep_g, &exp_sq, 1, COMM_F64, COMM_SUM))
		comm_abort(1, "gradient norm all-reduce failed");
	return sqrt(rep * rep + exp_sq);
}

#ifdef MOE_HAVE_CUDA
/* params [p0, p1) of one kind, packed from `packed` on; tensors that sit next to each other in the arena
 * travel as one copy */
static void pack_range_device(const struct moe_model *m, int expert, float *packed, float *arena, int to_packed,
			      int p0, int p1)
{
	size_t off = 0, run_arena = 0, run_len = 0;
	for (int i = p0; i <= p1; i++) {
		const struct param *p = i < p1 ? &m->params[i] : NULL;
		if (p && (p->kind == PARAM_BUFFER || p->expert_stacked != expert))
			continue;
		if (p && run_len && p->offset == run_arena + run_len) {
			run_len += p->numel;
			continue;
		}
		if (run_len) {
			float *a = arena + run_arena, *b = packed + off;
			moe_cuda_memcpy_d2d_async(to_packed ? b : a, to_packed ? a : b, sizeof(float) * run_len);
			off += run_len;
		}
		if (p) {
			run_arena = p->offset;
			run_len = p->numel;
		}
	}
}

void grad_pack_device(const struct moe_model *m, int expert, float *packed, float *arena, int to_packed)
{
	pack_range_device(m, expert, packed, arena, to_packed, 0, m->n_params);
}

static void alloc_device_buckets(struct grad_sync *s)
{
	if (!s->d_rep) {
		s->d_rep = moe_cuda_malloc(sizeof(float) * (s->n_rep + 1));
		s->d_exp = moe_cuda_malloc(sizeof(float) * (s->n_exp + 1));
	}
}

int grad_sync_overlap_arm(struct grad_sync *s, const struct moe_model *m, float *dgrads, const struct dist *d)
{
	if (!s->n_buckets || !d || d->world == 1 || d->ep > 1)
		return -1;
	alloc_device_buckets(s);
	s->armed = 1;
	s->launched = 0;
	s->om = m;
	s->odgrads = dgrads;
	s->od = d;
	return 0;
}

/* pack bucket b and start its reductions (the replicated part over the world, the experts' over dp) */
static void launch_bucket(struct grad_sync *s, const struct grad_bucket *k)
{
	const struct dist *d = s->od;
	pack_range_device(s->om, 0, s->d_rep + k->rep_off, s->odgrads, 1, k->p_begin, k->p_end);
	pack_range_device(s->om, 1, s->d_exp + k->exp_off, s->odgrads, 1, k->p_begin, k->p_end);
	if ((k->rep_n && dcomm_allreduce_start(d->world_g, s->d_rep + k->rep_off, k->rep_n, COMM_F32, COMM_SUM)) ||
	    (k->exp_n && d->dp > 1 &&
	     dcomm_allreduce_start(d->dp_g, s->d_exp + k->exp_off, k->exp_n, COMM_F32, COMM_SUM)))
		comm_abort(1, "gradient all-reduce (device, one bucket) failed");
}

void grad_sync_layer_done(struct grad_sync *s, int layer)
{
	if (!s->armed)
		return;
	while (s->launched < s->n_buckets && s->buckets[s->launched].ready >= layer)
		launch_bucket(s, &s->buckets[s->launched++]);
}

/* the armed reduction's end: every bucket started (the backward has run), wait for them */
static void finish_overlap(struct grad_sync *s, const struct dist *d)
{
	if (s->launched != s->n_buckets)
		comm_abort(1, "gradient buckets: not all started when the reduction ended (the armed backward "
			   "did not run to the embedding)");
	if (dcomm_wait(d->world_g) || (d->dp > 1 && dcomm_wait(d->dp_g)))
		comm_abort(1, "gradient all-reduce (device) failed");
	s->armed = 0;
}

double grad_sync_reduce_device(struct grad_sync *s, const struct moe_model *m, float *dgrads,
			       const struct dist *d)
{
	int overlapped = s->armed;
	alloc_device_buckets(s);
	if (overlapped) {
		finish_overlap(s, d);
		grad_pack_device(m, 0, s->d_rep, dgrads, 0);
		grad_pack_device(m, 1, s->d_exp, dgrads, 0);
	} else {
		grad_pack_device(m, 0, s->d_rep, dgrads, 1);
		grad_pack_device(m, 1, s->d_exp, dgrads, 1);
	}
	if (!overlapped && d && d->world > 1) {
		if (dcomm_allreduce(d->world_g, s->d_rep, s->n_rep, COMM_F32, COMM_SUM) ||
		    (d->dp > 1 && dcomm_allreduce(d->dp_g, s->d_exp, s->n_exp, COMM_F32, COMM_SUM)))
			comm_abort(1, "gradient all-reduce (device) failed");
		grad_pack_device(m, 0, s->d_rep, dgrads, 0);
		grad_pack_device(m, 1, s->d_exp, dgrads, 0);
	}
	double rep = grad_global_norm_cuda(s->d_rep, s->n_rep), exp = grad_global_norm_cuda(s->d_exp, s->n_exp);
	double exp_sq = exp * exp;
	if (d && d->ep > 1 && comm_allreduce(d->ep_g, &exp_sq, 1, COMM_F64, COMM_SUM))
		comm_abort(1, "gradient norm all-reduce failed");
	return sqrt(rep * rep + exp_sq);
}
#endif
