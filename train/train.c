/*
 * train/train.c - the training loop: micro-batches with gradient accumulation, global-norm clipping,
 * AdamW, the learning-rate schedule, aux-loss-free routing-bias updates, validation, metrics, and
 * atomic checkpoints with a bit-exact resume.
 */
#define _POSIX_C_SOURCE 200809L  /* clock_gettime, mkdir */

#include "train/train.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "data/loader.h"
#include "launch/comm.h"
#include "model/model.h"
#include "optim/adamw.h"
#include "train/checkpoint.h"
#include "train/eval.h"
#include "train/grad_sync.h"
#include "train/zero.h"

struct trainer {
	struct run_config cfg;
	const struct dist *d;        /* NULL: one process */
	int rank, world;             /* world rank and size (0, 1 for one process) */
	struct moe_model *m;
	struct adamw opt;
	struct optim_segment *segs;
	int nsegs;
	struct lr_schedule sched;
	struct loader train, val;
	int have_val;
	struct train_state st;
	FILE *metrics;
	int *inputs, *targets;       /* [micro_batch * seq_len] */
	int64_t *step_load;          /* [L][E] expert loads summed over the step's micro-batches */
	double step_time_avg;
	struct grad_sync sync;       /* the data-parallel gradient reduction */
	int zero;                    /* parallel.zero=1: the AdamW state sharded (then opt is only */
	struct zero z;               /* allocated around checkpoint loads and saves) */
};

#define LOG(t, ...) do { if ((t)->rank == 0) printf(__VA_ARGS__); } while (0)

/* Every rank's verdict on a phase: any rank's failure fails all of them, so none waits forever in a
 * collective that the failed rank will never join. */
static int all_ok(const struct trainer *t, int ok)
{
	if (!t->d || t->world == 1)
		return ok;
	int v = ok ? 1 : 0;
	if (comm_allreduce(t->d->world_g, &v, 1, COMM_I32, COMM_MIN))
		comm_abort(1, "collective failed");
	return v;
}

static volatile sig_atomic_t stop_requested;

static void on_stop_signal(int sig)
{
	(void)sig;
	stop_requested = 1;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void format_duration(char *out, size_t len, double s)
{
	long t = (long)(s + 0.5);
	if (t >= 3600)
		snprintf(out, len, "%ldh%02ldm", t / 3600, t / 60 % 60);
	else if (t >= 60)
		snprintf(out, len, "%ldm%02lds", t / 60, t % 60);
	else
		snprintf(out, len, "%lds", t);
}

/* mkdir -p; 0 or -1 with errno */
static int make_dirs(const char *path)
{
	char buf[1100];
	snprintf(buf, sizeof(buf), "%s", path);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = 0;
		if (mkdir(buf, 0755) && errno != EEXIST)
			return -1;
		*p = '/';
	}
	return mkdir(buf, 0755) && errno != EEXIST ? -1 : 0;
}

/* ---------------------------------------------------------------- setup */

/* One optimizer segment per tensor: decay on matrices, none on norms (and on the input embedding
 * unless train.decay_embeddings), the routing bias frozen. */
static int build_segments(struct trainer *t)
{
	const struct moe_model *m = t->m;
	t->segs = calloc(m->n_params, sizeof(*t->segs));
	if (!t->segs)
		return -1;
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		struct optim_segment *s = &t->segs[i];
		s->offset = p->offset;
		s->numel = p->numel;
		s->frozen = p->kind == PARAM_BUFFER;
		s->weight_decay = param_weight_decay(p, (float)t->cfg.train.weight_decay,
						     t->cfg.train.decay_embeddings);
	}
	t->nsegs = m->n_params;
	return 0;
}

/* The value of section.key in a config's JSON, as text (for messages). */
static void config_value_text(const struct run_config *c, const char *section, const char *key, char *out,
			      size_t len)
{
	char *json = config_to_json(c);
	cJSON *root = cJSON_Parse(json);
	cJSON *item = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, section), key);
	char *txt = item ? cJSON_PrintUnformatted(item) : NULL;
	snprintf(out, len, "%s", txt ? txt : "?");
	free(txt);
	cJSON_Delete(root);
	free(json);
}

/* The model must be the one the checkpoint holds; resuming (what = "resume"), every other difference is
 * allowed and printed. */
static int compare_with_checkpoint(const struct run_config *saved, const struct run_config *now,
				   const char *path, const char *what)
{
	char key[128];
	if (config_model_diff(&saved->model, &now->model, key, sizeof(key))) {
		char a[128], b[128];
		config_value_text(saved, "model", key + 6, a, sizeof(a));
		config_value_text(now, "model", key + 6, b, sizeof(b));
		fprintf(stderr, "moe train: %s was written with %s = %s, the config says %s: the model's "
			"shapes would change\n", path, key, a, b);
		return -1;
	}
	if (!what)
		return 0;  /* a new run from a checkpoint's weights: only the model must agree */
	char *js = config_to_json(saved), *jn = config_to_json(now);
	cJSON *rs = cJSON_Parse(js), *rn = cJSON_Parse(jn);
	cJSON *sec;
	cJSON_ArrayForEach(sec, rn) {
		if (!strcmp(sec->string, "model"))
			continue;
		cJSON *old_sec = cJSON_GetObjectItemCaseSensitive(rs, sec->string), *item;
		cJSON_ArrayForEach(item, sec) {
			cJSON *old = cJSON_GetObjectItemCaseSensitive(old_sec, item->string);
			if (old && cJSON_Compare(old, item, 1))
				continue;
			char *a = old ? cJSON_PrintUnformatted(old) : NULL, *b = cJSON_PrintUnformatted(item);
			printf("%s: %s.%s changed: %s -> %s\n", what, sec->string, item->string, a ? a : "(unset)",
			       b);
			free(a);
			free(b);
		}
	}
	cJSON_Delete(rs);
	cJSON_Delete(rn);
	free(js);
	free(jn);
	return 0;
}

static int resolve_resume(const struct trainer *t, const char *resume, char *path, size_t len)
{
	char err[1024];
	if (strcmp(resume, "latest")) {
		snprintf(path, len, "%s", resume);
		return 0;
	}
	int r = checkpoint_latest(t->cfg.checkpoint.dir, path, len, err, sizeof(err));
	if (r < 0) {
		fprintf(stderr, "moe train: %s\n", err);
		return -1;
	}
	if (r == 1) {
		LOG(t, "resume: no checkpoint in %s yet, starting fresh\n", t->cfg.checkpoint.dir);
		path[0] = 0;
	}
	return 0;
}

/* Weights (and optimizer, data position, RNG) from --resume, or weights from train.init_checkpoint, or a
 * fresh initialisation. */
static int restore(struct trainer *t, const char *resume)
{
	char path[1100] = "", err[1024];
	int full = 0;
	if (resume) {
		if (resolve_resume(t, resume, path, sizeof(path)))
			return -1;
		full = path[0] != 0;
	}
	if (!path[0] && t->cfg.train.init_checkpoint[0])
		snprintf(path, sizeof(path), "%s", t->cfg.train.init_checkpoint);
	if (!path[0]) {
		model_init_weights(t->m, (uint64_t)t->cfg.train.seed);
		t->st.data_seed = (uint64_t)t->cfg.train.seed;
		return 0;
	}
	struct run_config saved;
	config_defaults(&saved);
	if (checkpoint_read_header(path, &saved, NULL, err, sizeof(err)))
		goto fail;
	if (compare_with_checkpoint(&saved, &t->cfg, path, full && t->rank == 0 ? "resume" : NULL))
		return -1;
	if (full) {
		if (checkpoint_load(path, t->m, &t->opt, &t->st, err, sizeof(err)))
			goto fail;
		LOG(t, "resumed from %s at step %lld (%lld tokens seen)\n", path, (long long)t->st.step,
		    (long long)t->st.tokens_seen);
	} else {
		if (checkpoint_load_model(path, t->m, err, sizeof(err)))
			goto fail;
		t->st.data_seed = (uint64_t)t->cfg.train.seed;
		LOG(t, "initialised from %s (weights only, fresh optimizer)\n", path);
	}
	return 0;
fail:
	fprintf(stderr, "moe train: %s\n", err);
	return -1;
}

/*
 * The metrics file.  A resumed run drops the lines past the resumed step (written by the run that was
 * stopped after its last checkpoint), so the file reads as one uninterrupted run.
 */
static FILE *open_metrics(const char *path, int resumed, int64_t step)
{
	if (!path[0])
		return NULL;
	char dir[1100];
	snprintf(dir, sizeof(dir), "%s", path);
	char *slash = strrchr(dir, '/');
	if (slash && slash != dir) {
		*slash = 0;
		if (make_dirs(dir))
			fprintf(stderr, "moe train: cannot create %s: %s\n", dir, strerror(errno));
	}
	if (resumed) {
		FILE *in = fopen(path, "r");
		if (in) {
			char tmp[1100], line[65536];
			snprintf(tmp, sizeof(tmp), "%s.tmp", path);
			FILE *out = fopen(tmp, "w");
			while (out && fgets(line, sizeof(line), in)) {
				cJSON *j = cJSON_Parse(line);
				cJSON *s = cJSON_GetObjectItemCaseSensitive(j, "step");
				if (cJSON_IsNumber(s) && s->valuedouble <= (double)step)
					fputs(line, out);
				cJSON_Delete(j);
			}
			fclose(in);
			if (out && !fclose(out))
				rename(tmp, path);
		}
	}
	FILE *f = fopen(path, resumed ? "a" : "w");
	if (!f)
		fprintf(stderr, "moe train: cannot open log.metrics %s: %s\n", path, strerror(errno));
	return f;
}

static int setup(struct trainer *t, const struct run_config *cfg, const char *resume)
{
	char err[1024];
	const struct train_config *tc = &cfg->train;
	t->cfg = *cfg;
	int E = cfg->model.n_routed_experts, ep = t->d ? t->d->ep : 1, ep_rank = t->d ? t->d->ep_rank : 0;
	t->m = model_create(&cfg->model, ep_rank * (E / ep), (ep_rank + 1) * (E / ep), err, sizeof(err));
	if (!t->m) {
		fprintf(stderr, "moe train: %s\n", err);
		return -1;
	}
	if (t->d && ep > 1)
		t->m->ep_group = t->d->ep_g;
	if (grad_sync_init(&t->sync, t->m)) {
		fprintf(stderr, "moe train: out of memory for the gradient buffers\n");
		return -1;
	}
	if (adamw_init(&t->opt, t->m->n_weights) || build_segments(t)) {
		fprintf(stderr, "moe train: out of memory for the optimizer state\n");
		return -1;
	}
	if (lr_schedule_parse(tc->schedule, &t->sched.kind)) {
		fprintf(stderr, "moe train: train.schedule: unknown schedule '%s'\n", tc->schedule);
		return -1;
	}
	t->sched.lr = tc->lr;
	t->sched.min_lr = tc->min_lr;
	t->sched.decay_frac = tc->decay_frac;
	t->sched.warmup_steps = tc->warmup_steps;
	t->sched.total_steps = tc->steps;
	if (restore(t, resume))
		return -1;
	if (cfg->parallel.zero) {
		t->zero = 1;
		if (zero_init(&t->z, t->m, t->d, (float)tc->weight_decay, tc->decay_embeddings)) {
			fprintf(stderr, "moe train: out of memory for the sharded optimizer\n");
			return -1;
		}
		zero_scatter_state(&t->z, t->m, &t->opt);
		adamw_free(&t->opt);
	}
	if (!cfg->data.train[0]) {
		fprintf(stderr, "moe train: data.train: no training shards given\n");
		return -1;
	}
	if (loader_open(&t->train, cfg->data.train, tc->seq_len, cfg->model.vocab_size, cfg->data.shuffle,
			t->st.data_seed, err, sizeof(err))) {
		fprintf(stderr, "moe train: data.train: %s\n", err);
		return -1;
	}
	if (cfg->data.val[0] && tc->eval_every > 0) {
		if (loader_open(&t->val, cfg->data.val, tc->seq_len, cfg->model.vocab_size, false, 0, err,
				sizeof(err))) {
			fprintf(stderr, "moe train: data.val: %s\n", err);
			return -1;
		}
		t->have_val = 1;
	}
	size_t n = (size_t)tc->micro_batch * tc->seq_len;
	t->inputs = malloc(sizeof(int) * n);
	t->targets = malloc(sizeof(int) * n);
	t->step_load = calloc((size_t)cfg->model.num_hidden_layers * (cfg->model.n_routed_experts + 1),
			      sizeof(int64_t));
	if (t->rank == 0) {
		t->metrics = open_metrics(cfg->log.metrics, t->st.step > 0, t->st.step);
		if (cfg->log.metrics[0] && !t->metrics)
			return -1;
	}
	if (!t->inputs || !t->targets || !t->step_load)
		return -1;
	return 0;
}

static void teardown(struct trainer *t)
{
	if (t->metrics)
		fclose(t->metrics);
	free(t->inputs);
	free(t->targets);
	free(t->step_load);
	grad_sync_free(&t->sync);
	if (t->zero)
		zero_free(&t->z);
	free(t->segs);
	if (t->train.shards)
		loader_close(&t->train);
	if (t->have_val)
		loader_close(&t->val);
	adamw_free(&t->opt);
	model_free(t->m);
}

/* ---------------------------------------------------------------- one step */

struct step_result {
	double loss, ce, aux, grad_norm, lr, seconds, comm_seconds;
	int skipped;
	const char *bad;             /* the first tensor with a non-finite gradient */
};

static void add_loads(struct trainer *t)
{
	const struct model_config *c = &t->m->cfg;
	size_t n = (size_t)c->num_hidden_layers * c->n_routed_experts;
	for (size_t i = 0; i < n; i++)
		t->step_load[i] += t->m->expert_load[i];
}

/*
 * Aux-loss-free balancing (DeepSeek-V3 section 2.1.2): after the update, every MoE layer's routing bias
 * moves by bias_update_speed toward under-loaded experts: b_i += speed * sign(mean_load - load_i).
 */
static void update_routing_bias(struct trainer *t)
{
	const struct model_config *c = &t->m->cfg;
	float speed = (float)t->cfg.train.bias_update_speed;
	int E = c->n_routed_experts;
	if (speed == 0.0f)
		return;
	for (int l = 0; l < c->num_hidden_layers; l++) {
		if (!mc_layer_is_moe(c, l))
			continue;
		const int64_t *load = t->step_load + (size_t)l * E;
		double mean = 0;
		for (int e = 0; e < E; e++)
			mean += load[e];
		mean /= E;
		float *bias = t->m->w.layers[l].e_score_correction_bias;
		for (int e = 0; e < E; e++)
			bias[e] += speed * (float)((mean > load[e]) - (mean < load[e]));
	}
}

static const char *first_nonfinite_grad(const struct moe_model *m)
{
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		for (size_t j = 0; j < p->numel; j++)
			if (!isfinite(m->grads[p->offset + j]))
				return p->name;
	}
	return NULL;
}

static void train_step(struct trainer *t, struct step_result *r)
{
	const struct train_config *tc = &t->cfg.train;
	int B = tc->micro_batch, T = tc->seq_len, A = tc->grad_accum;
	double t0 = now_s();
	memset(r, 0, sizeof(*r));
	comm_reset_seconds();
	memset(t->step_load, 0, sizeof(int64_t) * t->m->cfg.num_hidden_layers * t->m->cfg.n_routed_experts);

	/* micro-batch a of rank r reads sequences (a*W + r)*B ..: the same global batch, in the same
	 * order, for every layout with the same W*A*B (one process with grad_accum = W*A included) */
	int W = t->world, r0 = t->rank;
	float scale = 1.0f / ((float)A * W);
	model_zero_grad(t->m);
	for (int a = 0; a < A; a++) {
		uint64_t first = t->st.data_position + ((uint64_t)a * W + r0) * B;
		for (int b = 0; b < B; b++)
			loader_get(&t->train, first + b, t->inputs + (size_t)b * T, t->targets + (size_t)b * T);
		r->loss += model_forward(t->m, t->inputs, t->targets, B, T) * scale;
		r->ce += t->m->last_ce_loss * scale;
		r->aux += t->m->last_aux_loss * scale;
		add_loads(t);
		model_backward(t->m, scale);
	}
	t->st.data_position += (uint64_t)A * B * W;
	t->st.tokens_seen += (int64_t)A * B * T * W;

	r->lr = lr_at(&t->sched, t->st.step);
	r->grad_norm = t->zero ? zero_reduce(&t->z, t->m) : grad_sync_reduce(&t->sync, t->m, t->d);
	double sums[3] = { r->loss, r->ce, r->aux };
	if (t->d && W > 1) {
		int64_t n = (int64_t)t->m->cfg.num_hidden_layers * t->m->cfg.n_routed_experts;
		if (comm_allreduce(t->d->world_g, sums, 3, COMM_F64, COMM_SUM) ||
		    comm_allreduce(t->d->world_g, t->step_load, n, COMM_I64, COMM_SUM))
			comm_abort(1, "all-reduce of the step's statistics failed");
		r->loss = sums[0];
		r->ce = sums[1];
		r->aux = sums[2];
	}
	if (!isfinite(r->loss) || !isfinite(r->grad_norm)) {
		r->skipped = 1;
		r->bad = first_nonfinite_grad(t->m);
	} else {
		struct adamw_hparams h = { (float)r->lr, (float)tc->beta1, (float)tc->beta2, (float)tc->eps };
		if (t->zero) {
			float f = tc->grad_clip > 0 && r->grad_norm > tc->grad_clip ?
				  (float)(tc->grad_clip / r->grad_norm) : 1.0f;
			zero_update(&t->z, t->m, f, &h);
		} else {
			grad_clip(t->m->grads, t->m->n_weights, r->grad_norm, tc->grad_clip);
			adamw_update(&t->opt, t->m->weights, t->m->grads, t->segs, t->nsegs, &h);
		}
		update_routing_bias(t);
	}
	t->st.step++;
	r->seconds = now_s() - t0;
	r->comm_seconds = comm_seconds();
	t->st.elapsed_s += r->seconds;
}

/* ---------------------------------------------------------------- logging, eval, checkpoints */

/* max expert load / mean load of each MoE layer over the step */
static void write_imbalance(struct trainer *t, FILE *f)
{
	const struct model_config *c = &t->m->cfg;
	int E = c->n_routed_experts, first = 1;
	fprintf(f, "\"load_imbalance\": [");
	for (int l = 0; l < c->num_hidden_layers; l++) {
		if (!mc_layer_is_moe(c, l))
			continue;
		int64_t mx = 0, sum = 0;
		for (int e = 0; e < E; e++) {
			int64_t v = t->step_load[(size_t)l * E + e];
			mx = v > mx ? v : mx;
			sum += v;
		}
		fprintf(f, "%s%.4f", first ? "" : ", ", sum ? (double)mx * E / sum : 0.0);
		first = 0;
	}
	fprintf(f, "]");
}

static void log_step(struct trainer *t, const struct step_result *r, double val_loss)
{
	const struct train_config *tc = &t->cfg.train;
	double tps = (double)tc->micro_batch * tc->grad_accum * tc->seq_len * t->world / r->seconds;
	t->step_time_avg = t->step_time_avg == 0 ? r->seconds : 0.9 * t->step_time_avg + 0.1 * r->seconds;
	if (t->metrics) {
		FILE *f = t->metrics;
		fprintf(f, "{\"step\": %lld, \"loss\": %.6f, \"ce_loss\": %.6f, \"aux_loss\": %.6g, \"lr\": %.6g, "
			"\"grad_norm\": %.6g, \"tokens_per_s\": %.1f, \"elapsed_s\": %.3f, \"tokens_seen\": %lld, "
			"\"step_s\": %.4f, \"comm_s\": %.4f, ",
			(long long)t->st.step, r->loss, r->ce, r->aux, r->lr, r->grad_norm, tps, t->st.elapsed_s,
			(long long)t->st.tokens_seen, r->seconds, r->comm_seconds);
		if (val_loss >= 0)
			fprintf(f, "\"val_loss\": %.6f, ", val_loss);
		if (r->skipped)
			fprintf(f, "\"skipped\": true, ");
		write_imbalance(t, f);
		fprintf(f, "}\n");
		fflush(f);
	}
	if (t->rank != 0 || (t->st.step % (t->cfg.log.every > 0 ? t->cfg.log.every : 1) && val_loss < 0 &&
			     !r->skipped && t->st.step != tc->steps))
		return;
	char eta[32];
	format_duration(eta, sizeof(eta), t->step_time_avg * (tc->steps - t->st.step));
	printf("step %lld/%d | loss %.4f | lr %.3e | grad norm %.3f | %.0f tok/s | ETA %s",
	       (long long)t->st.step, tc->steps, r->loss, r->lr, r->grad_norm, tps, eta);
	if (val_loss >= 0)
		printf(" | val loss %.4f", val_loss);
	if (r->skipped)
		printf(" | SKIPPED (non-finite)");
	printf("\n");
	fflush(stdout);
}

/*
 * Validation: rank r evaluates sequences r*B.., (W + r)*B.., ...; every rank runs the same number of
 * forwards (the experts' all-to-all needs them in step), a rank past the end running a batch whose
 * targets are all ignored.
 */
static double validation_loss(struct trainer *t)
{
	const struct train_config *tc = &t->cfg.train;
	int B = tc->micro_batch, T = tc->seq_len, W = t->world;
	uint64_t n = t->val.n_seqs;
	if (tc->eval_batches > 0 && (uint64_t)tc->eval_batches * B < n)
		n = (uint64_t)tc->eval_batches * B;
	double sums[2] = { 0, 0 };
	for (uint64_t k0 = 0; k0 < n; k0 += (uint64_t)B * W) {
		for (int i = 0; i < B; i++) {
			uint64_t k = k0 + (uint64_t)t->rank * B + i;
			int *in = t->inputs + (size_t)i * T, *tg = t->targets + (size_t)i * T;
			if (k < n) {
				loader_get(&t->val, k, in, tg);
			} else {
				memset(in, 0, sizeof(int) * T);
				memset(tg, 0xff, sizeof(int) * T);  /* -1: no loss */
			}
		}
		model_forward(t->m, t->inputs, t->targets, B, T);
		int c = model_count_targets(t->m);
		sums[0] += (double)t->m->last_ce_loss * c;
		sums[1] += c;
	}
	if (t->d && W > 1 && comm_allreduce(t->d->world_g, sums, 2, COMM_F64, COMM_SUM))
		comm_abort(1, "all-reduce of the validation loss failed");
	return sums[1] ? sums[0] / sums[1] : 0.0;
}

static int save_checkpoint(struct trainer *t)
{
	char path[1100], err[1024] = "";
	const char *dir = t->cfg.checkpoint.dir;
	int ok = 1;
	if (t->rank == 0 && make_dirs(dir)) {
		snprintf(err, sizeof(err), "checkpoint.dir %s: %s", dir, strerror(errno));
		ok = 0;
	}
	if (!all_ok(t, ok))
		goto fail;
	checkpoint_path(path, sizeof(path), dir, t->st.step);
	/* ZeRO: the file holds the whole AdamW state, gathered for the write */
	if (t->zero && (adamw_init(&t->opt, t->m->n_weights) || zero_gather_state(&t->z, t->m, &t->opt)))
		comm_abort(1, "out of memory gathering the optimizer state");
	ok = !checkpoint_save_dist(path, t->m, &t->opt, &t->cfg, &t->st, t->d, err, sizeof(err));
	if (t->zero)
		adamw_free(&t->opt);
	if (!ok)
		goto fail;
	ok = t->rank != 0 || !checkpoint_prune(dir, t->cfg.checkpoint.keep, err, sizeof(err));
	if (!all_ok(t, ok))
		goto fail;
	LOG(t, "saved %s\n", path);
	return 0;
fail:
	if (err[0])
		fprintf(stderr, "moe train: %s\n", err);
	return -1;
}

/* ---------------------------------------------------------------- the loop */

static int run_loop(struct trainer *t)
{
	const struct train_config *tc = &t->cfg.train;
	int every = t->cfg.checkpoint.every;
	while (t->st.step < tc->steps) {
		struct step_result r;
		train_step(t, &r);
		if (r.skipped && !strcmp(tc->on_nonfinite, "stop")) {
			if (t->rank == 0)
				fprintf(stderr, "moe train: non-finite %s at step %lld (loss %g, grad norm %g)%s%s; "
				"stopping (train.on_nonfinite=skip skips such steps)\n",
				isfinite(r.loss) ? "gradient" : "loss", (long long)t->st.step, r.loss, r.grad_norm,
				r.bad ? " first in " : "", r.bad ? r.bad : "");
			return 1;
		}
		double val = -1;
		if (t->have_val && (t->st.step % tc->eval_every == 0 || t->st.step == tc->steps))
			val = validation_loss(t);
		log_step(t, &r, val);
		int last = t->st.step == tc->steps;
		/* a signal may reach the ranks a step apart: they agree to stop together */
		int signalled = !all_ok(t, !stop_requested);
		int stop = signalled || (tc->stop_at > 0 && t->st.step == tc->stop_at);
		if ((every > 0 && t->st.step % every == 0) || last || stop)
			if (save_checkpoint(t))
				return 1;
		if (stop && !last) {
			LOG(t, "stopped at step %lld (%s); continue with --resume latest\n", (long long)t->st.step,
			    signalled ? "signal" : "train.stop_at");
			return 0;
		}
	}
	return 0;
}

int train_run(const struct run_config *cfg, const char *resume, const struct dist *d)
{
	struct trainer *t = calloc(1, sizeof(*t));
	int rc = 1;
	if (!t)
		return 1;
	t->d = d;
	t->rank = d ? d->rank : 0;
	t->world = d ? d->world : 1;
	int ok = setup(t, cfg, resume) == 0;
	if (all_ok(t, ok)) {
		int64_t total, act;
		model_count_params(&cfg->model, &total, &act);
		LOG(t, "training: %lld parameters (%lld activated), %d steps of %d ranks (dp %d x ep %d) x %d x %d "
		    "x %d tokens, lr %g (%s)\n", (long long)total, (long long)act, cfg->train.steps, t->world,
		    d ? d->dp : 1, d ? d->ep : 1, cfg->train.grad_accum, cfg->train.micro_batch,
		    cfg->train.seq_len, cfg->train.lr, cfg->train.schedule);
		signal(SIGINT, on_stop_signal);
		signal(SIGTERM, on_stop_signal);
		rc = run_loop(t);
		signal(SIGINT, SIG_DFL);
		signal(SIGTERM, SIG_DFL);
	} else if (ok) {
		fprintf(stderr, "moe train: rank %d: stopping, another rank failed to start\n", t->rank);
	}
	teardown(t);
	free(t);
	return rc;
}
