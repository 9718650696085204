"""WEAVE linear layers (W = U diag(s) Vᵀ) and the micro-LoRA adaptation path.

Notation: I input width, O output width, r WEAVE rank, q micro-LoRA rank.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memlm
from memlm.config.base import apply_overrides
from memlm.errors import UserError
from memlm.layers.weave import (
    WeaveLinear,
    apply_weave,
    disable_micro_lora,
    enable_micro_lora,
    micro_lora_state_dict,
    weave_modules,
)
from memlm.ops.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def test_weave_linear_is_u_diag_s_vt():
    torch.manual_seed(0)
    m = WeaveLinear(12, 7, 4, bias=True)
    with torch.no_grad():
        m.bias.normal_()
    x = torch.randn(3, 5, 12)
    W = m.U @ torch.diag(m.s) @ m.V.T
    assert_close(m(x), x @ W.T + m.bias, tol=1e-6, name="WEAVE forward")
    assert_close(m.weight, W, tol=1e-6, name=".weight")
    assert sum(p.numel() for p in m.parameters()) == 4 * (12 + 7 + 1) + 7
    assert torch.linalg.matrix_rank(W.detach()) == 4


def test_from_linear_keeps_the_scale_and_svd_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    w = WeaveLinear.from_linear(lin, 16)
    assert abs(w.weight.norm() / lin.weight.norm() - 1) < 0.15  # initial scale of the dense layer
    assert torch.equal(w.bias, lin.bias)
    e = WeaveLinear.from_linear(lin, 16, svd=True)
    sv = torch.linalg.svdvals(lin.weight.detach())
    err = (e.weight - lin.weight).norm() ** 2
    assert_close(err, sv[16:].pow(2).sum(), tol=1e-4, name="Eckart–Young residual")
    assert WeaveLinear.from_linear(lin, 1000).rank == 48  # rank capped at min(I, O)


def test_config_switch_replaces_only_the_targets_and_counts_parameters():
    dense = memlm.build_model(apply_overrides(memlm.preset("oumnix-debug"), ["model.weave_rank=0"]))
    weave = memlm.build_model("oumnix-debug")
    names = sorted(weave_modules(weave))
    assert names and all(n.rsplit(".", 1)[-1] in ("w_in", "w_out") and n.startswith("blocks.") for n in names)
    assert not weave_modules(dense) and all(type(dense.get_submodule(n)) is nn.Linear for n in names)
    saved = sum(dense.get_submodule(n).weight.numel() - sum(p.numel() for p in weave.get_submodule(n).parameters())
                for n in names)
    assert dense.num_params() - weave.num_params() == saved > 0
    # state dicts round-trip through save/load (U, s, V keys)
    assert any(k.endswith("mlp.w_in.U") for k in weave.state_dict())
    with pytest.raises(UserError, match="match no linear layer"):
        apply_weave(memlm.build_model("transformer-debug"), 4, ["nope"])


def test_micro_lora_adapts_without_touching_base_weights():
    torch.manual_seed(0)
    m = memlm.build_model("oumnix-debug").train()
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    base = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        before, _ = m.eval()(x)
    names = enable_micro_lora(m, rank=2)
    m.train()
    with torch.no_grad():
        fresh, _ = m.eval()(x)
    assert torch.equal(fresh, before)  # B = 0: a fresh micro-LoRA changes nothing
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable) and len(trainable) == 2 * len(names)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    losses = []
    for _ in range(15):
        logits, _ = m(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    for k, v in base.items():
        assert torch.equal(m.state_dict()[k], v), f"base weight {k} changed"
    sd = micro_lora_state_dict(m)
    assert len(sd) == 2 * len(names) and any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_B"))
    disable_micro_lora(m)
    with torch.no_grad():
        after, _ = m.eval()(x)
    assert torch.equal(after, before)
