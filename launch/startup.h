/*
 * launch/startup.h - process start-up fixes that must happen before anything else runs.
 */
#ifndef MOE_LAUNCH_STARTUP_H
#define MOE_LAUNCH_STARTUP_H

/*
 * OpenBLAS 0.3.21 does not know recent CPUs (e.g. Intel family 6 model 207) and falls back to its SSE3
 * "Prescott" kernels, about 5x slower than the AVX-512 ones on such a machine.  When that happened and
 * the user has not chosen a core type, set OPENBLAS_CORETYPE to what the CPU supports and re-execute the
 * program (OpenBLAS reads the variable once, when it loads).  Call first thing in main(), before MPI.
 */
void startup_fix_blas_kernels(char **argv);

#endif
