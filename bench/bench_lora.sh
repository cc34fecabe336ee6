#!/usr/bin/env bash
# bench/bench_lora.sh - LoRA against full fine-tuning on the same config (configs/small.json by default):
# the same base checkpoint, data, micro-batch and sequence length; timed `moe train` runs.  Prints, per
# run, the median and best tokens/s of steps 2.. (step 1 warms up), the peak RSS and the log's line of
# gradient + AdamW state bytes.  Usage: bench/bench_lora.sh [BUILD_DIR] [STEPS] [THREADS...]
set -uo pipefail
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOE="${1:-$SRC/build}/moe"
STEPS="${2:-10}"
shift 2 2>/dev/null
THREADS=("${@:-1 2}")
W="$(mktemp -d "${TMPDIR:-/tmp}/moe-bench-lora.XXXXXX")" || exit 1
trap 'rm -rf "$W"' EXIT
CFG="${CFG:-$SRC/configs/small.json}"
"$MOE" data synth --out "$W/tr_0.bin" --vocab 512 --tokens 400000 --seed 1 >/dev/null
"$MOE" init --config "$CFG" --out "$W/base.h5" >/dev/null
common=(--config "$CFG" --set "data.train=$W/tr_*.bin" --set data.val= --set train.device=cpu
	--set train.steps="$STEPS" --set train.micro_batch=4 --set train.seq_len=256 --set train.grad_accum=1
	--set "train.init_checkpoint=$W/base.h5" --set checkpoint.every=0)
attn='"q_a_proj","q_b_proj","kv_a_proj_with_mqa","kv_b_proj","o_proj"'
mlp='"gate_proj","up_proj","down_proj"'
experts='"experts.gate_proj","experts.up_proj","experts.down_proj"'
declare -A runs=(
	[full]=""
	[lora16-attn-mlp]="[$attn,$mlp]"
	[lora16-all]="[$attn,$mlp,$experts]"
)
for th in ${THREADS[@]}; do
	for name in full lora16-attn-mlp lora16-all; do
		extra=()
		[ -n "${runs[$name]}" ] && extra=(--set lora.rank=16 --set lora.alpha=32 --set "lora.targets=${runs[$name]}")
		OMP_NUM_THREADS=$th /usr/bin/time -f "%M" -o "$W/rss" "$MOE" train "${common[@]}" "${extra[@]}" \
			--set "checkpoint.dir=$W/$name" --set "log.metrics=$W/$name.jsonl" >"$W/$name.log" 2>&1 ||
			{ tail "$W/$name.log"; continue; }
		python3 - "$W/$name.jsonl" "$name" "$th" "$(cat "$W/rss")" "$(grep -m1 '^lora: ' "$W/$name.log")" <<'PY'
import json, statistics, sys
m = [json.loads(l) for l in open(sys.argv[1])]
t = sorted(x["tokens_per_s"] for x in m[1:])
print("%-16s threads %s: tokens/s median %6.0f best %6.0f | loss %.4f -> %.4f | peak RSS %5.0f MiB | %s" % (
    sys.argv[2], sys.argv[3], statistics.median(t), t[-1], m[0]["loss"], m[-1]["loss"], int(sys.argv[4]) / 1024,
    sys.argv[5][sys.argv[5].find("gradient"):] if sys.argv[5] else "full: gradient + AdamW state of every weight"))
PY
	done
done
