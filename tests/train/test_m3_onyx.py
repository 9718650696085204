"""Regression: Onyx (HOPE mixer, CMS feed-forward) trained with M3 at onyx-11m's optimizer settings must learn.

The defect: M3's matrix step was the literal SPEC rule −η (NS5(M1) + α NS5(M2)) / (√V + ε), whose entries move by
≈ η / (|g_ij| √max(r, c)); with onyx-11m's lr 1e-3 and clipped gradients the first optimizer step threw hidden
matrices to norms of 1e4, the network died (uniform logits: loss exactly ln V, zero gradient) and then went NaN.

Notation: V vocabulary size, B rows, T tokens per row.
"""
from __future__ import annotations

import math

import pytest
import torch

import memlm
from memlm.data.packing import Batch
from memlm.data.tokenizer import ByteTokenizer
from memlm.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def onyx_debug_with_onyx_11m_optimizer(matrix_rule: str | None = None):
    """onyx-debug's model with onyx-11m's optimizer, LR, weight decay, betas, ε and clipping (constant LR)."""
    cfg, big = memlm.preset("onyx-debug"), memlm.preset("onyx-11m").train
    assert big.optimizer == "m3"
    opts = dict(big.optimizer_options) | ({"matrix_rule": matrix_rule} if matrix_rule else {})
    cfg.train = cfg.train.replace(
        optimizer=big.optimizer, lr=big.lr, weight_decay=big.weight_decay, betas=big.betas, eps=big.eps,
        clip=big.clip, optimizer_options=opts, seq_len=32, batch_size=4, steps=20, warmup=0, schedule="constant",
        eval_every=0, sample_every=0, save_every=0, log_every=1, tensorboard=False, device="cpu", dtype="float32")
    return cfg


def train_repeated_batch(tmp_path, cfg, steps: int) -> tuple[list[float], Trainer, Batch]:
    torch.manual_seed(0)
    tr = Trainer(cfg, out_dir=tmp_path / "run", data=iter([]), tokenizer=ByteTokenizer(), log=lambda s: None)
    V = cfg.model.vocab_size
    x = torch.randint(0, V, (4, 33), generator=torch.Generator().manual_seed(0))
    batch = Batch(x[:, :-1].clone(), x[:, 1:].clone(), torch.zeros(4, 32, dtype=torch.bool))
    return [tr.train_step(batch)["loss"] for _ in range(steps)], tr, batch


def test_onyx_learns_with_m3_at_onyx_11m_settings(tmp_path):
    cfg = onyx_debug_with_onyx_11m_optimizer()
    V = cfg.model.vocab_size
    losses, tr, batch = train_repeated_batch(tmp_path, cfg, 24)
    assert all(math.isfinite(v) for v in losses), losses
    # a repeated batch is memorisable: well below ln V (the dead network sat exactly at ln V = 5.572)
    assert losses[-1] < math.log(V) - 1.2, losses  # (24 steps: M3 ≈ 4.0, AdamW at the same lr ≈ 3.7)
    assert losses[-1] < losses[0] - 1.2, losses
    with torch.no_grad():
        logits = tr.model(batch.input_ids)
        logits = logits[0] if isinstance(logits, tuple) else logits
    assert torch.isfinite(logits).all()
    assert logits.float().std(dim=-1).min() > 0.1  # no position has (near-)uniform logits
    for n, p in tr.model.named_parameters():  # nothing was thrown far from its initial scale
        assert torch.isfinite(p).all() and p.abs().max() < 10, n


def test_literal_spec_rule_still_dies_at_onyx_11m_settings(tmp_path):
    """The reference rule stays available (matrix_rule="spec") and shows the defect this file guards against."""
    cfg = onyx_debug_with_onyx_11m_optimizer("spec")
    losses, _, _ = train_repeated_batch(tmp_path, cfg, 4)
    assert not all(math.isfinite(v) for v in losses) or min(losses[1:]) > math.log(cfg.model.vocab_size) - 0.3
