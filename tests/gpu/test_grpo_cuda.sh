#!/usr/bin/env bash
# tests/gpu/test_grpo_cuda.sh - `moe grpo` with its updates on the GPU (train.device=cuda; sampling, the
# reward and the reference stay on the CPU) against the same run on the CPU, with the fixture of
# tests/rl/grpo_fixture.sh (the tiny model, a byte-level tokenizer, reward 1 when the completion ends with
# a digit): step 1 samples the same completions (the same weights and seeds: the same rewards exactly) and
# its gradient norm agrees within 5% (bf16 matmuls vs the fp32 reference); every step's ratio stays
# within 0.05 of 1 (one update per batch: only the bf16 / fp32 gap between the updates and the sampler
# moves it); both learn (mean reward of the last 3 of 12 steps > 0.8); a GPU run stopped at step 6 and
# resumed continues exactly as the uninterrupted one.  Prints SKIP and passes where there is no CUDA device.
set -uo pipefail
MOE="${MOE_BIN:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-grpo-cuda-test
. "$(dirname "${BASH_SOURCE[0]}")/../rl/grpo_fixture.sh"
cd "$W" || exit 1

grpo_fixture 12
grpo() {  # NAME DEVICE [--set ...]: metrics NAME.jsonl, checkpoints NAME.ck, log NAME.log
	local name=$1 dev=$2
	shift 2
	timeout -k 10 600 "$MOE" grpo --config cfg.json --set train.device="$dev" --set "checkpoint.dir=$name.ck" \
		--set "log.metrics=$name.jsonl" "$@" >"$name.log" 2>&1
}
if ! grpo gpu cuda; then
	if grep -q "no CUDA device" gpu.log; then
		echo "SKIP: no CUDA device ($(grep -m1 "no CUDA device" gpu.log))"
		exit 0
	fi
	tail -5 gpu.log
	echo "FAIL: the GPU run failed"
	exit 1
fi
grep -q "running on the GPU" gpu.log || { echo "FAIL: the GPU run does not say it runs on the GPU"; exit 1; }
grpo cpu cpu || { tail -5 cpu.log; echo "FAIL: the CPU run failed"; exit 1; }
grpo part cuda --set train.stop_at=6 --set checkpoint.every=6 || { echo "FAIL: the stopped GPU run failed"; exit 1; }
grpo part cuda --resume latest || { echo "FAIL: the resumed GPU run failed"; exit 1; }
python3 - <<'PY'
import json, sys
def rows(name):
    return [json.loads(l) for l in open(f"{name}.jsonl")]
gpu, cpu, part = rows("gpu"), rows("cpu"), rows("part")
ok = True
def check(cond, msg):
    global ok
    print(("ok   " if cond else "FAIL ") + msg)
    ok &= bool(cond)
check(len(gpu) == 12 and len(cpu) == 12, f"12 steps each (gpu {len(gpu)}, cpu {len(cpu)})")
check(gpu[0]["reward_mean"] == cpu[0]["reward_mean"],
      f"step 1 rewards: gpu {gpu[0]['reward_mean']} cpu {cpu[0]['reward_mean']} (same samples)")
d = abs(gpu[0]["grad_norm"] - cpu[0]["grad_norm"]) / cpu[0]["grad_norm"]
check(d < 0.05, f"step 1 grad norm: gpu {gpu[0]['grad_norm']:.5g} cpu {cpu[0]['grad_norm']:.5g} (rel {d:.1e})")
worst = max(abs(r["ratio_mean"] - 1) for r in gpu)
check(worst < 0.05, f"ratio within 0.05 of 1 at every GPU step (worst {worst:.2e})")
g3, c3 = (sum(r["reward_mean"] for r in x[-3:]) / 3 for x in (gpu, cpu))
check(g3 > 0.8 and c3 > 0.8, f"both learn: last-3 mean reward gpu {g3:.3f} cpu {c3:.3f} (first {gpu[0]['reward_mean']:.3f})")
keys = ("loss", "reward_mean", "grad_norm")
same = [tuple(r[k] for k in keys) for r in part] == [tuple(r[k] for k in keys) for r in gpu]
check(same, f"GPU stop at 6 + resume = uninterrupted ({len(part)} steps)")
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
