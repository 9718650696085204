"""One-token decode attention (memlm.ops.decode_attention): the split-KV Triton kernels against the SDPA reference.

Notation: B batch, Hq / Hk query / key-value heads, L buffer slots, Np persistent keys, Dh head width, W window.

CPU tests run the kernels through the Triton interpreter (TRITON_INTERPRET=1, set per test: the interpreted kernels are
built on first use, so it need not be set before triton is imported). GPU tests (marker gpu):
    python -m pytest -q -m gpu tests/ops/test_decode_attention.py
"""
from __future__ import annotations

import pytest
import torch

import memlm
from memlm.inference.engine import Engine
from memlm.inference.static import to_static
from memlm.ops import decode_attention as da
from memlm.ops import dispatch
from memlm.ops.testing import assert_close, count_launches

pytest.importorskip("triton")


def make_case(B: int, Hq: int, Hk: int, L: int, Dh: int, *, Np: int = 0, window: int | None = None,
              layout: str = "random", cache_dtype=torch.float32, q_dtype=torch.float32, seed: int = 0,
              device="cpu") -> tuple[tuple, dict]:
    """(q, k, v, kpos, qpos, qdoc), kwargs. Rows get different positions and document starts. layout:
    "random"  any slot holds any position: empty slots (−1), future positions (> qpos), before the document start;
    "full"    slot j holds position j up to the row's qpos, a few later slots too (future), the rest empty;
    "ring"    slot j holds the latest position ≡ j mod W up to qpos (−1 before the first lap), a few one lap older.
    Every row sees at least its own key (as in a decode step, which writes it first)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, Dh, generator=g)
    k, v = torch.randn(B, Hk, L, Dh, generator=g), torch.randn(B, Hk, L, Dh, generator=g)
    span = L if layout != "ring" else 3 * L
    qpos = torch.randint(0, span, (B,), generator=g)
    qdoc = (torch.rand(B, generator=g) * qpos).long()
    qdoc[0] = 0
    j = torch.arange(L)
    if layout == "random":
        kpos = torch.randint(-1, span + 5, (B, L), generator=g)
        kpos[torch.arange(B), torch.randint(0, L, (B,), generator=g)] = qpos
    elif layout == "full":
        kpos = torch.where(j <= qpos[:, None] + 3, j, -1)        # 3 slots past the query: future positions
    else:
        kpos = qpos[:, None] - (qpos[:, None] - j) % L
        kpos = torch.where(torch.rand(B, L, generator=g) < 0.2, kpos - L, kpos)   # one lap stale: outside W
        kpos[torch.arange(B), qpos % L] = qpos
        kpos = kpos.clamp(min=-1)
    pk = torch.randn(Hk, Np, Dh, generator=g) if Np else None
    pv = torch.randn(Hk, Np, Dh, generator=g) if Np else None
    to = (lambda x, dt: None if x is None else x.to(device, dt))
    args = (to(q, q_dtype), to(k, cache_dtype), to(v, cache_dtype), kpos.to(device), qpos.to(device), qdoc.to(device))
    kwargs = {"window": window, "persist_k": to(pk, q_dtype), "persist_v": to(pv, q_dtype),
              "slot_is_pos": layout == "full"}
    return args, kwargs


class TestInterpreted:
    @pytest.fixture(autouse=True)
    def interpret(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "1")

    @pytest.mark.parametrize("B, Hq, Hk, L, Dh, Np, window, layout", [
        (1, 4, 4, 1, 64, 0, None, "random"),         # a single slot
        (3, 4, 2, 37, 64, 0, None, "random"),        # GQA, L not a multiple of the block
        (3, 4, 1, 300, 24, 0, None, "random"),       # MQA, Dh not a power of two
        (1, 8, 8, 1000, 64, 0, None, "random"),      # several splits per head
        (3, 4, 2, 300, 64, 0, None, "full"),
        (3, 4, 2, 37, 24, 0, 37, "ring"),            # sliding window ring: slot = position mod W
        (3, 4, 2, 300, 64, 3, None, "random"),       # persistent keys: an extra split
        (3, 4, 4, 37, 24, 3, 37, "ring"),            # window and persistent keys (MAG layers)
    ])
    def test_matches_sdpa(self, B, Hq, Hk, L, Dh, Np, window, layout):
        args, kw = make_case(B, Hq, Hk, L, Dh, Np=Np, window=window, layout=layout, seed=L + Dh)
        want = da.decode_attention(*args, backend="sdpa", **kw)
        got = da.decode_attention(*args, backend="triton", **kw)
        assert got.shape == want.shape == (B, Hq, 1, Dh) and got.dtype == torch.float32
        assert_close(got, want, name=f"{layout} L={L}")

    def test_window_masks_more_than_the_ring(self):
        """A window shorter than the buffer (positions W ≤ qpos − kpos < L must be masked)."""
        args, kw = make_case(3, 4, 2, 64, 16, layout="ring", seed=5)
        kw["window"] = 20
        assert_close(da.decode_attention(*args, backend="triton", **kw),
                     da.decode_attention(*args, backend="sdpa", **kw), name="window 20 over 64 slots")

    def test_bf16_cache_fp32_query(self):
        """The cache is read in its own dtype and converted in the kernel; the reference upcasts it exactly."""
        args, kw = make_case(3, 4, 2, 300, 64, Np=3, cache_dtype=torch.bfloat16, seed=1)
        got = da.decode_attention(*args, backend="triton", **kw)
        assert got.dtype == torch.float32
        assert_close(got, da.decode_attention(*args, backend="sdpa", **kw), name="bf16 cache")

    def test_slot_is_pos_skipping_changes_nothing(self):
        """A full buffer with slot = position: skipping the slots outside [qdoc, qpos] gives the same output as
        reading them all (and as the reference). Several splits (L 1000), rows with late document starts."""
        args, kw = make_case(3, 4, 2, 1000, 32, layout="full", seed=2)
        assert kw["slot_is_pos"]
        skipped = da.decode_attention(*args, backend="triton", **kw)
        full = da.decode_attention(*args, backend="triton", **{**kw, "slot_is_pos": False})
        assert_close(skipped, full, tol=1e-6, name="skip vs no skip")
        assert_close(skipped, da.decode_attention(*args, backend="sdpa", **kw), name="skip vs sdpa")

    @pytest.mark.parametrize("layout", ["random", "full"])
    def test_nan_in_invisible_slots_is_ignored(self, layout):
        """Slots the query cannot see may hold anything (NaN here): the kernels zero them, not only weight them 0."""
        (q, k, v, kpos, qpos, qdoc), kw = make_case(3, 4, 2, 300, 32, Np=3, layout=layout, seed=7)
        hidden = ~((kpos >= 0) & (kpos <= qpos[:, None]) & (kpos >= qdoc[:, None]))[:, None, :, None]
        want = da.decode_attention(q, k, v, kpos, qpos, qdoc, backend="sdpa", **kw)
        k, v = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("nan"))
        assert_close(da.decode_attention(q, k, v, kpos, qpos, qdoc, backend="triton", **kw), want, name=layout)

    def test_plan(self):
        p = da.plan(1, 8, 16384, 0, 64)
        assert p == {"BD": 64, "BLOCK": 64, "SPLIT": 256, "NS": 64}             # 512 programs
        assert da.plan(1, 8, 1, 0, 24) == {"BD": 32, "BLOCK": 16, "SPLIT": 16, "NS": 1}
        assert da.plan(1, 1, 1 << 24, 0, 64)["SPLIT"] == da.MAX_SPLIT
        assert da.plan(4, 8, 100, 40, 256)["SPLIT"] >= 64                      # one split holds the Np keys

    def test_dispatch(self):
        args, kw = make_case(1, 2, 2, 5, 16)
        assert dispatch.get("decode_attention", args=args, kwargs=kw) is da.decode_attention_sdpa   # CPU: sdpa
        assert da.supports(*args)
        q = args[0]
        assert not da.supports(q.expand(1, 2, 3, 16), *args[1:])                                   # T > 1
        assert not da.supports(torch.randn(1, 2, 1, 300), *args[1:])                               # Dh > 256
        with dispatch.force_backend("decode_attention", "triton"):
            assert dispatch.get("decode_attention", args=args, kwargs=kw) is da.decode_attention_triton

    @pytest.mark.parametrize("name", ["transformer-debug", "atlas-mag-debug"])
    def test_static_decode_logits(self, name, monkeypatch):
        """Static decode steps of a tiny model with the Triton backend forced equal those with "sdpa" (full attention
        with rows at different document starts; atlas-mag: a window ring with persistent keys)."""
        launches = count_launches(da, monkeypatch)
        torch.manual_seed(0)
        model = memlm.build_model(name)
        eng = Engine(model, prefill_chunk=8)
        ids = torch.randint(0, 250, (2, 20), generator=torch.Generator().manual_seed(0))
        reset = torch.zeros(2, 20, dtype=torch.bool)
        reset[1, 6] = True
        logits, dyn = eng.prefill(ids, reset=reset)
        out = {}
        for backend in ("sdpa", "triton"):
            with torch.inference_mode():
                st = to_static(model, dyn, 48)
            tok, steps = logits.argmax(-1), []
            with dispatch.force_backend("decode_attention", backend):
                for _ in range(5):
                    lg, st = eng.step_static(tok, st)
                    steps.append(lg)
                    tok = lg.argmax(-1)
            out[backend] = steps
        n_attn = sum(1 for m in model.modules() if isinstance(m, memlm.layers.attention.AttentionCore))
        assert len(launches) == 5 * n_attn, "the Triton kernels did not run in every attention layer"
        for i, (a, b) in enumerate(zip(out["triton"], out["sdpa"])):
            assert_close(a, b, name=f"{name} step {i}")


# ------------------------------------------------------------------------------------------------------------ GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not da.AVAILABLE, reason="needs CUDA and triton")


def _cuda_case(dtype, **kw):
    """B 2, Hq 8, L 16,384, Dh 64 on CUDA in dtype, and a float64 copy of the same (rounded) values."""
    args, kwargs = make_case(2, 8, kw.pop("Hk", 8), 16384, 64, device="cuda", **kw)
    cast = (lambda x, dt: x.to(dt) if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
    low = tuple(cast(x, dtype) for x in args), {n: cast(x, dtype) for n, x in kwargs.items()}
    ref = tuple(cast(x, torch.float64) for x in low[0]), {n: cast(x, torch.float64) for n, x in low[1].items()}
    return low, ref


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Hk, Np, window, layout", [(8, 0, None, "full"), (2, 0, None, "random"),
                                                    (8, 4, None, "full"), (1, 0, 16384, "ring")])
def test_gpu_matches_sdpa(dtype, Hk, Np, window, layout):
    """Triton and SDPA against float64 SDPA on the same rounded inputs, within dtype's tolerance."""
    low, ref = _cuda_case(dtype, Hk=Hk, Np=Np, window=window, layout=layout, seed=Hk + Np)
    want = da.decode_attention(*ref[0], backend="sdpa", **ref[1])
    got = da.decode_attention(*low[0], backend="triton", **low[1])
    assert got.dtype == dtype
    assert dispatch.get("decode_attention", args=low[0], kwargs=low[1]) is da.decode_attention_triton  # CUDA default
    assert_close(got, want, dtype=dtype, name=f"triton {dtype}")
    assert_close(da.decode_attention(*low[0], backend="sdpa", **low[1]), want, dtype=dtype, name=f"sdpa {dtype}")


@pytest.mark.gpu
@needs_cuda
def test_gpu_compiled_and_graph_captured():
    """The kernels inside torch.compile(fullgraph=True), and the eager and the compiled call each captured in a CUDA
    graph and replayed after the inputs changed in place (a new query, a key written at a new position, the rows'
    positions moved there), as a captured decode step runs them."""
    (args, kw), _ = _cuda_case(torch.bfloat16, Hk=2, Np=4, layout="full", seed=3)
    q, k, _, kpos, qpos, qdoc = args

    def f(q, k, v, kpos, qpos, qdoc):
        return da.decode_attention(q, k, v, kpos, qpos, qdoc, backend="triton", **kw)

    compiled = torch.compile(f, fullgraph=True)
    assert_close(compiled(*args), f(*args), tol=1e-6, name="compiled")
    for p, fn in ((5000, f), (9000, compiled)):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*args)
        q.normal_()
        k[:, :, p].normal_()
        kpos[:, p] = p
        qpos.fill_(p)
        qdoc.clamp_(max=p)
        graph.replay()
        torch.cuda.synchronize()
        want = da.decode_attention(*args, backend="sdpa", **kw)
        assert_close(out, f(*args), tol=1e-6, name=f"graph replay ({p})")
        assert_close(out, want, dtype=torch.bfloat16, name=f"graph replay vs sdpa ({p})")
