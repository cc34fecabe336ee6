/*
 * train/checkpoint.c - HDF5 checkpoints (SPEC 2): the file layout, its writers and readers.
 *
 * Layout: /model/NAME holds the weights, /optim/NAME/exp_avg and /optim/NAME/exp_avg_sq the AdamW
 * moments of every trained parameter (a PARAM_BUFFER has none), /optim's attribute "step" the update
 * count and /state's attributes the rest of a train_state.  One writer and one reader serve both the
 * weights-only and the training checkpoint: a "tensor set" (group, optional leaf name, whether buffers
 * belong to it) names where one arena's tensors live, and every dataset goes through the same code.
 *
 * Writing: everything goes to PATH.tmp.<pid>, which is flushed, closed, fsync'd and renamed over PATH
 * (then the directory is fsync'd), so a crash at any point leaves the previous PATH as it was; a write
 * that fails (a full disk) gives the temporary file up, closing every id, and removes it.
 * Distributed (checkpoint_save_dist): the file is the same whatever the layout.  World rank 0 creates
 * it with every dataset at its full shape (same chunks, never straddling two experts) and its own
 * experts; the other ranks of expert-parallel group 0 then open it in turn and write their experts'
 * hyperslabs (the same per-tensor code, in WRITE_EXPERTS mode); rank 0 commits.  After each phase every
 * rank learns whether any rank failed, and with what message, so all of them return -1 together
 * (the layout checks and that agreement: checkpoint_layout.c).
 * Streaming (ckpt_writer / ckpt_reader, for `moe convert`): the same /model datasets (create_dataset:
 * same shapes, chunks and checksums) written or read one tensor or one expert's block at a time, with
 * the parameter table of the config (ckpt_model_params) and no model in memory; the writer tracks every
 * piece and refuses to commit an incomplete file.
 * Reading: every dataset is checked (present, float32, the model's shape) and every attribute read
 * before any tensor data is read; the data goes into scratch buffers (the Fletcher32 filter verifies
 * each chunk) and is copied into the model, the optimizer and the train state only once everything has
 * been read without error.
 *
 * Every HDF5 call goes through the helper of checkpoint_h5.h: a scope owns the ids a function opens,
 * names a failing call and its line, and closes everything on every path.  The run's directory (names,
 * latest, prune) is checkpoint_dir.c.
 */
#define _POSIX_C_SOURCE 200809L

#include "train/checkpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "launch/comm.h"
#include "train/checkpoint_h5.h"

#define CKPT_CHUNK_ELEMS ((hsize_t)1 << 20)	/* at most ~1M floats (4 MiB) per chunk */
#define CKPT_DSET_MAX (MOE_MAX_NAME + 64)	/* "/optim/" NAME "/exp_avg_sq" */
#define CKPT_TMP_MAX 1100			/* PATH.tmp.<pid> */

/* "[a, b, c]" */
static void fmt_dims(char *buf, size_t len, int ndim, const hsize_t *dims)
{
	size_t o = (size_t)snprintf(buf, len, "[");

	for (int d = 0; d < ndim && o < len; d++)
		o += (size_t)snprintf(buf + o, len - o, "%s%llu", d ? ", " : "",
				      (unsigned long long)dims[d]);
	if (o < len)
		snprintf(buf + o, len - o, "]");
}

static int write_root_attrs(struct ckctx *c, hid_t fid, const char *json,
			    const struct ckpt_meta *meta)
{
	if (h5_write_str_attr(c, fid, "format", CKPT_FORMAT) ||
	    h5_write_int_attr(c, fid, "format_version", H5T_STD_I32LE, CKPT_FORMAT_VERSION) ||
	    h5_write_int_attr(c, fid, "step", H5T_STD_I64LE, meta ? meta->step : 0) ||
	    h5_write_int_attr(c, fid, "tokens_seen", H5T_STD_I64LE, meta ? meta->tokens_seen : 0) ||
	    h5_write_str_attr(c, fid, "config", json))
		return -1;
	return 0;
}

/* ---- /state: the fields of struct train_state, one attribute each ---- */

enum field_type { FIELD_I64, FIELD_U64, FIELD_F64 };

static const struct state_field {
	const char *name;
	enum field_type type;
	hssize_t n;
	size_t offset;		/* into struct train_state */
} state_fields[] = {
	{ "step", FIELD_I64, 1, offsetof(struct train_state, step) },
	{ "tokens_seen", FIELD_I64, 1, offsetof(struct train_state, tokens_seen) },
	{ "data_position", FIELD_U64, 1, offsetof(struct train_state, data_position) },
	{ "data_seed", FIELD_U64, 1, offsetof(struct train_state, data_seed) },
	{ "rng", FIELD_U64, CKPT_ARRAY_SIZE(((struct train_state *)0)->rng),
	  offsetof(struct train_state, rng) },
	{ "elapsed_s", FIELD_F64, 1, offsetof(struct train_state, elapsed_s) },
	{ "ref_checksum", FIELD_U64, 1, offsetof(struct train_state, ref_checksum) },
};

/* The file type, memory type and class of a field (hid_t constants are not compile-time constants). */
static void field_types(enum field_type t, hid_t *file_type, hid_t *mem_type, H5T_class_t *cls)
{
	switch (t) {
	case FIELD_I64:
		*file_type = H5T_STD_I64LE;
		*mem_type = H5T_NATIVE_INT64;
		*cls = H5T_INTEGER;
		break;
	case FIELD_U64:
		*file_type = H5T_STD_U64LE;
		*mem_type = H5T_NATIVE_UINT64;
		*cls = H5T_INTEGER;
		break;
	default:
		*file_type = H5T_IEEE_F64LE;
		*mem_type = H5T_NATIVE_DOUBLE;
		*cls = H5T_FLOAT;
		break;
	}
}

static int write_state(struct ckctx *c, hid_t fid, const struct train_state *st)
{
	struct h5scope s;
	hid_t gid, ftype, mtype;
	H5T_class_t cls;

	h5s_begin(&s, c, "/state");
	gid = H5OWN(&s, H5Gcreate2(fid, "/state", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
	for (size_t i = 0; i < CKPT_ARRAY_SIZE(state_fields) && !s.failed; i++) {
		const struct state_field *f = &state_fields[i];

		field_types(f->type, &ftype, &mtype, &cls);
		H5SUB(&s, h5_write_attr(c, gid, f->name, ftype, mtype, (hsize_t)f->n,
					(const char *)st + f->offset));
	}
	return h5s_end(&s);
}

/* /state into *st (every field present and of the right kind). */
static int read_state(struct ckctx *c, hid_t fid, struct train_state *st)
{
	struct h5scope s;
	hid_t gid, ftype, mtype;
	H5T_class_t cls;

	if (h5_open_group(c, fid, "/state", "missing group /state (the training state)", &gid))
		return -1;
	h5s_begin(&s, c, c->what);
	h5s_own(&s, gid, H5Gclose, "H5Gopen2", __FILE__, __LINE__);
	for (size_t i = 0; i < CKPT_ARRAY_SIZE(state_fields) && !s.failed; i++) {
		const struct state_field *f = &state_fields[i];

		field_types(f->type, &ftype, &mtype, &cls);
		H5SUB(&s, h5_read_attr(c, gid, "/state", f->name, cls, mtype, f->n,
				       (char *)st + f->offset));
	}
	return h5s_end(&s);
}

/* ---- opening ---- */

/* Open read-only and check the format and version. */
static int open_checkpoint(struct ckctx *c, hid_t *fid_out)
{
	struct h5scope s;
	char detail[256], *format = NULL;
	struct stat st;
	int64_t version;
	hid_t fid = -1;

	*fid_out = -1;
	if (stat(c->path, &st) != 0) {
		CKERR("%s: cannot open: %s", c->path, strerror(errno));
		return -1;
	}
	h5s_begin(&s, c, NULL);
	if (S_ISREG(st.st_mode) && H5Fis_hdf5(c->path) > 0)
		fid = h5_file_open(c, c->path, H5F_ACC_RDONLY);
	if (fid < 0) {
		h5_detail(detail, sizeof(detail));
		CKERR("%s: not a readable HDF5 file (truncated or corrupt?)%s%s", c->path,
		      detail[0] ? ": " : "", detail);
		h5s_fail(&s);
	}
	if (!s.failed)
		h5s_own(&s, fid, h5_file_discard, "H5Fopen", __FILE__, __LINE__);
	H5SUB(&s, h5_read_str_attr(c, fid, "format", &format));
	if (!s.failed && strcmp(format, CKPT_FORMAT) != 0) {
		CKERR("%s: not a moe checkpoint (format is \"%.64s\", expected \"%s\")", c->path,
		      format, CKPT_FORMAT);
		h5s_fail(&s);
	}
	H5SUB(&s, h5_read_int_attr(c, fid, "root", "format_version", &version));
	if (!s.failed && version != CKPT_FORMAT_VERSION) {
		CKERR("%s: checkpoint format_version %" PRId64 " is not supported (this build reads "
		      "version %d)", c->path, version, CKPT_FORMAT_VERSION);
		h5s_fail(&s);
	}
	if (!s.failed)
		*fid_out = h5s_release(&s, fid);
	free(format);
	return h5s_end(&s);
}

/* ---- tensors ---- */

/*
 * Where the tensors of one float arena (laid out like the model's weights) live: GROUP/NAME, or
 * GROUP/NAME/LEAF when leaf is set.  Buffers (PARAM_BUFFER) are not trained and have no optimizer state.
 */
struct tensor_set {
	const char *group;
	const char *leaf;
	int has_buffers;
};

static const struct tensor_set set_model = { "/model", NULL, 1 };
static const struct tensor_set set_optim[2] = {
	{ "/optim", "exp_avg", 0 },
	{ "/optim", "exp_avg_sq", 0 },
};

/* The sets of a checkpoint, in file order: /model, then (when there is an optimizer) the moments. */
#define N_SETS 3
static const struct tensor_set *const ckpt_sets[N_SETS] = { &set_model, &set_optim[0], &set_optim[1] };

/* The arena the tensors of ckpt_sets[k] come from. */
static const float *set_arena(int k, const struct moe_model *m, const struct adamw *opt)
{
	return k == 0 ? m->weights : k == 1 ? opt->exp_avg : opt->exp_avg_sq;
}

static int in_set(const struct tensor_set *s, const struct param *p)
{
	return s->has_buffers || p->kind != PARAM_BUFFER;
}

static void tensor_path(char *buf, const struct tensor_set *s, const struct param *p)
{
	snprintf(buf, CKPT_DSET_MAX, "%s/%s%s%s", s->group, p->name, s->leaf ? "/" : "",
		 s->leaf ? s->leaf : "");
}

/* The expert rows [begin, end) this rank holds of a stacked tensor, else the whole tensor. */
static void local_slab(const struct moe_model *m, const struct param *p, hsize_t *start,
		       hsize_t *count)
{
	for (int d = 0; d < p->ndim; d++) {
		start[d] = 0;
		count[d] = (hsize_t)p->shape[d];
	}
	if (p->expert_stacked) {
		start[0] = (hsize_t)m->expert_begin;
		count[0] = (hsize_t)(m->expert_end - m->expert_begin);
	}
}

/*
 * Chunk shape: at most CKPT_CHUNK_ELEMS elements, whole trailing rows where they fit; a stacked tensor
 * never mixes two experts in one chunk (one expert per chunk unless an expert alone exceeds the limit).
 */
static void chunk_dims(const struct param *p, hsize_t *chunk)
{
	int d;

	for (d = 0; d < p->ndim; d++) {
		hsize_t rest = 1;

		for (int e = d + 1; e < p->ndim; e++)
			rest *= (hsize_t)p->shape[e];
		if ((d == 0 && p->expert_stacked) || rest >= CKPT_CHUNK_ELEMS) {
			chunk[d] = 1;
			continue;
		}
		chunk[d] = CKPT_CHUNK_ELEMS / rest;
		if (chunk[d] > (hsize_t)p->shape[d])
			chunk[d] = (hsize_t)p->shape[d];
		break;
	}
	for (d++; d < p->ndim; d++)
		chunk[d] = (hsize_t)p->shape[d];
}

static int check_tensor(struct ckctx *c, hid_t fid, const struct tensor_set *s, const struct param *p);

/*
 * What a writer does with each tensor of a set:
 *   WRITE_CREATE   create the dataset with its full shape (chunked, checksummed) and write this rank's
 *                  slab: the whole tensor, or this rank's experts of a stacked one
 *   WRITE_EXPERTS  for stacked tensors only: open the dataset another process created (checking its
 *                  shape) and write this rank's experts into it
 */
enum write_mode { WRITE_CREATE, WRITE_EXPERTS };

/*
 * Create the dataset dpath of parameter p with its full shape, chunked (chunk_dims) and checksummed:
 * the one definition of a checkpoint's datasets, shared by every writer.  lcpl creates the intermediate
 * group GROUP/NAME of a leaf.  The dataset belongs to scope `owner`.
 */
static hid_t create_dataset(struct h5scope *owner, hid_t fid, hid_t lcpl, const char *dpath,
			    const struct param *p)
{
	hsize_t dims[MOE_MAX_DIMS], chunk[MOE_MAX_DIMS];
	struct h5scope s;
	hid_t space, dcpl, dset;
	int empty = 0;

	if (owner->failed)
		return -1;
	h5s_begin(&s, owner->c, dpath);
	for (int d = 0; d < p->ndim; d++) {
		dims[d] = (hsize_t)p->shape[d];
		empty |= dims[d] == 0;
	}
	chunk_dims(p, chunk);
	space = H5OWN(&s, H5Screate_simple(p->ndim, dims, NULL), H5Sclose);
	dcpl = H5OWN(&s, H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
	if (!empty) {	/* chunks (and so the checksum) need every dimension > 0 */
		H5DO(&s, H5Pset_chunk(dcpl, p->ndim, chunk));
		H5DO(&s, H5Pset_fletcher32(dcpl));
	}
	dset = H5OWN(&s, H5Dcreate2(fid, dpath, H5T_IEEE_F32LE, space, lcpl, dcpl, H5P_DEFAULT),
		     H5Dclose);
	if (!s.failed)
		h5s_own(owner, h5s_release(&s, dset), H5Dclose, "H5Dcreate2", __FILE__, __LINE__);
	if (h5s_end(&s))
		return h5s_fail(owner);
	return dset;
}

/* Write the block [start, start + count) of an open dataset from data (count's elements, dense). */
static int write_slab(struct ckctx *c, hid_t dset, const char *dpath, int ndim, const hsize_t *start,
		      const hsize_t *count, const float *data)
{
	struct h5scope s;
	hid_t space, mspace;

	h5s_begin(&s, c, dpath);
	space = H5OWN(&s, H5Dget_space(dset), H5Sclose);
	H5DO(&s, H5Sselect_hyperslab(space, H5S_SELECT_SET, start, NULL, count, NULL));
	mspace = H5OWN(&s, H5Screate_simple(ndim, count, NULL), H5Sclose);
	H5DO(&s, H5Dwrite(dset, H5T_NATIVE_FLOAT, mspace, space, H5P_DEFAULT, data));
	return h5s_end(&s);
}

static int write_tensor(struct ckctx *c, hid_t fid, hid_t lcpl, const struct tensor_set *set,
			const struct moe_model *m, const struct param *p, const float *arena,
			enum write_mode mode)
{
	hsize_t start[MOE_MAX_DIMS], count[MOE_MAX_DIMS];
	char dpath[CKPT_DSET_MAX];
	struct h5scope s;
	hid_t dset;

	if (mode == WRITE_EXPERTS && !p->expert_stacked)
		return 0;
	if (ckpt_check_local_numel(c, m, p))
		return -1;
	tensor_path(dpath, set, p);
	h5s_begin(&s, c, dpath);
	if (mode == WRITE_CREATE) {
		dset = create_dataset(&s, fid, lcpl, dpath, p);
	} else {
		H5SUB(&s, check_tensor(c, fid, set, p));	/* present, float32, the model's shape */
		dset = H5OWN(&s, H5Dopen2(fid, dpath, H5P_DEFAULT), H5Dclose);
	}
	/* nothing to write of an empty tensor or an empty expert slice */
	local_slab(m, p, start, count);
	if (p->numel > 0)
		H5SUB(&s, write_slab(c, dset, dpath, p->ndim, start, count, arena + p->offset));
	return h5s_end(&s);
}

/* A link creation list that creates the intermediate groups (GROUP/NAME of a leaf). */
static hid_t intermediate_lcpl(struct h5scope *s)
{
	hid_t lcpl = H5OWN(s, H5Pcreate(H5P_LINK_CREATE), H5Pclose);

	H5DO(s, H5Pset_create_intermediate_group(lcpl, 1));
	return lcpl;
}

/* Every tensor of the set from arena; in WRITE_CREATE mode the set's group exists already. */
static int write_set(struct ckctx *c, hid_t fid, const struct tensor_set *set,
		     const struct moe_model *m, const float *arena, enum write_mode mode)
{
	struct h5scope s;
	hid_t lcpl;

	h5s_begin(&s, c, set->group);
	lcpl = intermediate_lcpl(&s);
	c->what = NULL;
	for (int i = 0; i < m->n_params && !s.failed; i++)
		if (in_set(set, &m->params[i]))
			H5SUB(&s, write_tensor(c, fid, lcpl, set, m, &m->params[i], arena, mode));
	return h5s_end(&s);
}

/* A new group, with the attribute "step" when step is not NULL. */
static int create_group(struct ckctx *c, hid_t fid, const char *name, const int64_t *step)
{
	struct h5scope s;
	hid_t gid;

	h5s_begin(&s, c, name);
	gid = H5OWN(&s, H5Gcreate2(fid, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
	if (step)
		H5SUB(&s, h5_write_int_attr(c, gid, "step", H5T_STD_I64LE, *step));
	return h5s_end(&s);
}

/*
 * /model and, with opt, /optim (the moments and, in WRITE_CREATE mode, the groups and the attribute
 * step): every set of ckpt_sets, from its arena.
 */
static int write_tensors(struct ckctx *c, hid_t fid, const struct moe_model *m,
			 const struct adamw *opt, enum write_mode mode)
{
	const int nsets = opt ? N_SETS : 1;

	for (int k = 0; k < nsets; k++) {
		const struct tensor_set *s = ckpt_sets[k];

		/* the two moments share /optim */
		if (mode == WRITE_CREATE && (k == 0 || strcmp(s->group, ckpt_sets[k - 1]->group)) &&
		    create_group(c, fid, s->group, s == &set_optim[0] ? &opt->step : NULL))
			return -1;
		if (write_set(c, fid, s, m, set_arena(k, m, opt), mode))
			return -1;
	}
	return 0;
}

/* Dataset present, float32, with the model's full shape. */
static int check_tensor(struct ckctx *c, hid_t fid, const struct tensor_set *set, const struct param *p)
{
	hsize_t fdims[H5S_MAX_RANK], mdims[MOE_MAX_DIMS];
	char dpath[CKPT_DSET_MAX], fbuf[160], mbuf[160];
	struct h5scope s;
	hid_t dset, type, space;
	int ndim;
	htri_t exists;

	tensor_path(dpath, set, p);
	h5s_begin(&s, c, dpath);
	H5SUB(&s, h5_link_exists(c, fid, dpath, &exists));
	if (!s.failed && !exists) {
		CKERR("%s: missing dataset %s", c->path, dpath);
		h5s_fail(&s);
		return h5s_end(&s);
	}
	dset = H5OWN(&s, H5Dopen2(fid, dpath, H5P_DEFAULT), H5Dclose);
	type = H5OWN(&s, H5Dget_type(dset), H5Tclose);
	if (!s.failed && (H5Tget_class(type) != H5T_FLOAT || H5Tget_size(type) != 4)) {
		CKERR("%s: %s is not float32", c->path, dpath);
		h5s_fail(&s);
		return h5s_end(&s);
	}
	space = H5OWN(&s, H5Dget_space(dset), H5Sclose);
	ndim = (int)H5DO(&s, H5Sget_simple_extent_ndims(space));
	H5DO(&s, H5Sget_simple_extent_dims(space, fdims, NULL));
	if (s.failed)
		return h5s_end(&s);
	for (int d = 0; d < p->ndim; d++)
		mdims[d] = (hsize_t)p->shape[d];
	if (ndim != p->ndim || memcmp(fdims, mdims, (size_t)ndim * sizeof(hsize_t)) != 0) {
		fmt_dims(fbuf, sizeof(fbuf), ndim, fdims);
		fmt_dims(mbuf, sizeof(mbuf), p->ndim, mdims);
		CKERR("%s: %s has shape %s, the model expects %s", c->path, dpath, fbuf, mbuf);
		h5s_fail(&s);
	}
	return h5s_end(&s);
}

/* A parameter of a table by name (linear, like model_find_param: used on failure paths only). */
static const struct param *table_find(const struct param *params, int n, const char *name)
{
	for (int i = 0; i < n; i++)
		if (!strcmp(params[i].name, name))
			return &params[i];
	return NULL;
}

struct extra_search {
	const struct param *params;
	int n;
	const struct tensor_set *s;
	char name[256];
	int is_param;	/* the extra one is a parameter (a buffer, with no optimizer state) */
};

static herr_t extra_cb(hid_t gid, const char *name, const H5L_info_t *info, void *data)
{
	struct extra_search *x = data;
	const struct param *p = table_find(x->params, x->n, name);

	(void)gid;
	(void)info;
	if (p && in_set(x->s, p))
		return 0;
	snprintf(x->name, sizeof(x->name), "%s", name);
	x->is_param = p != NULL;
	return 1;	/* stop: found one */
}

/* Every tensor of the set is present (checked before); refuse anything else in its group. */
static int check_no_extra(struct ckctx *c, hid_t fid, const struct tensor_set *set,
			  const struct param *params, int n)
{
	struct extra_search x = { .params = params, .n = n, .s = set };
	struct h5scope s;
	H5G_info_t info;
	hsize_t want = 0;
	hid_t gid;
	herr_t r;

	for (int i = 0; i < n; i++)
		want += (hsize_t)in_set(set, &params[i]);
	if (h5_open_group(c, fid, set->group, NULL, &gid))
		return -1;
	h5s_begin(&s, c, set->group);
	h5s_own(&s, gid, H5Gclose, "H5Gopen2", __FILE__, __LINE__);
	H5DO(&s, H5Gget_info(gid, &info));
	if (s.failed || info.nlinks == want)
		return h5s_end(&s);
	r = (herr_t)H5DO(&s, H5Literate(gid, H5_INDEX_NAME, H5_ITER_INC, NULL, extra_cb, &x));
	if (s.failed)
		return h5s_end(&s);
	if (r > 0 && x.is_param)
		CKERR("%s: %s/%s: this parameter has no optimizer state", c->path, set->group, x.name);
	else
		CKERR("%s: %s/%s is not a parameter of this model (a checkpoint of another model?)",
		      c->path, set->group, r > 0 ? x.name : "?");
	h5s_fail(&s);
	return h5s_end(&s);
}

/* The block [start, start + count) of dataset dpath into buf (dense), its chunks' checksums verified. */
static int read_slab(struct ckctx *c, hid_t fid, const char *dpath, int ndim, const hsize_t *start,
		     const hsize_t *count, float *buf)
{
	struct h5scope s;
	hid_t dset, fspace, mspace;
	char detail[256];

	h5s_begin(&s, c, dpath);
	dset = H5OWN(&s, H5Dopen2(fid, dpath, H5P_DEFAULT), H5Dclose);
	fspace = H5OWN(&s, H5Dget_space(dset), H5Sclose);
	H5DO(&s, H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, NULL, count, NULL));
	mspace = H5OWN(&s, H5Screate_simple(ndim, count, NULL), H5Sclose);
	if (!s.failed && H5Dread(dset, H5T_NATIVE_FLOAT, mspace, fspace, H5P_DEFAULT, buf) < 0) {
		h5_detail(detail, sizeof(detail));
		CKERR("%s: reading %s failed (checksum mismatch or read error)%s%s", c->path, dpath,
		      detail[0] ? ": " : "", detail);
		h5s_fail(&s);
	}
	return h5s_end(&s);
}

/* This rank's slice of one tensor into buf at the parameter's offset. */
static int read_tensor(struct ckctx *c, hid_t fid, const struct tensor_set *s, const struct moe_model *m,
		       const struct param *p, float *buf)
{
	hsize_t start[MOE_MAX_DIMS], count[MOE_MAX_DIMS];
	char dpath[CKPT_DSET_MAX];

	if (p->numel == 0)
		return 0;
	tensor_path(dpath, s, p);
	local_slab(m, p, start, count);
	return read_slab(c, fid, dpath, p->ndim, start, count, buf + p->offset);
}

/* ---- atomic commit ---- */

static int fsync_path(struct ckctx *c, const char *path, int flags)
{
	int fd = open(path, flags | O_CLOEXEC);

	if (fd < 0) {
		CKERR("%s: cannot open %s to sync it: %s", c->path, path, strerror(errno));
		return -1;
	}
	/* some file systems cannot sync a directory (EINVAL): nothing more to do there */
	if (fsync(fd) != 0 && !(errno == EINVAL && (flags & O_DIRECTORY))) {
		CKERR("%s: fsync %s failed: %s", c->path, path, strerror(errno));
		close(fd);
		return -1;
	}
	close(fd);
	return 0;
}

/* The closed temporary file reaches the disk, then takes the final name, then the name is durable. */
static int commit_file(struct ckctx *c, const char *tmp)
{
	char dir[1024];
	const char *slash = strrchr(c->path, '/');

	if (fsync_path(c, tmp, O_RDONLY))
		return -1;
	if (rename(tmp, c->path) != 0) {
		CKERR("%s: cannot rename %s over it: %s", c->path, tmp, strerror(errno));
		return -1;
	}
	if (!slash)
		snprintf(dir, sizeof(dir), ".");
	else if (slash == c->path)
		snprintf(dir, sizeof(dir), "/");
	else
		snprintf(dir, sizeof(dir), "%.*s", (int)(slash - c->path), c->path);
	return fsync_path(c, dir, O_RDONLY | O_DIRECTORY);
}

/* ---- the single-process writer ---- */

/* PATH.tmp.<pid of this process> */
static int tmp_name(struct ckctx *c, char *tmp, size_t len)
{
	if (snprintf(tmp, len, "%s" CKPT_TMP_SUFFIX "%d", c->path, (int)getpid()) >= (int)len) {
		CKERR("%s: path too long", c->path);
		return -1;
	}
	return 0;
}

static struct ckpt_meta meta_of(const struct train_state *st)
{
	struct ckpt_meta meta = { 0, 0 };

	if (st) {
		meta.step = st->step;
		meta.tokens_seen = st->tokens_seen;
	}
	return meta;
}

/*
 * tmp created (truncated) with the root attributes: the config as JSON and meta.  Its file id, or -1
 * (given up again; the caller removes tmp).
 */
static hid_t create_with_root(struct ckctx *c, const char *tmp, const struct run_config *cfg,
			      const struct ckpt_meta *meta)
{
	char *json = cfg ? config_to_json(cfg) : NULL;
	hid_t fid;

	if (!json) {
		CKERR("%s: cannot serialise the config", c->path);
		return -1;
	}
	fid = h5_file_create(c, tmp);
	if (fid >= 0 && write_root_attrs(c, fid, json, meta)) {
		h5_file_discard(fid);
		fid = -1;
	}
	free(json);
	return fid;
}

/*
 * Create tmp with the root attributes, /model, and /optim and /state when opt and st are given: every
 * dataset with its full shape, holding this process's slab of it (all of it unless the tensor is stacked
 * and this process holds only some experts: the others' rows are written by fill_experts).  Flushed and
 * closed; the caller removes tmp on failure.
 */
static int create_file(struct ckctx *c, const char *tmp, const struct moe_model *m,
		       const struct adamw *opt, const struct run_config *cfg,
		       const struct ckpt_meta *meta, const struct train_state *st)
{
	hid_t fid = create_with_root(c, tmp, cfg, meta);

	if (fid < 0)
		return -1;
	if (write_tensors(c, fid, m, opt, WRITE_CREATE) || (st && write_state(c, fid, st))) {
		h5_file_discard(fid);
		return -1;
	}
	return h5_file_close(c, &fid);
}

/*
 * Write this process's experts of every stacked tensor (weights and, with opt, both moments) into tmp,
 * which create_file made (the datasets' shapes are checked against this model first); then close it and
 * fsync it, so that its data is on disk wherever the process that renames it runs.
 */
static int fill_experts(struct ckctx *c, const char *tmp, const struct moe_model *m,
			const struct adamw *opt)
{
	hid_t fid = h5_file_open(c, tmp, H5F_ACC_RDWR);

	if (fid < 0)
		return -1;
	if (write_tensors(c, fid, m, opt, WRITE_EXPERTS)) {
		h5_file_discard(fid);
		return -1;
	}
	if (h5_file_close(c, &fid))
		return -1;
	return fsync_path(c, tmp, O_RDONLY);
}

/* Root attributes, /model, and /optim and /state when opt and st are given, all from this process. */
static int write_checkpoint(const char *path, const struct moe_model *m, const struct adamw *opt,
			    const struct run_config *cfg, const struct ckpt_meta *meta,
			    const struct train_state *st, char *err, size_t errlen)
{
	struct ckctx ctx = { path, NULL, err, errlen }, *c = &ctx;
	char tmp[CKPT_TMP_MAX];

	h5_quiet();
	if (tmp_name(c, tmp, sizeof(tmp)) || ckpt_check_writer_holds_all(c, m) ||
	    ckpt_check_writer_arrays(c, m, opt))
		return -1;
	if (create_file(c, tmp, m, opt, cfg, meta, st) || commit_file(c, tmp)) {
		unlink(tmp);
		return -1;
	}
	return 0;
}

int checkpoint_save_model(const char *path, const struct moe_model *m, const struct run_config *cfg,
			  const struct ckpt_meta *meta, char *err, size_t errlen)
{
	return write_checkpoint(path, m, NULL, cfg, meta, NULL, err, errlen);
}

int checkpoint_save(const char *path, const struct moe_model *m, const struct adamw *opt,
		    const struct run_config *cfg, const struct train_state *st, char *err, size_t errlen)
{
	struct ckpt_meta meta = meta_of(st);

	return write_checkpoint(path, m, opt, cfg, &meta, st, err, errlen);
}

/* ---- the distributed writer ---- */

/*
 * Only the writers, expert-parallel group 0, write: world rank 0 creates PATH.tmp.<its pid> with every
 * dataset and attribute and its own experts, then ranks 1 .. ep-1 in turn add theirs, then rank 0
 * commits.  Every phase ends with ckpt_sync_failure, so a failure anywhere stops every rank there.
 */
int checkpoint_save_dist(const char *path, const struct moe_model *m, const struct adamw *opt,
			 const struct run_config *cfg, const struct train_state *st, const struct dist *d,
			 char *err, size_t errlen)
{
	struct ckctx ctx = { path, NULL, err, errlen }, *c = &ctx;
	const struct ckpt_meta meta = meta_of(st);
	char tmp[CKPT_TMP_MAX];
	int failed;

	if (!d || d->world <= 1)
		return checkpoint_save(path, m, opt, cfg, st, err, errlen);
	h5_quiet();
	memset(tmp, 0, sizeof(tmp));
	if (errlen)
		err[0] = 0;
	if (ckpt_check_dist_layout(c, m, opt, d))
		return -1;
	/* every rank checks its arrays; rank 0 names the file, for all */
	failed = ckpt_check_writer_arrays(c, m, opt) ||
		 (d->rank == 0 && tmp_name(c, tmp, sizeof(tmp)));
	if (ckpt_sync_failure(c, d, failed))
		return -1;
	if (comm_broadcast(d->world_g, tmp, sizeof(tmp), COMM_BYTE, 0)) {
		CKERR("%s: checkpoint: comm_broadcast failed", path);
		return -1;
	}
	tmp[sizeof(tmp) - 1] = 0;
	/* rank 0: every dataset at its full shape, the attributes, /state, and experts [0, E/ep) */
	failed = d->rank == 0 && create_file(c, tmp, m, opt, cfg, &meta, st);
	if (ckpt_sync_failure(c, d, failed))
		goto fail;
	/* the other writers' experts, one at a time (serial HDF5: one process has the file open) */
	for (int r = 1; r < d->ep; r++) {
		failed = d->dp_rank == 0 && d->ep_rank == r && fill_experts(c, tmp, m, opt);
		if (ckpt_sync_failure(c, d, failed))
			goto fail;
	}
	failed = d->rank == 0 && commit_file(c, tmp);
	if (ckpt_sync_failure(c, d, failed))
		goto fail;
	return 0;
fail:
	if (d->rank == 0)
		unlink(tmp);
	return -1;
}

/* ---- the reader ---- */

/* The root attributes of an open checkpoint: the config applied over *cfg, the metadata. */
static int read_header(struct ckctx *c, hid_t fid, struct run_config *cfg, struct ckpt_meta *meta)
{
	struct run_config *tmp = NULL;
	struct ckpt_meta mt;
	char *json = NULL, origin[1100];
	int ret = -1;

	if (h5_read_int_attr(c, fid, "root", "step", &mt.step) ||
	    h5_read_int_attr(c, fid, "root", "tokens_seen", &mt.tokens_seen) ||
	    h5_read_str_attr(c, fid, "config", &json))
		goto fail;
	if (cfg) {
		tmp = malloc(sizeof(*tmp));
		if (!tmp) {
			CKERR("%s: out of memory", c->path);
			goto fail;
		}
		*tmp = *cfg;
		snprintf(origin, sizeof(origin), "%s (attribute config)", c->path);
		if (config_apply_json(tmp, json, origin, c->err, c->errlen))
			goto fail;
		*cfg = *tmp;
	}
	if (meta)
		*meta = mt;
	ret = 0;
fail:
	free(tmp);
	free(json);
	return ret;
}

int checkpoint_read_header(const char *path, struct run_config *cfg, struct ckpt_meta *meta,
			   char *err, size_t errlen)
{
	struct ckctx ctx = { path, NULL, err, errlen }, *c = &ctx;
	hid_t fid = -1;
	int ret;

	h5_quiet();
	if (open_checkpoint(c, &fid))
		return -1;
	ret = read_header(c, fid, cfg, meta);
	h5_file_discard(fid);
	return ret;
}

/* The groups of the sets and /optim's step: present before any dataset is looked at. */
static int check_groups(struct ckctx *c, hid_t fid, const struct adamw *opt, int64_t *opt_step)
{
	struct h5scope s;
	hid_t gid;

	if (h5_open_group(c, fid, set_model.group, NULL, &gid))
		return -1;
	H5Gclose(gid);
	if (!opt)
		return 0;
	if (h5_open_group(c, fid, set_optim[0].group, "no optimizer state (/optim): a weights-only "
			  "checkpoint cannot be resumed; use train.init_checkpoint", &gid))
		return -1;
	h5s_begin(&s, c, c->what);
	h5s_own(&s, gid, H5Gclose, "H5Gopen2", __FILE__, __LINE__);
	H5SUB(&s, h5_read_int_attr(c, gid, "/optim", "step", opt_step));
	return h5s_end(&s);
}

/* Every dataset of the sets present and of the model's shape, and nothing else in their groups. */
static int check_sets(struct ckctx *c, hid_t fid, const struct moe_model *m, int nsets)
{
	const struct tensor_set *const *sets = ckpt_sets;

	for (int k = 0; k < nsets; k++) {
		for (int i = 0; i < m->n_params; i++)
			if (in_set(sets[k], &m->params[i]) &&
			    check_tensor(c, fid, sets[k], &m->params[i]))
				return -1;
		/* the two moments share /optim */
		if ((k == 0 || strcmp(sets[k]->group, sets[k - 1]->group) != 0) &&
		    check_no_extra(c, fid, sets[k], m->params, m->n_params))
			return -1;
	}
	return 0;
}

/* This rank's slices of every set's tensors into buf (nsets arenas of m->n_weights floats). */
static int read_sets(struct ckctx *c, hid_t fid, const struct moe_model *m, int nsets, float *buf)
{
	for (int k = 0; k < nsets; k++)
		for (int i = 0; i < m->n_params; i++)
			if (in_set(ckpt_sets[k], &m->params[i]) &&
			    read_tensor(c, fid, ckpt_sets[k], m, &m->params[i],
					buf + (size_t)k * m->n_weights))
				return -1;
	return 0;
}

int checkpoint_load(const char *path, struct moe_model *m, struct adamw *opt, struct train_state *st,
		    char *err, size_t errlen)
{
	struct ckctx ctx = { path, NULL, err, errlen }, *c = &ctx;
	const struct tensor_set *const *sets = ckpt_sets;
	float *dst[N_SETS] = { m->weights, opt ? opt->exp_avg : NULL, opt ? opt->exp_avg_sq : NULL };
	const int nsets = opt ? N_SETS : 1;
	const size_t n = m->n_weights;
	struct train_state st_new;
	int64_t opt_step = 0;
	hid_t fid = -1;
	float *buf = NULL;
	int ret = -1;

	h5_quiet();
	for (int i = 0; i < m->n_params; i++)
		if (ckpt_check_local_numel(c, m, &m->params[i]))
			return -1;
	if (opt && ckpt_check_optim_layout(c, m, opt))
		return -1;
	if (open_checkpoint(c, &fid))
		return -1;
	/* the whole file must match, and every attribute be read, before any tensor data is read */
	if (check_groups(c, fid, opt, &opt_step) || check_sets(c, fid, m, nsets) ||
	    (st && read_state(c, fid, &st_new)))
		goto fail;
	if (n > SIZE_MAX / sizeof(float) / (size_t)nsets ||
	    !(buf = malloc((n ? n : 1) * (size_t)nsets * sizeof(float)))) {
		CKERR("%s: out of memory for %d scratch buffers of %zu floats", path, nsets, n);
		goto fail;
	}
	if (read_sets(c, fid, m, nsets, buf))
		goto fail;
	/* everything read and verified: only now touch the model, the optimizer and the state */
	for (int k = 0; k < nsets; k++) {
		for (int i = 0; i < m->n_params; i++) {
			const struct param *p = &m->params[i];

			if (in_set(sets[k], p))
				memcpy(dst[k] + p->offset, buf + (size_t)k * n + p->offset,
				       p->numel * sizeof(float));
			else	/* untrained: its moments stay zero */
				memset(dst[k] + p->offset, 0, p->numel * sizeof(float));
		}
	}
	if (opt)
		opt->step = opt_step;
	if (st)
		*st = st_new;
	ret = 0;
fail:
	free(buf);
	h5_file_discard(fid);
	return ret;
}

int checkpoint_load_model(const char *path, struct moe_model *m, char *err, size_t errlen)
{
	return checkpoint_load(path, m, NULL, NULL, err, errlen);
}

/* ---- streaming: one tensor, or one expert of a stacked tensor, at a time ---- */

struct param *ckpt_model_params(const struct model_config *mc, int *n, char *err, size_t errlen)
{
	struct param *p = model_param_table(mc, n, err, errlen);

	if (!p)
		return NULL;
	for (int i = 0; i < *n; i++)
		p[i].offset = 0;
	return p;
}

/* A model's parameters, with an index by name (the streaming writer looks up every tensor). */
struct param_table {
	struct param *params;
	int n;
	const struct param **sorted;
};

static int cmp_param_name(const void *a, const void *b)
{
	return strcmp((*(const struct param *const *)a)->name, (*(const struct param *const *)b)->name);
}

static int cmp_key_param(const void *key, const void *elem)
{
	return strcmp(key, (*(const struct param *const *)elem)->name);
}

static void table_free(struct param_table *t)
{
	free(t->params);
	free(t->sorted);
	memset(t, 0, sizeof(*t));
}

static int table_build(struct ckctx *c, struct param_table *t, const struct model_config *mc)
{
	char why[512];

	t->params = ckpt_model_params(mc, &t->n, why, sizeof(why));
	if (!t->params) {
		CKERR("%s: %s", c->path, why);
		return -1;
	}
	t->sorted = malloc(sizeof(*t->sorted) * (t->n > 0 ? (size_t)t->n : 1));
	if (!t->sorted) {
		CKERR("%s: out of memory", c->path);
		table_free(t);
		return -1;
	}
	for (int i = 0; i < t->n; i++)
		t->sorted[i] = &t->params[i];
	qsort(t->sorted, (size_t)t->n, sizeof(*t->sorted), cmp_param_name);
	return 0;
}

static const struct param *table_lookup(const struct param_table *t, const char *name)
{
	const struct param *const *hit = bsearch(name, t->sorted, (size_t)t->n, sizeof(*t->sorted),
						 cmp_key_param);

	return hit ? *hit : NULL;
}

/* One piece of p: the whole tensor (expert < 0) or one expert's block of a stacked tensor. */
static int piece_slab(struct ckctx *c, const struct param *p, int expert, hsize_t *start,
		      hsize_t *count)
{
	for (int d = 0; d < p->ndim; d++) {
		start[d] = 0;
		count[d] = (hsize_t)p->shape[d];
	}
	if (expert < 0)
		return 0;
	if (!p->expert_stacked) {
		CKERR("%s: tensor %s is not stacked by expert (expert %d given)", c->path, p->name,
		      expert);
		return -1;
	}
	if (expert >= p->shape[0]) {
		CKERR("%s: tensor %s: expert %d, but the model has %" PRId64 " routed experts", c->path,
		      p->name, expert, p->shape[0]);
		return -1;
	}
	start[0] = (hsize_t)expert;
	count[0] = 1;
	return 0;
}

/* The shape of the data given for a piece: the piece's, without the expert axis for one expert. */
static int check_piece_shape(struct ckctx *c, const struct param *p, int expert, const int64_t *shape,
			     int ndim)
{
	const int64_t *want = expert >= 0 ? p->shape + 1 : p->shape;
	const int want_ndim = expert >= 0 ? p->ndim - 1 : p->ndim;
	hsize_t g[H5S_MAX_RANK], m[MOE_MAX_DIMS];
	char gbuf[160], mbuf[160], which[32] = "";
	int same = ndim == want_ndim;

	for (int d = 0; same && d < ndim; d++)
		same = shape[d] == want[d];
	if (same)
		return 0;
	for (int d = 0; d < ndim && d < H5S_MAX_RANK; d++)
		g[d] = shape[d] < 0 ? 0 : (hsize_t)shape[d];
	for (int d = 0; d < want_ndim; d++)
		m[d] = (hsize_t)want[d];
	fmt_dims(gbuf, sizeof(gbuf), ndim < 0 ? 0 : ndim < H5S_MAX_RANK ? ndim : H5S_MAX_RANK, g);
	fmt_dims(mbuf, sizeof(mbuf), want_ndim, m);
	if (expert >= 0)
		snprintf(which, sizeof(which), " (expert %d)", expert);
	CKERR("%s: tensor %s%s has shape %s, the model expects %s", c->path, p->name, which, gbuf,
	      mbuf);
	return -1;
}

/* Pieces of p: one per expert of a stacked tensor, else one. */
static size_t n_pieces(const struct param *p)
{
	return p->expert_stacked ? (size_t)p->shape[0] : 1;
}

struct ckpt_writer {
	char *path;
	char tmp[CKPT_TMP_MAX];
	hid_t fid, lcpl;
	struct param_table t;
	size_t *base;		/* params[i]'s first piece in done[] */
	unsigned char *created;	/* per parameter: its dataset exists */
	unsigned char *done;	/* per piece: written */
	int failed;		/* an HDF5 write failed: the file is never committed */
};

static void writer_free(struct ckpt_writer *w)
{
	free(w->path);
	table_free(&w->t);
	free(w->base);
	free(w->created);
	free(w->done);
	free(w);
}

static int writer_alloc(struct ckctx *c, struct ckpt_writer *w)
{
	size_t pieces = 0;

	w->base = malloc(sizeof(*w->base) * (w->t.n ? (size_t)w->t.n : 1));
	w->created = calloc(w->t.n ? (size_t)w->t.n : 1, 1);
	if (!w->base || !w->created)
		goto oom;
	for (int i = 0; i < w->t.n; i++) {
		w->base[i] = pieces;
		pieces += n_pieces(&w->t.params[i]);
	}
	w->done = calloc(pieces ? pieces : 1, 1);
	if (!w->done)
		goto oom;
	return 0;
oom:
	CKERR("%s: out of memory", c->path);
	return -1;
}

/* PATH.tmp.<pid> with the root attributes and an empty /model. */
static int writer_create(struct ckctx *c, struct ckpt_writer *w, const struct run_config *cfg,
			 const struct ckpt_meta *meta)
{
	struct h5scope s;

	w->fid = create_with_root(c, w->tmp, cfg, meta);
	if (w->fid < 0)
		return -1;
	h5s_begin(&s, c, set_model.group);
	H5SUB(&s, create_group(c, w->fid, set_model.group, NULL));
	w->lcpl = intermediate_lcpl(&s);
	if (!s.failed)
		h5s_release(&s, w->lcpl);
	return h5s_end(&s);
}

struct ckpt_writer *ckpt_writer_open(const char *path, const struct run_config *cfg,
				     const struct ckpt_meta *meta, char *err, size_t errlen)
{
	struct ckctx ctx = { path, NULL, err, errlen }, *c = &ctx;
	struct ckpt_writer *w = calloc(1, sizeof(*w));

	h5_quiet();
	if (!w || !(w->path = strdup(path))) {
		CKERR("%s: out of memory", path);
		free(w);
		return NULL;
	}
	w->fid = w->lcpl = -1;
	if (tmp_name(c, w->tmp, sizeof(w->tmp)) || table_build(c, &w->t, &cfg->model) ||
	    writer_alloc(c, w) || writer_create(c, w, cfg, meta)) {
		h5_file_discard(w->fid);
		if (w->tmp[0])	/* created, perhaps, before a later step failed */
			unlink(w->tmp);
		writer_free(w);
		return NULL;
	}
	return w;
}

/* Create the dataset on its first piece, then write the piece's block. */
static int writer_write(struct ckctx *c, struct ckpt_writer *w, const struct param *p,
			const hsize_t *start, const hsize_t *count, const float *data)
{
	const int i = (int)(p - w->t.params);
	char dpath[CKPT_DSET_MAX];
	struct h5scope s;
	hsize_t numel = 1;
	hid_t dset;

	tensor_path(dpath, &set_model, p);
	h5s_begin(&s, c, dpath);
	if (!w->created[i]) {
		dset = create_dataset(&s, w->fid, w->lcpl, dpath, p);
		w->created[i] = !s.failed;
	} else {
		dset = H5OWN(&s, H5Dopen2(w->fid, dpath, H5P_DEFAULT), H5Dclose);
	}
	for (int d = 0; d < p->ndim; d++)
		numel *= count[d];
	if (numel > 0)
		H5SUB(&s, write_slab(c, dset, dpath, p->ndim, start, count, data));
	return h5s_end(&s);
}

int ckpt_writer_put(struct ckpt_writer *w, const char *name, const int64_t *shape, int ndim,
		    int expert, const float *data, char *err, size_t errlen)
{
	struct ckctx ctx = { w->path, NULL, err, errlen }, *c = &ctx;
	const struct param *p = table_lookup(&w->t, name);
	hsize_t start[MOE_MAX_DIMS], count[MOE_MAX_DIMS];
	size_t first, n;

	if (w->failed) {
		CKERR("%s: tensor %s: an earlier write to this file failed", w->path, name);
		return -1;
	}
	if (!p) {
		CKERR("%s: tensor %s is not a parameter of this model", w->path, name);
		return -1;
	}
	if (piece_slab(c, p, expert, start, count) || check_piece_shape(c, p, expert, shape, ndim))
		return -1;
	first = w->base[p - w->t.params] + (expert >= 0 ? (size_t)expert : 0);
	n = expert >= 0 ? 1 : n_pieces(p);
	for (size_t k = 0; k < n; k++) {
		if (w->done[first + k]) {
			if (p->expert_stacked)
				CKERR("%s: tensor %s: expert %zu written twice", w->path, name,
				      first + k - w->base[p - w->t.params]);
			else
				CKERR("%s: tensor %s written twice", w->path, name);
			return -1;
		}
	}
	if (writer_write(c, w, p, start, count, data)) {
		w->failed = 1;
		return -1;
	}
	memset(w->done + first, 1, n);
	return 0;
}

/* Every piece of every parameter written, or -1 naming the first one missing. */
static int writer_complete(struct ckctx *c, const struct ckpt_writer *w)
{
	const struct param *first = NULL;
	size_t missing = 0, expert = 0;

	for (int i = 0; i < w->t.n; i++) {
		const struct param *p = &w->t.params[i];

		for (size_t e = 0; e < n_pieces(p); e++) {
			if (w->done[w->base[i] + e])
				continue;
			if (!missing++) {
				first = p;
				expert = e;
			}
		}
	}
	if (!missing)
		return 0;
	if (first->expert_stacked)
		CKERR("%s: incomplete: %s/%s, expert %zu of %" PRId64 ", was never written (%zu "
		      "pieces missing in all)", c->path, set_model.group, first->name, expert,
		      first->shape[0], missing);
	else
		CKERR("%s: incomplete: %s/%s was never written (%zu pieces missing in all)", c->path,
		      set_model.group, first->name, missing);
	return -1;
}

/* Flush and close the file to keep it, or give it up; -1 when HDF5 could not write everything. */
static int writer_close_file(struct ckctx *c, struct ckpt_writer *w, int keep)
{
	if (w->lcpl >= 0)
		H5Pclose(w->lcpl);
	w->lcpl = -1;
	if (keep)
		return h5_file_close(c, &w->fid);
	h5_file_discard(w->fid);
	w->fid = -1;
	return 0;
}

int ckpt_writer_close(struct ckpt_writer *w, int commit, char *err, size_t errlen)
{
	struct ckctx ctx = { w ? w->path : "", NULL, err, errlen }, *c = &ctx;
	int ret = 0;

	if (!w)
		return 0;
	if (commit && w->failed) {
		CKERR("%s: not committed: a write to it failed", w->path);
		ret = -1;
	} else if (commit) {
		ret = writer_complete(c, w);
	}
	if (writer_close_file(c, w, commit && !ret) && commit && !ret)
		ret = -1;
	if (commit && !ret)
		ret = commit_file(c, w->tmp);
	if (!commit || ret)
		unlink(w->tmp);
	writer_free(w);
	return commit ? ret : 0;
}

struct ckpt_reader {
	char *path;
	hid_t fid;
	struct param_table t;
};

void ckpt_reader_close(struct ckpt_reader *r)
{
	if (!r)
		return;
	h5_file_discard(r->fid);
	table_free(&r->t);
	free(r->path);
	free(r);
}

/* The header, and /model: every dataset present, float32, of the model's shape, and nothing else. */
static int reader_check(struct ckctx *c, struct ckpt_reader *r, struct run_config *rc,
			struct ckpt_meta *meta)
{
	hid_t gid = -1;

	if (open_checkpoint(c, &r->fid) || read_header(c, r->fid, rc, meta) ||
	    table_build(c, &r->t, &rc->model) ||
	    h5_open_group(c, r->fid, set_model.group, NULL, &gid))
		return -1;
	H5Gclose(gid);
	for (int i = 0; i < r->t.n; i++)
		if (check_tensor(c, r->fid, &set_model, &r->t.params[i]))
			return -1;
	return check_no_extra(c, r->fid, &set_model, r->t.params, r->t.n);
}

struct ckpt_reader *ckpt_reader_open(const char *path, struct run_config *cfg,
				     struct ckpt_meta *meta, char *err, size_t errlen)
{
	struct ckctx ctx = { path, NULL, err, errlen }, *c = &ctx;
	struct ckpt_reader *r = calloc(1, sizeof(*r));
	struct run_config *rc = malloc(sizeof(*rc));

	h5_quiet();
	if (!r || !rc || !(r->path = strdup(path))) {
		CKERR("%s: out of memory", path);
		goto fail;
	}
	r->fid = -1;
	if (cfg)
		*rc = *cfg;
	else
		config_defaults(rc);
	if (reader_check(c, r, rc, meta))
		goto fail;
	if (cfg)
		*cfg = *rc;
	free(rc);
	return r;
fail:
	free(rc);
	ckpt_reader_close(r);
	return NULL;
}

const struct param *ckpt_reader_params(const struct ckpt_reader *r, int *n)
{
	*n = r->t.n;
	return r->t.params;
}

int ckpt_reader_get(struct ckpt_reader *r, const char *name, int expert, float *out, char *err,
		    size_t errlen)
{
	struct ckctx ctx = { r->path, NULL, err, errlen }, *c = &ctx;
	const struct param *p = table_lookup(&r->t, name);
	hsize_t start[MOE_MAX_DIMS], count[MOE_MAX_DIMS], numel = 1;
	char dpath[CKPT_DSET_MAX];

	if (!p) {
		CKERR("%s: tensor %s is not a parameter of this model", r->path, name);
		return -1;
	}
	if (piece_slab(c, p, expert, start, count))
		return -1;
	for (int d = 0; d < p->ndim; d++)
		numel *= count[d];
	if (!numel)
		return 0;
	tensor_path(dpath, &set_model, p);
	return read_slab(c, r->fid, dpath, p->ndim, start, count, out);
}
