#!/usr/bin/env bash
# Offline compile check (no GPU): nvcc the CUTLASS TU for sm_90a, print ptxas register/spill figures,
# cuobjdump's resource usage (if a cuobjdump is found) and the configs' smem/threads/stages.
#   CUTLASS_DIR=<...>/cutlass_library/source benchmarks/experiments/cutlass_conv3d/build_offline.sh [OUTDIR] [extra nvcc flags]
# CUTLASS_DIR defaults to the installed nvidia-cutlass wheel's cutlass_library/source.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-/tmp/cutlass_conv3d_build}"; shift || true
CUTLASS_DIR="${CUTLASS_DIR:-$(python3 -c 'import importlib.util, os; s = importlib.util.find_spec("cutlass_library"); print(os.path.join(list(s.submodule_search_locations)[0], "source"))')}"
mkdir -p "$out"
flags=(-std=c++17 -O3 -DNDEBUG -gencode arch=compute_90a,code=sm_90a --expt-relaxed-constexpr
       --expt-extended-lambda -I"$CUTLASS_DIR/include" -I"$CUTLASS_DIR/tools/util/include")
( time nvcc "${flags[@]}" -Xptxas -v "$@" -c "$here/conv3d_sm90.cu" -o "$out/conv3d_sm90.o" ) 2>&1 | tee "$out/build.log" \
  | grep -E "Used|spill|^real|error" || true
test -f "$out/conv3d_sm90.o"
nvcc "${flags[@]}" "$here/offline_info.cpp" "$out/conv3d_sm90.o" -cudart static -o "$out/offline_info"
"$out/offline_info"
cuobjdump_bin="$(command -v cuobjdump || ls /usr/local/cuda/bin/cuobjdump 2>/dev/null || \
  python3 -c 'import triton, os; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"
if [ -x "$cuobjdump_bin" ]; then "$cuobjdump_bin" --dump-resource-usage "$out/conv3d_sm90.o" | grep -E "REG"; fi
