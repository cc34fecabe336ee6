/*
 * train/convert_files.c - the output side of the conversions (train/convert.h): a conversion's
 * directory made and checked to hold no weights yet, and text files (config.json, the index, PEFT's
 * adapter_config.json) written whole or not at all.  Shared by the Hugging Face export (convert.c) and
 * the PEFT export (convert_peft.c).
 */
#include "train/convert.h"

#include <errno.h>
#include <glob.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "launch/errmsg.h"

#define PATH_LEN 4096

/* PATH.tmp, fsync'd, renamed to PATH. */
int convert_write_text(const char *path, const char *text, char *err, size_t errlen)
{
	char tmp[PATH_LEN + 8];
	size_t n = strlen(text);
	FILE *f;
	int bad;

	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "wb");
	if (!f)
		return set_err(err, errlen, "%s: %s", tmp, strerror(errno));
	bad = fwrite(text, 1, n, f) != n || fputc('\n', f) == EOF || fflush(f) || fsync(fileno(f));
	bad |= fclose(f) != 0;
	if (bad || rename(tmp, path)) {
		set_err(err, errlen, "%s: write error: %s", path, strerror(errno));
		unlink(tmp);
		return -1;
	}
	return 0;
}

int convert_mkdir_p(const char *dir, char *err, size_t errlen)
{
	char buf[PATH_LEN];
	struct stat sb;

	if (!dir[0] || strlen(dir) >= sizeof(buf))
		return set_err(err, errlen, "output directory \"%s\": empty or too long", dir);
	strcpy(buf, dir);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, 0777) && errno != EEXIST)
			return set_err(err, errlen, "%s: %s", buf, strerror(errno));
		*p = '/';
	}
	if (mkdir(buf, 0777) && errno != EEXIST)
		return set_err(err, errlen, "%s: %s", buf, strerror(errno));
	if (stat(buf, &sb) || !S_ISDIR(sb.st_mode))
		return set_err(err, errlen, "%s: not a directory", buf);
	return 0;
}

/* An output directory holding weights already would end up with a mixture: refuse it. */
int convert_check_out_dir(const char *dir, char *err, size_t errlen)
{
	char pattern[PATH_LEN + 32];
	glob_t g;
	int found;

	snprintf(pattern, sizeof(pattern), "%s/*.safetensors", dir);
	found = !glob(pattern, 0, NULL, &g) && g.gl_pathc > 0;
	if (found)
		set_err(err, errlen, "%s already holds weights (%s): convert into an empty directory",
		        dir, g.gl_pathv[0]);
	globfree(&g);
	if (found)
		return -1;
	snprintf(pattern, sizeof(pattern), "%s/model.safetensors.index.json", dir);
	if (!access(pattern, F_OK))
		return set_err(err, errlen, "%s already holds weights (%s): convert into an empty "
			       "directory", dir, pattern);
	return 0;
}
