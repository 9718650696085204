"""``memlm islets add|remove|list``: manage the islet bank saved beside a model (memlm/layers/islets.py)."""
from __future__ import annotations

import argparse
import json

HELP = "add, remove or list islets (low-rank deltas picked at inference by prompt similarity) beside a model"
EXAMPLE = ("memlm islets add runs/oumnix/checkpoints/step_000200 --name legal --adapter runs/legal-lora "
           "--key-text 'the party of the first part'  &&  memlm islets list runs/oumnix/checkpoints/step_000200")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="islets_command", required=True)
    a = sub.add_parser("add", help="add an islet made from a LoRA adapter folder (memlm finetune output)")
    a.add_argument("model", help="a model / checkpoint folder, or a run folder (its latest checkpoint)")
    a.add_argument("--name", required=True, help="islet name: 1-64 letters, digits, '_' or '-'")
    a.add_argument("--adapter", required=True, help="LoRA adapter folder (adapter.safetensors + adapter.json)")
    key = a.add_mutually_exclusive_group(required=True)
    key.add_argument("--key-text", help="text whose summary (mean final hidden state) becomes the islet's key")
    key.add_argument("--key-file", help="a text file whose summary becomes the key")
    a.add_argument("--scale", type=float, default=1.0, help="multiplier of the delta (default 1)")
    a.add_argument("--replace", action="store_true", help="overwrite an islet of the same name")
    r = sub.add_parser("remove", help="remove an islet")
    r.add_argument("model")
    r.add_argument("--name", required=True)
    ls = sub.add_parser("list", help="list the islets (name, rank, scale, modules, parameters)")
    ls.add_argument("model")
    for q in (a, r, ls):
        q.add_argument("--tokenizer", default=None, help="override the tokenizer saved with the model")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from memlm.cli.commands import load_for_inference, resolve_model_path
    from memlm.errors import UserError
    from memlm.layers.islets import IsletBank

    path = resolve_model_path(args.model)
    model, tok, _ = load_for_inference(str(path), "cpu", args.tokenizer)
    bank = IsletBank.load(model, path)
    cmd = args.islets_command
    if cmd == "list":
        print(json.dumps(bank.list(), indent=2))
        return 0
    if cmd == "remove":
        bank.remove(args.name)
        bank.save(path)
        print(f"removed islet {args.name!r} from {path}")
        return 0
    if args.key_file is not None:
        try:
            text = Path(args.key_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--key-file {args.key_file}: cannot read ({e})") from None
    else:
        text = args.key_text
    ids = tok.encode(text)
    if not ids:
        raise UserError("the key text is empty")
    isl = bank.add_from_adapter(args.name, args.adapter, key_ids=torch.tensor([ids]), scale=args.scale,
                                replace=args.replace)
    bank.save(path)
    print(f"added islet {isl.name!r} (rank {isl.rank}, {len(isl.deltas)} modules) to {path}")
    return 0
