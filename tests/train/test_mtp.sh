#!/usr/bin/env bash
# tests/train/test_mtp.sh - `moe train` with multi-token prediction (model.num_nextn_predict_layers):
# mtp_loss in every metrics row and falling, loss = ce + aux + mtp_lambda * mtp_loss, the train.mtp_lambda
# schedule followed step by step; a stopped run resumes exactly; under mpirun (ep 2, dp 2, dp 2 x ep 2)
# one process's losses; moe convert to Hugging Face and back gives the same weights (f32 exactly, the
# MTP layer under HF's names with the shared copies), fp8 too; bad keys, train.device=cuda and a resume
# with another depth refused naming the key.
set -uo pipefail
MOE="${MOE_BIN:?}"
SRC="${MOE_SRC:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-mtp-test

# a repeated phrase: the next-but-one token is as predictable as the next
"$MOE" data synth --out "$W/train_0.bin" --vocab 256 --tokens 40000 --pattern repeat --period 24 --seed 1 >/dev/null
base=(--config "$SRC/configs/tiny.json" --set "data.train=$W/train_*.bin" --set data.val= --set train.device=cpu
	--set train.warmup_steps=2 --set train.micro_batch=2 --set train.seq_len=16 --set data.shuffle=true
	--set model.num_nextn_predict_layers=1 --set train.lr=3e-3)

cat >"$W/check.py" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
sched = json.loads(sys.argv[2])  # {"steps": [...], "values": [...]}
for r in rows:
    for k in ("mtp_loss", "mtp_lambda", "ce_loss", "loss"):
        if k not in r:
            print("step %d lacks %s" % (r["step"], k)); sys.exit(1)
    s = r["step"] - 1  # the row of update s (0-based)
    lam = [v for st, v in zip(sched["steps"], sched["values"]) if st <= s][-1]
    if abs(r["mtp_lambda"] - lam) > 1e-6:
        print("step %d: mtp_lambda %g, the schedule says %g" % (r["step"], r["mtp_lambda"], lam)); sys.exit(1)
    want = r["ce_loss"] + r["aux_loss"] + lam * r["mtp_loss"]
    if abs(r["loss"] - want) > 1e-4 * abs(want):
        print("step %d: loss %g, ce + aux + lambda mtp = %g" % (r["step"], r["loss"], want)); sys.exit(1)
first = rows[0]["mtp_loss"]
last = sum(r["mtp_loss"] for r in rows[-3:]) / 3
print("mtp_loss %.4f -> %.4f, ce %.4f -> %.4f over %d steps" % (first, last, rows[0]["ce_loss"], rows[-1]["ce_loss"], len(rows)))
sys.exit(0 if last < 0.5 * first else 1)
PY

# 1. mtp_loss falls; V3's two-phase lambda (0.3, then 0.1) followed
sched='{"steps": [0, 20], "values": [0.3, 0.1]}'
"$MOE" train "${base[@]}" --set train.steps=40 --set "train.mtp_lambda=$sched" --set "checkpoint.dir=$W/a" \
	--set "log.metrics=$W/a.jsonl" >"$W/a.log" 2>&1 || { tail "$W/a.log"; fail "training with MTP"; }
if out=$(python3 "$W/check.py" "$W/a.jsonl" "$sched") && grep -q "| mtp " "$W/a.log"; then
	pass "$out (lambda 0.3 then 0.1 from step 20)"
else
	echo "$out"; tail -3 "$W/a.log"; fail "mtp_loss does not fall (or the rows disagree with the schedule)"
fi
CK="$W/a/step_00000040.h5"
"$MOE" train "${base[@]}" --set model.num_nextn_predict_layers=0 --set train.steps=1 --set "checkpoint.dir=$W/plain" \
	>/dev/null 2>&1 && cp "$W/plain/step_00000001.h5" "$W/teacher_plain.h5"
if h5ls "$CK/model" 2>/dev/null | grep -q "model.layers.2.eh_proj.weight *Dataset {64, 128}" &&
   h5ls "$CK/model" | grep -q "model.layers.2.shared_head.norm.weight" &&
   h5ls "$CK/model" | grep -q "model.layers.2.mlp.experts.gate_proj.weight"; then
	pass "the checkpoint holds the MTP layer as model.layers.2.* (eh_proj [64, 128], shared_head.norm, experts)"
else
	h5ls "$CK/model" | head; fail "the checkpoint lacks the MTP layer"
fi

# 2. stopped at step 3 and resumed: the uninterrupted run's metrics exactly
run=("${base[@]}" --set train.steps=6 --set train.grad_accum=2 --set "train.mtp_lambda={\"steps\": [0, 4], \"values\": [0.5, 0.2]}")
"$MOE" train "${run[@]}" --set "checkpoint.dir=$W/ref" --set "log.metrics=$W/ref.jsonl" >"$W/ref.log" 2>&1 ||
	{ tail "$W/ref.log"; fail "reference"; }
"$MOE" train "${run[@]}" --set "checkpoint.dir=$W/rs" --set "log.metrics=$W/rs.jsonl" --set train.stop_at=3 \
	>"$W/rs1.log" 2>&1 || { tail "$W/rs1.log"; fail "stopped"; }
"$MOE" train "${run[@]}" --set "checkpoint.dir=$W/rs" --set "log.metrics=$W/rs.jsonl" --resume latest \
	>"$W/rs2.log" 2>&1 || { tail "$W/rs2.log"; fail "resumed"; }
strip() { sed -E 's/"(tokens_per_s|elapsed_s|step_s|comm_s)": [0-9.e+-]*, //g' "$1"; }
if [ "$(strip "$W/ref.jsonl")" = "$(strip "$W/rs.jsonl")" ] && [ "$(wc -l <"$W/rs.jsonl")" = 6 ]; then
	pass "stopped at step 3 and resumed: the uninterrupted run's metrics (mtp_loss included) exactly"
else
	diff <(strip "$W/ref.jsonl") <(strip "$W/rs.jsonl") | head; fail "the resumed run differs"
fi

# 3. under mpirun: ep 2 and dp 2 give one process's losses (2 micro-batches), dp 2 x ep 2 too (4)
cat >"$W/cmp.py" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
if [r["step"] for r in a] != [r["step"] for r in b]:
    print("steps differ"); sys.exit(1)
worst = max(abs(x[k] - y[k]) / abs(x[k]) for x, y in zip(a, b) for k in ("loss", "ce_loss", "mtp_loss"))
print("worst relative difference of loss, ce_loss, mtp_loss %.2e over %d steps" % (worst, len(a)))
sys.exit(0 if worst < 1e-4 else 1)
PY
dist=("${base[@]}" --set train.steps=6)
for ep in 2 1; do
	mpi -np 2 "$MOE" train "${dist[@]}" --set parallel.ep=$ep --set "checkpoint.dir=$W/m$ep" \
		--set "log.metrics=$W/m$ep.jsonl" >"$W/m$ep.log" 2>&1 || { tail "$W/m$ep.log"; fail "mpirun ep $ep"; continue; }
	if out=$(python3 "$W/cmp.py" "$W/ref2.jsonl" "$W/m$ep.jsonl" 2>/dev/null) ||
	   { [ -f "$W/ref2.jsonl" ] || { "$MOE" train "${dist[@]}" --set train.grad_accum=2 --set "checkpoint.dir=$W/ref2" \
		--set "log.metrics=$W/ref2.jsonl" >"$W/ref2.log" 2>&1; }; out=$(python3 "$W/cmp.py" "$W/ref2.jsonl" "$W/m$ep.jsonl"); }; then
		if grep -q "of 2 ranks (dp $((2 / ep)) x ep $ep)" "$W/m$ep.log"; then
			pass "mpirun -np 2, ep $ep (dp $((2 / ep))): $out"
		else
			fail "mpirun -np 2, ep $ep: no layout line"
		fi
	else
		echo "$out"; fail "mpirun -np 2, ep $ep differs from one process"
	fi
done
dp2_ep2_equals_one "${dist[@]}"

# 4. to Hugging Face and back: the same weights (f32), the MTP layer under HF's names; fp8 as well
"$MOE" convert --to-hf "$CK" --out "$W/hf" >"$W/c1.log" 2>&1 &&
	"$MOE" convert --from-hf "$W/hf" --out "$W/back.h5" >"$W/c2.log" 2>&1 || { cat "$W/c1.log" "$W/c2.log"; fail "convert"; }
if h5diff "$CK" "$W/back.h5" /model /model >"$W/h5diff.log" 2>&1 &&
   grep -Eq '"num_nextn_predict_layers":[[:space:]]*1,' "$W/hf/config.json" &&
   python3 - "$W/hf/model.safetensors" <<'PY'
import json, struct, sys
f = open(sys.argv[1], "rb")
n = struct.unpack("<Q", f.read(8))[0]
h = json.loads(f.read(n))
for k in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight", "shared_head.head.weight",
          "embed_tokens.weight", "self_attn.kv_b_proj.weight", "mlp.experts.7.up_proj.weight"):
    if "model.layers.2." + k not in h:
        print("no model.layers.2." + k); sys.exit(1)
# the shared copies hold the model's own embedding and lm_head
f.seek(8 + n)
data = f.read()
def raw(name):
    a, b = h[name]["data_offsets"]
    return data[a:b]
sys.exit(0 if raw("model.layers.2.shared_head.head.weight") == raw("lm_head.weight") and
         raw("model.layers.2.embed_tokens.weight") == raw("model.embed_tokens.weight") else 1)
PY
then
	pass "to-hf -> from-hf: the weights bit for bit; model.layers.2.{eh_proj,enorm,hnorm,shared_head.*,embed_tokens,...} in the file, the copies equal to lm_head and the embedding"
else
	head "$W/h5diff.log"; fail "the MTP round trip through Hugging Face's layout"
fi
"$MOE" convert --to-hf "$CK" --out "$W/hf8" --dtype fp8 >"$W/c3.log" 2>&1 &&
	"$MOE" convert --from-hf "$W/hf8" --out "$W/back8.h5" >"$W/c4.log" 2>&1 || { cat "$W/c3.log" "$W/c4.log"; fail "convert fp8"; }
if grep -q "F8_E4M3 weights dequantised" "$W/c4.log" && grep -q "shared_head.head copies" "$W/c4.log" &&
   "$MOE" train "${base[@]}" --set train.steps=1 --set "train.init_checkpoint=$W/back8.h5" \
	--set "checkpoint.dir=$W/f8" >"$W/f8.log" 2>&1; then
	pass "to-hf --dtype fp8 -> from-hf: $(grep -m1 -o '[0-9]* F8_E4M3 weights dequantised' "$W/c4.log"), the MTP model trains from it"
else
	cat "$W/c4.log"; tail -3 "$W/f8.log"; fail "the fp8 round trip"
fi

# 5. moe generate --speculative: the MTP head drafts, the main model verifies: greedy's tokens exactly
gen=(--checkpoint "$CK" --prompt-ids 5,17,99,3,42 --temperature 0 --max-new-tokens 40 --eos -1)
if "$MOE" generate "${gen[@]}" >"$W/plain.txt" 2>"$W/plain.err" &&
   "$MOE" generate "${gen[@]}" --speculative >"$W/spec.txt" 2>"$W/spec.err" &&
   cmp -s "$W/plain.txt" "$W/spec.txt" && grep -q "drafts accepted" "$W/spec.err"; then
	pass "moe generate --speculative: greedy's 40 tokens exactly; $(grep -o '[0-9]* of [0-9]* drafts accepted ([0-9.]*%)' "$W/spec.err")"
else
	cat "$W/plain.err" "$W/spec.err"; diff "$W/plain.txt" "$W/spec.txt"; fail "moe generate --speculative"
fi
if ! "$MOE" generate "${gen[@]}" --speculative --temperature 0.8 >/dev/null 2>"$W/g1.err" && grep -q "temperature 0" "$W/g1.err" &&
   ! "$MOE" generate --checkpoint "$W/teacher_plain.h5" --prompt-ids 1,2 --temperature 0 --speculative >/dev/null 2>"$W/g2.err" &&
   grep -q "num_nextn_predict_layers = 0" "$W/g2.err"; then
	pass "moe generate --speculative refuses sampling and a checkpoint without MTP: $(cat "$W/g2.err")"
else
	cat "$W/g1.err" "$W/g2.err"; fail "moe generate --speculative refusals"
fi

# 6. refused, naming the key
expect_fail "train.device=cuda" "num_nextn_predict_layers > 0: multi-token prediction runs on the CPU" \
	"${base[@]}" --set train.device=cuda
expect_fail "too many depths" "model.num_nextn_predict_layers=9: at most 8" "${base[@]}" --set model.num_nextn_predict_layers=9
expect_fail "negative depth" "model.num_nextn_predict_layers=-1 must be >= 0" "${base[@]}" --set model.num_nextn_predict_layers=-1
expect_fail "negative lambda" "train.mtp_lambda: must be a finite number >= 0" "${base[@]}" --set train.mtp_lambda=-0.1
expect_fail "bad schedule" "train.mtp_lambda: steps\[2\]=5 must be > steps\[1\]" "${base[@]}" \
	--set 'train.mtp_lambda={"steps": [0, 5, 5], "values": [1, 2, 3]}'
expect_fail "schedule not from 0" "train.mtp_lambda: steps\[0\]=3 must be 0" "${base[@]}" \
	--set 'train.mtp_lambda={"steps": [3], "values": [1]}'
if "$MOE" train "${run[@]}" --set model.num_nextn_predict_layers=2 --set train.steps=8 --set "checkpoint.dir=$W/rs" \
	--resume latest >"$W/x.log" 2>&1; then
	fail "resume with another depth: accepted"
elif grep -q "model.num_nextn_predict_layers = 1, the config says 2" "$W/x.log"; then
	pass "resume with another depth: $(grep -m1 num_nextn "$W/x.log")"
else
	cat "$W/x.log"; fail "resume with another depth: no message naming the key"
fi

finish
