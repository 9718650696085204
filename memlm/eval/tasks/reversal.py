"""Reversal curse, in memory: facts like "A's mentor is B." are written into a fresh memory (followed by filler up
to the eval length), then one is asked forward ("A's mentor is" → B) and in reverse ("B is the mentor of" → A).
Names are made up and the templates are memlm's own.

No leak, by construction and by test: every item starts from a fresh state; the forward and the reverse probe are
each scored from the state right after fact + filler + *their own* question — the reverse probe never sees the
forward question or its answer, and no item sees another item (seed defect 10: a memory updated with the forward
fact's question and answer before the reverse one is scored).

Notation: L context length in tokens (fact + filler), A/B the two names of an item.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from memlm.eval.tasks.base import Example, Probe, example_rng, register_task
from memlm.eval.tasks.text import build_context, person_names

if TYPE_CHECKING:
    from memlm.eval.runner import EvalContext

# (fact, forward question → B, reverse question → A)
TEMPLATES = (
    ("{a}'s mentor is {b}.", "\n{a}'s mentor is", "\n{b} is the mentor of"),
    ("{a} was raised by {b}.", "\n{a} was raised by", "\n{b} raised"),
    ("{a} sold the old mill to {b}.", "\n{a} sold the old mill to", "\n{b} bought the old mill from"),
    ("The portrait of {a} was painted by {b}.", "\nThe portrait of {a} was painted by", "\n{b} painted the portrait of"),
)
PREFIX = "Here are some facts worth remembering.\n"
N_FACTS = 4


def make_reversal(tok, haystack, length: int, seed: int, index: int, n_distractors: int = 4) -> tuple[Example, Example]:
    """(forward example, reverse example) of one item; both share the same context text.

    The context holds N_FACTS facts of one template about different name pairs (the asked one at a random place
    among them), then filler up to ``length`` tokens. Distractors are first the other facts' names — present in
    memory, so only the binding of the two names separates them — then made-up names from nowhere."""
    rng = example_rng("reversal", seed, length, index)
    names = person_names(rng, 2 * N_FACTS + 2 * n_distractors)
    pairs = [(names[2 * i], names[2 * i + 1]) for i in range(N_FACTS)]
    spare = names[2 * N_FACTS:]
    tmpl_fact, tmpl_fq, tmpl_rq = rng.choice(TEMPLATES)
    order = list(range(N_FACTS))
    rng.shuffle(order)
    facts = " ".join(tmpl_fact.format(a=pairs[i][0], b=pairs[i][1]) for i in order)
    a, b = pairs[0]
    fq, rq = tmpl_fq.format(a=a, b=b), tmpl_rq.format(a=a, b=b)
    overhead = len(tok.encode(PREFIX + facts)) + len(tok.encode(rq))
    built = build_context(tok, haystack, rng, max(0, length - overhead), [(0.0, facts)], prefix=PREFIX)
    wrong_b = ([p[1] for p in pairs[1:]] + spare[:n_distractors])[:n_distractors]
    wrong_a = ([p[0] for p in pairs[1:]] + spare[n_distractors:])[:n_distractors]
    meta = {"length": length, "n_tokens": built.n_tokens, "fact": tmpl_fact.format(a=a, b=b),
            "facts_pos": built.positions[0], "n_facts": N_FACTS}
    fwd = Example("reversal", built.text, fq, [b], [Probe(fq, [f" {b}"] + [f" {o}" for o in wrong_b])],
                  meta | {"direction": "forward"})
    rev = Example("reversal", built.text, rq, [a], [Probe(rq, [f" {a}"] + [f" {o}" for o in wrong_a])],
                  meta | {"direction": "reverse"})
    return fwd, rev


@register_task("reversal", "reversal", "reversal curse in memory: fact written, asked forward and in reverse (no leak)")
def run_reversal(ctx: EvalContext) -> Iterator[dict]:
    hay = ctx.haystack("filler")
    for L in ctx.lengths:
        for i in range(ctx.samples):
            for ex in make_reversal(ctx.tok, hay, L, ctx.seed, i, ctx.n_distractors):
                # ctx.score starts from a fresh state: nothing of another item or direction is in the memory.
                yield ctx.score(ex) | {"sample": i}


__all__ = ["TEMPLATES", "make_reversal"]
