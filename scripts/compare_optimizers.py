"""Compare AdamW, Lion, Muon and M3 on one preset, one corpus and one token budget (docs/training.md).

Every run uses the same model initialisation (seed), the same batches in the same order, the same schedule
(warm-up + cosine) and the same held-out validation batches; only the optimizer and its learning rate differ.
Each optimizer's learning rate is the best of a 40-step sweep on the same data (docs/training.md lists it); --lr
overrides it (Muon: its own LR for hidden matrices, AdamW's for embeddings / norms / biases; M3: the factor on the
base LR for hidden matrices).

    python scripts/compare_optimizers.py --data PATH/books.jsonl.xz --steps 150 --out runs/optim

Prints a markdown table (validation loss, train loss of the last steps, tokens, time) and writes results.json.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

import memlm
from memlm.train.optim import build_optimizer
from memlm.train.trainer import Trainer

# name → (build_optimizer keyword arguments, weight decay); lr is the base (AdamW-part) learning rate
SETTINGS = {
    "adamw": ({"lr": 3e-3, "betas": (0.9, 0.95)}, 0.1),
    "lion": ({"lr": 3e-3, "betas": (0.9, 0.99)}, 1.0),  # decay 10× AdamW's (Chen et al.); LR from the sweep
    "muon": ({"lr": 3e-3, "betas": (0.9, 0.95), "muon_lr": 0.02, "momentum": 0.95}, 0.1),
    # M3's default matrix rule (preconditioned momenta, RMS-matched to AdamW) shares the base LR with the vectors;
    # the literal SPEC rule (matrix_rule="spec", not scale-free) needed matrix_scale 0.003 here (docs/training.md)
    "m3": ({"lr": 3e-3, "betas": (0.9, 0.95), "slow_every": 8, "matrix_scale": 1.0}, 0.1),
}
# hidden matrices of the memlm presets (what Muon / M3's matrix rule take), for M3's matrix_scale
MATRIX_PATTERNS = ("*qkv.weight", "*q_proj.weight", "*k_proj.weight", "*v_proj.weight", "*o_proj.weight",
                   "*w_in.weight", "*w_out.weight", "*u_proj.weight")


def parse_lrs(items: list[str]) -> dict[str, float]:
    out = {}
    for it in items:
        name, _, val = it.partition("=")
        if name not in SETTINGS or not val:
            raise SystemExit(f"--lr {it!r}: expected NAME=VALUE with NAME in {sorted(SETTINGS)}")
        out[name] = float(val)
    return out


def run_one(name: str, args: argparse.Namespace, lr: float | None) -> dict:
    cfg = memlm.preset(args.preset)
    kw, wd = SETTINGS[name]
    kw = dict(kw)
    if lr is not None:
        kw[{"muon": "muon_lr", "m3": "matrix_scale"}.get(name, "lr")] = lr
    cfg.train = cfg.train.replace(data=list(args.data), steps=args.steps, seq_len=args.seq_len,
                                  batch_size=args.batch_size, warmup=max(1, args.steps // 10), optimizer=name,
                                  lr=kw["lr"], weight_decay=wd, betas=list(kw["betas"]), eval_every=0,
                                  sample_every=0, save_every=0, log_every=max(1, args.steps // 5),
                                  eval_batches=args.eval_batches, val_every_doc=args.val_every_doc,
                                  tensorboard=False, seed=args.seed, device="cpu", schedule="cosine")
    out = Path(args.out) / name
    tr = Trainer(cfg, out_dir=out, resume="auto" if args.reuse else None, log=lambda s: None)
    extra = {k: v for k, v in kw.items() if k not in ("lr", "betas", "matrix_scale")}
    if "matrix_scale" in kw:
        extra["lr_scales"] = {pat: kw["matrix_scale"] for pat in MATRIX_PATTERNS}
    # the Trainer's config has no optimizer-specific knobs (Muon's own LR, M3's period): rebuild with them
    tr.optimizer = build_optimizer(tr.model, name=name, lr=kw["lr"], weight_decay=wd, betas=kw["betas"], **extra)
    t0 = time.perf_counter()
    losses = []
    while tr.step < args.steps:
        batches = tr._next_batches()
        losses.append(tr.train_step(batches)["loss"])
    elapsed = time.perf_counter() - t0
    val = tr.evaluate()
    tail = losses[-max(1, args.steps // 10):]
    return {"optimizer": name, "settings": {**{k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
                                            "weight_decay": wd},
            "val_loss": val.get("val_loss", math.nan), "train_loss_tail": sum(tail) / len(tail),
            "tokens": tr.tokens, "seconds": elapsed, "curve": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="training corpus (the shared books.jsonl.xz)")
    p.add_argument("--preset", default="transformer-debug")
    p.add_argument("--optimizers", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=24)
    p.add_argument("--val-every-doc", type=int, default=10, help="every N-th document is held out for validation")
    p.add_argument("--lr", nargs="*", default=[], metavar="NAME=LR",
                   help="override an optimizer's LR (muon: its matrix LR; m3: its matrix_scale)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/compare_optimizers")
    p.add_argument("--reuse", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lrs = parse_lrs(args.lr)
    results = []
    for name in args.optimizers:
        r = run_one(name, args, lrs.get(name))
        print(f"{name}: val_loss {r['val_loss']:.4f}, train (last 10%) {r['train_loss_tail']:.4f}, "
              f"{r['tokens']:,} tokens in {r['seconds']:.0f}s", flush=True)
        results.append(r)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"\npreset {args.preset}, {args.steps} steps × {args.batch_size}×{args.seq_len} tokens, seed {args.seed}; "
          f"{machine}; {time.strftime('%Y-%m-%d')}\n")
    print("| optimizer | settings | val loss | train loss (last 10 %) | time |")
    print("|---|---|---|---|---|")
    for r in results:
        s = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        print(f"| {r['optimizer']} | {s} | {r['val_loss']:.4f} | {r['train_loss_tail']:.4f} | {r['seconds']:.0f} s |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"args": vars(args), "machine": machine,
                                                             "date": time.strftime("%Y-%m-%d"), "results": results},
                                                            indent=2))


if __name__ == "__main__":
    main()
