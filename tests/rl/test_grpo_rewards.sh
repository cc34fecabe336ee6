#!/usr/bin/env bash
# tests/rl/test_grpo_rewards.sh - `moe grpo` with several weighted reward programs (grpo.rewards), on the
# CPU with the tiny model of grpo_fixture.sh and three programs:
#   digit  (weight 1)    the fixture's reward.sh: 1 when the completion ends with a digit
#   parity (weight 0.5)  1 for odd ids, 0 for even ones; sleeps 0.8 s at the first request of a step
#   slow   (weight -0.25) the completion's length in bytes; sleeps 1.2 s at the first request of a step
#   1. metrics: reward/<name>, reward_std/<name> of each, reward_mean the weighted sum of their means,
#      and the programs work at the same time: a step's reward_s is about the slowest program's 1.2 s,
#      not the sum of 2 s;
#   2. reward_norm=each trains on other advantages than total (another loss), from the same rewards;
#   3. a program failing on a given record stops the run naming that program and record, the step not
#      applied; a program that cannot start is named by its grpo.rewards entry;
#   4. --eval prints every program's mean;
#   5. bad grpo.rewards / reward_norm are refused naming the key.
set -uo pipefail
MOE="${MOE_BIN:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-grpo-rewards-test
. "$(dirname "${BASH_SOURCE[0]}")/grpo_fixture.sh"
cd "$W" || exit 1
T0=$(date +%s)

grpo_fixture 2
# parity [FAIL_ID]: exits with status 9 on the request of id FAIL_ID
cat >parity.sh <<'EOF'
#!/bin/sh
while IFS= read -r line; do
	id=${line#'{"id":'}
	id=${id%%,*}
	[ $((id % 64)) = 0 ] && sleep 0.8
	[ "$id" = "${1:-none}" ] && { echo "parity.sh: failing on id $id" >&2; exit 9; }
	printf '{"id":%s,"reward":%s}\n' "$id" $((id % 2))
done
EOF
cat >slow.sh <<'EOF'
#!/bin/sh
while IFS= read -r line; do
	id=${line#'{"id":'}
	id=${id%%,*}
	[ $((id % 64)) = 0 ] && sleep 1.2
	c=${line#*'"completion":"'}
	c=${c%%'","tag"'*}
	printf '{"id":%s,"reward":%s}\n' "$id" ${#c}
done
EOF
chmod +x parity.sh slow.sh
rewards() {  # rewards [PARITY_ARG]: the --set of the three programs
	printf 'grpo.rewards=[{"name": "digit", "cmd": ["%s/reward.sh"]}, {"name": "parity", "cmd": ["sh", "%s/parity.sh", "%s"], "weight": 0.5, "timeout_s": 20}, {"name": "slow", "cmd": ["%s/slow.sh"], "weight": -0.25}]' \
		"$W" "$W" "${1:-none}" "$W"
}
run() {  # run NAME [--set ...]: sets rc
	local name=$1
	shift
	timeout -k 10 300 "$MOE" grpo --config cfg.json --set 'grpo.reward_cmd=[]' --set "checkpoint.dir=$name.ck" \
		--set "log.metrics=$name.jsonl" "$@" >"$name.log" 2>&1
	rc=$?
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

# ---------------------------------------------------------------- 1. metrics and concurrency
run total --set "$(rewards)"
if [ "$rc" = 0 ] && py '
m = load(sys.argv[1])
ok = len(m) == 2
for s in m:
    want = s["reward/digit"] + 0.5 * s["reward/parity"] - 0.25 * s["reward/slow"]
    print("  step %d: reward_mean %.4f = digit %.4f + 0.5 parity %.4f - 0.25 slow %.4f; stds %.3f %.3f %.3f; "
          "reward_s %.2f" % (s["step"], s["reward_mean"], s["reward/digit"], s["reward/parity"], s["reward/slow"],
          s["reward_std/digit"], s["reward_std/parity"], s["reward_std/slow"], s["reward_s"]))
    ok = ok and abs(s["reward_mean"] - want) < 1e-4 and abs(s["reward/parity"] - 0.5) < 1e-9
    ok = ok and s["reward_std/parity"] > 0.4 and s["reward_std"] > 0 and s["reward/slow"] > 0
    ok = ok and 1.2 <= s["reward_s"] < 1.9
sys.exit(0 if ok else 1)' total.jsonl; then
	pass "three programs: per-program metrics, reward_mean the weighted sum, reward_s ~ the slowest (1.2 s, not 2 s)"
else
	tail -n 20 total.log
	fail "three programs: metrics or timing wrong (want reward_s in [1.2, 1.9) s)"
fi

# ---------------------------------------------------------------- 2. each against total
run each --set "$(rewards)" --set grpo.reward_norm=each
if [ "$rc" = 0 ] && py '
a, b = load(sys.argv[1])[0], load(sys.argv[2])[0]
print("  step 1 loss: total %.6g, each %.6g (rewards %.4f, %.4f)" % (a["loss"], b["loss"], a["reward_mean"], b["reward_mean"]))
sys.exit(0 if a["reward_mean"] == b["reward_mean"] and a["loss"] != b["loss"] else 1)' total.jsonl each.jsonl; then
	pass "reward_norm=each: the same rewards, other advantages"
else
	tail -n 20 each.log
	fail "reward_norm=each: want the same step-1 rewards as total and another loss"
fi

# ---------------------------------------------------------------- 3. failures
run fails --set "$(rewards 70)" --set checkpoint.every=1
newest=$(ls fails.ck 2>/dev/null | grep '^step_.*\.h5$' | sort | tail -1)
if [ "$rc" != 0 ] && [ "$rc" -lt 124 ] && grep -q "reward 'parity'.*record id 70 (prompt" fails.log \
	&& grep -q 'exited with status 9' fails.log && [ "$newest" = step_00000001.h5 ] \
	&& [ "$(wc -l <fails.jsonl)" = 1 ] && ! pgrep -f "$W/slow.sh" >/dev/null; then
	pass "a program failing on record 70: $(grep -m1 'record id 70' fails.log | cut -c1-160)"
else
	cat fails.log
	fail "a failing program: rc $rc, newest checkpoint '$newest' (want step_00000001.h5), want the program and record named"
fi
run nostart --set 'grpo.rewards=[{"name": "a", "cmd": ["sh"]}, {"name": "b", "cmd": ["./no_such_reward"]}]'
if [ "$rc" != 0 ] && grep -q 'grpo.rewards\[1\].*no_such_reward' nostart.log; then
	pass "a program that cannot start: $(grep -m1 no_such nostart.log)"
else
	cat nostart.log
	fail "a program that cannot start: want grpo.rewards[1] named"
fi

# ---------------------------------------------------------------- 4. --eval
timeout -k 10 300 "$MOE" grpo --config cfg.json --set 'grpo.reward_cmd=[]' --set "$(rewards)" --set log.metrics= \
	--eval "$W/prompts.jsonl" >eval.log 2>&1
rc=$?
ev=$(grep -m1 '^{"eval"' eval.log)
if [ "$rc" = 0 ] && py '
e = json.loads(sys.argv[1])
print("  " + sys.argv[1])
want = e["reward/digit"] + 0.5 * e["reward/parity"] - 0.25 * e["reward/slow"]
sys.exit(0 if e["prompts"] == 8 and abs(e["reward_mean"] - want) < 1e-5 and "reward_std/slow" in e else 1)' "$ev" \
	&& grep -q '| digit .* | parity .* | slow ' eval.log; then
	pass "--eval: every program's mean and std"
else
	cat eval.log
	fail "--eval: want reward/<name> of every program"
fi

# ---------------------------------------------------------------- 5. bad configs
nbad=0
refused() {  # refused PATTERN [--set ...]
	local pat=$1 name=bad$((++nbad))
	shift
	run "$name" --set train.steps=1 "$@"
	if [ "$rc" != 0 ] && [ "$rc" -lt 124 ] && grep -Eq "$pat" "$name.log"; then
		pass "refused: $(grep -Em1 "$pat" "$name.log")"
	else
		cat "$name.log"
		fail "want a message matching /$pat/"
	fi
}
refused 'grpo\.rewards: \[0\]\.weight' --set 'grpo.rewards=[{"name": "a", "cmd": ["sh"], "weight": "x"}]'
refused 'grpo\.reward_norm' --set "$(rewards)" --set grpo.reward_norm=mean
refused 'grpo\.rewards and grpo\.reward_cmd' --set "$(rewards)" --set "grpo.reward_cmd=[\"$W/reward.sh\"]"

finish " in $(( $(date +%s) - T0 ))s"
