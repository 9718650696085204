"""DeltaNet / Gated DeltaNet mixers and the short causal conv (the contract battery covers the generic laws).

Notation: B batch, T tokens, C channels, K kernel width.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import memlm
import memlm.layers.delta as delta_mod
from memlm.config.model import ModelConfig
from memlm.layers.delta import DeltaNet, DeltaNetConfig, GatedDeltaNet, GatedDeltaNetConfig
from memlm.layers.shortconv import ShortConv, causal_conv1d
from memlm.ops import dispatch
from memlm.ops.testing import assert_close


def mixer(gated: bool, **kw) -> DeltaNet:
    torch.manual_seed(0)
    cfg = (GatedDeltaNetConfig if gated else DeltaNetConfig)(chunk_size=16, **kw)
    model_cfg = ModelConfig(d_model=32, n_heads=2, layers=[cfg])
    m = (GatedDeltaNet if gated else DeltaNet)(cfg, model_cfg, 0)
    m.reset_parameters()
    return m.eval()


# ----------------------------------------------------------------------------------------------- short conv


def test_shortconv_matches_left_padded_conv1d():
    torch.manual_seed(0)
    conv = ShortConv(6, 4, bias=True, activation=None)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 11, 6)
    y, cache = conv(x)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight[:, None], conv.bias, groups=6).transpose(1, 2)
    assert_close(y, ref, name="short conv")
    assert torch.equal(cache, x[:, -3:])


def test_shortconv_is_causal_and_chunk_invariant():
    torch.manual_seed(0)
    conv = ShortConv(5, 4)
    x = torch.randn(2, 20, 5)
    y, c = conv(x)
    x2 = x.clone()
    x2[:, 9:] += 1.0
    y2, _ = conv(x2)
    torch.testing.assert_close(y2[:, :9], y[:, :9])
    outs, cache = [], None
    for a, b in [(0, 1), (1, 2), (2, 7), (7, 20)]:
        o, cache = conv(x[:, a:b], cache)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), y)
    torch.testing.assert_close(cache, c)


def test_shortconv_never_mixes_across_a_reset():
    torch.manual_seed(0)
    conv = ShortConv(4, 4)
    x = torch.randn(1, 12, 4)
    reset = torch.zeros(1, 12, dtype=torch.bool)
    reset[0, 5] = True
    y, cache = conv(x, reset=reset)
    a, _ = conv(x[:, :5])
    b, cb = conv(x[:, 5:])
    torch.testing.assert_close(y, torch.cat([a, b], 1))
    torch.testing.assert_close(cache, cb)
    # a reset in the last K−1 tokens must also clean the carried cache
    reset2 = torch.zeros(1, 12, dtype=torch.bool)
    reset2[0, 10] = True
    _, cache2 = conv(x, reset=reset2)
    assert torch.equal(cache2[0, 0], torch.zeros(4)) and torch.equal(cache2[0, 1:], x[0, 10:])
    y_next, _ = conv(x[:, :3], cache2)
    ref, _ = conv(torch.cat([x[:, 10:], x[:, :3]], 1))
    torch.testing.assert_close(y_next, ref[:, 2:])


def test_causal_conv_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(torch.zeros(1, 2, 3), torch.zeros(3, 4), activation="relu")


# ---------------------------------------------------------------------------------------------------- mixers


@pytest.mark.parametrize("gated", [False, True])
def test_op_receives_unit_keys_and_bounded_gates(gated, monkeypatch):
    """The mixer feeds the delta rule L2-normalised q/k, β ∈ (0, 1), and (gated) a decay g < 0, else none."""
    m = mixer(gated)
    seen = {}

    def spy(q, k, v, beta, g=None, **kw):
        seen.update(q=q, k=k, beta=beta, g=g, scale=kw["scale"])
        return real(q, k, v, beta, g, **kw)

    real = delta_mod.delta_rule
    monkeypatch.setattr(delta_mod, "delta_rule", spy)
    m(torch.randn(2, 9, 32))
    torch.testing.assert_close(seen["k"].norm(dim=-1), torch.ones(2, 9, 2))
    torch.testing.assert_close(seen["q"].norm(dim=-1), torch.ones(2, 9, 2))
    assert ((seen["beta"] > 0) & (seen["beta"] < 1)).all()
    assert seen["scale"] == pytest.approx(16 ** -0.5)
    if gated:
        assert (seen["g"] < 0).all() and (seen["g"] > -1).all(), "initial decays should be mild (Mamba-2 dt range)"
    else:
        assert seen["g"] is None


@pytest.mark.parametrize("gated", [False, True])
def test_packed_rows_equal_separate_documents_off_chunk_boundaries(gated):
    m = mixer(gated)
    x = torch.randn(1, 40, 32)
    reset = torch.zeros(1, 40, dtype=torch.bool)
    reset[0, [5, 21]] = True
    with torch.no_grad():
        y, _ = m(x, reset=reset)
        parts = [m(x[:, a:b])[0] for a, b in [(0, 5), (5, 21), (21, 40)]]
    torch.testing.assert_close(y, torch.cat(parts, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_reference_backend_gives_the_same_mixer_output(gated):
    m = mixer(gated)
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        y, s = m(x)
        with dispatch.force_backend("delta_rule", "reference"):
            y_ref, s_ref = m(x)
    assert_close(y, y_ref, tol=1e-5, name="output")
    assert_close(s.S, s_ref.S, tol=1e-5, name="state")


def test_state_layout_and_bytes():
    m = mixer(True)
    s = m.init_state(3)
    assert s.S.shape == (3, 2, 16, 16) and s.S.dtype == torch.float32
    assert s.conv.shape == (3, 3, 3 * 32)
    assert s.nbytes() == 3 * (2 * 16 * 16 * 4 + 3 * 96 * 4)


def test_conv_off_and_no_output_gate_still_work():
    m = mixer(False, conv_size=0, output_gate=False)
    y, s = m(torch.randn(1, 5, 32))
    assert y.shape == (1, 5, 32) and s.conv.shape == (1, 0, 96)
    with pytest.raises(ValueError, match="conv_size"):
        DeltaNetConfig(conv_size=-1)


def test_presets_shapes():
    cfg = memlm.preset("gated-deltanet-34m").model
    assert (cfg.d_model, cfg.n_layers, cfg.vocab_size) == (512, 8, 16384)
    assert all(lc.kind == "gated_deltanet" and lc.chunk_size == 64 for lc in cfg.layers)
    assert all(lc.kind == "deltanet" for lc in memlm.preset("deltanet-34m").model.layers)
