/*
 * model/cuda/model_cuda.h - the whole model (model/model.h) on one GPU: forward and backward over device
 * arenas, the same math and the same arena layout as the CPU model it mirrors.
 *
 * A gpu_model is made from a host moe_model and keeps a pointer to it: the config, the parameter table and
 * the expert slice come from there, and the host arenas are where weights and gradients are copied to and
 * from (checkpoints, tests).  On the device it holds
 *   - weights: the fp32 master copy (the optimizer updates it), same layout as m->weights;
 *   - grads: fp32, same layout as m->grads (backward accumulates into it, like model_backward);
 *   - weights_bf16: a bf16 copy of the weights that the GEMMs read when the model runs its matmuls in
 *     bf16 (gpu_model_create's bf16 flag): tensor cores, fp32 accumulation, fp32 outputs.  Whoever changes
 *     the fp32 weights refreshes it (gpu_model_refresh_bf16, or the fused AdamW that writes both).
 * Activations are kept in fp32; with bf16 matmuls each GEMM rounds its activation operand to bf16.
 *
 * Plain C: includable from C11 files.  Every call is queued on the backend's stream (moe_cuda_stream());
 * the ones that return a host value or fill host memory wait for it.  Under expert parallelism (m->ep_group)
 * the device holds only the rank's slice of routed experts and each MoE layer exchanges rows over the
 * device collectives (launch/cuda/comm_device.h), which gpu_model_create needs initialised first.
 */
#ifndef MOE_MODEL_CUDA_H
#define MOE_MODEL_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "model/model.h"

#ifdef __cplusplus
extern "C" {
#endif

struct gpu_model;

/* Needs moe_cuda_init() first.  Allocates the device arenas and uploads m->weights.  bf16: run the
 * matmuls in bf16 (else fp32 cuBLAS, no TF32).  A host model without gradients (model_drop_grads) gets
 * none on the device either: forward only (a distillation teacher).  NULL and err filled on failure (out
 * of device memory, an ep group, an unsupported shape). */
struct gpu_model *gpu_model_create(struct moe_model *m, int bf16, char *err, size_t errlen);
void gpu_model_free(struct gpu_model *g);

/* Host arenas <-> device (these wait).  upload_weights also refreshes the bf16 copy. */
void gpu_model_upload_weights(struct gpu_model *g);
void gpu_model_download_weights(struct gpu_model *g);
void gpu_model_download_grads(struct gpu_model *g);

/* Device arenas, m->n_weights floats each (weights_bf16: uint16_t bf16 bits, NULL unless bf16). */
float *gpu_model_weights(struct gpu_model *g);
float *gpu_model_grads(struct gpu_model *g);
uint16_t *gpu_model_weights_bf16(struct gpu_model *g);
/* Recompute the bf16 copy from the fp32 weights (no-op unless bf16). */
void gpu_model_refresh_bf16(struct gpu_model *g);

void gpu_model_zero_grad(struct gpu_model *g);

/* The routed experts of a MoE layer: one grouped GEMM per projection (on, the default: cuBLAS's
 * cublasGemmGroupedBatchedEx, falling back by itself where cuBLAS refuses it) or one GEMM per expert
 * (off).  For every model of the process. */
void gpu_model_grouped_gemm(int on);
/* How the experts' GEMMs ran: grouped, or per expert and why. */
const char *gpu_model_experts_gemm(void);

/*
 * As model_forward: inputs and targets (may be NULL) are HOST arrays of B*T ids.  Returns the loss (mean
 * cross-entropy over the targets + the balance loss), waiting for the device; sets m->last_ce_loss,
 * m->last_aux_loss and m->expert_load like the CPU model, and honours the loss options of model.h as it
 * does: route_replay (HOST [L][B*T][K]) and logit_temperature here, token_weights (HOST [B*T]) here for
 * the value and in gpu_model_backward (as they are then) for the gradient.
 */
float gpu_model_forward(struct gpu_model *g, const int *inputs, const int *targets, int B, int T);
/* As model_backward: accumulates d(loss_scale * loss)/dweights into the device grads. */
void gpu_model_backward(struct gpu_model *g, float loss_scale);
/*
 * Told by gpu_model_backward as it goes: fn(ctx, l) once the gradients of layer l are queued in full
 * (l = L-1 down to 0; the output head's and the final norm's come before layer L-1's), and fn(ctx, -1)
 * after the embedding's, the last.  What data parallelism needs to start reducing a bucket of gradients
 * while the backward goes on.  fn NULL: off (the default).
 */
/*
 * A further gradient with respect to the raw logits ([B*T, V] on the device, as the last forward's),
 * added times loss_scale to the cross-entropy's by gpu_model_backward: model.h's logit_term on the GPU
 * (distillation's KL).  NULL: none (the default).  The buffer must live until the backward has run.
 */
void gpu_model_set_logit_grad(struct gpu_model *g, const float *dlogits);
typedef void (*gpu_grads_ready_fn)(void *ctx, int layer);
void gpu_model_on_grads_ready(struct gpu_model *g, gpu_grads_ready_fn fn, void *ctx);
/* The last forward's logits [B*T, V] on the device (overwritten by the backward); NULL when the model
 * holds them in chunks (below). */
const float *gpu_model_logits(const struct gpu_model *g);
/* Rows of logits held at once: the lm_head and the cross-entropy walk the tokens in chunks of that many
 * rows, the backward recomputing each chunk's logits (one more lm_head product) instead of keeping
 * B*T*V floats.  -1 (the default): as many rows as fit in 256 MiB; 0: all (gpu_model_logits then
 * returns them); > 0: that many.  Takes effect at the next forward. */
void gpu_model_logit_rows(struct gpu_model *g, int rows);
/* As model_token_losses: the last forward's per-token cross-entropy [B*T], a HOST array; NULL before a
 * forward with targets. */
const float *gpu_model_token_losses(const struct gpu_model *g);

#ifdef __cplusplus
}
#endif

#endif
