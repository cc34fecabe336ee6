#!/usr/bin/env bash
# tests/train/test_resume_damaged.sh - `--resume latest` when the newest checkpoints are damaged: it takes
# the newest one that loads, names each one skipped with its defect, leaves them as they are, and the run
# continues to the losses of an uninterrupted run, bit for bit; with none that loads it refuses to start
# (an auto-restarted job must not start afresh over its run); `--resume PATH` still refuses a damaged
# file.  Under mpirun (2 ranks, ep 2) a defect in the experts only rank 1 reads makes every rank skip
# that checkpoint together.
set -uo pipefail
MOE="${MOE_BIN:?}"
SRC="${MOE_SRC:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-resume-damaged-test

"$MOE" data synth --out "$W/train_0.bin" --vocab 256 --tokens 8000 --seed 1 >/dev/null
common=(--config "$SRC/configs/tiny.json" --set "data.train=$W/train_*.bin" --set data.val= --set train.steps=6
	--set train.eval_every=0 --set train.warmup_steps=2 --set checkpoint.every=2 --set checkpoint.keep=3
	--set train.device=cpu --set data.shuffle=true)
losses() { python3 -c 'import json,sys
for l in open(sys.argv[1]): d=json.loads(l); print(d["step"], repr(d["loss"]), repr(d["grad_norm"]))' "$1"; }
flip() {  # file, offset: 8 bytes of 0xff
	printf '\xff\xff\xff\xff\xff\xff\xff\xff' | dd of="$1" bs=1 seek="$2" conv=notrunc 2>/dev/null
}
sums() { (cd "$1" && sha256sum step_* | sha256sum); }

# 1. one process: step 6 truncated, step 4 with flipped data bytes, step 2 whole
"$MOE" train "${common[@]}" --set "checkpoint.dir=$W/ref" --set "log.metrics=$W/ref.jsonl" >"$W/ref.log" 2>&1 \
	|| { cat "$W/ref.log"; fail "reference run"; }
cp -r "$W/ref" "$W/a"
size=$(stat -c %s "$W/a/step_00000004.h5")
truncate -s 30000 "$W/a/step_00000006.h5"
flip "$W/a/step_00000004.h5" $((size / 2))
damaged=$(cd "$W/a" && sha256sum step_00000004.h5 step_00000006.h5)
head -n 2 "$W/ref.jsonl" >"$W/a.jsonl"
"$MOE" train "${common[@]}" --set "checkpoint.dir=$W/a" --set "log.metrics=$W/a.jsonl" --set train.stop_at=3 \
	--resume latest >"$W/a.log" 2>&1 || { cat "$W/a.log"; fail "resume over two damaged checkpoints"; }
grep -q "resume: skipping $W/a/step_00000006.h5: not a readable HDF5 file" "$W/a.log" \
	&& pass "skipped: $(grep -m1 'skipping.*step_00000006' "$W/a.log" | cut -c1-150)" || { cat "$W/a.log"; fail "step 6 named"; }
grep -q "resume: skipping $W/a/step_00000004.h5: reading .* failed (checksum mismatch" "$W/a.log" \
	&& pass "skipped: $(grep -m1 'skipping.*step_00000004' "$W/a.log" | cut -c1-150)" || { cat "$W/a.log"; fail "step 4 named"; }
grep -q "resumed from $W/a/step_00000002.h5 at step 2" "$W/a.log" && grep -q "skipped 2 damaged checkpoints" "$W/a.log" \
	&& pass "resumed from step 2, the newest that loads" || fail "resumed from the wrong checkpoint"
[ "$damaged" = "$(cd "$W/a" && sha256sum step_00000004.h5 step_00000006.h5)" ] \
	&& pass "the damaged checkpoints are left as they were" || fail "damaged checkpoints changed"
"$MOE" train "${common[@]}" --set "checkpoint.dir=$W/a" --set "log.metrics=$W/a.jsonl" --resume latest \
	>"$W/a2.log" 2>&1 || { cat "$W/a2.log"; fail "second resume"; }
if diff <(losses "$W/ref.jsonl") <(losses "$W/a.jsonl") >/dev/null; then
	pass "the run completes with the losses of an uninterrupted run, bit for bit"
else
	diff <(losses "$W/ref.jsonl") <(losses "$W/a.jsonl") | head; fail "losses differ"
fi

# 1b. checkpoint.keep=1 after such a resume: the damaged newer files are not counted, so pruning keeps the
# good checkpoint the resumed run wrote (it used to keep the damaged step 6 and delete the rest)
cp -r "$W/ref" "$W/k"
truncate -s 30000 "$W/k/step_00000006.h5"
flip "$W/k/step_00000004.h5" $((size / 2))
head -n 2 "$W/ref.jsonl" >"$W/k.jsonl"
keep1=(--set checkpoint.keep=1 --set "checkpoint.dir=$W/k" --set "log.metrics=$W/k.jsonl")
"$MOE" train "${common[@]}" "${keep1[@]}" --set train.stop_at=3 --resume latest >"$W/k.log" 2>&1 \
	|| { cat "$W/k.log"; fail "keep=1: resume over damaged checkpoints"; }
[ "$(cd "$W/k" && ls)" = "$(printf 'step_00000003.h5\nstep_00000004.h5\nstep_00000006.h5')" ] \
	&& pass "keep=1: step 3 kept, step 2 pruned, the damaged 4 and 6 left alone" \
	|| { ls "$W/k"; fail "keep=1: pruned the wrong checkpoints"; }
"$MOE" train "${common[@]}" "${keep1[@]}" --resume latest >"$W/k2.log" 2>&1 \
	|| { cat "$W/k2.log"; fail "keep=1: second resume"; }
grep -q "resumed from $W/k/step_00000003.h5 at step 3" "$W/k2.log" && [ "$(cd "$W/k" && ls)" = step_00000006.h5 ] \
	&& diff <(losses "$W/ref.jsonl") <(losses "$W/k.jsonl") >/dev/null \
	&& pass "keep=1: resumed from step 3, wrote over the damaged ones, the uninterrupted run's losses" \
	|| { ls "$W/k"; cat "$W/k2.log"; fail "keep=1: second resume"; }

# 2. --resume PATH still refuses a damaged file; nothing changes on disk
before=$(sums "$W/ref")
cp "$W/ref/step_00000004.h5" "$W/bad.h5"
flip "$W/bad.h5" $((size / 2))
out=$("$MOE" train "${common[@]}" --set "checkpoint.dir=$W/ref" --resume "$W/bad.h5" 2>&1) && fail "damaged PATH accepted"
grep -q "$W/bad.h5: reading .* failed (checksum mismatch" <<<"$out" && ! grep -q skipping <<<"$out" \
	&& pass "--resume PATH refused: $(grep -m1 checksum <<<"$out" | cut -c1-150)" || fail "--resume PATH: $out"
[ "$before" = "$(sums "$W/ref")" ] && pass "checkpoint.dir untouched" || fail "checkpoint.dir changed"

# 3. none loads: refused, the files untouched, nothing started afresh
mkdir "$W/b" && cp "$W/a/step_00000006.h5" "$W/b/" 2>/dev/null
cp "$W/ref/step_00000002.h5" "$W/ref/step_00000004.h5" "$W/b/"
truncate -s 30000 "$W/b/step_00000006.h5"
flip "$W/b/step_00000004.h5" $((size / 2))
flip "$W/b/step_00000002.h5" $((size / 2))
before=$(sums "$W/b")
out=$("$MOE" train "${common[@]}" --set "checkpoint.dir=$W/b" --resume latest 2>&1)
rc=$?
[ "$rc" = 1 ] && grep -q "none of the 3 checkpoints in $W/b loads" <<<"$out" && [ "$(grep -c skipping <<<"$out")" = 3 ] \
	&& pass "none loads: refused, each named: $(grep -m1 'none of' <<<"$out" | cut -c1-120)" \
	|| { echo "$out"; fail "none loads (exit status $rc)"; }
[ "$before" = "$(sums "$W/b")" ] && [ "$(ls "$W/b" | wc -l)" = 3 ] && pass "and nothing was written" \
	|| fail "checkpoint.dir changed"

# 4. a model that differs from the config's is refused, not skipped
out=$("$MOE" train "${common[@]}" --set "checkpoint.dir=$W/a" --set model.hidden_size=48 --resume latest 2>&1) \
	&& fail "shape change accepted"
grep -q "model.hidden_size" <<<"$out" && ! grep -q skipping <<<"$out" && pass "shape change refused, not skipped" \
	|| fail "shape change: $out"

# 5. two ranks, ep 2: the damage lies in the experts only rank 1 reads (its slices are written last, at the
# end of the file): rank 1 names it, both ranks skip it
mpi -np 2 "$MOE" train "${common[@]}" --set parallel.ep=2 --set "checkpoint.dir=$W/dref" \
	--set "log.metrics=$W/dref.jsonl" >"$W/dref.log" 2>&1 || { tail "$W/dref.log"; fail "2-rank reference"; }
cp -r "$W/dref" "$W/d"
flip "$W/d/step_00000006.h5" $(($(stat -c %s "$W/d/step_00000006.h5") - 3000))
head -n 4 "$W/dref.jsonl" >"$W/d.jsonl"
mpi -np 2 "$MOE" train "${common[@]}" --set parallel.ep=2 --set "checkpoint.dir=$W/d" --set "log.metrics=$W/d.jsonl" \
	--resume latest >"$W/d.log" 2>&1 || { tail -n 20 "$W/d.log"; fail "2-rank resume"; }
grep -q "rank 1: resume: skipping $W/d/step_00000006.h5: reading /optim/.*experts" "$W/d.log" \
	&& ! grep -q "rank 0: resume: skipping" "$W/d.log" \
	&& pass "mpirun: $(grep -m1 skipping "$W/d.log" | cut -c1-150)" || { cat "$W/d.log"; fail "rank 1 names it"; }
grep -q "resumed from $W/d/step_00000004.h5 at step 4" "$W/d.log" && pass "mpirun: every rank resumed from step 4" \
	|| fail "mpirun: resumed from"
if diff <(losses "$W/dref.jsonl") <(losses "$W/d.jsonl") >/dev/null; then
	pass "mpirun: the losses of the uninterrupted 2-rank run, bit for bit"
else
	diff <(losses "$W/dref.jsonl") <(losses "$W/d.jsonl") | head; fail "mpirun: losses differ"
fi

finish
