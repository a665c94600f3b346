#!/usr/bin/env bash
# One GPU call that validates main on an H200 (or H100): build, every GPU test, the bench at the 5B
# shapes (attention with FA3 beside it, FFN, temporal conv, the diffusers step with an FA3 + compile
# baseline), the diffusers-features check (LoRA + model offload on the 5B step) and the VAE conv bench.
# With two GPUs the tests and the features check run on GPU 0 while the benchmarks run on GPU 1.
#
#   COGVIDEOX_KERNELS_COMMIT=<sha> OUT=<folder> bash benchmarks/gpu_validate.sh
#
# Wheels the GPU image lacks (diffusers, importlib_metadata, fa3-fwd) are installed from .whl/ when
# present (../shared/tools/gpu-wheels.sh fa3-fwd==0.0.3). Results: $OUT/results.tgz plus the logs' tails.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a folder}
RES=/tmp/cvk-validate
rm -rf "$RES" && mkdir -p "$RES"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
t0=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$RES/build.log" 2>&1 || { tail -40 "$RES/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
cogvideox-kernels info >"$RES/info.txt" 2>&1; cat "$RES/info.txt"
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
bench_gpu=$(( ngpu > 1 ? 1 : 0 ))

tests() {
  CUDA_VISIBLE_DEVICES=0 timeout "${TEST_S:-330}" python3 -m pytest -q -m gpu -p no:cacheprovider tests \
    >"$RES/pytest_gpu.log" 2>&1
  echo "pytest rc=$?" >>"$RES/pytest_gpu.log"
  CUDA_VISIBLE_DEVICES=0 timeout "${FEATURES_S:-200}" python3 benchmarks/gpu_diffusers_features.py --out "$RES/features" \
    >"$RES/features.log" 2>&1
  echo "features rc=$?" >>"$RES/features.log"
}
benches() {
  CUDA_VISIBLE_DEVICES=$bench_gpu timeout "${BENCH_S:-420}" cogvideox-kernels bench --preset 5b \
    --ops attention,ffn,conv,step --out "$RES/bench" --no-progress >"$RES/bench.log" 2>&1
  echo "bench rc=$?" >>"$RES/bench.log"
  CUDA_VISIBLE_DEVICES=$bench_gpu timeout "${VAE_S:-120}" python3 benchmarks/bench_vae_conv.py --out "$RES/vae_conv" \
    --profile >"$RES/vae_conv.log" 2>&1
  echo "vae_conv rc=$?" >>"$RES/vae_conv.log"
}
if [ "$ngpu" -gt 1 ]; then
  tests & benches; wait
else
  tests; benches
fi
tar czf "$OUT/results.tgz" -C "$RES" .
for f in pytest_gpu features bench vae_conv; do
  echo "== $f"; tail -n "${TAIL:-25}" "$RES/$f.log"
done
echo "total: $(( $(date +%s) - t0 )) s"
