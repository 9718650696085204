"""The in-graph sampler (memlm.ops.sample_kernel, op "packed_sample"): the split-vocabulary Triton kernels against the
torch reference, and memlm.inference.sampling.packed_sample's routing to them.

Notation: B batch, V vocabulary, τ temperature.

CPU tests run the kernels through the Triton interpreter (TRITON_INTERPRET=1, set per test: the interpreted kernels are
built on first use). GPU tests (marker gpu):
    python -m pytest -q -m gpu tests/ops/test_sample_kernel.py
"""
from __future__ import annotations

import pytest
import torch

from memlm.inference.sampling import SamplingConfig, fused_sampler, packed_sample
from memlm.ops import dispatch
from memlm.ops import sample_kernel as sk
from memlm.ops.testing import count_launches, mutant_kernels

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("one_thread")


def make_logits(B: int, V: int, *, seed: int = 0, device="cpu", dtype=torch.float32, pad: int = 3) -> torch.Tensor:
    """[B, V] logits ~ 3·N(0, 1), a column slice of a [B, V + pad] tensor (a row stride other than V). Rows by b mod 3:
    0  the top value at several indices: in one lane (j, j + 1024), in neighbouring lanes, and in other splits;
    1  about a third of the entries −inf (masked vocabulary), the top one among them;
    2  (B ≥ 3) a single finite logit: probability 1, entropy 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V + pad, generator=g) * 3
    for b in range(B):
        if b % 3 == 0:
            ties = [j for j in (V // 3, V // 3 + 1, V // 3 + 1024, V // 2, V - 1) if j < V]
            x[b, ties] = x[b, :V].max() + 1
        elif b % 3 == 1:
            x[b, :V][torch.rand(V, generator=g) < 0.35] = float("-inf")
            x[b, int(x[b, :V].argmax())] = float("-inf")
        else:
            x[b] = float("-inf")
            x[b, (7 * V) // 11] = 2.5
    return x.to(device, dtype)[:, :V]


def check(got: torch.Tensor, want: torch.Tensor, *, tol: float = 1e-5, name: str = "") -> None:
    """Exactly the same tokens; log-probabilities and entropies within tol (absolute, relative for large values)."""
    assert got.shape == want.shape and got.dtype == torch.float64, f"{name}: {tuple(got.shape)} {got.dtype}"
    assert torch.equal(got[0], want[0]), f"{name}: tokens {got[0].tolist()} != {want[0].tolist()}"
    torch.testing.assert_close(got[1:], want[1:], rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


class TestInterpreted:
    @pytest.fixture(autouse=True)
    def interpret(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "1")

    @pytest.mark.parametrize("B, V, programs", [
        (1, 5000, sk.PROGRAMS),      # 5 splits of one block, V not a multiple of the block
        (3, 37, sk.PROGRAMS),        # V smaller than one block
        (3, 1000, sk.PROGRAMS),      # one split, every row kind
        (3, 3000, 2),                # one split of 3 blocks per row: the lanes' running state across iterations
        (4, 5000, 8),                # 3 splits of 2 blocks
    ])
    def test_greedy(self, B, V, programs, monkeypatch):
        monkeypatch.setattr(sk, "PROGRAMS", programs)
        x = make_logits(B, V, seed=V + B)
        got = sk.packed_sample_triton(x, None, 0.0)
        want = sk.packed_sample_torch(x, None, 0.0)
        assert torch.equal(want[0], x.argmax(-1).double())
        check(got, want, name=f"greedy B={B} V={V}")
        if B >= 3:   # the single-logit row: that token, log-prob 0, entropy 0
            assert got[:, 2].tolist() == [(7 * V) // 11, 0.0, 0.0]
        # the noise is ignored at τ = 0
        check(sk.packed_sample_triton(x, torch.rand(B, V), 0.0), want, name="τ = 0 with noise")

    def test_tie_takes_the_lowest_index(self):
        x = make_logits(1, 5000)
        top = x[0].max()
        assert (x[0] == top).nonzero().flatten().tolist() == [1666, 1667, 2500, 2690, 4999]
        assert int(sk.packed_sample_triton(x, None, 0.0)[0, 0]) == 1666

    @pytest.mark.parametrize("tau", [0.7, 1.0, 1.5])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    def test_sampled(self, tau, dtype, monkeypatch):
        """The exponential race with fixed noise (a column slice, as the logits): the reference's tokens; log-probs and
        entropies of the untempered distribution. Three splits of two blocks."""
        monkeypatch.setattr(sk, "PROGRAMS", 32)
        B, V = 6, 5000
        x = make_logits(B, V, seed=1, dtype=dtype)
        noise = torch.empty(B, V + 5).exponential_(generator=torch.Generator().manual_seed(2))[:, :V]
        got = sk.packed_sample_triton(x, noise, tau)
        want = sk.packed_sample_torch(x, noise, tau)
        check(got, want, name=f"τ={tau}")
        tok = got[0].long()
        assert (tok != x.argmax(-1)).any(), "the noise made no difference: the test would not see it ignored"
        assert torch.isfinite(x.float().gather(1, tok[:, None])).all()       # never a masked token
        assert got[1:, 2].tolist() == [0.0, 0.0]
        torch.testing.assert_close(got[1], x.float().log_softmax(-1).gather(1, tok[:, None]).squeeze(1).double(),
                                   rtol=1e-5, atol=1e-5)

    # a kernel that breaks the tie rule or the entropy fails the checks above (they can fail)
    @pytest.mark.parametrize("old, new, what", [
        ("better = sc > best", "better = sc >= best", "tokens"),                       # ties: highest index in a lane
        ("ci = tl.reduce(tl.where(bs == cb, bi, IMAX), 0, tl.standard._elementwise_min)",    # ties across splits:
         "ci = tl.reduce(tl.where(bs == cb, bi, -1), 0, tl.standard._elementwise_max)", "tokens"),  # the highest
        ("tt = tl.where(up, d * (tt - q * sl), tt + d * q)",
         "tt = tl.where(up, d * tt, tt + d * q)", "not close"),                        # t not re-centred
        ("q = tl.where(d > 0, q, 0.0)\n", "\n", "not close"),                          # 0·(−inf) in the −inf rows
    ])
    @pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the NaN mutant
    def test_checks_catch_a_broken_kernel(self, old, new, what, monkeypatch, tmp_path):
        mutants = mutant_kernels((sk._split_kernel, sk._combine_kernel),
                                 "from memlm.ops.sample_kernel import EMIN, IMAX, NEG, tl", old, new, tmp_path)
        monkeypatch.setattr(sk, "_interpreted", lambda: mutants)
        monkeypatch.setattr(sk, "PROGRAMS", 8)
        x = make_logits(3, 5000, seed=4)
        with pytest.raises(AssertionError, match=what):
            check(sk.packed_sample_triton(x, None, 0.0), sk.packed_sample_torch(x, None, 0.0))

    def test_plan(self, monkeypatch):
        monkeypatch.setattr(sk, "PROGRAMS", 256)
        assert sk.plan(1, 16384) == {"BLOCK": 1024, "SPLIT": 1024, "NS": 16}     # the block floor: 16 programs
        assert sk.plan(1, 50257) == {"BLOCK": 1024, "SPLIT": 1024, "NS": 50}
        assert sk.plan(4, 50257) == {"BLOCK": 1024, "SPLIT": 1024, "NS": 50}     # 200 programs
        assert sk.plan(64, 16384) == {"BLOCK": 1024, "SPLIT": 4096, "NS": 4}     # 256 programs
        assert sk.plan(1, 1 << 20) == {"BLOCK": 1024, "SPLIT": 4096, "NS": 256}
        assert sk.plan(3, 37) == {"BLOCK": 128, "SPLIT": 128, "NS": 1}

    def test_dispatch(self, monkeypatch):
        """packed_sample: the torch backend on CPU unless the kernels are asked for by name; with a filter the kernels
        never run (the filtered path), forced or not."""
        launches = count_launches(sk, monkeypatch)
        x = make_logits(3, 300)
        noise = torch.empty(3, 300).exponential_(generator=torch.Generator().manual_seed(0))
        assert dispatch.get("packed_sample", args=(x, None, 0.0)) is sk.packed_sample_torch
        plain, greedy = SamplingConfig(temperature=0.8), SamplingConfig(temperature=0)
        filtered = [SamplingConfig(temperature=0.8, top_k=5), SamplingConfig(temperature=0.8, top_p=0.9),
                    SamplingConfig(temperature=0.8, min_p=0.1)]
        want = sk.packed_sample_torch(x, noise, 0.8)
        check(packed_sample(x, noise, plain), want, name="torch backend")
        assert not launches and not fused_sampler(plain, "cpu")
        with dispatch.force_backend("packed_sample", "triton"):
            assert fused_sampler(plain, "cpu") and fused_sampler(greedy, "cpu")
            check(packed_sample(x, noise, plain), want, name="forced triton")
            check(packed_sample(x, None, greedy), sk.packed_sample_torch(x, None, 0.0), name="forced triton, greedy")
            assert len(launches) == 2
            for cfg in filtered:
                assert not fused_sampler(cfg, "cpu")
                tok = packed_sample(x, noise, cfg)[0].long()
                if cfg.top_k:
                    assert (x.float().topk(5, -1).indices == tok[:, None]).any(-1).all()
            assert len(launches) == 2
        assert not sk.supports(x.double()) and not sk.supports(x[0]) and not sk.supports(x, noise[:2])


def test_no_kernel_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = make_logits(2, 50)
    assert not sk.supports(x)
    with pytest.raises(ValueError, match="backend 'torch'"):
        sk.packed_sample_triton(x, None, 0.0)


# ------------------------------------------------------------------------------------------------------------ GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not sk.AVAILABLE, reason="needs CUDA and triton")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("V", [16384, 50257])
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_matches_torch(dtype, B, V, sampled):
    x = make_logits(B, V, seed=B + V, device="cuda", dtype=dtype)
    noise = torch.empty(B, V, device="cuda").exponential_(generator=torch.Generator("cuda").manual_seed(V))
    args = (x, noise if sampled else None, 0.9 if sampled else 0.0)
    assert dispatch.get("packed_sample", args=args) is sk.packed_sample_triton          # the CUDA default
    assert fused_sampler(SamplingConfig(temperature=args[2]), "cuda")
    check(sk.packed_sample_triton(*args), sk.packed_sample_torch(*args), name=f"{dtype} B={B} V={V}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_gpu_graph_captured(sampled):
    """packed_sample (the kernels by the automatic choice) captured in a CUDA graph, replayed after new logits and new
    noise were written in place."""
    B, V = 4, 16384
    cfg = SamplingConfig(temperature=0.9 if sampled else 0.0)
    x = make_logits(B, V, device="cuda", dtype=torch.bfloat16)
    noise = torch.empty(B, V, device="cuda").exponential_() if sampled else None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            packed_sample(x, noise, cfg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = packed_sample(x, noise, cfg)
    for seed in range(3):
        x.copy_(make_logits(B, V, seed=seed + 10, device="cuda", dtype=torch.bfloat16))
        if noise is not None:
            noise.exponential_()
        graph.replay()
        torch.cuda.synchronize()
        check(out, sk.packed_sample_torch(x, noise, cfg.temperature), name=f"replay {seed}")
