"""Evaluation: which memory really remembers (DESIGN.md §8, docs/eval.md).

- ``memlm.eval.tasks``: seeded generators + scorers (perplexity, streaming, memory probe, passkey / NIAH family,
  variable tracking, BABILong qa1–qa3, reversal, cross-session recall, MQAR, degeneration), registered in ``TASKS``;
- ``memlm.eval.runner``: ``Scorer`` (ranking, losses, greedy generation through the inference engine), ``run_eval``;
- ``memlm.eval.report``: summaries, markdown, PNG plots; ``memlm.eval.bench``: the leaderboard;
- ``memlm.eval.harness``: ``MemlmLM`` for lm-evaluation-harness.

Importing this package is cheap; the submodules import torch and the model code.
"""
from __future__ import annotations

__all__ = ["bench", "harness", "metrics", "report", "runner", "tasks"]
