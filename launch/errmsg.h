/*
 * launch/errmsg.h - the one error-message helper of the tools that report into a caller's buffer
 * (config, checkpoint conversion, safetensors, plots, prompt sets, the reward runner), and the notes
 * of the conversions.
 */
#ifndef MOE_LAUNCH_ERRMSG_H
#define MOE_LAUNCH_ERRMSG_H

#include <stddef.h>
#include <stdio.h>

/* Formats the message into err[errlen] (when err is given) and returns -1, for `return set_err(...)`. */
int set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Writes "note: MESSAGE\n" to notes when it is given (a conversion's remarks: keys dropped, defaults
 * filled, tensors skipped). */
void print_note(FILE *notes, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
