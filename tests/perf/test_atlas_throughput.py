"""benchmarks/atlas_throughput.py on the CPU at the debug preset: packed rows look like the trainer's batches (their
resets and its `reset_bound` promise), and a timed record comes back for the memory preset and its ablation."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "atlas_throughput.py"


def load():
    spec = importlib.util.spec_from_file_location("atlas_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_packed_rows_and_a_record_with_the_trainers_bound():
    mod = load()
    reset = mod.packed_resets(4, 2048, 500)
    starts = reset.sum(1)
    assert reset.dtype == torch.bool and (starts >= 1).all() and 2 <= starts.float().mean() <= 8
    assert torch.equal(reset, mod.packed_resets(4, 2048, 500))                 # seeded
    (name, cfg), (off, _) = mod.models_for("atlas-mag-debug", [])[:2]
    assert off == f"{name}:memory_off"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = mod.run(name, cfg, batch=2, seq=64, steps=1, warmup=1, device=torch.device("cpu"), docs=20)
    finally:
        torch.set_num_threads(n)
    assert "error" not in rec and rec["tokens_per_s"] > 0 and rec["loss"] > 0
    most = int(mod.packed_resets(2, 64, 20)[:, 1:].sum(1).max())
    assert rec["reset_bound"] >= most and rec["reset_bound"] in (0, 1, 2, 4, 8, 16, 32, 64)
