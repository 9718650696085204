"""A tiny backend registry for ops: every op (e.g. "delta_rule") has named backends with one signature.

Resolution order in `get(op, backend=None, args=..., kwargs=...)`:
  1. `backend` passed explicitly (a layer config that names one);
  2. the innermost `force_backend(op, name)` context (tests);
  3. the environment variable `MEMLM_BACKEND_<OP>` (op upper-cased, non-alphanumerics as `_`), e.g.
     `MEMLM_BACKEND_DELTA_RULE=reference`;
  4. automatic: the registered backends in order of decreasing `priority` (ties: registration order), the
     first whose `supports(*args, **kwargs)` (and `auto`, when registered with one) is true. `supports=None` means "supports everything".
A backend picked by name (1–3) must exist and must support the arguments; otherwise a clear error is raised
instead of silently falling back, so that a test forcing "triton" never quietly tests "chunked".

Convention: the PyTorch "chunked" form registers at priority 0 (CPU default), the token loop "reference" at a
negative priority (only by name), Triton kernels later at a positive priority with a CUDA/shape `supports`.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from memlm.scoped import Scoped

__all__ = ["Backend", "backends", "call", "env_var", "force_backend", "get", "named", "on_cuda", "register",
           "unregister"]


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., Any]
    supports: Callable[..., bool] | None
    priority: int
    order: int  # registration counter, breaks priority ties
    auto: Callable[..., bool] | None = None  # extra condition for the automatic choice only (None: none)

    def accepts(self, args: tuple, kwargs: dict) -> bool:
        return True if self.supports is None else bool(self.supports(*args, **kwargs))

    def auto_accepts(self, args: tuple, kwargs: dict) -> bool:
        # the auto condition first: it is cheap, and lets a call without arguments skip a backend whose supports needs them
        return (self.auto is None or bool(self.auto(*args, **kwargs))) and self.accepts(args, kwargs)


_REGISTRY: dict[str, dict[str, Backend]] = {}
_counter = 0
# op -> backend name, per thread so that concurrent tests/threads do not see each other's forcing; a Scoped value
# (not a ContextVar) so that compiled models resolve backends without a graph break. Holds an immutable mapping (a
# fresh dict per scope, never mutated), default None = nothing forced.
_FORCED = Scoped()


def _forced() -> dict[str, str]:
    return _FORCED.get() or {}


def env_var(op_name: str) -> str:
    """Name of the environment variable that selects a backend for op_name. String methods only, no `re`: the
    dispatch runs inside compiled forwards, and Dynamo breaks the graph on the regex module's constants."""
    return "MEMLM_BACKEND_" + "".join(c if c.isascii() and c.isalnum() else "_" for c in op_name).upper()


def register(op_name: str, backend_name: str, fn: Callable[..., Any], supports: Callable[..., bool] | None = None,
             *, priority: int = 0, replace: bool = False, auto: Callable[..., bool] | None = None) -> None:
    """Register fn as backend `backend_name` of `op_name`. Re-registering a name needs replace=True.
    auto: a further condition for the automatic choice only; e.g. Triton kernels accept CPU tensors under the
    Triton interpreter (tests name them), but only CUDA tensors should pick them automatically."""
    global _counter
    table = _REGISTRY.setdefault(op_name, {})
    if backend_name in table and not replace:
        if table[backend_name].fn is fn:  # idempotent re-import
            return
        raise ValueError(f"backend {backend_name!r} of op {op_name!r} is already registered (use replace=True)")
    _counter += 1
    table[backend_name] = Backend(backend_name, fn, supports, priority, _counter, auto)


def on_cuda(*args: Any, **kwargs: Any) -> bool:
    """An `auto` condition: the first argument is a CUDA tensor (False without arguments). No `bool(args)`: Dynamo
    cannot trace bool() of a tuple, and this runs inside compiled forwards (it broke every compiled CUDA graph at
    each dispatch of a Triton op, found by the CUDA graph-break test)."""
    return len(args) > 0 and getattr(args[0], "is_cuda", False) is True


def unregister(op_name: str, backend_name: str) -> None:
    """Remove a backend (tests). Unknown names are ignored."""
    _REGISTRY.get(op_name, {}).pop(backend_name, None)


def backends(op_name: str) -> list[str]:
    """Backend names of op_name in automatic-selection order."""
    table = _REGISTRY.get(op_name, {})
    return [b.name for b in sorted(table.values(), key=lambda b: (-b.priority, b.order))]


def _lookup(op_name: str, name: str, source: str) -> Backend:
    table = _REGISTRY.get(op_name)
    if not table:
        raise KeyError(f"no backends registered for op {op_name!r}")
    if name not in table:
        raise KeyError(f"unknown backend {name!r} for op {op_name!r} (from {source}); "
                       f"registered: {', '.join(backends(op_name))}")
    return table[name]


def named(op_name: str) -> str | None:
    """The backend forced for op_name (``force_backend``, then the environment variable), or None (automatic)."""
    if op_name in _forced():
        return _forced()[op_name]
    return os.environ.get(env_var(op_name)) or None


def get(op_name: str, backend: str | None = None, *, args: tuple = (), kwargs: dict | None = None
        ) -> Callable[..., Any]:
    """Return the function implementing op_name for these arguments (see module docstring for the order)."""
    kwargs = kwargs or {}
    named: tuple[str, str] | None = None
    if backend is not None:
        named = (backend, "argument")
    elif op_name in _forced():
        named = (_forced()[op_name], "force_backend")
    elif os.environ.get(env_var(op_name)):
        named = (os.environ[env_var(op_name)], env_var(op_name))
    if named is not None:
        b = _lookup(op_name, *named)
        if not b.accepts(args, kwargs):
            raise ValueError(f"backend {b.name!r} of op {op_name!r} (from {named[1]}) does not support these inputs")
        return b.fn
    table = _REGISTRY.get(op_name)
    if not table:
        raise KeyError(f"no backends registered for op {op_name!r}")
    for name in backends(op_name):
        if table[name].auto_accepts(args, kwargs):
            return table[name].fn
    raise ValueError(f"no backend of op {op_name!r} supports these inputs (tried {', '.join(backends(op_name))})")


def call(op_name: str, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
    """Resolve with the actual arguments and call: `call("delta_rule", q, k, v, beta, g=g)`."""
    return get(op_name, backend, args=args, kwargs=kwargs)(*args, **kwargs)


@contextlib.contextmanager
def force_backend(op_name: str, backend_name: str) -> Iterator[None]:
    """Within the block, `get(op_name)` without an explicit backend returns backend_name (validated on entry)."""
    _lookup(op_name, backend_name, "force_backend")
    with _FORCED.scope({**_forced(), op_name: backend_name}):
        yield
