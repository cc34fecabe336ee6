/*
 * launch/cuda/prof.cu - the CUDA-event region profile (prof.h).  Events come from a pool that grows as
 * pairs are recorded and is reused after each prof_reset; an unmatched prof_end is ignored, a region left
 * open at collect time is not counted.
 */
#include <vector>

#include "launch/cuda/cuda_common.cuh"
#include "launch/cuda/prof.h"

namespace {

struct pair {
	int region;
	cudaEvent_t begin, end;
	bool closed;
};

bool g_on;
std::vector<pair> g_pairs;  /* the recorded pairs, in order */
size_t g_used;              /* pairs in use since the last reset (the rest are pooled events) */
std::vector<size_t> g_open[PROF_NREGIONS];  /* per region: the open pairs, innermost last */

const char *const g_names[PROF_NREGIONS] = { "forward", "backward", "optimizer", "attention", "experts", "comm" };

} /* namespace */

extern "C" {

void prof_enable(int on) { g_on = on != 0; }
int prof_enabled(void) { return g_on; }

const char *prof_name(enum prof_region r)
{
	return r >= 0 && r < PROF_NREGIONS ? g_names[r] : "?";
}

void prof_begin(enum prof_region r)
{
	if (!g_on || r < 0 || r >= PROF_NREGIONS)
		return;
	if (g_used == g_pairs.size()) {
		pair p = { 0, nullptr, nullptr, false };
		CUDA_CHECK(cudaEventCreate(&p.begin));
		CUDA_CHECK(cudaEventCreate(&p.end));
		g_pairs.push_back(p);
	}
	pair &p = g_pairs[g_used];
	p.region = r;
	p.closed = false;
	CUDA_CHECK(cudaEventRecord(p.begin, moe_cuda::stream()));
	g_open[r].push_back(g_used++);
}

void prof_end(enum prof_region r)
{
	if (!g_on || r < 0 || r >= PROF_NREGIONS || g_open[r].empty())
		return;
	pair &p = g_pairs[g_open[r].back()];
	g_open[r].pop_back();
	CUDA_CHECK(cudaEventRecord(p.end, moe_cuda::stream()));
	p.closed = true;
}

void prof_collect(double ms[PROF_NREGIONS], long calls[PROF_NREGIONS])
{
	for (int r = 0; r < PROF_NREGIONS; r++) {
		ms[r] = 0.0;
		calls[r] = 0;
	}
	for (size_t i = 0; i < g_used; i++) {
		const pair &p = g_pairs[i];
		float t = 0.0f;
		if (!p.closed)
			continue;
		CUDA_CHECK(cudaEventSynchronize(p.end));
		CUDA_CHECK(cudaEventElapsedTime(&t, p.begin, p.end));
		ms[p.region] += t;
		calls[p.region]++;
	}
}

void prof_reset(void)
{
	g_used = 0;
	for (auto &o : g_open)
		o.clear();
}

void prof_print(FILE *f, int steps, double total_ms)
{
	double ms[PROF_NREGIONS];
	long calls[PROF_NREGIONS];

	prof_collect(ms, calls);
	fprintf(f, "\n| region | calls | ms total | ms/step | share of step |\n|---|---|---|---|---|\n");
	for (int r = 0; r < PROF_NREGIONS; r++) {
		if (!calls[r])
			continue;
		fprintf(f, "| %s%s | %ld | %.1f | %.2f | %.1f%% |\n", r >= PROF_ATTENTION ? "  " : "", g_names[r],
			calls[r], ms[r], steps > 0 ? ms[r] / steps : ms[r],
			total_ms > 0 ? 100.0 * ms[r] / total_ms : 0.0);
	}
	fprintf(f, "\n");
}

} /* extern "C" */
