#!/bin/bash
# tests/gpu/emu/run.sh - run the CUDA backend on a machine WITHOUT a GPU: its kernels (launch/cuda, model/cuda,
# optim/cuda) are compiled as C++ against a small emulator (include/emu.h, emu.cpp), under AddressSanitizer/UBSan
# by default, with the threads of each block scheduled in forward and then in reverse order.  It checks index
# arithmetic, masking, barriers and shared-memory bounds, and the wiring of the GPU path end to end, not speed;
# the real check remains ctest -L gpu on a GPU machine.  ctest runs it too (label emu: CMakeLists.txt's
# emu_build fixture builds into build/emu once per ctest run, then the emu_* tests use what it built).
#
#   tests/gpu/emu/run.sh [TEST.c | TEST.sh ...]   build and run (default tests/gpu/test_ops_cuda.c; needs g++,
#                            python3, cmake, CUnit, OpenBLAS, HDF5, cJSON, Open MPI: the CPU build's packages)
#   tests/gpu/emu/run.sh --moe PATH               build the emulated moe, write it to PATH and exit
#   tests/gpu/emu/run.sh --build DIR [TEST ...]   build into DIR and keep it (DIR/moe, DIR/<test program>);
#                            with no TEST, build the moe and every tests/gpu/test_*.c program and exit
# A script test (TEST.sh, e.g. tests/gpu/test_grpo_cuda.sh) runs against a `moe` whose trainer takes the
# GPU path (train/trainer.c built with MOE_HAVE_CUDA) over the emulated kernels (slowly: every kernel runs its
# threads one by one).  NCCL is not emulated: the emulated moe runs its device collectives host-staged over
# MPI, so `mpirun -np N` of it exercises expert and data parallelism of the GPU model.
#   EMU_SAN= tests/gpu/emu/run.sh   without sanitizers (faster);  EMU_OPT=-O2 to optimise more
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../../.." && pwd)
SAN=${EMU_SAN--fsanitize=address,undefined}
OPT=${EMU_OPT:--O1}
moe_out= work= keep=0
while [ $# -gt 0 ]; do
	case "$1" in
	--moe) moe_out=$2; shift 2 ;;
	--build) work=$(mkdir -p "$2" && cd "$2" && pwd); keep=1; shift 2 ;;
	*) break ;;
	esac
done
tests=("$@")
if [ -z "$work" ]; then
	work=$(mktemp -d)
	trap 'rm -rf "$work"' EXIT
fi
blas=-I/usr/include/x86_64-linux-gnu/openblas-openmp
CXX="g++ -std=c++17 $OPT -g $SAN -w -I$here/include -I$work/src -I$src"
CC="gcc -std=c11 $OPT -g $SAN -Wall -Wextra -I$src -I$src/tests"
mkdir -p "$work/obj" "$work/tobj"

# the CUDA sources of every backend folder, transformed for the emulator
build_cuda_objs() {
	local d f
	rm -f "$work"/obj/*.o
	for d in launch/cuda model/cuda optim/cuda; do
		python3 "$here/transform.py" "$src/$d" "$work/src/$d"
		for f in "$work"/src/$d/*.cu; do
			grep -q '<nccl.h>' "$f" && continue  # NCCL is not emulated: the emulated runs use the MPI path
			$CXX -x c++ -c "$f" -o "$work/obj/$(echo "$d" | tr / _)_$(basename "$f" .cu).o" &
			pids+=($!)
		done
		# the backend's C files (model/cuda/attention_cudnn.c): without cuDNN's headers, so the emulated
		# attention always runs our kernel
		for f in "$src"/$d/*.c; do
			[ -e "$f" ] || continue
			$CC -DMOE_HAVE_CUDA=1 -c "$f" -o "$work/obj/$(echo "$d" | tr / _)_$(basename "$f" .c).o" &
			pids+=($!)
		done
	done
	$CXX -c "$here/emu.cpp" -o "$work/obj/emu.o" &
	pids+=($!)
	wait_all
}

pids=()
wait_all() {  # every job started with `... & pids+=($!)`, failing if one did
	local rc=0 j
	for j in "${pids[@]}"; do wait "$j" || rc=1; done
	pids=()
	return $rc
}

# the CPU reference: the whole moecore library built without CUDA, with the same flags
build_cpu() {
	cmake -S "$src" -B "$work/cpu" -DMOE_CUDA=OFF -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS="$OPT $SAN" \
		>"$work/cmake.log" 2>&1 || { cat "$work/cmake.log"; exit 1; }
	cmake --build "$work/cpu" --target moecore -j "$(nproc)" >"$work/build.log" 2>&1 ||
		{ tail -30 "$work/build.log"; exit 1; }
	$CC -c "$src/tests/harness.c" -o "$work/tobj/harness.o"
}

build_cuda_objs
build_cpu
# what every emulated program links: the CPU library and its packages
LIBS=("$work/cpu/libmoecore.a" $(cat "$work/cpu/moecore_libs.txt" 2>/dev/null) -lcunit
	-L/usr/lib/x86_64-linux-gnu/openblas-openmp -lopenblas -lgomp -lhdf5_serial -lcjson $(pkg-config --libs libpcre2-8)
	$(pkg-config --libs ompi-c 2>/dev/null || echo -lmpi) -lm)

# the C files that take the GPU path with MOE_HAVE_CUDA (the trainer, GPU rollouts) (ahead of libmoecore's CPU-only copies in every link)
build_cuda_c() {
	local f
	for f in train/trainer.c train/grad_sync.c train/zero.c train/train.c train/distill.c rl/generate.c rl/grpo.c \
		rl/rl_cli.c; do
		$CC -DMOE_HAVE_CUDA=1 $blas $(pkg-config --cflags libcjson ompi-c 2>/dev/null) \
			-I/usr/include/hdf5/serial -c "$src/$f" -o "$work/tobj/cuda_$(basename "$f" .c).o" &
		pids+=($!)
	done
	wait_all
}

build_moe() {  # $work/moe: moe.c and the trainer with MOE_HAVE_CUDA, over the emulated kernels
	$CC -DMOE_HAVE_CUDA=1 $blas $(pkg-config --cflags libcjson ompi-c 2>/dev/null) -c "$src/moe.c" \
		-o "$work/tobj/moe_main.o"
	g++ $SAN -o "$work/moe" "$work/tobj/moe_main.o" "$work"/tobj/cuda_*.o "$work"/obj/*.o "${LIBS[@]}"
}

build_test() {  # $work/NAME from tests/gpu/NAME.c
	local t=$1 name
	name=$(basename "$t" .c)
	$CC -DMOE_HAVE_CUDA=1 $blas $(pkg-config --cflags ompi-c 2>/dev/null) -c "$src/$t" -o "$work/tobj/$name.o"
	g++ $SAN -o "$work/$name" "$work/tobj/$name.o" "$work/tobj/harness.o" "$work"/tobj/cuda_*.o \
		"$work"/obj/*.o "${LIBS[@]}"
}

build_cuda_c
if [ -n "$moe_out" ]; then
	build_moe
	cp "$work/moe" "$moe_out"
	exit 0
fi
if [ $keep = 1 ] && [ ${#tests[@]} -eq 0 ]; then
	build_moe
	for t in "$src"/tests/gpu/test_*.c; do
		build_test "tests/gpu/$(basename "$t")" &
		pids+=($!)
	done
	wait_all
	exit 0
fi
[ ${#tests[@]} -gt 0 ] || tests=(tests/gpu/test_ops_cuda.c)
status=0
for t in "${tests[@]}"; do
	if [[ "$t" == *.sh ]]; then  # a script test, with the emulated moe
		[ -x "$work/moe" ] || build_moe
		echo "=== $t, moe on emulated CUDA"
		MOE_BIN="$work/moe" MOE_SRC="$src" MOE_EMU=1 ASAN_OPTIONS=detect_leaks=0 OMP_NUM_THREADS=2 \
			bash "$src/$t" || status=1
		continue
	fi
	name=$(basename "$t" .c)
	build_test "$t"
	for order in 0 1; do
		echo "=== $name, emulated CUDA, thread order $([ $order = 1 ] && echo reverse || echo forward)"
		EMU_REVERSE=$order ASAN_OPTIONS=detect_leaks=0 OMP_NUM_THREADS=2 "$work/$name" || status=1
	done
done
exit $status
