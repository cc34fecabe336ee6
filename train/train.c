/*
 * train/train.c - the training loop: micro-batches with gradient accumulation, global-norm clipping,
 * AdamW, the learning-rate schedule, aux-loss-free routing-bias updates, validation, metrics, and
 * atomic checkpoints with a bit-exact resume (the shared parts in train/trainer.c).
 */
#define _POSIX_C_SOURCE 200809L

#include "train/train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/loader.h"
#include "launch/comm.h"
#include "model/model.h"
#include "train/distill.h"
#include "train/trainer.h"

struct sft {
	struct trainer t;
	struct loader train, val;
	int have_val;
	int distilling;              /* distill.teacher set: the teacher in ds */
	struct distill ds;
	int *inputs, *targets;       /* [micro_batch * seq_len] */
	double step_time_avg;
};

static int setup(struct sft *s, const struct run_config *cfg, const char *resume, const struct dist *d)
{
	char err[1024];
	struct trainer *t = &s->t;
	const struct train_config *tc = &cfg->train;
	int distill = cfg->distill.teacher[0] != 0;
	/* every rank gets to trainer_setup_device, whose collectives must not meet another rank's failure */
	if (!trainer_all_ok(t, trainer_init(t, "moe train", cfg, resume, d, tc->steps) == 0) ||
	    trainer_setup_device(t, 1))
		return -1;
	if (distill) {
		s->distilling = 1;  /* teardown closes what distill_open leaves, also after a failure */
		int ok = distill_open(&s->ds, cfg, d, tc->micro_batch, tc->seq_len, "moe train") == 0;
		if (ok && t->cuda)  /* the teacher beside the student */
			ok = distill_to_device(&s->ds, 1, "moe train") == 0;
		if (!trainer_all_ok(t, ok))
			return -1;
	}
	if (!cfg->data.train[0]) {
		fprintf(stderr, "moe train: data.train: no training shards given\n");
		return -1;
	}
	if (loader_open(&s->train, cfg->data.train, tc->seq_len, cfg->model.vocab_size, cfg->data.shuffle,
			t->st.data_seed, err, sizeof(err))) {
		fprintf(stderr, "moe train: data.train: %s\n", err);
		return -1;
	}
	if (cfg->data.val[0] && tc->eval_every > 0) {
		if (loader_open(&s->val, cfg->data.val, tc->seq_len, cfg->model.vocab_size, false, 0, err,
				sizeof(err))) {
			fprintf(stderr, "moe train: data.val: %s\n", err);
			return -1;
		}
		s->have_val = 1;
	}
	size_t n = (size_t)tc->micro_batch * tc->seq_len;
	s->inputs = malloc(sizeof(int) * n);
	s->targets = malloc(sizeof(int) * n);
	if (!s->inputs || !s->targets)
		return -1;
	return 0;
}

static void teardown(struct sft *s)
{
	free(s->inputs);
	free(s->targets);
	if (s->train.shards)
		loader_close(&s->train);
	if (s->have_val)
		loader_close(&s->val);
	if (s->distilling)
		distill_close(&s->ds);
	trainer_free(&s->t);
}

/* ---------------------------------------------------------------- one step */

struct step_result {
	double loss, ce, aux, kl, mtp, lr, seconds, comm_seconds;
	struct update_result u;
};

static void train_step(struct sft *s, struct step_result *r)
{
	struct trainer *t = &s->t;
	const struct train_config *tc = &t->cfg.train;
	int B = tc->micro_batch, T = tc->seq_len, A = tc->grad_accum;
	double t0 = trainer_now_s();
	memset(r, 0, sizeof(*r));
	comm_reset_seconds();
	trainer_clear_loads(t);

	/* micro-batch a of rank r reads sequences (a*W + r)*B ..: the same global batch, in the same
	 * order, for every layout with the same W*A*B (one process with grad_accum = W*A included) */
	int W = t->world, r0 = t->rank;
	float scale = 1.0f / ((float)A * W);
	t->m->mtp_lambda = (float)piecewise_at(&tc->mtp_lambda, t->st.step);
	trainer_zero_grad(t);
	for (int a = 0; a < A; a++) {
		uint64_t first = t->st.data_position + ((uint64_t)a * W + r0) * B;
		for (int b = 0; b < B; b++)
			loader_get(&s->train, first + b, s->inputs + (size_t)b * T, s->targets + (size_t)b * T);
		if (s->distilling) {
			trainer_next_forward(t);
			r->loss += distill_forward_gpu(&s->ds, t->m, t->gpu, s->inputs, s->targets, B, T) * scale;
			r->ce += s->ds.last_ce * scale;
			r->kl += s->ds.last_kl * scale;
		} else {
			r->loss += trainer_forward(t, s->inputs, s->targets, B, T) * scale;
			r->ce += t->m->last_ce_loss * scale;
		}
		r->aux += t->m->last_aux_loss * scale;
		r->mtp += t->m->last_mtp_loss * scale;
		trainer_add_loads(t);
		if (s->distilling)
			distill_backward_begin(&s->ds, t->m, t->gpu);
		trainer_backward(t, scale);
		if (s->distilling)
			distill_backward_end(&s->ds, t->m, t->gpu);
	}
	t->st.data_position += (uint64_t)A * B * W;
	t->st.tokens_seen += (int64_t)A * B * T * W;

	double sums[5] = { r->loss, r->ce, r->aux, r->kl, r->mtp };
	if (t->d && W > 1) {
		if (comm_allreduce(t->d->world_g, sums, 5, COMM_F64, COMM_SUM))
			comm_abort(1, "all-reduce of the step's losses failed");
		r->loss = sums[0];
		r->ce = sums[1];
		r->aux = sums[2];
		r->kl = sums[3];
		r->mtp = sums[4];
	}
	r->lr = lr_at(&t->sched, t->st.step);
	trainer_update(t, r->lr, r->loss, &r->u);
	t->st.step++;
	r->seconds = trainer_now_s() - t0;
	r->comm_seconds = comm_seconds();
	t->st.elapsed_s += r->seconds;
}

/* ---------------------------------------------------------------- logging, eval */

static void log_step(struct sft *s, const struct step_result *r, double val_loss)
{
	struct trainer *t = &s->t;
	const struct train_config *tc = &t->cfg.train;
	double tps = (double)tc->micro_batch * tc->grad_accum * tc->seq_len * t->world / r->seconds;
	s->step_time_avg = s->step_time_avg == 0 ? r->seconds : 0.9 * s->step_time_avg + 0.1 * r->seconds;
	if (t->metrics) {
		FILE *f = t->metrics;
		fprintf(f, "{\"step\": %lld, \"loss\": %.6f, \"ce_loss\": %.6f, \"aux_loss\": %.6g, \"lr\": %.6g, "
			"\"grad_norm\": %.6g, \"tokens_per_s\": %.1f, \"elapsed_s\": %.3f, \"tokens_seen\": %lld, "
			"\"step_s\": %.4f, \"comm_s\": %.4f, ",
			(long long)t->st.step, r->loss, r->ce, r->aux, r->lr, r->u.grad_norm, tps, t->st.elapsed_s,
			(long long)t->st.tokens_seen, r->seconds, r->comm_seconds);
		if (val_loss >= 0)
			fprintf(f, "\"val_loss\": %.6f, ", val_loss);
		if (s->distilling)
			fprintf(f, "\"ce\": %.6f, \"distill_kl\": %.6f, ", r->ce, r->kl);
		if (t->cfg.model.num_nextn_predict_layers > 0)
			fprintf(f, "\"mtp_loss\": %.6f, \"mtp_lambda\": %.6g, ", r->mtp, (double)t->m->mtp_lambda);
		if (r->u.skipped)
			fprintf(f, "\"skipped\": true, ");
		trainer_write_imbalance(t, f);
		fprintf(f, "}\n");
		fflush(f);
	}
	if (t->rank != 0 || (t->st.step % (t->cfg.log.every > 0 ? t->cfg.log.every : 1) && val_loss < 0 &&
			     !r->u.skipped && t->st.step != tc->steps))
		return;
	char eta[32];
	trainer_format_duration(eta, sizeof(eta), s->step_time_avg * (tc->steps - t->st.step));
	printf("step %lld/%d | loss %.4f | lr %.3e | grad norm %.3f | %.0f tok/s | ETA %s",
	       (long long)t->st.step, tc->steps, r->loss, r->lr, r->u.grad_norm, tps, eta);
	if (s->distilling)
		printf(" | ce %.4f | kl %.4f", r->ce, r->kl);
	if (t->cfg.model.num_nextn_predict_layers > 0)
		printf(" | mtp %.4f", r->mtp);
	if (val_loss >= 0)
		printf(" | val loss %.4f", val_loss);
	if (r->u.skipped)
		printf(" | SKIPPED (non-finite)");
	printf("\n");
	fflush(stdout);
}

/*
 * Validation: rank r evaluates sequences r*B.., (W + r)*B.., ...; every rank runs the same number of
 * forwards (the experts' all-to-all needs them in step), a rank past the end running a batch whose
 * targets are all ignored.
 */
static double validation_loss(struct sft *s)
{
	struct trainer *t = &s->t;
	const struct train_config *tc = &t->cfg.train;
	int B = tc->micro_batch, T = tc->seq_len, W = t->world;
	uint64_t n = s->val.n_seqs;
	if (tc->eval_batches > 0 && (uint64_t)tc->eval_batches * B < n)
		n = (uint64_t)tc->eval_batches * B;
	double sums[2] = { 0, 0 };
	t->m->mtp_lambda = 0.0f;  /* the validation loss is the main model's; train_step sets it again */
	for (uint64_t k0 = 0; k0 < n; k0 += (uint64_t)B * W) {
		for (int i = 0; i < B; i++) {
			uint64_t k = k0 + (uint64_t)t->rank * B + i;
			int *in = s->inputs + (size_t)i * T, *tg = s->targets + (size_t)i * T;
			if (k < n) {
				loader_get(&s->val, k, in, tg);
			} else {
				memset(in, 0, sizeof(int) * T);
				memset(tg, 0xff, sizeof(int) * T);  /* -1: no loss */
			}
		}
		trainer_forward(t, s->inputs, s->targets, B, T);
		int c = 0;
		for (int i = 0; i < B * T; i++)
			c += s->targets[i] >= 0;
		sums[0] += (double)t->m->last_ce_loss * c;
		sums[1] += c;
	}
	if (t->d && W > 1 && comm_allreduce(t->d->world_g, sums, 2, COMM_F64, COMM_SUM))
		comm_abort(1, "all-reduce of the validation loss failed");
	return sums[1] ? sums[0] / sums[1] : 0.0;
}

/* ---------------------------------------------------------------- the loop */

static int run_loop(struct sft *s)
{
	struct trainer *t = &s->t;
	const struct train_config *tc = &t->cfg.train;
	while (t->st.step < tc->steps) {
		struct step_result r;
		train_step(s, &r);
		if (r.u.skipped && !strcmp(tc->on_nonfinite, "stop")) {
			if (t->rank == 0)
				fprintf(stderr, "moe train: non-finite %s at step %lld (loss %g, grad norm %g)%s%s; "
				"stopping (train.on_nonfinite=skip skips such steps)\n",
				isfinite(r.loss) ? "gradient" : "loss", (long long)t->st.step, r.loss,
				r.u.grad_norm, r.u.bad ? " first in " : "", r.u.bad ? r.u.bad : "");
			return 1;
		}
		double val = -1;
		if (s->have_val && (t->st.step % tc->eval_every == 0 || t->st.step == tc->steps))
			val = validation_loss(s);
		log_step(s, &r, val);
		int next = trainer_after_step(t);
		if (next)
			return next < 0;
	}
	return 0;
}

int train_run(const struct run_config *cfg, const char *resume, const struct dist *d)
{
	struct sft *s = calloc(1, sizeof(*s));
	int rc = 1;
	if (!s)
		return 1;
	struct trainer *t = &s->t;
	t->rank = d ? d->rank : 0;
	t->world = d ? d->world : 1;
	t->d = d;
	int ok = setup(s, cfg, resume, d) == 0;
	if (trainer_all_ok(t, ok)) {
		int64_t total, act;
		model_count_params(&cfg->model, &total, &act);
		TRAINER_LOG(t, "training: %lld parameters (%lld activated), %d steps of %d ranks (dp %d x ep %d) "
			    "x %d x %d x %d tokens, lr %g (%s)\n", (long long)total, (long long)act,
			    cfg->train.steps, t->world, d ? d->dp : 1, d ? d->ep : 1, cfg->train.grad_accum,
			    cfg->train.micro_batch, cfg->train.seq_len, cfg->train.lr, cfg->train.schedule);
		trainer_catch_signals(1);
		rc = run_loop(s);
		trainer_catch_signals(0);
	} else if (ok) {
		fprintf(stderr, "moe train: rank %d: stopping, another rank failed to start\n", t->rank);
	}
	teardown(s);
	free(s);
	return rc;
}
