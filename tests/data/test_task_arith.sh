#!/usr/bin/env bash
# tests/data/test_task_arith.sh - `moe data task arith` and its reward program rl/rewards/arith.py: every
# file of the task (shapes, right answers, eval disjoint from the training problems, shards that decode
# to the problems), determinism per seed, the options (--ops, --digits, --vocab, --force) and the
# refused ones; the reward program's answers, line by line, and its exit status 2 on a bad request.
set -uo pipefail
MOE="${MOE_BIN:?}"
SRC="${MOE_SRC:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-task-arith-test
EOT='<|endoftext|>'

# stdin: lines "PROBLEM ANSWER" ("37+58= 95"); fails on a malformed problem, an operand of more than
# $1 digits, an operator outside $2 or a wrong answer
arith_ok() {
	awk -v d="$1" -v ops="$2" '
	{
		if ($1 !~ /^[0-9]+[-+*][0-9]+=$/ || $2 !~ /^-?[0-9]+$/ || NF != 2) {
			print "malformed: " $0; bad++; next
		}
		match($1, /^[0-9]+/)
		a = substr($1, 1, RLENGTH); op = substr($1, RLENGTH + 1, 1)
		b = substr($1, RLENGTH + 2); sub(/=$/, "", b)
		r = op == "+" ? a + b : op == "-" ? a - b : a * b
		if (length(a) > d || length(b) > d || index(ops, op) == 0 || r != $2 + 0) {
			print "wrong: " $0; bad++
		}
	}
	END { if (bad || NR == 0) exit 1 }'
}

# JSONL prompts as "PROBLEM ANSWER" lines
jsonl_pairs() { awk -F'"' '{ print $4, $8 }' "$1"; }
# a split's shards decoded, one "PROBLEM ANSWER" line per document
shard_pairs() {
	{ "$MOE" data decode --tokenizer "$1/tokenizer.json" "$1/$2"/*.bin; echo; } |
		sed "s/<|endoftext|>/\n/g" | sed 's/=/= /'
}
problems() { cut -d' ' -f1; }

# check_task DIR N_PROMPTS N_EVAL N_DOCS DIGITS OPS: every file of a task directory
check_task() {
	local d=$1 np=$2 ne=$3 nd=$4 dig=$5 ops=$6 shape f ok=1
	for f in tokenizer.json train/train_00000.bin val/val_00000.bin prompts.jsonl eval.jsonl README.txt; do
		[ -s "$d/$f" ] || { echo "missing $d/$f"; ok=0; }
	done
	[ "$(head -c 8 "$d/train/train_00000.bin")" = MOESHARD ] || { echo "shard magic"; ok=0; }
	grep -q "\"$EOT\"" "$d/tokenizer.json" || { echo "no $EOT in tokenizer.json"; ok=0; }
	shape='^\{"prompt": "[0-9]+[-+*][0-9]+=", "answer": "-?[0-9]+"\}$'
	[ "$(wc -l <"$d/prompts.jsonl")" -eq "$np" ] || { echo "prompts.jsonl: line count"; ok=0; }
	[ "$(wc -l <"$d/eval.jsonl")" -eq "$ne" ] || { echo "eval.jsonl: line count"; ok=0; }
	[ "$(grep -Ec "$shape" "$d/prompts.jsonl")" -eq "$np" ] || { echo "prompts.jsonl: shape"; ok=0; }
	[ "$(grep -Ec "$shape" "$d/eval.jsonl")" -eq "$ne" ] || { echo "eval.jsonl: shape"; ok=0; }
	jsonl_pairs "$d/prompts.jsonl" | arith_ok "$dig" "$ops" || { echo "prompts.jsonl: answers"; ok=0; }
	jsonl_pairs "$d/eval.jsonl" | arith_ok "$dig" "$ops" || { echo "eval.jsonl: answers"; ok=0; }
	shard_pairs "$d" train >"$d.train.txt"
	shard_pairs "$d" val >"$d.val.txt"
	arith_ok "$dig" "$ops" <"$d.train.txt" || { echo "train shards: answers"; ok=0; }
	arith_ok "$dig" "$ops" <"$d.val.txt" || { echo "val shards: answers"; ok=0; }
	[ $(($(wc -l <"$d.train.txt") + $(wc -l <"$d.val.txt"))) -eq "$nd" ] || { echo "SFT count"; ok=0; }
	jsonl_pairs "$d/eval.jsonl" | problems | sort >"$d.eval.p"
	[ -z "$(uniq -d "$d.eval.p")" ] || { echo "eval.jsonl: repeated problems"; ok=0; }
	{ jsonl_pairs "$d/prompts.jsonl"; cat "$d.train.txt" "$d.val.txt"; } | problems | sort -u >"$d.rest.p"
	[ -z "$(comm -12 "$d.eval.p" "$d.rest.p")" ] || { echo "eval shares problems with training"; ok=0; }
	((ok))
}

# 1. the task in full
if "$MOE" data task arith --out "$W/a" --train 500 --prompts 100 --eval 50 --seed 3 >"$W/a.log" 2>&1; then
	pass "generated (seed 3)"
else
	cat "$W/a.log"; fail "moe data task arith"
fi
grep -q "490 SFT examples" "$W/a.log" && grep -q "10 SFT examples" "$W/a.log" &&
	grep -q "vocab 260" "$W/a.log" && grep -q "100 GRPO prompts" "$W/a.log" && pass "summary printed" ||
	{ cat "$W/a.log"; fail "summary"; }
check_task "$W/a" 100 50 500 2 "+" && pass "files: shapes, answers, decoded shards, eval disjoint" ||
	fail "task files"
[ "$(wc -l <"$W/a.val.txt")" -ge 1 ] && [ "$(wc -l <"$W/a.val.txt")" -le 25 ] &&
	pass "a small validation split ($(wc -l <"$W/a.val.txt") of 500)" || fail "validation split size"
grep -q -- "--digits 2 --ops '+' --train 500 --prompts 100 --eval 50 --seed 3" "$W/a/README.txt" &&
	pass "README.txt names the options" || fail "README.txt options"

# 2. determinism; refusing a used directory; --force
"$MOE" data task arith --out "$W/b" --train 500 --prompts 100 --eval 50 --seed 3 >/dev/null 2>&1
same=1
for f in tokenizer.json train/train_00000.bin val/val_00000.bin prompts.jsonl eval.jsonl README.txt; do
	cmp -s "$W/a/$f" "$W/b/$f" || { echo "differs: $f"; same=0; }
done
((same)) && pass "same seed, identical files" || fail "same seed gave different files"
"$MOE" data task arith --out "$W/c" --train 500 --prompts 100 --eval 50 --seed 4 >/dev/null 2>&1
! cmp -s "$W/a/prompts.jsonl" "$W/c/prompts.jsonl" && ! cmp -s "$W/a/eval.jsonl" "$W/c/eval.jsonl" &&
	! cmp -s "$W/a/train/train_00000.bin" "$W/c/train/train_00000.bin" &&
	pass "another seed, other problems" || fail "seed 4 gave the same files"
if "$MOE" data task arith --out "$W/a" --seed 5 >"$W/used.log" 2>&1; then
	fail "a directory holding a task was overwritten"
else
	grep -q -- "--force" "$W/used.log" && cmp -s "$W/a/eval.jsonl" "$W/b/eval.jsonl" &&
		pass "a directory holding a task is refused, untouched" || { cat "$W/used.log"; fail "refusal"; }
fi
"$MOE" data task arith --out "$W/a" --train 500 --prompts 100 --eval 50 --seed 3 --force >/dev/null 2>&1 &&
	cmp -s "$W/a/train/train_00000.bin" "$W/b/train/train_00000.bin" && pass "--force replaces it" ||
	fail "--force"

# 3. other operators, digits and vocabularies
if "$MOE" data task arith --out "$W/ops" --ops "+-*" --digits 3 --train 300 --prompts 200 --eval 40 \
	--vocab 300 --seed 7 >"$W/ops.log" 2>&1 && check_task "$W/ops" 200 40 300 3 "+-*"; then
	pass "--ops +-* --digits 3 --vocab 300"
else
	cat "$W/ops.log"; fail "--ops +-* --digits 3 --vocab 300"
fi
for op in '+' '-' '*'; do
	grep -qF "$op" "$W/ops/prompts.jsonl" || fail "no '$op' problem with --ops +-*"
done
grep -q '"answer": "-' "$W/ops/prompts.jsonl" && pass "negative answers occur" || fail "no negative answer"
grep -qE '[0-9]{3}[-+*]' "$W/ops/prompts.jsonl" && pass "3-digit operands occur" ||
	fail "no 3-digit operand"
python3 -c 'import json, sys; t = json.load(open(sys.argv[1])); assert len(t["model"]["merges"]) > 0' \
	"$W/ops/tokenizer.json" 2>/dev/null && pass "--vocab 300 learns merges" ||
	{ command -v python3 >/dev/null && fail "--vocab 300: no merges"; }
# --digits 1: 100 problems, 50 of them can be held out
if "$MOE" data task arith --out "$W/d1" --digits 1 --train 200 --prompts 60 --eval 50 >"$W/d1.log" 2>&1 &&
	check_task "$W/d1" 60 50 200 1 "+"; then
	pass "--digits 1 with half of the problems held out"
else
	cat "$W/d1.log"; fail "--digits 1 --eval 50"
fi

# 4. refused options: non-zero status, a message naming the option, nothing written
refused() {	# OPTION-NAMED ARGS...
	local name=$1 rc
	shift
	"$MOE" data task arith --out "$W/bad" "$@" >"$W/bad.out" 2>"$W/bad.err"
	rc=$?
	if [ "$rc" -ne 0 ] && grep -qF -- "$name" "$W/bad.err" && [ ! -e "$W/bad/eval.jsonl" ]; then
		pass "refused: $* ($(head -1 "$W/bad.err"))"
	else
		cat "$W/bad.err"; fail "not refused (rc $rc): $*"
	fi
}
refused --digits --digits 0
refused --digits --digits 10
refused --ops --ops "/"
refused --ops --ops ""
refused --bogus --bogus 1
refused --train --train -5
refused --seed --seed x
refused --vocab --vocab 100
refused --eval --digits 1 --eval 200
refused --eval --digits 1 --eval 51
"$MOE" data task arith --digits 2 >/dev/null 2>"$W/noout.err"; rc=$?
[ "$rc" -ne 0 ] && grep -q -- "--out" "$W/noout.err" && pass "no --out: refused" || fail "no --out (rc $rc)"
"$MOE" data task arith --help >"$W/help.txt" 2>&1 && grep -q -- "--digits" "$W/help.txt" &&
	grep -q -- "--val-frac" "$W/help.txt" && pass "--help" || fail "--help"
"$MOE" data task nosuch >/dev/null 2>"$W/nosuch.err"; rc=$?
[ "$rc" -ne 0 ] && grep -q nosuch "$W/nosuch.err" && pass "unknown task refused" || fail "unknown task"

# 5. the reward program
R="$SRC/rl/rewards/arith.py"
if ! command -v python3 >/dev/null; then
	echo "SKIP: python3 is missing: the reward program is not tested"
else
	[ -x "$R" ] && head -1 "$R" | grep -q '^#!/usr/bin/env python3' && pass "arith.py is executable" ||
		fail "arith.py: not executable or no python3 shebang"
	cat >"$W/req.jsonl" <<'EOF'
{"id": 1, "prompt": "37+58=", "completion": "95", "answer": "95"}
{"id": 2, "prompt": "37+58=", "completion": "94", "answer": "95"}
{"id": 3, "prompt": "37+58=", "completion": "ninety-five", "answer": "95"}
{"id": 4, "prompt": "3-7=", "completion": "-4", "answer": "-4"}
{"id": 5, "prompt": "37+58=", "completion": " 95 \n12+3=15", "answer": "95"}
{"id": 6, "prompt": "3-7=", "completion": "-7", "answer": "-4"}
{"id": "seven", "prompt": "1+1=", "completion": "2x", "answer": "2"}
{"id": 8, "prompt": "1+1=", "completion": "", "answer": "2"}
{"id": 9, "prompt": "1+1=", "completion": "\n2", "answer": "2"}
{"id": 10, "prompt": "1+1=", "completion": "2", "answer": 2, "extra": [1, 2]}
EOF
	cat >"$W/want.jsonl" <<'EOF'
{"id": 1, "reward": 1.0}
{"id": 2, "reward": 0.1}
{"id": 3, "reward": 0.0}
{"id": 4, "reward": 1.0}
{"id": 5, "reward": 1.0}
{"id": 6, "reward": 0.1}
{"id": "seven", "reward": 0.0}
{"id": 8, "reward": 0.0}
{"id": 9, "reward": 0.0}
{"id": 10, "reward": 1.0}
EOF
	"$R" <"$W/req.jsonl" >"$W/got.jsonl" 2>"$W/r.err" && cmp -s "$W/got.jsonl" "$W/want.jsonl" &&
		pass "rewards: exact, numeric, garbage, negative, trailing lines" ||
		{ diff "$W/want.jsonl" "$W/got.jsonl"; cat "$W/r.err"; fail "rewards"; }
	# one answer per request, flushed before the next request arrives
	coproc RW { "$R"; }
	echo '{"id": 1, "completion": "4", "answer": "4"}' >&"${RW[1]}"
	IFS= read -r -t 10 line <&"${RW[0]}"
	exec {RW[1]}>&-
	wait "$RW_PID"
	[ "${line:-}" = '{"id": 1, "reward": 1.0}' ] && pass "answers each line at once (flushed)" ||
		fail "no flushed answer: '${line:-}'"
	printf '%s\n' '{"id": 1, "completion": "4", "answer": "4"}' 'not json' '{"id": 3}' |
		"$R" >"$W/bad.out" 2>"$W/bad.err"; rc=$?
	[ "$rc" -eq 2 ] && grep -q "line 2" "$W/bad.err" && [ "$(wc -l <"$W/bad.out")" -eq 1 ] &&
		pass "a request that is not JSON: status 2 ($(cat "$W/bad.err"))" ||
		{ cat "$W/bad.err"; fail "bad JSON request: rc $rc"; }
	echo '{"id": 3, "answer": "1"}' | "$R" >/dev/null 2>"$W/bad.err"; rc=$?
	[ "$rc" -eq 2 ] && grep -q completion "$W/bad.err" && pass "a request without completion: status 2" ||
		{ cat "$W/bad.err"; fail "request without completion: rc $rc"; }
fi

finish
