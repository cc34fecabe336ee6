/*
 * model/mtp.h - DeepSeek-V3's multi-token prediction (MTP, section 2.2 of the V3 report), CPU.
 *
 * D = num_nextn_predict_layers depths after the main model.  Depth k (1..D) at position i combines
 * h_{k-1}[i] (h_0: the main model's last hidden state, before its final norm) with the embedding of
 * token t_{i+k}:
 *
 *   x   = eh_proj(concat(enorm(embed(t_{i+k})), hnorm(h_{k-1}[i])))        eh_proj [C, 2C]
 *   h_k = a full MLA + (MoE or dense) decoder layer of x, causal over i      layer L + k - 1
 *   p_k = softmax(lm_head(shared_head.norm(h_k)))                           lm_head and embed shared
 *
 * and predicts t_{i+k+1}: CE_k is the mean cross-entropy over the positions where that token exists
 * (i + k < T, its target not ignored).  The MTP loss is (1/D) sum_k CE_k; model_forward adds
 * mtp_lambda times it (and the depths' balance losses) to the loss.  The order of the concatenation
 * is the reference implementation's: embedding first, hidden state second.
 */
#ifndef MOE_MODEL_MTP_H
#define MOE_MODEL_MTP_H

#include "model/model.h"

#define MTP_MAX_DEPTH 8

struct mtp_acts;

/* The last forward runs the depths: D > 0, mtp_lambda > 0, plain cross-entropy (no token weights, no
 * route replay: GRPO's objective is not a next-token loss). */
int mtp_active(const struct moe_model *m);

/* The depths over the last forward's inputs and targets (m->acts): returns the MTP loss (1/D) sum CE_k,
 * adds their balance losses to *aux. */
float mtp_forward(struct moe_model *m, float *aux);
/* The backward of loss_scale * mtp_lambda * that loss (and of the balance losses, loss_scale): weight
 * gradients accumulate, d/d(h_0) is left in m->acts->mtp->dh for model_backward. */
void mtp_backward(struct moe_model *m, float loss_scale);
void mtp_acts_free(const struct model_config *c, struct mtp_acts *t);

/* Depth k's mean cross-entropy in the last forward that ran the depths (0 before). */
float mtp_depth_loss(const struct moe_model *m, int k);

#endif
