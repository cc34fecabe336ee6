#!/usr/bin/env bash
# tests/rl/test_generate_dist.sh - decoding and generation under expert parallelism (the CUnit tests of
# test_generate_dist.c under mpirun): (world, ep) = (2, 2), (4, 4) and (4, 2) = dp 2 x ep 2; each rank's
# decode logits and routes equal one process's, generate() gives one process's tokens, and bad arguments
# on one rank fail every rank instead of hanging.
set -uo pipefail
MOE="${MOE_BIN:?}"
BIN="$(dirname "$MOE")/rl_test_generate_dist"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-gen-dist
for layout in "2 2" "4 4" "4 2"; do
	set -- $layout
	log="$W/gen_$1_$2.log"
	if mpi -np "$1" -x MOE_TEST_EP="$2" "$BIN" >"$log" 2>&1 && grep -q "Run Summary" "$log" &&
		! grep -q "DIFFER" "$log"; then
		pass "world $1, ep $2: $(grep -o 'max rel err [0-9.e+-]*' "$log" | sort -k4 -g | tail -1)"
	else
		tail -n 40 "$log"
		fail "world $1, ep $2"
	fi
done
finish
