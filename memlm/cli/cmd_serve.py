"""``memlm serve MODEL``: the OpenAI-compatible HTTP API and the web chat page (memlm/serve/)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from memlm.errors import UserError

HELP = "serve a model over an OpenAI-compatible HTTP API with a web chat page at /"
EXAMPLE = "memlm serve runs/tiny --port 8000 --store ~/.memlm/sessions   # then open http://127.0.0.1:8000/"
API_KEY_ENV = "MEMLM_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a checkpoint / model folder, a run folder or a preset name (random weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (0: pick a free one; the URL is printed)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    p.add_argument("--model-name", default=None, help="the id reported by /v1/models (default: folder or preset name)")
    p.add_argument("--memory", choices=("stateless", "session", "persistent", "readonly"), default=None,
                   help="mode of new sessions (default: persistent with --store, else session)")
    p.add_argument("--no-learning", dest="learning", action="store_false", help="new sessions start with learning off")
    p.add_argument("--store", default=None, metavar="DIR", help="session store for persistent sessions")
    p.add_argument("--password", default=None, help="encrypt the store (default: $MEMLM_PASSWORD)")
    p.add_argument("--system", default=None, help="system message of every new session")
    p.add_argument("--target-surprise", type=float, default=None, metavar="NATS",
                   help="decode with the surprise-targeting controller")
    p.add_argument("--max-tokens", type=int, default=128, help="default max_tokens of a request")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    p.add_argument("--max-sessions", type=int, default=256, help="sessions kept in memory")
    p.add_argument("--workers", type=int, default=4, help="generation threads (different sessions run concurrently)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (small models: 1 is fastest)")
    p.add_argument("--temperature", type=float, default=0.8, help="default temperature of requests")
    p.add_argument("--seed", type=int, default=None, help="default sampling seed of requests")
    p.add_argument("--device", default=None)
    p.add_argument("--tokenizer", default=None, help="override the tokenizer saved with the model")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    try:
        import uvicorn

        from memlm.serve.api import ServerConfig, create_app
    except ImportError as e:
        raise UserError(f"memlm serve needs the serve extras ({e.name} missing): pip install 'memlm[serve]'") from None
    import torch

    from memlm.cli.commands import load_for_inference
    from memlm.inference.controller import ControllerConfig
    from memlm.inference.sampling import SamplingConfig
    from memlm.inference.store import SessionStore, default_store_dir, password_from_env

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and not api_key:
        raise UserError(f"--host {args.host} is reachable from other machines: give --api-key (or ${API_KEY_ENV})")
    for name in ("max_tokens", "max_tokens_limit", "max_body_bytes", "max_sessions", "workers"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.max_tokens > args.max_tokens_limit:
        raise UserError("--max-tokens must not exceed --max-tokens-limit")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be ≥ 1")
        torch.set_num_threads(args.threads)
    model, tok, path = load_for_inference(args.model, args.device, args.tokenizer)
    password = password_from_env(args.password)
    mode = args.memory or ("persistent" if args.store else "session")
    store = None
    if args.store or mode in ("persistent", "readonly") or password:
        store = SessionStore(args.store or default_store_dir(), password=password)
    try:
        sampling = SamplingConfig(temperature=args.temperature, seed=args.seed)
        controller = None if args.target_surprise is None else ControllerConfig(target=args.target_surprise)
    except ValueError as e:
        raise UserError(str(e)) from None
    name = args.model_name or (Path(args.model).resolve().name if path is not None else args.model)
    cfg = ServerConfig(model_name=name, store=store, default_mode=mode, default_learning=args.learning,
                       api_key=api_key, max_body_bytes=args.max_body_bytes, max_tokens_limit=args.max_tokens_limit,
                       default_max_tokens=args.max_tokens, max_sessions=args.max_sessions, workers=args.workers,
                       sampling=sampling, controller=controller, system=args.system)
    app = create_app(model, tok, cfg)

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror})") from None
    sock.listen(128)  # bound and listening before the URL is printed: a client may connect at once
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"memlm serve: {name} on http://{shown}:{port}/ (memory {mode}"
          f"{', store ' + str(store.root) if store else ''}{', encrypted' if password else ''}"
          f"{', API key required' if api_key else ''})", flush=True)
    # keep-alive longer than clients usually idle, so a reused connection is rarely closed under them
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            timeout_keep_alive=30)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    print("memlm serve: stopped", file=sys.stderr)
    return 0
