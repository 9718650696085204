"""Associative recall beyond an attention window: fast-weight memories vs a sliding-window transformer (issue 3).

Each row is  k1 v1 … kP vP | G filler tokens | q1 a1 … qQ aQ  (memlm.data.synthetic.assoc_recall_batch), with the
gap G longer than the transformer's window W = 64, so the keys and values are out of its reach when queried. Every
model has the debug width (d 64, 2 layers, 4 heads), is trained for the same steps with the same optimizer on the
answer tokens only, and is scored by exact-match accuracy of the answers on held-out rows.

    python scripts/recall_fastweight.py                      # all models, the defaults of docs/recall-fastweight.md
    python scripts/recall_fastweight.py --models hope --steps 300

Writes a markdown table to stdout (and JSON lines with --json PATH).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

import memlm
from memlm.config.model import ModelConfig
from memlm.data.synthetic import assoc_recall_batch
from memlm.layers.compressive import CompressiveConfig

VOCAB = (0, 256)  # keys, values and filler all come from the byte range of the debug vocabulary


def compressive_debug() -> ModelConfig:
    """Two Infini-attention layers at the debug width: local attention inside 32-token segments, so — as for the
    window-64 transformer — only the memory can carry the pairs across the gap."""
    layers = [CompressiveConfig(segment_size=32, position="rope") for _ in range(2)]
    return ModelConfig(vocab_size=263, d_model=64, n_heads=4, layers=layers)


MODELS = {
    "transformer-swa": lambda: memlm.preset("transformer-swa-debug").model,
    "gated_deltanet": lambda: memlm.preset("gated-deltanet-debug").model,
    "deltanet": lambda: memlm.preset("deltanet-debug").model,
    "hope": lambda: memlm.preset("hope-debug").model,
    "compressive": compressive_debug,
}
DEFAULT = ("transformer-swa", "gated_deltanet", "hope", "compressive")


def batch(args, seed: int):
    return assoc_recall_batch(args.batch, args.pairs, 1, 1, args.gap, *VOCAB, seed=seed)


@torch.no_grad()
def evaluate(model, args) -> float:
    model.eval()
    hits = total = 0
    for i in range(args.eval_batches):
        b = batch(args, 10_000_000 + i)  # seeds never used in training
        logits, _ = model(b.input_ids, reset=b.reset)
        pred = logits.argmax(-1)
        hits += (pred[b.mask] == b.labels[b.mask]).sum().item()
        total += b.mask.sum().item()
    model.train()
    return hits / total


def train_one(name: str, args) -> dict:
    torch.manual_seed(args.seed)
    model = memlm.build_model(MODELS[name]())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0 = time.time()
    model.train()
    curve = []
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        lr *= 0.5 * (1 + math.cos(math.pi * step / args.steps)) * 0.9 + 0.1
        for g in opt.param_groups:
            g["lr"] = lr
        b = batch(args, args.seed * 1_000_003 + step)
        logits, _ = model(b.input_ids, reset=b.reset)
        loss = F.cross_entropy(logits.float().flatten(0, 1), b.labels.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if args.log_every and (step + 1) % args.log_every == 0:
            acc = evaluate(model, args)
            curve.append((step + 1, round(acc, 4)))
            print(f"  {name:16s} step {step + 1:5d} loss {loss.item():.3f} recall {acc:.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    acc = evaluate(model, args)
    return {"model": name, "params": model.num_params(), "recall": acc, "train_s": round(time.time() - t0, 1),
            "final_loss": round(loss.item(), 4), "curve": curve}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT), choices=sorted(MODELS))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--gap", type=int, default=96, help="filler tokens between the pairs and the queries (> window 64)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", default="", help="append one JSON line per model to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    T = 2 * 2 * args.pairs + args.gap
    print(f"associative recall: {args.pairs} pairs, gap {args.gap}, {args.pairs} queries, T = {T}; "
          f"{args.steps} steps × batch {args.batch}, AdamW lr {args.lr}; chance ≈ {1 / 102:.3f}")
    rows = []
    for name in args.models:
        r = train_one(name, args)
        r.update(steps=args.steps, batch=args.batch, pairs=args.pairs, gap=args.gap, lr=args.lr, seed=args.seed)
        rows.append(r)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    print("\n| model | parameters | recall (exact match) | train time |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['recall']:.3f} | {r['train_s']:.0f} s |")


if __name__ == "__main__":
    main()
