"""Compressive (Infini-attention) mixer and its segment op: reference vs chunked, the layer vs a naive Infini-attention,
document-aligned segment layout, multi-memory and hierarchical variants.

Notation: B batch, N segments (grid rows), C segment length, H heads, K = V head width, R memories per head.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.config.model import ModelConfig
from memlm.layers.compressive import Compressive, CompressiveConfig, content_weights, elu1
from memlm.ops.compressive import chunk_layout, chunked, reference
from memlm.ops.testing import assert_close


def make(C: int = 8, **kw) -> Compressive:
    torch.manual_seed(0)
    cfg = CompressiveConfig(segment_size=C, **kw)
    m = Compressive(cfg, ModelConfig(d_model=32, n_heads=4, layers=[cfg]), 0)
    with torch.no_grad():
        m.gate.normal_()  # away from 0.5 so that a wrong mix shows
    return m.eval()


# --------------------------------------------------------------------------------------------------- the op


@pytest.mark.parametrize("R,delta", [(1, True), (1, False), (3, True)])
def test_chunked_op_matches_token_reference_with_gradients(R, delta):
    torch.manual_seed(R)
    B, N, C, H, K = 2, 4, 5, 2, 3
    sq = elu1(torch.randn(B, N, C, H, K)).requires_grad_()
    sk = elu1(torch.randn(B, N, C, H, K))
    sk[1, 3, 3:] = 0                                                    # empty slots
    sk.requires_grad_()
    v = torch.randn(B, N, C, H, K, requires_grad=True)
    M0 = torch.randn(B, H, R, K, K, requires_grad=True)
    z0 = torch.rand(B, H, R, K).add(0.5).requires_grad_()
    kw = {"write_slot": torch.tensor([[0, 1, 2, 0], [2, 0, 1, 1]]) % R,
          "starts_doc": torch.tensor([[False, False, True, False], [True, False, False, False]]),
          "complete": torch.tensor([[True, True, True, False], [True, True, True, False]]), "delta": delta}
    outs = [f(sq, sk, v, M0=M0, z0=z0, **kw) for f in (chunked.segment_memory, reference.segment_memory)]
    names = ("num", "den", "z_pre", "M", "z")
    for name, a, b in zip(names, *outs):
        assert_close(a, b, name=name)
    w = [torch.randn_like(t) for t in outs[0]]
    grads = [torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(out, w)), (sq, sk, v, M0, z0)) for out in outs]
    for name, a, b in zip(("sq", "sk", "v", "M0", "z0"), *grads):
        assert_close(a, b, kind="grad", name=f"d{name}")


def test_segment_layout_with_pending_tokens_and_resets():
    # state: 11 tokens seen, document started at 0 -> 3 pending tokens of segment 1 (positions 8, 9, 10)
    pos, doc = torch.tensor([11]), torch.tensor([0])
    reset = torch.zeros(1, 9, dtype=torch.bool)
    reset[0, 4] = True                                                   # stream position 15 starts a document
    lay = chunk_layout(pos, doc, reset, 9, 8)
    # grid: [8 9 10 11 12 13 14] (incomplete, cut by the reset), [15 … 19] (new document, incomplete)
    assert lay.N == 2
    assert lay.starts_doc.tolist() == [[False, True]] and lay.complete.tolist() == [[False, False]]
    assert lay.index.tolist() == [[1, 0]]
    assert lay.slot_valid.sum().item() == 3 + 9
    assert lay.pos.tolist() == [20] and lay.doc_start.tolist() == [15]
    assert lay.keep_tail.sum().item() == 5                               # 19 − 15 + 1 tokens pending


# -------------------------------------------------------------------------------------------------- the layer


def naive_infini(m: Compressive, x: torch.Tensor) -> torch.Tensor:
    """Infini-attention written out plainly: T a multiple of the segment, fresh memory, one memory per head."""
    B, T, _ = x.shape
    H, K, N = m.h, m.dh, m.N
    q, k, v = (t.view(B, T, H, K).transpose(1, 2) for t in m.qkv(x).chunk(3, -1))   # [B, H, T, K]
    M = torch.zeros(B, H, K, K)
    z = torch.zeros(B, H, K)
    g = torch.sigmoid(m.gate)[None, :, None, None]
    outs = []
    for s in range(T // N):
        Q, Kk, V = (t[:, :, s * N:(s + 1) * N] for t in (q, k, v))
        a_dot = F.scaled_dot_product_attention(Q, Kk, V, is_causal=True)
        sQ, sK = elu1(Q), elu1(Kk)
        a_mem = (sQ @ M) / (sQ @ z[..., None]).clamp_min(1e-6)
        outs.append(g * a_mem + (1 - g) * a_dot)
        if m.cfg.update == "delta":
            V = V - (sK @ M) / (sK @ z[..., None]).clamp_min(1e-6)
        M = M + sK.transpose(-1, -2) @ V
        z = z + sK.sum(2)
    o = torch.cat(outs, 2).transpose(1, 2).reshape(B, T, H * K)
    return m.o_proj(o)


@pytest.mark.parametrize("update", ["delta", "linear"])
def test_layer_matches_naive_infini_attention(update):
    m = make(update=update)
    x = torch.randn(2, 32, 32)
    with torch.no_grad():
        y, s = m(x)
        ref = naive_infini(m, x)
    assert_close(y, ref, tol=1e-5, name="output")
    assert (s.pend_k == 0).all()                                         # 32 tokens: no pending segment
    # and split token by token, the pending buffer reproduces the same outputs
    with torch.no_grad():
        outs, st = [], None
        for t in range(32):
            o, st = m(x[:, t: t + 1], st)
            outs.append(o)
    assert_close(torch.cat(outs, 1), ref, tol=1e-5, name="decode")
    assert_close(st.M, s.M, tol=1e-5, name="memory")


def test_memory_is_per_sequence():
    m = make()
    x = torch.randn(3, 24, 32)
    with torch.no_grad():
        _, s = m(x)
        _, s0 = m(x[:1])
    assert not torch.allclose(s.M[0], s.M[1])
    assert_close(s.M[:1], s0.M, tol=1e-6, name="row 0 memory alone vs in a batch")


def test_multi_memory_round_robin_by_segment():
    m = make(multi_memory=4)
    with torch.no_grad():
        _, s = m(torch.randn(1, 3 * 8 + 2, 32))
    filled = s.z.abs().sum(-1)[0]                                        # [H, R]
    assert (filled[:, :3] > 0).all() and (filled[:, 3] == 0).all()
    with torch.no_grad():
        _, s = m(torch.randn(1, 5 * 8, 32))
    z_per_slot = s.z.sum(-1)[0, 0]
    assert z_per_slot[0] > 1.5 * z_per_slot[1], "segments 0 and 4 both go to memory 0"


def test_content_weights_follow_direction_not_size():
    q = torch.tensor([1.0, 0.0, 0.0])
    z = torch.stack([torch.tensor([0.0, 50.0, 50.0]), torch.tensor([0.2, 0.01, 0.0]), torch.zeros(3)])  # big, match, empty
    w = content_weights(q.view(1, 1, 1, 1, 3), z.view(1, 1, 1, 3, 3), torch.tensor([2.3]))
    assert w[..., 1].item() > 0.9 and w[..., 2].item() == 0.0
    assert content_weights(q.view(1, 1, 1, 1, 3), torch.zeros(1, 1, 1, 3, 3), torch.tensor([2.3])).abs().sum() == 0


def test_hierarchical_with_closed_gate_is_one_coarse_memory():
    """Fine memories with linear writes sum to the single memory of the plain layer: with the expansion gate shut
    (e = 0) the hierarchical layer reads exactly what a one-memory layer reads."""
    hier, plain = make(hierarchical=4, update="linear"), make(update="linear")
    with torch.no_grad():
        plain.load_state_dict({k: v for k, v in hier.state_dict().items() if not k.startswith("expand")}, strict=False)
        hier.expand.weight.zero_()
        hier.expand.bias.fill_(-40.0)
        x = torch.randn(2, 40, 32)
        assert_close(hier(x)[0], plain(x)[0], tol=1e-5, name="closed gate")
        hier.expand.bias.fill_(0.0)
        assert not torch.allclose(hier(x)[0], plain(x)[0], atol=1e-4)


def test_config_validation():
    with pytest.raises(ValueError, match="update"):
        CompressiveConfig(update="sum")
    with pytest.raises(ValueError, match="alternatives"):
        CompressiveConfig(multi_memory=2, hierarchical=2)
    with pytest.raises(ValueError, match="hierarchical=1"):
        CompressiveConfig(hierarchical=1)


def test_infini_pythia_presets():
    for name, (multi, hier) in {"infini-pythia-70m": (1, 0), "infini-pythia-70m-multi4": (4, 0),
                                "infini-pythia-70m-hier4": (1, 4)}.items():
        cfg = memlm.preset(name).model
        kinds = [lc.kind for lc in cfg.layers]
        assert kinds == ["compressive"] + ["attention"] * 5, name
        assert (cfg.layers[0].multi_memory, cfg.layers[0].hierarchical, cfg.layers[0].position) == (multi, hier, "none")
        assert (cfg.d_model, cfg.n_heads, cfg.residual, cfg.rope_fraction) == (512, 8, "parallel2", 0.25)
