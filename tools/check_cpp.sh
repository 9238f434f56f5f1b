#!/usr/bin/env bash
# Syntax/type-check C++ files against torch's headers without building (seconds, not a minute), at both vector
# widths setup.py builds (AVX-512 and AVX2):
#   tools/check_cpp.sh csrc/foo.cpp [...]
# Use it before saving a C++ change into csrc/, so the shared extension build never breaks for others.
set -euo pipefail
PY=${PY:-$(dirname "$0")/../.venv/bin/python}
INC=$($PY -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
PYINC=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for f in "$@"; do
  for cap in "AVX512 -mavx512f -mavx512bw -mavx512vl -mavx512dq" "AVX2"; do
    set -- $cap
    name=$1; shift
    g++ -fsyntax-only -std=c++20 -fopenmp "$@" -mavx2 -mfma -mf16c -DCPU_CAPABILITY=$name -DCPU_CAPABILITY_$name \
      -DTORCH_EXTENSION_NAME=_C_check -Icsrc $INC -I"$PYINC" "$f"
  done
  echo "ok: $f"
done
