/*
 * train/trainer.h - what `moe train` and `moe grpo` share: the model with its AdamW state (or its ZeRO
 * shard) restored from a checkpoint, one optimizer update from accumulated gradients (data-parallel
 * reduction, clipping, AdamW, aux-loss-free bias update), checkpoints, the metrics file, and the ranks'
 * agreement on failures and stop signals.
 */
#ifndef MOE_TRAIN_TRAINER_H
#define MOE_TRAIN_TRAINER_H

#include <stdio.h>

#include "launch/comm.h"
#include "model/model.h"
#include "optim/adamw.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/grad_sync.h"
#include "train/zero.h"

struct gpu_model;
struct adamw_cuda;

struct trainer {
	const char *who;             /* "moe train", "moe grpo": the prefix of messages */
	struct run_config cfg;
	const struct dist *d;        /* NULL: one process */
	int rank, world;             /* world rank and size (0, 1 for one process) */
	struct moe_model *m;
	struct adamw opt;
	struct optim_segment *segs;
	int nsegs;
	struct lr_schedule sched;
	struct train_state st;
	int resumed;                 /* st came from a checkpoint (--resume) */
	char restored_from[1100];    /* the checkpoint the weights came from ("": fresh initialisation) */
	FILE *metrics;               /* rank 0's log.metrics (NULL: none) */
	int64_t *step_load;          /* [L][E] expert loads summed over the step's forwards */
	struct grad_sync sync;       /* the data-parallel gradient reduction */
	int zero;                    /* parallel.zero=1: the AdamW state sharded (then opt is only */
	struct zero z;               /* allocated around checkpoint loads and saves) */
	/*
	 * The GPU (train.device, trainer_setup_device): the model's device copy and its AdamW state.  The
	 * device arenas are authoritative; m->weights and opt are refreshed from them for checkpoints.  The
	 * routing biases are the exception: updated on the host (from the step's loads) and uploaded.
	 */
	int cuda;
	struct gpu_model *gpu;
	struct adamw_cuda *gopt;
	int backwards;               /* trainer_backward calls since trainer_zero_grad */
	/*
	 * LoRA (lora.rank > 0, train/lora_run.h): the adapters attached to m, whose base is frozen (no
	 * gradient arena).  Then the gradient reduction, opt, segs and the checkpoints are the adapters'
	 * (trainer_trained), and a checkpoint is an adapter checkpoint.
	 */
	struct lora *lora;
	int forwards;                /* forwards in this step: each one's dropout masks differ */
};

/* What the optimizer trains: m, or the adapters' parameter table (LoRA). */
struct moe_model *trainer_trained(const struct trainer *t);

#define TRAINER_LOG(t, ...) do { if ((t)->rank == 0) printf(__VA_ARGS__); } while (0)

/* Every rank's verdict on a phase: any rank's failure fails all of them, so none waits forever in a
 * collective that the failed rank will never join. */
int trainer_all_ok(const struct trainer *t, int ok);

double trainer_now_s(void);
void trainer_format_duration(char *out, size_t len, double s);
/* mkdir -p; 0 or -1 with errno */
int trainer_make_dirs(const char *path);

/* SIGINT/SIGTERM ask the loop to checkpoint and stop (on = 0 restores the defaults). */
void trainer_catch_signals(int on);
/* Whether any rank was signalled (collective). */
int trainer_signalled(const struct trainer *t);

/*
 * The model (this rank's expert slice), gradient reduction, AdamW with its decay masks, the schedule
 * (over total_updates optimizer updates), weights and state from --resume (NULL, "latest" or a path)
 * or train.init_checkpoint or a fresh initialisation, ZeRO, and rank 0's metrics file.  Returns 0 or
 * -1 after printing why.
 */
int trainer_init(struct trainer *t, const char *who, const struct run_config *cfg, const char *resume,
		 const struct dist *d, int total_updates);
void trainer_free(struct trainer *t);

/*
 * Where the step runs, from train.device: cuda (the GPU; an error where there is none), cpu, or auto
 * (the GPU when cudaGetDeviceCount finds one and the run can use it, else the CPU).  gpu_capable: the
 * caller's loop runs on the GPU model: 0 no, 1 yes (moe train), TRAINER_GPU_WHEN_ASKED only with
 * train.device=cuda, not under auto (moe grpo's updates: not yet run on real hardware; one process).
 * On the GPU each rank takes local_rank modulo the visible devices, logs its placement, and the device
 * collectives are set up from parallel.comm (launch/cuda/comm_device.h).  0, or -1 after printing why.  Call after trainer_init (the weights and AdamW state restored there are uploaded).
 */
#define TRAINER_GPU_WHEN_ASKED 2
/* Collective: every rank calls it (after agreeing that trainer_init succeeded everywhere). */
int trainer_setup_device(struct trainer *t, int gpu_capable);

/* model_forward / model_backward / model_zero_grad / model_token_losses on the trainer's device (the
 * loss options of model.h are read from t->m on either) */
/* LoRA: the dropout masks of the next forward (trainer_forward calls it; a caller that runs the CPU model
 * itself, distillation, calls it first) */
void trainer_next_forward(struct trainer *t);
float trainer_forward(struct trainer *t, const int *inputs, const int *targets, int B, int T);
void trainer_backward(struct trainer *t, float loss_scale);
void trainer_zero_grad(struct trainer *t);
const float *trainer_token_losses(struct trainer *t);
/* On the GPU: the device's weights into t->m->weights, for what reads them on the host (the sampler). */
void trainer_weights_to_host(struct trainer *t);

/* Add the last forward's expert loads to step_load (zero it at the start of a step). */
void trainer_add_loads(struct trainer *t);
void trainer_clear_loads(struct trainer *t);

struct update_result {
	double grad_norm;
	int skipped;                 /* a non-finite loss or gradient: nothing was applied */
	const char *bad;             /* the first tensor with a non-finite gradient */
};

/*
 * One optimizer update from the gradients accumulated in t->m->grads (each rank's share of the global
 * mean): reduce them over the ranks, sum the step's expert loads, clip to train.grad_clip, AdamW at lr,
 * then the routing-bias update.  loss is the step's global loss (a non-finite one skips the update).
 */
void trainer_update(struct trainer *t, double lr, double loss, struct update_result *u);

/* "load_imbalance": [...] of the step (max load / mean load per MoE layer) into a JSON object. */
void trainer_write_imbalance(const struct trainer *t, FILE *f);

/*
 * After step st.step: a checkpoint when one is due (every checkpoint.every steps, the last step, a stop
 * by signal or train.stop_at), then whether to go on.  Returns 0 to go on, 1 when the run stops here
 * (cleanly, with a message; also after the last step), -1 when the checkpoint failed.
 */
int trainer_after_step(struct trainer *t);

/* Checkpoint step st.step into checkpoint.dir (every rank calls it), then prune to checkpoint.keep. */
int trainer_save(struct trainer *t);

#endif
