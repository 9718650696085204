"""Learning-rate schedules as pure functions of the step (resume needs nothing but the step counter).

Notation: s step (0-based: the number of optimizer steps already taken), W warmup steps, N total steps,
η base LR, η_min = η · min_lr_ratio, D decay steps of WSD = round(decay_frac · N).

  warmup (all schedules), s < W:   η (s + 1) / W        (the first step already moves; s = W − 1 gives η)
  constant:                        η
  cosine:                          η_min + (η − η_min) · ½ (1 + cos(π p)),  p = (s − W) / (N − W) clipped to [0, 1]
  wsd (warmup–stable–decay):       η until s₀ = max(W, N − D), then down to η_min at s = N,
                                   p = (s − s₀) / (N − s₀);  linear: η − (η − η_min) p,
                                   "1-sqrt": η_min + (η − η_min)(1 − √p)
Steps past N stay at the final value (η_min, or η for constant).
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["SCHEDULES", "lr_at", "apply_lr"]

SCHEDULES = ("cosine", "constant", "wsd")
WSD_DECAYS = ("linear", "1-sqrt")


def lr_at(step: int, *, base_lr: float, warmup: int, total: int, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_frac: float = 0.2, wsd_decay: str = "linear") -> float:
    """Learning rate for optimizer step `step` (0-based) under `schedule` (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if wsd_decay not in WSD_DECAYS:
        raise ValueError(f"wsd_decay {wsd_decay!r} is not one of {', '.join(WSD_DECAYS)}")
    if step < 0 or warmup < 0 or total < 1:
        raise ValueError(f"need step >= 0, warmup >= 0, total >= 1; got step={step}, warmup={warmup}, total={total}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if not 0.0 < decay_frac <= 1.0:
        raise ValueError(f"decay_frac must be in (0, 1], got {decay_frac}")

    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    min_lr = base_lr * min_lr_ratio
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    start = max(warmup, total - round(decay_frac * total))
    if step < start:
        return base_lr
    progress = min(1.0, (step - start) / max(1, total - start))
    if wsd_decay == "linear":
        return base_lr - (base_lr - min_lr) * progress
    return min_lr + (base_lr - min_lr) * (1.0 - math.sqrt(progress))


def apply_lr(optimizer: Any, lr: float) -> None:
    """Set every parameter group's lr to lr × group["lr_scale"] (1 when absent).

    Works on a torch optimizer or anything with ``param_groups`` (memlm.train.optim.MultiOptimizer). A tensor
    lr (capturable / fused optimizers) is filled in place so compiled step functions keep seeing it.
    """
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value
