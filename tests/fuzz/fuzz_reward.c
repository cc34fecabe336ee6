/*
 * tests/fuzz/fuzz_reward.c - the reward program's answers (reward_score): the input's first line is a
 * prompt record, the rest what the program answers (it is `cat FILE`); two completions are scored.  An
 * accepted batch has a finite reward for each.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "rl/reward.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
	const uint8_t *nl = memchr(data, '\n', n);
	size_t rec_len = nl ? (size_t)(nl - data) : n;
	char err[1024], *record = fuzz_string(data, rec_len), path[1100], *argv[3];
	const char *written;
	struct reward_request req[2];
	struct reward_proc *p;
	double rewards[2];

	if (!record || memchr(data, 0, rec_len))
		goto out;
	written = fuzz_write("answers.jsonl", nl ? nl + 1 : data + n, nl ? n - rec_len - 1 : 0);
	if (!written)
		goto out;
	snprintf(path, sizeof(path), "%s", written);
	argv[0] = "cat";
	argv[1] = path;
	argv[2] = NULL;
	p = reward_start(argv, 2, 5.0, err, sizeof(err));
	if (!p)
		goto out;
	req[0] = (struct reward_request){ .id = 0, .record = record, .completion = "four" };
	req[1] = (struct reward_request){ .id = 1, .record = record, .completion = "a \"quoted\"\n\xff line" };
	if (reward_score(p, req, 2, rewards, err, sizeof(err)) == 0 &&
	    (!isfinite(rewards[0]) || !isfinite(rewards[1])))
		abort();
	reward_stop(p);
out:
	free(record);
	return 0;
}
