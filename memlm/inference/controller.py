"""Surprise-targeting decoding controller — Oumnix's "neurochemistry", made real (SPEC.md, Oumnix).

Notation: V vocabulary, p_v the model's probability of token v (raw logits, τ = 1), s = −log p_x the surprise of
the chosen token x (nats), τ* the target surprise, e = s − τ* the error, μ the truncation level (nats), η its step,
T the sampling temperature, T₀ its base (and floor), η_T its step, s̄ / H̄ / c̄ exponential moving averages (factor
ρ) of surprise, entropy H = −Σ p log p and confidence max_v p_v, k the size of the kept set (the effective top-k),
θ the early-exit confidence threshold, θ₀ its base, β its gain.

A controller holds a few numbers (its state) that it updates after every token from what the model just did, and
from them sets the knobs of the next draw:

    keep    A = {v : −log p_v ≤ μ} ∪ {argmax p}            top-k  k = |A|   (Mirostat-v2 truncation)
    draw    x ~ softmax(logits / T) restricted to A
    observe s = −log p_x  (under the model, not the tempered draw);  e = s − τ*
    update  μ ← clamp(μ − η e, 0, max_v(−log p_v) + 1)
            T: e < 0 and A kept ~all the mass →  log T ← min(log T − η_T e, log T_max)
               e > 0                             →  log T ← max(log T − η_T e, log T₀)
            s̄, H̄, c̄ ← ρ · old + (1 − ρ) · new               (the "mood": what the last tokens were like)
            θ = clamp(θ₀ + β (s̄ − τ*), θ_min, θ_max)        (surprised → demand more confidence to exit early)

Both μ and log T are integral controllers, so the *mean* error is driven to zero wherever the target is reachable.
μ (Mirostat, Basu et al. 2021) lowers surprise: above the target the admissible set shrinks, below it grows. When
the set already holds (nearly) all the mass and the text is still less surprising than the target, only heat can help, so T
rises above T₀; it falls back to T₀ as soon as the text is too surprising. μ is capped just above the largest
surprise on offer (beyond that it changes nothing), so neither integrator winds up. Surprise is always measured
under the model's own distribution, so "how surprising the text is" keeps one meaning whatever T and A.

θ is the confidence an exit head must reach for dynamic depth to stop early. memlm has no early-exit heads yet,
so θ is computed, reported and saved but nothing reads it; it is exposed so that a model with exit heads can use it.

The state is a handful of floats (``state_dict`` / ``load_state_dict``): a session saves it in its header, so a
conversation keeps its "mood" across restarts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from memlm.config.base import Config
from memlm.inference.sampling import Sampled

__all__ = ["ControllerConfig", "SurpriseController"]


@dataclass(kw_only=True)
class ControllerConfig(Config):
    """Knobs of the surprise controller (see the module docstring for the update rules)."""

    target: float = 3.0  # τ*: surprise to hold, nats per token
    lr: float = 0.1  # η: step of the truncation level μ per token
    temp_lr: float = 0.05  # η_T: step of log T per token (0: fixed temperature)
    ema: float = 0.9  # ρ: smoothing of s̄, H̄, c̄
    temperature: float = 1.0  # T₀: base and lowest temperature
    max_temperature: float = 2.0
    exit_threshold: float = 0.9  # θ₀
    exit_gain: float = 0.05  # β
    min_exit_threshold: float = 0.5
    max_exit_threshold: float = 0.999
    max_top_k: int = 0  # 0: no cap on k; else k ≤ max_top_k

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target) and self.target > 0):
            raise ValueError(f"target={self.target!r} must be a positive number of nats")
        if not 0 < self.lr <= 5:
            raise ValueError(f"lr={self.lr!r} must be in (0, 5]")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema={self.ema!r} must be in [0, 1)")
        if not 0 < self.temperature <= self.max_temperature:
            raise ValueError(f"need 0 < temperature ≤ max_temperature, got {self.temperature}, {self.max_temperature}")
        if not 0 <= self.temp_lr <= 1:
            raise ValueError(f"temp_lr={self.temp_lr!r} must be in [0, 1]")
        if not 0 < self.min_exit_threshold <= self.exit_threshold <= self.max_exit_threshold <= 1:
            raise ValueError("need 0 < min_exit_threshold ≤ exit_threshold ≤ max_exit_threshold ≤ 1")
        if self.max_top_k < 0:
            raise ValueError(f"max_top_k={self.max_top_k!r} must be ≥ 0 (0 = no cap)")


@dataclass
class ControllerStep:
    """What one draw used and saw: the knobs (temperature, top_k, mu, exit_threshold) and the outcome."""

    token: int
    surprise: float
    entropy: float
    confidence: float
    temperature: float
    top_k: int
    mu: float
    exit_threshold: float


class SurpriseController:
    """Stateful sampler for ONE stream of tokens (a chat session). ``choose(logits [1, V])`` draws a token."""

    MU_MAX = 50.0  # nats; far above log V for any real vocabulary, only guards against runaway
    SLACK_MASS = 1e-3  # probability mass the truncation may drop and still count as "keeping everything"

    def __init__(self, config: ControllerConfig | None = None) -> None:
        self.config = config or ControllerConfig()
        self.reset()

    # ----------------------------------------------------------------------------------------- state
    def reset(self) -> None:
        c = self.config
        self.mu = 2.0 * c.target  # Mirostat's start: twice the target admits most of the mass at first
        self.log_temp = math.log(c.temperature)
        self.surprise_ema = c.target  # neutral mood: no error yet, so θ = θ₀
        self.entropy_ema = c.target
        self.confidence_ema = 0.0
        self.steps = 0
        self.last_top_k = 0

    @property
    def temperature(self) -> float:
        return math.exp(self.log_temp)

    @property
    def exit_threshold(self) -> float:
        c = self.config
        th = c.exit_threshold + c.exit_gain * (self.surprise_ema - c.target)
        return min(max(th, c.min_exit_threshold), c.max_exit_threshold)

    def state_dict(self) -> dict:
        """JSON-ready: the config and the running state (a session stores this in its header)."""
        return {"config": self.config.to_dict(), "mu": self.mu, "log_temp": self.log_temp,
                "surprise_ema": self.surprise_ema, "entropy_ema": self.entropy_ema,
                "confidence_ema": self.confidence_ema, "steps": self.steps, "last_top_k": self.last_top_k}

    @classmethod
    def from_state_dict(cls, d: dict) -> SurpriseController:
        ctl = cls(ControllerConfig.from_dict(d["config"], where="controller"))
        ctl.load_state_dict(d)
        return ctl

    def load_state_dict(self, d: dict) -> None:
        for name in ("mu", "log_temp", "surprise_ema", "entropy_ema", "confidence_ema"):
            v = float(d[name])
            if not math.isfinite(v):
                raise ValueError(f"controller state {name}={v} is not finite")
            setattr(self, name, v)
        c = self.config
        self.mu = min(max(self.mu, 0.0), self.MU_MAX)
        self.log_temp = min(max(self.log_temp, math.log(c.temperature)), math.log(c.max_temperature))
        self.steps = int(d.get("steps", 0))
        self.last_top_k = int(d.get("last_top_k", 0))

    def snapshot(self) -> dict:
        """The knobs and mood as they are now (for stats panels)."""
        return {"target": self.config.target, "mu": round(self.mu, 4), "temperature": round(self.temperature, 4),
                "top_k": self.last_top_k, "exit_threshold": round(self.exit_threshold, 4),
                "surprise_ema": round(self.surprise_ema, 4), "entropy_ema": round(self.entropy_ema, 4),
                "confidence_ema": round(self.confidence_ema, 4), "steps": self.steps}

    # ------------------------------------------------------------------------------------------ draw
    def choose(self, logits: Tensor, generator: torch.Generator | None = None, *,
               filtered: Tensor | None = None) -> tuple[Sampled, ControllerStep]:
        """Draw one token from logits [1, V] (the model's, raw) and update the state.

        ``filtered`` [1, V]: the logits after history penalties (what the draw uses; −inf bans a token); the
        surprise is still measured under ``logits``. Returns (Sampled(tokens [1], logprobs [1], entropy [1]), step).
        """
        if logits.dim() != 2 or logits.shape[0] != 1:
            raise ValueError(f"the controller drives one stream: logits must be [1, V], got {tuple(logits.shape)}")
        c = self.config
        raw = logits.float()
        logp = raw.log_softmax(-1)
        p = logp.exp()
        x = raw if filtered is None else filtered.float()
        allowed = (-logp <= self.mu) & torch.isfinite(x)
        best = x.argmax(-1, keepdim=True)
        allowed.scatter_(-1, best, True)  # never an empty set: the best admissible token always survives
        if c.max_top_k:
            kth = x.masked_fill(~allowed, float("-inf")).topk(min(c.max_top_k, x.shape[-1]), -1).values[..., -1:]
            allowed &= x >= kth
        temp = self.temperature
        z = (x / temp).masked_fill(~allowed, float("-inf"))
        token = torch.multinomial(z.softmax(-1), 1, generator=generator).squeeze(-1)
        lp = logp.gather(-1, token[:, None]).squeeze(-1)
        ent = -torch.special.xlogy(p, p).sum(-1)
        s, h, conf = -float(lp), float(ent), float(p.max())
        k = int(allowed.sum())
        finite = torch.isfinite(x)
        # Slack: what the truncation dropped is negligible, so lowering μ further is all it could still do.
        slack = float(p.masked_fill(allowed | ~finite, 0.0).sum()) < self.SLACK_MASS
        top = float((-logp).masked_fill(~finite, float("-inf")).max())
        step = ControllerStep(int(token), s, h, conf, temp, k, self.mu, self.exit_threshold)
        self._update(s, h, conf, k, slack, top)
        return Sampled(token, lp, ent), step

    def _update(self, s: float, h: float, conf: float, k: int, slack: bool, top: float) -> None:
        c = self.config
        e = s - c.target
        self.mu = min(max(self.mu - c.lr * e, 0.0), top + 1.0, self.MU_MAX)
        if e < 0 and slack:
            self.log_temp = min(self.log_temp - c.temp_lr * e, math.log(c.max_temperature))
        elif e > 0:
            self.log_temp = max(self.log_temp - c.temp_lr * e, math.log(c.temperature))
        r = c.ema
        self.surprise_ema = r * self.surprise_ema + (1 - r) * s
        self.entropy_ema = r * self.entropy_ema + (1 - r) * h
        self.confidence_ema = r * self.confidence_ema + (1 - r) * conf
        self.steps += 1
        self.last_top_k = k
