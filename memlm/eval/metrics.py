"""Scoring functions shared by every evaluation task: answer matching, likelihood ranking, perplexity buckets,
degeneration statistics. Pure Python / torch, no model in sight — so each one is checked on hand-made cases.

Notation: T tokens, n n-gram order, k number of candidates tied at the top score, V vocabulary size.
"""
from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

_WS = re.compile(r"\s+")
_EDGE_PUNCT = " \t\n\"'`.,;:!?()[]{}"


# ---------------------------------------------------------------------------------------------- answers


def normalize_answer(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding quotes and punctuation removed."""
    return _WS.sub(" ", text.strip().lower()).strip(_EDGE_PUNCT)


def first_line(text: str) -> str:
    """Text up to the first newline (models keep talking after it)."""
    return text.lstrip("\n").split("\n", 1)[0]


_SENT_END = re.compile(r"\.(?=\s|$|[A-Z\"'])")


def answer_span(text: str) -> str:
    """The generated answer proper: the first line, cut at the first sentence end ("1234. Then…" → "1234")."""
    return _SENT_END.split(first_line(text), maxsplit=1)[0]


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the answer span (first line up to the first sentence end), normalised, equals the answer (or all
    answers joined by ', ')."""
    if isinstance(answers, str):
        answers = [answers]
    pred = normalize_answer(answer_span(prediction))
    want = normalize_answer(", ".join(answers))
    return float(pred == want or (len(answers) == 1 and pred == normalize_answer(answers[0])))


def contains_all(prediction: str, answers: str | Sequence[str]) -> float:
    """RULER-style containment: the fraction of expected answers found (case-insensitive) anywhere in the output."""
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        return 0.0
    low = prediction.lower()
    return sum(a.strip().lower() in low for a in answers) / len(answers)


def contains_any(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when at least one expected answer occurs in the output (RULER's part-match)."""
    if isinstance(answers, str):
        answers = [answers]
    low = prediction.lower()
    return float(any(a.strip().lower() in low for a in answers))


def rank_score(scores: Sequence[float], label: int) -> float:
    """Credit for ranking the true candidate ``label`` first: 1 when it scores strictly highest, 1/k when it ties
    with k−1 others at the top, 0 otherwise. Tie credit keeps an uninformed model exactly at chance 1/len(scores)."""
    best = max(scores)
    if scores[label] < best:
        return 0.0
    return 1.0 / sum(1 for s in scores if s == best)


def rank_of(scores: Sequence[float], label: int) -> int:
    """1-based rank of the true candidate (ties count against it: worst position among equals)."""
    return sum(1 for s in scores if s >= scores[label])


# ------------------------------------------------------------------------------------------- perplexity


def ppl(nll: float) -> float:
    """Perplexity from a mean negative log-likelihood in nats (capped so huge losses stay finite)."""
    return math.exp(min(nll, 700.0))


def bucket_edges(max_len: int, first: int = 1) -> list[int]:
    """Power-of-two position buckets [0, first), [first, 2·first), … covering positions < max_len."""
    edges = [0, first]
    while edges[-1] < max_len:
        edges.append(edges[-1] * 2)
    edges[-1] = max(edges[-1], max_len)
    return edges


def bucket_sums(nll: Tensor, edges: Sequence[int]) -> list[tuple[float, int]]:
    """nll [T] (target position t = token t+1 of the document) → (sum, count) per bucket [edges[i], edges[i+1])."""
    out = []
    T = nll.shape[0]
    for a, b in itertools.pairwise(edges):
        if a >= T:
            out.append((0.0, 0))
            continue
        seg = nll[a:min(b, T)]
        out.append((float(seg.double().sum()), int(seg.numel())))
    return out


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """logits [..., V] float, targets [...] long → −log p(target) [...] in float32."""
    return -torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------------------------------ degeneration


def ngrams(seq: Sequence, n: int) -> list[tuple]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seq: Sequence, n: int) -> float:
    """Unique n-grams / all n-grams of one sequence (1.0: never repeats; NaN when shorter than n)."""
    grams = ngrams(seq, n)
    return len(set(grams)) / len(grams) if grams else float("nan")


def repeated_ngram_rate(seq: Sequence, n: int) -> float:
    """Fraction of n-gram positions whose n-gram already occurred earlier in the sequence (0: no repetition)."""
    grams = ngrams(seq, n)
    if not grams:
        return float("nan")
    seen: set[tuple] = set()
    rep = 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    return rep / len(grams)


def longest_run(seq: Sequence) -> int:
    """Length of the longest run of one item repeated back to back (a token or word stuck in a loop)."""
    best = cur = 0
    prev = object()
    for x in seq:
        cur = cur + 1 if x == prev else 1
        prev = x
        best = max(best, cur)
    return best


def longest_repeat_loop(seq: Sequence, max_period: int = 16) -> int:
    """Longest span (in items) that is a periodic repetition of a unit of length p ≤ max_period, counted once the
    unit has appeared twice — "the the the" (p=1) or "I said I said I said" (p=2) loops."""
    best = 0
    n = len(seq)
    for p in range(1, max_period + 1):
        run = 0
        for i in range(p, n):
            run = run + 1 if seq[i] == seq[i - p] else 0
            if run >= p:  # the unit has been repeated in full at least once
                best = max(best, run + p)
    return best


def degeneration(seq: Sequence, *, orders: Iterable[int] = (1, 2, 3, 4)) -> dict[str, float]:
    """distinct-n, repeated n-gram rate, longest run and longest loop of one generated sequence (tokens or words)."""
    out: dict[str, float] = {}
    for n in orders:
        out[f"distinct_{n}"] = distinct_n(seq, n)
        out[f"rep_{n}"] = repeated_ngram_rate(seq, n)
    out["longest_run"] = float(longest_run(seq))
    out["longest_loop"] = float(longest_repeat_loop(seq))
    return out


def corpus_distinct_n(seqs: Iterable[Sequence], n: int) -> float:
    """Distinct-n over a set of samples (unique n-grams across all / all n-grams): low when samples echo each other."""
    c: Counter = Counter()
    for s in seqs:
        c.update(ngrams(s, n))
    total = sum(c.values())
    return len(c) / total if total else float("nan")


def mean(xs: Iterable[float]) -> float:
    """Mean of the finite values (NaN when there are none)."""
    vals = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return sum(vals) / len(vals) if vals else float("nan")


__all__ = ["answer_span", "bucket_edges", "bucket_sums", "contains_all", "contains_any", "corpus_distinct_n", "degeneration",
           "distinct_n", "exact_match", "first_line", "longest_repeat_loop", "longest_run", "mean", "ngrams",
           "normalize_answer", "ppl", "rank_of", "rank_score", "repeated_ngram_rate", "token_nll"]
