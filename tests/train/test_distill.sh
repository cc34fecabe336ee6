#!/usr/bin/env bash
# tests/train/test_distill.sh - `moe train` with a distill section, end to end: a tiny teacher trained
# briefly is distilled into a smaller student (other sizes, fewer experts) whose KL to the teacher falls
# (forward and reverse KL); alpha = 0 trains the weights of a run without a teacher bit for bit; under
# mpirun (ep 2, dp 2, dp 2 x ep 2) the losses of one process; a stopped run resumes exactly; a teacher
# of another vocabulary, train.device=cuda without a GPU and bad distill keys refused naming the key.
set -uo pipefail
MOE="${MOE_BIN:?}"
SRC="${MOE_SRC:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-distill-test

"$MOE" data synth --out "$W/train_0.bin" --vocab 256 --tokens 40000 --seed 1 >/dev/null
base=(--config "$SRC/configs/tiny.json" --set "data.train=$W/train_*.bin" --set data.val= --set train.device=cpu
	--set train.warmup_steps=2 --set train.micro_batch=2 --set train.seq_len=16 --set data.shuffle=true)

# the teacher: tiny.json (2 layers of 64, 8 experts), trained briefly
"$MOE" train "${base[@]}" --set train.steps=40 --set train.lr=3e-3 --set "checkpoint.dir=$W/teacher" \
	>"$W/teacher.log" 2>&1 || { tail "$W/teacher.log"; fail "teacher"; finish; }
TEACHER="$W/teacher/step_00000040.h5"
[ -f "$TEACHER" ] || { ls "$W/teacher"; fail "no teacher checkpoint"; finish; }

# the student: narrower, 4 experts of another size, other attention ranks
student=("${base[@]}" --set model.hidden_size=32 --set model.intermediate_size=64 --set model.n_routed_experts=4
	--set model.moe_intermediate_size=16 --set model.kv_lora_rank=16 --set model.q_lora_rank=0
	--set model.num_attention_heads=2 --set model.num_key_value_heads=2 --set train.lr=3e-3
	--set "distill.teacher=$TEACHER")

cat >"$W/kl.py" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    for k in ("ce", "distill_kl", "loss"):
        if k not in r:
            print("step %d lacks %s" % (r["step"], k)); sys.exit(1)
alpha, T = float(sys.argv[2]), float(sys.argv[3])
for r in rows:  # loss = (1 - alpha) ce + alpha T^2 kl (+ aux = 0 here)
    want = (1 - alpha) * r["ce"] + alpha * T * T * r["distill_kl"]
    if abs(r["loss"] - want) > 1e-4 * abs(want) + 1e-5:
        print("step %d: loss %g, (1 - alpha) ce + alpha T^2 kl = %g" % (r["step"], r["loss"], want)); sys.exit(1)
first = rows[0]["distill_kl"]
last = sum(r["distill_kl"] for r in rows[-3:]) / 3
print("distill_kl %.4f -> %.4f, ce %.4f -> %.4f over %d steps" % (first, last, rows[0]["ce"], rows[-1]["ce"], len(rows)))
sys.exit(0 if last < 0.7 * first else 1)
PY

# 1. the student's KL to the teacher falls, forward and reverse
for kl in forward reverse; do
	"$MOE" train "${student[@]}" --set train.steps=25 --set distill.alpha=0.7 --set distill.temperature=2 \
		--set distill.kl=$kl --set "checkpoint.dir=$W/s_$kl" --set "log.metrics=$W/s_$kl.jsonl" \
		>"$W/s_$kl.log" 2>&1 || { tail "$W/s_$kl.log"; fail "distill ($kl)"; continue; }
	if out=$(python3 "$W/kl.py" "$W/s_$kl.jsonl" 0.7 2) && grep -q "| ce .* | kl " "$W/s_$kl.log"; then
		pass "KL $kl: $out"
	else
		echo "$out"; tail -3 "$W/s_$kl.log"; fail "KL $kl does not fall (or the metrics lack it)"
	fi
done

# 2. alpha = 0: the teacher runs, the weights are those of a run without one, bit for bit
"$MOE" train "${student[@]}" --set train.steps=6 --set distill.alpha=0 --set "checkpoint.dir=$W/a0" \
	--set "log.metrics=$W/a0.jsonl" >"$W/a0.log" 2>&1 || { tail "$W/a0.log"; fail "alpha 0"; }
"$MOE" train "${student[@]}" --set train.steps=6 --set distill.teacher= --set "checkpoint.dir=$W/plain" \
	--set "log.metrics=$W/plain.jsonl" >"$W/plain.log" 2>&1 || { tail "$W/plain.log"; fail "plain"; }
if h5diff "$W/a0/step_00000006.h5" "$W/plain/step_00000006.h5" /model /model >"$W/h5diff.log" 2>&1 &&
   grep -q '"distill_kl"' "$W/a0.jsonl"; then
	pass "alpha = 0: the weights after 6 steps equal plain training's bit for bit"
else
	head "$W/h5diff.log"; fail "alpha = 0 differs from plain training"
fi

# 3. under mpirun: ep 2 (the teacher's experts split too) and dp 2 give one process's losses
cat >"$W/cmp.py" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
if [r["step"] for r in a] != [r["step"] for r in b]:
    print("steps differ"); sys.exit(1)
worst = max(abs(x[k] - y[k]) / abs(x[k]) for x, y in zip(a, b) for k in ("loss", "ce", "distill_kl"))
print("worst relative difference of loss, ce, distill_kl %.2e over %d steps" % (worst, len(a)))
sys.exit(0 if worst < 1e-4 else 1)
PY
dist=("${student[@]}" --set train.steps=6 --set distill.alpha=0.5 --set distill.temperature=1.5 --set distill.kl=reverse)
"$MOE" train "${dist[@]}" --set train.grad_accum=2 --set "checkpoint.dir=$W/ref" --set "log.metrics=$W/ref.jsonl" \
	>"$W/ref.log" 2>&1 || { tail "$W/ref.log"; fail "reference"; }
for ep in 2 1; do
	mpi -np 2 "$MOE" train "${dist[@]}" --set parallel.ep=$ep --set "checkpoint.dir=$W/m$ep" \
		--set "log.metrics=$W/m$ep.jsonl" >"$W/m$ep.log" 2>&1 || { tail "$W/m$ep.log"; fail "mpirun ep $ep"; continue; }
	if out=$(python3 "$W/cmp.py" "$W/ref.jsonl" "$W/m$ep.jsonl") &&
	   grep -q "of 2 ranks (dp $((2 / ep)) x ep $ep)" "$W/m$ep.log"; then
		pass "mpirun -np 2, ep $ep (dp $((2 / ep))): $out"
	else
		echo "$out"; fail "mpirun -np 2, ep $ep differs from one process"
	fi
done

# ... and four ranks, dp 2 x ep 2, against one process accumulating the same 4 micro-batches
dp2_ep2_equals_one "${dist[@]}"

# 3b. stopped at step 3 and resumed (the teacher reloaded): the uninterrupted run's losses, bit for bit
"$MOE" train "${dist[@]}" --set train.grad_accum=2 --set "checkpoint.dir=$W/rs" --set "log.metrics=$W/rs.jsonl" \
	--set train.stop_at=3 >"$W/rs1.log" 2>&1 || { tail "$W/rs1.log"; fail "distill, stopped"; }
"$MOE" train "${dist[@]}" --set train.grad_accum=2 --set "checkpoint.dir=$W/rs" --set "log.metrics=$W/rs.jsonl" \
	--resume latest >"$W/rs2.log" 2>&1 || { tail "$W/rs2.log"; fail "distill, resumed"; }
strip() { sed -E 's/"(tokens_per_s|elapsed_s|step_s|comm_s)": [0-9.e+-]*, //g' "$1"; }
if [ "$(strip "$W/ref.jsonl")" = "$(strip "$W/rs.jsonl")" ]; then
	pass "stopped at step 3 and resumed: the uninterrupted run's metrics exactly"
else
	diff <(strip "$W/ref.jsonl") <(strip "$W/rs.jsonl") | head; fail "resumed distillation differs"
fi

# 4. refused: another vocabulary (both sizes named), the GPU path, bad keys
expect_fail "another vocabulary" "vocab_size=256.*vocab_size=300" "${student[@]}" --set model.vocab_size=300
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then  # with a GPU it runs (tests/gpu/test_distill_cuda.sh)
	expect_fail "train.device=cuda without a GPU" "train.device=cuda: no CUDA device" "${student[@]}" \
		--set train.device=cuda
fi
expect_fail "distill.kl" "distill.kl=\"sideways\" must be one of: forward, reverse" "${student[@]}" --set distill.kl=sideways
expect_fail "distill.alpha" "distill.alpha" "${student[@]}" --set distill.alpha=1.5
expect_fail "distill.temperature" "distill.temperature" "${student[@]}" --set distill.temperature=0
expect_fail "a missing teacher" "distill.teacher" "${student[@]}" --set "distill.teacher=$W/none.h5"

finish
