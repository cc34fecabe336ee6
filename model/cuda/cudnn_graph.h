/*
 * model/cuda/cudnn_graph.h - cuDNN's backend (graph) API, in C, reached through dlopen: causal attention
 * as the composite flash-attention graphs cudnn-frontend lowers its SDPA nodes to (for cuDNN < 9.21), and
 * the fused SDPA_FWD / SDPA_BWD operations (no mask in 9.19; bench/bench_attention measures them).
 *
 * Why dlopen: the library is large, optional at run time (a machine without it trains with our own
 * kernel) and absent from the emulator build; nothing links against it, so one binary runs everywhere.
 * Every call into cuDNN goes through a struct cudnn_api, a table of its entry points: cudnn_api_load()
 * fills it from libcudnn, and the CPU test fills it with a fake that records the descriptors (that is how
 * the graph building and its error paths are tested without a GPU).
 *
 * Graphs (forward: Q K^T, * scale, causal mask from generated row/column indices, max / sub / exp / sum /
 * log + add -> stats, div, P V; backward: rowsum(dO * O), P = exp(S - stats) recomputed, dV = P^T dO,
 * dP = dO V^T, dS = P (dP - rowsum) * scale, dK = dS^T Q, dQ = dS K through an fp32 accumulator) see our
 * [B*T, H, d] rows as [B, H, T, d] tensors with strides (T*H*d, d, H*d, 1): no transposes.  Q, K, V, O, dO,
 * dQ, dK, dV are bf16; stats ([B, H, T], the natural-log log-sum-exp of the scaled scores: our kernel's
 * lse), the dO.O row sums and the dQ accumulator ([B, H, T, dq] packed) are fp32; all arithmetic is fp32.
 *
 * A graph is built and planned once per shape; its tensors are bound to pointers only when it runs
 * (cudnn_graph_exec builds the variant pack from the caller's slot pointers), so one plan serves every
 * layer.  Errors: each function returns 0 or -1 with g->err naming the step, the call, cuDNN's status and
 * its last error message; a failed build leaks nothing (cudnn_graph_free destroys what was made).
 *
 * Only with cuDNN's headers (MOE_HAVE_CUDNN_H, set by CMake when it found cudnn.h).
 */
#ifndef MOE_CUDNN_GRAPH_H
#define MOE_CUDNN_GRAPH_H

#ifdef MOE_HAVE_CUDNN_H

#include <stddef.h>
#include <stdint.h>

#include <cudnn_backend.h>

/* cuDNN's entry points; lib is the dlopen handle (NULL in a table filled by hand). */
struct cudnn_api {
	void *lib;
	size_t (*get_version)(void);
	const char *(*error_string)(cudnnStatus_t);
	void (*last_error)(char *message, size_t max_size);
	cudnnStatus_t (*create)(cudnnHandle_t *h);
	cudnnStatus_t (*destroy)(cudnnHandle_t h);
	cudnnStatus_t (*set_stream)(cudnnHandle_t h, cudaStream_t s);
	cudnnStatus_t (*create_desc)(cudnnBackendDescriptorType_t type, cudnnBackendDescriptor_t *d);
	cudnnStatus_t (*destroy_desc)(cudnnBackendDescriptor_t d);
	cudnnStatus_t (*set_attr)(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t name,
				  cudnnBackendAttributeType_t type, int64_t count, const void *values);
	cudnnStatus_t (*get_attr)(cudnnBackendDescriptor_t const d, cudnnBackendAttributeName_t name,
				  cudnnBackendAttributeType_t type, int64_t requested, int64_t *count, void *values);
	cudnnStatus_t (*finalize)(cudnnBackendDescriptor_t d);
	cudnnStatus_t (*execute)(cudnnHandle_t h, cudnnBackendDescriptor_t plan, cudnnBackendDescriptor_t pack);
};

/* dlopen path (NULL: $MOE_CUDNN_LIB, else "libcudnn.so.9") and resolve every entry point.  0, or -1 with
 * why in err (the library or a symbol missing). */
int cudnn_api_load(struct cudnn_api *api, const char *path, char *err, size_t errlen);
void cudnn_api_unload(struct cudnn_api *api);

/* What the variant pack binds: the caller's pointers, indexed by slot (device pointers, SCALE a host
 * float).  A graph uses some of them (cudnn_graph_uses). */
enum cg_slot {
	CG_Q, CG_K, CG_V, CG_O, CG_STATS, /* forward; the backward reads all five */
	CG_DO, CG_DQ, CG_DK, CG_DV,       /* backward, bf16 */
	CG_SSUM, CG_DQACC,                /* backward's fp32 scratch: [B, H, T] row sums, [B, H, T, dq] dQ */
	CG_SCALE,                         /* host float: the softmax scale */
	CG_NSLOTS
};

enum cg_kind {
	CG_ATTN_FWD,  /* composite causal forward */
	CG_ATTN_BWD,  /* composite causal backward */
	CG_SDPA_FWD,  /* fused op, NO mask (headers >= 9.13.1) */
	CG_SDPA_BWD,  /* fused op, NO mask (headers >= 9.17) */
};

struct cg_shape {
	int64_t B, T, H, dq, dv;
};

#define CG_MAX_DESC 512
#define CG_MAX_OPS 48
#define CG_MAX_IO 16

/* One graph, its plan and every descriptor it owns.  By-value constants live here: do not move it once
 * built (the plan does not point at them, but the descriptors of a graph under construction do). */
struct cudnn_graph {
	const struct cudnn_api *api;
	cudnnHandle_t h;
	enum cg_kind kind;
	struct cg_shape shape;
	cudnnBackendDescriptor_t owned[CG_MAX_DESC];
	int nowned;
	cudnnBackendDescriptor_t ops[CG_MAX_OPS];
	int nops;
	int64_t uid;                /* last tensor unique id handed out */
	int64_t io_uid[CG_MAX_IO];  /* the variant pack: non-virtual and by-value tensors */
	int io_slot[CG_MAX_IO];     /* enum cg_slot, or -1 - index into consts */
	int nio;
	cudnnDataType_t index_prec; /* the causal mask's GEN_INDEX math: FLOAT (cuDNN >= 9.x) or INT32 */
	cudnnBackendDescriptor_t graph, plan;
	int64_t ws_bytes, engine;
	void *ws;                   /* device workspace (moe_cuda_malloc), ws_bytes */
	int clear_dqacc;            /* zero CG_DQACC before each run (cuDNN < 9.6 does not itself) */
	float consts[2];            /* by-value constants: 1, -FLT_MAX (the frontend's mask value) */
	const char *step;
	char err[768];
};

/* Build and finalize the operation graph of `kind` for shape s on handle h (no plan yet).  int32_index:
 * the mask's index math in INT32 instead of FLOAT (older cuDNN; a graph that gets no plan one way may get
 * one the other). */
int cudnn_graph_build(struct cudnn_graph *g, const struct cudnn_api *api, cudnnHandle_t h, enum cg_kind kind,
		      const struct cg_shape *s, int int32_index);
/* Heuristics A, then FALLBACK: the first engine config that finalizes; allocates the workspace. */
int cudnn_graph_plan(struct cudnn_graph *g);
/* Whether the graph binds slot (so that a caller can leave the others NULL). */
int cudnn_graph_uses(const struct cudnn_graph *g, enum cg_slot slot);
/* Queue one run on the handle's stream with ptr[slot] bound (every used slot must be non-NULL). */
int cudnn_graph_exec(struct cudnn_graph *g, void *const ptr[CG_NSLOTS]);
/* Build + plan, trying the other mask-index math once if the first gets no plan. */
int cudnn_graph_make(struct cudnn_graph *g, const struct cudnn_api *api, cudnnHandle_t h, enum cg_kind kind,
		     const struct cg_shape *s);
/* Destroy every descriptor and free the workspace; g can be built again. */
void cudnn_graph_free(struct cudnn_graph *g);

/* The shapes the composite graphs are built for: head dims multiples of 8 up to 256 (cuDNN's flash
 * fusion), T >= 1.  NULL, or why not. */
const char *cudnn_graph_unsupported(const struct cg_shape *s);

#endif /* MOE_HAVE_CUDNN_H */

#endif
