"""Training throughput and peak memory of Atlas-MAG next to a transformer of the same size (issue 4).

For a MAG preset (default atlas-mag-small: d512, 6 layers, 8 heads, vocab 16384) it trains, with the same loop:
  - the preset itself (SWA 512 + persistent tokens ⊙ σ(neural memory)),
  - its attention-only ablation (``model.memory_off=true``: the same SWA + persistent tokens, no memory),
  - a Llama-style transformer with the same d / layers / heads / vocabulary and full causal attention,
  - any extra presets given with --extra (e.g. titans-mag-small).
The loop: bf16 autocast forward on CUDA (fp32 on CPU), token cross-entropy, backward, clip 1.0, AdamW step. Each model
runs at every --batch size; an out-of-memory is reported as a record, not a crash. One JSON line per (model, batch):
tokens/s, step time, peak CUDA memory (GiB), parameter count, loss.

    python benchmarks/atlas_throughput.py                               # GPU: atlas-mag-small, B ∈ {4, 8}, T 2048
    python benchmarks/atlas_throughput.py --extra titans-mag-small --batch 2 4 8 16
    python benchmarks/atlas_throughput.py --tiny                        # CPU smoke test at -debug sizes (seconds)
    python benchmarks/atlas_throughput.py --batch 16 --only atlas-mag-small --profile 25   # + where a step's time goes
    python benchmarks/atlas_throughput.py --batch 16 --docs 500      # packed documents (mean 500 tokens) with resets
    python benchmarks/atlas_throughput.py --batch 16 --cuda-graph    # each step replayed from a CUDA graph

Notation: B batch rows, T tokens per row.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import memlm
from memlm.config.base import apply_overrides
from memlm.config.model import ModelConfig
from memlm.config.presets import transformer
from memlm.ops import dispatch
from memlm.ops.compressive.segments import reset_bound
from memlm.train.cuda_graph import StepGraphs
from memlm.train.trainer import resets_bucket


def models_for(preset: str, extra: list[str]) -> list[tuple[str, ModelConfig]]:
    """[(name, config)] for the preset, its attention-only ablation, a same-size transformer, and the extras."""
    cfg = memlm.preset(preset).model
    out = [(preset, cfg), (f"{preset}:memory_off", apply_overrides(cfg, ["memory_off=true"]))]
    tf = transformer(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_heads, cfg.vocab_size)
    out.append((f"transformer(d{cfg.d_model},L{cfg.n_layers},H{cfg.n_heads})", tf))
    out += [(p, memlm.preset(p).model) for p in extra]
    return out


def short(kernel: str) -> str:
    """A kernel's name without namespaces and the template noise of PyTorch's elementwise kernels, 100 characters."""
    for noise in ("void ", "at::native::", "(anonymous namespace)::", "gpu_kernel_impl_nocast<", "gpu_kernel_impl<",
                  "(at::TensorIteratorBase&)", "::{lambda()#1}::operator()() const", "c10::"):
        kernel = kernel.replace(noise, "")
    return kernel[:100]


def kernel_table(step, top: int) -> dict:
    """Device time of one more step by kernel (torch.profiler): the ``top`` largest as [name, launches, ms], the rest
    summed, and the total."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = sorted(((short(e.key), e.count, e.device_time_total / 1e3) for e in prof.key_averages()
                   if e.device_time_total > 0), key=lambda r: -r[2])
    return {"kernels": [[n, c, round(ms, 2)] for n, c, ms in rows[:top]],
            "other_ms": round(sum(r[2] for r in rows[top:]), 2), "total_ms": round(sum(r[2] for r in rows), 2)}


def packed_resets(batch: int, seq: int, mean: int, seed: int = 0) -> torch.Tensor:
    """reset [B, T] of rows packed with documents of exponentially distributed lengths (mean ``mean`` tokens, at least
    one), the first starting at a uniform offset in [0, mean) (the end of a document carried over from a previous
    row): what a training batch of packed documents (memlm.data.packing) looks like to the memories."""
    g = torch.Generator().manual_seed(seed)
    reset = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        t = int(torch.randint(0, mean, (1,), generator=g))
        while t < seq:
            reset[b, t] = True
            t += max(1, round(-mean * math.log1p(-float(torch.rand((), generator=g)))))   # Exp(1 / mean)
    return reset


def run(name: str, cfg: ModelConfig, *, batch: int, seq: int, steps: int, warmup: int, device: torch.device,
        backend: str | None = None, compile: bool = False, profile: int = 0, docs: int = 0,
        cuda_graph: bool = False) -> dict:
    """Train ``steps`` timed steps after ``warmup`` untimed ones on random tokens; returns one record.
    backend: force this backend of the neural_memory op (None: dispatch's choice); compile: torch.compile the
    model's forward (the loss and optimizer stay eager); profile > 0 (CUDA): also the kernel table of one more step
    (`kernel_table`); docs > 0: rows packed with documents of that mean length (`packed_resets`), else one stream
    per row without resets; cuda_graph (CUDA): the forward, backward and clip replayed from a CUDA graph
    (``memlm.train.cuda_graph``, what ``train.cuda_graph`` does; the optimizer stays eager)."""
    torch.manual_seed(0)
    model = memlm.build_model(cfg).to(device).train()
    rec = {"model": name, "params": model.num_params(), "batch": batch, "seq": seq,
           "memory_backend": backend or dispatch.named("neural_memory") or "auto", "compiled": compile,
           "cuda_graph": cuda_graph}
    fwd = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    inp, lab = x[:, :-1], x[:, 1:]
    reset = packed_resets(batch, seq, docs) if docs else None
    # the trainer's promise on the most document starts a row holds (from the host copy): the memories size their
    # chunk grids from it instead of reading the device (segments.reset_bound)
    most = resets_bucket([SimpleNamespace(reset=reset)]) if docs else None
    if docs:
        rec.update(docs_mean=docs, resets_per_row=round(reset.sum().item() / batch, 2), reset_bound=most)
        reset = reset.to(device)
    graphs = StepGraphs(model.parameters()) if cuda_graph and device.type == "cuda" else None

    def body() -> torch.Tensor:
        force = dispatch.force_backend("neural_memory", backend) if backend else contextlib.nullcontext()
        # no autocast weight cache across steps under a CUDA graph (as the trainer)
        amp = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=graphs is None) if device.type == "cuda"
               else contextlib.nullcontext())
        with amp, reset_bound(most), force:
            logits, _ = fwd(inp, reset=reset)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), lab.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return loss

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = body() if graphs is None else graphs.run("step", body)
        opt.step()
        return loss

    try:
        if device.type == "cuda":   # the peak from the first step on: a CUDA graph's memory is taken at its capture
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for i in range(warmup):
            step()
            if i == 0:          # the first step's seconds: torch.compile's compile time shows here
                if device.type == "cuda":
                    torch.cuda.synchronize()
                rec["first_step_s"] = round(time.perf_counter() - t0, 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        rec["oom"] = True
        return rec
    except Exception as e:  # noqa: BLE001 - a failing variant is a record, the run goes on
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return rec
    dt = (time.perf_counter() - t0) / steps
    rec.update(tokens_per_s=round(batch * seq / dt), step_ms=round(dt * 1e3, 1), loss=round(loss.item(), 4),
               peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None)
    if profile and device.type == "cuda":
        rec["profile"] = kernel_table(step, profile)
    return rec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="atlas-mag-small")
    ap.add_argument("--extra", nargs="*", default=[], help="more presets to time with the same loop")
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: atlas-mag-debug, batch 2, seq 64, 2 steps")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", nargs="+", default=[None], help="neural_memory backends to time the memory presets "
                    "with (e.g. chunked triton); the transformer runs once")
    ap.add_argument("--compile", action="store_true", help="also time every model with torch.compile (the forward)")
    ap.add_argument("--cuda-graph", action="store_true", help="CUDA: replay each step's forward, backward and clip "
                    "from a CUDA graph (train.cuda_graph)")
    ap.add_argument("--only", nargs="*", default=None, help="time only these model names (e.g. the preset alone)")
    ap.add_argument("--docs", type=int, default=0, metavar="MEAN",
                    help="pack the rows with documents of this mean length (resets), as real training batches")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="CUDA: also profile one more step and print its N largest kernels by device time")
    args = ap.parse_args(argv)
    if args.tiny:
        args.preset, args.extra, args.batch, args.seq, args.steps, args.warmup = "atlas-mag-debug", [], [2], 64, 2, 1
        torch.set_num_threads(1)  # tiny ops on a small shared CPU: more threads only contend
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "dtype": "bf16" if dev.type == "cuda"
            else "fp32", "seq": args.seq, "steps": args.steps, "warmup": args.warmup}
    print(json.dumps({"meta": meta}), flush=True)
    for name, cfg in models_for(args.preset, args.extra):
        if args.only is not None and name not in args.only:
            continue
        memory = any(getattr(lc, "kind", None) in ("mag", "mal", "neural_memory", "hope") for lc in cfg.layers or [])
        variants = [(be, c) for be in (args.backend if memory else [None])
                    for c in ([False, True] if args.compile else [False])]
        for be, comp in variants:
            for b in args.batch:
                print(json.dumps(run(name, cfg, batch=b, seq=args.seq, steps=args.steps, warmup=args.warmup,
                                     device=dev, backend=be, compile=comp, profile=args.profile,
                                     docs=args.docs, cuda_graph=args.cuda_graph)), flush=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
