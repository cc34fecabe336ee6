/*
 * tests/fuzz/fuzz_st_index.c - model.safetensors.index.json (convert_from_hf): the input is the index of
 * a Hugging Face directory whose config.json and five safetensors shards are those of the micro model
 * (tests/fuzz/micro.json, written once by convert_to_hf); an accepted index converts to a checkpoint.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "model/model.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/convert.h"

static char dir[1024], index_path[1100], out[1100];

static void make_dir(void)
{
	struct convert_to_hf_opts o = { ST_F32, 6000 };	/* five shards, as in the seed */
	struct ckpt_meta meta = { 0, 0 };
	struct run_config rc;
	struct moe_model *m;
	char err[1024], ckpt[1100];

	fuzz_micro_config(&rc);
	m = fuzz_micro_model(&rc);
	snprintf(dir, sizeof(dir), "%s", fuzz_path("hf"));
	snprintf(ckpt, sizeof(ckpt), "%s", fuzz_path("micro.h5"));
	snprintf(out, sizeof(out), "%s", fuzz_path("out.h5"));
	snprintf(index_path, sizeof(index_path), "%s/model.safetensors.index.json", dir);
	if (checkpoint_save_model(ckpt, m, &rc, &meta, err, sizeof(err)) ||
	    convert_to_hf(ckpt, dir, &o, NULL, err, sizeof(err))) {
		fprintf(stderr, "fuzz: %s\n", err);
		abort();
	}
	model_free(m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
	char err[1024];
	FILE *f;

	if (!dir[0])
		make_dir();
	f = fopen(index_path, "wb");
	if (!f || (n && fwrite(data, 1, n, f) != n) || fclose(f))
		abort();
	if (convert_from_hf(dir, out, NULL, err, sizeof(err)) == 0)
		unlink(out);
	return 0;
}
