"""The scorer against direct computations, retrieval scored end to end through a perfect in-context copier, and
no task leaking its answer (or another probe's question) into the memory a score is computed from."""
from __future__ import annotations

import json
import math

import pytest
import torch
from eval_oracle import InductionOracle, history

import memlm
from memlm.data.tokenizer import load_tokenizer
from memlm.eval.runner import EvalConfig, EvalContext, Scorer, run_eval
from memlm.eval.tasks import TASKS
from memlm.eval.tasks.babilong import make_babilong
from memlm.eval.tasks.cross_session import make_item
from memlm.eval.tasks.mqar import MQARSettings, eval_mqar, state_bytes, train_mqar, width_variant
from memlm.eval.tasks.niah import KINDS, make_niah
from memlm.eval.tasks.perplexity import PROBE_LABEL
from memlm.eval.tasks.reversal import make_reversal

TOK = load_tokenizer("byte")


@pytest.fixture(scope="module")
def debug_model():
    torch.manual_seed(0)
    return memlm.build_model("gated-deltanet-debug").eval()


def _ctx(model, **kw):
    kw.setdefault("lengths", [300])
    kw.setdefault("samples", 1)
    return EvalContext(model, TOK, EvalConfig(**kw), train_len=128, log=lambda s: None)


# ------------------------------------------------------------------------------------------- scorer


def test_nll_modes_against_direct_forwards(debug_model):
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (150,)).tolist()
    sc = Scorer(debug_model, TOK, prefill_chunk=32)
    with torch.no_grad():
        full = torch.log_softmax(debug_model(torch.tensor([ids]))[0][0].float(), -1)
    want = -full[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    carry = sc.nll_tokens(ids, segment=64, mode="carry")
    assert torch.allclose(carry, want, atol=1e-4)  # segments + chunks with the state carried = one forward
    reset = sc.nll_tokens(ids, segment=64, mode="reset")
    frozen = sc.nll_tokens(ids, segment=64, mode="frozen")
    nan_at = [i for i in range(149) if math.isnan(float(reset[i]))]
    assert nan_at == [63, 127] and [i for i in range(149) if math.isnan(float(frozen[i]))] == [63, 127]
    for a in (0, 64, 128):
        seg = ids[a:a + 64]
        with torch.no_grad():
            lr = torch.log_softmax(debug_model(torch.tensor([seg]))[0][0].float(), -1)
            lf = torch.log_softmax(debug_model(torch.tensor([seg]), None, None, False)[0][0].float(), -1)
        tgt = torch.tensor(seg[1:])[:, None]
        assert torch.allclose(reset[a:a + len(seg) - 1], -lr[:-1].gather(-1, tgt)[:, 0], atol=1e-4)
        assert torch.allclose(frozen[a:a + len(seg) - 1], -lf[:-1].gather(-1, tgt)[:, 0], atol=1e-4)
    assert not torch.allclose(carry[64:127], reset[64:127], atol=1e-3)  # the carried memory does change things


def test_choice_logprobs_batched_equals_sequential_equals_full_forward(debug_model):
    ctx_ids = TOK.encode("The pass key is 4711. Remember it. The pass key is")
    choices = [TOK.encode(c) for c in (" 4711", " 9", " 12345678", " 4711")]
    sc = Scorer(debug_model, TOK)
    last, st = sc.feed(ctx_ids)
    batched = sc.choice_logprobs(st, last, choices)
    sc.max_batch_bytes = 0  # forces one candidate at a time
    seq = sc.choice_logprobs(st, last, choices)
    for (a, ga), (b, gb), c in zip(batched, seq, choices):
        ids = ctx_ids + c
        with torch.no_grad():
            lp = torch.log_softmax(debug_model(torch.tensor([ids]))[0][0].float(), -1)
        want = sum(float(lp[t - 1, ids[t]]) for t in range(len(ctx_ids), len(ids)))
        assert a == pytest.approx(want, abs=1e-4) and b == pytest.approx(want, abs=1e-4) and ga == gb
    assert batched[0] == batched[3]  # the state is not consumed by scoring


# ------------------------------------------------------------------------------- retrieval, end to end


@pytest.mark.parametrize("kind", ["passkey", "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey"])
def test_a_perfect_copier_retrieves_every_needle_at_every_depth(kind):
    ctx = _ctx(InductionOracle())
    hay = ctx.haystack("filler" if kind in ("passkey", "niah_single_1", "niah_multikey") else "text")
    for depth in (0.0, 0.5, 1.0):
        for L in (200, 900):
            r = ctx.score(make_niah(kind, TOK, hay, L, depth, 0, 0))
            assert r["rank"] == 1.0 and r["em"] == 1.0 and r["contains"] == 1.0, (kind, depth, L, r["output"])
            assert r["chance"] == pytest.approx(0.2)


def test_without_the_needle_in_memory_retrieval_is_at_chance():
    """The same question from a memory that never saw the context: the copier has nothing to copy."""
    sc = Scorer(InductionOracle(), TOK)
    scores = []
    for i in range(12):
        ex = make_niah("niah_single_1", TOK, _ctx(InductionOracle()).haystack("filler"), 300, 0.5, 0, i)
        p = ex.probes[0]
        last, st = sc.feed(sc.encode("Unrelated words only." + p.question))
        lps = [s for s, _ in sc.choice_logprobs(st, last, [sc.encode(c) for c in p.choices])]
        from memlm.eval.metrics import rank_score
        scores.append(rank_score(lps, p.label))
    assert sum(scores) / len(scores) < 0.5


def _spy(ctx):
    seen = []
    ctx.scorer.hooks.append(lambda kind, state, payload: seen.append((kind, history(state), payload)))
    return seen


@pytest.mark.parametrize("kind", list(KINDS) + ["babilong_qa1", "babilong_qa3", "reversal"])
def test_no_leak_every_score_sees_exactly_context_plus_its_own_question(kind):
    ctx = _ctx(InductionOracle())
    if kind.startswith("babilong"):
        exs = [make_babilong(int(kind[-1]), TOK, ctx.haystack("text"), 400, 0, 0)]
    elif kind == "reversal":
        exs = list(make_reversal(TOK, ctx.haystack("filler"), 300, 0, 0))
    else:
        exs = [make_niah(kind, TOK, ctx.haystack("text"), 400, 0.5, 0, 0)]
    for ex in exs:
        seen = _spy(ctx)
        ctx.score(ex)
        c = TOK.encode(ex.context)
        choice_calls = [s for s in seen if s[0] == "choices"]
        assert len(choice_calls) == len(ex.probes)
        for (_, hist, payload), p in zip(choice_calls, ex.probes):
            assert hist == c + TOK.encode(p.question)  # nothing else: no candidate, no other probe, no answer
            assert [TOK.decode(x) for x in payload] == p.choices
        gen = [s for s in seen if s[0] == "generate"]
        assert len(gen) == 1 and gen[0][1] == c and gen[0][2] == TOK.encode(ex.question)
        ctx.scorer.hooks.clear()


def test_reversal_reverse_probe_never_sees_the_forward_question_or_answer(debug_model):
    """Seed defect 10. The reverse score equals the clean computation (fresh state → context → reverse question)
    and differs from the leaky one (forward question + answer fed first), so this test can fail."""
    ctx = _ctx(debug_model)
    fwd, rev = make_reversal(TOK, ctx.haystack("filler"), 200, 0, 0)
    sc = ctx.scorer
    rec = ctx.score(rev)
    cands = [sc.encode(c) for c in rev.probes[0].choices]

    def scores(prefix_text):
        last, st = sc.feed(sc.encode(prefix_text))
        return [s for s, _ in sc.choice_logprobs(st, last, cands)]

    clean = scores(rev.context + rev.question)
    leaky = scores(rev.context + fwd.question + fwd.probes[0].choices[0] + rev.question)
    from memlm.eval.metrics import rank_score
    assert rec["rank"] == rank_score(clean, 0)
    assert max(abs(a - b) for a, b in zip(clean, leaky)) > 1e-3
    # and through the oracle's history: every item and direction starts from a fresh memory holding one item's
    # context and one question (the prefix line ends with the first newline, the question opens the second)
    octx = _ctx(InductionOracle(), lengths=[120], samples=2)
    seen = _spy(octx)
    recs = list(TASKS["reversal"].fn(octx))
    assert len(recs) == 4
    calls = [TOK.decode(h) for k, h, _ in seen if k == "choices"]
    assert len(calls) == 4
    for text, r in zip(calls, recs):
        assert text.count("Here are some facts") == 1 and text.count("\n") == 2
        assert text.startswith("Here are some facts") and r["fact"] in text
    assert len({c.split("\n")[1] for c in calls}) == 2  # two different items


def test_cross_session_modes_through_session_and_store():
    ctx = _ctx(InductionOracle(), samples=2, session_gaps=[0, 120], n_sessions=2)
    seen = _spy(ctx)
    recs = list(TASKS["cross_session"].fn(ctx))
    assert len(recs) == 2 * 2 * 2 * 3  # gaps × variants × samples × modes
    by = {}
    for r in recs:
        by.setdefault((r["mode"], r["variant"]), []).append(r)
    for v in ("recall", "overwrite"):
        assert all(r["rank"] == 1.0 and r["em"] == 1.0 for r in by[("session", v)])
        assert all(r["rank"] == 1.0 and r["em"] == 1.0 for r in by[("persistent", v)])
        assert all(r["memory_tokens"] == 0 for r in by[("stateless", v)])
    assert all(r["stale"] == 0.0 for r in by[("persistent", "overwrite")])
    # what the memory held when each question was scored: stateless — the question only (a fresh memory);
    # session and persistent (reloaded from the store by a new Session object) — every session's text, in order
    calls = [h for k, h, _ in seen if k == "choices"]
    assert len(calls) == len(recs)
    hay = ctx.haystack("text")
    for r, h in zip(recs, calls):
        it = make_item(hay, TOK, r["gap"], 2, r["variant"], 0, r["sample"])
        q = TOK.encode(it["question"])
        if r["mode"] == "stateless":
            assert h == q
        else:
            assert h == TOK.encode("".join(t + "\n" for t in it["sessions"] if t)) + q


# ------------------------------------------------------------------------------- runner and report


def test_run_eval_writes_records_summary_report_and_plots(tmp_path):
    cfg = EvalConfig(tasks=["ppl", "stream", "probe", "passkey", "degeneration"], lengths=[150, 300], depths=[0.0, 1.0],
                     samples=1, max_docs=2, degen_prompts=2, degen_tokens=24)
    records = run_eval(InductionOracle(), TOK, cfg, tmp_path, train_len=128, meta={"model": "oracle"},
                       log=lambda s: None)
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == len(records) > 10
    assert {r["task"] for r in lines} == {"ppl", "stream", "probe", "passkey", "degeneration"}
    pk = [r for r in lines if r["task"] == "passkey"]
    assert len(pk) == 4 and all(r["rank"] == 1.0 for r in pk)
    probe = next(r for r in lines if r["task"] == "probe" and r["kind"] == "overall")
    assert probe["label"] == PROBE_LABEL and "update=False" in probe["label"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["summary"]["tasks"]["passkey"]["overall"]["rank"] == 1.0
    report = (tmp_path / "report.md").read_text()
    for section in ("## Perplexity", "## Memory on/off probe", "## Streaming perplexity", "## Degeneration",
                    "| passkey |"):
        assert section in report
    pytest.importorskip("matplotlib")
    for png in ("niah_passkey.png", "ppl_by_position.png", "stream.png", "probe.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_keep_going_turns_a_failing_task_into_an_error_row(tmp_path, monkeypatch):
    def boom(ctx):
        raise RuntimeError("broken")
        yield  # pragma: no cover

    monkeypatch.setattr(TASKS["vt"], "fn", boom)
    recs = run_eval(InductionOracle(), TOK, EvalConfig(tasks=["vt"], keep_going=True), tmp_path, log=lambda s: None)
    assert recs == [{"task": "vt", "error": "RuntimeError: broken"}]
    assert "## Errors" in (tmp_path / "report.md").read_text()
    with pytest.raises(RuntimeError):
        run_eval(InductionOracle(), TOK, EvalConfig(tasks=["vt"]), None, log=lambda s: None)


# ------------------------------------------------------------------------------------------------ MQAR


def test_mqar_scorer_is_exact_on_a_perfect_copier():
    s = MQARSettings(seq_len=64, vocab_size=64, batch_size=4, eval_batches=2)
    for P in (2, 8):
        assert eval_mqar(InductionOracle(vocab_size=64), s, P, "cpu") == 1.0


def test_mqar_width_variants_state_bytes_and_deterministic_training():
    base = memlm.preset("gated-deltanet-debug").model
    sizes = {}
    for w in (32, 96):
        cfg = width_variant(base, w, vocab_size=64, max_seq_len=64, n_layers=2)
        assert cfg.d_model == w and cfg.vocab_size == 64 and len(cfg.layers) == 2
        sizes[w] = state_bytes(memlm.MemoryLM(cfg), 64, "cpu")
    assert sizes[96] > sizes[32]  # a wider recurrent state holds more bytes
    gdn = memlm.MemoryLM(width_variant(base, 32, vocab_size=64, max_seq_len=64, n_layers=2))
    assert state_bytes(gdn, 64, "cpu") == state_bytes(gdn, 16, "cpu")  # a fixed-size memory
    tb = memlm.MemoryLM(width_variant(memlm.preset("transformer-debug").model, 32, vocab_size=64, max_seq_len=64,
                                      n_layers=1))
    per_token = state_bytes(tb, 33, "cpu") - state_bytes(tb, 32, "cpu")
    assert per_token > 0 and state_bytes(tb, 64, "cpu") == state_bytes(tb, 32, "cpu") + 32 * per_token  # a KV cache
    s = MQARSettings(widths=[32], pairs=[2], seq_len=32, vocab_size=32, steps=12, batch_size=8, warmup=2)
    cfg = width_variant(base, 32, vocab_size=32, max_seq_len=32, n_layers=2)
    _, l1 = train_mqar(cfg, s, "cpu")
    _, l2 = train_mqar(cfg, s, "cpu")
    assert l1 == l2 and l1[-1] < l1[0]
