#!/usr/bin/env bash
# tests/rl/test_grpo.sh - `moe grpo` end to end on the CPU with the tiny model, a byte-level tokenizer
# and a POSIX-sh reward program (reward 1 when the completion ends with a digit):
#   1. learning: the reward rises from ~0.1 to ~1 within 15 steps;
#   2. exact resume: stopped at step 4 and resumed to 8, the loss / reward_mean / grad_norm / kl of every
#      step are those of an uninterrupted run (also with a reference model, routing replay and 2 iterations);
#   3. num_iterations=2 over 2 minibatches: the ratio leaves 1 and clipping engages; one iteration of one
#      minibatch: ratio 1;
#   4. every option runs cleanly (each loss type learns; KL > 0 with beta; sampling options);
#   5. a failing reward program (exits, hangs, NaN, junk, wrong id, not found) stops the run quickly,
#      naming the record, and nothing of the failed step is applied;
#   6. bad inputs are refused naming the file:line or the key;
#   7. --eval: the trained policy scores higher than the initial one.
# train.device=cpu: the CPU reference (the GPU's bf16 updates are checked by tests/gpu/test_grpo_cuda.sh).
set -uo pipefail
MOE="${MOE_BIN:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-grpo-test
. "$(dirname "${BASH_SOURCE[0]}")/grpo_fixture.sh"
cd "$W" || exit 1
T0=$(date +%s)
TMO=300

# ---------------------------------------------------------------- fixtures
grpo_fixture 15 ', "epsilon": 0.2, "epsilon_high": 0.2'
for p in one two three four five six seven eight nine ten; do printf '{"prompt": "%s", "tag": "y"}\n' "$p"; done >eval.jsonl

# grpo NAME [--set ...]: a run in its own checkpoint dir NAME.ck with metrics NAME.jsonl, log NAME.log;
# sets rc and el (seconds).  Every call is bounded by timeout (generous: shared CI machines can be slow): a
# hang fails instead of blocking.
grpo() {
	local name=$1
	shift
	local s
	s=$(date +%s.%N)
	timeout -k 10 "$TMO" "$MOE" grpo --config cfg.json --set "checkpoint.dir=$name.ck" --set "log.metrics=$name.jsonl" \
		"$@" >"$name.log" 2>&1
	rc=$?
	el=$(awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
	[ "$rc" -ge 124 ] && echo "  ($name: timed out after $TMO s)"
	return 0
}
ok() {  # ok NAME: the run succeeded, else print its log
	[ "$rc" = 0 ] && return 0
	tail -n 15 "$1.log"
	return 1
}
# py SCRIPT ARGS...: a Python check on metrics files; prints its message, exit status is the verdict
py() {
	local code=$1
	shift
	python3 -c "
import json, math, sys
def load(p):
    return [json.loads(l) for l in open(p)]
$code" "$@"
}

# ---------------------------------------------------------------- 1. learning
grpo learn --set train.steps=15 --set checkpoint.every=0
if ok learn && py '
m = load(sys.argv[1])
r = [x["reward_mean"] for x in m]
first, last = sum(r[:2]) / 2, sum(r[-3:]) / 3
print("reward by step:", " ".join("%.2f" % v for v in r))
sys.exit(0 if len(m) == 15 and first < 0.35 and last > 0.8 else 1)' learn.jsonl; then
	pass "learning: the digit reward rises (15 steps, ${el}s)"
else
	fail "learning: the mean reward of the first 2 steps should be < 0.35 and of the last 3 > 0.8"
fi
[ -f learn.ck/step_00000015.h5 ] || fail "learning: no final checkpoint learn.ck/step_00000015.h5"

# ---------------------------------------------------------------- 2. exact resume
same_fields='
a, b = load(sys.argv[1]), load(sys.argv[2])
keys = ("step", "loss", "reward_mean", "grad_norm", "kl")
texts = lambda p: [[l.split("\"%s\": " % k)[1].split(",")[0] for k in keys] for l in open(p)]
ta, tb = texts(sys.argv[1]), texts(sys.argv[2])
if len(ta) != 8 or ta != tb:
    print("uninterrupted:", ta); print("resumed:      ", tb); sys.exit(1)'
resume_case() {  # resume_case LABEL NAME [--set ...]
	local label=$1 name=$2
	shift 2
	grpo "$name.full" --set train.steps=8 "$@"
	ok "$name.full" || { fail "resume $label: the uninterrupted run failed"; return; }
	grpo "$name.part" --set train.steps=8 --set train.stop_at=4 "$@"
	ok "$name.part" || { fail "resume $label: the run stopped at 4 failed"; return; }
	[ "$(wc -l <"$name.part.jsonl")" = 4 ] || fail "resume $label: stop_at=4 wrote $(wc -l <"$name.part.jsonl") metrics lines"
	# resumed into the same checkpoint dir and metrics file
	timeout -k 10 "$TMO" "$MOE" grpo --config cfg.json --set "checkpoint.dir=$name.part.ck" --set "log.metrics=$name.part.jsonl" \
		--set train.steps=8 "$@" --resume latest >"$name.resume.log" 2>&1
	rc=$?
	ok "$name.resume" || { fail "resume $label: --resume latest failed"; return; }
	if py "$same_fields" "$name.full.jsonl" "$name.part.jsonl"; then
		pass "resume $label: steps 1-4 + resume 5-8 = an uninterrupted run (loss, reward_mean, grad_norm, kl)"
	else
		fail "resume $label: the resumed run differs from the uninterrupted one"
	fi
}
resume_case "(defaults)" res1
resume_case "(beta 0.04, routing replay, 2 iterations)" res2 --set grpo.beta=0.04 --set grpo.routing_replay=true \
	--set grpo.num_iterations=2

# ---------------------------------------------------------------- 3. ratios and clipping
grpo iter2 --set train.steps=3 --set grpo.num_iterations=2 --set train.grad_accum=2
if ok iter2 && py '
m = load(sys.argv[1])
print("ratio_mean", [x["ratio_mean"] for x in m], "clip_frac", [x["clip_frac"] for x in m])
sys.exit(0 if any(abs(x["ratio_mean"] - 1) > 1e-3 for x in m) and any(x["clip_frac"] > 0 for x in m)
         and all(0 <= x["clip_frac"] <= 1 for x in m) else 1)' iter2.jsonl; then
	pass "num_iterations=2 x 2 minibatches: the ratio moves off 1 and clipping engages (epsilon 0.2)"
else
	fail "num_iterations=2 x 2 minibatches: expected ratio_mean != 1 and clip_frac > 0 at some step"
fi
grpo iter1 --set train.steps=2
if ok iter1 && py '
m = load(sys.argv[1])
print("ratio_mean", [x["ratio_mean"] for x in m], "clip_frac", [x["clip_frac"] for x in m])
sys.exit(0 if abs(m[0]["ratio_mean"] - 1) < 1e-3 and m[0]["clip_frac"] == 0 else 1)' iter1.jsonl; then
	pass "num_iterations=1, one minibatch: ratio 1, no clipping at step 1"
else
	fail "num_iterations=1, one minibatch: expected ratio_mean 1 (1e-3) and clip_frac 0 at step 1"
fi

# ---------------------------------------------------------------- 4. options
finite='
m = load(sys.argv[1])
n = int(sys.argv[2])
bad = [(x["step"], k, v) for x in m for k, v in x.items() if isinstance(v, float) and not math.isfinite(v)]
if len(m) != n or bad:
    print("steps", len(m), "non-finite", bad); sys.exit(1)'
option() {  # option LABEL STEPS EXTRA_CHECK [--set ...]
	local label=$1 steps=$2 check=$3 name
	shift 3
	name=opt$((++nopt))
	grpo "$name" --set train.steps="$steps" "$@"
	if ok "$name" && py "$finite
$check" "$name.jsonl" "$steps"; then
		pass "$label (${el}s)"
	else
		fail "$label"
	fi
}
nopt=0
learns='
r = [x["reward_mean"] for x in m]
print("  reward by step:", " ".join("%.2f" % v for v in r))
sys.exit(0 if r[0] < 0.35 and (r[-1] + r[-2]) / 2 > 0.5 else 1)'
for lt in grpo bnpo dr_grpo dapo; do
	option "loss_type=$lt learns in 8 steps" 8 "$learns" --set grpo.loss_type="$lt"
done
for sc in group batch none; do
	option "scale_rewards=$sc runs" 4 "" --set grpo.scale_rewards="$sc"
done
# almost every completion hits max_new_tokens: the steps where all are truncated carry no loss at all
option "mask_truncated=true runs; all-truncated steps carry no loss" 4 '
z = [x for x in m if x["truncated_frac"] == 1]
print("  all-truncated steps:", [x["step"] for x in z], "their loss / grad_norm:", [(x["loss"], x["grad_norm"]) for x in z])
sys.exit(0 if z and all(x["loss"] == 0 and x["grad_norm"] == 0 for x in z) else 1)' --set grpo.mask_truncated=true
option "routing_replay=true runs" 4 "" --set grpo.routing_replay=true
option "sequence_ratio=true (GSPO, epsilon 3e-4 / 4e-4) runs" 4 "" --set grpo.sequence_ratio=true \
	--set grpo.epsilon=3e-4 --set grpo.epsilon_high=4e-4
option "sequence_ratio=true with num_iterations=2 x 2 minibatches runs and clips" 3 '
sys.exit(0 if any(x["clip_frac"] > 0 for x in m) else 1)' --set grpo.sequence_ratio=true \
	--set grpo.epsilon=3e-4 --set grpo.epsilon_high=4e-4 --set grpo.num_iterations=2 --set train.grad_accum=2
option "beta=0.04: kl 0 at step 1, then > 0 and finite" 4 '
k = [x["kl"] for x in m]
print("  kl by step:", k)
sys.exit(0 if k[0] == 0 and all(v > 0 for v in k[1:]) else 1)' --set grpo.beta=0.04
option "temperature 0.7, top_p 0.9, top_k 20 runs" 4 "" --set grpo.temperature=0.7 --set grpo.top_p=0.9 \
	--set grpo.top_k=20

# ---------------------------------------------------------------- 5. reward program failures
# The program fails at step 2's request for id 67; checkpoint.every=1: step 1 is saved, step 2 must not be.
# A hang (a timeout not enforced) runs into the 120 s timeout of the call (rc 124); unloaded, each case
# takes about a second.
rfail() {  # rfail MODE
	local mode=$1 name=rf_$1
	TMO=120 grpo "$name" --set train.steps=3 --set checkpoint.every=1 --set grpo.reward_timeout_s=1 \
		--set "grpo.reward_cmd=[\"$W/reward.sh\", \"$mode\"]"
	local newest lines msg
	newest=$(ls "$name.ck" 2>/dev/null | grep '^step_.*\.h5$' | sort | tail -1)
	lines=$(wc -l <"$name.jsonl" 2>/dev/null || echo none)
	msg=$(grep -m1 -i 'id' "$name.log")
	local left
	left=$(pgrep -f "$W/reward.sh $mode" || true)
	[ -n "$left" ] && { ps -o pid,args -p $left; fail "reward program '$mode': still running after moe exited"; }
	if [ "$rc" != 0 ] && [ "$rc" -lt 124 ] && awk -v e="$el" 'BEGIN { exit !(e < 60) }' \
		&& grep -q 'id[^0-9]*67\b' "$name.log" && [ "$newest" = step_00000001.h5 ] && [ "$lines" = 1 ]; then
		pass "reward program '$mode': exit $rc in ${el}s, step 2 not applied: $msg"
	else
		cat "$name.log"
		fail "reward program '$mode': rc $rc in ${el}s (want non-zero, < 60 s), newest checkpoint '$newest' (want step_00000001.h5), metrics lines $lines (want 1), a message naming id 67"
	fi
}
for mode in exit hang nan inf junk wrongid; do rfail "$mode"; done
grpo rf_missing --set "grpo.reward_cmd=[\"$W/no_such_reward_program\"]"
if [ "$rc" != 0 ] && [ "$rc" -lt 124 ] && grep -q no_such_reward_program rf_missing.log \
	&& ! ls rf_missing.ck/step_*.h5 >/dev/null 2>&1; then
	pass "reward program not found: refused at start: $(grep -m1 no_such rf_missing.log)"
else
	cat rf_missing.log
	fail "reward program not found: rc $rc, want an error naming it at start and no checkpoint"
fi

# ---------------------------------------------------------------- 6. bad inputs
refused() {  # refused LABEL PATTERN [--set ...]: the run fails at start with a message matching PATTERN
	local label=$1 pat=$2 name=bad$((++nbad))
	shift 2
	grpo "$name" --set train.steps=1 "$@"
	if [ "$rc" != 0 ] && [ "$rc" -lt 124 ] && grep -Eq "$pat" "$name.log"; then
		pass "$label: $(grep -Em1 "$pat" "$name.log")"
	else
		cat "$name.log"
		fail "$label: rc $rc, want non-zero and a message matching /$pat/"
	fi
}
nbad=0
{ head -n 2 prompts.jsonl; echo '{"prompt": "unterminated'; tail -n 2 prompts.jsonl; } >badline.jsonl
refused "a bad prompts line" "badline\.jsonl:3" --set "grpo.prompts=$W/badline.jsonl"
{ head -n 2 prompts.jsonl; echo '{"tag": "no prompt"}'; } >noprompt.jsonl
refused "a line without a prompt" "noprompt\.jsonl:3" --set "grpo.prompts=$W/noprompt.jsonl"
refused "a missing prompts file" "nonexistent\.jsonl" --set "grpo.prompts=$W/nonexistent.jsonl"
refused "no grpo.tokenizer" "grpo\.tokenizer" --set grpo.tokenizer=
refused "no grpo.prompts" "grpo\.prompts" --set grpo.prompts=
refused "no grpo.reward_cmd" "grpo\.reward_cmd" --set 'grpo.reward_cmd=[]'
refused "a distill section (moe train's objective)" "distill\.teacher.*moe train" \
	--set "distill.teacher=$W/learn.ck/step_00000015.h5"
refused "prompts_per_step x group_size not a multiple of the update's completions" \
	"grpo\.prompts_per_step.*grpo\.group_size.*train\.micro_batch.*train\.grad_accum" --set grpo.prompts_per_step=6

# ---------------------------------------------------------------- 7. --eval
evaluate() {  # evaluate NAME [args]: sets ev (the JSON line)
	local name=$1
	shift
	timeout -k 10 "$TMO" "$MOE" grpo --config cfg.json --set log.metrics= --eval "$W/eval.jsonl" "$@" >"$name.log" 2>&1
	rc=$?
	ev=$(grep -m1 '^{"eval"' "$name.log")
}
evaluate eval0 --samples samples0.jsonl
r0=$ev
ok eval0 || fail "--eval of the initial model failed"
evaluate eval1 --resume learn.ck/step_00000015.h5 --samples samples1.jsonl
r1=$ev
ok eval1 || fail "--eval of the trained model failed"
if py '
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
s = load(sys.argv[3])
print("  initial:", sys.argv[1]); print("  trained:", sys.argv[2])
sys.exit(0 if a["prompts"] == b["prompts"] == 10 and b["reward_mean"] > a["reward_mean"]
         and b["accuracy"] > a["accuracy"] and 0 <= a["accuracy"] <= 1 and len(s) == 10
         and all("completion" in x and "reward" in x for x in s) else 1)' "$r0" "$r1" samples1.jsonl; then
	pass "--eval: the trained policy scores higher than the initial one (10 unseen prompts, --samples written)"
else
	fail "--eval: want the trained checkpoint to beat the initial model (and 10 samples written)"
fi

finish " in $(( $(date +%s) - T0 ))s"
