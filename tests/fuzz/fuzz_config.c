/*
 * tests/fuzz/fuzz_config.c - the config parsers: a moe config file (config_load: JSON, then validation;
 * what config_to_json writes of an accepted one must read back to the same text), a Hugging Face
 * config.json (convert_hf_config) and a --set assignment (config_set).  The first byte of the input
 * picks which; the rest is the text.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "train/config.h"
#include "train/convert.h"

/* An accepted config serialises, and its serialisation reads back to the same config. */
static void round_trip(const struct run_config *rc)
{
	struct run_config back;
	char err[1024], *a = config_to_json(rc), *b;

	if (!a)
		abort();
	config_defaults(&back);
	if (config_apply_json(&back, a, "round trip", err, sizeof(err))) {
		fprintf(stderr, "config_to_json's text is refused: %s\n%s\n", err, a);
		abort();
	}
	b = config_to_json(&back);
	if (!b || strcmp(a, b)) {
		fprintf(stderr, "round trip differs:\n%s\n---\n%s\n", a, b ? b : "(null)");
		abort();
	}
	free(a);
	free(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
	struct run_config rc;
	char err[1024], *text;
	const char *path;

	if (n < 1)
		return 0;
	text = fuzz_string(data + 1, n - 1);
	if (!text)
		return 0;
	config_defaults(&rc);
	switch (data[0] % 3) {
	case 0:
		path = fuzz_write("config.json", data + 1, n - 1);
		if (path && config_load(&rc, path, NULL, 0, err, sizeof(err)) == 0)
			round_trip(&rc);
		break;
	case 1:
		if (convert_hf_config(&rc, text, "config.json", NULL, err, sizeof(err)) == 0)
			round_trip(&rc);
		break;
	default:
		if (config_set(&rc, text, err, sizeof(err)) == 0 &&
		    config_validate(&rc, 1, err, sizeof(err)) == 0)
			round_trip(&rc);
		break;
	}
	free(text);
	return 0;
}
