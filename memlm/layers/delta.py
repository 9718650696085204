"""DeltaNet and Gated DeltaNet mixers (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule";
Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks").

Notation: B batch, T tokens, D model width, H heads, K key head width, V value head width, S state [V, K] per head.

    q, k, v = SiLU(conv(W_q x)), SiLU(conv(W_k x)), SiLU(conv(W_v x))     short causal depthwise conv, kernel 4
    q, k    = q / ‖q‖, k / ‖k‖                                          (L2 per head)
    β_t     = σ(W_β x_t)                                                 write strength per head
    g_t     = −exp(A_log) · softplus(W_a x_t + dt_bias)   (gated only)  α_t = exp(g_t) ∈ (0, 1)
    S_t     = α_t S_{t−1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ,  o_t = S_t q_t / √K   (memlm.ops.delta_rule)
    y_t     = W_o [ RMSNorm_head(o_t) ⊙ SiLU(W_g x_t) ]

State (``DeltaState``): conv cache [B, 3, H(2K+V)] (last inputs of the q/k/v convs) and S [B, H, V, K] float32.
A reset clears S at the document start (inside the op) and the conv never mixes tokens across it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.layers.base import LayerState, Mixer, MixerConfig, register_mixer
from memlm.layers.norm import RMSNorm
from memlm.layers.shortconv import ShortConv
from memlm.ops.delta_rule import delta_rule, delta_rule_step


@dataclass(kw_only=True)
class DeltaNetConfig(MixerConfig):
    kind: str = "deltanet"
    n_heads: int | None = None  # None: the model's n_heads
    head_dim: int | None = None  # key head width K; None: d_model // n_heads
    expand_v: float = 1.0  # value head width V = expand_v · K
    conv_size: int = 4  # short conv kernel; 0 switches the conv off
    chunk_size: int = 64  # chunk length C of the chunkwise-parallel delta rule
    output_gate: bool = True
    backend: str | None = None  # delta_rule backend name; None: dispatch decides

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.conv_size < 0 or self.chunk_size < 1 or self.expand_v <= 0:
            raise ValueError(f"conv_size={self.conv_size} must be ≥ 0, chunk_size={self.chunk_size} ≥ 1, "
                             f"expand_v={self.expand_v} > 0")


@dataclass(kw_only=True)
class GatedDeltaNetConfig(DeltaNetConfig):
    kind: str = "gated_deltanet"
    decay_min: float = 0.001  # dt_bias is initialised so that softplus(dt_bias) is log-uniform in [min, max]
    decay_max: float = 0.1


@dataclass(frozen=True)
class DeltaState(LayerState):
    """conv: [B, conv_size−1, H(2K+V)] (x dtype); S: [B, H, V, K] float32."""

    conv: Tensor
    S: Tensor


class DeltaNet(Mixer):
    """Delta-rule fast-weight mixer x [B, T, D] -> [B, T, D]; ``gated`` adds the Mamba-2 style decay α."""

    gated = False
    custom_init = True
    static_decode = True  # T = 1 keeps every state shape and never syncs (layers/static.py)

    def __init__(self, cfg: DeltaNetConfig, model_cfg, layer_idx: int) -> None:
        super().__init__(cfg, model_cfg, layer_idx)
        d = model_cfg.d_model
        self.h = cfg.n_heads or model_cfg.n_heads
        self.dk = cfg.head_dim or d // self.h
        self.dv = round(cfg.expand_v * self.dk)
        self.dims = (self.h * self.dk, self.h * self.dk, self.h * self.dv)
        self.qkv = nn.Linear(d, sum(self.dims), bias=False)
        self.conv = ShortConv(sum(self.dims), cfg.conv_size) if cfg.conv_size > 0 else None
        self.b_proj = nn.Linear(d, self.h, bias=True)
        if self.gated:
            self.a_proj = nn.Linear(d, self.h, bias=False)
            self.A_log = nn.Parameter(torch.zeros(self.h))
            self.dt_bias = nn.Parameter(torch.zeros(self.h))
        self.g_proj = nn.Linear(d, self.h * self.dv, bias=False) if cfg.output_gate else None
        self.o_norm = RMSNorm(self.dv)
        self.o_proj = nn.Linear(self.h * self.dv, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # β starts near 0.5 (b_proj bias 0). Decay as in Mamba-2: A ∈ [1, 16] per head, softplus(dt_bias) ∈ [dt_min,
        # dt_max] log-uniformly, so heads start with different memory lengths.
        nn.init.zeros_(self.b_proj.bias)
        if self.gated:
            with torch.no_grad():
                self.A_log.copy_(torch.log(torch.empty(self.h).uniform_(1.0, 16.0)))
                lo, hi = math.log(self.cfg.decay_min), math.log(self.cfg.decay_max)
                dt = torch.exp(torch.empty(self.h).uniform_(lo, hi)).clamp_min(1e-4)
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # inverse softplus

    def init_state(self, batch_size: int, *, device=None) -> DeltaState:
        device = device or self.param_device()
        k = max(self.cfg.conv_size - 1, 0)
        conv = torch.zeros(batch_size, k, sum(self.dims), device=device, dtype=self.qkv.weight.dtype)
        S = torch.zeros(batch_size, self.h, self.dv, self.dk, device=device, dtype=torch.float32)
        return DeltaState(conv=conv, S=S)

    def forward(self, x: Tensor, state: DeltaState | None = None, *, reset: Tensor | None = None,
                update: bool = True) -> tuple[Tensor, DeltaState]:
        """x [B, T, D]; reset bool [B, T] -> (y [B, T, D], new state)."""
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, device=x.device)
        qkv = self.qkv(x)
        conv_cache = state.conv
        if self.conv is not None:
            qkv, conv_cache = self.conv(qkv, state.conv, reset)
        else:
            qkv = F.silu(qkv)
        q, k, v = qkv.split(self.dims, dim=-1)
        # autocast runs the norm in float32; back to v's (the autocast) dtype, so that bf16 training reaches the
        # delta rule in bf16 (its fused Triton path takes half-precision q, k, v). β and g stay float32.
        q = F.normalize(q.view(B, T, self.h, self.dk), dim=-1).to(v.dtype)
        k = F.normalize(k.view(B, T, self.h, self.dk), dim=-1).to(v.dtype)
        v = v.view(B, T, self.h, self.dv)
        beta = torch.sigmoid(self.b_proj(x).float())
        g = None
        if self.gated:
            g = -torch.exp(self.A_log.float()) * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        if T == 1 and self.cfg.backend is None:
            # decode: the recurrence once (a handful of kernels), not the chunked machinery on a chunk of one
            o, S = delta_rule_step(q, k, v, beta.to(q.dtype), None if g is None else g.to(q.dtype), state.S, reset,
                                   scale=self.dk ** -0.5)
        else:
            o, S = delta_rule(q, k, v, beta, g, initial_state=state.S, reset=reset,
                              chunk_size=self.cfg.chunk_size, scale=self.dk ** -0.5, backend=self.cfg.backend)
        o = self.o_norm(o)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(x)).view(B, T, self.h, self.dv)
        y = self.o_proj(o.reshape(B, T, self.h * self.dv))
        if not update:
            return y, state
        return y, DeltaState(conv=conv_cache, S=S)


register_mixer("deltanet", DeltaNetConfig)(DeltaNet)


@register_mixer("gated_deltanet", GatedDeltaNetConfig)
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet: the delta rule with a data-dependent decay α_t = exp(g_t) (Mamba-2 parametrisation)."""

    gated = True
