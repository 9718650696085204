"""The ``moop`` mixer: top-k per-token routing over causal operators, nested states, auxiliary losses and metrics.

Notation: B batch, T tokens, D width, n operators, k = top_k.
"""
from __future__ import annotations

import pytest
import torch
from mixer_laws import build, check_all, x_of

import memlm
from memlm.config.base import apply_overrides
from memlm.errors import UserError
from memlm.layers.base import collect_aux
from memlm.layers.conv import ConvConfig
from memlm.layers.moop import MoOpConfig
from memlm.layers.sparse_attention import GlobalAttentionConfig, LocalAttentionConfig
from memlm.layers.ssm import SSMConfig
from memlm.ops.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def ops():
    return [LocalAttentionConfig(window=6), GlobalAttentionConfig(stride=4),
            SSMConfig(head_dim=8, d_state=8, chunk_size=8), ConvConfig(kernel_size=4)]


def test_moop_contract_laws():
    check_all(build(MoOpConfig(operators=ops(), top_k=2)))


def test_moop_off_contract_laws():
    m = build(MoOpConfig(operators=ops()), moop_off=True)
    assert m.router is None
    check_all(m)


@torch.no_grad()
def test_output_is_renormalised_top_k_mix_and_states_are_the_operators_own():
    m = build(MoOpConfig(operators=ops(), top_k=2))
    x = x_of(m, T=20)
    y, st = m(x)
    logits = m.router(x)
    top, idx = logits.topk(2, -1)
    w = torch.softmax(top, -1)
    outs, states = zip(*[op(x) for op in m.ops])
    Y = torch.stack(outs, 2)
    ref = (Y.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1])) * w[..., None]).sum(2)
    assert_close(y, ref, tol=1e-5, name="top-2 mix")
    for i, s in enumerate(states):  # each operator saw every token: its state equals running it alone
        for k, v in s.tensors().items():
            assert torch.equal(getattr(st, f"op{i}").tensors()[k], v), (i, k)
    gates = m.gates(x)[0]
    assert ((gates > 0).sum(-1) == 2).all() and torch.allclose(gates.sum(-1), torch.ones(2, 20))


def test_aux_losses_and_metrics():
    m = build(MoOpConfig(operators=ops(), top_k=2, balance_weight=0.5, z_weight=0.25))
    x = x_of(m, T=16)
    with collect_aux() as box:
        m(x)
    gates, logits, probs = m.gates(x)
    f = (gates > 0).float().mean((0, 1)) / 2
    P = probs.mean((0, 1))
    assert_close(box["losses"]["moop_balance"], 0.5 * 4 * (f * P).sum(), tol=1e-6, name="Switch balance loss")
    assert_close(box["losses"]["moop_z"], 0.25 * torch.logsumexp(logits, -1).pow(2).mean(), tol=1e-6, name="z-loss")
    shares = [float(v) for k, v in box["metrics"].items() if k.startswith("moop0/share")]
    assert len(shares) == 4 and abs(sum(shares) - 1) < 1e-6
    assert "moop0/share2_ssm" in box["metrics"]
    # perfectly balanced routing gives the balance loss its minimum w_b
    assert float(box["losses"]["moop_balance"].detach()) >= 0.5 * 0.999
    # outside collect_aux nothing is reported and nothing fails
    m(x)


def test_balance_loss_trains_the_router_through_the_trainer(tmp_path):
    """The trainer adds the reported aux losses to the loss (and logs them and the shares)."""
    from memlm.train.trainer import Trainer

    cfg = memlm.preset("oumnix-debug")
    cfg = apply_overrides(cfg, ["train.batch_size=2", "train.seq_len=32", "train.eval_every=0", "train.device=cpu",
                                "train.tensorboard=false"])
    g = torch.Generator().manual_seed(0)

    class Batch:
        def __init__(self):
            ids = torch.randint(0, 200, (2, 33), generator=g)
            self.input_ids, self.labels, self.reset = ids[:, :-1], ids[:, 1:], None

    tr = Trainer(cfg, out_dir=tmp_path, data=iter([]), val_data=[], tokenizer=memlm.load_tokenizer())
    out = tr.train_step(Batch())
    assert out["aux/moop_balance"] > 0 and out["aux/moop_z"] > 0
    assert out["loss_total"] > out["loss"]  # the aux losses are part of what was minimised
    assert any(k.startswith("mixer/moop0/share") for k in out)


def test_config_validation_and_set_overrides():
    with pytest.raises(ValueError, match="top_k"):
        MoOpConfig(operators=ops(), top_k=5)
    with pytest.raises(ValueError, match="operators"):
        MoOpConfig(operators=[MoOpConfig(operators=ops())])
    cfg = apply_overrides(memlm.preset("oumnix-debug"), ["model.layers.0.operators.0.window=3",
                                                         "model.layers.0.top_k=1"])
    m = memlm.build_model(cfg)
    assert m.blocks[0].mixer.ops[0].core.window == 3 and m.blocks[0].mixer.cfg.top_k == 1
    with pytest.raises(UserError):
        apply_overrides(memlm.preset("oumnix-debug"), ["model.layers.0.operators.9.window=3"])
