"""Samplers on hand-made logits: each filter alone, the penalties' exact values, and ``sample`` end to end.

Notation: B batch rows, V vocabulary, n n-gram size.
"""
from __future__ import annotations

import math

import pytest
import torch

from memlm.errors import UserError
from memlm.inference.sampling import (
    SamplingConfig,
    apply_frequency_presence_penalty,
    apply_repetition_penalty,
    as_history,
    make_generator,
    min_p_filter,
    no_repeat_ngram_ban,
    packed_sample,
    sample,
    token_counts,
    top_k_filter,
    top_p_filter,
)

INF = float("inf")


def log_probs(*p: float) -> torch.Tensor:
    """Logits [1, V] whose softmax is exactly p (up to float rounding)."""
    return torch.tensor([p]).log()


def kept(x: torch.Tensor) -> list[int]:
    return torch.isfinite(x[0]).nonzero().flatten().tolist()


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ filters


def test_top_k_keeps_exactly_k():
    x = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, 2.5]])
    assert kept(top_k_filter(x, 3)) == [1, 3, 5]
    assert kept(top_k_filter(x, 1)) == [1]
    assert kept(top_k_filter(x, 0)) == list(range(6))  # off
    assert kept(top_k_filter(x, 99)) == list(range(6))
    out = top_k_filter(x, 3)
    assert torch.equal(out[0, [1, 3, 5]], x[0, [1, 3, 5]]), "kept logits must be unchanged"


def test_top_k_per_row():
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    out = top_k_filter(x, 2)
    assert torch.isinf(out[0, 0]) and torch.isinf(out[1, 2])
    assert torch.isfinite(out[0, 1:]).all() and torch.isfinite(out[1, :2]).all()


def test_top_p_keeps_the_token_that_crosses_p():
    x = log_probs(0.1, 0.5, 0.25, 0.15)  # sorted: 0.5 (1), 0.25 (2), 0.15 (3), 0.1 (0)
    assert kept(top_p_filter(x, 0.4)) == [1]  # 0.5 alone already crosses 0.4
    assert kept(top_p_filter(x, 0.6)) == [1, 2]  # 0.5 < 0.6, 0.75 crosses: token 2 kept
    assert kept(top_p_filter(x, 0.8)) == [1, 2, 3]
    assert kept(top_p_filter(x, 0.95)) == [0, 1, 2, 3]
    assert kept(top_p_filter(x, 1.0)) == [0, 1, 2, 3]


def test_top_p_exact_boundary():
    # Powers of two: the cumulative mass 0.5 + 0.25 is exactly 0.75. Reaching p exactly counts as crossing it,
    # so the next token (mass before it = 0.75 ≥ p) is dropped.
    x = log_probs(0.25, 0.5, 0.125, 0.125)
    assert kept(top_p_filter(x, 0.75)) == [0, 1]
    assert kept(top_p_filter(x, 0.5)) == [1]
    # Just above 0.75 the next token (one of the tied 0.125s) is needed, and the one after it is not.
    above = kept(top_p_filter(x, 0.7500001))
    assert len(above) == 3 and {0, 1} <= set(above)


def test_top_p_tiny_keeps_the_best_token():
    x = log_probs(0.3, 0.3, 0.4)
    assert kept(top_p_filter(x, 1e-9)) == [2]


def test_min_p():
    x = log_probs(0.5, 0.2, 0.05, 0.25)
    assert kept(min_p_filter(x, 0.4)) == [0, 1, 3]  # threshold 0.2: 0.2 itself kept (≥)
    assert kept(min_p_filter(x, 0.41)) == [0, 3]
    assert kept(min_p_filter(x, 1.0)) == [0]
    assert kept(min_p_filter(x, 0.0)) == [0, 1, 2, 3]


def test_repetition_penalty_exact_values():
    x = torch.tensor([[2.0, -2.0, 3.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(x, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 3.0, -1.0]]  # positive seen: ÷2, negative seen: ×2, unseen untouched
    assert torch.equal(apply_repetition_penalty(x, seen, 1.0), x)


def test_frequency_presence_penalty_exact_values():
    x = torch.tensor([[1.0, 1.0, 1.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0]])
    out = apply_frequency_presence_penalty(x, counts, 0.5, 0.25)
    assert out.tolist() == [[1.0, 1.0 - 0.5 - 0.25, 1.0 - 1.5 - 0.25]]


def test_token_counts_ignore_padding():
    ids = torch.tensor([[7, 1, 1, 2], [0, 0, 3, 3]])
    valid = torch.tensor([[False, True, True, True], [False, False, True, True]])
    c = token_counts(ids, valid, 8)
    assert c[0].tolist() == [0, 2, 1, 0, 0, 0, 0, 0]
    assert c[1].tolist() == [0, 0, 0, 2, 0, 0, 0, 0]


def test_history_ids_outside_the_vocabulary_count_for_nothing():
    ids = torch.tensor([[3, 9, 9, 1]])
    assert token_counts(ids, torch.ones_like(ids, dtype=torch.bool), 4)[0].tolist() == [0, 1, 0, 1]
    ids, valid = as_history([[9, 2, 9, 2]], None, 1, torch.device("cpu"))
    assert not no_repeat_ngram_ban(ids, valid, 2, 4).any()  # 9 would follow 2, but 9 is not a sampled id


def test_no_repeat_ngram_bans_exactly_the_right_token():
    V = 10
    # history "1 2 3 1 2": the 3-gram (1, 2, 3) exists and the suffix is (1, 2) → only 3 is banned.
    ids, valid = as_history([[1, 2, 3, 1, 2]], None, 1, torch.device("cpu"))
    ban = no_repeat_ngram_ban(ids, valid, 3, V)
    assert ban[0].nonzero().flatten().tolist() == [3]
    # 2-grams: suffix (2) was followed by 3 → ban 3 only.
    assert no_repeat_ngram_ban(ids, valid, 2, V)[0].nonzero().flatten().tolist() == [3]
    # Suffix occurring twice with different continuations bans both: "5 6 5 7 5" n=2 → {6, 7}.
    ids2, valid2 = as_history([[5, 6, 5, 7, 5]], None, 1, torch.device("cpu"))
    assert no_repeat_ngram_ban(ids2, valid2, 2, V)[0].nonzero().flatten().tolist() == [6, 7]
    # A banned token that also follows a non-matching window later on stays banned: "1 3 2 3 1", n=2 → {3}.
    ids4, valid4 = as_history([[1, 3, 2, 3, 1]], None, 1, torch.device("cpu"))
    assert no_repeat_ngram_ban(ids4, valid4, 2, V)[0].nonzero().flatten().tolist() == [3]
    # No earlier occurrence of the suffix: nothing banned.
    ids3, valid3 = as_history([[1, 2, 3, 4]], None, 1, torch.device("cpu"))
    assert not no_repeat_ngram_ban(ids3, valid3, 2, V).any()
    # n = 1 bans every seen token.
    assert no_repeat_ngram_ban(ids3, valid3, 1, V)[0].nonzero().flatten().tolist() == [1, 2, 3, 4]


def test_no_repeat_ngram_ignores_padding_and_batches():
    V = 10
    # Row 0 right-padded in the mask: valid "1 2 1" (n=2 → ban 2); row 1 "4 4" (ban 4). Padding ids are 1s that
    # would create false matches if they were counted.
    h = torch.tensor([[1, 2, 1, 1, 1], [1, 1, 1, 4, 4]])
    m = torch.tensor([[True, True, True, False, False], [False, False, False, True, True]])
    ids, valid = as_history(h, m, 2, torch.device("cpu"))
    assert ids[0, -3:].tolist() == [1, 2, 1] and valid[0].tolist() == [False, False, True, True, True]
    ban = no_repeat_ngram_ban(ids, valid, 2, V)
    assert ban[0].nonzero().flatten().tolist() == [2]
    assert ban[1].nonzero().flatten().tolist() == [4]


# ------------------------------------------------------------------------------------------------ sample


def test_temperature_zero_is_argmax():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 50, generator=g)
    s = sample(x, None, SamplingConfig(temperature=0))
    assert torch.equal(s.tokens, x.argmax(-1))
    lp = x.log_softmax(-1)
    torch.testing.assert_close(s.logprobs, lp.gather(1, s.tokens[:, None]).squeeze(1))
    torch.testing.assert_close(s.entropy, -(lp.exp() * lp).sum(-1))


def test_greedy_applies_penalties():
    x = torch.tensor([[3.0, 2.0, 1.0]])
    cfg = SamplingConfig(temperature=0, repetition_penalty=2.0)
    assert sample(x, [[0]], cfg).tokens.item() == 1  # 3/2 = 1.5 < 2
    assert sample(x, [[2]], cfg).tokens.item() == 0
    cfg = SamplingConfig(temperature=0, no_repeat_ngram=2)
    assert sample(x, [[0, 0]], cfg).tokens.item() == 1  # (0, 0) exists: 0 after 0 is banned
    assert sample(x, [[2, 0, 2]], cfg).tokens.item() == 1  # (2, 0) exists and the suffix is 2
    assert sample(x, [[0, 1, 0]], cfg).tokens.item() == 0  # (0, 1) exists: only 1 is banned
    assert sample(x, [[1, 0, 2]], cfg).tokens.item() == 0  # suffix 2 never seen before: nothing banned
    cfg = SamplingConfig(temperature=0, presence_penalty=1.5)
    assert sample(x, [[0]], cfg).tokens.item() == 1  # 3 − 1.5 < 2
    cfg = SamplingConfig(temperature=0, frequency_penalty=0.6)
    assert sample(x, [[0]], cfg).tokens.item() == 0  # 3 − 0.6 > 2
    assert sample(x, [[0, 0]], cfg).tokens.item() == 1  # 3 − 1.2 < 2


def test_seeded_sampling_is_deterministic():
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    cfg = SamplingConfig(temperature=1.3, top_k=20, top_p=0.9, seed=7)
    draws = [torch.stack([sample(x, None, cfg, gen).tokens for _ in range(20)])
             for gen in (make_generator(7), make_generator(7))]
    assert torch.equal(draws[0], draws[1])
    g8 = make_generator(8)
    other = torch.stack([sample(x, None, cfg, g8).tokens for _ in range(20)])
    assert not torch.equal(draws[0], other)


def test_sampling_respects_filters_and_distribution():
    V = 6
    x = log_probs(0.4, 0.3, 0.15, 0.1, 0.04, 0.01).repeat(4000, 1)
    gen = make_generator(0)
    s = sample(x, None, SamplingConfig(temperature=1.0, top_k=3), gen)
    assert set(s.tokens.tolist()) <= {0, 1, 2}
    freq = torch.bincount(s.tokens, minlength=V).float() / len(s.tokens)
    want = torch.tensor([0.4, 0.3, 0.15, 0, 0, 0]) / 0.85
    assert (freq - want).abs().max() < 0.03, freq
    # Logprobs are the model's, not the truncated distribution's.
    assert torch.allclose(s.logprobs[s.tokens == 0], torch.tensor(math.log(0.4)), atol=1e-5)


def test_packed_sample_matches_sample():
    """The graph-capturable sampler: greedy picks exactly what ``sample`` picks; with Exp(1) noise its draws follow
    the filtered distribution (the exponential race); log-probs and entropies are the model's, as ``sample``'s."""
    V = 6
    x = log_probs(0.4, 0.3, 0.15, 0.1, 0.04, 0.01).repeat(4000, 1) + 0.01 * torch.randn(4000, V)
    greedy = SamplingConfig(temperature=0.0)
    want = sample(x, None, greedy)
    got = packed_sample(x, None, greedy)
    assert got.shape == (3, 4000) and got.dtype == torch.float64
    assert torch.equal(got[0].long(), want.tokens)
    assert torch.allclose(got[1], want.logprobs.double(), atol=1e-6)
    assert torch.allclose(got[2], want.entropy.double(), atol=1e-6)
    cfg = SamplingConfig(temperature=1.0, top_k=3)
    noise = torch.empty(4000, V).exponential_(generator=make_generator(0))
    tok = packed_sample(x, noise, cfg)[0].long()
    assert set(tok.tolist()) <= {0, 1, 2}
    freq = torch.bincount(tok, minlength=V).float() / len(tok)
    assert (freq - torch.tensor([0.4, 0.3, 0.15, 0, 0, 0]) / 0.85).abs().max() < 0.03, freq


def test_low_temperature_concentrates():
    x = log_probs(0.4, 0.35, 0.25).repeat(500, 1)
    s = sample(x, None, SamplingConfig(temperature=0.05), make_generator(0))
    assert (s.tokens == 0).float().mean() > 0.9


def test_all_banned_row_stays_finite():
    x = torch.tensor([[1.0, 2.0]])
    s = sample(x, [[0, 1, 0, 1]], SamplingConfig(temperature=1.0, no_repeat_ngram=1), make_generator(0))
    assert s.tokens.item() in (0, 1)


def test_config_validation_and_round_trip():
    cfg = SamplingConfig(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1, seed=3)
    assert SamplingConfig.from_json(cfg.to_json()) == cfg
    for bad in ({"temperature": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}, {"min_p": 2.0},
                {"repetition_penalty": 0.0}, {"no_repeat_ngram": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad)
    with pytest.raises(UserError, match="unknown"):
        SamplingConfig.from_dict({"temprature": 1.0})
