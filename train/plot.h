/*
 * train/plot.h - line plots of a metrics file (JSON Lines, one object per step, as written by
 * `moe train` / `moe grpo` under log.metrics) into a PNG, with no library beyond cJSON: the PNG is
 * written here (8-bit RGB, stored deflate blocks) and the text uses a built-in 5x7 bitmap font.
 *
 *   moe plot --metrics FILE --key K [--key K2 ...] --out FILE.png [--title T] [--size WxH]
 */
#ifndef MOE_TRAIN_PLOT_H
#define MOE_TRAIN_PLOT_H

#include <stddef.h>

/* At most this many keys in one plot. */
#define PLOT_MAX_KEYS 16

/* Image size limits (pixels, each side). */
#define PLOT_MIN_SIZE 160
#define PLOT_MAX_SIZE 8192

/*
 * Plot keys[0..nkeys) against "step" from a metrics JSON Lines file into a PNG of width x height
 * pixels: axes with ticks and numeric labels, one coloured polyline per key (colour plot_key_color(i)),
 * a legend with the key names above the plot, the title (may be NULL).  The y axis fits the data with
 * a small margin, the x axis runs from the smallest to the largest step; a line lacking a key (or with
 * a non-numeric value for it) simply has no point for it.  Blank lines are skipped; a line that is not
 * a JSON object or lacks a numeric "step" is an error naming file:line, a key with no value anywhere an
 * error naming the key.  The PNG is written to a temporary file and renamed: on error nothing is left.
 * Returns 0, or -1 with a message in err.
 */
int plot_metrics(const char *metrics_path, const char *const *keys, int nkeys, const char *title,
		 const char *png_path, int width, int height, char *err, size_t errlen);

/* The RGB colour of the i-th key's line (the palette repeats after 8 keys). */
void plot_key_color(int i, unsigned char rgb[3]);

#endif
