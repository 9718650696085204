"""Delta rule: chunked (WY/UT) backend against the token-loop reference, plus semantic properties.

Notation: q, k, v, β (beta), g (log decay), S (state [B, H, Dv, Dk]), r (reset [B, T]), T sequence length.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memlm.ops import dispatch
from memlm.ops.delta_rule import chunked, delta_rule, delta_rule_step, reference
from memlm.ops.testing import assert_close, poison_, rel_err

FAST = {"chunked": chunked.delta_rule}  # Triton backends join here once they exist (on their own device)
NAMES = ("q", "k", "v", "beta", "g", "initial_state")


def make_inputs(B: int, T: int, H: int, Dk: int, Dv: int, *, gated: bool, init: bool, seed: int = 0,
                g_scale: float = 0.3) -> dict[str, torch.Tensor | None]:
    """float32 inputs, stored as strided views into NaN-poisoned buffers so a kernel that reads past a view or
    assumes contiguity shows up as NaN."""
    gen = torch.Generator().manual_seed(seed)

    def view(x: torch.Tensor) -> torch.Tensor:
        buf = poison_(torch.empty(x.shape[0], x.shape[1] + 3, *x.shape[2:]))
        buf[:, :x.shape[1]] = x
        return buf[:, :x.shape[1]]

    q = F.normalize(torch.randn(B, T, H, Dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, Dk, generator=gen), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=gen)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    g = -g_scale * torch.rand(B, T, H, generator=gen) if gated else None
    s0 = torch.randn(B, H, Dv, Dk, generator=gen) if init else None
    return {"q": view(q), "k": view(k), "v": view(v), "beta": view(beta), "g": None if g is None else view(g),
            "initial_state": s0}


def make_reset(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """Random resets plus the awkward ones: t = 0 (row 0), a chunk boundary and two inside one chunk (row 1)."""
    gen = torch.Generator().manual_seed(seed + 1)
    r = torch.rand(B, T, generator=gen) < 0.03
    r[0, 0] = True
    if B > 1:
        r[1, 0] = False  # row 1 keeps its initial state
        for t in (64, 128, 10, 17, 70, 75):
            if t < T:
                r[1, t] = True
    return r


def run(fn, inp: dict, *, dtype: torch.dtype = torch.float32, reset=None, chunk_size: int = 64, grads: bool = True,
        seed: int = 0):
    """Run fn on copies of inp cast to dtype (state stays ≥ float32); return o, S and the gradients of a random
    linear functional of (o, S) with respect to every input."""
    leaves = {}
    for name, x in inp.items():
        if x is None:
            leaves[name] = None
            continue
        dt = torch.float64 if dtype == torch.float64 else (torch.float32 if name == "initial_state" else dtype)
        leaves[name] = x.detach().to(dt).requires_grad_(grads)
    o, S = fn(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], leaves["g"],
              initial_state=leaves["initial_state"], reset=reset, chunk_size=chunk_size)
    out = {"o": o, "S": S}
    if grads:
        gen = torch.Generator().manual_seed(seed + 7)
        wo = torch.randn(o.shape, generator=gen, dtype=torch.float64)
        ws = torch.randn(S.shape, generator=gen, dtype=torch.float64)
        ((o.double() * wo).sum() + (S.double() * ws).sum()).backward()
        for name, x in leaves.items():
            if x is not None:
                out["d" + name] = x.grad
    return out


def compare(fast: dict, ref: dict, dtype: torch.dtype, tag: str = "") -> None:
    for key, r in ref.items():
        assert key in fast, f"{tag}: missing {key}"
        kind = "out" if key in ("o", "S") else "grad"
        assert_close(fast[key].float(), r, dtype=dtype, kind=kind, name=f"{tag} {key}")


# ----------------------------------------------------------------------------------------------- fp32 vs fp64 ref

@pytest.mark.parametrize("backend", list(FAST))
@pytest.mark.parametrize("T", [1, 63, 64, 65, 100])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
def test_fp32_matches_reference(backend, T, gated, init, with_reset):
    inp = make_inputs(2, T, 2, 16, 12, gated=gated, init=init, seed=T)
    reset = make_reset(2, T, seed=T) if with_reset else None
    ref = run(reference.delta_rule, inp, dtype=torch.float64, reset=reset)
    fast = run(FAST[backend], inp, reset=reset)
    assert fast["o"].dtype == torch.float32 and fast["S"].dtype == torch.float32
    compare(fast, ref, torch.float32, f"{backend} T={T}")


@pytest.mark.parametrize("backend", list(FAST))
@pytest.mark.parametrize("gated,init,with_reset", [(False, False, False), (True, True, True)])
def test_fp32_matches_reference_long(backend, gated, init, with_reset):
    T = 1000
    inp = make_inputs(1, T, 2, 8, 8, gated=gated, init=init, seed=5, g_scale=0.05)
    reset = make_reset(1, T, seed=5) if with_reset else None
    ref = run(reference.delta_rule, inp, dtype=torch.float64, reset=reset)
    compare(run(FAST[backend], inp, reset=reset), ref, torch.float32, f"{backend} T={T}")


def test_reference_fp32_matches_fp64():
    # the fp32 specification itself is accurate, so fast-vs-fp64 tolerances are meaningful
    inp = make_inputs(2, 100, 2, 16, 12, gated=True, init=True)
    reset = make_reset(2, 100)
    compare(run(reference.delta_rule, inp, reset=reset), run(reference.delta_rule, inp, dtype=torch.float64,
                                                                 reset=reset), torch.float32, "reference fp32")


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 100, 128])
def test_chunk_size_does_not_matter(chunk_size):
    inp = make_inputs(2, 100, 2, 8, 8, gated=True, init=True, seed=3)
    reset = make_reset(2, 100, seed=3)
    ref = run(chunked.delta_rule, inp, dtype=torch.float64, reset=reset)
    got = run(chunked.delta_rule, inp, dtype=torch.float64, reset=reset, chunk_size=chunk_size)
    compare(got, ref, torch.float64, f"chunk_size={chunk_size}")


def test_strong_decay_stays_finite_and_exact():
    # g down to −40 per token: α underflows to ~0 inside a chunk; nothing may become inf/NaN
    inp = make_inputs(2, 130, 2, 8, 8, gated=True, init=True, seed=11, g_scale=40.0)
    reset = make_reset(2, 130, seed=11)
    ref = run(reference.delta_rule, inp, dtype=torch.float64, reset=reset)
    compare(run(chunked.delta_rule, inp, reset=reset), ref, torch.float32, "strong decay")


# ------------------------------------------------------------------------------------------------------- bf16

@pytest.mark.parametrize("backend", list(FAST))
@pytest.mark.parametrize("T", [65, 200])
def test_bf16_matches_fp32_reference(backend, T):
    inp = make_inputs(2, T, 2, 16, 16, gated=True, init=True, seed=T)
    # the reference sees the same bf16-rounded values, so only the backend's own error is measured
    inp = {n: (x.to(torch.bfloat16).float() if x is not None and n != "initial_state" else x) for n, x in inp.items()}
    reset = make_reset(2, T, seed=T)
    ref = run(reference.delta_rule, inp, reset=reset)
    fast = run(FAST[backend], inp, dtype=torch.bfloat16, reset=reset)
    assert fast["o"].dtype == torch.bfloat16 and fast["S"].dtype == torch.float32
    assert fast["dq"].dtype == torch.bfloat16
    compare(fast, ref, torch.bfloat16, f"{backend} bf16 T={T}")


# ------------------------------------------------------------------------------------------- semantic properties

@pytest.mark.parametrize("split", [1, 40, 64, 77])
def test_split_with_carried_state_equals_one_call(split):
    T = 150
    inp = make_inputs(2, T, 2, 8, 8, gated=True, init=True, seed=4)
    reset = make_reset(2, T, seed=4)
    x = {n: (t.detach().clone().requires_grad_() if t is not None else None) for n, t in inp.items()}
    o_full, s_full = chunked.delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"],
                                        initial_state=x["initial_state"], reset=reset)
    parts, s = [], x["initial_state"]
    for a, b in ((0, split), (split, T)):
        o, s = chunked.delta_rule(x["q"][:, a:b], x["k"][:, a:b], x["v"][:, a:b], x["beta"][:, a:b],
                                  x["g"][:, a:b], initial_state=s, reset=reset[:, a:b])
        parts.append(o)
    o_split = torch.cat(parts, dim=1)
    assert_close(o_split, o_full, name="o")
    assert_close(s, s_full, name="S")
    w = torch.randn_like(o_full)
    g_full = torch.autograd.grad((o_full * w).sum() + s_full.sum(), [x["k"], x["initial_state"]])
    g_split = torch.autograd.grad((o_split * w).sum() + s.sum(), [x["k"], x["initial_state"]])
    for a, b, n in zip(g_split, g_full, ("dk", "dS0")):
        assert_close(a, b, kind="grad", name=n)


@pytest.mark.parametrize("layout", ["seq", "squeezed"])
def test_step_matches_reference_and_chunked(layout):
    T = 70
    inp = make_inputs(2, T, 2, 8, 6, gated=True, init=True, seed=9)
    reset = make_reset(2, T, seed=9)
    q, k, v, beta, g, s = (inp[n] for n in NAMES)
    outs = []
    for t in range(T):
        sl = slice(t, t + 1) if layout == "seq" else t
        o, s = delta_rule_step(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], g[:, sl], s, reset[:, sl])
        assert s.dtype == torch.float32
        outs.append(o if layout == "seq" else o[:, None])
    o_step = torch.cat(outs, dim=1)
    assert o_step.shape == (2, T, 2, 6)
    for fn in (reference.delta_rule, chunked.delta_rule):
        o_ref, s_ref = fn(q, k, v, beta, g, initial_state=inp["initial_state"], reset=reset)
        assert_close(o_step, o_ref, name="o")
        assert_close(s, s_ref, name="S")


@pytest.mark.parametrize("fn", [reference.delta_rule, chunked.delta_rule], ids=["reference", "chunked"])
def test_reset_equals_fresh_sequence(fn):
    T = 150
    inp = make_inputs(1, T, 2, 8, 8, gated=True, init=True, seed=12)
    q, k, v, beta, g, s0 = (inp[n] for n in NAMES)
    # resets at a chunk boundary (64), twice inside one chunk (80, 90) and mid-chunk (130)
    starts = [64, 80, 90, 130]
    reset = torch.zeros(1, T, dtype=torch.bool)
    reset[0, starts] = True
    o, s = fn(q, k, v, beta, g, initial_state=s0, reset=reset)
    for a, b in zip(starts, starts[1:] + [T]):
        o_fresh, s_fresh = fn(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b], g[:, a:b])
        assert_close(o[:, a:b], o_fresh, name=f"o[{a}:{b}]")
    assert_close(s, s_fresh, name="final state after last reset")
    # before the first reset nothing changes: equals a run without resets on [0:64]
    o_pre, _ = fn(q[:, :64], k[:, :64], v[:, :64], beta[:, :64], g[:, :64], initial_state=s0)
    assert_close(o[:, :64], o_pre, name="o before first reset")


@pytest.mark.parametrize("fn", [reference.delta_rule, chunked.delta_rule], ids=["reference", "chunked"])
def test_reset_at_zero_ignores_initial_state(fn):
    inp = make_inputs(2, 65, 2, 8, 8, gated=True, init=True, seed=2)
    s0 = inp["initial_state"].clone().requires_grad_()
    reset = torch.zeros(2, 65, dtype=torch.bool)
    reset[0, 0] = True
    o, s = fn(inp["q"], inp["k"], inp["v"], inp["beta"], inp["g"], initial_state=s0, reset=reset)
    o_fresh, _ = fn(inp["q"][:1], inp["k"][:1], inp["v"][:1], inp["beta"][:1], inp["g"][:1])
    assert_close(o[:1], o_fresh, name="row 0")
    (o.sum() + s.sum()).backward()
    assert s0.grad[0].abs().max() == 0, "a reset at t=0 must cut the gradient to the initial state"
    assert s0.grad[1].abs().max() > 0


def test_causal():
    inp = make_inputs(1, 100, 2, 8, 8, gated=True, init=True, seed=6)
    reset = make_reset(1, 100, seed=6)
    o, _ = chunked.delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], inp["g"],
                              initial_state=inp["initial_state"], reset=reset)
    for t in (0, 37, 64, 99):
        v2 = inp["v"].clone()
        v2[:, t] += 1.0
        k2 = inp["k"].clone()
        k2[:, t] = F.normalize(torch.randn_like(k2[:, t]), dim=-1)
        o2, _ = chunked.delta_rule(inp["q"], k2, v2, inp["beta"], inp["g"], initial_state=inp["initial_state"],
                                   reset=reset)
        assert torch.equal(o2[:, :t], o[:, :t]), f"token {t} changed earlier outputs"
        assert not torch.equal(o2[:, t], o[:, t])


def test_broken_reset_is_detected(monkeypatch):
    """The comparison has teeth: a chunked variant that ignores resets inside chunks fails it."""
    inp = make_inputs(2, 100, 2, 8, 8, gated=True, init=True, seed=8)
    reset = make_reset(2, 100, seed=8)
    ref = run(reference.delta_rule, inp, dtype=torch.float64, reset=reset, grads=False)
    monkeypatch.setattr(chunked, "_segment_masks", lambda r: (None, None))
    broken = run(chunked.delta_rule, inp, reset=reset, grads=False)
    assert rel_err(broken["o"], ref["o"]) > 1e-2
    with pytest.raises(AssertionError):
        compare(broken, ref, torch.float32, "broken")


def test_scale_and_no_final_state():
    inp = make_inputs(1, 20, 2, 8, 8, gated=False, init=False, seed=1)
    o1, s = chunked.delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], scale=0.25, output_final_state=False)
    o2, _ = reference.delta_rule(inp["q"] * 0.25, inp["k"], inp["v"], inp["beta"])
    assert s is None
    assert_close(o1, o2, name="scaled")


def test_dispatch_defaults_to_chunked_and_can_be_forced(monkeypatch):
    inp = make_inputs(1, 10, 1, 4, 4, gated=False, init=False)
    args = (inp["q"], inp["k"], inp["v"], inp["beta"])
    assert dispatch.get("delta_rule", args=args) is chunked.delta_rule
    with dispatch.force_backend("delta_rule", "reference"):
        assert dispatch.get("delta_rule", args=args) is reference.delta_rule
    monkeypatch.setenv("MEMLM_BACKEND_DELTA_RULE", "reference")
    assert dispatch.get("delta_rule", args=args) is reference.delta_rule
    assert_close(delta_rule(*args)[0], chunked.delta_rule(*args)[0])


def test_bad_shapes_raise():
    inp = make_inputs(1, 10, 2, 4, 4, gated=True, init=False)
    q, k, v, beta, g = (inp[n] for n in NAMES[:5])
    with pytest.raises(ValueError, match="beta"):
        chunked.delta_rule(q, k, v, beta[..., :1], g)
    with pytest.raises(ValueError, match="reset"):
        chunked.delta_rule(q, k, v, beta, g, reset=torch.zeros(1, 10))
    with pytest.raises(ValueError, match="initial_state"):
        chunked.delta_rule(q, k, v, beta, g, initial_state=torch.zeros(1, 2, 4, 5))


@pytest.mark.parametrize("C", [1, 15, 16, 17, 63, 64, 100, 128])
def test_unit_lower_inverse_matches_triangular_solve(C):
    """The blocked inverse behind the UT transform equals cuBLAS/LAPACK's triangular solve, values and gradients,
    in float64 and float32, at sizes around its 16-wide blocks; entries on/above the diagonal are ignored."""
    g = torch.Generator().manual_seed(C)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        A = (torch.randn(2, 3, C, C, generator=g, dtype=dtype) * 0.4).tril(-1)
        junk = torch.randn(C, C, generator=g, dtype=dtype).triu()      # must not matter
        A = (A + junk).requires_grad_()
        T = chunked.unit_lower_inverse(A)
        eye = torch.eye(C, dtype=dtype)
        M = eye + A.detach().tril(-1)
        ref = torch.linalg.solve_triangular(M, eye.expand_as(M), upper=False, unitriangular=True)
        assert rel_err(T, ref) <= tol
        w = torch.randn(T.shape, generator=g, dtype=dtype)
        (dA,) = torch.autograd.grad((T * w).sum(), A)
        Ad = A.detach().tril(-1).requires_grad_()
        ref2 = torch.linalg.solve_triangular(eye + Ad, eye.expand_as(M), upper=False, unitriangular=True)
        (dref,) = torch.autograd.grad((ref2 * w).sum(), Ad)
        assert rel_err(dA, dref.tril(-1)) <= tol
        assert (dA.triu() == 0).all()


def test_prepare_under_bf16_autocast_keeps_the_recurrence_inputs_float32():
    """Training runs the op under bf16 autocast: the UT transform must stay float32 (the Triton state recurrence
    refuses anything else, and a bf16 inverse would lose accuracy); the output stays within bf16 tolerance."""
    g = torch.Generator().manual_seed(3)
    B, T, H, D = 2, 100, 2, 16
    q, k = (F.normalize(torch.randn(B, T, H, D, generator=g), dim=-1) for _ in range(2))
    v, beta = torch.randn(B, T, H, D, generator=g), torch.rand(B, T, H, generator=g)
    gate = -torch.rand(B, T, H, generator=g) * 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = chunked.prepare(q, k, v, beta, gate, initial_state=None, reset=None, chunk_size=64, scale=None)
        o, _ = chunked.delta_rule(q, k, v, beta, gate)
    assert all(t.dtype == torch.float32 for t in (c.U, c.Wk, c.k_end, c.gamma_last, c.S0))
    assert_close(o.float(), reference.delta_rule(q, k, v, beta, gate)[0], dtype=torch.bfloat16)
