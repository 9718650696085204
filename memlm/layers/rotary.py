"""Rotary position embeddings: RoPE (with a partial fraction of each head rotated) and XPOS.

Notation: n query position, m key position (positions inside the document), d rotated width, i frequency index.
RoPE rotates pairs (x_i, x_{i+d/2}) by angle n·θ_i with θ_i = base^{-2i/d}. XPOS (Sun et al. 2022) also scales
queries by ζ_i^{n/s} and keys by ζ_i^{-m/s}, ζ_i = (2i/d + 0.4)/1.4, s = scale_base (512): scores then depend on
n − m only and decay with distance.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Rotary(nn.Module):
    def __init__(self, head_dim: int, *, base: float = 10000.0, fraction: float = 1.0, xpos: bool = False,
                 scale_base: float = 512.0) -> None:
        super().__init__()
        rot = int(head_dim * fraction)
        rot -= rot % 2
        if rot <= 0:
            raise ValueError(f"rope_fraction={fraction} rotates no dimension of a head of {head_dim}")
        self.rot = rot
        self.xpos = xpos
        self.scale_base = scale_base
        inv_freq = base ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        zeta = (torch.arange(0, rot, 2, dtype=torch.float64) / rot + 0.4) / 1.4
        self.register_buffer("log_zeta", zeta.log().float(), persistent=False)

    def _rotate(self, x: Tensor, pos: Tensor, sign: float) -> Tensor:
        """x: [B, H, T, Dh]; pos: [B, T] positions inside the document."""
        ang = pos[:, None, :, None].float() * self.inv_freq  # [B, 1, T, rot/2]
        cos, sin = ang.cos(), ang.sin()
        if self.xpos:
            scale = torch.exp(sign * pos[:, None, :, None].float() / self.scale_base * self.log_zeta)
            cos, sin = cos * scale, sin * scale
        xr, xp = x[..., : self.rot].float(), x[..., self.rot:]
        x1, x2 = xr.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out

    def forward(self, q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """q: [B, Hq, T, Dh], k: [B, Hk, T, Dh], pos: [B, T] -> rotated (q, k)."""
        if q.shape[2] == 1 and not self.xpos and q.dtype == k.dtype:
            # decode: a step is launch-bound, so rotate [q; k] once (angles computed once; the same numbers)
            return self._rotate(torch.cat([q, k], dim=1), pos, 1.0).split([q.shape[1], k.shape[1]], dim=1)
        return self._rotate(q, pos, 1.0), self._rotate(k, pos, -1.0)
