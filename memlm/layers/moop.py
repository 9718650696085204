"""Mixture of operators (MoOp, Oumnix): a per-token top-k router over a list of causal sequence operators.

Notation: B batch, T tokens, D model width, n operators, k = top_k, W_r [n, D] the router, τ a token.

    r_τ   = W_r x_τ  (float32 logits),  π_τ = softmax(r_τ)
    K_τ   = the k largest entries of r_τ,   g_τ,i = softmax_{K_τ}(r_τ)_i for i ∈ K_τ, else 0   (renormalised top-k)
    y_τ   = Σ_i g_τ,i · op_i(x)_τ

Every operator runs on every token (dense compute, sparse mixing): each keeps its own state (nested in
``MoOpState``) and must see every token, or a later token routed to it would read a state with holes — and prefill,
decode and any chunking would disagree. The router is per token, so the mixture is as causal as its operators.

Auxiliary losses (reported with ``add_aux_loss``, added to the training loss by the trainer):
    balance = w_b · n · Σ_i f_i P_i     (Switch Transformer; f_i = share of the k·B·T assignments going to i,
                                          P_i = mean router probability of i; 1·w_b when perfectly balanced)
    z       = w_z · mean_τ (logsumexp r_τ)²   (router z-loss, ST-MoE: keeps logits small)
Router share per operator f_i is reported with ``add_metric`` as ``moop{layer}/share{i}_{kind}``.

``model.moop_off=true`` (the ablation switch) replaces the router by the fixed uniform mean of all operators.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from memlm.layers.base import (
    LayerState,
    Mixer,
    MixerConfig,
    add_aux_loss,
    add_metric,
    aux_active,
    build_mixer,
    register_mixer,
)
from memlm.layers.conv import ConvConfig
from memlm.layers.sparse_attention import GlobalAttentionConfig, LocalAttentionConfig
from memlm.layers.ssm import SSMConfig

__all__ = ["MAX_OPERATORS", "MoOp", "MoOpConfig", "MoOpState", "default_operators"]

MAX_OPERATORS = 8


def default_operators() -> list[MixerConfig]:
    """The Oumnix set: causal local attention, strided global attention, selective SSM, causal depthwise conv."""
    return [LocalAttentionConfig(window=128), GlobalAttentionConfig(stride=64), SSMConfig(), ConvConfig()]


@dataclass(kw_only=True)
class MoOpConfig(MixerConfig):
    kind: str = "moop"
    operators: list[MixerConfig] = field(default_factory=default_operators)
    top_k: int = 2
    balance_weight: float = 0.01  # w_b (0 switches the load-balancing loss off)
    z_weight: float = 0.001  # w_z (0 switches the router z-loss off)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = len(self.operators)
        if not 1 <= n <= MAX_OPERATORS:
            raise ValueError(f"operators: {n} given; allowed 1 … {MAX_OPERATORS}")
        for i, op in enumerate(self.operators):
            if not isinstance(op, MixerConfig) or op.kind in ("moop", ""):
                raise ValueError(f"operators.{i}: must be a mixer config of another kind than moop, got {op!r}")
        if not 1 <= self.top_k <= n:
            raise ValueError(f"top_k={self.top_k} must be in [1, {n}] (the number of operators)")
        if self.balance_weight < 0 or self.z_weight < 0:
            raise ValueError(f"balance_weight={self.balance_weight} and z_weight={self.z_weight} must be ≥ 0")


@dataclass(frozen=True)
class MoOpState(LayerState):
    """op<i>: the state of operator i (None beyond the configured operators)."""

    op0: LayerState | None = None
    op1: LayerState | None = None
    op2: LayerState | None = None
    op3: LayerState | None = None
    op4: LayerState | None = None
    op5: LayerState | None = None
    op6: LayerState | None = None
    op7: LayerState | None = None

    def ops(self) -> list[LayerState | None]:
        return [getattr(self, f.name) for f in fields(self)]


@register_mixer("moop", MoOpConfig)
class MoOp(Mixer):
    """Top-k per-token mixture of causal operators x [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: MoOpConfig, model_cfg, layer_idx: int) -> None:
        super().__init__(cfg, model_cfg, layer_idx)
        self.ops = nn.ModuleList(build_mixer(op, model_cfg, layer_idx) for op in cfg.operators)
        self.kinds = [op.kind for op in cfg.operators]
        self.routed = not getattr(model_cfg, "moop_off", False)
        self.router = nn.Linear(model_cfg.d_model, len(self.ops), bias=False) if self.routed else None

    def init_state(self, batch_size: int, *, device=None) -> MoOpState:
        device = device or self.param_device()
        return MoOpState(**{f"op{i}": op.init_state(batch_size, device=device) for i, op in enumerate(self.ops)})

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, D] -> (gates [B, T, n] float32 with k non-zeros per token summing to 1, router logits, probs)."""
        logits = self.router(x).float()
        top, idx = logits.topk(self.cfg.top_k, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))
        return gates, logits, torch.softmax(logits, dim=-1)

    def forward(self, x: Tensor, state: MoOpState | None = None, *, reset: Tensor | None = None,
                update: bool = True) -> tuple[Tensor, MoOpState]:
        """x [B, T, D]; reset bool [B, T] | None -> (y [B, T, D], new state)."""
        if state is None:
            state = self.init_state(x.shape[0], device=x.device)
        ys, new = [], {}
        for i, (op, s) in enumerate(zip(self.ops, state.ops())):
            y, new[f"op{i}"] = op(x, s, reset=reset, update=update)
            ys.append(y)
        y_all = torch.stack(ys, dim=2)  # [B, T, n, D]
        if not self.routed:
            return y_all.mean(dim=2), MoOpState(**new) if update else state
        gates, logits, probs = self.gates(x)
        out = torch.einsum("btn,btnd->btd", gates.to(y_all.dtype), y_all)
        if aux_active():
            self._report(gates, logits, probs)
        return out, MoOpState(**new) if update else state

    def _report(self, gates: Tensor, logits: Tensor, probs: Tensor) -> None:
        n, k = len(self.ops), self.cfg.top_k
        share = (gates > 0).float().flatten(0, 1).mean(0) / k  # f_i, sums to 1
        if self.cfg.balance_weight > 0:
            p_mean = probs.flatten(0, 1).mean(0)
            add_aux_loss("moop_balance", self.cfg.balance_weight * n * (share * p_mean).sum())
        if self.cfg.z_weight > 0:
            add_aux_loss("moop_z", self.cfg.z_weight * torch.logsumexp(logits, dim=-1).pow(2).mean())
        for i, kind in enumerate(self.kinds):
            add_metric(f"moop{self.layer_idx}/share{i}_{kind}", share[i].detach())
