#!/usr/bin/env bash
# tests/rl/test_grpo_dist.sh - `moe grpo` under mpirun: the same global batch gives the same run in every
# layout.  3 steps of 8 prompts x 8 completions = 64 completions a step, by one process (grad_accum 4) and
# by (dp 1, ep 2), (dp 2, ep 1), (dp 2, ep 2) with grad_accum 4 / W: the rewards of every step are
# identical (each completion samples from its own seeded stream), the loss and gradient norm agree to 1e-4
# (relative), the final weights to 1e-4 (h5diff).  Two configurations: the plain one (one update a step of
# micro_batch 16) and one with 2 minibatches (micro_batch 8) x 2 iterations, a KL reference (beta 0.04),
# routing replay, bnpo and batch-scaled rewards (every cross-rank normaliser).  Then a reward program
# failing on one rank only ends the whole job within seconds, every rank exiting.
#
# AdamW's eps is 1e-4 here: with the default 1e-8 an element whose gradient is ~0 (a token never sampled)
# moves by about +-lr on float noise alone, which differs between layouts by up to 2 lr per step (seen:
# 4e-3 after 3 steps); with 1e-4 the weights of every layout agree to ~1e-6.  train.device=cpu: on a GPU
# machine the one-process reference would otherwise run its updates on the GPU.
set -uo pipefail
MOE="${MOE_BIN:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-grpo-dist-test
. "$(dirname "${BASH_SOURCE[0]}")/grpo_fixture.sh"
cd "$W" || exit 1
T0=$(date +%s)

grpo_fixture 3


cat >cmp.py <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
bad = []
if [x["step"] for x in a] != [x["step"] for x in b]:
    bad.append("steps %s vs %s" % ([x["step"] for x in a], [x["step"] for x in b]))
worst = {"loss": 0.0, "grad_norm": 0.0}
for x, y in zip(a, b):
    if x["reward_mean"] != y["reward_mean"] or x["reward_std"] != y["reward_std"]:
        bad.append("step %d: reward_mean %r vs %r (std %r vs %r)" % (x["step"], x["reward_mean"], y["reward_mean"],
                                                                  x["reward_std"], y["reward_std"]))
    for k in worst:
        # the loss of a step with one iteration is sum(advantages) ~ 0: rounding, hence the floor
        d = abs(x[k] - y[k]) / max(abs(x[k]), abs(y[k]), 1e-2)
        worst[k] = max(worst[k], d)
        if d > 1e-4:
            bad.append("step %d: %s %r vs %r" % (x["step"], k, x[k], y[k]))
print("  rewards %s; worst relative difference: loss %.1e, grad_norm %.1e" %
      ("equal" if not any("reward" in s for s in bad) else "DIFFER", worst["loss"], worst["grad_norm"]))
for s in bad:
    print("  " + s)
sys.exit(1 if bad else 0)
PY

# layout CASE NP EP [--set ...]: the same global batch (grad_accum 4 / NP) under mpirun, against ref$CASE
layout() {
	local c=$1 np=$2 ep=$3 name=d$1_$2x$3 s
	shift 3
	s=$(date +%s)
	mpi -np "$np" "$MOE" grpo --config cfg.json --set parallel.ep="$ep" --set train.grad_accum=$((4 / np)) \
		--set "checkpoint.dir=$name.ck" --set "log.metrics=$name.jsonl" "$@" >"$name.log" 2>&1
	local rc=$? el=$(( $(date +%s) - s ))
	if [ "$rc" != 0 ]; then
		tail -n 20 "$name.log"
		fail "$np ranks, ep $ep: rc $rc"
		return
	fi
	local what="$label: $np ranks (dp $((np / ep)), ep $ep, grad_accum $((4 / np)))"
	if python3 cmp.py "ref$c.jsonl" "$name.jsonl"; then
		pass "$what: the single-process rewards, losses and gradient norms (${el}s)"
	else
		fail "$what: differs from the single-process run"
	fi
	if h5diff -d 1e-4 "ref$c.ck/step_00000003.h5" "$name.ck/step_00000003.h5" /model >"$name.h5diff" 2>&1; then
		pass "$what: final weights within 1e-4 of the single-process run's"
	else
		head -n 20 "$name.h5diff"
		fail "$what: final weights differ (h5diff -d 1e-4 on /model)"
	fi
}
for c in 1 2; do
	if [ "$c" = 1 ]; then
		label="plain" extra=(--set train.eps=1e-4)
	else
		label="2 minibatches x 2 iterations, beta, replay, bnpo, batch scaling"
		extra=(--set train.eps=1e-4 --set train.lr=3e-3 --set train.micro_batch=8 --set grpo.num_iterations=2
			--set grpo.beta=0.04 --set grpo.routing_replay=true --set grpo.loss_type=bnpo
			--set grpo.scale_rewards=batch)
	fi
	# the reference: one process
	timeout -k 10 300 "$MOE" grpo --config cfg.json --set "checkpoint.dir=ref$c.ck" --set "log.metrics=ref$c.jsonl" \
		"${extra[@]}" >"ref$c.log" 2>&1 || { cat "ref$c.log"; fail "$label: the single-process reference run"; continue; }
	layout "$c" 2 2 "${extra[@]}"
	layout "$c" 2 1 "${extra[@]}"
	layout "$c" 4 2 "${extra[@]}"
done

# --eval under mpirun: 3 ranks share the 10 prompts unevenly (4, 3, 3); greedy, so the same score as one
# process.  (prompts_per_step / micro_batch only satisfy the training layout check, which --eval also runs.)
for p in one two three four five six seven eight nine ten; do printf '{"prompt": "%s", "tag": "y"}\n' "$p"; done >eval.jsonl
timeout -k 10 300 "$MOE" grpo --config cfg.json --eval "$W/eval.jsonl" --resume ref1.ck/step_00000003.h5 >e1.log 2>&1
e1=$(grep -m1 '^{"eval"' e1.log)
mpi -np 3 "$MOE" grpo --config cfg.json --set grpo.prompts_per_step=3 --set train.micro_batch=8 --set train.grad_accum=1 \
	--eval "$W/eval.jsonl" --resume ref1.ck/step_00000003.h5 >e3.log 2>&1
e3=$(grep -m1 '^{"eval"' e3.log)
if [ -n "$e1" ] && [ "$e1" = "$e3" ] && grep -q '"prompts": 10' <<<"$e1"; then
	pass "--eval with 3 ranks = one process: $e3"
else
	tail -n 5 e1.log e3.log
	fail "--eval with 3 ranks: '$e3', one process: '$e1'"
fi

# a reward program failing on rank 1 only: with 2 ranks rank 1 scores completions 32..63 of step 1
s=$(date +%s)
mpi -np 2 "$MOE" grpo --config cfg.json --set "checkpoint.dir=$W/f.ck" --set log.metrics=f.jsonl \
	--set train.grad_accum=2 --set "grpo.reward_cmd=[\"$W/reward.sh\", \"40\"]" >f.log 2>&1
rc=$?
el=$(( $(date +%s) - s ))
sleep 0.5
left=$(pgrep -f "checkpoint.dir=$W/f.ck|$W/reward.sh" || true)
if [ "$rc" != 0 ] && [ "$rc" -lt 124 ] && [ "$el" -lt 60 ] && grep -q 'rank 1.*id 40' f.log && [ -z "$left" ] \
	&& ! ls f.ck/step_*.h5 >/dev/null 2>&1; then
	pass "a reward program failing on rank 1 ends the job in ${el}s (rc $rc): $(grep -m1 'rank 1.*id 40' f.log)"
else
	cat f.log
	[ -n "$left" ] && ps -o pid,args -p $left
	fail "failing rank: rc $rc in ${el}s; want non-zero within 60 s, a message of rank 1 naming id 40, no process left, no checkpoint"
fi

finish " in $(( $(date +%s) - T0 ))s"
