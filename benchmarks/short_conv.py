"""The short causal depthwise conv (op "short_conv": memlm.layers.shortconv.causal_conv1d_torch vs the Triton kernels of
memlm.ops.short_conv), forward and forward+backward, at the training shape of the neural memory's q/k/v conv.

For each case (norm_group 0 / 32, without / with random document resets) and backend it times, with CUDA events after
--warmup calls, the median of --reps calls of
  fwd      y = conv(x) with x, weight, bias requiring grad (the training forward, autograd graph included);
  fwd+bwd  the same and the gradients of x, weight and bias for a fixed random dy;
and compares y and dx with the float32 torch reference run on float32 copies of the same inputs. One JSON line per
(case, backend): backend, shapes, dtype, fwd_ms, fwd_bwd_ms, max_abs_err_y, max_abs_err_dx.

    python benchmarks/short_conv.py                        # H100: [16, 2048, 768] bf16, K 4, SiLU; seconds
    python benchmarks/short_conv.py --compiled             # + the torch form under torch.compile
    python benchmarks/short_conv.py --shape 8x4096x1536 --dtype fp32
    python benchmarks/short_conv.py --tiny                 # CPU smoke test (Triton interpreter, no timing claims)

Notation: B batch rows, T tokens, C channels, K kernel width, g norm group (each run of g channels L2-normalised).
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

from memlm.layers.shortconv import causal_conv1d_torch
from memlm.ops import short_conv as sc

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed(fn, warmup: int, reps: int, cuda: bool) -> float:
    """Median milliseconds of fn() (CUDA events on the GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test through the Triton interpreter")
    ap.add_argument("--shape", default="16x2048x768", help="BxTxC")
    ap.add_argument("--kernel", type=int, default=4, help="K")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--groups", type=int, nargs="+", default=[0, 32], help="norm_group values (0: off)")
    ap.add_argument("--reset-rate", type=float, default=1 / 512, help="P(reset) per token in the reset cases")
    ap.add_argument("--compiled", action="store_true", help="also time the torch form under torch.compile")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if args.tiny:
        dev, (B, T, C), dtype, args.warmup, args.reps = torch.device("cpu"), (2, 40, 96), torch.float32, 1, 2
    else:
        if not torch.cuda.is_available():
            sys.exit("short_conv: needs CUDA (or --tiny for the CPU smoke test)")
        dev, dtype = torch.device("cuda"), DTYPES[args.dtype]
        B, T, C = (int(v) for v in args.shape.split("x"))
    K = args.kernel
    cuda = dev.type == "cuda"
    print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d")}), flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    x32 = torch.randn(B, T, C, generator=gen, device=dev)
    w32 = torch.randn(C, K, generator=gen, device=dev) / K ** 0.5
    b32 = torch.randn(C, generator=gen, device=dev) * 0.1
    dy = torch.randn(B, T, C, generator=gen, device=dev).to(dtype)
    resets = torch.rand(B, T, generator=gen, device=dev) < args.reset_rate
    backends = {"torch": causal_conv1d_torch, "triton": sc.short_conv_triton}
    if args.compiled:
        backends["torch compiled"] = torch.compile(causal_conv1d_torch, dynamic=False)
    for g in args.groups:
        for reset in (None, resets):
            # the float32 reference on the same (rounded) values
            xr = x32.to(dtype).float().requires_grad_()
            wr, br = w32.clone().requires_grad_(), b32.clone().requires_grad_()
            yr, _ = causal_conv1d_torch(xr, wr, br, None, reset, "silu", norm_group=g)
            (dxr,) = torch.autograd.grad(yr, [xr], dy.float())
            for name, fn in backends.items():
                x = x32.to(dtype).requires_grad_()
                w, b = w32.clone().requires_grad_(), b32.clone().requires_grad_()

                def fwd():
                    return fn(x, w, b, None, reset, "silu", norm_group=g)[0]

                def fwd_bwd():
                    return torch.autograd.grad(fwd(), [x, w, b], dy)

                y = fwd()
                dx = fwd_bwd()[0]
                rec = {"backend": name, "B": B, "T": T, "C": C, "K": K, "dtype": str(dtype).split(".")[1],
                       "activation": "silu", "norm_group": g, "reset": reset is not None,
                       "fwd_ms": round(timed(fwd, args.warmup, args.reps, cuda), 4),
                       "fwd_bwd_ms": round(timed(fwd_bwd, args.warmup, args.reps, cuda), 4),
                       "max_abs_err_y": float((y.detach().float() - yr.detach()).abs().max()),
                       "max_abs_err_dx": float((dx.float() - dxr).abs().max())}
                print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
