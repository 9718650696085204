"""One-token decode attention over a static KV buffer: the split-KV Triton kernels vs dense-mask SDPA
(memlm.ops.decode_attention, backends "triton" and "sdpa").

Default (CUDA): B 1, Hq = Hk 8, Dh 64, bf16, a full buffer of L ∈ {1K, 4K, 16K, 64K} slots holding positions
0 … L−1 (slot = position), the query at position L−1. Calls cycle through enough copies of the inputs (≥ 256 MB of
K and V) that every call reads its buffer from HBM, not from the 50 MB L2 — as in a model, where each layer reads its
own buffer. Each backend is timed two ways with CUDA events, the median of --samples samples of --reps calls each:
eagerly (Python launch cost included) and replayed from a CUDA graph holding --reps calls (the kernels alone, as in
a captured decode step). kv_gbps: bytes of K and V read per call / graph time. One JSON line per (backend, L), and a
"check" line per L (relative difference triton vs sdpa).

    python benchmarks/decode_attention.py            # H100: seconds
    python benchmarks/decode_attention.py --tiny     # CPU smoke test (Triton interpreter)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

if "--tiny" in sys.argv:  # CPU: the Triton kernels run through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from memlm.ops import decode_attention as da


def make_inputs(B: int, Hq: int, Hk: int, L: int, Dh: int, dtype: torch.dtype, device: torch.device) -> tuple:
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Hq, 1, Dh, generator=gen, device=device, dtype=dtype)
    k = torch.randn(B, Hk, L, Dh, generator=gen, device=device, dtype=dtype)
    v = torch.randn(B, Hk, L, Dh, generator=gen, device=device, dtype=dtype)
    kpos = torch.arange(L, device=device).expand(B, L).contiguous()
    qpos = torch.full((B,), L - 1, device=device)
    qdoc = torch.zeros(B, dtype=torch.long, device=device)
    return q, k, v, kpos, qpos, qdoc


def time_us(fns: list, *, reps: int, samples: int, device: torch.device, graph: bool) -> float:
    """Median microseconds per call: samples of `reps` calls (cycling through fns), eager or replayed from one
    captured graph."""
    def calls():
        for i in range(reps):
            fns[i % len(fns)]()

    run = calls
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            calls()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            calls()
        run = g.replay
    run()
    times = []
    for _ in range(samples):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / reps)
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e6 / reps)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: L 64/256 through the Triton interpreter")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: = heads (MHA)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--tune", action="store_true", help="sweep the Triton kernel's programs, block, warps and stages "
                    "(graph time per setting, then the best per length)")
    args = ap.parse_args()
    if args.tiny:
        device, dtype, args.lengths, args.reps, args.samples = torch.device("cpu"), torch.float32, [64, 256], 1, 1
    else:
        if not torch.cuda.is_available():
            sys.exit("decode_attention: needs CUDA (or --tiny for the CPU smoke test)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    B, Hq, Dh = args.batch, args.heads, args.dim
    Hk = args.kv_heads or Hq
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "triton": getattr(da.triton, "__version__", None), "B": B,
                      "Hq": Hq, "Hk": Hk, "Dh": Dh, "dtype": str(dtype).removeprefix("torch.")}), flush=True)
    if args.tune:
        return tune(args, B, Hq, Hk, Dh, dtype, device)
    for L in args.lengths:
        kv_bytes = 2 * B * Hk * L * Dh * dtype.itemsize
        copies = 1 if device.type == "cpu" else max(2, -(-(256 << 20) // kv_bytes))   # ≥ 256 MB: not in L2
        inputs = [make_inputs(B, Hq, Hk, L, Dh, dtype, device) for _ in range(copies)]
        reps = max(args.reps, copies)
        outs = {}
        for backend in ("triton", "sdpa"):
            fns = [lambda inp=inp, backend=backend: da.decode_attention(*inp, slot_is_pos=True, backend=backend)
                   for inp in inputs]
            outs[backend] = fns[0]()
            rec = {"impl": backend, "L": L, **(da.plan(B, Hq, L, 0, Dh) if backend == "triton" else {})}
            rec["eager_us"] = round(time_us(fns, reps=reps, samples=args.samples, device=device, graph=False), 2)
            if device.type == "cuda":
                us = time_us(fns, reps=reps, samples=args.samples, device=device, graph=True)
                rec["graph_us"] = round(us, 2)
                rec["kv_gbps"] = round(kv_bytes / us / 1e3, 1)
            print(json.dumps(rec), flush=True)
        del inputs
        a, b = outs["triton"].double(), outs["sdpa"].double()
        print(json.dumps({"check": "relative difference triton vs sdpa", "L": L,
                          "value": f"{((a - b).norm() / b.norm()).item():.2e}"}), flush=True)


def tune(args, B: int, Hq: int, Hk: int, Dh: int, dtype: torch.dtype, device: torch.device) -> None:
    """Graph time of the Triton kernels for every (PROGRAMS, BLOCK, num_warps, num_stages) in a small grid."""
    default = da.PROGRAMS
    for L in args.lengths:
        kv_bytes = 2 * B * Hk * L * Dh * dtype.itemsize
        inputs = [make_inputs(B, Hq, Hk, L, Dh, dtype, device) for _ in range(max(2, -(-(256 << 20) // kv_bytes)))]
        fns = [lambda inp=inp: da.decode_attention(*inp, slot_is_pos=True, backend="triton") for inp in inputs]
        best = []
        for programs, block, warps, stages in itertools.product((256, 512, 1024), (32, 64, 128), (1, 2, 4),
                                                                (1, 2, 3)):
            da.PROGRAMS, da.TUNE = programs, {"BLOCK": block, "num_warps": warps, "num_stages": stages}
            try:
                us = time_us(fns, reps=max(args.reps, len(fns)), samples=args.samples, device=device, graph=True)
            except Exception as e:  # noqa: BLE001 (a setting that fails to build is reported and skipped), e.g. out of shared memory / registers for a large tile
                print(json.dumps({"L": L, **da.TUNE, "PROGRAMS": programs, "error": type(e).__name__}), flush=True)
                continue
            rec = {"L": L, "PROGRAMS": programs, **da.TUNE, "graph_us": round(us, 2),
                   "kv_gbps": round(kv_bytes / us / 1e3, 1)}
            best.append(rec)
            print(json.dumps(rec), flush=True)
        best.sort(key=lambda r: r["graph_us"])
        print(json.dumps({"best": best[:5]}), flush=True)
        del inputs, fns
    da.PROGRAMS, da.TUNE = default, {}


if __name__ == "__main__":
    main()
