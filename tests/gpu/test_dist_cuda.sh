#!/usr/bin/env bash
# tests/gpu/test_dist_cuda.sh - expert and data parallelism on the GPU, under mpirun, over the device
# collectives: host-staged MPI (ranks sharing a GPU, the CPU emulator), or NCCL with MOE_TEST_NCCL=1 on a
# machine with a GPU per rank.  Layouts (dp, ep) = (1,1) (2,1) (1,2) (2,2):
#   1. test_dist_cuda.c at each layout: the device collectives equal the host ones; loss, norm, loads and
#      every gradient equal those of one GPU process with all experts (rel <= 1e-3) and of the CPU (fp32
#      matmuls: 1e-4; bf16: the loss);
#   2. `moe train` on the GPU at (1,1) against the CPU run (bf16 tolerance) and at (2,2) with ZeRO-1 against
#      the one-process GPU run on the same global batch (losses and gradient norms of every step, rel <= 1e-3);
#   3. checkpoints: a GPU (1,2) run (its steps rel <= 1e-3 of the one-process GPU run) stopped at step 2
#      resumes as one CPU process, a CPU run stopped at step 2 resumes on two GPU ranks at (1,2), and the
#      losses continue (those of the uninterrupted runs, bf16 tolerance);
#   4. a GPU rank killed by SIGKILL ends the job within 30 s; on the emulator, a CUDA call failing on one
#      rank ends the job (the fatal hook: NCCL communicators aborted, then the MPI job).
# On the CPU emulator (tests/gpu/emu, ctest label emu) MOE_BIN is the emulated moe and MOE_TEST_DIST_BIN the
# emulated test_dist_cuda; the runs are tiny (the emulator runs kernels thread by thread).  Prints SKIP and
# passes where there is no CUDA device.
set -uo pipefail
MOE="${MOE_BIN:?}"
SRC="${MOE_SRC:?}"
BIN="${MOE_TEST_DIST_BIN:-$(dirname "$MOE")/gpu_test_dist_cuda}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-dist-cuda-test
NCCL=${MOE_TEST_NCCL:-0}
COMM=$([ "$NCCL" = 1 ] && echo nccl || echo mpi)
layouts=("1 1" "2 1" "2 2" "4 2")  # world, ep
ndev=0
[ "$NCCL" = 1 ] && ndev=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
fits() {  # WORLD: NCCL needs a GPU per rank
	[ "$NCCL" != 1 ] || [ "$1" -le "$ndev" ]
}

# 1. the program at each layout
for layout in "${layouts[@]}"; do
	set -- $layout
	fits "$1" || { echo "SKIP: world $1 over NCCL needs $1 GPUs ($ndev here)"; continue; }
	log="$W/grad_$1_$2.log"
	mpi -np "$1" -x MOE_TEST_EP="$2" -x MOE_TEST_NCCL="$NCCL" "$BIN" >"$log" 2>&1
	rc=$?
	if grep -q "^SKIP" "$log"; then
		echo "SKIP: no CUDA device ($(grep -m1 SKIP "$log"))"
		exit 0
	fi
	if [ $rc = 0 ] && grep -q "Run Summary" "$log" && ! grep -q "FAILED" "$log"; then
		pass "world $1, ep $2 ($COMM)"
		grep -o 'rank 0 of .*' "$log" | sed 's/passed$//; s/^/    /'
	else
		tail -n 40 "$log"
		fail "world $1, ep $2 ($COMM)"
	fi
done

# 2. moe train: global batch of 4 sequences (world x grad_accum), 3 steps
"$MOE" data synth --out "$W/train_0.bin" --vocab 256 --tokens 20000 --period 37 --seed 3 >/dev/null || exit 1
common=(--config "$SRC/configs/tiny.json" --set "data.train=$W/train_*.bin" --set data.val= --set train.steps=3
	--set train.warmup_steps=1 --set train.micro_batch=1 --set train.seq_len=8 --set train.eval_every=0
	--set data.shuffle=true --set parallel.comm="$COMM" --set checkpoint.every=0)
train() {  # NAME WORLD DEVICE [--set ...]: metrics $W/NAME.jsonl, checkpoints $W/NAME
	local name=$1 world=$2 dev=$3
	shift 3
	local args=("${common[@]}" --set train.grad_accum=$((4 / world)) --set train.device="$dev"
		--set "checkpoint.dir=$W/$name" --set "log.metrics=$W/$name.jsonl" "$@")
	fits "$world" || { echo "SKIP: $name: world $world over NCCL needs $world GPUs ($ndev here)"; return 1; }
	if [ "$world" = 1 ]; then
		OMP_NUM_THREADS=1 "$MOE" train "${args[@]}"
	else
		mpi -np "$world" "$MOE" train "${args[@]}"
	fi >>"$W/$name.log" 2>&1 || { tail -20 "$W/$name.log"; fail "$name: the run failed"; return 1; }
}
cmp_runs() {  # A B TOL WHAT [STEPS]: losses and grad norms of A's steps against B's (the first STEPS only)
	python3 - "$W/$1.jsonl" "$W/$2.jsonl" "$3" "$4" "${5:-0}" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
tol, what, n = float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
if [r["step"] for r in a] != [r["step"] for r in b]:
    print("FAIL: %s: steps differ: %s vs %s" % (what, [r["step"] for r in a], [r["step"] for r in b]))
    sys.exit(1)
if n:
    a, b = a[:n], b[:n]
el = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(a, b))
en = max(abs(x["grad_norm"] - y["grad_norm"]) / abs(y["grad_norm"]) for x, y in zip(a, b))
ok = el <= tol and en <= 10 * tol
print("%s: %s: %d steps, worst rel loss %.2e, worst rel grad norm %.2e (bounds %.0e, %.0e)"
      % ("PASS" if ok else "FAIL", what, len(a), el, en, tol, 10 * tol))
sys.exit(0 if ok else 1)
PY
}
if ! train gpu1 1 cuda; then
	if grep -q "no CUDA device" "$W/gpu1.log"; then echo "SKIP: no CUDA device"; exit 0; fi
fi
grep -q "device collectives" "$W/gpu1.log" || fail "the GPU run does not log its device collectives"
train cpu1 1 cpu
cmp_runs cpu1 gpu1 1e-2 "GPU one process vs CPU (bf16 matmuls vs fp32)" || fails=$((fails + 1))
train l22 4 cuda --set parallel.ep=2 --set parallel.zero=1 &&
	{ cmp_runs l22 gpu1 1e-3 "GPU (2,2) ZeRO-1 vs one GPU process" || fails=$((fails + 1)); }

# 3. checkpoints across devices and layouts: GPU (1,2) for steps 1-2 (against the one-process GPU run),
#    then one CPU process; CPU for steps 1-2, then GPU (1,2)
if train l21 2 cuda --set parallel.bucket_mb=0.01; then  # data parallel: small buckets, in the backward
	cmp_runs l21 gpu1 1e-3 "GPU (2,1), gradient buckets reduced in the backward, vs one GPU process" ||
		fails=$((fails + 1))
	grep -Eq "gradients: [0-9]+ buckets of about 0.01 MiB" "$W/l21.log" &&
		pass "(2,1) logs its buckets: $(grep -m1 'gradients: ' "$W/l21.log")" ||
		fail "(2,1): the gradient buckets are not logged"
fi
train gc 2 cuda --set parallel.ep=2 --set train.stop_at=2 && train gc 1 cpu --resume latest && {
	cmp_runs gc gpu1 1e-3 "GPU (1,2) vs one GPU process" 2 || fails=$((fails + 1))
	cmp_runs gc gpu1 1e-2 "GPU (1,2) stopped at 2, resumed as one CPU process vs the GPU run" ||
		fails=$((fails + 1))
}
train cg 1 cpu --set train.stop_at=2 && train cg 2 cuda --set parallel.ep=2 --resume latest &&
	{ cmp_runs cg cpu1 1e-2 "CPU stopped at 2, resumed on GPU ranks (1,2) vs the CPU run" || fails=$((fails + 1)); }
for f in gc l22; do
	n=$(grep -c "^moe train: rank .* GPU" "$W/$f.log")
	grep -q "device collectives: " "$W/$f.log" && [ "$n" -ge 2 ] &&
		pass "$f: every rank logs its GPU, the collectives are logged: $(grep -m1 'device collectives' "$W/$f.log")" ||
		fail "$f: placement / collectives not logged"
done

# 4. a GPU rank killed mid-run ends the job
if fits 2; then
	mpi -np 2 "$MOE" train "${common[@]}" --set train.steps=100000 --set train.device=cuda --set parallel.ep=2 \
		--set "checkpoint.dir=$W/k" --set log.metrics= >"$W/k.log" 2>&1 &
	job=$!
	victim=
	for _ in $(seq 240); do  # wait until both ranks are training
		sleep 0.5
		grep -q "^step " "$W/k.log" 2>/dev/null || continue
		victim=$(pgrep -f "checkpoint.dir=$W/k" | while read -r p; do
			[ "$(ps -o comm= -p "$p")" != mpirun ] && [ "$(ps -o comm= -p "$p")" != timeout ] && echo "$p"; done | tail -1)
		[ -n "$victim" ] && break
	done
	start=$(date +%s)
	if [ -n "$victim" ]; then kill -9 "$victim"; else kill "$job"; fi
	wait "$job" 2>/dev/null
	el=$(( $(date +%s) - start ))
	[ -n "$victim" ] && [ "$el" -lt 30 ] && pass "a GPU rank killed by SIGKILL ends the job in ${el}s" ||
		{ tail "$W/k.log"; fail "killed GPU rank (${el}s, victim '$victim')"; }
fi
# 5. a failing CUDA call on one rank (the emulator fails its allocations from the 300th on, on rank 1)
#    ends the job through the fatal hook (MPI abort with the call named), without a hang
if [ "${MOE_EMU:-0}" = 1 ]; then
	start=$(date +%s)
	MPI_TIMEOUT=60 mpi -np 2 -x EMU_FAIL_ALLOC=300 -x EMU_FAIL_RANK=1 "$MOE" train "${common[@]}" \
		--set train.steps=100000 --set train.device=cuda --set parallel.ep=2 --set "checkpoint.dir=$W/x" \
		--set log.metrics= >"$W/x.log" 2>&1
	rc=$? el=$(( $(date +%s) - start ))
	if [ $rc != 0 ] && [ $rc != 124 ] && [ $rc != 137 ] && grep -q "CUDA error" "$W/x.log" &&
		grep -q "a CUDA call failed" "$W/x.log"; then
		pass "a CUDA call failing on rank 1 ends the job (exit $rc, ${el}s): $(grep -m1 -A1 'CUDA error' "$W/x.log" | tr '\n' ' ' | cut -c1-120)"
	else
		tail "$W/x.log"; fail "failing CUDA call (exit $rc, ${el}s)"
	fi
fi
finish
