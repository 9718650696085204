"""CUDA-graph captured decode steps: one graph per state layout (batch size and buffer shapes), replayed per token.

Notation: B batch rows, V vocabulary.

A captured step is ``static_step`` (memlm.inference.static) recorded once on fixed buffers: token ids [B, 1], a
static ModelState (every tensor of it) and the logits [B, V] it leaves. Decoding one token is then: copy the ids in,
replay the graph (one launch for the whole model), read the logits. With a ``sampler`` (``step_sampled``) the graph
also draws the next token (memlm.inference.sampling.packed_sample: the random part is an Exp(1) noise buffer filled
before the replay), so a decode step is one fill, one replay and one device→host read of [3, B] (token, log-prob,
entropy); without one, sampling stays outside, in the engine's sampler.
Graphs are kept in a small LRU keyed by the state's layout, so batch sizes 1..N each get their own. A state that is
not the one a graph handed back last (a new generation, rows dropped from the batch) is first copied into the
graph's buffers.

Rules: one generation at a time per decoder (the buffers are shared; a state whose buffers were taken over by
another generation is refused); the model's parameters must stay the same tensors (in-place updates are seen;
after replacing or moving parameters call ``clear()``). ``capture=False`` runs the same buffer logic eagerly — what
CPU tests use to check it.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from memlm.inference.sampling import SamplingConfig, fused_sampler, packed_sample
from memlm.inference.static import copy_state_, fresh_view, static_step
from memlm.models.state import ModelState
from memlm.ops.sample_kernel import packed_sample_triton

__all__ = ["GraphCaptureError", "GraphDecoder", "Sampler"]


@dataclass(frozen=True)
class Sampler:
    """What a captured graph samples with: the config (no history penalties: those read the growing history) and
    the sampled vocabulary (the first ``vocab`` logits)."""

    cfg: SamplingConfig
    vocab: int

    def key(self) -> tuple:
        c = self.cfg
        return (self.vocab, c.temperature, c.top_k, c.top_p, c.min_p)


class GraphCaptureError(RuntimeError):
    """The step could not be captured (the engine then decodes eagerly and says why)."""


def _layout(state: ModelState) -> tuple:
    return tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in state.state_dict().items())


class _Captured:
    """Buffers and graph(s) of one layout.

    With the Triton sampler (no top-k / top-p / min-p, memlm.ops.sample_kernel) the sampler writes the packed sample
    straight into host memory (pinned on CUDA) and the token ids into the graph's input: a step is then one replay
    and no device→host copy (the separate copy cost ~12 µs a token in front of the next replay on an H100). Two
    graphs, identical but for the host slot they write, alternate: the engine launches step t+1 before reading step
    t's sample, so step t+1 must not overwrite it; step t+2, which does, is launched only after that read.
    """

    def __init__(self, model, template: ModelState, *, capture: bool, warmup: int, forward=None,
                 sampler: Sampler | None = None) -> None:
        self.model, self.forward, self.sampler = model, forward, sampler
        self.state = template.clone()                      # the graph's own state buffers
        dev = template.pos.device
        B = template.batch_size
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.noise = (torch.ones(B, sampler.vocab, device=dev)
                      if sampler is not None and not sampler.cfg.greedy else None)
        self.packed: Tensor | None = None                  # [3, B] the sampler's output (token, log-prob, entropy)
        self.last: ModelState | None = None                # the view handed out by the latest replay
        self.fused = sampler is not None and fused_sampler(sampler.cfg, dev)
        # the host ring of the fused sampler: slot s is written by graph s
        self.host = (torch.empty(2, 3, B, dtype=torch.float64, pin_memory=dev.type == "cuda") if self.fused else None)
        self.turn = 0
        self.graphs: list = []
        self.outputs: list[tuple[Tensor, Tensor | None]] = []
        self.sample = None if sampler is None else functools.partial(packed_sample, cfg=sampler.cfg)
        if self.sample is not None and forward is not None and not self.fused:
            # with a compiled step, the torch sampler is compiled too: eagerly it is ~12 small kernels per token
            # (greedy) in the graph, a few per cent of a 34M model's decode step (the Triton one is two kernels)
            self.sample = torch.compile(self.sample, dynamic=False)
        if not capture:
            return
        try:
            # Warm-up on a side stream (lazy library and allocator work must not happen during capture); it only
            # advances the scratch buffers, which every new generation overwrites.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for i in range(warmup):
                    self._run(i % 2)
            torch.cuda.current_stream().wait_stream(side)
            for slot in range(2 if self.fused else 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.outputs.append(self._run(slot))
                self.graphs.append(graph)
        except Exception as e:  # any capture failure means: decode without a graph
            self.graphs = []
            raise GraphCaptureError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

    def _run(self, slot: int = 0) -> tuple[Tensor, Tensor | None]:
        logits = static_step(self.model, self.tokens, self.state, self.forward)
        if self.sampler is None:
            return logits, None
        # the sampled ids become the next replay's input ids in the graph itself: a caller feeding them back (the
        # engine's loop) passes the packed row and nothing is copied between replays (see __call__)
        if self.fused:
            packed = packed_sample_triton(logits[:, :self.sampler.vocab], self.noise, self.sampler.cfg.temperature,
                                          out=self.host[slot], ids=self.tokens)
        else:
            packed = self.sample(logits[:, :self.sampler.vocab], self.noise)
            self.tokens.copy_(packed[0].view(-1, 1))
        return logits, packed

    def __call__(self, tokens: Tensor, state: ModelState, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, ModelState]:
        if state is not self.last:
            owned = {t.data_ptr() for t in self.state.state_dict().values() if t.numel()}
            if any(t.numel() and t.data_ptr() in owned for t in state.state_dict().values()):
                raise RuntimeError("this state's buffers were taken over by another generation on the same CUDA-graph "
                                   "decoder; decode one generation at a time per engine")
            copy_state_(self.state, state)
        fed_back = (self.packed is not None and state is self.last and tokens.dim() == 1
                    and tokens.data_ptr() == self.packed.data_ptr())   # the packed ids the last replay wrote in
        if not fed_back:
            self.tokens.copy_(tokens.reshape(-1, 1))
        if self.noise is not None:
            self.noise.exponential_(generator=generator)
        slot = self.turn
        self.turn ^= self.fused                             # the fused sampler's two graphs alternate
        if self.graphs:
            self.graphs[slot].replay()
            logits, self.packed = self.outputs[slot]
        else:
            logits, self.packed = self._run(slot)
        self.last = fresh_view(self.state)
        return logits, self.last


class GraphDecoder:
    """``step(tokens [B], state) -> (logits [B, V], state)`` through captured graphs (see the module docstring).

    The returned logits and state live in the graph's buffers: read the logits before the next step and pass the
    returned state back (``state.select`` / ``clone`` copy out of them).
    """

    def __init__(self, model, *, max_graphs: int = 4, warmup: int = 2, capture: bool = True, forward=None) -> None:
        if capture and not torch.cuda.is_available():
            raise GraphCaptureError("CUDA graphs need a CUDA device")
        self.model, self.max_graphs, self.warmup, self.capture = model, max_graphs, warmup, capture
        self.forward = forward  # e.g. torch.compile(model): fused kernels inside the graph (compiled in the warm-up)
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()

    def step(self, tokens: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        return self._graph(state, None)(tokens, state)

    def step_sampled(self, tokens: Tensor, state: ModelState, sampler: Sampler,
                     generator: torch.Generator | None = None) -> tuple[Tensor, ModelState, Tensor]:
        """``step`` whose graph also samples the next token: (logits [B, V], state, packed [3, B] float64 = token
        ids, log-probabilities, entropies; in the graph's buffers like the logits). generator: the noise's RNG.
        tokens [B] (any dtype holding the ids); passing ``packed[0]`` of the previous call with the state it returned
        feeds the sampled ids back without a copy (the graph already wrote them into its input)."""
        g = self._graph(state, sampler)
        logits, st = g(tokens, state, generator)
        return logits, st, g.packed

    def _graph(self, state: ModelState, sampler: Sampler | None) -> _Captured:
        skey = None if sampler is None else sampler.key()
        if self.graphs:   # the common case, the state the latest replay handed out: no walk over its tensors
            key = next(reversed(self.graphs))
            g = self.graphs[key]
            if g.last is state and key[1] == skey:
                return g
        key = (_layout(state), skey)
        g = self.graphs.get(key)
        if g is None:
            g = _Captured(self.model, state, capture=self.capture, warmup=self.warmup, forward=self.forward,
                          sampler=sampler)
            self.graphs[key] = g
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        return g

    def clear(self) -> None:
        """Drop every graph (after the model's parameters were replaced or moved)."""
        self.graphs.clear()
