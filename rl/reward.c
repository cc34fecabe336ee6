/*
 * rl/reward.c - the reward program runner (rl/reward.h, SPEC 4).
 *
 * Start: the command is looked up in PATH first (not found, not executable: caught at start whatever
 * the C library), then posix_spawnp, which also reports a failed exec as its own error (glibc >= 2.24,
 * musl, the BSDs: a bad interpreter line, say).  The pipes are O_CLOEXEC and kept above the
 * standard descriptors; the child gets an empty signal mask, SIGPIPE at its default and a new process
 * group.
 *
 * A batch is one poll() loop over our two non-blocking ends: the request line being written goes out as
 * the program's stdin takes it, the next is formatted once it is out, and answers are read as they come,
 * parsed line by line (cJSON) and checked against the request they must answer.  The clock of the
 * answer awaited starts when its request was written or the previous answer came, whichever is later
 * (while that request is still being written: at the write's last progress).
 *
 * Records are not re-serialised: a small scanner splits the record's text into members, and the prompt
 * and the other fields are copied byte for byte after our id.
 */
#define _GNU_SOURCE		/* pipe2 */

#include "rl/reward.h"
#include "launch/errmsg.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define ANSWER_MAX (1 << 20)	/* the longest answer line accepted */
#define READ_CHUNK 65536
#define STOP_WAIT_MS 2000	/* reward_stop: the grace before SIGKILL */
#define EXIT_WAIT_MS 1000	/* after EOF or EPIPE: time for the program to finish exiting */
#define SNIPPET 48		/* bytes of a prompt or an answer quoted in messages */

struct reward_proc {
	pid_t pid;		/* > 0 while the program is ours to reap */
	int in_fd;		/* our end of its stdin, -1 when closed */
	int out_fd;		/* our end of its stdout, -1 when closed */
	double timeout_s;
	char cmd[256];		/* the command line, for messages */
	char label[256];	/* how messages name it: reward program 'CMD', or reward 'NAME' ('CMD') */
	char *rbuf;		/* bytes read from its stdout and not consumed yet */
	size_t rlen, rcap;
	char *wbuf;		/* the request line being written */
	size_t wlen, woff, wcap;
	char dead[1024];	/* after a failure: the message */
};

struct batch {
	const struct reward_request *req;
	int n;
	double *rewards;
	double *written_at;	/* when request i was completely written */
	int n_built;		/* requests formatted (the last may still be being written) */
	int n_written;		/* requests completely written */
	int n_answered;
	double last_answer;	/* when the last answer came (the batch's start before the first) */
	double last_write;	/* when bytes of a request last went out */
	int bad;		/* on failure: the offending request */
	char what[640];		/* on failure: what went wrong */
};

/* ---- small helpers ---------------------------------------------------------------------------- */



/* Records the failure of request k in the batch; returns -1. */
static int say(struct batch *b, int k, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int say(struct batch *b, int k, const char *fmt, ...)
{
	va_list ap;

	b->bad = k;
	va_start(ap, fmt);
	vsnprintf(b->what, sizeof(b->what), fmt, ap);
	va_end(ap);
	return -1;
}

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* The first SNIPPET bytes of s[0..len), control bytes as '?', "..." when cut (never inside a UTF-8
 * sequence). */
static void snippet(const char *s, size_t len, char *out, size_t outlen)
{
	size_t n = len > SNIPPET ? SNIPPET : len;

	if (n < len)
		while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80)
			n--;
	if (n + 4 > outlen)
		n = outlen > 4 ? outlen - 4 : 0;
	for (size_t i = 0; i < n; i++)
		out[i] = (unsigned char)s[i] < ' ' ? '?' : s[i];
	snprintf(out + n, outlen - n, "%s", n < len ? "..." : "");
}

/* The request whose answer is awaited: the last one once all are answered but its line is not all out. */
static int awaited(const struct batch *b)
{
	return b->n_answered < b->n ? b->n_answered : b->n - 1;
}

/* ---- the record's members --------------------------------------------------------------------- */

struct member {
	const char *key;	/* the key's literal, quotes included */
	size_t key_len;
	const char *val;	/* the value's text */
	size_t val_len;
};

static const char *skip_ws(const char *s)
{
	while (*s && (unsigned char)*s <= ' ')
		s++;
	return s;
}

/* Past the string literal opening at s; NULL when unterminated. */
static const char *skip_string(const char *s)
{
	for (s++; *s && *s != '"'; s++)
		if (*s == '\\' && !*++s)
			return NULL;
	return *s ? s + 1 : NULL;
}

/* Past the JSON value starting at s; NULL when malformed. */
static const char *skip_value(const char *s)
{
	int depth = 0;

	do {
		if (*s == '"') {
			s = skip_string(s);
			if (!s)
				return NULL;
			continue;
		}
		if (*s == '{' || *s == '[') {
			depth++;
		} else if (*s == '}' || *s == ']') {
			depth--;
		} else if (!*s) {
			return NULL;
		} else if (depth == 0) {	/* a number, true, false, null */
			while (*s && !strchr(",}] \t\r\n", *s))
				s++;
			return s;
		}
		s++;
	} while (depth > 0);
	return depth < 0 ? NULL : s;
}

/*
 * Reads the member at *s (just after the object's '{' or a ','): 1 with m filled and *s past it and its
 * comma, 0 at the closing brace, -1 when malformed.
 */
static int next_member(const char **s, struct member *m)
{
	const char *p = skip_ws(*s);

	if (*p == '}')
		return 0;
	if (*p != '"')
		return -1;
	m->key = p;
	p = skip_string(p);
	if (!p)
		return -1;
	m->key_len = (size_t)(p - m->key);
	p = skip_ws(p);
	if (*p++ != ':')
		return -1;
	m->val = skip_ws(p);
	p = skip_value(m->val);
	if (!p || p == m->val)
		return -1;
	m->val_len = (size_t)(p - m->val);
	p = skip_ws(p);
	if (*p == ',')
		p++;
	else if (*p != '}')
		return -1;
	*s = p;
	return 1;
}

/* Whether the member's key is name (a key written with escapes is decoded first). */
static int key_is(const struct member *m, const char *name)
{
	size_t n = strlen(name);
	char *lit;
	cJSON *k;
	int eq;

	if (!memchr(m->key, '\\', m->key_len))
		return m->key_len == n + 2 && !memcmp(m->key + 1, name, n);
	lit = strndup(m->key, m->key_len);
	k = lit ? cJSON_Parse(lit) : NULL;
	eq = cJSON_IsString(k) && !strcmp(k->valuestring, name);
	cJSON_Delete(k);
	free(lit);
	return eq;
}

static int is_ours(const struct member *m)
{
	return key_is(m, "id") || key_is(m, "prompt") || key_is(m, "completion");
}

/* Checks that rec is a JSON object whose first "prompt" is a string; *prompt receives that member. */
static int scan_record(const char *rec, struct member *prompt)
{
	const char *s = skip_ws(rec);
	struct member m;
	int r, found = 0;

	if (*s++ != '{')
		return -1;
	while ((r = next_member(&s, &m)) == 1)
		if (!found && key_is(&m, "prompt")) {
			*prompt = m;
			found = 1;
		}
	return r == 0 && found && prompt->val[0] == '"' ? 0 : -1;
}

/* ---- request lines ---------------------------------------------------------------------------- */

static char *put(char *o, const char *s, size_t n)
{
	memcpy(o, s, n);
	return o + n;
}

/* Length of the valid UTF-8 sequence of two to four bytes at u, 0 when there is none. */
static int utf8_len(const unsigned char *u)
{
	unsigned lo = 0x80, hi = 0xbf;
	int n;

	if (u[0] >= 0xc2 && u[0] <= 0xdf) {
		n = 2;
	} else if (u[0] >= 0xe0 && u[0] <= 0xef) {
		n = 3;
		lo = u[0] == 0xe0 ? 0xa0 : lo;	/* no overlong forms */
		hi = u[0] == 0xed ? 0x9f : hi;	/* no surrogates */
	} else if (u[0] >= 0xf0 && u[0] <= 0xf4) {
		n = 4;
		lo = u[0] == 0xf0 ? 0x90 : lo;
		hi = u[0] == 0xf4 ? 0x8f : hi;	/* nothing past U+10FFFF */
	} else {
		return 0;
	}
	if (u[1] < lo || u[1] > hi)
		return 0;
	for (int i = 2; i < n; i++)
		if ((u[i] & 0xc0) != 0x80)
			return 0;
	return n;
}

static char *put_control(char *o, unsigned c)
{
	static const char hex[] = "0123456789abcdef";
	static const char shorts[] = "\bb\ff\nn\rr\tt";
	const char *e = strchr(shorts, (int)c);

	*o++ = '\\';
	if (e && (e - shorts) % 2 == 0) {
		*o++ = e[1];
		return o;
	}
	o = put(o, "u00", 3);
	*o++ = hex[c >> 4];
	*o++ = hex[c & 15];
	return o;
}

/* s as the inside of a JSON string literal (at most 6 bytes per byte of s). */
static char *put_escaped(char *o, const char *s)
{
	const unsigned char *u = (const unsigned char *)s;

	while (*u) {
		int n = *u < 0x80 ? 1 : utf8_len(u);

		if (*u == '"' || *u == '\\') {
			*o++ = '\\';
			*o++ = (char)*u;
		} else if (*u < 0x20) {
			o = put_control(o, *u);
		} else if (n) {
			o = put(o, (const char *)u, (size_t)n);
		} else {
			o = put(o, "\\ufffd", 6);
			n = 1;
		}
		u += n ? n : 1;
	}
	return o;
}

char *reward_json_string(const char *s)
{
	char *lit = malloc(6 * strlen(s) + 3), *o = lit;
	if (!lit)
		return NULL;
	*o++ = '"';
	o = put_escaped(o, s);
	*o++ = '"';
	*o = 0;
	return lit;
}

/* ,"key":value for each member of the (scanned) record that is not ours. */
static char *put_others(char *o, const char *rec)
{
	const char *s = skip_ws(rec) + 1;
	struct member m;

	while (next_member(&s, &m) == 1) {
		if (is_ours(&m))
			continue;
		*o++ = ',';
		o = put(o, m.key, m.key_len);
		*o++ = ':';
		o = put(o, m.val, m.val_len);
	}
	return o;
}

/* Formats the next request into the write buffer. */
static int build_request(struct reward_proc *p, struct batch *b)
{
	const struct reward_request *r = &b->req[b->n_built];
	struct member pr = { 0 };
	size_t need;
	char *o;

	if (!r->record || !r->completion)
		return say(b, b->n_built, "the request has no %s", r->record ? "completion" : "record");
	if (scan_record(r->record, &pr))
		return say(b, b->n_built, "the record is not a JSON object with a string \"prompt\"");
	need = strlen(r->record) + 6 * strlen(r->completion) + 64;
	if (need > p->wcap) {
		free(p->wbuf);
		p->wcap = need + need / 2;
		p->wbuf = malloc(p->wcap);
		if (!p->wbuf)
			return say(b, b->n_built, "out of memory (%zu bytes)", p->wcap);
	}
	o = p->wbuf + sprintf(p->wbuf, "{\"id\":%" PRId64 ",\"prompt\":", r->id);
	o = put(o, pr.val, pr.val_len);
	o = put(o, ",\"completion\":\"", 15);
	o = put_escaped(o, r->completion);
	*o++ = '"';
	o = put_others(o, r->record);
	o = put(o, "}\n", 2);
	p->wlen = (size_t)(o - p->wbuf);
	p->woff = 0;
	b->n_built++;
	return 0;
}

/* ---- answers ---------------------------------------------------------------------------------- */

static int id_is(const cJSON *j, int64_t id)
{
	return cJSON_IsNumber(j) && j->valuedouble == (double)id;
}

/* Checks one answer line (NUL-terminated, len bytes); *reward receives its reward. */
static int check_answer(const char *line, size_t len, int64_t id, double *reward, char *what, size_t wl)
{
	const cJSON *jid, *jr;
	char quoted[SNIPPET + 8], *got;
	cJSON *a;
	int rc = -1;

	snippet(line, len, quoted, sizeof(quoted));
	if (strlen(line) != len)
		return set_err(what, wl, "the answer contains a NUL byte: %s", quoted);
	a = cJSON_ParseWithOpts(line, NULL, 1);
	jid = cJSON_GetObjectItemCaseSensitive(a, "id");
	jr = cJSON_GetObjectItemCaseSensitive(a, "reward");
	if (!a) {
		set_err(what, wl, "the answer is not JSON: %s", quoted);
	} else if (!cJSON_IsObject(a)) {
		set_err(what, wl, "the answer is not a JSON object: %s", quoted);
	} else if (!jid) {
		set_err(what, wl, "the answer has no \"id\": %s", quoted);
	} else if (!id_is(jid, id)) {
		got = cJSON_PrintUnformatted(jid);
		snippet(got ? got : "?", got ? strlen(got) : 1, quoted, sizeof(quoted));
		set_err(what, wl, "the answer has the wrong id: expected %" PRId64 ", got %s", id, quoted);
		free(got);
	} else if (!cJSON_IsNumber(jr)) {
		set_err(what, wl, "the answer has no numeric \"reward\": %s", quoted);
	} else if (!isfinite(jr->valuedouble)) {
		set_err(what, wl, "the answer's reward is not finite: %s", quoted);
	} else {
		*reward = jr->valuedouble;
		rc = 0;
	}
	cJSON_Delete(a);
	return rc;
}

/* One line of the program's output (its newline replaced by NUL); blank lines are skipped. */
static int take_line(struct batch *b, char *line, size_t len)
{
	int k = b->n_answered;
	char what[sizeof(b->what)];
	size_t i;

	if (len > ANSWER_MAX)
		return say(b, k, "the answer is longer than %d bytes", ANSWER_MAX);
	if (len && line[len - 1] == '\r')
		line[--len] = '\0';
	for (i = 0; i < len && (unsigned char)line[i] <= ' ' && line[i]; i++)
		;
	if (i == len)
		return 0;
	if (check_answer(line, len, b->req[k].id, &b->rewards[k], what, sizeof(what)))
		return say(b, k, "%s", what);
	b->n_answered++;
	b->last_answer = now_s();
	return 0;
}

/* Consumes the complete lines read so far (up to the batch's last answer). */
static int take_answers(struct reward_proc *p, struct batch *b)
{
	size_t pos = 0;
	char *nl;
	int rc = 0;

	while (!rc && b->n_answered < b->n && (nl = memchr(p->rbuf + pos, '\n', p->rlen - pos))) {
		size_t len = (size_t)(nl - (p->rbuf + pos));

		*nl = '\0';
		rc = take_line(b, p->rbuf + pos, len);
		pos += len + 1;
	}
	memmove(p->rbuf, p->rbuf + pos, p->rlen - pos);
	p->rlen -= pos;
	if (!rc && p->rlen > ANSWER_MAX && !memchr(p->rbuf, '\n', p->rlen))
		rc = say(b, awaited(b), "the answer is longer than %d bytes", ANSWER_MAX);
	return rc;
}

/* ---- the process ------------------------------------------------------------------------------ */

/* Reads and drops what the program writes for up to ms milliseconds (sleeps once its stdout is shut). */
static void drain(struct reward_proc *p, int ms)
{
	struct pollfd f = { .fd = p->out_fd, .events = POLLIN };
	char buf[4096];

	if (p->out_fd < 0) {
		nanosleep(&(struct timespec){ 0, ms * 1000000L }, NULL);
		return;
	}
	if (poll(&f, 1, ms) > 0 && read(p->out_fd, buf, sizeof(buf)) == 0)
		close_fd(&p->out_fd);
}

/* Waits up to ms for the program to end, leaving it to be reaped; 1 with how it ended in why, or 0. */
static int child_ended(struct reward_proc *p, int ms, char *why, size_t len)
{
	double end = now_s() + ms / 1e3;
	siginfo_t si;

	for (;;) {
		memset(&si, 0, sizeof(si));
		if (waitid(P_PID, (id_t)p->pid, &si, WEXITED | WNOHANG | WNOWAIT) < 0 && errno != EINTR) {
			snprintf(why, len, "is gone (%s)", strerror(errno));
			p->pid = -1;	/* reaped by someone else: SIGCHLD ignored */
			return 1;
		}
		if (si.si_pid == p->pid && si.si_code == CLD_EXITED) {
			snprintf(why, len, "exited with status %d", si.si_status);
			return 1;
		}
		if (si.si_pid == p->pid) {
			snprintf(why, len, "was killed by signal %d (%s)", si.si_status, strsignal(si.si_status));
			return 1;
		}
		if (now_s() >= end)
			return 0;
		drain(p, 10);
	}
}

/* Kills the program's group, reaps the program, closes our ends. */
static void proc_kill(struct reward_proc *p)
{
	close_fd(&p->in_fd);
	close_fd(&p->out_fd);
	if (p->pid <= 0)
		return;
	kill(-p->pid, SIGKILL);
	kill(p->pid, SIGKILL);
	while (waitpid(p->pid, NULL, 0) < 0 && errno == EINTR)
		;
	p->pid = -1;
}

/* The program closed its stdin or stdout: say how it ended, if it did. */
static int gone(struct reward_proc *p, struct batch *b, const char *which)
{
	char why[128];

	if (child_ended(p, EXIT_WAIT_MS, why, sizeof(why)))
		return say(b, awaited(b), "the program %s", why);
	return say(b, awaited(b), "the program closed its %s", which);
}

static int write_some(struct reward_proc *p, struct batch *b)
{
	ssize_t w = write(p->in_fd, p->wbuf + p->woff, p->wlen - p->woff);

	if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
		return 0;
	if (w < 0 && errno == EPIPE)
		return gone(p, b, "stdin");
	if (w < 0)
		return say(b, awaited(b), "writing to the program: %s", strerror(errno));
	p->woff += (size_t)w;
	b->last_write = now_s();
	if (p->woff == p->wlen) {
		b->written_at[b->n_built - 1] = b->last_write;
		b->n_written = b->n_built;
	}
	return 0;
}

static int read_some(struct reward_proc *p, struct batch *b)
{
	ssize_t r;

	if (p->rcap - p->rlen < READ_CHUNK) {
		char *nb = realloc(p->rbuf, 2 * p->rcap);

		if (!nb)
			return say(b, awaited(b), "out of memory reading the answers");
		p->rbuf = nb;
		p->rcap *= 2;
	}
	r = read(p->out_fd, p->rbuf + p->rlen, READ_CHUNK);
	if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
		return 0;
	if (r < 0)
		return say(b, awaited(b), "reading from the program: %s", strerror(errno));
	if (r == 0)
		return gone(p, b, "stdout");
	p->rlen += (size_t)r;
	return 0;
}

/* Milliseconds left for the answer awaited: -1 without a timeout, 0 when none is left. */
static int poll_ms(const struct reward_proc *p, const struct batch *b)
{
	int k = b->n_answered;
	double from = b->last_answer, left;

	if (p->timeout_s <= 0)
		return -1;
	if (k < b->n_written)
		from = fmax(from, b->written_at[k]);
	else
		from = fmax(from, b->last_write);	/* its request is still being written */
	left = from + p->timeout_s - now_s();
	if (left <= 0)
		return 0;
	return left > 3600 ? 3600000 : (int)ceil(left * 1e3);
}

/*
 * One program's batch within reward_score_all: the program, its batch and, once it is over, how it
 * ended (rc 0: every answer in; -1: failed, b.bad and b.what say why).
 */
struct job {
	struct reward_proc *p;
	struct batch b;
	int done, rc;
	int ms;			/* this wait's poll timeout for the job (poll_ms) */
	struct pollfd *f;	/* its two entries of the poll set */
};

/* Consumes the answers in and formats the next request when the last is out; 1 when the job is over. */
static int job_advance(struct job *j)
{
	struct reward_proc *p = j->p;
	struct batch *b = &j->b;

	if (take_answers(p, b))
		goto failed;
	if (b->n_answered == b->n && p->woff == p->wlen) {
		j->done = 1;	/* (an answer may come before its request is all out) */
		return 1;
	}
	if (p->woff == p->wlen && b->n_built < b->n && build_request(p, b))
		goto failed;
	return 0;
failed:
	j->done = 1;
	j->rc = -1;
	return 1;
}

/* What the wait found for the job: writes, reads, or its timeout (ms was 0: that was the last look). */
static void job_after_wait(struct job *j)
{
	struct reward_proc *p = j->p;
	struct batch *b = &j->b;
	int rc = 0;

	if (!j->f[0].revents && !j->f[1].revents) {
		if (j->ms == 0)
			rc = say(b, awaited(b), "%s %g s; the program was killed", b->n_answered < b->n ?
				 "no answer within" : "the program stopped reading its stdin for", p->timeout_s);
	} else {
		if (j->f[0].revents)
			rc = write_some(p, b);
		if (!rc && j->f[1].revents)
			rc = read_some(p, b);
	}
	if (rc) {
		j->done = 1;
		j->rc = -1;
	}
}

/*
 * The batches of all the jobs in one poll() loop over every program's pipes: each wait lasts until some
 * pipe is ready or the nearest of the jobs' deadlines, so the programs work at the same time and the
 * batch takes as long as the slowest of them.
 */
static void run_jobs(struct job *jobs, int nj, struct pollfd *f)
{
	for (;;) {
		int active = 0, ms = -1, r;

		for (int i = 0; i < nj; i++) {
			struct job *j = &jobs[i];

			j->f = f + 2 * i;
			j->f[0] = (struct pollfd){ .fd = -1 };
			j->f[1] = (struct pollfd){ .fd = -1 };
			if (j->done || job_advance(j))
				continue;
			j->f[0] = (struct pollfd){ .fd = j->p->woff < j->p->wlen ? j->p->in_fd : -1,
						   .events = POLLOUT };
			j->f[1] = (struct pollfd){ .fd = j->p->out_fd, .events = POLLIN };
			j->ms = poll_ms(j->p, &j->b);
			if (j->ms >= 0 && (ms < 0 || j->ms < ms))
				ms = j->ms;
			active++;
		}
		if (!active)
			return;
		r = poll(f, (nfds_t)(2 * nj), ms);	/* ms == 0: a last look before giving up */
		if (r < 0 && errno == EINTR)
			continue;
		for (int i = 0; i < nj; i++) {
			struct job *j = &jobs[i];

			if (j->done)
				continue;
			if (r < 0) {
				say(&j->b, awaited(&j->b), "poll: %s", strerror(errno));
				j->done = 1;
				j->rc = -1;
				continue;
			}
			job_after_wait(j);
		}
	}
}

/* ---- SIGPIPE: blocked in this thread while we write, and one raised by our writes consumed ---------- */

struct sigpipe_guard {
	sigset_t old;
	int was_pending;
};

static void sigpipe_block(struct sigpipe_guard *g)
{
	sigset_t set, pending;

	sigemptyset(&set);
	sigaddset(&set, SIGPIPE);
	sigpending(&pending);
	g->was_pending = sigismember(&pending, SIGPIPE);
	pthread_sigmask(SIG_BLOCK, &set, &g->old);
}

static void sigpipe_restore(const struct sigpipe_guard *g)
{
	struct timespec zero = { 0, 0 };
	sigset_t set, pending;

	sigemptyset(&set);
	sigaddset(&set, SIGPIPE);
	sigpending(&pending);
	if (!g->was_pending && sigismember(&pending, SIGPIPE))
		sigtimedwait(&set, NULL, &zero);
	pthread_sigmask(SIG_SETMASK, &g->old, NULL);
}

/* ---- the API ------------------------------------------------------------------------------------- */

/* The job's failure as p->dead (the program named, the record and what went wrong); kills the program. */
static void job_failed(struct job *j, const struct reward_request *req)
{
	struct reward_proc *p = j->p;
	const struct batch *b = &j->b;
	char prompt[SNIPPET + 8] = "(none)";
	struct member pr = { 0 };

	if (req[b->bad].record && !scan_record(req[b->bad].record, &pr))
		snippet(pr.val, pr.val_len, prompt, sizeof(prompt));
	snprintf(p->dead, sizeof(p->dead), "%s: record id %" PRId64 " (prompt %s): %s", p->label,
		 req[b->bad].id, prompt, b->what);
	proc_kill(p);
}

/* Checks the programs before a batch; -1 with err when one is missing or dead. */
static int check_procs(struct reward_proc *const *p, int np, char *err, size_t errlen)
{
	for (int k = 0; k < np; k++) {
		if (!p[k])
			return set_err(err, errlen, "reward program: not started");
		if (p[k]->dead[0])
			return set_err(err, errlen, "reward program stopped after an earlier failure: %s",
				       p[k]->dead);
	}
	return 0;
}

int reward_score_all(struct reward_proc *const *p, int np, const struct reward_request *req, int n,
		     double *const *rewards, char *err, size_t errlen)
{
	struct job *jobs;
	struct pollfd *f;
	double *written;
	struct sigpipe_guard g;
	int rc = 0, failed = 0;

	if (check_procs(p, np, err, errlen))
		return -1;
	if (n <= 0 || np <= 0)
		return 0;
	jobs = calloc((size_t)np, sizeof(*jobs));
	f = calloc((size_t)np * 2, sizeof(*f));
	written = calloc((size_t)np * n, sizeof(*written));
	if (!jobs || !f || !written) {
		rc = set_err(err, errlen, "%s: out of memory for %d requests", p[0]->label, n);
		goto out;
	}
	for (int k = 0; k < np; k++) {
		jobs[k].p = p[k];
		jobs[k].b = (struct batch){ .req = req, .n = n, .rewards = rewards[k],
					    .written_at = written + (size_t)k * n };
		jobs[k].b.last_answer = jobs[k].b.last_write = now_s();
	}
	sigpipe_block(&g);
	run_jobs(jobs, np, f);
	sigpipe_restore(&g);
	for (int k = 0; k < np; k++) {
		if (!jobs[k].rc)
			continue;
		job_failed(&jobs[k], req);
		if (!failed++)
			rc = set_err(err, errlen, "%s", p[k]->dead);
	}
	if (failed > 1 && strlen(err) + 64 < errlen)
		snprintf(err + strlen(err), errlen - strlen(err), " (and %d more reward program%s failed)",
			 failed - 1, failed > 2 ? "s" : "");
out:
	free(written);
	free(f);
	free(jobs);
	return rc;
}

int reward_score(struct reward_proc *p, const struct reward_request *req, int n, double *rewards, char *err,
		 size_t errlen)
{
	return reward_score_all(&p, 1, req, n, &rewards, err, errlen);
}

int reward_set_name(struct reward_proc *p, const char *name)
{
	if (!p || !name || !name[0])
		return -1;
	snprintf(p->label, sizeof(p->label), "reward '%.64s' ('%.160s')", name, p->cmd);
	return 0;
}

/* The command line, for messages. */
static void describe(char *out, size_t len, char *const *argv, int argc)
{
	size_t at = 0;

	out[0] = '\0';
	for (int i = 0; i < argc && argv[i] && at + 1 < len; i++)
		at += (size_t)snprintf(out + at, len - at, "%s%s", i ? " " : "", argv[i]);
	if (at >= len && len > 4)
		strcpy(out + len - 4, "...");
}

/* A close-on-exec pipe whose ends are above the standard descriptors. */
static int make_pipe(int fd[2])
{
	if (pipe2(fd, O_CLOEXEC))
		return -1;
	for (int i = 0; i < 2; i++) {
		if (fd[i] > 2)
			continue;
		int high = fcntl(fd[i], F_DUPFD_CLOEXEC, 3);

		close(fd[i]);
		fd[i] = high;
	}
	if (fd[0] >= 0 && fd[1] >= 0)
		return 0;
	close_fd(&fd[0]);
	close_fd(&fd[1]);
	return -1;
}

/* 0 when file is an executable file, else why not (an errno value). */
static int can_exec(const char *file)
{
	struct stat st;

	if (stat(file, &st))
		return errno;
	if (S_ISDIR(st.st_mode))
		return EACCES;
	return access(file, X_OK) ? errno : 0;
}

/*
 * What exec would say of name, looked up in PATH as execvp does: 0 when an executable file is found.
 * posix_spawnp reports exec failures itself, but only where the child shares our memory until exec
 * (not under valgrind, say); this check keeps "not found" and "not executable" at start everywhere.
 */
static int find_program(const char *name)
{
	const char *dir = getenv("PATH"), *end;
	char file[4096];
	int denied = 0, e;

	if (strchr(name, '/'))
		return can_exec(name);
	for (dir = dir ? dir : "/bin:/usr/bin";; dir = end + 1) {
		end = strchr(dir, ':');
		if (!end)
			end = dir + strlen(dir);
		/* an empty entry is the current directory */
		if (snprintf(file, sizeof(file), "%.*s%s%s", (int)(end - dir), dir, end > dir ? "/" : "", name) <
		    (int)sizeof(file)) {
			e = can_exec(file);
			if (!e)
				return 0;
			denied |= e == EACCES;
		}
		if (!*end)
			return denied ? EACCES : ENOENT;
	}
}

/* Spawns the program with in_r as its stdin and out_w as its stdout; 0 or an errno value. */
static int spawn(struct reward_proc *p, char *const *argv, int argc, int in_r, int out_w)
{
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t at;
	sigset_t none, dflt;
	char **args = calloc((size_t)argc + 1, sizeof(*args));
	int rc;

	if (!args)
		return ENOMEM;
	rc = find_program(argv[0]);
	if (rc) {
		free(args);
		return rc;
	}
	memcpy(args, argv, (size_t)argc * sizeof(*args));
	sigemptyset(&none);
	sigemptyset(&dflt);
	sigaddset(&dflt, SIGPIPE);
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_adddup2(&fa, in_r, STDIN_FILENO);
	posix_spawn_file_actions_adddup2(&fa, out_w, STDOUT_FILENO);
	posix_spawnattr_init(&at);
	posix_spawnattr_setsigmask(&at, &none);
	posix_spawnattr_setsigdefault(&at, &dflt);
	posix_spawnattr_setpgroup(&at, 0);
	posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);
	rc = posix_spawnp(&p->pid, args[0], &fa, &at, args, environ);
	if (rc)
		p->pid = -1;
	posix_spawnattr_destroy(&at);
	posix_spawn_file_actions_destroy(&fa);
	free(args);
	return rc;
}

/* Creates the pipes and starts the program; our ends are left non-blocking in p. */
static int start(struct reward_proc *p, char *const *argv, int argc, char *err, size_t errlen)
{
	int in[2] = { -1, -1 }, out[2] = { -1, -1 }, rc;

	if (make_pipe(in) || make_pipe(out)) {
		rc = errno;
		close_fd(&in[0]);
		close_fd(&in[1]);
		return set_err(err, errlen, "reward program '%s': cannot create pipes: %s", p->cmd,
			       strerror(rc));
	}
	rc = spawn(p, argv, argc, in[0], out[1]);
	close_fd(&in[0]);
	close_fd(&out[1]);
	p->in_fd = in[1];
	p->out_fd = out[0];
	if (rc)
		return set_err(err, errlen, "reward program '%s': cannot start it: %s", p->cmd, strerror(rc));
	fcntl(p->in_fd, F_SETFL, fcntl(p->in_fd, F_GETFL) | O_NONBLOCK);
	fcntl(p->out_fd, F_SETFL, fcntl(p->out_fd, F_GETFL) | O_NONBLOCK);
	return 0;
}

struct reward_proc *reward_start(char *const *argv, int argc, double timeout_s, char *err, size_t errlen)
{
	struct reward_proc *p;

	if (!argv || argc < 1 || !argv[0] || !argv[0][0]) {
		set_err(err, errlen, "reward program: the command is empty");
		return NULL;
	}
	p = calloc(1, sizeof(*p));
	if (!p) {
		set_err(err, errlen, "reward program '%s': out of memory", argv[0]);
		return NULL;
	}
	p->pid = -1;
	p->in_fd = p->out_fd = -1;
	p->timeout_s = timeout_s;
	describe(p->cmd, sizeof(p->cmd), argv, argc);
	snprintf(p->label, sizeof(p->label), "reward program '%.200s'", p->cmd);
	p->rcap = READ_CHUNK;
	p->rbuf = malloc(p->rcap);
	if (!p->rbuf)
		set_err(err, errlen, "reward program '%s': out of memory", p->cmd);
	if (!p->rbuf || start(p, argv, argc, err, errlen)) {
		reward_stop(p);
		return NULL;
	}
	return p;
}

void reward_stop(struct reward_proc *p)
{
	char why[128];

	if (!p)
		return;
	close_fd(&p->in_fd);
	if (p->pid > 0)
		child_ended(p, STOP_WAIT_MS, why, sizeof(why));
	proc_kill(p);
	free(p->rbuf);
	free(p->wbuf);
	free(p);
}
