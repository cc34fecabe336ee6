/*
 * launch/cuda/prof.h - a per-region time profile of the GPU step from CUDA events: each prof_begin /
 * prof_end pair records two events on the backend's stream, so the time is the device's (what the kernels
 * queued in between took), not the host's.  Regions may nest and repeat (attention and experts inside
 * forward); a region's time is the sum over its pairs.  Off unless prof_enable(1): the calls then cost
 * nothing but a branch.  bench_train --device cuda prints the table (prof_print).
 *
 * Plain C; the CUDA code is built only with the CUDA backend.
 */
#ifndef MOE_LAUNCH_CUDA_PROF_H
#define MOE_LAUNCH_CUDA_PROF_H

#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

enum prof_region {
	PROF_FORWARD, PROF_BACKWARD, PROF_OPTIMIZER, /* the step's phases */
	PROF_ATTENTION, PROF_EXPERTS, PROF_COMM,     /* inside them: attention ops, routed experts, collectives */
	PROF_NREGIONS
};

void prof_enable(int on);
int prof_enabled(void);
void prof_begin(enum prof_region r);
void prof_end(enum prof_region r);
/* Wait for the device; ms[r] and calls[r]: the time and pair count of each region since the last reset. */
void prof_collect(double ms[PROF_NREGIONS], long calls[PROF_NREGIONS]);
void prof_reset(void);
const char *prof_name(enum prof_region r);
/* The table: region, calls, total ms, ms per step (steps > 0), share of total_ms (> 0: the step time). */
void prof_print(FILE *f, int steps, double total_ms);

#ifdef __cplusplus
}
#endif

#endif
