"""The short causal conv's Triton kernels (memlm.ops.short_conv, op "short_conv" backend "triton") against the torch
reference (memlm.layers.shortconv.causal_conv1d_torch), and the reference's norm_group against its definition.

Notation: B batch, T tokens, C channels, K kernel width, P = K − 1 cached inputs, g the norm group (0: off).

CPU tests run the kernels through the Triton interpreter (TRITON_INTERPRET=1, set per test: the interpreted kernels are
built on first use), in float32 at awkward shapes (T and C not multiples of the tiles). GPU tests (marker gpu):
    python -m pytest -q -m gpu tests/ops/test_short_conv.py
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memlm.layers.shortconv import ShortConv, causal_conv1d, causal_conv1d_torch
from memlm.ops import dispatch
from memlm.ops import short_conv as sc
from memlm.ops.testing import assert_close, mutant_kernels

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("one_thread")


def make_reset(B: int, T: int, K: int, *, seed: int = 0, device="cpu") -> torch.Tensor:
    """bool [B, T]: random resets (p = 0.2) after the first K tokens, and by row (b + [B = 1]) mod 3:
    0  a reset at t = 0 (the cache is cut off at once);
    1  two resets within K tokens (t = 1 and t = 2), none at t = 0 (the cache reaches t = 0);
    2  no reset in the first K tokens (the cache reaches the first K − 1 tokens)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(B, T, generator=g) < 0.2
    r[:, :K] = False
    for b in range(B):
        kind = (b + (B == 1)) % 3
        if kind == 0:
            r[b, 0] = True
        elif kind == 1:
            r[b, 1:3] = True
    return r.to(device)


def make_inputs(B, T, C, K, *, bias, cache, reset, dtype=torch.float32, device="cpu", seed=0, strided=False):
    """x [B, T, C] (a channel slice of a wider tensor when strided), weight [C, K], bias [C], cache [B, P, C] (all
    requiring grad), reset [B, T] — the absent ones None."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C + 3 * strided, generator=g)[..., :C]
    w = torch.randn(C, K, generator=g) / K ** 0.5
    b = torch.randn(C, generator=g) * 0.5 if bias else None
    c = torch.randn(B, K - 1, C, generator=g) if cache else None
    x = x.to(device, dtype).requires_grad_()
    w, b, c = (None if t is None else t.to(device).requires_grad_() for t in (w, b, c))
    if c is not None:
        c = c.detach().to(dtype).requires_grad_()
    return x, w, b, c, make_reset(B, T, K, seed=seed + 1, device=device) if reset else None


def run(fn, x, w, b, c, r, act, g, *, seed=1, dy_dtype=None):
    """y, new cache and the gradients (x, w, b, c; None for those absent or not requiring grad) of a random
    projection of both outputs (the new cache's too: it is differentiable), rounded to dy_dtype (default: theirs)."""
    y, nc = fn(x, w, b, c, r, act, norm_group=g)
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=gen).to(y.device, dy_dtype or y.dtype).to(y.dtype)
    dn = torch.randn(nc.shape, generator=gen).to(nc.device, dy_dtype or nc.dtype).to(nc.dtype)
    live = [t is not None and t.requires_grad for t in (x, w, b, c)]
    ins = [t for t, n in zip((x, w, b, c), live) if n]
    grads = iter(torch.autograd.grad((y.float() * dy).sum() + (nc.float() * dn).sum(), ins, allow_unused=True))
    return y, nc, [next(grads) if n else None for n in live]


def reference_fp32(x, w, b, c, r, act, g):
    """The torch reference on float32 copies (leaves of their own) of the same values, with the same output
    gradients (rounded to x's dtype): outputs and gradients in float32."""
    up = [None if t is None else t.detach().float().requires_grad_(t.requires_grad) for t in (x, w, b, c)]
    return run(causal_conv1d_torch, *up, r, act, g, dy_dtype=x.dtype)


def compare(got, want, *, name, tol=1e-5, grad_tol=1e-5):
    """Two `run` results: the same dtypes, y and the gradients within tol (relative), the new cache bit for bit."""
    (y1, n1, g1), (y0, n0, g0) = got, want
    assert y1.dtype == y0.dtype and n1.dtype == n0.dtype
    assert_close(y1, y0, tol=tol, name=f"{name} y")
    assert torch.equal(n1, n0), f"{name}: new cache"
    for what, a, b in zip("x w b cache".split(), g1, g0):
        assert (a is None) == (b is None), f"{name}: d{what} {a is None} {b is None}"
        if a is not None:
            assert a.dtype == b.dtype, f"{name}: d{what} dtype {a.dtype} != {b.dtype}"
            if b.numel():
                assert_close(a, b, tol=grad_tol, name=f"{name} d{what}")


CASES = [  # B, T, C, K, g, bias, activation, cache, reset
    (1, 2, 6, 4, 0, False, "silu", False, False),
    (1, 2, 6, 4, 3, True, "silu", True, True),         # T < P: the new cache keeps cache rows
    (3, 5, 48, 4, 16, True, "silu", True, True),
    (3, 5, 48, 2, 0, False, None, True, True),
    (1, 37, 100, 4, 25, True, "silu", True, True),     # a group of 25 in 32 lanes, 4 groups a tile
    (3, 37, 6, 1, 2, True, None, True, False),         # K = 1: no taps back, an empty cache
    (3, 37, 48, 4, 48, False, "silu", False, True),    # one group a row
    (1, 130, 48, 4, 0, True, "silu", True, True),      # several token tiles
    (3, 130, 100, 2, 50, False, "silu", True, False),
    (3, 37, 100, 4, 0, True, None, False, True),
    (1, 5, 100, 1, 4, False, "silu", False, True),
    (3, 2, 48, 2, 12, True, None, True, True),
    (3, 130, 6, 4, 6, False, "silu", True, True),
]


class TestInterpreted:
    @pytest.fixture(autouse=True)
    def interpret(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "1")

    @pytest.mark.parametrize("B, T, C, K, g, bias, act, cache, reset", CASES)
    def test_matches_torch(self, B, T, C, K, g, bias, act, cache, reset):
        args = make_inputs(B, T, C, K, bias=bias, cache=cache, reset=reset, seed=B + T + C + K)
        want = run(causal_conv1d_torch, *args, act, g)
        if cache and reset and K > 1:   # the cache rows reach the output somewhere: their gradient is not trivially 0
            assert want[2][3].abs().amax() > 0
        compare(run(sc.short_conv_triton, *args, act, g), want, name=f"B{B} T{T} C{C} K{K} g{g}")

    def test_strided_input_and_partial_grads(self):
        """x a channel slice of a wider tensor (row strides ≠ C); only some inputs require grad."""
        x, w, b, c, r = make_inputs(3, 37, 48, 4, bias=True, cache=True, reset=True, strided=True)
        assert not x.is_contiguous()
        compare(run(sc.short_conv_triton, x, w, b, c, r, "silu", 16),
                run(causal_conv1d_torch, x, w, b, c, r, "silu", 16), name="strided")
        w.requires_grad_(False)
        c.requires_grad_(False)
        compare(run(sc.short_conv_triton, x, w, b, c, r, "silu", 0),
                run(causal_conv1d_torch, x, w, b, c, r, "silu", 0), name="no dw, no dcache")

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    def test_half_precision(self, dtype):
        """bf16 / fp16 inputs (the casts of y, dx, dcache): against the float32 reference on the same values. bf16 at
        1e-2: the interpreter's float32 → bf16 cast errs twice as much as rounding to nearest (measured 3.3e-3 here
        against 1.6e-3)."""
        args = make_inputs(3, 37, 48, 4, bias=True, cache=True, reset=True, dtype=dtype)
        (y1, n1, g1), (y0, n0, g0) = run(sc.short_conv_triton, *args, "silu", 16), reference_fp32(*args, "silu", 16)
        tol = 1e-2 if dtype == torch.bfloat16 else None
        assert y1.dtype == n1.dtype == g1[0].dtype == g1[3].dtype == dtype
        assert_close(y1, y0, dtype=dtype, tol=tol, name="y")
        torch.testing.assert_close(n1.float(), n0, rtol=0, atol=0)
        for what, a, b in zip("x w b cache".split(), g1, g0):
            assert_close(a, b, dtype=dtype, kind="sum" if what in "wb" else "grad", tol=tol, name=f"d{what}")

    def test_zero_group(self):
        """A group that is all zeros (x = 0 on its channels, no bias, no cache): zeros out, not NaN, and finite
        gradients — the clamp branch of the norm backward (ds = dy/ε), as autograd of F.normalize."""
        x, w, _, _, r = make_inputs(2, 37, 48, 4, bias=False, cache=False, reset=True)
        with torch.no_grad():
            x[..., 16:32] = 0
        got, want = (run(fn, x, w, None, None, r, "silu", 16) for fn in (sc.short_conv_triton, causal_conv1d_torch))
        for y, _, grads in (got, want):
            assert torch.equal(y[..., 16:32], torch.zeros_like(y[..., 16:32]))
            assert all(torch.isfinite(t).all() for t in grads if t is not None)
        # dx on the zero group is of order dy/ε = 1e12: relative comparison
        compare(got, want, name="zero group")

    @pytest.mark.parametrize("g", [0, 16])
    def test_layer_streams_through_the_cache(self, g):
        """ShortConv with the kernels forced: a packed row in pieces equals the row at once, and the torch backend."""
        torch.manual_seed(0)
        conv = ShortConv(48, 4, bias=True, norm_group=g)
        with torch.no_grad():
            conv.bias.normal_()
        x = torch.randn(2, 40, 48)
        reset = make_reset(2, 40, 4)
        want, want_cache = conv(x, reset=reset)
        with dispatch.force_backend("short_conv", "triton"):
            y, cache = conv(x, reset=reset)
            outs, c = [], None
            for a, e in [(0, 2), (2, 3), (3, 17), (17, 40)]:
                o, c = conv(x[:, a:e], c, reset[:, a:e])
                outs.append(o)
        assert_close(y, want, name="layer")
        assert_close(torch.cat(outs, 1), want, name="streamed")
        assert torch.equal(cache, want_cache) and torch.equal(c, want_cache)

    def test_dispatch(self):
        """Automatic choice on the CPU: "torch", also under the interpreter; "triton" by name."""
        x, w, b, c, r = make_inputs(2, 5, 6, 4, bias=True, cache=True, reset=True)
        assert dispatch.get("short_conv", args=(x, w, b, c, r, "silu")) is causal_conv1d_torch
        assert dispatch.get("short_conv", "triton", args=(x, w, b, c, r, "silu")) is sc.short_conv_triton
        with dispatch.force_backend("short_conv", "triton"):
            y, _ = causal_conv1d(x, w, b, c, r)
        torch.testing.assert_close(y, causal_conv1d_torch(x, w, b, c, r)[0], rtol=1e-5, atol=1e-6)
        assert sc.supports(x, w, b, c, r, None, norm_group=3)
        assert not sc.supports(x, w, b, c, r, "relu")                           # activation
        assert not sc.supports(x, w, b, c, r, norm_group=4)                     # 4 ∤ 6
        assert not sc.supports(x.double(), w, b, c, r)                          # dtype
        assert not sc.supports(x, w, b, c[:, :2], r)                            # cache rows ≠ K − 1
        assert not sc.supports(x, w, b, c, r[:, :3])                            # reset shape
        assert not sc.supports(x[0], w)                                         # [T, C]

    # a kernel with a broken reset mask, cache read or norm / SiLU backward fails the comparisons above
    @pytest.mark.parametrize("old, new, zero", [
        ("Rst + b * T + rt - (j - 1)", "Rst + b * T + rt - j", False),           # forward: reset one token early
        ("Rst + b * T + t, mask=tin", "Rst + b * T + t - 1, mask=tin", False),   # backward: reset one token early
        ("tl.where(src < 0, src + K - 1, 0)", "tl.where(src < 0, src + K - 2, 0)", False),   # the wrong cache row
        ("(dy - u * dot) / d, dy / d)", "dy / d, dy / d)", False),                # norm backward: no projection
        ("(dy - u * dot) / d, dy / d)", "(dy - u * dot) / d, 0.0 * dy)", True),   # the clamp branch dropped
        ("(1.0 + z * (1.0 - sg))", "(1.0 + z * sg)", False),                      # SiLU backward
    ])
    def test_checks_catch_a_broken_kernel(self, old, new, zero, monkeypatch, tmp_path):
        mutants = mutant_kernels((sc._conv_kernel, sc._grad_kernel), "from memlm.ops.short_conv import _EPS, tl", old,
                                 new, tmp_path)
        monkeypatch.setattr(sc, "_interpreted", lambda: mutants)
        x, w, b, c, r = make_inputs(3, 21, 48, 4, bias=True, cache=True, reset=True)
        if zero:
            with torch.no_grad():
                x[..., 16:32] = 0
            b = c = None
        with pytest.raises(AssertionError):
            compare(run(sc.short_conv_triton, x, w, b, c, r, "silu", 16),
                    run(causal_conv1d_torch, x, w, b, c, r, "silu", 16), name="mutant")


def test_norm_group_is_the_composition():
    """The reference's norm_group: the conv, then F.normalize over groups of g channels in float32, back in x's dtype
    (the decode step T = 1 too); a zero group gives zeros, not NaN, with finite gradients."""
    for dtype, T in ((torch.float32, 9), (torch.bfloat16, 9), (torch.float32, 1)):
        x, w, b, c, r = make_inputs(2, T, 48, 4, bias=True, cache=True, reset=T > 1, dtype=dtype)
        y, nc = causal_conv1d_torch(x, w, b, c, r, norm_group=16)
        y0, nc0 = causal_conv1d_torch(x, w, b, c, r)
        want = F.normalize(y0.float().view(2, T, 3, 16), dim=-1).view(2, T, 48).to(dtype)
        assert torch.equal(y, want) and torch.equal(nc, nc0)
    x = torch.zeros(1, 4, 8, requires_grad=True)
    w = torch.randn(8, 4, requires_grad=True)
    y, _ = causal_conv1d_torch(x, w, norm_group=4)
    assert torch.equal(y, torch.zeros_like(y))
    y.backward(torch.randn_like(y))
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="norm_group"):
        causal_conv1d(torch.zeros(1, 2, 6), torch.zeros(6, 4), norm_group=4)
    with pytest.raises(ValueError, match="norm_group"):
        ShortConv(6, 4, norm_group=4)
    with pytest.raises(ValueError, match="activation"):
        ShortConv(6, 4, activation="relu")


def test_no_kernel_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, *_ = make_inputs(1, 4, 6, 4, bias=False, cache=False, reset=False)
    assert not sc.supports(x, w)
    with pytest.raises(ValueError, match="backend 'torch'"):
        sc.short_conv_triton(x, w)


def test_plan():
    grad = {"BT2": 16, "NSUB": 8, "BC2": 128, "KP": 8}
    assert sc.plan(768, 4, 32) == {"BT": 16, "NG": 4, "GP": 32, "GW": 32, **grad}
    assert sc.plan(768, 4, 0) == {"BT": 16, "NG": 1, "GP": 128, "GW": 128, **grad}
    assert sc.plan(100, 4, 25) == {"BT": 16, "NG": 4, "GP": 32, "GW": 25, **grad}
    assert sc.plan(6, 2, 3) == {"BT": 32, "NG": 2, "GP": 4, "GW": 3, "BT2": 32, "NSUB": 4, "BC2": 8, "KP": 4}
    assert sc.plan(1024, 4, 1024) == {"BT": 2, "NG": 1, "GP": 1024, "GW": 1024, **grad}


# ------------------------------------------------------------------------------------------------------------ GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not sc.AVAILABLE, reason="needs CUDA and triton")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, T, C, K, g, bias, cache, reset", [
    (16, 2048, 768, 4, 32, False, False, True),        # the neural memory's q/k/v conv, normalised per head
    (16, 2048, 768, 4, 0, True, True, True),
    (2, 2048, 768, 4, 32, False, True, False),
    (3, 37, 100, 4, 25, True, True, True),
    (1, 130, 6, 2, 3, False, True, True),
    (5, 1000, 1000, 4, 0, True, False, True),
])
def test_gpu_matches_torch(dtype, B, T, C, K, g, bias, cache, reset):
    args = make_inputs(B, T, C, K, bias=bias, cache=cache, reset=reset, dtype=dtype, device="cuda")
    assert dispatch.get("short_conv", args=(*args, "silu"), kwargs={"norm_group": g}) is sc.short_conv_triton
    got = run(sc.short_conv_triton, *args, "silu", g)
    want = reference_fp32(*args, "silu", g)
    bf16 = dtype == torch.bfloat16
    (y1, n1, g1), (y0, n0, g0) = got, want
    assert_close(y1, y0, dtype=dtype, name="y")
    torch.testing.assert_close(n1.float(), n0)
    for what, a, b in zip("x w b cache".split(), g1, g0):
        if b is not None:
            kind = "sum" if what in ("w", "b") else "grad"
            assert_close(a, b, dtype=dtype, kind=kind, tol=2e-2 if bf16 and kind == "sum" else None, name=f"d{what}")


@pytest.mark.gpu
@needs_cuda
def test_gpu_dispatch_and_compile():
    """CUDA: "triton" automatically for T ≥ 2, "torch" for the decode step; the layer under torch.compile
    (fullgraph) equals eager, forward and gradients."""
    x, w, b, c, r = make_inputs(4, 256, 96, 4, bias=True, cache=True, reset=True, dtype=torch.bfloat16,
                                device="cuda")
    assert dispatch.get("short_conv", args=(x, w, b, c, r, "silu")) is sc.short_conv_triton
    assert dispatch.get("short_conv", args=(x[:, :1], w, b, c, r[:, :1], "silu")) is causal_conv1d_torch
    conv = ShortConv(96, 4, bias=True, norm_group=32).cuda()

    def step(x, c, r):
        y, nc = conv(x, c, r)
        return y.float().square().sum() + nc.float().sum()

    eager = torch.autograd.grad(step(x, c, r), [x, conv.weight, conv.bias, c])
    compiled = torch.compile(step, fullgraph=True)
    got = torch.autograd.grad(compiled(x, c, r), [x, conv.weight, conv.bias, c])
    for a, e in zip(got, eager):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
