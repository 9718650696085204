#!/usr/bin/env bash
# Speed part of the device check (issue 10), each step time-boxed; JSON lines under $OUT (or out/gpu_speed).
#   bash scripts/gpu_speed.sh            (from the repo root on the GPU machine; carry .whl for the fla anchors)
set -u
OUT=${OUT:-out/gpu_speed}; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps .whl/*.whl >/dev/null 2>&1
t() { local n=$1 s=$2; shift 2; local t0=$SECONDS; timeout "$s" bash -c "$*" > "$OUT/$n.jsonl" 2> "$OUT/$n.log";
      echo "== $n rc=$? $((SECONDS - t0))s"; grep -v '^{"meta"' "$OUT/$n.jsonl" | cut -c1-330; tail -2 "$OUT/$n.log" | cut -c1-200; }
t atlas 100 python3 benchmarks/atlas_throughput.py --extra titans-mag-small --only atlas-mag-small titans-mag-small --backend triton --batch 8 --steps 5 --warmup 2
t atlas_tf32x3 80 MEMLM_TRITON_PRECISION=tf32x3 python3 benchmarks/atlas_throughput.py --only atlas-mag-small --backend triton --batch 8 --steps 4 --warmup 2
t delta 120 python3 benchmarks/delta_rule_kernels.py --quick --compiled --budget-s 110
t hope_scan 60 python3 benchmarks/hope_scan.py --loop
t hope_scan_read 60 python3 benchmarks/hope_scan.py --read --loop
t onyx 200 python3 benchmarks/atlas_throughput.py --preset onyx-11m --only onyx-11m "'transformer(d384,L6,H6)'" --batch 16 --steps 5 --warmup 2 --compile
t decode 90 python3 benchmarks/decode.py --presets transformer-34m gated-deltanet-34m atlas-mag-medium --contexts 1024 16384 --modes cuda_graph cuda_graph_compiled --engine-modes cuda_graph_compiled --hf none --new-tokens 128
t sampler 60 python3 benchmarks/sample_kernel.py
t compile 150 python3 benchmarks/compile_check.py --presets gated-deltanet-34m --batch 16 --seq 2048 --inductor --skip-graph --eager --docs no --steps 10 --warmup 3
