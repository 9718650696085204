"""Chunked SSD scan and decode step against the token-loop reference.

Notation: B batch, T tokens, H heads, P channels per head, N state size, G groups of B/C; h0 the initial state,
y outputs, s final state, Q chunk size. The references run in float64 (the same code path as float32, exact to
~1e-16), so fp32 fast-path errors are measured against the true value, at the DESIGN.md tolerances.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memlm.ops import dispatch
from memlm.ops.ssm_scan import ssm_scan, ssm_scan_chunked, ssm_scan_reference, ssm_step
from memlm.ops.testing import assert_close, poison_, rel_err

NAMES = ("x", "dt", "A", "B", "C", "D", "h0")


def make_inputs(b: int, t: int, h: int, p: int, n: int, g: int, *, seed: int = 0, resets: bool = False,
                q: int = 64) -> dict[str, torch.Tensor]:
    """Float64 inputs with decays spanning slow (survives many chunks) to fast heads."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.float64
    a = -torch.exp(torch.linspace(-4.0, 1.0, h, dtype=d))  # A_h from -0.018 to -2.7
    out = {
        "x": torch.randn(b, t, h, p, generator=gen, dtype=d),
        "dt": F.softplus(torch.randn(b, t, h, generator=gen, dtype=d) - 0.5),
        "A": a[torch.randperm(h, generator=gen)],
        "B": torch.randn(b, t, g, n, generator=gen, dtype=d) / n**0.5,
        "C": torch.randn(b, t, g, n, generator=gen, dtype=d) / n**0.5,
        "D": torch.randn(h, generator=gen, dtype=d),
        "h0": torch.randn(b, h, p, n, generator=gen, dtype=d),
        "reset": None,
    }
    if resets:
        rs = torch.rand(b, t, generator=gen) < 0.03
        rs[0, 0] = True  # t = 0: the initial state is dropped for row 0 only
        for c in (q - 1, q, 2 * q):  # last token of a chunk, first token of the next
            if c < t:
                rs[0, c] = True
        out["reset"] = rs
    return out


def run(fn, inp: dict, dtype: torch.dtype, *, param_dtype: torch.dtype | None = None, chunk_size: int = 64,
        seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Call fn on inputs cast to dtype (A, D in param_dtype, h0 always fp32+), backprop random cotangents."""
    param_dtype = param_dtype or dtype
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    casts = {"x": dtype, "dt": dtype, "B": dtype, "C": dtype, "A": param_dtype, "D": param_dtype, "h0": state_dtype}
    leaves = {k: inp[k].to(casts[k]).detach().requires_grad_() for k in NAMES}
    y, s = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
              initial_state=leaves["h0"], reset=inp["reset"], chunk_size=chunk_size)
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), [leaves[k] for k in NAMES])
    return y, s, dict(zip(NAMES, grads))


def rounded(inp: dict, dtype: torch.dtype, param_dtype: torch.dtype) -> dict:
    """The inputs as the low-precision run sees them, in float64 (so the reference computes on the same values)."""
    casts = {"x": dtype, "dt": dtype, "B": dtype, "C": dtype, "A": param_dtype, "D": param_dtype,
             "h0": torch.float32}
    return {**inp, **{k: inp[k].to(casts[k]).double() for k in NAMES}}


def shape_for(t: int) -> tuple[int, int, int, int]:
    return (1, 2, 4, 4) if t >= 1000 else (2, 4, 8, 6)  # (B, H, P, N)


def test_reference_by_hand() -> None:
    """Two tokens, one head, P = N = 1, written out: pins the reference itself to the maths."""
    x, dt, a, b, c, d, h0 = 0.7, (0.3, 1.1), -0.8, (0.5, -1.3), (2.0, 0.4), 0.25, 1.5
    h1 = torch.exp(torch.tensor(dt[0] * a)) * h0 + dt[0] * x * b[0]
    h2 = torch.exp(torch.tensor(dt[1] * a)) * h1 + dt[1] * x * b[1]
    want = torch.stack([h1 * c[0] + d * x, h2 * c[1] + d * x]).view(1, 2, 1, 1)
    t64 = dict(dtype=torch.float64)
    args = (torch.full((1, 2, 1, 1), x, **t64), torch.tensor(dt, **t64).view(1, 2, 1), torch.tensor([a], **t64),
            torch.tensor(b, **t64).view(1, 2, 1, 1), torch.tensor(c, **t64).view(1, 2, 1, 1), torch.tensor([d], **t64))
    for fn in (ssm_scan_reference, ssm_scan_chunked):
        y, s = fn(*args, initial_state=torch.full((1, 1, 1, 1), h0, **t64))
        torch.testing.assert_close(y, want.to(torch.float64))
        torch.testing.assert_close(s.view(()), h2.to(torch.float64))
        y, _ = fn(*args, initial_state=torch.full((1, 1, 1, 1), h0, **t64), reset=torch.tensor([[False, True]]))
        torch.testing.assert_close(y[0, 1].view(()), torch.tensor(dt[1] * x * b[1] * c[1] + d * x, **t64))


@pytest.mark.parametrize("resets", [False, True])
@pytest.mark.parametrize("groups", ["one", "per_head"])
@pytest.mark.parametrize("t", [1, 63, 64, 65, 100, 1000])
def test_fp32_matches_reference(t: int, groups: str, resets: bool) -> None:
    b, h, p, n = shape_for(t)
    inp = make_inputs(b, t, h, p, n, 1 if groups == "one" else h, seed=t, resets=resets)
    y_ref, s_ref, g_ref = run(ssm_scan_reference, inp, torch.float64)
    y, s, grads = run(ssm_scan_chunked, inp, torch.float32)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert_close(y, y_ref, name="y")
    assert_close(s, s_ref, name="final_state")
    for k in NAMES:
        assert_close(grads[k], g_ref[k], kind="grad", name=f"d{k}")


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", ["one", "per_head"])
@pytest.mark.parametrize("t", [65, 100])
def test_bf16_matches_fp32_reference(t: int, groups: str, param_dtype: torch.dtype) -> None:
    b, h, p, n = shape_for(t)
    inp = make_inputs(b, t, h, p, n, 1 if groups == "one" else h, seed=10 + t, resets=True)
    y, s, grads = run(ssm_scan_chunked, inp, torch.bfloat16, param_dtype=param_dtype)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    # fp32 reference on the very values the bf16 run received
    y_ref, s_ref, g_ref = run(ssm_scan_reference, rounded(inp, torch.bfloat16, param_dtype), torch.float32)
    assert_close(y, y_ref, dtype=torch.bfloat16, name="y")
    assert_close(s, s_ref, dtype=torch.bfloat16, name="final_state")
    for k in NAMES:
        assert_close(grads[k], g_ref[k], dtype=torch.bfloat16, kind="grad", name=f"d{k}")


@pytest.mark.parametrize("groups", [1, 2])
def test_float64_chunked_is_exact(groups: int) -> None:
    inp = make_inputs(2, 100, 4, 8, 6, groups, seed=3, resets=True, q=16)
    y_ref, s_ref, g_ref = run(ssm_scan_reference, inp, torch.float64)
    y, s, grads = run(ssm_scan_chunked, inp, torch.float64, chunk_size=16)
    assert_close(y, y_ref, tol=1e-12, name="y")
    assert_close(s, s_ref, tol=1e-12, name="final_state")
    for k in NAMES:
        assert_close(grads[k], g_ref[k], tol=1e-11, name=f"d{k}")


def test_gradcheck() -> None:
    inp = make_inputs(2, 11, 2, 2, 3, 1, seed=4, resets=True, q=4)
    args = tuple(inp[k].clone().requires_grad_() for k in NAMES)

    def f(x, dt, a, b, c, d, h0):
        return ssm_scan_chunked(x, dt, a, b, c, d, initial_state=h0, reset=inp["reset"], chunk_size=4)

    assert torch.autograd.gradcheck(f, args)


def test_chunk_invariance_with_carried_state() -> None:
    t = 150
    inp = make_inputs(2, t, 4, 8, 6, 2, seed=5, resets=True)
    x, dt, a, b, c, d, h0 = (inp[k].float().requires_grad_() for k in NAMES)
    rs = inp["reset"]
    y_full, s_full = ssm_scan_chunked(x, dt, a, b, c, d, initial_state=h0, reset=rs)
    for q in (1, 7, 16, 150, 256):
        y_q, s_q = ssm_scan_chunked(x, dt, a, b, c, d, initial_state=h0, reset=rs, chunk_size=q)
        assert_close(y_q, y_full, name=f"y chunk_size={q}")
        assert_close(s_q, s_full, name=f"state chunk_size={q}")
    ys, state = [], h0
    for lo, hi in ((0, 37), (37, 64), (64, 65), (65, 150)):
        y_part, state = ssm_scan_chunked(x[:, lo:hi], dt[:, lo:hi], a, b[:, lo:hi], c[:, lo:hi], d,
                                         initial_state=state, reset=rs[:, lo:hi], chunk_size=16)
        ys.append(y_part)
    y_split = torch.cat(ys, dim=1)
    assert_close(y_split, y_full, name="y split")
    assert_close(state, s_full, name="state split")
    gy = torch.randn_like(y_full)
    g_full = torch.autograd.grad((y_full * gy).sum(), [x, a, h0])
    g_split = torch.autograd.grad((y_split * gy).sum(), [x, a, h0])
    for name, g1, g2 in zip(("x", "A", "h0"), g_split, g_full):
        assert_close(g1, g2, kind="grad", name=f"d{name} split")


@pytest.mark.parametrize("groups", [1, 4])
def test_step_equals_reference(groups: int) -> None:
    t = 40
    inp = make_inputs(2, t, 4, 8, 6, groups, seed=6, resets=True, q=16)
    y_ref, s_ref, g_ref = run(ssm_scan_reference, inp, torch.float64)

    def stepped(x, dt, a, b, c, d, *, initial_state, reset, chunk_size):
        state, ys = initial_state, []
        for i in range(x.shape[1]):
            before = state.detach().clone()
            y_i, new = ssm_step(x[:, i:i + 1], dt[:, i:i + 1], a, b[:, i:i + 1], c[:, i:i + 1], d, state,
                                reset=reset[:, i:i + 1])
            assert torch.equal(state, before), "ssm_step modified its input state"
            assert y_i.shape == (2, 1, 4, 8) and new.dtype == torch.float32
            ys.append(y_i)
            state = new
        return torch.cat(ys, dim=1), state

    y, s, grads = run(stepped, inp, torch.float32)
    assert_close(y, y_ref, name="y step")
    assert_close(s, s_ref, name="state step")
    for k in NAMES:
        assert_close(grads[k], g_ref[k], kind="grad", name=f"d{k} step")
    x, dt, a, b, c = (inp[k].float() for k in NAMES[:5])
    y0, s0 = ssm_step(x[:, :1], dt[:, :1], a, b[:, :1], c[:, :1], None, None)
    y0_ref, s0_ref = ssm_scan_reference(x[:, :1], dt[:, :1], a, b[:, :1], c[:, :1])
    assert_close(y0, y0_ref, name="y step no state")
    assert_close(s0, s0_ref, name="state step no state")


@pytest.mark.parametrize("t0", [0, 37, 64])
def test_reset_equals_fresh_run(t0: int) -> None:
    t = 130
    inp = make_inputs(2, t, 4, 8, 6, 2, seed=7)
    x, dt, a, b, c, d, h0 = (inp[k].float() for k in NAMES)
    rs = torch.zeros(2, t, dtype=torch.bool)
    rs[:, t0] = True
    if t0 == 0:
        poison_(h0)  # a dropped state must not leak, not even NaN * 0
    for fn in (ssm_scan_chunked, ssm_scan_reference):
        y, s = fn(x, dt, a, b, c, d, initial_state=h0, reset=rs)
        y_fresh, s_fresh = fn(x[:, t0:], dt[:, t0:], a, b[:, t0:], c[:, t0:], d)
        assert_close(y[:, t0:], y_fresh, name=f"{fn.__name__} y after reset")
        assert_close(s, s_fresh, name=f"{fn.__name__} state after reset")
        if t0 > 0:  # the tokens before the reset still see h0
            y_plain, _ = fn(x[:, :t0], dt[:, :t0], a, b[:, :t0], c[:, :t0], d, initial_state=h0)
            assert_close(y[:, :t0], y_plain, name=f"{fn.__name__} y before reset")
    if t0 == 0:
        h0 = h0.requires_grad_()
        y, s = ssm_scan_chunked(x, dt, a, b, c, d, initial_state=h0, reset=rs)
        (g,) = torch.autograd.grad(y.sum() + s.sum(), [h0])
        assert torch.equal(g, torch.zeros_like(g))


def test_reset_changes_output() -> None:
    """Guards the tests above against a reset that silently does nothing."""
    inp = make_inputs(1, 80, 4, 8, 6, 1, seed=8)
    x, dt, a, b, c, d, h0 = (inp[k].float() for k in NAMES)
    rs = torch.zeros(1, 80, dtype=torch.bool)
    rs[0, 50] = True
    y0, _ = ssm_scan_chunked(x, dt, a, b, c, d, initial_state=h0)
    y1, _ = ssm_scan_chunked(x, dt, a, b, c, d, initial_state=h0, reset=rs)
    assert torch.equal(y0[:, :50], y1[:, :50])
    assert rel_err(y1[:, 50:], y0[:, 50:]) > 1e-3


def test_causality() -> None:
    inp = make_inputs(1, 100, 4, 8, 6, 2, seed=9)
    x, dt, a, b, c, d, h0 = (inp[k].float() for k in NAMES)
    y, _ = ssm_scan_chunked(x, dt, a, b, c, d, initial_state=h0, chunk_size=32)
    x2, dt2, b2 = x.clone(), dt.clone(), b.clone()
    x2[:, 45] += 1.0
    dt2[:, 45] *= 3.0
    b2[:, 45] -= 1.0
    y2, _ = ssm_scan_chunked(x2, dt2, a, b2, c, d, initial_state=h0, chunk_size=32)
    torch.testing.assert_close(y2[:, :45], y[:, :45], rtol=0, atol=1e-6)
    assert rel_err(y2[:, 45:], y[:, 45:]) > 1e-3


def test_extreme_decays_stay_finite() -> None:
    """Decays from exp(-2000) per token to 1 - 1e-6: no overflow, underflow handled, gradients finite."""
    inp = make_inputs(2, 100, 4, 8, 6, 1, seed=11, resets=True)
    inp["A"] = torch.tensor([-1e-6, -1e-3, -50.0, -1000.0], dtype=torch.float64)
    inp["dt"] = inp["dt"] * 2
    y_ref, s_ref, g_ref = run(ssm_scan_reference, inp, torch.float64)
    y, s, grads = run(ssm_scan_chunked, inp, torch.float32)
    assert_close(y, y_ref, name="y")
    assert_close(s, s_ref, name="final_state")
    for k in NAMES:
        assert_close(grads[k], g_ref[k], kind="grad", name=f"d{k}")


def test_no_D_no_initial_state() -> None:
    inp = make_inputs(2, 70, 4, 8, 6, 2, seed=12)
    x, dt, a, b, c = (inp[k].float() for k in NAMES[:5])
    y, s = ssm_scan_chunked(x, dt, a, b, c)
    y_ref, s_ref = ssm_scan_reference(*(inp[k] for k in NAMES[:5]))
    assert_close(y, y_ref, name="y")
    assert_close(s, s_ref, name="final_state")


def test_dispatch() -> None:
    assert dispatch.backends("ssm_scan")[0] == "chunked"
    inp = make_inputs(1, 20, 4, 8, 6, 1, seed=13)
    args = tuple(inp[k].float() for k in NAMES[:6])
    y_default, _ = ssm_scan(*args)
    assert torch.equal(y_default, ssm_scan_chunked(*args)[0])
    with dispatch.force_backend("ssm_scan", "reference"):
        y_forced, _ = ssm_scan(*args)
    assert torch.equal(y_forced, ssm_scan_reference(*args)[0])
    assert torch.equal(ssm_scan(*args, backend="reference")[0], y_forced)


def test_bad_inputs_raise() -> None:
    inp = make_inputs(2, 10, 4, 8, 6, 2, seed=14)
    x, dt, a, b, c, d, h0 = (inp[k].float() for k in NAMES)
    with pytest.raises(ValueError, match="dt"):
        ssm_scan_chunked(x, dt[:, :5], a, b, c)
    with pytest.raises(ValueError, match="divide"):
        ssm_scan_chunked(x, dt, a, b[:, :, :1].expand(2, 10, 3, 6), c[:, :, :1].expand(2, 10, 3, 6))
    with pytest.raises(ValueError, match="reset"):
        ssm_scan_chunked(x, dt, a, b, c, reset=torch.zeros(2, 10))
    with pytest.raises(ValueError, match="initial_state"):
        ssm_scan_chunked(x, dt, a, b, c, initial_state=h0[:, :2])
    with pytest.raises(ValueError, match="T = 1"):
        ssm_step(x, dt, a, b, c, d, h0)
