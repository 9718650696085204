"""Evaluation tasks: each module registers its tasks in ``TASKS`` (name → runner). ``expand_tasks`` resolves group
names ("niah", "babilong", "ppl", "default", "all") into task names."""
from __future__ import annotations

from memlm.errors import UserError

# Import order is registry order is report order.
from memlm.eval.tasks import (
    babilong,  # noqa: F401
    cross_session,  # noqa: F401
    degeneration,  # noqa: F401
    mqar,  # noqa: F401
    niah,  # noqa: F401
    perplexity,  # noqa: F401 (registers tasks)
    reversal,  # noqa: F401
)
from memlm.eval.tasks.base import TASKS, Example, Probe, TaskSpec, example_rng, register_task

# "default" is everything that needs no training; mqar trains small models and runs only when asked.
DEFAULT_EXCLUDE = ("mqar",)


def groups() -> dict[str, list[str]]:
    g: dict[str, list[str]] = {}
    for spec in TASKS.values():
        g.setdefault(spec.group, []).append(spec.name)
    g["all"] = list(TASKS)
    g["default"] = [n for n in TASKS if n not in DEFAULT_EXCLUDE]
    return g


def expand_tasks(names: list[str] | str) -> list[str]:
    """Task and group names (comma-separated allowed) → task names in registry order, without duplicates."""
    if isinstance(names, str):
        names = [names]
    g = groups()
    want: list[str] = []
    for raw in names:
        for n in (p.strip() for p in str(raw).split(",")):
            if not n:
                continue
            if n in TASKS:
                want.append(n)
            elif n in g:
                want.extend(g[n])
            else:
                raise UserError(f"unknown eval task {n!r}; tasks: {', '.join(TASKS)}; groups: {', '.join(sorted(g))}")
    seen = set(want)
    return [n for n in TASKS if n in seen]


__all__ = ["TASKS", "Example", "Probe", "TaskSpec", "example_rng", "expand_tasks", "groups", "register_task"]
