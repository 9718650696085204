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
    from memlm.train.trainer import resolve_device

    return resolve_device(name or "auto")


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


def load_for_inference(spec: str, device: str | None = None, tokenizer: str | None = None, adapter: str | None = None):
    """(model, tokenizer, path) from a path or a preset name (a preset gives an untrained model, for trying things)."""
    import memlm
    from memlm.data.tokenizer import load_tokenizer

    dev = pick_device(device)
    if not Path(spec).exists() and spec in memlm.list_presets():
        cfg = memlm.preset(spec)
        model = memlm.build_model(cfg).to(dev).eval()
        return _with_adapter(model, adapter), load_tokenizer(tokenizer or cfg.train.tokenizer), None
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
    model = _with_adapter(model, adapter)
    _with_islets(model, path)
    return model, tok, path


def _with_islets(model, path: Path) -> None:
    """An islet bank saved beside the model (``memlm islets add``) is loaded and kept on the model as
    ``model.islet_bank``; every Session (chat, serve) then routes each turn through it (inference/session.py)."""
    from memlm.layers.islets import ISLETS_CONFIG, IsletBank

    if (path / ISLETS_CONFIG).is_file():
        bank = IsletBank.load(model, path)
        if bank.islets:
            model.islet_bank = bank



def with_kv_tiers(model, tok, spec: str | None):
    """Wrap attention layers in Infinity-Window tiers when --kv-tiers is given (memlm/memory/kvtiers.py)."""
    if not spec:
        return model
    from memlm.memory.kvtiers import kv_tiers_from_flag

    return kv_tiers_from_flag(model, tok, spec)


def _with_adapter(model, adapter: str | None):
    if adapter:
        from memlm.layers.lora import load_lora

        load_lora(model, adapter)
        model.eval()
    return model

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

    if args.resume and not args.config and not args.preset and args.out:
        # `memlm train --resume --out RUN`: continue with the configuration the run was saved with
        from memlm.train.checkpoint import find_checkpoint

        args.config = str(find_checkpoint(args.resume if isinstance(args.resume, str) else args.out) / "config.json")
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
    from memlm.train import parallel
    from memlm.train.trainer import train

    cfg = build_run_config(args)  # checked once here, before any process is started
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc {nproc}: must be ≥ 1")
    if nproc is not None and nproc > 1:
        return parallel.launch(args.argv, nproc)
    try:
        train(cfg, resume=args.resume)
    finally:
        parallel.shutdown()  # leave the process group of a torchrun launch (a no-op in one process)
    return 0


def cmd_generate(args) -> int:
    from memlm.inference.engine import generate
    from memlm.models.state import ModelState

    model, tok, _ = load_for_inference(args.model, args.device, args.tokenizer, args.adapter)
    model = with_kv_tiers(model, tok, args.kv_tiers)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    state = ModelState.load(args.state, model=model) if args.state else None
    if args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk {args.prefill_chunk}: must be ≥ 1")
    gen = generate(model, tok, prompt, max_new_tokens=args.max_new_tokens, sampling=sampling_from_args(args),
                   stop=args.stop or None, state=state, prefill_chunk=args.prefill_chunk,
                   static_cache=args.static_cache, cuda_graph=args.cuda_graph,
                   compile_step=args.compile_step)
    sys.stdout.write(prompt)
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.save_state:
        gen.state.save(args.save_state)
        print(f"[state saved to {args.save_state}: {gen.state.nbytes():,} bytes]", file=sys.stderr)
    return 0


CHAT_HELP = """commands:
  /help                 this list
  /mode [MODE]          show or switch the memory mode: stateless, session, persistent, readonly
  /learning [on|off]    show or switch test-time memory updates
  /save [ID]            save the memory now (under ID, default the session id)
  /reset                forget the conversation (memory, transcript, CMS deltas, controller)
  /fork ID              save the memory as a new session ID and continue there
  /stats                memory stats: tokens seen, bytes, per-layer norms, controller
  /set KEY=VALUE        temperature, top_k, top_p, min_p, seed, max_new_tokens, repetition_penalty,
                        frequency_penalty, presence_penalty, no_repeat_ngram, target (surprise; 'off')
  /exit                 quit (also /quit or end of input)"""


def open_store(args):
    """The SessionStore named by --store (default store dir), with --password or $MEMLM_PASSWORD."""
    from memlm.inference.store import SessionStore, default_store_dir, password_from_env

    return SessionStore(getattr(args, "store", None) or default_store_dir(),
                        password=password_from_env(getattr(args, "password", None)))


def cmd_chat(args) -> int:
    """Streaming REPL over a ``Session``: each turn feeds only the new tokens; the memory mode decides what the state
    carries and whether it is saved (see memlm/inference/session.py)."""
    from memlm.inference.controller import ControllerConfig
    from memlm.inference.session import Session

    model, tok, _ = load_for_inference(args.model, args.device, args.tokenizer, getattr(args, "adapter", None))
    model = with_kv_tiers(model, tok, getattr(args, "kv_tiers", None))
    store = open_store(args)
    mode = args.memory or ("persistent" if args.session else "session")
    sid = args.session
    if mode == "persistent" and sid is None:
        sid = time.strftime("chat-%Y%m%d-%H%M%S")
    controller = None
    if args.target_surprise is not None:
        try:
            controller = ControllerConfig(target=args.target_surprise)
        except ValueError as e:
            raise UserError(f"--target-surprise: {e}") from None
    session = Session(model, tok, mode=mode, learning=args.learning, store=store, session_id=sid,
                      sampling=sampling_from_args(args), controller=controller, system=args.system,
                      max_new_tokens=args.max_new_tokens, stop=args.stop)
    where = f", session {sid}" + (f" (loaded: {session.turns} turns, {session.tokens_seen} tokens)"
                                  if session.loaded else "") if sid else ""
    print(f"memlm chat — memory {mode}, learning {'on' if session.learning else 'off'}{where}. "
          "/help for commands, /exit to quit.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if line.strip().startswith("/"):
            try:
                if _chat_command(session, line.strip()):
                    return 0
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if not line.strip():
            continue
        sys.stdout.write("model> ")
        sys.stdout.flush()
        turn = session.send(line)
        try:
            for piece in turn:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            turn.close()
            print("\n[interrupted: the turn was discarded, memory unchanged]", file=sys.stderr)
            continue
        except UserError as e:  # e.g. the store became unwritable; the memory in RAM has the turn
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()


_SET_KEYS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "seed": int,
             "repetition_penalty": float, "frequency_penalty": float, "presence_penalty": float,
             "no_repeat_ngram": int}


def _chat_command(session, line: str) -> bool:
    """Run one /command; True means quit."""
    from memlm.inference.controller import ControllerConfig, SurpriseController

    cmd, _, rest = line.partition(" ")
    rest = rest.strip()
    say = lambda msg: print(msg, file=sys.stderr)  # REPL notes go to stderr, replies to stdout
    if cmd in ("/exit", "/quit"):
        return True
    if cmd == "/help":
        say(CHAT_HELP)
    elif cmd == "/mode":
        if rest:
            session.set_mode(rest)
        say(f"[memory mode: {session.mode}]")
    elif cmd == "/learning":
        if rest:
            if rest not in ("on", "off"):
                raise UserError("/learning on|off")
            session.set_learning(rest == "on")
        say(f"[learning: {'on' if session.learning else 'off'}"
            f"{'' if session.writes_memory or not session.learning else ' (this mode keeps nothing)'}]")
    elif cmd == "/save":
        sid = session.save(rest or None)
        say(f"[saved as {sid} in {session.store.root}]")
    elif cmd == "/reset":
        session.reset()
        say("[memory reset]")
    elif cmd == "/fork":
        if not rest:
            raise UserError("/fork NEW_ID")
        say(f"[forked: now in session {session.fork(rest)}]")
    elif cmd == "/stats":
        st = session.stats()
        layers = st.pop("layers")
        say(json.dumps(st, indent=2, default=str))
        for row in layers:
            norms = ", ".join(f"{k}={v}" for k, v in row["norms"].items())
            say(f"  layer {row['layer']:>2} {row['kind']:<16} {row['bytes']:>10,} B  {norms}")
    elif cmd == "/set":
        key, eq, value = rest.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise UserError("/set KEY=VALUE (see /help)")
        try:
            if key == "max_new_tokens":
                session.max_new_tokens = int(value)
            elif key == "target":
                if value == "off":
                    session.controller = None
                elif session.controller is None:
                    session.controller = SurpriseController(ControllerConfig(target=float(value)))
                else:
                    ctl = SurpriseController(session.controller.config.replace(target=float(value)))
                    session.controller = ctl
            elif key in _SET_KEYS:
                session.sampling = session.sampling.replace(**{key: _SET_KEYS[key](value)})
            else:
                raise UserError(f"/set: unknown key {key!r}; known: {', '.join([*_SET_KEYS, 'max_new_tokens', 'target'])}")
        except ValueError as e:
            raise UserError(f"/set {key}: {e}") from None
        say(f"[{key} = {value}]")
    else:
        raise UserError(f"unknown command {cmd}; /help lists them")
    return False


def cmd_data(args) -> int:
    if args.data_command != "prepare":
        raise UserError("usage: memlm data prepare SOURCES... --out DIR")
    from memlm.data.shards import prepare
    from memlm.data.sources import open_sources
    from memlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    t0 = time.time()
    if args.val_every < 0:
        raise UserError(f"--val-every {args.val_every}: must be ≥ 0")
    info = prepare(open_sources(args.sources), tok, args.out, val_every=args.val_every or None,
                   max_tokens=args.max_tokens)
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


def _is_file_target(target: str) -> bool:
    """A state file path (has '/' or '.', or exists as a file) rather than a session id."""
    from memlm.inference.store import SESSION_ID_RE

    return not SESSION_ID_RE.fullmatch(target) or Path(target).is_file()


def _read_state_file(path: str, password: str | None) -> bytes:
    """Plain state bytes of a file (decrypting an encrypted one)."""
    from memlm.inference.store import decrypt_bytes, is_encrypted

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror})") from None
    return decrypt_bytes(data, password, str(p)) if is_encrypted(data) else data


def _describe_state(data: bytes, where: str, model) -> dict:
    """JSON-ready description of plain state bytes: header fields and per-layer stats (checked against model)."""
    from safetensors.torch import load as st_load

    from memlm.inference.session import layer_stats
    from memlm.models.state import ModelState

    header = ModelState.read_header(data, where)
    if model is not None:
        ModelState.from_bytes(data, model=model, where=where, device="cpu")  # refuses another model
    try:
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 — safetensors raises several types on corrupt data
        raise UserError(f"{where}: corrupt state file ({e})") from None
    cms = {k: v for k, v in tensors.items() if k.startswith("cms.")}
    state_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if not k.startswith("cms."))
    ts = header.get("updated", header.get("saved_at", 0))
    out = {"tokens_seen": tensors["pos"].tolist() if "pos" in tensors else None, "bytes": state_bytes,
           "saved_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)),
           "config_hash": header.get("config_hash"), "format_version": header.get("format_version"),
           "kinds": header.get("kinds")}
    for k in ("session_id", "turns", "mode", "learning", "created", "updated"):
        if k in header:
            out[k] = header[k]
    if header.get("controller"):
        c = header["controller"]
        out["controller"] = {k: c.get(k) for k in ("mu", "surprise_ema", "entropy_ema", "steps")} | {
            "target": (c.get("config") or {}).get("target")}
    if cms:
        out["cms_deltas"] = {"tensors": len(cms),
                             "norm": round(float(sum(float((t.float() ** 2).sum()) for t in cms.values()) ** 0.5), 6)}
    if model is not None:
        out["fits_model"] = True
    out["layers"] = layer_stats(header.get("kinds") or [], tensors)
    return out


def cmd_memory(args) -> int:
    """Sessions in the store (by id) and state files (by path): list, show, export, import, fork, reset, delete."""
    from memlm.inference.store import validate_session_id
    from memlm.models.state import ModelState

    action = args.mem_command
    if action is None:
        raise UserError("usage: memlm memory {list,show,export,import,fork,reset,delete} ... (see --help)")
    store = open_store(args)
    model = load_for_inference(args.model)[0] if getattr(args, "model", None) else None

    if action == "list":
        rows = [store.info(sid) for sid in store.ids()]
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
            return 0
        if not rows:
            print(f"no sessions in {store.root}")
            return 0
        print(f"{'session':<28} {'enc':<4} {'turns':>6} {'tokens':>8} {'bytes':>12}  updated")
        for r in rows:
            h = r.get("header") or {}
            upd = time.strftime("%Y-%m-%d %H:%M", time.localtime(h.get("updated", r["modified"])))
            print(f"{r['id']:<28} {'yes' if r['encrypted'] else 'no':<4} {h.get('turns', '?'):>6} "
                  f"{h.get('tokens_seen', '?'):>8} {r['bytes']:>12,}  {upd}")
        return 0

    if action == "fork":
        store.fork(validate_session_id(args.source), validate_session_id(args.target))
        print(f"forked {args.source} → {args.target}")
        return 0
    if action == "delete":
        store.delete(validate_session_id(args.target))
        print(f"deleted session {args.target}")
        return 0

    if action == "import":
        data = _read_state_file(args.source, store.password)
        ModelState.read_header(data, args.source)
        if model is not None:
            ModelState.from_bytes(data, model=model, where=args.source, device="cpu")
        if _is_file_target(args.target):
            from memlm.io import atomic_write_bytes

            atomic_write_bytes(args.target, data)
        else:
            if store.exists(args.target) and not args.force:
                raise UserError(f"session {args.target!r} already exists (use --force to replace it)")
            store.write_file(args.target, data)
        print(f"imported {args.source} → {args.target}")
        return 0

    file_target = _is_file_target(args.target)
    if action == "reset":
        if file_target:
            if model is None:
                raise UserError("resetting a state file needs --model (the fresh state is made for it)")
            model.init_state(args.batch, device="cpu").save(args.target)
            print(f"fresh state written to {args.target}")
        else:
            store.reset(args.target)
            print(f"session {args.target}: memory and transcript forgotten")
        return 0

    if file_target:
        data, where = _read_state_file(args.target, store.password), args.target
    else:
        data, _, _ = store.read_bytes(args.target, model=model)
        where = f"session {args.target!r}"
    if action == "show":
        out = {"file" if file_target else "session": args.target} | _describe_state(data, where, model)
        if not file_target:
            info = store.info(args.target)
            out["encrypted"] = info["encrypted"]
            out["stored_bytes"] = info["bytes"]
        print(json.dumps(out, indent=2, default=str))
        return 0
    if action == "export":
        from memlm.inference.store import encrypt_bytes
        from memlm.io import atomic_write_bytes

        ModelState.read_header(data, where)
        if model is not None:
            ModelState.from_bytes(data, model=model, where=where, device="cpu")
        encrypted = not file_target and store.info(args.target)["encrypted"]
        if encrypted and not args.plain:
            h = ModelState.read_header(data, where)
            data = encrypt_bytes(data, store.password, meta={"format_version": h.get("format_version"),
                                                             "config_hash": h.get("config_hash")}, n=store.kdf_n)
        atomic_write_bytes(args.dest, data)
        print(f"exported {args.target} → {args.dest} ({len(data):,} bytes{', encrypted' if encrypted and not args.plain else ''})")
        return 0
    raise UserError(f"unknown memory action {action!r}")


def cmd_demo(args) -> int:
    from memlm.train.demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps, preset_name=args.preset)
    return 0
