"""HOPE chunk walk in Triton on CUDA at onyx's shapes (C 64, D 64): the op against the PyTorch loop in float32 and
against float64 with bf16 inputs, and a HOPE layer end to end (eager and torch.compile) under both backends. Marked
gpu (deselected by default).

Notation: B batch, N chunks, C chunk length, H memory heads, D head width.
"""
from __future__ import annotations

import pytest
import torch
from test_hope_scan_interp import INS, REDUCED, run, scan_inputs

from memlm.config.model import ModelConfig
from memlm.layers.hope import Hope, HopeConfig
from memlm.ops import dispatch
from memlm.ops.hope_scan import reference, triton_scan
from memlm.ops.testing import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("C,D,N", [(64, 32, 4), (32, 24, 3)])
def test_fp32_matches_loop(C, D, N, monkeypatch):
    """IEEE dots for float32 inputs (switched on for D ≤ 32): every output and gradient at the fp32 tolerance."""
    monkeypatch.setattr(triton_scan, "FP32", True)
    x, kw = scan_inputs(B=2, N=N, C=C, H=2, D=D, seed=C + D, device="cuda")
    got = run(triton_scan.hope_scan, x, kw)
    want = run(reference.hope_scan, x, kw)
    for n, w in want.items():
        kind = "sum" if n in REDUCED else "grad" if n.startswith("d") else "out"
        assert_close(got[n], w, kind=kind, name=n)


def test_bf16_inputs_within_loops_error_against_float64():
    """bf16 memory inputs (TF32 dots): relative error against a float64 loop on the same rounded inputs at most 3×
    that of the float32 loop, or 2e-3."""
    x, kw = scan_inputs(B=2, N=8, C=64, H=2, D=64, seed=7, device="cuda", dtype=torch.bfloat16)
    got = run(triton_scan.hope_scan, x, kw)
    x64 = {n: t.double() for n, t in x.items()}
    want = run(reference.hope_scan, x64, kw)
    loop = run(reference.hope_scan, {n: t.float() for n, t in x.items()}, kw)
    for n, w in want.items():
        e, e_loop = rel_err(got[n], w), rel_err(loop[n], w)
        assert e <= max(3 * e_loop, 2e-3), f"{n}: triton {e:.2e} vs loop {e_loop:.2e} against float64"


def layer_run(backend: str, compile: bool, dtype=torch.bfloat16):
    torch.manual_seed(0)
    cfg = HopeConfig(read="attention", n_kv_heads=2, head_dim=64, chunk_size=64)
    layer = Hope(cfg, ModelConfig(d_model=256, n_heads=4, layers=[cfg]), 0).cuda()
    x = torch.randn(2, 300, 256, device="cuda")
    reset = torch.zeros(2, 300, dtype=torch.bool, device="cuda")
    reset[0, 129] = True
    f = torch.compile(layer, fullgraph=True) if compile else layer
    with dispatch.force_backend("hope_scan", backend), torch.autocast("cuda", dtype=dtype):
        y, s = f(x, None, reset=reset)
    (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
    return y.float(), s.mem, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("compile", [False, True])
def test_layer_bf16_autocast_matches_loop(compile):
    y_t, m_t, g_t = layer_run("triton", compile)
    y_l, m_l, g_l = layer_run("loop", False)
    assert_close(y_t, y_l, dtype=torch.bfloat16, name="y")
    assert_close(m_t, m_l, dtype=torch.bfloat16, name="mem")
    for n in g_l:
        assert_close(g_t[n], g_l[n], dtype=torch.bfloat16, kind="sum" if "bias" in n or "mem_init" in n else "grad",
                     name=n)


def test_every_input_gets_gradient():
    x, kw = scan_inputs(B=2, N=3, C=64, H=2, D=64, seed=1, device="cuda")
    got = run(triton_scan.hope_scan, x, kw)
    for n in INS:
        assert torch.isfinite(got[f"d{n}"]).all() and got[f"d{n}"].abs().max() > 0, n
