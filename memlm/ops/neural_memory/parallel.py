"""Chunked neural memory: per chunk, the Omega gradient of all c window tokens in closed form (batched matmuls);
a Python loop over chunks only. Same semantics as reference.py (see there and NOTES.md).

Notation:
  B batch, T tokens, H heads, Dk key width, Dv value width, F memory input width, E hidden width, C chunk size,
  c window, p pending tokens, L = p + T stream length, φ feature map, X = φ(K) [c, F] window keys, V [c, Dv],
  w [c] token weights (γ · reset mask), Z = X W1ᵀ, A = gelu(Z), Y = [K] + A W2ᵀ, R = 2 w ⊙ (Y − V),
  G2 = Rᵀ A, G1 = ((R W2) ⊙ gelu'(Z))ᵀ X, S momenta, η, θ, α per-chunk gates, U = identity or newton_schulz5.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn
from torch import Tensor

from .common import NeuralMemoryState, Pending, check_args, compute_dtype, features, newton_schulz5

__all__ = ["neural_memory", "omega_grad", "memory_read"]

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_grad(z: Tensor) -> Tensor:
    """d gelu(z)/dz = Φ(z) + z φ(z) for the exact (erf) GELU; built from differentiable ops (double backward)."""
    return 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def memory_read(W1: Tensor, W2: Tensor, x: Tensor, xraw: Tensor | None) -> Tensor:
    """M_W(x) for a block of tokens: W1 [B, H, E, F], W2 [B, H, Dv, E], x [B, H, n, F], xraw [B, H, n, Dv] or None
    (the residual input) -> [B, H, n, Dv]."""
    y = Fn.gelu(x @ W1.mT) @ W2.mT
    return y if xraw is None else y + xraw


def omega_grad(W1: Tensor, W2: Tensor, x: Tensor, xraw: Tensor | None, v: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """∇_W Σ_i w_i ‖M_W(x_i) − v_i‖² for all tokens at once (closed form, differentiable to any order).

    W1 [B, H, E, F], W2 [B, H, Dv, E], x [B, H, c, F], xraw [B, H, c, Dv] or None, v [B, H, c, Dv], w [B, H, c]
    -> (G1 [B, H, E, F], G2 [B, H, Dv, E]).
    """
    z = x @ W1.mT                                    # [B, H, c, E]
    a = Fn.gelu(z)
    y = a @ W2.mT                                    # [B, H, c, Dv]
    if xraw is not None:
        y = y + xraw
    r = 2.0 * w.unsqueeze(-1) * (y - v)              # ∂L/∂y
    g2 = r.mT @ a                                    # Σ_i r_i a_iᵀ
    dz = (r @ W2) * _gelu_grad(z)                    # ∂L/∂z
    g1 = dz.mT @ x                                   # Σ_i dz_i x_iᵀ
    return g1, g2


def _reset_masks(reset: Tensor, n_chunks: int, C: int) -> tuple[Tensor, Tensor, Tensor]:
    """From stream reset flags [B, L]: after [B, n, C] (a reset in the chunk at or before the token), valid
    [B, n, C] (no reset in the chunk strictly after the token), has [B, n] (the chunk holds a reset)."""
    B, L = reset.shape
    r = torch.zeros(B, n_chunks * C, dtype=torch.int32, device=reset.device)
    r[:, :L] = reset.to(torch.int32)
    r = r.view(B, n_chunks, C)
    after = r.cumsum(-1) > 0
    at_or_later = r.flip(-1).cumsum(-1).flip(-1)
    valid = (at_or_later - r) == 0
    return after, valid, r.any(-1)


def _bh(x: Tensor) -> Tensor:
    """[B, L, H, ...] -> [B, H, L, ...] contiguous (one copy so per-chunk slices are cheap)."""
    return x.movedim(2, 1).contiguous()


def neural_memory(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, theta: Tensor, alpha: Tensor,
                  W1: Tensor, W2: Tensor, S1: Tensor | None = None, S2: Tensor | None = None, *,
                  pending: Pending | None = None, chunk_size: int = 64, window: int | None = None,
                  optimizer: str = "momentum", update: bool = True, poly: bool = False, reset: Tensor | None = None,
                  W1_init: Tensor | None = None, W2_init: Tensor | None = None) -> tuple[Tensor, NeuralMemoryState]:
    """MLP memory held as per-sequence fast weights, written once per chunk of C tokens by one inner optimizer step
    on the Omega objective Σ_{last c tokens} γ_i ‖M_W(k_i) − v_i‖²; every token reads the weights as they stood
    before its chunk. Differentiable w.r.t. every input (the meta-gradient goes through the inner updates).

    Args:
      q, k: [B, T, H, Dk] queries and keys (raw; φ is applied inside when poly=True).
      v: [B, T, H, Dv] values. The memory has the identity residual M(x) = x + ... iff Dk == Dv.
      gamma, eta, theta, alpha: [B, T, H] per-token write gate γ, momentum decay η, step size θ, forgetting α;
        η, θ, α are averaged over each chunk's tokens (after its last reset) to give the chunk's optimizer gates.
      W1 [B, H, E, F], W2 [B, H, Dv, E]: fast weights at the start (F = feature_dim(Dk, poly)).
      S1, S2: momenta like W1, W2 (None: zeros).
      pending: the open chunk's tokens from the previous call (None: empty); chunk boundaries are absolute
        positions of the stream, so carrying the returned state makes any split of a sequence equal one call.
      chunk_size: C. window: c <= C (None: C). optimizer: "momentum" (Titans) or "muon" (Atlas).
      update: False reads only; the state comes back unchanged and the tokens are not buffered.
      poly: degree-2 polynomial features φ on keys and queries (common.poly_features).
      reset: [B, T] bool, first token of a new document. Tokens from a reset to the end of its chunk read
        (W1_init, W2_init) [H, E, F], [H, Dv, E]; the chunk's write starts from (W_init, S = 0) and ignores the
        chunk's tokens before the reset. A reset on a chunk boundary is exactly a fresh start.
    Returns:
      o [B, T, H, Dv] (dtype of q) and NeuralMemoryState(W1, W2, S1, S2, pending) in float32 (float64 if given).
    """
    c, S1, S2, pending = check_args(q, k, v, gamma, eta, theta, alpha, W1, W2, S1, S2, pending, chunk_size,
                                    window, optimizer, poly, reset, W1_init, W2_init)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    dt = compute_dtype(q, k, v, W1)
    out_dtype = q.dtype
    residual = Dk == Dv
    W1, W2, S1, S2 = W1.to(dt), W2.to(dt), S1.to(dt), S2.to(dt)
    if W1_init is not None:
        W1i, W2i = W1_init.to(dt).expand(B, *W1_init.shape), W2_init.to(dt).expand(B, *W2_init.shape)
    qd = q.to(dt)
    qf = _bh(features(qd, poly))
    qraw = _bh(qd) if residual else None
    reset_cur = torch.zeros(B, T, dtype=torch.bool, device=q.device) if reset is None else reset

    if not update:
        o = memory_read(W1, W2, qf, qraw)
        after = (pending.reset.any(1, keepdim=True) | (reset_cur.cumsum(1) > 0))  # [B, T]
        if bool(after.any()):
            o = torch.where(after[:, None, :, None], memory_read(W1i, W2i, qf, qraw), o)
        return o.movedim(1, 2).to(out_dtype), NeuralMemoryState(W1, W2, S1, S2, pending)

    # The stream = pending tokens (already read) followed by this call's tokens; chunk j is stream[jC : jC + C].
    p = pending.length
    L = p + T
    cat = (lambda old, new: torch.cat([old.to(new.dtype), new], dim=1))
    ks, vs = cat(pending.k, k.to(dt)), cat(pending.v, v.to(dt))
    gs, es, ts, als = (cat(getattr(pending, n), x.to(dt)) for n, x in
                       (("gamma", gamma), ("eta", eta), ("theta", theta), ("alpha", alpha)))
    rs = torch.cat([pending.reset, reset_cur], dim=1)
    n_full, n_chunks = L // C, -(-L // C)
    any_reset = bool(rs.any())
    if any_reset:
        after, valid, has = _reset_masks(rs, n_chunks, C)
    kf, kraw, vb = _bh(features(ks, poly)), (_bh(ks) if residual else None), _bh(vs)
    gb, eb, tb, ab = _bh(gs), _bh(es), _bh(ts), _bh(als)      # [B, H, L]

    outs = []
    for j in range(n_chunks):
        s0, s1 = j * C, min(j * C + C, L)
        r0 = max(s0, p)
        if r0 < s1:  # this call's tokens in chunk j read W_j (W_init after a reset in the chunk)
            sl = slice(r0 - p, s1 - p)
            o_j = memory_read(W1, W2, qf[:, :, sl], None if qraw is None else qraw[:, :, sl])
            if any_reset:
                ar = after[:, j, r0 - s0:s1 - s0]
                if bool(ar.any()):
                    o_init = memory_read(W1i, W2i, qf[:, :, sl], None if qraw is None else qraw[:, :, sl])
                    o_j = torch.where(ar[:, None, :, None], o_init, o_j)
            outs.append(o_j)
        if s1 - s0 < C:
            break  # incomplete last chunk: buffered, not written
        w = gb[..., s1 - c:s1]
        e_j, t_j, a_j = eb[..., s0:s1], tb[..., s0:s1], ab[..., s0:s1]
        W1s, W2s, S1s, S2s = W1, W2, S1, S2
        if any_reset and bool(has[:, j].any()):
            m = valid[:, j, :].to(dt)[:, None, :]                                   # [B, 1, C]
            w = w * m[..., C - c:]
            cnt = m.sum(-1)
            e_j, t_j, a_j = ((x * m).sum(-1) / cnt for x in (e_j, t_j, a_j))     # [B, H]
            h = has[:, j, None, None, None]
            W1s, W2s = torch.where(h, W1i, W1), torch.where(h, W2i, W2)
            S1s, S2s = S1.masked_fill(h, 0.0), S2.masked_fill(h, 0.0)
        else:
            e_j, t_j, a_j = e_j.mean(-1), t_j.mean(-1), a_j.mean(-1)
        win = slice(s1 - c, s1)
        G1, G2 = omega_grad(W1s, W2s, kf[:, :, win], None if kraw is None else kraw[:, :, win], vb[:, :, win], w)
        e_j, t_j, a_j = e_j[..., None, None], t_j[..., None, None], a_j[..., None, None]
        S1 = e_j * S1s - t_j * G1
        S2 = e_j * S2s - t_j * G2
        U1, U2 = (newton_schulz5(S1), newton_schulz5(S2)) if optimizer == "muon" else (S1, S2)
        W1 = (1 - a_j) * W1s + U1
        W2 = (1 - a_j) * W2s + U2

    o = torch.cat(outs, dim=2).movedim(1, 2).to(out_dtype)
    rest = slice(n_full * C, L)
    # clone: a slice would keep the whole stream's storage alive inside the carried state
    new_pending = Pending(*(x[:, rest].clone() for x in (ks, vs, gs, es, ts, als, rs)))
    return o, NeuralMemoryState(W1, W2, S1, S2, new_pending)
