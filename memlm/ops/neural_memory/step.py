"""One decode token of the chunked neural memory with fixed shapes and no host synchronisation (static decode,
CUDA graphs; memlm.layers.static).

Notation: B batch, H heads, K = Dk = Dv head width, E hidden width, F feature width, C chunk, c Omega window,
P = C − 1 pending slots, W = (W1 [B, H, E, F], W2 [B, H, K, E], S1, S2) fast weights and momenta at the chunk start.

Same semantics as the layer's dynamic path (NeuralMemory._write over parallel.neural_memory, which tests pin it to):
the token reads the weights of its chunk start (W_init when its chunk starts a document); the chunk's write — its
pending tokens and this one, one inner step on Σ_{last c} γ‖M_W(k) − v‖² — is computed on every step and committed
only in rows whose chunk this token completes (a fixed graph cannot skip it on some steps).
"""
from __future__ import annotations

import torch
from torch import Tensor

from memlm.ops.compressive.segments import chunk_layout, gather_chunks, pending_tail

from .common import features, newton_schulz5
from .parallel import memory_read, omega_grad

__all__ = ["decode_step"]


def decode_step(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, W: tuple[Tensor, Tensor, Tensor, Tensor],
                pend: Tensor, pos: Tensor, doc_start: Tensor, reset: Tensor | None, *, chunk_size: int, window: int,
                optimizer: str, poly: bool, W1_init: Tensor, W2_init: Tensor, update: bool = True
                ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor], Tensor, Tensor, Tensor]:
    """q, k, v [B, 1, H, K]; gates [B, 1, H, 4] (γ, η, θ, α) float32; W as above (float32); pend [B, P, H(2K+4)]
    float32 (k, v, gates of the open chunk's tokens, right-aligned); pos, doc_start [B]; reset [B, 1] or None.

    Returns o [B, 1, H, K] (q's dtype), the new W, pend, pos and doc_start (unchanged inputs when update=False).
    """
    B, T, H, K = q.shape
    if T != 1:
        raise ValueError(f"neural memory decode_step takes one token, got T={T}")
    C, c = chunk_size, window
    lay = chunk_layout(pos, doc_start, reset, 1, C)                  # one chunk (the pending tokens + this one)
    starts, complete = lay.starts_doc[:, 0].view(B, 1, 1, 1), lay.complete[:, 0].view(B, 1, 1, 1)
    W1 = torch.where(starts, W1_init.float()[None], W[0])
    W2 = torch.where(starts, W2_init.float()[None], W[1])
    S1, S2 = W[2].masked_fill(starts, 0.0), W[3].masked_fill(starts, 0.0)
    res = K == W2.shape[2]                                           # identity residual iff Dk == Dv
    qd = q.float().transpose(1, 2)                                   # [B, H, 1, K]
    o = memory_read(W1, W2, features(qd, poly), qd if res else None).transpose(1, 2).to(q.dtype)
    if not update:
        return o, W, pend, pos, doc_start
    tok = torch.cat([k.float(), v.float(), gates.float()], dim=-1).reshape(B, 1, H * (2 * K + 4))
    ext = torch.cat([pend, tok], dim=1)                              # [B, C, H(2K+4)]
    grid = gather_chunks(ext, lay).view(B, C, H, 2 * K + 4).transpose(1, 2)   # [B, H, C, 2K+4], empty slots 0
    kw, vw, gam = grid[:, :, C - c:, :K], grid[:, :, C - c:, K:2 * K], grid[:, :, C - c:, 2 * K]
    e, t, a = (grid[..., 2 * K + i].mean(-1)[..., None, None] for i in (1, 2, 3))   # chunk gates [B, H, 1, 1]
    G1, G2 = omega_grad(W1, W2, features(kw, poly), kw if res else None, vw, gam)
    S1n, S2n = e * S1 - t * G1, e * S2 - t * G2
    U1, U2 = (newton_schulz5(S1n), newton_schulz5(S2n)) if optimizer == "muon" else (S1n, S2n)
    W1n, W2n = (1 - a) * W1 + U1, (1 - a) * W2 + U2
    new = tuple(torch.where(complete, n, o_) for n, o_ in zip((W1n, W2n, S1n, S2n), (W1, W2, S1, S2)))
    return o, new, pending_tail(ext, lay), lay.pos, lay.doc_start
