#include "harness.h"

#include "model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

void test_rng_seed(uint64_t seed)
{
	rng_state = seed * 0x9e3779b97f4a7c15ULL + 1;
}

static uint64_t next_u64(void)
{
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

float test_rand_uniform(float lo, float hi)
{
	return lo + (hi - lo) * (float)((next_u64() >> 40) * (1.0 / 16777216.0));
}

float test_randn(void)
{
	double u1 = ((next_u64() >> 11) + 0.5) * (1.0 / 9007199254740992.0);
	double u2 = (next_u64() >> 11) * (1.0 / 9007199254740992.0);
	return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

void test_fill_randn(float *x, size_t n, float scale)
{
	for (size_t i = 0; i < n; i++)
		x[i] = scale * test_randn();
}

void test_separate_routers(struct moe_model *m, uint64_t seed)
{
	const struct model_config *c = &m->cfg;

	test_rng_seed(seed);
	for (int l = 0; l < mc_n_layers(c); l++) {
		struct layer_weights *w = &m->w.layers[l];

		if (!w->gate)
			continue;
		test_fill_randn(w->gate, (size_t)c->n_routed_experts * c->hidden_size, 2.0f);
		test_fill_randn(w->e_score_correction_bias, c->n_routed_experts, 0.3f);
	}
}

const char *const test_variant_name[N_VARIANTS] = { "v3-like", "v2-like", "v2-groups", "dense-only",
						     "v3-yarn" };

void test_small_moe(struct model_config *m)
{
	m->num_attention_heads = 2;
	m->num_key_value_heads = 2;
	m->n_shared_experts = 1;
	m->n_routed_experts = 4;
	m->n_group = 2;
	m->topk_group = 1;
	m->num_experts_per_tok = 2;
	m->first_k_dense_replace = 1;
	m->kv_lora_rank = 16;
	m->q_lora_rank = 16;
	m->qk_rope_head_dim = 8;
	m->qk_nope_head_dim = 8;
	m->v_head_dim = 8;
}

void test_ep_moe(struct model_config *c, int hidden, int intermediate, int moe_intermediate, int layers)
{
	*c = (struct model_config){
		.vocab_size = 37, .hidden_size = hidden, .intermediate_size = intermediate,
		.moe_intermediate_size = moe_intermediate, .num_hidden_layers = layers,
		.num_attention_heads = 2, .num_key_value_heads = 2,
		.n_shared_experts = 1, .n_routed_experts = 8, .routed_scaling_factor = 2.5,
		.kv_lora_rank = 8, .q_lora_rank = 12, .qk_rope_head_dim = 4, .qk_nope_head_dim = 6,
		.v_head_dim = 6, .n_group = 4, .topk_group = 2, .num_experts_per_tok = 3,
		.moe_layer_freq = 1, .first_k_dense_replace = 1, .norm_topk_prob = true,
		.scoring_func = MOE_SCORING_SIGMOID, .aux_loss_alpha = 0.01, .seq_aux = true,
		.max_position_embeddings = 64, .initializer_range = 0.2, .rms_norm_eps = 1e-6,
		.rope_theta = 10000.0,
	};
}

void test_sequence(int i, int T, int *in, int *tgt, int V)
{
	uint64_t s = 0x1234567ULL + (uint64_t)i * 7919;
	for (int t = 0; t < T; t++) {
		s = s * 6364136223846793005ULL + 1442695040888963407ULL;
		in[t] = (int)((s >> 33) % V);
		tgt[t] = (int)((s >> 17) % V);
	}
}

void test_apply_variant(struct model_config *c, enum test_variant v, int yarn_original)
{
	switch (v) {
	case V2_LIKE:
		c->scoring_func = MOE_SCORING_SOFTMAX;
		c->q_lora_rank = 0;
		c->n_group = 1;
		c->topk_group = 1;
		c->n_shared_experts = 0;
		c->norm_topk_prob = false;
		c->routed_scaling_factor = 16.0;
		c->aux_loss_alpha = 0.0;
		break;
	case V2_GROUPS:
		c->scoring_func = MOE_SCORING_SOFTMAX;
		c->n_shared_experts = 2;
		c->norm_topk_prob = false;
		c->routed_scaling_factor = 1.0;
		break;
	case DENSE_ONLY:
		c->n_routed_experts = 0;
		c->first_k_dense_replace = c->num_hidden_layers;
		break;
	case V3_YARN:  /* one frequency interpolated: cos/sin x 0.964, softmax scale x 1.30 */
		c->rope_scaling = (struct rope_scaling){ .type = ROPE_YARN, .factor = 4,
			.original_max_position_embeddings = yarn_original, .mscale = 0.707, .mscale_all_dim = 1.0 };
		break;
	default:
		break;
	}
}

double rel_err(const float *a, const float *b, size_t n, double floor)
{
	double worst = 0;
	for (size_t i = 0; i < n; i++) {
		double d = fabs((double)a[i] - (double)b[i]);
		double s = fabs((double)b[i]);
		double e = d / (s > floor ? s : floor);
		if (isnan(e))
			return INFINITY;
		if (e > worst)
			worst = e;
	}
	return worst;
}

double max_rel_err(const float *a, const float *b, size_t n)
{
	double d = 0.0, s = 1e-30;
	for (size_t i = 0; i < n; i++) {
		double e = fabs((double)a[i] - b[i]);
		if (isnan(e))
			return INFINITY;
		d = e > d ? e : d;
		s = fabs(b[i]) > s ? fabs(b[i]) : s;
	}
	return d / s;
}

double norm_rel_err(const float *a, const float *b, size_t n)
{
	double d = 0.0, r = 0.0;
	for (size_t i = 0; i < n; i++) {
		if (!isfinite(a[i]))
			return INFINITY;
		d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
		r += (double)b[i] * b[i];
	}
	return r > 0 ? sqrt(d / r) : sqrt(d);
}

const char *test_tmpdir(void)
{
	static char dir[256];
	if (!dir[0]) {
		const char *base = getenv("TMPDIR");
		snprintf(dir, sizeof(dir), "%s/moe-test-%d", base ? base : "/tmp", (int)getpid());
		char cmd[300];
		snprintf(cmd, sizeof(cmd), "mkdir -p '%s'", dir);
		if (system(cmd) != 0) {
			fprintf(stderr, "cannot create %s\n", dir);
			exit(2);
		}
	}
	return dir;
}

const char *tmp_path(const char *name)
{
	static char path[8][600];
	static int next;
	char *p = path[next++ & 7];

	snprintf(p, sizeof(path[0]), "%s/%s", test_tmpdir(), name);
	return p;
}

const char *src_path(const char *rel)
{
	static char path[8][1100];
	static int next;
	char *p = path[next++ & 7];
	const char *src = getenv("MOE_SRC"), *f = __FILE__;
	size_t n = strlen(f), tail = strlen("tests/harness.c");

	if (src && src[0])
		snprintf(p, sizeof(path[0]), "%s/%s", src, rel);
	else if (n > tail && !strcmp(f + n - tail, "tests/harness.c"))
		snprintf(p, sizeof(path[0]), "%.*s%s", (int)(n - tail), f, rel);
	else
		snprintf(p, sizeof(path[0]), "%s", rel);  /* run from the source root */
	return p;
}

char *test_read_file(const char *path, size_t *n)
{
	FILE *f = fopen(path, "rb");
	char *buf;
	long len;

	if (!f || fseek(f, 0, SEEK_END) || (len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET)) {
		fprintf(stderr, "test_read_file: cannot read %s\n", path);
		exit(2);
	}
	buf = test_xmalloc((size_t)len + 1);
	if (fread(buf, 1, (size_t)len, f) != (size_t)len) {
		fprintf(stderr, "test_read_file: short read of %s\n", path);
		exit(2);
	}
	fclose(f);
	buf[len] = '\0';
	if (n)
		*n = (size_t)len;
	return buf;
}

void add_suite(const char *name, const struct test_case *cases)
{
	CU_pSuite suite = CU_add_suite(name, NULL, NULL);
	if (!suite) {
		fprintf(stderr, "CU_add_suite(%s): %s\n", name, CU_get_error_msg());
		exit(2);
	}
	for (const struct test_case *t = cases; t->name; t++) {
		if (!CU_add_test(suite, t->name, t->fn)) {
			fprintf(stderr, "CU_add_test(%s): %s\n", t->name, CU_get_error_msg());
			exit(2);
		}
	}
}

int main(void)
{
	if (CU_initialize_registry() != CUE_SUCCESS)
		return 2;
	register_tests();
	CU_basic_set_mode(CU_BRM_VERBOSE);
	CU_basic_run_tests();
	/* CU_basic_run_tests() succeeding says nothing about failed tests: ask. */
	unsigned failed = CU_get_number_of_tests_failed() + CU_get_number_of_failures();
	unsigned errors = CU_get_error();
	CU_cleanup_registry();
	return (failed || errors) ? 1 : 0;
}

void *test_xmalloc(size_t bytes)
{
	void *p = malloc(bytes ? bytes : 1);
	if (!p) {
		fprintf(stderr, "out of memory\n");
		exit(2);
	}
	return p;
}

/* the small model of the gradient tests (tests/model/test_model.c, test_lora.c) */
struct model_config test_grad_config(enum test_variant v)
{
	struct model_config c = {
		.vocab_size = 29, .hidden_size = 16, .intermediate_size = 24, .moe_intermediate_size = 8,
		.num_hidden_layers = 3, .num_attention_heads = 2, .num_key_value_heads = 2,
		.n_shared_experts = 1, .n_routed_experts = 8, .routed_scaling_factor = 2.5,
		.kv_lora_rank = 8, .q_lora_rank = 8, .qk_rope_head_dim = 4, .qk_nope_head_dim = 4,
		.v_head_dim = 6, .n_group = 4, .topk_group = 2, .num_experts_per_tok = 2,
		.moe_layer_freq = 1, .first_k_dense_replace = 1, .norm_topk_prob = true,
		.scoring_func = MOE_SCORING_SIGMOID, .aux_loss_alpha = 0.05, .seq_aux = true,
		.max_position_embeddings = 64, .initializer_range = 0.3, .rms_norm_eps = 1e-6,
		.rope_theta = 10000.0,
	};
	test_apply_variant(&c, v, 4);  /* an original context of 4 < T */
	return c;
}
