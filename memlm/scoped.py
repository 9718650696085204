"""``Scoped``: a per-thread value set for the duration of a ``with`` block, readable inside ``torch.compile``.

It replaces ``contextvars.ContextVar`` for the few ambient switches that code running inside the model reads
(auxiliary-loss collection, forced op backends, uncertainty collection, active episodic indexes): Dynamo cannot
trace ``ContextVar.get`` (every call is a graph break), but it traces attribute reads of a ``threading.local``
and guards on them, so a compiled graph is re-traced when the value changes kind (None ↔ set) and never breaks.
Scoping is per thread (as with ContextVar in threads; asyncio tasks of one thread share it).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Scoped"]


class Scoped:
    """``get()`` the current value (``default`` outside every ``scope``); ``with scope(v):`` sets it, restoring on exit."""

    def __init__(self, default: Any = None) -> None:
        self._local = threading.local()
        self._default = default

    def get(self) -> Any:
        return getattr(self._local, "value", self._default)

    @contextlib.contextmanager
    def scope(self, value: Any) -> Iterator[Any]:
        old = self.get()
        self._local.value = value
        try:
            yield value
        finally:
            self._local.value = old
