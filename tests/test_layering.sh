#!/usr/bin/env bash
# tests/test_layering.sh - the layering of README.md (ARCHITECTURE), checked over the #include lines of
# every .c .h .cu .cuh, so that it stays true:
#   - no file includes a header of a layer above its own (the table below; a folder's cuda/ is its layer);
#   - only launch/ includes <mpi.h> or <nccl.h>; only the checkpoint module (train/checkpoint*.c, and its helper header train/checkpoint_h5.h) <hdf5.h>;
#   - the commands' headers (*_cli.h, data/task.h) only from command files (moe.c, *_cli.c, data/task_*.c)
#     and tests and benchmarks, so no library file carries a command;
#   - an internal header (*_int.h) only from its own folder.
# With a build (MOE_BIN's folder holds libmoecore.a), also no import circle: no two object files that use
# each other's symbols, directly or around a loop (tsort over the uses).
set -uo pipefail
SRC="${MOE_SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
cd "$SRC" || exit 1
fail=0

# "file:line: why" for each include that breaks a rule
find launch data model optim train rl bench tests moe.c \
	\( -name '*.c' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) -print0 |
	xargs -0 grep -Hn '^[[:space:]]*#[[:space:]]*include' |
	awk -F: '
	BEGIN {
		# what each layer may include besides the top (bottom-up); everything else is the top:
		# moe.c, bench/, tests/, which may include anything
		may["launch"] = "launch"
		may["data"] = "data launch"
		may["model"] = "model launch"
		may["optim"] = "optim launch"
		may["train"] = "train model optim data launch"
		may["rl"] = "rl train model optim data launch"
	}
	function layer(p, a) {
		split(p, a, "/")
		return (a[1] in may) && index(p, "/") ? a[1] : "top"
	}
	function dir(p) { sub(/\/[^\/]*$/, "", p); return p }
	function bad(why) { printf "%s:%s: %s\n", file, line, why; n++ }
	{
		file = $1; line = $2; text = $0; sub(/^[^:]*:[^:]*:/, "", text)
		own = layer(file)
		if (match(text, /<[^>]+>/)) {
			h = substr(text, RSTART + 1, RLENGTH - 2)
			if (h ~ /^(mpi|mpi-ext|nccl|nccl_net)\.h$/ && own != "launch")
				bad("<" h "> outside launch/ (the collectives interface is launch/comm.h)")
			if (h ~ /^(hdf5|hdf5_hl|H5[A-Za-z]*)\.h$/ && file !~ /^train\/checkpoint[^\/]*\.c$/ && file != "train/checkpoint_h5.h")
				bad("<" h "> outside the checkpoint module (train/checkpoint*.c)")
			next
		}
		if (!match(text, /"[^"]+"/))
			next
		h = substr(text, RSTART + 1, RLENGTH - 2)
		if (index(h, "/") == 0)
			h = dir(file) "/" h	# a header beside the file
		to = layer(h)
		if (own != "top" && index(" " may[own] " ", " " to " ") == 0)
			bad(own "/ includes \"" h "\" of " to "/, a layer it may not use (" own "/ may use " \
			    may[own] ")")
		if ((h ~ /_cli\.h$/ || h == "data/task.h") && own != "top" && file !~ /_cli\.c$/ &&
		    file !~ /^data\/task_[^\/]*\.c$/)
			bad("library file includes the command header \"" h "\" (commands go in *_cli.c)")
		if (h ~ /_int\.h$/ && dir(h) != dir(file))
			bad("\"" h "\" is internal to " dir(h) "/")
	}
	END { exit n > 0 }' || fail=1

# import circles among the objects of the libraries, by symbol: "a.o b.o" when a.o uses a symbol b.o
# defines (weak definitions, emitted by every user of an inline function, do not count)
build="$(dirname "${MOE_BIN:-/nonexistent/moe}")"
libs=()
for l in "$build/libmoecore.a" "$build/libmoecuda.a"; do
	[ -f "$l" ] && libs+=("$l")
done
if ((${#libs[@]})); then
	loops=$(nm -P -A "${libs[@]}" 2>/dev/null | awk '
		{ split($1, a, /[][]/); obj = a[2]; sym = $2; t = $3 }
		t == "U" { use[obj SUBSEP sym] = 1; next }
		t ~ /^[TDBRCGS]$/ { def[sym] = obj }
		END {
			for (k in use) {
				split(k, p, SUBSEP)
				o = def[p[2]]
				if (o != "" && o != p[1])
					print p[1], o
			}
		}' | sort -u | tsort 2>&1 >/dev/null)
	if [ -n "$loops" ]; then
		echo "import circle among the objects of ${libs[*]}:" >&2
		echo "$loops" >&2
		fail=1
	fi
else
	echo "test_layering: no libmoecore.a beside MOE_BIN: include rules only"
fi

((fail)) && { echo "test_layering: FAILED" >&2; exit 1; }
echo "test_layering: OK"
