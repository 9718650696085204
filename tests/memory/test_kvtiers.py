"""Infinity-Window KV tiers: flag parsing, RoPE/XPOS undone exactly, PQ codes equal FAISS's, the folded look-up-table
attention equals decompress-then-attend, hot-only equals exact attention, teleport (flat = brute force, tree recall),
causality and chunk invariance, reach beyond the hot window, memory per token, Engine / Session integration.

Notation: B batch, T tokens, Hk KV heads, Dh head width, W_h hot tokens, w window, M PQ sub-spaces, K centroids.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import memlm
from memlm.errors import UserError
from memlm.inference.engine import Engine
from memlm.inference.sampling import SamplingConfig
from memlm.inference.session import Session
from memlm.models.state import ModelState
from memlm.ops.testing import assert_close

faiss = pytest.importorskip("faiss")

from memlm.memory.kvtiers import (
    KVTierConfig,
    TieredAttention,
    apply_kv_tiers,
    calibrate,
    derotate,
    parse_kv_tiers,
    pq_decode,
    pq_encode,
    tier_memory,
)

CFG = KVTierConfig(hot=32, window=8, anchors=2, topk=3, rank=4, bits=4, fanout=2, beam=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return memlm.build_model("transformer-debug").eval()


@pytest.fixture(scope="module")
def books(base):
    g = torch.Generator().manual_seed(0)
    return calibrate(base, torch.randint(0, 256, (1, 600), generator=g), CFG)


def tiered(base, books, **kw):
    cfg = KVTierConfig(**({k: getattr(CFG, k) for k in CFG.__dataclass_fields__} | kw))
    return apply_kv_tiers(base, cfg, codebooks=books)


def ids(B=2, T=200, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def test_parse_flag():
    c = parse_kv_tiers("hot=4096, warm=65536,window=64,pq=16,search=flat")
    assert (c.hot, c.warm, c.window, c.pq, c.search, c.warm_windows, c.dist) == (4096, 65536, 64, 16, "flat", 1024,
                                                                                4096)
    for bad, msg in (("hot=4096,colour=3", "KEY=VALUE"), ("hot=big", "not an integer"), ("hot=8,window=64", "hot=8"),
                     ("search=deep", "search"), ("window=64,anchors=5", "divide")):
        with pytest.raises(UserError, match=msg):
            parse_kv_tiers(bad)


@pytest.mark.parametrize("position", ["rope", "xpos"])
def test_derotate_inverts_the_rotation(position):
    from memlm.layers.attention import AttentionCore

    core = AttentionCore(32, 4, 2, 8, window=None, position=position, rope_base=1e4, rope_fraction=1.0,
                         xpos_scale_base=512.0, bias=False, qk_norm=False, fused_qkv=True)
    k = torch.randn(2, 2, 50, 8)
    rel = torch.arange(50).repeat(2, 1) * 7
    _, kr = core.rotary(k, k, rel)
    assert not torch.allclose(kr, k)
    assert_close(derotate(core, kr, rel), k, tol=1e-5, name="derotate(rotate(k))")


def test_pq_codes_equal_faiss():
    x = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    pq = faiss.ProductQuantizer(16, 4, 6)
    pq.train(x)
    cent = torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(4, 64, 4))
    ours = pq_encode(torch.from_numpy(x)[None, None], cent[None])[0, 0].numpy()
    theirs = pq.compute_codes(x)  # 6-bit codes packed: compare decoded vectors instead of bytes
    np.testing.assert_allclose(pq.decode(theirs), pq_decode(torch.from_numpy(ours)[None, None], cent[None])[0, 0],
                               rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_hot_only_equals_exact_attention(base, books):
    x = ids(T=120)
    want, _ = base(x)
    got, s = tiered(base, books, hot=128)(x)
    assert_close(got, want, name="tiers with everything hot")
    assert s.layers[0].wpos.shape[1] == 120 // 8  # windows were compressed but none is visible yet


@torch.no_grad()
def test_lookup_table_attention_equals_decompress_then_attend(base, books):
    """One decode step against an explicit reference: decode the teleported windows' keys and values, place them at
    distance D, and run one softmax over [hot tokens; warm tokens]."""
    m = tiered(base, books)
    x = ids(B=2, T=161)
    _, st = m(x[:, :160])
    layer: TieredAttention = m.blocks[1].mixer
    # the layer's input at the last step
    h_in = {}
    hook = layer.register_forward_pre_hook(lambda mod, args: h_in.setdefault("x", args[0]))
    m(x[:, 160:], st)
    hook.remove()
    s = st.layers[1]
    out, _ = layer(h_in["x"], s)
    core = layer.core
    q, k, v = core.project(h_in["x"])
    B, Hq, _, Dh = q.shape
    G, t = Hq // layer.hk, 160
    qr, kr = core.rotary(q, k, torch.full((B, 1), t))
    qw = core.rotary._rotate(q, torch.full((B, 1), layer.cfg.dist), 1.0).reshape(B, layer.hk, G, Dh)
    sel = layer.teleport(qw, s, torch.full((B, G), t), torch.zeros(B, G, dtype=torch.long))
    ref = torch.zeros(B, Hq, Dh)
    for b in range(B):
        for h in range(Hq):
            hk, g = h // G, h % G
            hot = [i for i in range(layer.Wh) if 0 <= s.hot.kpos[b, i] and t - s.hot.kpos[b, i] < layer.Wh]
            K = [s.hot.k[b, hk, i] for i in hot] + [kr[b, hk, 0]]
            V = [s.hot.v[b, hk, i] for i in hot] + [v[b, hk, 0]]
            logits = [qr[b, h, 0] @ kk / math.sqrt(Dh) for kk in K]
            for j in sel[b, hk, g].tolist():
                if j < 0:
                    continue
                kw = pq_decode(s.codes[b:b + 1, hk:hk + 1, j], layer.centroids[hk:hk + 1])[0, 0]
                vw = s.coef[b, hk, j].float() @ s.basis[b, hk, j].float() + s.vmean[b, hk, j].float()
                for i in range(layer.cfg.window):
                    if t - (int(s.wpos[b, j]) + i) >= layer.Wh:
                        logits.append(qw[b, hk, g] @ kw[i] / math.sqrt(Dh))
                        V.append(vw[i])
            ref[b, h] = torch.softmax(torch.stack(logits), 0) @ torch.stack(V).float()
    want = core.o_proj(ref.reshape(B, 1, Hq * Dh))
    assert (sel >= 0).all(), "every query should have teleported windows here"
    assert_close(out, want, tol=1e-5, name="folded LUT / low-rank attention vs explicit decompression")


@torch.no_grad()
def test_teleport_flat_is_brute_force_and_tree_recall(base, books):
    m = tiered(base, books, topk=4, fanout=4, beam=3, search="flat")
    layer = m.blocks[0].mixer
    _, st = m(ids(B=1, T=600, seed=3))
    s = st.layers[0]
    n = s.wpos.shape[1]
    qw = torch.randn(1, layer.hk, 20, layer.dh)
    qpos = torch.full((1, 20), 600)
    qdoc = torch.zeros(1, 20, dtype=torch.long)
    flat = layer.teleport(qw, s, qpos, qdoc)
    lo, hi = layer.eligible_range(s, qpos, qdoc)
    assert int(lo[0, 0]) == 0 and int(hi[0, 0]) == (600 - layer.Wh) // 8 + 1
    score = torch.einsum("bhqd,bhnad->bhqna", qw, s.anchors.float()).amax(-1)
    score[..., int(hi[0, 0]):] = float("-inf")
    brute = score.topk(4, -1).indices
    assert torch.equal(flat.sort(-1).values, brute.sort(-1).values)
    layer.cfg.search = "tree"
    try:
        tree = layer.teleport(qw, s, qpos, qdoc)
    finally:
        layer.cfg.search = "flat"
    assert n > layer.cfg.beam * layer.cfg.fanout, "the tree search needs more windows than one beam covers"
    assert (tree < int(hi[0, 0])).all() and (tree >= 0).all(), "the tree proposed a window the query may not see"
    recall = np.mean([len(set(a) & set(b)) / 4 for a, b in zip(tree.flatten(0, 2).tolist(), flat.flatten(0, 2).tolist())])
    assert recall > 0.2, recall  # random queries: the worst case for a summary tree (measured in docs instead)


@torch.no_grad()
def test_tree_descends_to_the_needle_in_structured_memory(base, books):
    """Windows grouped by topic (as text is): the coarse-to-fine search finds a query's window from its topic."""
    m = tiered(base, books, topk=2, fanout=4, beam=4)
    layer = m.blocks[0].mixer
    g = torch.Generator().manual_seed(0)
    n, A, Dh, Hk = 256, 2, layer.dh, layer.hk
    topic = torch.randn(Hk, n // 16, Dh, generator=g) * 3                      # one topic per 16 windows
    own = torch.randn(Hk, n, Dh, generator=g)
    anchors = (topic.repeat_interleave(16, 1) + own)[:, :, None].expand(-1, -1, A, -1)
    s0 = layer.init_state(1)
    s = dataclasses.replace(s0, anchors=anchors[None].half(), wpos=(torch.arange(n) * 8)[None],
                            codes=torch.zeros(1, Hk, n, 8, layer.M, dtype=torch.uint8))
    target = torch.randint(0, n, (64,), generator=g)
    q = (topic.repeat_interleave(16, 1)[:, target] + 2 * own[:, target])[None]   # [1, Hk, 64, Dh]
    qpos = torch.full((1, 64), n * 8 + layer.Wh)
    found = layer.teleport(q, s, qpos, torch.zeros(1, 64, dtype=torch.long))
    hit = (found == target[None, None, :, None]).any(-1).float().mean()
    layer.cfg.search = "flat"
    flat = layer.teleport(q, s, qpos, torch.zeros(1, 64, dtype=torch.long))
    hit_flat = (flat == target[None, None, :, None]).any(-1).float().mean()
    # the tree looks at 4·4 = 16 of 256 windows per query (a blind pick would hit 1/16 of the time)
    assert hit >= 0.7 and hit >= hit_flat - 0.1, (float(hit), float(hit_flat))


@torch.no_grad()
@pytest.mark.parametrize("search", ["tree", "flat"])
def test_causal_and_chunk_invariant(base, books, search):
    m = tiered(base, books, search=search, fanout=2, beam=2)
    x = ids(T=150)
    full, s_full = m(x)
    for t in (40, 97):
        y = x.clone()
        y[:, t:] = (y[:, t:] + 5) % 256
        out, _ = m(y)
        assert_close(out[:, :t], full[:, :t], tol=1e-6, name=f"outputs before {t} changed")
    outs, st = [], None
    for a, b in ((0, 1), (1, 33), (33, 40), (40, 41), (41, 150)):
        o, st = m(x[:, a:b], st)
        outs.append(o)
    assert_close(torch.cat(outs, 1), full, tol=1e-5, name="split run")
    for k, v in s_full.state_dict().items():
        assert_close(st.state_dict()[k].float(), v.float(), tol=1e-3, name=f"final state {k}")
    outs = [m(x[:, :120], None)[0]]
    _, st = m(x[:, :120])
    for t in range(120, 150):
        o, st = m(x[:, t:t + 1], st)
        outs.append(o)
    assert_close(torch.cat(outs, 1), full, tol=1e-5, name="token-by-token decode")


@torch.no_grad()
def test_warm_tier_reaches_beyond_the_hot_window(base, books):
    m = tiered(base, books, topk=100)
    x = ids(B=1, T=200)
    y, _ = m(x)
    x2 = x.clone()
    x2[:, 3] = (x2[:, 3] + 1) % 256
    y2, _ = m(x2)
    assert not torch.allclose(y[:, 199], y2[:, 199], atol=1e-6), "token 3 (160 tokens back) was never teleported"
    swa = memlm.build_model("transformer-swa-debug")  # the plain sliding window cannot see it
    swa.load_state_dict(base.state_dict())
    for b in swa.blocks:
        b.mixer.core.window = 32
    a, _ = swa(x)
    c, _ = swa(x2)
    assert torch.allclose(a[:, 199], c[:, 199], atol=1e-6)


def test_memory_per_token(base, books):
    mem = tier_memory(tiered(base, books))
    # two layers, 2 KV heads of 16: exact 2·(2·16·2·4 + 8) bytes per token
    assert mem["exact_bytes_per_token"] == 2 * (2 * 16 * 2 * 4 + 8)
    assert mem["warm_bytes_per_token"] < mem["exact_bytes_per_token"] / 2
    assert mem["hot_bytes"] == 2 * (32 * 2 * 16 * 2 * 4 + 32 * 8)


def test_engine_and_session(base, books, tmp_path):
    m = tiered(base, books)
    tok = memlm.load_tokenizer("byte")
    eng = Engine(m, tok, prefill_chunk=50)
    gen = eng.generate_ids([list(range(40, 140)), list(range(60, 160))], max_new_tokens=5,
                           sampling=SamplingConfig(temperature=0), return_state=True).run()
    assert all(len(r.token_ids) == 5 for r in gen.rows)
    s = Session(m, tok, mode="persistent", store=tmp_path, session_id="kv", sampling=SamplingConfig(temperature=0),
                max_new_tokens=4)
    s.ask("a message long enough to push a few windows of keys out of the hot tier and into warm memory")
    back = Session(m, tok, mode="persistent", store=tmp_path, session_id="kv", max_new_tokens=4)
    assert torch.equal(back.next_token_logits("and?"), s.next_token_logits("and?"))
    with pytest.raises(UserError, match="another model"):
        ModelState.load(tmp_path / "kv" / "state.safetensors", model=base)


def test_cli_helper(base):
    from memlm.memory.kvtiers import kv_tiers_from_flag

    tok = memlm.load_tokenizer("byte")
    text = "It was the best of times, it was the worst of times. " * 20
    m = kv_tiers_from_flag(base, tok, "hot=32,window=8,bits=4,pq=4,topk=2", calibration_text=text)
    assert m.kv_tiers.hot == 32 and isinstance(m.blocks[0].mixer, TieredAttention)
    assert m.blocks[0].mixer.centroids.shape == (2, 4, 16, 4)
    assert not isinstance(base.blocks[0].mixer, TieredAttention), "the original model must be left as it was"
    assert m.blocks[0].mixer.core is base.blocks[0].mixer.core, "parameters are shared, not copied"
    with pytest.raises(UserError, match="no attention layers"):
        kv_tiers_from_flag(memlm.build_model("deltanet-debug"), tok, "hot=32,window=8", calibration_text=text)
