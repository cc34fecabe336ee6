/*
 * train/checkpoint_h5.h - the checkpoint module's one HDF5 helper (internal: only train/checkpoint.c
 * and train/checkpoint_h5.c include it, and with it hdf5.h).
 *
 * A scope owns the ids a function opens and the function's failure path:
 *
 *	struct h5scope s;
 *
 *	h5s_begin(&s, c, name);
 *	space = H5OWN(&s, H5Screate(H5S_SCALAR), H5Sclose);
 *	attr = H5OWN(&s, H5Acreate2(loc, name, type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
 *	H5DO(&s, H5Awrite(attr, type, value));
 *	return h5s_end(&s);
 *
 * H5OWN and H5DO check an HDF5 return value (negative: failure, recorded once in c->err naming the
 * call, the line and HDF5's innermost message); after the first failure they skip their call, so the
 * code runs straight through.  h5s_end closes what the scope owns, newest first, and returns 0, or -1
 * when anything failed, closing included.  Files are owned with h5_file_discard as their closer: it
 * never leaves an id open, even on a full disk (see checkpoint_h5.c); a file to keep is closed with
 * h5_file_close, which reports whether everything reached it.
 */
#ifndef MOE_TRAIN_CHECKPOINT_H5_H
#define MOE_TRAIN_CHECKPOINT_H5_H

#include <hdf5.h>
#include <stdint.h>

#include "train/checkpoint_int.h"

#define H5SCOPE_IDS 8

struct h5scope {
	struct ckctx *c;
	const char *what_before;	/* c->what when the scope began, restored at its end */
	int failed;
	int n;
	hid_t id[H5SCOPE_IDS];
	herr_t (*close[H5SCOPE_IDS])(hid_t);
};

/* Switch HDF5's own printing of its error stack off (its innermost message goes into ours). */
void h5_quiet(void);
/* The most specific message on HDF5's error stack (where the error was first detected), or "". */
void h5_detail(char *buf, size_t len);
/* c->err = "PATH: HDF5 call FN(...) failed at FILE:LINE[ on WHAT][: DETAIL]" */
void h5_fail(struct ckctx *c, const char *call, const char *file, int line);

/* c->what = what (may be NULL) for the scope's messages. */
void h5s_begin(struct h5scope *s, struct ckctx *c, const char *what);
/* The scope owns id (closed by h5s_end with close); id < 0: the call failed. */
hid_t h5s_own(struct h5scope *s, hid_t id, herr_t (*close)(hid_t), const char *call, const char *file,
	      int line);
/* r < 0: the call failed.  Returns r. */
int64_t h5s_check(struct h5scope *s, int64_t r, const char *call, const char *file, int line);
/* The scope gives id up to the caller, who closes it (returns id). */
hid_t h5s_release(struct h5scope *s, hid_t id);
/* Mark the scope failed after a message of our own (CKERR); returns -1. */
int h5s_fail(struct h5scope *s);
/* Close everything owned, newest first; c->what as before the scope.  0, or -1 if anything failed. */
int h5s_end(struct h5scope *s);

#define H5OWN(s, call, closer)							\
	((s)->failed ? (hid_t)-1 : h5s_own((s), (call), (closer), #call, __FILE__, __LINE__))
#define H5DO(s, call)								\
	((s)->failed ? -1 : h5s_check((s), (call), #call, __FILE__, __LINE__))
/* A helper of ours that sets c->err itself and returns nonzero on failure. */
#define H5SUB(s, call)								\
	do {									\
		if (!(s)->failed && (call))					\
			(s)->failed = 1;					\
	} while (0)

/* ---- files ---- */

/* Create path (truncated) for writing; -1 with a message. */
hid_t h5_file_create(struct ckctx *c, const char *path);
/* Open an existing HDF5 file (flags H5F_ACC_RDONLY or H5F_ACC_RDWR); -1 with a message. */
hid_t h5_file_open(struct ckctx *c, const char *path, unsigned flags);
/* Close (and so flush) a file to keep: 0, or -1 with a message (what it holds is then unusable). */
int h5_file_close(struct ckctx *c, hid_t *fid);
/* Close a file whose content does not matter any more (a failed write): always releases the id. */
herr_t h5_file_discard(hid_t fid);

/* ---- attributes and groups ---- */

/* A scalar (n == 1) or a one-dimensional array of n values. */
int h5_write_attr(struct ckctx *c, hid_t loc, const char *name, hid_t file_type, hid_t mem_type,
		  hsize_t n, const void *value);
int h5_write_str_attr(struct ckctx *c, hid_t loc, const char *name, const char *value);
/* file_type: H5T_STD_I32LE or H5T_STD_I64LE */
int h5_write_int_attr(struct ckctx *c, hid_t loc, const char *name, hid_t file_type, int64_t value);
/*
 * n values of class cls, converted to mem_type, into out.  where ("root", "/optim", "/state") names
 * the attribute's owner in messages; a missing root attribute means "not a moe checkpoint".
 */
int h5_read_attr(struct ckctx *c, hid_t loc, const char *where, const char *name, H5T_class_t cls,
		 hid_t mem_type, hssize_t n, void *out);
int h5_read_int_attr(struct ckctx *c, hid_t loc, const char *where, const char *name, int64_t *out);
/* A root string attribute (variable- or fixed-length) as a malloc'd C string. */
int h5_read_str_attr(struct ckctx *c, hid_t fid, const char *name, char **out);
/* Open a group; when absent, fail with `missing` (or "missing group NAME" when that is NULL). */
int h5_open_group(struct ckctx *c, hid_t fid, const char *name, const char *missing, hid_t *gid);
/* Whether the link at an absolute path exists, each parent checked first (HDF5 1.10 fails otherwise). */
int h5_link_exists(struct ckctx *c, hid_t fid, const char *path, htri_t *exists);

#endif
