"""Synthetic recall tasks: determinism, layout, and answers exactly where the labels claim."""
from __future__ import annotations

import pytest
import torch

from memlm.data.packing import IGNORE
from memlm.data.synthetic import assoc_recall_batch, batches, mqar_batch
from memlm.errors import UserError


def _eq(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "labels", "mask", "reset"))


@pytest.mark.parametrize("key_len,val_len", [(1, 1), (2, 3)])
def test_assoc_recall_layout_and_answers(key_len, val_len):
    B, P, Q, G, lo, hi = 5, 8, 6, 300, 10, 110
    sb = assoc_recall_batch(B, P, key_len, val_len, G, lo, hi, seed=0, n_queries=Q)
    k, v = key_len, val_len
    T = (P + Q) * (k + v) + G
    assert sb.input_ids.shape == sb.labels.shape == sb.mask.shape == (B, T)
    assert torch.equal(sb.mask, sb.labels != IGNORE)
    assert sb.mask.sum().item() == B * Q * v
    assert sb.reset[:, 0].all() and not sb.reset[:, 1:].any()
    ids = sb.input_ids
    assert ((ids >= lo) & (ids < hi)).all()
    nk = (2 * (hi - lo)) // 5
    for b in range(B):
        row = ids[b].tolist()
        ctx = [row[i * (k + v):(i + 1) * (k + v)] for i in range(P)]
        table = {tuple(c[:k]): c[k:] for c in ctx}
        assert len(table) == P  # distinct keys
        assert all(lo <= t < lo + nk for key in table for t in key)  # keys in the key range
        filler = row[P * (k + v):P * (k + v) + G]
        assert all(t >= lo + nk for t in filler)  # filler can never spell a key
        start = P * (k + v) + G
        asked = set()
        for q in range(Q):
            a = start + q * (k + v)
            key, val = tuple(row[a:a + k]), row[a + k:a + k + v]
            assert table[key] == val  # the query's value is the one stored with that key
            asked.add(key)
            # labels: value token j is the label of the position just before it
            assert sb.labels[b, a + k - 1:a + k + v - 1].tolist() == val
        assert len(asked) == Q
        # every answer sits beyond the gap: nothing before the query section carries a label
        assert (sb.labels[b, :start] == IGNORE).all()
        # the label convention of the packer: label[t] is input[t + 1]
        m = sb.mask[b, :-1]
        assert torch.equal(sb.labels[b, :-1][m], ids[b, 1:][m])


def test_assoc_recall_deterministic():
    kw = {"batch": 3, "n_pairs": 4, "key_len": 1, "val_len": 2, "gap": 50, "vocab_lo": 0, "vocab_hi": 64}
    assert _eq(assoc_recall_batch(**kw, seed=5), assoc_recall_batch(**kw, seed=5))
    assert not _eq(assoc_recall_batch(**kw, seed=5), assoc_recall_batch(**kw, seed=6))
    const = assoc_recall_batch(**kw, seed=5, filler=3)
    assert (const.input_ids[:, 4 * 3:4 * 3 + 50] == 3).all()


def test_assoc_recall_errors():
    with pytest.raises(UserError, match="distinct keys"):
        assoc_recall_batch(1, 50, 1, 1, 0, 0, 20, seed=0)
    with pytest.raises(UserError):
        assoc_recall_batch(1, 4, 1, 1, 0, 0, 100, seed=0, n_queries=5)


def test_mqar_layout_and_answers():
    B, T, P, Q, V = 6, 256, 16, 10, 200
    sb = mqar_batch(B, T, P, V, seed=1, n_queries=Q)
    assert sb.input_ids.shape == (B, T) and sb.mask.sum().item() == B * Q
    half = (V - 1) // 2
    for b in range(B):
        row = sb.input_ids[b].tolist()
        keys, vals = row[0:2 * P:2], row[1:2 * P:2]
        assert len(set(keys)) == P and all(1 <= x <= half for x in keys) and all(x > half for x in vals)
        table = dict(zip(keys, vals))
        pos = sb.mask[b].nonzero().flatten().tolist()
        assert all(p >= 2 * P and (p - 2 * P) % 2 == 0 for p in pos)
        for p in pos:
            assert row[p] in table and sb.labels[b, p].item() == table[row[p]] == row[p + 1]
        assert len({row[p] for p in pos}) == Q
        # outside the answers, after the context, only filler
        rest = [t for i, t in enumerate(row[2 * P:], 2 * P) if i not in pos and i - 1 not in pos]
        assert set(rest) <= {0}


def test_mqar_deterministic_and_power_law():
    a, b = mqar_batch(4, 128, 8, 100, seed=3), mqar_batch(4, 128, 8, 100, seed=3)
    assert _eq(a, b) and not _eq(a, mqar_batch(4, 128, 8, 100, seed=4))
    # short gaps are likelier than long ones
    sb = mqar_batch(64, 512, 8, 100, seed=0, n_queries=4)
    pos = sb.mask.nonzero()[:, 1].float() - 16
    assert (pos < 120).float().mean() > (pos >= 376).float().mean()
    with pytest.raises(UserError, match="query slots"):
        mqar_batch(1, 20, 8, 100, seed=0)


def test_batches_stream():
    it = batches(mqar_batch, seed=10, batch=2, seq_len=64, n_pairs=4, vocab_size=50)
    first, second = next(it), next(it)
    assert _eq(first, mqar_batch(2, 64, 4, 50, seed=10)) and _eq(second, mqar_batch(2, 64, 4, 50, seed=11))
    assert first.as_batch().input_ids is first.input_ids
