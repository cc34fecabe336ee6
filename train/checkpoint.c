/*
 * train/checkpoint.c - HDF5 checkpoints (SPEC 2).  The only file that includes hdf5.h.
 *
 * Writing: everything goes to PATH.tmp.<pid>, which is flushed, closed, fsync'd and renamed over PATH
 * (then the directory is fsync'd), so a crash at any point leaves the previous PATH as it was.
 * Reading: every parameter is checked (present, float32, the model's shape) before any data is read;
 * the data goes into a scratch buffer (the Fletcher32 filter verifies each chunk) and is copied into the
 * model only once every dataset has been read without error.
 *
 * Every HDF5 status code goes through H5TRY, which names the call and the line; HDF5's own printing
 * of its error stack is switched off and its innermost message is appended to ours instead.
 */
#define _POSIX_C_SOURCE 200809L

#include "train/checkpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <hdf5.h>

#define CKPT_CHUNK_ELEMS ((hsize_t)1 << 20)	/* at most ~1M floats (4 MiB) per chunk */
#define CKPT_MODEL_GROUP "/model"

/* What an operation is working on, for its messages. */
struct ckctx {
	const char *path;
	const char *what;	/* dataset or attribute being handled, or NULL */
	char *err;
	size_t errlen;
};

struct walk_buf {
	char *buf;
	size_t len;
};

static herr_t innermost_cb(unsigned n, const H5E_error2_t *e, void *data)
{
	struct walk_buf *w = data;

	if (n == 0 && e->desc)
		snprintf(w->buf, w->len, "%s", e->desc);
	return 0;
}

/* The most specific message on HDF5's error stack (where the error was first detected). */
static void h5_detail(char *buf, size_t len)
{
	struct walk_buf w = { buf, len };

	buf[0] = 0;
	H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, innermost_cb, &w);
}

static const char *base_name(const char *file)
{
	const char *s = strrchr(file, '/');

	return s ? s + 1 : file;
}

static void h5_fail(struct ckctx *c, const char *call, const char *file, int line)
{
	char detail[256], fn[64];
	size_t n;

	/* "fid = H5Fcreate(tmp, ...)" -> "H5Fcreate" */
	const char *s = strstr(call, "H5");
	if (!s)
		s = call;
	n = strcspn(s, "(");
	if (n >= sizeof(fn))
		n = sizeof(fn) - 1;
	memcpy(fn, s, n);
	fn[n] = 0;
	h5_detail(detail, sizeof(detail));
	snprintf(c->err, c->errlen, "%s: HDF5 call %s(...) failed at %s:%d%s%s%s%s", c->path, fn,
		 base_name(file), line, c->what ? " on " : "", c->what ? c->what : "",
		 detail[0] ? ": " : "", detail);
}

/*
 * Check an HDF5 return value (herr_t, htri_t or hid_t): negative is failure.  Needs `c` and `fail:`.
 * (Not named H5CHECK: hdf5.h defines that one itself.)
 */
#define H5TRY(call)							\
	do {								\
		if ((call) < 0) {					\
			h5_fail(c, #call, __FILE__, __LINE__);		\
			goto fail;					\
		}							\
	} while (0)

#define CKERR(...) snprintf(c->err, c->errlen, __VA_ARGS__)

static void h5_quiet(void)
{
	H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

static void close_id(hid_t *id, herr_t (*fn)(hid_t))
{
	if (*id >= 0)
		fn(*id);
	*id = -1;
}

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

/* ---- root attributes ---- */

static int write_str_attr(struct ckctx *c, hid_t fid, const char *name, const char *value)
{
	hid_t type = -1, space = -1, attr = -1;
	int ret = -1;

	c->what = name;
	H5TRY(type = H5Tcopy(H5T_C_S1));
	H5TRY(H5Tset_size(type, H5T_VARIABLE));
	H5TRY(H5Tset_cset(type, H5T_CSET_UTF8));
	H5TRY(space = H5Screate(H5S_SCALAR));
	H5TRY(attr = H5Acreate2(fid, name, type, space, H5P_DEFAULT, H5P_DEFAULT));
	H5TRY(H5Awrite(attr, type, &value));
	ret = 0;
fail:
	close_id(&attr, H5Aclose);
	close_id(&space, H5Sclose);
	close_id(&type, H5Tclose);
	c->what = NULL;
	return ret;
}

/* file_type: H5T_STD_I32LE or H5T_STD_I64LE */
static int write_int_attr(struct ckctx *c, hid_t fid, const char *name, hid_t file_type,
			  int64_t value)
{
	hid_t space = -1, attr = -1;
	int ret = -1;

	c->what = name;
	H5TRY(space = H5Screate(H5S_SCALAR));
	H5TRY(attr = H5Acreate2(fid, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT));
	H5TRY(H5Awrite(attr, H5T_NATIVE_INT64, &value));
	ret = 0;
fail:
	close_id(&attr, H5Aclose);
	close_id(&space, H5Sclose);
	c->what = NULL;
	return ret;
}

/* Open a scalar root attribute of the given class; -1 with a message when absent or of another kind. */
static int open_attr(struct ckctx *c, hid_t fid, const char *name, H5T_class_t cls, hid_t *attr,
		     hid_t *ftype)
{
	hid_t space = -1;
	htri_t exists;
	hssize_t npoints;
	int ret = -1;

	*attr = *ftype = -1;
	c->what = name;
	H5TRY(exists = H5Aexists(fid, name));
	if (!exists) {
		CKERR("%s: not a moe checkpoint: root attribute '%s' is missing", c->path, name);
		goto fail;
	}
	H5TRY(*attr = H5Aopen(fid, name, H5P_DEFAULT));
	H5TRY(*ftype = H5Aget_type(*attr));
	H5TRY(space = H5Aget_space(*attr));
	H5TRY(npoints = H5Sget_simple_extent_npoints(space));
	if (H5Tget_class(*ftype) != cls || npoints != 1) {
		CKERR("%s: root attribute '%s' is not a single %s", c->path, name,
		      cls == H5T_STRING ? "string" : "integer");
		goto fail;
	}
	ret = 0;
fail:
	close_id(&space, H5Sclose);
	if (ret) {
		close_id(ftype, H5Tclose);
		close_id(attr, H5Aclose);
	}
	return ret;
}

/* Read a string attribute (variable- or fixed-length) into a malloc'd C string. */
static int read_str_attr(struct ckctx *c, hid_t fid, const char *name, char **out)
{
	hid_t attr = -1, ftype = -1, mtype = -1;
	htri_t vlen;
	char *s = NULL;
	int ret = -1;

	*out = NULL;
	if (open_attr(c, fid, name, H5T_STRING, &attr, &ftype))
		return -1;
	H5TRY(vlen = H5Tis_variable_str(ftype));
	H5TRY(mtype = H5Tcopy(H5T_C_S1));
	H5TRY(H5Tset_cset(mtype, H5Tget_cset(ftype)));
	if (vlen) {
		H5TRY(H5Tset_size(mtype, H5T_VARIABLE));
		H5TRY(H5Aread(attr, mtype, &s));
		*out = strdup(s ? s : "");
		H5free_memory(s);
	} else {
		size_t size = H5Tget_size(ftype);

		H5TRY(H5Tset_size(mtype, size + 1));
		*out = calloc(1, size + 1);
		if (*out)
			H5TRY(H5Aread(attr, mtype, *out));
	}
	if (!*out) {
		CKERR("%s: out of memory reading attribute '%s'", c->path, name);
		goto fail;
	}
	ret = 0;
fail:
	if (ret) {
		free(*out);
		*out = NULL;
	}
	close_id(&mtype, H5Tclose);
	close_id(&ftype, H5Tclose);
	close_id(&attr, H5Aclose);
	c->what = NULL;
	return ret;
}

static int read_int_attr(struct ckctx *c, hid_t fid, const char *name, int64_t *out)
{
	hid_t attr = -1, ftype = -1;
	int ret = -1;

	if (open_attr(c, fid, name, H5T_INTEGER, &attr, &ftype))
		return -1;
	H5TRY(H5Aread(attr, H5T_NATIVE_INT64, out));
	ret = 0;
fail:
	close_id(&ftype, H5Tclose);
	close_id(&attr, H5Aclose);
	c->what = NULL;
	return ret;
}

static int write_root_attrs(struct ckctx *c, hid_t fid, const char *json,
			    const struct ckpt_meta *meta)
{
	if (write_str_attr(c, fid, "format", CKPT_FORMAT) ||
	    write_int_attr(c, fid, "format_version", H5T_STD_I32LE, CKPT_FORMAT_VERSION) ||
	    write_int_attr(c, fid, "step", H5T_STD_I64LE, meta ? meta->step : 0) ||
	    write_int_attr(c, fid, "tokens_seen", H5T_STD_I64LE, meta ? meta->tokens_seen : 0) ||
	    write_str_attr(c, fid, "config", json))
		return -1;
	return 0;
}

/* ---- opening ---- */

/* Open read-only and check the format and version. */
static int open_checkpoint(struct ckctx *c, hid_t *fid_out)
{
	hid_t fapl = -1, fid = -1;
	char detail[256], *format = NULL;
	struct stat st;
	int64_t version;
	int ret = -1;

	*fid_out = -1;
	if (stat(c->path, &st) != 0) {
		CKERR("%s: cannot open: %s", c->path, strerror(errno));
		return -1;
	}
	H5TRY(fapl = H5Pcreate(H5P_FILE_ACCESS));
	H5TRY(H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG));
	if (!S_ISREG(st.st_mode) || H5Fis_hdf5(c->path) <= 0 ||
	    (fid = H5Fopen(c->path, H5F_ACC_RDONLY, fapl)) < 0) {
		h5_detail(detail, sizeof(detail));
		CKERR("%s: not a readable HDF5 file (truncated or corrupt?)%s%s", c->path,
		      detail[0] ? ": " : "", detail);
		goto fail;
	}
	if (read_str_attr(c, fid, "format", &format))
		goto fail;
	if (strcmp(format, CKPT_FORMAT) != 0) {
		CKERR("%s: not a moe checkpoint (format is \"%.64s\", expected \"%s\")", c->path,
		      format, CKPT_FORMAT);
		goto fail;
	}
	if (read_int_attr(c, fid, "format_version", &version))
		goto fail;
	if (version != CKPT_FORMAT_VERSION) {
		CKERR("%s: checkpoint format_version %" PRId64 " is not supported (this build reads "
		      "version %d)", c->path, version, CKPT_FORMAT_VERSION);
		goto fail;
	}
	*fid_out = fid;
	fid = -1;
	ret = 0;
fail:
	free(format);
	close_id(&fid, H5Fclose);
	close_id(&fapl, H5Pclose);
	return ret;
}

/* ---- parameters ---- */

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

static int check_local_numel(struct ckctx *c, const struct moe_model *m, const struct param *p)
{
	hsize_t start[MOE_MAX_DIMS], count[MOE_MAX_DIMS], n = 1;

	local_slab(m, p, start, count);
	for (int d = 0; d < p->ndim; d++)
		n *= count[d];
	if (p->ndim < 1 || p->ndim > MOE_MAX_DIMS || n != p->numel ||
	    p->offset + p->numel > m->n_weights) {
		CKERR("%s: internal error: parameter %s has an inconsistent layout", c->path, p->name);
		return -1;
	}
	return 0;
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

static int write_param(struct ckctx *c, hid_t gid, const struct moe_model *m, const struct param *p)
{
	hsize_t dims[MOE_MAX_DIMS], chunk[MOE_MAX_DIMS], start[MOE_MAX_DIMS], count[MOE_MAX_DIMS];
	hid_t space = -1, mspace = -1, dcpl = -1, dset = -1;
	int empty = 0, ret = -1;

	if (check_local_numel(c, m, p))
		return -1;
	c->what = p->name;
	for (int d = 0; d < p->ndim; d++) {
		dims[d] = (hsize_t)p->shape[d];
		empty |= dims[d] == 0;
	}
	local_slab(m, p, start, count);
	chunk_dims(p, chunk);
	H5TRY(space = H5Screate_simple(p->ndim, dims, NULL));
	H5TRY(dcpl = H5Pcreate(H5P_DATASET_CREATE));
	if (!empty) {	/* chunks (and so the checksum) need every dimension > 0 */
		H5TRY(H5Pset_chunk(dcpl, p->ndim, chunk));
		H5TRY(H5Pset_fletcher32(dcpl));
	}
	H5TRY(dset = H5Dcreate2(gid, p->name, H5T_IEEE_F32LE, space, H5P_DEFAULT, dcpl,
				  H5P_DEFAULT));
	if (!empty) {
		H5TRY(H5Sselect_hyperslab(space, H5S_SELECT_SET, start, NULL, count, NULL));
		H5TRY(mspace = H5Screate_simple(p->ndim, count, NULL));
		H5TRY(H5Dwrite(dset, H5T_NATIVE_FLOAT, mspace, space, H5P_DEFAULT,
				 m->weights + p->offset));
	}
	ret = 0;
fail:
	close_id(&dset, H5Dclose);
	close_id(&dcpl, H5Pclose);
	close_id(&mspace, H5Sclose);
	close_id(&space, H5Sclose);
	c->what = NULL;
	return ret;
}

static int write_model(struct ckctx *c, hid_t fid, const struct moe_model *m)
{
	hid_t gid = -1;
	int ret = -1;

	c->what = CKPT_MODEL_GROUP;
	H5TRY(gid = H5Gcreate2(fid, CKPT_MODEL_GROUP, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
	c->what = NULL;
	for (int i = 0; i < m->n_params; i++)
		if (write_param(c, gid, m, &m->params[i]))
			goto fail;
	ret = 0;
fail:
	close_id(&gid, H5Gclose);
	return ret;
}

/* Dataset present, float32, with the model's full shape. */
static int check_param(struct ckctx *c, hid_t gid, const struct param *p)
{
	hsize_t fdims[H5S_MAX_RANK], mdims[MOE_MAX_DIMS];
	hid_t dset = -1, type = -1, space = -1;
	char fbuf[160], mbuf[160];
	int ndim, ret = -1;
	htri_t exists;

	c->what = p->name;
	H5TRY(exists = H5Lexists(gid, p->name, H5P_DEFAULT));
	if (!exists) {
		CKERR("%s: missing dataset %s/%s", c->path, CKPT_MODEL_GROUP, p->name);
		goto fail;
	}
	H5TRY(dset = H5Dopen2(gid, p->name, H5P_DEFAULT));
	H5TRY(type = H5Dget_type(dset));
	if (H5Tget_class(type) != H5T_FLOAT || H5Tget_size(type) != 4) {
		CKERR("%s: %s/%s is not float32", c->path, CKPT_MODEL_GROUP, p->name);
		goto fail;
	}
	H5TRY(space = H5Dget_space(dset));
	H5TRY(ndim = H5Sget_simple_extent_ndims(space));
	H5TRY(H5Sget_simple_extent_dims(space, fdims, NULL));
	for (int d = 0; d < p->ndim; d++)
		mdims[d] = (hsize_t)p->shape[d];
	if (ndim != p->ndim || memcmp(fdims, mdims, (size_t)ndim * sizeof(hsize_t)) != 0) {
		fmt_dims(fbuf, sizeof(fbuf), ndim, fdims);
		fmt_dims(mbuf, sizeof(mbuf), p->ndim, mdims);
		CKERR("%s: %s/%s has shape %s, the model expects %s", c->path, CKPT_MODEL_GROUP,
		      p->name, fbuf, mbuf);
		goto fail;
	}
	ret = 0;
fail:
	close_id(&space, H5Sclose);
	close_id(&type, H5Tclose);
	close_id(&dset, H5Dclose);
	c->what = NULL;
	return ret;
}

struct extra_search {
	const struct moe_model *m;
	char name[256];
};

static herr_t extra_cb(hid_t gid, const char *name, const H5L_info_t *info, void *data)
{
	struct extra_search *s = data;

	(void)gid;
	(void)info;
	if (model_find_param(s->m, name))
		return 0;
	snprintf(s->name, sizeof(s->name), "%s", name);
	return 1;	/* stop: found one */
}

/* Every parameter is present (checked before); refuse anything else in /model. */
static int check_no_extra(struct ckctx *c, hid_t gid, const struct moe_model *m)
{
	struct extra_search s = { .m = m };
	H5G_info_t info;
	herr_t r;

	c->what = CKPT_MODEL_GROUP;
	H5TRY(H5Gget_info(gid, &info));
	if (info.nlinks == (hsize_t)m->n_params) {
		c->what = NULL;
		return 0;
	}
	H5TRY(r = H5Literate(gid, H5_INDEX_NAME, H5_ITER_INC, NULL, extra_cb, &s));
	CKERR("%s: %s/%s is not a parameter of this model (a checkpoint of another model?)", c->path,
	      CKPT_MODEL_GROUP, r > 0 ? s.name : "?");
fail:
	c->what = NULL;
	return -1;
}

static int read_param(struct ckctx *c, hid_t gid, const struct moe_model *m, const struct param *p,
		      float *buf)
{
	hsize_t start[MOE_MAX_DIMS], count[MOE_MAX_DIMS];
	hid_t dset = -1, fspace = -1, mspace = -1;
	char detail[256];
	int ret = -1;

	if (p->numel == 0)
		return 0;
	c->what = p->name;
	local_slab(m, p, start, count);
	H5TRY(dset = H5Dopen2(gid, p->name, H5P_DEFAULT));
	H5TRY(fspace = H5Dget_space(dset));
	H5TRY(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, NULL, count, NULL));
	H5TRY(mspace = H5Screate_simple(p->ndim, count, NULL));
	if (H5Dread(dset, H5T_NATIVE_FLOAT, mspace, fspace, H5P_DEFAULT, buf + p->offset) < 0) {
		h5_detail(detail, sizeof(detail));
		CKERR("%s: reading %s/%s failed (checksum mismatch or read error)%s%s", c->path,
		      CKPT_MODEL_GROUP, p->name, detail[0] ? ": " : "", detail);
		goto fail;
	}
	ret = 0;
fail:
	close_id(&mspace, H5Sclose);
	close_id(&fspace, H5Sclose);
	close_id(&dset, H5Dclose);
	c->what = NULL;
	return ret;
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

/* ---- public ---- */

static int check_writer_holds_all(struct ckctx *c, const struct moe_model *m)
{
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];

		if (p->expert_stacked &&
		    (m->expert_begin != 0 || m->expert_end != p->shape[0])) {
			CKERR("%s: this process holds experts [%d, %d) of %" PRId64 "; a single-process "
			      "checkpoint needs all of them", c->path, m->expert_begin, m->expert_end,
			      p->shape[0]);
			return -1;
		}
	}
	return 0;
}

int checkpoint_save_model(const char *path, const struct moe_model *m, const struct run_config *cfg,
			  const struct ckpt_meta *meta, char *err, size_t errlen)
{
	struct ckctx ctx = { path, NULL, err, errlen }, *c = &ctx;
	hid_t fapl = -1, fid = -1;
	char tmp[1100], *json = NULL;
	int ret = -1;

	h5_quiet();
	if (snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid()) >= (int)sizeof(tmp)) {
		CKERR("%s: path too long", path);
		return -1;
	}
	if (check_writer_holds_all(c, m))
		return -1;
	json = cfg ? config_to_json(cfg) : NULL;
	if (!json) {
		CKERR("%s: cannot serialise the config", path);
		return -1;
	}
	H5TRY(fapl = H5Pcreate(H5P_FILE_ACCESS));
	H5TRY(H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG));
	H5TRY(fid = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, fapl));
	if (write_root_attrs(c, fid, json, meta) || write_model(c, fid, m))
		goto fail;
	H5TRY(H5Fflush(fid, H5F_SCOPE_GLOBAL));
	{
		hid_t f = fid;

		fid = -1;
		H5TRY(H5Fclose(f));
	}
	if (commit_file(c, tmp))
		goto fail;
	ret = 0;
fail:
	close_id(&fid, H5Fclose);
	close_id(&fapl, H5Pclose);
	if (ret)
		unlink(tmp);
	free(json);
	return ret;
}

int checkpoint_read_header(const char *path, struct run_config *cfg, struct ckpt_meta *meta,
			   char *err, size_t errlen)
{
	struct ckctx ctx = { path, NULL, err, errlen }, *c = &ctx;
	struct run_config *tmp = NULL;
	struct ckpt_meta mt;
	char *json = NULL, origin[1100];
	hid_t fid = -1;
	int ret = -1;

	h5_quiet();
	if (open_checkpoint(c, &fid))
		return -1;
	if (read_int_attr(c, fid, "step", &mt.step) ||
	    read_int_attr(c, fid, "tokens_seen", &mt.tokens_seen) ||
	    read_str_attr(c, fid, "config", &json))
		goto fail;
	if (cfg) {
		tmp = malloc(sizeof(*tmp));
		if (!tmp) {
			CKERR("%s: out of memory", path);
			goto fail;
		}
		*tmp = *cfg;
		snprintf(origin, sizeof(origin), "%s (attribute config)", path);
		if (config_apply_json(tmp, json, origin, err, errlen))
			goto fail;
		*cfg = *tmp;
	}
	if (meta)
		*meta = mt;
	ret = 0;
fail:
	free(tmp);
	free(json);
	close_id(&fid, H5Fclose);
	return ret;
}

int checkpoint_load_model(const char *path, struct moe_model *m, char *err, size_t errlen)
{
	struct ckctx ctx = { path, NULL, err, errlen }, *c = &ctx;
	hid_t fid = -1, gid = -1;
	float *buf = NULL;
	htri_t exists;
	int ret = -1;

	h5_quiet();
	for (int i = 0; i < m->n_params; i++)
		if (check_local_numel(c, m, &m->params[i]))
			return -1;
	if (open_checkpoint(c, &fid))
		return -1;
	c->what = CKPT_MODEL_GROUP;
	H5TRY(exists = H5Lexists(fid, CKPT_MODEL_GROUP, H5P_DEFAULT));
	if (!exists) {
		CKERR("%s: missing group %s", path, CKPT_MODEL_GROUP);
		goto fail;
	}
	H5TRY(gid = H5Gopen2(fid, CKPT_MODEL_GROUP, H5P_DEFAULT));
	c->what = NULL;
	/* the whole file must match before any data is read */
	for (int i = 0; i < m->n_params; i++)
		if (check_param(c, gid, &m->params[i]))
			goto fail;
	if (check_no_extra(c, gid, m))
		goto fail;
	buf = malloc((m->n_weights ? m->n_weights : 1) * sizeof(float));
	if (!buf) {
		CKERR("%s: out of memory for a %zu-float scratch buffer", path, m->n_weights);
		goto fail;
	}
	for (int i = 0; i < m->n_params; i++)
		if (read_param(c, gid, m, &m->params[i], buf))
			goto fail;
	/* every dataset read and verified: only now touch the model */
	for (int i = 0; i < m->n_params; i++) {
		const struct param *p = &m->params[i];

		memcpy(m->weights + p->offset, buf + p->offset, p->numel * sizeof(float));
	}
	ret = 0;
fail:
	free(buf);
	close_id(&gid, H5Gclose);
	close_id(&fid, H5Fclose);
	return ret;
}
