"""``memlm grow``: function-preserving progressive growth of a checkpoint (memlm/models/grow.py)."""
from __future__ import annotations

import argparse
import json

from memlm.errors import UserError

HELP = "grow a checkpoint (wider d_ff / heads / d_model, more layers) without changing its outputs"
EXAMPLE = ("memlm grow runs/onyx11 --to onyx-16m train.steps=2000 --out runs/onyx16  &&  "
           "memlm train --config runs/onyx16/checkpoints/step_001000/config.json --out runs/onyx16 --resume")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run folder (its latest checkpoint), a checkpoint folder or a model folder")
    p.add_argument("--to", nargs="+", required=True, metavar="PRESET_OR_SET",
                   help="a preset whose model is the target, and/or KEY=VALUE changes (d_ff=512, model.n_heads=8, "
                        "train.steps=400 …); without a preset the changes apply to the checkpoint's own model")
    p.add_argument("--out", required=True, help="output folder: a resumable run folder (or a model folder)")
    p.add_argument("--layer-map", default=None, metavar="I,J,…",
                   help="new index of each old layer (default: old layers keep their place, new ones are appended)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new weights' initialisation")
    p.add_argument("--optimizer-state", choices=("remap", "reset"), default="remap",
                   help="grown parameters: scatter their optimizer moments like the weights (remap, no loss spike) "
                        "or start them fresh (reset); unchanged parameters always keep theirs")


def run(args: argparse.Namespace) -> int:
    from memlm.models.grow import grow_checkpoint

    layer_map = None
    if args.layer_map:
        try:
            layer_map = [int(x) for x in args.layer_map.split(",")]
        except ValueError:
            raise UserError(f"--layer-map {args.layer_map!r}: expected comma-separated integers") from None
    summary = grow_checkpoint(args.checkpoint, args.to, args.out, layer_map=layer_map, seed=args.seed,
                              optimizer_state=args.optimizer_state)
    print(json.dumps(summary, indent=2))
    return 0
