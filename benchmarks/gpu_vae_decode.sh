#!/usr/bin/env bash
# One GPU call for issue 14's integration step (one H200, <= 240 s): build the extension (CUDA, sm_90a),
# the GPU tests of the fused VAE conv (tests/ops/test_vae_conv*.py) and of apply(vae)'s ResNet blocks
# (tests/integrations/test_vae_resnet.py: a 128-channel block and the whole CogVideoX-5B-config VAE in bf16
# against float32, within 1.25x / 2x diffusers' own bf16 error), then the decode/encode benchmark at
# 49x480x720 (benchmarks/bench_vae_decode.py: diffusers un-tiled, enable_tiling(), apply(vae); s, peak GiB
# above the inputs, rel err vs float32). Run from the repository root, with .whl carried (diffusers):
#
#   ../shared/tools/gpu-wheels.sh      # once, here: diffusers + importlib_metadata wheels into .whl/
#   COGVIDEOX_KERNELS_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_vae_decode.sh
#   VAE_LARGE=1 SKIP_TESTS=1 ... bash benchmarks/gpu_vae_decode.sh   # + 1.5-5B's 81x768x1360 decode
#
# $OUT gets 6 files: vae_decode_{build,pytest_gpu,bench}.log, vae_decode_results.md, vae_decode_rows.{json,csv}.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a folder}
BUDGET_S=${BUDGET_S:-235}
t0=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - t0) )); }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/vae_decode_build.log" 2>&1 \
  || { tail -40 "$OUT/vae_decode_build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "from cogvideox_kernels import _ext; assert _ext.cuda_available(), 'extension built without CUDA'" || exit 1

if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${TEST_S:-100}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops/test_vae_conv*.py \
    tests/integrations/test_vae_resnet.py >"$OUT/vae_decode_pytest_gpu.log" 2>&1
  echo "pytest rc=$?" >>"$OUT/vae_decode_pytest_gpu.log"
  tail -n 15 "$OUT/vae_decode_pytest_gpu.log"
fi

RES=/tmp/cvk-vae-decode && rm -rf "$RES"
large=(); [ -n "${VAE_LARGE:-}" ] && large=(--large)
bench_s=$(( $(left) - 5 ))
timeout "$bench_s" python3 benchmarks/bench_vae_decode.py --out "$RES" --deadline-s $(( bench_s - 5 )) "${large[@]}" \
  >"$OUT/vae_decode_bench.log" 2>&1
echo "bench rc=$?" >>"$OUT/vae_decode_bench.log"
cp "$RES/vae_decode_results.md" "$OUT/" 2>/dev/null
cp "$RES/step_rows.json" "$OUT/vae_decode_rows.json" 2>/dev/null
cp "$RES/step_rows.csv" "$OUT/vae_decode_rows.csv" 2>/dev/null
cat "$OUT/vae_decode_results.md" 2>/dev/null || tail -n 40 "$OUT/vae_decode_bench.log"
echo "total: $(( $(date +%s) - t0 )) s"
