"""Helpers for the server tests: start `memlm serve` as a subprocess on a free loopback port.

Notation: none.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

import memlm


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives headless Chromium through Playwright (skips without them)")


def _sharp_model() -> memlm.MemoryLM:
    """transformer-debug redrawn at gain 3, so greedy replies vary with the context (a leak would show)."""
    torch.manual_seed(0)
    m = memlm.build_model("transformer-debug").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 3.0 / math.sqrt(p.shape[-1]))
    return m


def start_server(workdir, *extra: str, model: str | None = None) -> SimpleNamespace:
    """Start `memlm serve` on a free loopback port; return url, process, paths. Caller stops it (stop_server).

    model: a model folder to serve (default: a sharp transformer-debug saved into ``workdir``)."""
    model_dir = workdir / "model" if model is None else model
    if model is None and not model_dir.exists():
        _sharp_model().save_pretrained(model_dir)
    store = workdir / "store"
    cmd = [sys.executable, "-m", "memlm.cli.main", "serve", str(model_dir), "--port", "0", "--threads", "1",
           "--workers", "4", "--temperature", "0", "--max-tokens", "4", "--max-tokens-limit", "64",
           "--max-body-bytes", "20000", "--store", str(store), "--memory", "session", *extra]
    with open(workdir / "server.log", "w") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "MEMLM_PASSWORD": ""})
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=90)
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", line[0] if line else "")
    if not m:
        proc.kill()
        proc.wait()
        raise AssertionError(f"server did not start: {line} {(workdir / 'server.log').read_text()[-2000:]}")
    return SimpleNamespace(url=f"http://127.0.0.1:{m.group(1)}", port=int(m.group(1)), proc=proc, store=store,
                           model_dir=model_dir, workdir=workdir)


def stop_server(srv) -> None:
    srv.proc.terminate()
    try:
        srv.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait()


@pytest.fixture(scope="module")
def live_server():
    """Factory: ``live_server(workdir, *extra_args)`` starts a server, stopped at the end of the module."""
    started = []

    def start(workdir, *extra: str, model: str | None = None):
        srv = start_server(workdir, *extra, model=model)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        stop_server(srv)
