/*
 * train/checkpoint_layout.c - the checks of the arrays a checkpoint is written from or read into, and,
 * for a distributed save, of the parallel layout: that the ranks' expert slices fit together into one
 * file (checked on every rank before anything is written, with the same verdict everywhere), and the
 * agreement of all ranks on the failure of a phase.  No HDF5 here.
 */
#include "train/checkpoint_int.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "launch/comm.h"

#define CKPT_MSG_MAX 1024	/* an error message sent to every rank */

int ckpt_check_local_numel(struct ckctx *c, const struct moe_model *m, const struct param *p)
{
	int64_t n = 1;

	for (int d = 0; d < p->ndim && d < MOE_MAX_DIMS; d++)
		n *= d == 0 && p->expert_stacked ? m->expert_end - m->expert_begin : p->shape[d];
	if (p->ndim < 1 || p->ndim > MOE_MAX_DIMS || n < 0 || (uint64_t)n != (uint64_t)p->numel ||
	    p->offset + p->numel > m->n_weights) {
		CKERR("%s: internal error: parameter %s has an inconsistent layout", c->path, p->name);
		return -1;
	}
	return 0;
}

int ckpt_check_optim_layout(struct ckctx *c, const struct moe_model *m, const struct adamw *opt)
{
	if (opt->n != m->n_weights || (opt->n && (!opt->exp_avg || !opt->exp_avg_sq))) {
		CKERR("%s: internal error: the optimizer state holds %zu floats, the model %zu weights",
		      c->path, opt->n, m->n_weights);
		return -1;
	}
	return 0;
}

int ckpt_check_writer_holds_all(struct ckctx *c, const struct moe_model *m)
{
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];

		if (p->expert_stacked &&
		    (m->expert_begin != 0 || m->expert_end != p->shape[0])) {
			CKERR("%s: this process holds experts [%d, %d) of %" PRId64 "; a single-process "
			      "checkpoint needs all of them", c->path, m->expert_begin, m->expert_end,
			      p->shape[0]);
			return -1;
		}
	}
	return 0;
}

/* What a writer writes from must be consistent: every parameter's slice, the optimizer's layout. */
int ckpt_check_writer_arrays(struct ckctx *c, const struct moe_model *m, const struct adamw *opt)
{
	for (int i = 0; i < m->n_params; i++)
		if (ckpt_check_local_numel(c, m, &m->params[i]))
			return -1;
	return opt ? ckpt_check_optim_layout(c, m, opt) : 0;
}

/*
 * Collective over the world, after every phase of a distributed save: 0 when no rank failed, else -1 on
 * every rank, each with the message of the lowest failing rank, as "rank R: MESSAGE".
 */
int ckpt_sync_failure(struct ckctx *c, const struct dist *d, int failed)
{
	int32_t who = failed ? d->rank : d->world;
	char msg[CKPT_MSG_MAX] = "";

	if (comm_allreduce(d->world_g, &who, 1, COMM_I32, COMM_MIN)) {
		CKERR("%s: checkpoint: comm_allreduce failed", c->path);
		return -1;
	}
	if (who >= d->world)
		return 0;
	if (who == d->rank)
		snprintf(msg, sizeof(msg), "rank %d: %s", (int)who, c->err);
	if (comm_broadcast(d->world_g, msg, sizeof(msg), COMM_BYTE, who)) {
		CKERR("%s: checkpoint: rank %d failed; comm_broadcast of its message failed", c->path,
		      (int)who);
		return -1;
	}
	msg[sizeof(msg) - 1] = 0;
	snprintf(c->err, c->errlen, "%s", msg);
	return -1;
}

/* What every rank tells the others about its arrays (check_dist_layout). */
enum { LAY_BEGIN, LAY_END, LAY_EXPERTS, LAY_OPTIM, LAY_FLOATS, LAY_EP, LAY_N };

/*
 * Collective over the world, with the same verdict (and message) on every rank: all ranks agree on the
 * grid, the number of experts and whether there is optimizer state; the ranks of expert-parallel group
 * 0 (world ranks 0 .. ep-1, the writers) hold consecutive expert slices covering all the experts; every
 * other rank holds the same slice (and arena size) as its counterpart there, whose copy is written.
 */
int ckpt_check_dist_layout(struct ckctx *c, const struct moe_model *m, const struct adamw *opt,
			     const struct dist *d)
{
	const int64_t mine[LAY_N] = {
		[LAY_BEGIN] = m->expert_begin, [LAY_END] = m->expert_end,
		[LAY_EXPERTS] = m->cfg.n_routed_experts, [LAY_OPTIM] = opt != NULL,
		[LAY_FLOATS] = (int64_t)m->n_weights, [LAY_EP] = d->ep,
	};
	int64_t *all = malloc((size_t)d->world * LAY_N * sizeof(*all));
	int32_t ok = all && d->ep >= 1 && d->world == d->dp * d->ep &&
		     d->rank == d->dp_rank * d->ep + d->ep_rank;
	const int ep = d->ep;
	int ret = -1;

	if (comm_allreduce(d->world_g, &ok, 1, COMM_I32, COMM_MIN) || !ok) {
		CKERR("%s: cannot check the parallel layout: out of memory, or a (dp, ep) grid that does "
		      "not match the world on some rank", c->path);
		goto fail;
	}
	if (comm_allgather(d->world_g, mine, all, LAY_N, COMM_I64)) {
		CKERR("%s: checkpoint: comm_allgather failed", c->path);
		goto fail;
	}
	for (int q = 0; q < d->world; q++) {
		const int64_t *a = all + (size_t)q * LAY_N, *ref = all + (size_t)(q % ep) * LAY_N;

		if (a[LAY_EP] != all[LAY_EP] || a[LAY_EXPERTS] != all[LAY_EXPERTS] ||
		    a[LAY_OPTIM] != all[LAY_OPTIM]) {
			CKERR("%s: ranks 0 and %d disagree on the parallel layout or the model: ep %" PRId64
			      " vs %" PRId64 ", %" PRId64 " vs %" PRId64 " routed experts, optimizer "
			      "state %s vs %s", c->path, q, all[LAY_EP], a[LAY_EP], all[LAY_EXPERTS],
			      a[LAY_EXPERTS], all[LAY_OPTIM] ? "given" : "absent",
			      a[LAY_OPTIM] ? "given" : "absent");
			goto fail;
		}
		if (q >= ep && (a[LAY_BEGIN] != ref[LAY_BEGIN] || a[LAY_END] != ref[LAY_END] ||
				a[LAY_FLOATS] != ref[LAY_FLOATS])) {
			CKERR("%s: rank %d holds experts [%" PRId64 ", %" PRId64 ") in %" PRId64
			      " floats, but rank %d, which it replicates, [%" PRId64 ", %" PRId64
			      ") in %" PRId64, c->path, q, a[LAY_BEGIN], a[LAY_END], a[LAY_FLOATS],
			      q % ep, ref[LAY_BEGIN], ref[LAY_END], ref[LAY_FLOATS]);
			goto fail;
		}
		const int64_t *prev = q > 0 && q < ep ? a - LAY_N : NULL;	/* the writer before */

		if (q < ep && a[LAY_BEGIN] != (prev ? prev[LAY_END] : 0)) {
			if (prev)
				CKERR("%s: the experts are not split over the expert-parallel group: "
				      "rank %d holds [%" PRId64 ", %" PRId64 "), rank %d [%" PRId64 ", %"
				      PRId64 ")", c->path, q - 1, prev[LAY_BEGIN], prev[LAY_END], q,
				      a[LAY_BEGIN], a[LAY_END]);
			else
				CKERR("%s: the experts are not split over the expert-parallel group: "
				      "rank 0 holds [%" PRId64 ", %" PRId64 "), not from expert 0",
				      c->path, a[LAY_BEGIN], a[LAY_END]);
			goto fail;
		}
		if (q == ep - 1 && a[LAY_END] != a[LAY_EXPERTS]) {
			CKERR("%s: the expert-parallel group holds experts [0, %" PRId64 ") of %" PRId64,
			      c->path, a[LAY_END], a[LAY_EXPERTS]);
			goto fail;
		}
	}
	ret = 0;
fail:
	free(all);
	return ret;
}
