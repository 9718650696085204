#!/usr/bin/env bash
# Speed part of the device check (issue 10), each step time-boxed; JSON lines under $OUT (or out/gpu_speed).
#   bash scripts/gpu_speed.sh            (from the repo root on the GPU machine; carry .whl for the fla anchors)
set -u
OUT=${OUT:-out/gpu_speed}; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps .whl/*.whl >/dev/null 2>&1
t() { local n=$1 s=$2; shift 2; local t0=$SECONDS; timeout "$s" bash -c "$*" > "$OUT/$n.jsonl" 2> "$OUT/$n.log";
      echo "== $n rc=$? $((SECONDS - t0))s"; grep -v '^{"meta"' "$OUT/$n.jsonl" | cut -c1-330; tail -2 "$OUT/$n.log" | cut -c1-200; }
t atlas 150 python3 benchmarks/atlas_throughput.py --extra titans-mag-small --only atlas-mag-small titans-mag-small --backend chunked triton --batch 8 --steps 5 --warmup 2
t delta 90 python3 benchmarks/delta_rule_kernels.py --quick
t memory 100 python3 benchmarks/memory_kernels.py --precision ieee tf32x3
t decode 90 python3 benchmarks/decode.py --quick
t compile 150 python3 benchmarks/compile_check.py
