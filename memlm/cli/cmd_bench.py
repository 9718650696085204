"""``memlm bench``: train presets under identical conditions, evaluate them, write a leaderboard (memlm/eval/bench.py)."""
from __future__ import annotations

import argparse

from memlm.errors import UserError

HELP = "train several presets with the same tokenizer, data order and token budget, evaluate all, write a leaderboard"
EXAMPLE = ("memlm bench --presets transformer-debug gated-deltanet-debug --tokens 200k --seq-len 128 --batch-size 8 "
           "--out runs/bench-smoke")


def parse_count(s: str, what: str = "--tokens") -> int:
    """"20M", "1.5B", "500k", "123456" → an integer."""
    t = str(s).strip().lower().replace("_", "").replace(",", "")
    mult = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000, "g": 1_000_000_000}
    try:
        if t and t[-1] in mult:
            return round(float(t[:-1]) * mult[t[-1]])
        return int(t)
    except ValueError:
        raise UserError(f"{what} {s!r}: expected a count like 20M, 500k or 123456") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", nargs="+", required=True, help="preset names (a missing one gets a row saying so)")
    p.add_argument("--tokens", required=True, help="training tokens per preset (e.g. 20M)")
    p.add_argument("--data", nargs="+", default=[], help="training data (default: the built-in demo corpus)")
    p.add_argument("--val-data", nargs="+", default=[], help="validation data (default: every k-th training document)")
    p.add_argument("--val-every", type=int, default=None,
                   help="hold out every k-th training document (default: 10 for the demo corpus, else 50)")
    p.add_argument("--out", required=True, help="bench folder: runs/<preset>/…, leaderboard.md, plots")
    p.add_argument("--tokenizer", default="byte", help="one tokenizer for all presets ('byte', a tokenizer folder …)")
    p.add_argument("--vocab", choices=("match", "preset"), default="match",
                   help="match: every model's vocabulary = the tokenizer's (rounded to 64); preset: keep the preset's")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every preset, e.g. --set train.compile=true")
    p.add_argument("--evals", type=int, default=8, help="validation points along each run (loss curves)")
    p.add_argument("--keep-tbptt", action="store_true", help="keep presets' TBPTT stream mode (changes data order)")
    p.add_argument("--retrain", action="store_true", help="delete earlier runs of these presets and train again")
    p.add_argument("--reeval", action="store_true", help="evaluate finished runs again without retraining")
    g = p.add_argument_group("evaluation (see `memlm eval --help`)")
    g.add_argument("--eval-tasks", nargs="+", default=["ppl", "stream", "probe", "passkey", "niah_single_2",
                                                       "babilong_qa1", "cross_session", "mqar"])
    g.add_argument("--eval-lengths", nargs="+", default=["1x", "2x", "4x", "8x", "16x"])
    g.add_argument("--depths", default="0,25,50,75,100")
    g.add_argument("--samples", type=int, default=2)
    g.add_argument("--haystack", default=None, help="real-text haystack (default: the built-in demo corpus)")
    g.add_argument("--eval-data", nargs="+", default=None,
                   help="documents for perplexity / streaming (default: the validation split)")
    g.add_argument("--max-docs", type=int, default=8)
    g.add_argument("--session-gaps", nargs="+", default=None, help="cross-session distractor tokens (default 0 1x)")
    g.add_argument("--mqar", nargs="*", default=[], metavar="KEY=VALUE", help="MQAR settings (widths=64,128 …)")
    g.add_argument("--no-generate", action="store_true", help="likelihood ranking only")


def run(args: argparse.Namespace) -> int:
    from memlm.cli.cmd_eval import parse_kv
    from memlm.eval.bench import BenchConfig, run_bench
    from memlm.eval.runner import EvalConfig, parse_lengths
    from memlm.eval.tasks import expand_tasks

    if args.seq_len < 8 or args.batch_size < 1:
        raise UserError("--seq-len must be ≥ 8 and --batch-size ≥ 1")
    try:
        depths = [float(x) / 100 for x in str(args.depths).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--depths {args.depths!r}: expected percentages like 0,25,50,75,100") from None
    T = args.seq_len
    ev = EvalConfig(tasks=expand_tasks(args.eval_tasks), lengths=parse_lengths(args.eval_lengths, T), depths=depths,
                    samples=args.samples, haystack=args.haystack, data=args.eval_data, max_docs=args.max_docs,
                    generate=not args.no_generate, mqar=parse_kv(args.mqar, "--mqar"), keep_going=True,
                    session_gaps=parse_lengths(args.session_gaps, T, minimum=0) if args.session_gaps else None)
    b = BenchConfig(presets=list(args.presets), tokens=parse_count(args.tokens), out=args.out, data=list(args.data),
                    val_data=list(args.val_data), val_every=args.val_every, tokenizer=args.tokenizer, seq_len=T, batch_size=args.batch_size,
                    seed=args.seed, device=args.device, vocab=args.vocab, overrides=list(args.overrides),
                    n_evals=args.evals, keep_tbptt=args.keep_tbptt, retrain=args.retrain, reeval=args.reeval, eval=ev)
    rows = run_bench(b)
    for r in rows:
        if r.get("status") == "ok":
            vl = "–" if r.get("val_loss") is None else f"{r['val_loss']:.4f}"
            print(f"{r['preset']:<28} val_loss {vl}  {r['tokens']:,} tokens  "
                  f"{(r.get('tok_s') or 0):,.0f} tok/s  state {r['state_bytes']:,} B")
        else:
            print(f"{r['preset']:<28} {r['status']}: {r.get('note', '')}")
    print(f"leaderboard: {args.out}/leaderboard.md")
    return 0
