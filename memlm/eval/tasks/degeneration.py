"""Degeneration of free-running samples: prompts are the first tokens of evaluation documents; the model continues
each greedily and by sampling (temperature 0.8, top-k 40, seeded), EOS ignored so every sample has the same length.

Reported per decoding, on generated tokens and on whitespace words: distinct-1..4 (unique / all n-grams within a
sample), repeated n-gram rate (share of n-grams seen earlier in the sample), longest run of one item, longest
periodic loop, and corpus-level distinct-2 (low when samples echo each other). Reference values of the same
statistics on the human continuations of the same prompts come in the ``kind="reference"`` row.

Notation: P prompts, N new tokens per sample, n n-gram order.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from memlm.eval import metrics as M
from memlm.eval.tasks.base import register_task
from memlm.inference.sampling import SamplingConfig

if TYPE_CHECKING:
    from memlm.eval.runner import EvalContext

PROMPT_TOKENS = 32
DECODINGS = {"greedy": SamplingConfig(temperature=0.0),
             "sample": SamplingConfig(temperature=0.8, top_k=40, seed=0)}


def _stats(seqs: list[list], kind: str, decoding: str, words: list[list[str]]) -> dict:
    rows = [M.degeneration(s) for s in seqs]
    wrows = [M.degeneration(w, orders=(1, 2, 3)) for w in words]
    out = {"task": "degeneration", "kind": kind, "decoding": decoding, "samples": len(seqs)}
    for k in rows[0]:
        out[f"tok_{k}"] = M.mean(r[k] for r in rows)
    for k in wrows[0]:
        out[f"word_{k}"] = M.mean(r[k] for r in wrows)
    out["tok_corpus_distinct_2"] = M.corpus_distinct_n(seqs, 2)
    return out


@register_task("degeneration", "generation", "distinct-n, repeated n-grams, longest run/loop of greedy and sampled "
               "continuations", uses_lengths=False)
def run_degeneration(ctx: EvalContext) -> Iterator[dict]:
    N = ctx.cfg.degen_tokens
    docs = [d for d in ctx.docs() if len(d) > PROMPT_TOKENS + 8][:ctx.cfg.degen_prompts]
    if not docs:
        ctx.log("eval degeneration: no document long enough for a prompt; skipped")
        return
    refs = [d[PROMPT_TOKENS:PROMPT_TOKENS + N] for d in docs]
    yield _stats(refs, "reference", "human", [ctx.tok.decode(r).split() for r in refs])
    for name, cfg in DECODINGS.items():
        seqs, words, texts = [], [], []
        for i, d in enumerate(docs):
            sampling = cfg.replace(seed=i) if cfg.temperature > 0 else cfg
            text, ids = ctx.scorer.generate(None, d[:PROMPT_TOKENS], N, stop=(), sampling=sampling, ignore_eos=True)
            seqs.append(ids)
            words.append(text.split())
            texts.append(text)
        yield _stats(seqs, "model", name, words) | {"example": texts[0][:300]}


__all__ = ["DECODINGS", "run_degeneration"]
