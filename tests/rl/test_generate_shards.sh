#!/usr/bin/env bash
# tests/rl/test_generate_shards.sh - sequence-level distillation: `moe generate --prompts FILE
# --out-shard SHARD` writes G samples of a teacher per prompt (prompt, completion, end of text) to a token
# shard, reproducibly from --seed; `moe train` learns from it, alone and with a distill.teacher; bad
# arguments and a bad prompt line are refused naming them.
set -uo pipefail
MOE="${MOE_BIN:?}"
SRC="${MOE_SRC:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-genshard-test
cd "$W" || exit 1

printf 'hello world 0123456789 abc\n' >text.txt
"$MOE" data tokenizer --train text.txt --vocab 260 --out tok.json >/dev/null 2>&1 || { fail "tokenizer"; finish; }
for p in hello world abc xyz foo bar baz qux; do
	printf '{"prompt": "%s", "answer": 1}\n' "$p"
done >prompts.jsonl
"$MOE" init --config "$SRC/configs/tiny.json" --set model.vocab_size=260 --set model.initializer_range=0.2 \
	--out teacher.h5 >init.log 2>&1 || { cat init.log; fail "teacher"; finish; }
mkdir -p kd
gen=(generate --checkpoint teacher.h5 --tokenizer tok.json --prompts prompts.jsonl --num-samples 4
     --max-new-tokens 12 --temperature 1)

# 1. the shard: 8 x 4 documents, each its prompt then the teacher's completion; reproducible from --seed
"$MOE" "${gen[@]}" --seed 7 --out-shard kd/train_00000.bin >g1.log 2>&1 || { cat g1.log; fail "generate"; }
"$MOE" "${gen[@]}" --seed 7 --out-shard again.bin >g2.log 2>&1 || { cat g2.log; fail "generate again"; }
"$MOE" "${gen[@]}" --seed 8 --out-shard other.bin >g3.log 2>&1 || { cat g3.log; fail "generate seed 8"; }
"$MOE" data decode --tokenizer tok.json kd/train_00000.bin >kd.txt 2>&1 || { cat kd.txt; fail "decode"; }
docs=$(grep -ao '<|endoftext|>' kd.txt | wc -l)
starts=$(python3 - <<'PY'
t = open("kd.txt", encoding="utf-8", errors="replace").read().split("<|endoftext|>")[:-1]
p = ["hello", "world", "abc", "xyz", "foo", "bar", "baz", "qux"]
print(sum(d.startswith(p[i // 4]) for i, d in enumerate(t)))
PY
)
if [ "$docs" = 32 ] && [ "$starts" = 32 ] && grep -q "8 prompts x 4 samples" g1.log; then
	pass "32 documents, each its prompt then a completion: $(tail -1 g1.log)"
else
	cat g1.log; head -c 600 kd.txt; fail "shard content ($docs documents, $starts starting with their prompt)"
fi
cmp -s kd/train_00000.bin again.bin && pass "the same --seed: the same shard" || fail "same seed, other shard"
cmp -s kd/train_00000.bin other.bin && fail "another --seed: the same shard" || pass "another --seed: other samples"

# 2. moe train reads it: the student learns the teacher's samples (and with the teacher as distill.teacher)
student=(--config "$SRC/configs/tiny.json" --set model.vocab_size=260 --set model.hidden_size=32
	 --set "data.train=$W/kd/train_*.bin" --set data.val= --set train.device=cpu --set train.seq_len=16
	 --set train.micro_batch=4 --set train.warmup_steps=0 --set train.lr=1e-2 --set train.schedule=constant)
"$MOE" train "${student[@]}" --set train.steps=30 --set checkpoint.dir=ck --set log.metrics=m.jsonl \
	>t.log 2>&1 || { tail t.log; fail "train on the shard"; }
if out=$(python3 -c '
import json, sys
r = [json.loads(l) for l in open("m.jsonl")]
a, b = r[0]["loss"], sum(x["loss"] for x in r[-5:]) / 5
print("loss %.3f -> %.3f over %d steps" % (a, b, len(r)))
sys.exit(0 if b < a - 1.0 else 1)'); then
	pass "moe train on the teacher's samples: $out"
else
	echo "$out"; fail "the student does not learn the samples"
fi
"$MOE" train "${student[@]}" --set train.steps=3 --set distill.teacher=teacher.h5 --set checkpoint.dir=ck2 \
	>t2.log 2>&1 && grep -q "| kl " t2.log && pass "the samples with the teacher as distill.teacher too" \
	|| { tail t2.log; fail "sequence- and token-level distillation together"; }

# 3. refused
"$MOE" "${gen[@]}" >e1.log 2>&1 && fail "--prompts without --out-shard accepted" ||
	{ grep -q "go together" e1.log && pass "--prompts without --out-shard: $(cat e1.log)" || { cat e1.log; fail "e1"; }; }
printf '{"prompt": "hello"}\n{"answer": 3}\n' >bad.jsonl
"$MOE" generate --checkpoint teacher.h5 --tokenizer tok.json --prompts bad.jsonl --out-shard bad.bin >e2.log 2>&1 &&
	fail "a prompt line without a prompt accepted" ||
	{ grep -q "bad.jsonl:2" e2.log && [ ! -e bad.bin ] && [ ! -e bad.bin.tmp ] &&
	  pass "a bad prompt line, nothing written: $(cat e2.log)" || { cat e2.log; fail "e2"; }; }
"$MOE" generate --checkpoint teacher.h5 --prompts prompts.jsonl --out-shard x.bin >e3.log 2>&1 &&
	fail "--prompts without a tokenizer accepted" ||
	{ grep -q "needs --tokenizer" e3.log && pass "--prompts without a tokenizer: $(cat e3.log)" || { cat e3.log; fail "e3"; }; }

finish
