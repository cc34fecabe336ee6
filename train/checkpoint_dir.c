/*
 * train/checkpoint_dir.c - a run's checkpoint directory (checkpoint.dir): DIR/step_NNNNNNNN.h5, each
 * written as DIR/step_NNNNNNNN.h5.tmp.<pid> and renamed; the newest, an older one for a resume that
 * skips a damaged newest, and pruning.  No HDF5 here: names and directory entries only.
 */
#define _POSIX_C_SOURCE 200809L

#include "train/checkpoint_int.h"

#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CKPT_NAME_FMT "step_%08lld.h5"	/* a run's checkpoints, in checkpoint.dir */

/* DIR/step_NNNNNNNN.h5; -1 when it does not fit in len. */
static int format_path(char *out, size_t len, const char *dir, int64_t step)
{
	return (size_t)snprintf(out, len, "%s/" CKPT_NAME_FMT, dir, (long long)step) < len ? 0 : -1;
}

void checkpoint_path(char *out, size_t len, const char *dir, int64_t step)
{
	format_path(out, len, dir, step);
}

enum { NAME_OTHER, NAME_CHECKPOINT, NAME_TMP };

/* step_NNNNNNNN.h5 exactly as checkpoint_path writes it, or that name plus .tmp.<pid>. */
static int classify_name(const char *name, int64_t *step)
{
	static const char digits[] = "0123456789";
	const char *rest;
	char canon[64];
	size_t nd, len;
	long long v;

	if (strncmp(name, "step_", 5) != 0)
		return NAME_OTHER;
	nd = strspn(name + 5, digits);
	if (nd < 8 || nd > 18)	/* %08lld, and no overflow */
		return NAME_OTHER;
	v = strtoll(name + 5, NULL, 10);
	len = (size_t)snprintf(canon, sizeof(canon), CKPT_NAME_FMT, v);
	if (strncmp(name, canon, len) != 0)
		return NAME_OTHER;
	*step = v;
	rest = name + len;
	if (!*rest)
		return NAME_CHECKPOINT;
	if (!strncmp(rest, CKPT_TMP_SUFFIX, strlen(CKPT_TMP_SUFFIX))) {
		rest += strlen(CKPT_TMP_SUFFIX);
		if (*rest && strspn(rest, digits) == strlen(rest))
			return NAME_TMP;
	}
	return NAME_OTHER;
}

/*
 * The steps of the checkpoints in dir (malloc'd, unsorted) and, with remove_tmp, delete the temporaries
 * of interrupted writes.  0, 1 when dir does not exist, -1 on error.
 */
static int list_checkpoints(struct ckctx *c, const char *dir, int remove_tmp, int64_t **steps,
			    size_t *count)
{
	size_t cap = 0;
	struct dirent *e;
	int64_t step, *grown;
	DIR *d;
	int ret = -1;

	*steps = NULL;
	*count = 0;
	d = opendir(dir);
	if (!d) {
		if (errno == ENOENT)
			return 1;
		CKERR("%s: cannot open the checkpoint directory: %s", dir, strerror(errno));
		return -1;
	}
	for (;;) {
		errno = 0;
		e = readdir(d);
		if (!e) {
			if (errno) {
				CKERR("%s: cannot read the checkpoint directory: %s", dir,
				      strerror(errno));
				goto fail;
			}
			break;
		}
		switch (classify_name(e->d_name, &step)) {
		case NAME_CHECKPOINT:
			if (*count == cap) {
				cap = cap ? 2 * cap : 16;
				grown = realloc(*steps, cap * sizeof(**steps));
				if (!grown) {
					CKERR("%s: out of memory listing checkpoints", dir);
					goto fail;
				}
				*steps = grown;
			}
			(*steps)[(*count)++] = step;
			break;
		case NAME_TMP:
			if (remove_tmp && unlinkat(dirfd(d), e->d_name, 0) != 0 && errno != ENOENT) {
				CKERR("%s: cannot remove %s: %s", dir, e->d_name, strerror(errno));
				goto fail;
			}
			break;
		default:
			break;
		}
	}
	ret = 0;
fail:
	closedir(d);
	if (ret) {
		free(*steps);
		*steps = NULL;
		*count = 0;
	}
	return ret;
}

int checkpoint_before(const char *dir, int64_t before, char *out, size_t len, int64_t *step,
		      char *err, size_t errlen)
{
	struct ckctx ctx = { dir, NULL, err, errlen }, *c = &ctx;
	int64_t *steps, best = -1;
	size_t n;
	int r;

	r = list_checkpoints(c, dir, 0, &steps, &n);
	if (r)
		return r;
	for (size_t i = 0; i < n; i++)
		if (steps[i] > best && steps[i] < before)
			best = steps[i];
	free(steps);
	if (best < 0)
		return 1;
	if (format_path(out, len, dir, best)) {
		CKERR("%s: path too long", dir);
		return -1;
	}
	if (step)
		*step = best;
	return 0;
}

int checkpoint_latest(const char *dir, char *out, size_t len, char *err, size_t errlen)
{
	return checkpoint_before(dir, INT64_MAX, out, len, NULL, err, errlen);
}

static int cmp_desc(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

	return (x < y) - (x > y);
}

/* Call it when no save into dir is in progress: every temporary file there is taken for stale. */
int checkpoint_prune(const char *dir, int keep, int64_t upto, char *err, size_t errlen)
{
	struct ckctx ctx = { dir, NULL, err, errlen }, *c = &ctx;
	char path[1100];
	int64_t *steps;
	size_t n;
	int r, ret = -1;

	if (keep < 1) {
		CKERR("%s: checkpoint.keep must be at least 1 (got %d)", dir, keep);
		return -1;
	}
	r = list_checkpoints(c, dir, 1, &steps, &n);
	if (r)
		return r > 0 ? 0 : -1;	/* no directory: nothing to prune */
	qsort(steps, n, sizeof(*steps), cmp_desc);
	while (n && steps[0] > upto) {	/* ahead of the run: left alone (see checkpoint.h) */
		memmove(steps, steps + 1, (n - 1) * sizeof(*steps));
		n--;
	}
	for (size_t i = (size_t)keep; i < n; i++) {
		if (format_path(path, sizeof(path), dir, steps[i])) {
			CKERR("%s: path too long", dir);
			goto fail;
		}
		if (unlink(path) != 0 && errno != ENOENT) {
			CKERR("%s: cannot remove %s: %s", dir, path, strerror(errno));
			goto fail;
		}
	}
	ret = 0;
fail:
	free(steps);
	return ret;
}
