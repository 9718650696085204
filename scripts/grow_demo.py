"""Progressive growth demo (docs/growth.md): train onyx-11m, grow to onyx-16m, train on, grow to onyx-24m, train on —
with the real CLI commands (`memlm train`, `memlm grow`, `memlm train --resume`) — and plot the loss curve.

    python scripts/grow_demo.py --data PATH/books.jsonl.xz --out runs/growth --plot docs/img/growth.png

--sizes picks the chain (default onyx-11m onyx-16m onyx-24m; e.g. `--sizes onyx-debug "d_ff=256;n_layers=4"
"d_model=128;n_heads=8"` grows by `memlm grow --to` words, separated by ';'). Writes OUT/growth.json (per-step losses, the validation loss just before and just after each
growth, parameter counts) and the plot.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import memlm
from memlm.cli.main import main as cli
from memlm.models.grow import growth_error
from memlm.train import checkpoint as ckpt


def read_metrics(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


@torch.no_grad()
def val_loss(path: Path, data: list[str], args) -> float:
    """Validation loss of the checkpoint at ``path`` on fixed held-out batches (the trainer's own split)."""
    from memlm.train.trainer import Trainer

    cfg_d = ckpt.read_config(path)
    cfg = memlm.RunConfig.from_dict({"model": cfg_d["model"], "train": cfg_d["train"]})
    cfg.train = cfg.train.replace(data=data)
    tr = Trainer(cfg, out_dir=path.parent / ".val_tmp", log=lambda s: None)
    tr.model.load_state_dict(memlm.load_model(path).state_dict())
    return tr.evaluate()["val_loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--sizes", nargs="+", default=["onyx-11m", "onyx-16m", "onyx-24m"],
                   help="first a preset, then growth targets (presets or ';'-separated KEY=VALUE lists)")
    p.add_argument("--steps", type=int, nargs="+", default=[40, 40, 40], help="training steps per stage")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--optimizer-state", choices=("remap", "reset"), default="remap")
    p.add_argument("--out", default="runs/growth")
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    if len(args.steps) != len(args.sizes):
        raise SystemExit("--steps needs one number per stage (--sizes)")
    out = Path(args.out)
    common = ["--set", f"train.seq_len={args.seq_len}", "--set", f"train.batch_size={args.batch_size}",
              "--set", f"train.optimizer={args.optimizer}", "--set", f"train.lr={args.lr}", "--set", "train.warmup=10",
              "--set", "train.schedule=constant", "--set", "train.log_every=1", "--set", "train.eval_every=0",
              "--set", "train.sample_every=0", "--set", "train.save_every=0", "--set", "train.tensorboard=false",
              "--set", f"train.eval_batches={args.eval_batches}", "--set", "train.val_every_doc=10",
              "--set", f"train.device={args.device}"]
    stages, commands, total = [], [], 0
    t_start = time.time()
    for i, (size, steps) in enumerate(zip(args.sizes, args.steps)):
        run = out / f"stage{i}"
        total += steps
        if i == 0:
            cmd = ["train", "--preset", size, "--data", *args.data, "--steps", str(total), "--out", str(run), *common]
        else:
            prev = ckpt.find_checkpoint(out / f"stage{i - 1}")
            to = size.split(";")
            grow_cmd = ["grow", str(prev), "--to", *to, f"train.steps={total}", "--out", str(run),
                        "--optimizer-state", args.optimizer_state]
            commands.append("memlm " + " ".join(grow_cmd))
            if cli(grow_cmd) != 0:
                raise SystemExit("memlm grow failed")
            grown = ckpt.find_checkpoint(run)
            err = growth_error(memlm.load_model(prev), memlm.load_model(grown))
            before, after = val_loss(prev, args.data, args), val_loss(grown, args.data, args)
            stages[-1].update({"val_before_growth": before})
            stages.append({"growth_rel_logit_err": err, "val_after_growth": after})
            print(f"growth {i}: logits rel. err {err:.2e}; val loss {before:.4f} before, {after:.4f} after")
            cmd = ["train", "--config", str(grown / "config.json"), "--out", str(run), "--resume"]
        commands.append("memlm " + " ".join(cmd))
        t0 = time.time()
        if cli(cmd) != 0:
            raise SystemExit(f"stage {i} training failed")
        final = ckpt.find_checkpoint(run)
        model = memlm.load_model(final)
        info = {"size": size, "run": str(run), "steps_to": total, "seconds": time.time() - t0,
                "params": model.num_params(), "non_embedding": model.num_params(non_embedding=True),
                "curve": [(m["step"], m["loss"]) for m in read_metrics(run) if "loss" in m]}
        if i == 0:
            stages.append(info)
        else:
            stages[-1].update(info)
    stages[-1]["val_final"] = val_loss(ckpt.find_checkpoint(out / f"stage{len(stages) - 1}"), args.data, args)
    result = {"commands": commands, "stages": stages, "seconds": time.time() - t_start,
              "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}
    (out / "growth.json").write_text(json.dumps(result, indent=2))
    for s in stages:
        c = s["curve"]
        print(f"{s['size']}: {s['params']:,} params ({s['non_embedding']:,} non-emb), steps {c[0][0]}–{c[-1][0]}, "
              f"loss {c[0][1]:.3f} → {c[-1][1]:.3f}, {s['seconds']:.0f}s")
    print(f"total {result['seconds']:.0f}s")
    if args.plot:
        plot(stages, Path(args.plot))


def plot(stages: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for i, s in enumerate(stages):
        steps, losses = zip(*s["curve"])
        ax.plot(steps, losses, color=colors[i % len(colors)], lw=1.2,
                label=f"{s['size']} ({s['non_embedding'] / 1e6:.1f}M non-emb.)")
        if i:
            ax.axvline(steps[0] - 0.5, color="grey", ls=":", lw=1)
        if "val_before_growth" in s:
            ax.plot([s["curve"][-1][0]], [s["val_before_growth"]], "k_", ms=12)
        if "val_after_growth" in s:
            ax.plot([s["curve"][0][0] - 1], [s["val_after_growth"]], "kx", ms=6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Progressive growth: train loss continues across each growth (dotted); "
                 "val loss before (—) / after (x)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
