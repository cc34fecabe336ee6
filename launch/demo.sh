#!/usr/bin/env bash
# launch/demo.sh - the main job, end to end on this machine: installs what is missing, builds, makes a
# synthetic shard, trains the tiny MoE model on it under mpirun with expert parallelism and checkpoints,
# and evaluates before and after.
# (The data and GRPO issues grow this into the tokenizer + SFT + GRPO demo.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/setup.sh"
MOE="${BUILD_DIR:-$ROOT/build}/moe"
OUT="${DEMO_DIR:-$ROOT/runs/demo}"
rm -rf "$OUT"
mkdir -p "$OUT"

"$MOE" inspect --config "$ROOT/configs/tiny.json"
"$MOE" data synth --out "$OUT/train_0.bin" --vocab 256 --tokens 200000 --pattern repeat --period 61 --seed 7
"$MOE" data synth --out "$OUT/val_0.bin" --vocab 256 --tokens 20000 --pattern repeat --period 61 --seed 7
"$MOE" init --config "$ROOT/configs/tiny.json" --out "$OUT/init.h5"
echo "== the untrained model (a loss near ln(256) = 5.55):"
"$MOE" eval --checkpoint "$OUT/init.h5" --data "$OUT/val_0.bin"
echo "== training: 2 ranks (mpirun -np 2), expert-parallel (parallel.ep=2: 4 of the 8 experts per rank)"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun --oversubscribe --mca btl self,vader -np 2 -x OMP_NUM_THREADS=1 \
	"$MOE" train --set parallel.ep=2 --config "$ROOT/configs/tiny.json" --set "data.train=$OUT/train_*.bin" \
	--set "data.val=$OUT/val_*.bin" --set train.eval_every=50 --set log.every=20 \
	--set "checkpoint.dir=$OUT/ckpt" --set checkpoint.every=100 --set "log.metrics=$OUT/metrics.jsonl"
echo "== the trained model:"
"$MOE" eval --checkpoint "$(ls "$OUT"/ckpt/step_*.h5 | tail -1)" --data "$OUT/val_0.bin"
echo "metrics: $OUT/metrics.jsonl"
