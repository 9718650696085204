"""Tests of memlm.ops.neural_memory: chunked vs reference (outputs, state, all gradients), chunk invariance,
causality, resets, read-only mode, the c = C = 1 online limit, and that the memory actually learns.

Notation: B batch, T tokens, H heads, D = Dk = Dv head width, E hidden width, C chunk size, c window,
W1 [E, F], W2 [Dv, E] fast weights, S momenta, γ η θ α gates.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

from memlm.ops import dispatch
from memlm.ops.neural_memory import (
    NeuralMemoryState,
    empty_pending,
    feature_dim,
    memory_read,
    neural_memory,
    neural_memory_reference,
    newton_schulz5,
    newton_schulz5_gram,
    omega_grad,
    poly_features,
)
from memlm.ops.testing import assert_close, rel_err

GATES = ("gamma", "eta", "theta", "alpha")


pytestmark = pytest.mark.usefixtures("one_thread")


def make(B=2, T=20, H=2, Dk=4, Dv=4, E=8, *, poly=False, dtype=torch.float64, seed=0, grad=False,
         theta_scale=0.1):
    """Random inputs with gates in their ranges and learned initial weights W1_init [H, E, F], W2_init [H, Dv, E]."""
    g = torch.Generator().manual_seed(seed)
    F = feature_dim(Dk, poly)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    x = dict(q=Fn.normalize(r(B, T, H, Dk), dim=-1), k=Fn.normalize(r(B, T, H, Dk), dim=-1), v=r(B, T, H, Dv),
             gamma=torch.sigmoid(r(B, T, H)), eta=torch.sigmoid(r(B, T, H)),
             theta=theta_scale * torch.sigmoid(r(B, T, H)), alpha=0.1 * torch.sigmoid(r(B, T, H)),
             W1_init=r(H, E, F) / F**0.5, W2_init=r(H, Dv, E) / E**0.5)
    return {n: t.to(dtype).requires_grad_(grad) for n, t in x.items()}


def call(fn, x, *, state=None, sl=slice(None), reset=None, **kw):
    """Run fn on tokens x[:, sl] from `state` (None: fresh, weights = expanded W_init)."""
    B = x["q"].shape[0]
    if state is None:
        W1, W2 = x["W1_init"].expand(B, -1, -1, -1), x["W2_init"].expand(B, -1, -1, -1)
        S1 = S2 = pending = None
    else:
        W1, W2, S1, S2, pending = state
    seq = [x[n][:, sl] for n in ("q", "k", "v", *GATES)]
    rs = None if reset is None else reset[:, sl]
    return fn(*seq, W1, W2, S1, S2, pending=pending, reset=rs, W1_init=x["W1_init"], W2_init=x["W2_init"], **kw)


def state_tensors(s: NeuralMemoryState) -> dict[str, torch.Tensor]:
    pend = {f"pending.{n}": t for n, t in s.pending._asdict().items()}
    return {"W1": s.W1, "W2": s.W2, "S1": s.S1, "S2": s.S2, **pend}


def assert_states_close(a: NeuralMemoryState, b: NeuralMemoryState, tol=1e-10):
    ta, tb = state_tensors(a), state_tensors(b)
    for n in ta:
        if tb[n].dtype == torch.bool:
            assert torch.equal(ta[n], tb[n]), n
        elif tb[n].numel():
            assert_close(ta[n], tb[n], tol=tol, name=n)
        else:
            assert ta[n].shape == tb[n].shape, n


def scalar_loss(o, s, seed=1):
    """A random linear functional of the outputs and of the final weights and momenta (fixed by seed)."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for t in (o, s.W1, s.W2, s.S1, s.S2):
        total = total + (t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum()
    return total


def grads(loss, tensors):
    """Gradients with unused inputs as zeros (the reference and the chunked path may differ in what they touch)."""
    gs = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, tensors)]


def random_resets(B, T, seed, p=0.04):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, generator=g) < p


# ------------------------------------------------------------------------------------------------ building blocks


@pytest.mark.parametrize("d", [1, 3, 8])
def test_poly_features_gradient_matches_indexing(d):
    """φ's hand-written backward (gathers and one-hot matmuls, not autograd of x[..., i]) equals autograd of the plain
    indexing form, on a non-contiguous input, and is itself differentiable (double backward)."""
    x = torch.randn(6, 5, d, dtype=torch.float64).transpose(0, 1).requires_grad_()
    i, j = torch.triu_indices(d, d)
    s = torch.ones(i.shape, dtype=torch.float64).masked_fill(i == j, 0.5 ** 0.5)
    plain = torch.cat([x, x[..., i] * x[..., j] * s], dim=-1)
    assert rel_err(poly_features(x), plain) < 1e-15
    g = torch.randn_like(plain)
    got, = torch.autograd.grad(poly_features(x), x, g)
    want, = torch.autograd.grad(plain, x, g)
    assert rel_err(got, want) < 1e-14
    torch.autograd.gradgradcheck(poly_features, (x[:2, :2].detach().requires_grad_(),))


def test_poly_features_kernel():
    a, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    pa, pb = poly_features(a), poly_features(b)
    assert pa.shape == (5, feature_dim(6, True)) == (5, 6 + 21)
    dot = (a * b).sum(-1)
    assert_close((pa * pb).sum(-1), dot + dot**2 / 2, tol=1e-12)


def test_newton_schulz5_orthogonalises():
    torch.manual_seed(0)
    s = torch.randn(3, 8, 14, dtype=torch.float64)
    x = newton_schulz5(s)
    sv = torch.linalg.svdvals(x)
    assert sv.min() > 0.5 and sv.max() < 1.3, sv  # the quintic lands singular values near 1, not exactly on it
    u, _, vh = torch.linalg.svd(s, full_matrices=False)
    assert rel_err(x, u @ vh) < 0.3
    assert_close(newton_schulz5(s.mT), x.mT, tol=1e-12, name="orientation")
    assert_close(newton_schulz5(5.0 * s), x, tol=1e-12, name="scale invariance")
    assert newton_schulz5(torch.zeros(2, 3, 4)).abs().max() == 0


@pytest.mark.parametrize("shape", [(3, 8, 14), (2, 9, 4), (1, 6, 6), (2, 64, 560)])
def test_newton_schulz5_gram_form_is_the_same_map(shape):
    """The Gram form (the Triton kernels' algorithm) equals the iterative form in float64, values and gradients, on
    Gaussian, rank-deficient and zero matrices."""
    torch.manual_seed(sum(shape))
    low = torch.randn(*shape[:-1], 2, dtype=torch.float64) @ torch.randn(*shape[:-2], 2, shape[-1], dtype=torch.float64)
    for s in (torch.randn(*shape, dtype=torch.float64), low, torch.zeros(*shape, dtype=torch.float64)):
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        ya, yb = newton_schulz5(a), newton_schulz5_gram(b)
        g = torch.randn_like(ya)
        assert (ya - yb).abs().max() <= 1e-11 * max(1.0, ya.abs().max().item())
        ga, = torch.autograd.grad(ya, a, g)
        gb, = torch.autograd.grad(yb, b, g)
        assert (ga - gb).abs().max() <= 1e-9 * max(1.0, ga.abs().max().item())


@pytest.mark.parametrize("residual", [True, False])
def test_omega_grad_closed_form_matches_autograd(residual):
    torch.manual_seed(0)
    B, H, c, F, E, Dv = 2, 3, 7, 5, 6, 5 if residual else 3
    W1 = torch.randn(B, H, E, F, dtype=torch.float64, requires_grad=True)
    W2 = torch.randn(B, H, Dv, E, dtype=torch.float64, requires_grad=True)
    x, v, w = torch.randn(B, H, c, F, dtype=torch.float64), torch.randn(B, H, c, Dv, dtype=torch.float64), \
        torch.rand(B, H, c, dtype=torch.float64)
    xraw = x[..., :Dv] if residual else None
    loss = (w * (memory_read(W1, W2, x, xraw) - v).square().sum(-1)).sum()
    ref = torch.autograd.grad(loss, (W1, W2))
    got = omega_grad(W1, W2, x, xraw, v, w)
    assert_close(got[0], ref[0], tol=1e-12, name="G1")
    assert_close(got[1], ref[1], tol=1e-12, name="G2")


def test_gradcheck_chunked_double_backward_safe():
    """gradcheck of the whole op: the outer gradient through two inner steps (which use ∇ of the inner loss)."""
    x = make(B=1, T=6, H=1, Dk=2, Dv=2, E=3, grad=True)

    def f(q, k, v, gamma, theta, W1_init):
        y = dict(x, q=q, k=k, v=v, gamma=gamma, theta=theta, W1_init=W1_init)
        o, s = call(neural_memory, y, chunk_size=2, optimizer="muon")
        return o, s.W1, s.W2

    assert torch.autograd.gradcheck(f, tuple(x[n] for n in ("q", "k", "v", "gamma", "theta", "W1_init")))


# ------------------------------------------------------------------------------------------------ vs reference


CASES = [(T, 64, None, opt) for T in (1, 63, 64, 65, 130) for opt in ("momentum", "muon")]
CASES += [(T, 16, 5, opt) for T in (1, 63, 64, 65, 130) for opt in ("momentum", "muon")]


@pytest.mark.parametrize("T,C,c,opt", CASES)
def test_chunked_matches_reference(T, C, c, opt):
    x = make(T=T, grad=True, seed=T + C)
    kw = dict(chunk_size=C, window=c, optimizer=opt)
    o, s = call(neural_memory, x, **kw)
    o_ref, s_ref = call(neural_memory_reference, x, **kw)
    assert_close(o, o_ref, tol=1e-10, name="o")
    assert_states_close(s, s_ref)
    names = ("q", "k", "v", *GATES, "W1_init", "W2_init")
    got = grads(scalar_loss(o, s), [x[n] for n in names])
    want = grads(scalar_loss(o_ref, s_ref), [x[n] for n in names])
    for n, g, gr in zip(names, got, want):
        # before the first write only the reads have gradients; η first matters in the 2nd write (S starts at 0)
        if n in ("q", "W1_init", "W2_init") or T >= (2 * C if n == "eta" else C):
            assert gr.abs().sum() > 0, f"reference gradient w.r.t. {n} is zero: the test would not see a bug"
            assert_close(g, gr, kind="grad", tol=1e-9, name=f"d/d{n}")
        else:
            assert g.abs().max() == 0 and gr.abs().max() == 0, n


@pytest.mark.parametrize("poly,Dv,opt", [(True, 4, "momentum"), (True, 3, "muon"), (False, 3, "momentum")])
def test_chunked_matches_reference_poly_resets_pending(poly, Dv, opt):
    """Polynomial features, no residual (Dv != Dk), resets (incl. one on a chunk boundary) and a carried pending."""
    T, C = 45, 8
    x = make(T=T, Dv=Dv, poly=poly, grad=True, seed=3)
    reset = torch.zeros(2, T, dtype=torch.bool)
    reset[0, [5, 13, 16, 30]] = True
    reset[1, [24, 27, 40]] = True
    kw = dict(chunk_size=C, window=6, optimizer=opt, poly=poly, reset=reset)
    outs = {}
    for name, fn in (("chunked", neural_memory), ("reference", neural_memory_reference)):
        o1, s1 = call(fn, x, sl=slice(0, 19), **kw)     # leaves 3 tokens pending, one of them after a reset
        o2, s2 = call(fn, x, state=s1, sl=slice(19, T), **kw)
        outs[name] = (torch.cat([o1, o2], 1), s2)
    (o, s), (o_ref, s_ref) = outs["chunked"], outs["reference"]
    assert s_ref.pending.length == T % C
    assert_close(o, o_ref, tol=1e-10, name="o")
    assert_states_close(s, s_ref)
    names = ("q", "k", "v", *GATES, "W1_init", "W2_init")
    got = grads(scalar_loss(o, s), [x[n] for n in names])
    want = grads(scalar_loss(o_ref, s_ref), [x[n] for n in names])
    for n, g, gr in zip(names, got, want):
        assert_close(g, gr, kind="grad", tol=1e-9, name=f"d/d{n}")


@pytest.mark.parametrize("opt", ["momentum", "muon"])
def test_float32_and_bf16(opt):
    x = make(T=40, dtype=torch.float32, seed=4)
    kw = dict(chunk_size=16, window=12, optimizer=opt)
    o_ref, s_ref = call(neural_memory_reference, x, **kw)
    o, s = call(neural_memory, x, **kw)
    assert o.dtype == torch.float32 and s.W1.dtype == torch.float32
    assert_close(o, o_ref, name="fp32 o")
    assert_close(s.W1, s_ref.W1, name="fp32 W1")
    xb = {n: (t.bfloat16() if n in ("q", "k", "v") else t) for n, t in x.items()}
    ob, sb = call(neural_memory, xb, **kw)
    assert ob.dtype == torch.bfloat16 and sb.W1.dtype == torch.float32  # the recurrent state stays float32
    o_ref_b, _ = call(neural_memory_reference, {n: t.float() for n, t in xb.items()}, **kw)
    assert_close(ob, o_ref_b, dtype=torch.bfloat16, name="bf16 o")


# ------------------------------------------------------------------------------------------------ laws


@pytest.mark.parametrize("opt,poly", [("momentum", False), ("muon", True)])
def test_chunk_invariance(opt, poly):
    """One call == token by token == random splits (state, pending and resets carried), outputs and gradients."""
    T, C = 50, 8
    x = make(T=T, poly=poly, grad=True, seed=5)
    reset = random_resets(2, T, 5, p=0.08)
    reset[0, 17] = True
    kw = dict(chunk_size=C, window=5, optimizer=opt, poly=poly, reset=reset)
    o_full, s_full = call(neural_memory, x, **kw)
    g = torch.Generator().manual_seed(7)
    random_cuts = sorted(set(torch.randint(1, T, (7,), generator=g).tolist()))
    for cuts in (list(range(1, T)), random_cuts):
        state, outs = None, []
        for a, b in zip([0, *cuts], [*cuts, T]):
            o, state = call(neural_memory, x, state=state, sl=slice(a, b), **kw)
            outs.append(o)
        o_split = torch.cat(outs, 1)
        assert_close(o_split, o_full, tol=1e-12, name=f"o (cuts {cuts})")
        assert_states_close(state, s_full, tol=1e-12)
    gx = torch.autograd.grad(scalar_loss(o_full, s_full), [x["k"], x["eta"], x["W1_init"]])
    gs = torch.autograd.grad(scalar_loss(o_split, state), [x["k"], x["eta"], x["W1_init"]])
    for a, b in zip(gs, gx):
        assert_close(a, b, kind="grad", tol=1e-10, name="grad through the carried state")
    # the reference obeys the same law (one call vs token by token)
    o_ref, s_ref = call(neural_memory_reference, x, **kw)
    state, outs = None, []
    for t in range(T):
        o, state = call(neural_memory_reference, x, state=state, sl=slice(t, t + 1), **kw)
        outs.append(o)
    assert_close(torch.cat(outs, 1), o_ref, tol=1e-12, name="reference token by token")
    assert_close(o_ref, o_full, tol=1e-10, name="chunked vs reference")


@pytest.mark.parametrize("fn", [neural_memory, neural_memory_reference])
def test_causality(fn):
    T, C, t = 40, 8, 19  # t sits in the middle of chunk [16, 24)
    x = make(T=T, seed=6)
    kw = dict(chunk_size=C, window=6, optimizer="momentum")
    o, _ = call(fn, x, **kw)
    for name in ("q", "k", "v", *GATES):
        y = {n: t_.clone() for n, t_ in x.items()}
        y[name][:, t] += 0.5
        o2, _ = call(fn, y, **kw)
        assert torch.allclose(o2[:, :t], o[:, :t], rtol=0, atol=1e-13), name
        if name != "q":  # t's own chunk reads W_j, which t has not written yet
            assert torch.allclose(o2[:, :24], o[:, :24], rtol=0, atol=1e-13), name
        if name == "q":  # a query changes only its own output
            assert not torch.allclose(o2[:, t], o[:, t]) and torch.allclose(o2[:, t + 1:], o[:, t + 1:])
        else:  # a written token changes the reads of the following chunks: the test can fail
            assert not torch.allclose(o2[:, 24:], o[:, 24:], rtol=0, atol=1e-9), name


@pytest.mark.parametrize("fn", [neural_memory, neural_memory_reference])
def test_update_false_reads_only(fn):
    x = make(T=30, seed=8)
    kw = dict(chunk_size=8, window=4, optimizer="muon")
    _, s0 = call(fn, x, sl=slice(0, 13), **kw)          # a state with momenta and 5 pending tokens
    o, s1 = call(fn, x, state=s0, sl=slice(13, 30), update=False, **kw)
    assert_states_close(s1, s0, tol=0)
    B = x["q"].shape[0]
    want = memory_read(s0.W1, s0.W2, x["q"][:, 13:].movedim(2, 1), x["q"][:, 13:].movedim(2, 1)).movedim(1, 2)
    assert_close(o, want, tol=1e-12, name="read of the frozen weights")
    o_upd, _ = call(fn, x, state=s0, sl=slice(13, 30), **kw)
    assert_close(o[:, :3], o_upd[:, :3], tol=1e-12, name="same reads before the chunk boundary")
    assert not torch.allclose(o[:, 3:], o_upd[:, 3:])
    # a reset makes later reads use the initial weights, still without writing
    reset = torch.zeros(B, 30, dtype=torch.bool)
    reset[1, 20] = True
    o_r, s_r = call(fn, x, state=s0, sl=slice(13, 30), update=False, reset=reset, **kw)
    assert_states_close(s_r, s0, tol=0)
    fresh, _ = call(fn, x, sl=slice(20, 30), update=False, **kw)
    assert_close(o_r[1, 7:], fresh[1], tol=1e-12, name="reads after the reset")
    assert_close(o_r[0], o[0], tol=1e-12, name="row without reset")
    # a reset among the pending tokens (same open chunk) also redirects read-only reads to the initial weights
    reset = torch.zeros(B, 30, dtype=torch.bool)
    reset[0, 10] = True
    _, s_p = call(fn, x, sl=slice(0, 13), reset=reset, **kw)
    o_p, _ = call(fn, x, state=s_p, sl=slice(13, 30), update=False, **kw)
    fresh, _ = call(fn, x, sl=slice(13, 30), update=False, **kw)
    assert_close(o_p[0], fresh[0], tol=1e-12, name="pending reset")
    assert not torch.allclose(o_p[1], fresh[1])


# ------------------------------------------------------------------------------------------------ resets


@pytest.mark.parametrize("opt", ["momentum", "muon"])
def test_reset_on_chunk_boundary_equals_fresh_start(opt):
    T, C, t0 = 45, 8, 24
    x = make(T=T, grad=False, seed=9)
    reset = torch.zeros(2, T, dtype=torch.bool)
    reset[1, t0] = True
    kw = dict(chunk_size=C, window=5, optimizer=opt)
    o, s = call(neural_memory, x, reset=reset, **kw)
    row1 = {n: (t if n.endswith("_init") else t[1:2, t0:]) for n, t in x.items()}
    o_fresh, s_fresh = call(neural_memory, row1, **kw)
    assert_close(o[1:2, t0:], o_fresh, tol=1e-12, name="o after reset")
    assert_states_close(NeuralMemoryState(*(t[1:2] for t in s[:4]), type(s.pending)(*(t[1:2] for t in s.pending))),
                        s_fresh, tol=1e-12)
    o0, _ = call(neural_memory, x, **kw)
    assert not torch.allclose(o0[1:2, t0:], o_fresh), "without the reset the row must differ"


@pytest.mark.parametrize("fn", [neural_memory, neural_memory_reference])
def test_no_information_crosses_a_reset(fn):
    """A mid-chunk reset: perturbing every input before it (and the carried state) leaves all later outputs and
    the final state unchanged; without the reset the same perturbation shows."""
    T, C, t0 = 37, 8, 19
    x = make(T=T, grad=True, seed=10)
    reset = torch.zeros(2, T, dtype=torch.bool)
    reset[:, t0] = True
    kw = dict(chunk_size=C, window=6, optimizer="momentum")
    _, s_prev = call(fn, x, sl=slice(0, 3), **kw)   # a non-trivial incoming state with 3 pending tokens
    o, s = call(fn, x, state=s_prev, sl=slice(3, T), reset=reset, **kw)
    names = ("q", "k", "v", *GATES)
    gr = torch.autograd.grad(o[:, t0 - 3:].square().sum(), [x[n] for n in names], allow_unused=True)
    for n, g in zip(names, gr):
        assert g is None or g[:, :t0].abs().max() == 0, f"gradient from outputs after the reset reaches {n}[:t0]"
    y = {n: t.detach().clone() for n, t in x.items()}
    g = torch.Generator().manual_seed(0)
    for n in names:
        y[n][:, :t0] += 0.3 * torch.rand(y[n][:, :t0].shape, generator=g, dtype=y[n].dtype)
    _, s_prev2 = call(fn, y, sl=slice(0, 3), **kw)
    o2, s2 = call(fn, y, state=s_prev2, sl=slice(3, T), reset=reset, **kw)
    assert torch.allclose(o2[:, t0 - 3:], o[:, t0 - 3:], rtol=0, atol=1e-13)
    for a, b in zip(s2[:4], s[:4]):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)
    o3, _ = call(fn, y, state=s_prev2, sl=slice(3, T), **kw)
    o4, _ = call(fn, x, state=s_prev, sl=slice(3, T), **kw)
    assert not torch.allclose(o3[:, -5:], o4[:, -5:], rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------------ semantics


def test_c1_equals_online_gradient_step():
    """C = c = 1, momentum optimizer with η = 0, α = 0: W <- W − θ_t ∇_W γ_t ‖M_W(k_t) − v_t‖² after each token,
    and each token reads W before its own step (an online Titans/delta-style update)."""
    x = make(B=2, T=9, H=2, seed=11, theta_scale=0.5)
    x["eta"] = torch.zeros_like(x["eta"])
    x["alpha"] = torch.zeros_like(x["alpha"])
    o, s = call(neural_memory, x, chunk_size=1, window=1, optimizer="momentum")

    def mem(w1, w2, z):
        return z + w2 @ Fn.gelu(w1 @ z)

    B, T, H = x["q"].shape[:3]
    for b in range(B):
        for h in range(H):
            w1, w2 = x["W1_init"][h].clone(), x["W2_init"][h].clone()
            for t in range(T):
                assert_close(o[b, t, h], mem(w1, w2, x["q"][b, t, h]), tol=1e-12, name=f"o[{b},{t},{h}]")
                kt, vt, gt = x["k"][b, t, h], x["v"][b, t, h], x["gamma"][b, t, h]
                step_loss = (lambda a1, a2: gt * (mem(a1, a2, kt) - vt).square().sum())
                g1, g2 = torch.func.grad(step_loss, argnums=(0, 1))(w1, w2)
                w1, w2 = w1 - x["theta"][b, t, h] * g1, w2 - x["theta"][b, t, h] * g2
            assert_close(s.W1[b, h], w1, tol=1e-12, name="W1")
            assert_close(s.W2[b, h], w2, tol=1e-12, name="W2")


def test_memory_learns_key_value_pairs():
    """Write 4 random key -> value pairs repeatedly (8 chunks) with a large step: recall error drops a lot."""
    torch.manual_seed(12)
    B, H, D, E, N, C = 1, 2, 8, 32, 4, 8
    keys, vals = Fn.normalize(torch.randn(B, N, H, D), dim=-1), torch.randn(B, N, H, D)
    T = 8 * C
    idx = torch.arange(T) % N
    k, v = keys[:, idx], vals[:, idx]
    ones = torch.ones(B, T, H)
    W1 = torch.randn(B, H, E, D) / D**0.5
    W2 = torch.zeros(B, H, D, E)

    def recall_err(w1, w2):
        pred = memory_read(w1, w2, keys.movedim(2, 1), keys.movedim(2, 1))
        return (pred - vals.movedim(2, 1)).square().sum().item()

    _, s = neural_memory(k, k, v, ones * 0.9, ones * 0.5, ones * 0.05, ones * 0.0, W1, W2, chunk_size=C)
    before, after = recall_err(W1, W2), recall_err(s.W1, s.W2)
    assert after < 0.1 * before, (before, after)


def test_validation_and_dispatch():
    x = make(T=10)
    with pytest.raises(ValueError, match="optimizer"):
        call(neural_memory, x, optimizer="adam")
    with pytest.raises(ValueError, match="window"):
        call(neural_memory, x, chunk_size=4, window=5)
    with pytest.raises(ValueError, match="W1 must be"):
        call(neural_memory, x, poly=True)
    B, H, Dk = 2, 2, 4
    bad = empty_pending(B, H, Dk, Dk, dtype=torch.float64)
    bad = type(bad)(*(t.new_zeros(B, 5, *t.shape[2:]) for t in bad))
    state = (x["W1_init"].expand(B, -1, -1, -1), x["W2_init"].expand(B, -1, -1, -1), None, None, bad)
    with pytest.raises(ValueError, match="pending holds 5"):
        call(neural_memory, x, state=state, chunk_size=4)
    reset = torch.ones(B, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match="W1_init"):
        neural_memory(*(x[n] for n in ("q", "k", "v", *GATES)), state[0], state[1], reset=reset)
    assert dispatch.get("neural_memory") is neural_memory
    with dispatch.force_backend("neural_memory", "reference"):
        assert dispatch.get("neural_memory") is neural_memory_reference


def test_state_nbytes_formula():
    """bytes/sequence = 8·H·(E·F + Dv·E) + p·(4·H·(Dk + Dv + 4) + 1), as documented in NOTES.md."""
    B, T, H, Dk, Dv, E, C = 3, 13, 2, 4, 3, 8, 5
    x = make(B=B, T=T, H=H, Dk=Dk, Dv=Dv, E=E, poly=True, dtype=torch.float32)
    _, s = call(neural_memory, x, chunk_size=C, poly=True)
    F, p = feature_dim(Dk, True), T % C
    assert s.pending.length == p
    assert s.nbytes() == B * (8 * H * (E * F + Dv * E) + p * (4 * H * (Dk + Dv + 4) + 1))


@pytest.mark.parametrize("opt", ["momentum", "muon"])
def test_skipping_reset_work_changes_nothing(opt, monkeypatch):
    """maybe_any answers True without looking on CUDA (no host sync): the reset-masked path taken on a stream without
    resets gives what the plain path gives, outputs, state and gradients (float64, here on the CPU)."""
    from memlm.ops.neural_memory import parallel
    x = make(T=30, seed=11, poly=True, grad=True)
    kw = dict(chunk_size=8, window=5, optimizer=opt, poly=True)
    with torch.no_grad():
        _, s0 = call(neural_memory, x, sl=slice(0, 13), **kw)       # momenta and 5 pending tokens, no reset
    looked = []

    def run():
        o, s = call(neural_memory, x, state=s0, sl=slice(13, 30), **kw)
        loss = scalar_loss(o, s)
        return o, s, grads(loss, list(x.values()))
    monkeypatch.setattr(parallel, "maybe_any", lambda m: looked.append(bool(m.any())) or bool(m.any()))
    o, s, g = run()
    assert looked and not any(looked)           # the plain path: every mask was read, and none held a reset
    monkeypatch.setattr(parallel, "maybe_any", lambda m: True)
    o2, s2, g2 = run()
    assert_close(o2, o, tol=1e-12, name="o")
    assert_states_close(s2, s, tol=1e-12)
    for n, a, b in zip(x, g2, g):
        assert_close(a, b, tol=1e-12, name=f"d{n}")


@pytest.mark.parametrize("opt", ["momentum", "muon"])
def test_commit_keeps_each_rows_state_after_its_chunks(opt):
    """commit[b] = n: row b's returned state is the one after the first n complete chunks, i.e. that of a call on
    those n·C tokens alone (3 rows: 0 chunks — the given state —, 2, and a value beyond the 4 complete ones, clamped);
    the outputs and pending buffer do not change; the reference agrees, gradients included."""
    C, T = 4, 18
    x = make(B=3, T=T, seed=21, grad=True)
    reset = random_resets(3, T, seed=5, p=0.1)
    commit = torch.tensor([0, 2, 9])
    o, s = call(neural_memory, x, reset=reset, chunk_size=C, optimizer=opt, commit=commit)
    o_all, s_all = call(neural_memory, x, reset=reset, chunk_size=C, optimizer=opt)
    assert_close(o, o_all, tol=1e-12, name="outputs")
    for n in ("k", "v", "gamma", "eta", "theta", "alpha", "reset"):
        assert torch.equal(getattr(s.pending, n), getattr(s_all.pending, n)), n
    for b, n in enumerate((0, 2, 4)):
        if n == 0:
            want = (x["W1_init"], x["W2_init"], torch.zeros_like(s.S1[b]), torch.zeros_like(s.S2[b]))
        else:
            _, sn = call(neural_memory, x, sl=slice(0, n * C), reset=reset, chunk_size=C, optimizer=opt)
            want = (sn.W1[b], sn.W2[b], sn.S1[b], sn.S2[b])
        for name, got, w in zip(("W1", "W2", "S1", "S2"), (s.W1[b], s.W2[b], s.S1[b], s.S2[b]), want):
            assert_close(got, w, tol=1e-12, name=f"row {b} {name}")
    leaves = [x[n] for n in ("q", "k", "v", *GATES, "W1_init", "W2_init")]
    o_r, s_r = call(neural_memory_reference, x, reset=reset, chunk_size=C, optimizer=opt, commit=commit)
    assert_close(o_r, o, tol=1e-10, name="reference outputs")
    assert_states_close(s_r, s)
    for gc, gr in zip(grads(scalar_loss(o, s), leaves), grads(scalar_loss(o_r, s_r), leaves)):
        assert_close(gc, gr, tol=1e-8, name="gradient")
    with pytest.raises(ValueError, match="commit must be an integer tensor"):
        call(neural_memory, x, chunk_size=C, commit=torch.zeros(3))
