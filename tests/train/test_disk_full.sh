#!/usr/bin/env bash
# tests/train/test_disk_full.sh - `moe train` with checkpoint.dir on a full file system (a tmpfs with room
# for one and a half checkpoints): the failed save ends the run with exit status 1 (it used to die with
# SIGSEGV in HDF5's exit handler) and a message naming the file and "No space left on device"; the
# previous checkpoint stays byte-identical, no temporary file is left, and the run resumes from it, on a
# disk with room, to the losses of an uninterrupted run.  Under mpirun (2 ranks, ep 2: the second rank
# writes its experts into the file rank 0 made) the job ends the same way.  Mounting needs root (CI runs
# as root); where it is refused the test is skipped (exit 77), and test_checkpoint's file-size-limit test
# still covers every failure point of the writers.
set -uo pipefail
MOE="${MOE_BIN:?}"
SRC="${MOE_SRC:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-disk-full-test

mounts=()
trap 'for m in "${mounts[@]}"; do umount "$m"; done; rm -rf "$W"' EXIT
# a tmpfs of `size` KiB at dir
small_fs() {
	mkdir -p "$1" && mount -t tmpfs -o "size=$2k" tmpfs "$1" 2>/dev/null && mounts+=("$1")
}
small_fs "$W/probe" 64 || { echo "SKIP: cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)"; exit 77; }

"$MOE" data synth --out "$W/train_0.bin" --vocab 256 --tokens 8000 --seed 1 >/dev/null
common=(--config "$SRC/configs/tiny.json" --set "data.train=$W/train_*.bin" --set data.val= --set train.steps=5
	--set train.eval_every=0 --set train.warmup_steps=2 --set checkpoint.every=1 --set checkpoint.keep=2
	--set train.device=cpu)
losses() { python3 -c 'import json,sys
for l in open(sys.argv[1]): d=json.loads(l); print(d["step"], repr(d["loss"]), repr(d["grad_norm"]))' "$1"; }
clean_exit() {  # log: no crash, exit status 1
	if [ "$2" = 1 ] && ! grep -qiE "segmentation|signal 11|core dumped" "$1"; then
		return 0
	fi
	echo "exit status $2"; tail -n 20 "$1"; return 1
}

"$MOE" train "${common[@]}" --set "checkpoint.dir=$W/ref" --set "log.metrics=$W/ref.jsonl" >"$W/ref.log" 2>&1 \
	|| { cat "$W/ref.log"; fail "reference run"; }
size=$(stat -c %s "$W/ref/step_00000005.h5")
kib=$(((size * 3 / 2 + 1023) / 1024))

# 1. one process: step 1 is saved, step 2 finds the disk full
small_fs "$W/full" "$kib" || fail "mount"
"$MOE" train "${common[@]}" --set "checkpoint.dir=$W/full" --set "log.metrics=$W/full.jsonl" >"$W/f1.log" 2>&1
rc=$?
clean_exit "$W/f1.log" $rc && pass "full disk: exit status 1, no crash" || fail "full disk: exit status"
grep -q "step_00000002.h5: .*No space left on device" "$W/f1.log" \
	&& pass "message: $(grep -m1 'No space' "$W/f1.log" | cut -c1-160)" || { cat "$W/f1.log"; fail "message"; }
grep -q "the checkpoint of step 2 was not written; the earlier ones in $W/full are kept" "$W/f1.log" \
	&& pass "says the earlier checkpoints are kept" || fail "kept message"
[ "$(ls "$W/full")" = step_00000001.h5 ] && pass "only step 1 on the disk, no temporary file" \
	|| fail "files left: $(ls "$W/full")"
before=$(sha256sum <"$W/full/step_00000001.h5")

# 2. resumed there: step 2 again, the save fails again, step 1 byte-identical
"$MOE" train "${common[@]}" --set "checkpoint.dir=$W/full" --set "log.metrics=$W/full.jsonl" --resume latest \
	>"$W/f2.log" 2>&1
rc=$?
clean_exit "$W/f2.log" $rc && grep -q "resumed from .*step_00000001.h5" "$W/f2.log" \
	&& pass "resumed on the full disk: the save fails again, exit status 1" || fail "second run"
[ "$before" = "$(sha256sum <"$W/full/step_00000001.h5")" ] && [ "$(ls "$W/full")" = step_00000001.h5 ] \
	&& pass "step 1 byte-identical after two failed saves" || fail "step 1 changed or files left"

# 3. moved to a disk with room, the run completes with the losses of an uninterrupted run
mkdir -p "$W/room" && cp "$W/full/step_00000001.h5" "$W/room/"
"$MOE" train "${common[@]}" --set "checkpoint.dir=$W/room" --set "log.metrics=$W/full.jsonl" --resume latest \
	>"$W/f3.log" 2>&1 || { tail "$W/f3.log"; fail "resume with room"; }
if diff <(losses "$W/ref.jsonl") <(losses "$W/full.jsonl") >/dev/null; then
	pass "resumed from the kept checkpoint: the losses of an uninterrupted run, bit for bit"
else
	diff <(losses "$W/ref.jsonl") <(losses "$W/full.jsonl") | head; fail "losses differ"
fi

# 4. two ranks, ep 2
small_fs "$W/full2" "$kib" || fail "mount"
MPI_TIMEOUT=120 mpi -np 2 "$MOE" train "${common[@]}" --set parallel.ep=2 --set "checkpoint.dir=$W/full2" \
	--set log.metrics= >"$W/m.log" 2>&1
rc=$?
[ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "$rc" != 137 ] && ! grep -qiE "segmentation|signal 11|core dumped" "$W/m.log" \
	&& pass "mpirun -np 2: the job fails (status $rc), no crash, no hang" || { tail -n 20 "$W/m.log"; fail "mpirun"; }
grep -q "No space left on device" "$W/m.log" && pass "mpirun: $(grep -m1 'No space' "$W/m.log" | cut -c1-160)" \
	|| { tail -n 20 "$W/m.log"; fail "mpirun message"; }
[ "$(ls "$W/full2")" = step_00000001.h5 ] && pass "mpirun: only step 1 on the disk, no temporary file" \
	|| fail "mpirun: files left: $(ls "$W/full2")"

finish
