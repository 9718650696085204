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
from typing import NamedTuple

import torch
import torch.nn.functional as Fn
from torch import Tensor

from .common import (
    NeuralMemoryState,
    Pending,
    check_args,
    compute_dtype,
    features,
    maybe_any,
    newton_schulz5,
    read_dtype,
)

__all__ = ["Prelude", "Stream", "chunk_gates", "finish", "memory_read", "neural_memory", "omega_grad", "prepare",
           "read_only", "stream"]

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


class Prelude(NamedTuple):
    """One call's inputs checked and cast to the compute dtype dt (shared by every backend of the op).

    W1, W2, S1, S2 [B, H, ...] in dt; W1i [B, H, E, F], W2i [B, H, Dv, E] the expanded W_init (None if not given);
    qf [B, H, T, F] query features, qraw [B, H, T, Dv] raw queries (the residual; None when Dk != Dv);
    reset [B, T] bool (all False when not given); pending with defaults filled in; commit [B] int64 or None (see
    `neural_memory`; clamped by the backends once they know the number of complete chunks).
    """

    c: int
    C: int
    dt: torch.dtype
    out_dtype: torch.dtype
    residual: bool
    poly: bool
    W1: Tensor
    W2: Tensor
    S1: Tensor
    S2: Tensor
    W1i: Tensor | None
    W2i: Tensor | None
    qf: Tensor
    qraw: Tensor | None
    reset: Tensor
    pending: Pending
    commit: Tensor | None
    aligned: bool = False


class Stream(NamedTuple):
    """The stream of one call = pending tokens (already read) + its T tokens; chunk j is stream[jC : jC + C].

    p pending tokens, L = p + T, n_full complete chunks, n_chunks = ceil(L / C). Sequence-first [B, L, H, ·]:
    ks, vs, gs, es, ts, als (γ η θ α), rs [B, L] (bool). Head-first [B, H, L, ·]: kf (φ of the keys), kraw (raw
    keys, the residual; None when Dk != Dv), vb, and the gates gb, eb, tb, ab [B, H, L]. any_reset: a reset lies in
    the stream; then after, valid [B, n_chunks, C] and has [B, n_chunks] (see _reset_masks), else None.
    """

    p: int
    L: int
    n_full: int
    n_chunks: int
    ks: Tensor
    vs: Tensor
    gs: Tensor
    es: Tensor
    ts: Tensor
    als: Tensor
    rs: Tensor
    kf: Tensor
    kraw: Tensor | None
    vb: Tensor
    gb: Tensor
    eb: Tensor
    tb: Tensor
    ab: Tensor
    any_reset: bool
    after: Tensor | None
    valid: Tensor | None
    has: Tensor | None


def prepare(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, theta: Tensor, alpha: Tensor, W1: Tensor,
            W2: Tensor, S1: Tensor | None, S2: Tensor | None, pending: Pending | None, chunk_size: int,
            window: int | None, optimizer: str, poly: bool, reset: Tensor | None, W1_init: Tensor | None,
            W2_init: Tensor | None, commit: Tensor | None = None, chunk_aligned_resets: bool = False) -> Prelude:
    """Check the arguments of `neural_memory` and cast them (the part of a call before any chunk is touched)."""
    c, S1, S2, pending = check_args(q, k, v, gamma, eta, theta, alpha, W1, W2, S1, S2, pending, chunk_size,
                                    window, optimizer, poly, reset, W1_init, W2_init, commit, chunk_aligned_resets)
    B, T, _, Dk = q.shape
    dt = compute_dtype(q, k, v, W1)
    residual = Dk == v.shape[-1]
    W1i = W2i = None
    if W1_init is not None:
        W1i, W2i = W1_init.to(dt).expand(B, *W1_init.shape), W2_init.to(dt).expand(B, *W2_init.shape)
    qd = _bh(q.to(dt))   # features after the transpose: moving F-wide rows would copy F/Dk times the bytes
    reset = torch.zeros(B, T, dtype=torch.bool, device=q.device) if reset is None else reset
    return Prelude(c, chunk_size, dt, q.dtype, residual, poly, W1.to(dt), W2.to(dt), S1.to(dt), S2.to(dt), W1i, W2i,
                   features(qd, poly, read_dtype(dt, q.device)), qd if residual else None, reset, pending,
                   None if commit is None else commit.long(), chunk_aligned_resets)


def read_only(pre: Prelude) -> tuple[Tensor, NeuralMemoryState]:
    """update=False: every token reads the current W (W_init after a reset, pending resets included)."""
    o = memory_read(pre.W1, pre.W2, pre.qf, pre.qraw)
    after = (pre.pending.reset.any(1, keepdim=True) | (pre.reset.cumsum(1) > 0))  # [B, T]
    if maybe_any(after):
        o = torch.where(after[:, None, :, None], memory_read(pre.W1i, pre.W2i, pre.qf, pre.qraw), o)
    return o.movedim(1, 2).to(pre.out_dtype), NeuralMemoryState(pre.W1, pre.W2, pre.S1, pre.S2, pre.pending)


def stream(pre: Prelude, k: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, theta: Tensor, alpha: Tensor,
           raw_keys: bool = False) -> Stream:
    """Prepend the pending tokens to this call's and lay the stream out for the chunk loop (see Stream). raw_keys:
    kf holds the keys themselves, not φ of them (a backend that applies φ inside its own kernels)."""
    dt, C, pending = pre.dt, pre.C, pre.pending
    p = pending.length
    L = p + k.shape[1]
    cat = (lambda old, new: torch.cat([old.to(new.dtype), new], dim=1) if old.shape[1] else new)   # p = 0: no copy
    ks, vs = cat(pending.k, k.to(dt)), cat(pending.v, v.to(dt))
    gs, es, ts, als = (cat(getattr(pending, n), x.to(dt)) for n, x in
                       (("gamma", gamma), ("eta", eta), ("theta", theta), ("alpha", alpha)))
    rs = cat(pending.reset, pre.reset)
    n_full, n_chunks = L // C, -(-L // C)
    any_reset = maybe_any(rs)  # CUDA, compiled: the reset-masked path, which equals the plain one without resets
    after, valid, has = _reset_masks(rs, n_chunks, C) if any_reset else (None, None, None)
    kb = _bh(ks)
    return Stream(p, L, n_full, n_chunks, ks, vs, gs, es, ts, als, rs, kb if raw_keys else features(kb, pre.poly),
                  kb if pre.residual else None, _bh(vs), _bh(gs), _bh(es), _bh(ts), _bh(als), any_reset,
                  after, valid, has)


def chunk_gates(st: Stream, C: int, c: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per complete chunk j: window weights w [B, H, n_full, c] (γ, zero before the chunk's last reset) and the
    optimizer gates η, θ, α [B, H, n_full] (means over the chunk's tokens from its last reset on)."""
    n = st.n_full
    B, H = st.gb.shape[:2]
    g, e, t, a = (x[..., :n * C].reshape(B, H, n, C) for x in (st.gb, st.eb, st.tb, st.ab))
    w = g[..., C - c:]
    if not st.any_reset:
        return w, e.mean(-1), t.mean(-1), a.mean(-1)
    m = st.valid[:, None, :n].to(g.dtype)                                       # [B, 1, n, C]
    cnt = m.sum(-1)
    return (w * m[..., C - c:], *((x * m).sum(-1) / cnt for x in (e, t, a)))


def finish(o: Tensor, pre: Prelude, st: Stream, W1: Tensor, W2: Tensor, S1: Tensor, S2: Tensor
           ) -> tuple[Tensor, NeuralMemoryState]:
    """o [B, H, T, Dv] -> (o [B, T, H, Dv] in the output dtype, the state with the new pending buffer)."""
    rest = slice(st.n_full * pre.C, st.L)
    # clone: a slice would keep the whole stream's storage alive inside the carried state
    new_pending = Pending(*(x[:, rest].clone() for x in (st.ks, st.vs, st.gs, st.es, st.ts, st.als, st.rs)))
    return o.movedim(1, 2).to(pre.out_dtype), NeuralMemoryState(W1, W2, S1, S2, new_pending)


def neural_memory(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, theta: Tensor, alpha: Tensor,
                  W1: Tensor, W2: Tensor, S1: Tensor | None = None, S2: Tensor | None = None, *,
                  pending: Pending | None = None, chunk_size: int = 64, window: int | None = None,
                  optimizer: str = "momentum", update: bool = True, poly: bool = False, reset: Tensor | None = None,
                  W1_init: Tensor | None = None, W2_init: Tensor | None = None, commit: Tensor | None = None,
                  chunk_aligned_resets: bool = False) -> tuple[Tensor, NeuralMemoryState]:
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
      commit: [B] integer or None: row b's returned W1, W2, S1, S2 are the ones after the first commit[b] complete
        chunks of the stream (pending tokens included; clamped to [0, number of complete chunks]; 0: the given
        state); None: after every complete chunk. Every chunk is still written and read as above, so a caller can
        lay rows of different lengths into one stream (layers/neural_memory.py: document-aligned chunk grids) and keep
        each row's state from its last real chunk. The pending buffer is the stream's tail either way.
      chunk_aligned_resets: the caller promises that every reset (pending ones included) lies on a chunk's first
        token, so a chunk's tokens read either all W_j or all W_init (the MAG/MAL layer's document-aligned grids).
        Results are the same; the Triton backend then reads W_init through its stack of weights instead of reading
        every token a second time. Checked on CPU tensors (ValueError); on CUDA a reset inside a chunk would be read
        as if it were at the chunk's start.
    Returns:
      o [B, T, H, Dv] (dtype of q) and NeuralMemoryState(W1, W2, S1, S2, pending) in float32 (float64 if given).
    """
    pre = prepare(q, k, v, gamma, eta, theta, alpha, W1, W2, S1, S2, pending, chunk_size, window, optimizer, poly,
                  reset, W1_init, W2_init, commit, chunk_aligned_resets)
    if not update:
        return read_only(pre)
    st = stream(pre, k, v, gamma, eta, theta, alpha)
    C, c, p, L = pre.C, pre.c, st.p, st.L
    qf, qraw, W1i, W2i = pre.qf, pre.qraw, pre.W1i, pre.W2i
    W1, W2, S1, S2 = pre.W1, pre.W2, pre.S1, pre.S2
    gw, ge, gt, ga = chunk_gates(st, C, c)
    kept = (W1, W2, S1, S2)   # the state after commit[b] chunks (commit given)
    commit = None if pre.commit is None else pre.commit.clamp(0, st.n_full)
    outs = []
    for j in range(st.n_chunks):
        s0, s1 = j * C, min(j * C + C, L)
        r0 = max(s0, p)
        if r0 < s1:  # this call's tokens in chunk j read W_j (W_init after a reset in the chunk)
            sl = slice(r0 - p, s1 - p)
            o_j = memory_read(W1, W2, qf[:, :, sl], None if qraw is None else qraw[:, :, sl])
            if st.any_reset:
                ar = st.after[:, j, r0 - s0:s1 - s0]
                if maybe_any(ar):
                    o_init = memory_read(W1i, W2i, qf[:, :, sl], None if qraw is None else qraw[:, :, sl])
                    o_j = torch.where(ar[:, None, :, None], o_init, o_j)
            outs.append(o_j)
        if s1 - s0 < C:
            break  # incomplete last chunk: buffered, not written
        W1s, W2s, S1s, S2s = W1, W2, S1, S2
        if st.any_reset and maybe_any(st.has[:, j]):  # the write starts from (W_init, 0) in rows with a reset
            h = st.has[:, j, None, None, None]
            W1s, W2s = torch.where(h, W1i, W1), torch.where(h, W2i, W2)
            S1s, S2s = S1.masked_fill(h, 0.0), S2.masked_fill(h, 0.0)
        win = slice(s1 - c, s1)
        G1, G2 = omega_grad(W1s, W2s, st.kf[:, :, win], None if st.kraw is None else st.kraw[:, :, win],
                            st.vb[:, :, win], gw[:, :, j])
        e_j, t_j, a_j = ge[:, :, j, None, None], gt[:, :, j, None, None], ga[:, :, j, None, None]
        S1 = e_j * S1s - t_j * G1
        S2 = e_j * S2s - t_j * G2
        U1, U2 = (newton_schulz5(S1), newton_schulz5(S2)) if optimizer == "muon" else (S1, S2)
        W1 = (1 - a_j) * W1s + U1
        W2 = (1 - a_j) * W2s + U2
        if commit is not None:
            at = (commit == j + 1).view(-1, 1, 1, 1)
            kept = tuple(torch.where(at, w, k) for w, k in zip((W1, W2, S1, S2), kept))
    if commit is not None:
        W1, W2, S1, S2 = kept
    return finish(torch.cat(outs, dim=2), pre, st, W1, W2, S1, S2)
