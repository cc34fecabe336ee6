/* launch/errmsg.c - see errmsg.h */
#include "launch/errmsg.h"

#include <stdarg.h>
#include <stdio.h>

#include <cjson/cJSON.h>

int set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return -1;
}

void print_note(FILE *notes, const char *fmt, ...)
{
	va_list ap;

	if (!notes)
		return;
	fprintf(notes, "note: ");
	va_start(ap, fmt);
	vfprintf(notes, fmt, ap);
	va_end(ap);
	fprintf(notes, "\n");
}

static int json_type_index(const cJSON *v)
{
	if (!v || cJSON_IsNull(v))
		return 0;
	if (cJSON_IsBool(v))
		return 1;
	if (cJSON_IsNumber(v))
		return 2;
	if (cJSON_IsString(v))
		return 3;
	if (cJSON_IsArray(v))
		return 4;
	return cJSON_IsObject(v) ? 5 : 6;
}

const char *json_type(const cJSON *v)
{
	static const char *const words[] = { "null", "boolean", "number", "string", "array", "object",
					     "invalid" };

	return words[json_type_index(v)];
}

const char *json_type_a(const cJSON *v)
{
	static const char *const words[] = { "null", "a boolean", "a number", "a string", "an array",
					     "an object", "invalid" };

	return words[json_type_index(v)];
}
