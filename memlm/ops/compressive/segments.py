"""Document-aligned chunk layout with a pending-token buffer, shared by every memory that writes once per chunk
(compressive / Infini-attention segments, HOPE chunks).

Notation: B batch, T new tokens, C chunk (segment) length, P = C − 1 pending slots, N chunks in this call.

A chunk boundary falls wherever a token's position inside its document is a multiple of C (so without packing the
boundaries sit at absolute stream positions 0, C, 2C, …), and at every document start. Chunks therefore never
straddle a reset, and a packed row behaves exactly like separate documents.

Grid size N: the exact count (the most chunks any row has) needs a device→host read, which stalls the GPU queue
and breaks a torch.compile graph. Where shapes bound it — no reset inside the call, or a promise of at most n document
starts per row (``reset_bound``, set by the trainer from the host copy of the batch) — N is that static bound instead;
the extra grid rows are empty chunks (no valid slot, never complete, never a document start), which every user of the
layout skips, so outputs and states are the same.

The caller's state keeps the tokens of its current, incomplete chunk (at most P) right-aligned in a [B, P, …]
buffer; their number follows from the stream position, p = (pos − doc_start) mod C. A call prepends them to the new
tokens ("extended" sequence of P + T slots, the first P − p of which are empty), so a chunk completed by a later
call (token-by-token decode included) is computed from exactly the same inputs as in one long call.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from memlm.layers.base import stream_positions
from memlm.scoped import Scoped

__all__ = ["ChunkLayout", "chunk_layout", "gather_chunks", "gather_tokens", "pending_tail", "reset_bound",
           "static_chunks"]

_MAX_RESETS = Scoped()  # int | None: the promise of ``reset_bound``


@contextlib.contextmanager
def reset_bound(n: int | None) -> Iterator[None]:
    """Promise that no row of the forwards inside has more than ``n`` document starts after its first token
    (``reset[:, 1:].sum(1) <= n``): chunked memories then size their grid from shapes and ``n`` (no device→host read,
    no graph break; one compiled graph per distinct n, so round n up to a few buckets). None: no promise."""
    with _MAX_RESETS.scope(n):
        yield


def static_chunks(T: int, C: int, reset: Tensor | None, fresh: bool) -> int | None:
    """An upper bound on the grid's N known without reading the device, or None.

    The valid slots of a row are its p ≤ P pending tokens and the T new ones, cut at every document start into pieces
    that begin on a chunk boundary; Σ ceil(len_i / C) ≤ ceil((p + T) / C) + (pieces − 1). A fresh state has p = 0.
    """
    base = -(-T // C) if fresh else -(-(T + C - 1) // C)
    if reset is None or T == 1:  # one new token: no document start after the first token
        return max(base, 1)
    extra = _MAX_RESETS.get()
    return None if extra is None else max(base + int(extra), 1)


@dataclass
class ChunkLayout:
    """Where each token of the extended sequence lives in a padded [B, N, C] grid of chunks.

    gather_idx: [B, N·C] index into the extended sequence (P + T means "empty slot");
    slot_valid: [B, N, C]; starts_doc: [B, N] chunk begins a document (memory restarts from its initial value);
    complete: [B, N] chunk reached its C-th token (its writes are committed); index: [B, N] the chunk's number
    inside its document (position of its first token // C; 0 for empty grid rows); tok_idx: [B, T] flat grid index of
    each new token; keep_tail: [B, P] which of the last P extended slots form the new pending buffer;
    pos, doc_start: [B] the stream position and document start after the call.
    static: N is a bound from shapes (see the module docstring), not read from the device, so trailing grid rows may
    be empty; users should not branch on tensor values either (torch.compile). min_complete: the first min_complete
    chunks are complete in every row (known from shapes; 0 where resets make it data-dependent). identity: the grid
    is the new tokens themselves, in order (a fresh state, T a multiple of C, and no document start after the first
    token: no reset, or the ``reset_bound`` promise of 0), so the gathers below are views and the pending buffer is
    empty; callers may skip building the extended sequence.
    """

    C: int
    N: int
    gather_idx: Tensor
    slot_valid: Tensor
    starts_doc: Tensor
    complete: Tensor
    index: Tensor
    tok_idx: Tensor
    keep_tail: Tensor
    pos: Tensor
    doc_start: Tensor
    static: bool = False
    min_complete: int = 0
    identity: bool = False


def chunk_layout(pos: Tensor, doc_start: Tensor, reset: Tensor | None, T: int, C: int, *,
                 fresh: bool = False) -> ChunkLayout:
    """Layout of [pending (P slots); T new tokens]. pos, doc_start [B] from the state; reset bool [B, T] or None.

    fresh: the state is a fresh one (pos = doc_start = 0, nothing pending), which tightens the static bound on N."""
    B = pos.shape[0]
    P = C - 1
    dev = pos.device
    abs_pos, doc_tok = stream_positions(pos, doc_start, reset, T)
    rel_new = abs_pos - doc_tok                                          # position inside the document
    p = (pos - doc_start) % C                                            # pending tokens held by the state
    if reset is not None:
        p = torch.where(reset[:, 0], torch.zeros_like(p), p)            # they belong to a finished document
    i = torch.arange(P, device=dev)
    rel_pend = (pos - doc_start)[:, None] - (P - i)
    valid_pend = i[None, :] >= (P - p)[:, None]
    valid = torch.cat([valid_pend, torch.ones(B, T, dtype=torch.bool, device=dev)], dim=1)
    rel = torch.cat([rel_pend, rel_new], dim=1)                          # [B, P+T]
    slot = rel.remainder(C)
    start = valid & (slot == 0)
    ci = torch.cumsum(start.to(torch.long), dim=1) - 1                   # chunk index, ≥ 0 on valid slots
    # Static N where shapes bound it (module docstring): no host sync. One new token always lies in exactly one chunk
    # (its pending tokens are that chunk's head), so decode steps get N = 1, a fixed shape (static decode, CUDA graphs).
    N = static_chunks(T, C, reset, fresh)
    static = N is not None
    if N is None:
        N = max(int(start.sum(1).max().item()), 1)                      # exact: a device→host read
    flat = torch.where(valid, ci * C + slot, torch.full_like(ci, N * C))  # N·C is a dump column
    src = torch.arange(P + T, device=dev).expand(B, -1)
    gather_idx = torch.full((B, N * C + 1), P + T, dtype=torch.long, device=dev).scatter(1, flat, src)[:, :-1]
    ci_d = torch.where(valid, ci, torch.full_like(ci, N))
    starts_doc = torch.zeros(B, N + 1, dtype=torch.bool, device=dev).scatter(
        1, torch.where(start & (rel == 0), ci_d, torch.full_like(ci, N)), True)[:, :-1]
    complete = torch.zeros(B, N + 1, dtype=torch.bool, device=dev).scatter(
        1, torch.where(valid & (slot == C - 1), ci_d, torch.full_like(ci, N)), True)[:, :-1]
    index = torch.zeros(B, N + 1, dtype=torch.long, device=dev).scatter(
        1, torch.where(start, ci_d, torch.full_like(ci, N)), torch.div(rel, C, rounding_mode="floor").clamp_min(0))[:, :-1]
    new_p = (pos + T - doc_tok[:, -1]) % C                               # tokens of the last, incomplete chunk
    keep_tail = torch.arange(P, device=dev)[None, :] >= (P - new_p)[:, None]
    return ChunkLayout(C=C, N=N, gather_idx=gather_idx, slot_valid=(gather_idx < P + T).view(B, N, C),
                       starts_doc=starts_doc, complete=complete, index=index, tok_idx=flat[:, P:], keep_tail=keep_tail,
                       pos=pos + T, doc_start=doc_tok[:, -1], static=static,
                       min_complete=T // C if static and reset is None else 0,
                       identity=fresh and T % C == 0 and (reset is None or _MAX_RESETS.get() == 0))


def gather_chunks(xe: Tensor, lay: ChunkLayout) -> Tensor:
    """Extended sequence xe [B, P+T, ...] -> chunk grid [B, N, C, ...] (empty slots are zeros)."""
    B = xe.shape[0]
    if lay.identity:
        return xe[:, lay.C - 1:].view(B, lay.N, lay.C, *xe.shape[2:])
    padded = torch.cat([xe, xe.new_zeros(B, 1, *xe.shape[2:])], dim=1)
    rows = torch.arange(B, device=xe.device)[:, None]
    return padded[rows, lay.gather_idx].view(B, lay.N, lay.C, *xe.shape[2:])


def gather_tokens(grid: Tensor, lay: ChunkLayout) -> Tensor:
    """Chunk grid [B, N, C, ...] -> the new tokens [B, T, ...] in stream order."""
    B = grid.shape[0]
    flat = grid.reshape(B, lay.N * lay.C, *grid.shape[3:])
    if lay.identity:
        return flat
    rows = torch.arange(B, device=grid.device)[:, None]
    return flat[rows, lay.tok_idx]


def pending_tail(xe: Tensor, lay: ChunkLayout) -> Tensor:
    """The new pending buffer [B, P, ...]: the last P extended slots, zeroed where they are not pending."""
    P = lay.C - 1
    if lay.identity:
        return xe.new_zeros(xe.shape[0], P, *xe.shape[2:])
    tail = xe[:, xe.shape[1] - P:] if P > 0 else xe[:, :0]
    return tail * lay.keep_tail.view(*lay.keep_tail.shape, *([1] * (xe.dim() - 2))).to(tail.dtype)
