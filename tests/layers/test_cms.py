"""CMS feed-forward: level update periods (gradient gate), optimizer skipping, resume, online learning, deltas."""
from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import load, save

import memlm
from memlm.config.model import ModelConfig
from memlm.errors import UserError
from memlm.layers.attention import AttentionConfig
from memlm.layers.cms import (
    CMS,
    apply_cms_deltas,
    cms_deltas,
    cms_gate_gradients,
    cms_online_params,
    cms_online_step,
    cms_snapshot,
)
from memlm.ops.testing import assert_close
from memlm.train.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n, B=2, T=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, T, d, generator=g), torch.randn(B, T, d, generator=g)) for _ in range(n)]


def test_residual_chain_forward():
    torch.manual_seed(0)
    m = CMS(8, 16, [1, 4])
    x = torch.randn(2, 5, 8)
    d0 = m.levels[0](x)
    d1 = m.levels[1](x + d0)
    assert_close(m(x), d0 + d1, name="y = d0 + d1(x + d0)")


def test_period4_level_updates_every_4th_step_with_summed_gradient():
    """Level with f=4 is bit-identical on steps 1-3 and 5-7; at steps 4 and 8 it moves by exactly one AdamW
    step on the sum of its raw gradients (expected value computed here from the AdamW equations)."""
    torch.manual_seed(0)
    m = CMS(8, 16, [1, 4])
    lr, wd, (b1, b2), eps = 1e-2, 0.1, (0.9, 0.95), 1e-8
    opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    slow = dict(m.levels[1].named_parameters())
    fast = m.levels[0].w_in.weight
    history = {n: [p.detach().clone()] for n, p in slow.items()}
    raw = {n: [] for n in slow}
    for t, (x, target) in enumerate(_batches(8), start=1):
        opt.zero_grad(set_to_none=True)
        ((m(x) - target) ** 2).mean().backward()
        for n, p in slow.items():
            raw[n].append(p.grad.double().clone())
        fast_before = fast.detach().clone()
        cms_gate_gradients(m, t)
        opt.step()
        assert not torch.equal(fast, fast_before), f"the period-1 level did not move at step {t}"
        for n, p in slow.items():
            history[n].append(p.detach().clone())
    for n in slow:
        h = history[n]
        for t in (1, 2, 3, 5, 6, 7):
            assert torch.equal(h[t], h[t - 1]), f"{n} changed at step {t}"
        g1 = sum(raw[n][0:4])  # update 1: summed gradient of steps 1..4
        g2 = sum(raw[n][4:8])
        p0 = h[0].double()
        m1, v1 = (1 - b1) * g1, (1 - b2) * g1 ** 2
        p1 = p0 * (1 - lr * wd) - lr * (m1 / (1 - b1)) / ((v1 / (1 - b2)).sqrt() + eps)
        m2, v2 = b1 * m1 + (1 - b1) * g2, b2 * v1 + (1 - b2) * g2 ** 2
        p2 = p1 * (1 - lr * wd) - lr * (m2 / (1 - b1 ** 2)) / ((v2 / (1 - b2 ** 2)).sqrt() + eps)
        assert not torch.equal(h[4], h[3])
        assert_close(h[4].double(), p1, tol=1e-6, name=f"{n} after step 4")
        assert_close(h[8].double(), p2, tol=1e-6, name=f"{n} after step 8")
        # the update used the SUM, not the last gradient alone
        wrong = p0 * (1 - lr * wd) - lr * raw[n][3] / (raw[n][3].abs() + eps)
        assert (h[4].double() - wrong).abs().max() > 1e-4


@pytest.mark.parametrize("name,extra", [("adamw", {}), ("lion", {}), ("muon", {"muon_impl": "memlm"}),
                                        ("muon", {"muon_impl": "auto"}), ("m3", {"slow_every": 2})])
def test_optimizers_skip_gated_levels(name, extra):
    """Every optimizer of train/optim.py leaves a gated level untouched (no weight decay, no state)."""
    torch.manual_seed(0)
    model = memlm.build_model("cms-debug")
    opt = build_optimizer(model, name=name, lr=1e-3, weight_decay=0.5, **extra)
    params = dict(model.named_parameters())
    slow4 = {n: p for n, p in params.items() if ".mlp.levels.1." in n}
    slow16 = {n: p for n, p in params.items() if ".mlp.levels.2." in n}
    before = {n: p.detach().clone() for n, p in params.items()}
    x = torch.randint(0, 263, (2, 33))
    for t in range(1, 5):
        opt.zero_grad(set_to_none=True)
        logits, _ = model(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, 263), x[:, 1:].reshape(-1)).backward()
        cms_gate_gradients(model, t)
        opt.step()
        if t < 4:
            for n, p in slow4.items():
                assert torch.equal(p, before[n]), f"{name}: {n} moved at step {t}"
                assert not opt.state.get(p), f"{name}: optimizer state created for gated {n}"
    for n, p in slow16.items():
        assert torch.equal(p, before[n]), f"{name}: {n} (period 16) moved"
    assert any(not torch.equal(p, before[n]) for n, p in slow4.items()), f"{name}: period-4 level never moved"
    assert not torch.equal(params["blocks.0.mlp.levels.0.w_in.weight"], before["blocks.0.mlp.levels.0.w_in.weight"])


def _train(model, opt, batches, start):
    for t, x in enumerate(batches, start=start):
        opt.zero_grad(set_to_none=True)
        logits, _ = model(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, 263), x[:, 1:].reshape(-1)).backward()
        cms_gate_gradients(model, t)
        opt.step()


def test_resume_is_bit_exact_with_saved_accumulators():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 263, (2, 17), generator=g) for _ in range(6)]
    torch.manual_seed(0)
    ref = memlm.build_model("cms-debug")
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = build_optimizer(ref, name="adamw", lr=1e-2, weight_decay=0.1)
    _train(ref, opt, batches, 1)

    def resumed(zero_acc: bool):
        a = memlm.build_model("cms-debug")
        a.load_state_dict(init)
        oa = build_optimizer(a, name="adamw", lr=1e-2, weight_decay=0.1)
        _train(a, oa, batches[:3], 1)  # steps 1-3: the period-4 level only accumulates
        buf = io.BytesIO()
        torch.save(oa.state_dict(), buf)
        sd = {k: v.clone() for k, v in a.state_dict().items()}
        assert any(k.endswith("acc_w_in_weight") and v.any() for k, v in sd.items()), "accumulators not in state_dict"
        if zero_acc:
            sd = {k: (torch.zeros_like(v) if ".acc_" in k else v) for k, v in sd.items()}
        b = memlm.build_model("cms-debug")
        b.load_state_dict(sd)
        ob = build_optimizer(b, name="adamw", lr=1e-2, weight_decay=0.1)
        buf.seek(0)
        ob.load_state_dict(torch.load(buf, weights_only=True))
        _train(b, ob, batches[3:], 4)
        return b

    b = resumed(zero_acc=False)
    for k, v in ref.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), f"resume differs at {k}"
    c = resumed(zero_acc=True)  # control: losing the accumulators is visible
    assert not all(torch.equal(c.state_dict()[k], v) for k, v in ref.state_dict().items())


def _conversation_ids():
    tok = memlm.load_tokenizer("byte")
    text = "user: what is the capital of Zorbia? assistant: the capital of Zorbia is Quillmere. " * 2
    return torch.tensor(tok.encode(text))


def test_online_step_lowers_loss_and_touches_only_fast_levels():
    torch.manual_seed(0)
    model = memlm.build_model("cms-debug").eval()
    ids = _conversation_ids()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = {n for n, _ in cms_online_params(model)}
    assert fast and all(".levels.0." in n for n in fast)
    with torch.no_grad():  # a chat loop runs under no_grad: online learning must still work
        losses = [cms_online_step(model, ids, lr=0.1) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.05, losses
    for k, v in model.state_dict().items():
        if k in fast:
            assert not torch.equal(v, before[k]), f"fast level {k} did not learn"
        else:
            assert torch.equal(v, before[k]), f"{k} changed (only fast CMS levels may learn online)"
    assert not model.training


def test_online_levels_argument_and_errors():
    model = memlm.build_model("cms-debug")
    names = {n for n, _ in cms_online_params(model, levels=[1])}
    assert names and all(".levels.1." in n for n in names)
    with pytest.raises(UserError):
        cms_online_params(model, levels=[5])
    with pytest.raises(UserError):
        cms_online_step(memlm.build_model("transformer-debug"), [1, 2, 3], lr=1e-3)


def test_deltas_round_trip():
    torch.manual_seed(0)
    model = memlm.build_model("cms-debug").eval()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    base = cms_snapshot(model)
    ids = _conversation_ids()
    for _ in range(3):
        cms_online_step(model, ids, lr=0.05)
    deltas = cms_deltas(model, base)
    assert set(deltas) == set(base) and all(d.any() for d in deltas.values())
    loaded = load(save(deltas))  # the session stores them as safetensors
    fresh = memlm.build_model("cms-debug").eval()
    fresh.load_state_dict(base_sd)
    apply_cms_deltas(fresh, loaded)
    x = ids[None, :40]
    assert_close(fresh(x)[0], model(x)[0], name="logits after applying deltas")
    for n, p in fresh.named_parameters():
        assert_close(p, dict(model.named_parameters())[n], tol=1e-6, name=n)
    # a full state_dict as base works too (only CMS entries are used)
    assert set(cms_deltas(model, base_sd)) >= set(base)
    bad = {next(iter(deltas)): torch.zeros(3)}
    with pytest.raises(UserError, match="shape"):
        apply_cms_deltas(fresh, bad)
    with pytest.raises(UserError, match="does not name"):
        apply_cms_deltas(fresh, {"embed.weight": torch.zeros(263, 64)})


def test_config_validation():
    layers = [AttentionConfig()]
    with pytest.raises(ValueError, match="cms_levels"):
        ModelConfig(layers=layers, mlp="cms", cms_levels=[])
    with pytest.raises(ValueError, match="cms_levels"):
        ModelConfig(layers=layers, mlp="cms", cms_levels=[1, 0])
    cfg = ModelConfig(layers=layers, d_model=32, n_heads=2, mlp="cms", cms_levels=[1, 2, 8, 64])
    m = memlm.build_model(cfg)
    assert m.blocks[0].mlp.periods == (1, 2, 8, 64)
    assert m.blocks[0].mlp.levels[0].w_out.weight.shape == (32, cfg.d_ff)


def test_trainer_gates_cms_and_resumes_mid_period(tmp_path):
    """Through the Trainer: the period-4 level moves only at step 4, and a run resumed from step 2 (accumulators
    half full) ends bit-identical to an uninterrupted one."""
    from memlm.data.packing import Packer
    from memlm.data.tokenizer import ByteTokenizer
    from memlm.train.trainer import Trainer

    texts = [f"Line {i}: a small boat crossed the grey water while the gulls argued overhead." for i in range(30)]

    def trainer(out, steps, resume=None):
        cfg = memlm.preset("cms-debug")
        cfg.train = cfg.train.replace(seq_len=16, batch_size=2, steps=steps, warmup=1, eval_every=0, sample_every=0,
                                      save_every=0, log_every=1, tensorboard=False, device="cpu")
        data = Packer(texts, ByteTokenizer(), batch_size=2, seq_len=16)
        return Trainer(cfg, out_dir=out, data=data, tokenizer=ByteTokenizer(), log=lambda s: None, resume=resume)

    a = trainer(tmp_path / "a", 5)
    slow = a.model.blocks[0].mlp.levels[1].w_in.weight
    seen = [slow.detach().clone()]
    for _ in range(5):
        a.train_step(a._next_batches())
        seen.append(slow.detach().clone())
    moved = [not torch.equal(seen[i], seen[i - 1]) for i in range(1, 6)]
    assert moved == [False, False, False, True, False], moved
    b = trainer(tmp_path / "b", 2)
    b.fit()
    c = trainer(tmp_path / "b", 5, resume=True)
    assert c.step == 2
    c.fit()
    for k, v in a.model.state_dict().items():
        assert torch.equal(c.model.state_dict()[k], v), f"resumed CMS run differs at {k}"
