/*
 * model/vmath.h - float math for the CPU's hot loops, written so the compiler vectorises the loops that
 * use it (16 lanes with AVX-512): the model's ops, the decode softmax, the sampler.  Every result is
 * computed the same way whatever the vector width or thread count.
 */
#ifndef MOE_MODEL_VMATH_H
#define MOE_MODEL_VMATH_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/*
 * exp(x) for the hot elementwise loops (softmax rows, cross-entropy, SiLU): branch-free, so loops calling
 * it vectorise (16 lanes with AVX-512).  2^n exp(r), n = round(x / ln 2), r in [-ln2/2, ln2/2] by a
 * two-constant Cody-Waite reduction, exp(r) by the Cephes polynomial: within about 1 ulp of the correctly
 * rounded exp over the normal range (checked on every 37th float of it); 0 below it (where expf returns
 * denormals), inf above, NaN passes through.
 * Every element is computed alone, so results do not depend on the vector width or the thread count.
 */
static inline float exp_fast(float x)
{
	float xc = x < -87.33654f ? -87.33654f : x;  /* (fminf/fmaxf would not be inlined) */
	xc = xc > 88.72283f ? 88.72283f : xc;
	float t = fmaf(xc, 1.44269504088896341f, 12582912.0f);  /* 1.5 * 2^23: rounds to an integer */
	float n = t - 12582912.0f;
	float r = fmaf(n, -0.693359375f, xc);
	r = fmaf(n, 2.12194440e-4f, r);
	float p = 1.9875691500e-4f;
	p = fmaf(p, r, 1.3981999507e-3f);
	p = fmaf(p, r, 8.3334519073e-3f);
	p = fmaf(p, r, 4.1665795894e-2f);
	p = fmaf(p, r, 1.6666665459e-1f);
	p = fmaf(p, r, 5.0000001201e-1f);
	p = fmaf(p, r * r, r) + 1.0f;
	int32_t ti;
	memcpy(&ti, &t, sizeof(ti));
	int32_t ni = ti - 0x4B400000;      /* n, in [-126, 128] */
	int32_t nh = ni >> 1, nl = ni - nh; /* 2^n = 2^nh 2^nl, each a normal float */
	/* unsigned shifts: a NaN's n is garbage (its y is dropped below) and must not shift into the sign */
	uint32_t bh = (uint32_t)(nh + 127) << 23, bl = (uint32_t)(nl + 127) << 23;
	float sh, sl;
	memcpy(&sh, &bh, sizeof(sh));
	memcpy(&sl, &bl, sizeof(sl));
	float y = p * sh * sl;
	y = x < -87.33654f ? 0.0f : y;
	y = x > 88.72283f ? INFINITY : y;
	return x != x ? x : y;
}

/* the largest of p[0..n) (-INFINITY when n is 0): 16 lanes, a fixed-width inner loop */
static inline float max_of(const float *p, size_t n)
{
	float lane[16], mx = -INFINITY;
	size_t j = 0;
	for (int t = 0; t < 16; t++)
		lane[t] = -INFINITY;
	for (; j + 16 <= n; j += 16)
		for (int t = 0; t < 16; t++)
			lane[t] = p[j + t] > lane[t] ? p[j + t] : lane[t];
	for (; j < n; j++)
		mx = p[j] > mx ? p[j] : mx;
	for (int t = 0; t < 16; t++)
		mx = lane[t] > mx ? lane[t] : mx;
	return mx;
}

/* the sum of p[0..n) in double: 8 lanes, a fixed-width inner loop */
static inline double sum_of(const float *p, size_t n)
{
	double lane[8] = { 0 }, sum = 0.0;
	size_t j = 0;
	for (; j + 8 <= n; j += 8)
		for (int t = 0; t < 8; t++)
			lane[t] += p[j + t];
	for (; j < n; j++)
		sum += p[j];
	for (int t = 0; t < 8; t++)
		sum += lane[t];
	return sum;
}

#endif
