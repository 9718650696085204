"""Bayesian residuals (``model.residual="pfp"``): variance channel, logit temperature, uncertainty in generation.

Notation: B batch, T tokens, V vocabulary, L layers, s_ℓ log-variance of block ℓ, v = Σ_ℓ exp(s_ℓ).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.config.base import apply_overrides
from memlm.inference.engine import generate
from memlm.layers.residual import collect_uncertainty
from memlm.ops.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def pfp_model(seed: int = 0):
    torch.manual_seed(seed)
    return memlm.build_model(apply_overrides(memlm.preset("transformer-debug"), ["model.residual=pfp"])).eval()


def ids(B=2, T=24, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_are_tempered_by_the_accumulated_variance():
    m = pfp_model()
    with torch.no_grad():  # make the heads input-dependent so v differs per token
        for h in m.oumnix.pfp.heads:
            h.weight.normal_(0, 0.5)
    x = ids()
    logits, _ = m(x)
    h, var = m.embed(x), torch.zeros(x.shape)
    for i, blk in enumerate(m.blocks):
        var = var + torch.exp(m.oumnix.pfp.heads[i](blk.norm1(h)).squeeze(-1))
        h, _ = blk(h, None, None, True)
    ref = F.linear(m.norm_f(h), m.embed.weight) / torch.sqrt(1 + var)[..., None]
    assert_close(logits, ref, tol=1e-5, name="logits / sqrt(1 + v)")
    assert var.std() > 0
    with collect_uncertainty() as box:
        m(x)
    assert_close(box["variance"], var, tol=1e-6, name="reported variance")


def test_variance_is_trained_by_the_next_token_loss():
    """Sharp, wrong logits on unpredictable labels: training only the variance heads raises v and lowers the loss."""
    m = pfp_model().train()
    with torch.no_grad():
        m.norm_f.weight.mul_(30.0)  # overconfident model
    heads = list(m.oumnix.pfp.parameters())
    for p in m.parameters():
        p.requires_grad_(False)
    for p in heads:
        p.requires_grad_(True)
    opt = torch.optim.Adam(heads, lr=0.1)
    x, y = ids(seed=1), ids(seed=2)
    losses, variances = [], []
    for _ in range(25):
        with collect_uncertainty() as box:
            logits, _ = m(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        variances.append(box["variance"].mean().item())
    assert variances[-1] > 10 * variances[0] and losses[-1] < losses[0] - 0.5, (variances[::6], losses[::6])


def test_generate_returns_the_variance_behind_each_token():
    m = pfp_model()
    with torch.no_grad():
        for h in m.oumnix.pfp.heads:
            h.weight.normal_(0, 0.5)
    tok = memlm.load_tokenizer("byte")
    prompt = tok.encode("The cat")
    g = generate(m, tok, prompt, max_new_tokens=6, temperature=0, return_uncertainty=True, ignore_eos=True)
    unc, gen = g.uncertainty, g.token_ids
    assert len(unc) == len(gen) == 6
    with torch.no_grad(), collect_uncertainty() as box:
        m(torch.tensor([prompt + gen]))
    var = box["variance"][0]
    # token i was sampled from the logits at position len(prompt) − 1 + i
    want = var[len(prompt) - 1: len(prompt) - 1 + 6]
    assert_close(torch.tensor(unc), want, tol=1e-5, name="generate uncertainty")
    plain = memlm.build_model("transformer-debug")
    with pytest.raises(ValueError, match="pfp"):
        _ = generate(plain, tok, "x", max_new_tokens=1, return_uncertainty=True).text


def test_pfp_switch():
    m = pfp_model()
    assert m.oumnix is not None and m.oumnix.pfp is not None
    assert memlm.build_model("transformer-debug").oumnix is None
    cfg = apply_overrides(memlm.preset("oumnix-debug"), ["model.residual=sequential"])
    m2 = memlm.build_model(cfg)
    assert m2.oumnix.pfp is None  # cells and exits remain
    n_heads = sum(p.numel() for p in memlm.build_model("oumnix-debug").oumnix.pfp.parameters())
    assert memlm.build_model("oumnix-debug").num_params() - m2.num_params() == n_heads == 4 * (64 + 1)
