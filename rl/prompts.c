/*
 * rl/prompts.c - reading GRPO prompt sets (JSON Lines, SPEC 3).
 *
 * Each line is validated with cJSON (an object, a non-empty string "prompt"); what is kept of it is the
 * decoded prompt and the line's own text made compact (whitespace outside strings dropped), never a
 * re-serialisation: a number such as 12345678901234567890 or 1.50 reaches the reward program as written.
 */
#define _POSIX_C_SOURCE 200809L

#include "rl/prompts.h"
#include "launch/errmsg.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>



/* cJSON counts every byte up to the space as whitespace; so does the compaction. */
static int is_blank_byte(char c)
{
	return (unsigned char)c <= ' ';
}

static int is_blank_line(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (!is_blank_byte(s[i]))
			return 0;
	return 1;
}

/* The JSON text s[0..len) without the whitespace outside strings; every other byte kept. */
static char *json_compact(const char *s, size_t len)
{
	char *out = malloc(len + 1), *o = out;
	int in_str = 0, esc = 0;

	if (!out)
		return NULL;
	for (size_t i = 0; i < len; i++) {
		char c = s[i];

		if (in_str) {
			*o++ = c;
			if (esc)
				esc = 0;
			else if (c == '\\')
				esc = 1;
			else if (c == '"')
				in_str = 0;
		} else if (!is_blank_byte(c)) {
			*o++ = c;
			in_str = c == '"';
		}
	}
	*o = '\0';
	return out;
}

static int grow(struct prompt_set *ps, int *cap)
{
	int ncap = *cap ? 2 * *cap : 64;
	char **t = realloc(ps->text, ncap * sizeof(*t));

	if (t)
		ps->text = t;
	char **r = realloc(ps->record, ncap * sizeof(*r));

	if (r)
		ps->record = r;
	int *l = realloc(ps->line, ncap * sizeof(*l));

	if (l)
		ps->line = l;
	if (!t || !r || !l)
		return -1;
	*cap = ncap;
	return 0;
}

/* The prompt of a parsed line, or NULL with err set ("FILE:LINE: ..."). */
static const char *line_prompt(const cJSON *obj, const char *where, char *err, size_t errlen)
{
	const cJSON *p;

	if (!cJSON_IsObject(obj)) {
		set_err(err, errlen, "%s: not a JSON object", where);
		return NULL;
	}
	p = cJSON_GetObjectItemCaseSensitive(obj, "prompt");
	if (!p)
		set_err(err, errlen, "%s: no \"prompt\" field", where);
	else if (!cJSON_IsString(p) || !p->valuestring)
		set_err(err, errlen, "%s: \"prompt\" is not a string", where);
	else if (!p->valuestring[0])
		set_err(err, errlen, "%s: \"prompt\" is empty", where);
	else
		return p->valuestring;
	return NULL;
}

/* Appends a validated line (its prompt and its text) to the set. */
static int append(struct prompt_set *ps, int *cap, const char *prompt, const char *s, size_t len,
		  int lineno)
{
	if (ps->n == *cap && grow(ps, cap))
		return -1;
	ps->text[ps->n] = strdup(prompt);
	ps->record[ps->n] = json_compact(s, len);
	ps->line[ps->n] = lineno;
	ps->n++;
	return ps->text[ps->n - 1] && ps->record[ps->n - 1] ? 0 : -1;
}

/* Validates line s[0..len) (no newline) and appends it to the set. */
static int add_line(struct prompt_set *ps, int *cap, char *s, size_t len, int lineno, char *err,
		    size_t errlen)
{
	char where[4200];
	const char *end = NULL, *prompt;
	cJSON *obj;
	int rc = -1;

	snprintf(where, sizeof(where), "%s:%d", ps->path, lineno);
	if (strlen(s) != len)
		return set_err(err, errlen, "%s: the line contains a NUL byte", where);
	/* cJSON would skip a byte order mark at the start of any line; only the file's first is one */
	if (len >= 3 && !memcmp(s, "\xEF\xBB\xBF", 3))
		return set_err(err, errlen, "%s: a byte order mark inside the file", where);
	obj = cJSON_ParseWithOpts(s, &end, 1);
	if (!obj)
		return set_err(err, errlen, "%s: not valid JSON (at column %td)", where,
			       end && end >= s ? end - s + 1 : (ptrdiff_t)1);
	prompt = line_prompt(obj, where, err, errlen);
	if (prompt)
		rc = append(ps, cap, prompt, s, len, lineno) ?
			set_err(err, errlen, "%s: out of memory", where) : 0;
	cJSON_Delete(obj);
	return rc;
}

/* Reads every line of f into the set. */
static int read_lines(struct prompt_set *ps, FILE *f, char *err, size_t errlen)
{
	char *buf = NULL;
	size_t bufcap = 0;
	ssize_t got;
	int cap = 0, lineno = 0, rc = 0;

	while (!rc && (got = getline(&buf, &bufcap, f)) >= 0) {
		char *s = buf;
		size_t len = (size_t)got;

		lineno++;
		while (len && (s[len - 1] == '\n' || s[len - 1] == '\r'))
			s[--len] = '\0';
		if (lineno == 1 && len >= 3 && !memcmp(s, "\xEF\xBB\xBF", 3)) {
			s += 3;		/* a UTF-8 byte order mark */
			len -= 3;
		}
		if (!is_blank_line(s, len))
			rc = add_line(ps, &cap, s, len, lineno, err, errlen);
	}
	if (!rc && ferror(f))
		rc = set_err(err, errlen, "%s: read error after line %d: %s", ps->path, lineno,
			     strerror(errno));
	free(buf);
	return rc;
}

int prompt_set_load(struct prompt_set *ps, const char *path, char *err, size_t errlen)
{
	FILE *f;
	int rc;

	memset(ps, 0, sizeof(*ps));
	snprintf(ps->path, sizeof(ps->path), "%s", path);
	f = fopen(path, "re");
	if (!f)
		return set_err(err, errlen, "%s: %s", path, strerror(errno));
	rc = read_lines(ps, f, err, errlen);
	fclose(f);
	if (!rc && ps->n == 0)
		rc = set_err(err, errlen, "%s: no prompts (the file is empty)", path);
	if (rc)
		prompt_set_free(ps);
	return rc;
}

void prompt_set_free(struct prompt_set *ps)
{
	if (!ps)
		return;
	for (int i = 0; i < ps->n; i++) {
		free(ps->text[i]);
		free(ps->record[i]);
	}
	free(ps->text);
	free(ps->record);
	free(ps->line);
	ps->n = 0;
	ps->text = NULL;
	ps->record = NULL;
	ps->line = NULL;
}
