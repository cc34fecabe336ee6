/*
 * train/checkpoint_h5.c - the checkpoint module's HDF5 helper (checkpoint_h5.h): scopes that own ids
 * and the failure path, files, attributes and groups.
 *
 * A full disk: HDF5 1.10 cannot close a file whose writes fail while it flushes (H5Fflush, or the
 * flush inside H5Fclose).  H5Fclose then returns an error and keeps the id, although it has torn the
 * file's structures down; any later use of the id crashes (SIGSEGV), its own exit handler's included,
 * and a failed H5Fflush leaves the metadata cache so that no later close succeeds.  Hence:
 *  - no explicit H5Fflush: a file to keep is closed (which flushes) by h5_file_close;
 *  - a file given up after a failed write (h5_file_discard) first has its descriptor pointed at an
 *    anonymous memory file: the writes HDF5 still makes while closing go there and succeed, the close
 *    releases everything, and the real file's descriptor is closed, so that its blocks are freed once
 *    the caller unlinks it;
 *  - when a close fails all the same, the id is lost: the file's descriptor, if still open, is pointed
 *    at memory as above (the disk space is freed), and the library's termination is skipped at exit:
 *    HDF5's own exit handler is never installed (H5dont_atexit, before its first use); ours calls
 *    H5close only when no id was lost, so that the process ends with its own status.
 */
#define _GNU_SOURCE	/* memfd_create */

#include "train/checkpoint_h5.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define H5_STR_ATTR_MAX (1 << 20)	/* a string attribute read (the config: a few KiB) */

struct walk_buf {
	char *buf;
	size_t len;
};

/*
 * The POSIX driver's write error spans lines ("file write failed: time = ..., filename = ..., errno =
 * 28, error message = 'No space left on device', buf = ...").  Keep its first words and the system's
 * message: "file write failed: No space left on device".
 */
static void condense(char *buf, size_t len, const char *desc)
{
	const char *msg = strstr(desc, "error message = '"), *colon = strchr(desc, ':'), *end;

	if (msg && colon && colon < msg) {
		msg += strlen("error message = '");
		end = strchr(msg, '\'');
		snprintf(buf, len, "%.*s: %.*s", (int)(colon - desc), desc,
			 (int)(end ? end - msg : (ptrdiff_t)strlen(msg)), msg);
	} else {
		snprintf(buf, len, "%s", desc);
	}
	for (char *q = buf; *q; q++)
		if (*q == '\n' || *q == '\r')
			*q = ' ';
}

static herr_t innermost_cb(unsigned n, const H5E_error2_t *e, void *data)
{
	struct walk_buf *w = data;

	if (n == 0 && e->desc)
		condense(w->buf, w->len, e->desc);
	return 0;
}

void h5_detail(char *buf, size_t len)
{
	struct walk_buf w = { buf, len };

	buf[0] = 0;
	H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, innermost_cb, &w);
}

static int lost_id;	/* an H5Fclose failed: HDF5 holds an id it can no longer close */

/* Instead of HDF5's exit handler: its termination, unless it would crash on a lost id. */
static void h5_at_exit(void)
{
	if (!lost_id)
		H5close();
}

/*
 * After a lost id the library's memory is never given back (above): tell LeakSanitizer, in sanitizer
 * builds, that what libhdf5 allocated is not ours to free.  Unused otherwise.
 */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void)
{
	return "leak:libhdf5\n";
}

void h5_quiet(void)
{
	static int once;

	if (!once) {	/* effective before the library's first use (see above) */
		H5dont_atexit();
		atexit(h5_at_exit);
		once = 1;
	}
	H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

static const char *base_name(const char *file)
{
	const char *s = strrchr(file, '/');

	return s ? s + 1 : file;
}

void h5_fail(struct ckctx *c, const char *call, const char *file, int line)
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

/* ---- scopes ---- */

void h5s_begin(struct h5scope *s, struct ckctx *c, const char *what)
{
	s->c = c;
	s->what_before = c->what;
	s->failed = 0;
	s->n = 0;
	c->what = what;
}

hid_t h5s_own(struct h5scope *s, hid_t id, herr_t (*close)(hid_t), const char *call, const char *file,
	      int line)
{
	if (id < 0) {
		h5_fail(s->c, call, file, line);
		s->failed = 1;
		return -1;
	}
	if (s->n == H5SCOPE_IDS) {	/* a programming error: never silently leak */
		close(id);
		snprintf(s->c->err, s->c->errlen, "%s: internal error: more than %d HDF5 ids in one "
			 "scope (%s)", s->c->path, H5SCOPE_IDS, call);
		s->failed = 1;
		return -1;
	}
	s->id[s->n] = id;
	s->close[s->n++] = close;
	return id;
}

int64_t h5s_check(struct h5scope *s, int64_t r, const char *call, const char *file, int line)
{
	if (r < 0) {
		h5_fail(s->c, call, file, line);
		s->failed = 1;
	}
	return r;
}

hid_t h5s_release(struct h5scope *s, hid_t id)
{
	for (int i = s->n - 1; i >= 0; i--) {
		if (s->id[i] != id)
			continue;
		memmove(&s->id[i], &s->id[i + 1], (size_t)(s->n - i - 1) * sizeof(s->id[0]));
		memmove(&s->close[i], &s->close[i + 1], (size_t)(s->n - i - 1) * sizeof(s->close[0]));
		s->n--;
		break;
	}
	return id;
}

int h5s_fail(struct h5scope *s)
{
	s->failed = 1;
	return -1;
}

static const char *closer_name(herr_t (*close)(hid_t))
{
	return close == H5Dclose ? "H5Dclose" : close == H5Gclose ? "H5Gclose" :
	       close == H5Aclose ? "H5Aclose" : close == H5Sclose ? "H5Sclose" :
	       close == H5Tclose ? "H5Tclose" : close == H5Pclose ? "H5Pclose" : "H5Fclose";
}

int h5s_end(struct h5scope *s)
{
	while (s->n > 0) {
		s->n--;
		/* a close can fail too: closing a dataset writes its cached chunks */
		if (s->close[s->n](s->id[s->n]) < 0 && !s->failed) {
			h5_fail(s->c, closer_name(s->close[s->n]), __FILE__, __LINE__);
			s->failed = 1;
		}
	}
	s->c->what = s->what_before;
	return s->failed ? -1 : 0;
}

/* ---- files ---- */

/* Access: close the file when its id is closed, with everything still open in it. */
static hid_t strong_fapl(struct h5scope *s)
{
	hid_t fapl = H5OWN(s, H5Pcreate(H5P_FILE_ACCESS), H5Pclose);

	H5DO(s, H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG));
	return fapl;
}

hid_t h5_file_create(struct ckctx *c, const char *path)
{
	struct h5scope s;
	hid_t fapl, fid;

	h5s_begin(&s, c, NULL);
	fapl = strong_fapl(&s);
	H5DO(&s, H5Pset_libver_bounds(fapl, H5F_LIBVER_V110, H5F_LIBVER_V110));
	fid = H5OWN(&s, H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl), h5_file_discard);
	if (!s.failed)
		h5s_release(&s, fid);
	return h5s_end(&s) ? -1 : fid;
}

hid_t h5_file_open(struct ckctx *c, const char *path, unsigned flags)
{
	struct h5scope s;
	hid_t fapl, fid;

	h5s_begin(&s, c, NULL);
	fapl = strong_fapl(&s);
	fid = H5OWN(&s, H5Fopen(path, flags, fapl), h5_file_discard);
	if (!s.failed)
		h5s_release(&s, fid);
	return h5s_end(&s) ? -1 : fid;
}

/* The descriptor of an open file of the POSIX driver, and what it refers to; -1 for another driver. */
static int file_descriptor(hid_t fid, struct stat *sb)
{
	void *handle = NULL;
	int fd;

	if (H5Fget_vfd_handle(fid, H5P_DEFAULT, &handle) < 0 || !handle)
		return -1;
	fd = *(int *)handle;
	return fstat(fd, sb) == 0 ? fd : -1;
}

/* Point descriptor fd, when it still refers to the file sb describes, at an anonymous memory file. */
static void redirect_to_memory(int fd, const struct stat *sb)
{
	struct stat now;
	int scratch;

	if (fd < 0 || fstat(fd, &now) != 0 || now.st_dev != sb->st_dev || now.st_ino != sb->st_ino)
		return;
	scratch = memfd_create("moe-checkpoint-discarded", MFD_CLOEXEC);
	if (scratch < 0)
		return;
	dup2(scratch, fd);
	close(scratch);
}

static int writable(hid_t fid)
{
	unsigned intent = 0;

	return H5Fget_intent(fid, &intent) >= 0 && (intent & H5F_ACC_RDWR);
}

herr_t h5_file_discard(hid_t fid)
{
	struct stat sb;

	if (fid < 0)
		return 0;
	if (writable(fid))
		redirect_to_memory(file_descriptor(fid, &sb), &sb);
	if (H5Fclose(fid) < 0) {
		lost_id = 1;
		return -1;
	}
	return 0;
}

int h5_file_close(struct ckctx *c, hid_t *fid)
{
	const hid_t f = *fid;
	struct stat sb;
	int fd;

	*fid = -1;
	if (f < 0)
		return 0;
	fd = writable(f) ? file_descriptor(f, &sb) : -1;
	if (H5Fclose(f) < 0) {
		h5_fail(c, "H5Fclose", __FILE__, __LINE__);
		lost_id = 1;
		redirect_to_memory(fd, &sb);	/* the id is lost; at least free the disk */
		return -1;
	}
	return 0;
}

/* ---- attributes ---- */

int h5_write_attr(struct ckctx *c, hid_t loc, const char *name, hid_t file_type, hid_t mem_type,
		  hsize_t n, const void *value)
{
	struct h5scope s;
	hid_t space, attr;

	h5s_begin(&s, c, name);
	if (n == 1)
		space = H5OWN(&s, H5Screate(H5S_SCALAR), H5Sclose);
	else
		space = H5OWN(&s, H5Screate_simple(1, &n, NULL), H5Sclose);
	attr = H5OWN(&s, H5Acreate2(loc, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
	H5DO(&s, H5Awrite(attr, mem_type, value));
	return h5s_end(&s);
}

/*
 * Fixed-length (the string and its NUL), so that the text lives in the attribute's own message: HDF5 1.10
 * reads a variable-length string from the global heap trusting the length stored there, and a damaged
 * one made it copy gigabytes (found by fuzz_checkpoint).  Both kinds are read.
 */
int h5_write_str_attr(struct ckctx *c, hid_t loc, const char *name, const char *value)
{
	struct h5scope s;
	hid_t type;

	h5s_begin(&s, c, name);
	type = H5OWN(&s, H5Tcopy(H5T_C_S1), H5Tclose);
	H5DO(&s, H5Tset_size(type, strlen(value) + 1));
	H5DO(&s, H5Tset_strpad(type, H5T_STR_NULLTERM));
	H5DO(&s, H5Tset_cset(type, H5T_CSET_UTF8));
	H5SUB(&s, h5_write_attr(c, loc, name, type, type, 1, value));
	return h5s_end(&s);
}

int h5_write_int_attr(struct ckctx *c, hid_t loc, const char *name, hid_t file_type, int64_t value)
{
	return h5_write_attr(c, loc, name, file_type, H5T_NATIVE_INT64, 1, &value);
}

static const char *class_name(H5T_class_t cls)
{
	return cls == H5T_STRING ? "string" : cls == H5T_FLOAT ? "float" : "integer";
}

/*
 * Open the attribute `name` of loc in scope s, checking its class and that it holds n values; -1 with
 * a message when absent or of another kind.  *attr and *ftype belong to s.
 */
static int open_attr(struct h5scope *s, hid_t loc, const char *where, const char *name,
		     H5T_class_t cls, hssize_t n, hid_t *attr, hid_t *ftype)
{
	struct ckctx *c = s->c;
	hid_t space;
	htri_t exists;
	hssize_t npoints;

	*attr = *ftype = -1;
	exists = H5DO(s, H5Aexists(loc, name));
	if (s->failed)
		return -1;
	if (!exists && !strcmp(where, "root")) {
		CKERR("%s: not a moe checkpoint: root attribute '%s' is missing", c->path, name);
		return h5s_fail(s);
	}
	if (!exists) {
		CKERR("%s: %s attribute '%s' is missing", c->path, where, name);
		return h5s_fail(s);
	}
	*attr = H5OWN(s, H5Aopen(loc, name, H5P_DEFAULT), H5Aclose);
	*ftype = H5OWN(s, H5Aget_type(*attr), H5Tclose);
	space = H5OWN(s, H5Aget_space(*attr), H5Sclose);
	npoints = H5DO(s, H5Sget_simple_extent_npoints(space));
	if (s->failed)
		return -1;
	if (H5Tget_class(*ftype) != cls || npoints != n) {
		if (n == 1)
			CKERR("%s: %s attribute '%s' is not a single %s", c->path, where, name,
			      class_name(cls));
		else
			CKERR("%s: %s attribute '%s' is not %lld %s values", c->path, where, name,
			      (long long)n, class_name(cls));
		return h5s_fail(s);
	}
	return 0;
}

int h5_read_str_attr(struct ckctx *c, hid_t fid, const char *name, char **out)
{
	struct h5scope s;
	hid_t attr, ftype, mtype;
	htri_t vlen;
	char *v = NULL;

	*out = NULL;
	h5s_begin(&s, c, name);
	if (open_attr(&s, fid, "root", name, H5T_STRING, 1, &attr, &ftype))
		return h5s_end(&s);
	vlen = H5DO(&s, H5Tis_variable_str(ftype));
	mtype = H5OWN(&s, H5Tcopy(H5T_C_S1), H5Tclose);
	H5DO(&s, H5Tset_cset(mtype, H5Tget_cset(ftype)));
	if (s.failed)
		return h5s_end(&s);
	if (vlen) {
		H5DO(&s, H5Tset_size(mtype, H5T_VARIABLE));
		if (H5DO(&s, H5Aread(attr, mtype, &v)) >= 0) {
			*out = strdup(v ? v : "");
			H5free_memory(v);
		}
	} else {
		size_t size = H5Tget_size(ftype);

		if (size > H5_STR_ATTR_MAX) {
			CKERR("%s: root attribute '%s' is a string of %zu bytes (more than %d: damaged?)",
			      c->path, name, size, H5_STR_ATTR_MAX);
			h5s_fail(&s);
		}
		H5DO(&s, H5Tset_size(mtype, size + 1));
		*out = s.failed ? NULL : calloc(1, size + 1);
		if (*out)
			H5DO(&s, H5Aread(attr, mtype, *out));
	}
	if (!s.failed && !*out) {
		CKERR("%s: out of memory reading attribute '%s'", c->path, name);
		h5s_fail(&s);
	}
	if (h5s_end(&s)) {
		free(*out);
		*out = NULL;
		return -1;
	}
	return 0;
}

int h5_read_attr(struct ckctx *c, hid_t loc, const char *where, const char *name, H5T_class_t cls,
		 hid_t mem_type, hssize_t n, void *out)
{
	struct h5scope s;
	hid_t attr, ftype;

	h5s_begin(&s, c, name);
	if (!open_attr(&s, loc, where, name, cls, n, &attr, &ftype))
		H5DO(&s, H5Aread(attr, mem_type, out));
	return h5s_end(&s);
}

int h5_read_int_attr(struct ckctx *c, hid_t loc, const char *where, const char *name, int64_t *out)
{
	return h5_read_attr(c, loc, where, name, H5T_INTEGER, H5T_NATIVE_INT64, 1, out);
}

/* ---- groups and links ---- */

int h5_open_group(struct ckctx *c, hid_t fid, const char *name, const char *missing, hid_t *gid)
{
	struct h5scope s;
	htri_t exists;

	*gid = -1;
	h5s_begin(&s, c, name);
	exists = H5DO(&s, H5Lexists(fid, name, H5P_DEFAULT));
	if (!s.failed && !exists) {
		if (missing)
			CKERR("%s: %s", c->path, missing);
		else
			CKERR("%s: missing group %s", c->path, name);
		h5s_fail(&s);
	}
	*gid = H5OWN(&s, H5Gopen2(fid, name, H5P_DEFAULT), H5Gclose);
	if (!s.failed)
		h5s_release(&s, *gid);
	return h5s_end(&s);
}

int h5_link_exists(struct ckctx *c, hid_t fid, const char *path, htri_t *exists)
{
	struct h5scope s;
	char buf[1024], *slash = NULL;

	h5s_begin(&s, c, c->what);
	if ((size_t)snprintf(buf, sizeof(buf), "%s", path) >= sizeof(buf)) {
		CKERR("%s: link name too long: %.64s...", c->path, path);
		h5s_fail(&s);
	}
	*exists = 0;
	while (!s.failed) {
		slash = strchr(slash ? slash + 1 : buf + 1, '/');
		if (slash)
			*slash = 0;
		*exists = H5DO(&s, H5Lexists(fid, buf, H5P_DEFAULT));
		if (slash)
			*slash = '/';
		if (*exists <= 0 || !slash)
			break;
	}
	return h5s_end(&s);
}
