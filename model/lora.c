/*
 * model/lora.c - LoRA adapters: the adapter table, initialisation, the forward and backward hooks of the
 * linear layers, and merging into the base weights (lora.h).
 */
#include "model/lora.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launch/rng.h"
#include "model/layers.h"

#include <cblas.h>  /* after the headers above: it may bring complex.h's I */

static const char *const target_names[LORA_N_TARGETS] = {
	"q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
	"gate_proj", "up_proj", "down_proj",
	"experts.gate_proj", "experts.up_proj", "experts.down_proj",
};

const char *lora_target_name(enum lora_target t)
{
	return t < LORA_N_TARGETS ? target_names[t] : "?";
}

int lora_target_parse(const char *name)
{
	for (int t = 0; t < LORA_N_TARGETS; t++)
		if (!strcmp(name, target_names[t]))
			return t;
	return -1;
}

const char *lora_target_list(void)
{
	return "q_a_proj, q_b_proj, q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj, gate_proj, up_proj, "
	       "down_proj, experts.gate_proj, experts.up_proj, experts.down_proj";
}

/* ---------------------------------------------------------------- the adapter table */

/* One adapted module of one layer: its weight in the model, shape and HF module path. */
struct module_ref {
	const float *w;
	int in, out, stacked;
	char path[64];             /* the HF module path (at most 48 characters for 999 layers) */
};

static void set_path(struct module_ref *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void set_path(struct module_ref *r, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(r->path, sizeof(r->path), fmt, ap);
	va_end(ap);
}

/* The module of target t in layer l, or 0 when this layer has none. */
static int find_module(const struct moe_model *m, int l, enum lora_target t, struct module_ref *r)
{
	const struct model_config *c = &m->cfg;
	const struct layer_weights *w = &m->w.layers[l];
	int C = c->hidden_size, H = c->num_attention_heads, dq = mc_qk_head_dim(c);
	int moe = mc_layer_is_moe(c, l), Im = c->moe_intermediate_size, Is = c->n_shared_experts * Im;
	int inter = moe ? Is : c->intermediate_size;
	static const char *const ffn_word[3] = { "gate_proj", "up_proj", "down_proj" };

	memset(r, 0, sizeof(*r));
	switch (t) {
	case LORA_Q_A_PROJ: r->w = w->q_a_proj; r->in = C; r->out = c->q_lora_rank; break;
	case LORA_Q_B_PROJ: r->w = w->q_b_proj; r->in = c->q_lora_rank; r->out = H * dq; break;
	case LORA_Q_PROJ: r->w = w->q_proj; r->in = C; r->out = H * dq; break;
	case LORA_KV_A_PROJ:
		r->w = w->kv_a_proj_with_mqa; r->in = C; r->out = c->kv_lora_rank + c->qk_rope_head_dim;
		break;
	case LORA_KV_B_PROJ:
		r->w = w->kv_b_proj; r->in = c->kv_lora_rank;
		r->out = H * (c->qk_nope_head_dim + c->v_head_dim);
		break;
	case LORA_O_PROJ: r->w = w->o_proj; r->in = H * c->v_head_dim; r->out = C; break;
	case LORA_GATE_PROJ: case LORA_UP_PROJ: case LORA_DOWN_PROJ: {
		int k = t - LORA_GATE_PROJ;
		const float *dense[3] = { w->mlp_gate_proj, w->mlp_up_proj, w->mlp_down_proj };
		const float *shared[3] = { w->shared_gate_proj, w->shared_up_proj, w->shared_down_proj };
		r->w = moe ? shared[k] : dense[k];
		r->in = k == 2 ? inter : C;
		r->out = k == 2 ? C : inter;
		set_path(r, "model.layers.%d.mlp.%s%s", l, moe ? "shared_experts." : "", ffn_word[k]);
		return r->w != NULL;
	}
	default: {  /* the routed experts */
		int k = t - LORA_EXPERTS_GATE_PROJ;
		const float *ex[3] = { w->experts_gate_proj, w->experts_up_proj, w->experts_down_proj };
		if (!moe || m->expert_end == m->expert_begin)
			return 0;
		r->w = ex[k];
		r->in = k == 2 ? Im : C;
		r->out = k == 2 ? C : Im;
		r->stacked = 1;
		set_path(r, "model.layers.%d.mlp.experts.%s", l, ffn_word[k]);
		return r->w != NULL;
	}
	}
	set_path(r, "model.layers.%d.self_attn.%s", l, target_names[t]);
	return r->w != NULL;
}

static int add_tensor(struct lora *lo, int *cap, const struct module_ref *r, const char *which, int l,
		      int64_t rows, int64_t cols)
{
	struct moe_model *v = &lo->view;
	if (v->n_params == *cap) {
		*cap = *cap ? 2 * *cap : 32;
		struct param *np = realloc(v->params, sizeof(*np) * *cap);
		if (!np)
			return -1;
		v->params = np;
	}
	struct param *p = &v->params[v->n_params];
	memset(p, 0, sizeof(*p));
	snprintf(p->name, sizeof(p->name), "%s.%s.weight", r->path, which);
	p->kind = PARAM_LINEAR;
	p->layer = l;
	p->expert_stacked = r->stacked;
	p->ndim = r->stacked ? 3 : 2;
	p->shape[0] = r->stacked ? v->cfg.n_routed_experts : rows;
	p->shape[1] = r->stacked ? rows : cols;
	p->shape[2] = r->stacked ? cols : 1;
	p->numel = (size_t)(r->stacked ? v->expert_end - v->expert_begin : 1) * rows * cols;
	p->offset = v->n_weights;
	v->n_weights += p->numel;
	return v->n_params++;
}

static int build_table(struct lora *lo, const struct moe_model *m, char *err, size_t errlen)
{
	const struct model_config *c = &m->cfg;
	int cap = 0, ncap = 0, rank = lo->spec.rank;
	for (int t = 0; t < LORA_N_TARGETS; t++) {
		if (!(lo->spec.targets & (1u << t)))
			continue;
		int found = 0;
		for (int l = 0; l < c->num_hidden_layers; l++) {
			struct module_ref r;
			if (!find_module(m, l, (enum lora_target)t, &r))
				continue;
			found = 1;
			if (lo->n == ncap) {
				ncap = ncap ? 2 * ncap : 16;
				struct lora_adapter *na = realloc(lo->ad, sizeof(*na) * ncap);
				if (!na)
					goto oom;
				lo->ad = na;
			}
			struct lora_adapter *a = &lo->ad[lo->n];
			a->target = (enum lora_target)t;
			a->layer = l;
			a->base = r.w;
			a->n_experts = r.stacked ? m->expert_end - m->expert_begin : 1;
			a->base_stride = r.stacked ? (size_t)r.in * r.out : 0;
			a->in = r.in;
			a->out = r.out;
			a->pa = add_tensor(lo, &cap, &r, "lora_A", l, rank, r.in);
			a->pb = add_tensor(lo, &cap, &r, "lora_B", l, r.out, rank);
			if (a->pa < 0 || a->pb < 0)
				goto oom;
			lo->n++;
		}
		/* under expert parallelism every rank holds experts, so "found" agrees across ranks */
		if (!found) {
			snprintf(err, errlen, "lora.targets: this model has no %s module%s", target_names[t],
				 t == LORA_Q_PROJ ? " (with q_lora_rank > 0 the query is q_a_proj, q_b_proj)" :
				 t == LORA_Q_A_PROJ || t == LORA_Q_B_PROJ ?
				 " (with q_lora_rank = 0 the query is q_proj)" : "");
			return -1;
		}
	}
	return 0;
oom:
	snprintf(err, errlen, "out of memory building the LoRA adapters");
	return -1;
}

struct lora *lora_create(const struct moe_model *m, const struct lora_spec *spec, char *err, size_t errlen)
{
	if (spec->rank <= 0 || !spec->targets || !(spec->dropout >= 0 && spec->dropout < 1)) {
		snprintf(err, errlen, "lora: rank %d, %s targets, dropout %g: impossible", spec->rank,
			 spec->targets ? "some" : "no", spec->dropout);
		return NULL;
	}
	struct lora *lo = calloc(1, sizeof(*lo));
	if (!lo) {
		snprintf(err, errlen, "out of memory building the LoRA adapters");
		return NULL;
	}
	lo->spec = *spec;
	lo->scale = (float)(spec->alpha / spec->rank);
	lo->enabled = true;
	lo->view.cfg = m->cfg;
	lo->view.expert_begin = m->expert_begin;
	lo->view.expert_end = m->expert_end;
	if (build_table(lo, m, err, errlen)) {
		lora_free(lo);
		return NULL;
	}
	lo->view.weights = calloc(lo->view.n_weights + 1, sizeof(float));
	lo->view.grads = calloc(lo->view.n_weights + 1, sizeof(float));
	if (!lo->view.weights || !lo->view.grads) {
		snprintf(err, errlen, "out of memory for the LoRA adapters (%zu floats)", lo->view.n_weights);
		lora_free(lo);
		return NULL;
	}
	return lo;
}

void lora_free(struct lora *l)
{
	if (!l)
		return;
	free(l->ad);
	free(l->view.params);
	free(l->view.weights);
	free(l->view.grads);
	free(l);
}

static uint64_t name_hash(const char *s)
{
	uint64_t h = 0xcbf29ce484222325ULL;  /* FNV-1a */
	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
	return h;
}

void lora_init_weights(struct lora *l, uint64_t seed)
{
	memset(l->view.weights, 0, sizeof(float) * l->view.n_weights);
	for (int i = 0; i < l->n; i++) {
		const struct lora_adapter *a = &l->ad[i];
		const struct param *p = &l->view.params[a->pa];
		size_t per = (size_t)l->spec.rank * a->in;
		double bound = 1.0 / sqrt((double)a->in);  /* kaiming_uniform(a = sqrt(5)), as PEFT */
		for (int e = 0; e < a->n_experts; e++) {
			int64_t ge = p->expert_stacked ? l->view.expert_begin + e : -1;
			uint64_t s = seed ^ name_hash(p->name) ^ ((uint64_t)(ge + 1) * 0xd1b54a32d192ed03ULL);
			float *w = l->view.weights + p->offset + e * per;
			splitmix64(&s);
			for (size_t j = 0; j < per; j++)
				w[j] = (float)(bound * (2.0 * rng_uniform(splitmix64(&s)) - 1.0));
		}
	}
}

void lora_zero_grad(struct lora *l)
{
	memset(l->view.grads, 0, sizeof(float) * l->view.n_weights);
}

size_t lora_trainable_floats(const struct lora *l)
{
	return l->view.n_weights;
}

/* ---------------------------------------------------------------- forward and backward */

/* The adapter of weight w and the local expert whose block w is, or NULL. */
static const struct lora_adapter *find_adapter(const struct lora *l, const float *w, int *expert)
{
	for (int i = 0; i < l->n; i++) {
		const struct lora_adapter *a = &l->ad[i];
		if (w == a->base) {
			*expert = 0;
			return a;
		}
		if (a->base_stride && w > a->base && w < a->base + a->base_stride * a->n_experts &&
		    (size_t)(w - a->base) % a->base_stride == 0) {
			*expert = (int)((size_t)(w - a->base) / a->base_stride);
			return a;
		}
	}
	return NULL;
}

static float *lora_A(const struct lora *l, const struct lora_adapter *a, int e, float *arena)
{
	return arena + l->view.params[a->pa].offset + (size_t)e * l->spec.rank * a->in;
}

static float *lora_B(const struct lora *l, const struct lora_adapter *a, int e, float *arena)
{
	return arena + l->view.params[a->pb].offset + (size_t)e * l->spec.rank * a->out;
}

/* whether dropout applies to this call */
static int dropping(const struct lora *l)
{
	return l->training && l->spec.dropout > 0;
}

/*
 * out[n, i] = x[n, i] * keep(n, i) / (1 - p), or 0 (add: out += that): inverted dropout whose mask is a
 * hash of (seed, step, adapter, expert, row, column), so the backward (and any rerun) sees the same mask.
 */
static void dropout_mask(const struct lora *l, const struct lora_adapter *a, int e, float *out,
			 const float *x, int N, int in, int add)
{
	uint64_t key = mix64(l->dropout_seed ^ mix64(l->dropout_step + 0x9e3779b97f4a7c15ULL) ^
			     ((uint64_t)(a - l->ad) << 40) ^ ((uint64_t)(e + l->view.expert_begin) << 20));
	uint64_t threshold = (uint64_t)(l->spec.dropout * 18446744073709551616.0);
	float keep = (float)(1.0 / (1.0 - l->spec.dropout));
	for (int n = 0; n < N; n++) {
		uint64_t row = mix64(key ^ ((uint64_t)n * 0xd1b54a32d192ed03ULL));
		for (int i = 0; i < in; i++) {
			size_t k = (size_t)n * in + i;
			float v = mix64(row + (uint64_t)i * 0x9e3779b97f4a7c15ULL) < threshold ? 0.0f : x[k] * keep;
			out[k] = add ? out[k] + v : v;
		}
	}
}

static void *scratch(size_t floats)
{
	float *p = malloc(sizeof(float) * (floats ? floats : 1));
	if (!p) {
		fprintf(stderr, "moe: out of memory in the LoRA adapters\n");
		exit(1);
	}
	return p;
}

static void scale_vec(float *x, size_t n, float s)
{
	for (size_t i = 0; i < n; i++)
		x[i] *= s;
}

/* y += scale * B A drop(x) for expert e's block of adapter a; products on the calling thread */
static void adapter_forward(const struct lora *l, const struct lora_adapter *a, int e, float *y, const float *x,
			    int N, int in, int out, int flags)
{
	int r = l->spec.rank;
	float *xd = dropping(l) ? scratch((size_t)N * in) : NULL, *h = scratch((size_t)N * r);
	if (xd)
		dropout_mask(l, a, e, xd, x, N, in, 0);
	linear_fwd(h, xd ? xd : x, lora_A(l, a, e, l->view.weights), N, in, r, flags);
	scale_vec(h, (size_t)N * r, l->scale);
	linear_fwd(y, h, lora_B(l, a, e, l->view.weights), N, r, out, flags | LIN_ACC);
	free(xd);
	free(h);
}

/*
 * The adapter's products have rank columns: below a few tiles of work (ops_cpu.c's tiling) they run on
 * one thread, in turn, inside one parallel region (whose thread keeps OpenBLAS single-threaded), not a
 * region per product; larger ones are tiled over the threads as the base's products are.
 */
#define LORA_SERIAL_FLOPS 64e6

static int lora_serial(int flags, int N, int in, int out, int r)
{
	return (flags & LIN_SERIAL) || 2.0 * N * (in > out ? in : out) * r < LORA_SERIAL_FLOPS;
}

void lora_forward(const struct lora *l, const float *w, float *y, const float *x, int N, int in, int out,
		  int flags)
{
	int e;
	const struct lora_adapter *a = l->enabled ? find_adapter(l, w, &e) : NULL;
	if (!a || N == 0)
		return;
	if (!lora_serial(flags, N, in, out, l->spec.rank)) {
		adapter_forward(l, a, e, y, x, N, in, out, 0);
	} else if (flags & LIN_SERIAL) {
		adapter_forward(l, a, e, y, x, N, in, out, LIN_SERIAL);
	} else {
#pragma omp parallel
#pragma omp single
		adapter_forward(l, a, e, y, x, N, in, out, LIN_SERIAL);
	}
}

/*
 * With u = drop(x), h = scale * A u:  dB += dy^T h,  dh = scale * B^T dy,  dA += dh^T u,
 * dx += drop'(dh A) (the same mask and 1/(1-p)).
 */
static void adapter_backward(const struct lora *l, const struct lora_adapter *a, int e, float *dx,
			     const float *dy, const float *x, int N, int in, int out, int flags)
{
	int r = l->spec.rank;
	const float *A = lora_A(l, a, e, l->view.weights), *B = lora_B(l, a, e, l->view.weights);
	float *dA = lora_A(l, a, e, l->view.grads), *dB = lora_B(l, a, e, l->view.grads);
	int drop = dropping(l);
	float *u = drop ? scratch((size_t)N * in) : NULL, *h = scratch((size_t)N * r);
	float *dh = scratch((size_t)N * r);
	if (u)
		dropout_mask(l, a, e, u, x, N, in, 0);
	const float *ux = u ? u : x;
	linear_fwd(h, ux, A, N, in, r, flags);
	scale_vec(h, (size_t)N * r, l->scale);
	linear_bwd(dh, dB, dy, h, B, N, r, out, flags | LIN_SET_DX);
	scale_vec(dh, (size_t)N * r, l->scale);
	if (!drop) {
		linear_bwd(dx, dA, dh, ux, A, N, in, r, flags);
	} else {
		/* dx needs the mask: the product into u's buffer (u is read first, for dA) */
		linear_bwd(NULL, dA, dh, ux, A, N, in, r, flags);
		linear_bwd(u, NULL, dh, NULL, A, N, in, r, flags | LIN_SET_DX);
		dropout_mask(l, a, e, dx, u, N, in, 1);
	}
	free(u);
	free(h);
	free(dh);
}

void lora_backward(const struct lora *l, const float *w, float *dx, const float *dy, const float *x, int N,
		   int in, int out, int flags)
{
	int e;
	const struct lora_adapter *a = l->enabled ? find_adapter(l, w, &e) : NULL;
	if (!a || N == 0)
		return;
	if (!lora_serial(flags, N, in, out, l->spec.rank)) {
		adapter_backward(l, a, e, dx, dy, x, N, in, out, 0);
	} else if (flags & LIN_SERIAL) {
		adapter_backward(l, a, e, dx, dy, x, N, in, out, LIN_SERIAL);
	} else {
#pragma omp parallel
#pragma omp single
		adapter_backward(l, a, e, dx, dy, x, N, in, out, LIN_SERIAL);
	}
}

int lora_factors(const struct lora *l, const float *w, const float **A, const float **B)
{
	int e;
	const struct lora_adapter *a = l && l->enabled ? find_adapter(l, w, &e) : NULL;
	if (!a)
		return 0;
	*A = lora_A(l, a, e, l->view.weights);
	*B = lora_B(l, a, e, l->view.weights);
	return 1;
}

void model_linear_bwd(const struct moe_model *m, float *dx, float *dw, const float *dy, const float *x,
		      const float *w, int N, int in, int out, int flags)
{
	linear_bwd(dx, dw, dy, x, w, N, in, out, flags);
	if (m->lora)
		lora_backward(m->lora, w, dx, dy, x, N, in, out, flags);
}

/* ---------------------------------------------------------------- merging */

void lora_merge(const struct lora *l, struct moe_model *m)
{
	int r = l->spec.rank;
	for (int i = 0; i < l->n; i++) {
		const struct lora_adapter *a = &l->ad[i];
		struct module_ref ref;
		if (!find_module(m, a->layer, a->target, &ref))
			continue;
		for (int e = 0; e < a->n_experts; e++) {
			float *W = (float *)ref.w + (size_t)e * a->base_stride;
			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, a->out, a->in, r, l->scale,
				    lora_B(l, a, e, l->view.weights), r, lora_A(l, a, e, l->view.weights), a->in,
				    1.0f, W, a->in);
		}
	}
}
