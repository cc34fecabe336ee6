#!/usr/bin/env bash
# tests/rl/test_grpo_lora.sh - `moe grpo` with a lora section (the tests/rl/grpo_fixture.sh setup: the
# tiny model, the digit reward): only the adapters train over the frozen base, and the reference policy
# is that base with the adapters switched off (no second copy of the weights):
#   1. the reward rises; the first step's KL to the reference is 0 (B = 0: the policy is the base) and
#      later ones are > 0; the base file is untouched; the checkpoints hold only the adapters;
#   2. stopped at step 3 and resumed to 6: the uninterrupted run's loss, reward, grad norm and KL;
#   3. resuming over a changed base is refused;
#   4. under mpirun -np 2 (ep 2, dp 2): the one-process run.
# train.device=cpu (LoRA has no GPU path yet).
set -uo pipefail
MOE="${MOE_BIN:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-grpo-lora-test
. "$(dirname "${BASH_SOURCE[0]}")/grpo_fixture.sh"
cd "$W" || exit 1
TMO=300

grpo_fixture 12 ', "epsilon": 0.2, "epsilon_high": 0.2'
lora_beta=(--set grpo.beta=0.04)
# the base: logits of a usable scale (initializer_range 0.1; at the default 0.02 the frozen lm_head keeps
# every softmax near uniform, whatever the adapters do to the normalised hidden state)
"$MOE" init --config cfg.json --set model.initializer_range=0.1 --out base.h5 >/dev/null || { fail "moe init"; finish; }
sum0=$(sha256sum <base.h5)
lora=(--set model.initializer_range=0.1 --set train.init_checkpoint="$W/base.h5" --set lora.rank=8 --set lora.alpha=16
	--set 'lora.targets=["q_a_proj","kv_b_proj","o_proj","gate_proj","up_proj","down_proj","experts.gate_proj","experts.up_proj","experts.down_proj"]')
grpo() {  # grpo NAME [--set ...]
	local name=$1
	shift
	timeout -k 10 "$TMO" "$MOE" grpo --config cfg.json --set "checkpoint.dir=$name.ck" --set "log.metrics=$name.jsonl" \
		"${lora[@]}" "${lora_beta[@]}" "$@" >"$name.log" 2>&1
	rc=$?
	[ "$rc" = 0 ] || tail -n 15 "$name.log"
}
py() {
	local code=$1
	shift
	python3 -c "
import json, math, sys
def load(p):
    return [json.loads(l) for l in open(p)]
$code" "$@"
}

# 1. learning over the frozen base
grpo learn --set train.steps=14
if [ "$rc" = 0 ] && py '
m = load(sys.argv[1])
r = [x["reward_mean"] for x in m]
k = [x["kl"] for x in m]
print("reward by step:", " ".join("%.2f" % v for v in r), "| kl:", " ".join("%.2g" % v for v in k))
sys.exit(0 if len(m) == 14 and sum(r[-3:]) / 3 > sum(r[:2]) / 2 + 0.2 and abs(k[0]) < 1e-6 and max(k[1:]) > 1e-5 else 1)' \
	learn.jsonl; then
	pass "GRPO with LoRA learns; KL to the base is 0 at step 1, then > 0"
else
	fail "GRPO with LoRA: the reward should rise by 0.2, the step-1 KL be 0 and later ones > 0"
fi
grep -q "^lora: rank 8" learn.log && pass "$(grep -m1 '^lora: ' learn.log)" || fail "no lora memory report"
[ "$(sha256sum <base.h5)" = "$sum0" ] && pass "the base is untouched" || fail "the base file changed"
names=$(h5ls learn.ck/step_00000014.h5/model 2>/dev/null | awk '{print $1}')
if [ -n "$names" ] && ! grep -qv '\.lora_[AB]\.weight$' <<<"$names"; then
	pass "the GRPO checkpoint holds $(wc -l <<<"$names") adapter tensors only"
else
	fail "the GRPO checkpoint holds other tensors"
fi

# 2. exact resume
same='
keys = ("step", "loss", "reward_mean", "grad_norm", "kl")
texts = lambda p: [[l.split("\"%s\": " % k)[1].split(",")[0] for k in keys] for l in open(p)]
ta, tb = texts(sys.argv[1]), texts(sys.argv[2])
if len(ta) != 6 or ta != tb:
    print("uninterrupted:", ta); print("resumed:      ", tb); sys.exit(1)'
grpo full --set train.steps=6
grpo part --set train.steps=6 --set train.stop_at=3
timeout -k 10 "$TMO" "$MOE" grpo --config cfg.json --set checkpoint.dir=part.ck --set log.metrics=part.jsonl \
	"${lora[@]}" "${lora_beta[@]}" --set train.steps=6 --resume latest >resume.log 2>&1 || tail resume.log
if py "$same" full.jsonl part.jsonl; then
	pass "GRPO with LoRA: stopped at 3 and resumed to 6 = an uninterrupted run (loss, reward, grad norm, kl)"
else
	fail "GRPO with LoRA: the resumed run differs"
fi

# 3. a changed base is refused on resume
"$MOE" init --config cfg.json --set model.initializer_range=0.1 --set train.seed=5 --out base.h5 >/dev/null
if timeout -k 10 "$TMO" "$MOE" grpo --config cfg.json --set checkpoint.dir=part.ck --set log.metrics=x.jsonl \
	"${lora[@]}" "${lora_beta[@]}" --set train.steps=8 --resume latest >x.log 2>&1; then
	fail "GRPO resumed over a changed base"
elif grep -q "refusing to resume on another model" x.log; then
	pass "GRPO refuses to resume over a changed base"
else
	cat x.log; fail "GRPO over a changed base: no clear message"
fi
# 4. under mpirun: ep 2 (the routed experts' adapters split with their experts) and dp 2 give the
# one-process run (grad_accum 4 = 2 ranks x 2): the rewards of every step equal, the loss and gradient
# norm to 1e-4, the adapters to 1e-4 (AdamW eps 1e-4, as tests/rl/test_grpo_dist.sh explains)
"$MOE" init --config cfg.json --set model.initializer_range=0.1 --out base.h5 >/dev/null
dist=(--set train.steps=3 --set train.eps=1e-4)
grpo ref "${dist[@]}"
for ep in 2 1; do
	OMP_NUM_THREADS=1 mpi -np 2 "$MOE" grpo --config cfg.json "${lora[@]}" "${lora_beta[@]}" "${dist[@]}" \
		--set parallel.ep=$ep --set train.grad_accum=2 --set checkpoint.dir=m$ep.ck --set log.metrics=m$ep.jsonl \
		>m$ep.log 2>&1 || { tail m$ep.log; fail "mpirun ep $ep"; continue; }
	if py '
a, b = load(sys.argv[1]), load(sys.argv[2])
bad = [x["step"] for x, y in zip(a, b) if x["reward_mean"] != y["reward_mean"] or
       any(abs(x[k] - y[k]) > 1e-4 * max(abs(x[k]), abs(y[k]), 1e-2) for k in ("loss", "grad_norm", "kl"))]
print("steps", len(a), len(b), "differing", bad)
sys.exit(0 if len(a) == len(b) == 3 and not bad else 1)' ref.jsonl m$ep.jsonl &&
	   h5diff -d 1e-4 ref.ck/step_00000003.h5 m$ep.ck/step_00000003.h5 /model >m$ep.h5diff 2>&1; then
		pass "GRPO with LoRA, 2 ranks (dp $((2 / ep)), ep $ep): the one-process rewards, losses, KL and adapters"
	else
		head -5 m$ep.h5diff; fail "GRPO with LoRA, 2 ranks (ep $ep) differs from one process"
	fi
done
finish
