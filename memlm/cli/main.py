"""The ``memlm`` command line. Every command has ``--help`` with an example; user mistakes print one line and exit 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memlm.errors import UserError

EXAMPLES = {
    "train": "memlm train --preset transformer-debug --data ../shared/data/corpus/books.jsonl.xz --out runs/tiny",
    "generate": "memlm generate runs/tiny --prompt 'It is a truth' --max-new-tokens 100 --temperature 0.8",
    "chat": "memlm chat runs/tiny --memory persistent --session my-chat",
    "data": "memlm data prepare corpus/*.jsonl.xz --tokenizer byte --out shards/",
    "tokenizer": "memlm tokenizer train corpus/books.jsonl.xz --vocab-size 16384 --out tok/",
    "presets": "memlm presets --family transformer",
    "info": "memlm info runs/tiny",
    "demo": "memlm demo --out runs/demo",
    "memory": ("memlm memory list\n  memlm memory show my-chat\n  memlm memory fork my-chat my-chat-2\n"
               "  memlm memory show state.safetensors --model runs/tiny"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memlm", description="Build, train, evaluate and chat with language models that remember.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {EXAMPLES[name]}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    t = cmd("train", "train a model from a preset or config file")
    t.add_argument("--preset", default=None, help="preset name (see `memlm presets`)")
    t.add_argument("--config", default=None, help="a run config JSON (e.g. a checkpoint's config.json)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 --set model.layers.0.window=512")
    t.add_argument("--data", nargs="+", default=None, help="training data: files, folders, globs (default: the demo corpus)")
    t.add_argument("--out", default=None, help="run folder (checkpoints, metrics)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps")
    t.add_argument("--resume", nargs="?", const=True, default=None, help="resume from the latest (or given) checkpoint")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    t.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train in N processes on this node (one per GPU) by re-running this command under "
                        "`torchrun --standalone --nproc-per-node N`; --set train.parallel=fsdp for FSDP2 "
                        "(default ddp); train.batch_size is then rows per process (docs/distributed.md)")

    g = cmd("generate", "generate text from a trained model")
    _model_args(g)
    g.add_argument("--prompt", default="", help="the prompt text ('-' reads stdin)")
    _sampling_args(g)
    g.add_argument("--state", default=None, help="continue from a saved memory state file")
    g.add_argument("--save-state", default=None, help="save the memory state after generation to this file")
    g.add_argument("--prefill-chunk", type=int, default=512, metavar="N", help="feed the prompt N tokens per call")
    g.add_argument("--static-cache", action="store_true",
                   help="decode with static-shape states updated in place (same tokens, fixed shapes)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="replay one captured CUDA graph per token (implies --static-cache; CUDA only, ignored "
                        "elsewhere with a note)")
    g.add_argument("--compile-step", action="store_true",
                   help="torch.compile the static decode step first (fused kernels; with --cuda-graph ≈ 2,150 tok/s "
                        "for a 34M model on an H100, docs/decoding.md; compiling takes seconds per batch layout)")

    c = cmd("chat", "multi-turn streaming chat in the terminal with memory modes (type /help inside)")
    _model_args(c)
    _sampling_args(c)
    c.add_argument("--system", default=None, help="a system message")
    c.add_argument("--memory", choices=("stateless", "session", "persistent", "readonly"), default=None,
                   help="memory mode (default: persistent with --session, else session)")
    c.add_argument("--session", default=None, metavar="ID", help="session id in the store ([A-Za-z0-9_-]{1,64})")
    c.add_argument("--store", default=None, metavar="DIR", help="session store (default: $MEMLM_HOME/sessions or "
                   "~/.memlm/sessions)")
    c.add_argument("--password", default=None, help="encrypt/decrypt the stored session (default: $MEMLM_PASSWORD; "
                   "prefer the variable: arguments are visible to other users)")
    c.add_argument("--learning", action=argparse.BooleanOptionalAction, default=True,
                   help="test-time memory updates (default: on)")
    c.add_argument("--target-surprise", type=float, default=None, metavar="NATS",
                   help="sample with the surprise-targeting controller aiming at this surprise per token")

    d = cmd("data", "data tools")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    dp = dsub.add_parser("prepare", help="tokenize sources once into memory-mapped shards",
                         epilog=f"example:\n  {EXAMPLES['data']}", formatter_class=argparse.RawDescriptionHelpFormatter)
    dp.add_argument("sources", nargs="+", help="files, folders or globs (.txt/.json/.jsonl/.parquet, .gz/.xz/.zst)")
    dp.add_argument("--tokenizer", default="byte", help="'byte', a tokenizer.json or a tokenizer folder")
    dp.add_argument("--out", required=True, help="output folder for the shards")
    dp.add_argument("--val-every", type=int, default=50,
                    help="hold out every k-th document as the validation split (0: none; default 50)")
    dp.add_argument("--max-tokens", type=int, default=None, help="stop after about this many tokens")

    k = cmd("tokenizer", "tokenizer tools")
    ksub = k.add_subparsers(dest="tok_command", metavar="ACTION")
    kt = ksub.add_parser("train", help="train a byte-level BPE tokenizer",
                         epilog=f"example:\n  {EXAMPLES['tokenizer']}", formatter_class=argparse.RawDescriptionHelpFormatter)
    kt.add_argument("sources", nargs="+")
    kt.add_argument("--vocab-size", type=int, default=16384)
    kt.add_argument("--out", required=True)
    kt.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")

    pr = cmd("presets", "list presets with family and parameter count")
    pr.add_argument("--family", default=None)
    pr.add_argument("--json", action="store_true", help="machine-readable output")

    i = cmd("info", "describe a checkpoint, model folder or memory state file")
    i.add_argument("path")
    i.add_argument("--model", default=None, help="for a state file: the model it belongs to (checks it fits)")

    dm = cmd("demo", "train a small model on the built-in corpus on CPU, evaluate it and sample (about 3 minutes)")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--steps", type=int, default=None)
    dm.add_argument("--preset", default="transformer-debug")

    m = cmd("memory", "inspect and manage stored sessions and memory state files")
    msub = m.add_subparsers(dest="mem_command", metavar="ACTION")
    target = "a session id in the store, or a state file path (anything with '/' or '.', or an existing file)"
    for name, hlp in (("list", "list the sessions in the store"),
                      ("show", "per-layer kinds, bytes, norms, tokens seen, last update"),
                      ("export", "write a session's (or file's) memory state to a file"),
                      ("import", "validate a state file and store it as a session (or at a path)"),
                      ("fork", "copy a session to a new id"),
                      ("reset", "forget a session's memory and transcript (a file: write a fresh state)"),
                      ("delete", "delete a session from the store")):
        a = msub.add_parser(name, help=hlp, description=hlp)
        if name in ("show", "export", "reset"):
            a.add_argument("target", metavar="TARGET", help=target)
        if name == "export":
            a.add_argument("dest", metavar="DEST", help="output state file")
            a.add_argument("--plain", action="store_true", help="decrypt an encrypted session into a plain file")
        if name == "import":
            a.add_argument("source", metavar="SOURCE", help="a state file (plain or encrypted)")
            a.add_argument("target", metavar="TARGET", help=target)
            a.add_argument("--force", action="store_true", help="replace an existing session")
        if name == "fork":
            a.add_argument("source", metavar="SRC", help="existing session id")
            a.add_argument("target", metavar="DST", help="new session id")
        if name == "delete":
            a.add_argument("target", metavar="ID", help="session id")
        if name in ("show", "export", "import", "reset"):
            a.add_argument("--model", default=None, help="the model the state belongs to (checks that it fits; "
                           "required to reset a state file)")
        if name == "reset":
            a.add_argument("--batch", type=int, default=1, help="batch rows of a fresh state file")
        if name == "list":
            a.add_argument("--json", action="store_true", help="machine-readable output")
        a.add_argument("--store", default=None, metavar="DIR",
                       help="session store (default: $MEMLM_HOME/sessions or ~/.memlm/sessions)")
        a.add_argument("--password", default=None, help="for encrypted sessions/files (default: $MEMLM_PASSWORD)")
    # Further commands live in their own modules memlm/cli/cmd_<name>.py, each defining
    #   HELP: str, EXAMPLE: str, add_arguments(parser) and run(args) -> int
    for name, mod in _extension_modules():
        e = sub.add_parser(name, help=mod.HELP, description=mod.HELP, epilog=f"example:\n  {mod.EXAMPLE}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(e)
    return p


def _extension_modules():
    import importlib
    import pkgutil

    import memlm.cli

    for info in sorted(pkgutil.iter_modules(memlm.cli.__path__), key=lambda i: i.name):
        if info.name.startswith("cmd_"):
            yield info.name[4:].replace("_", "-"), importlib.import_module(f"memlm.cli.{info.name}")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a checkpoint / model folder, a run folder (uses its latest checkpoint) or a preset name")
    p.add_argument("--device", default=None)
    p.add_argument("--tokenizer", default=None, help="override the tokenizer saved with the model")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (from `memlm finetune`) to apply")
    p.add_argument("--kv-tiers", default=None, metavar="SPEC",
                   help="Infinity-Window KV tiers for attention layers, e.g. hot=4096,warm=65536 (docs/infinity-window.md)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--frequency-penalty", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--no-repeat-ngram", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc N` re-runs the command under torchrun
    if args.command is None:
        parser.print_help()
        return 2
    try:
        from memlm.cli import commands

        fn = getattr(commands, f"cmd_{args.command}", None)
        if fn is None:
            fn = dict(_extension_modules())[args.command].run
        return fn(args) or 0
    except UserError as e:
        print(f"memlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _json_print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "Path"]
