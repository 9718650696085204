"""Triton vs chunked backends of the memory ops (issue 10): forward and forward+backward time of one layer's op at
the shapes of atlas-mag-small (op "neural_memory": Muon, polynomial features) and infini-pythia-70m (op
"compressive_memory": delta rule, segments of 512), looked up with memlm.preset. One JSON line per (op, backend,
precision): median times, tokens/s, the first call's time (Triton compiles then), and the relative error of the
output and of every input gradient against the chunked backend on the same inputs.

    python benchmarks/memory_kernels.py                              # CUDA, IEEE dots, the presets' B 16, T 2048
    python benchmarks/memory_kernels.py --precision ieee tf32x3      # also the TF32×3 tensor-core dots
    python benchmarks/memory_kernels.py --tiny                       # CPU smoke test through the Triton interpreter
    python benchmarks/memory_kernels.py --precompile                 # fill Triton's cache, one process per kernel
    python benchmarks/memory_kernels.py --ops neural_memory --half --profile   # kernel times of one fwd + bwd

--precompile compiles every kernel variant the presets (and tests/ops/test_*_triton.py) use in parallel processes
— one kernel each, the others replaced by no-ops — into Triton's on-disk cache, so that the tests and the timed runs
that follow on the same machine find them compiled (one IEEE-dot backward kernel takes 10–20 s to compile alone).

Notation: B batch rows, T tokens per row, H heads, K head width, E hidden width, F memory input width, C chunk or
segment length. The op inputs are random with the layer's ranges (unit-norm q, k, v; gates in (0, 1); θ ≤ θ_max / C).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as Fn

import memlm
from memlm.layers.compressive import elu1
from memlm.ops import dispatch
from memlm.ops.neural_memory import feature_dim


def neural_memory_case(preset: str, B: int, T: int, device: torch.device, tiny: bool) -> tuple[dict, tuple, dict]:
    """(shape record, differentiable args, keyword args) of the neural_memory op of the preset's first layer."""
    model = memlm.preset(preset).model
    lc = model.layers[0]
    H = 2 if tiny else (lc.n_heads or model.n_heads)
    K = 4 if tiny else (lc.head_dim or model.d_model // H)
    E = max(1, round(lc.expansion * K))
    F = feature_dim(K, lc.poly)
    C = 8 if tiny else lc.chunk_size
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g)

    q, k, v = (Fn.normalize(r(B, T, H, K), dim=-1) for _ in range(3))
    gamma, eta, alpha = (torch.sigmoid(r(B, T, H)) for _ in range(3))
    theta = lc.theta_max / C * torch.sigmoid(r(B, T, H))
    W1_init, W2_init = r(H, E, F) / K ** 0.5, r(H, K, E) / E ** 0.5
    W1, W2 = W1_init.expand(B, -1, -1, -1).clone(), W2_init.expand(B, -1, -1, -1).clone()
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = True                                   # a fresh document, as the layer passes it
    args = tuple(t.to(device) for t in (q, k, v, gamma, eta, theta, alpha, W1, W2))
    kw = {"chunk_size": C, "window": lc.omega_window, "optimizer": lc.optimizer, "poly": lc.poly,
          "reset": reset.to(device), "W1_init": W1_init.to(device), "W2_init": W2_init.to(device)}
    shape = {"B": B, "T": T, "H": H, "Dk": K, "E": E, "F": F, "C": C, "optimizer": lc.optimizer}
    return shape, args, kw


def compressive_case(preset: str, B: int, T: int, device: torch.device, tiny: bool) -> tuple[dict, tuple, dict]:
    """(shape record, differentiable args, keyword args) of the compressive_memory op of the preset's first layer."""
    model = memlm.preset(preset).model
    lc = model.layers[0]
    H = 2 if tiny else (lc.n_heads or model.n_heads)
    K = 4 if tiny else (lc.head_dim or model.d_model // H)
    C = 8 if tiny else lc.segment_size
    R = lc.n_memories
    N = -(-T // C)
    g = torch.Generator().manual_seed(0)
    sq, sk = (elu1(torch.randn(B, N, C, H, K, generator=g)) for _ in range(2))
    v = torch.randn(B, N, C, H, K, generator=g)
    M0, z0 = torch.zeros(B, H, R, K, K), torch.zeros(B, H, R, K)
    starts = torch.zeros(B, N, dtype=torch.bool)
    starts[:, 0] = True
    args = tuple(t.to(device) for t in (sq, sk, v, M0, z0))
    kw = {"write_slot": (torch.arange(N).expand(B, N) % R).to(device), "starts_doc": starts.to(device),
          "complete": torch.ones(B, N, dtype=torch.bool, device=device), "delta": lc.update == "delta"}
    shape = {"B": B, "T": N * C, "H": H, "K": K, "C": C, "R": R, "update": lc.update}
    return shape, args, kw


def call(op: str, backend: str, args: tuple, kw: dict) -> tuple:
    if op == "compressive_memory":
        sq, sk, v, M0, z0 = args
        args, kw = (sq, sk, v), {"M0": M0, "z0": z0, **kw}
    return dispatch.get(op, backend, args=args, kwargs=kw)(*args, **kw)


def outputs(op: str, out: tuple) -> list[torch.Tensor]:
    """The differentiable outputs: (o, W1, W2, S1, S2) or (num, den, z_pre, M, z)."""
    if op == "neural_memory":
        o, s = out
        return [o, s.W1, s.W2, s.S1, s.S2]
    return list(out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(op: str, backend: str, args: tuple, kw: dict, device: torch.device, repeats: int) -> dict:
    """First-call time, median forward and forward+backward times, and the output/gradients of the last run."""
    leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    g = torch.Generator().manual_seed(1)
    weights = None

    def fwd_bwd() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        nonlocal weights
        outs = outputs(op, call(op, backend, tuple(leaves), kw))
        if weights is None:
            weights = [torch.randn(o.shape, generator=g).to(device) for o in outs]
        loss = sum((o.float() * w).sum() for o, w in zip(outs, weights))
        return outs, list(torch.autograd.grad(loss, leaves))

    t = time.perf_counter()
    fwd_bwd()
    sync(device)
    first = time.perf_counter() - t
    times_f, times_fb = [], []
    for _ in range(repeats):
        with torch.no_grad():
            sync(device)
            t = time.perf_counter()
            call(op, backend, tuple(leaves), kw)
            sync(device)
            times_f.append(time.perf_counter() - t)
        t = time.perf_counter()
        outs, grads = fwd_bwd()
        sync(device)
        times_fb.append(time.perf_counter() - t)
    if not repeats:
        return {"first_call_s": round(first, 3)}
    return {"first_call_s": round(first, 3), "fwd_ms": round(1e3 * statistics.median(times_f), 3),
            "fwd_bwd_ms": round(1e3 * statistics.median(times_fb), 3), "outs": outs, "grads": grads}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# (op, kernel, variant) compiled by --precompile; the kernel names are the keys of the backends' _kernels()
PRECOMPILE = [("neural_memory", k, opt) for opt in ("momentum", "muon") for k in ("step_fwd", "step_bwd")]
PRECOMPILE += [("neural_memory", k, "muon") for k in ("ns5_fwd", "ns5_bwd")]
PRECOMPILE += [("compressive_memory", k, upd) for upd in ("delta", "linear") for k in ("fwd", "bwd")]


class _NoLaunch:
    """Stands in for a kernel that a --precompile worker does not compile: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _precompile_one(job: tuple[str, str, str], precision: str) -> str:
    """Worker: run the op's forward and backward once on CUDA with only `kernel` launched (its output is garbage,
    only the compilation matters)."""
    op, kernel, variant = job
    os.environ["MEMLM_TRITON_PRECISION"] = precision
    device = torch.device("cuda")
    t = time.perf_counter()
    if op == "neural_memory":
        from memlm.ops.neural_memory import triton_memory as mod
        real = mod._kernels(False)
        mod._kernels = lambda interpret: {n: (f if n == kernel else _NoLaunch()) for n, f in real.items()}
        _, args, kw = neural_memory_case("atlas-mag-small", 1, 128, device, False)
        kw["optimizer"] = variant
    else:
        from memlm.ops.compressive import triton_segments as mod
        real = mod._kernels(False)
        mod._kernels = lambda interpret: tuple(f if n == kernel else _NoLaunch() for n, f in zip(("fwd", "bwd"), real))
        _, args, kw = compressive_case("infini-pythia-70m", 1, 1024, device, False)
        kw["delta"] = variant == "delta"
    measure(op, "triton", args, kw, device, repeats=0)
    return f"{op}:{kernel}:{variant}:{precision} {time.perf_counter() - t:.1f}s"


def precompile(precisions: list[str]) -> None:
    jobs = [(job, p) for p in precisions for job in PRECOMPILE]
    t = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(len(jobs), os.cpu_count() or 1), maxtasksperchild=1) as pool:   # a fresh process per job
        for line in pool.starmap(_precompile_one, jobs):
            print(json.dumps({"precompiled": line}), flush=True)
    print(json.dumps({"precompile_s": round(time.perf_counter() - t, 1)}), flush=True)


def profile_kernels(op: str, args: tuple, kw: dict, device: torch.device, top: int = 15) -> None:
    """One forward + backward of the triton backend under torch.profiler (after a warm-up call): one JSON line per
    kernel name (the `top` by total time) with its total ms and launch count, then the total. Host-to-device copies
    are left out: they are this script's random loss weights, made on the CPU in every call."""
    from torch.profiler import ProfilerActivity, profile
    measure(op, "triton", args, kw, device, repeats=0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        measure(op, "triton", args, kw, device, repeats=0)
    total, calls = {}, {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and not e.name.startswith("Memcpy HtoD"):
            total[e.name] = total.get(e.name, 0.0) + e.device_time / 1e3
            calls[e.name] = calls.get(e.name, 0) + 1
    for name in sorted(total, key=total.get, reverse=True)[:top]:
        print(json.dumps({"op": op, "kernel": name[:90], "ms": round(total[name], 3), "calls": calls[name]}), flush=True)
    print(json.dumps({"op": op, "kernel_total_ms": round(sum(total.values()), 3)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test through the Triton interpreter")
    ap.add_argument("--batch", type=int, default=None, help="rows (default: the presets' train.batch_size)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default: the presets' train.seq_len)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", nargs="+", default=["ieee"], help="tl.dot precisions for the triton backend")
    ap.add_argument("--ops", nargs="+", default=["neural_memory", "compressive_memory"])
    ap.add_argument("--precompile", action="store_true", help="only compile the kernels, in parallel (CUDA)")
    ap.add_argument("--half", action="store_true", help="the first three inputs (q, k, v) in bf16, as bf16 training")
    ap.add_argument("--profile", action="store_true", help="kernel times of the triton backend's fwd + bwd (CUDA)")
    a = ap.parse_args()
    if a.precompile:
        precompile(a.precision)
        return
    if a.tiny:
        os.environ["TRITON_INTERPRET"] = "1"       # read at call time; the kernels are built for CPU tensors lazily
        torch.set_num_threads(1)                   # tiny tensors: intra-op threads only add contention
        device, repeats = torch.device("cpu"), 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("memory_kernels.py needs CUDA (or --tiny for the CPU smoke test)")
        device, repeats = torch.device("cuda"), a.repeats
    cases = {"neural_memory": ("atlas-mag-small", neural_memory_case),
             "compressive_memory": ("infini-pythia-70m", compressive_case)}
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__}
    for op in a.ops:
        preset, make = cases[op]
        train = memlm.preset(preset).train
        T = (17 if a.tiny else train.seq_len) if a.seq is None else a.seq
        B = (2 if a.tiny else train.batch_size) if a.batch is None else a.batch
        shape, args, kw = make(preset, B, T, device, a.tiny)
        if a.half:
            args = tuple(x.bfloat16() if i < 3 else x for i, x in enumerate(args))
        if a.profile:
            if device.type != "cuda":
                raise SystemExit("--profile needs CUDA")
            profile_kernels(op, args, kw, device)
            continue
        base = measure(op, "chunked", args, kw, device, repeats)
        runs = [("chunked", None, base)]
        for p in a.precision:
            os.environ["MEMLM_TRITON_PRECISION"] = p
            runs.append(("triton", p, measure(op, "triton", args, kw, device, repeats)))
        os.environ.pop("MEMLM_TRITON_PRECISION", None)
        tokens = shape["B"] * shape["T"]
        for backend, p, m in runs:
            rec = {"op": op, "preset": preset, "backend": backend, "precision": p, **shape, **info,
                   **{k: v for k, v in m.items() if k not in ("outs", "grads")},
                   "tokens_per_s_fwd_bwd": round(tokens / (m["fwd_bwd_ms"] / 1e3))}
            if backend != "chunked":
                rec["rel_err_outputs"] = max(rel(x, y) for x, y in zip(m["outs"], base["outs"]))
                rec["rel_err_grads"] = max(rel(x, y) for x, y in zip(m["grads"], base["grads"]))
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
