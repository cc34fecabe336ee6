#include "train/grad_sync.h"

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

void grad_sync_free(struct grad_sync *s)
{
#ifdef MOE_HAVE_CUDA
	moe_cuda_free(s->d_rep);
	moe_cuda_free(s->d_exp);
#endif
	free(s->rep_buf);
	free(s->exp_buf);
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
/* tensors of one kind that sit next to each other in the arena travel as one copy */
void grad_pack_device(const struct moe_model *m, int expert, float *packed, float *arena, int to_packed)
{
	size_t off = 0, run_arena = 0, run_len = 0;
	for (int i = 0; i <= m->n_params; i++) {
		const struct param *p = i < m->n_params ? &m->params[i] : NULL;
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

double grad_sync_reduce_device(struct grad_sync *s, const struct moe_model *m, float *dgrads,
			       const struct dist *d)
{
	if (!s->d_rep) {
		s->d_rep = moe_cuda_malloc(sizeof(float) * (s->n_rep + 1));
		s->d_exp = moe_cuda_malloc(sizeof(float) * (s->n_exp + 1));
	}
	grad_pack_device(m, 0, s->d_rep, dgrads, 1);
	grad_pack_device(m, 1, s->d_exp, dgrads, 1);
	if (d && d->world > 1) {
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
