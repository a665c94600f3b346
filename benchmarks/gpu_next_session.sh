#!/usr/bin/env bash
# The next session's first GPU call: everything this session built without a GPU, measured and
# checked in one run (best on nvidia-h200-x2: two lanes in parallel; one GPU runs them in turn).
#
#   COGVIDEOX_KERNELS_COMMIT=<sha> OUT=<folder> bash benchmarks/gpu_next_session.sh
#
# Lane A (GPU 0): the Hopper attention's next variants (ping-pong, q's LN + RoPE in the prologue,
#   persistent grid; benchmarks/experiments/hopper_attention_next.py) beside the shipped path and FA3
#   at 5B and head_dim 128 (hopper_bound_probe.py --next), then the int8 FFN tile sweep and 5B step
#   (bench_fp8_ffn.py).
# Lane B (GPU 1): the GPU tests of what was written blind (the VAE's fused spatial-norm modulation
#   and packed-weight cache, the fused attention half), the VAE decode with the fused modulation on
#   and off (gpu_vae_decode.sh's variables), the attention-half bench (gpu_attention_half.sh).
# Wheels (diffusers, importlib_metadata, fa3-fwd) come from .whl/ (../shared/tools/gpu-wheels.sh).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a folder}
SHA=${COGVIDEOX_KERNELS_COMMIT:-unknown}
RES=/tmp/cvk-next
rm -rf "$RES" && mkdir -p "$RES"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
t0=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$RES/build.log" 2>&1 || { tail -40 "$RES/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
lane_b_gpu=$(( ngpu > 1 ? 1 : 0 ))

lane_a() {
  CUDA_VISIBLE_DEVICES=0 timeout "${PROBE_S:-240}" python3 benchmarks/experiments/hopper_bound_probe.py \
    --out "$RES/hopper" --next >"$RES/hopper.log" 2>&1
  echo "hopper probe rc=$?" >>"$RES/hopper.log"
  CUDA_VISIBLE_DEVICES=0 timeout "${FFN8_S:-240}" python3 benchmarks/bench_fp8_ffn.py --out "$RES/ffn8" \
    --commit "$SHA" --budget-s "${FFN8_BUDGET_S:-220}" >"$RES/ffn8.log" 2>&1
  echo "ffn8 rc=$?" >>"$RES/ffn8.log"
}
lane_b() {
  CUDA_VISIBLE_DEVICES=$lane_b_gpu COGVIDEOX_KERNELS_VAE_FUSED_MODULATION_CUDA=1 timeout "${TEST_S:-200}" \
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops/test_vae_conv.py tests/integrations/test_vae_resnet.py \
    tests/integrations/test_attention_half.py >"$RES/pytest_gpu.log" 2>&1
  echo "pytest rc=$?" >>"$RES/pytest_gpu.log"
  CUDA_VISIBLE_DEVICES=$lane_b_gpu COGVIDEOX_KERNELS_COMMIT=$SHA OUT="$RES/vae" SKIP_TESTS=1 \
    timeout "${VAE_S:-200}" bash benchmarks/gpu_vae_decode.sh >"$RES/vae.log" 2>&1
  echo "vae rc=$?" >>"$RES/vae.log"
  if [ -f benchmarks/gpu_attention_half.sh ]; then
    CUDA_VISIBLE_DEVICES=$lane_b_gpu COMMIT=$SHA OUT="$RES/half" \
      timeout "${HALF_S:-150}" bash benchmarks/gpu_attention_half.sh >"$RES/half.log" 2>&1
    echo "half rc=$?" >>"$RES/half.log"
  fi
}
mkdir -p "$RES/vae" "$RES/half"
if [ "$ngpu" -gt 1 ]; then
  lane_a & lane_b; wait
else
  lane_a; lane_b
fi
tar czf "$OUT/results.tgz" -C "$RES" .
for f in hopper ffn8 pytest_gpu vae half; do
  [ -f "$RES/$f.log" ] && { echo "== $f"; tail -n "${TAIL:-25}" "$RES/$f.log"; }
done
echo "total: $(( $(date +%s) - t0 )) s"
