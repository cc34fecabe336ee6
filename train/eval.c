#include "train/eval.h"

#include <stdlib.h>

int eval_shard(struct moe_model *m, const struct shard *s, int T, int B, int64_t max_seqs, double *loss,
	       int64_t *tokens)
{
	int64_t n_seq = s->n_tokens > 0 ? (int64_t)((s->n_tokens - 1) / T) : 0;
	if (max_seqs > 0 && n_seq > max_seqs)
		n_seq = max_seqs;
	if (n_seq == 0)
		return -1;
	int *in = malloc(sizeof(int) * B * T), *tgt = malloc(sizeof(int) * B * T);
	double sum = 0.0;
	int64_t count = 0;
	for (int64_t i0 = 0; i0 < n_seq; i0 += B) {
		int b = n_seq - i0 < B ? (int)(n_seq - i0) : B;
		for (int j = 0; j < b * T; j++) {
			uint64_t pos = (uint64_t)i0 * T + j;
			in[j] = (int)shard_token(s, pos);
			tgt[j] = (int)shard_token(s, pos + 1);
		}
		model_forward(m, in, tgt, b, T);
		int n = model_count_targets(m);
		sum += (double)m->last_ce_loss * n;
		count += n;
	}
	free(in);
	free(tgt);
	*loss = sum / count;
	*tokens = count;
	return 0;
}
