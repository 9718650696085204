"""Triton neural-memory kernels on CPU through the Triton interpreter (TRITON_INTERPRET=1), tiny shapes.

Notation: B batch, T tokens, H heads, Dk, Dv key/value widths, E hidden width, C chunk size, c window,
W1 [B, H, E, F], W2 [B, H, Dv, E] fast weights, S1, S2 momenta, γ η θ α gates, W_init learned initial weights.

The kernels are built lazily per device (interpreted for CPU tensors), so the variable only has to be set while
these tests run (it gates `supports` on CPU). Ground truth is the chunked form in float64 (itself pinned to the
token-loop reference by test_neural_memory.py); the Triton path runs in float32. Its error may be at most
max(1e-5, NOISE × the chunked form's own float32 error): the Muon gradients are ill-conditioned enough that float32
PyTorch itself misses 1e-5 on them, and two float32 evaluation orders differ in error by a few times either way
(measured: 0.5–2.5×), hence NOISE = 10. Bugs seen while writing the kernels (a dropped second-order term, a reset
not cutting a gradient, a wrong Newton–Schulz transpose) gave errors of 3e-2 and more.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from functorch.compile import make_boxed_func
from test_neural_memory import GATES, make, state_tensors
from torch._dynamo.backends.common import aot_autograd

from memlm.ops import dispatch
from memlm.ops.neural_memory import neural_memory, triton_memory
from memlm.ops.testing import rel_err

STEP_CONFIG = triton_memory._step_config

pytest.importorskip("triton")

LEAVES = ("q", "k", "v", *GATES, "W1", "W2", "S1", "S2", "W1_init", "W2_init")
NOISE = 10


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # NaN-poison every buffer the backend allocates without initialising: unwritten reads show up
    monkeypatch.setattr(triton_memory, "_empty", lambda like, *shape: like.new_full(shape, float("nan")))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def inputs(*, B=2, T=21, H=2, Dk=4, Dv=4, E=8, poly=False, seed=0, device="cpu") -> dict[str, torch.Tensor]:
    """make()'s tokens and W_init plus a non-trivial starting state W1, W2 (≠ W_init), S1, S2 (≠ 0); float64."""
    x = make(B=B, T=T, H=H, Dk=Dk, Dv=Dv, E=E, poly=poly, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)

    def r(t, s):
        return s * torch.randn(t.shape, generator=g, dtype=t.dtype)

    W1, W2 = x["W1_init"].expand(B, -1, -1, -1), x["W2_init"].expand(B, -1, -1, -1)
    x = {**x, "W1": W1 + r(W1, 0.1), "W2": W2 + r(W2, 0.1), "S1": r(W1, 0.01), "S2": r(W2, 0.01)}
    return {n: t.to(device) for n, t in x.items()}


def functional(o, s, seed=1) -> torch.Tensor:
    """A fixed random linear functional of the outputs and the final weights and momenta, in float64."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for t in (o, s.W1, s.W2, s.S1, s.S2):
        total = total + (t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device)).sum()
    return total


def run(fn, x, dtype, *, split=None, reset=None, low=(), **kw) -> dict[str, torch.Tensor]:
    """Outputs, final state and gradients of a random functional of both w.r.t. every input. split: run the tokens
    in two calls at that position, the state (pending tokens included) carried. low: inputs given in bfloat16."""
    leaves = {n: t.detach().to(torch.bfloat16 if n in low else dtype).requires_grad_(True) for n, t in x.items()}
    T = x["q"].shape[1]
    cuts = [0, T] if split is None else [0, split, T]
    state = (leaves["W1"], leaves["W2"], leaves["S1"], leaves["S2"], None)
    outs = []
    for a, b in itertools.pairwise(cuts):
        seq = [leaves[n][:, a:b] for n in ("q", "k", "v", *GATES)]
        o, s = fn(*seq, *state[:4], pending=state[4], reset=None if reset is None else reset[:, a:b],
                  W1_init=leaves["W1_init"], W2_init=leaves["W2_init"], **kw)
        outs.append(o)
        state = s
    o = torch.cat(outs, 1)
    gs = torch.autograd.grad(functional(o, state), list(leaves.values()), allow_unused=True)
    got = {"o": o, **state_tensors(state)}
    got.update({f"d{n}": torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), gs)})
    return got


def compare(got, want, base, *, nonzero=(), floor=1e-5, grad_floor=None, also=None):
    """Every tensor of got within max(floor, NOISE × base's error) of want (base: the chunked form in float32);
    gradients (names d…) within grad_floor instead of floor when given; or within the error of ``also`` (another
    accepted computation of the same values, e.g. the chunked form under bf16 autocast) when that is larger."""
    for n, w in want.items():
        if w.dtype == torch.bool:
            assert torch.equal(got[n], w), n
            continue
        assert got[n].shape == w.shape, n
        if not w.numel():
            continue
        assert torch.isfinite(got[n]).all(), f"{n}: non-finite"
        f = grad_floor if grad_floor is not None and n.startswith("d") else floor
        err, tol = rel_err(got[n], w), max(f, NOISE * rel_err(base[n], w))
        if also is not None:
            tol = max(tol, rel_err(also[n], w))
        assert err <= tol, f"{n}: relative error {err:.2e} > {tol:.2e}"
    for n in nonzero:
        assert want[n].abs().max() > 0, f"{n}: zero reference gradient, the comparison would be vacuous"


def run_base(x, **kw) -> dict[str, torch.Tensor]:
    """run() of the chunked form in float32 with Newton–Schulz in Gram form (common.newton_schulz5_gram, whose float32
    error grows with the momentum's condition): the noise floor of the kernels on bf16 inputs, which take that form."""
    from memlm.ops.neural_memory import parallel
    from memlm.ops.neural_memory.common import newton_schulz5_gram
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parallel, "newton_schulz5", newton_schulz5_gram)
        return run(neural_memory, x, torch.float32, **kw)


def check(x, *, nonzero=LEAVES, truth=neural_memory, **kw):
    """triton (float32) vs truth (float64), allowed NOISE × the error of the chunked form in float32."""
    want = run(truth, x, torch.float64, **kw)
    base = run(neural_memory, x, torch.float32, **kw)
    got = run(triton_memory.neural_memory, x, torch.float32, **kw)
    compare(got, want, base, nonzero=[f"d{n}" for n in nonzero])
    return got


def resets(B, T, positions, device="cpu"):
    """reset [B, T] with the given positions of each row set (those < T)."""
    r = torch.zeros(B, T, dtype=torch.bool, device=device)
    for b, ts in enumerate(positions):
        r[b, [t for t in ts if t < T]] = True
    return r


@pytest.mark.parametrize("poly,Dv", [(False, 4), (True, 4), (False, 6)])
def test_momentum_resets_pending_all_gradients(poly, Dv):
    """Residual / poly features / no residual (Dv ≠ Dk); resets mid-chunk, on a chunk boundary, in the pending
    tokens; a window shorter than the chunk; two calls with the pending buffer carried."""
    x = inputs(T=37, Dv=Dv, poly=poly, seed=Dv + poly)
    reset = resets(2, 37, [(5, 16, 30), (13, 19)])    # row 1: 19 lies in the pending tokens of the first call
    check(x, chunk_size=8, window=6, optimizer="momentum", poly=poly, reset=reset, split=21)


def test_muon_resets_pending_all_gradients():
    x = inputs(T=21, poly=True, seed=7)
    reset = resets(2, 21, [(9,), (16,)])
    check(x, chunk_size=8, window=5, optimizer="muon", poly=True, reset=reset, split=11)


def test_muon_bf16_inputs_take_the_gram_form():
    """bf16 q, k, v select the Gram-form Newton–Schulz kernels: outputs, states and every gradient against float64 on
    the bf16-rounded inputs within the GPU bf16 test's bounds (5e-3, gradients 1e-2; the reads are bf16)."""
    low = ("q", "k", "v")
    x = {n: (t.bfloat16().double() if n in low else t) for n, t in inputs(T=21, poly=True, seed=7).items()}
    kw = {"chunk_size": 8, "window": 5, "optimizer": "muon", "poly": True, "split": 11,
          "reset": resets(2, 21, [(9,), (16,)])}
    assert triton_memory._NS5(8, 14, triton_memory.precision(half=True)).gram
    want = run(neural_memory, x, torch.float64, **kw)
    got = run(triton_memory.neural_memory, x, torch.float32, low=low, **kw)
    compare(got, want, run_base(x, low=low, **kw), floor=5e-3, grad_floor=1e-2, nonzero=[f"d{n}" for n in LEAVES])


def test_muon_tall_and_wide_matrices_no_reset():
    # Dv = 6 > E = 4 and F = 5 > E: both Newton–Schulz maps run on a tall matrix (read transposed)
    x = inputs(T=17, Dk=5, Dv=6, E=4, seed=8)
    check(x, chunk_size=8, optimizer="muon", nonzero=("q", "k", "v", "gamma", "theta", "alpha", "W1", "W2", "S1"))


@pytest.mark.parametrize("T", [1, 7, 8, 9])
def test_awkward_lengths(T):
    """Shorter than a chunk (no write at all), one token short, exactly one chunk, one token over."""
    x = inputs(T=T, seed=T)
    got = check(x, chunk_size=8, optimizer="momentum", nonzero=("q", "W1", "W2"))
    assert got["pending.k"].shape[1] == T % 8


@pytest.mark.parametrize("window", [4, None])
def test_several_scans(window, monkeypatch):
    """More chunks than MAX_SCAN: the weights are carried from one autograd Function call to the next. (window None:
    each stretch's kernels write every row of its chunks, and the rows outside it are zeroed, not filled — the
    NaN-poisoned buffers would show a row missed.)"""
    monkeypatch.setattr(triton_memory, "MAX_SCAN", 2)
    x = inputs(T=45, seed=11)
    check(x, chunk_size=8, window=window, optimizer="momentum", reset=resets(2, 45, [(20,), ()]))


def test_update_false_and_bf16():
    x = inputs(T=19, seed=12)
    reset = resets(2, 19, [(4,), ()])
    got = run(triton_memory.neural_memory, x, torch.float32, chunk_size=8, update=False, reset=reset)
    want = run(neural_memory, x, torch.float64, chunk_size=8, update=False, reset=reset)
    compare(got, want, want)
    xb = {n: (t.bfloat16() if n in ("q", "k", "v") else t.float()) for n, t in x.items()}
    kw = {"chunk_size": 8, "window": 6, "reset": reset}
    o, s = triton_memory.neural_memory(*(xb[n] for n in ("q", "k", "v", *GATES, "W1", "W2")), W1_init=xb["W1_init"],
                                       W2_init=xb["W2_init"], **kw)
    o_ref, s_ref = neural_memory(*(xb[n].double() for n in ("q", "k", "v", *GATES, "W1", "W2")),
                                 W1_init=xb["W1_init"].double(), W2_init=xb["W2_init"].double(), **kw)
    assert o.dtype == torch.bfloat16 and s.W1.dtype == torch.float32
    assert rel_err(o, o_ref) <= 5e-3 and rel_err(s.W1, s_ref.W1) <= 1e-5


def test_dispatch_opt_in_and_errors(monkeypatch):
    x = {n: t.float() for n, t in inputs(T=9).items()}
    args = tuple(x[n] for n in ("q", "k", "v", *GATES, "W1", "W2"))
    kw = {"chunk_size": 8}
    assert dispatch.get("neural_memory", args=args, kwargs=kw) is neural_memory   # CPU: never the interpreter
    with dispatch.force_backend("neural_memory", "triton"):
        assert dispatch.get("neural_memory", args=args, kwargs=kw) is triton_memory.neural_memory
    assert not triton_memory.supports(*args, chunk_size=200)                          # window > MAX_DIM
    assert not triton_memory.supports(*(t.double() for t in args), **kw)
    with pytest.raises(ValueError, match="float64"):
        triton_memory.neural_memory(*(t.double() for t in args), **kw)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="does not support"):
        dispatch.get("neural_memory", "triton", args=args, kwargs=kw)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        triton_memory.neural_memory(*args, **kw)


@pytest.mark.parametrize("d", [1, 5, 32])
def test_poly_kernels_match_torch(d):
    """The feature map's Triton kernels (forward, backward) against common._Poly's torch form, rows not a multiple
    of the row block."""
    from memlm.ops.neural_memory.common import POLY_TRITON, poly_features  # the torch form on CPU tensors
    assert POLY_TRITON
    torch.manual_seed(d)
    x = torch.randn(3, 13, d)
    want = poly_features(x)
    assert torch.equal(triton_memory.poly_forward(x), want)
    g = torch.randn_like(want)
    xr = x.clone().requires_grad_()
    gwant, = torch.autograd.grad(poly_features(xr), xr, g)
    assert rel_err(triton_memory.poly_backward(x, g), gwant) < 1e-6



@pytest.mark.parametrize("prec", ["ieee", "tf32"])
@pytest.mark.parametrize("rows,cols", [(3, 20), (24, 5), (16, 70), (6, 6), (1, 9)])
def test_ns5_kernels_match_torch(rows, cols, prec):
    """Newton–Schulz kernels alone: Out += NS5(S) and dS += (∂NS5/∂S)ᵀ dOut (wide and tall, sizes that are no
    multiple of the tiles), against newton_schulz5 and its autograd in float64, within NOISE × the float32 error of
    the same algorithm in PyTorch: the iterative kernels (float32 inputs, "ieee") and the Gram-form ones (bf16 inputs;
    the interpreter computes their dots in float32)."""
    from memlm.ops.neural_memory.common import newton_schulz5, newton_schulz5_gram
    fwd, bwd = (triton_memory._NS5(rows, cols, prec, backward=b) for b in (False, True))
    assert fwd.gram == bwd.gram == (prec != "ieee")
    torch.manual_seed(rows * cols)
    S, O, G, dS = (torch.randn(1, 3, rows, cols) for _ in range(4))
    want, base = {}, {}
    for dtype, out, ns in ((torch.float64, want, newton_schulz5),
                           (torch.float32, base, newton_schulz5_gram if fwd.gram else newton_schulz5)):
        s = S.to(dtype).requires_grad_()
        y = ns(s)
        out["Out"] = O.to(dtype) + y
        out["dS"] = dS.to(dtype) + torch.autograd.grad(y, s, G.to(dtype))[0]
    runs = {"": (S, O.clone(), dS.clone(), None)}
    if fwd.gram:   # also with the chain stored by the forward and read by the backward (the op's training path)
        keep = [triton_memory._NS5(rows, cols, prec, backward=b, store=True) for b in (False, True)]
        runs["stored chain "] = (S, O.clone(), dS.clone(), keep[0].chain(S, 3, 2))
    for name, (s, o, ds, ch) in runs.items():
        f, b = (fwd, bwd) if ch is None else keep
        f(s, o, f.scratch(s, 3), chain=ch, slot=1)
        b(s, G, b.scratch(s, 3), dS=ds, chain=ch, slot=1)
        for n, got in (("Out", o), ("dS", ds)):
            assert rel_err(got, want[n]) <= max(1e-5, NOISE * rel_err(base[n], want[n])), name + n


@pytest.mark.parametrize("opt,T,split", [("momentum", 29, 11), ("muon", 29, 11), ("muon", 32, 11), ("muon", 32, 16)])
def test_reads_in_autocast_dtype(opt, T, split, monkeypatch):
    """Under autocast the reads' tensors (query features, the weight stack) are made in bf16 once, and their
    gradients taken in bf16, instead of autocast casting them at the reads' matmuls (and the gradients back):
    outputs, states and every gradient bit for bit as with autocast's casts. A call that ends on a chunk boundary
    (T 32: the second; with split 16 both, from a chunk start) leaves the slot no token reads out of the bf16 stack,
    so its reads need no padding chunk."""
    from memlm.ops.neural_memory import parallel
    x = inputs(B=2, T=T, poly=True, E=8, Dk=4, Dv=4)
    kw = {"chunk_size": 8, "optimizer": opt, "poly": True, "split": split, "reset": resets(2, T, [(5, 20), ()])}
    with torch.autocast("cpu", torch.bfloat16):
        got = run(triton_memory.neural_memory, x, torch.float32, low=("q", "k", "v"), **kw)
        monkeypatch.setattr(parallel, "read_dtype", lambda dt, device: dt)
        want = run(triton_memory.neural_memory, x, torch.float32, low=("q", "k", "v"), **kw)
    assert got["o"].dtype == torch.bfloat16
    for n, w in want.items():
        assert torch.equal(got[n], w), n


@pytest.mark.parametrize("opt", ["momentum", "muon"])
def test_skipping_reset_work_changes_nothing(opt, monkeypatch):
    """maybe_any answers True on CUDA without a host sync: the Triton backend's reset-masked path on a stream
    without resets gives what its plain path gives (outputs, state, every gradient; float32 here, equal to 1e-6)."""
    from memlm.ops.neural_memory import parallel
    x = inputs(T=29, poly=True, seed=12)
    kw = {"chunk_size": 8, "window": 5, "optimizer": opt, "poly": True, "split": 11}
    want = run(triton_memory.neural_memory, x, torch.float32, **kw)
    for mod in (parallel, triton_memory):
        monkeypatch.setattr(mod, "maybe_any", lambda m: True)
    got = run(triton_memory.neural_memory, x, torch.float32, **kw)
    for n, w in want.items():
        ok = rel_err(got[n], w) <= 1e-6 if w.is_floating_point() and w.numel() else torch.equal(got[n], w)
        assert ok, n


def test_keeping_the_newton_schulz_chain_changes_nothing(monkeypatch):
    """Muon with bf16 inputs (the Gram form): the backward that walks back the chain its forward kept gives what the
    one recomputing it gives (MEMLM_NS5_KEEP_CHAIN=0), and a bad value of the variable is one clear error."""
    x = inputs(T=40, poly=True, seed=7)       # the second call writes three chunks: chain slots 0, 1, 2
    kw = {"chunk_size": 8, "window": 5, "optimizer": "muon", "poly": True, "split": 11,
          "reset": resets(2, 40, [(9,), (16,)])}
    # the kept chain's forward with the pass the recomputing one makes (its Gram matrix from the step kernel:
    # test_gram_matrix_from_the_step_kernel)
    monkeypatch.setattr(triton_memory, "NS5_GRAM_FROM_STEP", False)
    kept = run(triton_memory.neural_memory, x, torch.float32, low=("q", "k", "v"), **kw)
    monkeypatch.setenv("MEMLM_NS5_KEEP_CHAIN", "0")
    assert not triton_memory.keep_chain()
    recomputed = run(triton_memory.neural_memory, x, torch.float32, low=("q", "k", "v"), **kw)
    # the same products in the same order; but the interpreter's dots are NumPy's BLAS, whose small-matrix kernels
    # round by the operands' alignment on some CPUs (OpenBLAS 0.3.31 on AMD EPYC: one map's outputs 1e-6 apart),
    # so within 1e-4 (float32 rounding carried through three chunks of the ill-conditioned Muon map: up to
    # 2.7e-5 seen) or 1e-3 for the bf16 gradients of q, k, v (flipped last bits: up to 1.2e-4 seen). Both forms are
    # ~1e-3 off float64; a chain read from the wrong chunk is 6e1 off.
    for n, w in recomputed.items():
        if w.dtype == torch.bool or not w.numel():
            assert torch.equal(kept[n], w), n
        else:
            tol = 1e-4 if w.dtype == torch.float32 else 1e-3
            assert rel_err(kept[n], w) <= tol, f"{n}: {rel_err(kept[n], w):.1e}"
    monkeypatch.setenv("MEMLM_NS5_KEEP_CHAIN", "yes")
    with pytest.raises(ValueError, match="MEMLM_NS5_KEEP_CHAIN='yes'"):
        run(triton_memory.neural_memory, x, torch.float32, low=("q", "k", "v"), **kw)


@pytest.mark.parametrize("E,Dk,T", [(8, 4, 21), (8, 6, 40), (16, 6, 19), (24, 4, 21)])
def test_gram_matrix_from_the_step_kernel(E, Dk, T, monkeypatch):
    """Muon with bf16 inputs: W1's Newton–Schulz map taking S1's Gram matrix and ‖S1‖² from the step kernel and its
    second pass from _ns5g_apply (the forward's default when the chain is kept, E ≤ F) is as accurate as the
    one-kernel form: outputs, state and every gradient against float64 on the bf16-rounded inputs, each within 2 ×
    the one-kernel form's error, with resets, pending tokens and several F tiles of the
    step and of the second pass (Dk 6: F 27; E 24 > F 14, a tall S1, keeps the one-kernel form)."""
    low = ("q", "k", "v")
    x = {n: (t.bfloat16().double() if n in low else t)
         for n, t in inputs(T=T, poly=True, E=E, Dk=Dk, Dv=4, seed=E + T).items()}
    kw = {"chunk_size": 8, "window": 5, "optimizer": "muon", "poly": True, "split": 11,
          "reset": resets(2, T, [(9,), (16,)])}
    want = run(neural_memory, x, torch.float64, **kw)
    monkeypatch.setattr(triton_memory, "_step_config", lambda *a, **k: {**STEP_CONFIG(*a, **k), "BF": 16})
    monkeypatch.setattr(triton_memory, "GRAM_APPLY_BN", 16)
    got = run(triton_memory.neural_memory, x, torch.float32, low=low, **kw)
    monkeypatch.setattr(triton_memory, "NS5_GRAM_FROM_STEP", False)
    one = run(triton_memory.neural_memory, x, torch.float32, low=low, **kw)
    F = Dk + Dk * (Dk + 1) // 2
    assert triton_memory._NS5(E, F, "tf32", gram_in=True).gin == (E <= F)
    for n, w in want.items():
        if w.is_floating_point() and w.numel():
            # 2×: the two forms sum in other orders, and on this ill-conditioned map (∂W2_init 3e-2 off in float32 at
            # E 16) the ratio of their float32 errors reaches 1.52 (NumPy's OpenBLAS 0.3.31 on AMD EPYC)
            assert torch.isfinite(got[n]).all() and rel_err(got[n], w) <= 2 * rel_err(one[n], w) + 1e-6, n
    for n in LEAVES:
        assert want[f"d{n}"].abs().max() > 0, n


@pytest.mark.parametrize("opt,Dk,Dv,window", [("momentum", 6, 6, 5), ("muon", 6, 4, None), ("muon", 4, 4, 5)])
def test_features_made_inside_the_step_kernels(opt, Dk, Dv, window, monkeypatch):
    """φ of the keys made by the step kernels from the raw keys (POLY_IN_STEP, the default) against the stream of
    features made by poly_features: outputs, state and gradients bit for bit (the same products), ∂L/∂k within 1e-6
    (the Triton feature map's backward against the torch form on CPU), with several F tiles (Dk 6: F 27 in tiles of
    16), resets, pending tokens, a residual (Dk = Dv) or none, a window or the whole chunk; the feature map is not
    called on the keys."""
    from memlm.ops.neural_memory import common
    x = inputs(T=29, poly=True, Dk=Dk, Dv=Dv, E=8, seed=Dk + Dv)
    kw = {"chunk_size": 8, "window": window, "optimizer": opt, "poly": True, "split": 11,
          "reset": resets(2, 29, [(9,), (16, 24)])}
    monkeypatch.setattr(triton_memory, "_step_config", lambda *a, **k: {**STEP_CONFIG(*a, **k), "BF": 16})
    calls = []
    feats = common.poly_features
    monkeypatch.setattr(common, "poly_features", lambda t, *a: calls.append(t.shape) or feats(t, *a))
    fused = run(triton_memory.neural_memory, x, torch.float32, **kw)
    n = len(calls)
    monkeypatch.setattr(triton_memory, "POLY_IN_STEP", False)
    plain = run(triton_memory.neural_memory, x, torch.float32, **kw)
    assert n == 2 and len(calls) == 6          # fused: the queries' features of each call only; plain: the keys' too
    for n, w in plain.items():       # ∂L/∂k: poly_backward (interpreted) against the torch form of poly_features
        assert (rel_err(fused[n], w) <= 1e-6 if n == "dk" else torch.equal(fused[n], w)), n
        assert not n.startswith("d") or w.abs().max() > 0, n


@pytest.mark.parametrize("opt,scan", [("momentum", 64), ("muon", 64), ("muon", 2)])
def test_commit_keeps_each_rows_state(opt, scan, monkeypatch):
    """commit (each row's state after its first commit[b] complete chunks; layers/neural_memory.py's one-call grid):
    rows at 0 chunks, in the middle, and past the end (clamped), also across stretches of MAX_SCAN = 2 chunks (a row
    whose pick lies in an earlier stretch keeps it); outputs, the picked states and every gradient through them, with
    resets and the pending buffer carried to a second call."""
    monkeypatch.setattr(triton_memory, "MAX_SCAN", scan)
    x = inputs(B=4, T=45, poly=opt == "muon", seed=13)
    reset = resets(4, 45, [(9,), (20, 33), (), (26,)])
    check(x, chunk_size=8, window=6, optimizer=opt, poly=opt == "muon", reset=reset, split=21,
          commit=torch.tensor([0, 1, 2, 7]))


@pytest.mark.parametrize("opt,scan", [("momentum", 64), ("muon", 2)])
def test_chunk_aligned_resets_read_w_init_from_the_stack(opt, scan, monkeypatch):
    """chunk_aligned_resets (the layer's document-aligned grids) with bf16 reads under autocast: the reads' stack (a
    cast copy) holds W_init in the slots of chunks that open with a reset, the second read of every token is skipped,
    and the kernels send those slots' gradients to W_init. Resets at the start, in the pending tokens of the second
    call (16), on chunks inside a stretch of MAX_SCAN = 2 and on the open chunk of each call (16 for the first, 40
    for the second: the stack's last slot), with commit. Every output, state and gradient against the path with the
    second read (the same bf16 values, summed in another order), and float32 reads unchanged."""
    monkeypatch.setattr(triton_memory, "MAX_SCAN", scan)
    x = inputs(B=3, T=45, poly=opt == "muon", seed=15)
    kw = {"chunk_size": 8, "window": 6, "optimizer": opt, "poly": opt == "muon", "split": 21,
          "reset": resets(3, 45, [(0, 16, 40), (24,), (8, 32)]), "commit": torch.tensor([1, 7, 3])}
    low = ("q", "k", "v")
    with torch.autocast("cpu", torch.bfloat16):
        got = run(triton_memory.neural_memory, x, torch.float32, low=low, chunk_aligned_resets=True, **kw)
        want = run(triton_memory.neural_memory, x, torch.float32, low=low, **kw)
    for n, w in want.items():
        assert (rel_err(got[n], w) <= 5e-3) if w.is_floating_point() and w.numel() else torch.equal(got[n], w), n
    check(x, chunk_aligned_resets=True, **kw)


def test_chunk_aligned_resets_are_checked_on_cpu():
    x = inputs(T=21, seed=16)
    with pytest.raises(ValueError, match="inside a chunk"):
        run(triton_memory.neural_memory, x, torch.float32, chunk_size=8, reset=resets(2, 21, [(8,), (13,)]),
            chunk_aligned_resets=True)
    # a reset among the pending tokens (position 2 of the open chunk) carried into a call that promises alignment
    args = [x[n].float() for n in ("q", "k", "v", *GATES, "W1", "W2")]
    init = {"W1_init": x["W1_init"].float(), "W2_init": x["W2_init"].float()}
    _, st = neural_memory(*(a[:, :5] for a in args[:7]), *args[7:], chunk_size=8, reset=resets(2, 5, [(2,), ()]),
                          **init)
    with pytest.raises(ValueError, match="inside a chunk"):
        neural_memory(*(a[:, 5:] for a in args[:7]), st.W1, st.W2, st.S1, st.S2, pending=st.pending, chunk_size=8,
                      chunk_aligned_resets=True, **init)


@pytest.mark.parametrize("opt,low", [("momentum", ()), ("muon", ("q", "k", "v"))])
def test_the_walk_is_one_opaque_operator_under_torch_compile(opt, low):
    """torch.compile traces the chunk walk as two custom operators (memlm::neural_memory_scan and its backward), not
    its Python loop of kernel launches: the compiled op (AOTAutograd, fake tensors for shapes) gives the eager op's
    outputs, final state and every gradient, with resets, the pending buffer, commit, several stretches, and bf16
    q, k, v (Muon in Gram form, its chains kept for the backward); one walk per stretch in the traced graph."""
    x = inputs(B=3, T=45, poly=opt == "muon", seed=21)
    kw = {"chunk_size": 8, "window": 6, "optimizer": opt, "poly": opt == "muon", "split": 21, "low": low,
          "reset": resets(3, 45, [(9, 16), (24,), ()]), "commit": torch.tensor([1, 7, 3])}
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        keep = lambda g, _: make_boxed_func(g)      # noqa: E731  (the traced graphs as they are)
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_memory, "MAX_SCAN", 2)
        torch._dynamo.reset()
        compiled = torch.compile(triton_memory.neural_memory, backend=backend, fullgraph=True)
        got = run(compiled, x, torch.float32, **kw)
        want = run(triton_memory.neural_memory, x, torch.float32, **kw)
        torch._dynamo.reset()
    for n, w in want.items():
        assert torch.equal(got[n], w) if not w.is_floating_point() else rel_err(got[n], w) <= 1e-6, n
    assert len(graphs) == 2                     # one graph per call (the second carries the pending tokens)
    # 2 complete chunks in the first call (one stretch), 3 in the second (two stretches of MAX_SCAN = 2)
    assert [sum("neural_memory_scan" in str(nd.target) for nd in g.graph.nodes) for g in graphs] == [1, 2]
    assert not any("triton_kernel_wrapper" in str(nd.target) for g in graphs for nd in g.graph.nodes)
