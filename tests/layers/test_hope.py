"""HOPE mixer: DGD maths, associative storage, chunk-wise semantics, document resets, the two reads.

Notation: M stacked memory [.., R, Dh]; k unit key; v̂ target; η, α step size and retention; C chunk length.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.config.model import ModelConfig
from memlm.layers.hope import Hope, HopeConfig, dgd_chunk, dgd_step
from memlm.ops.testing import assert_close


def make(read: str = "memory", C: int = 8, **kw) -> Hope:
    torch.manual_seed(0)
    kv = 2 if read == "attention" else 4
    cfg = HopeConfig(read=read, n_kv_heads=kv, head_dim=8, chunk_size=C, **kw)
    return Hope(cfg, ModelConfig(d_model=32, n_heads=4, layers=[cfg]), 0).eval()


# ----------------------------------------------------------------------------------------------------- maths


def test_dgd_chunk_equals_successive_dgd_steps():
    torch.manual_seed(0)
    B, C, H, R, D = 2, 13, 3, 7, 5
    M0 = torch.randn(B, H, R, D, dtype=torch.float64)
    k = F.normalize(torch.randn(B, C, H, D, dtype=torch.float64), dim=-1)
    v_hat = torch.randn(B, C, H, R, dtype=torch.float64)
    beta = torch.rand(B, C, H, dtype=torch.float64)
    g = -torch.rand(B, C, H, dtype=torch.float64) * 0.3
    q = torch.randn(B, C, H, D, dtype=torch.float64)
    o, M1 = dgd_chunk(M0, k, v_hat, beta, g, q=q)
    M = M0
    outs = []
    for t in range(C):
        alpha = g[:, t].exp()
        M = dgd_step(M, k[:, t], v_hat[:, t], 0.5 * alpha * beta[:, t], alpha)
        outs.append(torch.einsum("bhrd,bhd->bhr", M, q[:, t]))
    assert_close(M1, M, name="chunk end state")
    assert_close(o, torch.stack(outs, 1), name="reads")


@pytest.mark.parametrize("n", [4, 16])
def test_memory_returns_written_values(n):
    """Write n ≤ K random orthogonal key→value pairs (α = 1, η = ½), read each key back: cosine > 0.99 (fp32)."""
    torch.manual_seed(n)
    K, R = 16, 16
    keys = torch.linalg.qr(torch.randn(K, K))[0][:, :n].T                # n orthonormal keys [n, K]
    vals = torch.randn(n, R)
    M0 = torch.randn(1, 1, R, K) * 0.5                                    # a non-empty memory to overwrite
    beta, g = torch.ones(1, n, 1), torch.zeros(1, n, 1)                  # η = ½ α β = ½
    _, M = dgd_chunk(M0, keys[None, :, None], vals[None, :, None], beta, g)
    got = torch.einsum("rk,nk->nr", M[0, 0], keys)
    cos = F.cosine_similarity(got, vals, dim=-1)
    assert (cos > 0.99).all(), cos
    # the same through token-by-token DGD steps
    Ms = M0[0, 0]
    for i in range(n):
        Ms = dgd_step(Ms, keys[i], vals[i], torch.tensor(0.5), torch.tensor(1.0))
    assert (F.cosine_similarity(keys @ Ms.T, vals, dim=-1) > 0.99).all()


def test_chunk_quantities_come_from_the_chunk_start_memory():
    """The state after each complete chunk equals dgd_chunk applied to quantities produced by the previous state."""
    m = make(C=8)
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        _, s1 = m(x[:, :8])
        _, s2 = m(x[:, 8:], s1)
        u = m.u_proj(x)
        u = torch.cat([u, m.q_proj(x)], -1)
        u, _ = m.conv(u)
        u = u[..., : m.hm * m.dh].view(1, 16, m.hm, m.dh)
        M = m.mem_init.float()[None]
        for c in range(2):
            k, _, v_hat, beta, g = m.produce(M, u[:, 8 * c: 8 * c + 8])
            _, M = dgd_chunk(M, F.normalize(k, dim=-1), v_hat, beta, g)
            assert_close((s1, s2)[c].mem, M, tol=1e-5, name=f"memory after chunk {c}")


# ---------------------------------------------------------------------------------------------- the mixer


@pytest.mark.parametrize("read", ["memory", "attention"])
def test_packed_rows_equal_separate_documents_at_any_reset(read):
    """Chunks are document-aligned, so a reset anywhere (not only on a chunk boundary) equals a fresh start."""
    m = make(read)
    x = torch.randn(1, 30, 32)
    reset = torch.zeros(1, 30, dtype=torch.bool)
    reset[0, [5, 19]] = True
    with torch.no_grad():
        y, s = m(x, reset=reset)
        parts = [m(x[:, a:b])[0] for a, b in [(0, 5), (5, 19)]]
        y3, s3 = m(x[:, 19:])
    torch.testing.assert_close(y, torch.cat([*parts, y3], 1), rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(s.mem, s3.mem)
    torch.testing.assert_close(s.pend, s3.pend)


def test_pending_buffer_holds_the_incomplete_chunk():
    m = make(C=8)
    with torch.no_grad():
        _, s = m(torch.randn(2, 13, 32))
    assert s.pend.shape == (2, 7, m.hm * m.dh)
    assert (s.pend[:, :2] == 0).all() and (s.pend[:, 2:].abs().sum(-1) > 0).all()  # 13 mod 8 = 5 pending tokens
    assert s.pos.tolist() == [13, 13]


def test_learned_initial_memory_starts_each_document():
    m = make()
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        y, _ = m(x)
        m.mem_init[:, 2 * m.dh + 2:] *= 2.0  # change M_mem of the learned initial memory
        y2, _ = m(x)
    assert not torch.allclose(y[:, 0], y2[:, 0]), "the first token must read the learned initial memory"


def test_attention_read_uses_memory_keys_with_gqa():
    m = make("attention")
    assert not hasattr(m.core, "k_proj") and not hasattr(m.core, "qkv")
    assert (m.core.hq, m.core.hk) == (4, 2)
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        y, s = m(x)
        assert s.kv.k.shape == (2, 2, 11, 8) and s.mem.shape == (2, 2, 2 * 8 + 2, 8)
        m.mem_init[:, :8] += 0.5 * torch.randn(2, 8, 8)  # M_k makes the attention keys
        y2, _ = m(x)
    assert not torch.allclose(y, y2)


def test_config_validation():
    with pytest.raises(ValueError, match="read"):
        HopeConfig(read="both")
    with pytest.raises(ValueError, match="n_kv_heads"):
        HopeConfig(read="memory", n_heads=4, n_kv_heads=2)


def test_onyx_presets():
    cfg = memlm.preset("onyx-11m").model
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.rope_base, cfg.norm) == (384, 6, 6, 5e5, "rmsnorm")
    # the seed's CMS FFN: three levels at update periods 1 / 4 / 16, sized so the model is ~11M without embeddings
    assert (cfg.mlp, cfg.cms_levels, cfg.d_ff) == ("cms", [1, 4, 16], 432)
    n = sum(p.numel() for p in memlm.build_model(cfg).parameters()) - cfg.vocab_size * cfg.d_model
    assert 10.5e6 < n < 11.5e6
    assert cfg.tie_embeddings and cfg.max_seq_len == 4096
    assert all(lc.kind == "hope" and lc.read == "attention" and lc.n_kv_heads == 2 and lc.head_dim == 64
               for lc in cfg.layers)
    assert memlm.preset("hope-debug").model.layers[0].read == "memory"
