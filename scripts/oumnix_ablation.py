"""Oumnix ablation on the shared corpus (CPU, debug size): validation loss with and without MoOp routing, PFP,
WEAVE and the cell at the same token budget, then dynamic depth (loss and decode speed) at several thresholds.

    python scripts/oumnix_ablation.py                      # defaults: ../shared/data/corpus/wiki.jsonl.xz
    python scripts/oumnix_ablation.py --steps 150 --out docs/results/oumnix_ablation.jsonl

Every run: preset oumnix-debug (+ one --set switch), byte tokenizer, the same seed, data order and validation
batches (every 50th document held out), AdamW, the preset's schedule shortened to --steps. Results are JSON lines
(one per run, then one per threshold) and a markdown table on stdout. Notation: τ exit threshold.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import memlm
from memlm.config.base import apply_overrides
from memlm.models.oumnix import measure_early_exit
from memlm.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "full": [],
    "no MoOp router (uniform mix)": ["model.moop_off=true"],
    "no PFP": ["model.residual=sequential"],
    "no WEAVE (dense MLP)": ["model.weave_rank=0"],
    "no cell": ["model.cell_layers=[]"],
    "MoOp top-4 (learned dense mix)": [f"model.layers.{i}.top_k=4" for i in range(4)],
}


def run_variant(name: str, sets: list[str], args, out_dir: Path) -> tuple[dict, Trainer]:
    data = str(Path(args.corpus) / args.file)
    base = [f"train.data=[{json.dumps(data)}]", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
            f"train.seq_len={args.seq}", f"train.warmup={max(1, args.steps // 10)}", f"train.eval_every={args.steps}",
            f"train.eval_batches={args.eval_batches}", "train.sample_every=0", "train.save_every=0",
            "train.tensorboard=false", "train.device=cpu", f"train.log_every={args.steps}", f"train.seed={args.seed}"]
    cfg = apply_overrides(memlm.preset("oumnix-debug"), base + sets)
    tr = Trainer(cfg, out_dir=out_dir / name.replace(" ", "_"), log=lambda s: None)
    t0, c0 = time.perf_counter(), time.process_time()
    res = tr.fit()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    row = {"variant": name, "set": sets, "params": tr.model.num_params(), "steps": res["step"],
           "tokens": res["tokens"], "val_loss": res["val_loss"], "train_loss": res["loss"], "wall_s": round(wall, 1),
           "cpu_s": round(cpu, 1), "tok_per_cpu_s": round(res["tokens"] / cpu, 1)}
    return row, tr


def val_ids(tr: Trainer, n_rows: int) -> torch.Tensor:
    """Validation rows [n, T] (the same held-out batches the trainer evaluates on)."""
    batches = tr._get_val_batches()
    return torch.cat([b.input_ids for b in batches], 0)[:n_rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "corpus"))
    p.add_argument("--file", default="wiki.jsonl.xz")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--thresholds", default="0.6,0.4,0.25")
    p.add_argument("--decode-rows", type=int, default=4, help="validation rows decoded one token at a time per τ")
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--no-exits", action="store_true", help="skip the dynamic-depth measurement")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
            "preset": "oumnix-debug", "data": args.file, "steps": args.steps, "batch": args.batch, "seq": args.seq}
    rows = []
    keep = None if args.only is None else set(args.only.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        full_tr = None
        for name, sets in VARIANTS.items():
            if keep is not None and name not in keep:
                continue
            row, tr = run_variant(name, sets, args, Path(tmp))
            rows.append(meta | row)
            print(json.dumps(row), flush=True)
            if name == "full":
                full_tr = tr
        exit_rows = []
        if full_tr is not None and not args.no_exits:
            model = full_tr.model.eval()
            ids = val_ids(full_tr, args.decode_rows)
            taus = [None, *[float(t) for t in args.thresholds.split(",")]]
            per_row = [measure_early_exit(model, ids[i:i + 1], taus, prompt_len=16, clock=time.process_time)
                       for i in range(ids.shape[0])]
            for j, tau in enumerate(taus):
                rs = [r[j] for r in per_row]
                exit_rows.append({"threshold": tau, "val_loss": sum(r["loss"] for r in rs) / len(rs),
                                  "exit_rate": sum(r["exit_rate"] for r in rs) / len(rs),
                                  "decode_tok_per_cpu_s": sum(r["tok_s"] for r in rs) / len(rs)})
                print(json.dumps(exit_rows[-1]), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.writelines(json.dumps(meta | {"dynamic_depth": r}) + "\n" for r in exit_rows)
    print("\n| variant | params | val loss | train tokens / CPU s |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['params']:,} | {r['val_loss']:.4f} | {r['tok_per_cpu_s']:.0f} |")
    if exit_rows:
        base = exit_rows[0]["decode_tok_per_cpu_s"]
        print("\n| τ | val loss | exit rate | decode tokens / CPU s | speed-up |\n|---|---:|---:|---:|---:|")
        for r in exit_rows:
            t = "none (full depth)" if r["threshold"] is None else r["threshold"]
            print(f"| {t} | {r['val_loss']:.4f} | {r['exit_rate']:.2f} | {r['decode_tok_per_cpu_s']:.0f} | "
                  f"{r['decode_tok_per_cpu_s'] / base:.2f}× |")


if __name__ == "__main__":
    main()
