/*
 * rl/prompts.h - GRPO prompt sets (SPEC 3): JSON Lines, one object per prompt with a non-empty `prompt`
 * string.  Every other field (an `answer`, say) is kept as written, for the reward program (rl/reward.h).
 *
 * record[i] is line i's object with the whitespace outside strings removed and nothing else changed (keys,
 * numbers, escapes and field order exactly as in the file), so it fits on one request line.
 */
#ifndef MOE_RL_PROMPTS_H
#define MOE_RL_PROMPTS_H

#include <stddef.h>

struct prompt_set {
	int n;			/* prompts */
	char **text;		/* text[i]: the prompt, decoded (UTF-8) */
	char **record;		/* record[i]: the whole JSON object of the prompt's line, compact */
	int *line;		/* line[i]: its 1-based line in the file */
	char path[4096];	/* the file it was read from */
};

/*
 * Reads a prompt set.  Blank lines are skipped; lines may be of any length.  A line that is not a JSON
 * object, lacks a string "prompt" or whose prompt is empty is an error "FILE:LINE: ..."; a file with no
 * prompt at all is an error naming the file.  Returns 0, or -1 with err set and *ps empty.
 */
int prompt_set_load(struct prompt_set *ps, const char *path, char *err, size_t errlen);

/* Frees what prompt_set_load allocated and empties *ps; safe on an empty or failed set. */
void prompt_set_free(struct prompt_set *ps);

#endif
