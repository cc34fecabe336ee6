/* launch/errmsg.c - see errmsg.h */
#include "launch/errmsg.h"

#include <stdarg.h>
#include <stdio.h>

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
