"""Multi-tensor optimizer paths equal the per-tensor loops (CPU, where the flags exist), and the choice is named."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from memlm.ops.testing import rel_err
from memlm.train.optim import Lion, Muon, build_optimizer, describe_optimizer


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.a = nn.Linear(8, 8)  # two matrices of one shape: Muon batches their Newton–Schulz
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 5, bias=False)
        self.norm = nn.LayerNorm(5)

    def forward(self, x):
        return self.norm(self.c(torch.tanh(self.b(torch.tanh(self.a(self.embed(x)))))))


# The batched Newton–Schulz rounds differently with the number of CPU threads (M3: 1.9e-5 on one thread, 7.1e-5 on
# two, against its loop); the bounds below are for one, so the result does not depend on what ran before.
pytestmark = pytest.mark.usefixtures("one_thread")


def _train(make_opt, steps=6, device="cpu"):
    """Parameters (on the CPU) after `steps` steps from one seed and one batch stream, whatever the device."""
    torch.manual_seed(0)
    net = Net().to(device)
    opt = make_opt(net)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 11, (4, 7), generator=g).to(device)
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().cpu().clone() for p in net.parameters()], opt


@pytest.mark.parametrize("name,kw", [("adamw", {}), ("lion", {}), ("muon", {"muon_impl": "memlm"}),
                                     ("muon", {"muon_impl": "memlm", "nesterov": False}),
                                     ("m3", {"slow_every": 2})])   # M3's "spec" rule: the bit-exact test below
def test_foreach_equals_for_loop(name, kw):
    def make(foreach):
        return lambda net: build_optimizer(net, name=name, lr=1e-2, weight_decay=0.1, foreach=foreach, **kw)

    loop, opt_loop = _train(make(False))
    multi, opt_multi = _train(make(True))
    assert "for-loop" in describe_optimizer(opt_loop) and "foreach" in describe_optimizer(opt_multi)
    # Muon, M3: a batched matmul rounds differently from one per matrix (M3's Adam preconditioning amplifies it over
    # the steps; with per-matrix Newton–Schulz its foreach path is bit-identical, test below)
    tol = {"muon": 1e-5, "m3": 5e-5}.get(name, 1e-6)
    for a, b in zip(multi, loop):
        assert rel_err(a, b) <= tol


def test_default_flags_follow_the_device():
    net = Net()
    assert describe_optimizer(build_optimizer(net, name="adamw", lr=1e-3, weight_decay=0.0)) == "AdamW(for-loop)"
    assert describe_optimizer(build_optimizer(net, name="adamw", lr=1e-3, weight_decay=0.0, fused=True)) == "AdamW(fused)"
    assert describe_optimizer(Lion(net.parameters())) == "Lion(for-loop)"  # CPU: the loop is as fast
    mixed = build_optimizer(net, name="muon", lr=1e-3, weight_decay=0.0, muon_impl="memlm")
    assert describe_optimizer(mixed) == "MultiOptimizer(Muon(for-loop) + AdamW(for-loop))"
    assert isinstance(mixed.optimizers[0], Muon)
    assert describe_optimizer(build_optimizer(net, name="m3", lr=1e-3, weight_decay=0.0)) == "M3(for-loop)"
    assert describe_optimizer(build_optimizer(net, name="m3", lr=1e-3, weight_decay=0.0, foreach=True)) == "M3(foreach)"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_defaults_are_fused_and_foreach():
    net = Net().cuda()
    assert describe_optimizer(build_optimizer(net, name="adamw", lr=1e-3, weight_decay=0.0)) == "AdamW(fused)"
    assert describe_optimizer(build_optimizer(net, name="lion", lr=1e-3, weight_decay=0.0)) == "Lion(foreach)"
    cpu, _ = _train(lambda n: build_optimizer(n, name="lion", lr=1e-2, weight_decay=0.1, foreach=False))
    cuda, _ = _train(lambda n: build_optimizer(n, name="lion", lr=1e-2, weight_decay=0.1), device="cuda")
    for a, b in zip(cuda, cpu):
        assert rel_err(a, b) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_m3_defaults_to_foreach_and_matches_the_cpu_loop():
    net = Net().cuda()
    assert describe_optimizer(build_optimizer(net, name="m3", lr=1e-3, weight_decay=0.0)) == "M3(foreach)"
    cpu, _ = _train(lambda n: build_optimizer(n, name="m3", lr=1e-2, weight_decay=0.1, foreach=False, slow_every=2))
    cuda, _ = _train(lambda n: build_optimizer(n, name="m3", lr=1e-2, weight_decay=0.1, slow_every=2), device="cuda")
    for a, b in zip(cuda, cpu):
        assert rel_err(a, b) <= 1e-4


def test_trainer_logs_the_optimizer_path(tmp_path):
    import memlm
    from memlm.data.tokenizer import ByteTokenizer
    from memlm.train.trainer import Trainer

    cfg = memlm.preset("transformer-debug")
    cfg.train = cfg.train.replace(device="cpu", tensorboard=False, optimizer="lion")
    lines = []
    Trainer(cfg, out_dir=tmp_path / "r", data=iter([]), tokenizer=ByteTokenizer(), log=lines.append)
    assert any("optimizer Lion(for-loop)" in s for s in lines), lines


@pytest.mark.parametrize("kw", [{"slow_every": 2}, {"slow_every": 3, "matrix_rule": "spec"}])
def test_m3_foreach_is_the_loop_up_to_batched_matmul_rounding(monkeypatch, kw):
    """With Newton–Schulz run per matrix inside the batch, M3's foreach path equals its loop bit for bit: every other
    difference (momenta, slow refresh, preconditioning, both matrix rules, the Adam vectors) would show here."""
    from memlm.train import optim

    plain = optim.newton_schulz
    monkeypatch.setattr(optim, "newton_schulz",
                        lambda x, **k: torch.stack([plain(a, **k) for a in x]) if x.dim() == 3 else plain(x, **k))

    def make(foreach):
        return lambda net: build_optimizer(net, name="m3", lr=1e-2, weight_decay=0.1, foreach=foreach, **kw)

    loop, _ = _train(make(False))
    multi, _ = _train(make(True))
    assert all(torch.equal(a, b) for a, b in zip(multi, loop))
