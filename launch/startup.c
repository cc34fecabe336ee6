#define _POSIX_C_SOURCE 200809L  /* setenv */

#include "launch/startup.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void startup_fix_blas_kernels(char **argv)
{
#if defined(__x86_64__)
	const char *want = NULL;
	if (getenv("OPENBLAS_CORETYPE") || strcmp(openblas_get_corename(), "Prescott"))
		return;
	__builtin_cpu_init();
	if (__builtin_cpu_supports("avx512f"))
		want = "SkylakeX";
	else if (__builtin_cpu_supports("avx2"))
		want = "Haswell";
	if (!want)
		return;
	/* exec the binary by its own path, so the process keeps its name (ps, pgrep, killall) */
	char self[4096];
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n <= 0)
		return;
	self[n] = 0;
	setenv("OPENBLAS_CORETYPE", want, 1);
	execv(self, argv);
	/* exec failed: carry on with the slow kernels */
	fprintf(stderr, "moe: note: OpenBLAS chose its SSE3 kernels; set OPENBLAS_CORETYPE=%s for speed\n", want);
#else
	(void)argv;
#endif
}
