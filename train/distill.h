/*
 * train/distill.h - knowledge distillation for `moe train` (the distill section of the config).
 *
 * A teacher checkpoint runs forward only (no gradient arena, no optimizer state) on the student's
 * batch, its routed experts split over the same expert-parallel group as the student's.  The student's
 * loss is
 *
 *   (1 - alpha) * CE + alpha * T^2 * KL + the balance loss
 *
 * with KL the mean over the target tokens of KL(p_t || p_s) (distill.kl = forward, Hinton et al.) or
 * KL(p_s || p_t) (reverse, MiniLLM), p = softmax(logits / T).  The T^2 keeps the gradient's scale
 * independent of T.  Both models hold their own [B*T, V] logits (the model API keeps a forward's
 * logits whole); the KL and its gradient read them a row at a time, and its gradient reaches the
 * student's backward through a logit_term (model/model.h) in chunks of rows, so no further [B*T, V]
 * buffer exists.
 */
#ifndef MOE_TRAIN_DISTILL_H
#define MOE_TRAIN_DISTILL_H

#include "launch/comm.h"
#include "model/model.h"
#include "train/config.h"

enum distill_dir {
	DISTILL_FORWARD = 0,  /* KL(teacher || student) */
	DISTILL_REVERSE,      /* KL(student || teacher) */
};

/* log sum_j exp(z[j] / T) of a row of V logits (double accumulation) */
double distill_row_lse(const float *z, int V, double T);

/*
 * KL of one row: the teacher's logits zt, the student's zs (V each) at temperature T, with their
 * log-partition functions lse_t, lse_s from distill_row_lse.
 */
double distill_row_kl(const float *zs, const float *zt, int V, double T, enum distill_dir dir,
		      double lse_s, double lse_t);

/*
 * g[j] = scale * T^2 * d KL / d zs[j] for one row (kl: its value from distill_row_kl):
 * forward: scale * T * (p_s - p_t); reverse: scale * T * p_s * (log p_s - log p_t - KL).
 */
void distill_row_grad(float *g, const float *zs, const float *zt, int V, double T, enum distill_dir dir,
		      double lse_s, double lse_t, double kl, double scale);

struct gpu_model;

struct distill {
	struct moe_model *teacher;     /* this rank's expert slice of the teacher */
	double alpha, temperature;
	enum distill_dir dir;
	int n;                         /* rows of the buffers below (B*T) */
	float *ce_weights;             /* [n]: (1 - alpha) / targets, the student's token_weights */
	double *lse_s, *lse_t, *kl;    /* [n] of the last forward */
	const int *targets;            /* the last forward's */
	int count;                     /* its targets >= 0 */
	struct logit_term term;
	double last_ce, last_kl;       /* the last forward's mean CE and KL over its targets */
	/* the GPU path (distill_to_device): the teacher's device copy, whose logits buffer becomes the KL's
	 * gradient after each forward (the teacher needs its logits no longer), and [n] device buffers */
	struct gpu_model *gteacher;
	double *d_kl, *d_lse_s, *d_lse_t;
	int *d_targets;
	const float *saved_weights;    /* the student's token_weights around distill_backward_begin/end */
};

/*
 * From cfg->distill (teacher set): the teacher's header (vocabulary as the student's, else refused
 * naming both sizes; its experts divisible by parallel.ep), its slice of the experts for d's ep rank
 * and its weights, buffers for B*T tokens.  Every rank calls it.  0, or -1 after printing why.
 */
int distill_open(struct distill *ds, const struct run_config *cfg, const struct dist *d, int B, int T,
		 const char *who);
/* The buffers for n tokens around a teacher already loaded (ds owns it from here, also on failure):
 * what distill_open does after loading.  0, or -1 when out of memory. */
int distill_init(struct distill *ds, struct moe_model *teacher, double alpha, double temperature,
		 enum distill_dir dir, int n);
void distill_close(struct distill *ds);
/* After distill_open, for a student on the GPU (moe_cuda_init done): the teacher's device copy (bf16
 * matmuls or not, as the student's; forward only, no gradient arena) and the KL's device buffers.  0, or -1
 * after printing why.  Without the CUDA backend: -1. */
int distill_to_device(struct distill *ds, int bf16, const char *who);

/*
 * The teacher's forward on inputs, then the student's forward with targets: returns the student's loss
 * (1 - alpha) * CE + alpha * T^2 * KL + aux; last_ce and last_kl are set.  The student's options of
 * model.h other than token_weights and logit_term are left as they are.
 */
float distill_forward(struct distill *ds, struct moe_model *student, const int *inputs,
		      const int *targets, int B, int T);
/* The backward of loss_scale * that loss into the student's gradients. */
void distill_backward(struct distill *ds, struct moe_model *student, float loss_scale);

/*
 * The same for a student whose forward and backward run on g, its GPU copy (g NULL: the CPU functions
 * above): distill_forward_gpu runs both forwards on the device, the KL and its gradient there (the KL's
 * gradient waits in the teacher's logits buffer), and returns the loss as distill_forward does.  Around
 * the caller's backward of the student (trainer_backward), distill_backward_begin sets the student's
 * CE token weights and the KL's gradient, distill_backward_end takes them off.
 */
float distill_forward_gpu(struct distill *ds, struct moe_model *student, struct gpu_model *g, const int *inputs,
			  const int *targets, int B, int T);
void distill_backward_begin(struct distill *ds, struct moe_model *student, struct gpu_model *g);
void distill_backward_end(struct distill *ds, struct moe_model *student, struct gpu_model *g);

#endif
