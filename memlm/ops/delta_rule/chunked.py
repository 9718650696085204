"""(Gated) delta rule in chunkwise-parallel form (WY / UT transform), plain PyTorch: the CPU default backend.

Notation (per batch b, head h, one chunk of C tokens, positions t, i ∈ [0, C); NOTES.md has the derivation):
  S ∈ R^{Dv×Dk}  state at the chunk start;  Q, K [C, Dk];  V [C, Dv];  β, g [C];  r reset flags [C]
  σ_t            segment id = number of resets in [0, t] (inclusive), so i ≤ t share a segment iff no reset in (i, t]
  L_{ti}         Σ_{s ∈ (i, t]} g_s  (log decay from i to t), built by a masked cumsum, never as G_t − G_i
  D_{ti}         exp(L_{ti}) · [i ≤ t] · [σ_i = σ_t]       decay mask (strict version D⁻ uses i < t)
  γ_t            exp(Σ_{s ≤ t} g_s) · [σ_t = 0]            decay of the carried state S up to t (0 after a reset)
  e_i            D_{C−1, i}                                decay of token i's write up to the chunk end
  A              (β ⊙rows K Kᵀ) ⊙ D⁻                      strictly lower triangular
  U, Wk          solutions of (I + A) [U | Wk] = [β V | (βγ) K]          (the UT transform)
  W              U − Wk Sᵀ            effective writes ("pseudo values") w_t, so that within the chunk
                 S_t = γ_t S + Σ_{i ≤ t} D_{ti} w_i k_iᵀ
  O              (γ Q) Sᵀ + (Q Kᵀ ⊙ D) W  =  (γ Q − P Wk) Sᵀ + P U,   P = Q Kᵀ ⊙ D
  S_next         γ_{C−1} S + Wᵀ (e ⊙rows K)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import _compute_dtype, check_inputs

__all__ = ["Chunks", "delta_rule", "outputs", "prepare", "state_recurrence", "unit_lower_inverse"]

INV_BLOCK = 16   # diagonal block size of unit_lower_inverse


class _UnitLowerInverse(torch.autograd.Function):
    """(I + A)⁻¹ for strictly lower triangular A [..., C, C], by blocks (see `unit_lower_inverse`)."""

    @staticmethod
    def forward(ctx, A: Tensor) -> Tensor:
        C, b = A.shape[-1], INV_BLOCK
        Cp = -(-C // b) * b
        Ap = F.pad(A.tril(-1), (0, Cp - C, 0, Cp - C)) if Cp != C else A.tril(-1)
        nb = Cp // b
        # Diagonal blocks by forward substitution, all blocks of all chunks at once: row i of X = (I + D)⁻¹ is
        # e_i − Σ_{j<i} D_ij X_j, and rows j < i are final when row i is formed (b − 1 small matmuls).
        D = torch.stack([Ap[..., k * b:(k + 1) * b, k * b:(k + 1) * b] for k in range(nb)], dim=-3)
        X = torch.eye(b, dtype=A.dtype, device=A.device).expand(D.shape).clone()
        for i in range(1, b):
            X[..., i, :] -= (D[..., i:i + 1, :i] @ X[..., :i, :]).squeeze(-2)
        # Block rows top-down: T_kj = −X_k Σ_{m<k} A_km T_mj (T_mj = 0 for m < j), two matmuls per block row.
        T = torch.zeros_like(Ap)
        T[..., :b, :b] = X[..., 0, :, :]
        for k in range(1, nb):
            r = slice(k * b, (k + 1) * b)
            T[..., r, r] = X[..., k, :, :]
            T[..., r, :k * b] = -(X[..., k, :, :] @ (Ap[..., r, :k * b] @ T[..., :k * b, :k * b]))
        T = T[..., :C, :C] if Cp != C else T
        ctx.save_for_backward(T)
        return T

    @staticmethod
    def backward(ctx, dT: Tensor) -> Tensor:
        # T = M⁻¹, M = I + A  ⇒  dM = −Tᵀ dT Tᵀ; only the strictly lower entries of A enter M
        (T,) = ctx.saved_tensors
        Tt = T.transpose(-1, -2)
        return -(Tt @ dT @ Tt).tril(-1)


def unit_lower_inverse(A: Tensor) -> Tensor:
    """(I + A)⁻¹ for A [..., C, C] strictly lower triangular (entries on or above the diagonal are ignored).

    Batched matmuls only, no triangular-solve kernel: forward substitution inside 16 × 16 diagonal blocks (15 steps
    over every block at once), then C/16 − 1 block rows of two matmuls; the backward is two matmuls. This replaced
    torch.linalg.solve_triangular, whose batched CUDA kernel (cuBLAS trsm, forward and again in the backward) took
    16 % of the delta rule's time on an H100 (benchmarks/profile_ops.py). Same operations as a triangular solve,
    so the same accuracy class (tests pin it to solve_triangular in float64 and float32)."""
    return _UnitLowerInverse.apply(A)


def _segment_masks(reset: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """reset [B, N, C] -> (same [B, 1, N, C, C] bool: σ_i = σ_t, fresh [B, 1, N, C] bool: σ_t = 0), or (None, None).

    Resets never enter the log-decays: they only switch pairs of positions (and the carried state) off, which
    keeps every kept decay exact instead of relying on exp(−huge) cancelling inside a cumulative sum.
    """
    if reset is None:
        return None, None
    seg = torch.cumsum(reset.to(torch.int32), dim=-1)                   # σ_t, inclusive
    same = seg[..., :, None] == seg[..., None, :]
    return same[:, None], (seg == 0)[:, None]


class Chunks(NamedTuple):
    """The parts of the chunkwise form that are batched over all chunks (shared by every backend that only
    replaces the sequential state recurrence). N chunks of C tokens; compute dtype float32 (float64 inputs stay)."""
    U: Tensor            # [B, H, N, C, Dv]  state-independent part of the pseudo values
    Wk: Tensor           # [B, H, N, C, Dk]  W = U − Wk Sᵀ
    k_end: Tensor        # [B, H, N, C, Dk]  e ⊙rows K
    gamma_last: Tensor   # [B, H, N]         γ_{C−1}
    q_eff: Tensor        # [B, H, N, C, Dk]  γ Q − P Wk, multiplies Sᵀ in O
    o_intra: Tensor      # [B, H, N, C, Dv]  P U
    S0: Tensor           # [B, H, Dv, Dk]    incoming state (zeros when none was given)


def prepare(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, *, initial_state: Tensor | None,
            reset: Tensor | None, chunk_size: int, scale: float | None) -> Chunks:
    """Everything except the state recurrence, batched over B, H and chunks (inputs as in `delta_rule`)."""
    if chunk_size < 1:
        raise ValueError(f"delta_rule: chunk_size must be ≥ 1, got {chunk_size}")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    cd = _compute_dtype(q)
    dev = q.device
    # A sequence shorter than a chunk is one chunk of its own length: no padding work for decode-sized calls.
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T

    # [B, T, H, D] -> [B, H, N, C, D] in the compute dtype. Padding tokens have k = v = β = g = 0, so they leave
    # the state exactly unchanged (S (I − 0) + 0) and their outputs are dropped.
    def chunks(x: Tensor) -> Tensor:
        x = x.to(cd).transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
        return x.reshape(B, H, N, C, *x.shape[3:])

    q_, k_, v_, b_ = chunks(q), chunks(k), chunks(v), chunks(beta)
    if scale is not None:
        q_ = q_ * scale
    rs = None
    if reset is not None:
        # padded positions never reset (a reset there would only zero the state that the tail must carry out)
        rs = torch.cat([reset, reset.new_zeros(B, pad)], dim=1) if pad else reset
        rs = rs.reshape(B, N, C)
    same, fresh = _segment_masks(rs)

    incl = torch.ones(C, C, dtype=torch.bool, device=dev).tril()          # i ≤ t
    strict = incl.tril(-1)                                                 # i < t
    if g is not None:
        g_ = chunks(g)                                                     # [B, H, N, C]
        # L_{ti} = Σ_{s ∈ (i, t]} g_s: column i of the masked matrix holds g_s for s > i; cumsum down the rows.
        # Every term is ≤ 0 and only in-range terms are summed, so no difference of large partial sums occurs.
        L = torch.cumsum(g_[..., :, None] * strict.to(cd), dim=-2)      # [B, H, N, C, C]
        decay = torch.exp(L)                                               # ≤ 1; exactly 1 where i ≥ t (L = 0)
        gamma = torch.exp(torch.cumsum(g_, dim=-1))                        # [B, H, N, C]
    else:
        decay = torch.ones(C, C, dtype=cd, device=dev)
        gamma = torch.ones(B, H, N, C, dtype=cd, device=dev)
    D = decay * incl.to(cd)
    if same is not None:
        D = D * same.to(cd)
        gamma = gamma * fresh.to(cd)
    D = D.expand(B, H, N, C, C)
    D_strict = D * strict.to(cd)
    e = D[..., -1, :]                                                      # [B, H, N, C]

    # UT transform: (I + A)⁻¹ once, applied to both right-hand sides.
    A = (b_[..., :, None] * (k_ @ k_.transpose(-1, -2))) * D_strict
    rhs = torch.cat([b_[..., None] * v_, (b_ * gamma)[..., None] * k_], dim=-1)
    # Out of autocast: the inverse and its product are the precision-critical step (fla keeps them in fp32 too), and
    # the state recurrence takes float32 U, Wk. Under bf16 autocast the other matmuls here run in bf16.
    with torch.autocast(dev.type, enabled=False):
        sol = unit_lower_inverse(A.to(cd)) @ rhs.to(cd)
    U, Wk = sol[..., :Dv], sol[..., Dv:]                                   # [B, H, N, C, Dv], [B, H, N, C, Dk]

    P = (q_ @ k_.transpose(-1, -2)) * D                                    # intra-chunk "attention"
    S0 = (initial_state.to(cd) if initial_state is not None
          else torch.zeros(B, H, Dv, Dk, dtype=cd, device=dev))
    return Chunks(U=U, Wk=Wk, k_end=e[..., None] * k_, gamma_last=gamma[..., -1],
                  q_eff=gamma[..., None] * q_ - P @ Wk, o_intra=P @ U, S0=S0)


def state_recurrence(U: Tensor, Wk: Tensor, k_end: Tensor, gamma_last: Tensor, S0: Tensor) -> tuple[Tensor, Tensor]:
    """S_{n+1} = γ_n S_n + (U_n − Wk_n S_nᵀ)ᵀ (e ⊙ K)_n, a Python loop over chunks (autograd does the backward).

    Shapes as in `Chunks`. Returns (S_all [B, H, N, Dv, Dk] the chunk-start states, S_N [B, H, Dv, Dk])."""
    S = S0
    states = []
    for n in range(U.shape[2]):
        states.append(S)
        W = U[:, :, n] - Wk[:, :, n] @ S.transpose(-1, -2)                 # [B, H, C, Dv]
        S = gamma_last[:, :, n, None, None] * S + W.transpose(-1, -2) @ k_end[:, :, n]
    return torch.stack(states, dim=2), S


def outputs(c: Chunks, S_all: Tensor, T: int, out_dtype: torch.dtype) -> Tensor:
    """O = q_eff S_nᵀ + P U per chunk, back to [B, T, H, Dv] in out_dtype (padding dropped)."""
    B, H, N, C, Dv = c.o_intra.shape
    o = c.q_eff @ S_all.transpose(-1, -2) + c.o_intra                      # [B, H, N, C, Dv]
    return o.reshape(B, H, N * C, Dv)[:, :, :T].transpose(1, 2).to(out_dtype)


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
               initial_state: Tensor | None = None, reset: Tensor | None = None, chunk_size: int = 64,
               scale: float | None = None, output_final_state: bool = True) -> tuple[Tensor, Tensor | None]:
    """Chunkwise-parallel (gated) delta rule; same contract as `reference.delta_rule`.

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; beta [B, T, H]; g [B, T, H] log-decay (≤ 0) or None;
    initial_state [B, H, Dv, Dk] or None (zeros); reset bool [B, T] or None (token t starts a new document);
    scale multiplies q (default 1). Returns o [B, T, H, Dv] in q's dtype and the final state [B, H, Dv, Dk]
    float32 (None if output_final_state is False). Differentiable in every tensor input.
    """
    check_inputs(q, k, v, beta, g, initial_state, reset)
    c = prepare(q, k, v, beta, g, initial_state=initial_state, reset=reset, chunk_size=chunk_size, scale=scale)
    # Only the state recurrence is sequential: two small matmuls per chunk.
    S_all, S = state_recurrence(c.U, c.Wk, c.k_end, c.gamma_last, c.S0)
    return outputs(c, S_all, q.shape[1], q.dtype), (S if output_final_state else None)
