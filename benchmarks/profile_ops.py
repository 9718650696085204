"""Where the GPU time goes: torch.profiler over (a) one delta-rule forward + backward and (b) one eager training step
of a preset, printing the top CUDA kernels by total time as JSON lines (issue 10: the profile behind every missed
target in docs/benchmarks.md).

    python benchmarks/profile_ops.py                                  # H100: delta rule at T 2K + gated-deltanet-34m
    python benchmarks/profile_ops.py --what delta --T 8192 --backend triton
    python benchmarks/profile_ops.py --what step --preset atlas-mag-small --batch 8

Notation: B batch rows, T tokens per row, H heads, D head width (delta rule: 65,536 tokens per call, as in
benchmarks/delta_rule_kernels.py).
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from memlm.ops import dispatch


def top_kernels(prof, n: int) -> tuple[list[dict], float]:
    """The n CUDA kernels with the largest total device time, with their share of all kernel time."""
    rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in rows) or 1.0
    rows.sort(key=lambda e: -e.self_device_time_total)
    return [{"kernel": e.key[:110], "calls": e.count, "ms": round(e.self_device_time_total / 1e3, 3),
             "share": round(e.self_device_time_total / total, 3)} for e in rows[:n]], total / 1e3


def run_profiled(fn, warmup: int, iters: int):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return prof


def delta_case(T: int, backend: str, gated: bool):
    B, H, D = max(1, 65536 // T), 8, 64
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=dev), dim=-1).to(dt).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=dev), dim=-1).to(dt).requires_grad_()
    v = torch.randn(B, T, H, D, device=dev, dtype=dt).requires_grad_()
    beta = torch.rand(B, T, H, device=dev, dtype=dt).requires_grad_()
    g = (-torch.rand(B, T, H, device=dev) * 0.1).requires_grad_() if gated else None
    do = torch.randn(B, T, H, D, device=dev, dtype=dt)

    def fn():
        o, _ = dispatch.call("delta_rule", q, k, v, beta, g, backend=backend, output_final_state=False)
        o.backward(do)
    return fn


def step_case(preset: str, batch: int, seq: int):
    from compile_check import batches, make_trainer  # same trainer set-up as the throughput check
    tr = make_trainer(preset, batch, seq)
    b = batches(tr.cfg.model.vocab_size, batch, seq, 0, docs=False)
    return lambda: tr.train_step(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", nargs="+", default=["delta", "step"], choices=["delta", "step"])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--gated", action="store_true")
    ap.add_argument("--preset", default="gated-deltanet-34m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    cases = {}
    if "delta" in args.what:
        cases[f"delta_rule[{args.backend}] T={args.T} gated={args.gated}"] = delta_case(args.T, args.backend, args.gated)
    if "step" in args.what:
        cases[f"train_step {args.preset} B={args.batch} T={args.seq}"] = step_case(args.preset, args.batch, args.seq)
    for name, fn in cases.items():
        prof = run_profiled(fn, warmup=2, iters=args.iters)
        rows, total = top_kernels(prof, args.top)
        print(json.dumps({"profile": name, "kernel_ms_per_iter": round(total / args.iters, 3)}), flush=True)
        for r in rows:
            r["ms"] = round(r["ms"] / args.iters, 3)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
