/*
 * rl/grpo.c - `moe grpo`: the GRPO loop (see grpo.h for the objective).
 *
 * Layout of a step's P*G completions over W ranks: the batch is cut into minibatches of
 * M = W * micro_batch * grad_accum completions, one optimizer update each; rank r computes completions
 * [b*M + r*mb*ga, b*M + (r+1)*mb*ga) of minibatch b, which it samples, scores and trains on.  Completion
 * j belongs to prompt j / G.  Rewards, lengths and truncation are gathered to every rank, so a group is
 * normalised as a whole even when it spans ranks, and every loss normaliser is global: each (dp, ep)
 * layout makes the same update.  Completion j samples from its own stream seeded by (train.seed, step, j),
 * and the prompts of a step come from a per-epoch permutation of the prompt set: both depend on the step
 * only, so a resumed run continues exactly.
 */
#define _POSIX_C_SOURCE 200809L

#include "rl/grpo.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/tokenizer.h"
#include "launch/rng.h"
#include "model/decode.h"
#include "model/model.h"
#include "model/lora.h"
#include "model/quant.h"
#include "rl/generate.h"
#include "rl/prompts.h"
#include "rl/reward.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

#ifdef MOE_HAVE_CUDA
#include "model/cuda/decode_cuda.h"
#include "model/cuda/model_cuda.h"
#endif

struct grpo {
	struct trainer t;
	struct moe_model *ref;        /* frozen reference (beta > 0) */
	int ref_is_base;              /* LoRA: ref is the policy's own model, run with its adapters off */
	struct prompt_set ps;
	int *perm;                    /* [ps.n] the prompt order of epoch perm_epoch */
	uint64_t perm_epoch;
	int **prompt_ids, *prompt_len;/* [ps.n] the prompts' tokens */
	struct tokenizer *tok;
	int eos;
	int R;                        /* reward programs: grpo.rewards, or the one grpo.reward_cmd */
	struct reward_proc *rproc[CFG_MAX_REWARDS];
	const char *rname[CFG_MAX_REWARDS];
	double rweight[CFG_MAX_REWARDS];
	struct grpo_loss_params lp;
	enum grpo_scale scale;
	enum grpo_reward_norm norm;
	struct model_quant *rollout_q;/* grpo.rollout_weights=int8: what sampling reads, refreshed each step */
	int rollout_cuda;             /* sampling on the GPU, from the training weights in place */
	struct gpu_decoder *dec;      /* its device latent cache (kept across steps) */
	struct gpu_model *ref_gpu;    /* the reference's device copy (updates on the GPU, beta > 0) */
	enum grpo_loss_type loss_type;
	int P, G, W, mb, ga, nmb, M;  /* prompts, group, ranks, micro-batch, accumulation, minibatches, M */
	int n_local;                  /* completions of this rank per step: nmb * mb * ga */
	int max_new, max_prompt;
	int updates_per_step;
	double step_time_avg;

	/* this step's completions, local index k (see local_to_global) */
	int *tokens, *len;            /* [n_local][max_new], [n_local] */
	float *old_logp, *ref_logp;   /* [n_local][max_new] */
	int *routes;                  /* [n_local][L][max_prompt + max_new][K] (routing replay) */
	double *reward;               /* [P*G] the weighted total, every rank's, global order */
	double *rewards;              /* [R][P*G] each program's, every rank's, global order */
	int *glen, *gtrunc;           /* [P*G] */
	float *adv;                   /* [P*G] */
	double *coef;                 /* [P*G] */
	/* a micro-batch */
	int *inputs, *targets, *replay;
	float *weights, *dlogp;
};

/* ---------------------------------------------------------------- layout and order */

static int local_to_global(const struct grpo *g, int rank, int k)
{
	int per = g->mb * g->ga, b = k / per;
	return b * g->M + rank * per + k % per;
}

static uint64_t mix3(uint64_t a, uint64_t b, uint64_t c)
{
	uint64_t s = a ^ 0x6a09e667f3bcc909ULL;
	uint64_t x = splitmix64(&s) ^ b;
	s = x;
	x = splitmix64(&s) ^ c;
	s = x;
	return splitmix64(&s);
}

/*
 * The prompt at stream position pos: epoch pos / n is a permutation seeded by (seed, epoch), built once
 * per epoch (a step asks for every one of its completions' prompts, several times).
 */
static int prompt_at(struct grpo *g, uint64_t pos)
{
	int n = g->ps.n;
	uint64_t epoch = pos / (uint64_t)n;
	if (!g->perm || g->perm_epoch != epoch) {
		struct gen_rng rng;
		if (!g->perm && !(g->perm = malloc(sizeof(int) * (size_t)n)))
			comm_abort(1, "out of memory");
		gen_rng_seed(&rng, mix3((uint64_t)g->t.cfg.train.seed, 0x70726f6d7074ULL, epoch));
		for (int i = 0; i < n; i++)
			g->perm[i] = i;
		for (int i = n - 1; i > 0; i--) {  /* Fisher-Yates */
			int j = (int)(gen_rng_next(&rng) % (uint64_t)(i + 1)), tmp = g->perm[i];
			g->perm[i] = g->perm[j];
			g->perm[j] = tmp;
		}
		g->perm_epoch = epoch;
	}
	return g->perm[pos % (uint64_t)n];
}

/* ---------------------------------------------------------------- setup */

#define FAIL(...) do { fprintf(stderr, "moe grpo: " __VA_ARGS__); fprintf(stderr, "\n"); return -1; } while (0)

static int check_layout(struct grpo *g, int eval)
{
	const struct run_config *c = &g->t.cfg;
	g->P = c->grpo.prompts_per_step;
	g->G = c->grpo.group_size;
	g->W = g->t.world;
	g->mb = c->train.micro_batch;
	g->ga = c->train.grad_accum;
	g->M = g->W * g->mb * g->ga;
	/* GRPO's loss has no KL-to-teacher term: a distill section would be silently ignored */
	if (c->distill.teacher[0])
		FAIL("distill.teacher is set (%s): distillation is an objective of moe train, not of moe grpo; "
		     "remove the distill section", c->distill.teacher);
	if (eval) {  /* evaluation does not use the training batch: any rank count */
		g->P = g->M;
		g->G = 1;
	}
	if ((g->P * g->G) % g->M)
		FAIL("grpo.prompts_per_step (%d) x grpo.group_size (%d) = %d completions must be a multiple of "
		     "ranks (%d) x train.micro_batch (%d) x train.grad_accum (%d) = %d, the completions of one "
		     "optimizer update", g->P, g->G, g->P * g->G, g->W, g->mb, g->ga, g->M);
	g->nmb = g->P * g->G / g->M;
	g->n_local = g->nmb * g->mb * g->ga;
	g->max_new = c->grpo.max_new_tokens;
	g->updates_per_step = c->grpo.num_iterations * g->nmb;
	g->lp.epsilon = (float)c->grpo.epsilon;
	g->lp.epsilon_high = (float)c->grpo.epsilon_high;
	g->lp.beta = (float)c->grpo.beta;
	g->lp.sequence_ratio = c->grpo.sequence_ratio;
	g->scale = grpo_scale_from_name(c->grpo.scale_rewards);
	g->norm = grpo_reward_norm_from_name(c->grpo.reward_norm);
	g->loss_type = grpo_loss_type_from_name(c->grpo.loss_type);
	return 0;
}

static int load_prompts(struct grpo *g)
{
	const struct grpo_config *gc = &g->t.cfg.grpo;
	char err[1024];
	if (!gc->tokenizer[0])
		FAIL("grpo.tokenizer: no tokenizer given (the prompts are text)");
	if (!gc->prompts[0])
		FAIL("grpo.prompts: no prompt set given (JSON Lines with a \"prompt\" per line)");
	g->tok = tokenizer_load(gc->tokenizer, err, sizeof(err));
	if (!g->tok)
		FAIL("grpo.tokenizer: %s", err);
	if (tokenizer_vocab_size(g->tok) > g->t.cfg.model.vocab_size)
		FAIL("grpo.tokenizer %s has %d tokens, more than model.vocab_size = %d", gc->tokenizer,
		     tokenizer_vocab_size(g->tok), g->t.cfg.model.vocab_size);
	g->eos = tokenizer_eot_id(g->tok);
	if (prompt_set_load(&g->ps, gc->prompts, err, sizeof(err)))
		FAIL("grpo.prompts: %s", err);
	g->prompt_ids = calloc((size_t)g->ps.n, sizeof(int *));
	g->prompt_len = calloc((size_t)g->ps.n, sizeof(int));
	if (!g->prompt_ids || !g->prompt_len)
		FAIL("out of memory for the prompts");
	for (int i = 0; i < g->ps.n; i++) {
		struct tok_ids ids = { 0 };
		tokenizer_encode(g->tok, g->ps.text[i], strlen(g->ps.text[i]), &ids);
		if (!ids.n)
			FAIL("%s:%d: the prompt encodes to no tokens", gc->prompts, g->ps.line[i]);
		g->prompt_ids[i] = malloc(sizeof(int) * ids.n);
		if (!g->prompt_ids[i])
			FAIL("out of memory for the prompts");
		for (size_t k = 0; k < ids.n; k++)
			g->prompt_ids[i][k] = (int)ids.v[k];
		g->prompt_len[i] = (int)ids.n;
		if ((int)ids.n > g->max_prompt)
			g->max_prompt = (int)ids.n;
		tok_ids_free(&ids);
	}
	return 0;
}

/*
 * A checksum of the reference weights that does not depend on the layout: the replicated tensors
 * hashed whole, each expert's slice hashed with its index (32 bits each, summed over the ep group).
 */
static uint64_t fnv1a(const void *p, size_t n, uint64_t h)
{
	const unsigned char *b = p;
	for (size_t i = 0; i < n; i++)
		h = (h ^ b[i]) * 0x100000001b3ULL;
	return h;
}

static uint64_t weights_checksum(const struct moe_model *m)
{
	uint64_t rep = 0xcbf29ce484222325ULL;
	int64_t experts = 0;
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		const float *w = m->weights + p->offset;
		if (!p->expert_stacked) {
			rep = fnv1a(w, sizeof(float) * p->numel, fnv1a(p->name, strlen(p->name), rep));
			continue;
		}
		int El = m->expert_end - m->expert_begin;
		size_t per = p->numel / (size_t)(El > 0 ? El : 1);
		for (int e = 0; e < El; e++) {
			uint64_t h = fnv1a(p->name, strlen(p->name), 0xcbf29ce484222325ULL);
			int idx = m->expert_begin + e;
			h = fnv1a(&idx, sizeof(idx), h);
			experts += (int64_t)(fnv1a(w + per * e, sizeof(float) * per, h) >> 32);
		}
	}
	if (m->ep_group && comm_allreduce(m->ep_group, &experts, 1, COMM_I64, COMM_SUM))
		comm_abort(1, "all-reduce of the reference checksum failed");
	return (rep ^ (uint64_t)experts) | 1;  /* never 0: 0 means no reference */
}

/* The reference is the starting policy: train.init_checkpoint, else the seed's initialisation. */
static int load_reference(struct grpo *g)
{
	const struct run_config *c = &g->t.cfg;
	const struct moe_model *m = g->t.m;
	char err[1024];
	if (g->lp.beta <= 0)
		return 0;
	if (g->t.lora) {  /* the frozen base is the reference: no second copy of the weights */
		g->ref = g->t.m;
		g->ref_is_base = 1;
		return 0;
	}
	g->ref = model_create(&m->cfg, m->expert_begin, m->expert_end, err, sizeof(err));
	if (!g->ref)
		FAIL("the reference model: %s", err);
	g->ref->ep_group = m->ep_group;
	if (c->train.init_checkpoint[0]) {
		if (checkpoint_load_model(c->train.init_checkpoint, g->ref, err, sizeof(err)))
			FAIL("the reference (train.init_checkpoint): %s", err);
	} else {
		model_init_weights(g->ref, (uint64_t)c->train.seed);
	}
	return 0;
}

static int check_reference(struct grpo *g)
{
	if (!g->ref)
		return 0;  /* no reference loaded: a later resume with beta > 0 still checks */
	uint64_t sum = weights_checksum(g->ref);
	if (!g->t.resumed || !g->t.st.ref_checksum) {
		g->t.st.ref_checksum = sum;
		return 0;
	}
	if (sum != g->t.st.ref_checksum)
		FAIL("the reference weights (train.init_checkpoint = '%s') are not those this run started from "
		     "(checksum %016llx, the checkpoint says %016llx)", g->t.cfg.train.init_checkpoint,
		     (unsigned long long)sum, (unsigned long long)g->t.st.ref_checksum);
	return 0;
}

/* Starts one program: argv of argc strings; key names it in messages (the config key). */
static int start_program(struct grpo *g, const char *key, const char *name, const char (*cmd)[CFG_STR],
			 int argc, double timeout_s)
{
	char err[1024], *argv[CFG_MAX_ARGV + 1];
	struct reward_proc *p;

	for (int i = 0; i < argc; i++)
		argv[i] = (char *)cmd[i];
	argv[argc] = NULL;
	p = reward_start(argv, argc, timeout_s, err, sizeof(err));
	if (!p)
		FAIL("%s: %s", key, err);
	if (name)
		reward_set_name(p, name);
	g->rproc[g->R++] = p;
	return 0;
}

/* grpo.rewards, every program started once and kept running; or grpo.reward_cmd, one of weight 1. */
static int start_reward(struct grpo *g)
{
	const struct grpo_config *gc = &g->t.cfg.grpo;
	char key[64];

	if (gc->n_rewards == 0) {
		if (gc->reward_cmd_argc <= 0)
			FAIL("grpo.reward_cmd: no reward program given (an argv list, e.g. [\"python3\", "
			     "\"reward.py\"]; or grpo.rewards, a list of {\"name\", \"cmd\", \"weight\"})");
		g->rname[0] = "reward_cmd";
		g->rweight[0] = 1.0;
		return start_program(g, "grpo.reward_cmd", NULL, gc->reward_cmd, gc->reward_cmd_argc,
				     gc->reward_timeout_s);
	}
	for (int k = 0; k < gc->n_rewards; k++) {
		const struct reward_config *r = &gc->rewards[k];

		snprintf(key, sizeof(key), "grpo.rewards[%d]", k);
		g->rname[k] = r->name;
		g->rweight[k] = r->weight;
		if (start_program(g, key, r->name, r->cmd, r->cmd_argc,
				  r->timeout_s > 0 ? r->timeout_s : gc->reward_timeout_s))
			return -1;
	}
	return 0;
}

static int alloc_buffers(struct grpo *g)
{
	const struct model_config *c = &g->t.m->cfg;
	size_t n = (size_t)g->n_local, T = (size_t)g->max_prompt + g->max_new, PG = (size_t)g->P * g->G;
	size_t L = (size_t)c->num_hidden_layers, K = (size_t)(c->num_experts_per_tok > 0 ?
								c->num_experts_per_tok : 1);
	size_t rows = (size_t)g->mb * T;
	g->tokens = malloc(sizeof(int) * n * g->max_new);
	g->len = malloc(sizeof(int) * n);
	g->old_logp = malloc(sizeof(float) * n * g->max_new);
	g->ref_logp = malloc(sizeof(float) * n * g->max_new);
	g->reward = malloc(sizeof(double) * PG);
	g->rewards = malloc(sizeof(double) * PG * CFG_MAX_REWARDS);
	g->glen = malloc(sizeof(int) * PG);
	g->gtrunc = malloc(sizeof(int) * PG);
	g->adv = malloc(sizeof(float) * PG);
	g->coef = malloc(sizeof(double) * PG);
	g->inputs = malloc(sizeof(int) * rows);
	g->targets = malloc(sizeof(int) * rows);
	g->weights = malloc(sizeof(float) * rows);
	g->dlogp = malloc(sizeof(float) * (size_t)g->max_new);
	if (g->t.cfg.grpo.routing_replay) {
		g->routes = malloc(sizeof(int) * n * L * T * K);
		g->replay = malloc(sizeof(int) * L * rows * K);
		if (!g->routes || !g->replay)
			FAIL("out of memory for the routing replay (%zu MiB)",
			     sizeof(int) * (n + g->mb) * L * T * K >> 20);
	}
	if (!g->tokens || !g->len || !g->old_logp || !g->ref_logp || !g->reward || !g->rewards || !g->glen ||
	    !g->gtrunc || !g->adv || !g->coef || !g->inputs || !g->targets || !g->weights || !g->dlogp)
		FAIL("out of memory for the step's buffers");
	return 0;
}

static int setup(struct grpo *g, const struct run_config *cfg, const char *resume, const struct dist *d,
		 int eval)
{
	struct trainer *t = &g->t;
	int upd = cfg->train.steps * cfg->grpo.num_iterations;
	t->rank = d ? d->rank : 0;
	t->world = d ? d->world : 1;
	t->cfg = *cfg;
	if (check_layout(g, eval))
		return -1;
	t->d = d;
	/* every rank gets to trainer_setup_device, whose collectives must not meet another rank's failure */
	if (!trainer_all_ok(t, trainer_init(t, "moe grpo", cfg, resume, d, upd * g->nmb) == 0))
		return -1;
	/* the balance loss is a pretraining regulariser; here the bias update alone keeps the balance */
	t->m->cfg.aux_loss_alpha = 0;
	t->m->logit_temperature = (float)cfg->grpo.temperature;
	/*
	 * The step may run on the GPU (train.device=cuda; auto keeps the CPU until the GPU path has run on
	 * real hardware: tests/gpu/test_grpo_cuda.sh): the updates, the sampling (below), the reference;
	 * --eval's greedy completions too.
	 */
	if (trainer_setup_device(t, TRAINER_GPU_WHEN_ASKED))
		return -1;
	if (load_prompts(g) || load_reference(g) || check_reference(g) || alloc_buffers(g))
		return -1;
	if (g->ref)
		g->ref->logit_temperature = t->m->logit_temperature;
#ifdef MOE_HAVE_CUDA
	/* the reference's log-probabilities on the device too: a frozen copy, bf16 like the policy */
	char err[256];
	if (g->ref && t->cuda && !(g->ref_gpu = gpu_model_create(g->ref, 1, err, sizeof(err))))
		FAIL("the reference on the GPU: %s", err);
#endif
	if (!strcmp(cfg->grpo.rollout_weights, "int8") && !(g->rollout_q = quant_create(t->m)))
		FAIL("out of memory for the int8 rollout weights (grpo.rollout_weights)");
	/* the updates on the GPU: the rollouts too (int8 rollout weights are a CPU feature) */
	g->rollout_cuda = t->cuda && !g->rollout_q;
	if (g->rollout_cuda && eval)
		TRAINER_LOG(t, "moe grpo: --eval decodes on the GPU (batched latent-cache decode)\n");
	else if (g->rollout_cuda)
		TRAINER_LOG(t, "moe grpo: sampling on the GPU (batched latent-cache decode of the %d completions, "
			    "the training weights in place)\n", g->n_local);
	return start_reward(g);
}

static void teardown(struct grpo *g)
{
	for (int k = 0; k < g->R; k++)
		reward_stop(g->rproc[k]);
	quant_free(g->rollout_q);
#ifdef MOE_HAVE_CUDA
	gpu_decoder_free(g->dec);
	gpu_model_free(g->ref_gpu);
#endif
	for (int i = 0; g->prompt_ids && i < g->ps.n; i++)
		free(g->prompt_ids[i]);
	free(g->prompt_ids);
	free(g->prompt_len);
	free(g->perm);
	prompt_set_free(&g->ps);
	tokenizer_free(g->tok);
	if (!g->ref_is_base)
		model_free(g->ref);
	free(g->tokens);
	free(g->len);
	free(g->old_logp);
	free(g->ref_logp);
	free(g->routes);
	free(g->reward);
	free(g->rewards);
	free(g->glen);
	free(g->gtrunc);
	free(g->adv);
	free(g->coef);
	free(g->inputs);
	free(g->targets);
	free(g->replay);
	free(g->weights);
	free(g->dlogp);
	trainer_free(&g->t);
}

/* ---------------------------------------------------------------- sampling and rewards */

struct step_stats {
	double sample_s, reward_s, train_s;  /* generate, reward, reference + update seconds */
	double reference_s, update_s;     /* train_s's parts: reference (and int8 old) logps, the updates */
	long gen_tokens, train_tokens;    /* global */
	double reward_mean, reward_std;
	/*
	 * |sampling-time - training-time logp| of the same tokens, mean and max: every token (int8
	 * rollouts: the old logps are recomputed), else those of the first minibatch, whose first forward
	 * still sees the sampling-time policy
	 */
	double logp_mismatch, logp_mismatch_max;
	long logp_mismatch_tokens;
	double prog_mean[CFG_MAX_REWARDS], prog_std[CFG_MAX_REWARDS];  /* each program's */
	int zero_std_groups, len_min, len_max, truncated;
	double len_mean;
	struct grpo_stats ls;             /* global, summed over the updates */
	double loss, grad_norm, lr;       /* mean over the updates, last norm and lr */
	int skipped;
	const char *bad;
};

/* The prompt of local completion k at this step. */
static int prompt_of(struct grpo *g, int64_t step, int k)
{
	int j = local_to_global(g, g->t.rank, k);
	return prompt_at(g, (uint64_t)step * g->P + (uint64_t)(j / g->G));
}

static int route_stride(const struct grpo *g)
{
	return g->max_prompt + g->max_new;
}

/* the experts (slot k, position t) went to in layer l while sampling, from the cache that recorded them */
static const int *sampled_route(const struct grpo *g, const struct latent_cache *c, int l, int k, int t)
{
#ifdef MOE_HAVE_CUDA
	if (g->rollout_cuda)
		return gpu_decoder_route(g->dec, l, k, t);
#endif
	(void)g;
	return latent_cache_route(c, l, k, t);
}

/* routes[k][l][t][0..K) = the experts completion k's token t went to in MoE layer l while sampling */
static void copy_routes(struct grpo *g, const struct latent_cache *c, const int *prompt_lens)
{
	const struct model_config *mc = &g->t.m->cfg;
	int L = mc->num_hidden_layers, K = mc->num_experts_per_tok, T = route_stride(g);
	for (int k = 0; k < g->n_local; k++) {
		int n_in = prompt_lens[k] + g->len[k] - 1;   /* the last sampled token was never fed */
		for (int l = 0; l < L; l++) {
			if (!mc_layer_is_moe(mc, l))
				continue;
			int *dst = g->routes + (((size_t)k * L + l) * T) * K;
			for (int t = 0; t < n_in; t++)
				memcpy(dst + (size_t)t * K, sampled_route(g, c, l, k, t), sizeof(int) * K);
		}
	}
}

/*
 * generate_cached with the rollout weights: the policy's fp32 weights, or (grpo.rollout_weights=int8)
 * their int8 copy, re-quantised from the weights as they are now and attached only while sampling.
 */
static int rollout_generate(struct grpo *g, struct latent_cache *cache, const int **prompts, const int *lens,
			    int n, const struct sample_params *sp, const uint64_t *seeds)
{
	struct moe_model *m = g->t.m;
	int rc;

#ifdef MOE_HAVE_CUDA
	if (g->rollout_cuda)
		return generate_cuda(g->t.gpu, m, &g->dec, g->routes != NULL, prompts, lens, n, sp, seeds, g->tokens,
				     g->len, g->old_logp);
#endif
	if (g->rollout_q) {
		quant_update(g->rollout_q, m);
		m->quant = g->rollout_q;
	}
	rc = generate_cached(m, cache, prompts, lens, n, sp, seeds, g->tokens, g->len, g->old_logp);
	m->quant = NULL;
	return rc;
}

/* Sample this rank's completions with the policy as it is now; routes recorded for replay. */
static int sample_completions(struct grpo *g, int64_t step, struct step_stats *ss)
{
	const struct grpo_config *gc = &g->t.cfg.grpo;
	int n = g->n_local, rc = -1;
	const int **prompts = malloc(sizeof(int *) * (size_t)n);
	int *lens = malloc(sizeof(int) * (size_t)n);
	uint64_t *seeds = malloc(sizeof(uint64_t) * (size_t)n);
	/* on the GPU the decoder holds the cache */
	struct latent_cache *cache = g->rollout_cuda ? NULL :
		latent_cache_create(&g->t.m->cfg, n, g->max_prompt + g->max_new);
	double t0 = trainer_now_s();

	if (!prompts || !lens || !seeds || (!cache && !g->rollout_cuda) ||
	    (cache && g->routes && latent_cache_enable_routes(cache, &g->t.m->cfg)))
		goto out;
	for (int k = 0; k < n; k++) {
		int p = prompt_of(g, step, k);
		prompts[k] = g->prompt_ids[p];
		lens[k] = g->prompt_len[p];
		seeds[k] = mix3((uint64_t)g->t.cfg.train.seed, (uint64_t)step,
				(uint64_t)local_to_global(g, g->t.rank, k));
	}
	struct sample_params sp = sample_params_default();
	sp.temperature = (float)gc->temperature;
	sp.top_p = (float)gc->top_p;
	sp.top_k = gc->top_k;
	sp.max_new_tokens = g->max_new;
	sp.eos_id = g->eos;
	if (rollout_generate(g, cache, prompts, lens, n, &sp, seeds))
		goto out;
	if (g->routes)
		copy_routes(g, cache, lens);
	rc = 0;
out:
	latent_cache_free(cache);
	free(prompts);
	free(lens);
	free(seeds);
	ss->sample_s = trainer_now_s() - t0;
	return rc;
}

/*
 * The completion's text for the reward program: its tokens without the final end-of-text; an id the
 * tokenizer lacks (the model's vocabulary may be padded past it) reads as U+FFFD.  Bytes that form no
 * character (a sequence cut between tokens) stay: the reward runner writes them as \ufffd.
 */
static char *completion_text(const struct grpo *g, int k)
{
	static const char replacement[] = "\xef\xbf\xbd";
	const int *o = g->tokens + (size_t)k * g->max_new;
	int n = g->len[k];
	size_t cap = 64, at = 0;
	char *s = malloc(cap);
	if (n > 0 && o[n - 1] == g->eos)
		n--;
	for (int i = 0; s && i < n; i++) {
		const uint8_t *p = (const uint8_t *)replacement;
		size_t len = 3;
		if (o[i] < 0 || tokenizer_token_bytes(g->tok, (uint32_t)o[i], &p, &len)) {
			p = (const uint8_t *)replacement;
			len = 3;
		}
		if (at + len + 1 > cap) {
			char *bigger = realloc(s, cap = 2 * (at + len + 1));
			if (!bigger)
				free(s);
			s = bigger;
			if (!s)
				break;
		}
		memcpy(s + at, p, len);
		at += len;
	}
	if (s)
		s[at] = 0;
	return s;
}

/* Score this rank's completions with every program at once: rewards[r * n_local + k].  On failure err
 * names the program and the record. */
static int score_completions(struct grpo *g, int64_t step, double *rewards, char *err, size_t errlen)
{
	int n = g->n_local, rc = -1;
	struct reward_request *req = calloc((size_t)n, sizeof(*req));
	char **texts = calloc((size_t)n, sizeof(char *));
	if (!req || !texts) {
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	for (int k = 0; k < n; k++) {
		int p = prompt_of(g, step, k);
		texts[k] = completion_text(g, k);
		if (!texts[k]) {
			snprintf(err, errlen, "out of memory");
			goto out;
		}
		req[k].id = step * g->P * g->G + local_to_global(g, g->t.rank, k);
		req[k].record = g->ps.record[p];
		req[k].completion = texts[k];
	}
	double *each[CFG_MAX_REWARDS];
	for (int r = 0; r < g->R; r++)
		each[r] = rewards + (size_t)r * n;
	rc = reward_score_all(g->rproc, g->R, req, n, each, err, errlen);
out:
	for (int k = 0; texts && k < n; k++)
		free(texts[k]);
	free(texts);
	free(req);
	return rc;
}

/* Every rank's rewards (local [R][n_local] each), lengths and truncation flags in global order. */
static void gather_completions(struct grpo *g, const double *local_reward)
{
	int n = g->n_local, W = g->W, R = g->R;
	size_t all = (size_t)W * n, PG = (size_t)g->P * g->G, per = (size_t)R * n;
	double *r = malloc(sizeof(double) * all * R);
	int *li = malloc(sizeof(int) * 2 * all), *mine = malloc(sizeof(int) * 2 * (size_t)n);
	if (!r || !li || !mine)
		comm_abort(1, "out of memory gathering the rewards");
	for (int k = 0; k < n; k++) {
		const int *o = g->tokens + (size_t)k * g->max_new;
		mine[2 * k] = g->len[k];
		mine[2 * k + 1] = g->len[k] == g->max_new && o[g->len[k] - 1] != g->eos;
	}
	if (W > 1) {
		if (comm_allgather(g->t.d->world_g, local_reward, r, per, COMM_F64) ||
		    comm_allgather(g->t.d->world_g, mine, li, 2 * (size_t)n, COMM_I32))
			comm_abort(1, "all-gather of the rewards failed");
	} else {
		memcpy(r, local_reward, sizeof(double) * per);
		memcpy(li, mine, sizeof(int) * 2 * (size_t)n);
	}
	for (int rank = 0; rank < W; rank++) {
		for (int k = 0; k < n; k++) {
			size_t at = (size_t)rank * n + k;
			int j = local_to_global(g, rank, k);
			for (int p = 0; p < R; p++)
				g->rewards[p * PG + j] = r[rank * per + (size_t)p * n + k];
			g->glen[j] = li[2 * at];
			g->gtrunc[j] = li[2 * at + 1];
		}
	}
	free(r);
	free(li);
	free(mine);
}

/* mean and unbiased std of n values */
static void mean_std(const double *x, int n, double *mean, double *std)
{
	double s = 0, ss = 0;
	for (int i = 0; i < n; i++)
		s += x[i];
	*mean = s / n;
	for (int i = 0; i < n; i++)
		ss += (x[i] - *mean) * (x[i] - *mean);
	*std = n > 1 ? sqrt(ss / (n - 1)) : 0.0;
}

/* Advantages, loss weights and the step's reward and length statistics. */
static void prepare_objective(struct grpo *g, struct step_stats *ss)
{
	int PG = g->P * g->G;
	int *mlen = malloc(sizeof(int) * (size_t)PG);
	if (!mlen)
		comm_abort(1, "out of memory");
	ss->zero_std_groups = grpo_combined_advantages(g->rewards, g->rweight, g->R, g->P, g->G, g->scale,
							g->norm, g->reward, g->adv);
	if (ss->zero_std_groups < 0)
		comm_abort(1, "out of memory for the advantages");
	for (int r = 0; r < g->R; r++)
		mean_std(g->rewards + (size_t)r * PG, PG, &ss->prog_mean[r], &ss->prog_std[r]);
	ss->len_min = g->max_new;
	ss->len_max = 0;
	ss->truncated = 0;
	ss->gen_tokens = 0;
	for (int j = 0; j < PG; j++) {
		ss->gen_tokens += g->glen[j];
		ss->len_min = g->glen[j] < ss->len_min ? g->glen[j] : ss->len_min;
		ss->len_max = g->glen[j] > ss->len_max ? g->glen[j] : ss->len_max;
		ss->truncated += g->gtrunc[j];
		mlen[j] = g->t.cfg.grpo.mask_truncated && g->gtrunc[j] ? 0 : g->glen[j];
	}
	mean_std(g->reward, PG, &ss->reward_mean, &ss->reward_std);
	ss->len_mean = (double)ss->gen_tokens / PG;
	for (int b = 0; b < g->nmb; b++)
		grpo_sequence_coefs(g->loss_type, g->M, mlen + (size_t)b * g->M, g->mb, g->max_new,
				    g->coef + (size_t)b * g->M);
	free(mlen);
}

/* ---------------------------------------------------------------- training */

/*
 * Micro-batch of local completions k0 .. k0+mb-1: row s is prompt + completion, inputs the sequence
 * but its last token, targets the next token on completion positions only (-1 on the prompt and the
 * padding).  Returns the padded length T; the completion's first target sits at prompt_len - 1.
 */
static int build_micro(struct grpo *g, int64_t step, int k0, int *plen)
{
	const struct model_config *mc = &g->t.m->cfg;
	int T = 1, L = mc->num_hidden_layers, K = mc->num_experts_per_tok, RT = route_stride(g);
	for (int s = 0; s < g->mb; s++) {
		int p = prompt_of(g, step, k0 + s), n_in = g->prompt_len[p] + g->len[k0 + s] - 1;
		plen[s] = p;
		T = n_in > T ? n_in : T;
	}
	for (int s = 0; s < g->mb; s++) {
		int k = k0 + s, p = plen[s], pl = g->prompt_len[p], n_in = pl + g->len[k] - 1;
		const int *o = g->tokens + (size_t)k * g->max_new;
		int *in = g->inputs + (size_t)s * T, *tg = g->targets + (size_t)s * T;
		for (int t = 0; t < T; t++) {
			in[t] = t >= n_in ? 0 : t < pl ? g->prompt_ids[p][t] : o[t - pl];
			tg[t] = t >= n_in || t + 1 < pl ? -1 : o[t + 1 - pl];
		}
		plen[s] = pl;
		for (int l = 0; g->replay && l < L; l++) {
			int *dst = g->replay + ((size_t)l * g->mb * T + (size_t)s * T) * K;
			const int *src = g->routes + (((size_t)k * L + l) * RT) * K;
			for (int t = 0; t < T; t++)
				for (int e = 0; e < K; e++)
					dst[(size_t)t * K + e] = !mc_layer_is_moe(mc, l) ? e :
								 t < n_in ? src[(size_t)t * K + e] : e;
		}
	}
	return T;
}

/*
 * The reference's forward of the micro-batch in g->inputs.  LoRA: the policy's model with its adapters
 * switched off and without the policy's loss options (the reference routes by itself, as its own model
 * would).
 */
static void ref_forward(struct grpo *g, int T)
{
	struct moe_model *m = g->ref;
	const int *replay = m->route_replay;
	const float *tw = m->token_weights;
	if (g->ref_is_base) {
		m->lora->enabled = false;
		m->route_replay = NULL;
		m->token_weights = NULL;
	}
	model_forward(m, g->inputs, g->targets, g->mb, T);
	if (g->ref_is_base) {
		m->lora->enabled = true;
		m->route_replay = replay;
		m->token_weights = tw;
	}
}

/* The reference's log-probabilities of every local completion token (once per step). */
static void reference_logps(struct grpo *g, int64_t step)
{
	int plen[g->mb];
	for (int k0 = 0; k0 < g->n_local; k0 += g->mb) {
		int T = build_micro(g, step, k0, plen);
		const float *ce;
#ifdef MOE_HAVE_CUDA
		if (g->ref_gpu) {
			gpu_model_forward(g->ref_gpu, g->inputs, g->targets, g->mb, T);
			ce = gpu_model_token_losses(g->ref_gpu);
		} else
#endif
		{
			ref_forward(g, T);
			ce = model_token_losses(g->ref);
		}
		for (int s = 0; s < g->mb; s++)
			for (int i = 0; i < g->len[k0 + s]; i++)
				g->ref_logp[(size_t)(k0 + s) * g->max_new + i] = -ce[(size_t)s * T + plen[s] - 1 + i];
	}
}

/* v[0] += |old - new| of a completion's n tokens, v[1] += n, *mx = the largest */
static void add_mismatch(const float *old, const float *lp, int n, double *v, double *mx)
{
	for (int i = 0; i < n; i++) {
		double d = fabs((double)old[i] - lp[i]);
		v[0] += d;
		*mx = d > *mx ? d : *mx;
	}
	v[1] += n;
}

/* the mismatch over every rank's tokens into ss */
static void reduce_mismatch(struct grpo *g, double *v, double mx, struct step_stats *ss)
{
	if (g->W > 1 && (comm_allreduce(g->t.d->world_g, v, 2, COMM_F64, COMM_SUM) ||
			 comm_allreduce(g->t.d->world_g, &mx, 1, COMM_F64, COMM_MAX)))
		comm_abort(1, "all-reduce of the log-probability mismatch failed");
	ss->logp_mismatch = v[1] > 0 ? v[0] / v[1] : 0.0;
	ss->logp_mismatch_max = mx;
	ss->logp_mismatch_tokens = (long)v[1];
}

/*
 * int8 rollouts: the sampling-time log-probabilities came from the int8 weights.  The ratio's old
 * policy is the fp32 policy at sampling time, so they are recomputed here by the training forward
 * (same routes as training: replayed when asked) before any update, and the step logs how far the
 * sampler's were: mean and max of |logp_int8 - logp_fp32| over every completion token (all ranks).
 */
static void policy_logps(struct grpo *g, int64_t step, struct step_stats *ss)
{
	struct moe_model *m = g->t.m;
	int plen[g->mb];
	double v[2] = { 0, 0 }, mx = 0;

	for (int k0 = 0; k0 < g->n_local; k0 += g->mb) {
		int T = build_micro(g, step, k0, plen);
		m->route_replay = g->replay;
		trainer_forward(&g->t, g->inputs, g->targets, g->mb, T);
		m->route_replay = NULL;
		const float *ce = trainer_token_losses(&g->t);
		for (int s = 0; s < g->mb; s++) {
			float *old = g->old_logp + (size_t)(k0 + s) * g->max_new, lp[g->len[k0 + s] + 1];
			for (int i = 0; i < g->len[k0 + s]; i++)
				lp[i] = -ce[(size_t)s * T + plen[s] - 1 + i];
			add_mismatch(old, lp, g->len[k0 + s], v, &mx);
			memcpy(old, lp, sizeof(float) * g->len[k0 + s]);
		}
	}
	reduce_mismatch(g, v, mx, ss);
}

/*
 * Forward and backward of one micro-batch; adds its statistics to st.  mm (NULL: not measured): adds the
 * micro-batch's |sampling-time - training-time logp| (sum, count, max: mm[0..2]).
 */
static void train_micro(struct grpo *g, int64_t step, int k0, struct grpo_stats *st, long *tokens, double *mm)
{
	struct moe_model *m = g->t.m;
	int plen[g->mb];
	int T = build_micro(g, step, k0, plen);
	m->route_replay = g->replay;
	trainer_forward(&g->t, g->inputs, g->targets, g->mb, T);
	const float *ce = trainer_token_losses(&g->t);
	memset(g->weights, 0, sizeof(float) * (size_t)g->mb * T);
	for (int s = 0; s < g->mb; s++) {
		int k = k0 + s, j = local_to_global(g, g->t.rank, k), n = g->len[k];
		float logp[n > 0 ? n : 1];
		const float *row = ce + (size_t)s * T + plen[s] - 1;
		for (int i = 0; i < n; i++)
			logp[i] = -row[i];
		if (mm)
			add_mismatch(g->old_logp + (size_t)k * g->max_new, logp, n, mm, &mm[2]);
		int counted = !(g->t.cfg.grpo.mask_truncated && g->gtrunc[j]);
		grpo_sequence_grad(&g->lp, n, logp, g->old_logp + (size_t)k * g->max_new,
				   g->ref ? g->ref_logp + (size_t)k * g->max_new : NULL, counted, g->adv[j],
				   g->coef[j], g->dlogp, st);
		for (int i = 0; i < n; i++)  /* the model's loss is sum_t w_t (-logp_t) */
			g->weights[(size_t)s * T + plen[s] - 1 + i] = -g->dlogp[i];
	}
	trainer_add_loads(&g->t);
	m->token_weights = g->weights;
	trainer_backward(&g->t, 1.0f);
	m->token_weights = NULL;
	m->route_replay = NULL;
	*tokens += (long)g->mb * T;
}

static void sum_stats(struct grpo *g, struct grpo_stats *st, long *tokens)
{
	if (g->W == 1)
		return;
	double v[7] = { st->loss, st->kl, st->ratio, (double)st->tokens, (double)st->clip_low,
			(double)st->clip_high, (double)*tokens };
	if (comm_allreduce(g->t.d->world_g, v, 7, COMM_F64, COMM_SUM))
		comm_abort(1, "all-reduce of the GRPO statistics failed");
	st->loss = v[0];
	st->kl = v[1];
	st->ratio = v[2];
	st->tokens = (long)v[3];
	st->clip_low = (long)v[4];
	st->clip_high = (long)v[5];
	*tokens = (long)v[6];
}

/* num_iterations passes over the minibatches, one AdamW update each. */
static void train_updates(struct grpo *g, int64_t step, struct step_stats *ss)
{
	struct trainer *t = &g->t;
	int per = g->mb * g->ga, u = 0;
	double t0 = trainer_now_s(), mm[3] = { 0, 0, 0 };
	if (g->ref)
		reference_logps(g, step);
	if (g->rollout_q)
		policy_logps(g, step, ss);
	double t1 = trainer_now_s();
	ss->reference_s = t1 - t0;
	for (int it = 0; it < t->cfg.grpo.num_iterations; it++) {
		for (int b = 0; b < g->nmb; b++, u++) {
			struct grpo_stats st = { 0 };
			long tokens = 0;
			struct update_result ur;
			/* the first minibatch's forwards still see the sampling-time policy */
			int measure = it == 0 && b == 0 && !g->rollout_q;
			trainer_zero_grad(t);
			trainer_clear_loads(t);
			for (int a = 0; a < g->ga; a++)
				train_micro(g, step, b * per + a * g->mb, &st, &tokens, measure ? mm : NULL);
			if (measure)
				reduce_mismatch(g, mm, mm[2], ss);
			sum_stats(g, &st, &tokens);
			double lr = lr_at(&t->sched, step * g->updates_per_step + u);
			trainer_update(t, lr, st.loss, &ur);
			ss->loss += st.loss / g->updates_per_step;
			ss->ls.kl += st.kl;
			ss->ls.ratio += st.ratio;
			ss->ls.tokens += st.tokens;
			ss->ls.clip_low += st.clip_low;
			ss->ls.clip_high += st.clip_high;
			ss->train_tokens += tokens;
			ss->grad_norm = ur.grad_norm;
			ss->lr = lr;
			if (ur.skipped && !ss->skipped) {
				ss->skipped = 1;
				ss->bad = ur.bad;
			}
		}
	}
	ss->update_s = trainer_now_s() - t1;
	ss->train_s = trainer_now_s() - t0;
}

/* ---------------------------------------------------------------- the loop */

/* One GRPO step; 0, or -1 when it was abandoned (a reward failure) with nothing applied. */
static int grpo_step(struct grpo *g, struct step_stats *ss)
{
	struct trainer *t = &g->t;
	int64_t step = t->st.step;
	char err[2048] = "";
	double *local = malloc(sizeof(double) * (size_t)g->n_local * g->R);
	memset(ss, 0, sizeof(*ss));
	comm_reset_seconds();

	if (!g->rollout_cuda)  /* the CPU sampler reads m->weights: the policy as the updates left it */
		trainer_weights_to_host(t);
	int ok = local && !sample_completions(g, step, ss);
	if (!ok)
		snprintf(err, sizeof(err), "sampling failed (out of memory?)");
	double t0 = trainer_now_s();
	if (ok && score_completions(g, step, local, err, sizeof(err)))
		ok = 0;
	ss->reward_s = trainer_now_s() - t0;
	if (!trainer_all_ok(t, ok)) {
		if (!ok)
			fprintf(stderr, "moe grpo: rank %d, step %lld: %s; the step is not applied\n", t->rank,
				(long long)step + 1, err);
		free(local);
		return -1;
	}
	gather_completions(g, local);
	free(local);
	prepare_objective(g, ss);
	train_updates(g, step, ss);
	t->st.step++;
	t->st.data_position = (uint64_t)t->st.step * g->P;
	t->st.tokens_seen += ss->gen_tokens;
	t->st.elapsed_s += ss->sample_s + ss->reward_s + ss->train_s;
	return 0;
}

/* "reward/<name>": mean, "reward_std/<name>": std, of each program (the names need no escaping). */
static void write_program_rewards(const struct grpo *g, FILE *f, const double *mean, const double *std)
{
	for (int r = 0; r < g->R; r++)
		fprintf(f, "\"reward/%s\": %.6g, \"reward_std/%s\": %.6g, ", g->rname[r], mean[r], g->rname[r],
			std[r]);
}

static void log_metrics(struct grpo *g, const struct step_stats *ss)
{
	struct trainer *t = &g->t;
	const struct grpo_stats *ls = &ss->ls;
	double secs = ss->sample_s + ss->reward_s + ss->train_s, ntok = ls->tokens > 0 ? (double)ls->tokens : 1;
	double kl = ls->kl / ntok, clip_low = ls->clip_low / ntok, clip_high = ls->clip_high / ntok;
	double sample_tps = ss->gen_tokens / (ss->sample_s > 0 ? ss->sample_s : 1e-9);
	double train_tps = ss->train_tokens / (ss->train_s > 0 ? ss->train_s : 1e-9);
	int PG = g->P * g->G;
	if (t->metrics) {
		fprintf(t->metrics, "{\"step\": %lld, \"loss\": %.6g, \"lr\": %.6g, \"grad_norm\": %.6g, "
			"\"tokens_per_s\": %.1f, \"reward_mean\": %.6g, \"reward_std\": %.6g, "
			"\"frac_reward_zero_std\": %.4f, \"kl\": %.6g, \"clip_frac\": %.6g, \"clip_low\": %.6g, "
			"\"clip_high\": %.6g, \"ratio_mean\": %.6g, \"completion_len\": %.3f, "
			"\"completion_len_min\": %d, \"completion_len_max\": %d, \"truncated_frac\": %.4f, "
			"\"sampling_tokens_per_s\": %.1f, \"training_tokens_per_s\": %.1f, \"sample_s\": %.3f, "
			"\"reward_s\": %.3f, \"train_s\": %.3f, \"elapsed_s\": %.3f%s, \"rollout_device\": \"%s\", "
			"\"generate_s\": %.3f, \"reference_s\": %.3f, \"update_s\": %.3f, \"logp_mismatch\": %.6g, "
			"\"logp_mismatch_max\": %.6g, \"logp_mismatch_tokens\": %ld, ",
			(long long)t->st.step, ss->loss, ss->lr, ss->grad_norm, ss->gen_tokens / secs,
			ss->reward_mean, ss->reward_std, (double)ss->zero_std_groups / g->P, kl,
			clip_low + clip_high, clip_low, clip_high, ls->tokens > 0 ? ls->ratio / ntok : 1.0, ss->len_mean, ss->len_min,
			ss->len_max, (double)ss->truncated / PG, sample_tps, train_tps, ss->sample_s, ss->reward_s,
			ss->train_s, t->st.elapsed_s, ss->skipped ? ", \"skipped\": true" : "",
			g->rollout_cuda ? "cuda" : "cpu", ss->sample_s, ss->reference_s, ss->update_s, ss->logp_mismatch,
			ss->logp_mismatch_max, ss->logp_mismatch_tokens);
		write_program_rewards(g, t->metrics, ss->prog_mean, ss->prog_std);
		if (g->rollout_q)
			fprintf(t->metrics, "\"rollout_weights\": \"int8\", ");
		trainer_write_imbalance(t, t->metrics);
		fprintf(t->metrics, "}\n");
		fflush(t->metrics);
	}
	g->step_time_avg = g->step_time_avg == 0 ? secs : 0.9 * g->step_time_avg + 0.1 * secs;
	int every = t->cfg.log.every > 0 ? t->cfg.log.every : 1;
	if (t->rank != 0 || (t->st.step % every && t->st.step != t->cfg.train.steps && !ss->skipped))
		return;
	char eta[32];
	trainer_format_duration(eta, sizeof(eta), g->step_time_avg * (t->cfg.train.steps - t->st.step));
	char q8[48];
	snprintf(q8, sizeof(q8), " | %slogp mismatch %.4f", g->rollout_q ? "int8 " : "", ss->logp_mismatch);
	printf("step %lld/%d | reward %.3f +- %.3f | kl %.4f | clip %.3f | len %.1f [%d, %d] | loss %.4f | "
	       "sample %.0f tok/s%s | train %.0f tok/s | ETA %s%s\n", (long long)t->st.step, t->cfg.train.steps,
	       ss->reward_mean, ss->reward_std, kl, clip_low + clip_high, ss->len_mean, ss->len_min, ss->len_max,
	       ss->loss, sample_tps, q8, train_tps, eta, ss->skipped ? " | SKIPPED (non-finite)" : "");
	fflush(stdout);
}

static int run_loop(struct grpo *g)
{
	struct trainer *t = &g->t;
	const struct train_config *tc = &t->cfg.train;
	while (t->st.step < tc->steps) {
		struct step_stats ss;
		if (grpo_step(g, &ss))
			return 1;
		if (ss.skipped && !strcmp(tc->on_nonfinite, "stop")) {
			if (t->rank == 0)
				fprintf(stderr, "moe grpo: non-finite loss or gradient at step %lld%s%s; stopping "
					"(train.on_nonfinite=skip skips such updates)\n", (long long)t->st.step,
					ss.bad ? ", first in " : "", ss.bad ? ss.bad : "");
			return 1;
		}
		log_metrics(g, &ss);
		int next = trainer_after_step(t);
		if (next)
			return next < 0;
	}
	return 0;
}

int grpo_run(const struct run_config *cfg, const char *resume, const struct dist *d)
{
	struct grpo *g = calloc(1, sizeof(*g));
	int rc = 1;
	if (!g)
		return 1;
	g->t.d = d;
	int ok = setup(g, cfg, resume, d, 0) == 0;
	if (trainer_all_ok(&g->t, ok)) {
		TRAINER_LOG(&g->t, "grpo: %d steps of %d prompts x %d completions (up to %d tokens) on %d ranks; "
			    "%d minibatches x %d iterations = %d updates a step; loss %s, rewards scaled by %s, "
			    "beta %g%s%s\n", cfg->train.steps, g->P, g->G, g->max_new, g->W, g->nmb,
			    cfg->grpo.num_iterations, g->updates_per_step, cfg->grpo.loss_type,
			    cfg->grpo.scale_rewards, cfg->grpo.beta, cfg->grpo.routing_replay ? ", routing replay" : "",
			    cfg->grpo.sequence_ratio ? ", sequence ratios (GSPO)" : "");
		trainer_catch_signals(1);
		rc = run_loop(g);
		trainer_catch_signals(0);
	} else if (ok) {
		fprintf(stderr, "moe grpo: rank %d: stopping, another rank failed to start\n", g->t.rank);
	}
	teardown(g);
	free(g);
	return rc;
}

/* ---------------------------------------------------------------- evaluation */

/*
 * The evaluation's summary from its sums (eval_prompts): a line for people, then one JSON object with
 * reward/<name> and reward_std/<name> of every program.
 */
static void report_eval(const struct grpo *g, const char *path, const double *sums, double gen_s)
{
	const struct trainer *t = &g->t;
	double n = sums[3] > 0 ? sums[3] : 1, mean[CFG_MAX_REWARDS], std[CFG_MAX_REWARDS];
	char progs[1024] = "";
	size_t at = 0;

	for (int r = 0; r < g->R; r++) {
		mean[r] = sums[4 + 2 * r] / n;
		std[r] = sums[3] > 1 ? sqrt(fmax(0.0, (sums[5 + 2 * r] - n * mean[r] * mean[r]) / (n - 1))) : 0.0;
		if (g->R > 1 && at < sizeof(progs))
			at += (size_t)snprintf(progs + at, sizeof(progs) - at, " | %s %.4f +- %.4f", g->rname[r],
					       mean[r], std[r]);
	}
	TRAINER_LOG(t, "eval %s: %d prompts | mean reward %.4f | accuracy %.4f (reward >= 1)%s | completion "
		    "length %.1f | %.1f s\n", path, (int)sums[3], sums[0] / n, sums[1] / n, progs, sums[2] / n,
		    gen_s);
	if (t->rank != 0)
		return;
	printf("{\"eval\": \"%s\", \"prompts\": %d, \"reward_mean\": %.6f, \"accuracy\": %.6f, ", path,
	       (int)sums[3], sums[0] / n, sums[1] / n);
	write_program_rewards(g, stdout, mean, std);
	printf("\"completion_len\": %.3f}\n", sums[2] / n);
	fflush(stdout);
}

/*
 * Greedy completions of every prompt of a prompt set, scored by the reward program: the mean reward and
 * the accuracy (completions earning a reward of at least 1).  Rank r takes prompts r, r + W, ...
 */
static int eval_prompts(struct grpo *g, const char *path, const char *samples_path)
{
	struct trainer *t = &g->t;
	char err[2048] = "";
	int W = g->W, n = 0;
	for (int i = t->rank; i < g->ps.n; i += W)
		n++;
	/* this rank's share as one batch of "completions" k with prompt t->rank + k*W */
	const int **prompts = malloc(sizeof(int *) * (size_t)(n + 1));
	int *lens = malloc(sizeof(int) * (size_t)(n + 1));
	uint64_t *seeds = calloc((size_t)n + 1, sizeof(uint64_t));
	int R = g->R;
	/* rewards[r * (n + 1) + k]: program r's; total[k] the weighted sum */
	double *rewards = calloc(((size_t)n + 1) * R, sizeof(double));
	double *total = calloc((size_t)n + 1, sizeof(double));
	double *each[CFG_MAX_REWARDS];
	struct reward_request *req = calloc((size_t)n + 1, sizeof(*req));
	char **texts = calloc((size_t)n + 1, sizeof(char *));
	int ok = prompts && lens && seeds && rewards && total && req && texts;
	free(g->tokens);
	free(g->len);
	free(g->old_logp);
	g->tokens = malloc(sizeof(int) * ((size_t)n + 1) * g->max_new);
	g->len = malloc(sizeof(int) * ((size_t)n + 1));
	g->old_logp = malloc(sizeof(float) * ((size_t)n + 1) * g->max_new);
	ok = ok && g->tokens && g->len && g->old_logp;
	struct latent_cache *cache = ok ? latent_cache_create(&t->m->cfg, n > 0 ? n : 1,
							      g->max_prompt + g->max_new) : NULL;
	ok = ok && cache;
	double t0 = trainer_now_s();
	if (ok) {
		for (int k = 0; k < n; k++) {
			prompts[k] = g->prompt_ids[t->rank + k * W];
			lens[k] = g->prompt_len[t->rank + k * W];
		}
		struct sample_params sp = sample_params_default();
		sp.temperature = 0.0f;
		sp.max_new_tokens = g->max_new;
		sp.eos_id = g->eos;
		ok = !rollout_generate(g, cache, prompts, lens, n, &sp, seeds);
		if (!ok)
			snprintf(err, sizeof(err), "generation failed (out of memory?)");
	}
	double gen_s = trainer_now_s() - t0;
	for (int k = 0; ok && k < n; k++) {
		texts[k] = completion_text(g, k);
		ok = texts[k] != NULL;
		req[k].id = t->rank + (int64_t)k * W;
		req[k].record = ok ? g->ps.record[t->rank + k * W] : NULL;
		req[k].completion = texts[k];
	}
	for (int r = 0; ok && r < R; r++)
		each[r] = rewards + (size_t)r * (n + 1);
	if (ok && n > 0 && reward_score_all(g->rproc, R, req, n, each, err, sizeof(err)))
		ok = 0;
	if (!ok)
		fprintf(stderr, "moe grpo: rank %d: evaluating %s: %s\n", t->rank, path, err);
	/* reward, correct, tokens, count, then each program's sum and sum of squares */
	double sums[4 + 2 * CFG_MAX_REWARDS] = { 0 };
	for (int k = 0; ok && k < n; k++) {
		for (int r = 0; r < R; r++) {
			total[k] += g->rweight[r] * each[r][k];
			sums[4 + 2 * r] += each[r][k];
			sums[5 + 2 * r] += each[r][k] * each[r][k];
		}
		sums[0] += total[k];
		sums[1] += total[k] >= 1.0;
		sums[2] += g->len[k];
		sums[3] += 1;
	}
	FILE *out = ok && samples_path && t->rank == 0 && W == 1 ? fopen(samples_path, "w") : NULL;
	for (int k = 0; out && k < n; k++) {
		char *lit = reward_json_string(texts[k]);
		fprintf(out, "{\"id\": %d, \"reward\": %.6g, ", k, total[k]);
		for (int r = 0; R > 1 && r < R; r++)
			fprintf(out, "\"reward/%s\": %.6g, ", g->rname[r], each[r][k]);
		fprintf(out, "\"completion\": %s}\n", lit ? lit : "null");
		free(lit);
	}
	if (out)
		fclose(out);
	latent_cache_free(cache);
	for (int k = 0; texts && k < n; k++)
		free(texts[k]);
	free(texts);
	free(req);
	free(rewards);
	free(total);
	free(seeds);
	free(lens);
	free(prompts);
	if (!trainer_all_ok(t, ok))
		return 1;
	if (W > 1 && comm_allreduce(t->d->world_g, sums, 4 + 2 * R, COMM_F64, COMM_SUM))
		comm_abort(1, "all-reduce of the evaluation failed");
	report_eval(g, path, sums, gen_s);
	return 0;
}

int grpo_eval(const struct run_config *cfg, const char *resume, const struct dist *d, const char *path,
	      const char *samples_path)
{
	struct grpo *g = calloc(1, sizeof(*g));
	int rc = 1;
	if (!g)
		return 1;
	struct run_config c = *cfg;
	snprintf(c.grpo.prompts, sizeof(c.grpo.prompts), "%s", path);
	c.log.metrics[0] = 0;
	c.grpo.beta = 0;  /* no reference needed */
	g->t.d = d;
	int ok = setup(g, &c, resume, d, 1) == 0;
	if (trainer_all_ok(&g->t, ok))
		rc = eval_prompts(g, path, samples_path);
	else if (ok)
		fprintf(stderr, "moe grpo: rank %d: stopping, another rank failed to start\n", g->t.rank);
	teardown(g);
	free(g);
	return rc;
}
