"""Test helper: an induction "oracle" with the MemoryLM interface whose memory is its token history.

Notation: B batch, T new tokens, L tokens in the history, V vocabulary.

At every position it finds the most recent earlier position whose preceding tokens match the longest suffix of the
stream (within the current document) and predicts the token that followed there — a perfect in-context copier.
So it retrieves any needle that is *in its memory* and nothing that is not, and its state (the history ids) tells
a test exactly what the memory had seen when a score was computed. A token loop: this is a test fixture.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from memlm.config.model import ModelConfig
from memlm.layers.attention import AttentionConfig
from memlm.layers.base import LayerState
from memlm.models.state import ModelState

BOOST = 12.0


@dataclass(frozen=True)
class HistState(LayerState):
    """ids [B, L] history; m [B, L] match length of each history position against the stream's end; begin [B]."""

    ids: Tensor
    m: Tensor
    begin: Tensor


class InductionOracle(nn.Module):
    def __init__(self, vocab_size: int = 263) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, d_model=8, n_heads=1, layers=[AttentionConfig()],
                                  name="induction-oracle")
        self._config_hash = "oracle-" + self.config.config_hash()
        self._kinds = ("oracle",)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device

    def init_state(self, batch_size: int, *, device=None) -> ModelState:
        z = torch.zeros(batch_size, dtype=torch.long)
        h = HistState(torch.zeros(batch_size, 0, dtype=torch.long), torch.zeros(batch_size, 0, dtype=torch.long),
                      z.clone())
        return ModelState((h,), z, z.clone(), self._config_hash, self._kinds)

    def logits(self, hidden: Tensor) -> Tensor:
        return hidden

    def forward(self, input_ids: Tensor, state: ModelState | None = None, reset: Tensor | None = None,
                update: bool = True, *, return_hidden: bool = False) -> tuple[Tensor, ModelState]:
        B, T = input_ids.shape
        V = self.config.vocab_size
        state = self.init_state(B) if state is None else state
        h: HistState = state.layers[0]
        L0 = h.ids.shape[1]
        full = torch.cat([h.ids.cpu(), input_ids.cpu()], 1).numpy()
        out = torch.zeros(B, T, V)
        new_m = np.zeros((B, L0 + T), dtype=np.int64)
        begin = h.begin.cpu().numpy().copy()
        for b in range(B):
            f = full[b]
            m = np.zeros(L0 + T, dtype=np.int64)
            m[:L0] = h.m[b].cpu().numpy()
            for t in range(T):
                p = L0 + t
                if reset is not None and bool(reset[b, t]):
                    begin[b] = p
                    m[:] = 0
                lo = begin[b]
                nxt = np.zeros_like(m)
                if p > lo:
                    prev = np.concatenate([[0], m[lo:p - 1]])
                    nxt[lo:p] = np.where(f[lo:p] == f[p], prev + 1, 0)
                m = nxt
                if p > lo and m[lo:p].max() > 0:
                    seg = m[lo:p]
                    j = lo + int(np.flatnonzero(seg == seg.max())[-1])
                    out[b, t, int(f[j + 1])] = BOOST
            new_m[b] = m
        if not update:
            return out, state
        hs = HistState(torch.from_numpy(full), torch.from_numpy(new_m), torch.from_numpy(begin))
        new = ModelState((hs,), state.pos + T, torch.from_numpy(begin), state.config_hash, state.kinds)
        return out, new


def history(state: ModelState | None) -> list[int]:
    """The token ids a state has seen (its current document)."""
    if state is None:
        return []
    h = state.layers[0]
    return h.ids[0, int(h.begin[0]):].tolist()
