"""``memlm finetune``: LoRA or full fine-tuning of a trained model, on text or conversations (memlm/train/finetune.py).

Using the result: ``OUT/adapter/`` holds the adapter alone; ``load_with_adapter(BASE, OUT/adapter)`` (below) gives
base + adapter for generation, and ``--save-merged`` writes ``OUT/merged/``, a plain model folder that
``memlm generate`` / ``memlm chat`` load directly.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from memlm.errors import UserError

HELP = "fine-tune a trained model: LoRA adapters (--lora-rank) or all weights; --chat trains on assistant turns only"
EXAMPLE = ("memlm finetune runs/tiny --data chats.jsonl --chat --lora-rank 8 --lora-targets 'qkv,o_proj' "
           "--steps 200 --out runs/tiny-sft")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="the base model: a run folder (latest checkpoint), a checkpoint or a model folder")
    p.add_argument("--data", nargs="+", required=True, help="training files / folders / globs")
    p.add_argument("--val-data", nargs="+", default=None, help="validation data (default: every 50th document)")
    p.add_argument("--chat", action="store_true",
                   help="conversations (records with 'messages'): chat template, loss on assistant tokens only")
    p.add_argument("--lora-rank", type=int, default=None, help="train rank-r LoRA adapters only (default: all weights)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator α (default 2·rank)")
    p.add_argument("--lora-targets", default="qkv,o_proj",
                   help="comma-separated fnmatch patterns on module names (qkv, o_proj, w_in, w_out, blocks.3.* …)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, adapter/)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 with LoRA, 1e-4 for all weights")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="default: 5%% of the steps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other train.* override, e.g. --set train.optimizer=lion")
    p.add_argument("--resume", action="store_true", help="continue the fine-tuning run in --out")
    p.add_argument("--save-merged", action="store_true", help="also write OUT/merged: base with the adapter merged")
    p.add_argument("--device", default=None)


def finetune_config(args: argparse.Namespace):
    """(base weights folder, RunConfig) for the fine-tuning run described by the CLI arguments."""
    from memlm.config.base import apply_overrides
    from memlm.train.finetune import base_run_config

    path, cfg = base_run_config(args.base)
    lora = args.lora_rank is not None
    t = cfg.train
    changes = {"data": list(args.data), "val_data": list(args.val_data or []), "steps": args.steps,
               "lr": args.lr if args.lr is not None else (1e-3 if lora else 1e-4),
               "warmup": args.warmup if args.warmup is not None else max(1, args.steps // 20),
               "out_dir": args.out, "schedule": "cosine"}
    if lora:
        changes["weight_decay"] = 0.0  # decaying a zero-initialised adapter toward zero only fights the update
    if args.batch_size:
        changes["batch_size"] = args.batch_size
    if args.seq_len:
        changes["seq_len"] = args.seq_len
    if args.device:
        changes["device"] = args.device
    try:
        cfg.train = t.replace(**changes)
    except (TypeError, ValueError) as e:
        raise UserError(f"finetune: {e}") from None
    cfg = apply_overrides(cfg, [o if o.startswith(("train.", "model.")) else f"train.{o}" for o in args.overrides])
    return path, cfg


def run(args: argparse.Namespace) -> int:
    from memlm.layers.lora import remove_lora
    from memlm.train.finetune import ADAPTER_DIR, FinetuneTrainer, LoraSpec

    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be ≥ 1")
    path, cfg = finetune_config(args)
    lora = None
    if args.lora_rank is not None:
        lora = LoraSpec(args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout)
    tr = FinetuneTrainer(cfg, path, lora=lora, chat=args.chat, resume=True if args.resume else None)
    n_train, n_all = tr.trainable_params(), tr.model.num_params()
    print(f"fine-tuning {n_train:,} of {n_all:,} parameters ({100 * n_train / max(n_all, 1):.2f}%)"
          + (f", LoRA rank {lora.rank} on {','.join(lora.targets)}" if lora else ", all weights"))
    result = tr.fit()
    out = Path(args.out)
    if lora is not None:
        result["adapter"] = str(out / ADAPTER_DIR)
    if args.save_merged:
        remove_lora(tr.model, merge=True)
        tr.model.save_pretrained(out / "merged")
        tr.tok.save(out / "merged")
        result["merged"] = str(out / "merged")
    print(json.dumps(result, indent=2, default=str))
    return 0


def load_with_adapter(base: str, adapter: str | None, device: str | None = None, tokenizer: str | None = None):
    """(model, tokenizer, path) of ``base`` with the LoRA adapter folder ``adapter`` applied (None: the base alone).

    What ``memlm generate/chat --adapter DIR`` should call instead of ``commands.load_for_inference``."""
    from memlm.cli.commands import load_for_inference
    from memlm.layers.lora import load_lora

    model, tok, path = load_for_inference(base, device, tokenizer)
    if adapter:
        load_lora(model, adapter)
        model.eval()
    return model, tok, path
