# tests/lib.sh - what the script tests tests/*/test_*.sh share (bash; sourced, not run).  Each test sources
# it right after its `set -uo pipefail` and its MOE_BIN / MOE_SRC checks:
#     . "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" NAME
# (a path from the script's own, so any working directory works: ctest runs `bash /abs/tests/x/test_y.sh`,
# tests/gpu/run_bundle.sh runs the checkout's scripts the same way from a scratch directory).  It gives:
#   $W            a fresh scratch directory ${TMPDIR:-/tmp}/NAME.XXXXXX, removed when the script exits
#   pass MSG      prints "PASS: MSG"
#   fail MSG      prints "FAIL: MSG" and counts it in $fails
#   mpi ARGS...   mpirun ARGS on this machine, under a timeout (below)
#   finish [TXT]  prints "<script>: N failure(s)TXT" and exits 0 when nothing failed, 1 otherwise
#   expect_fail NAME PATTERN ARGS...   `$MOE train ARGS` (one step, checkpoints in $W/x) must fail with a
#                 message matching PATTERN (a refused config, checkpoint, ...)
#   dp2_ep2_equals_one ARGS...   `$MOE train ARGS` as one process accumulating 4 micro-batches ($W/ref4)
#                 and under mpirun -np 4 at dp 2 x ep 2 ($W/m22): the script's own $W/cmp.py compares their
#                 metrics, and the run must log its layout

W="$(mktemp -d "${TMPDIR:-/tmp}/${1:?lib.sh: name the scratch directory}.XXXXXX")" || exit 1
trap 'rm -rf "$W"' EXIT
fails=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }

# Shared memory only (self + vader, the ob1 engine): no network probing in a sandbox without one;
# --oversubscribe: more ranks than cores; the two variables let mpirun run as root (containers).
#
# Timeout: every job runs under `timeout --foreground -k 10 $MPI_TIMEOUT` (default 300 s), so a hung job
# fails its test instead of blocking ctest.  A check that a failing or killed rank ends the job without
# hanging sets its own, shorter bound here, `MPI_TIMEOUT=30 mpi ...`: that single timeout is what it
# measures (rc 124 = hung, as before).  Do not wrap mpi in a second, outer timeout instead.
# --foreground: on expiry the TERM goes to mpirun alone, which then kills its ranks (the old `timeout N
# bash -c mpi` wrappers got the same).  Tried with Open MPI 4.1: a plain `timeout N mpirun` (TERM to
# mpirun and to timeout's process group) or a nested timeout pair made mpirun exit at once, leaving its
# ranks running.  -k 10: KILL mpirun if it outlives the TERM by 10 s (rc 137: a failure for every caller).
mpi() {
	OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout --foreground -k 10 "${MPI_TIMEOUT:-300}" \
		mpirun --oversubscribe --mca btl self,vader --mca pml ob1 -x OMP_NUM_THREADS=1 "$@"
}

finish() {
	echo "${0##*/}: $fails failure(s)${1:-}"
	exit $((fails > 0))
}

expect_fail() {
	local name=$1 pat=$2
	shift 2
	if "$MOE" train "$@" --set train.steps=1 --set "checkpoint.dir=$W/x" >"$W/x.log" 2>&1; then
		fail "$name: accepted"
	elif grep -q -- "$pat" "$W/x.log"; then
		pass "$name: $(grep -m1 -- "$pat" "$W/x.log")"
	else
		cat "$W/x.log"; fail "$name: no message matching '$pat'"
	fi
}

dp2_ep2_equals_one() {
	"$MOE" train "$@" --set train.grad_accum=4 --set "checkpoint.dir=$W/ref4" --set "log.metrics=$W/ref4.jsonl" \
		>"$W/ref4.log" 2>&1 || { tail "$W/ref4.log"; fail "reference (4)"; }
	mpi -np 4 "$MOE" train "$@" --set parallel.ep=2 --set "checkpoint.dir=$W/m22" \
		--set "log.metrics=$W/m22.jsonl" >"$W/m22.log" 2>&1 || { tail "$W/m22.log"; fail "mpirun -np 4"; }
	local out
	if out=$(python3 "$W/cmp.py" "$W/ref4.jsonl" "$W/m22.jsonl") && grep -q "of 4 ranks (dp 2 x ep 2)" "$W/m22.log"; then
		pass "mpirun -np 4, dp 2 x ep 2: $out"
	else
		echo "$out"; fail "mpirun -np 4 (dp 2 x ep 2) differs from one process"
	fi
}
