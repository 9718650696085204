"""The Mamba-2 ``ssm`` mixer and the mamba2 presets (the op itself is tested in tests/ops/test_ssm_scan.py).

Notation: B batch, T tokens, D width, E inner width, H heads, P head width, N state size.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mixer_laws import build, check_all, x_of

import memlm
from memlm.layers.ssm import SSMConfig
from memlm.ops.ssm_scan import ssm_scan_reference
from memlm.ops.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = {"head_dim": 8, "d_state": 8, "chunk_size": 8, "expand": 2.0}


def test_ssm_contract_laws():
    check_all(build(SSMConfig(**CFG)))


def test_ssm_groups_and_no_groups_build():
    m = build(SSMConfig(**CFG, n_groups=2))
    y, s = m(x_of(m, T=12))
    assert y.shape == (2, 12, 32) and s.ssm.shape == (2, 8, 8, 8) and s.ssm.dtype == torch.float32
    with pytest.raises(ValueError, match="multiple of head_dim"):
        build(SSMConfig(head_dim=7, d_state=4))


@torch.no_grad()
def test_ssm_matches_an_independent_token_loop():
    """The mixer equals the Mamba-2 equations written out with the token-loop reference scan and a plain conv."""
    m = build(SSMConfig(**CFG))
    x = x_of(m, T=21)
    y, st = m(x)
    B, T, _ = x.shape
    e, g, n, h, p = m.e, m.g, m.n, m.h, m.p
    z, xbc, dt = m.in_proj(x).split([e, m.conv_dim, h], -1)
    K = m.cfg.conv_size
    conv = F.conv1d(F.pad(xbc.transpose(1, 2), (K - 1, 0)), m.conv.weight[:, None], m.conv.bias, groups=m.conv_dim)
    xbc = F.silu(conv.transpose(1, 2))
    xs, b, c = xbc.split([e, g * n, g * n], -1)
    dt = F.softplus(dt + m.dt_bias)
    o, s_ref = ssm_scan_reference(xs.reshape(B, T, h, p), dt, -torch.exp(m.A_log), b.reshape(B, T, g, n),
                                  c.reshape(B, T, g, n), m.D)
    o = o.reshape(B, T, e) * F.silu(z)
    ref = m.out_proj(o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * m.norm_weight)
    assert_close(y, ref, tol=1e-5, name="ssm mixer vs written-out equations")
    assert_close(st.ssm, s_ref, tol=1e-5, name="final SSM state")
    assert torch.equal(st.conv, m.in_proj(x)[:, -(K - 1):, e:e + m.conv_dim])  # the last K−1 conv inputs


@torch.no_grad()
def test_ssm_reference_backend_and_bf16_state_dtype():
    m = build(SSMConfig(**CFG))
    x = x_of(m, T=30)
    y, _ = m(x)
    m.cfg.backend = "reference"
    y_ref, _ = m(x)
    m.cfg.backend = None
    assert_close(y, y_ref, tol=1e-5, name="chunked vs reference backend")
    mb = build(SSMConfig(**CFG)).to(torch.bfloat16)
    _, s = mb(x.to(torch.bfloat16))
    assert s.ssm.dtype == torch.float32 and s.conv.dtype == torch.bfloat16


def test_ssm_init_spreads_decays():
    m = build(SSMConfig(**CFG, a_min=1.0, a_max=16.0, dt_min=1e-3, dt_max=0.1))
    A = torch.exp(m.A_log)
    dt = F.softplus(m.dt_bias)
    assert ((A >= 1.0) & (A <= 16.0)).all() and A.std() > 0
    assert ((dt >= 9e-4) & (dt <= 0.11)).all() and dt.std() > 0


def test_mamba2_presets_param_counts_match_descriptions():
    for name in ("mamba2-34m", "mamba2-100m"):
        desc = memlm.preset(name).description
        with torch.device("meta"):  # sizes only: no memory, no initialisation work
            n = memlm.build_model(name).num_params()
        assert f"{n:,}" in desc, (name, n, desc)
    m = memlm.build_model("mamba2-debug")
    assert {type(b.mixer).kind for b in m.blocks} == {"ssm"}


def test_mamba2_without_mlp_is_one_flag():
    from memlm.config.base import apply_overrides

    cfg = apply_overrides(memlm.preset("mamba2-debug"), ["model.mlp=none"])
    m = memlm.build_model(cfg)
    assert all(b.mlp is None for b in m.blocks)
    assert m(torch.zeros(1, 3, dtype=torch.long))[0].shape == (1, 3, 263)
