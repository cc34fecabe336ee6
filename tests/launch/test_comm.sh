#!/usr/bin/env bash
# tests/launch/test_comm.sh - launch/comm.h under a real mpirun: the CUnit tests of test_comm.c at 1, 2
# and 4 ranks; a rank that calls comm_abort, dies of a signal, exits without MPI_Finalize or hits an MPI
# error ends the whole job within seconds (never a hang), and the message names the rank; transfers
# beyond 2^31 bytes when the machine has the memory for them.
set -uo pipefail
MOE="${MOE_BIN:?}"
BIN="$(dirname "$MOE")/launch_test_comm"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-comm-test

[ -x "$BIN" ] || { echo "FAIL: $BIN is not built"; exit 1; }
command -v mpirun >/dev/null || { echo "FAIL: mpirun not found (install openmpi-bin)"; exit 1; }

# 1. the CUnit tests at every world size
for np in 1 2 4; do
	log="$W/np$np.log"
	mpi -np "$np" "$BIN" >"$log" 2>&1
	rc=$?
	if [ "$rc" = 0 ] && grep -q "Run Summary" "$log"; then
		pass "CUnit tests under mpirun -np $np"
	else
		tail -n 60 "$log"
		fail "CUnit tests under mpirun -np $np (exit $rc)"
	fi
done

# 2. a failing rank ends the job: rank 1 fails while rank 0 blocks in a collective.
#    mode  what the output must name  [a sanitizer's report of the same death]
# In the sanitizer build AddressSanitizer catches a rank's SIGSEGV: it reports it and exits 1, so Open MPI
# names rank 1 as the process that exited, not the signal.  Either account of the death passes.
rank1_exited="Process name: \\[\\[[0-9]+,[0-9]+\\],1\\]"
check_failure() {
	local mode="$1" want="$2" san="${3:-}" log="$W/fail-$1.log" t0 t1 rc elapsed
	t0=$(date +%s.%N)
	MPI_TIMEOUT=30 mpi -np 2 -x MOE_COMM_TEST_FAIL="$mode" "$BIN" >"$log" 2>&1
	rc=$?
	t1=$(date +%s.%N)
	elapsed=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
	if [ "$rc" = 124 ]; then
		tail -n 20 "$log"
		fail "$mode: the job hung (killed by timeout after ${elapsed}s)"
	elif [ "$rc" = 0 ]; then
		tail -n 20 "$log"
		fail "$mode: mpirun exited 0"
	elif awk -v e="$elapsed" 'BEGIN { exit !(e >= 10) }'; then
		fail "$mode: the job took ${elapsed}s to end (limit 10s)"
	elif ! grep -qE "$want" "$log" &&
		! { [ -n "$san" ] && grep -q "$san" "$log" && grep -qE "$rank1_exited" "$log"; }; then
		tail -n 20 "$log"
		fail "$mode: the output does not match /$want/${san:+ (nor /$san/ and /$rank1_exited/)}"
	elif grep -q "the collective returned" "$log"; then
		fail "$mode: a blocked collective returned"
	else
		pass "$mode: the job ended in ${elapsed}s with exit $rc"
	fi
}
check_failure abort "moe: rank 1: failing on purpose"
check_failure kill "rank 1.*(signal 9|Killed)"
check_failure segv "rank 1.*(signal 11|Segmentation fault)" "ERROR: AddressSanitizer: SEGV"
check_failure sigabrt "rank 1.*(signal 6|Aborted)"
check_failure exit "$rank1_exited|rank 1 .*exited"
check_failure mpierr "moe: rank 0: MPI error .*"
grep -q "MPI_Alltoallv\|MPI_Waitall" "$W/fail-mpierr.log" && pass "mpierr: the message names the MPI call" \
	|| { tail -n 20 "$W/fail-mpierr.log"; fail "mpierr: the message does not name the call"; }

# 3. large transfers (over 2^31 bytes) through the default chunking: about 3 GB per rank, two ranks
avail_kb=$(awk '/MemAvailable/ { print $2 }' /proc/meminfo 2>/dev/null || echo 0)
if [ "${MOE_COMM_TEST_LARGE:-auto}" = 0 ]; then
	echo "SKIP: large transfers (MOE_COMM_TEST_LARGE=0)"
elif [ "${avail_kb:-0}" -lt $((10 * 1024 * 1024)) ]; then
	echo "SKIP: large transfers (need 10 GiB available, have $((avail_kb / 1024)) MiB)"
else
	log="$W/large.log"
	MPI_TIMEOUT=400 mpi -np 2 -x MOE_COMM_TEST_LARGE=1 "$BIN" >"$log" 2>&1
	rc=$?
	if [ "$rc" = 0 ] && grep -q "Run Summary" "$log"; then
		pass "transfers beyond 2^31 bytes under mpirun -np 2"
	else
		tail -n 40 "$log"
		fail "transfers beyond 2^31 bytes (exit $rc)"
	fi
fi

finish
