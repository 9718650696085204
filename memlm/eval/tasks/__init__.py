"""Evaluation tasks: each module registers its tasks in ``TASKS`` (name → runner). ``expand_tasks`` resolves group
names ("niah", "babilong", "ppl", "default", "all") into task names."""
from __future__ import annotations

from memlm.errors import UserError
from memlm.eval.tasks import (  # importing a task module registers its tasks
    babilong,  # noqa: F401
    cross_session,  # noqa: F401
    degeneration,  # noqa: F401
    mqar,  # noqa: F401
    niah,  # noqa: F401
    perplexity,  # noqa: F401
    reversal,  # noqa: F401
)
from memlm.eval.tasks.base import TASKS, Example, Probe, TaskSpec, example_rng, register_task

# "default" is everything that needs no training; mqar trains small models and runs only when asked.
DEFAULT_EXCLUDE = ("mqar",)
# Run and report order: language modelling first, then retrieval, reasoning, memory, trained and generation tasks.
ORDER = ("ppl", "stream", "probe", "passkey", "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey",
         "niah_multivalue", "niah_multiquery", "vt", "babilong_qa1", "babilong_qa2", "babilong_qa3", "reversal",
         "cross_session", "mqar", "degeneration")


def ordered() -> list[str]:
    """Registered task names in ORDER (tasks registered elsewhere come last, by name)."""
    rank = {n: i for i, n in enumerate(ORDER)}
    return sorted(TASKS, key=lambda n: (rank.get(n, len(rank)), n))


def groups() -> dict[str, list[str]]:
    g: dict[str, list[str]] = {}
    for name in ordered():
        g.setdefault(TASKS[name].group, []).append(name)
    g["all"] = ordered()
    g["default"] = [n for n in ordered() if n not in DEFAULT_EXCLUDE]
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
    return [n for n in ordered() if n in seen]


__all__ = ["ORDER", "TASKS", "Example", "Probe", "TaskSpec", "example_rng", "expand_tasks", "groups", "ordered",
           "register_task"]
