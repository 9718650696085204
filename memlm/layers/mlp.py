"""Feed-forward layers: SwiGLU and GELU MLPs (CMS, the continuum memory system, lives beside them later).

Shapes: x [B, T, D] -> [B, T, D]; F is the hidden width (d_ff).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    """y = W_down (silu(W_gate x) ⊙ W_up x); gate and up projections fused in one matmul."""

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = False) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * d_ff, bias=bias)
        self.w_out = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """y = W_2 gelu(W_1 x) (GPT-NeoX / Pythia)."""

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = True) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, d_ff, bias=bias)
        self.w_out = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(F.gelu(self.w_in(x)))


def make_mlp(kind: str, d_model: int, d_ff: int, *, bias: bool, model_cfg=None, layer_idx: int = 0) -> nn.Module | None:
    """Build the feed-forward of a block; ``model_cfg``/``layer_idx`` are for MLPs configured beyond width (CMS)."""
    if kind == "swiglu":
        return SwiGLU(d_model, d_ff, bias=bias)
    if kind == "gelu":
        return GeluMLP(d_model, d_ff, bias=bias)
    if kind == "none":
        return None
    if kind == "cms":  # continuum memory system (issue 6); imported here because cms.py builds on SwiGLU above
        from memlm.layers.cms import make_cms

        return make_cms(d_model, d_ff, bias=bias, model_cfg=model_cfg)
    raise ValueError(f"mlp={kind!r} not allowed; allowed: ['swiglu', 'gelu', 'none', 'cms']")
