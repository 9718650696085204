"""benchmarks/plot_results.py draws the docs' benchmark figures from the committed raw GPU results (CPU only)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "plot_results.py"


def test_figures_from_committed_results(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_results", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--out", str(tmp_path)])
    for name in ("bench_delta_rule.png", "bench_decode.png", "bench_training.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
