"""Shards: prepare → memory-mapped documents equal on-the-fly tokenisation; packer parity; resume; safety checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memlm.data.packing import Packer
from memlm.data.shards import ShardDataset, prepare
from memlm.data.sources import Document, DocumentSource
from memlm.data.tokenizer import ByteTokenizer, Tokenizer, train_bpe
from memlm.errors import UserError


@pytest.fixture()
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    with open(d / "a.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": f"Doc {i}: " + "naïve café 世界 " * (i % 9 + 1)}, ensure_ascii=False) + "\n"
                     for i in range(40))
        f.write("{broken\n")
    (d / "b.txt").write_text("A plain text file.\n" * 20, encoding="utf-8")
    return d


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.reset, y.reset)


def test_prepare_round_trip_byte(corpus, tmp_path):
    tok = ByteTokenizer()
    out = tmp_path / "shards"
    index = prepare(str(corpus), tok, out, shard_tokens=1000)
    ds = ShardDataset(out, tokenizer=tok)
    docs = list(DocumentSource(corpus))
    assert len(ds) == len(docs) == 41 == index["documents"]
    for i, d in enumerate(docs):
        assert ds[i].tolist() == tok.encode(d.text)
    assert ds.dtype == np.uint16 and len(index["shards"]) > 3  # several shards of ≤ ~1000 tokens
    assert all(s["tokens"] <= 1000 or s["documents"] == 1 for s in index["shards"])
    assert index["tokens"] == sum(len(tok.encode(d.text)) for d in docs) == ds.num_tokens
    assert index["sources"]["skipped"] == {"broken_json": 1}
    assert index["tokenizer"]["name"] == "byte" and index["tokenizer"]["vocab_size"] == 263
    assert not list(out.glob("*.tmp")) and (out / "index.json").is_file()
    assert [a.tolist() for a in ds] == [tok.encode(d.text) for d in docs]


def test_prepare_bpe_and_packer_parity(corpus, tmp_path):
    texts = [d.text for d in DocumentSource(corpus)]
    tok = train_bpe(texts * 3, 400, tmp_path / "tok")
    prepare(str(corpus), tok, tmp_path / "shards", shard_tokens=500)
    ds = ShardDataset(tmp_path / "shards")
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) for t in texts]
    kw = {"batch_size": 2, "seq_len": 24, "mode": "streams", "loop": False}
    on_the_fly = list(Packer(DocumentSource(corpus), tok, **kw))
    from_shards = list(Packer(ds, tok, shuffle=False, **kw))
    _same(from_shards, on_the_fly)


class _BigVocab(Tokenizer):
    """A stand-in for a > 65,536-token vocabulary: byte b ↦ 69,999 − b."""

    kind, name, vocab_size, eos_id, bos_id, pad_id, special_tokens = "test", "big", 70_000, 0, None, 0, {}

    def encode(self, text, *, add_bos=False, add_eos=False, allow_special=False):
        return [69_999 - b for b in text.encode()]

    @property
    def fingerprint(self):
        return "big-v1"


def test_uint32_for_large_vocab(tmp_path):
    tok = _BigVocab()
    prepare([Document("hi"), Document("yo")], tok, tmp_path / "s")
    ds = ShardDataset(tmp_path / "s", tokenizer=tok)
    assert ds.dtype == np.uint32 and ds[0].tolist() == [69_999 - 104, 69_999 - 105]
    assert next(Packer(ds, tok, batch_size=1, seq_len=3, shuffle=False)).input_ids[0].tolist() == [69_895, 69_894, 0]


def test_shuffled_epochs_and_resume(corpus, tmp_path):
    tok = ByteTokenizer()
    prepare(str(corpus), tok, tmp_path / "s", shard_tokens=700)
    ds = ShardDataset(tmp_path / "s")
    o0, o1 = ds.order(0, seed=1, shuffle=True), ds.order(1, seed=1, shuffle=True)
    assert sorted(o0.tolist()) == list(range(len(ds))) and not np.array_equal(o0, o1)
    assert np.array_equal(o0, ShardDataset(tmp_path / "s").order(0, seed=1, shuffle=True))
    for mode in ("packed", "streams"):
        kw = {"batch_size": 3, "seq_len": 64, "mode": mode, "seed": 1, "shuffle": True}
        full = [next(p) for p in [Packer(ds, tok, **kw)] for _ in range(60)]  # > 2 epochs of ~4k tokens
        p = Packer(ds, tok, **kw)
        for _ in range(37):
            next(p)
        state = json.loads(json.dumps(p.state_dict()))  # the cursor survives JSON
        assert state["next"][0] >= 1  # we are past the first epoch
        q = Packer(ShardDataset(tmp_path / "s"), tok, **kw)
        q.load_state_dict(state)
        _same([next(q) for _ in range(23)], full[37:])
    # different seed → different order
    a = next(Packer(ds, tok, batch_size=1, seq_len=512, seed=1))
    b = next(Packer(ds, tok, batch_size=1, seq_len=512, seed=2))
    assert not torch.equal(a.input_ids, b.input_ids)


def test_chat_masks_in_shards(tmp_path):
    tok = ByteTokenizer()
    msgs = [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]
    docs = [Document("plain before"), Document(None, msgs), Document("plain after")]
    prepare(docs, tok, tmp_path / "s")
    ds = ShardDataset(tmp_path / "s")
    assert ds.doc_mask(0).all() and ds.doc_mask(2).all()
    m = ds.doc_mask(1)
    assert m.sum() == len("answer") + 1 and not m[:len("question") + 3].any()
    kw = {"batch_size": 1, "seq_len": 80, "loop": False}
    _same(list(Packer(ds, tok, shuffle=False, **kw)), list(Packer(docs, tok, **kw)))


def test_val_split_and_overwrite(corpus, tmp_path):
    tok = ByteTokenizer()
    out = tmp_path / "s"
    index = prepare(str(corpus), tok, out, val_every=10)
    ds = ShardDataset(out)
    val = ds.val()
    docs = [tok.encode(d.text) for d in DocumentSource(corpus)]
    assert [val[i].tolist() for i in range(len(val))] == [d for i, d in enumerate(docs) if i % 10 == 9]
    assert [ds[i].tolist() for i in range(len(ds))] == [d for i, d in enumerate(docs) if i % 10 != 9]
    assert index["val_every"] == 10
    with pytest.raises(UserError, match="already holds prepared data"):
        prepare(str(corpus), tok, out)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(UserError, match="no usable text"):  # a failing run leaves the earlier data intact
        prepare(str(tmp_path / "empty.jsonl"), tok, out, overwrite=True)
    assert len(ShardDataset(out)) == len(docs) - len(val)
    prepare([Document("tiny")], tok, out, overwrite=True, val_every=None)
    assert len(ShardDataset(out)) == 1 and sorted(p.name for p in out.iterdir()) == [
        "index.json", "shard-00000.bin", "shard-00000.idx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "empty.jsonl", "s"]  # no temporary folders left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        prepare([Document("x")], tok, tmp_path / "other")


def test_mismatch_and_damage_are_user_errors(corpus, tmp_path):
    tok = ByteTokenizer()
    out = tmp_path / "s"
    prepare(str(corpus), tok, out)
    other = train_bpe(["some text"] * 10, 300, tmp_path / "tok")
    with pytest.raises(UserError, match="tokenised with 'byte'"):
        ShardDataset(out, tokenizer=other)
    with pytest.raises(UserError, match="tokenised with"):
        Packer(ShardDataset(out), other, batch_size=1, seq_len=8)
    with pytest.raises(UserError, match="not a prepared data folder"):
        ShardDataset(tmp_path / "nothing")
    with open(out / "shard-00000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match="wrong size"):
        ShardDataset(out)[0]
    with pytest.raises(UserError, match="cycles forever"):
        from memlm.data.sources import mixture
        prepare(mixture([([Document("a")], 1.0), ([Document("b")], 1.0)]), tok, tmp_path / "m")
    idx = prepare(mixture([([Document("a")], 1.0), ([Document("b")], 1.0)]), tok, tmp_path / "m", max_tokens=10,
                  group_chars=1)
    assert 10 <= idx["tokens"] <= 12


def test_packer_takes_specials_from_shard_index(tmp_path):
    tok = ByteTokenizer()
    prepare([Document("abc")], tok, tmp_path / "s")
    b = next(Packer(ShardDataset(tmp_path / "s"), batch_size=1, seq_len=6, loop=False))
    assert b.input_ids[0].tolist() == [97, 98, 99, tok.eos_id, tok.pad_id, tok.pad_id]
