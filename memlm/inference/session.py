"""Session: a conversation whose memory is a ModelState — the one API the chat REPL, the HTTP server and the web UI
call (DESIGN.md §7).

Notation: V vocabulary, C tokens of conversation between two online CMS steps, s = −log p(token) the surprise of a
generated token under the model.

Each turn feeds ONLY the new tokens — the turn's messages in the chat template, ending with ``<|assistant|>`` —
on top of the carried state, then generates until ``<|end|>`` (or EOS, a stop string, ``max_new_tokens``). The
state then holds the whole turn; a reply cut short without ``<|end|>`` gets the end marker fed before the turn
is committed, so a saved state always sits on a turn boundary.

Memory modes (what the state is at the start of a turn, and what survives it):

==============  =====================================  ==========================================================
mode            a turn starts from                     after the turn
==============  =====================================  ==========================================================
``stateless``   a fresh state (+ the system message)   nothing is kept (the transcript is, for display)
``session``     the carried state                      the state is carried to the next turn (in RAM)
``persistent``  the carried state, loaded from the     carried, and saved to the store after EVERY turn (atomic)
                store when the session starts
``readonly``    the carried state (loaded from the     nothing: memory and store are never written
                store if the session exists)
==============  =====================================  ==========================================================

``learning`` (test-time memory updates; independent of ``model.train()``/``eval()``, which are never touched):

- on: memories write while they read — KV caches grow, fast weights and neural memories update — and the state
  after the turn is kept (in ``session``/``persistent``). Models with CMS feed-forwards also learn online: once C
  tokens of conversation have accumulated, one SGD step on them (next-token loss, small LR, fast levels only,
  ``memlm.layers.cms.cms_online_step``); the resulting weight deltas belong to the session (saved with its state)
  and are swapped into the shared model only while one of its turns runs, so sessions never see each other's.
- off: the memory after a turn is bit-identical to the memory before it. Inside the turn the model still runs on
  a scratch copy of the state (so the reply can attend to its own prompt and to itself), but nothing of it
  survives, and no CMS step is taken. It is a probe: every later turn is answered from the same memory.
  ``readonly`` implies learning off and additionally never writes to disk.

``stateless`` and ``readonly`` never carry anything, so a fact given in one turn cannot change a later one; in
``session`` and ``persistent`` (learning on) it does — ``tests/inference/test_session.py`` checks both on logits.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from memlm.data.chat import END, ROLES, marker_ids, render_prompt
from memlm.data.chat import stop_ids as chat_stop_ids
from memlm.errors import UserError
from memlm.inference.controller import ControllerConfig, SurpriseController
from memlm.inference.engine import Engine, _TextTracker
from memlm.inference.sampling import SamplingConfig, as_history, make_generator, penalize, sample
from memlm.inference.store import SessionStore, validate_session_id
from memlm.layers.cms import (
    DEFAULT_ONLINE_EVERY,
    DEFAULT_ONLINE_LR,
    apply_cms_deltas,
    cms_deltas,
    cms_modules,
    cms_online_params,
    cms_online_step,
    cms_snapshot,
)
from memlm.memory.episodic import load_session_indexes, save_session_indexes, session_indexes
from memlm.models.state import ModelState

__all__ = ["MODES", "Session", "Turn", "TurnResult", "layer_stats", "state_hash"]

MODES = ("stateless", "session", "persistent", "readonly")
CARRYING = ("session", "persistent")


# ---------------------------------------------------------------------------------------------- helpers


def state_hash(state: ModelState, extra: dict[str, Tensor] | None = None) -> str:
    """sha256 (hex, 16 chars) over every tensor of ``state`` (and ``extra``), by name: equal iff bit-identical."""
    h = hashlib.sha256()
    items = sorted(state.state_dict().items()) + sorted((f"extra.{k}", v) for k, v in (extra or {}).items())
    for name, t in items:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def layer_stats(kinds: Sequence[str], tensors: dict[str, Tensor]) -> list[dict]:
    """Per layer: kind, bytes, and the L2 norm of every floating tensor (from a state's flat ``layers.i.*`` dict)."""
    rows: dict[int, dict] = {}
    for name, t in tensors.items():
        parts = name.split(".", 2)
        if parts[0] != "layers" or len(parts) < 3 or not parts[1].isdigit():
            continue
        i = int(parts[1])
        row = rows.setdefault(i, {"layer": i, "kind": kinds[i] if i < len(kinds) else "?", "bytes": 0, "norms": {}})
        row["bytes"] += t.numel() * t.element_size()
        if t.is_floating_point() and t.numel():
            row["norms"][parts[2]] = round(float(t.detach().float().norm()), 4)
    return [rows[i] for i in sorted(rows)]


def _plain(state: ModelState) -> ModelState:
    """Ordinary tensors (inference-mode tensors cannot enter autograd, e.g. a later online CMS step)."""
    return state.clone() if any(t.is_inference() for t in state.state_dict().values()) else state


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _weights_lock(model) -> threading.Lock:
    """One lock per model: sessions sharing a CMS model swap their deltas into its weights one at a time."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.Lock()
        return lock


# ---------------------------------------------------------------------------------------------- results


@dataclass
class TurnResult:
    """What a turn produced. ``surprise[i]`` = −log p of generated token i under the model (nats)."""

    reply: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end marker / stop string) | "eos" | "length"
    prompt_tokens: int
    surprise: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    turn: int = 0
    state_hash: str = ""
    controller: dict | None = None
    cms_loss: float | None = None
    elapsed: float = 0.0
    islet: str | None = None  # the islet routed for this turn (None: none picked, or no islet bank)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def surprise_mean(self) -> float:
        return sum(self.surprise) / len(self.surprise) if self.surprise else 0.0

    @property
    def surprise_max(self) -> float:
        return max(self.surprise, default=0.0)

    @property
    def entropy_mean(self) -> float:
        return sum(self.entropy) / len(self.entropy) if self.entropy else 0.0

    def summary(self) -> dict:
        """JSON-ready stats (no per-token lists)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("surprise", "entropy", "token_ids")}
        d.update(completion_tokens=self.completion_tokens, surprise_mean=round(self.surprise_mean, 4),
                 surprise_max=round(self.surprise_max, 4), entropy_mean=round(self.entropy_mean, 4))
        return d


class Turn:
    """A turn in progress: iterate for the reply's text pieces (streaming); ``result`` runs it to the end.

    The session is changed (state, transcript, store) only when the turn completes; ``close()`` before that
    cancels it and leaves the session exactly as it was.
    """

    def __init__(self, it: Iterator[str]) -> None:
        self._it = it
        self._result: TurnResult | None = None
        self.cancelled = False

    def __iter__(self) -> Turn:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        if self._result is None:
            self.cancelled = True
        self._it.close()

    @property
    def result(self) -> TurnResult:
        for _ in self:
            pass
        if self._result is None:
            raise RuntimeError("the turn was cancelled")
        return self._result


# ---------------------------------------------------------------------------------------------- session


class Session:
    """A conversation with ``model`` in one of ``MODES`` (see the module docstring).

    store: a ``SessionStore`` or a directory (with ``password`` for encryption); needed by ``persistent``, ``save``
    and ``fork``. session_id: ``[A-Za-z0-9_-]{1,64}``. sampling: default ``SamplingConfig`` of every turn.
    controller: a ``ControllerConfig`` (or a ``SurpriseController``) to sample by surprise targeting instead.
    system: a system message fed at the start of the memory (and of every stateless turn).
    """

    def __init__(self, model, tokenizer, *, mode: str = "session", learning: bool = True,
                 store: SessionStore | str | None = None, session_id: str | None = None, password: str | None = None,
                 sampling: SamplingConfig | None = None, controller: ControllerConfig | SurpriseController | None = None,
                 system: str | None = None, max_new_tokens: int = 256, stop: Sequence[str] = (),
                 cms_every: int = DEFAULT_ONLINE_EVERY, cms_lr: float = DEFAULT_ONLINE_LR,
                 prefill_chunk: int = 512) -> None:
        if mode not in MODES:
            raise UserError(f"memory mode {mode!r} unknown; choose from {', '.join(MODES)}")
        if store is not None and not isinstance(store, SessionStore):
            store = SessionStore(store, password=password)
        elif password is not None:
            if store is None:
                raise UserError("a password encrypts stored sessions: give a store as well")
            if store.password != password:
                raise ValueError("give the password to the SessionStore, not to both")
        if cms_every < 1:
            raise ValueError(f"cms_every={cms_every} must be ≥ 1")
        self.model, self.tokenizer = model, tokenizer
        self.engine = Engine(model, tokenizer, prefill_chunk=prefill_chunk)
        self.store = store
        self.session_id = None if session_id is None else validate_session_id(session_id)
        self.sampling = sampling or SamplingConfig()
        if isinstance(controller, ControllerConfig):
            controller = SurpriseController(controller)
        self.controller: SurpriseController | None = controller
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(stop)
        self.cms_every, self.cms_lr = cms_every, cms_lr
        self.has_cms = bool(cms_modules(model))
        self.learning = bool(learning)
        self.mode = "session"
        self.transcript: list[dict] = []
        self.turns = 0
        self.created = time.time()
        self.updated: float | None = None
        self.cms: dict[str, Tensor] = {}  # online-learned CMS deltas (θ − θ_base) of this session
        self.cms_buffer: list[int] = []  # conversation ids not yet learned from
        self.state: ModelState = self._fresh()
        self.episodic = None  # FAISS indexes of the retrieval layers' memory (memlm.memory.episodic), per session
        self.loaded = False
        self._check_mode(mode)
        self.mode = mode
        if mode in ("persistent", "readonly") and self.store is not None and self.session_id is not None \
                and self.store.exists(self.session_id):
            self._load()

    # ------------------------------------------------------------------------------------ properties
    @property
    def writes_memory(self) -> bool:
        """Whether a turn's memory survives it: learning on and a carrying mode."""
        return self.learning and self.mode in CARRYING

    @property
    def tokens_seen(self) -> int:
        return int(self.state.pos.max()) if self.state.pos.numel() else 0

    def _fresh(self) -> ModelState:
        return self.model.init_state(1, device=self.engine.device)

    def _check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise UserError(f"memory mode {mode!r} unknown; choose from {', '.join(MODES)}")
        if mode == "persistent" and (self.store is None or self.session_id is None):
            raise UserError("persistent memory needs a store and a session id (--session ID)")

    # ----------------------------------------------------------------------------------------- turns
    def send(self, message: str | Sequence[dict], *, max_new_tokens: int | None = None,
             sampling: SamplingConfig | None = None, stop: Sequence[str] | None = None) -> Turn:
        """Answer ``message``: user text, or new messages ``[{'role': 'system'|'user'|'assistant', 'content': str}]``
        (assistant messages there are history given as text, e.g. a stateless API call; the last must not be one).

        Returns a ``Turn``: iterate it for streamed text pieces; ``.result`` is a ``TurnResult``."""
        msgs = self._messages(message)
        ids = self._chat_ids(msgs, fresh=self._starts_fresh())
        entries = [{"role": m["role"], "content": m["content"]} for m in msgs]
        return self._turn(ids, chat=True, entries=entries, max_new=max_new_tokens, sampling=sampling, stop=stop)

    def ask(self, message: str | Sequence[dict], **kwargs) -> TurnResult:
        """``send`` without streaming: run the turn and return its ``TurnResult``."""
        return self.send(message, **kwargs).result

    def complete(self, text: str, *, max_new_tokens: int | None = None, sampling: SamplingConfig | None = None,
                 stop: Sequence[str] | None = None) -> Turn:
        """Continue raw ``text`` (no chat template) on top of the memory; the memory rules of ``send`` apply."""
        if not isinstance(text, str):
            raise UserError("a completion prompt must be a string")
        ids = self.tokenizer.encode(text)
        if not ids:
            if not self._starts_fresh():
                raise UserError("empty prompt: nothing to continue from")
            start = next((i for i in (getattr(self.tokenizer, "bos_id", None), self.tokenizer.eos_id)
                          if i is not None), None)
            ids = [start]
        return self._turn(ids, chat=False, entries=[{"role": "prompt", "content": text}], max_new=max_new_tokens,
                          sampling=sampling, stop=stop)

    def next_token_logits(self, message: str | Sequence[dict]) -> Tensor:
        """Logits [V] the model would start its reply to ``message`` with, from the current memory; changes nothing."""
        msgs = self._messages(message)
        ids = self._chat_ids(msgs, fresh=self._starts_fresh())
        with self._weights(apply=self.mode != "stateless", learn=False):
            logits, _ = self.engine.prefill(torch.tensor([ids], dtype=torch.long), self._start_state())
        return logits[0].float().clone()

    def _messages(self, message) -> list[dict]:
        if isinstance(message, str):
            return [{"role": "user", "content": message}]
        msgs = list(message)
        if not msgs:
            raise UserError("no message to answer")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(f"message {i}: need {{'role': one of {ROLES}, 'content': str}}, got {m!r:.80}")
        if msgs[-1]["role"] == "assistant":
            raise UserError("the last message is the assistant's: nothing to answer")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]

    def _starts_fresh(self) -> bool:
        return self.mode == "stateless" or self.tokens_seen == 0

    def _chat_ids(self, msgs: list[dict], *, fresh: bool) -> list[int]:
        if fresh and self.system and not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": self.system}] + msgs
        return render_prompt(self.tokenizer, msgs)

    def _start_state(self) -> ModelState:
        return self._fresh() if self.mode == "stateless" else self.state

    @contextlib.contextmanager
    def _weights(self, *, apply: bool, learn: bool):
        """Swap this session's CMS deltas into the shared model for the duration of a turn (and learn); yields the
        base snapshot (None for a model without CMS). The base weights are restored bit-exactly afterwards.

        Every turn on a CMS model holds the model's lock, even one that applies and learns nothing: another
        session's deltas may be in the weights until its turn ends."""
        if not self.has_cms:
            yield None
            return
        with _weights_lock(self.model):
            base = cms_snapshot(self.model)
            try:
                if apply and self.cms:
                    apply_cms_deltas(self.model, self.cms)
                yield base
            finally:
                params = dict(cms_online_params(self.model))
                with torch.no_grad():
                    for name, b in base.items():
                        params[name].copy_(b)

    def _turn(self, ids: list[int], *, chat: bool, entries: list[dict], max_new: int | None,
              sampling: SamplingConfig | None, stop: Sequence[str] | None) -> Turn:
        max_new = self.max_new_tokens if max_new is None else int(max_new)
        if max_new < 0:
            raise UserError(f"max_new_tokens={max_new} must be ≥ 0")
        V = self.engine.vocab_size
        if any(not 0 <= t < V for t in ids):
            raise UserError(f"the prompt has token ids outside the model's vocabulary [0, {V})")
        turn = Turn(iter(()))
        turn._it = self._run(turn, ids, chat, entries, max_new, sampling or self.sampling,
                             tuple(self.stop if stop is None else stop))
        return turn

    def _run(self, turn: Turn, ids: list[int], chat: bool, entries: list[dict], max_new: int,
             cfg: SamplingConfig, stops: tuple[str, ...]) -> Iterator[str]:
        t0 = time.time()
        tok, eng = self.tokenizer, self.engine
        end = marker_ids(tok, END)
        stop_set = set(chat_stop_ids(tok)) if chat else {tok.eos_id}
        if chat and END not in tok.special_tokens:
            stops = stops + (END,)  # a foreign tokenizer spells the end marker as text
        writes, carry = self.writes_memory, self.mode != "stateless"
        learn_cms = writes and self.has_cms
        tracker = _TextTracker(tok, tuple(s for s in stops if s))
        gen = make_generator(cfg.seed, eng.device)
        history = list(ids) if cfg.penalize_prompt else []
        out: list[int] = []
        surprise: list[float] = []
        entropy: list[float] = []
        reason = "length"
        with session_indexes(self), self._islet(ids) as islet, self._weights(apply=carry, learn=learn_cms) as base:
            logits, st = eng.prefill(torch.tensor([ids], dtype=torch.long), self._start_state())
            while len(out) < max_new:
                t, lp, ent = self._choose(logits[:, :eng.sample_vocab], history, cfg, gen)
                out.append(t)
                surprise.append(-lp)
                entropy.append(ent)
                if cfg.uses_history:
                    history.append(t)
                logits, st = eng.step([t], st)  # every token is fed: the state holds the whole reply
                if t in stop_set:
                    reason = "eos" if t == tok.eos_id else "stop"
                    break
                if tracker.push(t):
                    reason = "stop"
                    break
                piece = tracker.take()
                if piece:
                    yield piece
            tracker.finish()
            piece = tracker.take()
            if piece:
                yield piece
            fed = list(ids) + out
            closed = bool(out) and (out[-1] in stop_set or END not in tok.special_tokens and tracker.text.endswith(END))
            if chat and not closed:
                _, st = eng.prefill(torch.tensor([end], dtype=torch.long), st)  # close the turn in the memory
                fed += end
            cms_loss, new_cms = None, None
            if learn_cms:
                cms_loss = self._cms_learn(fed)
                new_cms = cms_deltas(self.model, base)
        # ---- commit (only reached when the turn ran to its end)
        if writes:
            self.state = _plain(st)
            if new_cms is not None:
                self.cms = new_cms
        reply = tracker.final_text
        self.turns += 1
        now = time.time()
        self.updated = now
        for e in entries:
            self.transcript.append({"turn": self.turns, **e, "time": round(now, 3)})
        self.transcript.append({"turn": self.turns, "role": "assistant" if chat else "completion", "content": reply,
                                "time": round(now, 3), "tokens": len(out), "finish_reason": reason,
                                "surprise_mean": round(sum(surprise) / len(surprise), 4) if surprise else 0.0})
        result = TurnResult(reply=reply, token_ids=out, finish_reason=reason, prompt_tokens=len(ids),
                            surprise=surprise, entropy=entropy, turn=self.turns, state_hash=self.state_hash(),
                            controller=None if self.controller is None else self.controller.snapshot(),
                            cms_loss=cms_loss, elapsed=time.time() - t0, islet=islet)
        turn._result = result
        if self.mode == "persistent":
            self._save(self.session_id)

    def _islet(self, ids: list[int]):
        """Context of one turn: the model's islet bank (``model.islet_bank``, loaded beside the model) picks the islet
        whose key best matches this turn's new tokens and keeps its deltas on for the prefill, the reply and the
        CMS learning of the turn (yields its name, or None)."""
        bank = getattr(self.model, "islet_bank", None)
        if bank is None or not bank.islets:
            return contextlib.nullcontext()
        return bank.routed(torch.tensor([ids], dtype=torch.long))

    def _choose(self, logits: Tensor, history: list[int], cfg: SamplingConfig,
                gen: torch.Generator | None) -> tuple[int, float, float]:
        """(token, log p under the model, entropy) for logits [1, V]."""
        with torch.inference_mode():
            if self.controller is not None:
                filtered = None
                if cfg.uses_history and history:
                    ids, valid = as_history([history], None, 1, logits.device)
                    filtered = penalize(logits.float(), ids, valid, cfg)
                s, _ = self.controller.choose(logits, gen, filtered=filtered)
            else:
                s = sample(logits, [history] if cfg.uses_history else None, cfg, gen)
        return int(s.tokens[0]), float(s.logprobs[0]), float(s.entropy[0])

    def _cms_learn(self, fed: list[int]) -> float | None:
        """Append the turn's ids to the CMS buffer; one online step per C tokens (each window read from a fresh
        state — the buffer alone decides what is learned, so a reloaded session continues identically)."""
        self.cms_buffer.extend(fed)
        loss = None
        C = self.cms_every
        while len(self.cms_buffer) >= C + 1:
            loss = cms_online_step(self.model, self.cms_buffer[:C + 1], lr=self.cms_lr)
            self.cms_buffer = self.cms_buffer[C:]
        return loss

    # ----------------------------------------------------------------------------------- settings
    def set_mode(self, mode: str) -> None:
        """Switch memory mode. To ``persistent``: the current memory is saved under the session id at once."""
        self._check_mode(mode)
        self.mode = mode
        if mode == "persistent":
            self._save(self.session_id)

    def set_learning(self, on: bool) -> None:
        self.learning = bool(on)

    def reset(self) -> None:
        """Forget everything: fresh memory, empty transcript, no CMS deltas, controller restarted. A persistent
        session saves the fresh memory; a readonly one refuses."""
        if self.mode == "readonly":
            raise UserError("readonly session: reset would change its memory (switch mode first)")
        self.state = self._fresh()
        self.transcript, self.turns = [], 0
        self.cms, self.cms_buffer = {}, []
        if self.controller is not None:
            self.controller.reset()
        if self.mode == "persistent":
            self._save(self.session_id)

    def save(self, session_id: str | None = None) -> str:
        """Save the memory now (under ``session_id``, default this session's id); returns the id used."""
        if self.mode == "readonly":
            raise UserError("readonly session: saving is off")
        if self.store is None:
            raise UserError("no store to save to")
        sid = session_id or self.session_id
        if sid is None:
            raise UserError("give a session id to save under")
        validate_session_id(sid)
        self._save(sid)
        if self.session_id is None:
            self.session_id = sid
        return sid

    def fork(self, new_id: str) -> str:
        """Save the current memory as a new session ``new_id`` and continue in it (the old one keeps what it had)."""
        if self.store is None:
            raise UserError("fork needs a store")
        validate_session_id(new_id)
        if self.store.exists(new_id):
            raise UserError(f"session {new_id!r} already exists")
        self._save(new_id)
        self.session_id = new_id
        return new_id

    # ------------------------------------------------------------------------------------- persistence
    def _header(self) -> dict:
        return {"created": self.created, "turns": self.turns, "mode": self.mode, "learning": self.learning,
                "controller": None if self.controller is None else self.controller.state_dict(),
                "cms_buffer": list(self.cms_buffer), "memlm": "session-v1"}

    def _save(self, sid: str) -> None:
        self.store.save(sid, self.state, extra_header=self._header(), cms=self.cms, transcript=self.transcript)
        save_session_indexes(self, self.store.session_dir(sid), sid)

    def _load(self) -> None:
        stored = self.store.load(self.session_id, model=self.model, device=self.engine.device)
        st = stored.state
        if st.batch_size != 1:
            raise UserError(f"session {self.session_id!r}: the stored state has batch {st.batch_size}, expected 1")
        h = stored.header
        if stored.cms:
            if not self.has_cms:
                raise UserError(f"session {self.session_id!r} has CMS deltas but this model has no CMS layers")
            names = dict(cms_online_params(self.model))
            for n, d in stored.cms.items():
                if n not in names or tuple(names[n].shape) != tuple(d.shape):
                    raise UserError(f"session {self.session_id!r}: CMS delta {n!r} does not fit this model")
            self.cms = {n: d.float() for n, d in stored.cms.items()}
        ctl = h.get("controller")
        try:
            if ctl and self.controller is None:
                self.controller = SurpriseController.from_state_dict(ctl)
            elif ctl and self.controller is not None:
                self.controller.load_state_dict(ctl)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"session {self.session_id!r}: unreadable controller state ({e})") from None
        buf = h.get("cms_buffer") or []
        self.cms_buffer = [int(t) for t in buf if isinstance(t, int)]
        self.state = st
        self.turns = int(h.get("turns", 0))
        self.created = float(h.get("created", self.created))
        self.updated = h.get("updated")
        self.transcript = stored.transcript
        load_session_indexes(self, self.store.session_dir(self.session_id), self.session_id)
        self.loaded = True

    # ------------------------------------------------------------------------------------------ stats
    def state_hash(self) -> str:
        """Hash of the memory (state tensors and CMS deltas): changes iff the memory does."""
        return state_hash(self.state, self.cms)

    def stats(self) -> dict[str, Any]:
        """JSON-ready view of the session and its memory (per layer: kind, bytes, norms)."""
        out: dict[str, Any] = {
            "session_id": self.session_id, "mode": self.mode, "learning": self.learning,
            "writes_memory": self.writes_memory, "turns": self.turns, "tokens_seen": self.tokens_seen,
            "state_bytes": self.state.nbytes(), "state_hash": self.state_hash(), "created": self.created,
            "updated": self.updated, "messages": len(self.transcript),
            "store": None if self.store is None else str(self.store.root),
            "encrypted": bool(self.store is not None and self.store.encrypted),
            "layers": layer_stats(self.state.kinds, self.state.state_dict()),
            "controller": None if self.controller is None else self.controller.snapshot(),
            "cms": None,
        }
        if self.has_cms:
            norm = float(torch.sqrt(sum((d.float() ** 2).sum() for d in self.cms.values()))) if self.cms else 0.0
            out["cms"] = {"deltas": len(self.cms), "delta_norm": round(norm, 6), "buffer": len(self.cms_buffer),
                          "every": self.cms_every, "lr": self.cms_lr}
        return out
