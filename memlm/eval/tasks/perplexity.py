"""Language-modelling measurements on evaluation documents:

- ``ppl``: perplexity over each document up to the longest eval length with the state carried (one long context),
  overall, within the training length, and by token position in power-of-two buckets (position-wise perplexity:
  does the loss keep falling with more context, or blow up past the training length?);
- ``stream``: long documents in segments of S tokens (the training length by default), state carried from
  segment to segment vs reset at every segment: the loss per segment index;
- ``probe``: the memory on/off probe — the same text, the same weights, segments of S tokens; "on" writes memory
  as tokens arrive and carries it (update=True), "off" reads the memory but never writes it (update=False on every
  call). It measures what the memory's writes contribute, nothing else; it is not an architecture ablation.

Notation: T document tokens (truncated to L = the longest eval length), S segment length, k segment index.
Segment-first tokens are excluded from both sides of ``stream`` and ``probe`` (a reset segment cannot predict them).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from memlm.eval import metrics as M
from memlm.eval.tasks.base import register_task

if TYPE_CHECKING:
    from memlm.eval.runner import EvalContext

PROBE_LABEL = ("memory on/off probe: same weights and text; on = update=True (memory written as tokens arrive and "
               "carried across segments), off = update=False (memory read, never written); not an ablation")


@register_task("ppl", "ppl", "perplexity with the state carried: overall, within the training length, by position")
def run_ppl(ctx: EvalContext) -> Iterator[dict]:
    L = max(ctx.lengths + [ctx.train_len])
    edges = M.bucket_edges(L)
    sums = [[0.0, 0] for _ in edges[:-1]]
    tot, n, tot_in, n_in, docs = 0.0, 0, 0.0, 0, 0
    for ids in ctx.docs():
        ids = ids[:L + 1]
        if len(ids) < 2:
            continue
        nll = ctx.scorer.nll_tokens(ids)
        docs += 1
        tot += float(nll.double().sum())
        n += nll.numel()
        inside = nll[:ctx.train_len]
        tot_in += float(inside.double().sum())
        n_in += inside.numel()
        for b, (s, c) in enumerate(M.bucket_sums(nll, edges)):
            sums[b][0] += s
            sums[b][1] += c
    if n == 0:
        return
    yield {"task": "ppl", "kind": "overall", "nll": tot / n, "ppl": M.ppl(tot / n), "tokens": n, "docs": docs,
           "max_len": L, "nll_train_len": tot_in / max(n_in, 1), "ppl_train_len": M.ppl(tot_in / max(n_in, 1)),
           "train_len": ctx.train_len}
    for (a, b), (s, c) in zip(itertools.pairwise(edges), sums):
        if c:
            yield {"task": "ppl", "kind": "position", "lo": a, "hi": b, "nll": s / c, "ppl": M.ppl(s / c),
                   "tokens": c}


def _segments(ctx, modes: tuple[str, str], names: tuple[str, str], task: str, extra: dict):
    S = ctx.cfg.segment or ctx.train_len
    L = max(ctx.lengths + [2 * S])
    per = {m: {} for m in modes}  # mode → segment index → [sum, count]
    docs = 0
    for ids in ctx.docs():
        ids = ids[:L]
        if len(ids) < S + 2:  # needs a second segment to say anything
            continue
        docs += 1
        res = {m: ctx.scorer.nll_tokens(ids, segment=S, mode=m) for m in modes}
        keep = torch.ones(len(ids) - 1, dtype=torch.bool)
        keep[S - 1::S] = False  # targets that start a segment
        for m in modes:
            nll = res[m]
            for k in range(math.ceil((len(ids) - 1) / S)):
                seg = nll[k * S:(k + 1) * S][keep[k * S:(k + 1) * S]]
                acc = per[m].setdefault(k, [0.0, 0])
                acc[0] += float(seg.double().sum())
                acc[1] += seg.numel()
    if not docs:
        ctx.log(f"eval {task}: no document reaches {S + 2} tokens; skipped (give --data with longer documents)")
        return
    totals = {}
    for m, name in zip(modes, names):
        s = sum(v[0] for v in per[m].values())
        c = sum(v[1] for v in per[m].values())
        totals[name] = s / max(c, 1)
    for k in sorted(per[modes[0]]):
        row = {"task": task, "kind": "segment", "segment": k, "start": k * S, "segment_len": S, **extra}
        for m, name in zip(modes, names):
            s, c = per[m].get(k, (0.0, 0))
            row[f"nll_{name}"] = s / c if c else None
            row["tokens"] = c
        yield row
    a, b = names
    yield {"task": task, "kind": "overall", "segment_len": S, "docs": docs, f"nll_{a}": totals[a],
           f"nll_{b}": totals[b], f"ppl_{a}": M.ppl(totals[a]), f"ppl_{b}": M.ppl(totals[b]),
           "delta_nll": totals[b] - totals[a], **extra}


@register_task("stream", "ppl", "streaming perplexity over long documents: state carried vs reset per segment")
def run_stream(ctx: EvalContext) -> Iterator[dict]:
    yield from _segments(ctx, ("carry", "reset"), ("carried", "reset"), "stream", {})


@register_task("probe", "ppl", "memory on/off probe (update=True vs update=False), labelled as exactly that")
def run_probe(ctx: EvalContext) -> Iterator[dict]:
    yield from _segments(ctx, ("carry", "frozen"), ("on", "off"), "probe", {"label": PROBE_LABEL})


__all__ = ["PROBE_LABEL", "run_ppl", "run_probe", "run_stream"]
