"""Inference engine: chunked prefill, one-token steps and streaming generation over a carried ModelState.

Notation: B batch rows, T prompt tokens, V vocabulary, N new tokens.

The ModelState *is* the cache: attention layers keep their keys and values in it (a ring buffer for sliding
windows), recurrent memories their matrices. A step therefore feeds exactly one new token per row and sees the whole
past through the state — never "each new token sees only itself" (seed defect 8).

Memories learn at test time in generation exactly as in training: the engine neither toggles ``model.train()`` /
``eval()`` nor passes ``update=False``. Work runs under ``torch.inference_mode`` (or ``no_grad`` with
``Engine(inference_mode=False)``, for a layer that takes its inner gradients with autograd). The mode is entered
around each model call, never across a ``yield``, so code between iterations runs in the caller's own mode.
The ``.state`` a generation hands back is converted to ordinary tensors, usable anywhere.

Decoding modes (opt-in): ``static_cache=True`` converts the state after the prompt into static layout (fixed shapes,
updated in place by each step; memlm.inference.static) and ``cuda_graph=True`` additionally replays one captured CUDA
graph per token (memlm.inference.cuda_graph; CUDA only — elsewhere it decodes statically, eagerly, and says so).
Both compute exactly what the default dynamic path computes. A model with a layer that has no static path decodes
dynamically; the reason is logged once (``engine.notes``) and ``engine.decode_mode`` tells which path ran last.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from memlm.inference.sampling import SamplingConfig, make_generator, sample
from memlm.inference.static import compact, static_step, static_unsupported, to_static
from memlm.layers.residual import collect_uncertainty
from memlm.models.state import ModelState, model_device

FINISH_REASONS = ("stop", "length", "eos", "cancelled")
log = logging.getLogger("memlm.inference")
_MARGIN = 4  # spare static KV slots: the final state step and a CUDA graph's warm-up steps


class Engine:
    """Token-id level inference for a MemoryLM-like model ``model(ids [B, T], state, reset) -> (logits, state)``."""

    def __init__(self, model, tokenizer=None, *, device: torch.device | str | None = None, prefill_chunk: int = 512,
                 inference_mode: bool = True, static_cache: bool = False, cuda_graph: bool = False,
                 max_len: int | None = None, compile_step: bool = False) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk} must be ≥ 1")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len={max_len} must be ≥ 1")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else model_device(model)
        if model_device(model) != self.device:
            model.to(self.device)
        self.prefill_chunk = prefill_chunk
        self.inference_mode = inference_mode
        self.vocab_size: int = model.config.vocab_size
        # Ids the tokenizer cannot decode (a model vocabulary rounded up) are never sampled.
        tok_v = getattr(tokenizer, "vocab_size", None)
        self.sample_vocab = min(self.vocab_size, tok_v) if tok_v else self.vocab_size
        pad = getattr(tokenizer, "pad_id", None)
        # Left padding is masked out by reset, so its id only has to be a valid embedding row.
        self.pad_id = pad if pad is not None and 0 <= pad < self.vocab_size else 0
        # Static decoding: max_len = static KV slots (None: the prompt plus the new tokens, rounded up to 256);
        # compile_step runs the static step through torch.compile (fused kernels; compiles once per state layout).
        self.static_cache = static_cache or cuda_graph or compile_step
        self.cuda_graph, self.max_len = cuda_graph, max_len
        self.compile_step = compile_step
        self._compiled = None
        self.notes: list[str] = []
        self.decode_mode = "dynamic"
        self._graphs = None
        self._unmade: list[RowResult] = []   # finished rows whose state is still to be made (see _settle)
        if cuda_graph and self.device.type != "cuda":
            self.cuda_graph = False
            self._note(f"cuda_graph ignored on {self.device.type}: CUDA graphs need a CUDA device (decoding with "
                       "static states, eagerly)")

    def _note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)
            log.warning(msg)

    def _mode(self):
        return torch.inference_mode() if self.inference_mode else torch.no_grad()

    # ------------------------------------------------------------------------------------------- core
    def prefill(self, ids: Tensor, state: ModelState | None = None,
                reset: Tensor | None = None) -> tuple[Tensor, ModelState]:
        """Feed ids [B, T] (T ≥ 1) in chunks of ``prefill_chunk``; return (logits of the last token [B, V], state).

        Chunk invariance of every mixer makes this equal to one call; the chunks bound activation memory, and only
        the last position is projected to the vocabulary. Under inference mode the state holds inference tensors:
        ``state.clone()`` outside it before using the state with autograd.
        """
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"prefill needs ids [B, T] with T ≥ 1, got {tuple(ids.shape)}")
        if reset is not None:
            reset = torch.as_tensor(reset, dtype=torch.bool, device=self.device)
        T = ids.shape[1]
        with self._mode():
            hidden = None
            for a in range(0, T, self.prefill_chunk):
                b = min(a + self.prefill_chunk, T)
                hidden, state = self.model(ids[:, a:b], state, None if reset is None else reset[:, a:b],
                                           return_hidden=True)
            return self.model.logits(hidden[:, -1]), state

    def step(self, tokens: Tensor | Sequence[int], state: ModelState) -> tuple[Tensor, ModelState]:
        """Feed one token per row (tokens [B]); return (logits [B, V], state)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device).reshape(-1, 1)
        with self._mode():
            logits, state = self.model(tokens, state)
            return logits[:, -1], state

    # --------------------------------------------------------------------------------------- static
    def step_static(self, tokens: Tensor | Sequence[int], state: ModelState) -> tuple[Tensor, ModelState]:
        """``step`` for a state from ``decode_plan``/``to_static``: the state is updated in place and returned."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device).reshape(-1, 1)
        with self._mode():
            return static_step(self.model, tokens, state, self._forward()), state

    def _forward(self):
        if self.compile_step and self._compiled is None:
            self._compiled = torch.compile(self.model, dynamic=False)
        return self._compiled

    def _settle(self) -> None:
        """Make the states of finished rows whose making was deferred past their last yield (IdGeneration._run):
        they are read out of the graph's buffers, which the next replay overwrites."""
        for row in self._unmade:
            if row._make is not None:
                row._state, row._make = row._make(), None
        self._unmade.clear()

    def _graph_step(self, tokens: Tensor | Sequence[int], state: ModelState) -> tuple[Tensor, ModelState]:
        return self._graph_step_sampled(tokens, state, None, None)[:2]

    def _graph_step_sampled(self, tokens: Tensor | Sequence[int], state: ModelState, sampler, generator
                            ) -> tuple[Tensor, ModelState, Tensor | None]:
        """One CUDA-graph step (cuda_graph.GraphDecoder): (logits, state, packed [3, B] token / log-prob / entropy
        when a sampler is given and the graph ran, else None — the caller then samples itself). A capture failure
        switches the engine to static eager decoding with a note."""
        from memlm.inference.cuda_graph import GraphCaptureError, GraphDecoder

        if self._unmade:   # a caller stopped iterating right at a row's end: its state first, then the buffers
            self._settle()
        # (the pinned host row of a graph-written sample stays as it is: the graph feeds it back without a copy, and
        # reading it now would be a host read before the step that writes it has run)
        if not isinstance(tokens, Tensor) or (tokens.device != self.device and not tokens.is_pinned()):
            tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if self.cuda_graph:
            with self._mode():
                try:
                    if self._graphs is None:
                        self._graphs = GraphDecoder(self.model, forward=self._forward())
                    if sampler is None:
                        return (*self._graphs.step(tokens, state), None)
                    return self._graphs.step_sampled(tokens, state, sampler, generator)
                except GraphCaptureError as e:  # the state is untouched: capture works on the graph's own buffers
                    self.cuda_graph, self._graphs = False, None
                    self._note(f"CUDA graph capture failed ({e}); decoding with static states, eagerly")
                    self.decode_mode = "static"
        return (*self.step_static(tokens.to(self.device).long(), state), None)

    def decode_plan(self, state: ModelState, budget: int, *, graphs: bool = True
                    ) -> tuple[ModelState, Callable, Callable[[ModelState], ModelState]]:
        """How to decode up to ``budget`` more tokens after ``state``: (state to step, step function, and a function
        turning a (selected) decoding state into an ordinary dynamic one). Dynamic unless static decoding is on and
        every layer supports it; ``graphs=False`` keeps CUDA graphs out (e.g. while collecting PFP variances)."""
        dynamic = (state, self.step, lambda s: s)
        self.decode_mode = "dynamic"
        if not self.static_cache:
            return dynamic
        why = static_unsupported(self.model)
        if why is not None:
            self._note(f"static decoding off: {why}; decoding dynamically")
            return dynamic
        need = int(state.pos.max()) + budget + _MARGIN
        max_len = self.max_len if self.max_len is not None else -(-need // 256) * 256
        if need > max_len:
            self._note(f"static decoding off for this generation: it needs {need} KV slots, max_len={max_len}")
            return dynamic
        with self._mode():
            st = to_static(self.model, state, max_len)
        use_graph = self.cuda_graph and graphs
        self.decode_mode = "cuda_graph" if use_graph else "static"
        return st, (self._graph_step if use_graph else self.step_static), lambda s: compact(self.model, s)

    # ------------------------------------------------------------------------------------- generation
    def generate_ids(self, prompt_ids: Sequence[Sequence[int]] | Tensor, max_new_tokens: int = 128,
                     sampling: SamplingConfig | None = None, state: ModelState | None = None,
                     stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), *, ignore_eos: bool = False,
                     return_state: bool = False, return_uncertainty: bool = False) -> IdGeneration:
        """Stream generation for B prompts (lists of ids, lengths may differ, or a LongTensor [B, T]).

        Iterating yields one ``Step`` per decoding step with the new token of every row still generating. Rows
        finish independently (EOS, a stop id, a stop string found in the decoded text, or ``max_new_tokens``) and
        are then dropped from the batch. ``state`` (batch B, or 1 for every row) continues a previous context;
        only the prompts are fed. Results per row are in ``.rows`` (see ``RowResult``). ``return_uncertainty``
        (models with residual="pfp") fills ``RowResult.uncertainty`` with the PFP variance behind each new token.
        """
        if isinstance(prompt_ids, Tensor):
            prompt_ids = prompt_ids.tolist()
        prompts = [[int(t) for t in p] for p in prompt_ids]
        return IdGeneration(self, prompts, max_new_tokens, sampling or SamplingConfig(), state, tuple(stop_ids),
                            tuple(s for s in stop_strings if s), ignore_eos, return_state, return_uncertainty)

    def generate(self, prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]], *,
                 max_new_tokens: int = 128, state: ModelState | None = None, sampling: SamplingConfig | None = None,
                 stop: str | Sequence[str] | None = None, stop_ids: Sequence[int] = (), return_state: bool = False,
                 ignore_eos: bool = False, allow_special: bool = False, return_uncertainty: bool = False,
                 **sampling_kwargs) -> Generation:
        """Streaming text generation; see the module-level :func:`generate`."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("text generation needs a tokenizer: Engine(model, tokenizer)")
        unknown = set(sampling_kwargs) - set(SamplingConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"generate() got unknown argument(s) {sorted(unknown)}")
        cfg = sampling or SamplingConfig()
        if sampling_kwargs:
            cfg = cfg.replace(**sampling_kwargs)
        batch, prompts = _split_prompts(prompt)
        ids = [p if isinstance(p, list) else tok.encode(p, allow_special=allow_special) for p in prompts]
        if state is None:
            # An empty prompt from scratch starts from BOS (or EOS, the usual document separator).
            start = next((i for i in (getattr(tok, "bos_id", None), tok.eos_id)
                          if i is not None and 0 <= i < self.vocab_size), None)
            ids = [p if p or start is None else [start] for p in ids]
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        inner = self.generate_ids(ids, max_new_tokens, cfg, state, stop_ids, stops, ignore_eos=ignore_eos,
                                  return_state=return_state, return_uncertainty=return_uncertainty)
        return Generation(inner, batch)


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Step:
    """One decoding step: ``rows`` (prompt indices) that produced ``tokens`` now, their log-probs and entropies,
    and ``finished`` {row: reason} for rows that ended with this token."""

    rows: list[int]
    tokens: list[int]
    logprobs: list[float]
    entropy: list[float]
    finished: dict[int, str]


@dataclass
class RowResult:
    """Everything one prompt produced. ``state`` is the ModelState after the prompt and every token in ``token_ids``
    (the final token included, so a chat continues from it); it is computed on first access. ``uncertainty``: the
    PFP variance v of the distribution each token was drawn from (only with ``return_uncertainty``)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    uncertainty: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    tracker: _TextTracker | None = None
    _state: ModelState | None = None
    _pending: int | None = None  # last token, not yet fed into _state
    _engine: Engine | None = None
    _make: Callable[[], ModelState] | None = None  # makes _state (the generation loop runs it right after the yield)

    @property
    def text(self) -> str | None:
        return None if self.tracker is None else self.tracker.final_text

    @property
    def state(self) -> ModelState | None:
        if self._make is not None:
            self._state, self._make = self._make(), None
        if self._pending is not None and self._state is not None:
            _, self._state = self._engine.step([self._pending], self._state)
            self._pending = None
            self._state = _plain(self._state)
        return self._state


def _row_state(plain: Callable[[ModelState], ModelState], state: ModelState, i: int) -> ModelState:
    """Row i of a decoding state as an ordinary one (``plain``: decode_plan's conversion out of static buffers)."""
    return plain(state.select(i))


def _plain(state: ModelState) -> ModelState:
    """Ordinary tensors (inference-mode tensors cannot take part in autograd later, e.g. in training)."""
    return state.clone() if any(t.is_inference() for t in state.state_dict().values()) else state


class IdGeneration:
    """Iterator of ``Step``; results in ``.rows`` (one RowResult per prompt) once iteration ended."""

    def __init__(self, engine: Engine, prompts: list[list[int]], max_new_tokens: int, cfg: SamplingConfig,
                 state: ModelState | None, stop_ids: tuple[int, ...], stop_strings: tuple[str, ...],
                 ignore_eos: bool, return_state: bool, return_uncertainty: bool = False) -> None:
        if not prompts:
            raise ValueError("no prompts given")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be ≥ 0")
        if stop_strings and engine.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: Engine(model, tokenizer)")
        V = engine.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: give at least one token")
            bad = [t for t in p if not 0 <= t < V]
            if bad:
                raise ValueError(f"prompt {i}: token id {bad[0]} outside the model's vocabulary [0, {V})")
        if return_uncertainty and getattr(engine.model.config, "residual", None) != "pfp":
            raise ValueError("return_uncertainty needs a model with the PFP residual (model.residual='pfp')")
        self.want_unc = return_uncertainty
        self._unc: Tensor | None = None  # variance [B] behind the current logits
        self._pinned: dict[torch.Size, Tensor] = {}   # host buffers of the packed samples' reads (_reader)
        if state is not None and state.batch_size not in (1, len(prompts)):
            raise ValueError(f"state has batch {state.batch_size}; expected 1 or {len(prompts)} (one per prompt)")
        self.engine, self.prompts, self.cfg = engine, prompts, cfg
        self.max_new_tokens, self.state_in, self.return_state = max_new_tokens, state, return_state
        tok = engine.tokenizer
        eos = getattr(tok, "eos_id", None)
        self.eos = None if ignore_eos or eos is None else eos
        self.stop_ids = frozenset(stop_ids)
        self.rows = [RowResult(tracker=_TextTracker(tok, stop_strings) if tok is not None else None, _engine=engine)
                     for _ in prompts]
        self._it = self._run()

    def __iter__(self) -> IdGeneration:
        return self

    def __next__(self) -> Step:
        return next(self._it)

    def run(self) -> IdGeneration:
        """Run to the end (no-op once finished)."""
        for _ in self:
            pass
        return self

    def close(self) -> None:
        """Stop early: unfinished rows get finish_reason "cancelled" and no state."""
        self._it.close()
        for r in self.rows:
            if r.finish_reason is None:
                r.finish_reason, r._state, r._pending = "cancelled", None, None
                if r.tracker is not None:
                    r.tracker.finish()

    # ------------------------------------------------------------------------------------------- loop
    def _fwd(self, fn, *args) -> tuple[Tensor, ModelState]:
        """eng.prefill / eng.step, keeping the PFP variance of the returned logits' tokens when asked."""
        if not self.want_unc:
            return fn(*args)
        with collect_uncertainty() as box:
            logits, state = fn(*args)
        self._unc = box["variance"][:, -1]
        return logits, state

    def _start(self) -> tuple[Tensor, ModelState, list[list[int]]]:
        """Feed the prompts; return (logits [B, V], state, prompt tokens still to be fed per row)."""
        eng, prompts = self.engine, self.prompts
        B, lens = len(prompts), [len(p) for p in prompts]
        T, ragged = max(lens), len(set(lens)) > 1
        if self.state_in is None:
            # Prompts of different lengths are LEFT-padded and reset=True marks each row's first real token. That is
            # exact, not an approximation: reset restarts the stream position *and* every memory at that token, so
            # RoPE/XPOS/learned positions count from 0 there, attention masks every key before the row's document
            # start (the padding), and recurrent memories restart from their initial state. The real tokens thus
            # see exactly what they would unpadded; left (not right) padding puts every row's last prompt token in
            # the same column, so one batched step per new token follows.
            ids = torch.full((B, T), eng.pad_id, dtype=torch.long)
            reset = torch.zeros(B, T, dtype=torch.bool)
            for b, p in enumerate(prompts):
                ids[b, T - len(p):] = torch.tensor(p)
                reset[b, T - len(p)] = True
            logits, state = self._fwd(eng.prefill, ids, None, reset if ragged else None)
            return logits, state, [[] for _ in prompts]
        # Continuing from a state, a reset would wipe the memory. Instead all rows prefill their first m tokens
        # together, and a longer row's remaining prompt tokens are fed (forced) in the decoding steps while shorter
        # rows already generate: every row consumes exactly its own tokens, and rows stay in lockstep, so states
        # whose size grows with the tokens fed (a full KV cache) keep one shape across the batch.
        state = self.state_in.to(eng.device)
        if state.batch_size != B:
            state = state.repeat(B)
        m = min(lens)
        logits, state = self._fwd(eng.prefill, torch.tensor([p[:m] for p in prompts]), state)
        return logits, state, [list(p[m:]) for p in prompts]

    def _reader(self, packed: Tensor) -> Callable[[], list]:
        """Start the device→host copy of a packed sample [3, B] now; the returned function waits for it and gives
        its rows as lists. On CUDA the copy goes to a pinned buffer (one per batch size) behind an event, so work
        launched after this call does not delay the read. A sample already in pinned host memory (the CUDA graph's
        Triton sampler writes it there; cuda_graph._Captured) is read after an event, without a copy."""
        if not packed.is_cuda and not packed.is_pinned():
            host = packed.clone()
            return host.tolist
        if packed.is_cuda:
            host = self._pinned.get(packed.shape)
            if host is None:
                host = self._pinned[packed.shape] = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
        else:   # written into pinned memory by the graph's sampler: only wait for the replay
            host = packed
        done = torch.cuda.Event()
        done.record()

        def read() -> list:
            done.synchronize()
            return host.tolist()
        return read

    def _sample_outside(self, logits: Tensor, hist: Tensor | None, hmask: Tensor | None, sampled: list[int],
                        forced: list[list[int]], active: list[int], gen) -> tuple[Tensor, list[float], list[float]]:
        """Next tokens [n] (sampled rows from the logits, forced rows their next prompt token), log-probs, entropies."""
        eng, n = self.engine, len(active)
        next_tok = torch.zeros(n, dtype=torch.long, device=eng.device)
        lp, ent = [0.0] * n, [0.0] * n
        if sampled:
            gi = torch.tensor(sampled, device=eng.device)
            with eng._mode():
                s = sample(logits[gi, :eng.sample_vocab], hist[gi] if hist is not None else None, self.cfg, gen,
                           history_mask=hmask[gi] if hmask is not None else None)
            next_tok[gi] = s.tokens
            lp_s, ent_s = s.logprobs.tolist(), s.entropy.tolist()
            for j, i in enumerate(sampled):
                lp[i], ent[i] = lp_s[j], ent_s[j]
        for i in range(n):
            if forced[active[i]]:
                next_tok[i] = forced[active[i]].pop(0)
        return next_tok, lp, ent

    def _run(self) -> Iterator[Step]:
        eng, cfg, rows = self.engine, self.cfg, self.rows
        logits, state, forced = self._start()
        active = list(range(len(self.prompts)))  # prompt index of each batch row
        if self.max_new_tokens == 0:
            for r in active:
                st = state.select(r)
                if forced[r]:  # the rest of a longer prompt (continuing from a state) is still owed to the state
                    _, st = eng.prefill(torch.tensor([forced[r]]), st)
                rows[r].finish_reason, rows[r]._state = "length", _plain(st)
            return
        state, step, plain = eng.decode_plan(state, self.max_new_tokens + max(len(f) for f in forced),
                                             graphs=not self.want_unc)
        gen = make_generator(cfg.seed, eng.device)
        use_hist = cfg.uses_history
        # CUDA graphs without history penalties: the graph samples too, and a step's token ids, log-probs and
        # entropies come back in one host read (box: the packed sample behind the current logits, or None)
        box: list[Tensor | None] = [None]
        if eng.decode_mode == "cuda_graph" and not use_hist and not self.want_unc:
            from memlm.inference.cuda_graph import Sampler
            sampler = Sampler(cfg, eng.sample_vocab)

            def step(tokens: Tensor, st: ModelState) -> tuple[Tensor, ModelState]:
                logits_, st, box[0] = eng._graph_step_sampled(tokens, st, sampler, gen)
                return logits_, st
        if use_hist:  # history columns grow one per step; the valid mask hides padding / unpenalised tokens
            if cfg.penalize_prompt:
                hist, hmask = _left_pad(self.prompts, eng.device)
            else:
                hist = torch.zeros(len(active), 0, dtype=torch.long, device=eng.device)
                hmask = hist.bool()
        while True:
            n = len(active)
            is_forced = [bool(forced[r]) for r in active]
            sampled = [i for i in range(n) if not is_forced[i]]
            pre, box[0] = box[0], None
            ahead: tuple[Tensor, ModelState] | None = None   # the next step, launched before this one's host read
            if pre is not None and len(sampled) == n:        # sampled inside the graph: one host read
                next_tok = pre[0]   # float64 ids in the graph's buffer: fed back in the graph (GraphDecoder)
                read = self._reader(pre)
                # Pipelining: the next step is launched with the sampled ids still on the device, so the GPU runs it
                # while the host waits for this step's ids and does the bookkeeping. A row that then finishes keeps
                # the state after its last token (the launched step computed it). Not launched when every row
                # reaches max_new_tokens with this token (nothing would use it).
                if any(len(rows[r].token_ids) + 1 < self.max_new_tokens for r in active):
                    ahead = self._fwd(step, next_tok, state)
                ids_f, lp, ent = read()
                toks = [int(t) for t in ids_f]
            else:
                next_tok, lp, ent = self._sample_outside(logits, hist if use_hist else None,
                                                         hmask if use_hist else None, sampled, forced, active, gen)
                toks = next_tok.tolist()
            finished: dict[int, str] = {}
            for i in sampled:
                r, t = active[i], toks[i]
                res = rows[r]
                res.token_ids.append(t)
                res.logprobs.append(lp[i])
                res.entropy.append(ent[i])
                if self._unc is not None:
                    res.uncertainty.append(float(self._unc[i]))
                reason = None
                if self.eos is not None and t == self.eos:
                    reason = "eos"
                elif t in self.stop_ids or res.tracker is not None and res.tracker.push(t):
                    reason = "stop"
                if reason is None and len(res.token_ids) >= self.max_new_tokens:
                    reason = "length"
                if reason is not None:
                    finished[r] = reason
                    res.finish_reason = reason
                    if res.tracker is not None:
                        res.tracker.finish()
                    # The finished row's own state (compacted out of the static buffers: at 16K context a copy of
                    # the whole KV cache, ~3 ms on an H100) is made right after this step is yielded, so the token
                    # reaches the caller first; reading .state during the yield makes it then. With no launched
                    # step, it is the state before this token plus the token itself; the one step joining them runs
                    # only when .state is read, so a batch whose last rows just finished needs no further forward pass.
                    # (a launched step has fed this token already)
                    res._make = functools.partial(_row_state, plain, state if ahead is None else ahead[1], i)
                    res._pending = t if ahead is None else None
                    eng._unmade.append(res)
            if use_hist:
                col_ok = torch.tensor([cfg.penalize_prompt or not f for f in is_forced], device=eng.device)
                hist = torch.cat([hist, next_tok[:, None]], 1)
                hmask = torch.cat([hmask, col_ok[:, None]], 1)
            try:
                if sampled:
                    yield Step([active[i] for i in sampled], [toks[i] for i in sampled], [lp[i] for i in sampled],
                               [ent[i] for i in sampled], finished)
            finally:
                eng._settle()
            keep = [i for i in range(n) if active[i] not in finished]
            if not keep:
                break
            if ahead is not None:
                logits, state = ahead
            if len(keep) < n:
                idx = torch.tensor(keep, device=eng.device)
                state = state.select(idx)
                if ahead is None:
                    next_tok = next_tok[idx]
                else:   # the launched step's outputs; next_tok's buffer already holds its sample
                    logits = logits[idx]
                    if box[0] is not None:
                        if not box[0].is_cuda:   # the graph's host ring: copied in stream order, after its step
                            box[0] = box[0].to(eng.device, non_blocking=True)
                        box[0] = box[0][:, idx]
                if use_hist:
                    hist, hmask = hist[idx], hmask[idx]
                active = [active[i] for i in keep]
            if ahead is None:
                logits, state = self._fwd(step, next_tok, state)
        if self.return_state:
            for r in rows:
                _ = r.state  # materialise now (the model may change afterwards)


def _left_pad(prompts: list[list[int]], device) -> tuple[Tensor, Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    ok = torch.zeros(len(prompts), T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        ok[b, T - len(p):] = True
    return ids.to(device), ok.to(device)


# ---------------------------------------------------------------------------------------------- text


class _TextTracker:
    """Decoded text of one row: complete UTF-8 only (StreamDecoder), cut at the first stop string, and a safe
    prefix that can be streamed — text that might still become the start of a stop string is held back."""

    def __init__(self, tok, stops: tuple[str, ...]) -> None:
        from memlm.data.tokenizer import StreamDecoder

        self.dec = StreamDecoder(tok)
        self.stops = stops
        self.maxlen = max((len(s) for s in stops), default=0)
        self.text = ""
        self.cut: int | None = None  # where the first stop string begins
        self.sent = 0  # characters handed out by take()
        self.done = False

    def push(self, token_id: int) -> bool:
        """Add one token; True when a stop string has been completed."""
        return self._add(self.dec.push(token_id))

    def _add(self, piece: str) -> bool:
        if self.cut is not None:
            return True
        if not piece:
            return False
        # An occurrence not found before must end inside the new piece.
        start = max(0, len(self.text) - self.maxlen + 1)
        self.text += piece
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.cut = min(hits)
            return True
        return False

    def finish(self) -> None:
        if not self.done:
            self._add(self.dec.flush())
            self.done = True

    def _held(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        for k in range(min(self.maxlen - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    @property
    def final_text(self) -> str:
        return self.text if self.cut is None else self.text[:self.cut]

    def take(self) -> str:
        """Text that became safe to show since the last call."""
        if self.cut is not None:
            limit = self.cut
        elif self.done:
            limit = len(self.text)
        else:
            limit = len(self.text) - self._held()
        if limit <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:limit], limit
        return out


class Generation:
    """Streaming text. One prompt: iterating yields ``str`` pieces; a list of prompts: ``(row, str)`` pairs.

    After iteration (reading an attribute runs the generation to its end): ``text``, ``token_ids``, ``state``,
    ``finish_reason`` ("stop" | "length" | "eos"), ``logprobs`` — values for one prompt, lists for a batch.
    ``state`` includes the prompt and every generated token (the final EOS/stop token too).
    """

    def __init__(self, inner: IdGeneration, batch: bool) -> None:
        self.inner = inner
        self.batch = batch
        self._pieces = self._stream()

    def __iter__(self) -> Iterator:
        return self._pieces

    def _stream(self) -> Iterator:
        rows = self.inner.rows
        for step in self.inner:
            for r in step.rows:
                piece = rows[r].tracker.take()
                if piece:
                    yield (r, piece) if self.batch else piece
        for r, res in enumerate(rows):  # whatever a flush released (or rows that generated nothing)
            if res.tracker is not None:
                res.tracker.finish()
                piece = res.tracker.take()
                if piece:
                    yield (r, piece) if self.batch else piece

    def _done(self) -> list[RowResult]:
        for _ in self._pieces:
            pass
        return self.inner.rows

    def close(self) -> None:
        """Stop generating now; unfinished rows end with finish_reason "cancelled"."""
        self._pieces.close()
        self.inner.close()

    def _get(self, name: str):
        vals = [getattr(r, name) for r in self._done()]
        return vals if self.batch else vals[0]

    @property
    def rows(self) -> list[RowResult]:
        return self._done()

    @property
    def text(self):
        return self._get("text")

    @property
    def token_ids(self):
        return self._get("token_ids")

    @property
    def state(self):
        return self._get("state")

    @property
    def finish_reason(self):
        return self._get("finish_reason")

    @property
    def logprobs(self):
        return self._get("logprobs")

    @property
    def entropy(self):
        return self._get("entropy")

    @property
    def uncertainty(self):
        return self._get("uncertainty")


def _split_prompts(prompt) -> tuple[bool, list]:
    """(batch?, prompts): a str or a list of ints is one prompt; a list of those is a batch."""
    if isinstance(prompt, str):
        return False, [prompt]
    if isinstance(prompt, Tensor):
        prompt = prompt.tolist()
    prompt = list(prompt)
    if not prompt or all(isinstance(t, int) for t in prompt):
        return False, [list(prompt)]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, Tensor):
            out.append([int(t) for t in p.tolist()])
        else:
            out.append([int(t) for t in p])
    return True, out


def generate(model, tokenizer, prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]], *,
             max_new_tokens: int = 128, state: ModelState | None = None, sampling: SamplingConfig | None = None,
             stop: str | Sequence[str] | None = None, stop_ids: Sequence[int] = (), return_state: bool = False,
             ignore_eos: bool = False, allow_special: bool = False, device: torch.device | str | None = None,
             prefill_chunk: int = 512, return_uncertainty: bool = False, static_cache: bool = False,
             cuda_graph: bool = False, compile_step: bool = False, **sampling_kwargs) -> Generation:
    """Generate text from ``prompt`` (a string or token ids; a list of them for a batch), streaming.

    ``sampling`` or keyword overrides (``temperature=0``, ``top_p=0.9`` …) choose tokens. ``stop`` strings end a row
    and are never emitted (text that could start one is held back until it cannot); ``stop_ids`` end it too,
    as does the tokenizer's EOS (unless ``ignore_eos``). ``state`` continues from a ModelState (a chat's memory):
    only the prompt is fed. ``return_state=True`` computes ``.state`` at the end of iteration instead of on first
    access. Text pieces are complete UTF-8 characters (a multi-byte character split over tokens comes out whole).
    ``return_uncertainty=True`` (a model with residual="pfp") gives ``.uncertainty``: the per-token PFP variance.
    ``prefill_chunk`` tokens are fed per prefill call; ``static_cache`` / ``cuda_graph`` pick the decoding mode
    (see the module docstring); ``compile_step`` runs the static step through torch.compile first (fused kernels).
    ``model`` may also be an :class:`Engine` (then its own settings apply).
    """
    engine = model if isinstance(model, Engine) else Engine(model, tokenizer, device=device,
                                                            prefill_chunk=prefill_chunk, static_cache=static_cache,
                                                            cuda_graph=cuda_graph, compile_step=compile_step)
    if tokenizer is not None and engine.tokenizer is not tokenizer:
        engine = Engine(engine.model, tokenizer, device=engine.device, prefill_chunk=engine.prefill_chunk,
                        inference_mode=engine.inference_mode, static_cache=engine.static_cache,
                        cuda_graph=engine.cuda_graph, max_len=engine.max_len, compile_step=engine.compile_step)
    return engine.generate(prompt, max_new_tokens=max_new_tokens, state=state, sampling=sampling, stop=stop,
                           stop_ids=stop_ids, return_state=return_state, ignore_eos=ignore_eos,
                           allow_special=allow_special, return_uncertainty=return_uncertainty, **sampling_kwargs)


__all__ = ["FINISH_REASONS", "Engine", "Generation", "IdGeneration", "RowResult", "Step", "generate"]
