"""The mixer contract (DESIGN.md §2): ``Mixer``, ``MixerConfig`` and ``LayerState``.

Every sequence mixer maps ``x [B, T, D]`` and an optional ``LayerState`` to ``(y [B, T, D], new_state)``:

- ``state=None`` means a fresh state (the learned initial state where the layer has one);
- ``reset[b, t]`` marks the first token of a new document inside a packed row: the state restarts there;
- ``update=False`` reads memory without writing; it is independent of ``module.training``;
- chunk invariance and causality are laws, checked for every mixer by ``tests/test_contract.py``.

States are frozen dataclasses whose fields are tensors (batch first), ``None`` or nested states. They are
registered as pytrees so ``torch.compile`` and ``torch.utils._pytree`` see through them.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from memlm.config.base import Config, check_choice
from memlm.scoped import Scoped

# --------------------------------------------------------------------------------------------- state


class LayerState:
    """Base of all layer states. Subclasses are ``@dataclass(frozen=True)`` with Tensor / None / LayerState fields.

    Every tensor field has the batch dimension first.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(
            cls,
            lambda s: ([getattr(s, f.name) for f in dataclasses.fields(s)], type(s)),
            lambda values, ctx: ctx(*values),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        )

    # -- generic tree helpers
    def map(self, fn: Callable[[Tensor], Tensor]) -> "LayerState":
        """Apply ``fn`` to every tensor (recursively), keeping None and structure."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, LayerState):
                out[f.name] = v.map(fn)
            elif isinstance(v, Tensor):
                out[f.name] = fn(v)
            else:
                out[f.name] = v
        return type(self)(**out)

    def tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """Flat ``name -> tensor`` view (nested states joined with '.')."""
        out: dict[str, Tensor] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, LayerState):
                out.update(v.tensors(f"{prefix}{f.name}."))
            elif isinstance(v, Tensor):
                out[f"{prefix}{f.name}"] = v
        return out

    def detach(self) -> "LayerState":
        return self.map(lambda t: t.detach())

    def to(self, device: torch.device | str | None = None) -> "LayerState":
        return self.map(lambda t: t.to(device))

    def select(self, idx: Tensor | list[int] | int | slice) -> "LayerState":
        """Rows ``idx`` of the batch (an int keeps the batch dimension)."""
        if isinstance(idx, int):
            idx = [idx]
        return self.map(lambda t: t[idx])

    def repeat(self, n: int) -> "LayerState":
        """Each row repeated ``n`` times (row b becomes rows b·n … b·n+n−1)."""
        return self.map(lambda t: t.repeat_interleave(n, dim=0))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        return self.tensors(prefix)

    def load_tensors(self, tensors: dict[str, Tensor], prefix: str = "") -> "LayerState":
        """A state of the same structure with tensors taken from ``tensors`` (shapes may differ, e.g. cache length)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            name = f"{prefix}{f.name}"
            if isinstance(v, LayerState):
                out[f.name] = v.load_tensors(tensors, name + ".")
            elif isinstance(v, Tensor):
                if name not in tensors:
                    raise KeyError(name)
                t = tensors[name]
                if t.dim() != v.dim() or t.dtype != v.dtype:
                    raise ValueError(f"{name}: saved {t.dtype}{tuple(t.shape)} does not fit {v.dtype}{tuple(v.shape)}")
                out[f.name] = t.to(v.device)
            else:
                out[f.name] = v
        return type(self)(**out)


@dataclass(frozen=True)
class EmptyState(LayerState):
    """State of a mixer that remembers nothing beyond its input."""


def cat_states(states: list[LayerState]) -> LayerState:
    """Concatenate states of the same structure along the batch (for batching sessions)."""
    first = states[0]
    names = list(first.tensors())
    joined = {n: torch.cat([s.tensors()[n] for s in states], dim=0) for n in names}
    return first.load_tensors(joined)


# ----------------------------------------------------------------------------------- aux losses / metrics

_AUX = Scoped()  # not a ContextVar: torch.compile traces Scoped reads without a graph break


@contextlib.contextmanager
def collect_aux(step: int | Tensor | None = None) -> Iterator[dict]:
    """Collect auxiliary losses and metrics that mixers report during a forward pass.

    Yields ``{"losses": {name: Tensor}, "metrics": {name: float | Tensor}, "step": step, "step_tensor": ...}``;
    losses with the same name add up. ``step`` is the optimizer step, for losses whose weight follows a schedule
    (``current_step()``, or ``current_step_tensor()`` inside compiled code). A tensor ``step`` (a float64 scalar on
    the device, which a CUDA-graphed training step updates in place) is the step tensor itself; ``current_step()`` is
    then None, since reading it would synchronise.
    Outside this context, reports are dropped (so inference pays nothing).
    """
    tensor = isinstance(step, Tensor)
    box: dict = {"losses": {}, "metrics": {}, "step": None if tensor else step,
                 "step_tensor": step if tensor or step is None else torch.tensor(step, dtype=torch.float64)}
    with _AUX.scope(box):
        yield box


def add_aux_loss(name: str, value: Tensor) -> None:
    box = _AUX.get()
    if box is not None:
        box["losses"][name] = box["losses"].get(name, 0) + value


def add_metric(name: str, value: Any) -> None:
    box = _AUX.get()
    if box is not None:
        box["metrics"][name] = value


def current_step() -> int | None:
    """The training step given to ``collect_aux`` (None outside training)."""
    box = _AUX.get()
    return None if box is None else box.get("step")


def current_step_tensor() -> Tensor | None:
    """The same step as a float64 scalar tensor (None outside training): on the CPU, or on the device in a CUDA-graphed
    step. Schedules computed from it inside a compiled forward see a graph input, not a Python int that torch.compile
    would specialise (one recompile per step); in a CUDA graph, a tensor the replays read instead of a baked number.
    """
    box = _AUX.get()
    return None if box is None else box.get("step_tensor")


def aux_active() -> bool:
    return _AUX.get() is not None


# ---------------------------------------------------------------------------------------- positions


def stream_positions(pos: Tensor, doc_start: Tensor, reset: Tensor | None, T: int) -> tuple[Tensor, Tensor]:
    """Absolute stream positions and per-token document starts for a chunk of T tokens.

    pos, doc_start: [B] (tokens seen so far, position where the current document began); reset: [B, T] or None.
    Returns abs_pos [B, T] and doc_start_tok [B, T]; the position of a token inside its document is their difference.
    """
    abs_pos = pos[:, None] + torch.arange(T, device=pos.device)
    if reset is None:
        return abs_pos, doc_start[:, None].expand_as(abs_pos)
    starts = torch.where(reset, abs_pos, torch.full_like(abs_pos, -1))
    starts = torch.maximum(starts, doc_start[:, None])
    return abs_pos, torch.cummax(starts, dim=1).values


# --------------------------------------------------------------------------------------------- mixers


@dataclass(kw_only=True)
class MixerConfig(Config):
    """Base of per-layer configs. ``kind`` picks the mixer; ``mlp``/``d_ff`` override the model defaults for this block."""

    _kinds: ClassVar[dict[str, type] | None] = {}
    kind: str = ""
    mlp: str | None = None
    d_ff: int | None = None

    def __post_init__(self) -> None:
        if self.mlp is not None:
            check_choice("mlp", self.mlp, ("swiglu", "gelu", "none", "cms"))


class Mixer(nn.Module):
    """Base class of every sequence mixer (see the module docstring for the contract)."""

    def __init__(self, cfg: MixerConfig, model_cfg: Any, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.d_model = model_cfg.d_model

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None) -> LayerState:
        raise NotImplementedError

    def forward(self, x: Tensor, state: LayerState | None = None, *, reset: Tensor | None = None,
                update: bool = True) -> tuple[Tensor, LayerState]:
        raise NotImplementedError

    def param_device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")


MIXERS: dict[str, type[Mixer]] = {}


def register_mixer(kind: str, config_cls: type[MixerConfig]):
    """Class decorator registering a mixer module and its config under ``kind``."""

    def deco(cls: type[Mixer]) -> type[Mixer]:
        if kind in MIXERS:
            raise ValueError(f"mixer kind {kind!r} registered twice")
        MIXERS[kind] = cls
        MixerConfig._kinds[kind] = config_cls
        cls.kind = kind
        cls.config_cls = config_cls
        return cls

    return deco


def build_mixer(cfg: MixerConfig, model_cfg: Any, layer_idx: int) -> Mixer:
    if cfg.kind not in MIXERS:
        raise ValueError(f"unknown mixer kind {cfg.kind!r}; known: {sorted(MIXERS)}")
    return MIXERS[cfg.kind](cfg, model_cfg, layer_idx)
