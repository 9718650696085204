"""Normalisation layers: RMSNorm and LayerNorm, picked by name."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · w, computed in float32 for stability. x: [..., D]."""

    def __init__(self, dim: int, eps: float = 1e-6, *, weight: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: Tensor) -> Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return y * self.weight.to(x.dtype) if self.weight is not None else y


def make_norm(kind: str, dim: int, eps: float = 1e-5, *, bias: bool = True) -> nn.Module:
    """``kind`` in {"rmsnorm", "layernorm"}; ``bias`` applies to LayerNorm only."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    raise ValueError(f"norm={kind!r} not allowed; allowed: ['rmsnorm', 'layernorm']")
