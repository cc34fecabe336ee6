#include "train/grad_sync.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "optim/adamw.h"

int grad_sync_init(struct grad_sync *s, const struct moe_model *m)
{
	memset(s, 0, sizeof(*s));
	for (int i = 0; i < m->n_params; i++) {
		if (m->params[i].kind == PARAM_BUFFER)
			continue;
		if (m->params[i].expert_stacked)
			s->n_exp += m->params[i].numel;
		else
			s->n_rep += m->params[i].numel;
	}
	s->rep_buf = malloc(sizeof(float) * (s->n_rep + 1));
	s->exp_buf = malloc(sizeof(float) * (s->n_exp + 1));
	return s->rep_buf && s->exp_buf ? 0 : -1;
}

void grad_sync_free(struct grad_sync *s)
{
	free(s->rep_buf);
	free(s->exp_buf);
	memset(s, 0, sizeof(*s));
}

/* copy the replicated (expert = 0) or expert (expert = 1) gradients to/from buf */
static void pack(struct moe_model *m, float *buf, int expert, int unpack)
{
	size_t off = 0;
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		if (p->kind == PARAM_BUFFER || p->expert_stacked != expert)
			continue;
		float *g = m->grads + p->offset;
		if (unpack)
			memcpy(g, buf + off, sizeof(float) * p->numel);
		else
			memcpy(buf + off, g, sizeof(float) * p->numel);
		off += p->numel;
	}
}

double grad_sync_reduce(struct grad_sync *s, struct moe_model *m, const struct dist *d)
{
	pack(m, s->rep_buf, 0, 0);
	pack(m, s->exp_buf, 1, 0);
	if (d && d->world > 1) {
		if (comm_allreduce(d->world_g, s->rep_buf, s->n_rep, COMM_F32, COMM_SUM) ||
		    (d->dp > 1 && comm_allreduce(d->dp_g, s->exp_buf, s->n_exp, COMM_F32, COMM_SUM)))
			comm_abort(1, "gradient all-reduce failed");
		pack(m, s->rep_buf, 0, 1);
		pack(m, s->exp_buf, 1, 1);
	}
	double rep = grad_global_norm(s->rep_buf, s->n_rep), exp = grad_global_norm(s->exp_buf, s->n_exp);
	double exp_sq = exp * exp;
	/* the experts are split over the ep group: their squares add up across it */
	if (d && d->ep > 1 && comm_allreduce(d->ep_g, &exp_sq, 1, COMM_F64, COMM_SUM))
		comm_abort(1, "gradient norm all-reduce failed");
	return sqrt(rep * rep + exp_sq);
}
