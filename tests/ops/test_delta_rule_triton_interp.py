"""Triton delta-rule kernels run on CPU through the Triton interpreter (TRITON_INTERPRET=1), small shapes.

Notation: q, k, v, β (beta), g (log decay), S (state [B, H, Dv, Dk]), r (reset [B, T]), T sequence length;
U, Wk, Ke, γ the per-chunk inputs of the state recurrence (chunked.py).

The kernels are built lazily and wrapped for the interpreter whenever they see CPU tensors, so the environment
variable only has to be set while these tests run (it gates `supports` on CPU), not before triton is imported.
"""
from __future__ import annotations

import pytest
import torch
from test_delta_rule import NAMES, compare, make_inputs, run

from memlm.ops import dispatch
from memlm.ops.delta_rule import chunked, delta_rule, reference, triton_fused, triton_impl
from memlm.ops.testing import assert_close

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def resets(B: int, T: int) -> torch.Tensor:
    """Resets inside a chunk, twice in one chunk, on a chunk boundary — never at t = 0, so the initial state
    matters (for B = 1 make_reset would always reset at t = 0)."""
    r = torch.zeros(B, T, dtype=torch.bool)
    for t in (10, 64, 70, 75, 100):
        if t < T:
            r[:, t] = True
    return r


@pytest.mark.parametrize("T", [1, 65, 130])
def test_matches_reference_with_g_resets_initial_state(T):
    inp = make_inputs(1, T, 2, 16, 16, gated=True, init=True, seed=T)
    reset = resets(1, T)
    ref = run(reference.delta_rule, inp, dtype=torch.float64, reset=reset)
    got = run(triton_impl.delta_rule, inp, reset=reset)
    assert got["o"].dtype == torch.float32 and got["S"].dtype == torch.float32
    compare(got, ref, torch.float32, f"triton T={T}")
    assert got["dinitial_state"].abs().max() > 0 and got["dg"].abs().max() > 0  # the comparison is not vacuous
    compare(got, run(chunked.delta_rule, inp, reset=reset), torch.float32, f"triton vs chunked T={T}")


def test_plain_odd_dims_scale_chunk_size():
    # g = None, Dk ≠ Dv (neither a power of two), a chunk shorter than the 16-row tile, a scale
    inp = make_inputs(1, 23, 2, 12, 20, gated=False, init=False, seed=3)
    q, k, v, beta = (inp[n] for n in NAMES[:4])
    o, S = triton_impl.delta_rule(q, k, v, beta, chunk_size=5, scale=0.5)
    o_ref, S_ref = reference.delta_rule(q.double() * 0.5, k.double(), v.double(), beta.double())
    assert_close(o, o_ref, name="o")
    assert_close(S, S_ref, name="S")
    assert triton_impl.delta_rule(q, k, v, beta, output_final_state=False)[1] is None


@pytest.mark.parametrize("which", ["all", "states_only", "final_only"])
def test_recurrence_kernels_with_several_row_blocks(monkeypatch, which):
    """The kernels alone against the PyTorch loop: Dv = 24 in blocks of 16 rows (two programs per head, the
    second half masked; backward partial sums over blocks), C = 5, and each kind of incoming gradient."""
    monkeypatch.setattr(triton_impl, "MAX_BV", 16)
    gen = torch.Generator().manual_seed(0)
    B, H, N, C, Dk, Dv = 1, 2, 3, 5, 12, 24
    x = {"U": torch.randn(B, H, N, C, Dv, generator=gen), "Wk": 0.3 * torch.randn(B, H, N, C, Dk, generator=gen),
         "Ke": 0.3 * torch.randn(B, H, N, C, Dk, generator=gen), "GL": torch.rand(B, H, N, generator=gen),
         "S0": torch.randn(B, H, Dv, Dk, generator=gen)}
    w_all = torch.randn(B, H, N, Dv, Dk, generator=gen) * (which != "final_only")
    w_fin = torch.randn(B, H, Dv, Dk, generator=gen) * (which != "states_only")
    out = {}
    for name, fn in (("triton", triton_impl.state_recurrence), ("torch", chunked.state_recurrence)):
        leaves = [t.clone().requires_grad_() for t in x.values()]
        S_all, S_fin = fn(*leaves)
        loss = (0 if which == "final_only" else (S_all * w_all).sum()) + \
            (0 if which == "states_only" else (S_fin * w_fin).sum())
        out[name] = [S_all, S_fin, *torch.autograd.grad(loss, leaves)]
    for name, a, b in zip(["S_all", "S_fin", *("d" + n for n in x)], out["triton"], out["torch"]):
        assert_close(a, b, kind="out" if name.startswith("S") else "grad", name=f"{which} {name}")


def test_bf16_in_fp32_state():
    inp = make_inputs(1, 65, 2, 16, 16, gated=True, init=True, seed=1)
    inp = {n: (x.to(torch.bfloat16).float() if x is not None and n != "initial_state" else x) for n, x in inp.items()}
    reset = resets(1, 65)
    got = run(triton_impl.delta_rule, inp, dtype=torch.bfloat16, reset=reset)
    assert got["o"].dtype == torch.bfloat16 and got["S"].dtype == torch.float32 and got["dq"].dtype == torch.bfloat16
    compare(got, run(reference.delta_rule, inp, reset=reset), torch.bfloat16, "triton bf16")


def test_dispatch_by_name_env_and_supports(monkeypatch):
    inp = make_inputs(1, 10, 1, 16, 16, gated=True, init=False)
    args = tuple(inp[n] for n in NAMES[:5])
    assert triton_impl.supports(*args)
    assert dispatch.get("delta_rule", args=args) is chunked.delta_rule  # CPU tensors never pick the interpreter
    assert dispatch.get("delta_rule", "triton", args=args) is triton_impl.delta_rule
    with dispatch.force_backend("delta_rule", "triton"):
        assert dispatch.get("delta_rule", args=args) is triton_impl.delta_rule
    monkeypatch.setenv("MEMLM_BACKEND_DELTA_RULE", "triton")
    assert_close(delta_rule(*args)[0], chunked.delta_rule(*args)[0], name="dispatched o")
    # without the interpreter, CPU tensors are not supported and forcing says so instead of falling back
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_impl.supports(*args)
    with pytest.raises(ValueError, match="triton"):
        delta_rule(*args)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        triton_impl.delta_rule(*args)
    assert not triton_impl.supports(*(x.double() for x in args))  # float64 stays with chunked


@pytest.mark.parametrize("C,Dk,Dv,BH", [(64, 64, 64, 16), (64, 64, 64, 512), (1, 32, 48, 6)])
def test_kernels_compile_for_hopper_without_a_gpu(C, Dk, Dv, BH):
    """Lower both kernels to sm_90 machine code here (ptxas ships with triton; no GPU needed): catches what the
    interpreter cannot (typing and layout errors of the compiled path) and checks the shared memory fits an H100.
    BH = 512 gives the 32-row, 8-warp configuration used when there are many heads."""
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton without its nvidia backend")
    cfg = triton_impl._config(BH, C, Dk, Dv, torch.device("cpu"))
    if BH < 100:  # what an H100 would pick for few heads (the CPU device has no SM count to halve BV with)
        cfg["BV"] = 16
    options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    consts = {**cfg, "PREC": triton_impl.DOT_PRECISION}
    fwd, bwd = triton_impl._kernels(False)
    variants = ((fwd, {}), (bwd, {"HAS_DSALL": True, "STATES": False}), (bwd, {"HAS_DSALL": True, "STATES": True}))
    for kernel, extra in variants:
        c = {**consts, **extra}
        ints = {"su_bh", "su_n", "su_c", "sw_bh", "sw_n", "sw_c", "se_bh", "se_n", "se_c", "BH", "N", "C", "Dk", "Dv"}
        sig = {a: "constexpr" if a in c else "i32" if a in ints else "*fp32" for a in kernel.arg_names}
        src = ASTSource(kernel, sig, constexprs={(kernel.arg_names.index(a),): v for a, v in c.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.metadata.shared <= 227 * 1024, f"{kernel.fn.__name__}: {compiled.metadata.shared} B shared"


# ------------------------------------------------------------------------------------ the fused chunk pipeline
# triton_fused runs on CUDA for bf16/fp16; here its kernels run in fp32 through the interpreter (exact products, so
# the 1e-5 bounds apply), switched on with triton_fused.FP32.

@pytest.fixture
def fused(monkeypatch):
    """Turns the fused path on for fp32 and counts its calls (so a test cannot pass on the fallback)."""
    monkeypatch.setattr(triton_fused, "FP32", True)
    calls = []
    inner = triton_fused._FusedDeltaRule.apply
    monkeypatch.setattr(triton_fused._FusedDeltaRule, "apply", lambda *a: calls.append(1) or inner(*a))
    return calls


@pytest.mark.parametrize("T,gated,with_reset,init,chunk,Dk,Dv", [
    (1, True, False, True, 64, 16, 16),      # one token in a 64-row chunk
    (20, False, False, False, 16, 16, 16),   # plain DeltaNet, several 16-chunks, padded tail
    (70, True, False, True, 32, 16, 24),     # Dk ≠ Dv (padded tiles), two 16-blocks of the inverse
    (100, True, True, True, 64, 20, 16),     # resets inside chunks and on a boundary, four 16-blocks
    (130, True, True, False, 64, 32, 32),
])
def test_fused_matches_reference(fused, T, gated, with_reset, init, chunk, Dk, Dv):
    inp = make_inputs(2, T, 2, Dk, Dv, gated=gated, init=init, seed=T)
    reset = resets(2, T) if with_reset else None
    got = run(triton_impl.delta_rule, inp, reset=reset, chunk_size=chunk)
    assert fused, "the fused path did not run"
    tag = f"fused T={T} C={chunk}"
    compare(got, run(reference.delta_rule, inp, dtype=torch.float64, reset=reset), torch.float32, tag)
    assert got["dbeta"].abs().max() > 0 and (not gated or got["dg"].abs().max() > 0)


def test_fused_sums_the_recurrence_row_block_partials(fused, monkeypatch):
    """Dv = 48 in row blocks of 16: three programs per head walk the state backward, each writing its rows of
    dS_{n+1}, which the fused prelude backward reads whole (the test's name is from when it summed partials)."""
    monkeypatch.setattr(triton_impl, "MAX_BV", 16)
    inp = make_inputs(1, 70, 2, 16, 48, gated=True, init=True, seed=9)
    got = run(triton_impl.delta_rule, inp, reset=resets(1, 70))
    assert fused
    compare(got, run(reference.delta_rule, inp, dtype=torch.float64, reset=resets(1, 70)), torch.float32, "NV=3")


@pytest.mark.parametrize("used", ["outputs", "final_state"])
def test_fused_gradients_when_only_one_output_is_used(fused, used):
    inp = make_inputs(1, 80, 2, 16, 16, gated=True, init=True, seed=4)
    out = {}
    for name, fn in (("fused", triton_impl.delta_rule), ("chunked", chunked.delta_rule)):
        leaves = [inp[n].detach().clone().requires_grad_() for n in NAMES[:5]]
        s0 = inp["initial_state"].clone().requires_grad_()
        o, S = fn(*leaves, initial_state=s0, scale=0.7)
        loss = (o * o).sum() if used == "outputs" else (S * S).sum()
        grads = torch.autograd.grad(loss, [*leaves, s0], allow_unused=True)   # q is unused for the final state
        out[name] = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, [*leaves, s0])]
    assert fused
    for n, a, b in zip([*NAMES[:5], "initial_state"], out["fused"], out["chunked"]):
        assert_close(a, b, kind="grad", name=f"{used} d{n}")


def test_fused_kernels_compile_for_hopper_without_a_gpu():
    """The four fused kernels lowered to sm_90 machine code here, in the configuration bf16 training uses
    (C 64, D 64, TF32, 8 warps): typing and layout errors of the compiled path, and shared memory within an H100's."""
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton without its nvidia backend")
    meta = triton_fused._meta(64, 64, 64, triton_impl.HALF_DOT_PRECISION)
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
    consts = {"HAS_G": True, "HAS_R": True, "NB_ROUNDS": 1, "scale": 0.125, "LP": False, **meta}
    ints = {"T", "H", "Dk", "Dv", "N", "NV", "BH_", "skb", "skt", "skh", "svb", "svt", "svh", "sqb", "sqt", "sqh", "sdb", "sdt", "sdh"}
    halves = {"K", "V", "Q", "O", "dO", "dQ", "dK", "dV"}
    kernels = [(k, consts) for k in triton_fused._kernels(False).values()]
    # the prelude backward with bf16 operands for its dots of float32 intermediates (HALF_BWD_DOTS)
    kernels.append((triton_fused._kernels(False)["prelude_bwd"], {**consts, "LP": True}))
    for kernel, consts in kernels:
        c = {a: v for a, v in consts.items() if a in kernel.arg_names}
        sig = {a: ("constexpr" if a in c else "i32" if a in ints
                   else "*bf16" if a in halves else "*i8" if a == "R" else "*fp32") for a in kernel.arg_names}
        src = ASTSource(kernel, sig, constexprs={(kernel.arg_names.index(a),): v for a, v in c.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.metadata.shared <= 227 * 1024, f"{kernel.fn.__name__}: {compiled.metadata.shared} B shared"


def test_walk_inputs_dtype_follows_autograd(fused, monkeypatch):
    """RECURRENCE_DTYPE "auto": the state walks' inputs take the storage dtype when the op is differentiated
    (training) and float32 without autograd (prefill: the final state is carried into decoding)."""
    seen = []
    inner = triton_fused._FusedDeltaRule.apply
    monkeypatch.setattr(triton_fused._FusedDeltaRule, "apply", lambda *a: seen.append(a[-1]) or inner(*a))
    inp = make_inputs(1, 20, 1, 16, 16, gated=True, init=False, seed=3)
    args = [inp[n] for n in ("q", "k", "v", "beta", "g")]
    with torch.no_grad():
        triton_impl.delta_rule(*args)
    triton_impl.delta_rule(*args)                                      # no input requires grad
    triton_impl.delta_rule(args[0].requires_grad_(), *args[1:])
    assert seen == [torch.float32, torch.float32, None]


@pytest.mark.parametrize("store", [torch.bfloat16, torch.float16])
def test_fused_with_half_precision_intermediates(fused, monkeypatch, store):
    """STORE_DTYPE = bf16/fp16: the per-chunk intermediates and partial gradients go through HBM in half precision
    (math in float32): every output and gradient stays within the half-precision tolerance of the float64 reference."""
    monkeypatch.setattr(triton_fused, "STORE_DTYPE", store)
    monkeypatch.setattr(triton_fused, "RECURRENCE_DTYPE", None)     # U, Wk, Ke too
    monkeypatch.setattr(triton_impl, "MAX_BV", 16)     # two state row blocks per head in both walks
    inp = make_inputs(2, 100, 2, 16, 32, gated=True, init=True, seed=11)
    got = run(triton_impl.delta_rule, inp, reset=resets(2, 100))
    assert fused
    ref = run(reference.delta_rule, inp, dtype=torch.float64, reset=resets(2, 100))
    # bf16 (8-bit mantissa): about twice the error of rounding the inputs to bf16 (~3e-3); fp16 (11-bit): ~3e-4
    tol = 1.2e-2 if store == torch.bfloat16 else 1e-3
    for key, r in ref.items():
        assert_close(got[key].float(), r, tol=tol, name=f"intermediates in {store}: {key}")
