"""Causal depthwise convolution mixer (a gated short/long conv, H3 / Hyena-lite style, without any attention).

Notation: B batch, T tokens, D model width, E = expand·D inner channels, K kernel width, W_* learned projections.

    v, g = split(W_in x)                                  (g only when gated)
    u_t  = SiLU(b + Σ_{j=0}^{K−1} w[:, K−1−j] ⊙ v_{t−j})   causal depthwise conv, left padding only
    y_t  = W_out (u_t ⊙ SiLU(g_t))                         (W_out u_t when not gated)

State (``ConvState``): the last K−1 conv inputs v [B, K−1, E], zeros when fresh. It is strictly causal (never centred
— seed defect 1), and a tap never reaches across a document reset (``memlm.layers.shortconv.causal_conv1d``), so a
packed row equals its documents run separately and the cache holds nothing of a finished document.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from memlm.layers.base import LayerState, Mixer, MixerConfig, register_mixer
from memlm.layers.shortconv import ShortConv

__all__ = ["ConvConfig", "ConvMixer", "ConvState"]


@dataclass(kw_only=True)
class ConvConfig(MixerConfig):
    kind: str = "conv"
    kernel_size: int = 4  # K: the token sees itself and K−1 before it
    expand: float = 1.0  # E = expand · D
    gated: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel_size < 1:
            raise ValueError(f"kernel_size={self.kernel_size} must be ≥ 1")
        if self.expand <= 0:
            raise ValueError(f"expand={self.expand} must be > 0")


@dataclass(frozen=True)
class ConvState(LayerState):
    """cache: [B, K−1, E] — the last K−1 conv inputs (model dtype)."""

    cache: Tensor


@register_mixer("conv", ConvConfig)
class ConvMixer(Mixer):
    """Gated causal depthwise conv mixer x [B, T, D] -> [B, T, D]."""

    custom_init = True
    static_decode = True  # T = 1 keeps every state shape and never syncs (layers/static.py)

    def __init__(self, cfg: ConvConfig, model_cfg, layer_idx: int) -> None:
        super().__init__(cfg, model_cfg, layer_idx)
        d = model_cfg.d_model
        self.e = max(1, round(cfg.expand * d))
        self.in_proj = nn.Linear(d, self.e * (2 if cfg.gated else 1), bias=False)
        self.conv = ShortConv(self.e, cfg.kernel_size, bias=True, activation="silu")
        self.out_proj = nn.Linear(self.e, d, bias=False)

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()

    def init_state(self, batch_size: int, *, device=None) -> ConvState:
        device = device or self.param_device()
        return ConvState(cache=self.conv.init_cache(batch_size, device=device, dtype=self.in_proj.weight.dtype))

    def forward(self, x: Tensor, state: ConvState | None = None, *, reset: Tensor | None = None,
                update: bool = True) -> tuple[Tensor, ConvState]:
        """x [B, T, D]; reset bool [B, T] | None -> (y [B, T, D], new state)."""
        if state is None:
            state = self.init_state(x.shape[0], device=x.device)
        h = self.in_proj(x)
        if self.cfg.gated:
            v, g = h.chunk(2, dim=-1)
        else:
            v, g = h, None
        u, cache = self.conv(v, state.cache, reset)
        if g is not None:
            u = u * F.silu(g)
        y = self.out_proj(u)
        if not update:
            return y, state
        return y, ConvState(cache=cache.to(state.cache.dtype))
