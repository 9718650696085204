"""Needle-in-a-haystack family, written from the public descriptions of passkey retrieval and RULER (our own
templates, keys, filler and values):

- ``passkey``: a 5-digit pass key in memlm's filler sentences;
- ``niah_single_1`` / ``_2`` / ``_3``: one key → value note; filler haystack + 7-digit number / real-text haystack
  + 7-digit number / real-text haystack + UUID;
- ``niah_multikey``: four notes with different keys, one asked; the other notes' values are the distractors;
- ``niah_multivalue``: four values under one key, all asked;
- ``niah_multiquery``: four keys, all asked;
- ``vt`` (variable tracking): a chain VAR A = n, VAR B = VAR A, … plus a distractor chain; name every variable
  holding n.

Notation: L target length (context + question, in tokens), d depth of the (first) needle in [0, 1], N needles.

``length`` is the total prompt length in tokens; the haystack fills what the instruction, needles and question
leave. ``depth`` places the queried needle (for multi-needle tasks the first one; the rest go to seeded random
depths). Ranking distractors are values of the same format that occur nowhere in the context, plus — where the task
has them — the values of the other needles (those are in the context: only binding key to value separates them).
"""
from __future__ import annotations

import itertools

from memlm.eval.tasks.base import Example, Probe, example_rng, register_task
from memlm.eval.tasks.text import Haystack, build_context, distinct_values, made_up_words, number, uuid_value

KINDS = ("passkey", "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey", "niah_multivalue",
         "niah_multiquery", "vt")
FILLER_KINDS = ("passkey", "niah_single_1", "niah_multikey", "vt")
N_MULTI = 4
VT_HOPS = 4

PASSKEY_PREFIX = "A pass key is hidden in the text below. Find it and keep it in mind.\n"
NOTE_PREFIX = ("The text below hides short notes about vault numbers. Read everything carefully: a question about "
               "the notes comes at the end.\n")
VT_PREFIX = "The text below hides variable assignments. Follow them carefully: a question comes at the end.\n"


def _note(key: str, value: str, what: str = "vault number") -> str:
    return f"One more note: the {what} for {key} is {value}."


def _ask(key: str, what: str = "vault number") -> str:
    return f"\nQuestion: what is the {what} for {key}?\nAnswer: the {what} for {key} is"


def make_niah(kind: str, tok, haystack: Haystack, length: int, depth: float | None, seed: int, index: int,
              n_distractors: int = 4) -> Example:
    """One example of ``kind`` (see the module docstring) of about ``length`` tokens with its needle at ``depth``."""
    if kind not in KINDS:
        raise ValueError(f"unknown NIAH kind {kind!r}; kinds: {', '.join(KINDS)}")
    if kind == "vt":
        return _make_vt(tok, haystack, length, seed, index, n_distractors)
    rng = example_rng("niah", kind, seed, length, depth, index)
    d0 = 0.5 if depth is None else float(depth)
    what = "vault code" if kind == "niah_single_3" else "vault number"
    make = uuid_value if kind == "niah_single_3" else (lambda r: number(r, 5 if kind == "passkey" else 7))
    n_needles = N_MULTI if kind in ("niah_multikey", "niah_multivalue", "niah_multiquery") else 1
    keys = made_up_words(rng, 1 if kind == "niah_multivalue" else n_needles)
    values = distinct_values(rng, make, n_needles, avoid=set())
    depths = [d0] + [rng.random() for _ in range(n_needles - 1)]
    if kind == "passkey":
        prefix, needles = PASSKEY_PREFIX, [f"The pass key is {values[0]}. Remember it: {values[0]} is the pass key."]
        question = "\nWhat is the pass key? The pass key is"
    elif kind == "niah_multivalue":
        prefix = NOTE_PREFIX
        needles = [f"One more note: one of the vault numbers for {keys[0]} is {v}." for v in values]
        question = f"\nQuestion: what are all the vault numbers for {keys[0]}?\nAnswer: the vault numbers for {keys[0]} are"
    else:
        prefix, needles = NOTE_PREFIX, [_note(k, v, what) for k, v in zip(keys, values)]
        question = _ask(keys[0], what)
        if kind == "niah_multiquery":
            names = ", ".join(keys[:-1]) + f" and {keys[-1]}"
            question = f"\nQuestion: what are the vault numbers for {names}?\nAnswer: the vault numbers are"
    overhead = len(tok.encode(prefix)) + sum(len(tok.encode(" " + n)) for n in needles) + len(tok.encode(question))
    built = build_context(tok, haystack, rng, max(0, length - overhead), list(zip(depths, needles)), prefix=prefix)
    absent = distinct_values(rng, make, n_distractors, avoid=set(values), forbid_in=built.text)
    probes: list[Probe]
    if kind == "niah_multikey":
        hard = values[1:][:n_distractors]
        probes = [Probe(question, [f" {values[0]}"] + [f" {v}" for v in hard + absent[:n_distractors - len(hard)]])]
        answers = [values[0]]
    elif kind == "niah_multivalue":
        probes = [Probe(question, [f" {v}"] + [f" {a}" for a in absent]) for v in values]
        answers = values
    elif kind == "niah_multiquery":
        probes = []
        for i, (k, v) in enumerate(zip(keys, values)):
            others = [values[j] for j in range(n_needles) if j != i][:n_distractors]
            probes.append(Probe(_ask(k, what), [f" {v}"] + [f" {o}" for o in others + absent[:n_distractors - len(others)]]))
        answers = values
    else:
        probes = [Probe(question, [f" {values[0]}"] + [f" {a}" for a in absent])]
        answers = [values[0]]
    meta = {"length": length, "depth": depth, "n_tokens": built.n_tokens + len(tok.encode(question)),
            "context_tokens": built.n_tokens, "needle_pos": built.positions, "needle_depths": built.depths,
            "haystack": haystack.kind, "keys": keys, "values": values}
    return Example(kind, built.text, question, answers, probes, meta)


def _make_vt(tok, haystack: Haystack, length: int, seed: int, index: int, n_distractors: int) -> Example:
    rng = example_rng("niah", "vt", seed, length, index)
    names = [w.upper() for w in made_up_words(rng, 2 * (VT_HOPS + 1) + n_distractors)]
    chain, other, spare = names[:VT_HOPS + 1], names[VT_HOPS + 1:2 * (VT_HOPS + 1)], names[2 * (VT_HOPS + 1):]
    nums = distinct_values(rng, lambda r: number(r, 5), 2, avoid=set())

    def statements(ch: list[str], n: str) -> list[str]:
        return [f"VAR {ch[0]} = {n}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(ch)]

    main, dist = statements(chain, nums[0]), statements(other, nums[1])
    # Each chain in order at sorted random depths, the two chains interleaved.
    d_main, d_dist = sorted(rng.random() for _ in main), sorted(rng.random() for _ in dist)
    inserts = sorted(list(zip(d_main, main)) + list(zip(d_dist, dist)), key=lambda p: p[0])
    question = (f"\nQuestion: which variables hold the value {nums[0]}?\nAnswer: the variables that hold {nums[0]} "
                f"are")
    overhead = len(tok.encode(VT_PREFIX)) + sum(len(tok.encode(" " + s)) for _, s in inserts) + \
        len(tok.encode(question))
    built = build_context(tok, haystack, rng, max(0, length - overhead), inserts, prefix=VT_PREFIX)
    probes = []
    for i, n in enumerate(chain):
        listed = "".join(f" {c}," for c in chain[:i])
        wrong = (other + spare)[:n_distractors]
        probes.append(Probe(question + listed, [f" {n}"] + [f" {w}" for w in wrong]))
    pos = dict(zip([s for _, s in inserts], built.positions))
    meta = {"length": length, "depth": None, "n_tokens": built.n_tokens + len(tok.encode(question)),
            "context_tokens": built.n_tokens, "needle_pos": [pos[s] for s in main], "haystack": haystack.kind,
            "chain": chain, "distractor_chain": other, "value": nums[0]}
    return Example("vt", built.text, question, chain, probes, meta)


def _run(ctx, kind: str):
    hay = ctx.haystack("filler" if kind in FILLER_KINDS else "text")
    depths = [None] if kind == "vt" else ctx.depths
    for L in ctx.lengths:
        for d in depths:
            for i in range(ctx.samples):
                ex = make_niah(kind, ctx.tok, hay, L, d, ctx.seed, i, ctx.n_distractors)
                yield ctx.score(ex) | {"sample": i}


def _register(kind: str, description: str) -> None:
    register_task(kind, "niah", description)(lambda ctx: _run(ctx, kind))


_register("passkey", "5-digit pass key in filler sentences, at every depth and length")
_register("niah_single_1", "one key→7-digit value note in filler sentences")
_register("niah_single_2", "one key→7-digit value note in real text")
_register("niah_single_3", "one key→UUID note in real text")
_register("niah_multikey", "four notes with different keys in filler, one asked (other values are distractors)")
_register("niah_multivalue", "four values under one key in real text, all asked")
_register("niah_multiquery", "four keys in real text, all asked")
_register("vt", "variable tracking: a 4-hop VAR chain plus a distractor chain in filler; name every variable")

__all__ = ["KINDS", "make_niah"]
