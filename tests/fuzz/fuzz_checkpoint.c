/*
 * tests/fuzz/fuzz_checkpoint.c - the checkpoint reader on a mutated file (seed: a training checkpoint of
 * the micro model, tests/fuzz/micro.json): its attributes (format, version, step, the config as JSON,
 * /optim's step, /state) and datasets.  The header is read and applied over a config, the file loaded into
 * the micro model with its optimizer state (all or nothing: on failure nothing changes), and opened with
 * the streaming reader, which reads every piece of a model the file's own config describes when it is
 * small (a file may declare a dataset far larger than itself: HDF5 reads unwritten chunks as zeros).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "model/model.h"
#include "optim/adamw.h"
#include "train/checkpoint.h"
#include "train/config.h"

#define PIECE_MAX (1 << 16)	/* floats read of one piece, at most */

static struct run_config rc;
static struct moe_model *m;
static struct adamw opt;
static float *before;

static void setup(void)
{
	fuzz_micro_config(&rc);
	m = fuzz_micro_model(&rc);
	if (adamw_init(&opt, m->n_weights))
		abort();
	before = malloc(m->n_weights * sizeof(float));
	if (!before)
		abort();
}

static void read_streaming(const char *path)
{
	static float buf[PIECE_MAX];
	char err[1024];
	const struct param *p;
	struct ckpt_reader *r = ckpt_reader_open(path, NULL, NULL, err, sizeof(err));
	int n;

	if (!r)
		return;
	p = ckpt_reader_params(r, &n);
	for (int i = 0; i < n; i++)
		if (p[i].numel <= PIECE_MAX)
			ckpt_reader_get(r, p[i].name, -1, buf, err, sizeof(err));
	ckpt_reader_close(r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
	struct train_state st = { 0 };
	struct run_config hdr;
	struct ckpt_meta meta;
	char err[1024];
	const char *path;

	if (!m)
		setup();
	path = fuzz_write("ckpt.h5", data, n);
	if (!path)
		return 0;
	hdr = rc;
	checkpoint_read_header(path, &hdr, &meta, err, sizeof(err));
	memcpy(before, m->weights, m->n_weights * sizeof(float));
	if (checkpoint_load(path, m, &opt, &st, err, sizeof(err)) &&
	    memcmp(before, m->weights, m->n_weights * sizeof(float)))
		abort();	/* a failed load changed the model */
	read_streaming(path);
	return 0;
}
