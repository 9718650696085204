"""Document-aligned chunk layout with a pending-token buffer, shared by every memory that writes once per chunk
(compressive / Infini-attention segments, HOPE chunks).

Notation: B batch, T new tokens, C chunk (segment) length, P = C − 1 pending slots, N chunks in this call.

A chunk boundary falls wherever a token's position inside its document is a multiple of C (so without packing the
boundaries sit at absolute stream positions 0, C, 2C, …), and at every document start. Chunks therefore never
straddle a reset, and a packed row behaves exactly like separate documents.

The caller's state keeps the tokens of its current, incomplete chunk (at most P) right-aligned in a [B, P, …]
buffer; their number follows from the stream position, p = (pos − doc_start) mod C. A call prepends them to the new
tokens ("extended" sequence of P + T slots, the first P − p of which are empty), so a chunk completed by a later
call (token-by-token decode included) is computed from exactly the same inputs as in one long call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from memlm.layers.base import stream_positions

__all__ = ["ChunkLayout", "chunk_layout", "gather_chunks", "gather_tokens", "pending_tail"]


@dataclass
class ChunkLayout:
    """Where each token of the extended sequence lives in a padded [B, N, C] grid of chunks.

    gather_idx: [B, N·C] index into the extended sequence (P + T means "empty slot");
    slot_valid: [B, N, C]; starts_doc: [B, N] chunk begins a document (memory restarts from its initial value);
    complete: [B, N] chunk reached its C-th token (its writes are committed); index: [B, N] the chunk's number
    inside its document (position of its first token // C; 0 for empty grid rows); tok_idx: [B, T] flat grid index of
    each new token; keep_tail: [B, P] which of the last P extended slots form the new pending buffer;
    pos, doc_start: [B] the stream position and document start after the call.
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


def chunk_layout(pos: Tensor, doc_start: Tensor, reset: Tensor | None, T: int, C: int) -> ChunkLayout:
    """Layout of [pending (P slots); T new tokens]. pos, doc_start [B] from the state; reset bool [B, T] or None."""
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
    # One new token always lies in exactly one chunk (its pending tokens are that chunk's head): no host sync for
    # decode steps, whose grid must have a fixed shape (static decode, CUDA graphs).
    N = 1 if T == 1 else max(int(start.sum(1).max().item()), 1)
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
                       pos=pos + T, doc_start=doc_tok[:, -1])


def gather_chunks(xe: Tensor, lay: ChunkLayout) -> Tensor:
    """Extended sequence xe [B, P+T, ...] -> chunk grid [B, N, C, ...] (empty slots are zeros)."""
    B = xe.shape[0]
    padded = torch.cat([xe, xe.new_zeros(B, 1, *xe.shape[2:])], dim=1)
    rows = torch.arange(B, device=xe.device)[:, None]
    return padded[rows, lay.gather_idx].view(B, lay.N, lay.C, *xe.shape[2:])


def gather_tokens(grid: Tensor, lay: ChunkLayout) -> Tensor:
    """Chunk grid [B, N, C, ...] -> the new tokens [B, T, ...] in stream order."""
    B = grid.shape[0]
    flat = grid.reshape(B, lay.N * lay.C, *grid.shape[3:])
    rows = torch.arange(B, device=grid.device)[:, None]
    return flat[rows, lay.tok_idx]


def pending_tail(xe: Tensor, lay: ChunkLayout) -> Tensor:
    """The new pending buffer [B, P, ...]: the last P extended slots, zeroed where they are not pending."""
    P = lay.C - 1
    tail = xe[:, xe.shape[1] - P:] if P > 0 else xe[:, :0]
    return tail * lay.keep_tail.view(*lay.keep_tail.shape, *([1] * (xe.dim() - 2))).to(tail.dtype)
