/* tests/gpu/emu/emu.cpp - the emulator's scheduler and its stand-ins for the CUDA runtime and cuBLAS. */
#include "emu.h"
#include <map>
#include <set>

EmuFiber *emu_cur;
dim3 emu_blockIdx, emu_blockDim, emu_gridDim;
unsigned char *emu_dyn_smem;
unsigned long long emu_warp_slots[32][32];
static ucontext_t sched_ctx;
static std::function<void()> *g_body;
static std::vector<EmuFiber> fibers;
static std::vector<char *> stacks;
static const size_t STACK = 512 * 1024;
static std::map<const void *, int> smem_attr;
static long long launches, threads_run;

static void fiber_entry()
{
	(*g_body)();
	emu_cur->state = EMU_DONE;
	swapcontext(&emu_cur->ctx, &sched_ctx);
}

void emu_yield(int state)
{
	emu_cur->state = state;
	swapcontext(&emu_cur->ctx, &sched_ctx);
}

void emu_set_smem_attr(const void *fn, int bytes)
{
	if (bytes > 232448) { fprintf(stderr, "EMU: smem attr %d > 227 KB\n", bytes); abort(); }
	smem_attr[fn] = bytes;
}

void emu_launch(dim3 grid, dim3 block, size_t smem, const char *name, const void *fn, std::function<void()> body)
{
	unsigned nt = block.x * block.y * block.z;
	if (nt == 0 || nt > 1024 || block.z > 64 || grid.y > 65535 || grid.z > 65535 || grid.x == 0 || grid.y == 0) {
		fprintf(stderr, "EMU: bad launch config for %s: grid %u,%u,%u block %u,%u,%u\n", name, grid.x, grid.y,
			grid.z, block.x, block.y, block.z);
		abort();
	}
	if (smem > 48 * 1024 && (smem_attr.count(fn) == 0 || (size_t)smem_attr[fn] < smem)) {
		fprintf(stderr, "EMU: %s uses %zu B of dynamic shared memory without cudaFuncSetAttribute opt-in\n",
			name, smem);
		abort();
	}
	if (smem > 232448) { fprintf(stderr, "EMU: %s smem %zu > 227 KB\n", name, smem); abort(); }
	static bool reverse = getenv("EMU_REVERSE") && !strcmp(getenv("EMU_REVERSE"), "1");
	launches++;
	g_body = &body;
	emu_gridDim = grid;
	emu_blockDim = block;
	fibers.resize(nt);
	while (stacks.size() < nt) stacks.push_back((char *)malloc(STACK));
	for (unsigned bz = 0; bz < grid.z; bz++)
	for (unsigned by = 0; by < grid.y; by++)
	for (unsigned bx = 0; bx < grid.x; bx++) {
		emu_blockIdx = dim3(bx, by, bz);
		/* exact-size heap copy so ASan sees overflows */
		unsigned char *d = (unsigned char *)malloc(smem ? smem : 1);
		memset(d, 0xFF, smem ? smem : 1);
		emu_dyn_smem = d;
		for (unsigned i = 0; i < nt; i++) {
			EmuFiber &f = fibers[i];
			f.linear = i;
			f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
			f.state = EMU_RUN;
			getcontext(&f.ctx);
			f.ctx.uc_stack.ss_sp = stacks[i];
			f.ctx.uc_stack.ss_size = STACK;
			f.ctx.uc_link = nullptr;
			makecontext(&f.ctx, fiber_entry, 0);
		}
		threads_run += nt;
		for (;;) {
			for (unsigned k = 0; k < nt; k++) {
				unsigned i = reverse ? nt - 1 - k : k;
				if (fibers[i].state == EMU_RUN) {
					emu_cur = &fibers[i];
					swapcontext(&sched_ctx, &fibers[i].ctx);
				}
			}
			unsigned live = 0, at_block = 0;
			for (auto &f : fibers) { if (f.state != EMU_DONE) live++; if (f.state == EMU_BLOCK_BAR) at_block++; }
			if (live == 0) break;
			bool released = false;
			unsigned nw = (nt + 31) / 32;
			for (unsigned w = 0; w < nw; w++) {
				unsigned wl = 0, ww = 0, wdone = 0;
				for (unsigned i = w * 32; i < std::min(nt, (w + 1) * 32); i++) {
					if (fibers[i].state == EMU_DONE) wdone++; else wl++;
					if (fibers[i].state == EMU_WARP_BAR) ww++;
				}
				if (wl && ww == wl) {
					if (wdone) { fprintf(stderr, "EMU: %s: warp op with exited lanes (block %u,%u)\n", name, bx, by); abort(); }
					for (unsigned i = w * 32; i < std::min(nt, (w + 1) * 32); i++) fibers[i].state = EMU_RUN;
					released = true;
				}
			}
			if (released) continue;
			if (at_block == live) {
				for (auto &f : fibers) if (f.state == EMU_BLOCK_BAR) f.state = EMU_RUN;
				continue;
			}
			fprintf(stderr, "EMU: %s: deadlock (divergent barrier) in block %u,%u\n", name, bx, by);
			abort();
		}
		free(d);
	}
}

/* ---- runtime fakes ---- */
const char *cudaGetErrorName(cudaError_t e) { return e ? "cudaErrorInvalidValue" : "cudaSuccess"; }
const char *cudaGetErrorString(cudaError_t e) { return e ? "invalid value" : "no error"; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int *n) { *n = getenv("EMU_NODEV") && !strcmp(getenv("EMU_NODEV"), "1") ? 0 : 1; return cudaSuccess; }
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaStreamCreate(cudaStream_t *s) { *s = (void *)0x1234; return cudaSuccess; }
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t *p, int) { *p = nullptr; return cudaSuccess; }
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void *) { return cudaSuccess; }
cudaError_t cudaMalloc(void **p, size_t n) { *p = malloc(n); memset(*p, 0xFF, n); return cudaSuccess; }
cudaError_t cudaFree(void *p) { free(p); return cudaSuccess; }
/* EMU_FAIL_ALLOC=N: the N-th stream-ordered allocation and every later one fail (on the MPI rank
 * EMU_FAIL_RANK when that is set): a failing CUDA call in the middle of a step, for the failure tests */
static bool emu_alloc_fails()
{
	static long n = 0, limit = getenv("EMU_FAIL_ALLOC") ? atol(getenv("EMU_FAIL_ALLOC")) : 0;
	static const char *want = getenv("EMU_FAIL_RANK"), *rank = getenv("OMPI_COMM_WORLD_RANK");
	if (limit <= 0 || (want && (!rank || strcmp(want, rank))))
		return false;
	return ++n >= limit;
}
cudaError_t cudaMallocAsync(void **p, size_t n, cudaStream_t)
{
	if (emu_alloc_fails()) { *p = nullptr; return cudaErrorInvalidValue; }
	return cudaMalloc(p, n);
}
cudaError_t cudaFreeAsync(void *p, cudaStream_t) { free(p); return cudaSuccess; }
cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind, cudaStream_t) { memmove(d, s, n); return cudaSuccess; }
cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t) { memset(d, v, n); return cudaSuccess; }
cudaError_t cudaMallocHost(void **p, size_t n) { *p = malloc(n ? n : 1); return *p ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaHostAlloc(void **p, size_t n, unsigned) { return cudaMallocHost(p, n); }
cudaError_t cudaFreeHost(void *p) { free(p); return cudaSuccess; }
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int)
{
	memset(p, 0, sizeof(*p));
	snprintf(p->name, sizeof(p->name), "CPU emulator");
	p->major = 9;
	p->multiProcessorCount = 1;
	p->totalGlobalMem = (size_t)1 << 30;
	return cudaSuccess;
}
/* one emulated device per machine: every rank on it shares it, as ranks sharing a real GPU do */
cudaError_t cudaDeviceGetPCIBusId(char *s, int len, int dev) { snprintf(s, (size_t)len, "0000:%02x:00.0", dev); return cudaSuccess; }

const char *cublasGetStatusName(cublasStatus_t s)
{
	return s == CUBLAS_STATUS_NOT_SUPPORTED ? "CUBLAS_STATUS_NOT_SUPPORTED" : s ? "CUBLAS_STATUS_INVALID_VALUE" : "CUBLAS_STATUS_SUCCESS";
}
const char *cublasGetStatusString(cublasStatus_t s) { return s ? "invalid value" : "success"; }
cublasStatus_t cublasCreate(cublasHandle_t *h) { *h = (void *)0x5678; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasDestroy(cublasHandle_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
			    const void *alpha, const void *A, cudaDataType_t at, int lda, const void *B, cudaDataType_t bt,
			    int ldb, const void *beta, void *C, cudaDataType_t ct, int ldc, cublasComputeType_t,
			    cublasGemmAlgo_t)
{
	if (at != bt || (at != CUDA_R_32F && at != CUDA_R_16BF) || ct != CUDA_R_32F) return CUBLAS_STATUS_INVALID_VALUE;
	if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
	if (lda < std::max(1, ta == CUBLAS_OP_N ? m : k) || ldb < std::max(1, tb == CUBLAS_OP_N ? k : n) || ldc < std::max(1, m)) {
		fprintf(stderr, "EMU gemm: bad ld m%d n%d k%d lda%d ldb%d ldc%d\n", m, n, k, lda, ldb, ldc);
		return CUBLAS_STATUS_INVALID_VALUE;
	}
	/* bf16 operands (A and B alike) are read as their float values */
	auto ld = [at](const void *p, size_t i) -> float {
		if (at == CUDA_R_32F) return ((const float *)p)[i];
		return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
	};
	float *c = (float *)C;
	float al = *(const float *)alpha, be = *(const float *)beta;
	for (int j = 0; j < n; j++)
		for (int i = 0; i < m; i++) {
			double acc = 0;
			for (int l = 0; l < k; l++) {
				float x = ld(A, ta == CUBLAS_OP_N ? i + (size_t)l * lda : l + (size_t)i * lda);
				float y = ld(B, tb == CUBLAS_OP_N ? l + (size_t)j * ldb : j + (size_t)l * ldb);
				acc += (double)x * y;
			}
			float *cc = &c[i + (size_t)j * ldc];
			*cc = (float)(al * acc + (be != 0.0f ? be * *cc : 0.0f));
		}
	return CUBLAS_STATUS_SUCCESS;
}

/* problem by problem through cublasGemmEx: group g's parameters for its group_size[g] problems; the
 * pointer arrays are "device" memory, which is host memory here */
cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t h, const cublasOperation_t ta[], const cublasOperation_t tb[],
					  const int m[], const int n[], const int k[], const void *alpha,
					  const void *const A[], cudaDataType_t at, const int lda[], const void *const B[],
					  cudaDataType_t bt, const int ldb[], const void *beta, void *const C[],
					  cudaDataType_t ct, const int ldc[], int groups, const int size[],
					  cublasComputeType_t comp)
{
	const char *no = getenv("EMU_NO_GROUPED_GEMM");
	if (no && *no && strcmp(no, "0")) return CUBLAS_STATUS_NOT_SUPPORTED;
	if (groups < 0) return CUBLAS_STATUS_INVALID_VALUE;
	for (int g = 0, p = 0; g < groups; g++)
		for (int i = 0; i < size[g]; i++, p++) {
			cublasStatus_t st = cublasGemmEx(h, ta[g], tb[g], m[g], n[g], k[g], (const float *)alpha + g, A[p],
							 at, lda[g], B[p], bt, ldb[g], (const float *)beta + g, C[p], ct,
							 ldc[g], comp, CUBLAS_GEMM_DEFAULT);
			if (st != CUBLAS_STATUS_SUCCESS) return st;
		}
	return CUBLAS_STATUS_SUCCESS;
}

/* ---- events ---- */
#include <chrono>
struct emu_event { double t; };
cudaError_t cudaEventCreate(cudaEvent_t *e) { *e = new emu_event{ 0.0 }; return cudaSuccess; }
cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t)
{
	e->t = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
	return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) { *ms = (float)(b->t - a->t); return cudaSuccess; }
