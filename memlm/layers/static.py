"""Static decode mode: one-token steps with fixed state shapes, the prerequisite of a CUDA-graph captured step.

Notation: B batch, L slots of a static KV buffer (``max_len`` for full attention, the window W for a ring).

Inside ``static_decode()``, a mixer whose class sets ``static_decode = True`` promises, for a call with T = 1:
- every state tensor keeps its shape, dtype and device (attention writes its KV buffer in place at the token's
  slot; other layers return new tensors of the old shapes, which ``memlm.inference.static`` copies back);
- no host synchronisation (``.item()``, ``bool(tensor)``, ``nonzero``, shapes that depend on values), so that one
  step is one fixed sequence of kernels whatever the tokens.
Outside the mode nothing changes. Mixers may define ``static_state(state, max_len)`` (dynamic -> static layout,
e.g. a full-attention KV cache grown to ``max_len`` slots; default: the state itself) and ``compact_state(state)``
(back to the dynamic layout, dropping unused slots; default: the state itself). A static state is also a valid
dynamic state (empty slots carry kpos = −1 and are masked), only larger.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

__all__ = ["in_static_decode", "no_host_sync", "static_decode"]

# A threading.local (not a ContextVar): torch.compile traces attribute reads of it without a graph break.
_LOCAL = threading.local()


def in_static_decode() -> bool:
    """True inside ``static_decode()`` (on this thread)."""
    return getattr(_LOCAL, "on", False)


def no_host_sync() -> bool:
    """True where a forward must not read the device (``bool(tensor)``, ``.item()``): while torch.compile traces it,
    or while a CUDA graph captures it (a training step under ``train.cuda_graph``). Code that would skip work after
    such a read does the work unconditionally there."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


@contextlib.contextmanager
def static_decode(on: bool = True) -> Iterator[None]:
    """Run the enclosed model calls as static one-token steps (see the module docstring)."""
    old = in_static_decode()
    _LOCAL.on = on
    try:
        yield
    finally:
        _LOCAL.on = old
