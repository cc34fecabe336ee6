/*
 * train/lora_run.c - LoRA runs: the base checkpoint and its checksum, attaching adapters from the lora
 * section, and loading adapter checkpoints for inference (lora_run.h).
 */
#include "train/lora_run.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/checkpoint.h"

const char *lora_base_path(const struct run_config *c)
{
	return c->lora.base[0] ? c->lora.base : c->train.init_checkpoint;
}

int lora_file_checksum(const char *path, char *hex, char *err, size_t errlen)
{
	FILE *f = fopen(path, "rb");
	if (!f) {
		snprintf(err, errlen, "lora base %s: %s", path, strerror(errno));
		return -1;
	}
	static unsigned char buf[1 << 20];
	uint64_t h = 0xcbf29ce484222325ULL;
	size_t n;
	while ((n = fread(buf, 1, sizeof(buf), f)) > 0)
		for (size_t i = 0; i < n; i++)
			h = (h ^ buf[i]) * 0x100000001b3ULL;
	int bad = ferror(f);
	fclose(f);
	if (bad) {
		snprintf(err, errlen, "lora base %s: read error", path);
		return -1;
	}
	snprintf(hex, 17, "%016" PRIx64, h);
	return 0;
}

void lora_spec_of(const struct lora_config *lc, struct lora_spec *s)
{
	memset(s, 0, sizeof(*s));
	s->rank = lc->rank;
	s->alpha = lc->alpha;
	s->dropout = lc->dropout;
	for (int i = 0; i < lc->n_targets; i++) {
		int t = lora_target_parse(lc->targets[i]);
		if (t >= 0)  /* config_validate refused the others */
			s->targets |= 1u << t;
	}
}

struct lora *lora_attach(struct moe_model *m, const struct lora_config *lc, uint64_t seed, int freeze,
			 char *err, size_t errlen)
{
	struct lora_spec s;
	lora_spec_of(lc, &s);
	struct lora *l = lora_create(m, &s, err, errlen);
	if (!l)
		return NULL;
	lora_init_weights(l, seed);
	l->dropout_seed = seed;
	m->lora = l;
	if (freeze)
		model_drop_grads(m);
	return l;
}

int lora_check_base(const struct run_config *saved, char *err, size_t errlen)
{
	const char *base = lora_base_path(saved);
	char now[17];
	if (!base[0]) {
		snprintf(err, errlen, "the adapter checkpoint names no base checkpoint (lora.base)");
		return -1;
	}
	if (lora_file_checksum(base, now, err, errlen))
		return -1;
	if (saved->lora.base_checksum[0] && strcmp(now, saved->lora.base_checksum)) {
		snprintf(err, errlen, "lora base %s changed since the adapters were trained on it (checksum %s, "
			 "the adapters were trained on %s): refusing to apply them to another model", base, now,
			 saved->lora.base_checksum);
		return -1;
	}
	return 0;
}

int lora_load_for_inference(const char *path, const struct run_config *rc, struct moe_model *m,
			    struct lora **adapters, char *err, size_t errlen)
{
	if (adapters)
		*adapters = NULL;
	if (rc->lora.rank == 0)
		return checkpoint_load_model(path, m, err, errlen);
	const char *base = lora_base_path(rc);
	struct run_config bc;
	char key[128];
	config_defaults(&bc);
	if (lora_check_base(rc, err, errlen) || checkpoint_read_header(base, &bc, NULL, err, errlen))
		return -1;
	if (config_model_diff(&bc.model, &rc->model, key, sizeof(key))) {
		snprintf(err, errlen, "%s: its base %s holds another model (%s differs)", path, base, key);
		return -1;
	}
	if (checkpoint_load_model(base, m, err, errlen))
		return -1;
	struct lora *l = lora_attach(m, &rc->lora, 0, 0, err, errlen);
	if (!l)
		return -1;
	if (checkpoint_load_model(path, &l->view, err, errlen)) {
		m->lora = NULL;
		lora_free(l);
		return -1;
	}
	if (adapters) {
		*adapters = l;
		return 0;
	}
	m->lora = NULL;
	lora_merge(l, m);
	lora_free(l);
	return 0;
}
