"""Selective diagonal state-space scan (Mamba-2 / SSD): the token-by-token reference (the specification).

Notation (per batch row b and head h):
  T tokens, H heads, P channels per head, N state size, G groups of B/C (G divides H), R = H // G heads per group
  x_t ∈ R^P       input of head h at token t
  dt_t > 0        input-dependent step size (the caller applies softplus)
  A_h < 0         learned decay rate; a_t = exp(dt_t · A_h) ∈ (0, 1] is the decay at token t
  B_t, C_t ∈ R^N  input / output projections, shared by the R heads of a group (head h uses group h // R)
  D_h             skip weight
  h_t ∈ R^{P×N}   state:  h_t = a_t h_{t-1} + dt_t · x_t B_tᵀ,   y_t = h_t C_t + D_h x_t
  reset[b, t]     the state is zeroed before token t (a new document starts at t)

Computation is float32 (float64 when x is float64, which lets tests use gradcheck); y comes back in x's dtype and
the final state in the compute dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ssm_scan_reference", "check_ssm_inputs", "compute_dtype"]


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs (exact checks), float32 for everything else (fp32/bf16/fp16)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_ssm_inputs(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                     initial_state: Tensor | None, reset: Tensor | None) -> tuple[int, int, int, int, int, int]:
    """Validate shapes; return (batch, T, H, P, G, N). Raises ValueError naming the offending argument."""
    if x.dim() != 4:
        raise ValueError(f"ssm_scan: x must be [B, T, H, P], got shape {tuple(x.shape)}")
    b, t, h, p = x.shape
    if t < 1:
        raise ValueError("ssm_scan: need at least one token (T >= 1)")
    if tuple(dt.shape) != (b, t, h):
        raise ValueError(f"ssm_scan: dt must be [B, T, H] = {(b, t, h)}, got {tuple(dt.shape)}")
    if tuple(A.shape) != (h,):
        raise ValueError(f"ssm_scan: A must be [H] = {(h,)}, got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, t):
        raise ValueError(f"ssm_scan: B must be [B, T, G, N] with B, T = {(b, t)}, got {tuple(B.shape)}")
    g, n = B.shape[2], B.shape[3]
    if h % g != 0:
        raise ValueError(f"ssm_scan: groups G={g} of B/C must divide heads H={h}")
    if tuple(C.shape) != (b, t, g, n):
        raise ValueError(f"ssm_scan: C must have B's shape {(b, t, g, n)}, got {tuple(C.shape)}")
    if D is not None and tuple(D.shape) != (h,):
        raise ValueError(f"ssm_scan: D must be [H] = {(h,)} or None, got {tuple(D.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, p, n):
        raise ValueError(f"ssm_scan: initial_state must be [B, H, P, N] = {(b, h, p, n)}, "
                         f"got {tuple(initial_state.shape)}")
    if reset is not None and (tuple(reset.shape) != (b, t) or reset.dtype != torch.bool):
        raise ValueError(f"ssm_scan: reset must be a bool tensor [B, T] = {(b, t)}, "
                         f"got {reset.dtype} {tuple(reset.shape)}")
    return b, t, h, p, g, n


def ssm_scan_reference(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, *,
                       initial_state: Tensor | None = None, reset: Tensor | None = None,
                       chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Token loop over the recurrence. chunk_size is accepted for signature parity and ignored.

    x [B, T, H, P], dt [B, T, H], A [H], B/C [B, T, G, N], D [H] | None, initial_state [B, H, P, N] | None,
    reset bool [B, T] | None  ->  (y [B, T, H, P] in x.dtype, final_state [B, H, P, N] float32).
    """
    bsz, t_len, h, p, g, n = check_ssm_inputs(x, dt, A, B, C, D, initial_state, reset)
    cd = compute_dtype(x)
    r = h // g
    xf, dtf, af = x.to(cd), dt.to(cd), A.to(cd)
    bh = B.to(cd).repeat_interleave(r, dim=2)  # [B, T, H, N]
    ch = C.to(cd).repeat_interleave(r, dim=2)
    state = x.new_zeros(bsz, h, p, n, dtype=cd) if initial_state is None else initial_state.to(cd)
    ys = []
    # unbind once: x[:, t] inside the loop would make autograd allocate a full [B, T, ...] zero gradient per token
    steps = zip(xf.unbind(1), dtf.unbind(1), bh.unbind(1), ch.unbind(1))
    for t, (x_t, dt_t, b_t, c_t) in enumerate(steps):
        if reset is not None:
            # where, not a multiply: a non-finite state before a reset must not leak into the new document
            state = torch.where(reset[:, t, None, None, None], 0.0, state)
        a = torch.exp(dt_t * af)  # [B, H]
        u = dt_t[..., None] * x_t  # [B, H, P]
        state = a[:, :, None, None] * state + u[..., None] * b_t[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, c_t))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D.to(cd)[:, None] * xf
    return y.to(x.dtype), state
