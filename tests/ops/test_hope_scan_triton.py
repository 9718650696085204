"""HOPE chunk walk in Triton on CUDA at onyx's shapes (C 64, D 64): the op against the PyTorch loop in float32 and
against float64 with bf16 inputs, and a HOPE layer end to end (eager and torch.compile) under both backends, each with
the attention read (q None) and the memory read (q given, the hope-* presets). Marked gpu (deselected by default).

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


@pytest.mark.parametrize("read", [False, True])
@pytest.mark.parametrize("C,D,N", [(64, 32, 4), (32, 24, 3)])
def test_fp32_matches_loop(C, D, N, read, monkeypatch):
    """IEEE dots for float32 inputs (switched on for D ≤ 32): every output and gradient at the fp32 tolerance."""
    monkeypatch.setattr(triton_scan, "FP32", True)
    x, kw = scan_inputs(B=2, N=N, C=C, H=2, D=D, seed=C + D, device="cuda", read=read)
    got = run(triton_scan.hope_scan, x, kw)
    want = run(reference.hope_scan, x, kw)
    assert set(got) == set(want)
    for n, w in want.items():
        kind = "sum" if n in REDUCED else "grad" if n.startswith("d") else "out"
        assert_close(got[n], w, kind=kind, name=n)


@pytest.mark.parametrize("read", [False, True])
def test_bf16_inputs_against_float64(read):
    """bf16 memory inputs (and queries) with TF32 dots over 8 chunks: relative error against a float64 loop on the
    same rounded inputs within the half-precision tolerance (5e-3 outputs, 1e-2 gradients) and at most 3× the float32
    loop's where that is larger."""
    x, kw = scan_inputs(B=2, N=8, C=64, H=2, D=64, seed=7, device="cuda", dtype=torch.bfloat16, alpha_bias=5.0,
                        read=read)
    got = run(triton_scan.hope_scan, x, kw)
    x64 = {n: t.double() for n, t in x.items()}
    want = run(reference.hope_scan, x64, kw)
    loop = run(reference.hope_scan, {n: t.float() for n, t in x.items()}, kw)
    assert set(got) == set(want)
    for n, w in want.items():
        e, e_loop = rel_err(got[n], w), rel_err(loop[n], w)
        assert e <= max(3 * e_loop, 1e-2 if n.startswith("d") else 5e-3), \
            f"{n}: triton {e:.2e} vs loop {e_loop:.2e} against float64"


def layer_run(backend: str, compile: bool = False, dtype: torch.dtype | None = torch.bfloat16,
              read: str = "attention") -> dict:
    """y, the final memory and every parameter gradient of a HOPE layer at onyx's head shapes over a packed batch with
    a reset; dtype: the autocast dtype (None: no autocast, the layer in float64); read: "attention" (GQA 4/2) or
    "memory" (4 memory heads, the hope-* presets' read)."""
    torch.manual_seed(0)
    cfg = HopeConfig(read=read, n_kv_heads=2 if read == "attention" else 4, head_dim=64, chunk_size=64)
    layer = Hope(cfg, ModelConfig(d_model=256, n_heads=4, layers=[cfg]), 0).cuda()
    x = torch.randn(2, 300, 256, device="cuda")
    if dtype is None:
        layer, x = layer.double(), x.double()
    reset = torch.zeros(2, 300, dtype=torch.bool, device="cuda")
    reset[0, 129] = True
    f = torch.compile(layer, fullgraph=True) if compile else layer
    with dispatch.force_backend("hope_scan", backend), torch.autocast("cuda", dtype=dtype or torch.bfloat16,
                                                                      enabled=dtype is not None):
        y, s = f(x, None, reset=reset)
    (y.double() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
    return {"y": y, "mem": s.mem, **{n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}}


@pytest.mark.parametrize("read", ["attention", "memory"])
@pytest.mark.parametrize("compile", [False, True])
def test_layer_bf16_autocast_within_loops_error(compile, read):
    """Under bf16 autocast the layer's output, memory and every parameter gradient stay within 3× the loop's own
    error against a float64 layer (or 1e-2: reduced gradients such as the biases' sum every token)."""
    truth = layer_run("loop", dtype=None, read=read)
    loop = layer_run("loop", read=read)
    got = layer_run("triton", compile, read=read)
    assert set(got) == set(truth)
    for n, t in truth.items():
        e, e_loop = rel_err(got[n], t), rel_err(loop[n], t)
        assert e <= max(3 * e_loop, 1e-2), f"{n}: triton {e:.2e} vs loop {e_loop:.2e} against float64"


@pytest.mark.parametrize("read", [False, True])
def test_every_input_gets_gradient(read):
    x, kw = scan_inputs(B=2, N=3, C=64, H=2, D=64, seed=1, device="cuda", dtype=torch.bfloat16, alpha_bias=5.0,
                        read=read)
    got = run(triton_scan.hope_scan, x, kw)
    for n in (*INS, "q") if read else INS:
        assert torch.isfinite(got[f"d{n}"]).all() and got[f"d{n}"].abs().max() > 0, n
    if read:
        assert got["dq"].dtype == torch.bfloat16 and torch.isfinite(got["read"]).all()


@pytest.mark.parametrize("preset", ["onyx-debug", "hope-debug"])
def test_onyx_bf16_decode_with_cuda_graph(preset, monkeypatch):
    """onyx-debug (attention read) and hope-debug (memory read) in bf16 decode through the Triton walk (one chunk per
    step, pending tokens carried): CUDA-graph replays equal eager static steps, and against the same model in float32
    (loop) the Triton steps' logits stay within bf16 tolerance or 3× the bf16 loop's own error."""
    import copy

    import memlm
    from memlm.inference.engine import Engine

    calls = []
    inner = triton_scan._HopeScan.apply
    monkeypatch.setattr(triton_scan._HopeScan, "apply", lambda *a: calls.append(1) or inner(*a))
    torch.manual_seed(0)
    model = memlm.build_model(preset).to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, 250, (1, 37), generator=torch.Generator().manual_seed(3)).cuda()
    eng = Engine(model, cuda_graph=True)
    logits, state = eng.prefill(prompt)
    st_graph, step, _ = eng.decode_plan(state, 40)
    st_eager, _, _ = Engine(model, static_cache=True).decode_plan(state, 40)
    st_loop = st_eager.clone()
    model32 = copy.deepcopy(model).float()
    with dispatch.force_backend("hope_scan", "loop"):
        eng32 = Engine(model32, static_cache=True)
        st32, _, _ = eng32.decode_plan(eng32.prefill(prompt)[1], 40)
    tok = logits.argmax(-1)
    for i in range(30):
        lg, st_graph = step(tok, st_graph)
        lg = lg.clone()
        le, st_eager = eng.step_static(tok, st_eager)
        with dispatch.force_backend("hope_scan", "loop"):
            ll, st_loop = eng.step_static(tok, st_loop)
            l32, st32 = eng32.step_static(tok, st32)
        assert_close(lg.float(), le.float(), tol=1e-5, name=f"graph step {i}")
        assert_close(le.float(), l32, tol=max(5e-3, 3 * rel_err(ll.float(), l32)), name=f"triton vs float32 step {i}")
        tok = le.argmax(-1)
    assert calls and eng.decode_mode == "cuda_graph" and not eng.notes, eng.notes
