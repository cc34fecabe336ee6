#!/usr/bin/env bash
# tests/train/test_dist.sh - every (dp, ep) layout gives the single-process loss and gradients (the
# CUnit tests of test_dist.c under mpirun); `moe train` under mpirun: a run saved with (dp 2, ep 2)
# resumes with (1, 4), (4, 1) and one process, matching an uninterrupted single-process run; a failing
# rank ends the job within seconds.
set -uo pipefail
MOE="${MOE_BIN:?}"
SRC="${MOE_SRC:?}"
BIN="$(dirname "$MOE")/train_test_dist"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-dist-test

# 1. gradients: (dp, ep) = (1,1) (2,1) (1,2) (4,1) (2,2) (1,4)
for layout in "1 1" "2 1" "2 2" "4 1" "4 2" "4 4"; do
	set -- $layout
	log="$W/grad_$1_$2.log"
	if mpi -np "$1" -x MOE_TEST_EP="$2" "$BIN" >"$log" 2>&1 && grep -q "Run Summary" "$log"; then
		pass "world $1, ep $2: $(grep -o 'worst rel err [0-9.e+-]*' "$log" | sort -k4 -g | tail -1)"
	else
		tail -n 40 "$log"
		fail "world $1, ep $2"
	fi
done

# 2. training under mpirun, resumed across layouts
"$MOE" data synth --out "$W/train_0.bin" --vocab 256 --tokens 40000 --seed 1 >/dev/null
# train.device=cpu: every layout against the one-process CPU reference (on a GPU machine, auto would move
# the one-process runs to the GPU while the multi-rank ones stay on the CPU)
common=(--config "$SRC/configs/tiny.json" --set "data.train=$W/train_*.bin" --set data.val= --set train.steps=8
	--set train.warmup_steps=2 --set train.micro_batch=2 --set data.shuffle=true --set train.device=cpu)
# the reference: one process with grad_accum 4 = the same global batch of 8 sequences as 4 ranks x 1
"$MOE" train "${common[@]}" --set train.grad_accum=4 --set "checkpoint.dir=$W/ref" \
	--set "log.metrics=$W/ref.jsonl" >"$W/ref.log" 2>&1 || { cat "$W/ref.log"; fail "reference"; }
mpi -np 4 "$MOE" train "${common[@]}" --set parallel.ep=2 --set "checkpoint.dir=$W/d" \
	--set "log.metrics=$W/d.jsonl" --set train.stop_at=3 >"$W/d1.log" 2>&1 || { tail "$W/d1.log"; fail "(2,2)"; }
mpi -np 4 "$MOE" train "${common[@]}" --set parallel.ep=4 --set "checkpoint.dir=$W/d" \
	--set "log.metrics=$W/d.jsonl" --set train.stop_at=5 --resume latest >"$W/d2.log" 2>&1 \
	|| { tail "$W/d2.log"; fail "(1,4) resume"; }
mpi -np 4 "$MOE" train "${common[@]}" --set parallel.ep=1 --set "checkpoint.dir=$W/d" \
	--set "log.metrics=$W/d.jsonl" --set train.stop_at=7 --resume latest >"$W/d3.log" 2>&1 \
	|| { tail "$W/d3.log"; fail "(4,1) resume"; }
"$MOE" train "${common[@]}" --set train.grad_accum=4 --set "checkpoint.dir=$W/d" \
	--set "log.metrics=$W/d.jsonl" --resume latest >"$W/d4.log" 2>&1 || { tail "$W/d4.log"; fail "1-process resume"; }
cat >"$W/cmp.py" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
if [r["step"] for r in a] != [r["step"] for r in b]:
    print("steps differ:", [r["step"] for r in a], [r["step"] for r in b])
    sys.exit(1)
worst = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b))
print("worst relative loss difference %.2e over %d steps" % (worst, len(a)))
sys.exit(0 if worst < 1e-4 else 1)
PY
if python3 "$W/cmp.py" "$W/ref.jsonl" "$W/d.jsonl"; then
	pass "(2,2) -> (1,4) -> (4,1) -> one process: the losses of an uninterrupted single-process run"
else
	fail "losses across layouts differ"
fi

# 2b. ZeRO-1 (AdamW state sharded): (2,2) with parallel.zero=1, stopped and resumed by one process
#     without it: the same losses as the reference
mpi -np 4 "$MOE" train "${common[@]}" --set parallel.ep=2 --set parallel.zero=1 --set "checkpoint.dir=$W/z" \
	--set "log.metrics=$W/z.jsonl" --set train.stop_at=4 >"$W/z1.log" 2>&1 || { tail "$W/z1.log"; fail "zero (2,2)"; }
"$MOE" train "${common[@]}" --set train.grad_accum=4 --set "checkpoint.dir=$W/z" \
	--set "log.metrics=$W/z.jsonl" --resume latest >"$W/z2.log" 2>&1 || { tail "$W/z2.log"; fail "zero resume"; }
if python3 "$W/cmp.py" "$W/ref.jsonl" "$W/z.jsonl"; then
	pass "ZeRO-1 at (2,2), resumed by one process: the reference losses"
else
	fail "ZeRO-1 losses differ"
fi

# 3. a failing rank ends the whole job quickly: rank 0 cannot open its metrics file
start=$(date +%s)
mpi -np 2 "$MOE" train "${common[@]}" --set "log.metrics=/proc/no/such/metrics.jsonl" \
	--set "checkpoint.dir=$W/f" >"$W/f.log" 2>&1 && fail "failing rank: job succeeded"
el=$(( $(date +%s) - start ))
if [ "$el" -lt 20 ] && grep -q "metrics" "$W/f.log"; then
	pass "a rank failing at start ends the job in ${el}s: $(grep -m1 metrics "$W/f.log")"
else
	cat "$W/f.log"; fail "failing rank (${el}s)"
fi
# ... and a rank killed mid-run
mpi -np 2 "$MOE" train "${common[@]}" --set train.steps=100000 --set "checkpoint.dir=$W/k" >"$W/k.log" 2>&1 &
job=$!
victim=
for _ in $(seq 60); do  # wait until both ranks are training
	sleep 0.5
	grep -q "^step " "$W/k.log" 2>/dev/null || continue
	victim=$(pgrep -f "checkpoint.dir=$W/k" | while read p; do
		[ "$(ps -o comm= -p "$p")" != mpirun ] && echo "$p"; done | tail -1)
	[ -n "$victim" ] && break
done
start=$(date +%s)
if [ -n "$victim" ]; then kill -9 "$victim"; else kill "$job"; fi
wait "$job" 2>/dev/null
el=$(( $(date +%s) - start ))
[ -n "$victim" ] && [ "$el" -lt 20 ] && pass "a rank killed by SIGKILL ends the job in ${el}s" \
	|| { tail "$W/k.log"; fail "killed rank (${el}s, victim '$victim')"; }

finish
