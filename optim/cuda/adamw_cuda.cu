/*
 * optim/cuda/adamw_cuda.cu - AdamW, the gradient's global norm and a vector scale on the GPU.
 *
 * The update is optim/adamw.c's, operation for operation, in one fused kernel over all n floats: it scales
 * the gradient (clipping), updates the weight and both moments of the trained elements, and writes the
 * weight's bf16 copy for every element.  Each multiply that the CPU code rounds before an add is a
 * __fmul_rn / __dmul_rn here, so nvcc cannot contract it into a fused multiply-add: the CPU build is ISO C
 * (no contraction either), sqrtf and the division are correctly rounded on both sides, and the two agree
 * bit for bit.
 *
 * The segment table lives on the host as spans tiling [0, n) in order (the gaps between segments are
 * spans of their own, frozen); the update is one grid-stride launch per span, a few microseconds each.
 * (A first version, one launch whose threads binary-searched and walked a device copy of the table,
 * passed the emulator but got 455 of 100003 elements wrong on an H100, frozen ones among them; the cause
 * was not found, and this simpler form replaced it.)
 */
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "launch/cuda/cuda_common.cuh"
#include "launch/cuda/device.h"
#include "optim/cuda/adamw_cuda.h"

struct adamw_cuda_span {
	uint64_t lo;      /* first element; the span ends where the next one starts (or at n) */
	float wd;         /* weight decay */
	int32_t frozen;   /* 1: not updated (frozen segment or gap) */
};

namespace moe_cuda {
namespace {

/* The step's scalars, computed on the host exactly as adamw_update computes them. */
struct adamw_coef {
	double lr;
	float one_m_b1, lerp_hi, beta2, one_m_b2, step_size, bc2_sqrt, eps, grad_scale;
	int lerp_low;
};

constexpr int kAdamThreads = 256;

/* the treatment of one span */
struct span_view {
	float decay;
	bool do_decay;
};

/* one element of PyTorch's AdamW (see adamw_update); updates *m, *v, returns the new weight */
__device__ __forceinline__ float adamw_element(float wi, float gi, float *m, float *v, const adamw_coef &c,
					       const span_view &s)
{
	float mi = *m, vi = *v;
	gi = __fmul_rn(gi, c.grad_scale);
	if (s.do_decay)
		wi = __fmul_rn(wi, s.decay);
	if (c.lerp_low)
		mi = mi + __fmul_rn(c.one_m_b1, gi - mi);
	else
		mi = gi - __fmul_rn(gi - mi, c.lerp_hi);
	vi = __fmul_rn(vi, c.beta2) + __fmul_rn(__fmul_rn(c.one_m_b2, gi), gi);
	const float denom = sqrtf(vi) / c.bc2_sqrt + c.eps;
	*m = mi;
	*v = vi;
	return wi + __fmul_rn(-c.step_size, mi / denom);
}

/*
 * One span [lo, hi): updated with its decay, or (frozen) only its bf16 copy written.  One launch per span
 * (the host walks the table): a few hundred launches a step for a model's tensors, and no per-element
 * search for the span.
 */
__global__ void adamw_kernel(float *__restrict__ w, const float *__restrict__ g, float *__restrict__ m,
			     float *__restrict__ v, __nv_bfloat16 *__restrict__ wb, size_t lo, size_t hi, int frozen,
			     span_view sv, adamw_coef c)
{
	for (size_t i = lo + blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < hi; i += (size_t)gridDim.x * blockDim.x) {
		if (frozen) {
			if (wb)
				wb[i] = __float2bfloat16(w[i]);
			continue;
		}
		const float wi = adamw_element(w[i], g[i], &m[i], &v[i], c, sv);
		w[i] = wi;
		if (wb)
			wb[i] = __float2bfloat16(wi);
	}
}

/* ------------------------------------------------------------------------------------------------------
 * Global norm: (1) a grid of nb blocks (nb from n alone) where thread t of block b sums g[i]^2 in double
 * over i = b * kNormThreads + t + k * nb * kNormThreads, and the block adds its threads with block_sum's
 * fixed tree; (2) one block adds the nb partial sums the same way.  The order depends on n only.
 * ---------------------------------------------------------------------------------------------------- */
constexpr int kNormThreads = 256;
constexpr size_t kNormMaxBlocks = 1024;

__global__ void sumsq_partial_kernel(double *__restrict__ partial, const float *__restrict__ g, size_t n)
{
	double acc = 0.0;
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
		const double x = g[i];
		acc += x * x;
	}
	acc = block_sum(acc);
	if (threadIdx.x == 0)
		partial[blockIdx.x] = acc;
}

__global__ void sumsq_final_kernel(double *__restrict__ out, const double *__restrict__ partial, int np)
{
	double acc = 0.0;
	for (int i = threadIdx.x; i < np; i += blockDim.x)
		acc += partial[i];
	acc = block_sum(acc);
	if (threadIdx.x == 0)
		*out = acc;
}

__global__ void vec_scale_kernel(float *__restrict__ x, float s, size_t n)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		x[i] *= s;
}

/* ---- host helpers ---- */

int init_fail(struct adamw_cuda *o, const char *what)
{
	fprintf(stderr, "moe: adamw_cuda_init: %s\n", what);
	adamw_cuda_free(o);
	return -1;
}

/*
 * The segments as spans tiling [0, n) in order: each non-empty segment, and a frozen span for every gap.
 * Returns false when segments overlap or run past n.
 */
bool build_spans(std::vector<adamw_cuda_span> &out, size_t n, const struct optim_segment *segs, int nsegs)
{
	std::vector<const struct optim_segment *> order;
	for (int s = 0; s < nsegs; s++)
		if (segs[s].numel > 0)
			order.push_back(&segs[s]);
	std::stable_sort(order.begin(), order.end(),
			 [](const optim_segment *a, const optim_segment *b) { return a->offset < b->offset; });
	size_t at = 0;
	for (const struct optim_segment *sg : order) {
		if (sg->offset < at || sg->numel > n || sg->offset > n - sg->numel)
			return false;
		if (sg->offset > at)
			out.push_back(adamw_cuda_span{at, 0.0f, 1});
		out.push_back(adamw_cuda_span{sg->offset, sg->weight_decay, sg->frozen ? 1 : 0});
		at = sg->offset + sg->numel;
	}
	if (at < n)
		out.push_back(adamw_cuda_span{at, 0.0f, 1});
	return true;
}

/* cudaMalloc that reports failure instead of aborting (and clears the error) */
bool try_malloc(void **p, size_t bytes)
{
	if (cudaMalloc(p, bytes) == cudaSuccess)
		return true;
	(void)cudaGetLastError();
	*p = nullptr;
	return false;
}

void check_same_n(const char *op, size_t dev_n, size_t host_n)
{
	if (dev_n != host_n)
		fail(op, "the host and device optimizers hold different numbers of floats");
}

} /* namespace */
} /* namespace moe_cuda */

using namespace moe_cuda;

extern "C" {

int adamw_cuda_init(struct adamw_cuda *o, size_t n, const struct optim_segment *segs, int nsegs)
{
	std::vector<adamw_cuda_span> spans;

	memset(o, 0, sizeof(*o));
	if (!build_spans(spans, n, segs, nsegs))
		return init_fail(o, "segments overlap or run past the end of the parameters");
	if (n == 0)
		return 0;
	o->n = n;
	o->nspans = (int)spans.size();
	if (!try_malloc((void **)&o->exp_avg, n * sizeof(float)) ||
	    !try_malloc((void **)&o->exp_avg_sq, n * sizeof(float)) ||
	    !(o->spans = (adamw_cuda_span *)malloc(spans.size() * sizeof(adamw_cuda_span))))
		return init_fail(o, "out of memory");
	memcpy(o->spans, spans.data(), spans.size() * sizeof(adamw_cuda_span));
	CUDA_CHECK(cudaMemsetAsync(o->exp_avg, 0, n * sizeof(float), stream()));
	CUDA_CHECK(cudaMemsetAsync(o->exp_avg_sq, 0, n * sizeof(float), stream()));
	CUDA_CHECK(cudaStreamSynchronize(stream())); /* `spans` (host) goes away on return */
	return 0;
}

void adamw_cuda_free(struct adamw_cuda *o)
{
	/* queued kernels may still use the buffers: cudaFree waits for the device first */
	if (o->exp_avg)
		CUDA_CHECK(cudaFree(o->exp_avg));
	if (o->exp_avg_sq)
		CUDA_CHECK(cudaFree(o->exp_avg_sq));
	free(o->spans);
	memset(o, 0, sizeof(*o));
}

void adamw_cuda_update(struct adamw_cuda *o, float *w, const float *g, const struct adamw_hparams *h,
		       float grad_scale, uint16_t *w_bf16)
{
	o->step++;
	if (o->n == 0)
		return;

	const double lr = h->lr, b1 = h->beta1, b2 = h->beta2;
	const double bc1 = 1.0 - pow(b1, (double)o->step);
	const double bc2 = 1.0 - pow(b2, (double)o->step);
	adamw_coef c;
	c.lr = lr;
	c.one_m_b1 = (float)(1.0 - b1);
	c.lerp_hi = 1.0f - c.one_m_b1;
	c.lerp_low = c.one_m_b1 < 0.5f;
	c.beta2 = h->beta2;
	c.one_m_b2 = (float)(1.0 - b2);
	c.step_size = (float)(lr / bc1);
	c.bc2_sqrt = (float)sqrt(bc2);
	c.eps = h->eps;
	c.grad_scale = grad_scale;

	for (int k = 0; k < o->nspans; k++) {
		const adamw_cuda_span *sp = &o->spans[k];
		size_t lo = sp->lo, hi = k + 1 < o->nspans ? (size_t)o->spans[k + 1].lo : o->n;
		span_view sv = { (float)(1.0 - lr * (double)sp->wd), sp->wd != 0.0f };
		if (hi <= lo || (sp->frozen && !w_bf16))
			continue;
		adamw_kernel<<<grid_for(hi - lo, kAdamThreads), kAdamThreads, 0, stream()>>>(
			w, g, o->exp_avg, o->exp_avg_sq, reinterpret_cast<__nv_bfloat16 *>(w_bf16), lo, hi, sp->frozen,
			sv, c);
	}
	CUDA_CHECK_LAUNCH("adamw_kernel");
}

void adamw_cuda_upload_state(struct adamw_cuda *o, const struct adamw *host)
{
	check_same_n("adamw_cuda_upload_state", o->n, host->n);
	o->step = host->step;
	if (o->n == 0)
		return;
	const size_t bytes = o->n * sizeof(float);
	CUDA_CHECK(cudaMemcpyAsync(o->exp_avg, host->exp_avg, bytes, cudaMemcpyHostToDevice, stream()));
	CUDA_CHECK(cudaMemcpyAsync(o->exp_avg_sq, host->exp_avg_sq, bytes, cudaMemcpyHostToDevice, stream()));
	CUDA_CHECK(cudaStreamSynchronize(stream()));
}

void adamw_cuda_download_state(const struct adamw_cuda *o, struct adamw *host)
{
	check_same_n("adamw_cuda_download_state", o->n, host->n);
	host->step = o->step;
	if (o->n == 0)
		return;
	const size_t bytes = o->n * sizeof(float);
	CUDA_CHECK(cudaMemcpyAsync(host->exp_avg, o->exp_avg, bytes, cudaMemcpyDeviceToHost, stream()));
	CUDA_CHECK(cudaMemcpyAsync(host->exp_avg_sq, o->exp_avg_sq, bytes, cudaMemcpyDeviceToHost, stream()));
	CUDA_CHECK(cudaStreamSynchronize(stream()));
}

double grad_global_norm_cuda(const float *g, size_t n)
{
	if (n == 0)
		return 0.0;
	const size_t want = (n + kNormThreads - 1) / kNormThreads;
	const int nb = (int)(want < kNormMaxBlocks ? want : kNormMaxBlocks);
	double *d = scratch<double>((size_t)nb + 1); /* [nb] partial sums, then the total */
	double total = 0.0;

	sumsq_partial_kernel<<<nb, kNormThreads, 0, stream()>>>(d, g, n);
	CUDA_CHECK_LAUNCH("sumsq_partial_kernel");
	sumsq_final_kernel<<<1, kNormThreads, 0, stream()>>>(d + nb, d, nb);
	CUDA_CHECK_LAUNCH("sumsq_final_kernel");
	CUDA_CHECK(cudaMemcpyAsync(&total, d + nb, sizeof(double), cudaMemcpyDeviceToHost, stream()));
	scratch_free(d);
	CUDA_CHECK(cudaStreamSynchronize(stream()));
	return sqrt(total);
}

void vec_scale_cuda(float *x, float s, size_t n)
{
	if (n == 0)
		return;
	vec_scale_kernel<<<grid_for(n), kThreads, 0, stream()>>>(x, s, n);
	CUDA_CHECK_LAUNCH("vec_scale_kernel");
}

} /* extern "C" */
