"""Episodic store (FAISS): exact search against brute force, bounded size with FIFO / LRU eviction, IVF-PQ past the
threshold, save/load round trip, corrupt files → clear errors, per-session isolation (stores and chat sessions with a
retrieval model), persistence of the indexes with a chat session, faiss as an optional dependency.

Notation: n entries, d key width, Q queries, k neighbours.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import memlm
from memlm.errors import UserError
from memlm.inference.sampling import SamplingConfig
from memlm.inference.session import Session

faiss = pytest.importorskip("faiss")

from memlm.memory.episodic import EpisodicIndexSet, EpisodicStore, require_faiss

GREEDY = SamplingConfig(temperature=0)


def unit(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_search_is_exact_with_values_and_positions():
    keys, vals = unit(200, 16), unit(200, 4, seed=1)
    st = EpisodicStore(16, 4, capacity=500, session_id="a")
    ids = st.add(keys, vals, positions=np.arange(200) * 3)
    q = unit(7, 16, seed=2)
    r = st.search(q, 5)
    want = np.argsort(-(q @ keys.T), axis=1)[:, :5]
    assert (r.ids == ids[want]).all()
    np.testing.assert_allclose(r.scores, np.take_along_axis(q @ keys.T, want, 1), rtol=1e-5)
    np.testing.assert_allclose(r.values, vals[want], rtol=1e-6)
    assert (r.positions == want * 3).all()
    empty = EpisodicStore(16, capacity=3).search(q, 2)
    assert (empty.ids == -1).all() and np.isneginf(empty.scores).all()


def test_fifo_eviction_keeps_the_newest_and_never_returns_evicted():
    st = EpisodicStore(8, 1, capacity=10)
    keys = unit(25, 8)
    for a in range(0, 25, 4):  # several adds, each may evict
        st.add(keys[a:a + 4], np.arange(a, min(a + 4, 25))[:, None].astype(np.float32))
    assert len(st) == 10 and st.index.ntotal == 10
    r = st.search(keys, 10)
    assert set(r.ids.ravel().tolist()) == set(range(15, 25))
    # querying with an evicted key finds only live entries
    assert (r.ids[0] >= 15).all()


def test_lru_eviction_keeps_recently_retrieved_entries():
    keys = unit(12, 8)
    st = EpisodicStore(8, capacity=6, eviction="lru")
    st.add(keys[:6])
    st.search(keys[0:1], 1)  # entry 0 (the oldest) is used
    st.add(keys[6:8])        # two evictions: entries 1 and 2 (least recently used), not 0
    live = set(st.slot_of)
    assert 0 in live and 1 not in live and 2 not in live
    fifo = EpisodicStore(8, capacity=6)
    fifo.add(keys[:6])
    fifo.search(keys[0:1], 1)
    fifo.add(keys[6:8])
    assert 0 not in fifo.slot_of


def test_ivfpq_beyond_threshold_has_good_recall():
    keys = unit(1500, 16, seed=3)
    st = EpisodicStore(16, capacity=5000, ivf_threshold=1000, nprobe=32)
    st.add(keys[:800])
    assert st.kind == "flat"
    st.add(keys[800:])
    assert st.kind == "ivfpq" and st.index.ntotal == 1500
    q = keys[:50] + 0.05 * unit(50, 16, seed=4)
    exact = np.argsort(-(q @ keys.T), axis=1)[:, :10]
    got = st.search(q, 10).ids
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.tolist(), got.tolist())])
    assert recall > 0.5, recall
    assert (got[:, 0] == np.arange(50)).mean() > 0.9  # the near-duplicate is found


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_save_load_round_trip(tmp_path, kind):
    n = 1200 if kind == "ivfpq" else 300
    keys, vals = unit(n, 16), unit(n, 3, seed=5)
    st = EpisodicStore(16, 3, capacity=n, session_id="s1", ivf_threshold=1000 if kind == "ivfpq" else 10 ** 9)
    st.add(keys, vals, np.arange(n))
    assert st.kind == kind
    st.save(tmp_path, "l0")
    back = EpisodicStore.load(tmp_path, "l0", session_id="s1")
    q = unit(9, 16, seed=6)
    a, b = st.search(q, 4), back.search(q, 4)
    assert (a.ids == b.ids).all() and np.allclose(a.scores, b.scores) and np.allclose(a.values, b.values)
    assert back.kind == kind and len(back) == n
    back.add(unit(5, 16, seed=7))  # a loaded store keeps working (ids continue, the oldest are evicted)
    assert len(back) == n and min(back.slot_of) == 5 and max(back.slot_of) == n + 4


def test_corrupt_or_foreign_files_are_clear_errors(tmp_path):
    st = EpisodicStore(8, capacity=50, session_id="alice")
    st.add(unit(40, 8))
    st.save(tmp_path, "x")
    index = tmp_path / "x.faiss"
    blob = bytearray(index.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    index.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="corrupt FAISS index file"):
        EpisodicStore.load(tmp_path, "x")
    index.write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt FAISS index file"):
        EpisodicStore.load(tmp_path, "x")
    index.unlink()  # a missing index is rebuilt from the entries
    assert len(EpisodicStore.load(tmp_path, "x")) == 40
    with pytest.raises(UserError, match="belongs to session 'alice'"):
        EpisodicStore.load(tmp_path, "x", session_id="bob")
    meta = tmp_path / "x.safetensors"
    meta.write_bytes(meta.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt episodic store file"):
        EpisodicStore.load(tmp_path, "x")
    with pytest.raises(UserError, match="no episodic store"):
        EpisodicStore.load(tmp_path, "nothing")


def test_two_stores_never_share_entries():
    keys = unit(30, 8)
    a, b = EpisodicStore(8, capacity=100, session_id="a"), EpisodicStore(8, capacity=100, session_id="b")
    a.add(keys[:20], positions=np.arange(20))
    b.add(keys[20:], positions=np.arange(100, 110))
    r = b.search(keys[:20], 10)  # B asked with A's own keys still answers only from B
    assert set(r.positions[r.ids >= 0].tolist()) <= set(range(100, 110))


def test_faiss_is_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(UserError, match="pip install 'memlm\\[memory\\]'"):
        require_faiss()
    with pytest.raises(UserError):
        EpisodicStore(8, capacity=4)


# ------------------------------------------------------------------------------------------- chat sessions


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = memlm.build_model("transformer-retrieval-debug").eval()
    m.blocks[1].mixer.cfg.index_threshold = 1  # search through FAISS from the first stored entry on
    return m


@pytest.fixture(scope="module")
def tok():
    return memlm.load_tokenizer("byte")


def test_sessions_never_see_each_others_entries(model, tok, tmp_path):
    """B's replies and logits are the same whether or not A chatted before; indexes and files are per session."""
    torch.set_num_threads(1)
    lone = Session(model, tok, mode="persistent", store=tmp_path / "x", session_id="bob", sampling=GREEDY,
                   max_new_tokens=8)
    lone.ask("the weather is grey and the sea is calm today")
    want = lone.next_token_logits("what is the weather?")

    a = Session(model, tok, mode="persistent", store=tmp_path, session_id="alice", sampling=GREEDY, max_new_tokens=8)
    a.ask("the secret code is 4711, remember it well please")
    b = Session(model, tok, mode="persistent", store=tmp_path, session_id="bob", sampling=GREEDY, max_new_tokens=8)
    b.ask("the weather is grey and the sea is calm today")
    a.ask("and once more: 4711 is the code")
    assert torch.equal(b.next_token_logits("what is the weather?"), want)
    assert a.episodic is not None and b.episodic is not None and a.episodic is not b.episodic
    la, lb = a.episodic.layers[1], b.episodic.layers[1]
    assert la.stores and lb.stores
    # B's index holds exactly B's memory entries (no key of A's), and vice versa
    mem_b = b.state.layers[1].mem_k[0, 0]
    mem_a = a.state.layers[1].mem_k[0, 0]
    idx_keys_b = torch.from_numpy(lb.stores[0, 0].keys[lb.stores[0, 0].ids >= 0])
    assert len(idx_keys_b) == int((b.state.layers[1].mem_pos[0] >= 0).sum())
    exact = "donot_use_mm_for_euclid_dist"
    d_own = torch.cdist(idx_keys_b, mem_b.float(), compute_mode=exact).min(1).values
    d_other = torch.cdist(idx_keys_b, mem_a.float(), compute_mode=exact).min(1).values
    assert d_own.max() < 1e-5 and d_other.min() > 1e-3
    # files: each session's folder, and a session's index files refuse to load as another's
    assert (tmp_path / "alice" / "episodic" / "manifest.json").exists()
    with pytest.raises(UserError, match="session 'alice'"):
        EpisodicIndexSet.load(tmp_path / "alice", "bob")


def test_indexes_persist_with_the_session(model, tok, tmp_path):
    s = Session(model, tok, mode="persistent", store=tmp_path, session_id="p1", sampling=GREEDY, max_new_tokens=6)
    s.ask("a long enough message to fill a few segments of memory")
    cont = s.next_token_logits("and then?")
    back = Session(model, tok, mode="persistent", store=tmp_path, session_id="p1", sampling=GREEDY,
                   max_new_tokens=6)
    assert back.loaded and back.episodic is not None
    stores_before = dict(back.episodic.layers[1].stores)
    assert stores_before, "the saved indexes were not loaded"
    assert torch.equal(back.next_token_logits("and then?"), cont)
    r1, r2 = s.ask("go on"), back.ask("go on")
    assert r1.token_ids == r2.token_ids
    # the loaded indexes matched the state (fingerprint), so they were updated in place, not rebuilt
    assert all(back.episodic.layers[1].stores[k] is v for k, v in stores_before.items())
