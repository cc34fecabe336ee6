/*
 * bench/bench_train.c - throughput of the CPU training step (float32 reference path).
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

#include "model/model.h"

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
		"usage: %s [--steps N] [--warmup N] [--threads N] [--batch B] [--seq T] [--layers L]\n"
		"          [--hidden C] [--heads H] [--vocab V] [--inter I] [--moe-inter Im] [--experts E]\n"
		"          [--topk K] [--shared S] [--dense D] [--groups G] [--topk-groups TG]\n"
		"          [--sgemm-n N] [--sgemm-reps R] [--no-sgemm] [--adamw] [--check] [--seed S]\n",
		prog);
}

int main(int argc, char **argv)
{
	struct model_config c = default_config();
	int steps = 10, warmup = 2, threads = 0, B = 4, T = 256, sgemm_n = 2048, sgemm_reps = 3;
	int do_sgemm = 1, do_adamw = 0, do_check = 0;
	uint64_t seed = 1234;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		int has = i + 1 < argc;
#define INTARG(flag, dst)                                  \
	if (!strcmp(a, flag) && has) {                     \
		dst = atoi(argv[++i]);                     \
		continue;                                  \
	}
		INTARG("--steps", steps)
		INTARG("--warmup", warmup)
		INTARG("--threads", threads)
		INTARG("--batch", B)
		INTARG("--seq", T)
		INTARG("--layers", c.num_hidden_layers)
		INTARG("--hidden", c.hidden_size)
		INTARG("--heads", c.num_attention_heads)
		INTARG("--vocab", c.vocab_size)
		INTARG("--inter", c.intermediate_size)
		INTARG("--moe-inter", c.moe_intermediate_size)
		INTARG("--experts", c.n_routed_experts)
		INTARG("--topk", c.num_experts_per_tok)
		INTARG("--shared", c.n_shared_experts)
		INTARG("--dense", c.first_k_dense_replace)
		INTARG("--groups", c.n_group)
		INTARG("--topk-groups", c.topk_group)
		INTARG("--sgemm-n", sgemm_n)
		INTARG("--sgemm-reps", sgemm_reps)
#undef INTARG
		if (!strcmp(a, "--seed") && has) {
			seed = strtoull(argv[++i], NULL, 10);
			continue;
		}
		if (!strcmp(a, "--no-sgemm")) {
			do_sgemm = 0;
			continue;
		}
		if (!strcmp(a, "--check")) {
			do_check = 1;
			continue;
		}
		if (!strcmp(a, "--adamw")) {
			do_adamw = 1;
			continue;
		}
		usage(argv[0]);
		return 2;
	}
	c.num_key_value_heads = c.num_attention_heads;
	if (steps < 1 || warmup < 0 || B < 1 || T < 1 || sgemm_reps < 1) {
		usage(argv[0]);
		return 2;
	}
	if (threads > 0)
		omp_set_num_threads(threads);
	threads = omp_get_max_threads();

	char err[256];
	struct moe_model *m = model_create(&c, 0, c.n_routed_experts, err, sizeof(err));
	if (!m) {
		fprintf(stderr, "bench_train: %s\n", err);
		return 1;
	}
	model_init_weights(m, seed);
	int64_t total, activated;
	model_count_params(&c, &total, &activated);

	int N = B * T;
	int *inputs = malloc(sizeof(int) * N), *targets = malloc(sizeof(int) * N);
	rng_state ^= seed;
	for (int n = 0; n < N; n++) {
		inputs[n] = (int)(rng_u32() % (uint32_t)c.vocab_size);
		targets[n] = (int)(rng_u32() % (uint32_t)c.vocab_size);
	}

	float loss = 0.0f;
	for (int s = 0; s < warmup; s++) {
		model_zero_grad(m);
		loss = model_forward(m, inputs, targets, B, T);
		model_backward(m, 1.0f);
	}
	double best = 1e30, total_t = 0.0, tf = 0.0, tb = 0.0, c0 = cpu_s();
	for (int s = 0; s < steps; s++) {
		double t0 = now_s();
		model_zero_grad(m);
		loss = model_forward(m, inputs, targets, B, T);
		double t1 = now_s();
		model_backward(m, 1.0f);
		double t2 = now_s();
		double t = t2 - t0;
		total_t += t;
		tf += t1 - t0;
		tb += t2 - t1;
		best = t < best ? t : best;
	}
	double mean = total_t / (steps > 0 ? steps : 1);
	double cpu_step = (cpu_s() - c0) / (steps > 0 ? steps : 1);
	/* peak RSS of the training steps, before the optional AdamW state and the sgemm matrices */
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);

	double adamw_t = 0.0;
	if (do_adamw) {
		float *m1 = calloc(m->n_weights, sizeof(float)), *m2 = calloc(m->n_weights, sizeof(float));
		adamw_pass(m->weights, m->grads, m1, m2, m->n_weights, 1);
		double t0 = now_s();
		for (int s = 0; s < steps; s++)
			adamw_pass(m->weights, m->grads, m1, m2, m->n_weights, s + 2);
		adamw_t = (now_s() - t0) / (steps > 0 ? steps : 1);
		free(m1);
		free(m2);
	}

	double P, attn;
	count_flops(&c, T, &P, &attn);
	double flops_step = 6.0 * P * N + 3.0 * attn * N;
	double sg = do_sgemm ? sgemm_rate(sgemm_n, sgemm_reps) : 0.0;

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
	printf("              batch %d x seq %d = %d tokens/step, threads %d\n", B, T, N, threads);
	printf("params        total %.2fM, activated %.2fM; matmul params/token %.2fM\n", total / 1e6,
	       activated / 1e6, P / 1e6);
	printf("model FLOPs   %.2f GFLOP/step (matmul %.2f, attention %.2f)\n", flops_step / 1e9,
	       6.0 * P * N / 1e9, 3.0 * attn * N / 1e9);
	printf("loss          %.4f (last step)\n", loss);
	printf("step time     mean %.1f ms (fwd %.1f, bwd %.1f), best %.1f ms over %d steps\n", mean * 1e3,
	       tf / steps * 1e3, tb / steps * 1e3, best * 1e3, steps);
	printf("cpu time      %.1f ms/step over all threads (%.2f cores busy; %.1f GFLOP per cpu-second)\n",
	       cpu_step * 1e3, cpu_step / mean, flops_step / cpu_step / 1e9);
	printf("tokens/s      %.0f (mean), %.0f (best)\n", N / mean, N / best);
	printf("model FLOP/s  %.2f GFLOP/s (mean), %.2f (best)\n", flops_step / mean / 1e9,
	       flops_step / best / 1e9);
	if (do_sgemm) {
		printf("sgemm         %.2f GFLOP/s (%d^3, best of %d, %d threads)\n", sg / 1e9, sgemm_n, sgemm_reps,
		       threads);
		printf("ratio         %.1f%% of sgemm (mean), %.1f%% (best)\n", 100.0 * flops_step / mean / sg,
		       100.0 * flops_step / best / sg);
	}
	if (do_adamw)
		printf("adamw pass    %.2f ms/step (%.1f%% of the step)\n", adamw_t * 1e3,
		       100.0 * adamw_t / (mean + adamw_t));
	printf("peak RSS      %.1f MiB (after the timed steps)\n", ru.ru_maxrss / 1024.0);
	int ok = 1;
	if (do_check)
		ok = check_threads(m, inputs, targets, B, T, threads);

	free(inputs);
	free(targets);
	model_free(m);
	return ok ? 0 : 1;
}
