/*
 * tests/rl/test_reward.c - GRPO prompt sets (rl/prompts.h) and the reward program runner (rl/reward.h).
 *
 * The reward programs are small /bin/sh scripts written into the test's scratch directory: one that
 * counts its requests (started once, kept across calls), one that copies its stdin to a file (the exact
 * request lines), an awk one for a batch far larger than the pipes, and one per failure (exit, signal,
 * hang, each kind of bad answer...).  Every failure must name the offending record's id, leave the
 * program reaped (no child left) and make the next call fail at once.  The two example programs of
 * rl/rewards/ are run on cases with escapes at the suffix's edge.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "rl/prompts.h"
#include "rl/reward.h"

/* ---- helpers ---------------------------------------------------------------------------------- */

static void *xcalloc(size_t n, size_t size)
{
	void *p = calloc(n, size);

	if (!p)
		abort();
	return p;
}

static void write_file(const char *path, const char *text, mode_t mode)
{
	FILE *f = fopen(path, "w");

	CU_ASSERT_PTR_NOT_NULL_FATAL(f);
	fputs(text, f);
	fclose(f);
	chmod(path, mode);
}

/* Reads a whole file (NUL-terminated; free it); NULL when missing. */
static char *read_file(const char *path)
{
	FILE *f = fopen(path, "r");
	char *s;
	long n;

	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	rewind(f);
	s = calloc((size_t)n + 1, 1);
	if (s && fread(s, 1, (size_t)n, f) != (size_t)n)
		s[0] = '\0';
	fclose(f);
	return s;
}

/* Writes an executable sh script (body after the #! line) named name; returns its path (static). */
static const char *script(const char *name, const char *body)
{
	static char path[8][600];
	static int next;
	char *p = path[next++ & 7];
	char *text = xcalloc(strlen(body) + 16, 1);

	snprintf(p, sizeof(path[0]), "%s", tmp_path(name));
	sprintf(text, "#!/bin/sh\n%s", body);
	write_file(p, text, 0755);
	free(text);
	return p;
}

static struct reward_proc *start_script(const char *path, double timeout_s)
{
	char *argv[] = { (char *)path };
	char err[512] = "";
	struct reward_proc *p = reward_start(argv, 1, timeout_s, err, sizeof(err));

	if (!p)
		fprintf(stderr, "reward_start: %s\n", err);
	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	return p;
}

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* No child process of ours is left, not even a zombie. */
static void assert_no_children(void)
{
	errno = 0;
	CU_ASSERT_EQUAL(waitpid(-1, NULL, WNOHANG), -1);
	CU_ASSERT_EQUAL(errno, ECHILD);
}

static void assert_contains(const char *s, const char *part)
{
	if (!strstr(s, part))
		fprintf(stderr, "\n  \"%s\"\n  does not contain \"%s\"\n", s, part);
	CU_ASSERT_PTR_NOT_NULL(strstr(s, part));
}

/* reward_score expected to succeed: prints its message when it does not. */
static int score(struct reward_proc *p, const struct reward_request *req, int n, double *rewards)
{
	char err[1024] = "";
	int rc = reward_score(p, req, n, rewards, err, sizeof(err));

	if (rc)
		fprintf(stderr, "\n  reward_score: %s\n", err);
	return rc;
}

/* Reads "id" up to its first comma from a request line: sh text shared by the scripts. */
#define SH_ID "id=${line#'{\"id\":'}; id=${id%%,*}\n"
#define REC(prompt) "{\"prompt\":\"" prompt "\",\"answer\":7}"

/* n requests with ids 100.. on prompts "Question <i>" (records kept in recs) */
static void make_requests(struct reward_request *req, char (*recs)[64], int n)
{
	for (int i = 0; i < n; i++) {
		snprintf(recs[i], sizeof(recs[i]), "{\"prompt\":\"Question %d\",\"answer\":%d}", i, i);
		req[i] = (struct reward_request){ .id = 100 + i, .record = recs[i], .completion = "c" };
	}
}

/* ---- prompt sets ------------------------------------------------------------------------------ */

static void test_prompts_good(void)
{
	const char *path = tmp_path("good.jsonl");
	struct prompt_set ps;
	char err[512] = "";

	write_file(path,
		   "{\"prompt\": \"What is 2+2?\", \"answer\": 4, \"meta\": {\"tags\": [\"a\", \"b\"], \"x\": null}}\n"
		   "\n"
		   "   \t\n"
		   "{\"answer\":\"\\u00e9 \xc3\xbcn\xc3\xaf \xe6\x97\xa5\xe6\x9c\xac\",\"prompt\":\"Say \\\"hi\\\"\\n\","
		   "\"big\":12345678901234567890, \"f\": 1.50}\r\n", 0644);
	CU_ASSERT_EQUAL_FATAL(prompt_set_load(&ps, path, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL_FATAL(ps.n, 2);
	CU_ASSERT_STRING_EQUAL(ps.text[0], "What is 2+2?");
	CU_ASSERT_STRING_EQUAL(ps.record[0],
			       "{\"prompt\":\"What is 2+2?\",\"answer\":4,\"meta\":{\"tags\":[\"a\",\"b\"],\"x\":null}}");
	CU_ASSERT_EQUAL(ps.line[0], 1);
	CU_ASSERT_STRING_EQUAL(ps.text[1], "Say \"hi\"\n");
	CU_ASSERT_STRING_EQUAL(ps.record[1],
			       "{\"answer\":\"\\u00e9 \xc3\xbcn\xc3\xaf \xe6\x97\xa5\xe6\x9c\xac\",\"prompt\":"
			       "\"Say \\\"hi\\\"\\n\",\"big\":12345678901234567890,\"f\":1.50}");
	CU_ASSERT_EQUAL(ps.line[1], 4);
	CU_ASSERT_STRING_EQUAL(ps.path, path);
	prompt_set_free(&ps);
	CU_ASSERT_EQUAL(ps.n, 0);
	prompt_set_free(&ps);	/* twice is harmless */
}

static void test_prompts_long_line(void)
{
	const char *path = tmp_path("long.jsonl");
	size_t n = 300000;
	char *text = xcalloc(n + 64, 1), err[512] = "";
	struct prompt_set ps;

	strcpy(text, "{\"prompt\":\"");
	memset(text + 11, 'x', n);
	strcpy(text + 11 + n, "\"}\n{\"prompt\":\"short\"}\n");
	write_file(path, text, 0644);
	CU_ASSERT_EQUAL_FATAL(prompt_set_load(&ps, path, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(ps.n, 2);
	CU_ASSERT_EQUAL(strlen(ps.text[0]), n);
	CU_ASSERT_EQUAL(strlen(ps.record[0]), n + 13);
	CU_ASSERT_STRING_EQUAL(ps.text[1], "short");
	CU_ASSERT_EQUAL(ps.line[1], 2);
	prompt_set_free(&ps);
	free(text);
}

static void test_prompts_errors(void)
{
	static const struct {
		const char *line, *expect;
	} bad[] = {
		{ "[1, 2]", "not a JSON object" },
		{ "\"just a string\"", "not a JSON object" },
		{ "{\"answer\": 1}", "no \"prompt\" field" },
		{ "{\"prompt\": 5}", "\"prompt\" is not a string" },
		{ "{\"prompt\": null}", "\"prompt\" is not a string" },
		{ "{\"prompt\": \"\"}", "\"prompt\" is empty" },
		{ "{\"prompt\": \"a\"", "not valid JSON" },
		{ "{\"prompt\": \"a\"} x", "not valid JSON" },
		{ "\xEF\xBB\xBF{\"prompt\": \"a\"}", "byte order mark inside the file" },
	};
	const char *path = tmp_path("bad.jsonl");
	char text[256], err[512], where[700];
	struct prompt_set ps;

	snprintf(where, sizeof(where), "%s:3: ", path);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(text, sizeof(text), "{\"prompt\":\"fine\"}\n\n%s\n{\"prompt\":\"after\"}\n", bad[i].line);
		write_file(path, text, 0644);
		err[0] = '\0';
		CU_ASSERT_EQUAL(prompt_set_load(&ps, path, err, sizeof(err)), -1);
		CU_ASSERT_EQUAL(ps.n, 0);
		CU_ASSERT_PTR_NULL(ps.text);
		CU_ASSERT_EQUAL(strncmp(err, where, strlen(where)), 0);
		assert_contains(err, bad[i].expect);
		prompt_set_free(&ps);
	}
}

static void test_prompts_empty(void)
{
	static const char *const empties[] = { "", "\n\n  \n" };
	const char *path = tmp_path("empty.jsonl");
	char err[512], expect[700];
	struct prompt_set ps;

	snprintf(expect, sizeof(expect), "%s: no prompts", path);
	for (int i = 0; i < 2; i++) {
		write_file(path, empties[i], 0644);
		CU_ASSERT_EQUAL(prompt_set_load(&ps, path, err, sizeof(err)), -1);
		assert_contains(err, expect);
		CU_ASSERT_EQUAL(ps.n, 0);
	}
	path = tmp_path("missing.jsonl");
	CU_ASSERT_EQUAL(prompt_set_load(&ps, path, err, sizeof(err)), -1);
	assert_contains(err, path);
	assert_contains(err, "No such file");
}

/* ---- a correct program ------------------------------------------------------------------------ */

/* Started once and kept: its counter goes on across calls; its pid is written once. */
static void test_reward_kept_running(void)
{
	char body[512];
	char recs[4][64], err[512] = "", *pids;
	struct reward_request req[4];
	double rewards[4];

	snprintf(body, sizeof(body),
		 "echo $$ >> '%s'\nn=0\nwhile IFS= read -r line; do\n" SH_ID
		 "n=$((n+1)); printf '{\"id\":%%s,\"reward\":%%d.5,\"pid\":%%d}\\n' \"$id\" $n $$\ndone\n",
		 tmp_path("kept.pids"));
	struct reward_proc *p = start_script(script("kept.sh", body), 5.0);

	make_requests(req, recs, 4);
	for (int call = 0; call < 3; call++) {
		for (int i = 0; i < 4; i++)
			req[i].id = 1000 * call + 7 * i;
		CU_ASSERT_EQUAL_FATAL(score(p, req, 4, rewards), 0);
		for (int i = 0; i < 4; i++)
			CU_ASSERT_EQUAL(rewards[i], 4 * call + i + 1.5);
	}
	CU_ASSERT_EQUAL(reward_score(p, req, 0, rewards, err, sizeof(err)), 0);
	reward_stop(p);
	pids = read_file(tmp_path("kept.pids"));
	CU_ASSERT_PTR_NOT_NULL_FATAL(pids);
	CU_ASSERT(atoi(pids) > 0);
	CU_ASSERT_PTR_NOT_NULL(strchr(pids, '\n'));
	CU_ASSERT_EQUAL(strchr(pids, '\n')[1], '\0');	/* one pid: one start */
	free(pids);
	assert_no_children();
}

/* The exact request lines: our id, the record's prompt, the escaped completion, the other fields. */
static void test_reward_request_lines(void)
{
	const char *dump = tmp_path("requests.dump"), *file = tmp_path("fields.jsonl");
	char body[512], err[512] = "", *got;
	struct prompt_set ps;
	double rewards[3];

	snprintf(body, sizeof(body),
		 "while IFS= read -r line; do\nprintf '%%s\\n' \"$line\" >> '%s'\n" SH_ID
		 "s=${line#*'\"score\":'}; s=${s%%%%,*}\nprintf '{\"id\":%%s,\"reward\":%%s}\\n' \"$id\" \"$s\"\ndone\n",
		 dump);
	write_file(file, "{\"prompt\": \"P3\", \"score\": 3, \"meta\": {\"a\": [1, 2]}, \"z\": 0}\n", 0644);
	CU_ASSERT_EQUAL_FATAL(prompt_set_load(&ps, file, err, sizeof(err)), 0);
	struct reward_request req[3] = {
		{ .id = 5, .completion = "he said \"hi\"\\ \n\ttab \xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \x01 end\xff",
		  .record = "{\"id\":99,\"prompt\":\"Say \\\"hi\\\"\\n\",\"completion\":\"old\",\"score\":2.25,"
			    "\"answer\":{\"x\":[1,2.50],\"u\":\"\\u00e9 \xe6\x97\xa5\"},\"big\":12345678901234567890}" },
		{ .id = 6, .completion = "", .record = "{\"prompt\":\"P\",\"score\":-1.5,\"t\":true}" },
		{ .id = 7, .completion = "c", .record = ps.record[0] },
	};
	struct reward_proc *p = start_script(script("dump.sh", body), 5.0);

	CU_ASSERT_EQUAL(score(p, req, 3, rewards), 0);
	CU_ASSERT_EQUAL(rewards[0], 2.25);
	CU_ASSERT_EQUAL(rewards[1], -1.5);
	CU_ASSERT_EQUAL(rewards[2], 3.0);
	reward_stop(p);
	got = read_file(dump);
	CU_ASSERT_PTR_NOT_NULL_FATAL(got);
	CU_ASSERT_STRING_EQUAL(got,
		"{\"id\":5,\"prompt\":\"Say \\\"hi\\\"\\n\",\"completion\":\"he said \\\"hi\\\"\\\\ \\n\\ttab "
		"\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \\u0001 end\\ufffd\",\"score\":2.25,"
		"\"answer\":{\"x\":[1,2.50],\"u\":\"\\u00e9 \xe6\x97\xa5\"},\"big\":12345678901234567890}\n"
		"{\"id\":6,\"prompt\":\"P\",\"completion\":\"\",\"score\":-1.5,\"t\":true}\n"
		"{\"id\":7,\"prompt\":\"P3\",\"completion\":\"c\",\"score\":3,\"meta\":{\"a\":[1,2]},\"z\":0}\n");
	free(got);
	prompt_set_free(&ps);
}

/* 2000 requests of 4 KiB answered with 200-byte padded lines: both pipes overflow many times. */
static void test_reward_large_batch(void)
{
	enum { N = 2000, LEN = 4096 };
	struct reward_request *req = xcalloc(N, sizeof(*req));
	double *rewards = xcalloc(N, sizeof(*rewards));
	char *text = xcalloc(N, LEN + 1);
	const char *rec = "{\"prompt\":\"p\"}";
	int bad = 0;

	for (int i = 0; i < N; i++) {
		char *c = text + (size_t)i * (LEN + 1);

		for (int j = 0; j < LEN; j++)
			c[j] = (char)('a' + (i + j) % 26);
		c[LEN] = '\0';
		req[i] = (struct reward_request){ .id = 10000 + i, .record = rec, .completion = c };
	}
	struct reward_proc *p = start_script(script("awk.sh",
		"case $(awk -W version 2>&1) in *mawk*) set -- -W interactive;; esac\n"	/* else reads blocks */
		"exec awk \"$@\" 'BEGIN { pad = sprintf(\"%200s\", \"\") }\n"
		"{ printf \"{\\\"id\\\":%s,\\\"reward\\\":%d,\\\"pad\\\":\\\"%s\\\"}\\n\", "
		"substr($0, 7, index($0, \",\") - 7), length($0), pad; fflush() }'\n"), 20.0);

	CU_ASSERT_EQUAL(score(p, req, N, rewards), 0);
	for (int i = 0; i < N; i++) {
		int expect = snprintf(NULL, 0, "{\"id\":%d,\"prompt\":\"p\",\"completion\":\"\"}", 10000 + i) + LEN;

		bad += rewards[i] != expect;
	}
	CU_ASSERT_EQUAL(bad, 0);
	CU_ASSERT_EQUAL(rewards[N - 1], 4096 + 41);
	reward_stop(p);
	free(req);
	free(rewards);
	free(text);
	assert_no_children();
}

/*
 * An answer that comes before its 200 KB request is all out (the program reads 12 bytes, answers, then
 * reads the rest): the call ends with the request written, and the next call starts clean.
 */
static void test_reward_early_answer(void)
{
	enum { LEN = 200000 };
	struct reward_proc *p = start_script(script("early.sh",
		"dd bs=1 count=12 2>/dev/null >/dev/null\nprintf '{\"id\":100,\"reward\":1}\\n'\n"
		"IFS= read -r rest\nwhile IFS= read -r line; do " SH_ID
		"printf '{\"id\":%s,\"reward\":%d}\\n' \"$id\" ${#rest}; done\n"), 5.0);
	char *c = xcalloc(LEN + 1, 1);
	struct reward_request req = { .id = 100, .record = "{\"prompt\":\"p\"}", .completion = c };
	double reward = 0;

	memset(c, 'z', LEN);
	CU_ASSERT_EQUAL(score(p, &req, 1, &reward), 0);
	CU_ASSERT_EQUAL(reward, 1.0);
	req.id = 101;
	req.completion = "short";
	CU_ASSERT_EQUAL(score(p, &req, 1, &reward), 0);
	/* what followed the first 12 bytes: ...rompt":"p","completion":"zzz..."} */
	CU_ASSERT_EQUAL(reward, strlen("rompt\":\"p\",\"completion\":\"\"}") + LEN);
	reward_stop(p);
	free(c);
}

/* 0.15 s per answer with a 0.4 s timeout: the clock restarts at each answer. */
static void test_reward_slow_answers(void)
{
	struct reward_proc *p = start_script(script("slow.sh",
		"while IFS= read -r line; do\nsleep 0.15\n" SH_ID
		"printf '{\"id\":%s,\"reward\":2}\\n' \"$id\"\ndone\n"), 0.4);
	char recs[4][64];
	struct reward_request req[4];
	double rewards[4] = { 0 };

	make_requests(req, recs, 4);
	CU_ASSERT_EQUAL(score(p, req, 4, rewards), 0);
	CU_ASSERT_EQUAL(rewards[3], 2.0);
	reward_stop(p);
}

/* ---- failures --------------------------------------------------------------------------------- */

/* Scores 4 requests (ids 100..103) expecting failure on id `bad_id`, then a second call failing at once. */
static void expect_failure(struct reward_proc *p, int bad_id, const char *what)
{
	char recs[4][64], err[1024] = "", name[64];
	struct reward_request req[4];
	double rewards[4];
	double t0;

	make_requests(req, recs, 4);
	CU_ASSERT_EQUAL(reward_score(p, req, 4, rewards, err, sizeof(err)), -1);
	snprintf(name, sizeof(name), "record id %d (prompt \"Question %d\")", bad_id, bad_id - 100);
	assert_contains(err, name);
	assert_contains(err, what);
	t0 = now_s();
	CU_ASSERT_EQUAL(reward_score(p, req, 4, rewards, err, sizeof(err)), -1);
	CU_ASSERT(now_s() - t0 < 0.1);
	assert_contains(err, "earlier failure");
	assert_contains(err, name);
	reward_stop(p);
	assert_no_children();
}

static void test_reward_exits(void)
{
	expect_failure(start_script(script("exit.sh",
		"for i in 1 2; do IFS= read -r line; " SH_ID "printf '{\"id\":%s,\"reward\":1}\\n' \"$id\"; done\n"
		"exit 3\n"), 5.0), 102, "exited with status 3");
}

static void test_reward_signal(void)
{
	expect_failure(start_script(script("segv.sh",
		"IFS= read -r line; printf '{\"id\":100,\"reward\":1}\\n'\nkill -SEGV $$\n"), 5.0),
		101, "killed by signal 11");
}

static void test_reward_closed_stdout(void)
{
	expect_failure(start_script(script("close.sh",
		"IFS= read -r line; printf '{\"id\":100,\"reward\":1}\\n'\nexec >&-\nexec cat >/dev/null\n"), 5.0),
		101, "closed its stdout");
}

/* A program that closes its stdin while we write 512 KiB: EPIPE, reported, and no SIGPIPE. */
static void test_reward_sigpipe(void)
{
	enum { N = 64, LEN = 8192 };
	struct reward_proc *p = start_script(script("noread.sh", "exec 0<&-\nsleep 0.2\nexit 4\n"), 5.0);
	struct reward_request req[N];
	char *c = xcalloc(LEN + 1, 1), err[1024] = "";
	double rewards[N];
	sigset_t pending, mask;

	memset(c, 'y', LEN);
	for (int i = 0; i < N; i++)
		req[i] = (struct reward_request){ .id = 500 + i, .record = "{\"prompt\":\"big\"}", .completion = c };
	CU_ASSERT_EQUAL(reward_score(p, req, N, rewards, err, sizeof(err)), -1);
	assert_contains(err, "record id 500 (prompt \"big\"): the program exited with status 4");
	sigpending(&pending);
	CU_ASSERT(!sigismember(&pending, SIGPIPE));
	sigprocmask(SIG_SETMASK, NULL, &mask);
	CU_ASSERT(!sigismember(&mask, SIGPIPE));	/* the caller's mask is restored */
	reward_stop(p);
	free(c);
	assert_no_children();
}

static void test_reward_timeout(void)
{
	const char *pidfile = tmp_path("hang.pid");
	char body[256], *pid;
	double t0;

	snprintf(body, sizeof(body),
		 "echo $$ > '%s'\nIFS= read -r line; printf '{\"id\":100,\"reward\":1}\\n'\nexec sleep 30\n", pidfile);
	struct reward_proc *p = start_script(script("hang.sh", body), 0.3);

	t0 = now_s();
	expect_failure(p, 101, "no answer within 0.3 s");
	CU_ASSERT(now_s() - t0 > 0.25);
	CU_ASSERT(now_s() - t0 < 1.0);
	pid = read_file(pidfile);
	CU_ASSERT_PTR_NOT_NULL_FATAL(pid);
	CU_ASSERT(atoi(pid) > 0);
	errno = 0;
	CU_ASSERT_EQUAL(kill(atoi(pid), 0), -1);	/* killed and reaped */
	CU_ASSERT_EQUAL(errno, ESRCH);
	free(pid);
}

static void test_reward_bad_answers(void)
{
	static const struct {
		const char *answer, *expect;
	} bad[] = {
		{ "{\"id\":101,\"reward\":NaN}", "not JSON" },
		{ "hello", "the answer is not JSON: hello" },
		{ "{\"id\":101,\"reward\":1} trailing", "not JSON" },
		{ "[101, 1.0]", "not a JSON object" },
		{ "{\"id\":101}", "no numeric \"reward\"" },
		{ "{\"id\":101,\"reward\":\"1\"}", "no numeric \"reward\"" },
		{ "{\"id\":101,\"reward\":1e999}", "not finite" },
		{ "{\"id\":101,\"reward\":-1e999}", "not finite" },
		{ "{\"id\":999,\"reward\":1}", "wrong id: expected 101, got 999" },
		{ "{\"id\":\"101\",\"reward\":1}", "wrong id: expected 101, got \"101\"" },
		{ "{\"reward\":1}", "no \"id\"" },
	};
	char body[512];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(body, sizeof(body),
			 "IFS= read -r line; printf '{\"id\":100,\"reward\":0.5}\\n'\n"
			 "IFS= read -r line; printf '%%s\\n' '%s'\nexec cat >/dev/null\n", bad[i].answer);
		expect_failure(start_script(script("bad.sh", body), 5.0), 101, bad[i].expect);
	}
}

static void test_reward_long_answer(void)
{
	expect_failure(start_script(script("long.sh",
		"IFS= read -r line; printf '{\"id\":100,\"reward\":1}\\n'\n"
		"head -c 1200000 /dev/zero | tr '\\0' x\nexec cat >/dev/null\n"), 5.0),
		101, "longer than 1048576 bytes");
}

static void test_reward_bad_record(void)
{
	struct reward_proc *p = start_script(script("sleep.sh", "exec sleep 30\n"), 5.0);
	struct reward_request req[2] = {
		{ .id = 41, .record = "{\"prompt\":\"fine\"}", .completion = "x" },
		{ .id = 42, .record = "{\"answer\":1}", .completion = "x" },
	};
	char err[512] = "";
	double rewards[2];

	CU_ASSERT_EQUAL(reward_score(p, req, 2, rewards, err, sizeof(err)), -1);
	assert_contains(err, "record id 42");
	assert_contains(err, "not a JSON object with a string \"prompt\"");
	reward_stop(p);
	assert_no_children();
}

/* A script whose #! interpreter is missing: exec fails after the PATH lookup succeeded. */
static void interp_case(void)
{
	const char *path = tmp_path("bad-interp.sh");
	char *argv[] = { (char *)path };
	char recs[1][64], err[512] = "";
	struct reward_request req[1];
	double rewards[1];
	struct reward_proc *p;

	write_file(path, "#!/nonexistent/moe-interpreter\nexit 0\n", 0755);
	p = reward_start(argv, 1, 1.0, err, sizeof(err));
	if (!p) {	/* glibc, musl */
		assert_contains(err, "cannot start it: No such file");
		return;
	}
	make_requests(req, recs, 1);	/* elsewhere (valgrind): at the first request */
	CU_ASSERT_EQUAL(reward_score(p, req, 1, rewards, err, sizeof(err)), -1);
	assert_contains(err, "record id 100");
	assert_contains(err, "the program exited with status");	/* 127 from a C library */
	reward_stop(p);
}

static void test_reward_cannot_start(void)
{
	char *missing[] = { "moe-no-such-reward-program", "x" };
	const char *path = tmp_path("not-executable.sh");
	char *plain[] = { (char *)path };
	char err[512] = "";

	CU_ASSERT_PTR_NULL(reward_start(missing, 2, 1.0, err, sizeof(err)));
	assert_contains(err, "'moe-no-such-reward-program x'");
	assert_contains(err, "No such file");
	write_file(path, "#!/bin/sh\nexit 0\n", 0644);
	CU_ASSERT_PTR_NULL(reward_start(plain, 1, 1.0, err, sizeof(err)));
	assert_contains(err, path);
	assert_contains(err, "Permission denied");
	interp_case();
	CU_ASSERT_PTR_NULL(reward_start(missing, 0, 1.0, err, sizeof(err)));
	assert_contains(err, "empty");
	CU_ASSERT_EQUAL(reward_score(NULL, NULL, 0, NULL, err, sizeof(err)), -1);
	reward_stop(NULL);
	assert_no_children();
}

/* Whether fd is open in this process and would be inherited by a program it runs. */
static int inheritable(int fd)
{
	int flags = fcntl(fd, F_GETFD);

	return flags >= 0 && !(flags & FD_CLOEXEC);
}

/*
 * No descriptor of ours reaches a program: the second one sees its stdin, stdout, stderr and what this
 * process had open without close-on-exec before (the test's environment), and ls its directory; and
 * stopping the first is quick (the second does not hold the first's stdin open).
 */
static void test_reward_no_fd_leak(void)
{
	const char *mark = tmp_path("first.done"), *fds = tmp_path("second.fds");
	char body[256], *list, *line, *save = NULL;
	int before[1024], extra = 0;
	double t0;

	for (int fd = 0; fd < 1024; fd++)
		before[fd] = inheritable(fd);
	snprintf(body, sizeof(body), "cat >/dev/null\necho done > '%s'\n", mark);
	struct reward_proc *a = start_script(script("first.sh", body), 5.0);

	snprintf(body, sizeof(body), "ls /proc/self/fd > '%s.tmp'; mv '%s.tmp' '%s'\nexec cat >/dev/null\n", fds,
		 fds, fds);
	struct reward_proc *b = start_script(script("second.sh", body), 5.0);

	t0 = now_s();
	reward_stop(a);
	CU_ASSERT(now_s() - t0 < 1.0);
	list = read_file(mark);
	CU_ASSERT_PTR_NOT_NULL(list);
	free(list);
	for (int i = 0; i < 200 && access(fds, F_OK); i++)
		nanosleep(&(struct timespec){ 0, 10000000 }, NULL);
	list = read_file(fds);
	CU_ASSERT_PTR_NOT_NULL_FATAL(list);
	CU_ASSERT_EQUAL(strncmp(list, "0\n1\n", 4), 0);
	for (line = strtok_r(list, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		int fd = atoi(line);

		extra += fd > 2 && (fd >= 1024 || !before[fd]);
	}
	CU_ASSERT_EQUAL(extra, 1);	/* the directory ls reads */
	free(list);
	reward_stop(b);
	assert_no_children();
}

/* ---- the example programs --------------------------------------------------------------------- */

static const char *examples_dir(void)
{
	return src_path("rl/rewards");
}

struct example_case {
	const char *completion;
	double reward;
};

static void run_example(const char *interp, const char *file, const char *suffix, const struct example_case *c,
			int n)
{
	char path[1200], err[1024] = "";
	char *argv[] = { (char *)interp, path, (char *)suffix };
	struct reward_request req[16];
	double rewards[16];

	snprintf(path, sizeof(path), "%s/%s", examples_dir(), file);
	struct reward_proc *p = reward_start(argv, suffix ? 3 : 2, 10.0, err, sizeof(err));

	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	for (int i = 0; i < n; i++)
		req[i] = (struct reward_request){ .id = i + 1, .completion = c[i].completion,
			.record = "{\"prompt\":\"Write something\",\"answer\":\"x\"}" };
	CU_ASSERT_EQUAL_FATAL(score(p, req, n, rewards), 0);
	for (int i = 0; i < n; i++) {
		if (rewards[i] != c[i].reward)
			fprintf(stderr, "\n  %s %s, suffix %s: completion \"%s\" got %g\n", interp, file,
				suffix ? suffix : "(default)", c[i].completion, rewards[i]);
		CU_ASSERT_EQUAL(rewards[i], c[i].reward);
	}
	reward_stop(p);
}

static void check_example(const char *interp, const char *file)
{
	static const struct example_case bang[] = {
		{ "Wow!", 1 }, { "Wow", 0 }, { "!", 1 }, { "", 0 }, { "say \"hi!\"", 0 },
		{ "multi\nline!", 1 }, { "\xe6\x97\xa5\xe6\x9c\xac!", 1 }, { "a\\!", 1 }, { "a!\n", 0 },
	};
	static const struct example_case en[] = { { "a\n", 0 }, { "an", 1 }, { "a\\n", 1 }, { "\n", 0 } };
	static const struct example_case quote[] = { { "say \"hi\"", 1 }, { "a\\", 0 }, { "\"", 1 } };

	run_example(interp, file, NULL, bang, 9);
	run_example(interp, file, "!", bang, 9);
	run_example(interp, file, "n", en, 4);
	run_example(interp, file, "\"", quote, 3);
	assert_no_children();
}

static void test_example_sh(void)
{
	check_example("sh", "ends_with.sh");
}

static void test_example_py(void)
{
	if (system("command -v python3 >/dev/null 2>&1") != 0) {
		printf("\n  python3 not found: rl/rewards/ends_with.py not tested\n");
		return;
	}
	check_example("python3", "ends_with.py");
}

/* ---- several programs at once ------------------------------------------------------------------ */

/*
 * A program answering reward = id * mult (awk: one line at a time), sleeping sleep_s seconds at the
 * first request of each batch (ids 100 and 200 start one) and exiting with status 7 on the request of
 * id fail_id (0: never).
 */
static struct reward_proc *start_many(const char *name, double mult, double sleep_s, int fail_id,
				      double timeout_s)
{
	char body[512], file[64];

	snprintf(file, sizeof(file), "%s.sh", name);
	snprintf(body, sizeof(body),
		 "while IFS= read -r line; do\n%s"
		 "case $id in 100|200) sleep %g ;; esac\n"
		 "[ \"$id\" = %d ] && exit 7\n"
		 "printf '{\"id\":%%s,\"reward\":%%s}\\n' \"$id\" \"$(awk \"BEGIN { print $id * %g }\")\"\n"
		 "done\n", SH_ID, sleep_s, fail_id, mult);
	struct reward_proc *p = start_script(script(file, body), timeout_s);
	CU_ASSERT_EQUAL(reward_set_name(p, name), 0);
	return p;
}

/* Batches of n requests with ids base.. (records in recs). */
static void make_batch(struct reward_request *req, char (*recs)[64], int n, int base)
{
	for (int i = 0; i < n; i++) {
		snprintf(recs[i], sizeof(recs[i]), "{\"prompt\":\"Q%d\",\"answer\":%d}", base + i, i);
		req[i] = (struct reward_request){ .id = base + i, .record = recs[i], .completion = "c" };
	}
}

/*
 * Three programs, one slow (1.2 s a batch), two of 0.8 s: every reward lands in its own program's row,
 * and a batch takes about the slowest program's time, not the sum (2.8 s), twice in a row (the programs
 * are kept running).
 */
static void test_many_concurrent(void)
{
	enum { N = 6 };
	struct reward_proc *p[3] = { start_many("slow", 1, 1.2, 0, 10), start_many("twice", 2, 0.8, 0, 10),
				     start_many("neg", -0.5, 0.8, 0, 10) };
	double r[3][N], *rows[3] = { r[0], r[1], r[2] }, mult[3] = { 1, 2, -0.5 };
	char recs[N][64], err[1024] = "";
	struct reward_request req[N];

	for (int b = 1; b <= 2; b++) {
		double t0 = now_s(), el;

		make_batch(req, recs, N, 100 * b);
		CU_ASSERT_EQUAL(reward_score_all(p, 3, req, N, rows, err, sizeof(err)), 0);
		el = now_s() - t0;
		if (err[0])
			fprintf(stderr, "\n  %s\n", err);
		for (int k = 0; k < 3; k++)
			for (int i = 0; i < N; i++)
				CU_ASSERT_DOUBLE_EQUAL(r[k][i], mult[k] * (100 * b + i), 1e-9);
		fprintf(stderr, "[batch %d: 3 programs (1.2 + 0.8 + 0.8 s) in %.2f s] ", b, el);
		CU_ASSERT(el >= 1.2);
		CU_ASSERT(el < 2.2);	/* one after another: >= 2.8 s */
	}
	for (int k = 0; k < 3; k++)
		reward_stop(p[k]);
	assert_no_children();
}

/*
 * One of three programs fails on record 203: the message names it and the record; the others finish
 * their batch and score the next one; the failed one refuses at once.
 */
static void test_many_one_fails(void)
{
	enum { N = 5 };
	struct reward_proc *p[3] = { start_many("ok1", 1, 0, 0, 10), start_many("bad", 1, 0.3, 203, 10),
				     start_many("ok2", 3, 0, 0, 10) };
	double r[3][N], *rows[3] = { r[0], r[1], r[2] };
	char recs[N][64], err[1024] = "";
	struct reward_request req[N];

	make_batch(req, recs, N, 200);
	CU_ASSERT_EQUAL(reward_score_all(p, 3, req, N, rows, err, sizeof(err)), -1);
	assert_contains(err, "reward 'bad' (");
	assert_contains(err, "record id 203 (prompt \"Q203\"): the program exited with status 7");
	CU_ASSERT_PTR_NULL(strstr(err, "more"));
	CU_ASSERT_DOUBLE_EQUAL(r[2][4], 3 * 204, 1e-9);	/* the others finished the batch */
	make_batch(req, recs, N, 300);
	struct reward_proc *ok[2] = { p[0], p[2] };
	double *ok_rows[2] = { r[0], r[2] };
	CU_ASSERT_EQUAL(reward_score_all(ok, 2, req, N, ok_rows, err, sizeof(err)), 0);
	CU_ASSERT_DOUBLE_EQUAL(r[0][1], 301, 1e-9);
	CU_ASSERT_EQUAL(reward_score_all(p, 3, req, N, rows, err, sizeof(err)), -1);
	assert_contains(err, "earlier failure: reward 'bad'");
	for (int k = 0; k < 3; k++)
		reward_stop(p[k]);
	assert_no_children();
}

/* Each program's own timeout: the hanging one (0.4 s) fails, the patient one (5 s, 1 s late) passes. */
static void test_many_timeouts(void)
{
	enum { N = 3 };
	struct reward_proc *p[2] = { start_many("patient", 1, 1.0, 0, 5), start_many("hasty", 1, 1.0, 0, 0.4) };
	double r[2][N], *rows[2] = { r[0], r[1] };
	char recs[N][64], err[1024] = "";
	struct reward_request req[N];

	make_batch(req, recs, N, 100);
	CU_ASSERT_EQUAL(reward_score_all(p, 2, req, N, rows, err, sizeof(err)), -1);
	assert_contains(err, "reward 'hasty' (");
	assert_contains(err, "record id 100 (prompt \"Q100\"): no answer within 0.4 s");
	CU_ASSERT_DOUBLE_EQUAL(r[0][2], 102, 1e-9);
	reward_stop(p[0]);
	reward_stop(p[1]);
	assert_no_children();
}

/* Two programs failing in one batch: the first is named, the count of the others given. */
static void test_many_two_fail(void)
{
	enum { N = 4 };
	struct reward_proc *p[2] = { start_many("a", 1, 0, 101, 5), start_many("b", 1, 0.2, 102, 5) };
	double r[2][N], *rows[2] = { r[0], r[1] };
	char recs[N][64], err[1024] = "";
	struct reward_request req[N];

	make_batch(req, recs, N, 100);
	CU_ASSERT_EQUAL(reward_score_all(p, 2, req, N, rows, err, sizeof(err)), -1);
	assert_contains(err, "reward 'a' (");
	assert_contains(err, "record id 101");
	assert_contains(err, "(and 1 more reward program failed)");
	reward_stop(p[0]);
	reward_stop(p[1]);
	assert_no_children();
}

void register_tests(void)
{
	static const struct test_case prompts[] = {
		{ "good file: records kept as written", test_prompts_good },
		{ "a 300 KB line", test_prompts_long_line },
		{ "bad lines name FILE:LINE", test_prompts_errors },
		{ "empty or missing file", test_prompts_empty },
		{ NULL, NULL },
	};
	static const struct test_case reward[] = {
		{ "started once, kept across calls", test_reward_kept_running },
		{ "request lines exactly", test_reward_request_lines },
		{ "2000 x 4 KiB requests", test_reward_large_batch },
		{ "an answer before its request is all out", test_reward_early_answer },
		{ "slow answers within the timeout", test_reward_slow_answers },
		{ "program exits mid-batch", test_reward_exits },
		{ "program killed by a signal", test_reward_signal },
		{ "program closes its stdout", test_reward_closed_stdout },
		{ "program closes its stdin: no SIGPIPE", test_reward_sigpipe },
		{ "program hangs past the timeout", test_reward_timeout },
		{ "bad answers", test_reward_bad_answers },
		{ "an answer longer than 1 MiB", test_reward_long_answer },
		{ "a record without a prompt", test_reward_bad_record },
		{ "commands that cannot start", test_reward_cannot_start },
		{ "no descriptor leaks into programs", test_reward_no_fd_leak },
		{ NULL, NULL },
	};
	static const struct test_case examples[] = {
		{ "rl/rewards/ends_with.sh", test_example_sh },
		{ "rl/rewards/ends_with.py", test_example_py },
		{ NULL, NULL },
	};

	add_suite("prompts", prompts);
	add_suite("reward", reward);
	static const struct test_case many[] = {
		{ "three programs score at once (timed)", test_many_concurrent },
		{ "one fails on a record, the others go on", test_many_one_fails },
		{ "each program's own timeout", test_many_timeouts },
		{ "two fail: the first named, the rest counted", test_many_two_fail },
		{ NULL, NULL },
	};

	add_suite("reward examples", examples);
	add_suite("several reward programs", many);
}
