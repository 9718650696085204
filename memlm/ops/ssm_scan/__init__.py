"""Selective diagonal state-space scan (Mamba-2 / SSD).

Notation: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_tᵀ,  y_t = h_t C_t + D x_t  (reference.py has the legend).

Backends of op "ssm_scan" (see memlm.ops.dispatch): "chunked" (default, priority 0) and "reference" (token loop,
by name only). `ssm_scan(...)` resolves the backend per call; `ssm_step` is the T=1 decode path. NOTES.md has the maths.
"""
from __future__ import annotations

from torch import Tensor

from memlm.ops import dispatch

from .chunked import ssm_scan_chunked, ssm_step
from .reference import ssm_scan_reference

__all__ = ["ssm_scan", "ssm_scan_chunked", "ssm_scan_reference", "ssm_step"]

dispatch.register("ssm_scan", "chunked", ssm_scan_chunked, priority=0)
dispatch.register("ssm_scan", "reference", ssm_scan_reference, priority=-1)


def ssm_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, *,
             initial_state: Tensor | None = None, reset: Tensor | None = None, chunk_size: int = 64,
             backend: str | None = None) -> tuple[Tensor, Tensor]:
    """x [B, T, H, P], dt [B, T, H], A [H], B/C [B, T, G, N], D [H] | None, initial_state [B, H, P, N] | None,
    reset bool [B, T] | None  ->  (y [B, T, H, P] in x.dtype, final_state [B, H, P, N] float32).

    `backend` names one explicitly; otherwise dispatch decides (force_backend / MEMLM_BACKEND_SSM_SCAN / automatic).
    """
    return dispatch.call("ssm_scan", x, dt, A, B, C, D, backend=backend, initial_state=initial_state, reset=reset,
                         chunk_size=chunk_size)
