"""Triton compressive-memory kernels on CPU through the Triton interpreter (TRITON_INTERPRET=1), tiny shapes.

Notation: B batch, N segments, C segment length, H heads, K key width, V value width, R memories per head,
M [B, H, R, K, V], z [B, H, R, K] memories; num, den the reads; z_pre the normalisers before each segment.

The kernels are built lazily per device (interpreted for CPU tensors), so the variable only has to be set while
these tests run (it gates `supports` on CPU).
"""
from __future__ import annotations

import pytest
import torch

from memlm.config.model import ModelConfig
from memlm.layers.compressive import Compressive, CompressiveConfig, elu1
from memlm.ops import dispatch
from memlm.ops.compressive import chunked, reference, triton_segments
from memlm.ops.testing import assert_close

pytest.importorskip("triton")

OUTS = ("num", "den", "z_pre", "M", "z")
INS = ("sq", "sk", "v", "M0", "z0")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_segments, "_empty", lambda like, *shape: like.new_full(shape, float("nan")))


def op_inputs(B=2, N=4, C=5, H=2, K=3, V=4, R=1, seed=0, device="cpu"):
    """σ-mapped queries/keys (some empty slots), a non-zero initial memory, resets, an incomplete segment."""
    g = torch.Generator().manual_seed(seed)
    sq = elu1(torch.randn(B, N, C, H, K, generator=g))
    sk = elu1(torch.randn(B, N, C, H, K, generator=g))
    sk[1, N - 1, C // 2:] = 0                                                          # empty slots
    x = {"sq": sq, "sk": sk, "v": torch.randn(B, N, C, H, V, generator=g),
         "M0": torch.randn(B, H, R, K, V, generator=g), "z0": torch.rand(B, H, R, K, generator=g) + 0.5}
    starts = torch.zeros(B, N, dtype=torch.bool)
    starts[0, N // 2] = starts[1, 0] = True
    complete = torch.ones(B, N, dtype=torch.bool)
    complete[:, -1] = False
    kw = {"write_slot": torch.arange(B * N).view(B, N) % R, "starts_doc": starts, "complete": complete}
    return {n: t.to(device) for n, t in x.items()}, {n: t.to(device) for n, t in kw.items()}


def run(fn, x, kw, *, grad=True):
    leaves = {n: t.clone().requires_grad_(grad) for n, t in x.items()}
    outs = fn(*(leaves[n] for n in INS[:3]), M0=leaves["M0"], z0=leaves["z0"], **kw)
    got = dict(zip(OUTS, outs))
    if grad:
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
        got.update({f"d{n}": d for n, d in zip(INS, torch.autograd.grad(loss, list(leaves.values())))})
    return got


@pytest.mark.parametrize("R,delta,C,V", [(1, True, 5, 4), (1, False, 5, 3), (3, True, 5, 4), (2, True, 70, 3)])
def test_matches_reference_and_chunked_all_gradients(R, delta, C, V):
    """Every output and the gradients w.r.t. every input (the initial memories included) at fp32 tolerance;
    C = 70 spans two token tiles."""
    x, kw = op_inputs(C=C, V=V, R=R, seed=R + C)
    kw["delta"] = delta
    got = run(triton_segments.segment_memory, x, kw)
    for want in (run(reference.segment_memory, x, kw), run(chunked.segment_memory, x, kw)):
        for n, w in want.items():
            assert_close(got[n], w, kind="grad" if n.startswith("d") else "out", name=n)
    for n in ("dM0", "dz0"):
        assert got[n].abs().max() > 0, f"{n} is zero: the comparison would be vacuous"


def test_no_grad_and_low_precision_inputs():
    x, kw = op_inputs(R=2, seed=5)
    kw["delta"] = True
    with torch.no_grad():                                          # no pre-segment memories saved
        got = run(triton_segments.segment_memory, x, kw, grad=False)
    want = run(chunked.segment_memory, x, kw, grad=False)
    for n in OUTS:
        assert_close(got[n], want[n], name=n)
    xb = {n: t.bfloat16() for n, t in x.items()}
    got = run(triton_segments.segment_memory, xb, kw, grad=False)
    want = run(chunked.segment_memory, xb, kw, grad=False)
    for n in OUTS:
        assert got[n].dtype == torch.float32
        assert_close(got[n], want[n], name=f"bf16 inputs {n}")


def layer(**kw) -> Compressive:
    torch.manual_seed(0)
    cfg = CompressiveConfig(segment_size=6, **kw)
    m = Compressive(cfg, ModelConfig(d_model=16, n_heads=2, layers=[cfg]), 0)
    with torch.no_grad():
        m.gate.normal_()
    return m


@pytest.mark.parametrize("kw", [{"update": "delta"}, {"update": "linear", "hierarchical": 2}])
def test_layer_with_triton_backend_equals_chunked(kw):
    """The mixer end to end (document-aligned segments, resets, pending tokens carried across two calls):
    outputs, final state and parameter gradients."""
    x = torch.randn(2, 23, 16, generator=torch.Generator().manual_seed(3))
    reset = torch.zeros(2, 23, dtype=torch.bool)
    reset[0, 9] = reset[1, 14] = True
    res = {}
    for backend in ("chunked", "triton"):
        m = layer(backend=backend, **kw)
        y1, s = m(x[:, :10], reset=reset[:, :10])
        y2, s = m(x[:, 10:], s, reset=reset[:, 10:])
        y = torch.cat([y1, y2], 1)
        (y.square().sum() + s.M.sum() + s.z.sum()).backward()
        res[backend] = (y, s, {n: p.grad for n, p in m.named_parameters()})
    (y, s, g), (y_ref, s_ref, g_ref) = res["triton"], res["chunked"]
    assert_close(y, y_ref, name="y")
    assert_close(s.M, s_ref.M, name="M")
    assert_close(s.z, s_ref.z, name="z")
    for n in g_ref:
        assert_close(g[n], g_ref[n], kind="grad", name=f"d{n}")


def test_dispatch_cpu_default_and_errors(monkeypatch):
    x, kw = op_inputs()
    kw = {"M0": x["M0"], "z0": x["z0"], "delta": True, **kw}
    args = (x["sq"], x["sk"], x["v"])
    # the CUDA default, but CPU tensors never pick it automatically (the interpreter is for tests)
    assert dispatch.get("compressive_memory", args=args, kwargs=kw) is chunked.segment_memory
    assert dispatch.get("compressive_memory", "triton", args=args, kwargs=kw) is triton_segments.segment_memory
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="does not support"):
        dispatch.get("compressive_memory", "triton", args=args, kwargs=kw)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        triton_segments.segment_memory(*args, **kw)
