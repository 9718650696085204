"""What a task is: deterministic examples from a seed, scored by generation and by likelihood ranking.

A retrieval-style ``Example`` is a ``context`` (fed into the model's memory), then

- generation: ``question`` is fed and the model continues greedily; the output is scored by exact match and by
  RULER-style containment of every string in ``answers``;
- ranking: for each ``Probe``, its ``question`` is fed after the context and every candidate in ``choices`` is
  scored by its log-likelihood; the probe is right when the true candidate (``label``) scores highest. Small models
  that do not follow prompts still show whether the fact is in memory this way.

Every candidate is scored from the state right after context + probe question — never from a state that has
seen another candidate, another probe's question or the answer (tests check this against the state's history).

Tasks are registered by name in ``TASKS`` with a runner ``fn(ctx) -> iterator of JSON records``.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Probe:
    """One likelihood-ranking question: ``choices[label]`` is the truth, the others distractors."""

    question: str
    choices: list[str]
    label: int = 0


@dataclass
class Example:
    task: str
    context: str
    question: str
    answers: list[str]
    probes: list[Probe]
    meta: dict[str, Any] = field(default_factory=dict)


def example_rng(*parts: Any) -> random.Random:
    """A generator seeded by the joined parts (task, seed, length, depth, index): stable across processes."""
    return random.Random(":".join(str(p) for p in parts))


@dataclass
class TaskSpec:
    name: str
    fn: Callable[..., Iterator[dict]]
    description: str
    group: str
    uses_lengths: bool = True


TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, group: str, description: str, *, uses_lengths: bool = True):
    def deco(fn: Callable[..., Iterator[dict]]) -> Callable[..., Iterator[dict]]:
        if name in TASKS:
            raise ValueError(f"task {name!r} registered twice")
        TASKS[name] = TaskSpec(name, fn, description, group, uses_lengths)
        return fn

    return deco


__all__ = ["TASKS", "Example", "Probe", "TaskSpec", "example_rng", "register_task"]
