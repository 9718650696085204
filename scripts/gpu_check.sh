#!/usr/bin/env bash
# One batched GPU check (device budget is small): every GPU test and the quick benchmarks, in priority order.
#   run on the device from the repo root:  bash scripts/gpu_check.sh correct, then graphs, then speed
#   (graphs = the 29 CUDA-graph training tests, each graphed against eager: ≈ 6 min; speed = scripts/gpu_speed.sh)
#   (each part fits one 10-minute device call; no argument runs all three; results under $OUT or out/gpu_check)
# Each step is time-boxed so a slow one cannot eat the others; a summary table is printed at the end.
# Carry the fla wheels in .whl/ (pip download flash-linear-attention==0.6.0 fla-core==0.6.0 --no-deps -d .whl).
set -u
PART=${1:-all}
case $PART in correct|graphs|speed|all) ;; *) echo "usage: bash scripts/gpu_check.sh [correct|graphs|speed|all]" >&2; exit 2;; esac
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # no editable install: the device has no network for build deps
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps .whl/*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"
date -u | tee -a "$OUT/machine.txt"
declare -a SUMMARY
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" bash -c "$*" > "$OUT/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -1 "$OUT/$name.log" | cut -c1-90)")")
}
if [ "$PART" = correct ] || [ "$PART" = all ]; then
# 1. correctness of every fast path against its reference (decides whether Triton becomes the CUDA default)
step test_delta_triton 120 python3 -m pytest -q -p no:randomly -m gpu tests/ops/test_delta_rule_triton.py
step test_memory_triton 180 python3 -m pytest -q -p no:randomly -m gpu tests/ops/test_neural_memory_triton.py tests/ops/test_compressive_triton.py tests/ops/test_short_conv.py
step test_hope_scan 200 python3 -m pytest -q -p no:randomly -m gpu tests/ops/test_hope_scan_triton.py
# half-precision inputs with TF32x3 dots: if this passes, triton_memory.HALF_DOT_PRECISION can become "tf32x3"
# (Triton 3.6 on an H100: illegal memory access in 8 of 12, 2026-11-22)
step test_memory_tf32x3 80 "MEMLM_TRITON_PRECISION=tf32x3 python3 -m pytest -q -p no:randomly -m gpu tests/ops/test_neural_memory_triton.py -k bf16"
# the rest, CUDA graph-break test (9 presets compiled) included: about 5 minutes
step test_gpu_other 300    python3 -m pytest -q -p no:randomly --durations=8 -m gpu tests --ignore=tests/ops/test_delta_rule_triton.py --ignore=tests/ops/test_neural_memory_triton.py --ignore=tests/ops/test_compressive_triton.py --ignore=tests/train/test_cuda_graph.py
fi
if [ "$PART" = graphs ] || [ "$PART" = all ]; then
# 2. the training step as a CUDA graph: every debug preset, float16, tbptt, compile (330 s cut 27 of 29, 2026-11-23)
step test_cuda_graph 540 python3 -m pytest -q -p no:randomly -p no:logging --durations=5 -m gpu tests/train/test_cuda_graph.py
fi
if [ "$PART" = speed ] || [ "$PART" = all ]; then
# 3. speed (issue 10): the benchmarks, each time-boxed, in scripts/gpu_speed.sh
step speed 540 "OUT=$OUT bash scripts/gpu_speed.sh"
fi
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
