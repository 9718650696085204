"""Causal local (window W) and strided global (stride S) attention mixers.

Notation: B batch, T tokens, D width, H heads, Dh head width, i position inside the document.
The references below build the attention pattern explicitly as a dense mask in float64 and use no code of the layer
besides its projections and rotary embedding.
"""
from __future__ import annotations

import pytest
import torch
from mixer_laws import build, check_all, check_causal, x_of

from memlm.layers.base import stream_positions
from memlm.layers.sparse_attention import GlobalAttentionConfig, LocalAttentionConfig
from memlm.ops.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_reference(m, x: torch.Tensor, allowed, reset: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention over keys j with allowed(i_q, i_k, same_doc) True; x [B, T, D] -> [B, T, D]."""
    core = m.core
    B, T, _ = x.shape
    q, k, v = core.project(x)
    z = torch.zeros(B, dtype=torch.long)
    abs_pos, doc = stream_positions(z, z, reset, T)
    if core.rotary is not None:
        q, k = core.rotary(q, k, abs_pos - doc)
    rep = core.hq // core.hk
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    iq = (abs_pos - doc)[:, :, None]
    ik = (abs_pos - doc)[:, None, :]
    same = doc[:, :, None] == doc[:, None, :]
    causal = abs_pos[:, None, :] <= abs_pos[:, :, None]
    mask = causal & same & allowed(iq, ik, abs_pos[:, :, None] == abs_pos[:, None, :])
    s = torch.einsum("bhtd,bhsd->bhts", q.double(), k.double()) * core.dh ** -0.5
    p = torch.softmax(s.masked_fill(~mask[:, None], float("-inf")), -1)
    o = torch.einsum("bhts,bhsd->bhtd", p, v.double()).float()
    return core.o_proj(o.transpose(1, 2).reshape(B, T, -1))


def test_local_attention_contract_laws():
    check_all(build(LocalAttentionConfig(window=6)))
    check_all(build(LocalAttentionConfig(window=5, n_kv_heads=2)))


def test_global_attention_contract_laws():
    check_all(build(GlobalAttentionConfig(stride=4)))
    check_all(build(GlobalAttentionConfig(stride=3, n_kv_heads=2)))
    check_all(build(GlobalAttentionConfig(stride=1)))  # every token a landmark: full causal attention


@torch.no_grad()
def test_local_attention_equals_banded_reference():
    m = build(LocalAttentionConfig(window=5))
    x = x_of(m, T=23)
    reset = torch.zeros(2, 23, dtype=torch.bool)
    reset[1, 9] = True
    y, _ = m(x, reset=reset)
    ref = dense_reference(m, x, lambda iq, ik, self_: iq - ik < 5, reset)
    assert_close(y, ref, tol=1e-5, name="local attention")


@torch.no_grad()
def test_global_attention_equals_strided_reference():
    """Query i sees the landmarks j ≤ i with j mod S = 0 of its own document, and itself."""
    m = build(GlobalAttentionConfig(stride=4, n_kv_heads=2))
    x = x_of(m, T=30)
    reset = torch.zeros(2, 30, dtype=torch.bool)
    reset[0, 7] = True
    reset[1, 13] = True
    y, _ = m(x, reset=reset)
    ref = dense_reference(m, x, lambda iq, ik, self_: (ik % 4 == 0) | self_, reset)
    assert_close(y, ref, tol=1e-5, name="global attention")
    # and it differs from full causal attention (the pattern is really sparse)
    full = dense_reference(m, x, lambda iq, ik, self_: torch.ones_like(self_), reset)
    assert (y - full).abs().max() > 1e-3


@torch.no_grad()
def test_global_attention_caches_only_landmarks_of_the_current_document():
    m = build(GlobalAttentionConfig(stride=8))
    x = x_of(m, B=2, T=37)
    _, s = m(x)
    assert s.k.shape[2] == 5 and s.kpos.tolist() == [[0, 8, 16, 24, 32]] * 2  # ⌈37 / 8⌉ landmark keys, not 37
    reset = torch.zeros(2, 12, dtype=torch.bool)
    reset[0, 3] = True  # row 0: a new document at stream position 40 → landmarks 40, 48; row 1 continues
    _, s2 = m(x_of(m, T=12, seed=5), s, reset=reset)
    assert s2.kpos[0].tolist() == [40, 48, -1, -1, -1, -1, -1]  # the old document's landmarks are dropped
    assert s2.kpos[1].tolist() == [0, 8, 16, 24, 32, 40, 48]
    assert (s2.k[0, :, 2:] == 0).all()  # padding slots are zero: the state is canonical whatever the split


@torch.no_grad()
def test_no_future_leak_across_a_long_window():
    """The original's "local" window was two-sided (up to 128 future tokens): perturbing only the last token must not
    change any earlier output, with a window as long as the sequence."""
    for cfg in (LocalAttentionConfig(window=128), GlobalAttentionConfig(stride=16)):
        m = build(cfg, d=16, heads=2)
        check_causal(m, T=140)
        x = x_of(m, T=140)
        y, _ = m(x)
        x2 = x.clone()
        x2[:, -1] += 3.0
        assert torch.equal(m(x2)[0][:, :-1], y[:, :-1])
