/*
 * train/distill.c - knowledge distillation from a teacher checkpoint (train/distill.h).
 */
#include "train/distill.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/checkpoint.h"
#ifdef MOE_HAVE_CUDA
#include "launch/cuda/device.h"
#include "model/cuda/model_cuda.h"
#include "model/cuda/ops_cuda.h"
#endif

/* ---------------------------------------------------------------- the KL of one row */

double distill_row_lse(const float *z, int V, double T)
{
	float mx = z[0];
	for (int j = 1; j < V; j++)
		mx = z[j] > mx ? z[j] : mx;
	double m = mx / T, sum = 0;
	for (int j = 0; j < V; j++)
		sum += exp(z[j] / T - m);
	return m + log(sum);
}

double distill_row_kl(const float *zs, const float *zt, int V, double T, enum distill_dir dir,
		      double lse_s, double lse_t)
{
	double kl = 0;
	for (int j = 0; j < V; j++) {
		double ls = zs[j] / T - lse_s, lt = zt[j] / T - lse_t;
		kl += dir == DISTILL_FORWARD ? exp(lt) * (lt - ls) : exp(ls) * (ls - lt);
	}
	return kl > 0 ? kl : 0;  /* >= 0 exactly; rounding can leave -1e-17 for equal rows */
}

void distill_row_grad(float *g, const float *zs, const float *zt, int V, double T, enum distill_dir dir,
		      double lse_s, double lse_t, double kl, double scale)
{
	double f = scale * T;  /* T^2 from the loss, 1/T from d(z/T)/dz */
	for (int j = 0; j < V; j++) {
		double ls = zs[j] / T - lse_s, lt = zt[j] / T - lse_t, ps = exp(ls);
		g[j] = (float)(dir == DISTILL_FORWARD ? f * (ps - exp(lt)) : f * ps * (ls - lt - kl));
	}
}

/* ---------------------------------------------------------------- the teacher */

/* This rank's slice of the teacher's experts, forward only; NULL after printing why. */
static struct moe_model *load_teacher(const struct run_config *cfg, const struct dist *d, const char *who)
{
	char err[1024];
	const char *path = cfg->distill.teacher;
	struct run_config tc;
	config_defaults(&tc);
	if (checkpoint_read_header(path, &tc, NULL, err, sizeof(err))) {
		fprintf(stderr, "%s: distill.teacher: %s\n", who, err);
		return NULL;
	}
	if (tc.model.vocab_size != cfg->model.vocab_size) {
		fprintf(stderr, "%s: distill.teacher %s: the teacher's vocabulary (model.vocab_size=%d) differs "
			"from the student's (model.vocab_size=%d): distillation compares their distributions "
			"token for token\n", who, path, tc.model.vocab_size, cfg->model.vocab_size);
		return NULL;
	}
	int E = tc.model.n_routed_experts, ep = d ? d->ep : 1, r = d ? d->ep_rank : 0;
	if (E % ep) {
		fprintf(stderr, "%s: distill.teacher %s: the teacher's model.n_routed_experts=%d is not divisible "
			"by parallel.ep=%d\n", who, path, E, ep);
		return NULL;
	}
	struct moe_model *m = model_create(&tc.model, r * (E / ep), (r + 1) * (E / ep), err, sizeof(err));
	if (!m) {
		fprintf(stderr, "%s: distill.teacher %s: %s\n", who, path, err);
		return NULL;
	}
	model_drop_grads(m);  /* forward only */
	if (d && ep > 1)
		m->ep_group = d->ep_g;
	if (checkpoint_load_model(path, m, err, sizeof(err))) {
		fprintf(stderr, "%s: distill.teacher: %s\n", who, err);
		model_free(m);
		return NULL;
	}
	if (!d || d->rank == 0) {
		int64_t total, act;
		model_count_params(&tc.model, &total, &act);
		printf("distillation: teacher of %lld parameters (%lld activated)\n", (long long)total,
		       (long long)act);
	}
	return m;
}

/* the logit_term of the student's backward: the KL's gradient of rows [row0, row0 + nrows) */
static void term_grad(void *ctx, int row0, int nrows, const float *logits, float *grad)
{
	const struct distill *ds = ctx;
	int V = ds->teacher->cfg.vocab_size;
	const float *zt = model_logits(ds->teacher);
	double scale = ds->count ? ds->alpha / ds->count : 0.0;
#pragma omp parallel for schedule(static)
	for (int r = 0; r < nrows; r++) {
		int n = row0 + r;
		float *g = grad + (size_t)r * V;
		if (ds->targets[n] < 0) {
			memset(g, 0, sizeof(float) * V);
			continue;
		}
		distill_row_grad(g, logits + (size_t)r * V, zt + (size_t)n * V, V, ds->temperature, ds->dir,
				 ds->lse_s[n], ds->lse_t[n], ds->kl[n], scale);
	}
}

int distill_init(struct distill *ds, struct moe_model *teacher, double alpha, double temperature,
		 enum distill_dir dir, int n)
{
	memset(ds, 0, sizeof(*ds));
	ds->teacher = teacher;
	ds->alpha = alpha;
	ds->temperature = temperature;
	ds->dir = dir;
	ds->n = n;
	ds->ce_weights = malloc(sizeof(float) * n);
	ds->lse_s = malloc(sizeof(double) * n);
	ds->lse_t = malloc(sizeof(double) * n);
	ds->kl = malloc(sizeof(double) * n);
	ds->term.grad = term_grad;
	ds->term.ctx = ds;
	return ds->ce_weights && ds->lse_s && ds->lse_t && ds->kl ? 0 : -1;
}

int distill_open(struct distill *ds, const struct run_config *cfg, const struct dist *d, int B, int T,
		 const char *who)
{
	struct moe_model *teacher = load_teacher(cfg, d, who);
	enum distill_dir dir = strcmp(cfg->distill.kl, "reverse") ? DISTILL_FORWARD : DISTILL_REVERSE;
	if (distill_init(ds, teacher, cfg->distill.alpha, cfg->distill.temperature, dir, B * T)) {
		fprintf(stderr, "%s: out of memory for the distillation buffers\n", who);
		return -1;
	}
	if (!teacher)
		return -1;
	if (!d || d->rank == 0)
		printf("distillation: teacher %s, alpha %g, temperature %g, KL(%s)\n", cfg->distill.teacher,
		       ds->alpha, ds->temperature,
		       dir == DISTILL_FORWARD ? "teacher || student" : "student || teacher");
	return 0;
}

void distill_close(struct distill *ds)
{
#ifdef MOE_HAVE_CUDA
	gpu_model_free(ds->gteacher);
	moe_cuda_free(ds->d_kl);
	moe_cuda_free(ds->d_lse_s);
	moe_cuda_free(ds->d_lse_t);
	moe_cuda_free(ds->d_targets);
#endif
	model_free(ds->teacher);
	free(ds->ce_weights);
	free(ds->lse_s);
	free(ds->lse_t);
	free(ds->kl);
	memset(ds, 0, sizeof(*ds));
}

/* ---------------------------------------------------------------- the loss */

/* per-token KL of the last forwards' rows into ds->kl (0 where there is no target); returns the sum */
static double row_kls(struct distill *ds, const float *zs, const float *zt, int N, int V)
{
	double sum = 0;
#pragma omp parallel for schedule(static) reduction(+ : sum)
	for (int n = 0; n < N; n++) {
		const float *s = zs + (size_t)n * V, *t = zt + (size_t)n * V;
		if (ds->targets[n] < 0) {
			ds->kl[n] = 0;
			continue;
		}
		ds->lse_s[n] = distill_row_lse(s, V, ds->temperature);
		ds->lse_t[n] = distill_row_lse(t, V, ds->temperature);
		ds->kl[n] = distill_row_kl(s, t, V, ds->temperature, ds->dir, ds->lse_s[n], ds->lse_t[n]);
		sum += ds->kl[n];
	}
	return sum;
}

/* the targets of the forward, counted, and (1 - alpha) * mean CE as token weights (alpha = 0 keeps the
 * plain mean, bit for bit) */
static void set_ce_weights(struct distill *ds, const int *targets, int N)
{
	ds->targets = targets;
	ds->count = 0;
	for (int n = 0; n < N; n++)
		ds->count += targets[n] >= 0;
	for (int n = 0; n < N; n++)
		ds->ce_weights[n] = targets[n] >= 0 ? (float)((1 - ds->alpha) / ds->count) : 0.0f;
}

/* the student's weighted loss plus alpha T^2 KL; last_ce, last_kl from their sums over the targets */
static float total_loss(struct distill *ds, float loss, double ce_sum, double kl_sum)
{
	ds->last_ce = ds->count ? ce_sum / ds->count : 0.0;
	ds->last_kl = ds->count ? kl_sum / ds->count : 0.0;
	double T2 = ds->temperature * ds->temperature;
	return loss + (float)(ds->alpha * T2 * ds->last_kl);
}

float distill_forward(struct distill *ds, struct moe_model *student, const int *inputs,
		      const int *targets, int B, int T)
{
	int N = B * T, V = student->cfg.vocab_size;
	if (N > ds->n) {
		fprintf(stderr, "moe: distill_forward: %d tokens, buffers for %d\n", N, ds->n);
		exit(1);
	}
	model_forward(ds->teacher, inputs, NULL, B, T);
	set_ce_weights(ds, targets, N);
	const float *saved = student->token_weights;
	student->token_weights = ds->alpha > 0 ? ds->ce_weights : saved;
	float loss = model_forward(student, inputs, targets, B, T);
	student->token_weights = saved;

	const float *ce = model_token_losses(student);
	double ce_sum = 0;
	for (int n = 0; n < N; n++)
		ce_sum += targets[n] >= 0 ? ce[n] : 0.0;
	double kl_sum = row_kls(ds, model_logits(student), model_logits(ds->teacher), N, V);
	return total_loss(ds, loss, ce_sum, kl_sum);
}

void distill_backward_begin(struct distill *ds, struct moe_model *student, struct gpu_model *g)
{
	ds->saved_weights = student->token_weights;
	if (ds->alpha > 0)
		student->token_weights = ds->ce_weights;
#ifdef MOE_HAVE_CUDA
	if (g) {
		gpu_model_set_logit_grad(g, gpu_model_logits(ds->gteacher));
		return;
	}
#endif
	(void)g;
	student->logit_term = &ds->term;
}

void distill_backward_end(struct distill *ds, struct moe_model *student, struct gpu_model *g)
{
#ifdef MOE_HAVE_CUDA
	if (g)
		gpu_model_set_logit_grad(g, NULL);
#endif
	(void)g;
	student->token_weights = ds->saved_weights;
	student->logit_term = NULL;
}

void distill_backward(struct distill *ds, struct moe_model *student, float loss_scale)
{
	distill_backward_begin(ds, student, NULL);
	model_backward(student, loss_scale);
	distill_backward_end(ds, student, NULL);
}

/* ---------------------------------------------------------------- on the GPU */

#ifdef MOE_HAVE_CUDA
int distill_to_device(struct distill *ds, int bf16, const char *who)
{
	char err[512];
	size_t n = (size_t)ds->n;
	ds->gteacher = gpu_model_create(ds->teacher, bf16, err, sizeof(err));
	if (!ds->gteacher) {
		fprintf(stderr, "%s: distill.teacher on the GPU: %s\n", who, err);
		return -1;
	}
	ds->d_kl = moe_cuda_malloc(sizeof(double) * n);
	ds->d_lse_s = moe_cuda_malloc(sizeof(double) * n);
	ds->d_lse_t = moe_cuda_malloc(sizeof(double) * n);
	ds->d_targets = moe_cuda_malloc(sizeof(int) * n);
	return 0;
}

float distill_forward_gpu(struct distill *ds, struct moe_model *student, struct gpu_model *g, const int *inputs,
			  const int *targets, int B, int T)
{
	if (!g)
		return distill_forward(ds, student, inputs, targets, B, T);
	int N = B * T, V = student->cfg.vocab_size, reverse = ds->dir == DISTILL_REVERSE;
	if (N > ds->n) {
		fprintf(stderr, "moe: distill_forward_gpu: %d tokens, buffers for %d\n", N, ds->n);
		exit(1);
	}
	/* the KL reads both models' whole logits: neither holds them in chunks */
	gpu_model_logit_rows(ds->gteacher, 0);
	gpu_model_logit_rows(g, 0);
	gpu_model_forward(ds->gteacher, inputs, NULL, B, T);
	set_ce_weights(ds, targets, N);
	const float *saved = student->token_weights;
	student->token_weights = ds->alpha > 0 ? ds->ce_weights : saved;
	float loss = gpu_model_forward(g, inputs, targets, B, T);
	student->token_weights = saved;

	const float *ce = gpu_model_token_losses(g);
	double ce_sum = 0, kl_sum = 0;
	for (int n = 0; n < N; n++)
		ce_sum += targets[n] >= 0 ? ce[n] : 0.0;
	/* the teacher's logits: read by the KL, then overwritten by its gradient (in place) */
	float *zt = (float *)gpu_model_logits(ds->gteacher);
	const float *zs = gpu_model_logits(g);
	moe_cuda_memcpy_h2d(ds->d_targets, targets, sizeof(int) * N);
	kl_div_rows_cuda(ds->d_kl, ds->d_lse_s, ds->d_lse_t, zs, zt, ds->d_targets, N, V, ds->temperature, reverse);
	moe_cuda_memcpy_d2h(ds->kl, ds->d_kl, sizeof(double) * N);  /* as the CPU path leaves them */
	for (int n = 0; n < N; n++)
		kl_sum += ds->kl[n];
	kl_div_grad_rows_cuda(zt, zs, zt, ds->d_targets, ds->d_lse_s, ds->d_lse_t, ds->d_kl, N, V,
			      ds->temperature, reverse, ds->count ? ds->alpha / ds->count : 0.0);
	return total_loss(ds, loss, ce_sum, kl_sum);
}
#else
int distill_to_device(struct distill *ds, int bf16, const char *who)
{
	(void)ds;
	(void)bf16;
	fprintf(stderr, "%s: distillation on the GPU: a build without the CUDA backend\n", who);
	return -1;
}

float distill_forward_gpu(struct distill *ds, struct moe_model *student, struct gpu_model *g, const int *inputs,
			  const int *targets, int B, int T)
{
	(void)g;
	return distill_forward(ds, student, inputs, targets, B, T);
}
#endif
