"""LoRA: low-rank adapters on chosen nn.Linear projections, trained alone, saved alone, merged and unmerged exactly.

Notation: W [O, I] the frozen base weight, A [r, I] and B [O, r] the adapter (r the rank), α the scale numerator,
s = α / r, x [..., I] the input.

    y = x Wᵀ + b + s · drop(x) Aᵀ Bᵀ          (A ~ Kaiming-uniform, B = 0: a fresh adapter changes nothing)
    merge:   W ← W + s · B A   (the original W is kept, so that unmerge restores it bit for bit)
    unmerge: W ← the kept original

``LoRALinear`` is an nn.Linear subclass that *shares* the wrapped layer's weight and bias Parameters, so module
paths and state-dict keys of the base (``…qkv.weight``) do not change and code reading ``layer.weight`` still works;
the adapter adds ``…qkv.lora_A`` / ``…qkv.lora_B``. Targets are fnmatch patterns matched against the full module
name or its last component ("qkv", "o_proj", "blocks.0.*", "*.mlp.*"). An adapter folder holds
``adapter.safetensors`` (only A and B) and ``adapter.json`` (rank, alpha, targets, dropout, module names and the
base model's config hash); ``load_lora`` refuses an adapter made for another base model.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from memlm.errors import UserError
from memlm.io import atomic_write_text

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
FORMAT_VERSION = 1

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoRALinear",
    "apply_lora",
    "load_lora",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "parse_targets",
    "read_lora_config",
    "remove_lora",
    "save_lora",
    "unmerge_lora",
]


class LoRALinear(nn.Linear):
    """nn.Linear (sharing the base layer's weight and bias) plus a rank-r adapter; x [..., I] → [..., O]."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's Parameters are reused, not reallocated
        if rank < 1:
            raise ValueError(f"LoRA rank={rank} must be ≥ 1")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the nn.Linear default, as in the LoRA paper's code
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._original: Tensor | None = None  # W before merge (exact unmerge)

    def delta_weight(self) -> Tensor:
        """s · B A  [O, I]."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self._original = self.weight.detach().clone()
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_(self._original)
        self._original = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def parse_targets(targets: str | Iterable[str]) -> list[str]:
    """'qkv,o_proj' or ['qkv', 'o_proj'] → ['qkv', 'o_proj'] (blank entries dropped)."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    out = [t.strip() for t in items if t and t.strip()]
    if not out:
        raise UserError("LoRA targets: give at least one module name pattern (e.g. 'qkv,o_proj')")
    return out


def _matches(name: str, patterns: list[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch(name, p) or fnmatch(leaf, p) for p in patterns)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: str | Iterable[str] = ("qkv", "o_proj"),
               dropout: float = 0.0, *, freeze_base: bool = True) -> list[str]:
    """Wrap every nn.Linear whose name matches ``targets`` in a LoRALinear; with ``freeze_base`` every other
    parameter gets requires_grad=False (only adapters train). Returns the wrapped module names.

    Raises UserError when no module matches (naming a few Linear modules that exist) or when LoRA is applied twice.
    """
    patterns = parse_targets(targets)
    if lora_modules(model):
        raise UserError("the model already has LoRA adapters")
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    chosen = [(n, m) for n, m in linears if _matches(n, patterns)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise UserError(f"LoRA targets {patterns} match no nn.Linear module; available names: {', '.join(leaves)}")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, lin in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoRALinear(lin, rank, alpha, dropout))
    model._lora_config = {"rank": rank, "alpha": float(alpha), "targets": patterns, "dropout": float(dropout)}
    return [n for n, _ in chosen]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors: {"<module>.lora_A": [r, I], "<module>.lora_B": [O, r]}."""
    out = {}
    for n, m in lora_modules(model).items():
        out[f"{n}.lora_A"] = m.lora_A.detach()
        out[f"{n}.lora_B"] = m.lora_B.detach()
    return out


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def remove_lora(model: nn.Module, *, merge: bool = True) -> None:
    """Replace every LoRALinear by a plain nn.Linear (weights merged when ``merge``): a model that saves and loads
    like the base (``save_pretrained`` of a fine-tuned model)."""
    for name, m in lora_modules(model).items():
        if merge:
            m.merge()
        else:
            m.unmerge()
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight, lin.bias = m.weight, m.bias
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, lin)
    if hasattr(model, "_lora_config"):
        del model._lora_config


def _base_hash(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return cfg.config_hash() if cfg is not None else ""


def save_lora(model: nn.Module, path: str | Path, *, extra: dict | None = None) -> Path:
    """Write ``path/adapter.safetensors`` (adapters only, unmerged values) and ``path/adapter.json``."""
    mods = lora_modules(model)
    if not mods:
        raise UserError("the model has no LoRA adapters to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    tmp = path / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "memlm_base_config_hash": _base_hash(model)})
    tmp.replace(path / ADAPTER_WEIGHTS)
    meta = {"format": "memlm-lora", "version": FORMAT_VERSION, **getattr(model, "_lora_config", {}),
            "modules": sorted(mods), "base_config_hash": _base_hash(model),
            "base_model": getattr(getattr(model, "config", None), "name", ""), **(extra or {})}
    atomic_write_text(path / ADAPTER_CONFIG, json.dumps(meta, indent=2))
    return path


def read_lora_config(path: str | Path) -> dict:
    path = Path(path)
    f = path / ADAPTER_CONFIG if path.is_dir() else path
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no {ADAPTER_CONFIG} (not a LoRA adapter folder)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{f}: cannot read adapter config ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "memlm-lora":
        raise UserError(f"{f}: not a memlm LoRA adapter config")
    return meta


def load_lora(model: nn.Module, path: str | Path, *, freeze_base: bool = True) -> dict:
    """Apply the adapter saved in ``path`` to ``model`` (its base): refuses, with one UserError line, an adapter
    made for another base model. Returns the adapter config."""
    path = Path(path)
    meta = read_lora_config(path)
    want, have = meta.get("base_config_hash", ""), _base_hash(model)
    if want != have:
        raise UserError(f"{path}: LoRA adapter was made for base model {meta.get('base_model') or '?'} "
                        f"(config hash {want}), not for this model (config hash {have})")
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except Exception as e:  # noqa: BLE001 — safetensors raises several types on bad files
        raise UserError(f"{path / ADAPTER_WEIGHTS}: cannot read adapter weights ({e})") from None
    modules = list(meta.get("modules", []))
    apply_lora(model, int(meta["rank"]), float(meta["alpha"]), [f"{m}" for m in modules] or meta["targets"],
               float(meta.get("dropout", 0.0)), freeze_base=freeze_base)
    model._lora_config = {k: meta[k] for k in ("rank", "alpha", "targets", "dropout") if k in meta}
    own = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    if set(own) != set(tensors):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise UserError(f"{path}: adapter tensors do not fit the model (missing {missing[:3]}, extra {extra[:3]})")
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            for part in ("lora_A", "lora_B"):
                src = tensors[f"{name}.{part}"]
                dst = getattr(m, part)
                if src.shape != dst.shape:
                    raise UserError(f"{path}: {name}.{part} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
                dst.copy_(src)
    return meta
