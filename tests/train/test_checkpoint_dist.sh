#!/usr/bin/env bash
# tests/train/test_checkpoint_dist.sh - checkpoint_save_dist under a real mpirun: the CUnit tests of
# test_checkpoint_dist.c at 1, 2, 3 and 4 ranks (every ep dividing the world: round trips checked
# bit-exactly by a full load on rank 0 and a slice load on every rank; failures on every rank with one
# message, never a hang: each mpirun runs under `timeout 60`); then the files are layout-independent:
# every (world, ep) file has the same data and attributes (h5diff) and the same datasets, shapes, chunks
# and filters (h5dump -p -H) as the one a single process wrote with checkpoint_save.
set -uo pipefail
MOE="${MOE_BIN:?}"
BIN="$(dirname "$MOE")/train_test_checkpoint_dist"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-ckpt-dist-test

[ -x "$BIN" ] || { echo "FAIL: $BIN is not built"; exit 1; }
command -v mpirun >/dev/null || { echo "FAIL: mpirun not found (install openmpi-bin)"; exit 1; }

# 1. the CUnit tests at every world size, each in its own directory (shared by its ranks)
for np in 1 2 3 4; do
	dir="$W/np$np" log="$W/np$np.log"
	mkdir -p "$dir"
	MPI_TIMEOUT=60 mpi -np "$np" -x MOE_CKPT_DIST_DIR="$dir" "$BIN" >"$log" 2>&1
	rc=$?
	if [ "$rc" = 124 ]; then
		tail -n 40 "$log"
		fail "mpirun -np $np hung (killed after 60s)"
	elif [ "$rc" = 0 ] && [ "$(grep -c "Run Summary" "$log")" = "$np" ]; then
		pass "CUnit tests under mpirun -np $np"
	else
		tail -n 60 "$log"
		fail "CUnit tests under mpirun -np $np (exit $rc)"
	fi
done

# 2. every layout's file against the single-process one
if ! command -v h5diff >/dev/null || ! command -v h5dump >/dev/null; then
	echo "SKIP: layout independence (h5diff/h5dump not found: install hdf5-tools)"
else
	structure() { h5dump -p -H "$1" | sed 1d; }	# line 1 names the file
	for E in 4 6 2; do
		ref="$W/np1/ref_E$E.h5"
		[ -f "$ref" ] || { fail "E=$E: no reference file $ref"; continue; }
		n=0 want=0
		for np in 1 2 3 4; do
			for ep in 1 2 3 4; do
				[ $((np % ep)) = 0 ] || continue
				want=$((want + 1))
				f="$W/np$np/w${np}_ep${ep}_E$E.h5"
				if [ ! -f "$f" ]; then
					fail "E=$E: world $np, ep $ep wrote no file"
					continue
				fi
				if ! out=$(h5diff "$f" "$ref" 2>&1); then
					echo "$out" | head -n 20
					fail "E=$E: world $np, ep $ep: data or attributes differ from checkpoint_save's"
				elif ! out=$(diff <(structure "$f") <(structure "$ref")); then
					echo "$out" | head -n 20
					fail "E=$E: world $np, ep $ep: datasets, chunks or filters differ"
				else
					n=$((n + 1))
				fi
			done
		done
		[ "$n" = "$want" ] &&
			pass "E=$E: all $n layouts' files equal the single-process file (h5diff, h5dump -p -H)"
	done
	# the comparison itself sees a difference
	if h5diff -q "$W/np1/ref_E4.h5" "$W/np4/w4_ep2_E6.h5" >/dev/null 2>&1; then
		fail "h5diff finds no difference between files of different models"
	fi
	# the reference itself: chunked one expert per chunk, with the Fletcher32 checksum
	if structure "$W/np1/ref_E6.h5" | grep -A6 'experts.down_proj.weight"' |
		grep -q 'CHUNKED ( 1, 32, 16 )' &&
		structure "$W/np1/ref_E6.h5" | grep -A9 'experts.down_proj.weight"' | grep -q FLETCHER32; then
		pass "stacked experts are chunked one expert per chunk, with Fletcher32"
	else
		structure "$W/np1/ref_E6.h5" | grep -A12 'experts.down_proj.weight"' | head -n 14
		fail "stacked experts' chunks or filter"
	fi
fi

finish
