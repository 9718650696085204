"""``memlm eval``: run the evaluation suite (memlm/eval) on a checkpoint → results.jsonl, summary.json, report.md
and PNG plots."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from memlm.errors import UserError

HELP = "evaluate a model: perplexity, needle-in-a-haystack, BABILong, reversal, cross-session recall, MQAR, …"
EXAMPLE = ("memlm eval runs/tiny --tasks ppl passkey niah_single_2 cross_session --lengths 0.5x 1x 2x 4x "
           "--haystack ../shared/data/corpus/books.jsonl.xz --out runs/tiny/eval")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a run folder (its latest checkpoint), a checkpoint / model folder or a preset name")
    p.add_argument("--tasks", nargs="+", default=["default"],
                   help="task or group names (niah, babilong, ppl, memory, default, all; `--list` shows them)")
    p.add_argument("--lengths", nargs="+", default=["0.5x", "1x", "2x", "4x"],
                   help="prompt lengths: tokens (512, 4k) or multiples of the training length (2x)")
    p.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent, comma-separated")
    p.add_argument("--samples", type=int, default=2, help="examples per (task, length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distractors", type=int, default=4, help="distractor candidates per ranking question")
    p.add_argument("--haystack", default=None, help="real-text haystack source (default: the built-in demo corpus)")
    p.add_argument("--data", nargs="+", default=None,
                   help="documents for perplexity / streaming / degeneration (default: the run's validation split)")
    p.add_argument("--max-docs", type=int, default=8, help="evaluation documents to read")
    p.add_argument("--segment", type=int, default=None, help="streaming segment length (default: training length)")
    p.add_argument("--train-len", type=int, default=None, help="training sequence length (default: from the run)")
    p.add_argument("--modes", nargs="+", default=["stateless", "session", "persistent"],
                   help="memory modes for cross-session recall")
    p.add_argument("--session-gaps", nargs="+", default=None, help="cross-session distractor tokens (default: 0 1x)")
    p.add_argument("--sessions", type=int, default=3, help="distractor sessions between fact and question")
    p.add_argument("--mqar", nargs="*", default=[], metavar="KEY=VALUE",
                   help="MQAR settings, e.g. widths=64,128 pairs=4,8,16 steps=1000 seq_len=256 vocab_size=8192")
    p.add_argument("--no-generate", action="store_true", help="score by likelihood ranking only (faster)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--keep-going", action="store_true", help="record a failing task as an error and continue")
    p.add_argument("--out", default=None, help="output folder (default: <run>/eval)")
    p.add_argument("--device", default=None)
    p.add_argument("--tokenizer", default=None, help="override the tokenizer saved with the model")
    p.add_argument("--list", action="store_true", help="list tasks and groups, then exit")


def parse_kv(items: list[str], what: str) -> dict:
    """KEY=VALUE pairs → dict; values are JSON when they parse, lists when they hold commas."""
    out = {}
    for it in items:
        if "=" not in it:
            raise UserError(f"{what} {it!r}: expected KEY=VALUE")
        k, v = it.split("=", 1)
        if "," in v:
            out[k] = [_value(x) for x in v.split(",") if x]
        else:
            out[k] = _value(v)
    return out


def _value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def run(args: argparse.Namespace) -> int:
    from memlm.eval.runner import EvalConfig, parse_lengths, run_eval, validation_documents
    from memlm.eval.tasks import TASKS, expand_tasks, groups, ordered

    if args.list:
        for name, spec in ((n, TASKS[n]) for n in ordered()):
            print(f"{name:<18} {spec.group:<10} {spec.description}")
        print("\ngroups: " + "; ".join(f"{g}: {', '.join(v)}" for g, v in sorted(groups().items())
                                       if g not in ("all", "default")) + "; default: all but mqar; all: everything")
        return 0
    if not args.model:
        raise UserError("give a model: a run folder, a checkpoint / model folder or a preset name")
    import memlm
    from memlm.cli.commands import load_for_inference

    names = expand_tasks(args.tasks)
    model, tok, path = load_for_inference(args.model, args.device, args.tokenizer)
    run_cfg = {}
    if path is not None:
        run_cfg = json.loads((Path(path) / "config.json").read_text())
    elif args.model in memlm.list_presets():
        run_cfg = memlm.preset(args.model).to_dict()
    train_len = args.train_len or int(run_cfg.get("train", {}).get("seq_len", 256))
    try:
        depths = [float(x) / 100 for x in str(args.depths).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--depths {args.depths!r}: expected percentages like 0,25,50,75,100") from None
    if any(not 0 <= d <= 1 for d in depths):
        raise UserError(f"--depths {args.depths!r}: percentages must be in [0, 100]")
    if args.samples < 1:
        raise UserError("--samples must be ≥ 1")
    cfg = EvalConfig(tasks=names, lengths=parse_lengths(args.lengths, train_len), depths=depths, samples=args.samples,
                     seed=args.seed, n_distractors=args.distractors, generate=not args.no_generate,
                     haystack=args.haystack, data=args.data, max_docs=args.max_docs, segment=args.segment,
                     modes=list(args.modes), n_sessions=args.sessions, mqar=parse_kv(args.mqar, "--mqar"),
                     session_gaps=parse_lengths(args.session_gaps, train_len, minimum=0) if args.session_gaps else None,
                     keep_going=args.keep_going)
    if args.haystack and not Path(args.haystack).exists():
        raise UserError(f"--haystack {args.haystack}: no such file or folder")
    out = Path(args.out) if args.out else (Path(args.model) / "eval" if Path(args.model).is_dir() else Path("eval-out"))
    meta = {"model": str(path or args.model), "name": model.config.name, "params": model.num_params(),
            "non_embedding_params": model.num_params(non_embedding=True), "tokenizer": getattr(tok, "name", "?"),
            "train_len": train_len, "lengths": cfg.lengths, "tasks": ", ".join(names),
            "haystack": args.haystack or "built-in demo corpus", "date": time.strftime("%Y-%m-%d %H:%M")}
    val = None if args.data else validation_documents(run_cfg.get("train", {}))
    t0 = time.time()
    records = run_eval(model, tok, cfg, out, train_len=train_len, val_docs=val, meta=meta, plots=not args.no_plots)
    print(f"{len(records)} records in {time.time() - t0:.0f}s → {out / 'results.jsonl'}, report {out / 'report.md'}")
    return 0
