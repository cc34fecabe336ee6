/*
 * bench/bench_train.c - throughput of the training step: the CPU (float32 reference) path by default,
 * the GPU step with --device cuda.
 *
 * Builds a model from a struct model_config (defaults: the "small" shape of the issue: hidden 256,
 * 4 layers, 16 routed experts top-4 + 1 shared, seq 256, micro-batch 4), feeds random tokens, runs
 * `warmup` untimed steps and then times `steps` steps of model_zero_grad + model_forward +
 * model_backward (the training step minus the optimizer, which is O(params); --adamw also times an
 * AdamW-like elementwise pass over the arena, reported separately).
 *
 * Reports tokens/s, model FLOP/s (counted analytically, no recomputation counted), the machine's own
 * cblas_sgemm rate on a large square product (best of 3, all threads), their ratio, and peak RSS.
 *
 * Model FLOPs per step = 6 * N * (in*out of every linear layer a token passes through: attention
 * projections, dense MLP, router, K routed + shared experts, lm_head)
 *                      + 3 * N * L * 2 * T_avg * H * (dq + dv),  T_avg = (T+1)/2 (causal).
 *
 * The machine is often shared: besides the mean, the best step is reported, and the process CPU time
 * per step (user + sys over all threads, spin-waiting included), which preemption does not inflate.
 * --check also verifies that one step's loss and gradients are bitwise identical with 1 thread and
 * with all threads.
 *
 * --config FILE takes the model from a run config instead (and the defaults of --batch, --seq and --accum:
 * train.micro_batch, seq_len, grad_accum; and AdamW's settings); the shape flags then override it.
 *
 * --device cuda (a CUDA build only) times the whole GPU training step instead: zero_grad, forward and
 * backward of --accum micro-batches, global-norm clipping and AdamW on the device (bf16 matmuls unless
 * --fp32), and reports tokens/s, model TFLOP/s (model_train_flops_per_token) and MFU against the H100's
 * bf16 dense rate, device memory and a per-phase split.  See the GPU section below.
 *
 * Not a test: run it by hand (see bench/RESULTS.md).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <cblas.h>

#include "launch/startup.h"
#include "model/model.h"
#include "optim/adamw.h"
#include "train/config.h"

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "launch/cuda/prof.h"
#include "model/cuda/model_cuda.h"
#include "model/cuda/ops_cuda.h"
#include "optim/cuda/adamw_cuda.h"
#endif

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static double cpu_s(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + 1e-6 * (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

static uint64_t rng_state = 0x853c49e6748fea9bULL;

static uint32_t rng_u32(void)
{
	rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
	return (uint32_t)(rng_state >> 33);
}

static struct model_config default_config(void)
{
	struct model_config c = {
		.vocab_size = 4096,
		.hidden_size = 256,
		.intermediate_size = 1024,
		.moe_intermediate_size = 256,
		.num_hidden_layers = 4,
		.num_attention_heads = 8,
		.num_key_value_heads = 8,
		.n_shared_experts = 1,
		.n_routed_experts = 16,
		.routed_scaling_factor = 2.5,
		.kv_lora_rank = 64,
		.q_lora_rank = 128,
		.qk_rope_head_dim = 16,
		.qk_nope_head_dim = 32,
		.v_head_dim = 32,
		.n_group = 4,
		.topk_group = 2,
		.num_experts_per_tok = 4,
		.moe_layer_freq = 1,
		.first_k_dense_replace = 1,
		.norm_topk_prob = true,
		.scoring_func = MOE_SCORING_SIGMOID,
		.aux_loss_alpha = 0.0001,
		.seq_aux = true,
		.max_position_embeddings = 4096,
		.initializer_range = 0.02,
		.rms_norm_eps = 1e-6,
		.rope_theta = 10000.0,
		.bos_token_id = 0,
		.eos_token_id = 1,
	};
	return c;
}

/* in*out summed over the linear layers one token passes through (forward), and attention FLOPs */
static void count_flops(const struct model_config *c, int T, double *matmul_params_per_token,
			double *attn_fwd_flops_per_token)
{
	double C = c->hidden_size, H = c->num_attention_heads, dq = c->qk_nope_head_dim + c->qk_rope_head_dim;
	double dn = c->qk_nope_head_dim, dv = c->v_head_dim, dr = c->qk_rope_head_dim;
	double Rq = c->q_lora_rank, Rkv = c->kv_lora_rank;
	double attn = (Rq > 0 ? C * Rq + Rq * H * dq : C * H * dq) + C * (Rkv + dr) + Rkv * H * (dn + dv) +
		      H * dv * C;
	double p = 0.0;
	for (int l = 0; l < c->num_hidden_layers; l++) {
		p += attn;
		if (c->n_routed_experts > 0 && l >= c->first_k_dense_replace)
			p += C * c->n_routed_experts +
			     (double)(c->num_experts_per_tok + c->n_shared_experts) * 3.0 * C *
				     c->moe_intermediate_size;
		else
			p += 3.0 * C * c->intermediate_size;
	}
	p += C * c->vocab_size;  /* lm_head */
	*matmul_params_per_token = p;
	*attn_fwd_flops_per_token = c->num_hidden_layers * 2.0 * ((T + 1) / 2.0) * H * (dq + dv);
}

static double sgemm_rate(int n, int reps)
{
	float *a = malloc(sizeof(float) * n * n), *b = malloc(sizeof(float) * n * n);
	float *cm = malloc(sizeof(float) * n * n);
	for (size_t i = 0; i < (size_t)n * n; i++) {
		a[i] = (float)(rng_u32() % 1000) * 1e-3f - 0.5f;
		b[i] = (float)(rng_u32() % 1000) * 1e-3f - 0.5f;
	}
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, cm, n);
	double best = 1e30;
	for (int r = 0; r < reps; r++) {
		double t0 = now_s();
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, cm, n);
		double t = now_s() - t0;
		best = t < best ? t : best;
	}
	free(a);
	free(b);
	free(cm);
	return 2.0 * n * n * (double)n / best;
}

/* an AdamW-like O(n) pass, the shape of the optimizer's work (not the project's optimizer) */
static void adamw_pass(float *w, const float *g, float *m1, float *m2, size_t n, int step)
{
	const float lr = 1e-4f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
	float c1 = 1.0f / (1.0f - powf(b1, step)), c2 = 1.0f / (1.0f - powf(b2, step));
#pragma omp parallel for schedule(static)
	for (size_t i = 0; i < n; i++) {
		float gi = g[i];
		m1[i] = b1 * m1[i] + (1.0f - b1) * gi;
		m2[i] = b2 * m2[i] + (1.0f - b2) * gi * gi;
		w[i] -= lr * (m1[i] * c1 / (sqrtf(m2[i] * c2) + eps) + wd * w[i]);
	}
}

/* one step's loss and gradients with 1 thread and with nthreads: 1 if bitwise identical */
static int check_threads(struct moe_model *m, const int *inputs, const int *targets, int B, int T,
			 int nthreads)
{
	size_t n = m->n_weights;
	float *g1 = malloc(sizeof(float) * n);
	float loss[2];
	int same = 1;
	for (int pass = 0; pass < 2; pass++) {
		omp_set_num_threads(pass ? nthreads : 1);
		model_zero_grad(m);
		loss[pass] = model_forward(m, inputs, targets, B, T);
		model_backward(m, 1.0f);
		if (!pass)
			memcpy(g1, m->grads, sizeof(float) * n);
	}
	omp_set_num_threads(nthreads);
	double worst = 0.0;
	for (size_t i = 0; i < n; i++) {
		double d = fabs((double)g1[i] - m->grads[i]);
		worst = d > worst ? d : worst;
	}
	same = memcmp(g1, m->grads, sizeof(float) * n) == 0 && memcmp(&loss[0], &loss[1], sizeof(float)) == 0;
	printf("determinism   1 vs %d threads: loss %.9g vs %.9g, gradients %s (max |diff| %.3g)\n", nthreads,
	       loss[0], loss[1], same ? "bitwise identical" : "DIFFER", worst);
	free(g1);
	return same;
}

static void usage(const char *prog)
{
	fprintf(stderr,
		"usage: %s [--config FILE] [--device cpu|cuda] [--fp32] [--accum N]\n"
		"          [--steps N] [--warmup N] [--threads N] [--batch B] [--seq T] [--layers L]\n"
		"          [--hidden C] [--heads H] [--vocab V] [--inter I] [--moe-inter Im] [--experts E]\n"
		"          [--topk K] [--shared S] [--dense D] [--groups G] [--topk-groups TG]\n"
		"          [--sgemm-n N] [--sgemm-reps R] [--no-sgemm] [--adamw] [--check] [--seed S]\n"
		"          [--attention auto|cudnn|own]\n",
		prog);
}

struct bench_opts {
	struct model_config c;
	struct run_config rc;       /* config_defaults, or --config: the train section's AdamW settings */
	const char *config_path;    /* NULL: default_config() */
	int steps, warmup, threads, B, T, accum, sgemm_n, sgemm_reps;
	int no_sgemm, do_adamw, do_check;
	int cuda, fp32;
	const char *attention;      /* --attention, else the config's train.attention (auto) */
	uint64_t seed;
};

/* --config is read before the other flags, wherever it stands, so that they override it */
static int load_config_arg(struct bench_opts *o, int argc, char **argv)
{
	char err[512];

	config_defaults(&o->rc);
	for (int i = 1; i + 1 < argc; i++)
		if (!strcmp(argv[i], "--config"))
			o->config_path = argv[i + 1];
	if (!o->config_path)
		return 0;
	if (config_load(&o->rc, o->config_path, NULL, 0, err, sizeof(err))) {
		fprintf(stderr, "bench_train: %s\n", err);
		return -1;
	}
	o->c = o->rc.model;
	return 0;
}

/* 0, or 2 (usage) */
static int parse_flags(struct bench_opts *o, int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		int has = i + 1 < argc;
#define INTARG(flag, dst)                                  \
	if (!strcmp(a, flag) && has) {                     \
		dst = atoi(argv[++i]);                     \
		continue;                                  \
	}
#define FLAG(flag, dst)                                    \
	if (!strcmp(a, flag)) {                            \
		dst = 1;                                   \
		continue;                                  \
	}
		INTARG("--steps", o->steps)
		INTARG("--warmup", o->warmup)
		INTARG("--threads", o->threads)
		INTARG("--batch", o->B)
		INTARG("--seq", o->T)
		INTARG("--accum", o->accum)
		INTARG("--layers", o->c.num_hidden_layers)
		INTARG("--hidden", o->c.hidden_size)
		INTARG("--heads", o->c.num_attention_heads)
		INTARG("--vocab", o->c.vocab_size)
		INTARG("--inter", o->c.intermediate_size)
		INTARG("--moe-inter", o->c.moe_intermediate_size)
		INTARG("--experts", o->c.n_routed_experts)
		INTARG("--topk", o->c.num_experts_per_tok)
		INTARG("--shared", o->c.n_shared_experts)
		INTARG("--dense", o->c.first_k_dense_replace)
		INTARG("--groups", o->c.n_group)
		INTARG("--topk-groups", o->c.topk_group)
		INTARG("--sgemm-n", o->sgemm_n)
		INTARG("--sgemm-reps", o->sgemm_reps)
		FLAG("--no-sgemm", o->no_sgemm)
		FLAG("--check", o->do_check)
		FLAG("--adamw", o->do_adamw)
		FLAG("--fp32", o->fp32)
#undef INTARG
#undef FLAG
		if (!strcmp(a, "--seed") && has) {
			o->seed = strtoull(argv[++i], NULL, 10);
			continue;
		}
		if (!strcmp(a, "--config") && has) {
			i++;    /* read by load_config_arg */
			continue;
		}
		if (!strcmp(a, "--attention") && has) {
			o->attention = argv[++i];
			continue;
		}
		if (!strcmp(a, "--device") && has && (!strcmp(argv[i + 1], "cpu") ||
						       !strcmp(argv[i + 1], "cuda"))) {
			o->cuda = !strcmp(argv[++i], "cuda");
			continue;
		}
		return 2;
	}
	return 0;
}

/* 0, 1 (a bad config) or 2 (usage) */
static int parse_args(struct bench_opts *o, int argc, char **argv)
{
	memset(o, 0, sizeof(*o));
	o->c = default_config();
	o->steps = 10;
	o->warmup = 2;
	o->B = o->T = o->accum = -1;
	o->sgemm_n = 2048;
	o->sgemm_reps = 3;
	o->seed = 1234;
	if (load_config_arg(o, argc, argv))
		return 1;
	if (parse_flags(o, argc, argv))
		return 2;
	if (o->accum != -1 && !o->cuda) {
		fprintf(stderr, "bench_train: --accum is for --device cuda\n");
		return 2;
	}
	if (o->B == -1)
		o->B = o->config_path ? o->rc.train.micro_batch : 4;
	if (o->T == -1)
		o->T = o->config_path ? o->rc.train.seq_len : 256;
	if (o->accum == -1)
		o->accum = o->config_path && o->cuda ? o->rc.train.grad_accum : 1;
	if (!o->attention)
		o->attention = o->rc.train.attention;
	o->c.num_key_value_heads = o->c.num_attention_heads;
	if (o->steps < 1 || o->warmup < 0 || o->B < 1 || o->T < 1 || o->accum < 1 || o->sgemm_reps < 1)
		return 2;
	return 0;
}

/* random input and target ids in [0, V) */
static void fill_tokens(int *inputs, int *targets, size_t n, int V)
{
	for (size_t i = 0; i < n; i++) {
		inputs[i] = (int)(rng_u32() % (uint32_t)V);
		targets[i] = (int)(rng_u32() % (uint32_t)V);
	}
}

/* ---------------------------------------------------------------- CPU mode */

struct cpu_times {
	float loss;
	double mean, best, tf, tb, cpu_step, adamw_t;
	struct rusage ru;           /* peak RSS of the training steps */
};

static void cpu_time_steps(struct moe_model *m, const struct bench_opts *o, const int *inputs,
			   const int *targets, struct cpu_times *r)
{
	int steps = o->steps, B = o->B, T = o->T;
	double total_t = 0.0, c0;

	for (int s = 0; s < o->warmup; s++) {
		model_zero_grad(m);
		r->loss = model_forward(m, inputs, targets, B, T);
		model_backward(m, 1.0f);
	}
	r->best = 1e30;
	c0 = cpu_s();
	for (int s = 0; s < steps; s++) {
		double t0 = now_s();
		model_zero_grad(m);
		r->loss = model_forward(m, inputs, targets, B, T);
		double t1 = now_s();
		model_backward(m, 1.0f);
		double t2 = now_s();
		double t = t2 - t0;
		total_t += t;
		r->tf += t1 - t0;
		r->tb += t2 - t1;
		r->best = t < r->best ? t : r->best;
	}
	r->mean = total_t / steps;
	r->cpu_step = (cpu_s() - c0) / steps;
	/* peak RSS of the training steps, before the optional AdamW state and the sgemm matrices */
	getrusage(RUSAGE_SELF, &r->ru);
}

static void cpu_time_adamw(struct moe_model *m, int steps, struct cpu_times *r)
{
	float *m1 = calloc(m->n_weights, sizeof(float)), *m2 = calloc(m->n_weights, sizeof(float));

	adamw_pass(m->weights, m->grads, m1, m2, m->n_weights, 1);
	double t0 = now_s();
	for (int s = 0; s < steps; s++)
		adamw_pass(m->weights, m->grads, m1, m2, m->n_weights, s + 2);
	r->adamw_t = (now_s() - t0) / steps;
	free(m1);
	free(m2);
}

static void cpu_report(const struct bench_opts *o, const struct cpu_times *r, int threads)
{
	const struct model_config c = o->c;
	int N = o->B * o->T, steps = o->steps, do_sgemm = !o->no_sgemm;
	int64_t total, activated;
	double P, attn;

	model_count_params(&c, &total, &activated);
	count_flops(&c, o->T, &P, &attn);
	double flops_step = 6.0 * P * N + 3.0 * attn * N;
	double sg = do_sgemm ? sgemm_rate(o->sgemm_n, o->sgemm_reps) : 0.0;
	double mean = r->mean, best = r->best;

	printf("bench_train: CPU training step (zero_grad + forward + backward), float32\n");
	printf("openblas      %s (core %s)\n", openblas_get_config(), openblas_get_corename());
#if defined(__x86_64__)
	/* OpenBLAS 0.3.21 does not know recent Xeons (e.g. family 6 model 207) and falls back to SSE3 */
	if (!strcmp(openblas_get_corename(), "Prescott") && __builtin_cpu_supports("avx2"))
		printf("warning       OpenBLAS runs its SSE3 (Prescott) kernels on a CPU with AVX2%s: set\n"
		       "              OPENBLAS_CORETYPE (e.g. %s) for the machine's real sgemm rate\n",
		       __builtin_cpu_supports("avx512f") ? " and AVX-512" : "",
		       __builtin_cpu_supports("avx512f") ? "SkylakeX" : "Haswell");
#endif
	printf("config        hidden %d, layers %d (%d dense), heads %d, q_lora %d, kv_lora %d, "
	       "qk %d+%d, v %d\n",
	       c.hidden_size, c.num_hidden_layers, c.first_k_dense_replace, c.num_attention_heads,
	       c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim);
	printf("              experts %d routed top-%d + %d shared (moe_inter %d, inter %d), groups %d/%d, "
	       "vocab %d\n",
	       c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts, c.moe_intermediate_size,
	       c.intermediate_size, c.topk_group, c.n_group, c.vocab_size);
	printf("              batch %d x seq %d = %d tokens/step, threads %d\n", o->B, o->T, N, threads);
	printf("params        total %.2fM, activated %.2fM; matmul params/token %.2fM\n", total / 1e6,
	       activated / 1e6, P / 1e6);
	printf("model FLOPs   %.2f GFLOP/step (matmul %.2f, attention %.2f)\n", flops_step / 1e9,
	       6.0 * P * N / 1e9, 3.0 * attn * N / 1e9);
	printf("loss          %.4f (last step)\n", r->loss);
	printf("step time     mean %.1f ms (fwd %.1f, bwd %.1f), best %.1f ms over %d steps\n", mean * 1e3,
	       r->tf / steps * 1e3, r->tb / steps * 1e3, best * 1e3, steps);
	printf("cpu time      %.1f ms/step over all threads (%.2f cores busy; %.1f GFLOP per cpu-second)\n",
	       r->cpu_step * 1e3, r->cpu_step / mean, flops_step / r->cpu_step / 1e9);
	printf("tokens/s      %.0f (mean), %.0f (best)\n", N / mean, N / best);
	printf("model FLOP/s  %.2f GFLOP/s (mean), %.2f (best)\n", flops_step / mean / 1e9,
	       flops_step / best / 1e9);
	if (do_sgemm) {
		printf("sgemm         %.2f GFLOP/s (%d^3, best of %d, %d threads)\n", sg / 1e9, o->sgemm_n,
		       o->sgemm_reps, threads);
		printf("ratio         %.1f%% of sgemm (mean), %.1f%% (best)\n", 100.0 * flops_step / mean / sg,
		       100.0 * flops_step / best / sg);
	}
	if (o->do_adamw)
		printf("adamw pass    %.2f ms/step (%.1f%% of the step)\n", r->adamw_t * 1e3,
		       100.0 * r->adamw_t / (mean + r->adamw_t));
	printf("peak RSS      %.1f MiB (after the timed steps)\n", r->ru.ru_maxrss / 1024.0);
}

static int run_cpu(const struct bench_opts *o)
{
	const struct model_config *c = &o->c;
	struct cpu_times r = { 0 };
	char err[256];
	int threads, ok = 1;

	if (o->threads > 0)
		omp_set_num_threads(o->threads);
	threads = omp_get_max_threads();
	struct moe_model *m = model_create(c, 0, c->n_routed_experts, err, sizeof(err));
	if (!m) {
		fprintf(stderr, "bench_train: %s\n", err);
		return 1;
	}
	model_init_weights(m, o->seed);

	int N = o->B * o->T;
	int *inputs = malloc(sizeof(int) * N), *targets = malloc(sizeof(int) * N);
	rng_state ^= o->seed;
	fill_tokens(inputs, targets, N, c->vocab_size);

	cpu_time_steps(m, o, inputs, targets, &r);
	if (o->do_adamw)
		cpu_time_adamw(m, o->steps, &r);
	cpu_report(o, &r, threads);
	if (o->do_check)
		ok = check_threads(m, inputs, targets, o->B, o->T, threads);

	free(inputs);
	free(targets);
	model_free(m);
	return ok ? 0 : 1;
}

/* ---------------------------------------------------------------- GPU mode */

/*
 * Memory of configs/bench-v2lite-{4,5}l.json on one 80 GB H100 (GB = 1e9 bytes; the card has 85.0 GB).
 * DeepSeek-V2-Lite's shapes: C 2048, H 16, MLA with kv_lora 512, qk 128+64, v 128; layer 0 dense
 * (10944), the others MoE with 64 routed experts top-6 + 2 shared of 1408; vocab 102400.
 *
 *   Static, 18 B/param: fp32 weights 4 + fp32 grads 4 + AdamW moments 8 + the bf16 copy 2.
 *     4 layers  2.255B params  40.6 GB   (the embedding and lm_head alone: 0.42B)
 *     5 layers  2.840B params  51.1 GB   (each MoE layer: +0.585B, +10.5 GB)
 *     6 layers  3.425B params  61.6 GB before any activation; 8 layers 82.7 GB: neither fits.
 *
 *   Activations, fp32, the CPU model's set (model.c: model_acts_create, alloc_layer_acts,
 *   alloc_grad_scratch; the GPU model allocates the same set), in floats per token, N = B * T:
 *     every layer  24147: resid + h_mid 2C, ln1 + ln2 2C, MLA q + k 2*16*192, kv 16*256, v + att
 *                  2*16*128, kva 576, ckv + ckv_n 1024, norms' rstd and lse 19
 *     dense layer  + 32832 (g, u, a: 3 x 10944)                                           = 56979
 *     MoE layer    + 58520: xe, ye 2*K*C = 24576, the experts' g, u, a 3*K*1408 = 25344, shared
 *                  3*2*1408 = 8448, router logits, scores, top-k 152                      = 82667
 *     once         106501 (logits V = 102400, lnf, the last resid) + backward scratch 71750
 *                  (dres, dln, dq, dk, dv, dkv, datt, dg + du max(I, K*Im) = 2*10944, dye + dxe 2*K*C..)
 *     4 layers: 483231 floats = 1.93 MB/token; 5 layers: 565898 = 2.26 MB/token.
 *
 *   Plus the stream-ordered scratch (the bf16 operands of the GEMMs, at most lm_head's dlogits, N*V*2 =
 *   1.7 GB at N = 8192; fp32 temporaries of N*I), the cuBLAS workspace and the context (about 0.5 GB):
 *     4 layers, B 2 x T 4096 (N 8192)   40.6 + 15.8 + ~2.5 = ~59 GB   bench-v2lite-4l.json
 *     4 layers, N 16384                 40.6 + 31.7 + ~4   = ~76 GB   too close to 80
 *     5 layers, B 1 x T 4096 (N 4096)   51.1 +  9.3 + ~1.5 = ~62 GB   bench-v2lite-5l.json
 *     5 layers, N 8192                  51.1 + 18.5 + ~2.5 = ~72 GB   too close to 80
 *   The host keeps its own fp32 weights and grads (8 B/param: 18 GB for 4 layers, 23 GB for 5).
 *   Measured (H100 80GB, 2026-11-24, cudaMemGetInfo): 4 layers N 8192 54.7 GiB = 58.8 GB (scratch pool
 *   peak 1.6 GiB); 5 layers N 4096 57.7 GiB = 61.9 GB (0.8 GiB).
 *
 * MFU = model_train_flops_per_token(T) * tokens/s against 798 TFLOP/s, the bf16 dense matmul rate
 * measured on these H100s (not the 989 of the datasheet).
 */
#ifdef MOE_HAVE_CUDA

#define GPU_PEAK_FLOPS 798e12

struct gpu_bench {
	struct moe_model *m;
	struct gpu_model *g;
	struct adamw_cuda opt;
	int opt_ready;
	struct optim_segment *segs;
	struct adamw_hparams hp;
	double clip;
	int *inputs, *targets;      /* host, [accum][B*T] */
	int B, T, accum, V;
	int steps_done, nonfinite;
	float first_loss, loss;
	double norm;
	double mem_base, mem_peak;  /* device bytes in use: before the model, max sampled */
	char attention[1024];       /* attention_cuda_configure's choice */
};

static double device_used(void)
{
	size_t free_b = 0, total_b = 0;

	if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess)
		return 0.0;
	return (double)(total_b - free_b);
}

/* the high-water mark of the scratch memory (the device's default pool, cudaMallocAsync) */
static double pool_used_high(void)
{
	cudaMemPool_t pool;
	uint64_t v = 0;

	if (cudaDeviceGetDefaultMemPool(&pool, moe_cuda_current_device()) != cudaSuccess ||
	    cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &v) != cudaSuccess)
		return 0.0;
	return (double)v;
}

static void sample_mem(struct gpu_bench *b)
{
	double u = device_used();

	b->mem_peak = u > b->mem_peak ? u : b->mem_peak;
}

/* one optimizer segment per tensor, as train/trainer.c's build_segments */
static struct optim_segment *gpu_segments(const struct moe_model *m, const struct train_config *tc)
{
	struct optim_segment *segs = calloc(m->n_params, sizeof(*segs));

	for (int i = 0; segs && i < m->n_params; i++) {
		const struct param *p = &m->params[i];

		segs[i].offset = p->offset;
		segs[i].numel = p->numel;
		segs[i].frozen = p->kind == PARAM_BUFFER;
		segs[i].weight_decay = param_weight_decay(p, (float)tc->weight_decay, tc->decay_embeddings);
	}
	return segs;
}

static int bench_gpu_model(struct gpu_bench *b, const struct bench_opts *o)
{
	char err[256];

	b->m = model_create(&o->c, 0, o->c.n_routed_experts, err, sizeof(err));
	if (!b->m) {
		fprintf(stderr, "bench_train: %s\n", err);
		return -1;
	}
	model_init_weights(b->m, o->seed);
	b->g = gpu_model_create(b->m, !o->fp32, err, sizeof(err));
	if (!b->g) {
		fprintf(stderr, "bench_train: %s\n", err);
		return -1;
	}
	if (attention_cuda_configure(o->attention, o->B, o->T, o->c.num_attention_heads,
				     o->c.qk_nope_head_dim + o->c.qk_rope_head_dim, o->c.v_head_dim, b->attention,
				     sizeof(b->attention))) {
		fprintf(stderr, "bench_train: %s\n", b->attention);
		return -1;
	}
	b->segs = gpu_segments(b->m, &o->rc.train);
	if (!b->segs || adamw_cuda_init(&b->opt, b->m->n_weights, b->segs, b->m->n_params)) {
		fprintf(stderr, "bench_train: out of memory for the optimizer\n");
		return -1;
	}
	b->opt_ready = 1;
	return 0;
}

static int gpu_setup(struct gpu_bench *b, const struct bench_opts *o)
{
	const struct train_config *tc = &o->rc.train;
	size_t n = (size_t)o->accum * o->B * o->T;

	if (moe_cuda_device_count() < 1) {
		fprintf(stderr, "bench_train: no CUDA device\n");
		return -1;
	}
	if (moe_cuda_init(0))
		return -1;
	b->mem_base = device_used();
	b->B = o->B;
	b->T = o->T;
	b->accum = o->accum;
	b->hp = (struct adamw_hparams){ (float)tc->lr, (float)tc->beta1, (float)tc->beta2, (float)tc->eps };
	b->clip = tc->grad_clip;
	b->V = o->c.vocab_size;
	b->inputs = malloc(sizeof(int) * n);
	b->targets = malloc(sizeof(int) * n);
	if (!b->inputs || !b->targets)
		return -1;
	rng_state ^= o->seed;
	return bench_gpu_model(b, o);
}

/* fresh random tokens for the next step (untimed): a fixed batch would be memorised in a few steps, and
 * the router's choices with it */
static void gpu_new_batch(struct gpu_bench *b)
{
	fill_tokens(b->inputs, b->targets, (size_t)b->accum * b->B * b->T, b->V);
}

static void gpu_teardown(struct gpu_bench *b)
{
	if (b->opt_ready)
		adamw_cuda_free(&b->opt);
	if (b->g)
		gpu_model_free(b->g);
	attention_cuda_release();
	if (b->m)
		model_free(b->m);
	free(b->segs);
	free(b->inputs);
	free(b->targets);
	moe_cuda_shutdown();
}

/* global-norm clipping's factor: min(1, max_norm / norm); 1 when off or the norm is not finite */
static float clip_scale(double norm, double max_norm)
{
	if (max_norm <= 0.0 || !isfinite(norm) || norm <= max_norm)
		return 1.0f;
	return (float)(max_norm / norm);
}

/* with ph: wait for the device, add the time since *t to ph[k], sample the memory in use */
static void phase_mark(struct gpu_bench *b, double *ph, int k, double *t)
{
	if (!ph)
		return;
	moe_cuda_synchronize();
	double now = now_s();
	ph[k] += now - *t;
	*t = now;
	sample_mem(b);
}

/* One update; returns when the device is done.  ph (or NULL): forward, backward, clip + AdamW seconds. */
static void gpu_step(struct gpu_bench *b, double *ph)
{
	size_t N = (size_t)b->B * b->T;
	float *w = gpu_model_weights(b->g), *grads = gpu_model_grads(b->g);
	double t = now_s();

	gpu_model_zero_grad(b->g);
	for (int a = 0; a < b->accum; a++) {
		prof_begin(PROF_FORWARD);
		b->loss = gpu_model_forward(b->g, b->inputs + a * N, b->targets + a * N, b->B, b->T);
		prof_end(PROF_FORWARD);
		phase_mark(b, ph, 0, &t);
		prof_begin(PROF_BACKWARD);
		gpu_model_backward(b->g, 1.0f / b->accum);
		prof_end(PROF_BACKWARD);
		phase_mark(b, ph, 1, &t);
	}
	prof_begin(PROF_OPTIMIZER);
	b->norm = grad_global_norm_cuda(grads, b->m->n_weights);
	adamw_cuda_update(&b->opt, w, grads, &b->hp, clip_scale(b->norm, b->clip),
			  gpu_model_weights_bf16(b->g));
	prof_end(PROF_OPTIMIZER);
	moe_cuda_synchronize();
	phase_mark(b, ph, 2, &t);
	if (!isfinite(b->loss) || !isfinite(b->norm))
		b->nonfinite++;
	if (b->steps_done++ == 0)
		b->first_loss = b->loss;
}

static const char *config_label(const struct bench_opts *o)
{
	const char *slash;

	if (!o->config_path)
		return "built-in";
	slash = strrchr(o->config_path, '/');
	return slash ? slash + 1 : o->config_path;
}

static void gpu_print_header(const struct gpu_bench *b, const struct bench_opts *o, double setup_s)
{
	const struct model_config *c = &o->c;
	double fpt = model_train_flops_per_token(c, b->T);
	struct cudaDeviceProp prop;
	int64_t total, act;

	if (cudaGetDeviceProperties(&prop, moe_cuda_current_device()) != cudaSuccess)
		snprintf(prop.name, sizeof(prop.name), "?");
	model_count_params(c, &total, &act);
	printf("bench_train: GPU training step (zero_grad + forward + backward + clip + AdamW), %s matmuls\n",
	       o->fp32 ? "fp32" : "bf16");
	printf("device        %s\n", prop.name);
	printf("%s\n", b->attention);
	printf("config        %s: hidden %d, layers %d (%d dense), heads %d, q_lora %d, kv_lora %d, "
	       "qk %d+%d, v %d\n", config_label(o), c->hidden_size, c->num_hidden_layers,
	       c->first_k_dense_replace, c->num_attention_heads, c->q_lora_rank, c->kv_lora_rank,
	       c->qk_nope_head_dim, c->qk_rope_head_dim, c->v_head_dim);
	printf("              experts %d routed top-%d + %d shared (moe_inter %d, inter %d), vocab %d\n",
	       c->n_routed_experts, c->num_experts_per_tok, c->n_shared_experts, c->moe_intermediate_size,
	       c->intermediate_size, c->vocab_size);
	printf("params        total %.4gB, activated %.4gB; %.4g GFLOP/token at T %d (6 x activated %.4g, "
	       "attention %.4g)\n", total / 1e9, act / 1e9, fpt / 1e9, b->T, 6.0 * act / 1e9,
	       (fpt - 6.0 * act) / 1e9);
	printf("setup         %.1f s (host init, upload, optimizer state)\n", setup_s);
	printf("loss          %.4f (first step), %.4f (last), random tokens; grad norm %.3g (last)\n",
	       b->first_loss, b->loss, b->norm);
}

static void gpu_report(const struct gpu_bench *b, const struct bench_opts *o, double mean, double best,
		       const double *ph)
{
	double tok = (double)b->accum * b->B * b->T;
	double flops = model_train_flops_per_token(&o->c, b->T) * tok;
	double static_b = (double)b->m->n_weights * (o->fp32 ? 16 : 18);

	printf("\n| config | B | accum | T | tokens/step | ms/step | tokens/s | TFLOP/s | MFU |\n");
	printf("|---|---|---|---|---|---|---|---|---|\n");
	printf("| %s%s | %d | %d | %d | %.0f | %.1f | %.0f | %.1f | %.1f%% |\n\n", config_label(o),
	       o->fp32 ? " (fp32)" : "", b->B, b->accum, b->T, tok, mean * 1e3, tok / mean,
	       flops / mean / 1e12, 100.0 * flops / mean / GPU_PEAK_FLOPS);
	printf("step time     mean %.1f ms, best %.1f ms over %d steps (after %d warm-up); "
	       "best %.1f TFLOP/s\n", mean * 1e3, best * 1e3, o->steps, o->warmup, flops / best / 1e12);
	printf("phases        forward %.1f ms, backward %.1f ms, clip + AdamW %.1f ms "
	       "(one synchronised step)\n", ph[0] * 1e3, ph[1] * 1e3, ph[2] * 1e3);
	printf("MFU           against %.0f TFLOP/s, bf16 dense, measured on these H100s\n",
	       GPU_PEAK_FLOPS / 1e12);
	printf("device memory %.2f GiB in use at most (cudaMemGetInfo after each phase; "
	       "%.2f GiB before the model)\n", b->mem_peak / 1073741824.0, b->mem_base / 1073741824.0);
	printf("              weights + grads + AdamW moments%s: %.2f GiB (%d B/param); scratch pool "
	       "peak %.2f GiB\n", o->fp32 ? "" : " + bf16 copy", static_b / 1073741824.0, o->fp32 ? 16 : 18,
	       pool_used_high() / 1073741824.0);
	if (b->nonfinite)
		printf("warning       %d steps had a non-finite loss or gradient norm\n", b->nonfinite);
}

static int run_gpu(const struct bench_opts *o)
{
	struct gpu_bench b = { 0 };
	double ph[3] = { 0 }, total_t = 0.0, best = 1e30, t0 = now_s();
	int rc = 1;

	if (gpu_setup(&b, o))
		goto out;
	double setup_s = now_s() - t0;
	for (int s = 0; s < o->warmup; s++) {
		gpu_new_batch(&b);
		gpu_step(&b, NULL);
	}
	prof_enable(1); /* the timed steps' regions, from CUDA events (two per region: no synchronisation) */
	for (int s = 0; s < o->steps; s++) {
		gpu_new_batch(&b);
		double t1 = now_s();
		gpu_step(&b, NULL);
		double t = now_s() - t1;
		total_t += t;
		best = t < best ? t : best;
	}
	prof_enable(0);
	sample_mem(&b);
	gpu_new_batch(&b);
	gpu_step(&b, ph);
	gpu_print_header(&b, o, setup_s);
	gpu_report(&b, o, total_t / o->steps, best, ph);
	printf("experts       %s\n", gpu_model_experts_gemm());
	printf("profile       CUDA events over the %d timed steps (attention, experts, comm inside forward and "
	       "backward; share of the mean step):", o->steps);
	prof_print(stdout, o->steps, total_t * 1e3);
	prof_reset();
	rc = 0;
out:
	gpu_teardown(&b);
	return rc;
}

#else

static int run_gpu(const struct bench_opts *o)
{
	(void)o;
	fprintf(stderr, "bench_train: --device cuda needs a CUDA build (cmake -DMOE_CUDA=ON)\n");
	return 2;
}

#endif

int main(int argc, char **argv)
{
	startup_fix_blas_kernels(argv);  /* as moe does: the kernels `moe train` would run */
	struct bench_opts o;
	int rc = parse_args(&o, argc, argv);

	if (rc) {
		if (rc == 2)
			usage(argv[0]);
		return rc;
	}
	return o.cuda ? run_gpu(&o) : run_cpu(&o);
}
