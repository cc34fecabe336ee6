/*
 * rl/grpo.h - Group Relative Policy Optimization (DeepSeekMath, section 4.1): `moe grpo`.
 *
 * One GRPO step: P prompts (grpo.prompts_per_step), G completions each (grpo.group_size) sampled from
 * the policy as it is at sampling time (grpo.rollout_weights=int8: its int8 copy, model/quant.h, the
 * old log-probabilities then recomputed in fp32), scored by every reward program at once (rl/reward.h;
 * grpo.rewards, weighted), turned into group-relative advantages (grpo_combined_advantages), then num_iterations passes over the batch in minibatches, one AdamW update
 * each, on the clipped surrogate
 *
 *   loss_t = -min(r_t A, clip(r_t, 1 - epsilon, 1 + epsilon_high) A) + beta k3_t
 *   r_t    = pi(o_t) / pi_sample(o_t)                     (GSPO: exp(mean_t log r_t), one per sequence)
 *   k3_t   = pi_ref/pi - log(pi_ref/pi) - 1 >= 0
 *
 * aggregated over the completion tokens by the loss type (TRL's definitions):
 *   grpo     mean over tokens per sequence, then mean over the minibatch's sequences
 *   bnpo     mean over the tokens of each micro-batch (train.micro_batch sequences), then over those
 *   dr_grpo  sum over tokens / (sequences x max_new_tokens)
 *   dapo     sum over tokens / (tokens of the whole minibatch)
 * All counts are global (every rank), so each (dp, ep) layout computes the same update.
 *
 * The math below is free of the model so it can be tested by itself; grpo_run() is the command.
 */
#ifndef MOE_RL_GRPO_H
#define MOE_RL_GRPO_H

#include <stdbool.h>

#include "launch/comm.h"
#include "train/config.h"

enum grpo_scale { GRPO_SCALE_GROUP, GRPO_SCALE_BATCH, GRPO_SCALE_NONE };
enum grpo_loss_type { GRPO_LOSS_GRPO, GRPO_LOSS_BNPO, GRPO_LOSS_DR_GRPO, GRPO_LOSS_DAPO };
/* grpo.reward_norm: how several rewards make one advantage */
enum grpo_reward_norm { GRPO_NORM_TOTAL, GRPO_NORM_EACH };

/* The std in the advantages' denominator gets this added (TRL's value). */
#define GRPO_ADV_EPS 1e-4

/* Parse grpo.scale_rewards / grpo.loss_type names; -1 when unknown. */
int grpo_scale_from_name(const char *name);
int grpo_reward_norm_from_name(const char *name);
int grpo_loss_type_from_name(const char *name);

/*
 * Advantages of P groups of G consecutive rewards: A = r - mean(group), divided by (std + 1e-4) with the
 * unbiased std of the group (GROUP) or of the whole batch (BATCH), or not divided (NONE).  Returns the
 * number of groups whose rewards are all equal (their advantages are 0: they teach nothing).
 */
int grpo_advantages(const double *rewards, int P, int G, enum grpo_scale scale, float *adv);

/*
 * Advantages of R weighted rewards of P groups of G completions: rewards[k * P*G + j] is program k's
 * reward of completion j, weights[k] its weight; total[j] receives sum_k weights[k] rewards[k][j].
 * TOTAL: grpo_advantages of the totals (TRL's way).  EACH: each program's rewards normalised on their
 * own first (grpo_advantages with the same scale), then adv = sum_k weights[k] adv_k, so a program's
 * say in the advantage does not depend on its rewards' spread.  Returns the number of groups whose
 * advantages are all 0 (TOTAL: equal totals; EACH: as when every program's rewards are equal within the
 * group).  -1 when out of memory (EACH needs P*G floats of scratch).
 */
int grpo_combined_advantages(const double *rewards, const double *weights, int R, int P, int G,
			     enum grpo_scale scale, enum grpo_reward_norm norm, double *total, float *adv);

/*
 * The weight each completion's token losses carry in one minibatch of n completions (in their global
 * order), by loss type: mlen[i] the completion's tokens that count (0 when masked), chunk the
 * micro-batch size (bnpo), max_new the completion length limit (dr_grpo).  coef[i] is the same for
 * every token of completion i.
 */
void grpo_sequence_coefs(enum grpo_loss_type t, int n, const int *mlen, int chunk, int max_new,
			 double *coef);

struct grpo_loss_params {
	float epsilon, epsilon_high;  /* clip range [1 - epsilon, 1 + epsilon_high] */
	float beta;                   /* KL weight; 0: no reference */
	bool sequence_ratio;          /* GSPO */
};

struct grpo_stats {
	double loss;                  /* sum of coef * loss_t */
	double kl;                    /* sum of k3 over counted tokens */
	double ratio;                 /* sum of r over counted tokens */
	long tokens;                  /* counted tokens */
	long clip_low, clip_high;     /* counted tokens clipped: A < 0 and r < 1 - eps; A > 0 and r > 1 + eps_high */
};

/*
 * One completion of n tokens: logp [n] under the current policy, old [n] at sampling time, ref [n]
 * under the reference (NULL when beta == 0), counted (0 or 1: whether the completion's tokens carry
 * loss), its advantage adv and weight coef.  Writes dlogp [n] = dL/dlogp_t of
 * L = coef * sum_t loss_t (0 everywhere when not counted) and adds the completion to st.
 */
void grpo_sequence_grad(const struct grpo_loss_params *p, int n, const float *logp, const float *old,
			const float *ref, int counted, float adv, double coef, float *dlogp,
			struct grpo_stats *st);

/*
 * `moe grpo`: cfg.train.init_checkpoint is the starting policy (and the reference when grpo.beta > 0);
 * resume as for train_run.  Every rank calls it; d NULL for one process.  Returns 0, or 1 after
 * printing an error (on every rank: a failing rank ends the job).
 */
int grpo_run(const struct run_config *cfg, const char *resume, const struct dist *d);

/*
 * `moe grpo --eval PROMPTS.jsonl`: greedy completions (up to grpo.max_new_tokens) of every prompt of the
 * set by the policy (--resume or train.init_checkpoint; with the rollout weights), scored by every reward
 * program; prints the mean weighted reward, the accuracy (the fraction of completions whose weighted
 * reward is >= 1) and each program's mean and std.  samples_path (may be NULL; one process only) receives
 * each completion and its reward(s) as JSON Lines.
 */
int grpo_eval(const struct run_config *cfg, const char *resume, const struct dist *d, const char *path,
	      const char *samples_path);

#endif
