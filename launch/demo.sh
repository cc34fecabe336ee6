#!/usr/bin/env bash
# launch/demo.sh - the main job, end to end on this machine: from text to a GRPO-improved model.
#
#   1. installs what is missing and builds (launch/setup.sh)
#   2. makes a verifiable task: 2-digit additions, as SFT shards and GRPO prompts (moe data task arith)
#   3. supervised fine-tuning of a small MoE under mpirun -np 2 with expert parallelism (ep=2)
#   4. accuracy by sampling (greedy completions of 1000 held-out problems, scored by rl/rewards/arith.py)
#   5. GRPO with that reward program, again on 2 ranks with ep=2
#   6. accuracy again; before/after accuracy and mean reward, and PNG plots of the curves
# The GPU is used when one is visible (train.device=auto).  DEMO_DIR (default runs/demo) holds it all.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/setup.sh"
MOE="${BUILD_DIR:-$ROOT/build}/moe"
OUT="${DEMO_DIR:-$ROOT/runs/demo}"
CFG="$ROOT/configs/demo-arith.json"
SFT_STEPS="${SFT_STEPS:-2500}"
GRPO_STEPS="${GRPO_STEPS:-200}"
rm -rf "$OUT"
mkdir -p "$OUT"
cd "$ROOT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPI=(mpirun --oversubscribe --mca btl self,vader -np 2 -x OMP_NUM_THREADS=1)
EP=(--set parallel.ep=2)   # 4 of the 8 experts on each rank
PATHS=("${EP[@]}" --set "data.train=$OUT/task/train/*.bin" --set "data.val=$OUT/task/val/*.bin"
	--set "grpo.tokenizer=$OUT/task/tokenizer.json" --set "grpo.prompts=$OUT/task/prompts.jsonl"
	--set "grpo.reward_cmd=[\"python3\", \"$ROOT/rl/rewards/arith.py\"]")
t0=$SECONDS

echo "== 1. the task: 2-digit additions"
"$MOE" data task arith --out "$OUT/task" --digits 2 --ops + --train 20000 --prompts 2000 --eval 1000
"$MOE" inspect --config "$CFG"

echo "== 2. supervised fine-tuning: mpirun -np 2, parallel.ep=2 (4 of the 8 experts per rank)"
"${MPI[@]}" "$MOE" train --config "$CFG" "${PATHS[@]}" --set train.steps="$SFT_STEPS" \
	--set "checkpoint.dir=$OUT/sft" --set "log.metrics=$OUT/sft_metrics.jsonl"
SFT="$(ls "$OUT"/sft/step_*.h5 | tail -1)"

evaluate() {  # $1: checkpoint, $2: label
	"${MPI[@]}" "$MOE" grpo --config "$CFG" "${PATHS[@]}" --eval "$OUT/task/eval.jsonl" --resume "$1" |
		tee "$OUT/eval_$2.txt" | grep '^{"eval"' > "$OUT/eval_$2.json"
	cat "$OUT/eval_$2.txt"
}
echo "== 3. accuracy after SFT (greedy, 1000 held-out problems)"
evaluate "$SFT" sft

# One AdamW update per step over all 512 completions (2 ranks x 16 x grad_accum 16): with 128 completions
# an update, or lr >= 3e-4, the noisy policy gradient wrecked the SFT model within a few steps (accuracy
# 0.80 -> 0.05); with 512 and lr 1e-4 three SFT seeds went 0.88 -> 0.99, 0.84 -> 0.95, 0.73 -> 0.79.
echo "== 4. GRPO: $GRPO_STEPS steps of 64 prompts x 8 completions, reward rl/rewards/arith.py"
"${MPI[@]}" "$MOE" grpo --config "$CFG" "${PATHS[@]}" --set "train.init_checkpoint=$SFT" \
	--set train.steps="$GRPO_STEPS" --set train.lr=1e-4 --set train.min_lr=1e-4 --set train.schedule=constant \
	--set train.warmup_steps=0 --set train.micro_batch=16 --set train.grad_accum=16 --set log.every=10 \
	--set "checkpoint.dir=$OUT/grpo" --set "log.metrics=$OUT/grpo_metrics.jsonl"
GRPO="$(ls "$OUT"/grpo/step_*.h5 | tail -1)"

echo "== 5. accuracy after GRPO"
evaluate "$GRPO" grpo

"$MOE" plot --metrics "$OUT/sft_metrics.jsonl" --key loss --key val_loss --title "SFT loss" \
	--out "$OUT/sft_loss.png"
"$MOE" plot --metrics "$OUT/grpo_metrics.jsonl" --key reward_mean --title "GRPO mean reward" \
	--out "$OUT/grpo_reward.png"

field() { sed -n "s/.*\"$2\": \([-0-9.e]*\).*/\1/p" "$1"; }
echo
echo "== before -> after GRPO (1000 held-out problems, greedy)"
echo "   accuracy     $(field "$OUT/eval_sft.json" accuracy) -> $(field "$OUT/eval_grpo.json" accuracy)"
echo "   mean reward  $(field "$OUT/eval_sft.json" reward_mean) -> $(field "$OUT/eval_grpo.json" reward_mean)"
echo "   plots        $OUT/sft_loss.png $OUT/grpo_reward.png; metrics $OUT/*_metrics.jsonl"
echo "   $((SECONDS - t0)) s"
