"""Associative recall beyond the attention window: Atlas-MAG / Titans-MAG vs their attention-only ablation (issue 4).

Each row is  k1 v1 … kP vP | G filler tokens | q1 a1 … qQ aQ  (memlm.data.synthetic.assoc_recall_batch). The debug
MAG presets attend over a sliding window of W = 32 tokens in each of L = 2 layers: a pair at distance d ≤ W from its
query is in one window, W < d ≤ L(W − 1) + 1 can still be relayed through the stacked windows, and beyond that only
the neural memory can carry it. Every model is trained with the same steps, optimizer and data (the gap of each batch
drawn from --train-gaps) on the answer tokens only, then scored by exact-match accuracy of the answers on held-out
rows at each gap of --eval-gaps, split into those three distance buckets.

    python scripts/recall_atlas.py                               # the defaults of docs/recall-atlas.md
    python scripts/recall_atlas.py --models titans-mag atlas-mal titans-lmm
    python scripts/recall_atlas.py --set theta_max=0.5 --set chunk_size=8   # override every MAG layer's fields

Notation: B batch rows, T tokens per row, P pairs, G gap, W attention window. Writes a markdown table to stdout and,
with --json PATH, one JSON line per model.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

import memlm
from memlm.config.base import _parse_scalar, apply_overrides
from memlm.config.model import ModelConfig
from memlm.data.synthetic import assoc_recall_batch

MODELS = {
    "atlas-mag": ("atlas-mag-debug", False),
    "atlas-mag-ablation": ("atlas-mag-debug", True),  # == --set model.memory_off=true
    "titans-mag": ("titans-mag-debug", False),
    "atlas-mal": ("atlas-mal-debug", False),
    "titans-lmm": ("titans-lmm-debug", False),  # neural memory alone, no attention (diagnostic)
}
DEFAULT = ("atlas-mag", "atlas-mag-ablation")


def model_config(name: str, layer_sets: list[str]) -> ModelConfig:
    preset, off = MODELS[name]
    cfg = memlm.preset(preset).model
    overrides = ["memory_off=true"] if off else []
    for item in layer_sets:  # the same field on every layer
        overrides += [f"layers.{i}.{item}" for i in range(cfg.n_layers)]
    return apply_overrides(cfg, overrides)


def batch(args, gap: int, seed: int):
    return assoc_recall_batch(args.batch, args.pairs, 1, 1, gap, 0, args.vocab, seed=seed)


def distances(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """For every answer position t (mask[b, t]; the query key sits at t): t minus the position of the same key in the
    context, i.e. how far back the pair is. ids, mask [B, T] -> [B, T] (0 off the mask)."""
    T = ids.shape[1]
    pos = torch.arange(T)
    same = (ids[:, :, None] == ids[:, None, :]) & (pos[None, None, :] < pos[None, :, None])   # [B, t, s]: s < t
    first = torch.where(same, pos[None, None, :], torch.full_like(same, T, dtype=torch.long)).amin(-1)
    return torch.where(mask, pos[None, :] - first, torch.zeros_like(first))


BUCKETS = ("window", "relay", "beyond")


@torch.no_grad()
def evaluate(model, args, window: int, n_layers: int) -> dict:
    """Exact-match accuracy of the answers by distance d between query and pair: "window" d ≤ W (one attention hop),
    "relay" W < d ≤ L(W−1) + 1 (reachable only by relaying through the L stacked windows), "beyond" (no attention
    path at all: only the neural memory can answer)."""
    model.eval()
    hits, total = dict.fromkeys(BUCKETS, 0), dict.fromkeys(BUCKETS, 0)
    for gap in args.eval_gaps:
        for i in range(args.eval_batches):
            b = batch(args, gap, 10_000_000 + 1000 * gap + i)  # seeds never used in training
            logits, _ = model(b.input_ids, reset=b.reset)
            ok = logits.argmax(-1) == b.labels
            d = distances(b.input_ids, b.mask)
            parts = {"window": d <= window, "relay": (d > window) & (d <= n_layers * (window - 1) + 1),
                     "beyond": d > n_layers * (window - 1) + 1}
            for part, sel in parts.items():
                hits[part] += (ok & sel & b.mask).sum().item()
                total[part] += (sel & b.mask).sum().item()
    model.train()
    return {p: (hits[p] / total[p] if total[p] else None) for p in BUCKETS}


def train_one(name: str, args) -> dict:
    torch.manual_seed(args.seed)
    cfg = model_config(name, args.set)
    model = memlm.build_model(cfg)
    window, n_layers = getattr(cfg.layers[0], "window", 0) or 0, cfg.n_layers
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    model.train()
    curve = []
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        lr *= 0.5 * (1 + math.cos(math.pi * step / args.steps)) * 0.9 + 0.1
        for group in opt.param_groups:
            group["lr"] = lr
        gap = args.train_gaps[int(torch.randint(len(args.train_gaps), (1,), generator=g))]
        b = batch(args, gap, args.seed * 1_000_003 + step)
        logits, _ = model(b.input_ids, reset=b.reset)
        loss = F.cross_entropy(logits.float().flatten(0, 1), b.labels.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if args.log_every and (step + 1) % args.log_every == 0:
            acc = evaluate(model, args, window, n_layers)
            curve.append((step + 1, acc))
            parts = " ".join(f"{k} {_fmt(v)}" for k, v in acc.items())
            print(f"  {name:20s} step {step + 1:5d} loss {loss.item():.3f} recall: {parts} ({time.time() - t0:.0f}s)",
                  flush=True)
    acc = evaluate(model, args, window, n_layers)
    return {"model": name, "params": model.num_params(), "window": window, "layers": n_layers, "recall": acc,
            "train_s": round(time.time() - t0, 1), "final_loss": round(loss.item(), 4), "curve": curve}


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT), choices=sorted(MODELS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--train-gaps", type=int, nargs="+", default=[0, 64, 96])
    p.add_argument("--eval-gaps", type=int, nargs="+", default=[0, 40, 96])
    p.add_argument("--vocab", type=int, default=32, help="keys, values, filler come from token ids [0, vocab)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak LR (3e-3 and 1e-2 stalled on the plateau)")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of every layer (e.g. theta_max=0.5); repeatable")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", default="", help="append one JSON line per model to this file")
    args = p.parse_args(argv)
    for item in args.set:
        _parse_scalar(item.split("=", 1)[-1])
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"associative recall: {args.pairs} pairs, train gaps {args.train_gaps}, eval gaps {args.eval_gaps}; "
          f"{args.steps} steps × batch {args.batch}, AdamW lr {args.lr}; chance ≈ {1 / (2 * args.vocab // 5):.3f}")
    rows = []
    for name in args.models:
        r = train_one(name, args)
        r.update(steps=args.steps, batch=args.batch, pairs=args.pairs, lr=args.lr, seed=args.seed, sets=args.set)
        rows.append(r)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    w, L = rows[0]["window"], rows[0]["layers"]
    print(f"\n| model | parameters | d ≤ {w} (window) | {w} < d ≤ {L * (w - 1) + 1} (relay) | d > {L * (w - 1) + 1} "
          "(beyond) | train time |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = " | ".join(_fmt(r["recall"][b]) for b in BUCKETS)
        print(f"| {r['model']} | {r['params']:,} | {cells} | {r['train_s']:.0f} s |")


if __name__ == "__main__":
    main()
