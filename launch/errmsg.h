/*
 * launch/errmsg.h - the one error-message helper of the tools that report into a caller's buffer
 * (config, checkpoint conversion, safetensors, plots, prompt sets, the reward runner).
 */
#ifndef MOE_LAUNCH_ERRMSG_H
#define MOE_LAUNCH_ERRMSG_H

#include <stddef.h>

/* Formats the message into err[errlen] (when err is given) and returns -1, for `return set_err(...)`. */
int set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
