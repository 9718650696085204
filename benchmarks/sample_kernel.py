"""The in-graph sampler (op packed_sample, memlm.ops.sample_kernel): the one-pass Triton kernels vs the torch form,
eager and through torch.compile, each replayed from a CUDA graph of --reps calls (the kernels alone, as in a captured
decode step). One JSON line per (B, V, sampler, backend): microseconds per call, the median of --samples replays.

    python benchmarks/sample_kernel.py            # H100: seconds
    python benchmarks/sample_kernel.py --tiny     # CPU smoke test (Triton interpreter, no timing claims)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--tiny" in sys.argv:  # CPU: the Triton kernels run through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from memlm.ops import sample_kernel as sk


def graph_us(fn, reps: int, samples: int) -> float:
    """Median µs per call of `reps` calls captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test through the Triton interpreter")
    ap.add_argument("--shapes", nargs="+", default=["1x16384", "1x50257", "8x16384", "64x16384"], help="BxV")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=15)
    args = ap.parse_args()
    if args.tiny:
        dev, shapes = torch.device("cpu"), [(2, 300)]
    else:
        if not torch.cuda.is_available():
            sys.exit("sample_kernel: needs CUDA (or --tiny for the CPU smoke test)")
        dev, shapes = torch.device("cuda"), [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    print(json.dumps({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                      "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}), flush=True)
    compiled = None if args.tiny else torch.compile(sk.packed_sample_torch, dynamic=False)
    for B, V in shapes:
        gen = torch.Generator(device=dev).manual_seed(0)
        x = (torch.randn(B, V, generator=gen, device=dev) * 3).to(torch.float32 if args.tiny else torch.bfloat16)
        noise = torch.empty(B, V, device=dev).exponential_(generator=gen)
        for sampler, e, tau in (("greedy", None, 0.0), ("temperature 0.8", noise, 0.8)):
            ref = sk.packed_sample_torch(x, e, tau)
            impls = {"triton": sk.packed_sample_triton, "torch": sk.packed_sample_torch}
            if compiled is not None:
                impls["torch compiled"] = compiled
            for name, fn in impls.items():
                out = fn(x, e, tau)
                rec = {"B": B, "V": V, "sampler": sampler, "backend": name,
                       "same_tokens": bool((out[0] == ref[0]).all()),
                       "max_logprob_diff": float((out[1] - ref[1]).abs().max()),
                       "max_entropy_diff": float((out[2] - ref[2]).abs().max())}
                if dev.type == "cuda":
                    rec["graph_us"] = round(graph_us(lambda fn=fn, x=x, e=e, tau=tau: fn(x, e, tau), args.reps,
                                                     args.samples), 2)
                print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
