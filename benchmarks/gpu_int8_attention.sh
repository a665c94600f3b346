#!/bin/bash
# One H200 call for precision="int8" attention (issue 15): GPU tests of the 8-bit path, then the
# quality + speed harness at the 5B shape (ours bf16, ours int8 variants, FA3 bf16 / FP8).
# Run from the repository root (or a staged copy) with the wheels in ../../.whl; results in $OUT.
#   COMMIT=<sha> [EXTRA_TESTS="tests/ops/test_attention_hopper.py"] bash benchmarks/gpu_int8_attention.sh
# (EXTRA_TESTS: more test files/options for the same pytest call; a -k expression needs quoting
# inside it, e.g. EXTRA_TESTS="-k \"not kernel_configs\"" does not survive word splitting: list files)
set -u
OUT=${OUT:-/tmp/int8_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site ../../.whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt"
echo "commit ${COMMIT:-unknown}" >> "$OUT/gpu.txt"
timeout ${TEST_S:-150} python3 -m pytest -q -m gpu tests/ops/test_attention_int8.py ${EXTRA_TESTS:-} -p no:cacheprovider \
    ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
timeout ${BENCH_S:-240} python3 benchmarks/attention_quality.py --out "$OUT" --commit "${COMMIT:-unknown}" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -30
