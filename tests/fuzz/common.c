/* tests/fuzz/fuzz_common.c - see common.h. */
#define _POSIX_C_SOURCE 200809L

#include "common.h"

#include "model/model.h"
#include "train/config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char dir[512];

static void remove_dir(void)
{
	char cmd[600];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "fuzz: could not remove %s\n", dir);
}

const char *fuzz_path(const char *name)
{
	static char path[1024];

	if (!dir[0]) {
		const char *t = getenv("TMPDIR");

		snprintf(dir, sizeof(dir), "%s/moe-fuzz.%d", t && t[0] ? t : "/tmp", (int)getpid());
		if (mkdir(dir, 0700) != 0) {
			perror(dir);
			abort();
		}
		atexit(remove_dir);
	}
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	return path;
}

const char *fuzz_write(const char *name, const uint8_t *data, size_t n)
{
	const char *path = fuzz_path(name);
	FILE *f = fopen(path, "wb");

	if (!f)
		return NULL;
	if (n && fwrite(data, 1, n, f) != n) {
		fclose(f);
		return NULL;
	}
	return fclose(f) ? NULL : path;
}

char *fuzz_string(const uint8_t *data, size_t n)
{
	char *s = malloc(n + 1);

	if (s) {
		memcpy(s, data, n);
		s[n] = 0;
	}
	return s;
}

void fuzz_micro_config(struct run_config *rc)
{
	char err[1024];

	if (config_load(rc, MOE_SRC_DIR "/tests/fuzz/micro.json", NULL, 0, err, sizeof(err))) {
		fprintf(stderr, "fuzz: %s\n", err);
		abort();
	}
}

struct moe_model *fuzz_micro_model(const struct run_config *rc)
{
	char err[1024];
	struct moe_model *m = model_create(&rc->model, 0, rc->model.n_routed_experts, err, sizeof(err));

	if (!m) {
		fprintf(stderr, "fuzz: %s\n", err);
		abort();
	}
	model_init_weights(m, (uint64_t)rc->train.seed);
	return m;
}
