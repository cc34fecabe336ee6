#!/usr/bin/env bash
# launch/setup.sh - install what is missing (Debian packages, as root or through sudo) and build moe.
# Used by launch/demo.sh and tests/run.sh; safe to run again (only missing packages are installed).
#   BUILD_DIR   build directory (default: build)        MOE_CUDA  ON|OFF (default: on when nvcc exists)
#   BUILD_TYPE  Release | Debug | RelWithDebInfo         MOE_SANITIZE=ON  ASan + UBSan build
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build}"
# clang, libclang-rt-dev (its libFuzzer and sanitizer runtimes) and libomp-dev: the fuzz build (tests/fuzz)
PACKAGES=(build-essential cmake pkg-config openmpi-bin libopenmpi-dev libhdf5-dev hdf5-tools
	  libcunit1-dev libopenblas-openmp-dev libcjson-dev libpcre2-dev python3 clang libclang-rt-dev libomp-dev)

missing=()
for p in "${PACKAGES[@]}"; do
	dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "setup: installing ${missing[*]}"
	SUDO=""
	if [ "$(id -u)" != 0 ]; then
		command -v sudo >/dev/null || { echo "setup: need root (or sudo) to install ${missing[*]}" >&2; exit 1; }
		SUDO=sudo
	fi
	export DEBIAN_FRONTEND=noninteractive
	$SUDO apt-get update -qq
	$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# nvcc lives outside the default PATH on CUDA installs
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
	export PATH="/usr/local/cuda/bin:$PATH"
fi
cuda_flag=()
if [ -n "${MOE_CUDA:-}" ]; then cuda_flag=(-DMOE_CUDA="$MOE_CUDA"); fi

cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" \
	-DMOE_SANITIZE="${MOE_SANITIZE:-OFF}" "${cuda_flag[@]}" >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"
