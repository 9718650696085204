"""A training step's forward, backward and gradient clip replayed from a CUDA graph (``train.cuda_graph``).

Why: a model whose layers walk over chunks (Atlas's neural memory: ≈ 1,350 kernel launches a step) spends as much
time on the host — Python, the autograd engine, launches — as the GPU spends on its kernels. A replayed graph launches
all of it with one call, so the step costs the GPU's time alone.

How (PyTorch's whole-network capture): the caller owns static input tensors and a ``body()`` that reads them and
returns its outputs (tensors in any structure: loss, gradient norm, metrics). ``StepGraphs.run(key, body)`` keeps one
graph per ``key`` — whatever changes what the body launches: shapes, whether a reset mask is given, the ``reset_bound``
promise. The first step of a key runs eagerly on a side stream (the warm-up: Triton compiles, cuBLAS workspaces,
lazy optimizer state); the second captures the body and replays it; later ones replay. The caller copies each batch
into the static inputs before ``run`` and reads the outputs before the next ``run``.

Gradients: capture starts with every ``.grad`` None, so the backward allocates the gradients inside the graph's memory
and the replays write (not add) them there. After a replay the parameters' ``.grad`` are set back to that graph's
tensors (an optimizer or the CMS gate may have set them to None in between). The optimizer runs eagerly after the
replay (a few fused launches), so learning-rate schedules and skipped non-finite steps work as without graphs.

All graphs share one memory pool: a replay may overwrite another graph's outputs, which is safe because every replay's
outputs are read (and its gradients stepped) before the next replay.

What a body must not do: synchronise with the host (``.item()``, ``bool(tensor)``, shapes from values — the
models' training paths are written without, see ``layers/static.py``), or bake a per-step Python number into a
kernel (the normaliser, the step and float16's loss scale come in as device tensors: ``run_segments``,
``collect_aux``; tbptt's carried state is copied into static tensors too, see ``Trainer._steady_state``).
"""
from __future__ import annotations

import traceback
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

_PACKAGE = Path(__file__).resolve().parents[1]


class CaptureError(RuntimeError):
    """The body could not be captured (it read the device, or did something else a graph cannot hold)."""


def _origin(e: BaseException) -> str:
    """'what (at memlm/…/file.py:line in func)' for the first error of a chain (a failed capture raises again on its
    way out), at its innermost frame inside this package."""
    while e.__context__ is not None:
        e = e.__context__
    what = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    ours = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve().is_relative_to(_PACKAGE)]
    if not ours:
        return what
    f = ours[-1]
    return f"{what} (at {Path(f.filename).resolve().relative_to(_PACKAGE.parent)}:{f.lineno} in {f.name})"


class StepGraphs:
    """One CUDA graph per kind of step (module docstring). ``params``: the parameters whose gradients the body
    computes. ``capture_after``: eager warm-up steps of a key before its capture (≥ 1)."""

    def __init__(self, params: Iterable[nn.Parameter], capture_after: int = 1) -> None:
        if capture_after < 1:
            raise ValueError(f"capture_after must be ≥ 1 (eager warm-up steps before a capture), got {capture_after}")
        self.params = list(params)
        self.capture_after = capture_after
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, Any, list[tuple[nn.Parameter, Tensor]]]] = {}
        self.warm: dict[Hashable, int] = {}
        self.pool = None
        self.stream: torch.cuda.Stream | None = None
        self.replays = 0

    def captured(self, key: Hashable) -> bool:
        return key in self.graphs

    def run(self, key: Hashable, body: Callable[[], Any]) -> Any:
        """body()'s outputs for this step: eager (warm-up), captured then replayed, or replayed (module docstring).
        The parameters' gradients hold this step's after the call, as after an eager body."""
        if key in self.graphs:
            graph, out, grads = self.graphs[key]
            graph.replay()
            self.replays += 1
            for p, g in grads:
                p.grad = g
            return out
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        cur = torch.cuda.current_stream()
        n = self.warm.get(key, 0)
        if n < self.capture_after:
            self.warm[key] = n + 1
            # PyTorch's recipe warms up on a side stream (what is made lazily per stream is made for the capture's)
            self.stream.wait_stream(cur)
            with torch.cuda.stream(self.stream):
                out = body()
            cur.wait_stream(self.stream)
            return out
        for p in self.params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                out = body()
        except Exception as e:  # noqa: BLE001 - any failure inside the capture, reported where it arose
            raise CaptureError(f"capturing the step as a CUDA graph failed: {_origin(e)}") from e
        if self.pool is None:
            self.pool = graph.pool()
        grads = [(p, p.grad) for p in self.params if p.grad is not None]
        self.graphs[key] = (graph, out, grads)
        graph.replay()   # the capture only recorded the step: this runs it
        self.replays += 1
        return out
