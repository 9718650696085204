"""CMS — the continuum memory system feed-forward (Nested Learning; SPEC.md, Onyx): a chain of MLP levels that
learn at different speeds.

Notation: B batch, T tokens, D model width, F hidden width of a level, ℓ level index (0-based), L number of levels,
f_ℓ the update period of level ℓ (optimizer steps), t the 1-based optimizer step, g_t a level parameter's gradient
at step t, A its gradient accumulator, η learning rate.

Forward (our choice of chaining, documented in docs/training.md): a residual chain

    h_0 = x;   d_ℓ = MLP_ℓ(h_ℓ),  h_{ℓ+1} = h_ℓ + d_ℓ;   y = Σ_ℓ d_ℓ  (= h_L − x)

with each MLP_ℓ a SwiGLU. Nested Learning writes y = MLP_fL(… MLP_f1(x)); the residual form keeps every level
optional (a level whose output projection is zero is the identity), which is what function-preserving growth
and stable online learning need. The Block adds y to the residual stream like any other MLP.

Update schedule: level ℓ is updated only at steps t with t mod f_ℓ = 0, with the SUM of its gradients since its
last update. ``gate_gradients(t)`` implements it as a gradient gate the trainer calls after clipping and before
``optimizer.step()``: on other steps A ← A + g_t and the gradient is removed (``p.grad = None``: AdamW, Lion,
Muon and M3 then skip the parameter entirely — no moment update, no weight decay); on the f-th step
p.grad ← A + g_t and A ← 0. Accumulators are persistent buffers (``acc_*``), so checkpoints carry them and a
resumed run continues bit-for-bit. Chunking an FFN over the sequence is not CMS and is not done here.

Online learning (chat with ``learning`` on): ``cms_online_step`` takes one SGD step
θ ← θ − η ∇ CE(next token) on the FAST levels only (smallest period, or those named), from the conversation
ids the caller passes every C tokens; ``cms_snapshot`` / ``cms_deltas`` / ``apply_cms_deltas`` move the learned
change in and out of a session's persistent state.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.errors import UserError
from memlm.layers.mlp import SwiGLU

__all__ = [
    "CMS",
    "DEFAULT_ONLINE_EVERY",
    "DEFAULT_ONLINE_LR",
    "CMSLevel",
    "apply_cms_deltas",
    "cms_deltas",
    "cms_gate_gradients",
    "cms_modules",
    "cms_online_params",
    "cms_online_step",
    "cms_snapshot",
]

# Defaults for chat-time online learning (the session decides; these are what docs/training.md recommends).
DEFAULT_ONLINE_LR = 1e-4  # SGD learning rate: small, the fast levels drift slowly away from the trained weights
DEFAULT_ONLINE_EVERY = 256  # C: tokens of conversation between online steps


def _acc_name(param_name: str) -> str:
    return "acc_" + param_name.replace(".", "_")


class CMSLevel(SwiGLU):
    """One CMS level: a SwiGLU (x [B, T, D] → [B, T, D]) with update period ``period`` and, when period > 1, one
    gradient accumulator buffer per parameter (``acc_w_in_weight`` … same shape and dtype as the parameter)."""

    def __init__(self, d_model: int, d_ff: int, period: int, *, bias: bool = False) -> None:
        super().__init__(d_model, d_ff, bias=bias)
        if period < 1:
            raise ValueError(f"CMS period={period} must be ≥ 1")
        self.period = period
        if period > 1:
            for name, p in list(self.named_parameters()):
                self.register_buffer(_acc_name(name), torch.zeros_like(p, requires_grad=False))

    def grad_pairs(self) -> list[tuple[str, nn.Parameter, Tensor]]:
        """(parameter name, parameter, accumulator) for every parameter of the level (period > 1 only)."""
        if self.period == 1:
            return []
        return [(n, p, getattr(self, _acc_name(n))) for n, p in self.named_parameters()]


class CMS(nn.Module):
    """Chain of ``len(periods)`` SwiGLU levels (see the module docstring); x [B, T, D] → y [B, T, D]."""

    def __init__(self, d_model: int, d_ff: int, periods: Sequence[int], *, bias: bool = False) -> None:
        super().__init__()
        if not periods:
            raise ValueError("CMS needs at least one level")
        self.levels = nn.ModuleList(CMSLevel(d_model, d_ff, int(f), bias=bias) for f in periods)

    @property
    def periods(self) -> tuple[int, ...]:
        return tuple(lvl.period for lvl in self.levels)

    def forward(self, x: Tensor) -> Tensor:
        h, y = x, None
        for lvl in self.levels:
            d = lvl(h)
            y = d if y is None else y + d  # summed directly (not h_L − x) so that no cancellation error creeps in
            h = h + d
        return y

    @torch.no_grad()
    def gate_gradients(self, step: int) -> None:
        """Apply the update schedule for optimizer step ``step`` (1-based; call after clipping, before step())."""
        for lvl in self.levels:
            update = step % lvl.period == 0
            for _, p, acc in lvl.grad_pairs():
                if update:
                    if p.grad is None:
                        p.grad = acc.clone()
                    else:
                        p.grad.add_(acc)
                    acc.zero_()
                elif p.grad is not None:
                    acc.add_(p.grad)
                    p.grad = None


def make_cms(d_model: int, d_ff: int, *, bias: bool, model_cfg) -> CMS:
    """The CMS of one block from the model config (cms_levels, cms_d_ff; d_ff is the block's default width)."""
    width = getattr(model_cfg, "cms_d_ff", 0) or d_ff
    return CMS(d_model, width, list(getattr(model_cfg, "cms_levels", [1, 4, 16])), bias=bias)


# --------------------------------------------------------------------------------------------------- model-level API

def cms_modules(model: nn.Module) -> list[tuple[str, CMS]]:
    """(module name, CMS) for every CMS feed-forward in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CMS)]


def cms_gate_gradients(model: nn.Module, step: int) -> None:
    """Gate every CMS level's gradient for optimizer step ``step`` (1-based). A no-op for models without CMS."""
    for _, m in cms_modules(model):
        m.gate_gradients(step)


def cms_online_params(model: nn.Module, levels: Iterable[int] | None = None) -> list[tuple[str, nn.Parameter]]:
    """Parameters that learn online: of each CMS, the levels with index in ``levels`` (None: the fastest ones,
    i.e. every level whose period equals that CMS's smallest period)."""
    out = []
    for mname, m in cms_modules(model):
        fastest = min(m.periods)
        chosen = [i for i, f in enumerate(m.periods) if f == fastest] if levels is None else list(levels)
        for i in chosen:
            if not 0 <= i < len(m.levels):
                raise UserError(f"CMS online levels {list(chosen)}: {mname} has only {len(m.levels)} levels")
            out += [(f"{mname}.levels.{i}.{n}", p) for n, p in m.levels[i].named_parameters()]
    return out


def cms_online_step(model: nn.Module, ids: Tensor | Sequence[int], *, lr: float = DEFAULT_ONLINE_LR,
                    levels: Iterable[int] | None = None, state=None, max_grad_norm: float | None = 1.0) -> float:
    """One online-learning step on the conversation ``ids`` ([T] or [B, T], T ≥ 2): next-token cross-entropy, then
    plain SGD θ ← θ − lr·g on the fast CMS levels only (every other weight is left bit-identical).

    ``state``: an optional ModelState to read from (detached; memories are not written back). The gradient is
    clipped to ``max_grad_norm`` (None: no clip) so one odd turn cannot wreck the level. Works in eval mode and
    under an outer ``torch.no_grad()``. Returns the loss before the step. The caller decides when (every C tokens).
    """
    params = cms_online_params(model, levels)
    if not params:
        raise UserError("online CMS learning needs a model with mlp='cms'")
    dev = params[0][1].device
    x = torch.as_tensor(ids, dtype=torch.long, device=dev)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"cms_online_step needs ids [T] or [B, T] with T ≥ 2, got shape {tuple(x.shape)}")
    with torch.enable_grad():
        logits, _ = model(x[:, :-1], None if state is None else state.detach(), update=False)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, [p for _, p in params])
    with torch.no_grad():
        if max_grad_norm is not None:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            scale = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            grads = [g * scale.to(g.dtype) for g in grads]
        for (_, p), g in zip(params, grads):
            p.add_(g, alpha=-lr)
    return float(loss.detach())


def cms_snapshot(model: nn.Module, levels: Iterable[int] | None = None) -> dict[str, Tensor]:
    """Copies of the online-learnable CMS parameters (the base that ``cms_deltas`` subtracts)."""
    return {n: p.detach().clone() for n, p in cms_online_params(model, levels)}


def cms_deltas(model: nn.Module, base_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """{name: θ_now − θ_base} for every CMS parameter named in ``base_state_dict`` (a ``cms_snapshot`` or a full
    model state_dict — only CMS level parameters are taken from it). Computed in float32, on CPU, contiguous:
    ready for safetensors."""
    params = dict(model.named_parameters())
    cms_names = {f"{mn}.levels.{i}.{n}" for mn, m in cms_modules(model) for i, lvl in enumerate(m.levels)
                 for n, _ in lvl.named_parameters()}
    out = {}
    for name, base in base_state_dict.items():
        if name in cms_names:
            out[name] = (params[name].detach().float() - base.to(params[name].device).float()).cpu().contiguous()
    return out


@torch.no_grad()
def apply_cms_deltas(model: nn.Module, deltas: dict[str, Tensor]) -> None:
    """θ ← θ + δ for each delta (on a model holding the base weights the deltas were taken against).

    Raises UserError naming the first parameter that does not exist or whose shape differs (deltas made for
    another model); nothing is changed in that case.
    """
    params = dict(model.named_parameters())
    cms_names = {f"{mn}.levels.{i}.{n}" for mn, m in cms_modules(model) for i, lvl in enumerate(m.levels)
                 for n, _ in lvl.named_parameters()}
    for name, d in deltas.items():
        if name not in cms_names:
            raise UserError(f"CMS delta {name!r} does not name a CMS parameter of this model")
        if tuple(d.shape) != tuple(params[name].shape):
            raise UserError(f"CMS delta {name!r} has shape {tuple(d.shape)}, the model's is "
                            f"{tuple(params[name].shape)}")
    for name, d in deltas.items():
        p = params[name]
        p.copy_((p.float() + d.to(p.device).float()).to(p.dtype))
