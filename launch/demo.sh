#!/usr/bin/env bash
# launch/demo.sh - the main job, end to end on this machine: installs what is missing, builds,
# initialises the tiny model, writes a synthetic shard and evaluates the model on it.
# (The training and data issues grow this into the full train + GRPO demo.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/setup.sh"
MOE="${BUILD_DIR:-$ROOT/build}/moe"
OUT="${DEMO_DIR:-$ROOT/runs/demo}"
mkdir -p "$OUT"

"$MOE" inspect --config "$ROOT/configs/tiny.json"
"$MOE" init --config "$ROOT/configs/tiny.json" --out "$OUT/init.h5"
"$MOE" data synth --out "$OUT/val.bin" --vocab 256 --tokens 20000 --pattern repeat --seed 7
echo "evaluating the untrained model (expect a loss near ln(256) = 5.55):"
"$MOE" eval --checkpoint "$OUT/init.h5" --data "$OUT/val.bin"
