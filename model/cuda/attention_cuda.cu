/*
 * model/cuda/attention_cuda.cu - causal softmax attention, FlashAttention-2 style, fp32 (CUDA cores).
 *
 * Layouts (model/ops.h): q, k [B*T, H, dq]; v, out [B*T, H, dv]; lse [B, H, T].  Element (b, t, h, d) of q
 * is q[((b*T + t)*H + h)*dq + d]; below, a head's rows start at base = (b*T*H + h)*dim and row t is at
 * base + t*H*dim.
 *
 * Parallelisation.  Tiles of BR = 32 query rows and BC = 32 key rows; 128 threads per block, TPR = 4 threads
 * per tile row (thread tid owns row tid/4 and, within it, the columns j, j+4, j+8, ... with j = tid%4, so
 * the 4 threads of a row sit in one warp and merge with two shuffles).  Tiles live in shared memory with
 * rows padded to an odd stride (dim+1): the threads of a warp reading 4 or 8 different rows at the same
 * column hit different banks.
 *
 *  forward   grid (query tiles, B*H).  A block holds its Q tile, walks the key tiles up to the diagonal,
 *            S = Q K^T * scale (masked), online softmax (running max m and sum l per row), O = O*corr + P V
 *            in registers; at the end O/l -> out and m + log(l) -> lse.
 *  backward  D = rowsum(dO * O) first (one warp per (token, head)).  Then two kernels, so that every
 *            gradient element is owned by exactly one thread (deterministic, no float atomics):
 *            dK/dV: grid (key tiles, B*H); a block holds its K, V tile and walks the query tiles from the
 *                   diagonal on, recomputing P = exp(S - lse), dP = dO V^T, dS = P (dP - D) * scale;
 *                   dV += P^T dO, dK += dS^T Q in registers.
 *            dQ:    grid (query tiles, B*H); recomputes the same P and dS and accumulates dQ += dS K.
 *            Finally each thread adds its registers into dq/dk/dv (the op accumulates).
 * Per-thread accumulators are register arrays indexed by unrolled compile-time loops; two instantiations
 * cover dq, dv <= 64 and dq <= 192, dv <= 128.  The tile code the three kernels share (loading a tile, a
 * row against a tile's rows, a row update, the accumulation into the gradients) is written once, below.  Rows past T are zero-filled in shared memory and masked,
 * so they contribute nothing and produce no NaN.
 */
#include "launch/cuda/cuda_common.cuh"
#include "model/cuda/ops_cuda.h"
#include "model/cuda/attention_int.h"

namespace moe_cuda {
namespace {

constexpr int BR = 32;         /* query rows per tile */
constexpr int BC = 32;         /* key rows per tile */
constexpr int TPR = 4;         /* threads per tile row */
constexpr int kAttnThreads = BR * TPR;
static_assert(BR * TPR == BC * TPR, "the backward kernels use one thread layout for query and key tiles");
static_assert(32 % TPR == 0, "a row's threads must share a warp");

/* Load rows [t0, t0+rows) of one head (row t at src[t*stride + d], d < dim) into dst[r*(dim+1) + d] as
 * float; rows at or past T are zero. */
template <typename T>
__device__ __forceinline__ void load_tile(float *dst, const T *src, size_t stride, int t0, int rows, int dim,
					  int T_)
{
	const int ld = dim + 1;
	for (int i = threadIdx.x; i < rows * dim; i += blockDim.x) {
		const int r = i / dim, d = i % dim, t = t0 + r;
		dst[r * ld + d] = t < T_ ? to_f(src[(size_t)t * stride + d]) : 0.0f;
	}
}

/*
 * The next key tile (K and V rows [k0, k0+BC)) of a kernel that walks the key tiles of its query tile:
 * wait until no thread reads the previous tile, load, wait until every thread's part is in.
 */
template <typename T>
__device__ __forceinline__ void next_kv_tile(float *Ks, float *Vs, const T *kh, const T *vh, size_t sk, size_t sv,
					     int k0, int dk, int dv, int T_)
{
	__syncthreads();
	load_tile(Ks, kh, sk, k0, BC, dk, T_);
	load_tile(Vs, vh, sv, k0, BC, dv, T_);
	__syncthreads();
}

/* Key tiles a query tile starting at q0 attends to (causal: none past its last valid query). */
__device__ __forceinline__ int causal_key_tiles(int q0, int T_)
{
	return (min(q0 + BR, T_) - 1) / BC + 1;
}

/*
 * acc[i] = sum_{d < dim} x[d] * rows[(j + TPR*i)*ld + d]: one tile row x against this thread's N rows of
 * another tile (the scores q.k, and dO.v, of the thread's (query, key) pairs).
 */
template <int N>
__device__ __forceinline__ void row_dots(float (&acc)[N], const float *x, const float *rows, int ld, int j,
					 int dim)
{
#pragma unroll
	for (int i = 0; i < N; i++)
		acc[i] = 0.0f;
	for (int d = 0; d < dim; d++) {
		const float xd = x[d];
#pragma unroll
		for (int i = 0; i < N; i++)
			acc[i] += xd * rows[(j + TPR * i) * ld + d];
	}
}

/* acc[i] += w * row[d] for this thread's columns d = j + TPR*i < dim (a P V, P^T dO, dS K, dS^T Q term). */
template <int N>
__device__ __forceinline__ void row_axpy(float (&acc)[N], float w, const float *row, int j, int dim)
{
#pragma unroll
	for (int i = 0; i < N; i++) {
		const int d = j + TPR * i;
		if (d < dim)
			acc[i] += w * row[d];
	}
}

/* row[d] += acc[i] for this thread's columns d = j + TPR*i < dim (the op accumulates into dq, dk, dv). */
template <typename T, int N>
__device__ __forceinline__ void row_add(T *row, const float (&acc)[N], int j, int dim)
{
#pragma unroll
	for (int i = 0; i < N; i++) {
		const int d = j + TPR * i;
		if (d < dim)
			row[d] = from_f<T>(to_f(row[d]) + acc[i]);
	}
}

/* shared-memory floats of each kernel */
inline size_t fwd_smem_floats(int dq, int dv)
{
	return (size_t)BR * (dq + 1) + (size_t)BC * (dq + 1) + (size_t)BC * (dv + 1) + (size_t)BR * (BC + 1);
}
inline size_t dkv_smem_floats(int dq, int dv)
{
	return (size_t)BC * (dq + 1) + (size_t)BC * (dv + 1) + (size_t)BR * (dq + 1) + (size_t)BR * (dv + 1) +
	       2 * (size_t)BR * (BC + 1) + 2 * (size_t)BR;
}
inline size_t dq_smem_floats(int dq, int dv)
{
	return (size_t)BR * (dq + 1) + (size_t)BR * (dv + 1) + (size_t)BC * (dq + 1) + (size_t)BC * (dv + 1) +
	       (size_t)BR * (BC + 1);
}

/* ---------------------------------------------------------------------------------------------------- */
template <typename T, int QMAX, int VMAX>
__global__ void __launch_bounds__(kAttnThreads, 3) /* 3 blocks/SM: the shared-memory limit at dq=192 */
attn_fwd_kernel(T *__restrict__ out, float *__restrict__ lse, const T *__restrict__ q, const T *__restrict__ k,
		const T *__restrict__ v, int T_, int H, int dq, int dv, float scale)
{
	constexpr int NS = BC / TPR;   /* scores per thread per key tile */
	constexpr int NO = VMAX / TPR; /* output columns per thread */
	extern __shared__ float smem[];
	const int ldq = dq + 1, ldv = dv + 1, ldp = BC + 1;
	float *Qs = smem;            /* [BR][dq+1] */
	float *Ks = Qs + BR * ldq;   /* [BC][dq+1] */
	float *Vs = Ks + BC * ldq;   /* [BC][dv+1] */
	float *Ps = Vs + BC * ldv;   /* [BR][BC+1] */

	const int qt = gridDim.x - 1 - blockIdx.x; /* the longest (last) query tiles start first */
	const int bh = blockIdx.y, b = bh / H, h = bh % H;
	const int q0 = qt * BR;
	const int r = threadIdx.x / TPR, j = threadIdx.x % TPR;
	const int qpos = q0 + r;
	const size_t sq = (size_t)H * dq, sv = (size_t)H * dv; /* token strides */
	const T *qh = q + ((size_t)b * T_ * H + h) * dq;
	const T *kh = k + ((size_t)b * T_ * H + h) * dq;
	const T *vh = v + ((size_t)b * T_ * H + h) * dv;

	load_tile(Qs, qh, sq, q0, BR, dq, T_);

	float m = -INFINITY, l = 0.0f;
	float o[NO];
#pragma unroll
	for (int i = 0; i < NO; i++)
		o[i] = 0.0f;

	const int nkt = causal_key_tiles(q0, T_);
	for (int kt = 0; kt < nkt; kt++) {
		const int k0 = kt * BC;
		next_kv_tile(Ks, Vs, kh, vh, sq, sv, k0, dq, dv, T_);

		/* S[r][c] for c = j + TPR*i */
		float s[NS];
		row_dots(s, Qs + r * ldq, Ks, ldq, j, dq);
		/* causal mask (key <= query; rows past T keep key 0, so m stays finite), tile max */
		float mt = -INFINITY;
#pragma unroll
		for (int i = 0; i < NS; i++) {
			const int kpos = k0 + j + TPR * i;
			s[i] = (kpos <= qpos && kpos < T_) ? s[i] * scale : -INFINITY;
			mt = fmaxf(mt, s[i]);
		}
#pragma unroll
		for (int o2 = 1; o2 < TPR; o2 <<= 1)
			mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o2));
		const float m_new = fmaxf(m, mt);
		const float corr = expf(m - m_new); /* 0 on the first tile (m = -inf) */
		float psum = 0.0f;
#pragma unroll
		for (int i = 0; i < NS; i++) {
			const float p = expf(s[i] - m_new);
			Ps[r * ldp + j + TPR * i] = p;
			psum += p;
		}
#pragma unroll
		for (int o2 = 1; o2 < TPR; o2 <<= 1)
			psum += __shfl_xor_sync(0xffffffffu, psum, o2);
		l = l * corr + psum;
		m = m_new;
		__syncwarp(); /* row r of Ps was written by this row's TPR threads, all in this warp */

		/* O[r][d] = O * corr + sum_c P[r][c] V[c][d], d = j + TPR*i */
#pragma unroll
		for (int i = 0; i < NO; i++)
			o[i] *= corr;
		for (int c = 0; c < BC; c++)
			row_axpy(o, Ps[r * ldp + c], Vs + c * ldv, j, dv);
	}

	if (qpos < T_) {
		const float inv_l = 1.0f / l;
		T *orow = out + ((size_t)(b * T_ + qpos) * H + h) * dv;
#pragma unroll
		for (int i = 0; i < NO; i++) {
			const int d = j + TPR * i;
			if (d < dv)
				orow[d] = from_f<T>(o[i] * inv_l);
		}
		if (j == 0)
			lse[(size_t)bh * T_ + qpos] = m + logf(l);
	}
}

/* D[b,h,t] = sum_d dout * out, one warp per (token, head) */
template <typename T>
__global__ void attn_bwd_dot_kernel(float *__restrict__ D, const T *__restrict__ dout, const T *__restrict__ out,
				    int B, int T_, int H, int dv)
{
	const int lane = threadIdx.x & 31;
	const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); /* = (b*T + t)*H + h */
	if (row >= (size_t)B * T_ * H)
		return;
	float acc = 0.0f;
	for (int d = lane; d < dv; d += 32)
		acc += to_f(dout[row * dv + d]) * to_f(out[row * dv + d]);
	acc = warp_sum(acc);
	if (lane == 0) {
		const size_t h = row % H, bt = row / H, t = bt % T_, b = bt / T_;
		D[(b * H + h) * T_ + t] = acc;
	}
}

/* ---------------------------------------------------------------------------------------------------- */
template <typename T, int QMAX, int VMAX>
__global__ void __launch_bounds__(kAttnThreads)
attn_bwd_dkv_kernel(T *__restrict__ dk, T *__restrict__ dv, const T *__restrict__ dout,
		    const float *__restrict__ lse, const float *__restrict__ D, const T *__restrict__ q,
		    const T *__restrict__ k, const T *__restrict__ v, int T_, int H, int dq_dim, int dv_dim,
		    float scale)
{
	constexpr int NS = BR / TPR;   /* query rows per thread per query tile */
	constexpr int NK = QMAX / TPR; /* dK columns per thread */
	constexpr int NV = VMAX / TPR; /* dV columns per thread */
	extern __shared__ float smem[];
	const int ldq = dq_dim + 1, ldv = dv_dim + 1, ldp = BC + 1;
	float *Ks = smem;              /* [BC][dq+1] */
	float *Vs = Ks + BC * ldq;     /* [BC][dv+1] */
	float *Qs = Vs + BC * ldv;     /* [BR][dq+1] */
	float *dOs = Qs + BR * ldq;    /* [BR][dv+1] */
	float *Ps = dOs + BR * ldv;    /* [BR][BC+1]  P[query][key] */
	float *dSs = Ps + BR * ldp;    /* [BR][BC+1]  dS[query][key] (scale included) */
	float *lse_s = dSs + BR * ldp; /* [BR] */
	float *D_s = lse_s + BR;       /* [BR] */

	const int kt = blockIdx.x;
	const int bh = blockIdx.y, b = bh / H, h = bh % H;
	const int k0 = kt * BC;
	const int c = threadIdx.x / TPR, j = threadIdx.x % TPR; /* this thread's key row, column phase */
	const int kpos = k0 + c;
	const size_t sq = (size_t)H * dq_dim, sv = (size_t)H * dv_dim;
	const size_t qbase = ((size_t)b * T_ * H + h) * dq_dim, vbase = ((size_t)b * T_ * H + h) * dv_dim;
	const float *lse_h = lse + (size_t)bh * T_, *D_h = D + (size_t)bh * T_;

	load_tile(Ks, k + qbase, sq, k0, BC, dq_dim, T_);
	load_tile(Vs, v + vbase, sv, k0, BC, dv_dim, T_);

	float dk_acc[NK], dv_acc[NV];
#pragma unroll
	for (int i = 0; i < NK; i++)
		dk_acc[i] = 0.0f;
#pragma unroll
	for (int i = 0; i < NV; i++)
		dv_acc[i] = 0.0f;

	const int nqt = (T_ + BR - 1) / BR;
	for (int qt = k0 / BR; qt < nqt; qt++) { /* query tiles at or after the diagonal */
		const int q0 = qt * BR;
		__syncthreads(); /* the previous query tile is no longer read */
		load_tile(Qs, q + qbase, sq, q0, BR, dq_dim, T_);
		load_tile(dOs, dout + vbase, sv, q0, BR, dv_dim, T_);
		for (int i = threadIdx.x; i < BR; i += blockDim.x) {
			const bool ok = q0 + i < T_;
			lse_s[i] = ok ? lse_h[q0 + i] : 0.0f;
			D_s[i] = ok ? D_h[q0 + i] : 0.0f;
		}
		__syncthreads();

		/* for key c and query rows rq = j + TPR*i: s = q.k, dp = dO.v */
		float s[NS], dp[NS];
		row_dots(s, Ks + c * ldq, Qs, ldq, j, dq_dim);
		row_dots(dp, Vs + c * ldv, dOs, ldv, j, dv_dim);
#pragma unroll
		for (int i = 0; i < NS; i++) {
			const int rq = j + TPR * i, qpos = q0 + rq;
			const bool ok = qpos < T_ && kpos <= qpos; /* (kpos <= qpos < T: the key exists) */
			const float p = ok ? expf(s[i] * scale - lse_s[rq]) : 0.0f;
			Ps[rq * ldp + c] = p;
			dSs[rq * ldp + c] = p * (dp[i] - D_s[rq]) * scale;
		}
		__syncthreads();

		/* dV[c][d] += sum_rq P[rq][c] dO[rq][d];  dK[c][d] += sum_rq dS[rq][c] Q[rq][d];  d = j + TPR*i */
		for (int rq = 0; rq < BR; rq++) {
			const float p = Ps[rq * ldp + c], ds = dSs[rq * ldp + c];
			row_axpy(dv_acc, p, dOs + rq * ldv, j, dv_dim);
			row_axpy(dk_acc, ds, Qs + rq * ldq, j, dq_dim);
		}
	}

	if (kpos < T_) {
		if (dk)
			row_add(dk + qbase + (size_t)kpos * sq, dk_acc, j, dq_dim);
		if (dv)
			row_add(dv + vbase + (size_t)kpos * sv, dv_acc, j, dv_dim);
	}
}

/* ---------------------------------------------------------------------------------------------------- */
template <typename T, int QMAX, int VMAX>
__global__ void __launch_bounds__(kAttnThreads)
attn_bwd_dq_kernel(T *__restrict__ dq, const T *__restrict__ dout, const float *__restrict__ lse,
		   const float *__restrict__ D, const T *__restrict__ q, const T *__restrict__ k,
		   const T *__restrict__ v, int T_, int H, int dq_dim, int dv_dim, float scale)
{
	constexpr int NS = BC / TPR;   /* keys per thread per key tile */
	constexpr int NQ = QMAX / TPR; /* dQ columns per thread */
	extern __shared__ float smem[];
	const int ldq = dq_dim + 1, ldv = dv_dim + 1, ldp = BC + 1;
	float *Qs = smem;            /* [BR][dq+1] */
	float *dOs = Qs + BR * ldq;  /* [BR][dv+1] */
	float *Ks = dOs + BR * ldv;  /* [BC][dq+1] */
	float *Vs = Ks + BC * ldq;   /* [BC][dv+1] */
	float *dSs = Vs + BC * ldv;  /* [BR][BC+1] */

	const int qt = gridDim.x - 1 - blockIdx.x; /* longest first */
	const int bh = blockIdx.y, b = bh / H, h = bh % H;
	const int q0 = qt * BR;
	const int r = threadIdx.x / TPR, j = threadIdx.x % TPR;
	const int qpos = q0 + r;
	const size_t sq = (size_t)H * dq_dim, sv = (size_t)H * dv_dim;
	const size_t qbase = ((size_t)b * T_ * H + h) * dq_dim, vbase = ((size_t)b * T_ * H + h) * dv_dim;
	const float lse_r = qpos < T_ ? lse[(size_t)bh * T_ + qpos] : 0.0f;
	const float D_r = qpos < T_ ? D[(size_t)bh * T_ + qpos] : 0.0f;

	load_tile(Qs, q + qbase, sq, q0, BR, dq_dim, T_);
	load_tile(dOs, dout + vbase, sv, q0, BR, dv_dim, T_);

	float dq_acc[NQ];
#pragma unroll
	for (int i = 0; i < NQ; i++)
		dq_acc[i] = 0.0f;

	const int nkt = causal_key_tiles(q0, T_);
	for (int kt = 0; kt < nkt; kt++) {
		const int k0 = kt * BC;
		next_kv_tile(Ks, Vs, k + qbase, v + vbase, sq, sv, k0, dq_dim, dv_dim, T_);

		/* for query r and keys kc = j + TPR*i */
		float s[NS], dp[NS];
		row_dots(s, Qs + r * ldq, Ks, ldq, j, dq_dim);
		row_dots(dp, dOs + r * ldv, Vs, ldv, j, dv_dim);
#pragma unroll
		for (int i = 0; i < NS; i++) {
			const int kc = j + TPR * i, kpos = k0 + kc;
			const bool ok = qpos < T_ && kpos <= qpos;
			const float p = ok ? expf(s[i] * scale - lse_r) : 0.0f;
			dSs[r * ldp + kc] = p * (dp[i] - D_r) * scale;
		}
		__syncwarp(); /* row r of dSs: written and read by this row's threads only */

		/* dQ[r][d] += sum_kc dS[r][kc] K[kc][d], d = j + TPR*i */
		for (int kc = 0; kc < BC; kc++)
			row_axpy(dq_acc, dSs[r * ldp + kc], Ks + kc * ldq, j, dq_dim);
	}

	if (qpos < T_)
		row_add(dq + qbase + (size_t)qpos * sq, dq_acc, j, dq_dim);
}

/* ---------------------------------------------------------------------------------------------------- */
template <typename Kernel> void set_smem(Kernel kernel, size_t bytes)
{
	/* a block may use more than 48 KB of shared memory only after opting in */
	if (bytes > 48 * 1024)
		CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

void check_dims(const char *op, int dq, int dv)
{
	if (dq < 1 || dq > MOE_CUDA_ATTN_MAX_DQ || dv < 1 || dv > MOE_CUDA_ATTN_MAX_DV)
		fail(op, "head dims must satisfy 1 <= dq <= 192 and 1 <= dv <= 128");
}

template <typename T, int QMAX, int VMAX>
void attn_forward_impl(T *out, float *lse, const T *q, const T *k, const T *v, int B, int T_, int H, int dq,
		       int dv, float scale)
{
	const size_t smem = fwd_smem_floats(dq, dv) * sizeof(float);
	auto kernel = attn_fwd_kernel<T, QMAX, VMAX>;
	set_smem(kernel, smem);
	const dim3 grid((unsigned)((T_ + BR - 1) / BR), (unsigned)(B * H));
	kernel<<<grid, kAttnThreads, smem, stream()>>>(out, lse, q, k, v, T_, H, dq, dv, scale);
	CUDA_CHECK_LAUNCH("attn_fwd_kernel");
}

template <typename T, int QMAX, int VMAX>
void attn_backward_impl(T *dq, T *dk, T *dv, const T *dout, const T *out, const float *lse, const T *q,
			const T *k, const T *v, int B, int T_, int H, int dq_dim, int dv_dim, float scale)
{
	cudaStream_t s = stream();
	const size_t rows = (size_t)B * T_ * H;
	float *D = scratch<float>(rows);
	attn_bwd_dot_kernel<T><<<(unsigned)((rows + 7) / 8), 256, 0, s>>>(D, dout, out, B, T_, H, dv_dim);
	CUDA_CHECK_LAUNCH("attn_bwd_dot_kernel");
	if (dk || dv) {
		const size_t smem = dkv_smem_floats(dq_dim, dv_dim) * sizeof(float);
		auto kernel = attn_bwd_dkv_kernel<T, QMAX, VMAX>;
		set_smem(kernel, smem);
		const dim3 grid((unsigned)((T_ + BC - 1) / BC), (unsigned)(B * H));
		kernel<<<grid, kAttnThreads, smem, s>>>(dk, dv, dout, lse, D, q, k, v, T_, H, dq_dim, dv_dim, scale);
		CUDA_CHECK_LAUNCH("attn_bwd_dkv_kernel");
	}
	if (dq) {
		const size_t smem = dq_smem_floats(dq_dim, dv_dim) * sizeof(float);
		auto kernel = attn_bwd_dq_kernel<T, QMAX, VMAX>;
		set_smem(kernel, smem);
		const dim3 grid((unsigned)((T_ + BR - 1) / BR), (unsigned)(B * H));
		kernel<<<grid, kAttnThreads, smem, s>>>(dq, dout, lse, D, q, k, v, T_, H, dq_dim, dv_dim, scale);
		CUDA_CHECK_LAUNCH("attn_bwd_dq_kernel");
	}
	scratch_free(D);
}

constexpr int kSmallDim = 64; /* the small instantiation: dq, dv <= 64 */

} /* namespace */
} /* namespace moe_cuda */

using namespace moe_cuda;

extern "C" {

void attention_forward_cuda(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T,
			    int H, int dq, int dv, float scale)
{
	check_dims("attention_forward_cuda", dq, dv);
	if (B <= 0 || T <= 0 || H <= 0)
		return;
	if (attention_cudnn_forward(out, lse, q, k, v, B, T, H, dq, dv, scale) == 0)
		return;
	if (dq <= kSmallDim && dv <= kSmallDim)
		attn_forward_impl<float, kSmallDim, kSmallDim>(out, lse, q, k, v, B, T, H, dq, dv, scale);
	else
		attn_forward_impl<float, MOE_CUDA_ATTN_MAX_DQ, MOE_CUDA_ATTN_MAX_DV>(out, lse, q, k, v, B, T, H, dq,
										   dv, scale);
}

void attention_backward_cuda(float *dq, float *dk, float *dv, const float *dout, const float *out,
			     const float *lse, const float *q, const float *k, const float *v, int B, int T, int H,
			     int dq_dim, int dv_dim, float scale)
{
	check_dims("attention_backward_cuda", dq_dim, dv_dim);
	if (B <= 0 || T <= 0 || H <= 0 || (!dq && !dk && !dv))
		return;
	if (attention_cudnn_backward(dq, dk, dv, dout, out, lse, q, k, v, B, T, H, dq_dim, dv_dim, scale) == 0)
		return;
	if (dq_dim <= kSmallDim && dv_dim <= kSmallDim)
		attn_backward_impl<float, kSmallDim, kSmallDim>(dq, dk, dv, dout, out, lse, q, k, v, B, T, H,
								dq_dim, dv_dim, scale);
	else
		attn_backward_impl<float, MOE_CUDA_ATTN_MAX_DQ, MOE_CUDA_ATTN_MAX_DV>(
			dq, dk, dv, dout, out, lse, q, k, v, B, T, H, dq_dim, dv_dim, scale);
}

} /* extern "C" */
