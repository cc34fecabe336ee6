/*
 * tests/gpu/test_prof_cuda.c - the CUDA-event region profile (launch/cuda/prof.h): off by default,
 * counted pairs per region (nested and repeated), an unmatched end ignored, an open region left out,
 * reset, and the table.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <string.h>

#include "harness.h"

#ifdef MOE_HAVE_CUDA
#include "launch/cuda/prof.h"
#include "model/cuda/ops_cuda.h"
#endif
#include "gpu/gpu_suite.h"

#ifdef MOE_HAVE_CUDA

static void work(float *d, const float *s, size_t n)
{
	vec_add_cuda(d, s, n);
}

static void test_regions(void)
{
	const size_t n = 1 << 12;
	float *a = moe_cuda_malloc(n * sizeof(float)), *b = moe_cuda_malloc(n * sizeof(float));
	double ms[PROF_NREGIONS];
	long calls[PROF_NREGIONS];
	char table[2048] = "";
	FILE *f;

	moe_cuda_memset(a, 0, n * sizeof(float));
	moe_cuda_memset(b, 0, n * sizeof(float));
	prof_reset();
	CU_ASSERT_FALSE(prof_enabled());
	prof_begin(PROF_FORWARD); /* off: nothing recorded */
	work(a, b, n);
	prof_end(PROF_FORWARD);
	prof_collect(ms, calls);
	for (int r = 0; r < PROF_NREGIONS; r++)
		CU_ASSERT_EQUAL(calls[r], 0);

	prof_enable(1);
	prof_end(PROF_COMM); /* unmatched: ignored */
	for (int step = 0; step < 3; step++) {
		prof_begin(PROF_FORWARD);
		prof_begin(PROF_ATTENTION);
		work(a, b, n);
		prof_end(PROF_ATTENTION);
		prof_begin(PROF_EXPERTS);
		work(a, b, n);
		prof_end(PROF_EXPERTS);
		prof_end(PROF_FORWARD);
	}
	prof_begin(PROF_OPTIMIZER); /* left open: not counted */
	prof_enable(0);
	prof_collect(ms, calls);
	CU_ASSERT_EQUAL(calls[PROF_FORWARD], 3);
	CU_ASSERT_EQUAL(calls[PROF_ATTENTION], 3);
	CU_ASSERT_EQUAL(calls[PROF_EXPERTS], 3);
	CU_ASSERT_EQUAL(calls[PROF_COMM], 0);
	CU_ASSERT_EQUAL(calls[PROF_OPTIMIZER], 0);
	CU_ASSERT(ms[PROF_ATTENTION] >= 0.0 && ms[PROF_EXPERTS] >= 0.0);
	/* the enclosing region holds its parts */
	CU_ASSERT(ms[PROF_FORWARD] + 1e-3 >= ms[PROF_ATTENTION] + ms[PROF_EXPERTS]);
	CU_ASSERT_STRING_EQUAL(prof_name(PROF_EXPERTS), "experts");

	f = fmemopen(table, sizeof(table) - 1, "w");
	CU_ASSERT_PTR_NOT_NULL_FATAL(f);
	prof_print(f, 3, 100.0);
	fclose(f);
	CU_ASSERT_PTR_NOT_NULL(strstr(table, "| forward | 3 |"));
	CU_ASSERT_PTR_NOT_NULL(strstr(table, "|   attention | 3 |"));
	CU_ASSERT_PTR_NULL(strstr(table, "comm"));
	prof_reset();
	prof_collect(ms, calls);
	CU_ASSERT_EQUAL(calls[PROF_FORWARD], 0);
	moe_cuda_free(a);
	moe_cuda_free(b);
}

#endif /* MOE_HAVE_CUDA */

void register_tests(void)
{
#ifdef MOE_HAVE_CUDA
	static const struct test_case cases[] = {
		{"regions", test_regions},
		{NULL, NULL},
	};
	add_gpu_suite("prof_cuda", cases);
#else
	add_gpu_suite("prof_cuda", NULL);
#endif
}
