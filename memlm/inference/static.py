"""Static-shape decoding: a ModelState whose tensors keep their shapes and storage for a whole generation, updated
in place by one-token steps — the form a CUDA graph can capture (memlm.inference.cuda_graph).

Notation: B batch rows, V vocabulary, L static KV slots (``max_len``).

``to_static(model, state, max_len)`` copies a (dynamic) state into static layout: full-attention KV caches become
buffers of ``max_len`` slots, everything else keeps its (already fixed) shape. ``static_step`` runs the model on one
token per row under ``memlm.layers.static.static_decode()`` and copies the new state back into the same tensors
(attention writes its buffer in place, so nothing of size L is copied). ``compact(model, state)`` returns the
ordinary dynamic layout (for sessions, saving, further dynamic steps). The static path computes exactly what the
dynamic one does: tests pin them together token for token.

``static_unsupported(model)`` names the first layer without a static path (None if every layer has one); the engine
then decodes dynamically and logs that reason.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from memlm.layers.static import static_decode
from memlm.models.state import ModelState

__all__ = ["HostSyncError", "compact", "copy_state_", "forbid_host_sync", "static_step", "static_unsupported",
           "to_static"]


def static_unsupported(model) -> str | None:
    """Why ``model`` cannot decode with static states (None when it can)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "embed"):
        return f"{type(model).__name__} is not a MemoryLM"
    if getattr(model, "oumnix", None) is not None:
        return "the Oumnix switches (WEAVE, PFP, cells, exits) have no static decode path"
    for i, b in enumerate(blocks):
        m = getattr(b, "mixer", None)
        if not getattr(m, "static_decode", False):
            return f"layer {i} ({getattr(m, 'kind', type(m).__name__)}) has no static decode path"
    return None


def _storage(t: Tensor) -> int | None:
    return t.untyped_storage().data_ptr() if t.numel() else None


def to_static(model, state: ModelState, max_len: int) -> ModelState:
    """A copy of ``state`` in static layout with room for stream positions < ``max_len``. Never aliases ``state``."""
    why = static_unsupported(model)
    if why is not None:
        raise ValueError(f"static decoding is not available: {why}")
    layers = tuple(getattr(b.mixer, "static_state", lambda s, n: s)(s, max_len)
                   for b, s in zip(model.blocks, state.layers))
    out = ModelState(layers, state.pos, state.doc_start, state.config_hash, state.kinds)
    # every tensor must own its storage: in-place steps must never reach the caller's state or another field
    taken = {p for p in map(_storage, state.state_dict().values()) if p is not None}

    def own(t: Tensor) -> Tensor:
        p = _storage(t)
        if p is None:
            return t.contiguous()
        if p in taken or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        taken.add(_storage(t))
        return t

    return ModelState(tuple(s.map(own) for s in out.layers), own(out.pos), own(out.doc_start), out.config_hash,
                      out.kinds)


def compact(model, state: ModelState) -> ModelState:
    """The dynamic layout of a static state (unused KV slots dropped); tensors may be shared with ``state``."""
    layers = tuple(getattr(b.mixer, "compact_state", lambda s: s)(s) for b, s in zip(model.blocks, state.layers))
    return ModelState(layers, state.pos, state.doc_start, state.config_hash, state.kinds)


def copy_state_(dst: ModelState, src: ModelState) -> None:
    """Copy every tensor of ``src`` into the tensor of ``dst`` with the same name (skipping tensors that are the very
    same object). Shapes and dtypes must match: a static step must not change them."""
    d, s = dst.state_dict(), src.state_dict()
    if d.keys() != s.keys():
        raise RuntimeError(f"a static step changed the state's structure: {sorted(set(d) ^ set(s))[:4]}")
    pairs = [(d[n], t, n) for n, t in s.items() if not _same_memory(t, d[n])]
    for o, t, n in pairs:
        if t.shape != o.shape or t.dtype != o.dtype:
            raise RuntimeError(f"a static step changed state {n} from {o.dtype}{tuple(o.shape)} to "
                               f"{t.dtype}{tuple(t.shape)}")
    # a source that views a destination buffer must be read before that buffer is overwritten
    dst_mem = {p for p in (_storage(o) for o, _, _ in pairs) if p is not None}
    pairs = [(o, t.clone() if _storage(t) in dst_mem else t, n) for o, t, n in pairs]
    for o, t, _ in pairs:
        o.copy_(t)


def _same_memory(t: Tensor, o: Tensor) -> bool:
    """t is o, or a view of exactly o's elements (what a compiled in-place update hands back)."""
    return t is o or (t.data_ptr() == o.data_ptr() and t.shape == o.shape and t.stride() == o.stride()
                      and t.dtype == o.dtype and t.numel() > 0)


def static_step(model, tokens: Tensor, state: ModelState, forward=None) -> Tensor:
    """One token per row (tokens [B, 1] or [B]) through a static ``state``, updated in place -> logits [B, V].

    ``forward`` replaces ``model`` for the call (e.g. ``torch.compile(model)``): same signature and semantics."""
    with static_decode():
        logits, new = (model if forward is None else forward)(tokens.view(-1, 1), state)
    copy_state_(state, new)
    return logits[:, -1]


# ----------------------------------------------------------------------------------------- host-sync guard


class HostSyncError(RuntimeError):
    """An op that waits for the device (or makes a shape from values) ran where a fixed graph is required."""


_SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
             "repeat_interleave")


class forbid_host_sync(TorchDispatchMode):
    """Raise ``HostSyncError`` on ops that read tensor values on the host (``.item()``, ``bool(t)``, ``int(t)``) or
    whose output shape depends on values (``nonzero``, boolean indexing, ...): what a CUDA graph capture refuses.
    Works on CPU, where tests use it to check static steps. (``tolist()`` reads CPU memory directly and is not seen.)
    ``repeat_interleave`` is only an error with a tensor of repeats."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bad = name in _SYNC_OPS and not (name == "repeat_interleave" and not isinstance(args[1], Tensor))
        if name in ("index", "index_put", "index_put_"):   # boolean masks become nonzero() inside the kernel
            bad = any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if bad:
            raise HostSyncError(f"{func} synchronises with the host (not allowed in a static decode step)")
        return func(*args, **(kwargs or {}))


def fresh_view(state: ModelState) -> ModelState:
    """A new ModelState object over the same tensors (identity marks who last owned a set of buffers)."""
    return dataclasses.replace(state)
