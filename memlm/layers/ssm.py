"""Selective state-space mixer, Mamba-2 style (Dao & Gu 2024, "Transformers are SSMs"), over ``memlm.ops.ssm_scan``.

Notation: B batch, T tokens, D model width, E = expand·D inner width, H = E / P heads of P channels, N state size,
G groups sharing B/C, K conv kernel, W_* learned projections.

    z, xBC, dt_raw = split(W_in x)                    one projection: E + (E + 2GN) + H outputs
    x, B, C       = split(SiLU(conv_K(xBC)))          short causal depthwise conv over x, B and C together
    dt            = softplus(dt_raw + dt_bias) > 0     input-dependent step per head
    A             = −exp(A_log) < 0                    one decay rate per head (scalar × identity, SSD)
    h_t           = exp(dt_t A) h_{t−1} + dt_t x_t B_tᵀ,   y_t = h_t C_t + D ⊙ x_t     (ops.ssm_scan)
    out           = W_out RMSNorm(y ⊙ SiLU(z))        gated RMSNorm over E

State (``SSMState``): conv cache [B, K−1, E + 2GN] (the last K−1 conv inputs, model dtype) and ssm [B, H, P, N]
float32. A reset zeroes h before the document's first token (inside the op) and the conv never mixes documents.
Training and prefill use the chunked SSD scan; a single token (T = 1) takes the recurrent ``ssm_step`` — the same
recurrence, so decode performs exactly the writes training did.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.layers.base import LayerState, Mixer, MixerConfig, register_mixer
from memlm.layers.shortconv import ShortConv
from memlm.ops.ssm_scan import ssm_scan, ssm_step

__all__ = ["SSM", "SSMConfig", "SSMState"]


@dataclass(kw_only=True)
class SSMConfig(MixerConfig):
    kind: str = "ssm"
    expand: float = 2.0  # E = expand · D
    head_dim: int = 64  # P; E must be a multiple of it
    d_state: int = 64  # N
    n_groups: int = 1  # G (B/C shared by H / G heads)
    conv_size: int = 4  # K
    chunk_size: int = 64  # SSD chunk length
    dt_min: float = 0.001  # softplus(dt_bias) is initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    a_min: float = 1.0  # A = −exp(A_log) initialised uniform in [−a_max, −a_min]
    a_max: float = 16.0
    backend: str | None = None  # ssm_scan backend; None: dispatch decides

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("expand", "head_dim", "d_state", "n_groups", "conv_size", "chunk_size", "dt_min", "a_min"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not self.dt_min <= self.dt_max or not self.a_min <= self.a_max:
            raise ValueError(f"need dt_min ≤ dt_max and a_min ≤ a_max (got {self.dt_min}, {self.dt_max}, "
                             f"{self.a_min}, {self.a_max})")


@dataclass(frozen=True)
class SSMState(LayerState):
    """conv: [B, K−1, E + 2GN] (model dtype); ssm: [B, H, P, N] float32."""

    conv: Tensor
    ssm: Tensor


@register_mixer("ssm", SSMConfig)
class SSM(Mixer):
    """Mamba-2 mixer x [B, T, D] -> [B, T, D] with a (conv cache, SSM state) state."""

    custom_init = True
    static_decode = True  # T = 1 keeps every state shape and never syncs (layers/static.py)

    def __init__(self, cfg: SSMConfig, model_cfg, layer_idx: int) -> None:
        super().__init__(cfg, model_cfg, layer_idx)
        d = model_cfg.d_model
        self.e = round(cfg.expand * d)
        if self.e % cfg.head_dim:
            raise ValueError(f"ssm: inner width expand·d_model = {self.e} must be a multiple of head_dim="
                             f"{cfg.head_dim}")
        self.p, self.n, self.g = cfg.head_dim, cfg.d_state, cfg.n_groups
        self.h = self.e // self.p
        if self.h % self.g:
            raise ValueError(f"ssm: n_groups={self.g} must divide the number of heads {self.h}")
        self.conv_dim = self.e + 2 * self.g * self.n
        self.in_proj = nn.Linear(d, self.e + self.conv_dim + self.h, bias=False)
        self.conv = ShortConv(self.conv_dim, cfg.conv_size, bias=True, activation="silu")
        self.A_log = nn.Parameter(torch.zeros(self.h))
        self.dt_bias = nn.Parameter(torch.zeros(self.h))
        self.D = nn.Parameter(torch.ones(self.h))
        self.norm_weight = nn.Parameter(torch.ones(self.e))
        self.out_proj = nn.Linear(self.e, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Mamba-2's initialisation: heads start with different memory lengths (A and dt spread log-uniformly).
        c = self.cfg
        with torch.no_grad():
            self.A_log.copy_(torch.log(torch.empty(self.h).uniform_(c.a_min, c.a_max)))
            dt = torch.exp(torch.empty(self.h).uniform_(math.log(c.dt_min), math.log(c.dt_max))).clamp_min(1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.D.fill_(1.0)
            self.norm_weight.fill_(1.0)
        self.conv.reset_parameters()

    def init_state(self, batch_size: int, *, device=None) -> SSMState:
        device = device or self.param_device()
        conv = self.conv.init_cache(batch_size, device=device, dtype=self.in_proj.weight.dtype)
        ssm = torch.zeros(batch_size, self.h, self.p, self.n, device=device, dtype=torch.float32)
        return SSMState(conv=conv, ssm=ssm)

    def forward(self, x: Tensor, state: SSMState | None = None, *, reset: Tensor | None = None,
                update: bool = True) -> tuple[Tensor, SSMState]:
        """x [B, T, D]; reset bool [B, T] | None -> (y [B, T, D], new state)."""
        bsz, t_len, _ = x.shape
        if state is None:
            state = self.init_state(bsz, device=x.device)
        z, xbc, dt = self.in_proj(x).split([self.e, self.conv_dim, self.h], dim=-1)
        xbc, conv_cache = self.conv(xbc, state.conv, reset)
        xs, b, c = xbc.split([self.e, self.g * self.n, self.g * self.n], dim=-1)
        xs = xs.reshape(bsz, t_len, self.h, self.p)
        b = b.reshape(bsz, t_len, self.g, self.n)
        c = c.reshape(bsz, t_len, self.g, self.n)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # [B, T, H], float32: tiny steps must not round to 0
        A = -torch.exp(self.A_log.float())
        if t_len == 1:
            y, h = ssm_step(xs, dt, A, b, c, self.D, state.ssm, reset)
        else:
            y, h = ssm_scan(xs, dt, A, b, c, self.D, initial_state=state.ssm, reset=reset,
                            chunk_size=self.cfg.chunk_size, backend=self.cfg.backend)
        y = y.reshape(bsz, t_len, self.e) * F.silu(z)
        y = F.rms_norm(y.float(), (self.e,), eps=1e-6).to(x.dtype) * self.norm_weight.to(x.dtype)
        out = self.out_proj(y)
        if not update:
            return out, state
        return out, SSMState(conv=conv_cache.to(state.conv.dtype), ssm=h.float())
