"""Tuning runs of the fused Triton delta rule (issue 10): each variant (intermediate dtype, warps per kernel) is timed
(forward + backward), profiled per kernel, and checked against a float64 reference, next to flash-linear-attention.

    python benchmarks/delta_rule_tune.py                                   # GPU machine; carry .whl for fla
    python benchmarks/delta_rule_tune.py --variants store=float32 store=bfloat16 store=bfloat16,warps=4

A variant is comma-separated key=value on top of the defaults ("default" alone: none): store=<torch dtype>
(triton_fused.STORE_DTYPE), lowp_bwd=0|1|auto (HALF_BWD_DOTS), rec_store=<torch dtype>|same|auto (RECURRENCE_DTYPE), warps=N (every fused kernel), <kernel>=N (num_warps of one kernel: prelude_fwd,
output_fwd, output_bwd, prelude_bwd, rec_fwd, rec_bwd), rec_fwd.<key>=N / rec_bwd.<key>=N (a recurrence config
key: BV, num_stages, num_warps).
Notation: B batch rows, T tokens per row (B·T = --tokens), H heads, D head width. Prints JSON lines.
"""
from __future__ import annotations

import argparse
import json

import torch
from delta_rule_kernels import fla_delta_rule, make_inputs, rel, time_fwd_bwd
from profile_ops import run_profiled, top_kernels

from memlm.ops.delta_rule import triton_fused, triton_impl

KERNELS = ("prelude_fwd", "output_fwd", "output_bwd", "prelude_bwd")


def apply_variant(spec: str) -> None:
    triton_fused.STORE_DTYPE = None
    triton_fused.RECURRENCE_DTYPE = "auto"
    triton_fused.WARPS = {}
    triton_fused.HALF_BWD_DOTS = "auto"
    triton_impl.CONFIG_OVERRIDE = {}
    for item in filter(None, spec.split(",")):
        if item == "default":
            continue
        key, val = item.split("=")
        if "." in key:
            kern, opt = key.split(".")
            triton_impl.CONFIG_OVERRIDE.setdefault(kern, {})[opt] = int(val)
            continue
        if key == "store":
            triton_fused.STORE_DTYPE = getattr(torch, val)
        elif key == "rec_store":
            triton_fused.RECURRENCE_DTYPE = {"same": None, "auto": "auto"}.get(val) or getattr(torch, val)
        elif key == "lowp_bwd":
            triton_fused.HALF_BWD_DOTS = {"auto": "auto"}.get(val) or bool(int(val))
        elif key == "warps":
            triton_fused.WARPS = {k: int(val) for k in KERNELS}
        elif key in KERNELS:
            triton_fused.WARPS[key] = int(val)
        elif key in ("rec_fwd", "rec_bwd"):
            triton_impl.CONFIG_OVERRIDE.setdefault(key, {})["num_warps"] = int(val)
        else:
            raise SystemExit(f"unknown variant key {key!r} in {spec!r}")


def memlm_fn(gated: bool, fused: bool = True):
    def f(q, k, v, beta):
        g = -0.05 * beta.detach().float() if gated else None
        return triton_impl.delta_rule(q, k, v, beta, g, output_final_state=False, fused=fused)[0]
    return f


def errors(fn, args, do, gated: bool) -> dict:
    """Relative errors of o and every gradient against the same inputs in float64 (the chunked form: the reference's
    math, fast enough at 65k tokens)."""
    q, k, v, beta = (a.detach() for a in args)
    leaves = [x.double().requires_grad_() for x in (q, k, v, beta)]
    g = -0.05 * leaves[3].detach() if gated else None
    o_ref = reference_chunked(*leaves, g)
    ref = [o_ref, *torch.autograd.grad(o_ref, leaves, do.double())]
    ins = [x.clone().requires_grad_() for x in (q, k, v, beta)]
    o = fn(*ins)
    got = [o, *torch.autograd.grad(o, ins, do)]
    return {n: float(f"{rel(a, b):.2e}") for n, a, b in zip(("o", "dq", "dk", "dv", "dbeta"), got, ref)}


def reference_chunked(q, k, v, beta, g):
    from memlm.ops.delta_rule import chunked
    return chunked.delta_rule(q, k, v, beta, g, output_final_state=False)[0]


def kernel_ms(fn, a: tuple, top: int, iters: int = 3) -> dict:
    """Milliseconds per call of the top kernels of one forward + backward (a = q, k, v, beta, do)."""
    prof = run_profiled(lambda: torch.autograd.grad(fn(*a[:4]), a[:4], a[4]), 1, iters)
    return {r["kernel"][:48]: round(r["ms"] / iters, 3) for r in top_kernels(prof, top)[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["default", "store=float32"])
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--profile-T", type=int, default=2048)
    ap.add_argument("--gated", choices=["both", "no", "yes"], default="both", help="plain and/or gated delta rule")
    ap.add_argument("--no-reference-path", action="store_true", help="skip the recurrence-only path")
    args = ap.parse_args()
    dev, H, D = torch.device("cuda"), 8, 64
    fla = fla_delta_rule()
    print(json.dumps({"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "tokens": args.tokens, "H": H, "D": D}}), flush=True)
    if fla is not None:
        for T in args.seq:
            a = make_inputs(args.tokens // T, T, H, D, torch.bfloat16, dev)
            ms, _ = time_fwd_bwd(fla, a[:4], a[4], warmup=2, iters=args.iters, device=dev)
            rec = {"impl": "fla", "T": T, "ms": round(ms, 3)}
            if T == args.profile_T:
                rec["err"] = errors(fla, a[:4], a[4], gated=False)
                rec["kernels"] = kernel_ms(fla, a, 14)
            print(json.dumps(rec), flush=True)
    for spec in [*([] if args.no_reference_path else ["recurrence-only"]), *args.variants]:
        fused = spec != "recurrence-only"
        apply_variant("" if not fused else spec)
        for gated in {"both": (False, True), "no": (False,), "yes": (True,)}[args.gated]:
            fn = memlm_fn(gated, fused)
            for T in args.seq if fused else [args.profile_T]:
                a = make_inputs(args.tokens // T, T, H, D, torch.bfloat16, dev)
                ms, _ = time_fwd_bwd(fn, a[:4], a[4], warmup=2, iters=args.iters, device=dev)
                rec = {"impl": "memlm", "variant": spec, "gated": gated, "T": T, "ms": round(ms, 3)}
                if T == args.profile_T:
                    rec["err"] = errors(fn, a[:4], a[4], gated)
                    rec["kernels"] = kernel_ms(fn, a, 10)
                print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
