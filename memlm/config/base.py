"""Config dataclasses: dict/JSON round trip and type-checked ``--set key.path=value`` overrides.

Every config is a keyword-only dataclass deriving from :class:`Config`. Fields may be plain scalars, other
configs, lists of configs, or *polymorphic* configs: a field annotated with a registry base class
(e.g. ``MixerConfig``) whose concrete class is chosen by the ``kind`` key in the dict.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin

from memlm.errors import UserError

C = TypeVar("C", bound="Config")


class Config:
    """Base for all config dataclasses (subclasses are ``@dataclass(kw_only=True)``)."""

    # For polymorphic bases: kind -> concrete class. Subclasses register themselves via ``register_kind``.
    _kinds: ClassVar[dict[str, type] | None] = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = _to_plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, where: str = "") -> C:
        if not isinstance(data, dict):
            raise UserError(f"config {where or cls.__name__}: expected an object, got {type(data).__name__}")
        cls = _resolve_kind(cls, data, where)
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(data) - names
        if unknown:
            raise UserError(f"config {where or cls.__name__}: unknown key(s) {sorted(unknown)}; allowed: {sorted(names)}")
        kwargs = {k: _from_plain(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
        return cls(**kwargs)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def config_hash(self) -> str:
        """Stable short hash of the config (what a saved state was made for)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def register_kind(base: type[Config], kind: str):
    """Class decorator: make ``cls`` the concrete config for ``kind`` under polymorphic ``base``."""

    def deco(cls: type) -> type:
        if base._kinds is None:
            base._kinds = {}
        base._kinds[kind] = cls
        return cls

    return deco


def _resolve_kind(cls: type, data: dict, where: str) -> type:
    kinds = getattr(cls, "_kinds", None)
    if kinds is None or "kind" not in data:
        return cls
    kind = data["kind"]
    if kind not in kinds:
        raise UserError(f"config {where or cls.__name__}: kind {kind!r} unknown; allowed: {sorted(kinds)}")
    return kinds[kind]


def _to_plain(v: Any) -> Any:
    if isinstance(v, Config):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_to_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _to_plain(x) for k, x in v.items()}
    return v


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _from_plain(tp: Any, v: Any, where: str) -> Any:
    """Convert a JSON value to the annotated type, checking it."""
    if tp is Any:
        return v
    if _is_union(tp):
        args = get_args(tp)
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _from_plain(a, v, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"config {where}: bad value {v!r}")
    origin = get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(v, (list, tuple)):
            raise UserError(f"config {where}: expected a list, got {v!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        out = [_from_plain(inner, x, f"{where}.{i}") for i, x in enumerate(v)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(v, dict):
            raise UserError(f"config {where}: expected an object, got {v!r}")
        _, vt = get_args(tp) or (str, Any)
        return {k: _from_plain(vt, x, f"{where}.{k}") for k, x in v.items()}
    if origin is typing.Literal:
        if v not in get_args(tp):
            raise UserError(f"config {where}: {v!r} not allowed; allowed: {list(get_args(tp))}")
        return v
    if isinstance(tp, type) and issubclass(tp, Config):
        return v if isinstance(v, tp) else tp.from_dict(v, where=where)
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise UserError(f"config {where}: expected true/false, got {v!r}")
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise UserError(f"config {where}: expected an integer, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"config {where}: expected a number, got {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise UserError(f"config {where}: expected a string, got {v!r}")
        return v
    return v


def _parse_scalar(text: str) -> Any:
    """Parse an override value: JSON where possible (numbers, true/false/null, lists, objects), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: C, overrides: list[str] | None) -> C:
    """Apply ``a.b.0.c=value`` overrides to a config; returns a new, re-validated config.

    Unknown keys, bad indices and wrong types raise :class:`UserError` naming the key.
    """
    if not overrides:
        return cfg
    data = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE (e.g. train.lr=3e-4)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, p in enumerate(parts[:-1]):
            node = _child(node, p, ".".join(parts[: i + 1]), key)
        last = parts[-1]
        value = _parse_scalar(text)
        if isinstance(node, list):
            idx = _index(node, last, key)
            node[idx] = value
        elif isinstance(node, dict):
            if last not in node:
                raise UserError(f"--set {key}: unknown key {last!r}; allowed: {sorted(node)}")
            node[last] = value
        else:
            raise UserError(f"--set {key}: {'.'.join(parts[:-1])} is not a section")
    try:
        return type(cfg).from_dict(data)
    except TypeError as e:  # dataclass __post_init__ validation may raise TypeError/ValueError
        raise UserError(f"--set: {e}") from None
    except ValueError as e:
        raise UserError(f"--set: {e}") from None


def _child(node: Any, p: str, path: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, p, key)]
    if isinstance(node, dict):
        if p not in node:
            raise UserError(f"--set {key}: unknown key {path!r}; allowed here: {sorted(node)}")
        return node[p]
    raise UserError(f"--set {key}: {path} is a value, not a section")


def _index(node: list, p: str, key: str) -> int:
    try:
        idx = int(p)
    except ValueError:
        raise UserError(f"--set {key}: {p!r} must be a list index") from None
    if not -len(node) <= idx < len(node):
        raise UserError(f"--set {key}: index {idx} out of range (list has {len(node)} items)")
    return idx


def check_choice(name: str, value: Any, allowed) -> None:
    """Validation helper for ``__post_init__``: raise a ValueError naming the field and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} not allowed; allowed: {list(allowed)}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}={value!r} must be {'≥' if allow_zero else '>'} 0")
