#!/usr/bin/env bash
# tests/gpu/run_bundle.sh - on a bare GPU machine (driver + CUDA, none of our Debian libraries), unpack the
# bundle made by tests/gpu/bundle.sh and run, each with its log in LOGDIR: nvidia-smi -L (read only), the
# GPU suite (gpu_test_ops_cuda), every other CUnit executable (as ctest runs them: MOE_SRC = this checkout,
# MOE_BIN = the bundled moe, OMP_NUM_THREADS=2), `mpirun -np 2` of launch_test_comm, the script tests
# tests/*/test_*.sh, bench_train (default arguments, then the GPU step of bench-v2lite-4l with attention auto
# and own: bench_train_cuda_auto, bench_train_cuda_own), bench_generate --device cuda (the GRPO batch's
# generation tokens/s: bench_generate_cuda), bench_attention (our attention kernels against cuDNN's graph
# API; cuDNN 9, libcudnn.so.9, is the host's: the bundle leaves it out, dlopen finds it) and
# bench/bench_scaling.sh on the bundled binaries.
# LOGDIR/summary.txt gets one line per item (PASS / FAIL / SKIP / TIMEOUT, seconds, note), written as each
# item ends, so a run cut short still leaves what it finished.
#
#   tests/gpu/run_bundle.sh LOGDIR [BUNDLE]     (BUNDLE default: .bundle/moe-bundle.tar.xz in this checkout)
#   MOE_BUNDLE_DIR  where to unpack (default /tmp/moe-bundle; emptied first)
#   ONLY / SKIP     extended regexes on item names: run only the matching / leave out the matching
#                   (items: nvidia-smi env gpu_test_ops_cuda <name>_test_<x> mpirun_np2 <dir>_test_<x>_sh
#                    nccl_world1 bench_ep_gpu bench_train bench_attention bench_generate_cuda bench_scaling)
#   BUDGET_S        seconds for the whole run (default 0: none); an item gets at most what is left and none
#                   starts with less than 15 s left (SKIP), so the script ends within about BUDGET_S + 15
#   ITEM_TIMEOUT    seconds per item (default 900)
# Exit status: 0 when no item failed.
#
# The multi-rank GPU checks of one device call (at most 8 minutes; issue 16): the GPU programs, the script
# test of expert / data parallelism with two and four ranks sharing the GPU over host-staged MPI
# (gpu_test_dist_cuda_sh: (2,1) (1,2) (2,2), checkpoints across CPU and GPU, a killed rank), NCCL at world
# size 1 (nccl_world1) and the 1-rank vs 2-rank tokens/s (bench_ep_gpu):
#   ONLY='^(nvidia-smi|gpu_test_.*|gpu_test_dist_cuda_sh|nccl_world1|bench_ep_gpu)$' BUDGET_S=420 \
#       tests/gpu/run_bundle.sh LOGDIR
#
# The training-speed checks of one device call (issue 17, at most 8 minutes): the GPU programs (the cuDNN
# attention graphs against the CPU reference in gpu_test_ops_cuda's attention_cudnn), the cuDNN graph
# builder's own test, bench_attention (ours against cuDNN, through model/cuda/cudnn_graph.c) and the
# training step of bench-v2lite-4l with train.attention auto and own (bench_train_cuda_auto / _own: the
# table row, the attention line and the per-region profile):
# (the CUnit GPU programs only, not the script tests, so that the budget reaches the benchmarks)
#   ONLY='^(nvidia-smi|gpu_test_(ops|model|adamw|prof|distill)_cuda|model_test_cudnn_graph|bench_attention|bench_train_cuda_auto|bench_train_cuda_own)$' \
#       BUDGET_S=420 tests/gpu/run_bundle.sh LOGDIR
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[ $# -ge 1 ] || { echo "usage: $0 LOGDIR [BUNDLE]" >&2; exit 2; }
mkdir -p "$1" || exit 2
LOGDIR="$(cd "$1" && pwd)"
BUNDLE="${2:-$ROOT/.bundle/moe-bundle.tar.xz}"
B="${MOE_BUNDLE_DIR:-/tmp/moe-bundle}"
ITEM_TIMEOUT="${ITEM_TIMEOUT:-900}"
BUDGET_S="${BUDGET_S:-0}"
T0=$(date +%s)
SUMMARY="$LOGDIR/summary.txt"
npass=0 nfail=0 nskip=0

# ---- unpack --------------------------------------------------------------------------------------------
[ -f "$BUNDLE" ] || { echo "run_bundle: no bundle at $BUNDLE (make it with tests/gpu/bundle.sh)" >&2; exit 2; }
case "$B" in /|"") echo "run_bundle: refusing MOE_BUNDLE_DIR=$B" >&2; exit 2 ;; esac
rm -rf "$B" && mkdir -p "$B" || exit 2
if ! tar -xJf "$BUNDLE" -C "$B" --strip-components=1 2>"$LOGDIR/unpack.log"; then
	# no working xz: Python's tarfile reads .tar.xz (lzma) itself
	echo "run_bundle: tar -xJf failed ($(head -1 "$LOGDIR/unpack.log")); unpacking with python3's tarfile"
	rm -rf "$B" && mkdir -p "$B" || exit 2
	python3 - "$BUNDLE" "$B" <<'PY' || exit 2
import sys, tarfile
with tarfile.open(sys.argv[1], "r:xz") as t:
    members = [m for m in t.getmembers() if "/" in m.name]
    for m in members:
        m.name = m.name.split("/", 1)[1]
    if hasattr(tarfile, "tar_filter"):
        t.extractall(sys.argv[2], members=members, filter="tar")
    else:
        t.extractall(sys.argv[2], members=members)
PY
fi
[ -s "$LOGDIR/unpack.log" ] || rm -f "$LOGDIR/unpack.log"
[ -x "$B/bin/moe" ] || { echo "run_bundle: $BUNDLE holds no bin/moe" >&2; exit 2; }

# ---- environment ---------------------------------------------------------------------------------------
export MOE_BUNDLE_DIR="$B"
export PATH="$B/bin:$B/ompi/bin:$PATH:/usr/local/cuda/bin:$B/fallback/bin"  # fallback: tools a bare image may lack
export OPAL_PREFIX="$B/ompi" OPAL_SYSCONFDIR="$B/ompi/etc"  # relocated Open MPI: plugins, help, config
if [ -d "$B/ompi/pmix" ]; then  # its PMIx: Debian's has absolute libdir/datadir, so name each folder
	P="$B/ompi/pmix"
	export PMIX_PREFIX="$P" PMIX_EXEC_PREFIX="$P" PMIX_LIBDIR="$P/lib" PMIX_DATAROOTDIR="$P/share" \
		PMIX_DATADIR="$P/share" PMIX_PKGLIBDIR="$P/lib/pmix" PMIX_PKGDATADIR="$P/share/pmix" \
		PMIX_MCA_mca_base_component_path="$P/lib/pmix"
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export LD_LIBRARY_PATH="$B/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# CUDA's libraries are not in the bundle: find the ones the binaries still miss (the toolkit's folders
# first, then the driver's, then Python's nvidia-* wheels, then anywhere on the disk) and add their folders.
cuda_log="$LOGDIR/cuda_libs.log"
: >"$cuda_log"
missing_libs() { for f in "$B"/bin/* "$B"/ompi/bin/*; do ldd "$f" 2>/dev/null; done | awk '/not found/ {print $1}' | sort -u; }
find_lib() {
	local d py sp
	for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
		/usr/local/cuda-*/lib64 /usr/local/cuda-*/lib /usr/local/cuda-*/targets/x86_64-linux/lib \
		/usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/local/lib; do
		[ -e "$d/$1" ] && { echo "$d"; return 0; }
	done
	for py in python3 /opt/*/.venv/bin/python3; do
		command -v "$py" >/dev/null || continue
		for sp in $("$py" -c 'import site; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null); do
			for d in "$sp"/nvidia/*/lib "$sp"/nvidia/*/lib64; do
				[ -e "$d/$1" ] && { echo "$d"; return 0; }
			done
		done
	done
	d="$(timeout 60 find / -xdev \( -path /proc -o -path /sys -o -path "$B" \) -prune -o -name "$1" -print 2>/dev/null | head -1)"
	[ -n "$d" ] && { dirname "$d"; return 0; }
	return 1
}
extra=""
for lib in $(missing_libs); do
	if d="$(find_lib "$lib")"; then
		case ":$LD_LIBRARY_PATH:" in *":$d:"*) ;; *) export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"; extra="$extra $d" ;; esac
		echo "cuda lib: $lib found in $d" >>"$cuda_log"
	else
		echo "cuda lib: $lib NOT FOUND anywhere" >>"$cuda_log"
	fi
done

# cuDNN is loaded with dlopen (libcudnn.so.9: the attention graphs), so ldd does not ask for it: where the
# loader cannot find it by itself, add its folder as for the libraries above
if ! ldconfig -p 2>/dev/null | grep -q 'libcudnn\.so\.9 ' && d="$(find_lib libcudnn.so.9)"; then
	case ":$LD_LIBRARY_PATH:" in *":$d:"*) ;; *) export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"; extra="$extra $d" ;; esac
	echo "cuda lib: libcudnn.so.9 (dlopen) found in $d" >>"$cuda_log"
fi

# ---- the runner ----------------------------------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/moe-run-bundle.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
record() {  # STATUS SECONDS NAME NOTE
	printf '%-8s %8.1fs  %-36s %s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"
	printf '%-8s %8.1fs  %-36s %s\n' "$1" "$2" "$3" "$4"
	case "$1" in PASS) npass=$((npass + 1)) ;; SKIP) nskip=$((nskip + 1)) ;; *) nfail=$((nfail + 1)) ;; esac
}
wanted() {
	[ -z "${ONLY:-}" ] || [[ "$1" =~ $ONLY ]] || return 1
	[ -z "${SKIP:-}" ] || ! [[ "$1" =~ $SKIP ]] || return 1
	return 0
}
# item NAME KIND COMMAND...   KIND: cunit (needs "Run Summary"), smi, bench (a note from the log), plain
# sets ITEM_RC, ITEM_LOG; returns 1 when the item did not run
item() {
	local name="$1" kind="$2" t left start end dur status note=""
	shift 2
	ITEM_LOG="$LOGDIR/$name.log" ITEM_RC=""
	wanted "$name" || return 1
	t="$ITEM_TIMEOUT"
	if [ "$BUDGET_S" -gt 0 ]; then
		left=$((BUDGET_S - ($(date +%s) - T0)))
		if [ "$left" -lt 15 ]; then record SKIP 0 "$name" "no time left in BUDGET_S=$BUDGET_S"; return 1; fi
		[ "$left" -lt "$t" ] && t="$left"
	fi
	start=$(date +%s.%N)
	(cd "$WORK" && exec timeout -k 10 "$t" "$@") >"$ITEM_LOG" 2>&1 </dev/null
	ITEM_RC=$?
	end=$(date +%s.%N)
	dur=$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')
	if [ "$ITEM_RC" = 124 ] || [ "$ITEM_RC" = 137 ]; then
		status=TIMEOUT note="killed after ${t}s"
	elif [ "$ITEM_RC" != 0 ]; then
		status=FAIL note="exit $ITEM_RC: $(grep -m1 -E 'FAIL|[Ee]rror|not found|cannot' "$ITEM_LOG" | cut -c1-100)"
	elif [ "$kind" = cunit ] && ! grep -q "Run Summary" "$ITEM_LOG"; then
		status=FAIL note="exit 0 but no CUnit Run Summary"
	else
		status=PASS
		case "$kind" in
		cunit) note="tests: $(awk '$1 == "tests" {print $3 " run, " $5 " failed"}' "$ITEM_LOG" | tail -1)" ;;
		smi) note="$(grep -m1 '^GPU ' "$ITEM_LOG" | sed 's/ (UUID.*//')" ;;
		bench) note="$(grep -E '^(tokens/s|ratio) |^attention: |^experts |^\| [^|]*\.json \|' "$ITEM_LOG" | tr -s ' ' | cut -c1-160 | paste -sd ';' -)" ;;
		esac
		if [ "$kind" = cunit ] && grep -q "SKIP: no CUDA device" "$ITEM_LOG"; then  # the GPU suite, no GPU
			note="$(grep -m1 -o 'SKIP: no CUDA device.*' "$ITEM_LOG")"
			if [ "$gpu_listed" = 1 ]; then status=FAIL note="$note although nvidia-smi lists a GPU"; else status=SKIP; fi
		fi
	fi
	record "$status" "$dur" "$name" "$note"
	return 0
}

{
	echo "moe GPU bundle run, $(date -u '+%F %T') UTC on $(hostname) ($(uname -sr), $(nproc) cores)"
	echo "checkout: $ROOT at $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo '?')"
	sed -n '1,5p' "$B/MANIFEST.txt" | sed 's/^/bundle: /'
	echo "host glibc: $(getconf GNU_LIBC_VERSION 2>/dev/null)"
	echo "LD_LIBRARY_PATH added for CUDA:${extra:- nothing}"
	[ "$BUDGET_S" -gt 0 ] && echo "budget: ${BUDGET_S}s"
	echo
} >"$SUMMARY"
cat "$SUMMARY"

# 1. the device, read only
gpu_listed=0
if wanted nvidia-smi; then
	if command -v nvidia-smi >/dev/null; then
		item nvidia-smi smi nvidia-smi -L
		grep -q '^GPU ' "$LOGDIR/nvidia-smi.log" && gpu_listed=1
	else
		record SKIP 0 nvidia-smi "nvidia-smi not found (no driver on this machine)"
	fi
fi

# 2. the environment: every library of every bundled ELF resolves into the bundle (or to the host's glibc,
#    libstdc++, libgcc_s, driver and CUDA); Open MPI's relocated paths
if wanted env; then
	env_check() {
		local B="$1" bad=0 f d lp
		# a library from outside the bundle is fine only when the host is meant to provide it
		host_lib() {
			case "$(basename "$1")" in
			ld-linux*.so* | libc.so.* | libm.so.* | libmvec.so.* | libpthread.so.* | libdl.so.* | librt.so.* | \
				libresolv.so.* | libutil.so.* | libanl.so.* | libnss_*.so.* | libthread_db.so.* | \
				libc_malloc_debug.so.* | libstdc++.so.* | libgcc_s.so.* | libcuda.so* | libcudart.so* | \
				libcublas.so* | libcublasLt.so* | libnccl.so* | libnvidia-*.so* | libnvJitLink.so* | \
				libnvrtc*.so* | libcudadebugger.so* | libcudnn*.so*) return 0 ;;
			esac
			return 1
		}
		echo "== environment"; env | grep -E '^(PATH|LD_LIBRARY_PATH|OPAL_|PMIX_|OMPI_)' | sort
		echo "== ompi_info --path"; ompi_info --path all --parsable | grep -E 'prefix|bindir|pkglibdir|pkgdatadir|sysconfdir'
		echo "== ompi_info: $(ompi_info --version | head -1)"
		echo "== ldd of every bundled ELF file: libraries resolved outside the bundle"
		find "$B" -type f | while read -r f; do
			[ "$(od -An -tx1 -N4 "$f" | tr -d ' \n')" = 7f454c46 ] || continue
			case "$f" in "$B"/fallback/*) lp="$B/fallback/lib:$LD_LIBRARY_PATH" ;; *) lp="$LD_LIBRARY_PATH" ;; esac
			LD_LIBRARY_PATH="$lp" ldd "$f" 2>&1 | awk '/not found/ {print "MISSING", $1; next} /=>/ {print $1, $3}' | sed "s|^|${f#"$B"/} |"
		done >"$WORK/ldd.txt"
		while read -r f n p; do
			if [ "$n" = MISSING ]; then echo "MISSING: $f needs $p"; bad=1
			elif [ "${p#"$B"/}" = "$p" ]; then
				if host_lib "$p"; then echo "host: $n => $p"; else echo "UNEXPECTED: $f: $n => $p"; bad=1; fi
			fi
		done <"$WORK/ldd.txt" | sort | uniq -c | sort -k2
		echo "   ($(awk -v b="$B/" 'index($3, b) == 1' "$WORK/ldd.txt" | wc -l) resolutions into the bundle)"
		echo "== libraries loaded at run time (LD_DEBUG=files, dlopen'd plugins included): mpirun -np 2" \
			"launch_test_comm, launch_test_comm alone (MPI singleton), moe init"
		d="$WORK/lddebug"; mkdir -p "$d"
		LD_DEBUG=files LD_DEBUG_OUTPUT="$d/ld" mpirun --oversubscribe --mca btl self,vader --mca pml ob1 \
			-x OMP_NUM_THREADS=1 -np 2 "$B/bin/launch_test_comm" >"$d/mpirun.out" 2>&1 ||
			{ echo "mpirun -np 2 launch_test_comm FAILED:"; tail -20 "$d/mpirun.out"; bad=1; }
		LD_DEBUG=files LD_DEBUG_OUTPUT="$d/ld" "$B/bin/launch_test_comm" >"$d/single.out" 2>&1 ||
			{ echo "launch_test_comm (singleton) FAILED:"; tail -20 "$d/single.out"; bad=1; }
		LD_DEBUG=files LD_DEBUG_OUTPUT="$d/ld" "$B/bin/moe" init --config "$ROOT/configs/tiny.json" \
			--out "$d/tiny.h5" >"$d/moe.out" 2>&1 || { echo "moe init FAILED:"; tail -20 "$d/moe.out"; bad=1; }
		grep -h 'calling init: ' "$d"/ld.* | sed 's/.*calling init: //' | sort -u >"$WORK/loaded.txt"
		while read -r p; do
			if [ "${p#"$B"/}" != "$p" ]; then :
			elif host_lib "$p" || [ "$(od -An -tx1 -N4 "$p" 2>/dev/null | tr -d ' \n')" != 7f454c46 ]; then echo "host: $p"
			else case "$p" in */bin/*|*/sbin/*) echo "host program: $p" ;; *) echo "UNEXPECTED: $p"; bad=1 ;; esac
			fi
		done <"$WORK/loaded.txt"
		echo "   ($(grep -c "^$B/" "$WORK/loaded.txt") objects loaded from the bundle, $(grep -c "^$B/ompi/.*/mca_" "$WORK/loaded.txt") of them Open MPI plugins, $(grep -c "^$B/ompi/pmix/" "$WORK/loaded.txt") PMIx plugins)"
		if [ -d "$B/ompi/pmix/lib/pmix" ] && ! grep -q "^$B/ompi/pmix/" "$WORK/loaded.txt"; then
			echo "PMIx loaded none of its bundled plugins (PMIX_* relocation not honoured?)"; bad=1
		fi
		if grep -l -E "couldn't open the help file|unable to open mca_|ORTE_ERROR_LOG" "$d"/*.out; then
			echo "Open MPI / PMIx complained (a help file or a plugin not found):"
			grep -h -B2 -A2 -E "couldn't open the help file|unable to open mca_|ORTE_ERROR_LOG" "$d"/*.out | head -20; bad=1
		fi
		echo "== ldd moe"; ldd "$B/bin/moe"
		[ "$bad" = 0 ] && echo "env: OK" || echo "env: PROBLEMS above"
		return $bad
	}
	export -f env_check
	export ROOT WORK
	item env plain bash -c 'env_check "$1"' env_check "$B"
fi

# 3. the GPU suite
item gpu_test_ops_cuda cunit env OMP_NUM_THREADS=2 MOE_BIN="$B/bin/moe" MOE_SRC="$ROOT" "$B/bin/gpu_test_ops_cuda"

# 4. every other CUnit executable, as ctest runs it
for f in "$B"/bin/*_test_*; do
	name="$(basename "$f")"
	[ "$name" = gpu_test_ops_cuda ] && continue
	item "$name" cunit env OMP_NUM_THREADS=2 MOE_BIN="$B/bin/moe" MOE_SRC="$ROOT" "$f"
done

# 5. the relocated mpirun: two ranks of launch_test_comm
if [ -x "$B/bin/launch_test_comm" ]; then
	item mpirun_np2 cunit mpirun --oversubscribe --mca btl self,vader --mca pml ob1 -x OMP_NUM_THREADS=1 \
		-np 2 "$B/bin/launch_test_comm"
fi

# 6. the script tests
for s in "$ROOT"/tests/*/test_*.sh; do
	[ -f "$s" ] || continue
	sub="$(basename "$(dirname "$s")")"
	item "${sub}_$(basename "$s" .sh)_sh" plain env OMP_NUM_THREADS=2 MOE_BIN="$B/bin/moe" MOE_SRC="$ROOT" bash "$s"
done

# 6b. NCCL at world size 1 (no mpirun: a singleton MPI process): init, the split ep / dp communicators,
#     all-reduce, broadcast, all-gather, reduce-scatter and all-to-all-v to itself against the host
#     collectives, and the GPU model's step with its gradients reduced over NCCL
if [ -x "$B/bin/gpu_test_dist_cuda" ]; then
	item nccl_world1 cunit env OMP_NUM_THREADS=2 MOE_TEST_NCCL=1 MOE_SRC="$ROOT" "$B/bin/gpu_test_dist_cuda"
fi

# 7. benchmarks
# GPU tokens/s of 1 rank against 2 ranks sharing the GPU (ep=2, dp=2; host-staged collectives) with the
# communication share: the table for bench/RESULTS.md
if [ -f "$ROOT/bench/bench_ep_gpu.sh" ]; then
	item bench_ep_gpu plain bash "$ROOT/bench/bench_ep_gpu.sh" "$B/bin"
fi
[ -x "$B/bin/bench_train" ] && item bench_train bench "$B/bin/bench_train"
# the GPU training step of DeepSeek-V2-Lite's shapes cut to 4 layers, attention by cuDNN (auto) and by ours
for a in auto own; do
	[ -x "$B/bin/bench_train" ] && item "bench_train_cuda_$a" bench "$B/bin/bench_train" --device cuda \
		--config "$ROOT/configs/bench-v2lite-4l.json" --steps 5 --warmup 2 --attention "$a"
done
[ -x "$B/bin/bench_attention" ] && item bench_attention bench "$B/bin/bench_attention"
# generation on the GPU for the GRPO batch shape of issue 18: 64 prompts x 8 completions, 256 new tokens
# after 128-token prompts, bench-v2lite-4l (bf16), median of 3 (bench/bench_generate.c --device cuda)
[ -x "$B/bin/bench_generate" ] && item bench_generate_cuda plain env OMP_NUM_THREADS=2 "$B/bin/bench_generate" \
	--config "$ROOT/configs/bench-v2lite-4l.json" --device cuda --prompt 128 --new 256 --reps 3
if [ -f "$ROOT/bench/bench_scaling.sh" ]; then
	item bench_scaling plain bash "$ROOT/bench/bench_scaling.sh" "$B/bin"
fi

{
	echo
	echo "total: $npass passed, $nfail failed, $nskip skipped in $(($(date +%s) - T0))s"
	if [ -f "$LOGDIR/bench_ep_gpu.log" ]; then echo; echo "bench_ep_gpu:"; cat "$LOGDIR/bench_ep_gpu.log"; fi
	if [ -f "$LOGDIR/bench_scaling.log" ]; then echo; echo "bench_scaling:"; cat "$LOGDIR/bench_scaling.log"; fi
	if [ -f "$LOGDIR/bench_train.log" ]; then echo; echo "bench_train:"; cat "$LOGDIR/bench_train.log"; fi
	for a in auto own; do
		f="$LOGDIR/bench_train_cuda_$a.log"
		if [ -f "$f" ]; then echo; echo "bench_train_cuda_$a:"; cat "$f"; fi
	done
	if [ -f "$LOGDIR/bench_attention.log" ]; then echo; echo "bench_attention:"; cat "$LOGDIR/bench_attention.log"; fi
	if [ -f "$LOGDIR/bench_generate_cuda.log" ]; then echo; echo "bench_generate_cuda:"; cat "$LOGDIR/bench_generate_cuda.log"; fi
} >>"$SUMMARY"
tail -n +"$(grep -n '^total:' "$SUMMARY" | cut -d: -f1)" "$SUMMARY" | head -1
[ "$nfail" = 0 ]
