#!/usr/bin/env bash
# The quantized-linear tile kernels of this tree's csrc/quant_kernel.h against those of a git revision (default
# HEAD), outside the extension (tools/quant_tile_bench.cpp says what it runs and prints):
#   tools/quant_tile_bench.sh [REV] [ROUNDS]
# For trying a kernel change in seconds, without rebuilding the extension; the tests against the float64
# references (tests/kernels/test_quant.py, after the rebuild) still decide whether it is right.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:-HEAD}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git show "$rev:csrc/quant_kernel.h" > "$tmp/base.h"
g++ -O3 -std=c++20 -mf16c -DQK_BASE="\"$tmp/base.h\"" -DQK_CAND="\"$PWD/csrc/quant_kernel.h\"" \
  tools/quant_tile_bench.cpp -o "$tmp/quant_tile_bench"
"$tmp/quant_tile_bench" "${2:-5}"
