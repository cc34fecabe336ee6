#!/bin/sh
# ends_with.sh - an example GRPO reward program (SPEC 4); POSIX sh and awk only.
#
# moe starts it once (grpo.reward_cmd) and keeps it running.  For each completion it writes one line,
#   {"id":17,"prompt":"...","completion":"...",...every other field of the prompt's record}
# and waits for one answer line, in the same order and flushed at once: {"id":17,"reward":1.0}.
# moe writes compact JSON, the id always first, and escapes a completion only where JSON must ('"', '\'
# and control characters), so awk can compare the escaped text without a JSON parser.  One awk per line:
# an awk reading a pipe may wait for a full block of input (mawk does) while moe waits for the answer.
#
# Reward: 1.0 when the completion ends with TEXT ($1, default "!"), else 0.0.
# Usage: "reward_cmd": ["sh", "rl/rewards/ends_with.sh", "!"]
SUFFIX=${1-!}
export SUFFIX
while IFS= read -r line; do
	printf '%s\n' "$line" | awk '
	function esc(s,  r, i, c) {	# s escaped as moe does (enough for a suffix typed on a command line)
		for (i = 1; i <= length(s); i++) {
			c = substr(s, i, 1)
			r = r (c == "\\" || c == "\"" ? "\\" c : c == "\n" ? "\\n" : c == "\t" ? "\\t" : c)
		}
		return r
	}
	{
		want = esc(ENVIRON["SUFFIX"])
		ok = match($0, /"completion":"([^"\\]|\\.)*"/)
		text = substr($0, RSTART + 14, RLENGTH - 15)	# the literal without its quotes
		at = length(text) - length(want)	# where the suffix would start, if it is there,
		for (k = 0; at - k > 0 && substr(text, at - k, 1) == "\\"; k++) ;	# not inside an escape:
		hit = ok && at >= 0 && substr(text, at + 1) == want && k % 2 == 0	# after an even run of \
		printf "{\"id\":%s,\"reward\":%s}\n", substr($0, 7, index($0, ",") - 7), hit ? "1.0" : "0.0"
	}'
done
