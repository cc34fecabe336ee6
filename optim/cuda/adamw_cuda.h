/*
 * optim/cuda/adamw_cuda.h - AdamW and the gradient's global norm on the GPU, next to the CPU reference
 * optim/adamw.h: the same update, element for element, on device arrays.
 *
 * Plain C (includable from C11 files; no CUDA types).  Every weight, gradient and bf16 pointer is a DEVICE
 * pointer; everything is queued on the CUDA backend's stream (moe_cuda_stream(), launch/cuda/device.h),
 * so moe_cuda_init must have run.  Results are deterministic: the update treats each element on its own,
 * and the norm is summed in a fixed order that depends on n only.  A failed CUDA call aborts with a message.
 */
#ifndef MOE_OPTIM_ADAMW_CUDA_H
#define MOE_OPTIM_ADAMW_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* struct optim_segment, adamw_hparams, adamw (C linkage for the CPU functions in C++ files too) */
#include "optim/adamw.h"

/* A run of elements with one treatment (internal to adamw_cuda.cu). */
struct adamw_cuda_span;

struct adamw_cuda {
	size_t n;                       /* floats */
	float *exp_avg;                 /* [n] device, first moment */
	float *exp_avg_sq;              /* [n] device, second moment */
	int64_t step;                   /* updates applied so far (host) */
	struct adamw_cuda_span *spans;  /* host: the segments as spans tiling [0, n), gaps frozen */
	int nspans;
};

/*
 * Zeroed state for n floats and a device copy of the segment table (segments may come in any order and
 * leave gaps, which are left alone like frozen segments; they must not overlap or run past n).
 * Returns 0, or -1 with a message on stderr (bad segments, out of device memory).
 */
int adamw_cuda_init(struct adamw_cuda *o, size_t n, const struct optim_segment *segs, int nsegs);
void adamw_cuda_free(struct adamw_cuda *o);   /* safe on a zeroed or freed struct */

/*
 * One AdamW step, exactly adamw_update's arithmetic, in one kernel: step += 1; the gradient is first
 * multiplied by grad_scale (the clipping factor of grad_clip; 1 for none); frozen segments (and gaps) are
 * not updated.  If w_bf16 is not NULL, every element of it (frozen ones too) receives the bf16 bits
 * (round to nearest even) of the weight after the step.  Asynchronous.
 */
void adamw_cuda_update(struct adamw_cuda *o, float *w, const float *g, const struct adamw_hparams *h,
		       float grad_scale, uint16_t *w_bf16);

/* Moments and step to / from a host optimizer of the same n (checkpoints).  Both wait for the copies. */
void adamw_cuda_upload_state(struct adamw_cuda *o, const struct adamw *host);
void adamw_cuda_download_state(const struct adamw_cuda *o, struct adamw *host);

/* sqrt(sum g^2), summed in double in a fixed order that depends on n only; waits for the result. */
double grad_global_norm_cuda(const float *g, size_t n);

/* x *= s (asynchronous). */
void vec_scale_cuda(float *x, float s, size_t n);

#ifdef __cplusplus
}
#endif

#endif
