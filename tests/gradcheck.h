/*
 * tests/gradcheck.h - header-only helpers for checking gradients against central finite differences.
 *
 * Recipe: for an op y = f(x), pick a random projection r of the output and the scalar
 * L(x) = sum(r * f(x)), accumulated in double (gc_dot).  The analytic gradient is the op's backward with
 * dout = r; gc_numeric_grad() computes (L(x + h e_i) - L(x - h e_i)) / (x_i^+ - x_i^-) for every element,
 * dividing by the float steps actually taken, and gc_check() compares the two with the relative measure
 * |a - n| <= tol * max(|n|, scale), scale = max(rms(n), scale_floor).
 */
#ifndef MOE_TESTS_GRADCHECK_H
#define MOE_TESTS_GRADCHECK_H

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef double (*gc_loss_fn)(void *ctx);

/* sum r[i] * y[i], in double */
static inline double gc_dot(const float *r, const float *y, size_t n)
{
	double s = 0;

	for (size_t i = 0; i < n; i++)
		s += (double)r[i] * (double)y[i];
	return s;
}

/*
 * g[i] = dL/dx[i] by central differences; x is perturbed in place and restored bit for bit.
 * The 2n evaluations run with one OpenMP thread: they are many tiny parallel regions, whose spinning
 * barriers stall badly when the cores are oversubscribed (the ops are deterministic across thread counts,
 * and the analytic side still runs with the caller's threads).
 */
static inline void gc_numeric_grad(double *g, float *x, size_t n, float h, gc_loss_fn loss, void *ctx)
{
#ifdef _OPENMP
	int threads = omp_get_max_threads();

	omp_set_num_threads(1);
#endif
	for (size_t i = 0; i < n; i++) {
		float x0 = x[i];
		float xp = x0 + h, xm = x0 - h;

		x[i] = xp;
		double lp = loss(ctx);
		x[i] = xm;
		double lm = loss(ctx);
		x[i] = x0;
		g[i] = (lp - lm) / ((double)xp - (double)xm);
	}
#ifdef _OPENMP
	omp_set_num_threads(threads);
#endif
}

static inline double gc_rms(const double *v, size_t n)
{
	double s = 0;

	for (size_t i = 0; i < n; i++)
		s += v[i] * v[i];
	return n ? sqrt(s / (double)n) : 0;
}

/*
 * Compare analytic a[] with numeric num[]: true when every |a - n| <= tol * max(|n|, scale), where
 * scale = max(rms(num), scale_floor).  Prints the worst element when it fails.
 */
static inline int gc_check(const char *what, const float *a, const double *num, size_t n, double tol,
			   double scale_floor)
{
	double scale = gc_rms(num, n);
	double worst = 0;
	size_t wi = 0;

	if (scale < scale_floor)
		scale = scale_floor;
	for (size_t i = 0; i < n; i++) {
		double d = fabs((double)a[i] - num[i]);
		double s = fabs(num[i]) > scale ? fabs(num[i]) : scale;
		double e = d / s;

		if (!(e <= worst)) {	/* also catches NaN */
			worst = isnan(e) ? INFINITY : e;
			wi = i;
		}
	}
	if (!(worst <= tol)) {
		fprintf(stderr, "\n  %s: worst rel err %.3g at %zu: analytic %.8g numeric %.8g (scale %.3g)\n",
			what, worst, wi, (double)a[wi], num[wi], scale);
		return 0;
	}
	return 1;
}

#endif
