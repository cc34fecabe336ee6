#!/usr/bin/env bash
# tests/rl/test_grpo_int8.sh - 8-bit weights end to end (model/quant.h), on the CPU with the tiny model:
#   1. grpo.rollout_weights=int8: the run learns as with fp32 rollouts (the digit reward of
#      grpo_fixture.sh rises within 15 steps); every step logs logp_mismatch (> 0: the sampler read int8,
#      small) and logp_mismatch_max, and the update's ratio to the old policy is 1 with one iteration of one
#      minibatch (the old log-probabilities are the fp32 policy's, recomputed by the training forward);
#      fp32 rollouts log a mismatch of float rounding only (< 1e-3) and no rollout_weights;
#      under mpirun -np 2 (ep 2: each rank quantises its own experts) the first 3 steps are the single
#      process's: rewards equal, loss to 1e-4, logp_mismatch to 1e-4 at step 1 (the same weights) and to
#      2% later (the layouts' weights differ in the last bits, and a weight at a rounding edge of its
#      int8 grid moves a whole step);
#   2. moe grpo --eval --weights int8 scores the trained policy as the fp32 one does (greedy, 10 prompts);
#   3. moe train a tiny model briefly, then moe eval --weights int8: the loss within 1% of fp32's;
#      moe generate --weights int8 greedy: the same tokens twice;
#   4. --weights with a bad value, or on a command without it, is refused.
set -uo pipefail
MOE="${MOE_BIN:?}"
SRC="${MOE_SRC:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-grpo-int8-test
. "$(dirname "${BASH_SOURCE[0]}")/grpo_fixture.sh"
cd "$W" || exit 1
T0=$(date +%s)
py() {
	local code=$1
	shift
	python3 -c "
import json, math, sys
def load(p):
    return [json.loads(l) for l in open(p)]
$code" "$@"
}

# ---------------------------------------------------------------- 1. int8 rollouts
grpo_fixture 15 ', "epsilon": 0.2, "epsilon_high": 0.2'
for p in one two three four five six seven eight nine ten; do printf '{"prompt": "%s", "tag": "y"}\n' "$p"; done >eval.jsonl
timeout -k 10 300 "$MOE" grpo --config cfg.json --set grpo.rollout_weights=int8 --set checkpoint.dir=q.ck \
	--set log.metrics=q.jsonl >q.log 2>&1
rc=$?
if [ "$rc" = 0 ] && py '
m = load(sys.argv[1])
r = [s["reward_mean"] for s in m]
print("  reward by step:", " ".join("%.2f" % x for x in r))
print("  logp_mismatch by step:", " ".join("%.4f" % s["logp_mismatch"] for s in m),
      "| max", "%.3f" % max(s["logp_mismatch_max"] for s in m), "| ratio_mean", " ".join("%.6f" % s["ratio_mean"] for s in m[:3]))
ok = len(m) == 15 and max(r[:3]) < 0.5 and min(r[-3:]) > 0.8
ok = ok and all(s["rollout_weights"] == "int8" and 0 < s["logp_mismatch"] < 0.1 and s["logp_mismatch"] <= s["logp_mismatch_max"] < 2 for s in m)
ok = ok and all(abs(s["ratio_mean"] - 1) < 1e-5 for s in m)
sys.exit(0 if ok else 1)' q.jsonl; then
	pass "rollout_weights=int8: learns, logs the logp mismatch, ratio 1 against the fp32 old policy"
else
	tail -n 20 q.log
	fail "rollout_weights=int8: want the reward to rise past 0.8, 0 < logp_mismatch < 0.1, ratio 1"
fi
timeout -k 10 300 "$MOE" grpo --config cfg.json --set train.steps=1 --set checkpoint.dir=f.ck --set log.metrics=f.jsonl \
	>f.log 2>&1
if [ "$?" = 0 ] && ! grep -q rollout_weights f.jsonl && py '
m = load(sys.argv[1])
sys.exit(0 if all(s["logp_mismatch"] < 1e-3 for s in m) else 1)' f.jsonl; then
	pass "fp32 rollouts: no rollout_weights, a logp_mismatch of float rounding only"
else
	tail -n 5 f.log
	fail "fp32 rollouts: want no rollout_weights and logp_mismatch < 1e-3"
fi

mpi -np 2 "$MOE" grpo --config cfg.json --set grpo.rollout_weights=int8 --set parallel.ep=2 --set train.grad_accum=2 \
	--set train.steps=3 --set checkpoint.dir=d.ck --set log.metrics=d.jsonl >d.log 2>&1
rc=$?
if [ "$rc" = 0 ] && py '
a, b = load(sys.argv[1])[:3], load(sys.argv[2])
def rel(x, y):
    return abs(x - y) / max(abs(x), abs(y), 1e-2)
bad = [s["step"] for s, t in zip(a, b) if s["reward_mean"] != t["reward_mean"] or rel(s["loss"], t["loss"]) > 1e-4
       or abs(s["logp_mismatch"] - t["logp_mismatch"]) > (1e-4 if s["step"] == 1 else 0.02) * s["logp_mismatch"]]
print("  logp_mismatch 1 process:", [s["logp_mismatch"] for s in a], "2 ranks:", [t["logp_mismatch"] for t in b],
      "; steps differing:", bad)
sys.exit(0 if len(b) == 3 and not bad else 1)' q.jsonl d.jsonl; then
	pass "rollout_weights=int8 under mpirun -np 2, ep 2: the single-process steps"
else
	tail -n 20 d.log
	fail "rollout_weights=int8 under mpirun -np 2, ep 2: differs from one process (rc $rc)"
fi

# ---------------------------------------------------------------- 2. grpo --eval --weights int8
for w in full int8; do
	timeout -k 10 300 "$MOE" grpo --config cfg.json --set log.metrics= --eval "$W/eval.jsonl" \
		--resume q.ck/step_00000015.h5 --weights "$w" >"e_$w.log" 2>&1
	eval "ev_$w=\$(grep -m1 '^{\"eval\"' e_$w.log)"
done
if py '
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print("  full:", sys.argv[1]); print("  int8:", sys.argv[2])
sys.exit(0 if a["prompts"] == b["prompts"] == 10 and abs(a["reward_mean"] - b["reward_mean"]) <= 0.2 else 1)' \
	"$ev_full" "$ev_int8"; then
	pass "grpo --eval --weights int8 scores as fp32 does (within 2 of 10 prompts)"
else
	cat e_int8.log
	fail "grpo --eval --weights int8"
fi

# ---------------------------------------------------------------- 3. moe eval / moe generate
"$MOE" data synth --out tr.bin --vocab 256 --tokens 40000 --seed 1 --period 200 >/dev/null
"$MOE" data synth --out va.bin --vocab 256 --tokens 4000 --seed 1 --period 200 >/dev/null
timeout -k 10 300 "$MOE" train --config "$SRC/configs/tiny.json" --set data.train=tr.bin --set data.val=va.bin \
	--set train.steps=60 --set train.lr=3e-3 --set train.warmup_steps=10 --set checkpoint.dir=t.ck >t.log 2>&1 \
	|| { tail -n 5 t.log; fail "moe train"; }
full=$("$MOE" eval --checkpoint t.ck/step_00000060.h5 --data va.bin 2>&1)
q8=$("$MOE" eval --checkpoint t.ck/step_00000060.h5 --data va.bin --weights int8 2>&1)
if py '
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
d = (b["loss"] - a["loss"]) / a["loss"]
print("  moe eval: fp32 %.6f, int8 %.6f (%+.3f%%)" % (a["loss"], b["loss"], 100 * d))
sys.exit(0 if a["loss"] < 3 and abs(d) < 0.01 and a["loss"] != b["loss"] else 1)' "$full" "$q8"; then
	pass "moe eval --weights int8: within 1% of fp32 on a trained model"
else
	fail "moe eval --weights int8: '$q8' against '$full'"
fi
gen() { "$MOE" generate --checkpoint t.ck/step_00000060.h5 --prompt-ids 5,6,7 --temperature 0 --max-new-tokens 24 "$@" 2>/dev/null; }
g1=$(gen --weights int8)
g2=$(gen --weights int8)
gf=$(gen)
if [ -n "$g1" ] && [ "$g1" = "$g2" ]; then
	pass "moe generate --weights int8, greedy: the same 24 tokens twice ($g1; fp32: $gf)"
else
	fail "moe generate --weights int8: '$g1' then '$g2'"
fi

# ---------------------------------------------------------------- 4. refused
"$MOE" eval --checkpoint t.ck/step_00000060.h5 --data va.bin --weights int4 >bad1.log 2>&1
r1=$?
"$MOE" generate --checkpoint t.ck/step_00000060.h5 --prompt-ids 5 --weights fp16 >bad2.log 2>&1
r2=$?
"$MOE" grpo --config cfg.json --weights int8 >bad3.log 2>&1
r3=$?
"$MOE" train --config cfg.json --weights int8 >bad4.log 2>&1
r4=$?
if [ "$r1" != 0 ] && grep -q 'int4' bad1.log && [ "$r2" != 0 ] && grep -q 'weights' bad2.log \
	&& [ "$r3" != 0 ] && grep -q 'rollout_weights' bad3.log && [ "$r4" != 0 ] && grep -q weights bad4.log; then
	pass "bad --weights refused: $(head -c 120 bad1.log)"
else
	cat bad1.log bad2.log bad3.log bad4.log
	fail "bad --weights: rc $r1 $r2 $r3 $r4"
fi

finish " in $(( $(date +%s) - T0 ))s"
