#!/usr/bin/env bash
# tests/train/test_learn.sh - the model learns: configs/small.json (16 routed experts, top-4, one shared)
# trained on a repetitive synthetic shard; the loss must fall well below its starting value within a
# couple of hundred steps (sequences shortened to 64 tokens to keep CI fast).
set -uo pipefail
MOE="${MOE_BIN:?}"
SRC="${MOE_SRC:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-learn-test
"$MOE" data synth --out "$W/train_0.bin" --vocab 512 --tokens 100000 --period 97 --seed 3 >/dev/null
"$MOE" train --config "$SRC/configs/small.json" --set "data.train=$W/train_*.bin" --set data.val= \
	--set train.seq_len=64 --set train.grad_accum=1 --set train.steps=120 --set train.warmup_steps=20 \
	--set train.lr=2e-3 --set train.min_lr=2e-4 --set train.eval_every=0 --set log.every=20 \
	--set "checkpoint.dir=$W/ck" --set "log.metrics=$W/m.jsonl" || exit 1
python3 - "$W/m.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-10:]) / 10
imb = rows[-1]["load_imbalance"]
print(f"loss: step 1 {first:.4f} -> mean of the last 10 steps {last:.4f}; load imbalance {imb}")
ok = len(rows) == 120 and first > 5.0 and last < 0.2 * first
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
