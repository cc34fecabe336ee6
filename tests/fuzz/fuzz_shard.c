/*
 * tests/fuzz/fuzz_shard.c - token shard headers (shard_open): the input is a shard file; an accepted one
 * is read token by token (every token inside the file, below vocab_size when that is checked).  The first
 * byte picks the vocab_size checked (0: none).
 */
#include <stdlib.h>

#include "data/shard.h"
#include "common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
	static const int vocab[4] = { 0, 256, 50000, 1 << 20 };
	struct shard s;
	char err[1024];
	const char *path;
	uint64_t sum = 0;
	int v;

	if (n < 1)
		return 0;
	v = vocab[data[0] % 4];
	path = fuzz_write("shard.bin", data + 1, n - 1);
	if (!path || shard_open(&s, path, v, err, sizeof(err)))
		return 0;
	if ((s.n_tokens * (uint64_t)s.token_bytes) > s.map_bytes - SHARD_HEADER_BYTES)
		abort();	/* the header promised more tokens than the file holds */
	for (uint64_t i = 0; i < s.n_tokens; i++) {
		uint32_t t = shard_token(&s, i);

		if (v > 0 && t >= (uint32_t)v)
			abort();
		sum += t;
	}
	shard_close(&s);
	return sum == 1 ? 0 : 0;
}
