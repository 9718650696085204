"""BABILong-style reasoning in a haystack, from the public description of BABILong / bAbI qa1–qa3 (our own small
world, names and sentence templates): a short story of people moving between rooms and carrying objects is spread,
in order, through real book text; a question at the end needs 1, 2 or 3 of its facts.

- ``babilong_qa1`` single supporting fact: "where is P?" (P's last move);
- ``babilong_qa2`` two supporting facts: "where is the O?" (P took O, then P moved);
- ``babilong_qa3`` three supporting facts: "where was the O before the B?" (P went to A, took O, went to B).

Notation: L target length in tokens, E story events, P person, O object, A/B locations.

The supporting facts are built explicitly and every other event involves other people and objects, so the answer
is unique by construction; the ranking distractors are the other locations (those named in the story first).
"""
from __future__ import annotations

import random

from memlm.eval.tasks.base import Example, Probe, example_rng, register_task
from memlm.eval.tasks.text import Haystack, build_context, made_up_words

LOCATIONS = ("kitchen", "garden", "hallway", "cellar", "attic", "workshop", "library", "stable")
OBJECTS = ("lantern", "kettle", "satchel", "compass", "ribbon", "hammer")
MOVE = ("{p} walked into the {l}.", "{p} went over to the {l}.", "{p} moved to the {l}.",
        "{p} headed back to the {l}.")
TAKE = ("{p} picked up the {o}.", "{p} took the {o}.", "{p} grabbed the {o}.")
DROP = ("{p} put down the {o}.", "{p} set the {o} aside.")
PREFIX = "The story below is scattered through a longer text. Keep track of where people and things are.\n"
N_EVENTS = {1: 8, 2: 10, 3: 12}


def _noise(rng: random.Random, people: list[str], objects: list[str], n: int) -> list[str]:
    """n events about ``people`` and ``objects`` only (never the ones the question is about)."""
    out, held, where = [], {}, {}
    for _ in range(n):
        p = rng.choice(people)
        if objects and p in where and rng.random() < 0.3:
            mine = [o for o, h in held.items() if h == p]
            free = [o for o in objects if o not in held]
            if mine and (not free or rng.random() < 0.5):
                o = rng.choice(mine)
                del held[o]
                out.append(rng.choice(DROP).format(p=p, o=o))
                continue
            if free:
                o = rng.choice(free)
                held[o] = p
                out.append(rng.choice(TAKE).format(p=p, o=o))
                continue
        loc = rng.choice([x for x in LOCATIONS if x != where.get(p)])
        where[p] = loc
        out.append(rng.choice(MOVE).format(p=p, l=loc))
    return out


def _story(qa: int, rng: random.Random) -> tuple[list[str], list[int], str, str, list[str]]:
    """(events in order, indices of the supporting facts, question, answer, locations named in the story)."""
    people = [w.capitalize() for w in made_up_words(rng, 4)]
    p, others = people[0], people[1:]
    objects = list(OBJECTS)
    rng.shuffle(objects)
    o, other_objects = objects[0], objects[1:]
    locs = list(LOCATIONS)
    rng.shuffle(locs)
    a, b = locs[0], locs[1]
    n_noise = N_EVENTS[qa] - qa
    if qa == 1:
        # P may move several times; only the last move is supporting.
        support = [rng.choice(MOVE).format(p=p, l=x) for x in (locs[2], a)]
        question = f"\nQuestion: where is {p}?\nAnswer: {p} is in the"
        answer = a
    elif qa == 2:
        support = [rng.choice(TAKE).format(p=p, o=o), rng.choice(MOVE).format(p=p, l=b)]
        question = f"\nQuestion: where is the {o}?\nAnswer: the {o} is in the"
        answer = b
    else:
        support = [rng.choice(MOVE).format(p=p, l=a), rng.choice(TAKE).format(p=p, o=o),
                   rng.choice(MOVE).format(p=p, l=b)]
        question = f"\nQuestion: where was the {o} before the {b}?\nAnswer: before the {b}, the {o} was in the"
        answer = a
    noise = _noise(rng, others, other_objects, n_noise)
    # Interleave: supporting facts keep their order, noise keeps its own order.
    slots = sorted(rng.sample(range(len(noise) + len(support)), len(support)))
    events, si, ni, sup_idx = [], 0, 0, []
    for i in range(len(noise) + len(support)):
        if si < len(support) and i == slots[si]:
            sup_idx.append(i)
            events.append(support[si])
            si += 1
        else:
            events.append(noise[ni])
            ni += 1
    named = [x for x in LOCATIONS if any(f" {x}." in e for e in events)]
    return events, sup_idx, question, answer, named


def make_babilong(qa: int, tok, haystack: Haystack, length: int, seed: int, index: int,
                  n_distractors: int = 4) -> Example:
    """One qa1/qa2/qa3 example of about ``length`` tokens (story events at sorted random depths in the text)."""
    if qa not in (1, 2, 3):
        raise ValueError(f"qa must be 1, 2 or 3, got {qa}")
    rng = example_rng("babilong", qa, seed, length, index)
    events, sup_idx, question, answer, named = _story(qa, rng)
    depths = sorted(rng.random() for _ in events)
    overhead = len(tok.encode(PREFIX)) + sum(len(tok.encode(" " + e)) for e in events) + len(tok.encode(question))
    built = build_context(tok, haystack, rng, max(0, length - overhead), list(zip(depths, events)), prefix=PREFIX)
    wrong = [x for x in named if x != answer] + [x for x in LOCATIONS if x not in named and x != answer]
    probe = Probe(question, [f" {answer}"] + [f" {w}" for w in wrong[:n_distractors]])
    meta = {"length": length, "depth": None, "n_tokens": built.n_tokens + len(tok.encode(question)),
            "context_tokens": built.n_tokens, "support_pos": [built.positions[i] for i in sup_idx],
            "n_events": len(events), "haystack": haystack.kind}
    return Example(f"babilong_qa{qa}", built.text, question, [answer], [probe], meta)


def _run(ctx, qa: int):
    hay = ctx.haystack("text")
    for L in ctx.lengths:
        for i in range(ctx.samples):
            yield ctx.score(make_babilong(qa, ctx.tok, hay, L, ctx.seed, i, ctx.n_distractors)) | {"sample": i}


for _qa, _desc in ((1, "single supporting fact (where is P?)"), (2, "two supporting facts (where is the object?)"),
                   (3, "three supporting facts (where was the object before B?)")):
    register_task(f"babilong_qa{_qa}", "babilong", f"BABILong-style qa{_qa} in book text: {_desc}")(
        lambda ctx, qa=_qa: _run(ctx, qa))

__all__ = ["LOCATIONS", "OBJECTS", "make_babilong"]
