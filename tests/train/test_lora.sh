#!/usr/bin/env bash
# tests/train/test_lora.sh - `moe train` with a lora section, end to end: adapters trained over a frozen
# base (the loss falls, the base file is untouched, the checkpoint holds only the adapters and the base's
# path and checksum); a stopped run resumes exactly; `moe eval` / `moe generate` of the adapter checkpoint;
# `moe lora merge` gives a full checkpoint whose eval loss and samples are the adapter model's; a changed
# base is refused (eval, resume); bad lora keys refused naming the key; under mpirun (ep 2, dp 2, dp 2 x
# ep 2) the losses of one process.
set -uo pipefail
MOE="${MOE_BIN:?}"
SRC="${MOE_SRC:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-lora-test

"$MOE" data synth --out "$W/train_0.bin" --vocab 256 --tokens 40000 --seed 1 >/dev/null
"$MOE" data synth --out "$W/val_0.bin" --vocab 256 --tokens 4000 --seed 2 >/dev/null
base=(--config "$SRC/configs/tiny.json" --set "data.train=$W/train_*.bin" --set data.val= --set train.device=cpu
	--set train.warmup_steps=2 --set train.micro_batch=2 --set train.seq_len=16 --set data.shuffle=true)

# the base: tiny.json (2 layers of 64, 8 routed experts and a shared one), trained briefly
"$MOE" train "${base[@]}" --set train.steps=20 --set train.lr=3e-3 --set "checkpoint.dir=$W/base" \
	>"$W/base.log" 2>&1 || { tail "$W/base.log"; fail "base"; finish; }
BASE="$W/base/step_00000020.h5"
sum0=$(sha256sum <"$BASE")

lora=("${base[@]}" --set "train.init_checkpoint=$BASE" --set lora.rank=4 --set lora.alpha=8
	--set 'lora.targets=["q_a_proj","q_b_proj","kv_a_proj_with_mqa","kv_b_proj","o_proj","gate_proj","up_proj","down_proj","experts.gate_proj","experts.up_proj","experts.down_proj"]'
	--set train.lr=1e-2)

# 1. the adapters learn; the base is frozen; the checkpoint holds only adapters
"$MOE" train "${lora[@]}" --set lora.dropout=0.1 --set train.steps=30 --set "checkpoint.dir=$W/ad" \
	--set "log.metrics=$W/ad.jsonl" >"$W/ad.log" 2>&1 || { tail "$W/ad.log"; fail "lora training"; finish; }
AD="$W/ad/step_00000030.h5"
if out=$(python3 - "$W/ad.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
first = sum(r["loss"] for r in rows[:3]) / 3
last = sum(r["loss"] for r in rows[-3:]) / 3
print("loss %.4f -> %.4f over %d steps" % (first, last, len(rows)))
sys.exit(0 if last < 0.99 * first else 1)
PY
); then pass "adapters learn: $out"; else echo "$out"; fail "the loss does not fall"; fi
mem=$(grep -m1 "^lora: " "$W/ad.log")
if [[ "$mem" == *"MiB saved"* ]]; then pass "memory: $mem"; else fail "no memory report"; fi
if [ "$(sha256sum <"$BASE")" = "$sum0" ]; then pass "the base checkpoint is untouched"; else fail "base changed"; fi
names=$(h5ls "$AD/model" | awk '{print $1}')
if [ -n "$names" ] && ! grep -qv '\.lora_[AB]\.weight$' <<<"$names" &&
   grep -q 'model.layers.1.mlp.experts.up_proj.lora_B.weight' <<<"$names" &&
   h5ls "$AD/optim" >/dev/null 2>&1; then
	pass "the checkpoint holds $(wc -l <<<"$names") adapter tensors and their AdamW state, nothing of the base"
else
	echo "$names" | head; fail "the adapter checkpoint holds other tensors"
fi
if "$MOE" inspect "$AD" | grep -q "LoRA adapters: rank 4, alpha 8.*on base $BASE (checksum [0-9a-f]\{16\})"; then
	pass "inspect names the base and its checksum"
else
	"$MOE" inspect "$AD" | head -5; fail "inspect"
fi

# 2. stopped at step 4 and resumed (base reloaded, dropout masks replayed): the uninterrupted run exactly
strip() { sed -E 's/"(tokens_per_s|elapsed_s|step_s|comm_s)": [0-9.e+-]*, //g' "$1"; }
run=("${lora[@]}" --set lora.dropout=0.1 --set train.steps=8 --set train.grad_accum=2)
"$MOE" train "${run[@]}" --set "checkpoint.dir=$W/u" --set "log.metrics=$W/u.jsonl" >"$W/u.log" 2>&1 ||
	{ tail "$W/u.log"; fail "uninterrupted"; }
"$MOE" train "${run[@]}" --set "checkpoint.dir=$W/rs" --set "log.metrics=$W/rs.jsonl" --set train.stop_at=4 \
	>"$W/rs1.log" 2>&1 || { tail "$W/rs1.log"; fail "stopped"; }
"$MOE" train "${run[@]}" --set "checkpoint.dir=$W/rs" --set "log.metrics=$W/rs.jsonl" --resume latest \
	>"$W/rs2.log" 2>&1 || { tail "$W/rs2.log"; fail "resumed"; }
if grep -q "resumed from" "$W/rs2.log" && [ "$(strip "$W/u.jsonl")" = "$(strip "$W/rs.jsonl")" ] &&
   h5diff "$W/u/step_00000008.h5" "$W/rs/step_00000008.h5" /model /model >/dev/null 2>&1; then
	pass "stopped at step 4 and resumed: the uninterrupted run's metrics and adapters exactly"
else
	diff <(strip "$W/u.jsonl") <(strip "$W/rs.jsonl") | head; fail "the resumed run differs"
fi

# 3. eval and generate of the adapter checkpoint; merged: the same loss and the same samples
ev() { "$MOE" eval --checkpoint "$1" --data "$W/val_0.bin" | python3 -c 'import json,sys; print(json.load(sys.stdin)["loss"])'; }
la=$(ev "$AD") lb=$(ev "$BASE")
"$MOE" lora merge --checkpoint "$AD" --out "$W/merged.h5" >"$W/merge.log" 2>&1 || { cat "$W/merge.log"; fail "merge"; }
lm=$(ev "$W/merged.h5")
if python3 -c "import sys; a,b,m=map(float,sys.argv[1:]); sys.exit(0 if abs(a-m) <= 1e-5*abs(a) and abs(a-b) > 1e-4 else 1)" \
	"$la" "$lb" "$lm"; then
	pass "eval: adapters $la, merged $lm (base $lb)"
else
	fail "eval: adapters $la, merged $lm, base $lb"
fi
if "$MOE" inspect "$W/merged.h5" | grep -q "LoRA"; then fail "the merged checkpoint still names adapters"; fi
q1=$("$MOE" eval --checkpoint "$AD" --data "$W/val_0.bin" --weights int8) q2=$("$MOE" eval --checkpoint "$W/merged.h5" --data "$W/val_0.bin" --weights int8)
if [ -n "$q1" ] && [ "$q1" = "$q2" ]; then pass "eval --weights int8: adapters (merged, then quantised) = merged: $q1"; else
	fail "eval --weights int8: adapters $q1, merged $q2"; fi
g1=$("$MOE" generate --checkpoint "$AD" --prompt-ids 5,6,7 --max-new-tokens 12 --seed 3 2>/dev/null | tail -1)
g2=$("$MOE" generate --checkpoint "$W/merged.h5" --prompt-ids 5,6,7 --max-new-tokens 12 --seed 3 2>/dev/null | tail -1)
if [ -n "$g1" ] && [ "$g1" = "$g2" ]; then pass "generate: the adapter and merged checkpoints sample '$g1'"; else
	fail "generate: adapters '$g1', merged '$g2'"; fi

# 4. a changed base is refused (eval, generate, resume)
cp "$BASE" "$W/base2.h5"
"$MOE" train "${lora[@]}" --set "train.init_checkpoint=$W/base2.h5" --set train.steps=2 --set "checkpoint.dir=$W/c" \
	>"$W/c.log" 2>&1 || { tail "$W/c.log"; fail "adapters on the copy"; }
"$MOE" init --config "$SRC/configs/tiny.json" --set train.seed=9 --out "$W/base2.h5" >/dev/null  # same shapes
if "$MOE" eval --checkpoint "$W/c/step_00000002.h5" --data "$W/val_0.bin" >"$W/x.log" 2>&1; then
	fail "eval on a changed base: accepted"
elif grep -q "changed since the adapters were trained" "$W/x.log"; then pass "eval refuses a changed base: $(cat "$W/x.log")"
else cat "$W/x.log"; fail "eval on a changed base: no clear message"; fi
if "$MOE" generate --checkpoint "$W/c/step_00000002.h5" --prompt-ids 1 --max-new-tokens 2 >"$W/x.log" 2>&1; then
	fail "generate on a changed base: accepted"
else grep -q "changed since" "$W/x.log" && pass "generate refuses it too" || { cat "$W/x.log"; fail "generate msg"; }; fi
if "$MOE" train "${lora[@]}" --set "train.init_checkpoint=$W/base2.h5" --set train.steps=4 --set "checkpoint.dir=$W/c" \
	--resume latest >"$W/x.log" 2>&1; then
	fail "resume on a changed base: accepted"
elif grep -q "refusing to resume on another model" "$W/x.log"; then pass "resume refuses a changed base"
else cat "$W/x.log"; fail "resume on a changed base: no clear message"; fi

# 5. refused: bad lora keys, and what LoRA does not take
expect_fail "unknown target" "lora.targets: unknown module 'lm_head'" "${lora[@]}" --set 'lora.targets=["o_proj","lm_head"]'
expect_fail "no targets" "lora.targets is empty" "${lora[@]}" --set 'lora.targets=[]'
expect_fail "a target twice" "'o_proj' is named twice" "${lora[@]}" --set 'lora.targets=["o_proj","o_proj"]'
expect_fail "targets not a list" "lora.targets" "${lora[@]}" --set 'lora.targets=7'
expect_fail "a module the model lacks" "no q_proj module" "${lora[@]}" --set 'lora.targets=["q_proj"]'
expect_fail "dropout" "lora.dropout=1 must be in \[0, 1)" "${lora[@]}" --set lora.dropout=1
expect_fail "alpha" "lora.alpha" "${lora[@]}" --set lora.alpha=0
expect_fail "no base" "needs the base model" "${lora[@]}" --set train.init_checkpoint=
expect_fail "ZeRO" "parallel.zero=1 with lora" "${lora[@]}" --set parallel.zero=1
expect_fail "the GPU" "train.device=cuda with lora" "${lora[@]}" --set train.device=cuda
expect_fail "MTP depths" "lora with model.num_nextn_predict_layers=1" "${lora[@]}" --set model.num_nextn_predict_layers=1
expect_fail "a full checkpoint resumed as adapters" "is a full checkpoint, not LoRA adapters" "${lora[@]}" \
	--resume "$BASE"
expect_fail "adapters resumed by a full run" "holds LoRA adapters and this run has no lora section" "${base[@]}" \
	--resume "$AD"

# 6. under mpirun: ep 2 (the routed experts' adapters split too) and dp 2 give one process's losses
cat >"$W/cmp.py" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
if [r["step"] for r in a] != [r["step"] for r in b]:
    print("steps differ"); sys.exit(1)
worst = max(abs(x[k] - y[k]) / abs(x[k]) for x, y in zip(a, b) for k in ("loss", "grad_norm"))
print("worst relative difference of loss, grad_norm %.2e over %d steps" % (worst, len(a)))
sys.exit(0 if worst < 1e-4 else 1)
PY
# dropout 0: its masks follow the rows each rank holds.  AdamW moves an element by about lr whatever its
# gradient, so the few near-zero gradients summed in another order may differ by ~1e-5 after 6 steps;
# a wrong gradient would differ by ~lr (1e-2)
dist=("${lora[@]}" --set train.steps=6)
"$MOE" train "${dist[@]}" --set train.grad_accum=2 --set "checkpoint.dir=$W/ref" --set "log.metrics=$W/ref.jsonl" \
	>"$W/ref.log" 2>&1 || { tail "$W/ref.log"; fail "reference"; }
for ep in 2 1; do
	mpi -np 2 "$MOE" train "${dist[@]}" --set parallel.ep=$ep --set "checkpoint.dir=$W/m$ep" \
		--set "log.metrics=$W/m$ep.jsonl" >"$W/m$ep.log" 2>&1 || { tail "$W/m$ep.log"; fail "mpirun ep $ep"; continue; }
	if out=$(python3 "$W/cmp.py" "$W/ref.jsonl" "$W/m$ep.jsonl") &&
	   grep -q "of 2 ranks (dp $((2 / ep)) x ep $ep)" "$W/m$ep.log" &&
	   h5diff -d 1e-3 "$W/ref/step_00000006.h5" "$W/m$ep/step_00000006.h5" /model /model >"$W/d$ep.log" 2>&1; then
		pass "mpirun -np 2, ep $ep (dp $((2 / ep))): $out; the adapters agree within lr/10"
	else
		echo "$out"; head -4 "$W/d$ep.log"; fail "mpirun -np 2, ep $ep differs from one process"
	fi
done
dp2_ep2_equals_one "${dist[@]}"

finish
