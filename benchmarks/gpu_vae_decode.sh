#!/usr/bin/env bash
# One GPU call for issue 14 (one H200): build the extension (CUDA, sm_90a), the GPU tests of the fused VAE
# conv and of apply(vae) (tests/ops/test_vae_conv.py, tests/integrations/test_vae_resnet.py; TEST_K narrows
# them), the decode/encode benchmark (benchmarks/bench_vae_decode.py: diffusers un-tiled, enable_tiling(),
# apply(vae); s, peak GiB above the inputs, rel err vs float32) and, with VAE_CHUNKS=1, apply(vae)'s decode
# at several frame-chunk sizes plus a kernel profile (benchmarks/experiments/vae_decode_chunks.py).
# Run from the repository root, with the wheels of diffusers + importlib_metadata in $WHL (default .whl):
#
#   COGVIDEOX_KERNELS_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_vae_decode.sh
#   VAE_LARGE=1 LARGE_VARIANTS=patched LARGE_ENCODE=diffusers,patched ...   # + 81x768x1360 rows
#   VARIANTS=patched ...                                                      # 49x480x720: ours only
#   FUSED_MODULATION=off|on|both (default both): apply(vae) with the spatial norm's conv_y / conv_b as module
#   calls (COGVIDEOX_KERNELS_VAE_FUSED_MODULATION_CUDA=0; rows "patched") and inside the CUDA activation pass
#   (=1, the default; rows "patched fused-mod"); PROFILE_FUSED=0: the VAE_CHUNKS profile with it off
#
# $OUT gets vae_decode_{build,pytest_gpu,bench}.log, vae_decode_results.md, vae_decode_rows.{json,csv} and,
# with VAE_CHUNKS=1, vae_decode_chunks.{json,log} and vae_decode_profile.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a folder}
BUDGET_S=${BUDGET_S:-400}
WHL=${WHL:-.whl}
t0=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - t0) )); }
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/vae_decode_build.log" 2>&1 \
  || { tail -40 "$OUT/vae_decode_build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "from cogvideox_kernels import _ext; assert _ext.cuda_available(), 'extension built without CUDA'" || exit 1

if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${TEST_S:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops/test_vae_conv.py \
    tests/integrations/test_vae_resnet.py ${TEST_K:+-k "$TEST_K"} >"$OUT/vae_decode_pytest_gpu.log" 2>&1
  echo "pytest rc=$?" >>"$OUT/vae_decode_pytest_gpu.log"
  tail -n 8 "$OUT/vae_decode_pytest_gpu.log"
  echo "tests done: $(( $(date +%s) - t0 )) s"
fi

RES=/tmp/cvk-vae-decode && rm -rf "$RES"
large=(); [ -n "${VAE_LARGE:-}" ] && large=(--large --large-variants "${LARGE_VARIANTS:-diffusers,diffusers tiled,patched}"
                                            --large-encode "${LARGE_ENCODE:-}")
chunk_s=0; [ -n "${VAE_CHUNKS:-}" ] && chunk_s=${CHUNK_S:-45}
bench_s=$(( $(left) - 5 - chunk_s ))
timeout "$bench_s" python3 benchmarks/bench_vae_decode.py --out "$RES" --deadline-s $(( bench_s - 5 )) "${large[@]}" \
  --variants "${VARIANTS:-diffusers,diffusers tiled,patched}" --fused-modulation "${FUSED_MODULATION:-both}" \
  >"$OUT/vae_decode_bench.log" 2>&1
echo "bench rc=$?" >>"$OUT/vae_decode_bench.log"
cp "$RES/vae_decode_results.md" "$OUT/" 2>/dev/null
cp "$RES/step_rows.json" "$OUT/vae_decode_rows.json" 2>/dev/null
cp "$RES/step_rows.csv" "$OUT/vae_decode_rows.csv" 2>/dev/null
echo "bench done: $(( $(date +%s) - t0 )) s"
if [ -n "${VAE_CHUNKS:-}" ]; then
  COGVIDEOX_KERNELS_VAE_FUSED_MODULATION_CUDA=${PROFILE_FUSED:-1} \
    timeout $(( $(left) - 3 )) python3 benchmarks/experiments/vae_decode_chunks.py --out "$OUT" \
    >"$OUT/vae_decode_chunks.log" 2>&1
  echo "chunks rc=$?" >>"$OUT/vae_decode_chunks.log"
  tail -n 6 "$OUT/vae_decode_chunks.log"
fi
cat "$OUT/vae_decode_results.md" 2>/dev/null || tail -n 40 "$OUT/vae_decode_bench.log"
echo "total: $(( $(date +%s) - t0 )) s"
