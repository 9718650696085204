"""Cross-session recall through the real ``Session`` and ``SessionStore`` (memlm.inference): a fact is told in
session 1, N distractor sessions of unrelated text follow, and the question comes in session N+2.

Memory modes (the chat's own, DESIGN.md §7):

- ``stateless``: every turn starts from a fresh memory — recall must sit at chance (a control);
- ``session``: one Session object, every "session" a turn of it: the memory is carried in RAM;
- ``persistent``: every session is a NEW Session object with the same id over one store: the memory is loaded
  from disk at the start and saved after every turn — recall across process restarts.

Variant ``overwrite``: the fact is corrected in the middle distractor session (same phrase, new value); the truth is the
new value, the old one is among the distractors, and ``stale`` counts items where the old value ranks first.

Text is fed with ``Session.complete`` (raw text, no chat template: base models are trained on plain text); the
question is scored from ``session.state`` — the memory as the store left it — by ranking, and by greedy
generation, neither of which writes back. The same items (names, codes, distractor text) are used in every mode.

Notation: N distractor sessions, G distractor tokens in all (G/N per session).
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

from memlm.eval import metrics as M
from memlm.eval.tasks.base import example_rng, register_task
from memlm.eval.tasks.text import distinct_values, number, person_names

if TYPE_CHECKING:
    from memlm.eval.runner import EvalContext

MODES = ("stateless", "session", "persistent")


def make_item(haystack, tok, gap: int, n_sessions: int, variant: str, seed: int, index: int,
              n_distractors: int = 4) -> dict:
    """The texts of one item: ``sessions`` (list of texts, one per session; the last is empty — the question
    session), ``question``, ``choices`` (truth first), ``old`` value (overwrite) or None."""
    rng = example_rng("cross_session", seed, gap, n_sessions, variant, index)
    name = person_names(rng, 1)[0]
    old, new = distinct_values(rng, lambda r: number(r, 5), 2, avoid=set())
    sessions = [f"Please remember this: the locker code of {name} is {old}."]
    per = gap // max(n_sessions, 1)
    for _ in range(n_sessions):
        if per > 0:
            sents, _ = haystack.take(rng, per, tok)
            sessions.append(" ".join(sents))
        else:
            sessions.append("")
    if variant == "overwrite":
        k = 1 + n_sessions // 2 if n_sessions else 0
        upd = (f"A correction for {name}: the old code is no longer valid. From now on: the locker code of {name} "
               f"is {new}.")
        sessions[k] = (sessions[k] + " " + upd).strip()
    truth = new if variant == "overwrite" else old
    everything = " ".join(sessions)
    absent = distinct_values(rng, lambda r: number(r, 5), n_distractors, avoid={old, new}, forbid_in=everything)
    wrong = ([old] if variant == "overwrite" else []) + absent
    question = f"\nQuestion: what is the locker code of {name}?\nAnswer: the locker code of {name} is"
    return {"sessions": sessions, "question": question, "choices": [f" {truth}"] + [f" {w}" for w in wrong[:n_distractors]],
            "answer": truth, "old": old if variant == "overwrite" else None}


def _memory_after_sessions(ctx, store, mode: str, sid: str, texts: list[str]):
    """Feed each session's text through Session in ``mode``; return the memory the question session starts from."""
    from memlm.inference.session import Session

    if mode == "persistent":
        for t in texts:
            s = Session(ctx.model, ctx.tok, mode="persistent", store=store, session_id=sid)
            if t:
                _ = s.complete(t + "\n", max_new_tokens=0).result  # saved to the store when the turn completes
        return Session(ctx.model, ctx.tok, mode="persistent", store=store, session_id=sid).state
    s = Session(ctx.model, ctx.tok, mode=mode)
    for t in texts:
        if t:
            _ = s.complete(t + "\n", max_new_tokens=0).result
    # A stateless session never keeps a turn: its state is the fresh memory every turn starts from.
    return s.state


@register_task("cross_session", "memory", "a fact in session 1, N distractor sessions, question in session N+2, "
               "through Session (stateless / session / persistent), plus an overwritten fact", uses_lengths=False)
def run_cross_session(ctx: EvalContext) -> Iterator[dict]:
    from memlm.inference.store import SessionStore

    gaps = ctx.cfg.session_gaps if ctx.cfg.session_gaps is not None else [0, ctx.train_len]
    modes = [m for m in ctx.cfg.modes if m in MODES]
    skipped = [m for m in ctx.cfg.modes if m not in MODES]
    if skipped:
        ctx.log(f"eval cross_session: modes {skipped} do not apply (only {', '.join(MODES)})")
    hay = ctx.haystack("text")
    sc = ctx.scorer
    with tempfile.TemporaryDirectory(prefix="memlm-xs-") as root:
        store = SessionStore(root)
        for gap in gaps:
            for variant in ("recall", "overwrite"):
                for i in range(ctx.samples):
                    item = make_item(hay, ctx.tok, gap, ctx.cfg.n_sessions, variant, ctx.seed, i, ctx.n_distractors)
                    for mode in modes:
                        sid = f"xs-{variant}-{gap}-{i}-{mode}"
                        state = _memory_after_sessions(ctx, store, mode, sid, item["sessions"])
                        q = sc.encode(item["question"])
                        last, st_q = sc.feed(q, state)
                        lps = [s for s, _ in sc.choice_logprobs(st_q, last, [sc.encode(c) for c in item["choices"]])]
                        rec = {"task": "cross_session", "mode": mode, "variant": variant, "gap": gap,
                               "sessions": ctx.cfg.n_sessions, "sample": i, "rank": M.rank_score(lps, 0),
                               "chance": 1.0 / len(lps), "answers": [item["answer"]],
                               "memory_tokens": int(state.pos.max()), "state_bytes": state.nbytes()}
                        if variant == "overwrite":
                            rec["stale"] = M.rank_score(lps, 1)
                        if ctx.cfg.generate:
                            text, _ = sc.generate(state, q, len(sc.encode(" " + item["answer"])) + 4)
                            rec.update(em=M.exact_match(text, item["answer"]),
                                       contains=M.contains_all(text, [item["answer"]]), output=text[:200])
                        yield rec


__all__ = ["MODES", "make_item", "run_cross_session"]
