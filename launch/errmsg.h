/*
 * launch/errmsg.h - the one error-message helper of the tools that report into a caller's buffer
 * (config, checkpoint conversion, safetensors, plots, prompt sets, the reward runner), and the notes
 * of the conversions, the names of JSON types in those messages.
 */
#ifndef MOE_LAUNCH_ERRMSG_H
#define MOE_LAUNCH_ERRMSG_H

#include <stddef.h>
#include <stdio.h>

struct cJSON;

/* Formats the message into err[errlen] (when err is given) and returns -1, for `return set_err(...)`. */
int set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Writes "note: MESSAGE\n" to notes when it is given (a conversion's remarks: keys dropped, defaults
 * filled, tensors skipped). */
void print_note(FILE *notes, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* What a JSON value is, for "expected a number, got string": "null" (also for a missing value),
 * "boolean", "number", "string", "array", "object" or "invalid"; json_type_a() with its article
 * ("a boolean", "an array", ...; "null" stays bare). */
const char *json_type(const struct cJSON *v);
const char *json_type_a(const struct cJSON *v);

#endif
