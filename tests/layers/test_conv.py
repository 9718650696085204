"""The causal depthwise ``conv`` mixer. Notation: B batch, T tokens, D width, E channels, K kernel."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mixer_laws import build, check_all, x_of

from memlm.layers.conv import ConvConfig
from memlm.ops.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def test_conv_contract_laws():
    check_all(build(ConvConfig(kernel_size=5)))
    check_all(build(ConvConfig(kernel_size=3, gated=False, expand=2.0)))


@torch.no_grad()
def test_conv_equals_left_padded_conv1d():
    """y = W_out(SiLU(conv_left_padded(v)) ⊙ SiLU(g)): left padding only — never centred (seed defect 1)."""
    m = build(ConvConfig(kernel_size=6))
    x = x_of(m, T=19)
    y, st = m(x)
    v, g = m.in_proj(x).chunk(2, -1)
    u = F.conv1d(F.pad(v.transpose(1, 2), (5, 0)), m.conv.weight[:, None], m.conv.bias, groups=m.e).transpose(1, 2)
    ref = m.out_proj(F.silu(u) * F.silu(g))
    assert_close(y, ref, tol=1e-6, name="conv mixer")
    assert torch.equal(st.cache, v[:, -5:])  # the state is the last K−1 conv inputs


@torch.no_grad()
def test_conv_centred_padding_would_be_caught():
    """The causality check fails on a centred conv (what the original did), so it can catch the defect."""
    m = build(ConvConfig(kernel_size=5))
    x = x_of(m, T=20)
    v = m.in_proj(x).chunk(2, -1)[0]
    centred = F.conv1d(v.transpose(1, 2), m.conv.weight[:, None], padding=2, groups=m.e)
    v2 = v.clone()
    v2[:, 10] += 1.0
    centred2 = F.conv1d(v2.transpose(1, 2), m.conv.weight[:, None], padding=2, groups=m.e)
    assert not torch.allclose(centred[..., 8:10], centred2[..., 8:10])  # a centred conv sees 2 future tokens
    x2 = x.clone()
    x2[:, 10] += 1.0
    assert torch.equal(m(x)[0][:, :10], m(x2)[0][:, :10])  # ours: nothing before 10 moves


@torch.no_grad()
def test_conv_kernel_one_has_empty_state_and_no_mixing():
    m = build(ConvConfig(kernel_size=1))
    x = x_of(m, T=8)
    y, s = m(x)
    assert s.cache.shape == (2, 0, m.e)
    y_each = torch.cat([m(x[:, t:t + 1])[0] for t in range(8)], 1)
    assert_close(y_each, y, tol=1e-6, name="K=1 is per token")
