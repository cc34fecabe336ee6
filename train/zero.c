#include "train/zero.h"

#include "train/grad_sync.h"

#ifdef MOE_HAVE_CUDA
#include "launch/cuda/comm_device.h"
#include "launch/cuda/device.h"
#include "optim/cuda/adamw_cuda.h"
#endif

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int space_init(struct zero_space *s, const struct moe_model *m, int expert, struct comm_group *g)
{
	s->g = g;
	s->size = g ? comm_size(g) : 1;
	s->rank = g ? comm_rank(g) : 0;
	s->n = grad_space_size(m, expert);
	s->shard = (s->n + s->size - 1) / s->size;
	s->n_pad = s->shard * s->size;
	s->grad = calloc(s->n_pad + 1, sizeof(float));
	s->weight = calloc(s->n_pad + 1, sizeof(float));
	return s->grad && s->weight ? 0 : -1;
}

/* the optimizer segments of the shard [lo, lo + len) of a space, at base in the shard arrays */
static void shard_segments(struct zero *z, const struct moe_model *m, int expert, size_t lo, size_t len,
			   size_t base, float wd, bool decay_embeddings)
{
	size_t off = 0;
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		if (p->kind == PARAM_BUFFER || p->expert_stacked != expert)
			continue;
		size_t a = off > lo ? off : lo, b = off + p->numel < lo + len ? off + p->numel : lo + len;
		off += p->numel;
		if (a >= b)
			continue;
		struct optim_segment *s = &z->segs[z->nsegs++];
		s->offset = base + (a - lo);
		s->numel = b - a;
		s->frozen = false;
		s->weight_decay = param_weight_decay(p, wd, decay_embeddings);
	}
}

int zero_init(struct zero *z, const struct moe_model *m, const struct dist *d, float weight_decay,
	      bool decay_embeddings)
{
	memset(z, 0, sizeof(*z));
	int multi = d && d->world > 1;
	z->ep_g = multi && d->ep > 1 ? d->ep_g : NULL;
	if (space_init(&z->rep, m, 0, multi ? d->world_g : NULL) ||
	    space_init(&z->exp, m, 1, multi && d->dp > 1 ? d->dp_g : NULL))
		return -1;
	size_t n = z->rep.shard + z->exp.shard;
	z->segs = calloc(2 * (size_t)m->n_params + 2, sizeof(*z->segs));
	z->shard_w = calloc(n + 1, sizeof(float));
	z->shard_g = calloc(n + 1, sizeof(float));
	if (!z->segs || !z->shard_w || !z->shard_g || adamw_init(&z->opt, n))
		return -1;
	shard_segments(z, m, 0, z->rep.rank * z->rep.shard, z->rep.shard, 0, weight_decay, decay_embeddings);
	shard_segments(z, m, 1, z->exp.rank * z->exp.shard, z->exp.shard, z->rep.shard, weight_decay,
		       decay_embeddings);
	return 0;
}

void zero_free(struct zero *z)
{
	zero_device_free(z);
	free(z->rep.grad);
	free(z->rep.weight);
	free(z->exp.grad);
	free(z->exp.weight);
	free(z->segs);
	free(z->shard_w);
	free(z->shard_g);
	adamw_free(&z->opt);
	memset(z, 0, sizeof(*z));
}

static void reduce_space(struct zero_space *s, const struct moe_model *m, int expert, float *shard)
{
	grad_pack(m, expert, s->grad, m->grads, 1);
	if (!s->g || s->size == 1) {
		memcpy(shard, s->grad, sizeof(float) * s->shard);
		return;
	}
	if (comm_reduce_scatter(s->g, s->grad, shard, s->shard, COMM_F32, COMM_SUM))
		comm_abort(1, "gradient reduce-scatter failed");
}

/*
 * The global norm from this rank's shard norms of the two spaces: the replicated space is sharded over
 * the world, the expert space over the dp group (and each ep rank holds other experts): sum the squares
 * over each space's sharing, the experts' also over the ep group.
 */
static double shards_norm(const struct zero *z, double rep, double exp)
{
	double sq[2] = { rep * rep, exp * exp };
	if (z->rep.g && comm_allreduce(z->rep.g, &sq[0], 1, COMM_F64, COMM_SUM))
		comm_abort(1, "norm all-reduce failed");
	if (z->exp.g && comm_allreduce(z->exp.g, &sq[1], 1, COMM_F64, COMM_SUM))
		comm_abort(1, "norm all-reduce failed");
	if (z->ep_g && comm_allreduce(z->ep_g, &sq[1], 1, COMM_F64, COMM_SUM))
		comm_abort(1, "norm all-reduce failed");
	return sqrt(sq[0] + sq[1]);
}

double zero_reduce(struct zero *z, const struct moe_model *m)
{
	reduce_space(&z->rep, m, 0, z->shard_g);
	reduce_space(&z->exp, m, 1, z->shard_g + z->rep.shard);
	double rep = grad_global_norm(z->shard_g, z->rep.shard);
	double exp = grad_global_norm(z->shard_g + z->rep.shard, z->exp.shard);
	return shards_norm(z, rep, exp);
}

static void gather_space(struct zero_space *s, const float *shard)
{
	if (!s->g || s->size == 1) {
		memcpy(s->weight, shard, sizeof(float) * s->shard);
		return;
	}
	memcpy(s->weight + s->rank * s->shard, shard, sizeof(float) * s->shard);
	if (comm_allgather(s->g, s->weight + s->rank * s->shard, s->weight, s->shard, COMM_F32))
		comm_abort(1, "weight all-gather failed");
}

void zero_update(struct zero *z, struct moe_model *m, float clip_factor, const struct adamw_hparams *h)
{
	size_t n = z->rep.shard + z->exp.shard;
	if (clip_factor != 1.0f)
		for (size_t i = 0; i < n; i++)
			z->shard_g[i] *= clip_factor;
	/* the shards' current weights */
	grad_pack(m, 0, z->rep.weight, m->weights, 1);
	grad_pack(m, 1, z->exp.weight, m->weights, 1);
	memcpy(z->shard_w, z->rep.weight + z->rep.rank * z->rep.shard, sizeof(float) * z->rep.shard);
	memcpy(z->shard_w + z->rep.shard, z->exp.weight + z->exp.rank * z->exp.shard,
	       sizeof(float) * z->exp.shard);
	adamw_update(&z->opt, z->shard_w, z->shard_g, z->segs, z->nsegs, h);
	gather_space(&z->rep, z->shard_w);
	gather_space(&z->exp, z->shard_w + z->rep.shard);
	grad_pack(m, 0, z->rep.weight, m->weights, 0);
	grad_pack(m, 1, z->exp.weight, m->weights, 0);
}

/* one moment: shards -> full packed (all-gather) -> arena layout */
static void gather_moment(struct zero *z, const struct moe_model *m, const float *shard, float *arena)
{
	gather_space(&z->rep, shard);
	gather_space(&z->exp, shard + z->rep.shard);
	grad_pack(m, 0, z->rep.weight, arena, 0);
	grad_pack(m, 1, z->exp.weight, arena, 0);
}

int zero_gather_state(struct zero *z, const struct moe_model *m, struct adamw *full)
{
	if (full->n != m->n_weights)
		return -1;
	memset(full->exp_avg, 0, sizeof(float) * full->n);
	memset(full->exp_avg_sq, 0, sizeof(float) * full->n);
	gather_moment(z, m, z->opt.exp_avg, full->exp_avg);
	gather_moment(z, m, z->opt.exp_avg_sq, full->exp_avg_sq);
	full->step = z->opt.step;
	/* the packed weight buffers served as scratch: refresh them from the model at the next update */
	return 0;
}

static void scatter_moment(struct zero *z, const struct moe_model *m, const float *arena, float *shard)
{
	grad_pack(m, 0, z->rep.weight, (float *)arena, 1);
	grad_pack(m, 1, z->exp.weight, (float *)arena, 1);
	memcpy(shard, z->rep.weight + z->rep.rank * z->rep.shard, sizeof(float) * z->rep.shard);
	memcpy(shard + z->rep.shard, z->exp.weight + z->exp.rank * z->exp.shard,
	       sizeof(float) * z->exp.shard);
}

void zero_scatter_state(struct zero *z, const struct moe_model *m, const struct adamw *full)
{
	scatter_moment(z, m, full->exp_avg, z->opt.exp_avg);
	scatter_moment(z, m, full->exp_avg_sq, z->opt.exp_avg_sq);
	z->opt.step = full->step;
}

/* ---------------------------------------------------------------- the GPU path */

#ifdef MOE_HAVE_CUDA
struct zero_device {
	float *rep_grad, *exp_grad;  /* [n_pad] packed gradients (the padding stays zero) */
	float *rep_w, *exp_w;        /* [n_pad] packed weights */
	float *shard_w, *shard_g;    /* [rep shard | exp shard] */
	struct adamw_cuda opt;
};

static float *dzeros(size_t n)
{
	float *p = moe_cuda_malloc(sizeof(float) * (n + 1));
	moe_cuda_memset(p, 0, sizeof(float) * (n + 1));
	return p;
}

int zero_device_init(struct zero *z)
{
	struct zero_device *zd = calloc(1, sizeof(*zd));
	size_t n = z->rep.shard + z->exp.shard;
	if (!zd)
		return -1;
	zd->rep_grad = dzeros(z->rep.n_pad);
	zd->exp_grad = dzeros(z->exp.n_pad);
	zd->rep_w = dzeros(z->rep.n_pad);
	zd->exp_w = dzeros(z->exp.n_pad);
	zd->shard_w = dzeros(n);
	zd->shard_g = dzeros(n);
	z->dev = zd;
	if (adamw_cuda_init(&zd->opt, n, z->segs, z->nsegs))
		return -1;
	adamw_cuda_upload_state(&zd->opt, &z->opt);
	return 0;
}

void zero_device_free(struct zero *z)
{
	struct zero_device *zd = z->dev;
	if (!zd)
		return;
	adamw_cuda_free(&zd->opt);
	moe_cuda_free(zd->rep_grad);
	moe_cuda_free(zd->exp_grad);
	moe_cuda_free(zd->rep_w);
	moe_cuda_free(zd->exp_w);
	moe_cuda_free(zd->shard_w);
	moe_cuda_free(zd->shard_g);
	free(zd);
	z->dev = NULL;
}

static void reduce_space_device(struct zero_space *s, const struct moe_model *m, int expert, float *dgrads,
				float *packed, float *shard)
{
	grad_pack_device(m, expert, packed, dgrads, 1);
	if (!s->g || s->size == 1) {
		moe_cuda_memcpy_d2d_async(shard, packed, sizeof(float) * s->shard);
		return;
	}
	if (dcomm_reduce_scatter(s->g, packed, shard, s->shard, COMM_F32, COMM_SUM))
		comm_abort(1, "gradient reduce-scatter (device) failed");
}

double zero_device_reduce(struct zero *z, const struct moe_model *m, float *dgrads)
{
	struct zero_device *zd = z->dev;
	reduce_space_device(&z->rep, m, 0, dgrads, zd->rep_grad, zd->shard_g);
	reduce_space_device(&z->exp, m, 1, dgrads, zd->exp_grad, zd->shard_g + z->rep.shard);
	double rep = grad_global_norm_cuda(zd->shard_g, z->rep.shard);
	double exp = grad_global_norm_cuda(zd->shard_g + z->rep.shard, z->exp.shard);
	return shards_norm(z, rep, exp);
}

static void gather_space_device(struct zero_space *s, float *packed, const float *shard)
{
	float *mine = packed + (size_t)s->rank * s->shard;
	moe_cuda_memcpy_d2d_async(mine, shard, sizeof(float) * s->shard);
	if (s->g && s->size > 1 && dcomm_allgather(s->g, mine, packed, s->shard, COMM_F32))
		comm_abort(1, "weight all-gather (device) failed");
}

void zero_device_update(struct zero *z, const struct moe_model *m, float *dweights, float clip_factor,
			const struct adamw_hparams *h)
{
	struct zero_device *zd = z->dev;
	grad_pack_device(m, 0, zd->rep_w, dweights, 1);
	grad_pack_device(m, 1, zd->exp_w, dweights, 1);
	moe_cuda_memcpy_d2d_async(zd->shard_w, zd->rep_w + (size_t)z->rep.rank * z->rep.shard,
				  sizeof(float) * z->rep.shard);
	moe_cuda_memcpy_d2d_async(zd->shard_w + z->rep.shard, zd->exp_w + (size_t)z->exp.rank * z->exp.shard,
				  sizeof(float) * z->exp.shard);
	adamw_cuda_update(&zd->opt, zd->shard_w, zd->shard_g, h, clip_factor, NULL);
	gather_space_device(&z->rep, zd->rep_w, zd->shard_w);
	gather_space_device(&z->exp, zd->exp_w, zd->shard_w + z->rep.shard);
	grad_pack_device(m, 0, zd->rep_w, dweights, 0);
	grad_pack_device(m, 1, zd->exp_w, dweights, 0);
}

void zero_device_download_state(struct zero *z)
{
	if (z->dev)
		adamw_cuda_download_state(&z->dev->opt, &z->opt);
}
#else
void zero_device_free(struct zero *z)
{
	(void)z;
}
#endif
