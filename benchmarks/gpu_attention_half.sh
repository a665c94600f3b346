#!/bin/bash
# One H200 call for the fused attention half (issue 13's step bar): the attention half of one 5B block
# three ways with its pieces, the 5B step rows (eager, ours, ours with the fused half, FA3 + compiled
# blocks, ours + compile), then the GPU tests of the integration. Results in $OUT.
# Run from the repository root with the wheels (diffusers, importlib_metadata, fa3-fwd) in .whl:
#   COMMIT=<sha> bash benchmarks/gpu_attention_half.sh
set -u
OUT=${OUT:-/tmp/attention_half_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt"
echo "commit ${COMMIT:-unknown}" >> "$OUT/gpu.txt"
timeout ${HALF_S:-110} python3 benchmarks/bench_attention_half.py --out "$OUT" 2>&1 | tee "$OUT/half.log" | grep ROW
timeout ${STEP_S:-330} python3 benchmarks/bench_step.py --out "$OUT" --preset 5b --sections step \
    --variants "eager,ours,ours (fused attention half),fa3+compile,ours+compile" \
    --deadline $(( $(date +%s) + ${STEP_S:-330} - 15 )) 2>&1 | tee "$OUT/step.log" | grep ROW
timeout ${TEST_S:-130} python3 -m pytest -q -m gpu tests/integrations/test_attention_half.py \
    tests/integrations/test_integration_diffusers.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -5
