/*
 * train/trainer.c - the parts of a training run that `moe train` and `moe grpo` share (trainer.h).
 */
#define _POSIX_C_SOURCE 200809L  /* clock_gettime, mkdir */

#include "train/trainer.h"
#include "train/lora_run.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#ifdef MOE_HAVE_CUDA
#include <unistd.h>

#include "launch/cuda/comm_device.h"
#include "launch/cuda/device.h"
#include "model/cuda/model_cuda.h"
#include "model/cuda/ops_cuda.h"
#include "optim/cuda/adamw_cuda.h"
#endif

int trainer_all_ok(const struct trainer *t, int ok)
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

void trainer_catch_signals(int on)
{
	signal(SIGINT, on ? on_stop_signal : SIG_DFL);
	signal(SIGTERM, on ? on_stop_signal : SIG_DFL);
}

/* a signal may reach the ranks a step apart: they agree to stop together */
int trainer_signalled(const struct trainer *t)
{
	return !trainer_all_ok(t, !stop_requested);
}

double trainer_now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void trainer_format_duration(char *out, size_t len, double s)
{
	long t = (long)(s + 0.5);
	if (t >= 3600)
		snprintf(out, len, "%ldh%02ldm", t / 3600, t / 60 % 60);
	else if (t >= 60)
		snprintf(out, len, "%ldm%02lds", t / 60, t % 60);
	else
		snprintf(out, len, "%lds", t);
}

int trainer_make_dirs(const char *path)
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

struct moe_model *trainer_trained(const struct trainer *t)
{
	return t->lora ? &t->lora->view : t->m;
}

/* One optimizer segment per tensor (LoRA: per adapter tensor): decay on matrices, none on norms (and on
 * the input embedding unless train.decay_embeddings), the routing bias frozen. */
static int build_segments(struct trainer *t)
{
	const struct moe_model *m = trainer_trained(t);
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
				   const char *path, const char *what,
				   const char *who)
{
	char key[128];
	if (config_model_diff(&saved->model, &now->model, key, sizeof(key))) {
		char a[128], b[128];
		config_value_text(saved, "model", key + 6, a, sizeof(a));
		config_value_text(now, "model", key + 6, b, sizeof(b));
		fprintf(stderr, "%s: %s was written with %s = %s, the config says %s: the model's "
			"shapes would change\n", who, path, key, a, b);
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


/*
 * Resuming: a LoRA run takes only an adapter checkpoint of the same adapters on the same base, a full
 * run no adapter checkpoint.  1 (printed) when refused.
 */
static int lora_refuses(const struct trainer *t, const struct run_config *saved, const char *path)
{
	const struct lora_config *a = &saved->lora, *b = &t->cfg.lora;
	const char *why = NULL;
	char err[1024];
	if (!t->lora && a->rank)
		why = "holds LoRA adapters and this run has no lora section (set it as it was, or fold them in "
		      "with moe lora merge)";
	else if (t->lora && !a->rank)
		why = "is a full checkpoint, not LoRA adapters (start the LoRA run from it with "
		      "train.init_checkpoint instead)";
	else if (t->lora && (a->rank != b->rank || a->n_targets != b->n_targets ||
			     memcmp(a->targets, b->targets, sizeof(a->targets))))
		why = "holds adapters of another lora.rank or lora.targets";
	else if (t->lora && strcmp(a->base_checksum, b->base_checksum)) {
		snprintf(err, sizeof(err), "was trained on a base of checksum %s; the base %s now has %s: "
			 "refusing to resume on another model", a->base_checksum, b->base, b->base_checksum);
		why = err;
	}
	if (why && t->rank == 0)
		fprintf(stderr, "%s: %s %s\n", t->who, path, why);
	return why != NULL;
}

/* What loading one checkpoint came to. */
enum load_result { LOAD_OK, LOAD_DEFECT, LOAD_REFUSED };

/*
 * Weights and, when full, the optimizer and train state from path.  LOAD_DEFECT: the file cannot be
 * read or verified (err says why); LOAD_REFUSED: it holds another model than the config's (printed).
 * Loading is all or nothing, so a failed attempt leaves the model, optimizer and state as they were.
 */
static enum load_result load_from(struct trainer *t, const char *path, int full, char *err, size_t errlen)
{
	struct run_config saved;
	config_defaults(&saved);
	if (checkpoint_read_header(path, &saved, NULL, err, errlen))
		return LOAD_DEFECT;
	if (compare_with_checkpoint(&saved, &t->cfg, path, full && t->rank == 0 ? "resume" : NULL, t->who))
		return LOAD_REFUSED;
	if (full && lora_refuses(t, &saved, path))
		return LOAD_REFUSED;
	if (full ? checkpoint_load(path, trainer_trained(t), &t->opt, &t->st, err, errlen) :
		   checkpoint_load_model(path, t->m, err, errlen))
		return LOAD_DEFECT;
	return LOAD_OK;
}


/*
 * --resume latest: the newest checkpoint of checkpoint.dir that loads on every rank (each rank reads and
 * verifies its own slice, so all of them vote on each file).  Each one skipped is named with its defect
 * by the rank that found it and left as it is.  path[0] == 0: the directory holds none yet.  None of
 * several loading is an error: starting afresh would write over a run that exists.
 */
static int resume_latest(struct trainer *t, char *path, size_t len)
{
	const char *dir = t->cfg.checkpoint.dir;
	int64_t before = INT64_MAX, step = 0;
	char err[1024];
	int skipped = 0;
	for (;;) {
		int r = checkpoint_before(dir, before, path, len, &step, err, sizeof(err));
		if (!trainer_all_ok(t, r >= 0)) {
			if (r < 0)
				fprintf(stderr, "%s: %s\n", t->who, err);
			return -1;
		}
		if (!trainer_all_ok(t, r == 0)) {
			if (!trainer_all_ok(t, r == 1)) {
				fprintf(stderr, "%s: rank %d: the ranks see different checkpoints in %s\n", t->who,
					t->rank, dir);
				return -1;
			}
			if (!skipped) {
				path[0] = 0;
				return 0;
			}
			if (t->rank == 0)
				fprintf(stderr, "%s: resume: none of the %d checkpoints in %s loads (each named "
					"above with its defect); not starting afresh over them: repair or move them "
					"away, or name one with --resume PATH\n", t->who, skipped, dir);
			return -1;
		}
		enum load_result res = load_from(t, path, 1, err, sizeof(err));
		if (!trainer_all_ok(t, res != LOAD_REFUSED))
			return -1;
		if (trainer_all_ok(t, res == LOAD_OK)) {
			if (skipped)
				TRAINER_LOG(t, "resume: skipped %d damaged checkpoint%s newer than %s\n", skipped,
					    skipped > 1 ? "s" : "", path);
			return 0;
		}
		if (res == LOAD_DEFECT) {
			/* the message begins with the path as a rule: name it once */
			size_t n = strlen(path);
			const char *why = !strncmp(err, path, n) && err[n] == ':' ? err + n + 1 : err;
			char who[32] = "";
			if (t->world > 1)
				snprintf(who, sizeof(who), "rank %d: ", t->rank);
			fprintf(stderr, "%s: %sresume: skipping %s:%s%s\n", t->who, who, path,
				why == err ? " " : "", why);
		}
		skipped++;
		before = step;
	}
}


/* Weights (and optimizer, data position, RNG) from --resume, or weights from train.init_checkpoint, or a
 * fresh initialisation. */
static int restore(struct trainer *t, const char *resume)
{
	char path[1100] = "", err[1024];
	if (resume && !strcmp(resume, "latest")) {
		if (resume_latest(t, path, sizeof(path)))
			return -1;
		if (!path[0])
			TRAINER_LOG(t, "resume: no checkpoint in %s yet, starting fresh\n", t->cfg.checkpoint.dir);
	} else if (resume) {
		snprintf(path, sizeof(path), "%s", resume);
		enum load_result res = load_from(t, path, 1, err, sizeof(err));
		if (res == LOAD_DEFECT)
			fprintf(stderr, "%s: %s\n", t->who, err);
		if (res != LOAD_OK)
			return -1;
	}
	if (path[0]) {
		t->resumed = 1;
		TRAINER_LOG(t, "resumed from %s at step %lld (%lld tokens seen)\n", path, (long long)t->st.step,
		    (long long)t->st.tokens_seen);
	} else if (t->lora) {
		lora_init_weights(t->lora, (uint64_t)t->cfg.train.seed);  /* the base was loaded before */
		t->st.data_seed = (uint64_t)t->cfg.train.seed;
		snprintf(path, sizeof(path), "%s", t->cfg.lora.base);
	} else if (t->cfg.train.init_checkpoint[0]) {
		snprintf(path, sizeof(path), "%s", t->cfg.train.init_checkpoint);
		enum load_result res = load_from(t, path, 0, err, sizeof(err));
		if (res == LOAD_DEFECT)
			fprintf(stderr, "%s: %s\n", t->who, err);
		if (res != LOAD_OK)
			return -1;
		t->st.data_seed = (uint64_t)t->cfg.train.seed;
		TRAINER_LOG(t, "initialised from %s (weights only, fresh optimizer)\n", path);
	} else {
		model_init_weights(t->m, (uint64_t)t->cfg.train.seed);
		t->st.data_seed = (uint64_t)t->cfg.train.seed;
		return 0;
	}
	snprintf(t->restored_from, sizeof(t->restored_from), "%s", path);
	return 0;
}


/*
 * The metrics file.  A resumed run drops the lines past the resumed step (written by the run that was
 * stopped after its last checkpoint), so the file reads as one uninterrupted run.
 */
static FILE *open_metrics(const char *who, const char *path, int resumed, int64_t step)
{
	if (!path[0])
		return NULL;
	char dir[1100];
	snprintf(dir, sizeof(dir), "%s", path);
	char *slash = strrchr(dir, '/');
	if (slash && slash != dir) {
		*slash = 0;
		if (trainer_make_dirs(dir))
			fprintf(stderr, "%s: cannot create %s: %s\n", who, dir, strerror(errno));
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
		fprintf(stderr, "%s: cannot open log.metrics %s: %s\n", who, path, strerror(errno));
	return f;
}


/*
 * LoRA: the base's weights from its checkpoint (its checksum recorded in the config the checkpoints
 * carry), the adapters attached and the base frozen.  The memory a full fine-tune would spend on
 * gradients and AdamW moments, against the adapters', is logged.
 */
static int lora_setup(struct trainer *t)
{
	char err[1024];
	struct lora_config *lc = &t->cfg.lora;
	snprintf(lc->base, sizeof(lc->base), "%s", lora_base_path(&t->cfg));
	if (lora_file_checksum(lc->base, lc->base_checksum, err, sizeof(err))) {
		fprintf(stderr, "%s: %s\n", t->who, err);
		return -1;
	}
	enum load_result res = load_from(t, lc->base, 0, err, sizeof(err));
	if (res == LOAD_DEFECT)
		fprintf(stderr, "%s: lora base: %s\n", t->who, err);
	if (res != LOAD_OK)
		return -1;
	size_t base_floats = t->m->n_weights;
	t->lora = lora_attach(t->m, lc, (uint64_t)t->cfg.train.seed, 1, err, sizeof(err));
	if (!t->lora) {
		fprintf(stderr, "%s: %s\n", t->who, err);
		return -1;
	}
	size_t ad = lora_trainable_floats(t->lora);
	double full = 3.0 * 4 * base_floats, mine = 3.0 * 4 * ad;  /* gradient + 2 AdamW moments, fp32 */
	TRAINER_LOG(t, "lora: rank %d, alpha %g, %d adapted matrices, %zu trainable parameters (%.3f%% of "
		    "%zu, this rank); gradient + AdamW state %.2f MiB instead of %.2f MiB (%.2f MiB saved)\n",
		    lc->rank, lc->alpha, t->lora->n, ad, 100.0 * ad / base_floats, base_floats,
		    mine / 1048576.0, full / 1048576.0, (full - mine) / 1048576.0);
	return 0;
}

int trainer_init(struct trainer *t, const char *who, const struct run_config *cfg, const char *resume,
		 const struct dist *d, int total_updates)
{
	char err[1024];
	const struct train_config *tc = &cfg->train;
	t->who = who;
	t->cfg = *cfg;
	t->d = d;
	t->rank = d ? d->rank : 0;
	t->world = d ? d->world : 1;
	int E = cfg->model.n_routed_experts, ep = d ? d->ep : 1, ep_rank = d ? d->ep_rank : 0;
	t->m = model_create(&cfg->model, ep_rank * (E / ep), (ep_rank + 1) * (E / ep), err, sizeof(err));
	if (!t->m) {
		fprintf(stderr, "%s: %s\n", who, err);
		return -1;
	}
	if (d && ep > 1)
		t->m->ep_group = d->ep_g;
	if (cfg->lora.rank > 0 && lora_setup(t))
		return -1;
	if (grad_sync_init(&t->sync, trainer_trained(t))) {
		fprintf(stderr, "%s: out of memory for the gradient buffers\n", who);
		return -1;
	}
	if (adamw_init(&t->opt, trainer_trained(t)->n_weights) || build_segments(t)) {
		fprintf(stderr, "%s: out of memory for the optimizer state\n", who);
		return -1;
	}
	if (lr_schedule_parse(tc->schedule, &t->sched.kind)) {
		fprintf(stderr, "%s: train.schedule: unknown schedule '%s'\n", who, tc->schedule);
		return -1;
	}
	t->sched.lr = tc->lr;
	t->sched.min_lr = tc->min_lr;
	t->sched.decay_frac = tc->decay_frac;
	t->sched.warmup_steps = tc->warmup_steps;
	t->sched.total_steps = total_updates;
	if (restore(t, resume))
		return -1;
	if (cfg->parallel.zero) {
		t->zero = 1;
		if (zero_init(&t->z, t->m, d, (float)tc->weight_decay, tc->decay_embeddings)) {
			fprintf(stderr, "%s: out of memory for the sharded optimizer\n", who);
			return -1;
		}
		zero_scatter_state(&t->z, t->m, &t->opt);
		adamw_free(&t->opt);
	}
	t->step_load = calloc((size_t)mc_n_layers(&cfg->model) * (cfg->model.n_routed_experts + 1),
			      sizeof(int64_t));
	if (!t->step_load)
		return -1;
	if (t->rank == 0) {
		t->metrics = open_metrics(who, cfg->log.metrics, t->st.step > 0, t->st.step);
		if (cfg->log.metrics[0] && !t->metrics)
			return -1;
	}
	return 0;
}

static void gpu_stop(struct trainer *t);

void trainer_free(struct trainer *t)
{
	gpu_stop(t);
	if (t->metrics)
		fclose(t->metrics);
	free(t->step_load);
	grad_sync_free(&t->sync);
	if (t->zero)
		zero_free(&t->z);
	free(t->segs);
	adamw_free(&t->opt);
	model_free(t->m);
	lora_free(t->lora);
}

/* ---------------------------------------------------------------- one update */

void trainer_add_loads(struct trainer *t)
{
	const struct model_config *c = &t->m->cfg;
	size_t n = (size_t)mc_n_layers(c) * c->n_routed_experts;
	for (size_t i = 0; i < n; i++)
		t->step_load[i] += t->m->expert_load[i];
}


void trainer_clear_loads(struct trainer *t)
{
	const struct model_config *c = &t->m->cfg;
	memset(t->step_load, 0, sizeof(int64_t) * mc_n_layers(c) * c->n_routed_experts);
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
	for (int l = 0; l < mc_n_layers(c); l++) {  /* the MTP depths' MoE layers too */
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


/* ---------------------------------------------------------------- the GPU */

#ifdef MOE_HAVE_CUDA
/* the routing biases, changed on the host by update_routing_bias, to the device arena */
static void upload_routing_bias(struct trainer *t)
{
	const struct moe_model *m = t->m;
	float *dw = gpu_model_weights(t->gpu);
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		if (p->kind == PARAM_BUFFER)
			moe_cuda_memcpy_h2d(dw + p->offset, m->weights + p->offset, sizeof(float) * p->numel);
	}
}

/* the step's expert loads summed over the world: the bias update sees the global loads (as on the CPU) */
static void reduce_step_loads(struct trainer *t)
{
	if (!t->d || t->world == 1)
		return;
	int64_t n = (int64_t)mc_n_layers(&t->m->cfg) * t->m->cfg.n_routed_experts;
	if (comm_allreduce(t->d->world_g, t->step_load, n, COMM_I64, COMM_SUM))
		comm_abort(1, "all-reduce of the step's expert loads failed");
}

/* The gradients reduced over the ranks on the device (ZeRO: reduce-scattered), the global norm. */
static double gpu_reduce(struct trainer *t)
{
	float *dg = gpu_model_grads(t->gpu);
	if (t->zero)
		return zero_device_reduce(&t->z, t->m, dg);
	if (t->d && t->world > 1)
		return grad_sync_reduce_device(&t->sync, t->m, dg, t->d);
	return grad_global_norm_cuda(dg, t->m->n_weights);
}

static void gpu_update(struct trainer *t, double lr, double loss, struct update_result *u)
{
	const struct train_config *tc = &t->cfg.train;
	u->grad_norm = gpu_reduce(t);
	reduce_step_loads(t);
	if (!isfinite(loss) || !isfinite(u->grad_norm)) {
		u->skipped = 1;
		gpu_model_download_grads(t->gpu);
		u->bad = first_nonfinite_grad(t->m);
		return;
	}
	struct adamw_hparams h = { (float)lr, (float)tc->beta1, (float)tc->beta2, (float)tc->eps };
	float f = tc->grad_clip > 0 && u->grad_norm > tc->grad_clip ? (float)(tc->grad_clip / u->grad_norm) : 1.0f;
	if (t->zero) {
		zero_device_update(&t->z, t->m, gpu_model_weights(t->gpu), f, &h);
		gpu_model_refresh_bf16(t->gpu);
	} else {
		adamw_cuda_update(t->gopt, gpu_model_weights(t->gpu), gpu_model_grads(t->gpu), &h, f,
				  gpu_model_weights_bf16(t->gpu));
	}
	update_routing_bias(t);
	upload_routing_bias(t);
}

/* the device's weights and AdamW state into m->weights and opt (ZeRO: the shard, z.opt) for a checkpoint */
static void gpu_download(struct trainer *t)
{
	gpu_model_download_weights(t->gpu);
	if (t->zero)
		zero_device_download_state(&t->z);
	else
		adamw_cuda_download_state(t->gopt, &t->opt);
}

/* host, rank, (dp, ep) and the GPU: one line per rank, so a wrong placement shows at start */
static void log_placement(const struct trainer *t, int dev)
{
	char host[64] = "", name[96], pci[32];
	gethostname(host, sizeof(host) - 1);
	moe_cuda_describe(name, sizeof(name), pci, sizeof(pci));
	printf("%s: rank %d/%d on %s: (dp %d, ep %d), GPU %d: %s (PCI %s)\n", t->who, t->rank, t->world, host,
	       t->d ? t->d->dp_rank : 0, t->d ? t->d->ep_rank : 0, dev, name, pci);
	fflush(stdout);
}

/* train.attention: cuDNN's graphs or our kernel, for the training shape; the choice logged by rank 0 */
static int gpu_attention_start(struct trainer *t)
{
	const struct model_config *c = &t->m->cfg;
	char msg[1024];
	int ok = attention_cuda_configure(t->cfg.train.attention, t->cfg.train.micro_batch, t->cfg.train.seq_len,
					  c->num_attention_heads, c->qk_nope_head_dim + c->qk_rope_head_dim,
					  c->v_head_dim, msg, sizeof(msg)) == 0;

	if (!trainer_all_ok(t, ok)) {
		if (!ok)
			fprintf(stderr, "%s: %s\n", t->who, msg);
		return -1;
	}
	if (t->rank == 0) {
		printf("%s: %s\n", t->who, msg);
		fflush(stdout);
	}
	return 0;
}

/* how the data-parallel gradients travel (rank 0, multi-rank runs only) */
static void log_buckets(const struct trainer *t)
{
	const struct grad_sync *s = &t->sync;
	if (t->rank != 0 || !t->d || t->world == 1 || t->zero)
		return;
	if (t->d->ep > 1 || !s->n_buckets)
		printf("%s: gradients: 2 buckets reduced after the backward (%s)\n", t->who,
		       t->d->ep > 1 ? "expert parallelism: its all-to-alls share the backward's stream"
				    : "this model's parameter order has no bucket plan");
	else
		printf("%s: gradients: %d buckets of about %g MiB (parallel.bucket_mb), %s\n", t->who, s->n_buckets,
		       t->cfg.parallel.bucket_mb, dcomm_overlaps() ? "reduced beside the backward (NCCL, a second "
		       "stream)" : "each reduced once its layers are done (host-staged MPI: not overlapped)");
	fflush(stdout);
}

static int gpu_start(struct trainer *t)
{
	char err[512];
	int dev = moe_cuda_device_for_rank(t->d ? t->d->local_rank : 0);
	if (!trainer_all_ok(t, dev >= 0 && moe_cuda_init(dev) == 0)) {
		fprintf(stderr, "%s: train.device: the CUDA device could not be initialised on every rank\n",
			t->who);
		return -1;
	}
	log_placement(t, dev);
	if (dcomm_init(t->d, t->cfg.parallel.comm, err, sizeof(err))) {
		fprintf(stderr, "%s: %s\n", t->who, err);
		return -1;
	}
	/* bf16 matmuls with fp32 master weights, gradients and AdamW state */
	t->gpu = gpu_model_create(t->m, 1, err, sizeof(err));
	if (!trainer_all_ok(t, t->gpu != NULL)) {
		if (!t->gpu)
			fprintf(stderr, "%s: train.device=cuda: %s\n", t->who, err);
		return -1;
	}
	if (gpu_attention_start(t))
		return -1;
	int ok;
	if (t->zero) {
		ok = zero_device_init(&t->z) == 0;
	} else {
		t->gopt = calloc(1, sizeof(*t->gopt));
		ok = t->gopt && adamw_cuda_init(t->gopt, t->m->n_weights, t->segs, t->nsegs) == 0;
		if (ok)
			adamw_cuda_upload_state(t->gopt, &t->opt);
	}
	if (!t->zero)
		ok = ok && grad_bucket_plan(&t->sync, t->m, t->cfg.parallel.bucket_mb) == 0;
	if (!trainer_all_ok(t, ok)) {
		fprintf(stderr, "%s: out of memory for the GPU optimizer state\n", t->who);
		return -1;
	}
	log_buckets(t);
	t->cuda = 1;
	return 0;
}

static void gpu_stop(struct trainer *t)
{
	if (t->gopt)
		adamw_cuda_free(t->gopt);
	free(t->gopt);
	if (t->zero)
		zero_device_free(&t->z);
	gpu_model_free(t->gpu);
	if (t->gpu)
		attention_cuda_release();
	if (t->cuda)
		dcomm_free(t->d);
	t->gopt = NULL;
	t->gpu = NULL;
	t->cuda = 0;
}

static int cuda_devices(void)
{
	return moe_cuda_device_count();
}
#else
static void gpu_update(struct trainer *t, double lr, double loss, struct update_result *u)
{
	(void)t, (void)lr, (void)loss, (void)u;
}

static void gpu_download(struct trainer *t)
{
	(void)t;
}

static int gpu_start(struct trainer *t)
{
	(void)t;
	return -1;
}

static void gpu_stop(struct trainer *t)
{
	(void)t;
}

static int cuda_devices(void)
{
	return 0;
}
#endif

int trainer_setup_device(struct trainer *t, int gpu_capable)
{
	const char *dev = t->cfg.train.device;
	int forced = strcmp(dev, "cuda") == 0;
	int n = strcmp(dev, "cpu") == 0 ? 0 : cuda_devices();  /* "cpu": not even a probe */
	const char *why = NULL;

	if (t->cfg.model.num_nextn_predict_layers > 0)
		why = "model.num_nextn_predict_layers > 0: multi-token prediction runs on the CPU path for now";
	else if (n == 0)
		why = "no CUDA device found (or a build without the CUDA backend)";
	else if (!gpu_capable)
		why = "this command runs on the CPU for now";
	else if (t->lora)
		why = "LoRA runs on the CPU for now (model/cuda has no adapters)";
	else if (gpu_capable == TRAINER_GPU_WHEN_ASKED && !forced)
		why = "this command uses the GPU only with train.device=cuda for now";
	else if (t->world > 1 && gpu_capable == TRAINER_GPU_WHEN_ASKED)
		why = "this command's GPU path runs one process for now";
	/* every rank takes the same path, or the collectives of the two would never meet */
	if (!trainer_all_ok(t, why == NULL) && !why)
		why = "another rank cannot use its GPU";
	if (why && forced) {
		fprintf(stderr, "%s: train.device=cuda: %s\n", t->who, why);
		return -1;
	}
	if (why) {
		if (n > 0)
			TRAINER_LOG(t, "%s: running on the CPU: %s\n", t->who, why);
		return 0;
	}
	if (gpu_start(t))
		return -1;
	TRAINER_LOG(t, "%s: running on the GPU (bf16 matmuls, fp32 master weights and AdamW state%s)\n", t->who,
		    t->zero ? ", sharded (ZeRO-1)" : "");
	return 0;
}

void trainer_next_forward(struct trainer *t)
{
	if (t->lora) {
		t->lora->dropout_step = (uint64_t)t->st.step * 4096 + (uint64_t)t->forwards++;
	}
}

float trainer_forward(struct trainer *t, const int *inputs, const int *targets, int B, int T)
{
	trainer_next_forward(t);
#ifdef MOE_HAVE_CUDA
	if (t->cuda)
		return gpu_model_forward(t->gpu, inputs, targets, B, T);
#endif
	return model_forward(t->m, inputs, targets, B, T);
}

#ifdef MOE_HAVE_CUDA
static void grads_ready(void *ctx, int layer)
{
	grad_sync_layer_done(ctx, layer);
}

/* The last micro-batch's backward (the grad_accum-th since trainer_zero_grad) reduces its buckets as it
 * goes; the earlier ones only accumulate. */
static void gpu_backward(struct trainer *t, float loss_scale)
{
	int last = ++t->backwards == t->cfg.train.grad_accum;
	int armed = last && !t->zero &&
		    grad_sync_overlap_arm(&t->sync, t->m, gpu_model_grads(t->gpu), t->d) == 0;
	if (armed)
		gpu_model_on_grads_ready(t->gpu, grads_ready, &t->sync);
	gpu_model_backward(t->gpu, loss_scale);
	if (armed)
		gpu_model_on_grads_ready(t->gpu, NULL, NULL);
}
#endif

void trainer_backward(struct trainer *t, float loss_scale)
{
#ifdef MOE_HAVE_CUDA
	if (t->cuda) {
		gpu_backward(t, loss_scale);
		return;
	}
#endif
	model_backward(t->m, loss_scale);
}

const float *trainer_token_losses(struct trainer *t)
{
#ifdef MOE_HAVE_CUDA
	if (t->cuda)
		return gpu_model_token_losses(t->gpu);
#endif
	return model_token_losses(t->m);
}

void trainer_weights_to_host(struct trainer *t)
{
#ifdef MOE_HAVE_CUDA
	if (t->cuda)
		gpu_model_download_weights(t->gpu);
#else
	(void)t;
#endif
}

void trainer_zero_grad(struct trainer *t)
{
	t->backwards = 0;
	if (t->lora)  /* a training step begins: dropout on until its update (evaluations run without) */
		t->lora->training = true;
#ifdef MOE_HAVE_CUDA
	if (t->cuda) {
		gpu_model_zero_grad(t->gpu);
		return;
	}
#endif
	model_zero_grad(t->m);
}


void trainer_update(struct trainer *t, double lr, double loss, struct update_result *u)
{
	const struct train_config *tc = &t->cfg.train;
	memset(u, 0, sizeof(*u));
	if (t->cuda) {
		gpu_update(t, lr, loss, u);
		return;
	}
	struct moe_model *tm = trainer_trained(t);
	t->forwards = 0;
	if (t->lora)
		t->lora->training = false;
	u->grad_norm = t->zero ? zero_reduce(&t->z, t->m) : grad_sync_reduce(&t->sync, tm, t->d);
	if (t->d && t->world > 1) {
		int64_t n = (int64_t)mc_n_layers(&t->m->cfg) * t->m->cfg.n_routed_experts;
		if (comm_allreduce(t->d->world_g, t->step_load, n, COMM_I64, COMM_SUM))
			comm_abort(1, "all-reduce of the step's expert loads failed");
	}
	if (!isfinite(loss) || !isfinite(u->grad_norm)) {
		u->skipped = 1;
		u->bad = first_nonfinite_grad(tm);
		return;
	}
	struct adamw_hparams h = { (float)lr, (float)tc->beta1, (float)tc->beta2, (float)tc->eps };
	if (t->zero) {
		float f = tc->grad_clip > 0 && u->grad_norm > tc->grad_clip ?
			  (float)(tc->grad_clip / u->grad_norm) : 1.0f;
		zero_update(&t->z, t->m, f, &h);
	} else {
		grad_clip(tm->grads, tm->n_weights, u->grad_norm, tc->grad_clip);
		adamw_update(&t->opt, tm->weights, tm->grads, t->segs, t->nsegs, &h);
	}
	if (!t->lora)  /* the base, routing biases included, stays as it was */
		update_routing_bias(t);
}

/* ---------------------------------------------------------------- logging, checkpoints */

/* max expert load / mean load of each MoE layer over the step */
void trainer_write_imbalance(const struct trainer *t, FILE *f)
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


int trainer_save(struct trainer *t)
{
	char path[1100], err[1024] = "";
	const char *dir = t->cfg.checkpoint.dir;
	int ok = 1;
	if (t->rank == 0 && trainer_make_dirs(dir)) {
		snprintf(err, sizeof(err), "checkpoint.dir %s: %s", dir, strerror(errno));
		ok = 0;
	}
	if (!trainer_all_ok(t, ok))
		goto fail;
	checkpoint_path(path, sizeof(path), dir, t->st.step);
	if (t->cuda)
		gpu_download(t);
	/* ZeRO: the file holds the whole AdamW state, gathered for the write */
	if (t->zero && (adamw_init(&t->opt, t->m->n_weights) || zero_gather_state(&t->z, t->m, &t->opt)))
		comm_abort(1, "out of memory gathering the optimizer state");
	ok = !checkpoint_save_dist(path, trainer_trained(t), &t->opt, &t->cfg, &t->st, t->d, err, sizeof(err));
	if (t->zero)
		adamw_free(&t->opt);
	if (!ok)
		goto fail;
	/* the files of later steps (damaged ones a resume skipped) are not counted */
	ok = t->rank != 0 ||
	     !checkpoint_prune(dir, t->cfg.checkpoint.keep, t->st.step, err, sizeof(err));
	if (!trainer_all_ok(t, ok))
		goto fail;
	TRAINER_LOG(t, "saved %s\n", path);
	return 0;
fail:
	if (err[0])
		fprintf(stderr, "%s: %s\n", t->who, err);
	/* the writer removed its temporary file; what was committed before is untouched */
	if (t->rank == 0)
		fprintf(stderr, "%s: stopping: the checkpoint of step %lld was not written; the earlier "
			"ones in %s are kept\n", t->who, (long long)t->st.step, dir);
	return -1;
}

int trainer_after_step(struct trainer *t)
{
	const struct train_config *tc = &t->cfg.train;
	int every = t->cfg.checkpoint.every, last = t->st.step == tc->steps;
	int signalled = trainer_signalled(t);
	int stop = signalled || (tc->stop_at > 0 && t->st.step == tc->stop_at);
	if ((every > 0 && t->st.step % every == 0) || last || stop)
		if (trainer_save(t))
			return -1;
	if (stop && !last)
		TRAINER_LOG(t, "stopped at step %lld (%s); continue with --resume latest\n",
			    (long long)t->st.step, signalled ? "signal" : "train.stop_at");
	return stop || last;
}
