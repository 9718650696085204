"""Newton–Schulz kernels of the Triton neural memory (issue 10): the iterative form (`_ns5_fwd`, `_ns5_bwd`) against
the Gram form (`_ns5g`) at atlas-mag-small's shapes — one matrix per batch·head, B·H = 128 of
W1's momentum [E 64, F 560] and of W2's [Dv 32, E 64] — forward (Out += NS5(S)) and backward (dS += J ᵀ dOut).
Forms: iterative, gram (the backward recomputes the chain), gram-kept (the forward stores the chain, the backward
reads it: the op's training path). Dot precisions: the passes over the columns, the chain, and the backward's walk back
over it (the op's defaults: triton_memory.NS5_GRAM_PRECISION). One JSON line per (matrix, form, dot precisions):
best-of-repeats µs per launch, and the relative error of Out and dS against newton_schulz5 in float64 on three kinds
of S (Gaussian; a momentum-like sum of low-rank terms; rank 8).

    python benchmarks/ns5_kernels.py                 # CUDA
    python benchmarks/ns5_kernels.py --tiny          # CPU smoke test through the Triton interpreter (small shapes)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def matrices(kind: str, BH: int, rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """[1, BH, rows, cols] float64 test matrices of one kind."""
    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)
    if kind == "gauss":
        s = r(BH, rows, cols)
    elif kind == "momentum":           # Σ_j 0.9^(n−j) (low-rank chunk gradient): what S accumulates over chunks
        s = torch.zeros(BH, rows, cols, dtype=torch.float64)
        for j in range(16):
            s = 0.9 * s + r(BH, rows, 8) @ r(BH, 8, cols) * 0.5 ** (j % 4)
    else:                              # rank 8: a short window's first write
        s = r(BH, rows, 8) @ r(BH, 8, cols)
    return s[None]


def kernel_set(form: str, prec: str, pc: str | None, rows: int, cols: int, warps: int | None = None,
               direct: bool = False):
    """(forward, backward) _NS5 launchers of one form, with the dot precisions (and warps) overridden; direct: repeat
    launches through the compiled kernel (as the scan does), so that W2's ~25 µs kernels are not timed at the JIT's
    ~30 µs of host time a launch."""
    from memlm.ops.neural_memory import triton_memory as tm
    out = []
    for backward in (False, True):
        g = tm._NS5(rows, cols, "ieee" if form == "iterative" else "tf32", backward=backward, direct=direct,
                    store=form == "gram-kept")
        chain, _, walk = (pc or "").partition("/")
        g.consts = {**g.consts, "PREC": prec, **({"PC": chain, "PW": walk or chain} if g.gram else {}),
                    **({"num_warps": warps} if warps else {})}
        out.append(g)
    return out


def run_case(form: str, prec: str, pc: str | None, warps: int | None, rows: int, cols: int, BH: int,
             device: torch.device, repeats: int, calls: int) -> dict:
    from memlm.ops.neural_memory.common import newton_schulz5
    fwd, bwd = kernel_set(form, prec, pc, rows, cols, warps, direct=device.type == "cuda")
    g = torch.Generator().manual_seed(rows * cols)
    rec = {"matrix": f"{rows}x{cols}", "B·H": BH, "form": form, "prec": prec, "chain_prec": pc,
           "warps": fwd.consts["num_warps"]}
    for kind in ("gauss", "momentum", "rank8"):
        S = matrices(kind, BH, rows, cols, g)
        dY = torch.randn(S.shape, generator=g, dtype=torch.float64)
        s = S.clone().requires_grad_()
        y = newton_schulz5(s)
        dS_want, = torch.autograd.grad(y, s, dY)
        Sf, dYf = S.float().to(device), dY.float().to(device)
        Out, dS = torch.zeros_like(Sf), torch.zeros_like(Sf)
        ch = fwd.chain(Sf, BH, 1)
        fwd(Sf, Out, fwd.scratch(Sf, BH), chain=ch)
        bwd(Sf, dYf, bwd.scratch(Sf, BH), dS=dS, chain=ch)
        for n, got, want in (("out", Out, y.detach()), ("dS", dS, dS_want)):
            rec[f"err_{n}_{kind}"] = float((got.double().cpu() - want).norm() / want.norm())
    if device.type == "cuda":
        S, dY = (torch.randn(1, BH, rows, cols, device=device) for _ in range(2))
        Out, dS = torch.zeros_like(S), torch.zeros_like(S)
        ch = fwd.chain(S, BH, 1)
        for name, fn in (("fwd", lambda sc: fwd(S, Out, sc, chain=ch)),
                         ("bwd", lambda sc: bwd(S, dY, sc, dS=dS, chain=ch))):
            sc = (fwd if name == "fwd" else bwd).scratch(S, BH)
            fn(sc)
            best = float("inf")
            for _ in range(repeats):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(sc)
                torch.cuda.synchronize()
                best = min(best, (time.perf_counter() - t0) / calls)
            rec[f"{name}_us"] = round(best * 1e6, 1)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test through the Triton interpreter")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--variants", nargs="*", default=None,
                    help="form:prec[:chain_prec[/walk_prec]][@warps], e.g. iterative:tf32 gram-kept:tf32x3:tf32x3@8 "
                         "gram-kept:tf32x3:tf32x3/bf16x3 (the walk back takes the chain's precision unless given) "
                         "(default: a fixed set)")
    args = ap.parse_args()
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"
        device, shapes, BH = torch.device("cpu"), [(8, 14), (4, 8)], 2
    else:
        device, shapes, BH = torch.device("cuda"), [(64, 560), (32, 64)], 128
    variants = args.variants or (["iterative:ieee", "gram:ieee:ieee", "gram-kept:ieee:ieee"] if args.tiny else
                                 ["iterative:ieee", "iterative:tf32", "gram:tf32x3:tf32x3", "gram-kept:tf32x3:tf32x3",
                                  "gram-kept:tf32x3:tf32x3/bf16x3", "gram-kept:tf32x3:tf32x3@8",
                                  "gram-kept:ieee:ieee@8"])
    meta = {"meta": {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                     "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}}
    print(json.dumps(meta), flush=True)
    for rows, cols in shapes:
        for v in variants:
            spec, _, warps = v.partition("@")
            form, prec, *pc = spec.split(":")
            rec = run_case(form, prec, pc[0] if pc else None, int(warps) if warps else None, rows, cols, BH, device,
                           args.repeats, args.calls)
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
