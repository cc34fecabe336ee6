/*
 * train/convert.c - Hugging Face DeepseekV3/V2 checkpoints to and from our HDF5 checkpoints.
 *
 * Names.  Our parameter names are HF DeepseekV3's, so every tensor maps one to one, with one exception:
 * HF files keep one tensor per routed expert, model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight
 * [I, C] / [C, I], and we stack them as model.layers.N.mlp.experts.{gate,up,down}_proj.weight
 * [E, I, C] / [E, C, I]: expert E of HF is row block E of ours.  (A file already holding a stacked
 * tensor under our name is accepted too.)  DeepSeek-V3's multi-token-prediction layers
 * model.layers.{L..L+D-1} (D = num_nextn_predict_layers) map the same way; the copies of the embedding
 * and the lm_head HF keeps in each (.embed_tokens.weight, .shared_head.head.weight) are the model's own
 * weights: shape-checked on import and not read, written from the model's on export.  Skipped with a
 * note: rotary inv_freq buffers (recomputed, not weights) and model.layers.N.* for N >= L + D.
 * Anything else that does not map is refused naming it, as are
 * missing tensors and shape mismatches; all of that is checked from the files' headers before any data
 * is read.
 *
 * RoPE: no permutation.  SPEC 1 rotates adjacent pairs (x[2i], x[2i+1]), the layout of DeepSeek's own
 * checkpoints.  transformers (read in 5.x, models/deepseek_v3/modeling_deepseek_v3.py) does the same
 * inside the attention when config.rope_interleave is true (its default, and what we write):
 * apply_rotary_pos_emb_interleave takes q[..., 0::2], q[..., 1::2] as the pairs, rotates each pair by
 * one frequency (inv_freq = theta^(-2i/d)) and returns [rotated evens | rotated odds], the same
 * de-interleaving permutation applied to q_pe and k_pe alike, which q.k does not see (older versions
 * did it with view(d/2, 2).transpose + rotate_half: the same thing).  DeepSeek-V2's HF code rotates
 * view_as_complex(x.reshape(-1, 2)): adjacent pairs again.  So q_b_proj / q_proj and
 * kv_a_proj_with_mqa are taken as they are; a config with rope_interleave=false is refused (by the
 * config loader) rather than permuted.  YaRN (DeepSeek's rope_scaling {"type": "yarn"}, transformers 5's
 * rope_parameters {"rope_type": "yarn"}) changes only the frequencies and two scales (model/rope.h), no
 * weight.  bench/hf_logits_check.py checks all this against transformers.
 *
 * Memory: streamed, never the whole model.  --from-hf checks every header first, then reads one tensor
 * at a time from the memory-mapped safetensors into a float32 buffer as large as the largest tensor
 * (F16/BF16 widened), drops that tensor's mapped pages (st_release) and hands it to the streaming
 * checkpoint writer (ckpt_writer_put: a routed expert goes to its block of the stacked dataset); the
 * writer checks at the end that every tensor and expert arrived before renaming the file into place.
 * --to-hf reads one tensor, or one expert's block, at a time (ckpt_reader_get) and writes it to its
 * shard, converting to BF16 a slice at a time.  Peak memory is about the largest tensor in float32
 * (for DeepSeek-V3, the 3.7 GB embedding) plus HDF5's small caches.  The parameter table comes from
 * ckpt_model_params, which holds no weights.
 *
 * fp8 (DeepSeek-V3/R1's files, train/convert_fp8.h): an F8_E4M3 weight is read as its raw values and
 * multiplied by its NAME_scale_inv blocks (quantization_config.weight_block_size from config.json, never
 * assumed) on the way; scales are matched to their weights, and their shapes checked, with the rest of
 * the plan, before any data is read.  --to-hf --dtype fp8 writes the linear weights so (blocks of 128)
 * and the rest in bf16, as DeepSeek does.
 *
 * config.json: translated to and from the run configuration by train/convert_config.c.
 */
#define _POSIX_C_SOURCE 200809L

#include "train/convert.h"
#include "launch/errmsg.h"

#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "model/model.h"
#include "train/checkpoint.h"
#include "train/config_hf.h"
#include "train/convert_fp8.h"

#define PATH_LEN 4096
#define HF_NAME_LEN 160


static char *read_text(const char *path, char *err, size_t errlen)
{
	FILE *f = fopen(path, "rb");
	long len;
	char *buf = NULL;

	if (!f) {
		set_err(err, errlen, "%s: %s", path, strerror(errno));
		return NULL;
	}
	if (fseek(f, 0, SEEK_END) || (len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET)) {
		set_err(err, errlen, "%s: cannot read", path);
		goto out;
	}
	buf = malloc((size_t)len + 1);
	if (!buf) {
		set_err(err, errlen, "%s: out of memory", path);
		goto out;
	}
	if (fread(buf, 1, (size_t)len, f) != (size_t)len) {
		set_err(err, errlen, "%s: read error", path);
		free(buf);
		buf = NULL;
		goto out;
	}
	buf[len] = '\0';
out:
	fclose(f);
	return buf;
}

/* ---------------------------------------------------------------- names */

/* "model.layers.N." -> N, else -1. */
static int layer_of(const char *name)
{
	const char *p = name + strlen("model.layers.");
	char *end;
	long l;

	if (strncmp(name, "model.layers.", strlen("model.layers.")) || *p < '0' || *p > '9')
		return -1;
	l = strtol(p, &end, 10);
	return *end == '.' && l < INT_MAX ? (int)l : -1;
}

/*
 * "model.layers.N.mlp.experts.E.X.weight" -> ours "model.layers.N.mlp.experts.X.weight" and E, for X in
 * gate_proj, up_proj, down_proj.  Returns E, or -1 when the name is not a per-expert tensor.
 */
static int expert_of(const char *name, char *ours, size_t len)
{
	static const char *const projs[] = { "gate_proj.weight", "up_proj.weight", "down_proj.weight" };
	const char *mid = ".mlp.experts.", *p, *q;
	char *end;
	long e;
	int l = layer_of(name);

	if (l < 0)
		return -1;
	p = strchr(name + strlen("model.layers."), '.');
	if (strncmp(p, mid, strlen(mid)))
		return -1;
	q = p + strlen(mid);
	if (*q < '0' || *q > '9')
		return -1;
	e = strtol(q, &end, 10);
	if (*end != '.' || e >= INT_MAX)
		return -1;
	for (int i = 0; i < 3; i++) {
		if (!strcmp(end + 1, projs[i])) {
			snprintf(ours, len, "model.layers.%d.mlp.experts.%s", l, projs[i]);
			return (int)e;
		}
	}
	return -1;
}

/* HF's name of expert e of a stacked parameter (or of a plain parameter when e < 0). */
static void hf_name(char *out, size_t len, const struct param *p, int e)
{
	const char *tail;

	if (e < 0 || !p->expert_stacked) {
		snprintf(out, len, "%s", p->name);
		return;
	}
	tail = strstr(p->name, ".experts.") + strlen(".experts.");
	snprintf(out, len, "%.*s%d.%s", (int)(tail - p->name), p->name, e, tail);
}

static int ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), k = strlen(suffix);

	return n >= k && !strcmp(s + n - k, suffix);
}

static void fmt_shape(char *buf, size_t len, int ndim, const int64_t *shape)
{
	size_t n = (size_t)snprintf(buf, len, "[");

	for (int d = 0; d < ndim && n < len; d++)
		n += (size_t)snprintf(buf + n, len - n, "%s%lld", d ? ", " : "", (long long)shape[d]);
	if (n < len)
		snprintf(buf + n, len - n, "]");
}

/* ---------------------------------------------------------------- --from-hf */

struct src_file {
	char name[PATH_LEN];        /* as listed (relative to the directory) */
	char path[PATH_LEN];
	struct st_file f;
	int open;
};

/* One tensor of the files that goes into the model. */
struct assignment {
	int file;
	const struct st_tensor *t;
	const struct param *p;
	int expert;                 /* -1: the whole parameter */
	int scale_file;             /* F8_E4M3: where its NAME_scale_inv is */
	const struct st_tensor *scale;
};

/* A NAME_scale_inv tensor of the files, and whether an fp8 weight claimed it. */
struct scale_ref {
	int file;
	const struct st_tensor *t;
	int used;
};

struct from_hf {
	const char *dir;
	FILE *notes;
	char *err;
	size_t errlen;
	int v2;
	const struct model_config *mc;
	struct param *params;       /* the model's, without weights (ckpt_model_params) */
	int n_params;
	const struct param **by_name;  /* params sorted by name */
	int n_files;
	struct src_file *files;
	unsigned char *filled;      /* per param and expert: param_base[i] + e */
	size_t *param_base;
	int n_assign, cap_assign;
	struct assignment *assign;
	int n_scales, cap_scales;
	struct scale_ref *scales;   /* sorted by name once all are in */
	int fp8, fp8_br, fp8_bc;    /* config.json's quantization_config: block of a scale */
	int64_t skipped_mtp, skipped_rotary, skipped_shared, n_fp8;
};

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

struct map_entry {
	const char *tensor, *file;
};

static int cmp_entry(const void *a, const void *b)
{
	return strcmp(((const struct map_entry *)a)->tensor, ((const struct map_entry *)b)->tensor);
}

static int add_file(struct from_hf *c, const char *name)
{
	struct src_file *sf;

	sf = realloc(c->files, sizeof(*c->files) * (c->n_files + 1));
	if (!sf)
		return set_err(c->err, c->errlen, "out of memory");
	c->files = sf;
	sf = &c->files[c->n_files++];
	memset(sf, 0, sizeof(*sf));
	snprintf(sf->name, sizeof(sf->name), "%s", name);
	snprintf(sf->path, sizeof(sf->path), "%s/%s", c->dir, name);
	if (st_open(&sf->f, sf->path, c->err, c->errlen))
		return -1;
	sf->open = 1;
	return 0;
}

/*
 * With model.safetensors.index.json: the files its weight_map names, each tensor of which must be
 * listed there under that file, and every listed tensor found.
 */
static int open_indexed(struct from_hf *c, const char *index_path)
{
	char *text = read_text(index_path, c->err, c->errlen), **names = NULL;
	cJSON *root = text ? cJSON_Parse(text) : NULL, *wm, *e;
	struct map_entry *map = NULL, key, *hit;
	int n = 0, n_names = 0, ret = -1;
	int64_t found = 0;

	if (!text)
		return -1;
	wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
	if (!cJSON_IsObject(wm)) {
		set_err(c->err, c->errlen, "%s: no \"weight_map\" object", index_path);
		goto out;
	}
	n = cJSON_GetArraySize(wm);
	map = malloc(sizeof(*map) * (n ? n : 1));
	names = malloc(sizeof(char *) * (n ? n : 1));
	if (!map || !names) {
		set_err(c->err, c->errlen, "%s: out of memory", index_path);
		goto out;
	}
	n = 0;
	cJSON_ArrayForEach(e, wm) {
		if (!cJSON_IsString(e) || !e->valuestring[0] || strstr(e->valuestring, "..")) {
			set_err(c->err, c->errlen, "%s: weight_map.%s is not a file name", index_path,
			        e->string);
			goto out;
		}
		map[n].tensor = e->string;
		map[n].file = e->valuestring;
		names[n++] = e->valuestring;
	}
	qsort(map, n, sizeof(*map), cmp_entry);
	for (int i = 1; i < n; i++) {
		if (!strcmp(map[i].tensor, map[i - 1].tensor)) {
			set_err(c->err, c->errlen, "%s: tensor %s listed twice", index_path, map[i].tensor);
			goto out;
		}
	}
	qsort(names, n, sizeof(char *), cmp_str);
	for (int i = 0; i < n; i++)
		if (!i || strcmp(names[i], names[i - 1]))
			names[n_names++] = names[i];
	for (int i = 0; i < n_names; i++) {
		struct src_file *sf;

		if (add_file(c, names[i]))
			goto out;
		sf = &c->files[c->n_files - 1];
		for (int j = 0; j < sf->f.n_tensors; j++) {
			key.tensor = sf->f.tensors[j].name;
			hit = bsearch(&key, map, n, sizeof(*map), cmp_entry);
			if (!hit || strcmp(hit->file, sf->name)) {
				set_err(c->err, c->errlen, "%s: tensor %s %s%s", sf->path, key.tensor,
				        hit ? "is mapped to another file by " : "is not listed in ",
				        index_path);
				goto out;
			}
			found++;
		}
	}
	if (found != n) {
		for (int i = 0; i < n; i++) {
			for (int k = 0; k < c->n_files; k++) {
				if (!strcmp(c->files[k].name, map[i].file) &&
				    !st_find(&c->files[k].f, map[i].tensor)) {
					set_err(c->err, c->errlen, "%s lists tensor %s in %s, which does not "
					        "hold it", index_path, map[i].tensor, map[i].file);
					goto out;
				}
			}
		}
		set_err(c->err, c->errlen, "%s: weight_map disagrees with the files", index_path);
		goto out;
	}
	ret = 0;
out:
	free(map);
	free(names);
	cJSON_Delete(root);
	free(text);
	return ret;
}

static int open_sources(struct from_hf *c)
{
	char pattern[PATH_LEN + 32];
	struct stat sb;
	glob_t g;
	int ret = 0;

	snprintf(pattern, sizeof(pattern), "%s/model.safetensors.index.json", c->dir);
	if (!stat(pattern, &sb))
		return open_indexed(c, pattern);
	snprintf(pattern, sizeof(pattern), "%s/*.safetensors", c->dir);
	if (glob(pattern, 0, NULL, &g) || g.gl_pathc == 0) {
		globfree(&g);
		return set_err(c->err, c->errlen, "%s: no *.safetensors files (and no "
			       "model.safetensors.index.json)", c->dir);
	}
	for (size_t i = 0; i < g.gl_pathc && !ret; i++) {
		const char *slash = strrchr(g.gl_pathv[i], '/');

		ret = add_file(c, slash ? slash + 1 : g.gl_pathv[i]);
	}
	globfree(&g);
	return ret;
}

static int same_shape(const struct st_tensor *t, int ndim, const int64_t *shape)
{
	if (t->ndim != ndim)
		return 0;
	for (int d = 0; d < ndim; d++)
		if (t->shape[d] != shape[d])
			return 0;
	return 1;
}

static int cmp_param(const void *a, const void *b)
{
	return strcmp((*(const struct param *const *)a)->name, (*(const struct param *const *)b)->name);
}

static int cmp_name_param(const void *key, const void *elem)
{
	return strcmp(key, (*(const struct param *const *)elem)->name);
}

static const struct param *find_param(const struct from_hf *c, const char *name)
{
	const struct param *const *hit = bsearch(name, c->by_name, (size_t)c->n_params,
						 sizeof(*c->by_name), cmp_name_param);

	return hit ? *hit : NULL;
}

static int add_scale(struct from_hf *c, int k, const struct st_tensor *t)
{
	if (c->n_scales == c->cap_scales) {
		int cap = c->cap_scales ? 2 * c->cap_scales : 256;
		struct scale_ref *s = realloc(c->scales, sizeof(*s) * cap);

		if (!s)
			return set_err(c->err, c->errlen, "out of memory");
		c->scales = s;
		c->cap_scales = cap;
	}
	c->scales[c->n_scales++] = (struct scale_ref){ k, t, 0 };
	return 0;
}

static int cmp_scale(const void *a, const void *b)
{
	return strcmp(((const struct scale_ref *)a)->t->name, ((const struct scale_ref *)b)->t->name);
}

static int cmp_name_scale(const void *key, const void *elem)
{
	return strcmp(key, ((const struct scale_ref *)elem)->t->name);
}

/* F8_E4M3 weight a's scale: present, readable, [ceil(rows / br), ceil(cols / bc)]. */
static int match_scale(struct from_hf *c, struct assignment *a)
{
	char name[HF_NAME_LEN + 16], got[128], want[128];
	const char *path = c->files[a->file].path;
	int64_t shape[2];
	struct scale_ref *s;

	fp8_scale_name(name, sizeof(name), a->t->name);
	s = c->n_scales ? bsearch(name, c->scales, (size_t)c->n_scales, sizeof(*c->scales), cmp_name_scale)
			: NULL;
	if (!s)
		return set_err(c->err, c->errlen, "%s: tensor %s is F8_E4M3 but no file holds its "
			       "scales, %s", path, a->t->name, name);
	path = c->files[s->file].path;
	shape[0] = fp8_blocks(a->t->shape[0], c->fp8_br);
	shape[1] = fp8_blocks(a->t->shape[1], c->fp8_bc);
	if (!same_shape(s->t, 2, shape)) {
		fmt_shape(got, sizeof(got), s->t->ndim, s->t->shape);
		fmt_shape(want, sizeof(want), 2, shape);
		return set_err(c->err, c->errlen, "%s: tensor %s has shape %s, but %s of shape [%lld, "
			       "%lld] in blocks of [%d, %d] (quantization_config.weight_block_size) "
			       "needs %s", path, name, got, a->t->name, (long long)a->t->shape[0],
			       (long long)a->t->shape[1], c->fp8_br, c->fp8_bc, want);
	}
	if (s->t->dtype != ST_F32 && s->t->dtype != ST_BF16 && s->t->dtype != ST_F16)
		return set_err(c->err, c->errlen, "%s: tensor %s: dtype %s (scales are F32, BF16 or "
			       "F16)", path, name, st_dtype_name(s->t->dtype));
	s->used = 1;
	a->scale_file = s->file;
	a->scale = s->t;
	c->n_fp8++;
	return 0;
}

/* Every fp8 weight has its scales, and every scale belongs to an fp8 weight. */
static int match_scales(struct from_hf *c)
{
	if (c->n_scales)	/* qsort's base may not be NULL, even for no elements */
		qsort(c->scales, (size_t)c->n_scales, sizeof(*c->scales), cmp_scale);
	for (int i = 0; i < c->n_assign; i++)
		if (c->assign[i].t->dtype == ST_F8_E4M3 && match_scale(c, &c->assign[i]))
			return -1;
	for (int i = 0; i < c->n_scales; i++)
		if (!c->scales[i].used)
			return set_err(c->err, c->errlen, "%s: unexpected tensor %s: not the scales of "
				       "an F8_E4M3 weight of the model", c->files[c->scales[i].file].path,
				       c->scales[i].t->name);
	return 0;
}

/* An MTP layer's copy of the embedding or the output head, which the depths share with the model */
static int is_shared_copy(const char *name)
{
	return ends_with(name, ".embed_tokens.weight") || ends_with(name, ".shared_head.head.weight");
}

/* Such a copy is not read (the model's own is), but its shape must be the model's [V, C]. */
static int check_shared_copy(struct from_hf *c, int k, const struct st_tensor *t)
{
	int64_t shape[2] = { c->mc->vocab_size, c->mc->hidden_size };
	char got[128], want[128];

	if (!same_shape(t, 2, shape)) {
		fmt_shape(got, sizeof(got), t->ndim, t->shape);
		fmt_shape(want, sizeof(want), 2, shape);
		return set_err(c->err, c->errlen, "%s: tensor %s has shape %s, but config.json gives %s",
			       c->files[k].path, t->name, got, want);
	}
	c->skipped_shared++;
	return 0;
}

/* One tensor of file k: skip it, or check it and record where it goes. */
static int plan_tensor(struct from_hf *c, int k, const struct st_tensor *t)
{
	const struct model_config *mc = c->mc;
	const char *path = c->files[k].path;
	char ours[HF_NAME_LEN], got[128], want[128];
	const struct param *p;
	int e, l = layer_of(t->name), ndim, E = mc->n_routed_experts;
	const int64_t *shape;
	struct assignment *a;

	if (ends_with(t->name, "rotary_emb.inv_freq")) {
		c->skipped_rotary++;
		return 0;
	}
	if (l >= mc_n_layers(mc)) {
		c->skipped_mtp++;
		return 0;
	}
	if (l >= mc->num_hidden_layers && is_shared_copy(t->name))
		return check_shared_copy(c, k, t);
	if (ends_with(t->name, "_scale_inv"))
		return add_scale(c, k, t);
	e = expert_of(t->name, ours, sizeof(ours));
	p = find_param(c, e >= 0 ? ours : t->name);
	if (!p || (e >= 0 && !p->expert_stacked))
		return set_err(c->err, c->errlen, "%s: unexpected tensor %s: a model of this config "
			       "(config.json) has no such weight", path, t->name);
	if (e >= E)
		return set_err(c->err, c->errlen, "%s: unexpected tensor %s: expert %d, but "
			       "n_routed_experts=%d", path, t->name, e, E);
	ndim = e >= 0 ? p->ndim - 1 : p->ndim;
	shape = e >= 0 ? p->shape + 1 : p->shape;
	if (!same_shape(t, ndim, shape)) {
		fmt_shape(got, sizeof(got), t->ndim, t->shape);
		fmt_shape(want, sizeof(want), ndim, shape);
		return set_err(c->err, c->errlen, "%s: tensor %s has shape %s, but config.json gives %s",
			       path, t->name, got, want);
	}
	if (t->dtype == ST_F8_E4M3 && !c->fp8)
		return set_err(c->err, c->errlen, "%s: tensor %s is F8_E4M3, but config.json has no "
			       "quantization_config (the block size of its scales)", path, t->name);
	if (t->dtype == ST_F8_E4M3 && t->ndim != 2)
		return set_err(c->err, c->errlen, "%s: tensor %s: F8_E4M3 with %d dimensions (block "
			       "scales are for 2-D weights)", path, t->name, t->ndim);
	if (t->dtype != ST_F32 && t->dtype != ST_BF16 && t->dtype != ST_F16 &&
	    t->dtype != ST_F8_E4M3)
		return set_err(c->err, c->errlen, "%s: tensor %s: dtype %s (only F32, BF16, F16 and "
			       "block-scaled F8_E4M3 convert)", path, t->name, st_dtype_name(t->dtype));
	for (int x = e >= 0 ? e : 0; x < (e >= 0 ? e + 1 : (p->expert_stacked ? E : 1)); x++) {
		unsigned char *f = &c->filled[c->param_base[p - c->params] + x];

		if (*f)
			return set_err(c->err, c->errlen, "%s: tensor %s: its weights appear twice in the "
				       "files (again here)", path, t->name);
		*f = 1;
	}
	if (c->n_assign == c->cap_assign) {
		int cap = c->cap_assign ? 2 * c->cap_assign : 1024;

		a = realloc(c->assign, sizeof(*a) * cap);
		if (!a)
			return set_err(c->err, c->errlen, "out of memory");
		c->assign = a;
		c->cap_assign = cap;
	}
	a = &c->assign[c->n_assign++];
	a->file = k;
	a->t = t;
	a->p = p;
	a->expert = e;
	a->scale = NULL;
	return 0;
}

/* Pieces of a parameter: one per routed expert when stacked, else one. */
static int pieces_of(const struct param *p)
{
	return p->expert_stacked ? (int)p->shape[0] : 1;
}

/* Every weight of the model is in the files (a V2 router's bias may be absent: zeros). */
static int check_complete(struct from_hf *c)
{
	char name[HF_NAME_LEN];

	for (int i = 0; i < c->n_params; i++) {
		const struct param *p = &c->params[i];

		for (int e = 0; e < pieces_of(p); e++) {
			if (c->filled[c->param_base[i] + e])
				continue;
			if (c->v2 && ends_with(p->name, ".e_score_correction_bias")) {
				print_note(c->notes, "%s absent (DeepSeek-V2 has no routing bias): zeros",
				     p->name);
				break;
			}
			hf_name(name, sizeof(name), p, p->expert_stacked ? e : -1);
			return set_err(c->err, c->errlen, "%s: missing tensor %s (none of the %d "
				       "safetensors files holds it)", c->dir, name, c->n_files);
		}
	}
	return 0;
}

/* By file, then by position in the file: each file is read front to back. */
static int cmp_assignment(const void *a, const void *b)
{
	const struct assignment *x = a, *y = b;

	if (x->file != y->file)
		return x->file < y->file ? -1 : 1;
	return (x->t->begin > y->t->begin) - (x->t->begin < y->t->begin);
}

/*
 * One tensor: widened to float32 in buf (an fp8 one multiplied by its blocks' scales, read into
 * sbuf), its mapped pages dropped, handed to the writer.
 */
static int stream_tensor(struct from_hf *c, struct ckpt_writer *w, const struct assignment *a,
			 float *buf, float *sbuf)
{
	const struct st_file *f = &c->files[a->file].f;

	if (st_read_f32(f, a->t, buf, c->err, c->errlen))
		return -1;
	st_release(f, a->t);
	if (a->scale) {
		const struct st_file *sf = &c->files[a->scale_file].f;

		if (st_read_f32(sf, a->scale, sbuf, c->err, c->errlen))
			return -1;
		st_release(sf, a->scale);
		fp8_dequantize(buf, a->t->shape[0], a->t->shape[1], sbuf, c->fp8_br, c->fp8_bc);
	}
	if (ckpt_writer_put(w, a->p->name, a->t->shape, a->t->ndim, a->expert, buf, c->err,
			    c->errlen)) {
		/* the writer names the checkpoint and our tensor: add where it came from */
		size_t n = strlen(c->err);

		snprintf(c->err + n, c->errlen - n, " (from %s of %s)", a->t->name, f->path);
		return -1;
	}
	return 0;
}

/* The parameters no file holds (only a V2 router's bias gets here): zeros. */
static int write_absent(struct from_hf *c, struct ckpt_writer *w)
{
	for (int i = 0; i < c->n_params; i++) {
		const struct param *p = &c->params[i];
		float *zeros;
		int ret;

		if (p->expert_stacked || c->filled[c->param_base[i]])
			continue;
		zeros = calloc(p->numel ? p->numel : 1, sizeof(float));
		if (!zeros)
			return set_err(c->err, c->errlen, "out of memory");
		ret = ckpt_writer_put(w, p->name, p->shape, p->ndim, -1, zeros, c->err, c->errlen);
		free(zeros);
		if (ret)
			return -1;
	}
	return 0;
}

/*
 * The data, one tensor at a time: peak memory is one float32 buffer as large as the largest tensor
 * (an expert's slice for stacked ones), plus the mapped pages of the tensor being read, which are
 * dropped right after.  Each file is unmapped once read.
 */
static int stream_assigned(struct from_hf *c, struct ckpt_writer *w)
{
	uint64_t most = 1, most_scale = 1;
	float *buf = NULL, *sbuf = NULL;
	int ret = -1, i = 0;

	qsort(c->assign, (size_t)c->n_assign, sizeof(*c->assign), cmp_assignment);
	for (int j = 0; j < c->n_assign; j++) {
		if (c->assign[j].t->numel > most)
			most = c->assign[j].t->numel;
		if (c->assign[j].scale && c->assign[j].scale->numel > most_scale)
			most_scale = c->assign[j].scale->numel;
	}
	if (most > SIZE_MAX / sizeof(float) || !(buf = malloc((size_t)most * sizeof(float))) ||
	    !(sbuf = malloc((size_t)most_scale * sizeof(float)))) {
		free(buf);
		return set_err(c->err, c->errlen, "out of memory for a tensor of %llu elements",
			       (unsigned long long)most);
	}
	for (int k = 0; k < c->n_files; k++) {
		/* with fp8 weights a scale may live in another file: all stay mapped to the end (the
		 * pages of what was read are dropped all the same) */
		for (; i < c->n_assign && c->assign[i].file == k; i++)
			if (stream_tensor(c, w, &c->assign[i], buf, sbuf))
				goto out;
		if (!c->n_fp8) {
			st_close(&c->files[k].f);  /* done with this file: unmap it */
			c->files[k].open = 0;
		}
	}
	ret = write_absent(c, w);
out:
	free(buf);
	free(sbuf);
	return ret;
}

static const char *json_string(const cJSON *obj, const char *key)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);

	return cJSON_IsString(v) ? v->valuestring : NULL;
}

static int load_hf_config(struct from_hf *c, struct run_config *rc)
{
	char path[PATH_LEN + 16], *text;
	const char *type;
	const cJSON *qc;
	cJSON *obj;
	int ret;

	snprintf(path, sizeof(path), "%s/config.json", c->dir);
	text = read_text(path, c->err, c->errlen);
	if (!text)
		return -1;
	config_defaults(rc);
	ret = convert_hf_config(rc, text, path, c->notes, c->err, c->errlen);
	obj = ret ? NULL : cJSON_Parse(text);
	type = json_string(obj, "model_type");
	c->v2 = type && !strcmp(type, "deepseek_v2");
	qc = cJSON_GetObjectItemCaseSensitive(obj, "quantization_config");
	if (!ret && qc && !cJSON_IsNull(qc)) {
		/* checked by convert_hf_config already: this only takes the block's shape */
		const char *why = config_hf_fp8(qc, &c->fp8_br, &c->fp8_bc);

		if (why)
			ret = set_err(c->err, c->errlen, "%s: model.quantization_config: %s", path, why);
		c->fp8 = !why;
	}
	cJSON_Delete(obj);
	free(text);
	return ret;
}

/* The parameter table of rc's model, its index by name, and the per-piece bookkeeping. */
static int plan_model(struct from_hf *c, const struct run_config *rc)
{
	size_t slots = 0;

	c->mc = &rc->model;
	c->params = ckpt_model_params(&rc->model, &c->n_params, c->err, c->errlen);
	if (!c->params)
		return -1;
	c->by_name = malloc(sizeof(*c->by_name) * (c->n_params ? (size_t)c->n_params : 1));
	c->param_base = malloc(sizeof(size_t) * (c->n_params ? (size_t)c->n_params : 1));
	if (!c->by_name || !c->param_base)
		return set_err(c->err, c->errlen, "out of memory");
	for (int i = 0; i < c->n_params; i++) {
		c->by_name[i] = &c->params[i];
		c->param_base[i] = slots;
		slots += (size_t)pieces_of(&c->params[i]);
	}
	qsort(c->by_name, (size_t)c->n_params, sizeof(*c->by_name), cmp_param);
	c->filled = calloc(slots ? slots : 1, 1);
	if (!c->filled)
		return set_err(c->err, c->errlen, "out of memory");
	return 0;
}

/* Every header read and every tensor placed and checked, before any data is read. */
static int plan_sources(struct from_hf *c)
{
	if (open_sources(c))
		return -1;
	for (int k = 0; k < c->n_files; k++)
		for (int j = 0; j < c->files[k].f.n_tensors; j++)
			if (plan_tensor(c, k, &c->files[k].f.tensors[j]))
				return -1;
	if (match_scales(c) || check_complete(c))
		return -1;
	if (c->n_fp8)
		print_note(c->notes, "%lld F8_E4M3 weights dequantised (blocks of [%d, %d])",
			   (long long)c->n_fp8, c->fp8_br, c->fp8_bc);
	if (c->skipped_mtp)
		print_note(c->notes, "skipped %lld tensors of layers >= num_hidden_layers + "
			   "num_nextn_predict_layers = %d (multi-token prediction layers the config does not "
			   "have)", (long long)c->skipped_mtp, mc_n_layers(c->mc));
	if (c->skipped_shared)
		print_note(c->notes, "%lld embed_tokens / shared_head.head copies of the multi-token "
			   "prediction layers taken as the model's own (shared)", (long long)c->skipped_shared);
	if (c->skipped_rotary)
		print_note(c->notes, "skipped %lld rotary inv_freq buffers (recomputed)",
		     (long long)c->skipped_rotary);
	return 0;
}

int convert_from_hf(const char *dir, const char *out_path, FILE *notes, char *err, size_t errlen)
{
	struct from_hf ctx = { .dir = dir, .notes = notes, .err = err, .errlen = errlen }, *c = &ctx;
	struct ckpt_meta meta = { 0, 0 };
	struct ckpt_writer *w = NULL;
	struct run_config rc;
	int ret = -1;

	if (load_hf_config(c, &rc) || plan_model(c, &rc) || plan_sources(c))
		goto out;
	w = ckpt_writer_open(out_path, &rc, &meta, err, errlen);
	if (!w)
		goto out;
	if (stream_assigned(c, w)) {
		ckpt_writer_close(w, 0, NULL, 0);  /* removes the temporary file */
		goto out;
	}
	ret = ckpt_writer_close(w, 1, err, errlen);
out:
	for (int k = 0; k < c->n_files; k++)
		if (c->files[k].open)
			st_close(&c->files[k].f);
	free(c->files);
	free(c->assign);
	free(c->scales);
	free(c->filled);
	free(c->param_base);
	free(c->by_name);
	free(c->params);
	return ret;
}

/* ---------------------------------------------------------------- --to-hf */

struct out_tensor {
	char name[HF_NAME_LEN + 16];
	const struct param *p;      /* where it comes from: a piece of p */
	int expert;                 /* -1: the whole of p */
	int scales;                 /* 1: the block scales (NAME_scale_inv) of the F8_E4M3 weight
				     * before it in the list, not the weight itself */
	struct st_spec spec;
	uint64_t numel, bytes;
	int shard;
};

/* --to-hf's state: the checkpoint being read, the tensors to write and where they go. */
struct to_hf {
	const char *dir;
	struct ckpt_reader *r;
	struct out_tensor *t;
	int n, n_shards;
	float *buf;                 /* one tensor (an expert's slice of a stacked one) */
	float *sbuf;                /* its block scales, when it goes out as F8_E4M3 */
	char *err;
	size_t errlen;
};

/* One HF tensor's dtype: fp8 goes as DeepSeek's files (fp8 linear weights, bf16 else); the routing
 * bias stays float32, as in DeepSeek's own checkpoints. */
static enum st_dtype out_dtype(const struct out_tensor *o, enum st_dtype dtype)
{
	if (o->p->kind == PARAM_BUFFER)
		return ST_F32;
	if (dtype != ST_F8_E4M3)
		return dtype;
	return fp8_is_quantised(o->name, o->spec.ndim) ? ST_F8_E4M3 : ST_BF16;
}

/* The scales tensor of the F8_E4M3 weight w: [ceil(rows / 128), ceil(cols / 128)], float32. */
static void scales_of(struct out_tensor *s, const struct out_tensor *w)
{
	*s = *w;
	fp8_scale_name(s->name, sizeof(s->name), w->name);
	s->spec.name = s->name;
	s->spec.dtype = ST_F32;
	s->spec.shape[0] = fp8_blocks(w->spec.shape[0], FP8_BLOCK);
	s->spec.shape[1] = fp8_blocks(w->spec.shape[1], FP8_BLOCK);
	s->numel = (uint64_t)(s->spec.shape[0] * s->spec.shape[1]);
	s->bytes = 4 * s->numel;
	s->scales = 1;
}

static const struct param *param_named(const struct param *params, int n_params, const char *name)
{
	for (int i = 0; i < n_params; i++)
		if (!strcmp(params[i].name, name))
			return &params[i];
	return NULL;
}

/*
 * After an MTP layer's shared_head.norm: the copies of the embedding and the lm_head that HF files
 * carry in every MTP layer (model.layers.N.embed_tokens.weight, .shared_head.head.weight), read from the
 * model's own.  Returns the tensors added (0 after any other parameter).
 */
static int add_shared_copies(struct out_tensor *t, const struct param *p, const struct param *params,
			     int n_params, enum st_dtype dtype)
{
	static const char *const src[2] = { "model.embed_tokens.weight", "lm_head.weight" };
	static const char *const dst[2] = { "embed_tokens.weight", "shared_head.head.weight" };
	int l = layer_of(p->name);

	if (!ends_with(p->name, ".shared_head.norm.weight") || l < 0)
		return 0;
	for (int j = 0; j < 2; j++) {
		struct out_tensor *o = &t[j];
		o->p = param_named(params, n_params, src[j]);
		snprintf(o->name, sizeof(o->name), "model.layers.%d.%s", l, dst[j]);
		o->expert = -1;
		o->spec.name = o->name;
		o->spec.ndim = 2;
		memcpy(o->spec.shape, o->p->shape, sizeof(int64_t) * 2);
		o->spec.dtype = out_dtype(o, dtype);
		o->numel = o->p->numel;
		o->bytes = o->numel * st_dtype_size(o->spec.dtype);
	}
	return 2;
}

/* The HF tensors of a model, experts unstacked, in our parameter order (an fp8 weight followed by
 * its scales; an MTP layer followed by its shared copies). */
static struct out_tensor *list_out_tensors(const struct param *params, int n_params,
					   enum st_dtype dtype, int *n)
{
	int total = 0, k = 0;
	struct out_tensor *t;

	for (int i = 0; i < n_params; i++)
		total += (params[i].expert_stacked ? (int)params[i].shape[0] : 1) +
			 (ends_with(params[i].name, ".shared_head.norm.weight") ? 2 : 0);
	if (dtype == ST_F8_E4M3)
		total *= 2;  /* at most: every tensor with its scales */
	t = calloc(total ? total : 1, sizeof(*t));
	if (!t)
		return NULL;
	for (int i = 0; i < n_params; i++) {
		const struct param *p = &params[i];
		int stacked = p->expert_stacked, ne = stacked ? (int)p->shape[0] : 1;

		for (int e = 0; e < ne; e++, k++) {
			struct out_tensor *o = &t[k];

			hf_name(o->name, sizeof(o->name), p, stacked ? e : -1);
			o->p = p;
			o->expert = stacked ? e : -1;
			o->spec.name = o->name;
			o->spec.ndim = stacked ? p->ndim - 1 : p->ndim;
			memcpy(o->spec.shape, stacked ? p->shape + 1 : p->shape,
			       sizeof(int64_t) * o->spec.ndim);
			o->spec.dtype = out_dtype(o, dtype);
			o->numel = stacked ? p->numel / (size_t)ne : p->numel;
			o->bytes = o->numel * st_dtype_size(o->spec.dtype);
			if (o->spec.dtype == ST_F8_E4M3) {
				scales_of(&t[k + 1], o);
				k++;
			}
		}
		k += add_shared_copies(t + k, p, params, n_params, dtype);
	}
	*n = k;
	return t;
}

static void shard_name(char *out, size_t len, int shard, int n_shards)
{
	if (n_shards == 1)
		snprintf(out, len, "model.safetensors");
	else
		snprintf(out, len, "model-%05d-of-%05d.safetensors", shard + 1, n_shards);
}

/* The order of shard s's tensors, float32 ones first (so every tensor starts aligned to its element
 * size), into order[]; returns their count. */
static int shard_order(const struct to_hf *h, int s, int *order)
{
	int k = 0;

	for (int pass = 0; pass < 2; pass++)
		for (int i = 0; i < h->n; i++)
			if (h->t[i].shard == s && (h->t[i].spec.dtype == ST_F32) == (pass == 0))
				order[k++] = i;
	return k;
}

/*
 * An F8_E4M3 weight (in h->buf, as read): its block scales into h->sbuf and, for the weight itself,
 * h->buf divided by them.  The scales come first in a shard (float32 first, for alignment), so a
 * quantised weight is read twice, once for its scales and once for its bytes.
 */
static int quantise_out(struct to_hf *h, const struct out_tensor *o)
{
	int64_t rows = o->spec.shape[0], cols = o->spec.shape[1];

	if (!o->scales && o->spec.dtype != ST_F8_E4M3)
		return 0;
	if (o->scales) {
		rows = o->p->expert_stacked ? o->p->shape[o->p->ndim - 2] : o->p->shape[0];
		cols = o->p->shape[o->p->ndim - 1];
	}
	if (fp8_block_scales(h->buf, rows, cols, FP8_BLOCK, FP8_BLOCK, h->sbuf))
		return set_err(h->err, h->errlen, "%s: a NaN or infinity: cannot be quantised to fp8",
			       o->p->name);
	if (!o->scales)
		fp8_quantize(h->buf, rows, cols, h->sbuf, FP8_BLOCK, FP8_BLOCK);
	return 0;
}

/* Shard s, streamed: each tensor read from the checkpoint into h->buf, then written out. */
static int write_shard(struct to_hf *h, int s)
{
	static const char *const meta[] = { "format", "pt", NULL };
	char name[64], path[PATH_LEN + 80];
	struct st_spec *specs = malloc(sizeof(*specs) * (h->n ? h->n : 1));
	int *order = malloc(sizeof(int) * (h->n ? h->n : 1)), k;
	struct st_writer *w = NULL;

	if (!specs || !order) {
		free(specs);
		free(order);
		return set_err(h->err, h->errlen, "out of memory");
	}
	k = shard_order(h, s, order);
	for (int i = 0; i < k; i++)
		specs[i] = h->t[order[i]].spec;
	shard_name(name, sizeof(name), s, h->n_shards);
	snprintf(path, sizeof(path), "%s/%s", h->dir, name);
	w = st_writer_open(path, specs, k, meta, h->err, h->errlen);
	for (int i = 0; w && i < k; i++) {
		const struct out_tensor *o = &h->t[order[i]];

		if (ckpt_reader_get(h->r, o->p->name, o->expert, h->buf, h->err, h->errlen) ||
		    quantise_out(h, o) ||
		    st_writer_write(w, o->name, o->scales ? h->sbuf : h->buf, o->numel, h->err,
				    h->errlen)) {
			st_writer_abort(w);
			w = NULL;
		}
	}
	free(specs);
	free(order);
	if (!w)
		return -1;
	return st_writer_close(w, h->err, h->errlen);
}

static int write_index(const char *dir, const struct out_tensor *t, int n, int n_shards,
		       char *err, size_t errlen)
{
	cJSON *root = cJSON_CreateObject(), *meta, *wm;
	char path[PATH_LEN + 40], name[64], num[32];
	uint64_t total = 0;
	char *text;
	int ret;

	if (!root)
		return set_err(err, errlen, "out of memory");
	for (int i = 0; i < n; i++)
		total += t[i].bytes;
	meta = cJSON_AddObjectToObject(root, "metadata");
	snprintf(num, sizeof(num), "%llu", (unsigned long long)total);
	cJSON_AddItemToObject(meta, "total_size", cJSON_CreateRaw(num));
	wm = cJSON_AddObjectToObject(root, "weight_map");
	for (int i = 0; wm && i < n; i++) {
		shard_name(name, sizeof(name), t[i].shard, n_shards);
		cJSON_AddItemToObject(wm, t[i].name, cJSON_CreateString(name));
	}
	if (wm)
		convert_json_sort(wm);
	text = cJSON_Print(root);
	cJSON_Delete(root);
	if (!text)
		return set_err(err, errlen, "out of memory");
	snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
	ret = convert_write_text(path, text, err, errlen);
	free(text);
	return ret;
}

/* Shards of at most shard_bytes (a tensor larger than that alone in its shard), in order. */
static void assign_shards(struct to_hf *h, uint64_t shard_bytes)
{
	uint64_t in_shard = 0;

	h->n_shards = 0;
	for (int i = 0; i < h->n; i++) {
		/* a new shard when this tensor would overflow a non-empty one; scales stay with their
		 * weight, as in DeepSeek's files */
		if (!h->n_shards || (in_shard && in_shard + h->t[i].bytes > shard_bytes &&
				     !h->t[i].scales)) {
			h->n_shards++;
			in_shard = 0;
		}
		h->t[i].shard = h->n_shards - 1;
		in_shard += h->t[i].bytes;
	}
}

/* After a failure: no weights of ours left in the directory (it held none before), nor the directory
 * itself when it was made for this conversion. */
static void remove_outputs(const struct to_hf *h, int made_dir)
{
	char name[64], path[PATH_LEN + 80];

	for (int s = 0; s < h->n_shards; s++) {
		shard_name(name, sizeof(name), s, h->n_shards);
		snprintf(path, sizeof(path), "%s/%s", h->dir, name);
		unlink(path);
	}
	snprintf(path, sizeof(path), "%s/model.safetensors.index.json", h->dir);
	unlink(path);
	if (made_dir)
		rmdir(h->dir);
}

/* The shards, the index and config.json. */
static int write_hf_dir(struct to_hf *h, const struct run_config *rc, enum st_dtype dtype)
{
	char path[PATH_LEN + 16], *json;
	uint64_t most = 1, most_scales = 1;
	int ret;

	for (int i = 0; i < h->n; i++) {
		if (!h->t[i].scales && h->t[i].numel > most)
			most = h->t[i].numel;
		if (h->t[i].scales && h->t[i].numel > most_scales)
			most_scales = h->t[i].numel;
	}
	if (most > SIZE_MAX / sizeof(float) || !(h->buf = malloc((size_t)most * sizeof(float))) ||
	    !(h->sbuf = malloc((size_t)most_scales * sizeof(float))))
		return set_err(h->err, h->errlen, "out of memory for a tensor of %llu elements",
			       (unsigned long long)most);
	for (int s = 0; s < h->n_shards; s++)
		if (write_shard(h, s))
			return -1;
	if (h->n_shards > 1 && write_index(h->dir, h->t, h->n, h->n_shards, h->err, h->errlen))
		return -1;
	json = convert_hf_config_json(&rc->model, dtype);
	if (!json)
		return set_err(h->err, h->errlen, "out of memory");
	snprintf(path, sizeof(path), "%s/config.json", h->dir);
	ret = convert_write_text(path, json, h->err, h->errlen);
	free(json);
	return ret;
}

/*
 * Streamed: the checkpoint is read one tensor (one expert's slice for stacked ones) at a time and
 * written straight to its shard, so peak memory is one such tensor, whatever the model's size.
 */
int convert_to_hf(const char *ckpt_path, const char *dir, const struct convert_to_hf_opts *opts,
		  FILE *notes, char *err, size_t errlen)
{
	struct convert_to_hf_opts o = { ST_F32, CONVERT_DEFAULT_SHARD_BYTES };
	struct to_hf h = { .dir = dir, .err = err, .errlen = errlen };
	const struct param *params;
	struct run_config rc;
	struct stat sb;
	int n_params, made_dir, ret = -1;

	if (opts)
		o = *opts;
	if (o.dtype != ST_F32 && o.dtype != ST_BF16 && o.dtype != ST_F8_E4M3)
		return set_err(err, errlen, "--dtype %s: only f32, bf16 and fp8 are written",
			       st_dtype_name(o.dtype));
	if (!o.shard_bytes)
		return set_err(err, errlen, "--shard-size must be > 0");
	config_defaults(&rc);
	if (checkpoint_read_header(ckpt_path, &rc, NULL, err, errlen))
		return -1;
	if (rc.lora.rank > 0) {  /* LoRA adapters: PEFT's layout */
		if (o.dtype == ST_F8_E4M3)
			return set_err(err, errlen, "--dtype fp8: LoRA adapters are written f32 or bf16");
		return convert_lora_to_peft(ckpt_path, dir, o.dtype, notes, err, errlen);
	}
	config_defaults(&rc);
	h.r = ckpt_reader_open(ckpt_path, &rc, NULL, err, errlen);
	if (!h.r)
		return -1;
	if (rc.model.num_key_value_heads == 0)
		rc.model.num_key_value_heads = rc.model.num_attention_heads;
	made_dir = stat(dir, &sb) != 0;
	if (convert_mkdir_p(dir, err, errlen) || convert_check_out_dir(dir, err, errlen))
		goto out;
	if (rc.model.scoring_func == MOE_SCORING_SOFTMAX && rc.model.n_routed_experts > 0)
		print_note(notes, "scoring_func is softmax: DeepSeek's own code honours it, transformers' "
		     "DeepseekV3 always scores with sigmoid");
	params = ckpt_reader_params(h.r, &n_params);
	h.t = list_out_tensors(params, n_params, o.dtype, &h.n);
	if (!h.t) {
		set_err(err, errlen, "out of memory");
		remove_outputs(&h, made_dir);
		goto out;
	}
	assign_shards(&h, o.shard_bytes);
	if (write_hf_dir(&h, &rc, o.dtype)) {
		remove_outputs(&h, made_dir);
		goto out;
	}
	print_note(notes, "%s: %d tensors in %d file%s (%s)", dir, h.n, h.n_shards,
	     h.n_shards > 1 ? "s" : "", o.dtype == ST_BF16 ? "bf16" : o.dtype == ST_F8_E4M3 ?
	     "fp8 e4m3 linear weights in blocks of 128 x 128, the rest bf16" : "f32");
	ret = 0;
out:
	free(h.buf);
	free(h.sbuf);
	free(h.t);
	ckpt_reader_close(h.r);
	return ret;
}
