"""(Gated) delta rule, token-by-token: the specification every faster backend is tested against.

Notation (per batch b, head h):
  S ∈ R^{Dv×Dk}  fast-weight state (float32);  q, k ∈ R^{Dk};  v ∈ R^{Dv};  β ∈ R  write strength;
  g ≤ 0          log-decay, α = exp(g) (g = 0, i.e. α = 1, is plain DeltaNet);
  r ∈ {0, 1}     reset flag: token t starts a new document, so S_{t-1} is treated as 0.

  S_t = α_t S_{t-1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ  =  S' + β_t (v_t − S' k_t) k_tᵀ   with S' = α_t S_{t-1}
  o_t = S_t q_t · scale
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_inputs", "delta_rule", "delta_rule_step"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    # float32 is the contract; float64 inputs stay float64 so tests can build a high-precision oracle.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_inputs(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, initial_state: Tensor | None,
                 reset: Tensor | None) -> None:
    """Raise ValueError naming the argument whose shape does not fit q [B, T, H, Dk]."""
    if q.dim() != 4:
        raise ValueError(f"delta_rule: q must be [B, T, H, Dk], got shape {tuple(q.shape)}")
    B, T, H, Dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"delta_rule: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"delta_rule: v must be [B={B}, T={T}, H={H}, Dv], got {tuple(v.shape)}")
    if beta.shape != (B, T, H):
        raise ValueError(f"delta_rule: beta must be [B={B}, T={T}, H={H}], got {tuple(beta.shape)}")
    if g is not None and g.shape != (B, T, H):
        raise ValueError(f"delta_rule: g must be [B={B}, T={T}, H={H}] or None, got {tuple(g.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, v.shape[-1], Dk):
        raise ValueError(f"delta_rule: initial_state must be [B={B}, H={H}, Dv={v.shape[-1]}, Dk={Dk}], "
                         f"got {tuple(initial_state.shape)}")
    if reset is not None and (reset.shape != (B, T) or reset.dtype != torch.bool):
        raise ValueError(f"delta_rule: reset must be a bool tensor [B={B}, T={T}] or None, "
                         f"got {reset.dtype} {tuple(reset.shape)}")


def _step(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, S: Tensor, reset: Tensor | None
          ) -> tuple[Tensor, Tensor]:
    """One token. q, k [B, H, Dk]; v [B, H, Dv]; beta, g [B, H]; S [B, H, Dv, Dk]; reset [B] -> (o [B, H, Dv], S)."""
    if reset is not None:
        # where, not multiply: a reset must cut the past off completely (also its gradient path).
        S = torch.where(reset[:, None, None, None], torch.zeros((), dtype=S.dtype, device=S.device), S)
    if g is not None:
        S = S * torch.exp(g)[..., None, None]
    err = v - torch.einsum("bhvk,bhk->bhv", S, k)                      # v_t − S' k_t
    S = S + beta[..., None, None] * err[..., :, None] * k[..., None, :]
    o = torch.einsum("bhvk,bhk->bhv", S, q)
    return o, S


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
               initial_state: Tensor | None = None, reset: Tensor | None = None, chunk_size: int = 64,
               scale: float | None = None, output_final_state: bool = True) -> tuple[Tensor, Tensor | None]:
    """Reference (gated) delta rule, one Python step per token.

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; beta [B, T, H]; g [B, T, H] log-decay (≤ 0) or None;
    initial_state [B, H, Dv, Dk] or None (zeros); reset bool [B, T] or None; scale multiplies q (default 1).
    chunk_size is accepted for signature compatibility and ignored.
    Returns o [B, T, H, Dv] in q's dtype and the final state [B, H, Dv, Dk] in float32 (None if not requested).
    """
    del chunk_size
    check_inputs(q, k, v, beta, g, initial_state, reset)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    cd = _compute_dtype(q)
    out_dtype = q.dtype
    q, k, v, beta = (x.to(cd) for x in (q, k, v, beta))
    g = g.to(cd) if g is not None else None
    if scale is not None:
        q = q * scale
    S = (initial_state.to(cd) if initial_state is not None
         else torch.zeros(B, H, Dv, Dk, dtype=cd, device=q.device))
    outs = []
    for t in range(T):
        o, S = _step(q[:, t], k[:, t], v[:, t], beta[:, t], None if g is None else g[:, t], S,
                     None if reset is None else reset[:, t])
        outs.append(o)
    o = torch.stack(outs, dim=1).to(out_dtype)
    return o, (S if output_final_state else None)  # S is float32 (float64 for float64 inputs)


def delta_rule_step(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, state: Tensor | None,
                    reset: Tensor | None = None, *, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """One decode step (T = 1), same maths as `delta_rule`.

    Either sequence layout: q, k [B, 1, H, Dk]; v [B, 1, H, Dv]; beta, g [B, 1, H]; reset [B, 1] -> o [B, 1, H, Dv],
    or squeezed: q, k [B, H, Dk]; v [B, H, Dv]; beta, g [B, H]; reset [B] -> o [B, H, Dv].
    state [B, H, Dv, Dk] or None (zeros). Returns (o in q's dtype, new state float32).
    """
    seq = q.dim() == 4
    if seq:
        if q.shape[1] != 1:
            raise ValueError(f"delta_rule_step: expects T=1, got q of shape {tuple(q.shape)}; use delta_rule")
        q, k, v, beta = q[:, 0], k[:, 0], v[:, 0], beta[:, 0]
        g = g[:, 0] if g is not None else None
        reset = reset[:, 0] if reset is not None else None
    if q.dim() != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2] or beta.shape != q.shape[:2]:
        raise ValueError(f"delta_rule_step: inconsistent shapes q {tuple(q.shape)} k {tuple(k.shape)} "
                         f"v {tuple(v.shape)} beta {tuple(beta.shape)}")
    B, H, Dk = q.shape
    Dv = v.shape[-1]
    cd = _compute_dtype(q)
    out_dtype = q.dtype
    q, k, v, beta = (x.to(cd) for x in (q, k, v, beta))
    if scale is not None:
        q = q * scale
    S = state.to(cd) if state is not None else torch.zeros(B, H, Dv, Dk, dtype=cd, device=q.device)
    if S.shape != (B, H, Dv, Dk):
        raise ValueError(f"delta_rule_step: state must be [B={B}, H={H}, Dv={Dv}, Dk={Dk}], got {tuple(S.shape)}")
    o, S = _step(q, k, v, beta, g.to(cd) if g is not None else None, S, reset)
    o = o.to(out_dtype)
    return (o[:, None] if seq else o), S
