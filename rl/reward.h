/*
 * rl/reward.h - the GRPO reward program (SPEC 4).
 *
 * The user's command is started once (no shell; argv[0] looked up in PATH) and kept running across
 * steps.  For each completion it gets one compact JSON line on its stdin, the id always first:
 *
 *     {"id":17,"prompt":"...","completion":"...",...every other field of the prompt's record}
 *
 * and answers one JSON line on its stdout, in request order: {"id":17,"reward":1.0} (other fields are
 * ignored).  Requests are written while answers are read (poll), so a batch of any size flows through
 * the pipes.  The prompt and the record's other fields are copied as written in the record; the
 * completion is escaped canonically: only '"', '\\' and the control characters are escaped (as \n, \t,
 * \r, \b, \f or \u00XX), other bytes are sent as they are, except bytes that are not valid UTF-8, sent
 * as \ufffd so that every line is valid JSON for strict readers.
 *
 * The program runs in a process group of its own (a Ctrl-C at the terminal reaches the trainer, which
 * finishes its step, and not the reward program); it inherits stderr and the environment, and no other
 * descriptor of ours.  A failure kills the whole group (SIGKILL) and reaps the program.
 */
#ifndef MOE_RL_REWARD_H
#define MOE_RL_REWARD_H

#include <stddef.h>
#include <stdint.h>

struct reward_proc;	/* opaque */

struct reward_request {
	int64_t id;		/* unique id of the completion */
	const char *record;	/* the prompt's JSON object text (prompt_set.record), has "prompt" */
	const char *completion;	/* UTF-8 text: any characters, newlines, quotes */
};

/*
 * Starts argv[0..argc) with its stdin and stdout connected to us.  timeout_s bounds the wait for each
 * answer (<= 0: wait forever).  Returns NULL with err naming the command when it cannot be started: not
 * found or not executable (looked up first), or exec failing otherwise (a bad #! line: reported here by
 * glibc and musl; where posix_spawnp cannot tell, at the first request as exit status 127).
 */
struct reward_proc *reward_start(char *const *argv, int argc, double timeout_s, char *err, size_t errlen);

/*
 * Scores n requests: rewards[i] receives the reward of req[i].  Records' fields named id, prompt or
 * completion are not repeated after ours.  Returns 0, or -1 with err naming the offending record (its id
 * and the start of its prompt) and what went wrong: the program exited (its status), was killed (the
 * signal) or closed its stdout; no answer within timeout_s seconds of the request being written or the
 * previous answer, whichever is later (the program is then killed); an answer that is not a JSON object,
 * lacks "id" or has another id than expected, lacks a numeric "reward" or has a non-finite one, or is
 * longer than 1 MiB; a record that is not a JSON object with a prompt.  After a failure the program is
 * dead: rewards[] is unspecified and every later call fails at once, saying why.  SIGPIPE is blocked in
 * the calling thread while writing (a program that went away is an error, never a signal).
 */
int reward_score(struct reward_proc *p, const struct reward_request *req, int n, double *rewards, char *err,
		 size_t errlen);

/*
 * reward_score for np programs at once: every program scores the same n requests, rewards[k][i]
 * receiving program k's reward of req[i].  All the batches run in one poll() loop over every program's
 * pipes (each program's requests are written as it takes them, its answers read as they come, each
 * answer timed against that program's own timeout_s), so the whole takes about as long as the slowest
 * program, not the sum.  A failing program does not stop the others' batches.  Returns 0, or -1 with err
 * naming the first failing program (its name, see reward_set_name), the record and what went wrong, as
 * reward_score does, with the count of any more that failed; each failed program is dead (reward_score),
 * the others are left ready for the next batch.
 */
int reward_score_all(struct reward_proc *const *p, int np, const struct reward_request *req, int n,
		     double *const *rewards, char *err, size_t errlen);

/* Names the program in its messages: reward 'NAME' ('CMD') instead of reward program 'CMD'.  0, or -1
 * for a NULL program or an empty name. */
int reward_set_name(struct reward_proc *p, const char *name);

/* Closes the program's stdin, waits up to 2 s for it to exit, then kills its group; reaps it; frees p.
 * Safe on NULL and after a failure. */
void reward_stop(struct reward_proc *p);

/* s as a JSON string literal, quotes included, escaped as requests are (invalid UTF-8 as \ufffd);
 * malloc'd, NULL when out of memory. */
char *reward_json_string(const char *s);

#endif
