/*
 * optim/adamw.h - AdamW (decoupled weight decay), learning-rate schedules and global-norm clipping.
 *
 * The optimizer sees the weights and gradients as flat float arrays cut into segments (one per tensor),
 * each with its own weight decay (0 for norms, embeddings and biases unless configured) or frozen (the
 * MoE routing bias, which is not trained).  It knows nothing of the model.
 */
#ifndef MOE_OPTIM_ADAMW_H
#define MOE_OPTIM_ADAMW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct optim_segment {
	size_t offset, numel;   /* in floats, into the weight/gradient arrays */
	float weight_decay;     /* decoupled: w -= lr * weight_decay * w */
	bool frozen;            /* not updated at all (and its state stays 0) */
};

struct adamw_hparams {
	float lr, beta1, beta2, eps;
};

struct adamw {
	size_t n;               /* floats */
	float *exp_avg;         /* [n] first moment */
	float *exp_avg_sq;      /* [n] second moment */
	int64_t step;           /* updates applied so far */
};

int adamw_init(struct adamw *o, size_t n);   /* zeroed state; 0 or -1 (out of memory) */
void adamw_free(struct adamw *o);

/*
 * One update (PyTorch's AdamW): step += 1; for each element of each non-frozen segment
 *   w -= lr * wd * w;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
 *   w -= lr * (m / (1 - b1^step)) / (sqrt(v / (1 - b2^step)) + eps)
 * Deterministic; threads split elements.
 */
void adamw_update(struct adamw *o, float *w, const float *g, const struct optim_segment *segs, int nsegs,
		  const struct adamw_hparams *h);

/* Learning-rate schedules: linear warmup from lr/warmup to lr over warmup_steps, then
 *   cosine: min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2 over the remaining steps;
 *   wsd: lr until the last decay_frac of the steps, then linear decay to min_lr;
 *   constant: lr. */
enum lr_schedule_kind { LR_COSINE, LR_WSD, LR_CONSTANT };
struct lr_schedule {
	enum lr_schedule_kind kind;
	double lr, min_lr, decay_frac;
	int64_t warmup_steps, total_steps;
};
int lr_schedule_parse(const char *name, enum lr_schedule_kind *kind);   /* 0, or -1 for an unknown name */
double lr_at(const struct lr_schedule *s, int64_t step);                 /* step counts from 0 */

/* sqrt(sum g^2) in double, in a fixed order whatever the thread count. */
double grad_global_norm(const float *g, size_t n);
/* Multiply g by min(1, max_norm / norm); returns the factor (1 when max_norm <= 0). */
float grad_clip(float *g, size_t n, double norm, double max_norm);

#endif
