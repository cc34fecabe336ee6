#!/usr/bin/env bash
# tests/fuzz/run.sh - the fuzz tests (ctest label fuzz).
#   run.sh build DIR              configure and build the fuzz build in DIR with clang (MOE_FUZZ: the
#                                 library and the fuzzers, with libFuzzer, ASan and UBSan)
#   run.sh run DIR NAME SECONDS   run fuzzer NAME for SECONDS over its seeds, tests/fuzz/corpus/NAME (which
#                                 also keeps the input of every past finding, as a regression test);
#                                 the inputs it finds go to DIR/corpus/NAME, a failing input to
#                                 DIR/artifacts/NAME-crash-..., its log to DIR/NAME.log.  Reproduce one:
#                                 DIR/tests/fuzz/NAME FILE.  MOE_FUZZ_SEED: the mutation seed (default 1,
#                                 0: a random one)
# Without clang or its libFuzzer runtime (launch/setup.sh installs both) each test is skipped: exit 77.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mode=${1:?build or run}
dir=${2:?the fuzz build directory}

skip() { echo "SKIP: $*"; exit 77; }

case "$mode" in
build)
	clang=""
	for c in clang clang-14 clang-15 clang-16; do
		if command -v "$c" >/dev/null; then clang=$(command -v "$c"); break; fi
	done
	[ -n "$clang" ] || skip "clang not found"
	mkdir -p "$dir"
	printf 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { return d && n; }\n' >"$dir/probe.c"
	"$clang" -fsanitize=fuzzer,address "$dir/probe.c" -o "$dir/probe" 2>/dev/null \
		|| skip "$clang cannot link libFuzzer (the libclang-rt-*-dev package)"
	cmake -S "$ROOT" -B "$dir" -DCMAKE_C_COMPILER="$clang" -DMOE_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
		>"$dir/configure.log" 2>&1 || { cat "$dir/configure.log"; exit 1; }
	cmake --build "$dir" -j "$(nproc)"
	;;
run)
	name=${3:?fuzzer name}
	seconds=${4:-20}
	bin="$dir/tests/fuzz/$name"
	[ -x "$bin" ] || skip "$bin not built (no clang?)"
	mkdir -p "$dir/corpus/$name" "$dir/artifacts"
	export OMP_NUM_THREADS=1
	export LSAN_OPTIONS="suppressions=$ROOT/tests/fuzz/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
	# -timeout: one input taking that long is a finding; -rss_limit_mb: so is an allocation past it.
	# The whole log is kept in DIR/NAME.log; the end of it (a finding's report, the final stats) shown.
	rc=0
	# A fixed seed by default: the suite mutates the same way on every run (a finding reproduces, CI does
	# not turn red by chance); MOE_FUZZ_SEED=0 draws a new seed (libFuzzer's own choice) to explore.
	"$bin" -seed="${MOE_FUZZ_SEED:-1}" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
		-error_exitcode=1 -timeout_exitcode=1 \
		-artifact_prefix="$dir/artifacts/$name-" "$dir/corpus/$name" "$ROOT/tests/fuzz/corpus/$name" \
		>"$dir/$name.log" 2>&1 || rc=$?
	tail -n 80 "$dir/$name.log"
	exit "$rc"
	;;
*)
	echo "usage: $0 build DIR | run DIR NAME SECONDS" >&2
	exit 2
	;;
esac
