#!/usr/bin/env bash
# tests/gpu/bundle.sh - build moe with CUDA for sm_90 and pack, into OUTDIR/moe-bundle.tar.xz, what a bare
# GPU machine (driver, CUDA toolkit, cmake, ninja; none of our Debian libraries, no network) needs to run
# the binaries: moe, every test executable, the benchmarks, hdf5-tools' h5dump/h5diff/h5ls (the script
# tests use them), the shared-library closure of all of these, and Open MPI's runtime (mpirun/orterun,
# orted, ompi_info, the MCA plugin folder, help files, its config, PMIx's plugins) relocated through
# OPAL_PREFIX. tests/gpu/run_bundle.sh unpacks and runs it there.
#
#   tests/gpu/bundle.sh [OUTDIR]            (default: $OUTDIR, else .bundle in the repository)
#   BUILD_DIR   build directory (default: build-gpu)
#   MOE_MARCH   host-code -march (default: x86-64-v3 = AVX2/FMA, runs on any recent x86-64 server; the
#               project's Release build uses -march=native, which can stop with SIGILL on another CPU).
#               MOE_MARCH=native keeps the plain Release build.
#   SKIP_BUILD=1  pack what BUILD_DIR already holds
#
# Left out of the closure (present on the GPU machine): glibc (libc, libm, libpthread, libdl, librt,
# ld-linux...), libstdc++, libgcc_s, the driver (libcuda, libnvidia-*), everything under
# /usr/local/cuda* (cudart, cuBLAS, cuBLASLt, NCCL: run_bundle.sh finds them there or in Python's
# nvidia-* wheels) and cuDNN (libcudnn*: nothing links it, the GPU attention and bench_attention dlopen
# libcudnn.so.9, cuDNN 9 is installed in /usr/lib/x86_64-linux-gnu on the GPU machine, and with its engine
# libraries it is about 1 GB).
# Everything copied is stripped (strip --strip-unneeded).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUTDIR="${1:-${OUTDIR:-$ROOT/.bundle}}"
export BUILD_DIR="${BUILD_DIR:-$ROOT/build-gpu}"
MOE_MARCH="${MOE_MARCH:-x86-64-v3}"
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
	export PATH="/usr/local/cuda/bin:$PATH"
fi

# ---- 1. build ------------------------------------------------------------------------------------------
cmake_args=(-DMOE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90)
if [ "$MOE_MARCH" = native ]; then
	export BUILD_TYPE=Release
else
	# CMakeLists.txt fixes CMAKE_C_FLAGS_RELEASE to "-O3 -march=native -DNDEBUG"; RelWithDebInfo with its
	# flags set to the same minus -march=native is that build for a portable target.
	export BUILD_TYPE=RelWithDebInfo
	cmake_args+=("-DCMAKE_C_FLAGS_RELWITHDEBINFO=-O3 -march=$MOE_MARCH -DNDEBUG"
		"-DCMAKE_CUDA_FLAGS_RELWITHDEBINFO=-O3 -DNDEBUG")
fi
cmake_args+=(-DCMAKE_BUILD_TYPE="$BUILD_TYPE")
if [ "${SKIP_BUILD:-0}" != 1 ]; then
	# Seed the cache first (may fail before launch/setup.sh installed the packages: it is re-run after),
	# then the project's own setup (packages + configure + build), then make sure the cache holds ours.
	cmake -S "$ROOT" -B "$BUILD_DIR" "${cmake_args[@]}" >/dev/null 2>&1 || true
	MOE_CUDA=ON "$ROOT/launch/setup.sh"
	cmake -S "$ROOT" -B "$BUILD_DIR" "${cmake_args[@]}" >/dev/null
	cmake --build "$BUILD_DIR" -j "$(nproc)"
fi
grep -q '^MOE_CUDA:BOOL=ON' "$BUILD_DIR/CMakeCache.txt" || { echo "bundle: $BUILD_DIR is not a CUDA build" >&2; exit 1; }
[ -x "$BUILD_DIR/moe" ] && [ -x "$BUILD_DIR/gpu_test_ops_cuda" ] || { echo "bundle: $BUILD_DIR lacks moe or gpu_test_ops_cuda" >&2; exit 1; }

# ---- 2. stage ------------------------------------------------------------------------------------------
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/moe-bundle-stage.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
B="$STAGE/moe-bundle"
mkdir -p "$B/bin" "$B/lib" "$B/ompi/bin" "$B/ompi/etc"

is_elf() { [ "$(od -An -tx1 -N4 "$1" 2>/dev/null | tr -d ' \n')" = 7f454c46 ]; }

# the project's executables
bins=("$BUILD_DIR/moe")
for f in "$BUILD_DIR"/*_test_* "$BUILD_DIR"/bench_*; do
	[ -f "$f" ] && [ -x "$f" ] && is_elf "$f" && bins+=("$f")
done
# hdf5-tools (tests/train/test_checkpoint_dist.sh and others call h5dump / h5diff)
for t in h5dump h5diff h5ls; do
	p="$(command -v "$t" || true)"
	[ -n "$p" ] && bins+=("$(readlink -f "$p")")
done
for f in "${bins[@]}"; do cp -L "$f" "$B/bin/"; done
for t in h5dump h5diff h5ls; do  # Debian's /usr/bin/h5dump -> h5dump.serial etc.
	for f in "$B/bin/$t".*; do [ -e "$f" ] && [ ! -e "$B/bin/$t" ] && ln -s "$(basename "$f")" "$B/bin/$t"; done
done

# Open MPI: binaries, plugins, help files, config; paths as ompi_info reports them, relocated under ompi/
opal_path() { ompi_info --path "$1" --parsable | sed -n "s/^path:$1://p" | head -1; }
OMPI_PREFIX="$(opal_path prefix)"
OMPI_PKGLIB="$(opal_path pkglibdir)"
OMPI_PKGDATA="$(opal_path pkgdatadir)"
OMPI_SYSCONF="$(opal_path sysconfdir)"
OMPI_BINDIR="$(opal_path bindir)"
rel_pkglib="${OMPI_PKGLIB#"$OMPI_PREFIX"/}"
rel_pkgdata="${OMPI_PKGDATA#"$OMPI_PREFIX"/}"
[ "$rel_pkglib" != "$OMPI_PKGLIB" ] && [ "$rel_pkgdata" != "$OMPI_PKGDATA" ] || {
	echo "bundle: Open MPI's pkglibdir/pkgdatadir are not under its prefix $OMPI_PREFIX" >&2; exit 1; }
orterun="$(readlink -f "$OMPI_BINDIR/orterun")"
cp -L "$orterun" "$B/ompi/bin/orterun"
ln -s orterun "$B/ompi/bin/mpirun"
ln -s orterun "$B/ompi/bin/mpiexec"
cp -L "$OMPI_BINDIR/orted" "$B/ompi/bin/orted"
cp -L "$OMPI_BINDIR/ompi_info" "$B/ompi/bin/ompi_info"
mkdir -p "$B/ompi/$rel_pkglib" "$B/ompi/$rel_pkgdata"
cp -rL "$OMPI_PKGLIB/." "$B/ompi/$rel_pkglib/"
cp -rL "$OMPI_PKGDATA/." "$B/ompi/$rel_pkgdata/"
# Debian's openmpi-mca-params.conf turns off ucx/ofi/openib (found through OPAL_SYSCONFDIR there)
[ -d "$OMPI_SYSCONF" ] && cp -rL "$OMPI_SYSCONF/." "$B/ompi/etc/"
echo "$rel_pkglib" >"$B/ompi/PKGLIBDIR"

# PMIx (Open MPI 4.1 on Debian uses the external one): its own plugin folder and help files, relocated
# with PMIX_PREFIX. Its prefix is the folder above lib/ holding libpmix.so.
pmixlib="$(ldd "$B/ompi/$rel_pkglib"/mca_pmix_ext*.so 2>/dev/null | awk '/libpmix\.so/ {print $3; exit}')"
if [ -n "$pmixlib" ]; then
	pmixprefix=""
	for d in "$(dirname "$(readlink -f "$pmixlib")")/.." "$(dirname "$pmixlib")/pmix2"; do
		[ -d "$d/lib/pmix" ] && { pmixprefix="$(cd "$d" && pwd)"; break; }
	done
	if [ -n "$pmixprefix" ]; then
		mkdir -p "$B/ompi/pmix/lib" "$B/ompi/pmix/share"
		cp -rL "$pmixprefix/lib/pmix" "$B/ompi/pmix/lib/"
		[ -d "$pmixprefix/share" ] && cp -rL "$pmixprefix/share/." "$B/ompi/pmix/share/"
		# its params file names the plugin folder by absolute path: run_bundle.sh sets it through the env
		[ -f "$B/ompi/pmix/share/pmix-mca-params.conf" ] &&
			sed -i 's|^\(mca_base_component_path *=.*\)|# \1  (set by run_bundle.sh)|' "$B/ompi/pmix/share/pmix-mca-params.conf"
	else
		echo "bundle: warning: PMIx's plugin folder not found next to $pmixlib" >&2
	fi
fi

# ---- 3. the shared-library closure ---------------------------------------------------------------------
# on the GPU machine already: glibc, the dynamic loader, libstdc++, libgcc_s, the driver, CUDA, cuDNN
skip_soname() {
	case "$1" in
	linux-vdso.so* | ld-linux*.so* | libc.so.* | libm.so.* | libmvec.so.* | libpthread.so.* | libdl.so.* | \
		librt.so.* | libresolv.so.* | libutil.so.* | libanl.so.* | libnsl.so.* | libBrokenLocale.so.* | \
		libthread_db.so.* | libc_malloc_debug.so.* | libnss_*.so.* | libstdc++.so.* | libgcc_s.so.* | \
		libcuda.so* | libnvidia-*.so* | libnvcuvid.so* | libcudadebugger.so* | libcudnn*.so*)
		return 0 ;;
	esac
	return 1
}
declare -A from=()
missing=0
closure() {  # DEST_LIBDIR FILE...: copy every library FILE... need (ldd: transitively) into DEST_LIBDIR
	local dest="$1" f name arrow path real
	shift
	for f in "$@"; do
		while read -r name arrow path _; do
			[ "$arrow" = "=>" ] || continue
			skip_soname "$name" && continue
			if [ "$path" = not ]; then
				echo "bundle: $(basename "$f") needs $name, not found here" >&2; missing=1; continue
			fi
			real="$(readlink -f "$path")"
			case "$real" in /usr/local/cuda*) continue ;; esac
			[ -e "$dest/$name" ] && continue
			[ "$dest" = "$B/lib" ] && from[$name]="$path"
			cp -L "$path" "$dest/$name"
		done < <(LD_LIBRARY_PATH="" ldd "$f" 2>/dev/null)
	done
}
elfs=()
while IFS= read -r -d '' f; do is_elf "$f" && elfs+=("$f"); done < <(find "$B" -type f -print0)
closure "$B/lib" "${elfs[@]}"

# Fallback tools the script tests call that a minimal image may lack (procps: tests/train/test_dist.sh's
# pgrep and ps): run_bundle.sh puts fallback/bin LAST in PATH, so the host's own win where present; each
# is a wrapper giving its binary (fallback/libexec) its own libraries (fallback/lib), outside LD_LIBRARY_PATH.
mkdir -p "$B/fallback/bin" "$B/fallback/libexec" "$B/fallback/lib"
for t in ${FALLBACK_TOOLS-ps pgrep pkill}; do
	p="$(command -v "$t" || true)"
	[ -n "$p" ] || { echo "bundle: warning: no $t here for the fallback tools" >&2; continue; }
	cp -L "$p" "$B/fallback/libexec/$t"
	closure "$B/fallback/lib" "$B/fallback/libexec/$t"
	printf '#!/bin/sh\n# fallback %s (bundle.sh): the host has none\nd="$(dirname "$0")/.."\nLD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/libexec/%s" "$@"\n' \
		"$t" "$t" >"$B/fallback/bin/$t"
	chmod +x "$B/fallback/bin/$t"
done
[ "$missing" = 0 ] || exit 1

# ---- 4. strip, manifest, pack --------------------------------------------------------------------------
while IFS= read -r -d '' f; do
	is_elf "$f" && { chmod u+w "$f"; strip --strip-unneeded "$f" 2>/dev/null || echo "bundle: could not strip $f" >&2; }
done < <(find "$B" -type f -print0)

glibc_need="$(find "$B" -type f -print0 | xargs -0 -r objdump -T 2>/dev/null | grep -o 'GLIBC_2\.[0-9]*' | sort -t. -k2 -n -u | tail -1 || true)"
glibcxx_need="$(find "$B" -type f -print0 | xargs -0 -r objdump -T 2>/dev/null | grep -o 'GLIBCXX_3\.4\.[0-9]*' | sort -t. -k3 -n -u | tail -1 || true)"
{
	echo "moe bundle, made $(date -u '+%F %T') UTC on $(. /etc/os-release && echo "$PRETTY_NAME"), $(uname -m)"
	echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (working tree differs)')"
	echo "build: $BUILD_DIR, CMAKE_BUILD_TYPE=$BUILD_TYPE, host -march=$MOE_MARCH, CUDA archs $(sed -n 's/^CMAKE_CUDA_ARCHITECTURES:[A-Z]*=//p' "$BUILD_DIR/CMakeCache.txt"), nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
	echo "open mpi: $(ompi_info --version 2>/dev/null | head -1); pkglibdir ompi/$rel_pkglib"
	echo "needs from the host: glibc >= ${glibc_need#GLIBC_}, libstdc++ with ${glibcxx_need:-no GLIBCXX symbol}, libgcc_s, the NVIDIA driver, CUDA 13 (libcudart.so.13, libcublas.so.13, libcublasLt.so.13), libnccl.so.2 and, for the cuDNN attention (train.attention) and bench_attention, cuDNN 9 (libcudnn.so.9, dlopen'ed: optional)"
	echo "needed from CUDA, not bundled: $(for f in "$B/bin"/*; do ldd "$f" 2>/dev/null; done | awk '/=>/ {print $1, $3}' | while read -r n p; do case "$(readlink -f "$p")" in /usr/local/cuda*) echo "$n" ;; esac; done | sort -u | tr '\n' ' ')"
	echo
	echo "fallback tools (fallback/bin, last in PATH): $(ls "$B/fallback/bin" | tr '\n' ' ')"
	echo "libraries (bundled name <- source):"
	for n in $(printf '%s\n' "${!from[@]}" | sort); do echo "  $n <- ${from[$n]}"; done
	echo
	echo "files:"
	(cd "$B" && find . -path ./ompi/"$rel_pkglib" -prune -o -path ./ompi/share -prune -o \( -type f -o -type l \) -print | sort | sed 's/^/  /')
	echo "  ./ompi/$rel_pkglib: $(find "$B/ompi/$rel_pkglib" -type f | wc -l) plugins"
} >"$B/MANIFEST.txt"

mkdir -p "$OUTDIR"
out="$OUTDIR/moe-bundle.tar.xz"
XZ_OPT="-9 -T0" tar -C "$STAGE" --owner=0 --group=0 -cJf "$out.tmp" moe-bundle
mv "$out.tmp" "$out"
cp "$B/MANIFEST.txt" "$OUTDIR/MANIFEST.txt"
raw=$(du -sb "$B" | cut -f1)
packed=$(stat -c %s "$out")
echo "bundle: $out"
echo "bundle: $(find "$B/bin" -type f | wc -l) executables, $(find "$B/lib" -type f | wc -l) libraries, $(find "$B/ompi/$rel_pkglib" -type f | wc -l) Open MPI plugins"
awk -v r="$raw" -v p="$packed" 'BEGIN { printf "bundle: %.1f MiB unpacked, %.1f MiB (%d bytes) as tar.xz (the carry limit: 64 MiB with the working tree)\n", r / 1048576, p / 1048576, p }'
