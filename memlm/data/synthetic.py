"""Synthetic recall tasks for memory tests: associative recall across a long gap, and MQAR (multi-query AR).

Notation: B batch rows, T tokens per row, P key→value pairs, Q queries (Q ≤ P), k / v tokens per key / value,
G gap (filler) tokens, V vocabulary size.

Both generators follow the training convention of `memlm.data.packing`: labels[b, t] is the target for the position
*after* t, so at every answer position labels[b, t] == input_ids[b, t + 1]; everywhere else labels are -100.
`mask = labels != -100`. Every row is one document (reset[:, 0] = True). Deterministic in `seed` (numpy PCG64).

Associative recall (`assoc_recall_batch`), one row:

    k1 v1 k2 v2 … kP vP | G filler tokens | q1 a1 q2 a2 … qQ aQ

Keys, values and filler come from disjoint ranges of [vocab_lo, vocab_hi) (keys 40 %, values 40 %, filler 20 %),
so filler can never spell a key and a key can never be mistaken for a value. Keys are distinct within a row; the
queries are a random subset of the keys in random order, each followed by its value (teacher forcing). With G larger
than an attention window, only a memory can bridge the gap.

MQAR (`mqar_batch`, after Zoology's multi-query associative recall), one row:

    k1 v1 … kP vP | filler with Q (key, value) queries placed at random slots

Query slots are drawn without replacement with probability ∝ α·s^(α−1) in their distance s from the context (short
gaps likelier, long ones present), keys from [1, 1 + (V−1)/2), values from the rest, filler id 0.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from memlm.data.packing import IGNORE, Batch
from memlm.errors import UserError


@dataclass
class SyntheticBatch:
    """input_ids [B, T] long, labels [B, T] long, mask [B, T] bool (answer positions), reset [B, T] bool."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    reset: torch.Tensor

    def as_batch(self) -> Batch:
        return Batch(self.input_ids, self.labels, self.reset)


def _finish(ids: np.ndarray, labels: np.ndarray) -> SyntheticBatch:
    reset = np.zeros(ids.shape, dtype=bool)
    reset[:, 0] = True
    t_ids, t_lab = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(labels.astype(np.int64))
    return SyntheticBatch(t_ids, t_lab, t_lab != IGNORE, torch.from_numpy(reset))


def _distinct(rng: np.random.Generator, rows: int, n: int, total: int) -> np.ndarray:
    """[rows, n] distinct integers in [0, total) per row."""
    if n > total:
        raise UserError(f"cannot draw {n} distinct keys from {total} possible keys; widen the vocabulary or key_len")
    if total <= 1 << 16:
        return np.argsort(rng.random((rows, total)), axis=1)[:, :n]
    return np.stack([rng.choice(total, size=n, replace=False) for _ in range(rows)])


def assoc_recall_batch(batch: int, n_pairs: int, key_len: int, val_len: int, gap: int, vocab_lo: int, vocab_hi: int,
                       seed: int, *, n_queries: int | None = None, filler: str | int = "random") -> SyntheticBatch:
    """Associative recall across a gap; see the module docstring. T = (P + Q)(k + v) + G.

    filler: "random" (tokens from the filler range) or a fixed token id."""
    Q = n_pairs if n_queries is None else n_queries
    if not 1 <= Q <= n_pairs or key_len < 1 or val_len < 1 or gap < 0 or batch < 1:
        raise UserError("assoc_recall_batch needs batch ≥ 1, 1 ≤ n_queries ≤ n_pairs, key_len, val_len ≥ 1, gap ≥ 0")
    n = vocab_hi - vocab_lo
    nk, nv = (2 * n) // 5, (2 * n) // 5
    nf = n - nk - nv
    if nk < 2 or nv < 2 or nf < 1:
        raise UserError(f"vocabulary range [{vocab_lo}, {vocab_hi}) is too small for associative recall (need ≥ 10)")
    rng = np.random.default_rng(seed)
    B, P, k, v = batch, n_pairs, key_len, val_len
    codes = _distinct(rng, B, P, nk ** k)  # [B, P]
    digits = (codes[..., None] // nk ** np.arange(k - 1, -1, -1)) % nk  # [B, P, k]
    keys = vocab_lo + digits
    vals = vocab_lo + nk + rng.integers(0, nv, size=(B, P, v))  # [B, P, v]
    if filler == "random":
        fill = vocab_lo + nk + nv + rng.integers(0, nf, size=(B, gap))
    else:
        fill = np.full((B, gap), int(filler))
    which = np.argsort(rng.random((B, P)), axis=1)[:, :Q]  # [B, Q] pair index of each query
    rows = np.arange(B)[:, None]
    context = np.concatenate([keys, vals], axis=2).reshape(B, P * (k + v))
    queries = np.concatenate([keys[rows, which], vals[rows, which]], axis=2).reshape(B, Q * (k + v))
    ids = np.concatenate([context, fill, queries], axis=1)
    labels = np.full(ids.shape, IGNORE, dtype=np.int64)
    # Value j of query q sits at start + q(k+v) + k + j; it is predicted from the position before it.
    start = P * (k + v) + gap
    pos = start + np.arange(Q)[:, None] * (k + v) + k + np.arange(v)[None, :]  # [Q, v]
    pos = pos.reshape(-1)
    labels[:, pos - 1] = ids[:, pos]
    return _finish(ids, labels)


def mqar_batch(batch: int, seq_len: int, n_pairs: int, vocab_size: int, seed: int, *, n_queries: int | None = None,
               alpha: float = 0.1, filler_id: int = 0) -> SyntheticBatch:
    """Multi-query associative recall (single-token keys and values); see the module docstring."""
    Q = n_pairs if n_queries is None else n_queries
    B, P = batch, n_pairs
    half = (vocab_size - 1) // 2
    slots = (seq_len - 2 * P) // 2
    if not 1 <= Q <= P or batch < 1:
        raise UserError("mqar_batch needs batch ≥ 1 and 1 ≤ n_queries ≤ n_pairs")
    if slots < Q:
        raise UserError(f"seq_len {seq_len} leaves {slots} query slots after {P} pairs; need ≥ {Q}")
    if half < P or vocab_size - 1 - half < 1:
        raise UserError(f"vocab_size {vocab_size} is too small for {P} distinct keys")
    rng = np.random.default_rng(seed)
    keys = 1 + _distinct(rng, B, P, half)  # [B, P]
    vals = 1 + half + rng.integers(0, vocab_size - 1 - half, size=(B, P))  # [B, P]
    ids = np.full((B, seq_len), filler_id, dtype=np.int64)
    ids[:, 0:2 * P:2] = keys
    ids[:, 1:2 * P:2] = vals
    s = np.arange(1, slots + 1, dtype=np.float64)
    p = alpha * s ** (alpha - 1)
    p /= p.sum()
    labels = np.full((B, seq_len), IGNORE, dtype=np.int64)
    for b in range(B):  # per row: slot choice without replacement has no batched numpy form
        slot = rng.choice(slots, size=Q, replace=False, p=p)
        which = rng.permutation(P)[:Q]
        at = 2 * P + 2 * slot  # key position of each query
        ids[b, at] = keys[b, which]
        ids[b, at + 1] = vals[b, which]
        labels[b, at] = vals[b, which]
    return _finish(ids, labels)


def batches(fn: Callable[..., SyntheticBatch], *, seed: int = 0, **kwargs: Any) -> Iterator[SyntheticBatch]:
    """Endless stream fn(seed=seed), fn(seed=seed+1), …; batch i is reproducible on its own."""
    i = 0
    while True:
        yield fn(seed=seed + i, **kwargs)
        i += 1
