#!/bin/bash
# tests/gpu/emu/run.sh - run tests/gpu/test_ops_cuda.c on a machine WITHOUT a GPU: the CUDA backend's
# kernels (launch/cuda, model/cuda, optim/cuda) are compiled as C++ against a small emulator (include/emu.h, emu.cpp) and
# checked against the CPU ops, under AddressSanitizer/UBSan, with the threads of each block scheduled in
# forward and then in reverse order.  A development aid for kernel authors, not part of ctest or the build:
# it checks index arithmetic, masking, barriers and shared-memory bounds, not speed; the real check remains
# ctest -L gpu on a GPU machine.
#
#   tests/gpu/emu/run.sh [TEST.c | TEST.sh ...]   (from anywhere; default tests/gpu/test_ops_cuda.c; needs
#                                       g++, python3, cmake, CUnit, OpenBLAS, HDF5, cJSON: the CPU build's packages)
# A script test (TEST.sh, e.g. tests/gpu/test_grpo_cuda.sh) runs against a `moe` whose trainer takes the
# GPU path (train/trainer.c built with MOE_HAVE_CUDA) over the emulated kernels: the wiring of a command
# to the GPU model, end to end, without a GPU (slowly: every kernel runs its threads one by one).
#   EMU_SAN= tests/gpu/emu/run.sh   without sanitizers (faster)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
SAN=${EMU_SAN--fsanitize=address,undefined}
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(tests/gpu/test_ops_cuda.c)
blas=-I/usr/include/x86_64-linux-gnu/openblas-openmp

# the CUDA sources of every backend folder, transformed for the emulator
cuda_dirs="launch/cuda model/cuda optim/cuda"
CXX="g++ -std=c++17 -O1 -g $SAN -w -I$here/include -I$work/src -I$src"
CC="gcc -std=c11 -O1 -g $SAN -Wall -Wextra -I$src -I$src/tests"
mkdir -p "$work/obj" "$work/tobj"
for d in $cuda_dirs; do
	python3 "$here/transform.py" "$src/$d" "$work/src/$d"
	for f in "$work"/src/$d/*.cu; do
		grep -q '<nccl.h>' "$f" && continue  # NCCL is not emulated: the emulated runs use the MPI path
		$CXX -x c++ -c "$f" -o "$work/obj/$(echo "$d" | tr / _)_$(basename "$f" .cu).o"
	done
done
$CXX -c "$here/emu.cpp" -o "$work/obj/emu.o"
# the CPU reference: the whole moecore library built without CUDA, with the same sanitizers
cmake -S "$src" -B "$work/cpu" -DMOE_CUDA=OFF -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS="-O1 $SAN" \
	>"$work/cmake.log" 2>&1 || { cat "$work/cmake.log"; exit 1; }
cmake --build "$work/cpu" --target moecore -j "$(nproc)" >"$work/build.log" 2>&1 ||
	{ tail -30 "$work/build.log"; exit 1; }
$CC -c "$src/tests/harness.c" -o "$work/tobj/harness.o"

# what every emulated program links: the CPU library and its packages
LIBS=("$work/cpu/libmoecore.a" $(cat "$work/cpu/moecore_libs.txt" 2>/dev/null) -lcunit
	-L/usr/lib/x86_64-linux-gnu/openblas-openmp -lopenblas -lgomp -lhdf5_serial -lcjson
	$(pkg-config --libs ompi-c 2>/dev/null || echo -lmpi) -lm)
status=0
for t in "${tests[@]}"; do
	if [[ "$t" == *.sh ]]; then  # a script test, with the emulated moe
		if [ ! -x "$work/moe" ]; then
			for f in train/trainer.c moe.c; do
				$CC -DMOE_HAVE_CUDA=1 $blas $(pkg-config --cflags libcjson ompi-c 2>/dev/null) \
					-I/usr/include/hdf5/serial -c "$src/$f" -o "$work/tobj/emu_$(basename "$f" .c).o"
			done
			g++ $SAN -o "$work/moe" "$work"/tobj/emu_*.o "$work"/obj/*.o "${LIBS[@]}"
		fi
		echo "=== $t, moe on emulated CUDA"
		MOE_BIN="$work/moe" MOE_SRC="$src" ASAN_OPTIONS=detect_leaks=0 OMP_NUM_THREADS=2 \
			bash "$src/$t" || status=1
		continue
	fi
	name=$(basename "$t" .c)
	$CC -DMOE_HAVE_CUDA=1 $blas -c "$src/$t" -o "$work/tobj/$name.o"
	g++ $SAN -o "$work/$name" "$work/tobj/$name.o" "$work/tobj/harness.o" "$work"/obj/*.o "${LIBS[@]}"
	for order in 0 1; do
		echo "=== $name, emulated CUDA, thread order $([ $order = 1 ] && echo reverse || echo forward)"
		EMU_REVERSE=$order ASAN_OPTIONS=detect_leaks=0 OMP_NUM_THREADS=2 "$work/$name" || status=1
	done
done
exit $status
