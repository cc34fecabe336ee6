/*
 * tests/gpu/gpu_suite.h - how the GPU test programs register their suite (include after harness.h and,
 * with MOE_HAVE_CUDA, launch/cuda/device.h).  A machine without a CUDA device, or a build without the
 * backend, gets one test that prints SKIP and why, so ctest passes there; a visible device that
 * moe_cuda_init(0) cannot take gets one failing test.
 */
#ifndef MOE_TESTS_GPU_SUITE_H
#define MOE_TESTS_GPU_SUITE_H

#include <stdio.h>

static const char *gpu_skip_reason = "";

static void gpu_test_skip(void)
{
	printf("\nSKIP: no CUDA device (%s)\n", gpu_skip_reason);
	CU_PASS("SKIP: no CUDA device");
}

#ifdef MOE_HAVE_CUDA
static void gpu_test_init_failed(void)
{
	CU_FAIL("moe_cuda_init(0) failed although a device is visible (see stderr)");
}
#endif

/* cases: the suite's tests (NULL without MOE_HAVE_CUDA, where they are not compiled) */
static void add_gpu_suite(const char *name, const struct test_case *cases)
{
	static const struct test_case skip[] = { { "skip", gpu_test_skip }, { NULL, NULL } };
#ifdef MOE_HAVE_CUDA
	static const struct test_case init_failed[] = { { "init", gpu_test_init_failed }, { NULL, NULL } };
	if (moe_cuda_device_count() > 0) {
		add_suite(name, moe_cuda_init(0) == 0 ? cases : init_failed);
		return;
	}
	gpu_skip_reason = "moe_cuda_device_count() = 0";
#else
	(void)cases;
	gpu_skip_reason = "built without the CUDA backend (MOE_HAVE_CUDA)";
#endif
	add_suite(name, skip);
}

#endif
