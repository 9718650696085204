"""Packing: label shift, document boundaries, EOS, chat masks, independent streams, deterministic resume."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from memlm.data.packing import IGNORE, Packer, document_ids
from memlm.data.sources import Document
from memlm.data.tokenizer import ByteTokenizer
from memlm.errors import UserError

EOS = 256


def _docs(n: int, seed: int = 0, lo: int = 1, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 200) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _reference_stream(docs, masks=None):
    """Token-by-token specification: (ids, labels, is_doc_start) of the concatenated documents."""
    ids, labels, start = [], [], []
    for k, d in enumerate(docs):
        m = masks[k] if masks else [True] * len(d)
        full = list(d) + [EOS]
        fm = list(m) + [masks is None]
        for i, tok in enumerate(full):
            ids.append(tok)
            start.append(i == 0)
            if i + 1 < len(full) and fm[i + 1]:
                labels.append(full[i + 1])
            else:
                labels.append(IGNORE)
    return ids, labels, start


def _take(p, n):
    return [next(p) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.reset, y.reset)


def test_packed_matches_reference_layout():
    docs = _docs(60)
    B, T = 3, 16
    p = Packer(docs, eos_id=EOS, batch_size=B, seq_len=T, mode="packed", loop=False)
    batches = list(p)
    ids = torch.cat([b.input_ids.reshape(-1) for b in batches])
    labels = torch.cat([b.labels.reshape(-1) for b in batches])
    reset = torch.cat([b.reset.reshape(-1) for b in batches])
    r_ids, r_labels, r_start = _reference_stream(docs)
    n = len(r_ids)
    assert ids[:n].tolist() == r_ids and labels[:n].tolist() == r_labels and reset[:n].tolist() == r_start
    # the tail of the last batch is padding without loss and without resets
    assert (labels[n:] == IGNORE).all() and not reset[n:].any()
    assert batches[0].input_ids.shape == (B, T) and batches[0].input_ids.dtype == torch.long
    assert batches[0].reset.dtype == torch.bool


def test_label_shift_reset_and_eos_properties():
    docs = _docs(200, seed=1, hi=100)
    p = Packer(docs, eos_id=EOS, batch_size=4, seq_len=64)
    for b in _take(p, 20):
        x, y, r = b.input_ids, b.labels, b.reset
        inside = (y[:, :-1] != IGNORE)
        # within a document the label is the next input token
        assert torch.equal(y[:, :-1][inside], x[:, 1:][inside])
        # a label never crosses into another document: the token after an EOS starts a document
        assert (y[x == EOS] == IGNORE).all()
        assert torch.equal(r[:, 1:], x[:, :-1] == EOS)
        # the token before every EOS predicts EOS
        before_eos = x[:, 1:] == EOS
        assert (y[:, :-1][before_eos] == EOS).all()
        # label shift is real: labels are not the inputs themselves
        assert not torch.equal(x, y)


def test_reset_at_row_start_only_for_new_documents():
    docs = [[1] * 10, [2] * 30, [3] * 5]
    p = Packer(docs, eos_id=EOS, batch_size=1, seq_len=8, loop=False)
    bs = list(p)
    flat_reset = torch.cat([b.reset[0] for b in bs]).tolist()
    starts = [0, 11, 42]
    assert [i for i, v in enumerate(flat_reset) if v] == starts
    assert bs[1].reset[0, 0].item() is False  # row 1 continues document 0
    assert document_ids(bs[1].reset).tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]


def test_streams_are_independent_and_continue():
    docs = _docs(300, seed=2, hi=90)
    B, T = 4, 32
    p = Packer(docs, eos_id=EOS, batch_size=B, seq_len=T, mode="streams", loop=False)
    batches = list(p)
    rows = [torch.cat([b.input_ids[r] for b in batches]).tolist() for r in range(B)]
    resets = [torch.cat([b.reset[r] for b in batches]).tolist() for r in range(B)]
    seen = []
    for r in range(B):
        # each row is a sequence of whole documents: split at resets, every piece is doc + EOS (+ padding at the end)
        starts = [i for i, v in enumerate(resets[r]) if v] + [len(rows[r])]
        assert starts[0] == 0
        for a, b in itertools.pairwise(starts):
            piece = rows[r][a:b]
            k = docs.index(piece[:piece.index(EOS)])
            assert piece[:len(docs[k]) + 1] == docs[k] + [EOS]
            seen.append(k)
    assert sorted(seen) == list(range(len(docs)))  # every document exactly once, spread over the streams
    # a continuation row does not reset at t=0
    for k in range(1, len(batches)):
        for r in range(B):
            prev_last = batches[k - 1].input_ids[r, -1].item()
            assert batches[k].reset[r, 0].item() == (prev_last == EOS)


def test_chat_documents_loss_mask():
    tok = ByteTokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    p = Packer([Document(None, msgs), Document("ab")], tok, batch_size=1, seq_len=20, loop=False)
    b = next(p)
    x, y = b.input_ids[0].tolist(), b.labels[0].tolist()
    # <|user|> h i <|end|> <|assistant|> y o <|end|> <|eos|> a b <|eos|>
    assert x[:12] == [260, 104, 105, 262, 261, 121, 111, 262, 256, 97, 98, 256]
    assert y[:12] == [IGNORE, IGNORE, IGNORE, IGNORE, 121, 111, 262, IGNORE, IGNORE, 98, 256, IGNORE]
    assert b.reset[0].nonzero().flatten().tolist() == [0, 9]


def test_add_bos():
    tok = ByteTokenizer()
    p = Packer(["ab"], tok, batch_size=1, seq_len=4, add_bos=True, loop=False)
    b = next(p)
    assert b.input_ids[0].tolist() == [257, 97, 98, 256]
    assert b.labels[0].tolist() == [97, 98, 256, IGNORE]  # BOS predicts the first token; nothing predicts BOS


@pytest.mark.parametrize("mode", ["packed", "streams"])
def test_resume_gives_identical_batches(mode):
    docs = _docs(50, seed=3, hi=120)  # ~50 docs: several epochs in 40 batches
    kw = {"eos_id": EOS, "batch_size": 3, "seq_len": 40, "mode": mode, "seed": 7}
    full = _take(Packer(docs, **kw), 40)
    for cut in (1, 7, 23):
        p = Packer(docs, **kw)
        _take(p, cut)
        state = p.state_dict()
        q = Packer(docs, **kw)
        q.load_state_dict(state)
        _same(_take(q, 40 - cut), full[cut:])
        assert q.batches == 40


def test_text_source_tokenised_on_the_fly_and_resumed():
    tok = ByteTokenizer()
    texts = [Document(f"document number {i} " * (i % 7 + 1)) for i in range(30)]
    kw = {"batch_size": 2, "seq_len": 50, "mode": "streams"}
    full = _take(Packer(texts, tok, **kw), 30)
    p = Packer(texts, tok, **kw)
    _take(p, 11)
    q = Packer(texts, tok, **kw)
    q.load_state_dict(p.state_dict())
    _same(_take(q, 19), full[11:])
    # row 0 fills up before row 1 pulls its first document
    assert tok.decode(full[0].input_ids[0].tolist()).startswith("document number 0 <|eos|>document number 1")
    assert tok.decode(full[0].input_ids[1].tolist()).startswith("document number 2")


def test_loop_epochs_and_errors():
    docs = [[5, 6, 7]]
    p = Packer(docs, eos_id=EOS, batch_size=1, seq_len=8)
    assert next(p).input_ids[0].tolist() == [5, 6, 7, EOS, 5, 6, 7, EOS]
    with pytest.raises(UserError, match="no documents"):
        next(Packer([], eos_id=EOS, batch_size=1, seq_len=4))
    p = Packer(docs, eos_id=EOS, batch_size=1, seq_len=4)
    with pytest.raises(UserError, match="seq_len"):
        Packer(docs, eos_id=EOS, batch_size=1, seq_len=5).load_state_dict(p.state_dict())
    with pytest.raises(UserError, match="packing mode"):
        Packer(docs, eos_id=EOS, batch_size=1, seq_len=4, mode="bogus")
    with pytest.raises(UserError, match="eos_id"):
        Packer(docs, batch_size=1, seq_len=4)


def test_generator_source_is_one_pass():
    p = Packer((d for d in [[1, 2], [3]]), eos_id=EOS, batch_size=1, seq_len=3)
    assert next(p).input_ids[0].tolist() == [1, 2, EOS]
    assert next(p).input_ids[0].tolist() == [3, EOS, EOS]  # padded with pad_id (= eos_id without a tokenizer)
    with pytest.raises(StopIteration):
        next(p)
