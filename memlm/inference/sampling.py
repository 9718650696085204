"""Sampling: next-token logits → tokens, vectorised over the batch.

Notation: B batch rows, V vocabulary, t history length, n n-gram size, k top-k, p nucleus mass, τ temperature,
c_v how often token v occurs in a row's history.

Order of operations (each a small pure function on ``[B, V]`` logits, so each can be tested alone):

1. penalties on the raw logits, from the row's history: repetition (CTRL: a seen token's positive logit is divided
   by the penalty, a negative one multiplied), frequency and presence (OpenAI: ``l_v − c_v·f − [c_v > 0]·r``),
   no-repeat n-gram (ban every token that would complete an n-gram already in the history);
2. τ = 0: argmax (greedy); otherwise divide by τ, then top-k, top-p, min-p, and draw from the softmax.

``sample`` also returns, for the chosen token, its log-probability and the entropy of the distribution, both under
the *model's* distribution (raw logits, τ = 1, no filters): the log-prob is what an API reports, and −log-prob
(the surprise) against the entropy is what a surprise-targeting sampler steers by.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from memlm.config.base import Config
from memlm.ops import dispatch
from memlm.ops.sample_kernel import packed_sample_triton  # also registers op "packed_sample"

NEG_INF = float("-inf")


@dataclass(kw_only=True)
class SamplingConfig(Config):
    """How to pick tokens. Every filter is off at its default; temperature 0 means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off; else keep the k most likely tokens (ties at the k-th value kept)
    top_p: float = 1.0  # keep the smallest top set whose mass reaches p (the token that crosses p is kept)
    min_p: float = 0.0  # keep tokens with probability ≥ min_p · (largest probability)
    repetition_penalty: float = 1.0  # CTRL-style; 1: off
    frequency_penalty: float = 0.0  # OpenAI-style; subtract c_v · f
    presence_penalty: float = 0.0  # OpenAI-style; subtract r once a token occurred
    no_repeat_ngram: int = 0  # 0: off; n: never complete an n-gram already in the history
    penalize_prompt: bool = False  # whether the prompt's tokens count as history for the penalties
    seed: int | None = None  # None: torch's global RNG

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be ≥ 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be ≥ 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1]")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be > 0 (1 = off)")
        if self.no_repeat_ngram < 0:
            raise ValueError(f"no_repeat_ngram={self.no_repeat_ngram!r} must be ≥ 0 (0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_history(self) -> bool:
        return (self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0
                or self.no_repeat_ngram > 0)


class Sampled(NamedTuple):
    """tokens [B]; logprobs [B] (log p of the chosen token under the model); entropy [B] (nats, model's)."""

    tokens: Tensor
    logprobs: Tensor
    entropy: Tensor


# ------------------------------------------------------------------------------------------------ history


def as_history(history: Tensor | Sequence[Sequence[int]] | None, mask: Tensor | None, batch: int,
               device: torch.device) -> tuple[Tensor, Tensor]:
    """Normalise a history to a right-aligned ``(ids [B, t], valid [B, t])`` pair.

    ``history`` is a LongTensor ``[B, t]`` (padding marked False in ``mask`` [B, t]) or a list of B lists.
    Right-aligned means each row's valid tokens are its last ones, in order, so "the last n−1 tokens" is a slice.
    """
    if history is None:
        z = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return z, z.bool()
    if not isinstance(history, Tensor):
        rows = [list(map(int, r)) for r in history]
        if len(rows) != batch:
            raise ValueError(f"history has {len(rows)} rows, logits have {batch}")
        t = max((len(r) for r in rows), default=0)
        ids = torch.zeros(batch, t, dtype=torch.long)
        valid = torch.zeros(batch, t, dtype=torch.bool)
        for b, r in enumerate(rows):
            if r:
                ids[b, t - len(r):] = torch.tensor(r)
                valid[b, t - len(r):] = True
        return ids.to(device), valid.to(device)
    if history.dim() != 2 or history.shape[0] != batch:
        raise ValueError(f"history must be [B={batch}, t], got {tuple(history.shape)}")
    ids = history.to(device=device, dtype=torch.long)
    if mask is None:
        return ids, torch.ones_like(ids, dtype=torch.bool)
    valid = mask.to(device=device, dtype=torch.bool)
    # A stable sort of the 0/1 mask moves padding to the front and keeps the valid tokens in their order.
    order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices
    return ids.gather(1, order), valid.gather(1, order)


def token_counts(ids: Tensor, valid: Tensor, vocab: int) -> Tensor:
    """c [B, V]: occurrences of each token among the valid history entries."""
    counts = torch.zeros(ids.shape[0], vocab, dtype=torch.float32, device=ids.device)
    inside = valid & (ids >= 0) & (ids < vocab)  # padding, or ids the sampler never offers, count for nothing
    return counts.scatter_add_(1, ids.clamp(0, vocab - 1), inside.to(torch.float32))


# ------------------------------------------------------------------------------------------------ filters


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL penalty: for seen tokens (BoolTensor [B, V]) divide positive logits by ``penalty``, multiply negative ones."""
    if penalty == 1:
        return logits
    pen = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, pen, logits)


def apply_frequency_presence_penalty(logits: Tensor, counts: Tensor, frequency: float, presence: float) -> Tensor:
    """OpenAI penalties: ``l_v − c_v · frequency − [c_v > 0] · presence`` with counts c [B, V]."""
    if frequency == 0 and presence == 0:
        return logits
    return logits - counts.to(logits.dtype) * frequency - (counts > 0).to(logits.dtype) * presence


def no_repeat_ngram_ban(ids: Tensor, valid: Tensor, n: int, vocab: int) -> Tensor:
    """BoolTensor [B, V]: tokens that would complete an n-gram already present in the (right-aligned) history.

    The current (n−1)-token suffix is compared with every earlier window of n−1 valid tokens; the token that
    followed each match is banned. With n = 1 every token already seen is banned.
    """
    B, t = ids.shape
    if n <= 0 or t < n:
        return torch.zeros(B, vocab, dtype=torch.bool, device=ids.device)
    win = ids.unfold(1, n, 1)  # [B, t−n+1, n]: every n-gram in the history
    win_ok = valid.unfold(1, n, 1).all(-1)
    if n == 1:
        hit = win_ok
    else:
        suffix, suffix_ok = ids[:, t - n + 1:], valid[:, t - n + 1:].all(-1)
        hit = (win[..., :-1] == suffix[:, None, :]).all(-1) & win_ok & suffix_ok[:, None]
    nxt = win[..., -1]
    hit = hit & (nxt >= 0) & (nxt < vocab)
    nxt = nxt.clamp(0, vocab - 1)
    # A token may follow several windows, matching or not: count the matches rather than overwrite.
    hits = torch.zeros(B, vocab, dtype=torch.int32, device=ids.device).scatter_add_(1, nxt, hit.to(torch.int32))
    return hits > 0


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (ties with the k-th value are kept too); others become −inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus: keep the most likely tokens until their mass reaches p, *including* the token that crosses p.

    A token is dropped when the mass of the tokens strictly more likely than it already reaches p.
    """
    if p >= 1:
        return logits
    sorted_l, order = logits.sort(dim=-1, descending=True)
    probs = sorted_l.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the most likely token always survives
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Keep tokens with p_v ≥ min_p · max_v p_v, i.e. l_v − max l ≥ log(min_p) (no softmax needed)."""
    if min_p <= 0:
        return logits
    top = logits.max(dim=-1, keepdim=True).values
    return logits.masked_fill(logits - top < math.log(min_p), NEG_INF)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded generator on ``device`` (None when seed is None: use torch's global RNG)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


# ------------------------------------------------------------------------------------------------ sample


def penalize(logits: Tensor, ids: Tensor, valid: Tensor, cfg: SamplingConfig) -> Tensor:
    """Apply every history-based penalty of ``cfg`` to float logits [B, V] given a right-aligned history."""
    if ids.shape[1] == 0 or not cfg.uses_history:
        return logits
    V = logits.shape[-1]
    counts = token_counts(ids, valid, V)
    x = apply_repetition_penalty(logits, counts > 0, cfg.repetition_penalty)
    x = apply_frequency_presence_penalty(x, counts, cfg.frequency_penalty, cfg.presence_penalty)
    if cfg.no_repeat_ngram > 0:
        ban = no_repeat_ngram_ban(ids, valid, cfg.no_repeat_ngram, V)
        ban &= ~ban.all(-1, keepdim=True)  # a row with every token banned keeps its logits rather than NaN
        x = x.masked_fill(ban, NEG_INF)
    return x


def sample(logits: Tensor, history: Tensor | Sequence[Sequence[int]] | None = None,
           cfg: SamplingConfig | None = None, generator: torch.Generator | None = None, *,
           history_mask: Tensor | None = None) -> Sampled:
    """Pick one token per row from logits [B, V].

    history: [B, t] LongTensor (with ``history_mask`` [B, t], False = padding) or a list of B id lists; the tokens
    the penalties look at. Returns ``Sampled(tokens [B], logprobs [B], entropy [B])``.
    """
    cfg = cfg or SamplingConfig()
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    raw = logits.float()
    logp = raw.log_softmax(-1)
    x = raw
    if cfg.uses_history and history is not None:
        ids, valid = as_history(history, history_mask, raw.shape[0], raw.device)
        x = penalize(x, ids, valid, cfg)
    if cfg.greedy:
        tokens = x.argmax(-1)
    else:
        tokens = torch.multinomial(_filtered_probs(x, cfg), 1, generator=generator).squeeze(-1)
    return Sampled(tokens, *_chosen_and_entropy(logp, tokens))


def _filtered_probs(x: Tensor, cfg: SamplingConfig) -> Tensor:
    """The distribution a draw comes from: logits [B, V] / τ, then top-k, top-p, min-p, softmax."""
    return min_p_filter(top_p_filter(top_k_filter(x / cfg.temperature, cfg.top_k), cfg.top_p), cfg.min_p).softmax(-1)


def _chosen_and_entropy(logp: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """The chosen tokens' log-probabilities and the entropies [B], under the model's distribution logp [B, V]."""
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
    entropy = -torch.special.xlogy(logp.exp(), logp.exp()).sum(-1)  # xlogy: 0·log 0 = 0 for masked-out tokens
    return chosen, entropy


def packed_sample(logits: Tensor, noise: Tensor | None, cfg: SamplingConfig) -> Tensor:
    """``sample`` without history penalties, as one graph-capturable function: no host reads, no RNG of its own.

    logits [B, V]; noise [B, V] i.i.d. Exp(1) draws (None when greedy). A draw is argmax_v p_v / E_v, which picks v with
    probability p_v (the exponential race), so the random part can be filled in before a CUDA-graph replay with the
    caller's generator. Returns [3, B] float64: the token ids, their log-probabilities and the entropies (as
    ``sample``), so that one device→host read delivers a step's results. Without top-k / top-p / min-p this is op
    "packed_sample" (memlm.ops.sample_kernel: one pass of two Triton kernels on CUDA, the same computation in torch
    elsewhere).
    """
    if unfiltered(cfg):
        return dispatch.call("packed_sample", logits, noise, cfg.temperature)
    raw = logits.float()
    logp = raw.log_softmax(-1)
    if cfg.greedy or noise is None:
        tokens = raw.argmax(-1)
    else:
        tokens = (_filtered_probs(raw, cfg) / noise.clamp_min(1e-30)).argmax(-1)
    chosen, entropy = _chosen_and_entropy(logp, tokens)
    return torch.stack([tokens.double(), chosen.double(), entropy.double()])


def unfiltered(cfg: SamplingConfig) -> bool:
    """No top-k, top-p or min-p: the draw is from softmax(logits / τ) itself."""
    return cfg.top_k == 0 and cfg.top_p == 1 and cfg.min_p == 0


def fused_sampler(cfg: SamplingConfig, device: torch.device | str) -> bool:
    """Whether ``packed_sample`` with cfg runs the Triton kernels on device (dispatch's choice, forced names
    included, for a one-logit probe)."""
    if not unfiltered(cfg):
        return False
    probe = torch.zeros(1, 1, device=device)
    return dispatch.get("packed_sample", args=(probe, None, cfg.temperature)) is packed_sample_triton


__all__ = [
    "Sampled",
    "SamplingConfig",
    "apply_frequency_presence_penalty",
    "apply_repetition_penalty",
    "as_history",
    "fused_sampler",
    "make_generator",
    "min_p_filter",
    "no_repeat_ngram_ban",
    "packed_sample",
    "penalize",
    "sample",
    "token_counts",
    "top_k_filter",
    "top_p_filter",
    "unfiltered",
]
