"""WEAVE (Oumnix): linear layers factorised as W = U diag(s) Vᵀ of rank r, plus a switchable micro-LoRA.

Notation: I input width, O output width, r the WEAVE rank, U [O, r], s [r], V [I, r], b [O] an optional bias,
q the micro-LoRA rank, A [q, I], B [O, q], α its scale numerator, x [..., I].

    y = ((x V) ⊙ s) Uᵀ + b  [+ (α/q) · (x Aᵀ) Bᵀ   when micro-LoRA is enabled]

Parameters r(I + O + 1) instead of I·O. ``apply_weave`` replaces the chosen nn.Linear layers of a built model (the
config switch ``model.weave_rank`` / ``model.weave_targets``); each WeaveLinear starts at the dense layer's initial
Frobenius norm (so activations start at the dense scale); ``WeaveLinear.from_linear(lin, r, svd=True)`` converts a
trained dense layer into its best rank-r approximation instead.
Micro-LoRA is the adaptation path: ``enable_micro_lora`` adds A (Kaiming) and B (zeros: a fresh adapter changes
nothing) to every WeaveLinear and, by default, freezes everything else; ``disable_micro_lora`` drops it again.
It is not created at build time, so a model trained from scratch has no dead adapter parameters.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from fnmatch import fnmatch

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.errors import UserError

__all__ = ["WeaveLinear", "apply_weave", "disable_micro_lora", "enable_micro_lora", "micro_lora_state_dict",
           "weave_modules"]


class WeaveLinear(nn.Module):
    """x [..., I] -> [..., O] through U diag(s) Vᵀ (+ b) and an optional micro-LoRA."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"WEAVE rank={rank} must be ≥ 1")
        self.in_features, self.out_features = in_features, out_features
        self.rank = min(rank, in_features, out_features)
        kw = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, self.rank, **kw))
        self.s = nn.Parameter(torch.ones(self.rank, **kw))
        self.V = nn.Parameter(torch.empty(in_features, self.rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.lora_scaling = 0.0
        nn.init.normal_(self.U, 0.0, out_features ** -0.5)
        nn.init.normal_(self.V, 0.0, in_features ** -0.5)

    @classmethod
    def from_linear(cls, lin: nn.Linear, rank: int, *, svd: bool = False) -> WeaveLinear:
        """A WeaveLinear standing in for ``lin`` (bias copied).

        svd=False (a freshly initialised layer): random factors U ~ N(0, 1/O), V ~ N(0, 1/I) (nearly orthonormal
        columns) and s = ‖W‖_F / √r, so ‖U diag(s) Vᵀ‖_F ≈ ‖W‖_F — the dense layer's initial scale (including the
        smaller init of residual writers), without a factorisation. svd=True (a trained layer): the best rank-r
        approximation of W, its truncated SVD."""
        w = lin.weight.detach()
        m = cls(lin.in_features, lin.out_features, rank, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
        r = m.rank
        with torch.no_grad():
            if svd:
                u, sv, vh = torch.linalg.svd(w.float(), full_matrices=False)
                m.U.copy_(u[:, :r])
                m.s.copy_(sv[:r])
                m.V.copy_(vh[:r].T)
            else:
                m.U.normal_(0.0, m.out_features ** -0.5)
                m.V.normal_(0.0, m.in_features ** -0.5)
                m.s.copy_((w.float().norm() / math.sqrt(r)).expand(r))  # a tensor op: also works on "meta"
            if m.bias is not None:
                m.bias.copy_(lin.bias.detach())
        return m

    @property
    def weight(self) -> Tensor:
        """The dense equivalent U diag(s) Vᵀ [O, I] (micro-LoRA excluded); for code that reads .weight's dtype."""
        return (self.U * self.s) @ self.V.T

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(F.linear(x, self.V.T) * self.s, self.U, self.bias)
        if self.lora_A is not None:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scaling
        return y

    def extra_repr(self) -> str:
        q = 0 if self.lora_A is None else self.lora_A.shape[0]
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, micro_lora={q}"


def _matches(name: str, patterns: list[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch(name, p) or fnmatch(leaf, p) for p in patterns)


def apply_weave(model: nn.Module, rank: int, targets: Iterable[str]) -> list[str]:
    """Replace every nn.Linear of ``model`` whose name (or last name component) matches an fnmatch pattern in
    ``targets`` by a WeaveLinear of rank ``rank``; returns the replaced names. The LM head and embeddings are never
    touched (they are not nn.Linear inside blocks, or are excluded by name)."""
    patterns = [t for t in targets if t]
    chosen = [(n, m) for n, m in model.named_modules()
              if type(m) is nn.Linear and n != "head" and _matches(n, patterns)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear})
        raise UserError(f"weave_targets {patterns} match no linear layer; available names: {', '.join(leaves)}")
    for name, lin in chosen:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, WeaveLinear.from_linear(lin, rank))
    return [n for n, _ in chosen]


def weave_modules(model: nn.Module) -> dict[str, WeaveLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, WeaveLinear)}


def enable_micro_lora(model: nn.Module, rank: int = 4, alpha: float | None = None, *,
                      freeze_base: bool = True) -> list[str]:
    """Give every WeaveLinear a micro-LoRA of rank q = ``rank`` (scale α/q, α defaults to q); with ``freeze_base``
    only the micro-LoRA parameters keep requires_grad. Returns the module names."""
    mods = weave_modules(model)
    if not mods:
        raise UserError("the model has no WEAVE layers (set model.weave_rank > 0) to put a micro-LoRA on")
    if rank < 1:
        raise UserError(f"micro-LoRA rank={rank} must be ≥ 1")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for m in mods.values():
        w = m.U
        a = torch.empty(rank, m.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        m.lora_A = nn.Parameter(a)
        m.lora_B = nn.Parameter(torch.zeros(m.out_features, rank, device=w.device, dtype=w.dtype))
        m.lora_scaling = float(alpha if alpha is not None else rank) / rank
    return sorted(mods)


def disable_micro_lora(model: nn.Module, *, unfreeze: bool = True) -> None:
    """Remove every micro-LoRA (the base WEAVE weights were never changed by it)."""
    for m in weave_modules(model).values():
        m.lora_A = m.lora_B = None
        m.lora_scaling = 0.0
    if unfreeze:
        for p in model.parameters():
            p.requires_grad_(True)


def micro_lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """{"<module>.lora_A": [q, I], "<module>.lora_B": [O, q]} of every enabled micro-LoRA (scale folded into B)."""
    out = {}
    for n, m in weave_modules(model).items():
        if m.lora_A is not None:
            out[f"{n}.lora_A"] = m.lora_A.detach()
            out[f"{n}.lora_B"] = (m.lora_B * m.lora_scaling).detach()
    return out
