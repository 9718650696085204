"""The evaluation runner: crosses tasks × lengths × depths (× memory modes) through the inference engine, writes
one JSON record per measurement to ``results.jsonl`` and hands the records to ``report.py``.

Notation: B candidates scored together, T tokens, S segment length, V vocabulary, L prompt length in tokens.

``Scorer`` is the one place that touches the model: ``feed`` (prefill, optionally update=False), ``choice_logprobs``
(likelihood of each candidate continuation from one state), ``nll_tokens`` (per-token loss over a long text with
the state carried, reset per segment, or never written) and ``generate`` (greedy, through ``Engine``). Candidates
are always scored from the state right after context + question: every candidate sees the same memory and none
sees another. ``Scorer.hooks`` lets tests look at every state a score is computed from.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from memlm.errors import UserError
from memlm.eval import metrics as M
from memlm.eval.tasks import TASKS, expand_tasks
from memlm.eval.tasks.base import Example
from memlm.eval.tasks.text import Haystack
from memlm.inference.engine import Engine
from memlm.inference.sampling import SamplingConfig
from memlm.models.state import ModelState

RESULTS = "results.jsonl"
SUMMARY = "summary.json"


@dataclass(kw_only=True)
class EvalConfig:
    """What ``memlm eval`` runs. lengths are prompt lengths in tokens; depths are fractions in [0, 1]."""

    tasks: list[str] = field(default_factory=lambda: ["default"])
    lengths: list[int] = field(default_factory=lambda: [256, 512])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 2
    seed: int = 0
    n_distractors: int = 4
    generate: bool = True  # also score by greedy generation (ranking is always on)
    haystack: str | None = None  # real-text haystack source (None: the built-in demo corpus)
    data: list[str] | None = None  # documents for perplexity / streaming / degeneration (None: validation split)
    max_docs: int = 8
    segment: int | None = None  # streaming segment length (None: the training sequence length)
    modes: list[str] = field(default_factory=lambda: ["stateless", "session", "persistent"])
    session_gaps: list[int] | None = None  # cross-session distractor tokens (None: 0 and the training length)
    n_sessions: int = 3  # distractor sessions between the fact and the question
    mqar: dict[str, Any] = field(default_factory=dict)  # MQARSettings overrides
    degen_prompts: int = 6
    degen_tokens: int = 96
    prefill_chunk: int = 512
    keep_going: bool = False  # record a failing task as an error row instead of stopping


class Scorer:
    """Likelihoods, losses and greedy generations of one model (see the module docstring)."""

    def __init__(self, model, tokenizer, *, device: torch.device | str | None = None, prefill_chunk: int = 512,
                 max_batch_bytes: int = 256 << 20) -> None:
        # inference_mode off: layers that take inner gradients (test-time learning) need ordinary tensors.
        self.engine = Engine(model, tokenizer, device=device, prefill_chunk=prefill_chunk, inference_mode=False)
        self.model, self.tok, self.device = model, tokenizer, self.engine.device
        self.max_batch_bytes = max_batch_bytes
        self.hooks: list[Callable[[str, ModelState | None, Any], None]] = []

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def _hook(self, kind: str, state: ModelState | None, payload: Any) -> None:
        for h in self.hooks:
            h(kind, state, payload)

    @torch.no_grad()
    def feed(self, ids: Sequence[int], state: ModelState | None = None, *,
             update: bool = True) -> tuple[Tensor, ModelState]:
        """Feed ids (≥ 1) on top of ``state``; returns (logits of the last token [V], new state).

        update=False reads the memory without writing (one call: the state does not advance between chunks)."""
        if not len(ids):
            raise ValueError("feed needs at least one token")
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        if update:
            logits, st = self.engine.prefill(x, state)
            return logits[0], st
        hidden, st = self.model(x, state, None, False, return_hidden=True)
        return self.model.logits(hidden[:, -1])[0], st

    @torch.no_grad()
    def choice_logprobs(self, state: ModelState | None, last_logits: Tensor,
                        choices: Sequence[Sequence[int]]) -> list[tuple[float, bool]]:
        """(log p(choice | state), greedy?) per candidate token list; ``last_logits`` [V] predict each first token."""
        self._hook("choices", state, choices)
        lp0 = torch.log_softmax(last_logits.float(), -1)
        out: list[tuple[float, bool] | None] = [None] * len(choices)
        rest = []
        for i, c in enumerate(choices):
            if not len(c):
                raise ValueError("an empty candidate cannot be scored")
            if len(c) == 1:
                out[i] = (float(lp0[c[0]]), bool(int(lp0.argmax()) == c[0]))
            else:
                rest.append(i)
        if rest:
            size = state.nbytes() if state is not None else 0
            groups = [rest] if size * len(rest) <= self.max_batch_bytes else [[i] for i in rest]
            for g in groups:
                for i, r in zip(g, self._batch_logprobs(state, lp0, [list(choices[i]) for i in g])):
                    out[i] = r
        return out  # type: ignore[return-value]

    def _batch_logprobs(self, state, lp0: Tensor, cands: list[list[int]]) -> list[tuple[float, bool]]:
        n, width = len(cands), max(len(c) for c in cands) - 1
        # Right padding is harmless: a position never sees what follows it.
        x = torch.zeros(n, width, dtype=torch.long, device=self.device)
        for i, c in enumerate(cands):
            x[i, :len(c) - 1] = torch.tensor(c[:-1])
        st = None if state is None else state.repeat(n)
        logits, _ = self.model(x, st)
        lp = torch.log_softmax(logits.float(), -1)
        res = []
        for i, c in enumerate(cands):
            tgt = torch.tensor(c[1:], device=self.device)
            rows = lp[i, :len(c) - 1]
            total = float(lp0[c[0]]) + float(rows.gather(-1, tgt[:, None]).sum())
            greedy = int(lp0.argmax()) == c[0] and bool((rows.argmax(-1) == tgt).all())
            res.append((total, greedy))
        return res

    @torch.no_grad()
    def nll_tokens(self, ids: Sequence[int], *, segment: int | None = None, mode: str = "carry",
                   state: ModelState | None = None) -> Tensor:
        """Per-target loss [T − 1] of a text (entry t = −log p(ids[t+1] | ids[:t+1] and the memory)).

        mode "carry": the state runs through the whole text; "reset": a fresh state every ``segment`` tokens;
        "frozen": every segment is read with update=False from the same initial state (memory never written).
        Under "reset" and "frozen" the first token of each segment has no prediction: NaN there."""
        if mode not in ("carry", "reset", "frozen"):
            raise ValueError(f"mode {mode!r}: choose carry, reset or frozen")
        ids_t = torch.tensor(list(ids), dtype=torch.long, device=self.device)
        T = ids_t.numel()
        out = torch.full((max(T - 1, 0),), math.nan)
        S = segment or T
        chunk = self.engine.prefill_chunk
        carried = state
        prev_last: Tensor | None = None  # logits of the token before the current chunk (None: no prediction)
        for a in range(0, T, S):
            seg = ids_t[a:a + S]
            st = carried if mode == "carry" else state
            if mode != "carry":
                prev_last = None
            n_seg = seg.numel()
            pieces = [(0, n_seg)] if mode == "frozen" else [(c, min(c + chunk, n_seg)) for c in range(0, n_seg, chunk)]
            for c0, c1 in pieces:
                hidden, new = self.model(seg[None, c0:c1], st, None, mode != "frozen", return_hidden=True)
                if mode != "frozen":
                    st = new
                logits = self.model.logits(hidden[0])  # [c, V]
                lo, n = a + c0, c1 - c0
                if prev_last is not None:
                    out[lo - 1] = float(M.token_nll(prev_last, ids_t[lo]))
                if n > 1:
                    out[lo:lo + n - 1] = M.token_nll(logits[:-1], ids_t[lo + 1:lo + n]).cpu()
                prev_last = logits[-1]
            if mode == "carry":
                carried = st
        return out

    @torch.no_grad()
    def generate(self, state: ModelState | None, prompt_ids: Sequence[int], max_new_tokens: int,
                 stop: Sequence[str] = ("\n",), sampling: SamplingConfig | None = None,
                 ignore_eos: bool = False) -> tuple[str, list[int]]:
        """Greedy (or ``sampling``) continuation of ``prompt_ids`` on top of ``state``; (text, token ids)."""
        self._hook("generate", state, list(prompt_ids))
        gen = self.engine.generate_ids([list(prompt_ids)], max_new_tokens, sampling or SamplingConfig(temperature=0.0),
                                       state, stop_strings=tuple(stop), ignore_eos=ignore_eos)
        gen.run()
        row = gen.rows[0]
        return row.text or "", list(row.token_ids)


# ---------------------------------------------------------------------------------------------- context


class EvalContext:
    """What a task runner sees: the model's scorer, tokenizer, settings and shared caches."""

    def __init__(self, model, tokenizer, cfg: EvalConfig, *, train_len: int = 256, val_docs: Iterable | None = None,
                 device: torch.device | str | None = None, out_dir: Path | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.model, self.tok, self.cfg, self.log = model, tokenizer, cfg, log
        self.scorer = Scorer(model, tokenizer, device=device, prefill_chunk=cfg.prefill_chunk)
        self.device = self.scorer.device
        self.train_len, self.out_dir = train_len, out_dir
        self.lengths, self.depths = list(cfg.lengths), list(cfg.depths)
        self.samples, self.seed, self.n_distractors = cfg.samples, cfg.seed, cfg.n_distractors
        self._val_docs = val_docs
        self._haystacks: dict[str, Haystack] = {}
        self._docs: list[list[int]] | None = None

    def haystack(self, kind: str) -> Haystack:
        """"filler" (memlm's sentences) or "text" (cfg.haystack, default the built-in demo corpus)."""
        if kind not in self._haystacks:
            if kind == "filler":
                self._haystacks[kind] = Haystack("filler")
            else:
                from memlm.data import demo_corpus_path

                self._haystacks[kind] = Haystack(self.cfg.haystack or demo_corpus_path())
        return self._haystacks[kind]

    def docs(self) -> list[list[int]]:
        """Token ids of up to cfg.max_docs evaluation documents (cfg.data, else the validation split), longest text
        first within the first 8·max_docs documents read — long documents are what position buckets need."""
        if self._docs is None:
            from memlm.data.sources import open_sources, split_documents

            if self.cfg.data:
                src: Iterable = open_sources(self.cfg.data)
            elif self._val_docs is not None:
                src = self._val_docs
            else:
                from memlm.data import demo_corpus_path

                src = split_documents(open_sources(demo_corpus_path()), 10)[1]
            texts = []
            for d in src:
                t = getattr(d, "text", d if isinstance(d, str) else None)
                if t:
                    texts.append(t)
                if len(texts) >= 8 * self.cfg.max_docs:
                    break
            if not texts:
                raise UserError("no evaluation documents (give --data)")
            texts.sort(key=len, reverse=True)
            self._docs = [self.tok.encode(t) for t in texts[:self.cfg.max_docs]]
        return self._docs

    def score(self, ex: Example) -> dict[str, Any]:
        """Score one retrieval example by ranking (every probe) and, with cfg.generate, by greedy generation."""
        sc, t0 = self.scorer, time.perf_counter()
        _, st_c = sc.feed(sc.encode(ex.context))
        probe_scores, chances, cache = [], [], {}
        for p in ex.probes:
            if p.question not in cache:
                cache[p.question] = sc.feed(sc.encode(p.question), st_c)
            last_q, st_q = cache[p.question]
            lps = sc.choice_logprobs(st_q, last_q, [sc.encode(c) for c in p.choices])
            probe_scores.append(M.rank_score([s for s, _ in lps], p.label))
            chances.append(1.0 / len(p.choices))
        rec: dict[str, Any] = {"task": ex.task, **ex.meta, "rank": M.mean(probe_scores), "chance": M.mean(chances),
                               "probe_scores": probe_scores, "answers": ex.answers, "state_bytes": st_c.nbytes()}
        if self.cfg.generate:
            budget = sum(len(sc.encode(" " + a)) + 2 for a in ex.answers) + 4
            text, _ = sc.generate(st_c, sc.encode(ex.question), budget)
            rec.update(em=M.exact_match(text, ex.answers), contains=M.contains_all(text, ex.answers),
                       output=text[:200])
        rec["seconds"] = round(time.perf_counter() - t0, 4)
        return rec


# ---------------------------------------------------------------------------------------------- running


def parse_lengths(specs: Sequence[str | int], train_len: int, *, minimum: int = 1) -> list[int]:
    """"512", "4k", "2x" (× the training length), "0.5x" → token counts (sorted, unique, each ≥ minimum)."""
    out = set()
    for s in specs:
        for part in str(s).split(","):
            part = part.strip().lower()
            if not part:
                continue
            try:
                if part.endswith("x"):
                    v = float(part[:-1]) * train_len
                elif part.endswith("k"):
                    v = float(part[:-1]) * 1024
                else:
                    v = float(part)
            except ValueError:
                raise UserError(f"--lengths {part!r}: expected a token count (512, 4k) or a multiple of the "
                                f"training length (2x)") from None
            if v < minimum:
                raise UserError(f"length {part!r}: must be ≥ {minimum} tokens")
            out.add(round(v))
    return sorted(out)


def run_eval(model, tokenizer, cfg: EvalConfig, out_dir: str | Path | None = None, *, train_len: int = 256,
             val_docs: Iterable | None = None, device: torch.device | str | None = None, meta: dict | None = None,
             plots: bool = True, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run cfg.tasks; records go to ``out_dir/results.jsonl`` (appended as they come), then summary.json and
    report.md with plots. Returns the records."""
    from memlm.eval import report

    names = expand_tasks(cfg.tasks)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULTS).write_text("")
    ctx = EvalContext(model, tokenizer, cfg, train_len=train_len, val_docs=val_docs, device=device, out_dir=out,
                      log=log)
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    try:
        for name in names:
            t0 = time.perf_counter()
            n0 = len(records)
            try:
                for rec in TASKS[name].fn(ctx):
                    rec.setdefault("task", name)
                    records.append(rec)
                    if out is not None:
                        with open(out / RESULTS, "a") as f:
                            f.write(json.dumps(clean_json(rec)) + "\n")
            except UserError:
                raise
            except Exception as e:
                if not cfg.keep_going:
                    raise
                rec = {"task": name, "error": f"{type(e).__name__}: {e}"}
                records.append(rec)
                if out is not None:
                    with open(out / RESULTS, "a") as f:
                        f.write(json.dumps(clean_json(rec)) + "\n")
            log(f"eval {name}: {len(records) - n0} records in {time.perf_counter() - t0:.1f}s")
    finally:
        model.train(was_training)
    if out is not None:
        summary = report.summarize(records)
        (out / SUMMARY).write_text(json.dumps(clean_json({"meta": meta or {}, "summary": summary}), indent=2))
        report.write_report(records, out, meta=meta or {}, plots=plots)
    return records


def clean_json(o: Any) -> Any:
    """A JSON-safe copy: non-finite floats become null, tensors lists, tuples lists."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): clean_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean_json(v) for v in o]
    if isinstance(o, Tensor):
        return clean_json(o.tolist())
    if o is None or isinstance(o, (str, int, bool)):
        return o
    return str(o)


def validation_documents(train: dict, log: Callable[[str], None] = print) -> Iterable | None:
    """The validation documents of a run, split as the trainer splits them (train.val_data, else every
    val_every_doc-th document of train.data). None when they cannot be read from here (the demo corpus is used)."""
    from memlm.data.shards import INDEX
    from memlm.data.sources import open_sources, split_documents

    def reachable(specs: list[str]) -> bool:
        return all(Path(s.split(":")[0]).exists() or any(c in s for c in "*?") for s in specs)

    if train.get("val_data") and reachable(list(train["val_data"])):
        return open_sources(list(train["val_data"]))
    specs = list(train.get("data") or [])
    if not specs:
        return None
    if len(specs) == 1 and (Path(specs[0]) / INDEX).is_file():
        log("eval: the run trained on prepared shards; give --data for evaluation documents (using the demo corpus)")
        return None
    if not reachable(specs):
        log(f"eval: the run's training data {specs} is not reachable from here; using the demo corpus (give --data)")
        return None
    return split_documents(open_sources(specs, seed=int(train.get("seed", 0))), int(train.get("val_every_doc", 50)))[1]


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Records of a results.jsonl (or of a folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


__all__ = ["EvalConfig", "EvalContext", "Scorer", "clean_json", "parse_lengths", "read_results", "run_eval",
           "validation_documents"]
