"""Tests for memlm.train.optim: hand-computed steps, parameter groups, loss going down, state round trips.

Notation: p parameter, g gradient, η lr, λ weight decay, μ Muon momentum, B Muon buffer, M1/M2 M3's fast/slow
momentum, V second moment, S gradient sum, f slow period, α slow weight, NS Newton–Schulz (5 quintic steps).
"""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from memlm.ops.testing import assert_close, rel_err
from memlm.train.optim import (
    M3,
    NS_COEFFICIENTS,
    Lion,
    MultiOptimizer,
    Muon,
    build_optimizer,
    muon_lr_ratio,
    newton_schulz,
    param_groups,
)
from memlm.train.schedule import apply_lr

A, B, C = 3.4445, -4.7750, 2.0315
HAS_TORCH_MUON = hasattr(torch.optim, "Muon")
DT = torch.float64  # hand maths in float64; our NS keeps float64 inputs in float64


# ---------------------------------------------------------------------------------------------------------
# Hand references (plain tensor ops / plain Python; never calling the implementation)
# ---------------------------------------------------------------------------------------------------------
def ns5_hand(x: torch.Tensor) -> torch.Tensor:
    """Five quintic Newton–Schulz steps on x / ‖x‖_F, written out for a square or wide matrix."""
    x = x / x.norm()
    for _ in range(5):
        a = x @ x.T
        x = A * x + B * (a @ x) + C * (a @ a @ x)
    return x


def rot(theta: float) -> torch.Tensor:
    return torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=DT)


def test_newton_schulz_scalar_map_on_svd() -> None:
    # g = U diag(s) Vᵀ: NS acts on each singular value σ/‖s‖ by the scalar map σ ← aσ + bσ³ + cσ⁵ (plain Python).
    u, v, s = rot(0.3), rot(-1.1), [3.0, 1.0]
    g = u @ torch.diag(torch.tensor(s, dtype=DT)) @ v.T
    norm = math.sqrt(sum(x * x for x in s))
    out = []
    for sigma in s:
        sigma /= norm
        for _ in range(5):
            sigma = A * sigma + B * sigma ** 3 + C * sigma ** 5
        out.append(sigma)
    expected = u @ torch.diag(torch.tensor(out, dtype=DT)) @ v.T
    assert_close(newton_schulz(g), expected, tol=1e-12, name="NS5 fp64")
    assert_close(newton_schulz(g.float()), expected.float(), name="NS5 fp32")
    assert_close(newton_schulz(g.to(torch.bfloat16)).double(), expected, tol=1e-2, name="NS5 bf16 in, fp32 math")
    # Quintic NS is an approximate orthogonaliser: singular values land near 1, not exactly on it.
    assert all(0.6 < x < 1.3 for x in out) and abs(out[0] - out[1]) > 1e-3
    assert NS_COEFFICIENTS == (A, B, C)


def test_newton_schulz_tall_batched_zero() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 2, dtype=DT)
    got = newton_schulz(x)
    for i in range(3):  # tall matrices run on the transpose; the result is the transpose of the wide result
        assert_close(got[i], ns5_hand(x[i].T).T, tol=1e-12, name=f"tall {i}")
    assert torch.equal(newton_schulz(torch.zeros(2, 2)), torch.zeros(2, 2))


# ---------------------------------------------------------------------------------------------------------
# Hand-computed steps on a 2×2 matrix
# ---------------------------------------------------------------------------------------------------------
P0 = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=DT)
GRADS = [torch.tensor([[0.1, -0.3], [0.2, 0.4]], dtype=DT), torch.tensor([[-0.2, 0.1], [0.05, 0.3]], dtype=DT),
         torch.tensor([[0.3, 0.2], [-0.1, -0.25]], dtype=DT)]


def run_steps(opt_cls, p0: torch.Tensor, grads: list[torch.Tensor], **kw) -> list[torch.Tensor]:
    p = nn.Parameter(p0.clone())
    opt = opt_cls([p], **kw)
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


def test_lion_hand() -> None:
    lr, (b1, b2), wd = 0.01, (0.9, 0.99), 0.1
    got = run_steps(Lion, P0, GRADS[:2], lr=lr, betas=(b1, b2), weight_decay=wd)
    p, m, want = P0.clone(), torch.zeros_like(P0), []
    for g in GRADS[:2]:
        u = torch.sign(b1 * m + (1 - b1) * g)
        p = p - lr * (u + wd * p)
        m = b2 * m + (1 - b2) * g
        want.append(p)
    # step 1 is sign(g) exactly: check the numbers themselves, not just agreement with the loop above
    assert torch.allclose(want[0], P0 - lr * (torch.tensor([[1.0, -1.0], [1.0, 1.0]], dtype=DT) + wd * P0))
    for i in range(2):
        assert_close(got[i], want[i], tol=1e-14, name=f"lion step {i + 1}")


def muon_hand(p0: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float, mu: float,
              ratio: float) -> list[torch.Tensor]:
    p, buf, out = p0.clone(), torch.zeros_like(p0), []
    for g in grads:
        buf = mu * buf + g
        u = g + mu * buf
        o = ns5_hand(u) if u.shape[0] <= u.shape[1] else ns5_hand(u.T).T
        p = p * (1 - lr * wd) - lr * ratio * o
        out.append(p)
    return out


def test_muon_hand_ours() -> None:
    lr, wd, mu = 0.02, 0.1, 0.95
    got = run_steps(Muon, P0, GRADS[:2], lr=lr, weight_decay=wd, momentum=mu)
    want = muon_hand(P0, GRADS[:2], lr, wd, mu, 1.0)
    for i in range(2):
        assert_close(got[i] - P0, want[i] - P0, tol=1e-12, name=f"muon step {i + 1}")
    # Shape scale, torch's "original" convention √max(1, r/c): 3×2 → √1.5, 2×3 → 1; Moonshot's 0.2·√max(r, c).
    assert muon_lr_ratio((3, 2)) == pytest.approx(math.sqrt(1.5)) and muon_lr_ratio((2, 3)) == 1.0
    assert muon_lr_ratio((3, 2), "match_rms_adamw") == pytest.approx(0.2 * math.sqrt(3))
    torch.manual_seed(1)
    for shape, fn in [((3, 2), None), ((2, 3), None), ((3, 2), "match_rms_adamw")]:
        p0, gs = torch.randn(shape, dtype=DT), [torch.randn(shape, dtype=DT) for _ in range(2)]
        ratio = {None: math.sqrt(max(1, shape[0] / shape[1])), "match_rms_adamw": 0.2 * math.sqrt(max(shape))}[fn]
        got = run_steps(Muon, p0, gs, lr=lr, weight_decay=wd, momentum=mu, adjust_lr_fn=fn)
        want = muon_hand(p0, gs, lr, wd, mu, ratio)
        assert_close(got[1] - p0, want[1] - p0, tol=1e-12, name=f"muon {shape} {fn}")


@pytest.mark.skipif(not HAS_TORCH_MUON, reason="torch.optim.Muon not in this torch")
def test_muon_hand_torch() -> None:
    lr, wd, mu = 0.02, 0.1, 0.95
    for shape in [(2, 2), (3, 2)]:
        torch.manual_seed(2)
        p0 = P0.float() if shape == (2, 2) else torch.randn(shape)
        gs = [g.float() for g in GRADS[:2]] if shape == (2, 2) else [torch.randn(shape) for _ in range(2)]
        got = run_steps(torch.optim.Muon, p0, gs, lr=lr, weight_decay=wd, momentum=mu)
        want = muon_hand(p0.double(), [g.double() for g in gs], lr, wd, mu, math.sqrt(max(1, shape[0] / shape[1])))
        # torch runs NS in bf16: compare the update at bf16 tolerance.
        for i in range(2):
            assert_close((got[i] - p0).double(), want[i] - p0.double(), tol=3e-2, name=f"torch muon {shape} {i}")


@pytest.mark.parametrize("rule", ["preconditioned", "spec"])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_m3_hand(bias_correction: bool, rule: str) -> None:
    lr, (b1, b2), b3, alpha, f, eps, wd = 0.01, (0.9, 0.95), 0.8, 0.5, 2, 1e-8, 0.1
    vec0 = torch.tensor([0.3, -0.7], dtype=DT)
    vec_grads = [torch.tensor([0.2, -0.1], dtype=DT), torch.tensor([-0.4, 0.3], dtype=DT),
                 torch.tensor([0.1, 0.1], dtype=DT)]
    mat, vec = nn.Parameter(P0.clone()), nn.Parameter(vec0.clone())
    opt = M3([mat, vec], lr=lr, betas=(b1, b2), beta3=b3, alpha=alpha, slow_every=f, eps=eps, weight_decay=wd,
             v_bias_correction=bias_correction, matrix_rule=rule)
    got = []
    for g, gv in zip(GRADS, vec_grads):
        mat.grad, vec.grad = g.clone(), gv.clone()
        opt.step()
        got.append((mat.detach().clone(), vec.detach().clone()))

    # matrix, written out step by step (f = 2: the slow momentum appears at step 2 and is frozen at step 3)
    g1, g2, g3 = GRADS
    corr = (lambda t: 1 - b2 ** t) if bias_correction else (lambda t: 1.0)
    if rule == "spec":  # (NS(M1) + α O2) / D, O2 = NS(M2)
        def update(m1, o2, d):
            return (ns5_hand(m1) + alpha * o2) / d

        def slow(m2, d):
            return ns5_hand(m2)
    else:  # 0.2·√max(r, c) · (NS(M1 / D) + α O2), O2 = NS(M2 / D) with D of the refresh step
        def update(m1, o2, d):
            return 0.2 * math.sqrt(2) * (ns5_hand(m1 / d) + alpha * o2)

        def slow(m2, d):
            return ns5_hand(m2 / d)
    p = P0.clone()
    m1 = g1
    v = (1 - b2) * g1 ** 2
    d = (v / corr(1)).sqrt() + eps
    p1 = p * (1 - lr * wd) - lr * update(m1, torch.zeros_like(p), d)  # M2 = 0 → O2 = 0
    m1 = b1 * g1 + g2
    v = b2 * v + (1 - b2) * g2 ** 2
    d = (v / corr(2)).sqrt() + eps
    o2 = slow(g1 + g2, d)  # refresh at t = 2: M2 = β3·0 + (g1 + g2)
    p2 = p1 * (1 - lr * wd) - lr * update(m1, o2, d)
    m1 = b1 * m1 + g3
    v = b2 * v + (1 - b2) * g3 ** 2
    d = (v / corr(3)).sqrt() + eps
    # t = 3: no refresh, g3 only enters the running sum; the slow direction is still the one of t = 2
    p3 = p2 * (1 - lr * wd) - lr * update(m1, o2, d)
    for i, want in enumerate([p1, p2, p3]):
        assert_close(got[i][0] - P0, want - P0, tol=1e-12, name=f"m3 matrix step {i + 1}")
    # the running sum holds g3, waiting for the refresh at t = 4
    assert_close(opt.state[mat]["grad_sum"], g3, tol=0, name="S after step 3")

    # vector: AdamW with bias correction (independent of the matrix flag)
    q, m, vv = vec0.clone(), torch.zeros(2, dtype=DT), torch.zeros(2, dtype=DT)
    for t, gv in enumerate(vec_grads, start=1):
        m = b1 * m + (1 - b1) * gv
        vv = b2 * vv + (1 - b2) * gv ** 2
        q = q * (1 - lr * wd) - lr * (m / (1 - b1 ** t)) / ((vv / (1 - b2 ** t)).sqrt() + eps)
        assert_close(got[t - 1][1] - vec0, q - vec0, tol=1e-12, name=f"m3 vector step {t}")


def test_m3_matrix_step_is_scale_free_and_bounded() -> None:
    # Regression (onyx-11m died at step 1): the matrix step must not depend on the gradient's scale, and an entry
    # whose gradient is tiny or zero must not be thrown far. The literal SPEC rule divides NS(M1) (entries
    # ≈ 1/√max(r, c) whatever ‖g‖ is) by √V ≈ |g| entry by entry: steps ∝ 1/|g|, η·O/ε where g = 0.
    torch.manual_seed(0)
    p0 = torch.randn(64, 48) * 0.02
    grads = [torch.randn(64, 48) * 1e-5 for _ in range(3)]  # clipped gradients of a 10M model are this small
    grads[0][0, 0] = 0.0  # one entry with no gradient at the first step
    lr = 1e-3
    steps = {c: run_steps(M3, p0, [g * c for g in grads], lr=lr, slow_every=2) for c in (1.0, 1e2, 1e4)}
    for a, b in zip(steps[1e2], steps[1e4]):  # (at c = 1, ε = 1e-8 is not negligible against |g| ≈ 1e-5)
        assert_close(a - p0, b - p0, tol=1e-2, name="m3 step under a 100× gradient scale")  # ε vs the smallest |g|
    for c, traj in steps.items():
        for i, p in enumerate(traj):
            # ≈ AdamW's per-step RMS (0.2·η) and never more than a few η per entry, whatever the gradient scale
            delta = p - (p0 if i == 0 else traj[i - 1])
            assert delta.abs().max() < 10 * lr and delta.pow(2).mean().sqrt() < 0.5 * lr, f"scale {c} step {i + 1}"
    spec = run_steps(M3, p0, grads[:1], lr=lr, matrix_rule="spec")[0]
    assert (spec - p0).abs().max() > 1.0  # the literal rule: a 1e-3 learning rate moves entries by > 1
    with pytest.raises(ValueError, match="matrix_rule"):
        M3([nn.Parameter(p0.clone())], matrix_rule="nope")


def test_m3_refresh_period_matters() -> None:
    # A wrong refresh period (or refreshing every step) must change the trajectory at step 2.
    a = run_steps(M3, P0, GRADS, lr=0.01, slow_every=2, alpha=0.5)
    b = run_steps(M3, P0, GRADS, lr=0.01, slow_every=3, alpha=0.5)
    assert torch.equal(a[0], b[0]) and rel_err(a[1] - P0, b[1] - P0) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------------------
class TinyRMSNorm(nn.Module):  # a custom norm class, recognised by its name
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class TinyLM(nn.Module):
    """Bigram char LM: ids [B, T] → logits [B, T, V]."""

    def __init__(self, vocab: int = 16, d: int = 16, hidden: int = 32, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.block = nn.ModuleDict({"fc": nn.Linear(d, hidden), "proj": nn.Linear(hidden, d, bias=False),
                                    "norm": nn.LayerNorm(d), "rms": TinyRMSNorm(d)})
        self.block.gate = nn.Parameter(torch.zeros(d))  # a loose vector parameter
        self.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x + self.block["proj"](torch.nn.functional.gelu(self.block["fc"](self.block["norm"](x))))
        return self.lm_head(self.block["rms"](x) * (1 + self.block.gate))


def test_param_groups_decay_and_scales() -> None:
    model = TinyLM()
    groups = param_groups(model, weight_decay=0.1, lr_scales={"block.fc.*": 0.5, "block.gate": 0.1, "*.fc.bias": 9.0})
    by_name = {n: g for g in groups for n in g["param_names"]}
    decayed = {n for n, g in by_name.items() if g["weight_decay"] > 0}
    assert decayed == {"block.fc.weight", "block.proj.weight", "lm_head.weight"}
    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}  # frozen left out
    assert "frozen" not in by_name
    assert all(g["weight_decay"] in (0.0, 0.1) for g in groups)
    assert by_name["block.fc.weight"]["lr_scale"] == 0.5
    assert by_name["block.fc.bias"]["lr_scale"] == 0.5  # first matching pattern wins
    assert by_name["block.gate"]["lr_scale"] == 0.1 and by_name["embed.weight"]["lr_scale"] == 1.0
    for g in groups:  # names and tensors line up
        assert [dict(model.named_parameters())[n] is p for n, p in zip(g["param_names"], g["params"])] == \
            [True] * len(g["params"])

    opt = build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.1, lr_scales={"block.gate": 0.1})
    apply_lr(opt, 2e-3)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert lrs["block.gate"] == pytest.approx(2e-4) and lrs["block.fc.weight"] == pytest.approx(2e-3)


def test_param_groups_embedding_by_name_and_hidden_matrices() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(8, 4))  # no Embedding module, but "embed" in the name
            self.w = nn.Linear(4, 4)

    groups = param_groups(Odd(), weight_decay=0.1, split_matrices=True)
    flags = {n: (g["weight_decay"], g["matrix"]) for g in groups for n in g["param_names"]}
    assert flags == {"pos_embed": (0.0, False), "w.weight": (0.1, True), "w.bias": (0.0, False)}

    for tied in (False, True):
        opt = build_optimizer(TinyLM(tied=tied), name="muon", lr=1e-3, weight_decay=0.1, muon_impl="memlm")
        assert isinstance(opt, MultiOptimizer) and isinstance(opt.optimizers[0], Muon)
        muon_names = sorted(n for g in opt.optimizers[0].param_groups for n in g["param_names"])
        assert muon_names == ["block.fc.weight", "block.proj.weight"]  # not embed, not lm_head (tied or not)
        adam_names = {n for g in opt.optimizers[1].param_groups for n in g["param_names"]}
        assert "embed.weight" in adam_names and ("lm_head.weight" in adam_names) == (not tied)


def test_build_optimizer_errors_and_muon_lr() -> None:
    model = TinyLM()
    with pytest.raises(ValueError, match="not one of"):
        build_optimizer(model, name="sgd", lr=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match="unknown option"):
        build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.0, momentum=0.9)
    opt = build_optimizer(model, name="muon", lr=1e-3, weight_decay=0.0, muon_lr=0.02, lr_scales={"*.proj.*": 0.5})
    apply_lr(opt, 5e-4)  # one schedule drives both optimizers; muon_lr is kept as a ratio
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert lrs["block.fc.weight"] == pytest.approx(0.01) and lrs["block.proj.weight"] == pytest.approx(0.005)
    assert lrs["embed.weight"] == pytest.approx(5e-4)


# ---------------------------------------------------------------------------------------------------------
# Training behaviour and state round trips
# ---------------------------------------------------------------------------------------------------------
CONFIGS = {
    "adamw": dict(name="adamw", lr=1e-2, weight_decay=0.01),
    "lion": dict(name="lion", lr=3e-3, weight_decay=0.01),
    "muon-memlm": dict(name="muon", lr=3e-3, weight_decay=0.01, muon_lr=0.02, muon_impl="memlm"),
    "m3": dict(name="m3", lr=3e-3, weight_decay=0.01, slow_every=2),
}
if HAS_TORCH_MUON:
    CONFIGS["muon-torch"] = dict(name="muon", lr=3e-3, weight_decay=0.01, muon_lr=0.02, muon_impl="torch")


def bigram_batch(vocab: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    seq = [0]
    for _ in range(64):
        seq.append((5 * seq[-1] + 3) % vocab)  # a deterministic successor per token: learnable to ~0 loss
    ids = torch.tensor(seq).view(1, -1)
    return ids[:, :-1], ids[:, 1:]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def train(model: nn.Module, opt, steps: int) -> list[float]:
    x, y = bigram_batch()
    losses = []
    for _ in range(steps):
        loss = loss_of(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("key", list(CONFIGS))
def test_loss_goes_down(key: str) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    opt = build_optimizer(model, **CONFIGS[key])
    losses = train(model, opt, 50)
    x, y = bigram_batch()
    final = loss_of(model, x, y).item()
    assert math.isfinite(final) and final < 0.3 * losses[0], f"{key}: {losses[0]:.3f} → {final:.3f}"


@pytest.mark.parametrize("key", list(CONFIGS))
def test_state_dict_round_trip(key: str) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    opt = build_optimizer(model, **CONFIGS[key])
    train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # plain tensors and numbers only

    torch.manual_seed(123)  # a different fresh init: everything must come from the checkpoint
    clone = TinyLM()
    clone.load_state_dict(saved["model"])
    opt2 = build_optimizer(clone, **CONFIGS[key])
    opt2.load_state_dict(saved["optim"])
    la, lb = train(model, opt, 3), train(clone, opt2, 3)  # with slow_every=2, M3 refreshes at t = 4 and 6
    assert la == lb
    for (n, p), q in zip(model.named_parameters(), clone.parameters()):
        assert torch.equal(p, q), f"{key}: {n} differs after resume"

    # the resumed run must actually depend on the loaded state: a fresh optimizer state diverges
    torch.manual_seed(123)
    clone2 = TinyLM()
    clone2.load_state_dict(saved["model"])
    train(clone2, build_optimizer(clone2, **CONFIGS[key]), 3)
    assert any(not torch.equal(p, q) for p, q in zip(clone2.parameters(), clone.parameters()))


def test_multi_optimizer_load_mismatch() -> None:
    opt = build_optimizer(TinyLM(), name="muon", lr=1e-3, weight_decay=0.0, muon_impl="memlm")
    with pytest.raises(ValueError, match="inner optimizers"):
        opt.load_state_dict({"optimizers": [opt.optimizers[0].state_dict()]})


def test_m3_matrix_flag_overrides_ndim() -> None:
    # A 2-D parameter in a group with matrix=False must follow the AdamW rule (e.g. embeddings, the head).
    p0 = P0.clone()
    got = run_steps(M3, p0, GRADS[:1], lr=0.01, matrix=False)[0]
    want = p0 - 0.01 * GRADS[0] / (GRADS[0].abs() + 1e-8)  # Adam's first step is η·sign(g), bias-corrected
    assert_close(got - p0, want - p0, tol=1e-6, name="m3 vector rule on a matrix")
    assert not torch.allclose(got, run_steps(M3, p0, GRADS[:1], lr=0.01)[0])


def test_adamw_fused_flag_matches_unfused() -> None:
    # fused=None picks the fused kernel only when every parameter is on CUDA; fused=True also runs on CPU.
    params = []
    for fused in (None, True):
        torch.manual_seed(0)
        model = TinyLM()
        opt = build_optimizer(model, name="adamw", lr=1e-2, weight_decay=0.01, fused=fused)
        assert opt.param_groups[0]["fused"] == fused
        train(model, opt, 5)
        params.append(list(model.parameters()))
    for a, b in zip(*params):
        assert_close(a, b, tol=1e-6, name="fused vs unfused AdamW")


@pytest.mark.parametrize("key", list(CONFIGS))
def test_each_optimizer_trains_a_memlm_debug_model_through_the_trainer(key: str, tmp_path) -> None:
    """Issue 6: every optimizer, selected by config, lowers the loss of a debug model over 50 steps."""
    import memlm
    from memlm.data.packing import Batch
    from memlm.train.trainer import Trainer

    opts = dict(CONFIGS[key])
    name = opts.pop("name")
    opts.pop("weight_decay")
    lr = opts.pop("lr")
    cfg = memlm.preset("transformer-debug")
    cfg.train = cfg.train.replace(optimizer=name, lr=lr, optimizer_options=opts, warmup=5, steps=50, eval_every=0,
                                  sample_every=0, save_every=0, tensorboard=False, log_every=50)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 33), generator=g)
    batch = Batch(input_ids=ids[:, :-1], labels=ids[:, 1:], reset=torch.zeros(4, 32, dtype=torch.bool))
    trainer = Trainer(cfg, out_dir=tmp_path, data=iter([batch] * 60), val_data=[], log=lambda s: None)
    losses = [trainer.train_step(batch)["loss"] for _ in range(50)]
    assert math.isfinite(losses[-1]) and losses[-1] < 0.8 * losses[0], f"{key}: {losses[0]:.3f} → {losses[-1]:.3f}"
