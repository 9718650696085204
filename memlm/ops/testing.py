"""Shared helpers for testing fast paths against their references.

Tolerances are relative errors ‖a − b‖ / max(‖b‖, tiny), per DESIGN.md §3:
fp32 ≤ 1e-5, bf16 outputs ≤ 5e-3, bf16 gradients ≤ 1e-2. Float64 references are
compared at fp32 tolerance. kind "sum": the gradient of a handful of numbers (a bias, a per-head scalar) that each sum
a float32 contribution over every token — two kernels summing in different orders differ there by ~2e-5 (measured
on an H100, 2026-11-22), so fp32 gets 1e-4.
"""
from __future__ import annotations

import torch

TOLERANCE = {
    ("fp32", "out"): 1e-5,
    ("fp32", "grad"): 1e-5,
    ("fp32", "sum"): 1e-4,
    ("bf16", "sum"): 1e-2,
    ("fp16", "sum"): 5e-3,
    ("bf16", "out"): 5e-3,
    ("bf16", "grad"): 1e-2,
    ("fp16", "out"): 2e-3,
    ("fp16", "grad"): 5e-3,
}


def dtype_tag(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against the reference b (both cast to float64)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def assert_close(a: torch.Tensor, b: torch.Tensor, *, dtype: torch.dtype = torch.float32, kind: str = "out",
                 tol: float | None = None, name: str = "") -> None:
    """Assert a (fast path) matches b (reference) within the tolerance for dtype/kind."""
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values in fast path"
    tol = TOLERANCE[(dtype_tag(dtype), kind)] if tol is None else tol
    err = rel_err(a, b)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a freshly allocated buffer with NaN so that reads of unwritten memory show up."""
    return t.fill_(float("nan")) if t.is_floating_point() else t


def count_launches(module, monkeypatch) -> list:
    """Patch ``module._interpreted`` (a backend's interpreted kernels, a tuple) so that launches of its first kernel
    are recorded; returns the list that collects their grids."""
    launches: list = []
    real = module._interpreted()

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]
    monkeypatch.setattr(module, "_interpreted", lambda: (Spy(real[0]), *real[1:]))
    return launches


def mutant_kernels(fns, header: str, old: str, new: str, directory) -> tuple:
    """The plain kernel functions ``fns`` with ``old`` replaced by ``new`` (exactly one occurrence in their joined
    source), written to a module file in ``directory`` (the Triton interpreter re-reads a kernel's source, so it must
    live in a file) and wrapped for the interpreter, in the order given. header: the import lines the kernels need.
    For tests that show their checks catch a broken kernel without touching the real one."""
    import importlib.util
    import inspect
    from pathlib import Path

    from triton.runtime.interpreter import InterpretedFunction
    src = "\n\n".join(inspect.getsource(f) for f in fns)
    assert src.count(old) == 1, f"the kernels changed: update this test ({old!r})"
    path = Path(directory) / f"mutant_{fns[0].__module__.rsplit('.', 1)[-1]}.py"
    path.write_text(f"from __future__ import annotations\n{header}\n\n{src.replace(old, new)}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return tuple(InterpretedFunction(getattr(mod, f.__name__)) for f in fns)
