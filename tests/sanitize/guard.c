/*
 * tests/sanitize/guard.c - errors made on purpose, for tests/sanitize/guard.sh to prove that the sanitizer
 * build's tests still catch moe's own: built only with MOE_SANITIZE=ON.  Like moe, it starts MPI through
 * launch/comm.h, so Open MPI's own (suppressed) leaks are there too; then, by its one argument:
 *   clean   nothing wrong: must exit 0 (the suppressions cover what Open MPI leaks)
 *   leak    builds a (dp, ep) grid and loses it without dist_free: LeakSanitizer, in moe's group_new
 *   oob     reads one float past the end of a heap array: AddressSanitizer, heap-buffer-overflow
 *   ub      overflows a signed int: UBSan, which must end the program (halt_on_error)
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launch/comm.h"

static struct dist grid;

/* volatile: the compiler must neither see the bad index / overflow coming nor fold them away */
static volatile int past_end = 4;
static volatile int big = INT_MAX;

/*
 * noinline: each error sits in a frame of its own name for guard.sh to find; and read_at cannot see
 * the array's size, so the read is AddressSanitizer's to catch, not UBSan's object-size check.
 */
static __attribute__((noinline)) float read_at(const float *x, int i)
{
	return x[i];
}

static __attribute__((noinline)) int leak_grid(void)
{
	char err[256];

	if (dist_setup(&grid, 1, err, sizeof(err))) {
		fprintf(stderr, "guard: dist_setup: %s\n", err);
		return 1;
	}
	/* forget the grid: its groups (moe's calloc in group_new) are no longer reachable */
	memset(&grid, 0, sizeof(grid));
	return 0;
}

static __attribute__((noinline)) int read_past_end(void)
{
	float *x = calloc(4, sizeof(*x));
	float v;

	if (!x)
		return 1;
	v = read_at(x, past_end);
	free(x);
	printf("guard: read %g past the end\n", v);
	return 0;
}

static __attribute__((noinline)) int overflow(void)
{
	int v = big + 1;

	printf("guard: INT_MAX + 1 = %d\n", v);
	return 0;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";
	int rc;

	if (comm_init(&argc, &argv))
		return 2;
	if (!strcmp(mode, "clean")) {
		rc = 0;
	} else if (!strcmp(mode, "leak")) {
		rc = leak_grid();
	} else if (!strcmp(mode, "oob")) {
		rc = read_past_end();
	} else if (!strcmp(mode, "ub")) {
		rc = overflow();
	} else {
		fprintf(stderr, "usage: guard clean|leak|oob|ub\n");
		rc = 2;
	}
	comm_finalize();
	return rc;
}
