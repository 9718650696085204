"""Truncated backpropagation through time: run consecutive segments with the ModelState carried between them.

Notation: B rows (independent streams), T tokens per segment, S segments, k = detach_every, V vocabulary,
N valid target tokens (labels ≠ −100) over all S segments, CE_s the summed token cross-entropy of segment s,
A_s the sum of the auxiliary losses mixers report during segment s's forward, w the weight of one forward's
auxiliary losses (1/S by default: the mean over forwards).

    loss = Σ_s CE_s / N + w Σ_s A_s

The state is detached every k segments (a window): gradients flow through the memory inside a window and never
across a window boundary. With k = S the gradient equals one forward over the concatenated sequence (chunk
invariance of every mixer); with k = 1 each segment only sees its own graph. The loop runs over segments, never
over tokens.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from memlm.layers.base import collect_aux
from memlm.models.state import ModelState
from memlm.ops.cross_entropy import IGNORE_INDEX as IGNORE
from memlm.ops.cross_entropy import token_ce_sum

__all__ = ["IGNORE", "SegmentResult", "count_valid", "run_segments", "split_segments", "tbptt_loss", "to_floats",
           "token_ce_sum"]


def count_valid(labels: Sequence[Tensor] | Tensor) -> int:
    if isinstance(labels, Tensor):
        labels = [labels]
    return int(sum(int((lab != IGNORE).sum()) for lab in labels))


@dataclass
class SegmentResult:
    """What `run_segments` returns: loss (with graph unless backward ran), ce_sum (detached, summed CE),
    the final state (detached), and auxiliary losses / mixer metrics averaged over forwards (detached tensors
    or floats; `to_floats` turns them into numbers when they are logged)."""

    loss: Tensor
    ce_sum: Tensor
    state: ModelState | None
    aux: dict[str, Tensor | float] = field(default_factory=dict)
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


def _detached(v: Any, *, keep_shape: bool = False) -> Tensor | float:
    """A reported value without its graph; tensors stay on their device (no host sync inside the loop).
    Losses are reduced to their mean; metrics keep their shape (a gate histogram stays its bin counts)."""
    if isinstance(v, Tensor):
        v = v.detach().float()
        return v if keep_shape and v.numel() > 1 else v.mean()
    return float(v)


def to_floats(d: dict[str, Tensor | float]) -> dict[str, float | list[float]]:
    """Numbers for logging: scalars as floats, multi-element metrics (histograms) as lists."""
    return {k: v.tolist() if isinstance(v, Tensor) and v.numel() > 1 else float(v) for k, v in d.items()}


def run_segments(forward: Callable, segments: Sequence[tuple[Tensor, Tensor, Tensor | None]],
                 state: ModelState | None = None, *, detach_every: int = 1, normalizer: int | None = None,
                 aux_weight: float | None = None, backward: bool = False, scale: float | Tensor = 1.0,
                 autocast: Callable[[], Any] = contextlib.nullcontext, step: int | Tensor | None = None,
                 loss_in_forward: bool = False) -> SegmentResult:
    """Run ``segments`` = [(ids [B, T], labels [B, T], reset [B, T] or None), ...] through ``forward`` in order.

    forward(ids, state, reset) -> (logits [B, T, V], state) — the model, or its compiled version; with
    loss_in_forward, forward(ids, state, reset, labels) -> (summed token CE, state) instead (the trainer's path:
    MemoryLM(..., labels=...) computes the LM head and the loss inside the model, chunked or plain).
    state: carried in (None: fresh). normalizer: N (default: the valid tokens of these segments; pass the
    count over a whole optimizer step to accumulate gradients across calls; a device tensor ≥ 1 inside a CUDA graph,
    whose kernels must not bake in a per-step number). backward: call (scale · window loss).backward() at the end of
    every window (scale: float16's loss scale, a device tensor in a CUDA graph), freeing its graph (what the trainer
    does); otherwise the returned loss keeps the graph of every window (what tests differentiate). step: the
    optimizer step, given to mixers whose auxiliary-loss weight follows a schedule
    (``memlm.layers.base.current_step``; a float64 device tensor in a CUDA graph).
    """
    if detach_every < 1:
        raise ValueError(f"detach_every must be ≥ 1, got {detach_every}")
    n = normalizer if normalizer is not None else count_valid([s[1] for s in segments])
    if not isinstance(n, Tensor):
        n = max(int(n), 1)  # a step with no targets contributes zero loss, not NaN
    w = aux_weight if aux_weight is not None else 1.0 / max(len(segments), 1)
    total: Tensor | float = 0.0
    ce_total: Tensor | float = 0.0
    window: Tensor | float = 0.0
    aux: dict[str, Tensor | float] = {}
    metrics: dict[str, Tensor | float] = {}
    for i, (ids, labels, reset) in enumerate(segments):
        with collect_aux(step) as box, autocast():
            if loss_in_forward:
                ce, state = forward(ids, state, reset, labels)
            else:
                logits, state = forward(ids, state, reset)
        if not loss_in_forward:
            ce = token_ce_sum(logits, labels)
        seg_loss = ce / n
        for name, value in box["losses"].items():
            seg_loss = seg_loss + w * value
            aux[name] = aux.get(name, 0.0) + _detached(value) / len(segments)
        for name, value in box["metrics"].items():
            metrics[name] = metrics.get(name, 0.0) + _detached(value, keep_shape=True) / len(segments)
        ce_total = ce_total + ce.detach()
        window = window + seg_loss
        if (i + 1) % detach_every == 0 or i == len(segments) - 1:
            if backward:
                (window * scale).backward()
                window = window.detach()
            total = total + window
            window = 0.0
            state = state.detach()
    if not isinstance(total, Tensor):
        total = torch.zeros(())
    if not isinstance(ce_total, Tensor):
        ce_total = torch.zeros(())
    return SegmentResult(total, ce_total, state, aux, metrics)


def split_segments(ids: Tensor, labels: Tensor, segment_len: int,
                   reset: Tensor | None = None) -> list[tuple[Tensor, Tensor, Tensor | None]]:
    """Cut ids, labels, reset [B, T_total] along time into segments of ``segment_len`` (the last may be shorter)."""
    if segment_len < 1:
        raise ValueError(f"segment_len must be ≥ 1, got {segment_len}")
    out = []
    for a in range(0, ids.shape[1], segment_len):
        b = a + segment_len
        out.append((ids[:, a:b], labels[:, a:b], None if reset is None else reset[:, a:b]))
    return out


def tbptt_loss(model: Callable, ids: Tensor, labels: Tensor, segment_len: int, detach_every: int, *,
               state: ModelState | None = None, reset: Tensor | None = None) -> tuple[Tensor, ModelState]:
    """Mean token loss of ids [B, T_total] against (already shifted) labels [B, T_total], computed segment by
    segment with the state carried and detached every ``detach_every`` segments. Returns (loss with graph, final
    detached state); ``loss.backward()`` gives the TBPTT gradient."""
    segs = split_segments(ids, labels, segment_len, reset)
    r = run_segments(lambda x, s, rs: model(x, s, rs), segs, state, detach_every=detach_every)
    return r.loss, r.state
