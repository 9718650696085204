"""ModelState: the per-layer states of a MemoryLM plus its stream position — what TBPTT, the engine, the session
store and ``memlm memory`` move around. Saved as safetensors with a JSON header (format version, config hash,
layer kinds, tokens seen); loading refuses a state made for another model.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from memlm.errors import UserError
from memlm.io import atomic_write_bytes
from memlm.layers.base import LayerState, cat_states

FORMAT_VERSION = 1
HEADER_KEY = "memlm_state"


@dataclass(frozen=True)
class ModelState:
    """layers: one state per block; pos, doc_start: [B] tokens seen and where the current document began.

    config_hash and kinds identify the model the state belongs to (static, not tensors).
    """

    layers: tuple[LayerState, ...]
    pos: Tensor
    doc_start: Tensor
    config_hash: str = ""
    kinds: tuple[str, ...] = ()

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def _map(self, fn) -> "ModelState":
        return ModelState(tuple(s.map(fn) for s in self.layers), fn(self.pos), fn(self.doc_start), self.config_hash,
                          self.kinds)

    def detach(self) -> "ModelState":
        return self._map(lambda t: t.detach())

    def to(self, device: torch.device | str) -> "ModelState":
        return self._map(lambda t: t.to(device))

    def clone(self) -> "ModelState":
        return self._map(lambda t: t.clone())

    def select(self, idx) -> "ModelState":
        if isinstance(idx, int):
            idx = [idx]
        return self._map(lambda t: t[idx])

    def repeat(self, n: int) -> "ModelState":
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def state_dict(self) -> dict[str, Tensor]:
        out = {"pos": self.pos, "doc_start": self.doc_start}
        for i, s in enumerate(self.layers):
            out.update(s.state_dict(f"layers.{i}."))
        return out

    def header(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "config_hash": self.config_hash, "kinds": list(self.kinds),
                "batch_size": self.batch_size, "tokens_seen": int(self.pos.max().item()) if self.pos.numel() else 0,
                "saved_at": time.time()}

    def to_bytes(self, extra_header: dict | None = None) -> bytes:
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        header = self.header() | (extra_header or {})
        return st_save(tensors, metadata={HEADER_KEY: json.dumps(header)})

    def save(self, path: str | Path, extra_header: dict | None = None) -> None:
        """Write atomically to ``path`` (safetensors + JSON header)."""
        atomic_write_bytes(path, self.to_bytes(extra_header))

    @staticmethod
    def read_header(data: bytes, where: str = "state") -> dict:
        """The JSON header of a saved state (raises UserError on anything that is not a memlm state)."""
        if len(data) < 8:
            raise UserError(f"{where}: file is truncated or empty")
        n = int.from_bytes(data[:8], "little")
        if n <= 0 or 8 + n > len(data):
            raise UserError(f"{where}: not a safetensors file or truncated")
        try:
            meta = json.loads(data[8: 8 + n]).get("__metadata__", {})
            header = json.loads(meta[HEADER_KEY])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{where}: not a memlm state file (no {HEADER_KEY} header)") from None
        return header

    @classmethod
    def from_bytes(cls, data: bytes, *, model, where: str = "state", device=None) -> "ModelState":
        header = cls.read_header(data, where)
        version = header.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UserError(f"{where}: state format version {version} is newer than this memlm supports "
                            f"({FORMAT_VERSION}); upgrade memlm")
        want = model._config_hash
        if header.get("config_hash") != want:
            raise UserError(f"{where}: state was saved for another model (config hash {header.get('config_hash')}, "
                            f"this model has {want}, kinds {list(header.get('kinds', []))})")
        try:
            tensors = st_load(data)
        except (SafetensorError, Exception) as e:  # safetensors raises several types on corrupt data
            raise UserError(f"{where}: corrupt state file ({e})") from None
        template = model.init_state(int(header["batch_size"]), device="cpu")
        try:
            layers = tuple(s.load_tensors(tensors, f"layers.{i}.") for i, s in enumerate(template.layers))
            state = cls(layers, tensors["pos"], tensors["doc_start"], template.config_hash, template.kinds)
        except (KeyError, ValueError) as e:
            raise UserError(f"{where}: state does not fit this model ({e})") from None
        return state.to(device or model_device(model))

    @classmethod
    def load(cls, path: str | Path, *, model, device=None) -> "ModelState":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"{path}: cannot read state ({e.strerror})") from None
        return cls.from_bytes(data, model=model, where=str(path), device=device)


def model_device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def cat_model_states(states: list[ModelState]) -> ModelState:
    """Join single-row (or any) states along the batch."""
    s0 = states[0]
    layers = tuple(cat_states([s.layers[i] for s in states]) for i in range(len(s0.layers)))
    return ModelState(layers, torch.cat([s.pos for s in states]), torch.cat([s.doc_start for s in states]),
                      s0.config_hash, s0.kinds)


pytree.register_pytree_node(
    ModelState,
    lambda s: ([s.layers, s.pos, s.doc_start], (s.config_hash, s.kinds)),
    lambda v, ctx: ModelState(tuple(v[0]), v[1], v[2], *ctx),
    serialized_type_name="memlm.models.state.ModelState",
)
