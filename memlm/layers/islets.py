"""Islet injection (Oumnix): a bank of low-rank weight deltas, each with a key, picked at inference by similarity.

Notation: B batch, T tokens, D model width, an islet i = (key κ_i [D], deltas {module m: (A_i,m [r, I], B_i,m [O, r])},
scale σ_i), x [..., I] the input of module m, y its output, u [B, D] the input summary.

    u      = mean_t norm_f-hidden_t(prompt)        the base model's final hidden state averaged over the prompt
    pick   = argmax_i cos(u, κ_i)   if that cosine ≥ min_similarity, else no islet
    y_m   += σ_pick · (x A_pick,mᵀ) B_pick,mᵀ     for every module the picked islet has a delta for

Deltas are applied by forward hooks that are registered while the bank is attached: the base weights are never
written (``model.state_dict()`` is bit-identical with or without islets; tests check it). Islets are off in training
unless ``train_enabled`` is set. Saved beside the model as ``islets.safetensors`` (tensors ``<name>/<module>/A|B``
and ``<name>/key``) + ``islets.json`` (names, scales, ranks, base config hash), both written atomically.
An islet can be made from any LoRA adapter folder (``memlm finetune`` output) or from the model's WEAVE micro-LoRA.
"""
from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from memlm.errors import UserError
from memlm.io import atomic_write_bytes, atomic_write_text

__all__ = ["ISLETS_CONFIG", "ISLETS_WEIGHTS", "Islet", "IsletBank"]

ISLETS_WEIGHTS = "islets.safetensors"
ISLETS_CONFIG = "islets.json"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class Islet:
    """key [D]; deltas {module name: (A [r, I], B [O, r])}; scale σ."""

    name: str
    key: Tensor
    deltas: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.deltas.values()), default=0)


class IsletBank:
    """Islets for one model. ``attach()`` registers the hooks; ``use(name)`` / ``route(ids)`` choose the active one."""

    def __init__(self, model: nn.Module, *, min_similarity: float = 0.0, train_enabled: bool = False) -> None:
        self.model = model
        self.min_similarity = min_similarity
        self.train_enabled = train_enabled
        self.islets: dict[str, Islet] = {}
        self.active: str | None = None
        self._hooks: list = []
        self._attached = False

    # ------------------------------------------------------------------------------------------ bank edits
    def add(self, name: str, deltas: dict[str, tuple[Tensor, Tensor]], *, key: Tensor | None = None,
            key_ids: Tensor | None = None, scale: float = 1.0, replace: bool = False) -> Islet:
        """Add an islet; its key is ``key`` [D] or the summary of ``key_ids`` [T] / [B, T] (mean over rows)."""
        if not NAME_RE.match(name):
            raise UserError(f"islet name {name!r}: use 1-64 letters, digits, '_' or '-'")
        if name in self.islets and not replace:
            raise UserError(f"islet {name!r} already exists (remove it first)")
        if (key is None) == (key_ids is None):
            raise UserError("give exactly one of key (a vector) or key_ids (token ids summarised by the model)")
        mods = dict(self.model.named_modules())
        clean: dict[str, tuple[Tensor, Tensor]] = {}
        for m, (a, b) in deltas.items():
            mod = mods.get(m)
            if mod is None or not hasattr(mod, "in_features"):
                raise UserError(f"islet {name!r}: {m!r} is not a linear module of this model")
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != mod.in_features or b.shape[0] != mod.out_features \
                    or a.shape[0] != b.shape[1]:
                raise UserError(f"islet {name!r}: delta for {m} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                f"expected A [r, {mod.in_features}], B [{mod.out_features}, r]")
            w = mod.weight
            clean[m] = (a.detach().to(w.device, w.dtype).clone(), b.detach().to(w.device, w.dtype).clone())
        if key is None:
            key = self.summary(torch.as_tensor(key_ids).reshape(-1, torch.as_tensor(key_ids).shape[-1])).mean(0)
        d = self.model.config.d_model
        if key.shape != (d,):
            raise UserError(f"islet {name!r}: key must have shape [{d}], got {tuple(key.shape)}")
        isl = Islet(name, key.detach().float().cpu().clone(), clean, float(scale))
        self.islets[name] = isl
        if self._attached:
            self._rehook()
        return isl

    def add_from_adapter(self, name: str, adapter_dir: str | Path, **kw) -> Islet:
        """An islet from a LoRA adapter folder (adapter.safetensors + adapter.json, as ``memlm finetune`` writes)."""
        from safetensors.torch import load_file

        from memlm.layers.lora import ADAPTER_WEIGHTS, read_lora_config

        meta = read_lora_config(adapter_dir)
        try:
            t = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
        except Exception as e:  # noqa: BLE001 — safetensors raises several types on bad files
            raise UserError(f"{adapter_dir}: cannot read adapter weights ({e})") from None
        scaling = float(meta["alpha"]) / int(meta["rank"])
        mods = sorted({k.rsplit(".", 1)[0] for k in t})
        deltas = {m: (t[f"{m}.lora_A"], t[f"{m}.lora_B"] * scaling) for m in mods}
        return self.add(name, deltas, **kw)

    def add_from_micro_lora(self, name: str, **kw) -> Islet:
        """An islet holding the model's current WEAVE micro-LoRA (then ``disable_micro_lora`` to keep it only here)."""
        from memlm.layers.weave import micro_lora_state_dict

        t = micro_lora_state_dict(self.model)
        if not t:
            raise UserError("the model has no enabled micro-LoRA to turn into an islet")
        mods = sorted({k.rsplit(".", 1)[0] for k in t})
        return self.add(name, {m: (t[f"{m}.lora_A"], t[f"{m}.lora_B"]) for m in mods}, **kw)

    def remove(self, name: str) -> None:
        if name not in self.islets:
            raise UserError(f"no islet named {name!r}; have: {sorted(self.islets) or 'none'}")
        del self.islets[name]
        if self.active == name:
            self.active = None
        if self._attached:
            self._rehook()

    def list(self) -> list[dict]:
        return [{"name": i.name, "rank": i.rank, "scale": i.scale, "modules": sorted(i.deltas),
                 "parameters": sum(a.numel() + b.numel() for a, b in i.deltas.values())} for i in self.islets.values()]

    # ------------------------------------------------------------------------------------------ selection
    @torch.no_grad()
    def summary(self, ids: Tensor) -> Tensor:
        """ids [B, T] -> u [B, D]: the base model's final hidden state averaged over the tokens (islets off)."""
        prev, self.active = self.active, None
        try:
            dev = next(self.model.parameters()).device
            hidden, _ = self.model(torch.as_tensor(ids, dtype=torch.long, device=dev), update=False, return_hidden=True)
        finally:
            self.active = prev
        return hidden.float().mean(1)

    def scores(self, ids: Tensor) -> dict[str, Tensor]:
        """Cosine similarity [B] of each islet's key with the summary of ids [B, T]."""
        u = self.summary(ids)
        return {n: F.cosine_similarity(u, i.key.to(u.device)[None], dim=-1) for n, i in self.islets.items()}

    def select(self, ids: Tensor) -> str | None:
        """The islet whose key best matches the mean summary of ids [B, T] (or [T]), or None below min_similarity."""
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
        if not self.islets:
            return None
        sc = {n: float(s.mean()) for n, s in self.scores(ids).items()}
        best = max(sc, key=sc.get)
        return best if sc[best] >= self.min_similarity else None

    def use(self, name: str | None) -> None:
        if name is not None and name not in self.islets:
            raise UserError(f"no islet named {name!r}; have: {sorted(self.islets) or 'none'}")
        self.active = name

    @contextlib.contextmanager
    def routed(self, ids: Tensor) -> Iterator[str | None]:
        """Attach, pick the islet for prompt ``ids`` and keep it active inside the block (yields its name)."""
        was_attached = self._attached
        self.attach()
        prev = self.active
        try:
            self.active = self.select(ids)
            yield self.active
        finally:
            self.active = prev
            if not was_attached:
                self.detach()

    # ------------------------------------------------------------------------------------------ hooks
    def attach(self) -> IsletBank:
        if not self._attached:
            self._rehook()
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._attached = [], False

    def _rehook(self) -> None:
        self.detach()
        mods = dict(self.model.named_modules())
        names = sorted({m for i in self.islets.values() for m in i.deltas})
        self._hooks = [mods[m].register_forward_hook(self._hook(m)) for m in names]
        self._attached = True

    def _hook(self, module_name: str):
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
            if self.active is None or (mod.training and not self.train_enabled):
                return None
            isl = self.islets[self.active]
            d = isl.deltas.get(module_name)
            if d is None:
                return None
            a, b = d
            return out + F.linear(F.linear(args[0], a.to(out.dtype)), b.to(out.dtype)) * isl.scale
        return hook

    # ------------------------------------------------------------------------------------------ persistence
    def save(self, model_dir: str | Path) -> Path:
        """Write islets.safetensors + islets.json into ``model_dir`` (beside model.safetensors)."""
        model_dir = Path(model_dir)
        tensors, meta = {}, []
        for i in self.islets.values():
            tensors[f"{i.name}/key"] = i.key.contiguous()
            for m, (a, b) in i.deltas.items():
                tensors[f"{i.name}/{m}/A"] = a.detach().cpu().contiguous()
                tensors[f"{i.name}/{m}/B"] = b.detach().cpu().contiguous()
            meta.append({"name": i.name, "scale": i.scale, "modules": sorted(i.deltas), "rank": i.rank})
        cfg = getattr(self.model, "config", None)
        header = {"format": "memlm-islets", "version": 1, "base_config_hash": cfg.config_hash() if cfg else "",
                  "min_similarity": self.min_similarity, "islets": meta}
        atomic_write_bytes(model_dir / ISLETS_WEIGHTS, st_save(tensors) if tensors else st_save({}))
        atomic_write_text(model_dir / ISLETS_CONFIG, json.dumps(header, indent=2))
        return model_dir

    @classmethod
    def load(cls, model: nn.Module, model_dir: str | Path, **kw) -> IsletBank:
        """The bank saved beside a model (an empty bank when there is none). Refuses islets made for another model."""
        model_dir = Path(model_dir)
        f = model_dir / ISLETS_CONFIG
        if not f.exists():
            return cls(model, **kw)
        try:
            header = json.loads(f.read_text())
            tensors = st_load((model_dir / ISLETS_WEIGHTS).read_bytes())
        except (OSError, ValueError) as e:
            raise UserError(f"{model_dir}: cannot read islets ({e})") from None
        except Exception as e:  # noqa: BLE001 — safetensors raises several types on bad files
            raise UserError(f"{model_dir / ISLETS_WEIGHTS}: corrupt islets file ({e})") from None
        if header.get("format") != "memlm-islets":
            raise UserError(f"{f}: not a memlm islets file")
        cfg = getattr(model, "config", None)
        if cfg is not None and header.get("base_config_hash") != cfg.config_hash():
            raise UserError(f"{f}: islets were made for another model (config hash {header.get('base_config_hash')}, "
                            f"this model has {cfg.config_hash()})")
        bank = cls(model, min_similarity=kw.pop("min_similarity", header.get("min_similarity", 0.0)), **kw)
        try:
            for e in header["islets"]:
                n = e["name"]
                deltas = {m: (tensors[f"{n}/{m}/A"], tensors[f"{n}/{m}/B"]) for m in e["modules"]}
                bank.add(n, deltas, key=tensors[f"{n}/key"], scale=float(e["scale"]))
        except KeyError as e:
            raise UserError(f"{model_dir}: islets file is missing tensor {e}") from None
        return bank
