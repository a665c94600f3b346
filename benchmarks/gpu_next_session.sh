#!/usr/bin/env bash
# One GPU call that measures and checks what was written without a GPU (one H200; ~8-9 min):
#
#   COGVIDEOX_KERNELS_COMMIT=<sha> OUT=<folder> PARTS="probe tests half" bash benchmarks/gpu_next_session.sh
#
# The extension builds in the background while the first GPU part (which needs no extension) runs.
# Parts, in the order given:
#   probe  the Hopper attention's next variants (ping-pong, q's LN + RoPE in the prologue, persistent
#          grid, lazy row sums; benchmarks/experiments/hopper_attention_next.py) beside the shipped path
#          and FA3 at 5B and head_dim 128 (hopper_bound_probe.py --next)
#   ncu    one profiled launch of the Hopper attention kernel at 5B (stall reasons per source line:
#          the two warpgroup BAR.SYNCs per key block, issue 13's open question)
#   norm   the LN-modulate pre-pass's launch sweep (experiments/norm_sweep.py: rows per program, warps,
#          column chunks; today two rows in flight per SM)
#   prepass  the attention pre-pass piece by piece and its launch config (experiments/prepass_sweep.py)
#   step   the 5B step through apply() beside diffusers eager and diffusers + FA3 + compiled blocks
#   tests  GPU tests (TEST_FILES; default: the VAE's fused spatial-norm modulation (CUDA path switched
#          on) and packed-weight cache, and the fused attention half)
#   half   the attention-half bench (bench_attention_half.py)
#   vae    the VAE decode with the fused modulation on and off (gpu_vae_decode.sh)
#   ffn8   the int8 FFN tile sweep and 5B step rows (bench_fp8_ffn.py)
# Wheels (diffusers, importlib_metadata, fa3-fwd) come from .whl/ (../shared/tools/gpu-wheels.sh).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a folder}
SHA=${COGVIDEOX_KERNELS_COMMIT:-unknown}
PARTS=${PARTS:-probe tests half}
RES=/tmp/cvk-next
rm -rf "$RES" && mkdir -p "$RES/vae"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
( python3 -m pip install -q --no-build-isolation --no-deps -e . >"$RES/build.log" 2>&1; echo "build rc=$? $(( $(date +%s) - t0 )) s" >>"$RES/build.log" ) &
build_pid=$!
built=0
need_build() { [ $built = 1 ] || { wait $build_pid; built=1; tail -2 "$RES/build.log"; }; }
for part in $PARTS; do
  case $part in
    probe)
      timeout "${PROBE_S:-240}" python3 benchmarks/experiments/hopper_bound_probe.py --out "$RES/hopper" \
        ${PROBE_NEXT---next} --shapes "${PROBE_SHAPES:-5b,d128}" >"$RES/probe.log" 2>&1
      echo "probe rc=$?" >>"$RES/probe.log" ;;
    prepass)
      timeout "${PREPASS_S:-90}" python3 benchmarks/experiments/prepass_sweep.py --out "$RES/prepass" \
        >"$RES/prepass.log" 2>&1
      echo "prepass rc=$?" >>"$RES/prepass.log" ;;
    step)
      need_build
      timeout "${STEP_S:-300}" python3 benchmarks/bench_step.py --out "$RES/step" --preset 5b --sections step \
        --variants "${STEP_VARIANTS:-eager,ours,fa3+compile,ours+compile}" \
        --deadline $(( $(date +%s) + ${STEP_S:-300} - 15 )) >"$RES/step.log" 2>&1
      echo "step rc=$?" >>"$RES/step.log" ;;
    ncu)
      timeout "${NCU_S:-150}" ncu --clock-control none -k regex:_hopper_attention_fwd_kernel --launch-skip 1 \
        --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
        --section SchedulerStats --section InstructionStats --section SourceCounters --import-source yes \
        -o "$RES/ncu_rep" python3 benchmarks/experiments/hopper_ncu_case.py >"$RES/ncu.log" 2>&1
      echo "ncu rc=$?" >>"$RES/ncu.log"
      ncu -i "$RES/ncu_rep.ncu-rep" --page details >>"$RES/ncu.log" 2>&1
      # stall reasons per SASS line (what the section summaries do not say)
      ncu -i "$RES/ncu_rep.ncu-rep" --page source --csv --print-source sass >"$RES/ncu_source_sass.csv" 2>&1 ||
        ncu -i "$RES/ncu_rep.ncu-rep" --page source --csv >"$RES/ncu_source_sass.csv" 2>&1
      echo "ncu source rows: $(wc -l <"$RES/ncu_source_sass.csv")" >>"$RES/ncu.log" ;;
    norm)
      timeout "${NORM_S:-90}" python3 benchmarks/experiments/norm_sweep.py --out "$RES/norm" >"$RES/norm.log" 2>&1
      echo "norm rc=$?" >>"$RES/norm.log" ;;
    tests)
      need_build
      COGVIDEOX_KERNELS_VAE_FUSED_MODULATION_CUDA=1 timeout "${TEST_S:-150}" python3 -m pytest -q -m gpu \
        -p no:cacheprovider ${TEST_FILES:-tests/ops/test_vae_conv.py tests/integrations/test_vae_resnet.py \
        tests/integrations/test_attention_half.py} >"$RES/tests.log" 2>&1
      echo "pytest rc=$?" >>"$RES/tests.log" ;;
    half)
      need_build
      timeout "${HALF_S:-90}" python3 benchmarks/bench_attention_half.py --out "$RES/half" >"$RES/half.log" 2>&1
      echo "half rc=$?" >>"$RES/half.log" ;;
    vae)
      need_build
      COGVIDEOX_KERNELS_COMMIT=$SHA OUT="$RES/vae" SKIP_TESTS=1 BUDGET_S=${VAE_S:-200} \
        bash benchmarks/gpu_vae_decode.sh >"$RES/vae.log" 2>&1
      echo "vae rc=$?" >>"$RES/vae.log" ;;
    ffn8)
      need_build
      timeout "${FFN8_S:-240}" python3 benchmarks/bench_fp8_ffn.py --out "$RES/ffn8" --commit "$SHA" \
        --budget-s "$(( ${FFN8_S:-240} - 20 ))" >"$RES/ffn8.log" 2>&1
      echo "ffn8 rc=$?" >>"$RES/ffn8.log" ;;
  esac
  echo "$part done: $(( $(date +%s) - t0 )) s"
done
need_build
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >"$RES/gpu.txt" 2>&1
echo "commit $SHA" >>"$RES/gpu.txt"
tar czf "$OUT/results.tgz" -C "$RES" .
for part in $PARTS; do
  [ -f "$RES/$part.log" ] && { echo "== $part"; grep -v "^{" "$RES/$part.log" | tail -n "${TAIL:-30}"; }
done
echo "total: $(( $(date +%s) - t0 )) s"
