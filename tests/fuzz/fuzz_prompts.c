/*
 * tests/fuzz/fuzz_prompts.c - GRPO prompt sets (prompt_set_load, JSON Lines): the input is the file; an
 * accepted set has a non-empty prompt and a compact record for each line it lists.
 */
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "rl/prompts.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
	struct prompt_set ps;
	char err[1024];
	const char *path = fuzz_write("prompts.jsonl", data, n);

	memset(&ps, 0, sizeof(ps));
	if (!path || prompt_set_load(&ps, path, err, sizeof(err)))
		return 0;
	if (ps.n < 1)
		abort();
	for (int i = 0; i < ps.n; i++)
		if (!ps.text[i][0] || ps.record[i][0] != '{' || ps.line[i] < 1 ||
		    (i && ps.line[i] <= ps.line[i - 1]))
			abort();
	prompt_set_free(&ps);
	return 0;
}
