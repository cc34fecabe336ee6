#!/usr/bin/env bash
# bench/bench_ep_gpu.sh - GPU training throughput of 1 rank against 2 ranks sharing the GPU (expert-parallel
# ep=2 and data-parallel dp=2, device collectives host-staged over MPI: what tests/gpu/run_bundle.sh can run
# on a one-GPU machine), with the share of the step spent in communication (comm_s / step_s: the MPI calls
# and the device <-> host staging copies).  Usage: bench/bench_ep_gpu.sh [BIN_DIR] [STEPS]
# configs/small.json, seq 256, micro-batch 8 per rank (weak scaling: 2 ranks train twice the tokens of a
# step); the table gives the median over the steps after the first three.  Two ranks on ONE GPU share its
# compute, so ideal is 1.0x of the one-rank tokens/s; on a machine with a GPU per rank, add COMM=nccl.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${1:-$ROOT/build}"
STEPS="${2:-20}"
COMM="${COMM:-mpi}"
MOE="$BIN/moe"
W="$(mktemp -d "${TMPDIR:-/tmp}/moe-bench-ep-gpu.XXXXXX")"
trap 'rm -rf "$W"' EXIT
"$MOE" data synth --out "$W/train_0.bin" --vocab 512 --tokens 2000000 --seed 1 >/dev/null

run() {  # ranks ep
	local np=$1 ep=$2
	OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe \
		--mca btl self,vader --mca pml ob1 -x OMP_NUM_THREADS=2 -np "$np" \
		"$MOE" train --config "$ROOT/configs/small.json" --set "data.train=$W/train_*.bin" --set data.val= \
		--set train.steps="$STEPS" --set train.grad_accum=1 --set train.micro_batch=8 --set train.seq_len=256 \
		--set train.eval_every=0 --set train.device=cuda --set parallel.comm="$COMM" \
		--set parallel.ep="$ep" --set "checkpoint.dir=$W/ck_${np}_$ep" --set checkpoint.every=0 \
		--set "log.metrics=$W/m_${np}_$ep.jsonl" >"$W/log_${np}_$ep" 2>&1 || { tail -20 "$W/log_${np}_$ep"; exit 1; }
	python3 - "$W/m_${np}_$ep.jsonl" "$np" "$ep" "$(grep -m1 -o 'device collectives: [^(]*' "$W/log_${np}_$ep")" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][3:]
tps = statistics.median(r["tokens_per_s"] for r in rows)
comm = statistics.median(r["comm_s"] / r["step_s"] for r in rows)
step = statistics.median(r["step_s"] for r in rows)
np, ep = int(sys.argv[2]), int(sys.argv[3])
print(f"| {np} | {np // ep} x {ep} | {tps:9.0f} | {1000 * step:7.1f} ms | {100 * comm:5.1f}% | {sys.argv[4].split(': ')[-1].strip()} |")
PY
}

echo "machine: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(nproc) cores; $(date -u +%F)"
echo "| ranks | dp x ep | tokens/s | step | comm share | collectives |"
echo "|---|---|---|---|---|---|"
run 1 1
run 2 2
run 2 1
