"""Generators: deterministic, the answer where the example says it is, distractors absent where they must be,
and for the reasoning tasks the answer re-derived by an independent tracker from the context text."""
from __future__ import annotations

import re

import pytest

from memlm.data import demo_corpus_path
from memlm.data.tokenizer import load_tokenizer
from memlm.errors import UserError
from memlm.eval.tasks import ORDER, TASKS, expand_tasks
from memlm.eval.tasks.babilong import make_babilong
from memlm.eval.tasks.base import example_rng
from memlm.eval.tasks.cross_session import make_item
from memlm.eval.tasks.niah import KINDS, make_niah
from memlm.eval.tasks.reversal import make_reversal
from memlm.eval.tasks.text import Haystack, build_context, split_sentences

TOK = load_tokenizer("byte")
FILLER = Haystack("filler")
TEXT = Haystack(demo_corpus_path(), max_chars=400_000)


def _hay(kind):
    return FILLER if kind in ("passkey", "niah_single_1", "niah_multikey", "vt") else TEXT


def test_seeds_are_stable_across_processes():
    # Random(str) hashes the string with SHA-512: this value is the same in every process and Python build.
    assert example_rng("golden", 1, 2).random() == 0.025320421518361003


@pytest.mark.parametrize("kind", KINDS)
def test_niah_deterministic_and_seed_sensitive(kind):
    a = make_niah(kind, TOK, _hay(kind), 700, 0.5, seed=3, index=1)
    b = make_niah(kind, TOK, _hay(kind), 700, 0.5, seed=3, index=1)
    c = make_niah(kind, TOK, _hay(kind), 700, 0.5, seed=4, index=1)
    assert (a.context, a.question, a.answers, [p.choices for p in a.probes]) == \
        (b.context, b.question, b.answers, [p.choices for p in b.probes])
    assert a.answers != c.answers


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "vt"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75, 1.0])
def test_needle_is_at_the_claimed_depth_and_answers_only_in_the_needle(kind, depth):
    L = 1500
    ex = make_niah(kind, TOK, _hay(kind), L, depth, seed=0, index=2)
    ids = TOK.encode(ex.context)
    m = ex.meta
    assert len(ids) == m["context_tokens"]
    assert abs(m["n_tokens"] - L) <= 80  # within about one haystack sentence of the target
    pos = m["needle_pos"][0]
    # the first needle begins exactly at its recorded token offset (after the joining space)
    needle_text = TOK.decode(ids[pos:pos + 40]).lstrip()
    first_value = m["values"][0]
    want_prefix = "The pass key is" if kind == "passkey" else "One more note:"
    assert needle_text.startswith(want_prefix)
    assert first_value in TOK.decode(ids[pos:pos + 120])
    # depth: the fraction of the context's tokens before the needle (prefix excluded) is the claimed one
    prefix_len = len(TOK.encode(ex.context.split("\n", 1)[0] + "\n"))
    frac = (pos - prefix_len) / max(1, len(ids) - prefix_len)
    assert abs(frac - depth) <= 0.12, (frac, depth)
    # every expected answer occurs in the context (only inside the needles); absent distractors occur nowhere
    for a in ex.answers:
        assert ex.context.count(a) >= 1
    for p in ex.probes:
        assert p.label == 0 and len(set(p.choices)) == len(p.choices)
        for c in p.choices[1:]:
            if c.strip() not in m["values"]:
                assert c.strip() not in ex.context
    if kind == "niah_multikey":  # the other notes' values are the hard distractors
        assert set(m["values"][1:]) <= {c.strip() for c in ex.probes[0].choices[1:]}


def test_vt_chain_resolves_to_the_answers():
    ex = make_niah("vt", TOK, FILLER, 1200, None, seed=0, index=0)
    assign = {}
    for lhs, rhs in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", ex.context):
        assign[lhs] = assign[rhs[4:]] if rhs.startswith("VAR ") else rhs
    value = ex.meta["value"]
    assert sorted(n for n, v in assign.items() if v == value) == sorted(ex.answers)
    assert len(ex.answers) == 5 and len(assign) == 10
    # statements keep chain order in the text
    pos = [ex.context.index(f"VAR {n} =") for n in ex.answers]
    assert pos == sorted(pos)


_MOVE = re.compile(r"(\w+) (?:walked into|went over to|moved to|headed back to) the (\w+)\.")
_TAKE = re.compile(r"(\w+) (?:picked up|took|grabbed) the (\w+)\.")
_DROP = re.compile(r"(\w+) (?:put down|set) the (\w+)(?: aside)?\.")


def _track(context: str):
    """An independent world tracker over the story sentences: person → place, object → holder / place history."""
    where, holder, obj_hist = {}, {}, {}
    events = sorted([(m.start(), "move", m.groups()) for m in _MOVE.finditer(context)]
                    + [(m.start(), "take", m.groups()) for m in _TAKE.finditer(context)]
                    + [(m.start(), "drop", m.groups()) for m in _DROP.finditer(context)])
    for _, kind, (p, x) in events:
        if kind == "move":
            where[p] = x
            for o, h in holder.items():
                if h == p:
                    obj_hist.setdefault(o, []).append(x)
        elif kind == "take":
            holder[x] = p
            if p in where:
                obj_hist.setdefault(x, []).append(where[p])
        else:
            holder.pop(x, None)
    return where, obj_hist


@pytest.mark.parametrize("qa", [1, 2, 3])
def test_babilong_answer_follows_from_the_story(qa):
    for index in range(4):
        ex = make_babilong(qa, TOK, TEXT, 1200, seed=1, index=index)
        assert ex == make_babilong(qa, TOK, TEXT, 1200, seed=1, index=index)
        where, hist = _track(ex.context)
        q = ex.question
        if qa == 1:
            person = re.search(r"where is (\w+)\?", q).group(1)
            truth = where[person]
        elif qa == 2:
            obj = re.search(r"where is the (\w+)\?", q).group(1)
            truth = hist[obj][-1]
        else:
            obj, b = re.search(r"where was the (\w+) before the (\w+)\?", q).groups()
            h = [x for i, x in enumerate(hist[obj]) if i == 0 or x != hist[obj][i - 1]]
            truth = h[h.index(b) - 1]
        assert ex.answers == [truth]
        assert ex.probes[0].choices[0] == f" {truth}" and f" {truth}" not in ex.probes[0].choices[1:]
        # supporting facts are spread in order through the text
        assert ex.meta["support_pos"] == sorted(ex.meta["support_pos"])


def test_reversal_items():
    fwd, rev = make_reversal(TOK, FILLER, 400, seed=0, index=0)
    assert fwd.context == rev.context and fwd.meta["fact"] in fwd.context
    assert fwd.context.index(fwd.meta["fact"]) < 200  # facts first, filler after
    a, b = rev.answers[0], fwd.answers[0]
    assert fwd.meta["fact"].startswith(a) or f"of {a}" in fwd.meta["fact"]
    assert b in fwd.meta["fact"] and a in fwd.question and b not in fwd.question
    assert b in rev.question and a not in rev.question
    # the distractors are other facts' names, present in memory too: presence alone does not give the answer away
    assert sum(c.strip() in fwd.context for c in rev.probes[0].choices[1:]) >= 3
    assert make_reversal(TOK, FILLER, 400, seed=0, index=0)[1].probes[0].choices == rev.probes[0].choices


def test_cross_session_items():
    it = make_item(TEXT, TOK, 300, 3, "overwrite", seed=0, index=0)
    assert len(it["sessions"]) == 4 and it["old"] is not None
    assert it["old"] in it["sessions"][0]
    upd = [i for i, s in enumerate(it["sessions"]) if "From now on" in s]
    assert upd == [2] and it["answer"] in it["sessions"][2]
    assert it["choices"][0] == f" {it['answer']}" and it["choices"][1] == f" {it['old']}"
    rec = make_item(TEXT, TOK, 300, 3, "recall", seed=0, index=0)
    assert rec["old"] is None and rec["answer"] in rec["sessions"][0]
    assert all(rec["answer"] not in s for s in rec["sessions"][1:])
    assert make_item(TEXT, TOK, 300, 3, "recall", seed=0, index=0) == rec


def test_build_context_places_inserts_and_rejects_bad_depths():
    rng = example_rng("t", 0)
    b = build_context(TOK, FILLER, rng, 300, [(0.0, "FIRST."), (1.0, "LAST.")], prefix="P\n")
    assert b.text.startswith("P\nFIRST.") and b.text.endswith("LAST.")
    assert b.positions[0] == len(TOK.encode("P\n"))
    assert b.positions[1] == len(TOK.encode(b.text)) - len(TOK.encode(" LAST."))
    with pytest.raises(UserError):
        build_context(TOK, FILLER, rng, 100, [(1.5, "x")])
    assert all(len(s) <= 160 for s in split_sentences("word " * 500))


def test_task_registry_and_groups():
    assert "mqar" not in expand_tasks("default") and "mqar" in expand_tasks("all")
    assert expand_tasks(["niah", "passkey"]) == [k for k in ORDER if k in TASKS and TASKS[k].group == "niah"]
    assert set(ORDER) == set(TASKS)  # every task has its place in the report
    assert expand_tasks("babilong_qa2,ppl") == ["ppl", "babilong_qa2"]
    with pytest.raises(UserError, match="unknown eval task"):
        expand_tasks(["nope"])
