#!/bin/bash
# tests/gpu/emu/run.sh - run tests/gpu/test_ops_cuda.c on a machine WITHOUT a GPU: the CUDA backend's
# kernels (model/cuda/*.cu) are compiled as C++ against a small emulator (include/emu.h, emu.cpp) and
# checked against the CPU ops, under AddressSanitizer/UBSan, with the threads of each block scheduled in
# forward and then in reverse order.  A development aid for kernel authors, not part of ctest or the build:
# it checks index arithmetic, masking, barriers and shared-memory bounds, not speed; the real check remains
# ctest -L gpu on a GPU machine.
#
#   tests/gpu/emu/run.sh            (from anywhere; needs g++, python3, CUnit, OpenBLAS)
#   EMU_SAN= tests/gpu/emu/run.sh   without sanitizers (faster)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
SAN=${EMU_SAN--fsanitize=address,undefined}
blas=$(pkg-config --cflags openblas 2>/dev/null || echo -I/usr/include/x86_64-linux-gnu/openblas-pthread)

python3 "$here/transform.py" "$src/model/cuda" "$work/src/model/cuda"
CXX="g++ -std=c++17 -O1 -g $SAN -w -I$here/include -I$work/src -I$src"
CC="gcc -std=c11 -O1 -g $SAN -Wall -Wextra -I$src -I$src/tests"
mkdir -p "$work/obj"
for f in "$work"/src/model/cuda/*.cu; do
	$CXX -x c++ -c "$f" -o "$work/obj/$(basename "$f" .cu).o"
done
$CXX -c "$here/emu.cpp" -o "$work/obj/emu.o"
$CC -fopenmp $blas -c "$src/model/ops_cpu.c" -o "$work/obj/ops_cpu.o"
$CC -c "$src/tests/harness.c" -o "$work/obj/harness.o"
$CC -DMOE_HAVE_CUDA=1 -c "$src/tests/gpu/test_ops_cuda.c" -o "$work/obj/test_ops_cuda.o"
g++ $SAN -o "$work/test_emu" "$work"/obj/*.o -lcunit -lopenblas -lgomp -lm

status=0
for order in 0 1; do
	echo "=== emulated CUDA, thread order $([ $order = 1 ] && echo reverse || echo forward)"
	EMU_REVERSE=$order ASAN_OPTIONS=detect_leaks=0 OMP_NUM_THREADS=2 "$work/test_emu" || status=1
done
exit $status
