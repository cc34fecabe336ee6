#!/usr/bin/env bash
# tests/gpu/test_train_cuda.sh - `moe train` on the GPU (train.device=cuda): configs/small.json on a
# repetitive synthetic shard, against the same run on the CPU (bf16 matmuls vs the fp32 reference: the
# first loss within 1%, both learn, the means of their last 10 losses within 0.05 nats), and a GPU run stopped at step 20
# and resumed from its checkpoint continues exactly as the uninterrupted GPU run (the loss of every step,
# as printed, identical).  Prints SKIP and passes where there is no CUDA device.
set -uo pipefail
MOE="${MOE_BIN:?}"
SRC="${MOE_SRC:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-train-cuda-test
"$MOE" data synth --out "$W/train_0.bin" --vocab 512 --tokens 100000 --period 97 --seed 3 >/dev/null || exit 1
train() {  # NAME DEVICE [--set ...]: metrics in $W/NAME.jsonl, checkpoints in $W/NAME
	local name=$1 dev=$2
	shift 2
	"$MOE" train --config "$SRC/configs/small.json" --set "data.train=$W/train_*.bin" --set data.val= \
		--set train.seq_len=64 --set train.grad_accum=1 --set train.steps=40 --set train.warmup_steps=10 \
		--set train.lr=2e-3 --set train.min_lr=2e-4 --set train.eval_every=0 --set log.every=10 \
		--set train.device="$dev" --set "checkpoint.dir=$W/$name" --set "log.metrics=$W/$name.jsonl" "$@"
}
if ! train gpu cuda 2>"$W/gpu.err"; then
	if grep -q "no CUDA device" "$W/gpu.err"; then
		echo "SKIP: no CUDA device ($(head -1 "$W/gpu.err"))"
		exit 0
	fi
	cat "$W/gpu.err"
	echo "FAIL: the GPU run failed"
	exit 1
fi
grep -q "running on the GPU" <(train gpu_probe cuda --set train.steps=1 2>&1) ||
	{ echo "FAIL: the GPU run does not say it runs on the GPU"; exit 1; }
train cpu cpu >/dev/null || { echo "FAIL: the CPU run failed"; exit 1; }
train part cuda --set train.stop_at=20 --set checkpoint.every=20 >/dev/null ||
	{ echo "FAIL: the stopped GPU run failed"; exit 1; }
train part cuda --resume latest >/dev/null || { echo "FAIL: the resumed GPU run failed"; exit 1; }
python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
def losses(name):
    return [json.loads(l)["loss"] for l in open(f"{w}/{name}.jsonl")]
gpu, cpu, part = losses("gpu"), losses("cpu"), losses("part")
ok = True
def check(cond, msg):
    global ok
    print(("ok   " if cond else "FAIL ") + msg)
    ok &= cond
check(len(gpu) == 40 and len(cpu) == 40, f"40 steps each (gpu {len(gpu)}, cpu {len(cpu)})")
d0 = abs(gpu[0] - cpu[0]) / cpu[0]
check(d0 < 0.01, f"step 1 loss: gpu {gpu[0]:.5f} cpu {cpu[0]:.5f} (rel {d0:.1e})")
g10, c10 = sum(gpu[-10:]) / 10, sum(cpu[-10:]) / 10
check(g10 < 0.5 * gpu[0] and c10 < 0.5 * cpu[0], f"both learn: last-10 mean gpu {g10:.4f} cpu {c10:.4f}")
check(abs(g10 - c10) < 0.05, f"ends close: |gpu - cpu| = {abs(g10 - c10):.4f} nats (< 0.05)")
check(part == gpu, f"stop at 20 + resume = uninterrupted ({len(part)} steps, "
      f"first difference at {next((i + 1 for i, (a, b) in enumerate(zip(part, gpu)) if a != b), None)})")
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
