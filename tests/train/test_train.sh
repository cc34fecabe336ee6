#!/usr/bin/env bash
# tests/train/test_train.sh - `moe train` end to end: resume is bit-exact (stopped, and killed with
# SIGKILL at random moments, mid-checkpoint too), bad inputs are refused naming the file and damage
# nothing, a shape-changing resume is refused naming the key.
set -uo pipefail
MOE="${MOE_BIN:?}"
SRC="${MOE_SRC:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-train-test

"$MOE" data synth --out "$W/train_0.bin" --vocab 256 --tokens 6000 --seed 1 >/dev/null
"$MOE" data synth --out "$W/train_1.bin" --vocab 256 --tokens 5000 --seed 2 >/dev/null
"$MOE" data synth --out "$W/val_0.bin" --vocab 256 --tokens 3000 --seed 1 >/dev/null

common=(--config "$SRC/configs/tiny.json" --set "data.train=$W/train_*.bin" --set "data.val=$W/val_*.bin"
	--set train.steps=16 --set train.eval_every=4 --set train.grad_accum=2 --set train.warmup_steps=3
	--set data.shuffle=true)
losses() { python3 -c 'import json,sys
for l in open(sys.argv[1]): d=json.loads(l); print(d["step"], repr(d["loss"]), repr(d["grad_norm"]), d.get("val_loss"))' "$1"; }

# 1. a run that never stops
"$MOE" train "${common[@]}" --set "checkpoint.dir=$W/ref" --set "log.metrics=$W/ref.jsonl" >"$W/ref.log" 2>&1 \
	|| { cat "$W/ref.log"; fail "reference run"; }
[ "$(wc -l <"$W/ref.jsonl")" = 16 ] && pass "reference run logs 16 steps" || fail "reference metrics lines"

# 2. stopped at step 7 (train.stop_at), resumed with --resume latest: identical losses, bit for bit
"$MOE" train "${common[@]}" --set "checkpoint.dir=$W/stop" --set "log.metrics=$W/stop.jsonl" \
	--set train.stop_at=7 >"$W/stop1.log" 2>&1 || fail "stop_at run"
"$MOE" train "${common[@]}" --set "checkpoint.dir=$W/stop" --set "log.metrics=$W/stop.jsonl" \
	--resume latest >"$W/stop2.log" 2>&1 || { cat "$W/stop2.log"; fail "resumed run"; }
if diff <(losses "$W/ref.jsonl") <(losses "$W/stop.jsonl") >/dev/null; then
	pass "stop at 7 + resume = uninterrupted run, bit for bit"
else
	diff <(losses "$W/ref.jsonl") <(losses "$W/stop.jsonl") | head; fail "resume is not bit-exact"
fi
grep -q "resumed from .*step_00000007.h5 at step 7" "$W/stop2.log" && pass "resumed from step 7" \
	|| fail "resume message"
grep -q "train.stop_at changed" "$W/stop2.log" && pass "config changes are logged on resume" \
	|| fail "config change log"

# 3. SIGKILL at random moments (checkpoint every step, so kills land mid-write too), then resume
k=0
for delay in 0.3 0.7 0.45 1.1 0.9 0.6; do
	"$MOE" train "${common[@]}" --set "checkpoint.dir=$W/kill" --set "log.metrics=$W/kill.jsonl" \
		--set checkpoint.every=1 --set checkpoint.keep=2 --resume latest >>"$W/kill.log" 2>&1 &
	pid=$!
	sleep "$delay"
	kill -9 "$pid" 2>/dev/null && k=$((k + 1))
	wait "$pid" 2>/dev/null
done
"$MOE" train "${common[@]}" --set "checkpoint.dir=$W/kill" --set "log.metrics=$W/kill.jsonl" \
	--set checkpoint.every=1 --set checkpoint.keep=2 --resume latest >>"$W/kill.log" 2>&1 \
	|| { tail "$W/kill.log"; fail "final resume after kills"; }
if diff <(losses "$W/ref.jsonl") <(losses "$W/kill.jsonl") >/dev/null; then
	pass "$k SIGKILLs + resume = uninterrupted run, bit for bit"
else
	diff <(losses "$W/ref.jsonl") <(losses "$W/kill.jsonl") | head; fail "resume after SIGKILL differs"
fi
[ "$(ls "$W/kill" | grep -c '^step_.*\.h5$')" = 2 ] && pass "checkpoint.keep=2 keeps two" || fail "keep"

# 4. shape-changing resume refused, naming the key; nothing on disk changes
before=$(cd "$W/stop" && sha256sum * | sha256sum)
out=$("$MOE" train "${common[@]}" --set "checkpoint.dir=$W/stop" --set model.hidden_size=48 \
	--resume latest 2>&1) && fail "shape change accepted"
grep -q "model.hidden_size" <<<"$out" && pass "shape change refused: $(tail -1 <<<"$out")" \
	|| fail "message lacks the key: $out"
[ "$before" = "$(cd "$W/stop" && sha256sum * | sha256sum)" ] && pass "checkpoints untouched" \
	|| fail "checkpoints changed"

# 5. bad inputs, each refused with a message naming the file
expect_error() {  # name, pattern, args...
	local name=$1 pattern=$2
	shift 2
	local out
	if out=$("$MOE" "$@" 2>&1); then
		fail "$name accepted"
	elif grep -q -- "$pattern" <<<"$out"; then
		pass "$name: $(grep -- "$pattern" <<<"$out" | head -1)"
	else
		fail "$name: message lacks '$pattern': $out"
	fi
}
expect_error "missing shards" "$W/nothing_\*.bin" train "${common[@]}" --set "data.train=$W/nothing_*.bin" \
	--set "checkpoint.dir=$W/bad"
head -c 1000 "$W/train_0.bin" >"$W/trunc_0.bin"
expect_error "truncated shard" "trunc_0.bin" train "${common[@]}" --set "data.train=$W/trunc_*.bin" \
	--set "checkpoint.dir=$W/bad"
{ printf 'NOTSHARD'; tail -c +9 "$W/train_0.bin"; } >"$W/magic_0.bin"
expect_error "wrong magic" "magic_0.bin" train "${common[@]}" --set "data.train=$W/magic_*.bin" \
	--set "checkpoint.dir=$W/bad"
"$MOE" data synth --out "$W/big_0.bin" --vocab 1000 --tokens 3000 --pattern random >/dev/null
expect_error "token id >= vocab_size" "big_0.bin" train "${common[@]}" --set "data.train=$W/big_*.bin" \
	--set "checkpoint.dir=$W/bad"
ck=$(ls "$W/stop"/step_*.h5 | tail -1)
head -c 20000 "$ck" >"$W/trunc.h5"
expect_error "truncated checkpoint" "trunc.h5" train "${common[@]}" --set "checkpoint.dir=$W/bad" \
	--resume "$W/trunc.h5"
cp "$ck" "$W/corrupt.h5"
size=$(stat -c %s "$W/corrupt.h5")
printf '\xff\xff\xff\xff\xff\xff\xff\xff' | dd of="$W/corrupt.h5" bs=1 seek=$((size / 2)) conv=notrunc 2>/dev/null
expect_error "corrupt checkpoint" "corrupt.h5" train "${common[@]}" --set "checkpoint.dir=$W/bad" \
	--resume "$W/corrupt.h5"
expect_error "missing checkpoint" "nope.h5" train "${common[@]}" --set "checkpoint.dir=$W/bad" \
	--resume "$W/nope.h5"
[ ! -e "$W/bad" ] || [ -z "$(ls -A "$W/bad")" ] && pass "failed runs wrote no checkpoint" \
	|| fail "a failed run wrote into checkpoint.dir"

# 6. train.init_checkpoint: weights from a checkpoint, fresh optimizer, step 0
"$MOE" train "${common[@]}" --set "checkpoint.dir=$W/ft" --set "train.init_checkpoint=$ck" \
	--set train.steps=2 >"$W/ft.log" 2>&1 && grep -q "initialised from" "$W/ft.log" \
	&& [ -e "$W/ft/step_00000002.h5" ] && pass "init_checkpoint fine-tuning run" || { cat "$W/ft.log"; fail "init_checkpoint"; }

# 7. moe eval and moe inspect on a training checkpoint
out=$("$MOE" eval --checkpoint "$ck" --data "$W/val_0.bin" 2>&1)
# 3000 tokens, seq_len 32: 93 sequences of 32 predicted tokens
if python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d["tokens"] == 93*32 and 0 < d["loss"] < 6 else 1)' "$out"; then
	pass "moe eval: $out"
else
	fail "moe eval: $out"
fi
"$MOE" inspect "$ck" | grep -q "model.layers.1.mlp.experts.down_proj.weight *\[8, 64, 32\]" \
	&& pass "moe inspect lists the stacked experts" || fail "moe inspect"

# 8. non-finite values: an absurd learning rate blows the weights up; stop names the step, skip goes on
nf=(--set train.lr=1e38 --set train.warmup_steps=0 --set train.grad_clip=0 --set train.steps=6)
out=$("$MOE" train "${common[@]}" "${nf[@]}" --set "checkpoint.dir=$W/nf1" 2>&1) && fail "non-finite: stop accepted"
grep -q "non-finite .* at step" <<<"$out" && pass "non-finite stop: $(grep -m1 non-finite <<<"$out")" \
	|| fail "non-finite stop message: $out"
"$MOE" train "${common[@]}" "${nf[@]}" --set train.on_nonfinite=skip --set "checkpoint.dir=$W/nf2" \
	--set "log.metrics=$W/nf2.jsonl" >"$W/nf2.log" 2>&1 && grep -q '"skipped": true' "$W/nf2.jsonl" \
	&& [ "$(wc -l <"$W/nf2.jsonl")" = 6 ] && pass "non-finite skip: steps skipped, run completes" \
	|| { tail -3 "$W/nf2.log"; fail "non-finite skip"; }

finish
