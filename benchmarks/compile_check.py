"""Quick GPU check of the training path (issue 10, part 3): graph breaks, recompiles and tokens/s, as JSON lines.

For each preset, through the trainer's own ``Trainer.train_step`` (aux collection, reset bound, LM head + loss inside
the model, backward, clipping, optimizer):
  1. "graph": the model compiled by Dynamo onto a counting eager backend (tracing only, no code generation), four
     steps — a batch without a document start inside its rows, one with packed documents, and one more of each —
     graph breaks (with reasons), graphs, and whether the repeats recompiled;
  2. "eager": tokens/s and peak memory of uncompiled steps (packed batches, so the masked-attention path runs) for
     train.cross_entropy plain vs chunked with SDPA, and chunked with train.attention=flex;
  3. "inductor" (only with --inductor): tokens/s of the default path compiled by inductor, and the compile time.

    python benchmarks/compile_check.py                      # transformer-34m, gated-deltanet-34m, atlas-mag-small
    python benchmarks/compile_check.py --presets transformer-34m --inductor --batch 8 --seq 1024
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import torch._dynamo as dynamo

import memlm
from memlm.data.packing import Batch
from memlm.train.graphs import trace_training_steps
from memlm.train.trainer import Trainer


def make_trainer(preset: str, batch: int, seq: int, **train_kw) -> Trainer:
    cfg = memlm.preset(preset)
    cfg.train = cfg.train.replace(seq_len=seq, batch_size=batch, steps=10**6, warmup=10, eval_every=0, sample_every=0,
                                  save_every=0, log_every=10**6, tensorboard=False, compile=False, **train_kw)
    return Trainer(cfg, out_dir=tempfile.mkdtemp(prefix="compile_check_"), data=iter([]),
                   tokenizer=memlm.load_tokenizer("byte"), log=lambda s: None)


def batches(vocab: int, batch: int, seq: int, seed: int, docs: bool) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    reset = torch.zeros(batch, seq, dtype=torch.bool)
    reset[:, 0] = True
    if docs:  # two document starts inside every row, at places that differ by row and seed (the same reset bound)
        for b in range(batch):
            reset[b, 1 + int(torch.randint(0, seq // 2 - 1, (1,), generator=g))] = True
            reset[b, seq // 2 + int(torch.randint(0, seq // 2, (1,), generator=g))] = True
    return Batch(x[:, :-1].clone(), x[:, 1:].clone(), reset)


def graph_check(preset: str, batch: int, seq: int) -> dict:
    tr = make_trainer(preset, batch, seq)
    v = tr.cfg.model.vocab_size
    rep = trace_training_steps(tr, [batches(v, batch, seq, s, docs=s % 2 == 1) for s in range(4)], seen=2)
    reasons = {k[:120]: n for k, n in rep.breaks.items()}
    return {"graph_breaks": sum(reasons.values()), "reasons": reasons, "graphs": rep.graphs,
            "recompiled_on_repeat": rep.recompiled_on_repeat, "recompiles": rep.recompiles,
            "trace_s": round(rep.seconds, 1)}


def timed(tr: Trainer, batch: int, seq: int, steps: int, warmup: int, docs: bool) -> dict:
    v = tr.cfg.model.vocab_size
    data = [batches(v, batch, seq, s, docs) for s in range(4)]
    cuda = tr.device.type == "cuda"
    for s in range(warmup):
        tr.train_step(data[s % 4])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for s in range(steps):
        out = tr.train_step(data[s % 4])  # ends with the step's one host sync (loss, grad norm)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return {"tokens_per_s": round(batch * seq / dt), "step_ms": round(dt * 1e3, 2), "loss": round(out["loss"], 4),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}


def guarded(preset: str, check: str, fn) -> None:
    """One JSON line per measurement; a failure is reported as a line too, and the run goes on."""
    try:
        out = {"preset": preset, "check": check, **fn()}
    except Exception as e:  # noqa: BLE001 — a batch check must report every failure and continue
        out = {"preset": preset, "check": check, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    print(json.dumps(out), flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="*", default=["transformer-34m", "gated-deltanet-34m", "atlas-mag-small"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--graph-seq", type=int, default=128, help="sequence length of the graph check (tracing cost)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--inductor", action="store_true", help="also time the inductor-compiled default path")
    ap.add_argument("--skip-graph", action="store_true")
    ap.add_argument("--eager", nargs="*", default=["plain-sdpa", "chunked-sdpa", "chunked-flex"],
                    choices=["plain-sdpa", "chunked-sdpa", "chunked-flex"],
                    help="eager variants to time (cross-entropy-attention); none: only the graph/inductor checks")
    ap.add_argument("--docs", choices=["yes", "no"], default="yes",
                    help="timed batches hold document starts inside rows (masked attention) or not (plain causal)")
    ap.add_argument("--allow-cpu", action="store_true", help="run without CUDA (a smoke test of this script)")
    args = ap.parse_args()
    docs = args.docs == "yes"
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("compile_check measures the CUDA path; pass --allow-cpu for a smoke test")
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"meta": {"device": dev, "torch": torch.__version__, "batch": args.batch, "seq": args.seq,
                               "docs": docs}}),
          flush=True)
    if not args.skip_graph:  # first, for every preset: the answer that matters most if time runs out
        for p in args.presets:
            guarded(p, "graph", lambda: graph_check(p, 2, args.graph_seq))
    attns = ("sdpa", "flex") if torch.cuda.is_available() else ("sdpa",)  # flex has no CPU backward
    for p in args.presets:
        variants = [tuple(v.split("-")) for v in args.eager]
        for ce, attn in [(c, a) for c, a in variants if a in attns]:
            def eager(ce=ce, attn=attn):
                torch.manual_seed(0)
                tr = make_trainer(p, args.batch, args.seq, cross_entropy=ce, attention=attn)
                return {"cross_entropy": ce, "attention": attn, **timed(tr, args.batch, args.seq, args.steps,
                                                                          args.warmup, docs)}

            guarded(p, "eager", eager)
        if args.inductor:
            def inductor():
                dynamo.reset()
                torch.manual_seed(0)
                tr = make_trainer(p, args.batch, args.seq)
                tr._module = torch.compile(tr._module)  # what train.compile=true does
                t0 = time.perf_counter()
                tr.train_step(batches(tr.cfg.model.vocab_size, args.batch, args.seq, 0, docs))
                compile_s = round(time.perf_counter() - t0, 1)
                return {"compile_s": compile_s, **timed(tr, args.batch, args.seq, args.steps, args.warmup, docs)}

            guarded(p, "inductor", inductor)


if __name__ == "__main__":
    main()
