"""Selective diagonal state-space scan (Mamba-2 / SSD) in chunked parallel form, plus the T=1 decode step.

Notation (per batch row b and head h; see reference.py for the recurrence):
  T tokens, H heads, P channels per head, N state size, G groups of B/C, R = H // G heads per group
  Q chunk length, K = ceil(T / Q) chunks; i, j positions inside a chunk (0 ≤ j ≤ i < Q)
  l_t = dt_t · A_h ≤ 0       log decay of token t;  u_t = dt_t · x_t ∈ R^P  the scaled input
  s_ij = Σ_{k ∈ (j, i]} l_k   segment sum (decay from just after j up to and including i)
  L_ij = exp(s_ij) if j ≤ i and no reset in (j, i], else 0
  e_i = exp(Σ_{k ≤ i} l_k) if no reset in [0, i], else 0   (decay of the state carried into the chunk)
  S   chunk state: Σ_j L_{Q-1,j} u_j B_jᵀ;   g = e_{Q-1} chunk decay;   H_k state entering chunk k

Inside a chunk:   y_i = Σ_j (C_i · B_j) L_ij u_j  +  e_i H_k C_i  +  D x_i
Across chunks:    H_{k+1} = g_k H_k + S_k  (a Python loop over chunks, never over tokens)

Numerics: s_ij is a masked cumulative sum of only the terms in (j, i], so no difference of two large prefix sums
(no cancellation); all exponents are ≤ 0, so nothing overflows and masked entries hold exp(0), never inf or NaN,
which keeps the gradients of `where` clean. Resets only ever enter as boolean masks built from an integer count of
resets inside the chunk. Padding to a multiple of Q uses dt = 0 (decay 1, no input), so the final state is exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import check_ssm_inputs, compute_dtype

__all__ = ["ssm_scan_chunked", "ssm_step"]


def ssm_scan_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, *,
                     initial_state: Tensor | None = None, reset: Tensor | None = None,
                     chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """SSD chunked scan; same contract as `ssm_scan_reference`.

    x [B, T, H, P], dt [B, T, H] (> 0), A [H] (< 0), B/C [B, T, G, N], D [H] | None,
    initial_state [B, H, P, N] | None, reset bool [B, T] | None
    ->  (y [B, T, H, P] in x.dtype, final_state [B, H, P, N] float32 (float64 for float64 x)).
    """
    bsz, t_len, h, p, g, n = check_ssm_inputs(x, dt, A, B, C, D, initial_state, reset)
    if chunk_size < 1:
        raise ValueError(f"ssm_scan: chunk_size must be >= 1, got {chunk_size}")
    cd = compute_dtype(x)
    r = h // g
    q = min(chunk_size, t_len)  # a short sequence is one chunk, without padding work
    k = -(-t_len // q)
    pad = k * q - t_len

    xf, dtf, bf, cf = x.to(cd), dt.to(cd), B.to(cd), C.to(cd)
    rs = reset
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        bf = F.pad(bf, (0, 0, 0, 0, 0, pad))
        cf = F.pad(cf, (0, 0, 0, 0, 0, pad))
        rs = None if rs is None else F.pad(rs, (0, pad), value=False)

    # Heads are split as (G, R) so that C·Bᵀ is formed once per group and broadcast over its R heads.
    xc = xf.view(bsz, k, q, g, r, p)
    dtc = dtf.view(bsz, k, q, g, r)
    bc = bf.view(bsz, k, q, g, n)
    cc = cf.view(bsz, k, q, g, n)
    u = xc * dtc[..., None]  # [B, K, Q, G, R, P]
    logd = (dtc * A.to(cd).view(g, r)).permute(0, 1, 3, 4, 2)  # [B, K, G, R, Q], ≤ 0

    # Segment sums by masked cumsum: row i of column j accumulates l_k only for k > j.
    strict = torch.ones(q, q, dtype=torch.bool, device=x.device).tril(-1)  # [i, j]: i > j
    seg = torch.cumsum(torch.where(strict, logd[..., :, None], 0.0), dim=-2)  # [B, K, G, R, Q, Q]
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    carried = torch.cumsum(logd, dim=-1)  # [B, K, G, R, Q], plain prefix sums: no subtraction
    if rs is None:
        valid = causal  # [Q, Q]
        keep = None
    else:
        # Number of resets seen so far in the chunk; positions i, j share a document iff the counts are equal.
        cnt = torch.cumsum(rs.view(bsz, k, q).to(torch.int32), dim=-1)  # [B, K, Q]
        valid = (causal & (cnt[..., :, None] == cnt[..., None, :]))[:, :, None, None]  # [B, K, 1, 1, Q, Q]
        keep = (cnt == 0)[:, :, None, None]  # [B, K, 1, 1, Q]: no reset yet, carried state still alive
    decay = torch.where(valid, torch.exp(seg), 0.0)  # L, [B, K, G, R, Q, Q]
    e = torch.exp(carried) if keep is None else torch.where(keep, torch.exp(carried), 0.0)  # [B, K, G, R, Q]

    # Intra-chunk (quadratic, attention-like) part.
    cb = torch.einsum("bkign,bkjgn->bkgij", cc, bc)  # [B, K, G, Q, Q]
    y = torch.einsum("bkgrij,bkjgrp->bkigrp", cb[:, :, :, None] * decay, u)  # [B, K, Q, G, R, P]

    # Chunk states: every token's input decayed to the chunk end.
    w_end = decay[..., -1, :].permute(0, 1, 4, 2, 3)  # [B, K, Q, G, R]
    s_chunk = torch.einsum("bkjgrp,bkjgn->bkgrpn", u * w_end[..., None], bc)  # [B, K, G, R, P, N]
    g_chunk = e[..., -1]  # [B, K, G, R]

    if initial_state is None:
        state = x.new_zeros(bsz, g, r, p, n, dtype=cd)
    else:
        state = initial_state.to(cd).view(bsz, g, r, p, n)
        if reset is not None:
            # where, not a multiply: a non-finite state dropped by a reset at t=0 must not leak (NaN * 0 = NaN)
            state = torch.where(reset[:, 0, None, None, None, None], 0.0, state)
    entering = []
    # unbind once: indexing [:, c] inside the loop would make autograd build a full-size zero gradient per chunk
    for g_c, s_c in zip(g_chunk[..., None, None].unbind(1), s_chunk.unbind(1)):
        entering.append(state)
        state = g_c * state + s_c
    h_in = torch.stack(entering, dim=1)  # [B, K, G, R, P, N]

    # Contribution of the state carried into each chunk.
    y_off = torch.einsum("bkgrpn,bkign->bkigrp", h_in, cc)
    y = y + y_off * e.permute(0, 1, 4, 2, 3)[..., None]
    y = y.reshape(bsz, k * q, h, p)[:, :t_len]
    if D is not None:
        y = y + D.to(cd)[:, None] * xf[:, :t_len]
    return y.to(x.dtype), state.reshape(bsz, h, p, n)


def ssm_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, state: Tensor | None,
             reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One decode token: the recurrence applied once, no chunking.

    x [B, 1, H, P], dt [B, 1, H], A [H], B/C [B, 1, G, N], D [H] | None, state [B, H, P, N] | None (zeros),
    reset bool [B, 1] | None  ->  (y [B, 1, H, P] in x.dtype, new state [B, H, P, N] float32).
    The input state is not modified.
    """
    bsz, t_len, h, p, g, n = check_ssm_inputs(x, dt, A, B, C, D, state, reset)
    if t_len != 1:
        raise ValueError(f"ssm_step: expects one token (T = 1), got T = {t_len}; use ssm_scan for prefill")
    cd = compute_dtype(x)
    r = h // g
    xf, dtf = x[:, 0].to(cd), dt[:, 0].to(cd)  # [B, H, P], [B, H]
    bh = B[:, 0].to(cd).repeat_interleave(r, dim=1)  # [B, H, N]
    ch = C[:, 0].to(cd).repeat_interleave(r, dim=1)
    prev = x.new_zeros(bsz, h, p, n, dtype=cd) if state is None else state.to(cd)
    if reset is not None:
        prev = torch.where(reset[:, 0, None, None, None], 0.0, prev)
    a = torch.exp(dtf * A.to(cd))[..., None, None]  # [B, H, 1, 1]
    new = a * prev + (dtf[..., None] * xf)[..., None] * bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new, ch)
    if D is not None:
        y = y + D.to(cd)[:, None] * xf
    return y[:, None].to(x.dtype), new
