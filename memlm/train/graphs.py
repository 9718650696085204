"""Count what torch.compile makes of a trainer's training step: graphs, graph breaks (with their reasons) and
recompiles. Shared by the graph-break test (tests/perf/test_graph_breaks.py) and benchmarks/compile_check.py.

The trainer's module is compiled onto a counting backend that returns the traced graph unchanged (no code
generation, so this is fast even on a CPU). The batches run in order; the graphs made by the first ``seen`` batches
are recorded, and every later batch (a kind already seen) must reuse them.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters


@dataclass
class GraphReport:
    breaks: dict[str, int] = field(default_factory=dict)   # "reason | developer context" -> count
    graphs: int = 0                                        # graphs after every batch
    graphs_after_seen: int = 0                             # graphs after the first `seen` batches
    recompiles: int = 0
    outputs: list[dict[str, Any]] = field(default_factory=list)   # train_step's results
    seconds: float = 0.0

    @property
    def recompiled_on_repeat(self) -> bool:
        return self.graphs != self.graphs_after_seen


def trace_training_steps(trainer, batches: Sequence[Any], seen: int = 2) -> GraphReport:
    """Compile ``trainer._module`` (where ``train.compile=true`` puts torch.compile) onto a counting backend, run
    ``trainer.train_step`` on each batch, and report graphs, breaks and recompiles (module docstring)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    dynamo.reset()
    counters.clear()
    trainer._module = torch.compile(trainer._module, backend=backend)
    rep = GraphReport()
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        rep.outputs.append(trainer.train_step(b))
        if i + 1 == seen:
            rep.graphs_after_seen = len(graphs)
    rep.seconds = time.perf_counter() - t0
    rep.graphs = len(graphs)
    rep.breaks = {k.split("\n")[0] + " | " + k.split("Developer debug context:")[-1].split("\n")[0].strip(): v
                  for k, v in counters["graph_break"].items()}
    rep.recompiles = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
    return rep
