"""Tests for memlm.train.schedule: warmup, cosine endpoints, WSD shape, apply_lr.

Notation: s step, W warmup, N total, η base LR, η_min = η · min_lr_ratio.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memlm.train.schedule import apply_lr, lr_at

ETA, W, N = 1e-3, 10, 110


@pytest.mark.parametrize("schedule", ["cosine", "constant", "wsd"])
def test_warmup_linear(schedule: str) -> None:
    lrs = [lr_at(s, base_lr=ETA, warmup=W, total=N, schedule=schedule) for s in range(W)]
    assert lrs == pytest.approx([ETA * (s + 1) / W for s in range(W)])
    assert lrs[0] > 0  # the first step already moves
    diffs = [b - a for a, b in zip(lrs, lrs[1:])]
    assert diffs == pytest.approx([ETA / W] * (W - 1))  # constant increments: linear
    assert lr_at(W, base_lr=ETA, warmup=W, total=N, schedule=schedule) == pytest.approx(ETA)


def test_cosine_endpoints() -> None:
    f = lambda s: lr_at(s, base_lr=ETA, warmup=W, total=N, schedule="cosine", min_lr_ratio=0.1)  # noqa: E731
    assert f(W) == pytest.approx(ETA)
    assert f((W + N) // 2) == pytest.approx((ETA + 0.1 * ETA) / 2)  # half-way: mean of the endpoints
    assert f(N) == pytest.approx(0.1 * ETA) and f(10 * N) == pytest.approx(0.1 * ETA)
    p = 0.25  # a quarter of the way: η_min + (η − η_min)(1 + cos(π/4))/2
    assert f(W + int(p * (N - W))) == pytest.approx(0.1 * ETA + 0.9 * ETA * 0.5 * (1 + math.cos(math.pi * p)))
    values = [f(s) for s in range(W, N + 1)]
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert lr_at(N, base_lr=ETA, warmup=0, total=N, schedule="cosine", min_lr_ratio=0.0) == 0.0
    assert lr_at(0, base_lr=ETA, warmup=0, total=N, schedule="cosine") == pytest.approx(ETA)


def test_constant() -> None:
    assert [lr_at(s, base_lr=ETA, warmup=W, total=N, schedule="constant") for s in (W, N, 5 * N)] == [ETA] * 3


@pytest.mark.parametrize("decay", ["linear", "1-sqrt"])
def test_wsd_shape(decay: str) -> None:
    total, frac = 100, 0.2
    f = lambda s: lr_at(s, base_lr=ETA, warmup=W, total=total, schedule="wsd", min_lr_ratio=0.1,  # noqa: E731
                        decay_frac=frac, wsd_decay=decay)
    start = total - 20  # decay over the final 20 % of all steps
    assert all(f(s) == ETA for s in range(W, start + 1))  # stable plateau, decay begins after `start`
    assert f(start + 1) < ETA
    assert f(total) == pytest.approx(0.1 * ETA) and f(2 * total) == pytest.approx(0.1 * ETA)
    quarter = f(start + 5)  # progress 0.25
    expect = ETA - 0.9 * ETA * 0.25 if decay == "linear" else 0.1 * ETA + 0.9 * ETA * (1 - 0.5)
    assert quarter == pytest.approx(expect)
    values = [f(s) for s in range(start, total + 1)]
    assert all(b < a for a, b in zip(values, values[1:]))


def test_wsd_decay_longer_than_stable_starts_after_warmup() -> None:
    # decay_frac = 1 with a warmup: the decay starts right after warmup, never before it
    f = lambda s: lr_at(s, base_lr=ETA, warmup=W, total=N, schedule="wsd", decay_frac=1.0)  # noqa: E731
    assert f(W - 1) == pytest.approx(ETA) and f(W) == pytest.approx(ETA) and f(W + 1) < ETA


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, base_lr=ETA, warmup=0, total=10, schedule="linear")
    with pytest.raises(ValueError, match="wsd_decay"):
        lr_at(0, base_lr=ETA, warmup=0, total=10, schedule="wsd", wsd_decay="cos")
    with pytest.raises(ValueError):
        lr_at(-1, base_lr=ETA, warmup=0, total=10)
    with pytest.raises(ValueError):
        lr_at(0, base_lr=ETA, warmup=0, total=10, min_lr_ratio=1.5)
    with pytest.raises(ValueError):
        lr_at(0, base_lr=ETA, warmup=0, total=10, decay_frac=0.0)


def test_apply_lr() -> None:
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.AdamW([{"params": [a], "lr_scale": 0.1}, {"params": [b]}, {"params": [c], "lr_scale": 2.0}],
                            lr=1.0)
    apply_lr(opt, 3e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([3e-5, 3e-4, 6e-4])
    # a tensor lr is updated in place (compiled / capturable steps keep their reference)
    t = torch.tensor(1.0)
    opt2 = torch.optim.AdamW([{"params": [a], "lr_scale": 0.5}], lr=t)
    ref = opt2.param_groups[0]["lr"]
    apply_lr(opt2, 2e-3)
    assert opt2.param_groups[0]["lr"] is ref and ref.item() == pytest.approx(1e-3)
