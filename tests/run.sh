#!/usr/bin/env bash
# tests/run.sh - the test command: installs what is missing, builds, runs every test with ctest.
# Extra arguments go to ctest (e.g. tests/run.sh -R model_ ; tests/run.sh -L gpu).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/setup.sh"
BUILD_DIR="${BUILD_DIR:-$ROOT/build}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cd "$BUILD_DIR"
ctest --output-on-failure -V --timeout 1800 "$@"
