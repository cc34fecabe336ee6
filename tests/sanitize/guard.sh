#!/usr/bin/env bash
# tests/sanitize/guard.sh - the sanitizer build's tests still catch moe's own errors: a lost allocation
# made by moe, a read past the end of a heap array and a signed overflow (tests/sanitize/guard.c) each fail
# their program with the sanitizer's report, alone and under mpirun, while a program that only starts and
# stops MPI passes (Open MPI's own leaks suppressed by tests/sanitize/lsan.supp).  Registered only in the
# MOE_SANITIZE=ON build, with the ASAN/LSAN/UBSAN_OPTIONS every test there runs under (CMakeLists.txt):
# it fails when those options are not applied, when the build is not sanitized, or when a suppression
# swallows moe's own leaks.
set -uo pipefail
GUARD="${GUARD_BIN:?GUARD_BIN: the sanitize_guard program}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-sanitize-guard

[ -x "$GUARD" ] || { echo "FAIL: $GUARD is not built"; exit 1; }

# run LABEL MODE [mpirun args...]: the guard in MODE, alone or under mpirun; sets $rc and $log
run() {
	local label="$1" mode="$2"
	shift 2
	log="$W/$label.log"
	if [ $# -gt 0 ]; then
		mpi "$@" "$GUARD" "$mode" >"$log" 2>&1
	else
		"$GUARD" "$mode" >"$log" 2>&1
	fi
	rc=$?
}

# expect_clean LABEL [mpirun args...]
expect_clean() {
	local label="$1"
	shift
	run "$label" clean "$@"
	if [ "$rc" = 0 ] && ! grep -q "Sanitizer" "$log"; then
		pass "$label: MPI start and stop alone report nothing"
	else
		tail -n 40 "$log"
		fail "$label: exit $rc or a sanitizer report (Open MPI's leaks not suppressed?)"
	fi
}

# expect_caught LABEL MODE REPORT FRAME [mpirun args...]: non-zero exit, REPORT and FRAME in the output
expect_caught() {
	local label="$1" mode="$2" report="$3" frame="$4"
	shift 4
	run "$label" "$mode" "$@"
	if [ "$rc" != 0 ] && grep -q "$report" "$log" && grep -q "$frame" "$log"; then
		pass "$label: exit $rc, the report names $frame"
	else
		tail -n 40 "$log"
		fail "$label: exit $rc; want a non-zero exit, /$report/ and /$frame/"
	fi
}

expect_clean clean
expect_clean clean-np2 -np 2
expect_caught leak leak "ERROR: LeakSanitizer: detected memory leaks" "in group_new"
expect_caught leak-np2 leak "ERROR: LeakSanitizer: detected memory leaks" "in group_new" -np 2
# only moe's leak is reported: the grid's three groups (world, ep, dp), nothing of Open MPI's
grep -q "SUMMARY: AddressSanitizer: [0-9]* byte(s) leaked in 3 allocation(s)" "$W/leak.log" &&
	pass "leak: the report holds moe's 3 allocations and nothing else" ||
	{ grep SUMMARY "$W/leak.log"; fail "leak: the report holds more (or less) than moe's 3 allocations"; }
expect_caught oob oob "ERROR: AddressSanitizer: heap-buffer-overflow" "in read_at"
expect_caught ub ub "runtime error: signed integer overflow" "in overflow"

finish
