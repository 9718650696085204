"""HOPE chunk walk in Triton (memlm.ops.hope_scan.triton_scan) on CPU through the Triton interpreter, against the
PyTorch loop: the final memory, every chunk's keys and values (and the memory reads), and the gradients w.r.t. every
input (memory inputs u, queries q of the memory read, starting memory, learned initial memory, both biases), at fp32
tolerance.

Notation: B batch, N chunks, C chunk length, H memory heads, D head width, R = 2D + 2 stacked memory rows (3D + 2 with
the memory read: the last D rows are M_mem).
"""
from __future__ import annotations

import pytest
import torch

from memlm.config.model import ModelConfig
from memlm.layers.hope import Hope, HopeConfig
from memlm.ops import dispatch
from memlm.ops.hope_scan import reference, triton_scan
from memlm.ops.testing import assert_close

pytest.importorskip("triton")

OUTS = ("M", "k", "v")
INS = ("u", "mem", "init", "eta_bias", "alpha_bias")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def scan_inputs(B=2, N=3, C=16, H=2, D=8, seed=0, device="cpu", dtype=torch.float32, alpha_bias=2.0, read=False):
    """Memories near the identity (as Hope initialises them), a document start inside row 0, empty slots (zero u)
    at the end of row 1, and an incomplete last chunk in row 0. alpha_bias: mean retention logit (onyx's α ∈
    [0.99, 0.999] is 4.6–6.9; long walks need it, or the memory decays to nothing). read: add queries q (random in
    every slot, empty ones included) and the M_mem rows (near the identity) of the memory read."""
    g = torch.Generator().manual_seed(seed)
    R = 3 * D + 2 if read else 2 * D + 2

    def memory(*lead):
        M = 0.3 * torch.randn(*lead, R, D, generator=g)
        eye = torch.eye(D)
        M[..., :D, :] += eye
        M[..., D:2 * D, :] += eye
        if read:
            M[..., 2 * D + 2:, :] += eye
        return M

    valid = torch.ones(B, N, C, dtype=torch.bool)
    valid[1, -1, C // 2:] = False
    u = torch.randn(B, N, C, H, D, generator=g) * valid[..., None, None]
    x = {"u": u.to(dtype), "mem": memory(B, H), "init": memory(H),
         "eta_bias": 0.5 * torch.randn(H, generator=g), "alpha_bias": alpha_bias + torch.randn(H, generator=g)}
    if read:
        x["q"] = torch.randn(B, N, C, H, D, generator=g).to(dtype)
    starts = torch.zeros(B, N, dtype=torch.bool)
    starts[0, 1] = True
    complete = valid.all(-1)
    complete[0, -1] = False
    kw = {"slot_valid": valid, "starts_doc": starts, "complete": complete}
    return {n: t.to(device) for n, t in x.items()}, {n: t.to(device) for n, t in kw.items()}


def run(fn, x, kw, *, grad=True, seed=1):
    """Outputs M, k, v (and "read" when x has queries q) and, with grad, d<input> for every input of x."""
    leaves = {n: t.clone().requires_grad_(grad) for n, t in x.items()}
    M, r, k, v = fn(leaves["u"], leaves.get("q"), **{n: leaves[n] for n in INS[1:]}, **kw)
    got = {"M": M, "k": k, "v": v}
    if "q" in x:
        got["read"] = r
    if grad:
        g = torch.Generator().manual_seed(seed)
        loss = sum((o * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in got.values())
        got.update({f"d{n}": d for n, d in zip(leaves, torch.autograd.grad(loss, list(leaves.values())))})
    return got


REDUCED = {"deta_bias", "dalpha_bias", "dinit"}   # sums over every token / batch row


@pytest.mark.parametrize("C,D,N", [(16, 8, 3), (32, 16, 2), (64, 64, 2)])
def test_matches_loop_all_gradients(C, D, N):
    x, kw = scan_inputs(C=C, D=D, N=N, seed=C + D)
    got = run(triton_scan.hope_scan, x, kw)
    want = run(reference.hope_scan, x, kw)
    for n, w in want.items():
        kind = "sum" if n in REDUCED else "grad" if n.startswith("d") else "out"
        assert_close(got[n], w, kind=kind, name=n)
    for n in ("dmem", "dinit", "deta_bias", "dalpha_bias"):
        assert got[n].abs().max() > 0, f"{n} is zero: the comparison would be vacuous"


@pytest.mark.parametrize("C,D,N", [(16, 8, 3), (32, 16, 2), (64, 64, 2)])
def test_memory_read_matches_loop_all_gradients(C, D, N):
    """The memory read (q given, R = 3D + 2): reads of every slot (those of the incomplete chunk, which writes nothing,
    and of empty slots included), final memory, keys, values and the gradients of u, q, both memories and biases."""
    x, kw = scan_inputs(C=C, D=D, N=N, seed=C + D + 1, read=True)
    got = run(triton_scan.hope_scan, x, kw)
    want = run(reference.hope_scan, x, kw)
    assert set(got) == set(want) == {*OUTS, "read", *(f"d{n}" for n in (*INS, "q"))}
    for n, w in want.items():
        kind = "sum" if n in REDUCED else "grad" if n.startswith("d") else "out"
        assert_close(got[n], w, kind=kind, name=n)
    assert_close(got["read"][0, -1], want["read"][0, -1], name="reads of the incomplete chunk")
    assert got["read"][0, -1].abs().max() > 0
    for n in ("dq", "dmem", "dinit", "deta_bias", "dalpha_bias"):
        assert got[n].abs().max() > 0, f"{n} is zero: the comparison would be vacuous"


def test_no_grad_and_support_rules():
    x, kw = scan_inputs(seed=3)
    with torch.no_grad():
        got = run(triton_scan.hope_scan, x, kw, grad=False)
    want = run(reference.hope_scan, x, kw, grad=False)
    for n in OUTS:
        assert_close(got[n], want[n], name=n)
    xr, kwr = scan_inputs(seed=4, read=True)
    with torch.no_grad():
        got = run(triton_scan.hope_scan, xr, kwr, grad=False)
    want = run(reference.hope_scan, xr, kwr, grad=False)
    for n in (*OUTS, "read"):
        assert_close(got[n], want[n], name=n)
    q = xr["q"]
    assert triton_scan.supports(x["u"], None, mem=x["mem"])
    assert triton_scan.supports(xr["u"], q, mem=xr["mem"])                   # the memory read: R = 3D + 2
    assert not triton_scan.supports(x["u"], q, mem=x["mem"])                 # a read needs the M_mem rows
    assert not triton_scan.supports(xr["u"], None, mem=xr["mem"])            # and the attention read has none
    assert not triton_scan.supports(xr["u"], q[..., :1, :], mem=xr["mem"])   # queries shaped as u
    assert not triton_scan.supports(x["u"][:, :, :12], None, mem=x["mem"])    # chunk 12 is not a kernel size
    with pytest.raises(ValueError, match="hope_scan backend 'triton'"):
        triton_scan.hope_scan(x["u"], q, **{n: x[n] for n in INS[1:]}, **kw)


@pytest.mark.parametrize("read", ["attention", "memory"])
def test_layer_with_triton_scan_matches_loop_across_calls(read):
    """A Hope layer (attention read: GQA, conv; memory read: the hope-* presets' o = M_mem q̂, conv on u and q) over a
    packed batch with a reset, then a second call that completes the pending chunk: outputs, states and every
    parameter gradient equal under both backends."""
    torch.manual_seed(0)
    cfg = HopeConfig(read=read, n_kv_heads=2 if read == "attention" else 4, head_dim=8, chunk_size=16)
    layer = Hope(cfg, ModelConfig(d_model=32, n_heads=4, layers=[cfg]), 0)
    x = torch.randn(2, 40, 32)
    reset = torch.zeros(2, 40, dtype=torch.bool)
    reset[0, 21] = True

    def go(backend):
        layer.zero_grad()
        with dispatch.force_backend("hope_scan", backend):
            y1, s = layer(x[:, :30], None, reset=reset[:, :30])
            y2, s = layer(x[:, 30:], s, reset=reset[:, 30:])
        y = torch.cat([y1, y2], 1)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y, s.mem, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    y_t, m_t, g_t = go("triton")
    y_l, m_l, g_l = go("loop")
    assert_close(y_t, y_l, name="y")
    assert_close(m_t, m_l, name="mem")
    assert set(g_t) == set(g_l)
    for n in g_l:
        assert_close(g_t[n], g_l[n], kind="sum" if "bias" in n or "mem_init" in n else "grad", name=n)


@pytest.mark.parametrize("read", [False, True])
def test_kernels_compile_for_hopper_without_a_gpu(read):
    """Both kernels lowered to sm_90 machine code here (ptxas ships with triton), as onyx-11m's bf16 training builds
    them (C 64, D 64, TF32), with and without the memory read: typing and layout errors of the compiled path, and
    shared memory within an H100's."""
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton without its nvidia backend")
    meta = triton_scan._meta(torch.empty(1, 1, 64, 1, 64, dtype=torch.bfloat16)) | {"READ": read}
    stages = meta.pop("num_stages")
    suffix = "_read" if read else ""
    for kernel, warps in zip(triton_scan._kernels(False), (triton_scan.WARPS[f"fwd{suffix}"],
                                                           triton_scan.WARPS[f"bwd{suffix}"])):
        c = {a: v for a, v in meta.items() if a in kernel.arg_names}
        sig = {a: ("constexpr" if a in c else "i32" if a in ("H", "N", "D", "save") else "*bf16" if a in ("U", "Qin")
                   else "*i8" if a in ("Valid", "Start", "Comp") else "*fp32") for a in kernel.arg_names}
        src = ASTSource(kernel, sig, constexprs={(kernel.arg_names.index(a),): v for a, v in c.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps,
                                                                                   "num_stages": stages})
        assert compiled.metadata.shared <= 227 * 1024, f"{kernel.fn.__name__}: {compiled.metadata.shared} B shared"
