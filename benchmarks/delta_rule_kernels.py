"""Delta rule kernels, forward + backward time: memlm triton vs memlm chunked vs fla vs causal SDPA (issue 10).

Default (CUDA): 65,536 tokens per call, H 8 heads, D 64, bf16, T ∈ {2048, 8192, 32768} with B = 65536 / T.
Each implementation runs a forward and a backward (gradients of q, k, v, β for a random output gradient),
timed with CUDA events after warmup; the median is reported. Implementations:
  memlm-triton   memlm.ops.delta_rule.triton_impl: the whole chunk pipeline in Triton (triton_fused.py) for bf16
  memlm-triton-unfused   the same backend pinned to its older path (prelude/outputs in PyTorch, recurrence in Triton)
  memlm-triton-gated     memlm-triton with a log decay g (Gated DeltaNet's op)
  memlm-chunked  memlm.ops.delta_rule.chunked (PyTorch, Python loop over chunks)
  fla            fla.ops.delta_rule.chunk_delta_rule, if `fla` imports
  sdpa-causal    torch scaled_dot_product_attention(is_causal=True) (flash attention), as a yardstick
One JSON line per (impl, T), a "check" line per T (relative output differences between implementations on the
same inputs) and a "ratio" line memlm-triton / fla. A time budget skips what is left rather than overrunning.

    python benchmarks/delta_rule_kernels.py            # H100: < 40 s
    python benchmarks/delta_rule_kernels.py --quick    # fewer iterations
    python benchmarks/delta_rule_kernels.py --tiny     # CPU smoke test (Triton interpreter), seconds

Notation: B batch rows, T tokens per row, H heads, D head dim (Dk = Dv), β write strength (ungated delta rule,
g = None, which is what fla's chunk_delta_rule computes).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time

if "--tiny" in sys.argv:  # CPU: Triton kernels only run through the interpreter, decided before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

from memlm.ops.delta_rule import chunked, triton_impl


def fla_delta_rule():
    """fla's chunk_delta_rule as f(q, k, v, beta) -> o on [B, T, H, D], or None if fla is not importable."""
    try:
        from fla.ops.delta_rule import chunk_delta_rule
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    extra = {"head_first": False} if "head_first" in inspect.signature(chunk_delta_rule).parameters else {}

    def f(q, k, v, beta):
        return chunk_delta_rule(q, k, v, beta, scale=1.0, output_final_state=False, **extra)[0]
    return f


def implementations(device: torch.device) -> dict:
    impls = {
        "memlm-triton": lambda q, k, v, beta: triton_impl.delta_rule(q, k, v, beta, output_final_state=False)[0],
        "memlm-triton-unfused": lambda q, k, v, beta: triton_impl.delta_rule(q, k, v, beta, output_final_state=False,
                                                                             fused=False)[0],
        # gated (Gated DeltaNet's op; fla 0.6.0 refuses its gated backward on Triton < 3.7.1 on Hopper): g = −0.05 β
        "memlm-triton-gated": lambda q, k, v, beta: triton_impl.delta_rule(q, k, v, beta, -0.05 * beta.detach(),
                                                                           output_final_state=False)[0],
        "memlm-chunked": lambda q, k, v, beta: chunked.delta_rule(q, k, v, beta, output_final_state=False)[0],
    }
    fla = fla_delta_rule() if device.type == "cuda" else None
    if fla is not None:
        impls["fla"] = fla
    # takes q, k, v as [B, H, T, D], made contiguous by the caller so that no transpose copy is timed
    impls["sdpa-causal"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return impls


def make_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """q, k unit-norm, v, beta ∈ (0, 1) as [B, T, H, D] / [B, T, H] leaves, plus the output gradient."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)
    q = F.normalize(randn(B, T, H, D), dim=-1)
    k = F.normalize(randn(B, T, H, D), dim=-1)
    v = randn(B, T, H, D)
    beta = torch.sigmoid(randn(B, T, H))
    do = randn(B, T, H, D)
    return tuple(x.to(dtype).requires_grad_(x is not do) for x in (q, k, v, beta, do))


def time_fwd_bwd(fn, args: tuple, do: torch.Tensor, *, warmup: int, iters: int, device: torch.device
                 ) -> tuple[float, torch.Tensor]:
    """Median milliseconds of forward + backward, and the last output."""
    leaves = [a for a in args if a.requires_grad]

    def step() -> torch.Tensor:
        o = fn(*args)
        torch.autograd.grad(o, leaves, do)
        return o

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            o = step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            o = step()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), o.detach()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 warmup and 3 timed iterations")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shapes through the Triton interpreter")
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per call (B · T)")
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 8192, 32768], help="T values")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=35.0, help="skip what is left after this many seconds")
    ap.add_argument("--tf32", action="store_true", help="fp32 matmuls on TF32 tensor cores "
                    "(torch.set_float32_matmul_precision('high')): the PyTorch prelude's fp32 matmuls")
    ap.add_argument("--compiled", action="store_true", help="also memlm-triton through torch.compile (how a "
                    "compiled training step runs it: the PyTorch prelude fused by inductor; compiles once per T)")
    args = ap.parse_args()
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    t_start = time.perf_counter()
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        args.tokens, args.seq, args.heads, args.dim = 256, [64, 128], 2, 16
        warmup, iters = 0, 1
    else:
        if not torch.cuda.is_available():
            sys.exit("delta_rule_kernels: needs CUDA (or --tiny for the CPU smoke test)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        warmup, iters = (1, 3) if args.quick else (2, 5)
    impls = implementations(device)
    if args.compiled:
        impls = {"memlm-triton-compiled": torch.compile(impls["memlm-triton"]), **impls}
    print(json.dumps({"tf32": args.tf32, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "triton": getattr(triton_impl.triton, "__version__", None),
                      "impls": list(impls), "tokens": args.tokens, "H": args.heads, "D": args.dim,
                      "dtype": str(dtype).removeprefix("torch.")}), flush=True)
    for T in args.seq:
        B = max(1, args.tokens // T)
        q, k, v, beta, do = make_inputs(B, T, args.heads, args.dim, dtype, device)
        sdpa_args = tuple(x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        sdpa_do = do.transpose(1, 2).contiguous()
        ms, outs = {}, {}
        for name, fn in impls.items():
            rec = {"impl": name, "T": T, "B": B, "H": args.heads, "D": args.dim}
            if time.perf_counter() - t_start > args.budget_s:
                print(json.dumps({**rec, "skipped": f"time budget {args.budget_s:.0f} s used up"}), flush=True)
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                if name == "sdpa-causal":
                    t, o = time_fwd_bwd(fn, sdpa_args, sdpa_do, warmup=warmup, iters=iters, device=device)
                else:
                    t, o = time_fwd_bwd(fn, (q, k, v, beta), do, warmup=warmup, iters=iters, device=device)
                    outs[name] = o
            except Exception as e:  # noqa: BLE001 - one failing implementation must not hide the others
                print(json.dumps({**rec, "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
                continue
            ms[name] = t
            rec.update(fwd_bwd_ms=round(t, 3), mtok_per_s=round(B * T / t / 1e3, 2))
            if device.type == "cuda":
                rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            print(json.dumps(rec), flush=True)
        if "memlm-triton" in outs:
            ref = outs["memlm-triton"]
            print(json.dumps({"check": "relative output difference to memlm-triton", "T": T,
                              **{n: f"{rel(o, ref):.2e}" for n, o in outs.items()
                                 if n != "memlm-triton" and not n.endswith("-gated")}}),
                  flush=True)
        for name in ("memlm-triton", "memlm-triton-compiled"):
            if name in ms and "fla" in ms:
                print(json.dumps({"ratio": f"{name}/fla", "T": T, "value": round(ms[name] / ms["fla"], 3)}),
                      flush=True)
        del q, k, v, beta, do, sdpa_args, sdpa_do, outs
    print(json.dumps({"total_s": round(time.perf_counter() - t_start, 1)}), flush=True)


if __name__ == "__main__":
    main()
