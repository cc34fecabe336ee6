/*
 * tests/model/test_model_flops.c - model_train_flops_per_token against counts made by hand: a config
 * shaped like configs/tiny.json (with and without q_lora) and DeepSeek-V2-Lite at T = 4096.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "harness.h"
#include "model/model.h"
#include "train/config.h"

/* configs/tiny.json's model section */
static struct model_config tiny_config(void)
{
	struct model_config c = {
		.vocab_size = 256, .hidden_size = 64, .intermediate_size = 128, .moe_intermediate_size = 32,
		.num_hidden_layers = 2, .num_attention_heads = 4, .num_key_value_heads = 4,
		.n_shared_experts = 1, .n_routed_experts = 8, .routed_scaling_factor = 2.5,
		.kv_lora_rank = 32, .q_lora_rank = 32, .qk_rope_head_dim = 8, .qk_nope_head_dim = 16,
		.v_head_dim = 16, .n_group = 2, .topk_group = 1, .num_experts_per_tok = 2,
		.moe_layer_freq = 1, .first_k_dense_replace = 1, .norm_topk_prob = true,
		.scoring_func = MOE_SCORING_SIGMOID, .seq_aux = true, .max_position_embeddings = 2048,
		.initializer_range = 0.02, .rms_norm_eps = 1e-6, .rope_theta = 10000.0,
	};
	return c;
}

/*
 * By hand, C 64, H 4, dq 16+8 = 24, dv 16, q_lora 32, kv_lora 32, rope 8:
 *   attention   q_a 32*64 + q_a_norm 32 + q_b 4*24*32            = 2048 + 32 + 3072 = 5152
 *               kv_a (32+8)*64 + kv_a_norm 32                     = 2592
 *               kv_b 4*(16+16)*32 + o 64*4*16                     = 4096 + 4096
 *               + 2 layer norms 2*64                              -> 16064 per layer
 *   layer 0     dense SwiGLU 3*64*128                             = 24576
 *   layer 1     (top-2 + 1 shared) * 3*64*32 (router excluded)    = 18432
 *   final norm 64 + lm_head 256*64                                = 16448
 *   activated = 2*16064 + 24576 + 18432 + 16448                   = 91584
 *   attention at T = 32: 3 * L * 2*H*(dq+dv) * (T+1)/2 = 3 * 2 * 4 * 40 * 33 = 31680
 *   total = 6 * 91584 + 31680 = 581184
 */
static void test_tiny(void)
{
	struct model_config c = tiny_config();
	int64_t total, act;

	model_count_params(&c, &total, &act);
	CU_ASSERT_EQUAL(act, 91584);
	CU_ASSERT_DOUBLE_EQUAL(model_train_flops_per_token(&c, 32), 581184.0, 1e-6);
}

/* q_lora_rank 0: q_proj 4*24*64 = 6144 instead of 5152 per layer, activated 91584 + 2*992 = 93568;
 * T = 1 (one key): 3 * L * 2*H*(dq+dv) * 1 = 3 * 2 * 320 = 1920; total 6 * 93568 + 1920 = 563328. */
static void test_tiny_q_proj(void)
{
	struct model_config c = tiny_config();

	c.q_lora_rank = 0;
	CU_ASSERT_DOUBLE_EQUAL(model_train_flops_per_token(&c, 1), 563328.0, 1e-6);
}

/* The attention term grows linearly in T: 3 * L * H * (dq + dv) per extra token of sequence. */
static void test_linear_in_t(void)
{
	struct model_config c = tiny_config();
	double step = 3.0 * 2 * 4 * 40;

	CU_ASSERT_DOUBLE_EQUAL(model_train_flops_per_token(&c, 1000) - model_train_flops_per_token(&c, 999),
			       step, 1e-6);
	CU_ASSERT_DOUBLE_EQUAL(model_train_flops_per_token(&c, 4096) - model_train_flops_per_token(&c, 2048),
			       step * 2048, 1e-6);
}

static int load_config(const char *file, struct model_config *mc)
{
	char path[1024], err[512];
	struct run_config rc;

	snprintf(path, sizeof(path), "configs/%s", file);
	config_defaults(&rc);
	if (config_load(&rc, src_path(path), NULL, 0, err, sizeof(err))) {
		printf("\n  %s\n", err);
		return -1;
	}
	*mc = rc.model;
	return 0;
}

/*
 * DeepSeek-V2-Lite (published: 2.4B activated): 27 layers, C 2048, H 16, dq 128+64, dv 128, kv_lora 512,
 * 1 dense layer of 10944, 26 MoE layers of (6 routed + 2 shared) * 3*2048*1408, vocab 102400:
 *   attention per layer 16*192*2048 + 576*2048 + 512 + 16*256*512 + 2048*2048 = 13763072
 *   activated = 27*(2*2048 + 13763072) + 3*2048*10944 + 26*8*3*2048*1408 + 2048 + 102400*2048
 *             = 2448027136
 *   attention at T = 4096: 3 * 27 * 2*16*320 * 4097/2 = 3 * 566369280 = 1699107840
 *   total = 6 * 2448027136 + 1699107840 = 16387270656 (16.4 GFLOP per token)
 */
static void test_v2_lite(void)
{
	struct model_config c;
	int64_t total, act;

	CU_ASSERT_EQUAL_FATAL(load_config("deepseek-v2-lite.json", &c), 0);
	model_count_params(&c, &total, &act);
	CU_ASSERT_EQUAL(act, 2448027136LL);
	CU_ASSERT(fabs(act / 2.4e9 - 1.0) < 0.025);
	CU_ASSERT_DOUBLE_EQUAL(model_train_flops_per_token(&c, 4096), 16387270656.0, 1e-3);
	CU_ASSERT_DOUBLE_EQUAL(model_train_flops_per_token(&c, 4096), 6 * 2.448027136e9 + 3 * 566369280.0,
			       1e-3);
	printf("\n  deepseek-v2-lite.json: %.4g FLOP/token at T=4096", model_train_flops_per_token(&c, 4096));
}

void register_tests(void)
{
	static const struct test_case cases[] = {
		{ "tiny.json shape, by hand", test_tiny },
		{ "q_proj instead of q_lora, T = 1", test_tiny_q_proj },
		{ "attention term linear in T", test_linear_in_t },
		{ "DeepSeek-V2-Lite at T = 4096", test_v2_lite },
		{ NULL, NULL },
	};
	add_suite("model training FLOPs", cases);
}
