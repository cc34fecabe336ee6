#!/usr/bin/env bash
# tests/gpu/test_distill_cuda.sh - `moe train` with a distill section on the GPU (train.device=cuda):
# the losses, CE and KL of a few steps equal the CPU run's (bf16 matmuls against fp32: 1e-2), and under
# mpirun -np 2 with the teacher's and the student's experts split (parallel.ep=2, ranks sharing the GPU:
# host-staged collectives) they equal the one-process GPU run's (1e-3).  The KL kernels and one step's
# gradients are tested against the CPU by tests/gpu/test_distill_cuda.c.  SKIP without a CUDA device.
set -uo pipefail
MOE="${MOE_BIN:?}"
SRC="${MOE_SRC:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-distill-cuda-test

"$MOE" data synth --out "$W/train_0.bin" --vocab 256 --tokens 20000 --period 37 --seed 3 >/dev/null || exit 1
# a teacher of large random weights: far from the student's near-uniform start (a KL worth comparing)
"$MOE" init --config "$SRC/configs/tiny.json" --set model.num_hidden_layers=1 --set model.initializer_range=0.5 \
	--out "$W/teacher.h5" \
	>"$W/init.log" 2>&1 || { cat "$W/init.log"; fail "teacher"; finish; }
common=(--config "$SRC/configs/tiny.json" --set "data.train=$W/train_*.bin" --set data.val= --set train.steps=3
	--set train.warmup_steps=1 --set train.micro_batch=1 --set train.seq_len=8 --set train.eval_every=0
	--set train.grad_accum=2 --set checkpoint.every=0 --set parallel.comm=mpi
	--set model.hidden_size=32 --set model.intermediate_size=48 --set model.n_routed_experts=4
	--set model.moe_intermediate_size=16 --set model.num_hidden_layers=1 --set model.first_k_dense_replace=0
	--set model.n_group=2 --set model.topk_group=1 --set model.num_experts_per_tok=2
	--set "distill.teacher=$W/teacher.h5" --set distill.alpha=0.6 --set distill.temperature=2)
train() {  # NAME WORLD DEVICE [--set ...]
	local name=$1 world=$2 dev=$3
	shift 3
	local args=("${common[@]}" --set train.device="$dev" --set "checkpoint.dir=$W/$name"
		--set "log.metrics=$W/$name.jsonl" "$@")
	if [ "$world" = 1 ]; then
		OMP_NUM_THREADS=1 "$MOE" train "${args[@]}"
	else
		mpi -np "$world" "$MOE" train "${args[@]}" --set train.grad_accum=1
	fi >"$W/$name.log" 2>&1 && return 0
	grep -q "no CUDA device" "$W/$name.log" && return 2
	tail -20 "$W/$name.log"
	fail "$name: the run failed"
	return 1
}
cmp_runs() {  # A B TOL WHAT
	python3 - "$W/$1.jsonl" "$W/$2.jsonl" "$3" "$4" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
tol, what = float(sys.argv[3]), sys.argv[4]
if [r["step"] for r in a] != [r["step"] for r in b] or not a:
    print("FAIL: %s: steps differ" % what); sys.exit(1)
worst = {k: max(abs(x[k] - y[k]) / abs(y[k]) for x, y in zip(a, b)) for k in ("loss", "ce", "distill_kl")}
ok = all(v <= tol for v in worst.values()) and all(r["distill_kl"] > 0 for r in a)
print("%s: %s: %d steps, worst rel %s (bound %.0e); kl %.4f -> %.4f" % ("PASS" if ok else "FAIL", what, len(a),
      ", ".join("%s %.1e" % kv for kv in worst.items()), tol, a[0]["distill_kl"], a[-1]["distill_kl"]))
sys.exit(0 if ok else 1)
PY
}
train gpu1 1 cuda
case $? in
	2) echo "SKIP: no CUDA device"; exit 0 ;;
	1) finish ;;
esac
grep -q "running on the GPU" "$W/gpu1.log" || fail "the distillation run is not on the GPU"
train cpu1 1 cpu && { cmp_runs gpu1 cpu1 1e-2 "GPU distillation vs the CPU's" || fails=$((fails + 1)); }
train ep2 2 cuda --set parallel.ep=2 &&
	{ cmp_runs ep2 gpu1 1e-3 "GPU distillation at (1,2), teacher and student split, vs one GPU process" ||
		fails=$((fails + 1)); }
finish
