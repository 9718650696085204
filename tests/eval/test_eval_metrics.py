"""Scorers on hand-made cases (memlm/eval/metrics.py) and length parsing."""
from __future__ import annotations

import math

import pytest
import torch

from memlm.errors import UserError
from memlm.eval import metrics as M
from memlm.eval.runner import parse_lengths


def test_exact_match_takes_the_answer_span_only():
    assert M.exact_match(" 48213. Remember it.", "48213") == 1.0
    assert M.exact_match("\n 48213\nmore text", "48213") == 1.0
    assert M.exact_match(" 48213 and 1", "48213") == 0.0
    assert M.exact_match(" 4821", "48213") == 0.0
    assert M.exact_match(" Kitchen.", "kitchen") == 1.0  # case and final punctuation ignored
    assert M.exact_match(" 1, 2, 3", ["1", "2", "3"]) == 1.0
    assert M.exact_match(" 1, 3, 2", ["1", "2", "3"]) == 0.0
    # a UUID keeps its dashes; a decimal point inside a number is not a sentence end
    assert M.exact_match(" 0a1b-22. next", "0a1b-22") == 1.0
    assert M.answer_span(" 3.14 is pi. yes") == " 3.14 is pi"


def test_containment_is_ruler_style():
    assert M.contains_all("the values are 12, 99 and 7", ["12", "7", "55"]) == pytest.approx(2 / 3)
    assert M.contains_all("ABC", ["abc"]) == 1.0
    assert M.contains_all("", ["x"]) == 0.0
    assert M.contains_any("none here", ["x", "here"]) == 1.0
    assert M.contains_any("none", ["x", "y"]) == 0.0


def test_rank_score_strict_wins_ties_share_and_chance():
    assert M.rank_score([-1.0, -2.0, -3.0], 0) == 1.0
    assert M.rank_score([-2.0, -1.0, -3.0], 0) == 0.0
    assert M.rank_score([-1.0, -1.0, -3.0], 0) == 0.5
    assert M.rank_score([-1.0, -1.0, -1.0, -1.0], 2) == 0.25  # an uninformed model sits exactly at chance
    assert M.rank_of([-1.0, -1.0, -3.0], 1) == 2
    assert M.rank_of([-0.5, -1.0, -3.0], 0) == 1


def test_degeneration_statistics_on_hand_made_sequences():
    seq = list("abcabcabc")
    assert M.distinct_n(seq, 1) == pytest.approx(3 / 9)
    assert M.distinct_n(seq, 3) == pytest.approx(3 / 7)
    assert M.repeated_ngram_rate(seq, 3) == pytest.approx(4 / 7)  # abc bca cab new, then 4 repeats
    assert M.repeated_ngram_rate(list("abcdef"), 2) == 0.0
    assert M.longest_run(list("abbbbcdd")) == 4
    assert M.longest_run([]) == 0
    assert M.longest_repeat_loop(list("xyzabababab")) == 8  # "ab" four times
    assert M.longest_repeat_loop(list("abcab")) == 0  # a unit never fully repeated
    assert M.longest_repeat_loop(["the", "the", "the"]) == 3
    assert math.isnan(M.distinct_n([1], 2))
    d = M.degeneration([5, 5, 5, 5])
    assert d["distinct_1"] == 0.25 and d["longest_run"] == 4.0 and d["rep_1"] == 0.75
    assert M.corpus_distinct_n([[1, 2, 3], [1, 2, 3]], 2) == pytest.approx(2 / 4)
    assert math.isnan(M.mean([])) and M.mean([1.0, float("nan"), 3.0]) == 2.0


def test_perplexity_buckets_and_token_nll():
    edges = M.bucket_edges(100)
    assert edges[:4] == [0, 1, 2, 4] and edges[-1] >= 100 and edges[-2] < 100
    nll = torch.arange(10, dtype=torch.float32)
    sums = M.bucket_sums(nll, [0, 1, 2, 4, 8, 16])
    assert sums == [(0.0, 1), (1.0, 1), (5.0, 2), (22.0, 4), (17.0, 2)]
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    got = M.token_nll(logits, torch.tensor([1, 0]))
    assert torch.allclose(got, torch.tensor([-math.log(0.75), math.log(2.0)]), atol=1e-6)
    assert M.ppl(0.0) == 1.0 and math.isfinite(M.ppl(1e6))


def test_parse_lengths():
    assert parse_lengths(["0.5x", "1x", "2x", "300", "1k,4x"], 256) == [128, 256, 300, 512, 1024]
    assert parse_lengths(["0"], 256, minimum=0) == [0]
    with pytest.raises(UserError):
        parse_lengths(["0"], 256)
    with pytest.raises(UserError):
        parse_lengths(["lots"], 256)


def test_answer_span_ends_at_a_sentence_start_without_space():
    assert M.exact_match(" 38086.LAURENCE said", "38086") == 1.0
