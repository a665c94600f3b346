#!/bin/bash
# One H200 call for precision="int8" attention (issue 15): GPU tests of the 8-bit path, then the
# quality + speed harness at the 5B shape (ours bf16, ours int8 variants, FA3 bf16 / FP8).
# Run from the repository root (or a staged copy) with the wheels in .whl/ (or ../../.whl); results
# in $OUT. Rotation of q and k (int8acc), old vs new in one call:
#   COMMIT=<sha> BENCH_ARGS="--variants int8,int8_rot,int8_runmax,int8_rot_runmax" \
#     bash benchmarks/gpu_int8_attention.sh
# k as two INT8 parts (int8k2: K_SPLIT) against today's kernel, its GPU tests only (-k k_split):
#   COMMIT=<sha> TEST_S=170 BENCH_S=270 PYTEST_ARGS="-k k_split" \
#     BENCH_ARGS="--variants int8,int8_rot_ksplit,int8_rot_ksplit_heads,int8_rot,int8_rot_ksplit_s3" \
#     bash benchmarks/gpu_int8_attention.sh
#   COMMIT=<sha> [EXTRA_TESTS="tests/ops/test_attention_hopper.py"] bash benchmarks/gpu_int8_attention.sh
# (EXTRA_TESTS: more test files/options for the same pytest call; a -k expression needs quoting
# inside it, e.g. EXTRA_TESTS="-k \"not kernel_configs\"" does not survive word splitting: list files)
set -u
OUT=${OUT:-/tmp/int8_out}; mkdir -p "$OUT"
WHL=${WHL:-.whl}; [ -d "$WHL" ] || WHL=../../.whl  # .whl/ carried into the copy, else a staged layout
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHL"/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt"
echo "commit ${COMMIT:-unknown}" >> "$OUT/gpu.txt"
timeout ${TEST_S:-150} python3 -m pytest -q -m gpu tests/ops/test_attention_int8.py ${EXTRA_TESTS:-} -p no:cacheprovider \
    ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
timeout ${BENCH_S:-240} python3 benchmarks/attention_quality.py --out "$OUT" --commit "${COMMIT:-unknown}" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -30
