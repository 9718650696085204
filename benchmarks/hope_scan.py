"""HOPE's chunk walk (op "hope_scan", issue 10): Triton kernels vs the PyTorch loop at onyx-11m's layer shapes.

One JSON line per variant: forward and forward + backward median times (ms), and the relative error of the final
memory, the keys and values (and the reads) and every input gradient against the float32 loop on the same inputs.

    python benchmarks/hope_scan.py                                  # CUDA, B 16, T 2048 (N 32, C 64), H 2, D 64, bf16
    python benchmarks/hope_scan.py --read --heads 6 --loop          # the memory read (q given, R = 3D + 2; hope-*)
    python benchmarks/hope_scan.py --warps 4,8 8,8 4,16             # num_warps of (forward, backward) per variant
    python benchmarks/hope_scan.py --compile-only --warps 4,16      # fill Triton's cache (run several in parallel)

Notation: B batch rows, N chunks, C chunk length, H memory heads, D head width.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from memlm.ops.hope_scan import reference, triton_scan


def inputs(B: int, N: int, C: int, H: int, D: int, dtype: torch.dtype, seed: int = 0, read: bool = False
           ) -> tuple[dict, dict]:
    """read: queries q [B, N, C, H, D] and the M_mem rows (R = 3D + 2) of the memory read."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    R = 3 * D + 2 if read else 2 * D + 2

    def memory(*lead):
        M = 0.3 * torch.randn(*lead, R, D, generator=g, device="cuda")
        eye = torch.eye(D, device="cuda")
        M[..., :D, :] += eye
        M[..., D:2 * D, :] += eye
        if read:
            M[..., 2 * D + 2:, :] += eye
        return M

    x = {"u": torch.randn(B, N, C, H, D, generator=g, device="cuda").to(dtype), "mem": memory(B, H),
         "init": memory(H), "eta_bias": torch.zeros(H, device="cuda"), "alpha_bias": torch.full((H,), 5.0, device="cuda")}
    if read:
        x["q"] = torch.randn(B, N, C, H, D, generator=g, device="cuda").to(dtype)
    kw = {"slot_valid": torch.ones(B, N, C, dtype=torch.bool, device="cuda"),
          "starts_doc": torch.zeros(B, N, dtype=torch.bool, device="cuda"),
          "complete": torch.ones(B, N, dtype=torch.bool, device="cuda")}
    kw["starts_doc"][:, 0] = True
    return x, kw


def fwd_bwd(fn, x: dict, kw: dict, grad: bool) -> dict:
    leaves = {n: t.clone().requires_grad_(grad) for n, t in x.items()}
    M, r, k, v = fn(leaves["u"], leaves.get("q"), **{n: t for n, t in leaves.items() if n not in ("u", "q")}, **kw)
    out = {"M": M, "k": k, "v": v} | ({"read": r} if r is not None else {})
    if grad:
        gen = torch.Generator(device="cuda").manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=gen, device="cuda")).sum() for o in out.values())
        out.update({f"d{n}": d for n, d in zip(leaves, torch.autograd.grad(loss, list(leaves.values())))})
    return out


def timed(f, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        f()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--warps", nargs="+", default=["4,8"], help="forward,backward num_warps per variant")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--loop", action="store_true", help="also time the PyTorch loop")
    ap.add_argument("--read", action="store_true", help="the memory read (q given, R = 3D + 2) instead of the "
                    "attention read (q None)")
    ap.add_argument("--compile-only", action="store_true")
    args = ap.parse_args()
    x, kw = inputs(args.batch, args.chunks, args.chunk, args.heads, args.dim, torch.bfloat16, read=args.read)
    shape = {"B": args.batch, "N": args.chunks, "C": args.chunk, "H": args.heads, "D": args.dim, "dtype": "bf16",
             "read": "memory" if args.read else "attention"}
    print(json.dumps({"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), **shape}}), flush=True)
    ref = fwd_bwd(reference.hope_scan, {n: t.float() for n, t in x.items()}, kw, True)
    if args.loop:
        rec = {"backend": "loop", "fwd_ms": round(timed(lambda: fwd_bwd(reference.hope_scan, x, kw, False),
                                                        args.repeats), 3),
               "fwd_bwd_ms": round(timed(lambda: fwd_bwd(reference.hope_scan, x, kw, True), args.repeats), 3)}
        print(json.dumps(rec), flush=True)
    suffix = "_read" if args.read else ""   # the read variant's own num_warps entries
    for w in args.warps:
        fw, bw = (int(s) for s in w.split(","))
        triton_scan.WARPS.update({f"fwd{suffix}": fw, f"bwd{suffix}": bw})
        t0 = time.perf_counter()
        got = fwd_bwd(triton_scan.hope_scan, x, kw, True)
        torch.cuda.synchronize()
        rec = {"backend": "triton", "warps": w, "first_call_s": round(time.perf_counter() - t0, 1)}
        if not args.compile_only:
            rec["fwd_ms"] = round(timed(lambda: fwd_bwd(triton_scan.hope_scan, x, kw, False), args.repeats), 3)
            rec["fwd_bwd_ms"] = round(timed(lambda: fwd_bwd(triton_scan.hope_scan, x, kw, True), args.repeats), 3)
            rec["rel_err_vs_fp32_loop"] = {
                n: round(((got[n].double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)).item(), 6)
                for n, r in ref.items()}
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
