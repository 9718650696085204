"""Attention against a plain reference: MHA/GQA/MQA, sliding windows (ring-buffer cache), document masks,
RoPE / partial RoPE / XPOS / learned positions."""
import math

import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.config.model import ModelConfig
from memlm.layers.attention import Attention, AttentionConfig, AttentionCore
from memlm.layers.rotary import Rotary


def reference_attention(core: AttentionCore, x, reset=None):
    """Token loop over queries with explicit masks (float64), positions restarting at each reset."""
    B, T, _ = x.shape
    q, k, v = core.project(x.double() if False else x)
    pos = torch.zeros(B, T, dtype=torch.long)
    start = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        s = 0
        for t in range(T):
            if reset is not None and reset[b, t]:
                s = t
            start[b, t] = s
            pos[b, t] = t - s
    if core.rotary is not None:
        q, k = core.rotary(q, k, pos)
    rep = core.hq // core.hk
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(T):
            lo = start[b, t] if core.window is None else max(start[b, t], t - core.window + 1)
            s = (q[b, :, t:t + 1] @ k[b, :, lo:t + 1].transpose(-1, -2)) / math.sqrt(core.dh)
            out[b, :, t] = (s.softmax(-1) @ v[b, :, lo:t + 1])[:, 0]
    return core.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def make(window=None, hq=4, hk=4, position="rope", fraction=1.0, d=32):
    mc = ModelConfig(d_model=d, n_heads=hq, layers=[AttentionConfig()], position=position, rope_fraction=fraction)
    torch.manual_seed(0)
    return Attention(AttentionConfig(n_heads=hq, n_kv_heads=hk, window=window), mc, 0)


@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("position", ["rope", "xpos", "none"])
def test_matches_reference(hq, hk, window, position):
    att = make(window, hq, hk, position)
    x = torch.randn(2, 23, 32)
    reset = torch.zeros(2, 23, dtype=torch.bool)
    reset[1, 9] = True
    y, _ = att(x, reset=reset)
    torch.testing.assert_close(y, reference_attention(att.core, x, reset), rtol=1e-4, atol=1e-5)


def test_sliding_window_state_is_a_fixed_ring():
    att = make(window=6)
    x = torch.randn(1, 40, 32)
    full, _ = att(x)
    state = None
    outs = []
    for t in range(40):
        y, state = att(x[:, t:t + 1], state)
        assert state.k.shape[2] == 6, "a window's cache must not grow"
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)
    assert sorted(state.kpos[0].tolist()) == list(range(34, 40))


def test_full_attention_cache_grows_and_update_false_does_not_write():
    att = make()
    x = torch.randn(1, 10, 32)
    _, s = att(x)
    assert s.k.shape[2] == 10
    _, s2 = att(x[:, :3], s, update=False)
    assert s2 is s


def test_partial_rope_rotates_only_a_fraction():
    rot = Rotary(16, fraction=0.25)
    q = torch.randn(1, 2, 5, 16)
    pos = torch.arange(5)[None] + 3
    q2, _ = rot(q, q, pos)
    assert torch.equal(q2[..., 4:], q[..., 4:])
    assert not torch.allclose(q2[..., :4], q[..., :4])


@pytest.mark.parametrize("xpos", [False, True])
def test_scores_depend_on_relative_position_only(xpos):
    rot = Rotary(16, xpos=xpos)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(n, m):
        qn, _ = rot(q, q, torch.tensor([[n]]))
        _, km = rot(k, k, torch.tensor([[m]]))
        return (qn * km).sum().item()

    assert score(10, 4) == pytest.approx(score(110, 104), rel=1e-4)
    assert score(7, 7) == pytest.approx(score(300, 300), rel=1e-4)


def test_xpos_decays_with_distance():
    rot = Rotary(16, xpos=True, base=1e9)  # near-zero rotation isolates the XPOS scale
    v = torch.ones(1, 1, 1, 16)

    def score(dist):
        qn, _ = rot(v, v, torch.tensor([[dist]]))
        _, km = rot(v, v, torch.tensor([[0]]))
        return (qn * km).sum().item()

    s = [score(d) for d in (0, 256, 1024, 4096)]
    assert s[0] > s[1] > s[2] > s[3] > 0


def test_learned_positions_restart_at_reset():
    cfg = memlm.preset("transformer-debug").model.replace(position="learned", max_seq_len=64)
    m = memlm.build_model(cfg).eval()
    x = torch.randint(0, 256, (1, 30))
    reset = torch.zeros_like(x, dtype=torch.bool)
    reset[0, 12] = True
    packed, _ = m(x, reset=reset)
    alone, _ = m(x[:, 12:])
    torch.testing.assert_close(packed[:, 12:], alone, rtol=1e-4, atol=1e-5)


def test_causality_check_catches_a_noncausal_attention(monkeypatch):
    """The battery's causality check can fail: an attention without a causal mask (seed defect 1) is caught."""
    m = memlm.build_model("transformer-debug").eval()
    x = torch.randint(0, 256, (1, 20))
    monkeypatch.setattr(AttentionCore, "_attend",
                        lambda self, q, k, v, *a: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    base, _ = m(x)
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 256
    out, _ = m(y)
    assert not torch.allclose(out[:, :10], base[:, :10], atol=1e-5)
