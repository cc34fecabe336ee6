/*
 * model/model.c - the parameter table, initialisation, and the whole model's forward and backward on
 * the CPU: embedding -> L x (MLA, dense SwiGLU or DeepSeekMoE) -> final norm -> lm_head -> cross-entropy.
 *
 * The layer math lives in model/mla.c and model/moe.c; this file owns the buffers and the order.
 */
#include "model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launch/rng.h"
#include "model/layers.h"
#include "model/lora.h"
#include "model/mtp.h"
#include "model/ops.h"
#include "model/quant.h"

/* ---------------------------------------------------------------- parameter table */

struct param_builder {
	struct moe_model *m;
	int cap;
	float ***w_slots;  /* where each param's weight view goes */
	float ***g_slots;  /* and its gradient view */
	size_t offset;
	int failed;
};

static void add_param(struct param_builder *b, enum param_kind kind, int layer, int stacked,
		      float **w_slot, float **g_slot, int ndim, int64_t d0, int64_t d1, int64_t d2,
		      const char *fmt, ...) __attribute__((format(printf, 11, 12)));

#include <stdarg.h>

static void add_param(struct param_builder *b, enum param_kind kind, int layer, int stacked,
		      float **w_slot, float **g_slot, int ndim, int64_t d0, int64_t d1, int64_t d2,
		      const char *fmt, ...)
{
	struct moe_model *m = b->m;
	if (m->n_params == b->cap) {
		b->cap = b->cap ? 2 * b->cap : 64;
		m->params = realloc(m->params, sizeof(*m->params) * b->cap);
		b->w_slots = realloc(b->w_slots, sizeof(*b->w_slots) * b->cap);
		b->g_slots = realloc(b->g_slots, sizeof(*b->g_slots) * b->cap);
		if (!m->params || !b->w_slots || !b->g_slots) {
			b->failed = 1;
			m->n_params = 0;
			return;
		}
	}
	struct param *p = &m->params[m->n_params];
	memset(p, 0, sizeof(*p));
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(p->name, sizeof(p->name), fmt, ap);
	va_end(ap);
	p->ndim = ndim;
	p->shape[0] = d0;
	p->shape[1] = ndim > 1 ? d1 : 1;
	p->shape[2] = ndim > 2 ? d2 : 1;
	p->kind = kind;
	p->layer = layer;
	p->expert_stacked = stacked;
	int64_t rows = stacked ? m->expert_end - m->expert_begin : d0;
	p->numel = (size_t)(rows * p->shape[1] * p->shape[2]);
	p->offset = b->offset;
	b->offset += p->numel;
	b->w_slots[m->n_params] = w_slot;
	b->g_slots[m->n_params] = g_slot;
	m->n_params++;
}

#define W(field) &m->w.field, &m->g.field
#define LW(field) &m->w.layers[l].field, &m->g.layers[l].field

static void build_attention_params(struct param_builder *b, int l)
{
	struct moe_model *m = b->m;
	const struct model_config *c = &m->cfg;
	int64_t C = c->hidden_size, H = c->num_attention_heads, dq = mc_qk_head_dim(c);
	const char *pre = "model.layers";

	if (c->q_lora_rank > 0) {
		add_param(b, PARAM_LINEAR, l, 0, LW(q_a_proj), 2, c->q_lora_rank, C, 0,
			  "%s.%d.self_attn.q_a_proj.weight", pre, l);
		add_param(b, PARAM_NORM, l, 0, LW(q_a_layernorm), 1, c->q_lora_rank, 0, 0,
			  "%s.%d.self_attn.q_a_layernorm.weight", pre, l);
		add_param(b, PARAM_LINEAR, l, 0, LW(q_b_proj), 2, H * dq, c->q_lora_rank, 0,
			  "%s.%d.self_attn.q_b_proj.weight", pre, l);
	} else {
		add_param(b, PARAM_LINEAR, l, 0, LW(q_proj), 2, H * dq, C, 0,
			  "%s.%d.self_attn.q_proj.weight", pre, l);
	}
	add_param(b, PARAM_LINEAR, l, 0, LW(kv_a_proj_with_mqa), 2, c->kv_lora_rank + c->qk_rope_head_dim,
		  C, 0, "%s.%d.self_attn.kv_a_proj_with_mqa.weight", pre, l);
	add_param(b, PARAM_NORM, l, 0, LW(kv_a_layernorm), 1, c->kv_lora_rank, 0, 0,
		  "%s.%d.self_attn.kv_a_layernorm.weight", pre, l);
	add_param(b, PARAM_LINEAR, l, 0, LW(kv_b_proj), 2, H * (c->qk_nope_head_dim + c->v_head_dim),
		  c->kv_lora_rank, 0, "%s.%d.self_attn.kv_b_proj.weight", pre, l);
	add_param(b, PARAM_LINEAR, l, 0, LW(o_proj), 2, C, H * c->v_head_dim, 0,
		  "%s.%d.self_attn.o_proj.weight", pre, l);
}

static void build_ffn_params(struct param_builder *b, int l)
{
	struct moe_model *m = b->m;
	const struct model_config *c = &m->cfg;
	int64_t C = c->hidden_size, E = c->n_routed_experts, Im = c->moe_intermediate_size;
	const char *pre = "model.layers";

	if (!mc_layer_is_moe(c, l)) {
		int64_t I = c->intermediate_size;
		add_param(b, PARAM_LINEAR, l, 0, LW(mlp_gate_proj), 2, I, C, 0, "%s.%d.mlp.gate_proj.weight", pre, l);
		add_param(b, PARAM_LINEAR, l, 0, LW(mlp_up_proj), 2, I, C, 0, "%s.%d.mlp.up_proj.weight", pre, l);
		add_param(b, PARAM_LINEAR, l, 0, LW(mlp_down_proj), 2, C, I, 0, "%s.%d.mlp.down_proj.weight", pre, l);
		return;
	}
	add_param(b, PARAM_LINEAR, l, 0, LW(gate), 2, E, C, 0, "%s.%d.mlp.gate.weight", pre, l);
	add_param(b, PARAM_BUFFER, l, 0, LW(e_score_correction_bias), 1, E, 0, 0,
		  "%s.%d.mlp.gate.e_score_correction_bias", pre, l);
	add_param(b, PARAM_LINEAR, l, 1, LW(experts_gate_proj), 3, E, Im, C,
		  "%s.%d.mlp.experts.gate_proj.weight", pre, l);
	add_param(b, PARAM_LINEAR, l, 1, LW(experts_up_proj), 3, E, Im, C,
		  "%s.%d.mlp.experts.up_proj.weight", pre, l);
	add_param(b, PARAM_LINEAR, l, 1, LW(experts_down_proj), 3, E, C, Im,
		  "%s.%d.mlp.experts.down_proj.weight", pre, l);
	if (c->n_shared_experts > 0) {
		int64_t Is = (int64_t)c->n_shared_experts * Im;
		add_param(b, PARAM_LINEAR, l, 0, LW(shared_gate_proj), 2, Is, C, 0,
			  "%s.%d.mlp.shared_experts.gate_proj.weight", pre, l);
		add_param(b, PARAM_LINEAR, l, 0, LW(shared_up_proj), 2, Is, C, 0,
			  "%s.%d.mlp.shared_experts.up_proj.weight", pre, l);
		add_param(b, PARAM_LINEAR, l, 0, LW(shared_down_proj), 2, C, Is, 0,
			  "%s.%d.mlp.shared_experts.down_proj.weight", pre, l);
	}
}

static void build_layer_params(struct param_builder *b, int l)
{
	struct moe_model *m = b->m;
	int64_t C = m->cfg.hidden_size;

	add_param(b, PARAM_NORM, l, 0, LW(input_layernorm), 1, C, 0, 0,
		  "model.layers.%d.input_layernorm.weight", l);
	build_attention_params(b, l);
	add_param(b, PARAM_NORM, l, 0, LW(post_attention_layernorm), 1, C, 0, 0,
		  "model.layers.%d.post_attention_layernorm.weight", l);
	build_ffn_params(b, l);
}

#define MW(field) &m->w.mtp[k].field, &m->g.mtp[k].field

/* MTP depth k = l - L + 1 under Hugging Face's names: model.layers.{l}.{enorm,hnorm,eh_proj,...} (the
 * shared_head.head and embed_tokens copies HF files carry are the model's lm_head and embedding) */
static void build_mtp_params(struct param_builder *b, int l)
{
	struct moe_model *m = b->m;
	int64_t C = m->cfg.hidden_size;
	int k = l - m->cfg.num_hidden_layers;

	add_param(b, PARAM_NORM, l, 0, MW(enorm), 1, C, 0, 0, "model.layers.%d.enorm.weight", l);
	add_param(b, PARAM_NORM, l, 0, MW(hnorm), 1, C, 0, 0, "model.layers.%d.hnorm.weight", l);
	add_param(b, PARAM_LINEAR, l, 0, MW(eh_proj), 2, C, 2 * C, 0, "model.layers.%d.eh_proj.weight", l);
	build_layer_params(b, l);
	add_param(b, PARAM_NORM, l, 0, MW(shared_head_norm), 1, C, 0, 0,
		  "model.layers.%d.shared_head.norm.weight", l);
}

static void build_params(struct param_builder *b)
{
	struct moe_model *m = b->m;
	const struct model_config *c = &m->cfg;
	int64_t C = c->hidden_size, V = c->vocab_size;

	add_param(b, PARAM_EMBEDDING, -1, 0, W(embed_tokens), 2, V, C, 0, "model.embed_tokens.weight");
	for (int l = 0; l < c->num_hidden_layers; l++)
		build_layer_params(b, l);
	add_param(b, PARAM_NORM, -1, 0, W(norm), 1, C, 0, 0, "model.norm.weight");
	add_param(b, PARAM_LINEAR, -1, 0, W(lm_head), 2, V, C, 0, "lm_head.weight");
	for (int l = c->num_hidden_layers; l < mc_n_layers(c); l++)
		build_mtp_params(b, l);
}

static int check_shapes(const struct model_config *c, char *err, size_t errlen)
{
	const char *bad = NULL;
	if (c->vocab_size <= 0) bad = "vocab_size";
	else if (c->hidden_size <= 0) bad = "hidden_size";
	else if (c->num_hidden_layers <= 0) bad = "num_hidden_layers";
	else if (c->num_attention_heads <= 0) bad = "num_attention_heads";
	else if (c->kv_lora_rank <= 0) bad = "kv_lora_rank";
	else if (c->q_lora_rank < 0) bad = "q_lora_rank";
	else if (c->qk_rope_head_dim <= 0 || c->qk_rope_head_dim % 2 || c->qk_rope_head_dim > MC_ROPE_MAX_DIM)
		bad = "qk_rope_head_dim";
	else if (c->qk_nope_head_dim < 0) bad = "qk_nope_head_dim";
	else if (c->v_head_dim <= 0) bad = "v_head_dim";
	else if (c->num_nextn_predict_layers < 0 || c->num_nextn_predict_layers > MTP_MAX_DEPTH)
		bad = "num_nextn_predict_layers";
	else if (c->first_k_dense_replace > 0 && c->intermediate_size <= 0) bad = "intermediate_size";
	else if (c->n_routed_experts > 0) {
		if (c->moe_intermediate_size <= 0) bad = "moe_intermediate_size";
		else if (c->num_experts_per_tok <= 0 || c->num_experts_per_tok > c->n_routed_experts)
			bad = "num_experts_per_tok";
		else if (c->n_group <= 0 || c->n_group > 256 || c->n_routed_experts % c->n_group)
			bad = "n_group";
		else if (c->topk_group <= 0 || c->topk_group > c->n_group) bad = "topk_group";
	}
	if (bad) {
		snprintf(err, errlen, "model.%s: impossible value for this model", bad);
		return -1;
	}
	return 0;
}

/* The model without its arenas: config, layer views and the parameter table (offsets into arenas of
 * b->offset floats that are not allocated yet).  NULL and err filled on failure. */
static struct moe_model *model_shell(const struct model_config *cfg, int expert_begin, int expert_end,
				     struct param_builder *b, char *err, size_t errlen)
{
	if (check_shapes(cfg, err, errlen))
		return NULL;
	if (expert_begin < 0 || expert_end < expert_begin || expert_end > cfg->n_routed_experts) {
		snprintf(err, errlen, "bad expert range [%d, %d) of %d", expert_begin, expert_end,
			 cfg->n_routed_experts);
		return NULL;
	}
	struct moe_model *m = calloc(1, sizeof(*m));
	b->m = m;
	if (!m)
		goto oom;
	m->cfg = *cfg;
	m->expert_begin = expert_begin;
	m->expert_end = expert_end;
	m->w.layers = calloc(mc_n_layers(cfg), sizeof(struct layer_weights));
	m->g.layers = calloc(mc_n_layers(cfg), sizeof(struct layer_weights));
	m->expert_load = calloc((size_t)mc_n_layers(cfg) * (cfg->n_routed_experts + 1), sizeof(int64_t));
	if (!m->w.layers || !m->g.layers || !m->expert_load)
		goto oom;
	if (cfg->num_nextn_predict_layers > 0) {
		m->w.mtp = calloc(cfg->num_nextn_predict_layers, sizeof(struct mtp_weights));
		m->g.mtp = calloc(cfg->num_nextn_predict_layers, sizeof(struct mtp_weights));
		if (!m->w.mtp || !m->g.mtp)
			goto oom;
	}
	build_params(b);
	if (b->failed)
		goto oom;
	return m;
oom:
	free(b->w_slots);
	free(b->g_slots);
	snprintf(err, errlen, "out of memory building the model's parameter table");
	model_free(m);
	return NULL;
}

struct moe_model *model_create(const struct model_config *cfg, int expert_begin, int expert_end,
			       char *err, size_t errlen)
{
	struct param_builder b = { 0 };
	struct moe_model *m = model_shell(cfg, expert_begin, expert_end, &b, err, errlen);
	if (!m)
		return NULL;
	m->n_weights = b.offset;
	m->weights = calloc(m->n_weights, sizeof(float));
	m->grads = calloc(m->n_weights, sizeof(float));
	if (!m->weights || !m->grads) {
		snprintf(err, errlen, "out of memory building the model (%zu floats)", b.offset);
		free(b.w_slots);
		free(b.g_slots);
		model_free(m);
		return NULL;
	}
	for (int i = 0; i < m->n_params; i++) {
		*b.w_slots[i] = m->weights + m->params[i].offset;
		*b.g_slots[i] = m->grads + m->params[i].offset;
	}
	free(b.w_slots);
	free(b.g_slots);
	return m;
}

struct param *model_param_table(const struct model_config *cfg, int *n, char *err, size_t errlen)
{
	struct param_builder b = { 0 };
	struct moe_model *m = model_shell(cfg, 0, cfg->n_routed_experts, &b, err, errlen);
	if (!m)
		return NULL;
	struct param *p = m->params;
	*n = m->n_params;
	m->params = NULL;
	free(b.w_slots);
	free(b.g_slots);
	model_free(m);
	return p;
}

void model_free(struct moe_model *m)
{
	if (!m)
		return;
	model_acts_free(m);
	quant_free(m->quant);
	free(m->params);
	free(m->weights);
	free(m->grads);
	free(m->w.layers);
	free(m->g.layers);
	free(m->w.mtp);
	free(m->g.mtp);
	free(m->expert_load);
	free(m);
}

const struct param *model_find_param(const struct moe_model *m, const char *name)
{
	for (int i = 0; i < m->n_params; i++)
		if (!strcmp(m->params[i].name, name))
			return &m->params[i];
	return NULL;
}

void model_zero_grad(struct moe_model *m)
{
	if (m->lora)
		lora_zero_grad(m->lora);
	if (!m->grads)  /* frozen (LoRA) */
		return;
	const size_t chunk = (size_t)1 << 18;  /* 1 MiB of floats per task */
	size_t n = m->n_weights, nchunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) if (nchunks > 1)
	for (size_t i = 0; i < nchunks; i++)
		memset(m->grads + i * chunk, 0, sizeof(float) * (i * chunk + chunk < n ? chunk : n - i * chunk));
}

void model_drop_grads(struct moe_model *m)
{
	free(m->grads);
	m->grads = NULL;
	memset(m->g.layers, 0, sizeof(*m->g.layers) * mc_n_layers(&m->cfg));
	if (m->g.mtp)
		memset(m->g.mtp, 0, sizeof(*m->g.mtp) * m->cfg.num_nextn_predict_layers);
	m->g.embed_tokens = m->g.norm = m->g.lm_head = NULL;
}

/* ---------------------------------------------------------------- counting */

void model_count_params(const struct model_config *cfg, int64_t *total, int64_t *activated)
{
	const struct model_config *c = cfg;
	int64_t C = c->hidden_size, H = c->num_attention_heads, V = c->vocab_size;
	int64_t dq = mc_qk_head_dim(c), attn = 0, t = 0, act;

	if (c->q_lora_rank > 0)
		attn += c->q_lora_rank * C + c->q_lora_rank + H * dq * c->q_lora_rank;
	else
		attn += H * dq * C;
	attn += (int64_t)(c->kv_lora_rank + c->qk_rope_head_dim) * C + c->kv_lora_rank;
	attn += H * (c->qk_nope_head_dim + c->v_head_dim) * c->kv_lora_rank + C * H * c->v_head_dim;

	int64_t expert = 3 * C * (int64_t)c->moe_intermediate_size;
	int64_t inactive = 0, routers = 0;
	t = V * C;  /* embedding */
	for (int l = 0; l < c->num_hidden_layers; l++) {
		t += 2 * C + attn;
		if (mc_layer_is_moe(c, l)) {
			t += (int64_t)c->n_routed_experts * (C + 1) + c->n_routed_experts * expert +
			     c->n_shared_experts * expert;
			inactive += (int64_t)(c->n_routed_experts - c->num_experts_per_tok) * expert;
			routers += (int64_t)c->n_routed_experts * (C + 1);
		} else {
			t += 3 * C * (int64_t)c->intermediate_size;
		}
	}
	t += C + V * C;  /* final norm, lm_head */
	/*
	 * Activated per token as DeepSeek reports it: without the input embedding table (a lookup) and
	 * without the routers.  With the routers V2-Lite would count 2.451B, not its published 2.4B; the
	 * routers are 0.1-0.3% of the activated count of V2 and V3 either way.
	 */
	act = t - inactive - routers - V * C;
	*total = t;
	*activated = act;
}

/* ---------------------------------------------------------------- initialisation */

static uint64_t fnv1a(const char *s)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
	return h;
}

/* n normal(0, std) draws from the stream seeded by (seed, name, expert), Box-Muller in double */
static void fill_normal(float *x, size_t n, double std, uint64_t seed, const char *name, int64_t expert)
{
	uint64_t s = seed ^ fnv1a(name) ^ ((uint64_t)(expert + 1) * 0xd1b54a32d192ed03ULL);
	splitmix64(&s);
	for (size_t i = 0; i < n; i += 2) {
		double u1 = ((splitmix64(&s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
		double u2 = (splitmix64(&s) >> 11) * (1.0 / 9007199254740992.0);
		double r = sqrt(-2.0 * log(u1)) * std;
		x[i] = (float)(r * cos(6.283185307179586 * u2));
		if (i + 1 < n)
			x[i + 1] = (float)(r * sin(6.283185307179586 * u2));
	}
}

void model_init_weights(struct moe_model *m, uint64_t seed)
{
	double std = m->cfg.initializer_range;
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];
		float *w = m->weights + p->offset;
		if (p->kind == PARAM_NORM) {
			for (size_t j = 0; j < p->numel; j++)
				w[j] = 1.0f;
		} else if (p->kind == PARAM_BUFFER) {
			memset(w, 0, sizeof(float) * p->numel);
		} else if (p->expert_stacked) {
			size_t per = (size_t)(p->shape[1] * p->shape[2]);
			for (int e = m->expert_begin; e < m->expert_end; e++)
				fill_normal(w + (e - m->expert_begin) * per, per, std, seed, p->name, e);
		} else {
			fill_normal(w, p->numel, std, seed, p->name, -1);
		}
	}
}

/* ---------------------------------------------------------------- activations */

static void *host_alloc(size_t bytes)
{
	return calloc(1, bytes ? bytes : 1);
}


#define FALLOC(n) ((float *)model_acts_alloc(a, sizeof(float) * (size_t)(n)))
#define IALLOC(n) ((int *)model_acts_alloc(a, sizeof(int) * (size_t)(n)))

void model_acts_destroy(const struct model_config *c, struct model_acts *a)
{
	if (!a)
		return;
	for (int i = 0; i < a->n_allocs; i++)
		a->mem.release(a->allocs[i]);
	for (int l = 0; a->layers && l < c->num_hidden_layers; l++)
		moe_acts_free_ep(&a->layers[l].moe);
	mtp_acts_free(c, a->mtp);
	free(a->gs.dyr);
	free(a->gs.dxr);
	free(a->gs.dgr);
	free(a->gs.dur);
	free(a->layers);
	free(a);
}

void model_acts_free(struct moe_model *m)
{
	model_acts_destroy(&m->cfg, m->acts);
	m->acts = NULL;
}


static void alloc_grad_scratch(const struct model_config *c, struct model_acts *a, size_t N)
{
	struct grad_scratch *s = &a->gs;
	size_t C = c->hidden_size, H = c->num_attention_heads, dq = mc_qk_head_dim(c);
	size_t dv = c->v_head_dim, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
	size_t Rq = c->q_lora_rank, Rkv = c->kv_lora_rank, E = c->n_routed_experts;
	size_t K = c->num_experts_per_tok, Im = c->moe_intermediate_size;
	size_t mlp = N * c->intermediate_size > N * K * Im ? N * c->intermediate_size : N * K * Im;

	s->dres = FALLOC(N * C);
	s->dln = FALLOC(N * C);
	s->datt = FALLOC(N * H * dv);
	s->dq = FALLOC(N * H * dq);
	s->dk = FALLOC(N * H * dq);
	s->dv = FALLOC(N * H * dv);
	s->dkv = FALLOC(N * H * (dn + dv));
	s->dckv_n = FALLOC(N * Rkv);
	s->dkva = FALLOC(N * (Rkv + dr));
	s->dqa_n = FALLOC(N * Rq);
	s->dqa = FALLOC(N * Rq);
	s->dg = FALLOC(mlp);
	s->du = FALLOC(mlp);
	s->dg_shared = FALLOC(N * c->n_shared_experts * Im);
	s->du_shared = FALLOC(N * c->n_shared_experts * Im);
	s->dye = FALLOC(N * K * C);
	s->dxe = FALLOC(N * K * C);
	s->dlogits = FALLOC(N * E);
	s->dscores = FALLOC(N * E);
	s->dtopk_w = FALLOC(N * K);
}

struct model_acts *model_acts_create(const struct moe_model *m, int B, int T, const struct acts_memory *mem)
{
	const struct model_config *c = &m->cfg;
	size_t N = (size_t)B * T, C = c->hidden_size, L = c->num_hidden_layers;
	struct model_acts *a = calloc(1, sizeof(*a));
	if (!a || !(a->layers = calloc(L, sizeof(*a->layers)))) {
		fprintf(stderr, "moe: out of memory\n");
		exit(1);
	}
	a->mem = *mem;
	a->B = B;
	a->T = T;
	a->pos = IALLOC(N);
	a->targets = IALLOC(N);
	a->inputs = IALLOC(N);
	a->resid = FALLOC((L + 1) * N * C);
	a->h_mid = FALLOC(L * N * C);
	for (size_t l = 0; l < L; l++)
		model_layer_acts_alloc(m, a, &a->layers[l], (int)l, N);
	a->lnf = FALLOC(N * C);
	a->lnf_rstd = FALLOC(N);
	a->logit_rows = mem->logit_rows > 0 && (size_t)mem->logit_rows < N ? mem->logit_rows : (int)N;
	a->logits = FALLOC((size_t)a->logit_rows * c->vocab_size);
	a->losses = FALLOC(N);
	alloc_grad_scratch(c, a, N);
	return a;
}

static void ensure_acts(struct moe_model *m, int B, int T)
{
	static const struct acts_memory host = { host_alloc, free, 0 };

	if (m->acts && m->acts->B == B && m->acts->T == T)
		return;
	model_acts_free(m);
	m->acts = model_acts_create(m, B, T, &host);
	for (size_t n = 0; n < (size_t)B * T; n++)
		m->acts->pos[n] = (int)(n % T);
}

/* ---------------------------------------------------------------- forward and backward */

float model_forward(struct moe_model *m, const int *inputs, const int *targets, int B, int T)
{
	const struct model_config *c = &m->cfg;
	int N = B * T, C = c->hidden_size, V = c->vocab_size, L = c->num_hidden_layers;
	float eps = (float)c->rms_norm_eps;
	ensure_acts(m, B, T);
	struct model_acts *a = m->acts;

	memcpy(a->inputs, inputs, sizeof(int) * N);
	a->has_targets = targets != NULL;
	if (a->mtp)
		a->mtp->active = 0;
	embedding_forward(a->resid, inputs, m->w.embed_tokens, N, C);
	float aux = 0.0f;
	for (int l = 0; l < L; l++) {
		struct layer_acts *la = &a->layers[l];
		la->moe.replay = m->route_replay ?
			m->route_replay + (size_t)l * N * c->num_experts_per_tok : NULL;
		aux += decoder_layer_forward(m, l, la, a->resid + (size_t)(l + 1) * N * C,
					     a->h_mid + (size_t)l * N * C, a->resid + (size_t)l * N * C, a->pos, B, T);
	}
	rmsnorm_forward(a->lnf, a->lnf_rstd, a->resid + (size_t)L * N * C, m->w.norm, N, C, eps);
	linear_forward(a->logits, a->lnf, m->w.lm_head, N, C, V);
	m->last_aux_loss = aux;
	if (!targets) {
		m->last_ce_loss = 0.0f;
		return 0.0f;
	}
	memcpy(a->targets, targets, sizeof(int) * N);
	a->temperature = m->logit_temperature > 0 ? m->logit_temperature : 1.0f;
	if (a->temperature != 1.0f) {
		float inv = 1.0f / a->temperature;
		for (size_t k = 0; k < (size_t)N * V; k++)
			a->logits[k] *= inv;
	}
	cross_entropy_forward(a->losses, a->logits, targets, N, V);
	m->last_ce_loss = ce_term(a->losses, targets, m->token_weights, N);
	m->last_mtp_loss = 0.0f;
	if (!mtp_active(m))
		return m->last_ce_loss + aux;
	m->last_mtp_loss = mtp_forward(m, &m->last_aux_loss);
	return m->last_ce_loss + m->last_aux_loss + m->mtp_lambda * m->last_mtp_loss;
}




const float *model_logits(const struct moe_model *m)
{
	return m->acts ? m->acts->logits : NULL;
}

const float *model_token_losses(const struct moe_model *m)
{
	return m->acts && m->acts->has_targets ? m->acts->losses : NULL;
}

int model_count_targets(const struct moe_model *m)
{
	const struct model_acts *a = m->acts;
	int count = 0;
	for (int n = 0; a && a->has_targets && n < a->B * a->T; n++)
		count += a->targets[n] >= 0;
	return count;
}

/*
 * The cross-entropy's gradient plus loss_scale times the logit term's, in chunks of rows: the term reads
 * a chunk's logits before the cross-entropy's gradient overwrites them (row for row the same values as
 * the unchunked call).
 */
static void logit_term_backward(struct moe_model *m, float dloss, float loss_scale)
{
	struct model_acts *a = m->acts;
	int N = a->B * a->T, V = m->cfg.vocab_size, R = MODEL_LOGIT_TERM_ROWS;
	float *g = malloc(sizeof(float) * R * V);
	if (!g) {
		fprintf(stderr, "moe: out of memory\n");
		exit(1);
	}
	for (int n0 = 0; n0 < N; n0 += R) {
		int nr = N - n0 < R ? N - n0 : R;
		float *rows = a->logits + (size_t)n0 * V;
		m->logit_term->grad(m->logit_term->ctx, n0, nr, rows, g);
		cross_entropy_backward_rows(rows, rows, a->targets + n0, dloss,
					    m->token_weights ? m->token_weights + n0 : NULL, nr, V);
		for (size_t k = 0; k < (size_t)nr * V; k++)
			rows[k] += loss_scale * g[k];
	}
	free(g);
}

/*
 * Walks the layers in reverse.  The cross-entropy gradient overwrites the logits buffer (as in llm.c);
 * the balance loss enters inside moe_backward with the same loss_scale.
 */
void model_backward(struct moe_model *m, float loss_scale)
{
	const struct model_config *c = &m->cfg;
	struct model_acts *a = m->acts;
	int B = a->B, T = a->T, N = B * T, C = c->hidden_size, V = c->vocab_size;
	int L = c->num_hidden_layers;
	struct grad_scratch *s = &a->gs;

	/* first, while s is free: the MTP depths' gradient of the final hidden state (into a->mtp) */
	int mtp = a->mtp && a->mtp->active;
	if (mtp)
		mtp_backward(m, loss_scale);
	float dloss = ce_row_scale(a->targets, m->token_weights, N, loss_scale, a->temperature);
	if (m->logit_term)
		logit_term_backward(m, dloss, loss_scale);
	else
		cross_entropy_backward_rows(a->logits, a->logits, a->targets, dloss, m->token_weights, N, V);
	model_linear_bwd(m, s->dln, m->g.lm_head, a->logits, a->lnf, m->w.lm_head, N, C, V, LIN_SET_DX);
	rmsnorm_backward_set(s->dres, C, m->g.norm, s->dln, a->resid + (size_t)L * N * C, m->w.norm,
			     a->lnf_rstd, N, C);
	if (mtp)
		vec_add(s->dres, a->mtp->dh, (size_t)N * C);

	/* s->dres holds d(residual) entering the current point, walking the layers backward */
	for (int l = L - 1; l >= 0; l--)
		decoder_layer_backward(m, l, &a->layers[l], s, a->h_mid + (size_t)l * N * C,
				       a->resid + (size_t)l * N * C, a->pos, B, T, loss_scale);
	if (m->g.embed_tokens)  /* NULL: frozen (LoRA) */
		embedding_backward(m->g.embed_tokens, s->dres, a->inputs, N, C);
}

/* ---------------------------------------------------------------- training FLOPs */

/*
 * Model FLOPs of one training step, per token, at sequence length T (no recomputation counted):
 *
 *   6 * activated  +  3 * L * 2 * H * (dq + dv) * (T + 1) / 2
 *
 * The first term: 2 FLOPs per multiply-add in the forward, twice that in the backward (dx and dw), over
 * model_count_params' activated count: every attention projection, the dense MLPs, the K routed and the
 * shared experts of each MoE layer, and the lm_head (a [V, C] product per token), but neither the input
 * embedding (a lookup) nor the routers ([E, C] each, 0.1-0.3% of the count: left out, as DeepSeek does).
 * The RMSNorm gains it includes (about 5e-5 of V2-Lite's count) are counted as if they were matmul weights.
 *
 * The second term is causal attention: per token and layer QK^T costs 2 * H * dq * ctx and PV
 * 2 * H * dv * ctx for a context of ctx keys; position t (0-based) sees t + 1 keys, so averaged over the
 * sequence ctx = (T + 1) / 2 (what the kernels compute; PaLM and Megatron count the full T instead,
 * about twice this).  dq = qk_nope + qk_rope, dv = v_head_dim.  The backward costs twice the forward,
 * hence the 3.  Softmax, norms, SwiGLU and the router are elementwise and not counted.
 */
double model_train_flops_per_token(const struct model_config *cfg, int T)
{
	int64_t total, activated;
	double H = cfg->num_attention_heads, dq = mc_qk_head_dim(cfg), dv = cfg->v_head_dim;
	double attn_fwd = cfg->num_hidden_layers * 2.0 * H * (dq + dv) * ((T + 1) / 2.0);

	model_count_params(cfg, &total, &activated);
	return 6.0 * (double)activated + 3.0 * attn_fwd;
}
