#!/usr/bin/env bash
# bench/bench_scaling.sh - training throughput against the number of ranks (SPEC 6 layouts), with the
# share of the step spent in communication.  Usage: bench/bench_scaling.sh [BUILD_DIR] [STEPS]
# Each layout trains configs/small.json (seq 256, micro-batch 4 per rank: weak scaling) for STEPS steps;
# the table gives the median over the steps after the first two.  Cores are shared out between ranks
# (OMP_NUM_THREADS = cores / ranks, at least 1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build}"
STEPS="${2:-8}"
MOE="$BUILD/moe"
W="$(mktemp -d "${TMPDIR:-/tmp}/moe-bench-scaling.XXXXXX")"
trap 'rm -rf "$W"' EXIT
cores=$(nproc)
"$MOE" data synth --out "$W/train_0.bin" --vocab 512 --tokens 2000000 --seed 1 >/dev/null

run() {  # ranks ep
	local np=$1 ep=$2 threads=$(( cores / $1 ))
	[ "$threads" -ge 1 ] || threads=1
	OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe \
		--mca btl self,vader --mca pml ob1 -x OMP_NUM_THREADS=$threads -np "$np" \
		"$MOE" train --config "$ROOT/configs/small.json" --set "data.train=$W/train_*.bin" --set data.val= \
		--set train.steps="$STEPS" --set train.grad_accum=1 --set train.eval_every=0 \
		--set parallel.ep="$ep" --set "checkpoint.dir=$W/ck_${np}_$ep" --set checkpoint.every=0 \
		--set "log.metrics=$W/m_${np}_$ep.jsonl" >"$W/log_${np}_$ep" 2>&1
	python3 - "$W/m_${np}_$ep.jsonl" "$np" "$ep" "$threads" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][2:]
tps = statistics.median(r["tokens_per_s"] for r in rows)
comm = statistics.median(r["comm_s"] / r["step_s"] for r in rows)
print(f"| {sys.argv[2]} | {int(sys.argv[2]) // int(sys.argv[3])} x {sys.argv[3]} | {sys.argv[4]} | {tps:9.0f} | {100 * comm:5.1f}% |")
PY
}

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $cores cores; $(date -u +%F)"
echo "| ranks | dp x ep | threads/rank | tokens/s | comm share |"
echo "|---|---|---|---|---|"
run 1 1
run 2 1
run 2 2
run 4 2
run 4 4
