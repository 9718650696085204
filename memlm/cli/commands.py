"""Implementations of the CLI commands (imported lazily so ``memlm --help`` is instant)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from memlm.errors import UserError


# ---------------------------------------------------------------------------------------------- helpers

def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device (use cpu, cuda, cuda:1 …)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return dev


def resolve_model_path(spec: str) -> Path:
    """A run folder (→ its latest checkpoint), a checkpoint folder or a model folder (save_pretrained)."""
    from memlm.train.checkpoint import find_checkpoint

    p = Path(spec)
    if not p.exists():
        raise UserError(f"{spec}: no such model folder")
    if (p / "config.json").exists():
        return p
    try:
        return find_checkpoint(p)
    except UserError:
        raise UserError(f"{p}: not a memlm run, checkpoint or model folder (no config.json or checkpoints/)") from None


def load_for_inference(spec: str, device: str | None = None, tokenizer: str | None = None):
    """(model, tokenizer, path) from a path or a preset name (a preset gives an untrained model, for trying things)."""
    import memlm
    from memlm.data.tokenizer import load_tokenizer

    dev = pick_device(device)
    if not Path(spec).exists() and spec in memlm.list_presets():
        cfg = memlm.preset(spec)
        model = memlm.build_model(cfg).to(dev).eval()
        return model, load_tokenizer(tokenizer or cfg.train.tokenizer), None
    path = resolve_model_path(spec)
    model = memlm.load_model(path, device=dev)
    tok_name = tokenizer
    if tok_name is None:
        if (path / "tokenizer.json").exists():
            tok_name = str(path)
        else:
            data = json.loads((path / "config.json").read_text())
            tok_name = data.get("train", {}).get("tokenizer") or ("byte256" if model.config.vocab_size == 256 else "byte")
    tok = load_tokenizer(tok_name)
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer {tok_name!r} has {tok.vocab_size} tokens but the model only {model.config.vocab_size}")
    return model, tok, path


def sampling_from_args(args):
    from memlm.inference.sampling import SamplingConfig

    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
              repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
              presence_penalty=args.presence_penalty, no_repeat_ngram=args.no_repeat_ngram, seed=args.seed)
    return SamplingConfig(**{k: v for k, v in kw.items() if v is not None})


def build_run_config(args):
    import memlm
    from memlm.config.base import apply_overrides
    from memlm.config.train import RunConfig

    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"--config {path}: no such file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"--config {path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        data = {k: v for k, v in data.items() if k in ("model", "train", "family", "description")}
        cfg = RunConfig.from_dict(data)
    else:
        cfg = memlm.preset(args.preset or "transformer-debug")
    cfg = apply_overrides(cfg, args.overrides)
    if args.data:
        cfg.train.data = list(args.data)
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps {args.steps}: must be ≥ 1")
        cfg.train.steps = args.steps
    if args.out:
        cfg.train.out_dir = args.out
    if args.device:
        pick_device(args.device)
        cfg.train.device = args.device
    return cfg


# ---------------------------------------------------------------------------------------------- commands

def cmd_train(args) -> int:
    from memlm.train.trainer import train

    cfg = build_run_config(args)
    train(cfg, resume=args.resume)
    return 0


def cmd_generate(args) -> int:
    from memlm.inference.engine import generate
    from memlm.models.state import ModelState

    model, tok, _ = load_for_inference(args.model, args.device, args.tokenizer)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    state = ModelState.load(args.state, model=model) if args.state else None
    gen = generate(model, tok, prompt, max_new_tokens=args.max_new_tokens, sampling=sampling_from_args(args),
                   stop=args.stop or None, state=state)
    sys.stdout.write(prompt)
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.save_state:
        gen.state.save(args.save_state)
        print(f"[state saved to {args.save_state}: {gen.state.nbytes():,} bytes]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """A plain multi-turn REPL: the model's memory state is carried from turn to turn; each turn feeds only the new
    tokens (the user's message in the chat template), never the whole transcript again."""
    from memlm.data.chat import END, marker_ids, render_prompt, stop_ids
    from memlm.inference.engine import generate

    model, tok, _ = load_for_inference(args.model, args.device, args.tokenizer)
    sampling = sampling_from_args(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    end = marker_ids(tok, END)
    state, closed = None, True  # closed: the last assistant turn ended with <|end|> (the state has seen it)
    print("memlm chat — type /exit to quit, /reset to forget the conversation.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            state, closed = None, True
            print("[memory reset]", file=sys.stderr)
            continue
        turn = (system if state is None else []) + [{"role": "user", "content": line}]
        new_ids = ([] if closed else end) + render_prompt(tok, turn)
        sys.stdout.write("model> ")
        gen = generate(model, tok, new_ids, max_new_tokens=args.max_new_tokens, sampling=sampling, state=state,
                       stop=args.stop or None, stop_ids=stop_ids(tok))
        for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        state = gen.state
        closed = bool(gen.token_ids) and gen.token_ids[-len(end):] == end


def cmd_data(args) -> int:
    if args.data_command != "prepare":
        raise UserError("usage: memlm data prepare SOURCES... --out DIR")
    from memlm.data.shards import prepare
    from memlm.data.sources import open_sources
    from memlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    t0 = time.time()
    info = prepare(open_sources(args.sources), tok, args.out)
    print(json.dumps(info if isinstance(info, dict) else {"out": args.out}, indent=2, default=str))
    print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


def cmd_tokenizer(args) -> int:
    if args.tok_command != "train":
        raise UserError("usage: memlm tokenizer train SOURCES... --vocab-size N --out DIR")
    import itertools

    from memlm.data.sources import open_sources
    from memlm.data.tokenizer import train_bpe

    docs = open_sources(args.sources)
    texts = (d.text for d in docs if getattr(d, "text", None))
    if args.max_docs:
        texts = itertools.islice(texts, args.max_docs)
    tok = train_bpe(texts, args.vocab_size, args.out)
    print(f"trained BPE with {tok.vocab_size} tokens → {args.out}/tokenizer.json")
    return 0


def cmd_presets(args) -> int:
    import memlm
    from memlm.config.presets import PRESETS
    from memlm.models.lm import MemoryLM

    rows = []
    for name in memlm.list_presets():
        e = PRESETS[name]
        if args.family and e.family != args.family:
            continue
        cfg = memlm.preset(name).model
        with torch.device("meta"):
            m = MemoryLM(cfg)
        rows.append({"name": name, "family": e.family, "params": m.num_params(),
                     "non_embedding": m.num_params(non_embedding=True), "description": e.description})
    if args.family and not rows:
        fams = sorted({e.family for e in PRESETS.values()})
        raise UserError(f"--family {args.family!r}: no such family; families: {', '.join(fams)}")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'preset':<28} {'family':<18} {'params':>13} {'non-emb':>13}  description")
    for r in rows:
        print(f"{r['name']:<28} {r['family']:<18} {r['params']:>13,} {r['non_embedding']:>13,}  {r['description']}")
    return 0


def cmd_info(args) -> int:
    p = Path(args.path)
    if p.is_file():
        from memlm.models.state import ModelState

        header = ModelState.read_header(p.read_bytes(), str(p))
        out = {"kind": "memory state", "file": str(p), "bytes": p.stat().st_size, **header}
        if args.model:
            model, _, _ = load_for_inference(args.model)
            state = ModelState.load(p, model=model)
            out["fits_model"] = True
            out["layers"] = _state_layers(state)
        print(json.dumps(out, indent=2, default=str))
        return 0
    path = resolve_model_path(args.path)
    import memlm
    from memlm.models.lm import read_model_config

    cfg = read_model_config(path)
    data = json.loads((path / "config.json").read_text())
    model = memlm.build_model(cfg)
    out = {"kind": "model", "path": str(path), "preset": cfg.name, "params": model.num_params(),
           "non_embedding_params": model.num_params(non_embedding=True), "d_model": cfg.d_model,
           "layers": [lc.kind for lc in cfg.layers], "vocab_size": cfg.vocab_size,
           "config_hash": cfg.config_hash(), "tokenizer": data.get("train", {}).get("tokenizer")}
    ts = path / "trainer_state.json"
    if ts.exists():
        out["trainer_state"] = json.loads(ts.read_text())
    print(json.dumps(out, indent=2, default=str))
    return 0


def _state_layers(state) -> list[dict]:
    rows = []
    for i, (kind, s) in enumerate(zip(state.kinds, state.layers)):
        tensors = s.tensors()
        rows.append({"layer": i, "kind": kind, "bytes": s.nbytes(),
                     "norms": {k: round(float(v.float().norm()), 4) for k, v in tensors.items() if v.is_floating_point()}})
    return rows


def cmd_memory(args) -> int:
    from memlm.models.state import ModelState

    if args.mem_command is None:
        raise UserError("usage: memlm memory {show,reset,export,import} STATE --model MODEL")
    model, _, _ = load_for_inference(args.model)
    if args.mem_command == "reset":
        model.init_state(args.batch, device="cpu").save(args.state)
        print(f"fresh state written to {args.state}")
        return 0
    state = ModelState.load(args.state, model=model, device="cpu")
    if args.mem_command == "show":
        header = ModelState.read_header(Path(args.state).read_bytes(), args.state)
        print(json.dumps({"file": args.state, "tokens_seen": state.pos.tolist(), "bytes": state.nbytes(),
                          "saved_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(header.get("saved_at", 0))),
                          "config_hash": header.get("config_hash"), "layers": _state_layers(state)}, indent=2))
        return 0
    state.save(args.dest)  # export/import: validated against the model, written atomically
    print(f"{args.mem_command}ed {args.state} → {args.dest} ({state.nbytes():,} bytes)")
    return 0


def cmd_demo(args) -> int:
    from memlm.train.demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps, preset_name=args.preset)
    return 0
