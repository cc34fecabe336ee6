/*
 * train/plot.c - metrics JSON Lines to a PNG line plot (see plot.h).
 *
 * Reading: every non-blank line is a JSON object with a numeric "step"; each requested key that holds a
 * finite number there adds a point (step, value) to that key's series, sorted by step afterwards.
 * Drawing: an RGB canvas, a title, a legend row, a frame with grid lines at "nice" ticks (1, 2, 5 x 10^k)
 * labelled in a 5x7 bitmap font (letters drawn as capitals), one polyline per key.
 * Writing: PNG signature, IHDR (8-bit RGB), one IDAT holding a zlib stream of stored deflate blocks
 * (each at most 65535 bytes) closed by its adler32, IEND; each chunk with its CRC-32.
 */
#define _POSIX_C_SOURCE 200809L

#include "train/plot.h"
#include "launch/errmsg.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

/* ---- 5x7 font: a byte per row, the top row the most significant; bit 4 the leftmost column ---- */

static const char font_chars[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.-+_:/()=,? ";
static const uint64_t font[] = {
	0x0E11131519110Eull, 0x040C040404040Eull, 0x0E11010204081Full, 0x1F02040201110Eull,	/* 0 1 2 3 */
	0x02060A121F0202ull, 0x1F101E0101110Eull, 0x0608101E11110Eull, 0x1F010204080808ull,	/* 4 5 6 7 */
	0x0E11110E11110Eull, 0x0E11110F01020Cull, 0x0E11111F111111ull, 0x1E11111E11111Eull,	/* 8 9 A B */
	0x0E11101010110Eull, 0x1C12111111121Cull, 0x1F10101E10101Full, 0x1F10101E101010ull,	/* C D E F */
	0x0E11101711110Full, 0x1111111F111111ull, 0x0E04040404040Eull, 0x0702020202120Cull,	/* G H I J */
	0x11121418141211ull, 0x1010101010101Full, 0x111B1515111111ull, 0x11111915131111ull,	/* K L M N */
	0x0E11111111110Eull, 0x1E11111E101010ull, 0x0E11111115120Dull, 0x1E11111E141211ull,	/* O P Q R */
	0x0F10100E01011Eull, 0x1F040404040404ull, 0x1111111111110Eull, 0x11111111110A04ull,	/* S T U V */
	0x1111111515150Aull, 0x11110A040A1111ull, 0x11110A04040404ull, 0x1F01020408101Full,	/* W X Y Z */
	0x00000000000C0Cull, 0x0000001F000000ull, 0x0004041F040400ull, 0x0000000000001Full,	/* . - + _ */
	0x000C0C000C0C00ull, 0x01010204081010ull, 0x02040808080402ull, 0x08040202020408ull,	/* : / ( ) */
	0x00001F001F0000ull, 0x000000000C0408ull, 0x0E110102040004ull, 0x00000000000000ull,	/* = , ? sp */
};

static const unsigned char palette[8][3] = {
	{31, 119, 180}, {214, 39, 40}, {44, 160, 44}, {255, 127, 14},
	{148, 103, 189}, {140, 86, 75}, {227, 119, 194}, {23, 190, 207},
};
static const unsigned char white[3] = {255, 255, 255}, ink[3] = {0, 0, 0}, grid[3] = {225, 225, 225};

void plot_key_color(int i, unsigned char rgb[3])
{
	memcpy(rgb, palette[(unsigned)i % 8], 3);
}


/* ---- canvas ---- */

struct canvas {
	int w, h, s;		/* size; s: the font / line scale */
	unsigned char *px;	/* rows of 1 + 3w bytes: PNG filter type 0, then RGB */
};

static void fill(struct canvas *c, int x0, int y0, int x1, int y1, const unsigned char *rgb)
{
	for (int y = y0 < 0 ? 0 : y0; y <= y1 && y < c->h; y++)
		for (int x = x0 < 0 ? 0 : x0; x <= x1 && x < c->w; x++)
			memcpy(c->px + (size_t)y * (1 + 3 * c->w) + 1 + 3 * x, rgb, 3);
}

/* A line of thickness t (a t x t square stamped along Bresenham's path). */
static void line(struct canvas *c, int x0, int y0, int x1, int y1, int t, const unsigned char *rgb)
{
	int dx = abs(x1 - x0), dy = -abs(y1 - y0), sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
	int e = dx + dy, o = (t - 1) / 2;

	for (;;) {
		int e2 = 2 * e;

		fill(c, x0 - o, y0 - o, x0 - o + t - 1, y0 - o + t - 1, rgb);
		if (x0 == x1 && y0 == y1)
			break;
		if (e2 >= dy) {
			e += dy;
			x0 += sx;
		}
		if (e2 <= dx) {
			e += dx;
			y0 += sy;
		}
	}
}

static int text_w(const struct canvas *c, const char *s)
{
	int n = (int)strlen(s);

	return n ? (6 * n - 1) * c->s : 0;
}

/* Text with its top-left corner at (x, y); lower case drawn as capitals, unknown characters as '?'. */
static void text(struct canvas *c, int x, int y, const char *s, const unsigned char *rgb)
{
	for (; *s; s++, x += 6 * c->s) {
		const char *p = strchr(font_chars, toupper((unsigned char)*s));
		uint64_t g = font[p ? p - font_chars : (int)strlen(font_chars) - 2];

		for (int r = 0; r < 7; r++)
			for (int col = 0; col < 5; col++)
				if ((g >> (8 * (6 - r))) & (0x10 >> col))
					fill(c, x + col * c->s, y + r * c->s, x + (col + 1) * c->s - 1,
					     y + (r + 1) * c->s - 1, rgb);
	}
}

/* ---- PNG ---- */

static void be32(unsigned char *p, uint32_t v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

static uint32_t crc32_update(const uint32_t *tab, uint32_t crc, const unsigned char *p, size_t n)
{
	while (n--)
		crc = tab[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return crc;
}

static int put_chunk(FILE *f, const uint32_t *tab, const char *type, const unsigned char *d, size_t n)
{
	unsigned char b[4];
	uint32_t crc = crc32_update(tab, 0xffffffffu, (const unsigned char *)type, 4);

	crc = crc32_update(tab, crc, d, n) ^ 0xffffffffu;
	be32(b, (uint32_t)n);
	if (fwrite(b, 1, 4, f) != 4 || fwrite(type, 1, 4, f) != 4 || (n && fwrite(d, 1, n, f) != n))
		return -1;
	be32(b, crc);
	return fwrite(b, 1, 4, f) == 4 ? 0 : -1;
}

/* The canvas rows as a zlib stream of stored deflate blocks. */
static unsigned char *zlib_stored(const struct canvas *c, size_t *outn)
{
	const unsigned char *raw = c->px;
	size_t n = (1 + 3 * (size_t)c->w) * c->h, nb = (n + 65534) / 65535;
	unsigned char *z = malloc(2 + 5 * nb + n + 4), *q = z;
	uint32_t a = 1, b = 0;

	if (!z)
		return NULL;
	*q++ = 0x78;
	*q++ = 0x01;
	for (size_t off = 0; off < n; off += 65535) {
		size_t len = n - off < 65535 ? n - off : 65535;

		*q++ = off + len == n;	/* BFINAL, BTYPE 00 */
		q[0] = len & 0xff, q[1] = len >> 8, q[2] = ~len & 0xff, q[3] = (~len >> 8) & 0xff;
		memcpy(q + 4, raw + off, len);
		q += 4 + len;
	}
	for (size_t i = 0; i < n; i++) {
		a = (a + raw[i]) % 65521;
		b = (b + a) % 65521;
	}
	be32(q, b << 16 | a);
	*outn = q + 4 - z;
	return z;
}

static int png_stream(FILE *f, const struct canvas *c)
{
	static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
	unsigned char ihdr[13] = {0};
	uint32_t tab[256];
	size_t zn = 0;
	unsigned char *z = zlib_stored(c, &zn);
	int rc;

	for (uint32_t i = 0; i < 256; i++) {
		uint32_t v = i;

		for (int k = 0; k < 8; k++)
			v = v & 1 ? 0xedb88320u ^ (v >> 1) : v >> 1;
		tab[i] = v;
	}
	be32(ihdr, c->w);
	be32(ihdr + 4, c->h);
	ihdr[8] = 8;	/* bit depth */
	ihdr[9] = 2;	/* RGB */
	rc = !z || fwrite(sig, 1, 8, f) != 8 || put_chunk(f, tab, "IHDR", ihdr, 13) ||
	     put_chunk(f, tab, "IDAT", z, zn) || put_chunk(f, tab, "IEND", NULL, 0) ? -1 : 0;
	free(z);
	return rc;
}

/* The PNG to path.tmp.PID, flushed to disk, then renamed onto path. */
static int png_write(const char *path, const struct canvas *c, char *err, size_t errlen)
{
	size_t n = strlen(path) + 32;
	char *tmp = malloc(n);
	FILE *f;
	int rc = -1;

	if (!tmp)
		return set_err(err, errlen, "%s: out of memory", path);
	snprintf(tmp, n, "%s.tmp.%ld", path, (long)getpid());
	f = fopen(tmp, "wb");
	if (!f) {
		set_err(err, errlen, "%s: cannot create: %s", tmp, strerror(errno));
	} else if (png_stream(f, c) || fflush(f) || fsync(fileno(f))) {
		set_err(err, errlen, "%s: write failed: %s", tmp, strerror(errno));
		fclose(f);
	} else if (fclose(f)) {
		set_err(err, errlen, "%s: write failed: %s", tmp, strerror(errno));
	} else if (rename(tmp, path)) {
		set_err(err, errlen, "%s: cannot rename to %s: %s", tmp, path, strerror(errno));
	} else {
		rc = 0;
	}
	if (rc)
		unlink(tmp);
	free(tmp);
	return rc;
}

/* ---- metrics ---- */

struct pt {
	double x, y;
};

struct series {
	struct pt *p;
	int n, cap;
};

static int add_point(struct series *s, double x, double y)
{
	if (s->n == s->cap) {
		int cap = s->cap ? 2 * s->cap : 64;
		struct pt *p = realloc(s->p, sizeof(*p) * cap);

		if (!p)
			return -1;
		s->p = p;
		s->cap = cap;
	}
	s->p[s->n++] = (struct pt){x, y};
	return 0;
}

/* One line's points; -1 with err naming file:line when it is not an object with a numeric step. */
static int parse_line(const char *line, const char *path, long lineno, const char *const *keys,
		      int nkeys, struct series *ser, char *err, size_t errlen)
{
	cJSON *o = cJSON_Parse(line);
	const cJSON *step = cJSON_GetObjectItemCaseSensitive(o, "step");
	int rc = 0;

	if (!cJSON_IsObject(o))
		rc = set_err(err, errlen, "%s:%ld: not a JSON object", path, lineno);
	else if (!cJSON_IsNumber(step) || !isfinite(step->valuedouble))
		rc = set_err(err, errlen, "%s:%ld: no numeric \"step\"", path, lineno);
	for (int k = 0; !rc && k < nkeys; k++) {
		const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, keys[k]);

		if (cJSON_IsNumber(v) && isfinite(v->valuedouble) &&
		    add_point(&ser[k], step->valuedouble, v->valuedouble))
			rc = set_err(err, errlen, "%s:%ld: out of memory", path, lineno);
	}
	cJSON_Delete(o);
	return rc;
}

static int by_step(const void *a, const void *b)
{
	double x = ((const struct pt *)a)->x, y = ((const struct pt *)b)->x;

	return (x > y) - (x < y);
}

static int read_metrics(const char *path, const char *const *keys, int nkeys, struct series *ser,
			char *err, size_t errlen)
{
	FILE *f = fopen(path, "r");
	char *buf = NULL;
	size_t cap = 0;
	long lineno = 0;
	int rc = 0;

	if (!f)
		return set_err(err, errlen, "%s: cannot open: %s", path, strerror(errno));
	while (!rc && getline(&buf, &cap, f) >= 0) {
		lineno++;
		if (buf[strspn(buf, " \t\r\n")])
			rc = parse_line(buf, path, lineno, keys, nkeys, ser, err, errlen);
	}
	if (!rc && ferror(f))
		rc = set_err(err, errlen, "%s:%ld: read error", path, lineno + 1);
	free(buf);
	fclose(f);
	for (int k = 0; !rc && k < nkeys; k++) {
		if (!ser[k].n)
			rc = set_err(err, errlen, "%s: key \"%s\" has no numeric value on any line", path,
				     keys[k]);
		else
			qsort(ser[k].p, ser[k].n, sizeof(struct pt), by_step);
	}
	return rc;
}

/* ---- axes ---- */

struct axis {
	double lo, hi, step;	/* range and tick spacing */
	int p0, p1;		/* pixel positions of lo and hi */
};

/* Range [lo, hi] (widened when empty, by frac of the span otherwise) with about n ticks. */
static void axis_fit(struct axis *a, double lo, double hi, double frac, int n)
{
	double span = hi - lo, raw, mag, r;

	if (!(span > 1e-12 * fmax(fabs(lo), fabs(hi)))) {
		span = fabs(hi) > 0 ? 0.1 * fabs(hi) : 1;
		lo -= span;
		hi += span;
		span *= 2;
	} else {
		lo -= frac * span;
		hi += frac * span;
		span = hi - lo;
	}
	raw = span / (n > 1 ? n : 1);
	mag = pow(10, floor(log10(raw)));
	r = raw / mag;
	a->lo = lo;
	a->hi = hi;
	a->step = (r < 1.5 ? 1 : r < 3 ? 2 : r < 7 ? 5 : 10) * mag;
}

/* v's pixel, clamped (even for ranges overflowing to infinity) so that lines stay short. */
static int axis_px(const struct axis *a, double v)
{
	double p = a->p0 + (v - a->lo) / (a->hi - a->lo) * (a->p1 - a->p0);

	return isnan(p) ? a->p0 : (int)fmax(-PLOT_MAX_SIZE, fmin(2 * PLOT_MAX_SIZE, round(p)));
}

/* Tick i's label: as many significant digits as the tick spacing needs. */
static void tick_label(const struct axis *a, double v, char *buf, size_t n)
{
	double big = fmax(fabs(a->lo), fabs(a->hi));
	int dec = a->step >= 1 ? 0 : (int)ceil(-log10(a->step) - 1e-9);

	if (fabs(v) < 1e-9 * a->step)
		v = 0;
	if (big < 1e6 && a->step >= 1e-4) {
		snprintf(buf, n, "%.*f", dec, v);
	} else {
		int sig = (int)floor(log10(big)) - (int)floor(log10(a->step)) + 1;

		snprintf(buf, n, "%.*g", sig < 1 ? 1 : sig > 12 ? 12 : sig, v);
	}
}

#define for_each_tick(a, v) \
	for (double v = ceil((a)->lo / (a)->step - 1e-9) * (a)->step; v <= (a)->hi + 1e-9 * (a)->step; \
	     v += (a)->step)

static int widest_label(const struct canvas *c, const struct axis *a)
{
	char b[64];
	int w = 0;

	for_each_tick(a, v) {
		tick_label(a, v, b, sizeof(b));
		w = text_w(c, b) > w ? text_w(c, b) : w;
	}
	return w;
}

/* Grid, frame, ticks and labels of the plot area [x.p0, x.p1] x [y.p1, y.p0]. */
static void draw_axes(struct canvas *c, const struct axis *x, const struct axis *y)
{
	int s = c->s, tk = 4 * s;
	char b[64];

	for_each_tick(x, v) {
		int p = axis_px(x, v);

		line(c, p, y->p1, p, y->p0, 1, grid);
		line(c, p, y->p0, p, y->p0 + tk, s, ink);
		tick_label(x, v, b, sizeof(b));
		text(c, p - text_w(c, b) / 2, y->p0 + tk + 3 * s, b, ink);
	}
	for_each_tick(y, v) {
		int p = axis_px(y, v);

		line(c, x->p0, p, x->p1, p, 1, grid);
		line(c, x->p0 - tk, p, x->p0, p, s, ink);
		tick_label(y, v, b, sizeof(b));
		text(c, x->p0 - tk - 3 * s - text_w(c, b), p - 3 * s, b, ink);
	}
	line(c, x->p0, y->p0, x->p1, y->p0, s, ink);
	line(c, x->p0, y->p1, x->p1, y->p1, s, ink);
	line(c, x->p0, y->p0, x->p0, y->p1, s, ink);
	line(c, x->p1, y->p0, x->p1, y->p1, s, ink);
}

/* The legend (a swatch and the name per key, wrapping) from row top; returns the row below it. */
static int draw_legend(struct canvas *c, const char *const *keys, int nkeys, int left, int top)
{
	int s = c->s, x = left, y = top;

	for (int k = 0; k < nkeys; k++) {
		int w = 20 * s + text_w(c, keys[k]);
		unsigned char rgb[3];

		if (x > left && x + w > c->w - 8 * s) {
			x = left;
			y += 12 * s;
		}
		plot_key_color(k, rgb);
		fill(c, x, y + 2 * s, x + 13 * s, y + 5 * s - 1, rgb);
		text(c, x + 17 * s, y, keys[k], ink);
		x += w + 12 * s;
	}
	return y + 12 * s;
}

static void draw_series(struct canvas *c, const struct series *ser, int k, const struct axis *x,
			const struct axis *y)
{
	unsigned char rgb[3];
	int px = 0, py = 0;

	plot_key_color(k, rgb);
	for (int i = 0; i < ser->n; i++) {
		int qx = axis_px(x, ser->p[i].x), qy = axis_px(y, ser->p[i].y);

		line(c, i ? px : qx, i ? py : qy, qx, qy, 2 * c->s, rgb);
		px = qx;
		py = qy;
	}
}

/* ---- the plot ---- */

static void render(struct canvas *c, const struct series *ser, const char *const *keys, int nkeys,
		   const char *title)
{
	struct axis x, y;
	double xlo = INFINITY, xhi = -INFINITY, ylo = INFINITY, yhi = -INFINITY;
	int s = c->s, top = 8 * s;

	for (int k = 0; k < nkeys; k++)
		for (int i = 0; i < ser[k].n; i++) {
			xlo = fmin(xlo, ser[k].p[i].x);
			xhi = fmax(xhi, ser[k].p[i].x);
			ylo = fmin(ylo, ser[k].p[i].y);
			yhi = fmax(yhi, ser[k].p[i].y);
		}
	axis_fit(&x, xlo, xhi, 0, c->w / (90 * s));
	axis_fit(&y, ylo, yhi, 0.05, c->h / (60 * s));
	if (xhi > xlo) {	/* the x axis spans exactly the steps */
		x.lo = xlo;
		x.hi = xhi;
	}
	fill(c, 0, 0, c->w - 1, c->h - 1, white);
	if (title && *title) {
		text(c, (c->w - text_w(c, title)) / 2, top, title, ink);
		top += 14 * s;
	}
	x.p0 = 12 * s + widest_label(c, &y);
	x.p1 = c->w - 1 - 20 * s;
	y.p1 = draw_legend(c, keys, nkeys, x.p0, top) + 4 * s;
	y.p0 = c->h - 1 - 20 * s;
	draw_axes(c, &x, &y);
	for (int k = 0; k < nkeys; k++)
		draw_series(c, &ser[k], k, &x, &y);
}

int plot_metrics(const char *metrics_path, const char *const *keys, int nkeys, const char *title,
		 const char *png_path, int width, int height, char *err, size_t errlen)
{
	struct series ser[PLOT_MAX_KEYS] = {0};
	struct canvas c = {width, height, width >= 1600 && height >= 1000 ? 2 : 1, NULL};
	int rc;

	if (nkeys < 1 || nkeys > PLOT_MAX_KEYS)
		return set_err(err, errlen, "%s: between 1 and %d keys, not %d", png_path, PLOT_MAX_KEYS,
			       nkeys);
	if (width < PLOT_MIN_SIZE || height < PLOT_MIN_SIZE || width > PLOT_MAX_SIZE ||
	    height > PLOT_MAX_SIZE)
		return set_err(err, errlen, "%s: size %dx%d outside %d..%d pixels a side", png_path, width,
			       height, PLOT_MIN_SIZE, PLOT_MAX_SIZE);
	rc = read_metrics(metrics_path, keys, nkeys, ser, err, errlen);
	if (!rc) {
		c.px = calloc((size_t)height, 1 + 3 * (size_t)width);
		if (!c.px) {
			rc = set_err(err, errlen, "%s: out of memory", png_path);
		} else {
			render(&c, ser, keys, nkeys, title);
			rc = png_write(png_path, &c, err, errlen);
		}
	}
	free(c.px);
	for (int k = 0; k < nkeys; k++)
		free(ser[k].p);
	return rc;
}
