"""Session: memory modes (stateless forgets, session carries, persistent survives a process restart, readonly never
writes), learning on/off, only new tokens fed per turn, turns cut short, cancelled turns, CMS online learning kept
per session, and the `memlm chat` REPL driven through stdin.

Notation: V vocabulary, T tokens.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading

import pytest
import torch

import memlm
from memlm.cli.main import main
from memlm.data.chat import END, marker_ids, render_prompt
from memlm.errors import UserError
from memlm.inference.sampling import SamplingConfig
from memlm.inference.session import MODES, Session
from memlm.inference.store import SessionStore
from memlm.layers.cms import cms_online_params
from memlm.ops.testing import assert_close

GREEDY = SamplingConfig(temperature=0)
FACT_PRESETS = ["transformer-debug", "deltanet-debug", "cms-debug", "titans-mag-debug"]


pytestmark = pytest.mark.usefixtures("one_thread")


_MODELS: dict[str, memlm.MemoryLM] = {}


def model_for(name: str, gain: float = 0.0) -> memlm.MemoryLM:
    """A seeded debug model; gain > 0 redraws matrices at that gain so that greedy outputs vary."""
    key = f"{name}:{gain}"
    if key not in _MODELS:
        torch.manual_seed(0)
        m = memlm.build_model(name).eval()
        if gain:
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in m.parameters():
                    if p.dim() >= 2:
                        p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p.shape[-1]))
        _MODELS[key] = m
    return _MODELS[key]


@pytest.fixture(scope="module")
def tok():
    return memlm.load_tokenizer("byte")


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ modes


@pytest.mark.parametrize("preset", FACT_PRESETS)
def test_a_fact_changes_later_predictions_only_in_modes_that_carry_memory(preset, tok, tmp_path):
    """Two sessions differ only in turn 1 ("My name is Zed." vs "... Ann."); the logits of turn 2's prompt must
    differ where memory is carried and be bit-identical where it is not."""
    model = model_for(preset)
    diffs = {}
    for mode in MODES:
        for learning in (True, False):
            logits = []
            for i, fact in enumerate(["My name is Zed.", "My name is Ann."]):
                s = Session(model, tok, mode=mode, learning=learning, store=tmp_path / f"{mode}{learning}",
                            session_id=f"s{i}", sampling=GREEDY, max_new_tokens=4, cms_every=8)
                s.ask(fact)
                logits.append(s.next_token_logits("What is my name?"))
            diffs[mode, learning] = (logits[0] - logits[1]).abs().max().item()
    for (mode, learning), d in diffs.items():
        if mode in ("session", "persistent") and learning:
            assert d > 1e-4, (mode, learning, d)  # float noise is ~1e-7: this is the fact
        else:
            assert d == 0.0, (mode, learning, d)


def test_stateless_forgets_each_turn(tok):
    model = model_for("transformer-debug", 3.0)
    s = Session(model, tok, mode="stateless", sampling=GREEDY, max_new_tokens=6)
    r1 = s.ask("hello")
    assert s.tokens_seen == 0 and s.turns == 1 and len(s.transcript) == 2
    r2 = s.ask("hello")  # the same answer: nothing of turn 1 is left
    assert r1.reply == r2.reply and r1.token_ids == r2.token_ids
    fresh = Session(model, tok, mode="session", sampling=GREEDY, max_new_tokens=6)
    assert fresh.ask("hello").token_ids == r1.token_ids


def test_session_carries_and_feeds_only_new_tokens(tok):
    """Turn 2 feeds only its own template tokens, and the state after two turns equals feeding the whole
    conversation at once (the state really carries the past)."""
    model = model_for("deltanet-debug", 3.0)
    s = Session(model, tok, mode="session", sampling=GREEDY, max_new_tokens=5, system="Be brief.")
    r1 = s.ask("first message")
    n1 = s.tokens_seen
    r2 = s.ask("second")
    assert r2.prompt_tokens == len(render_prompt(tok, [{"role": "user", "content": "second"}]))
    assert r1.prompt_tokens == len(render_prompt(tok, [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": "first message"}]))
    end = marker_ids(tok, END)
    closes = [0 if r.token_ids and r.token_ids[-1] in end else len(end) for r in (r1, r2)]
    assert n1 == r1.prompt_tokens + len(r1.token_ids) + closes[0]
    assert s.tokens_seen == n1 + r2.prompt_tokens + len(r2.token_ids) + closes[1]
    # the same tokens in one forward pass give the same memory
    ids = (render_prompt(tok, [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "first message"}]) + r1.token_ids + end[:closes[0]]
           + render_prompt(tok, [{"role": "user", "content": "second"}]) + r2.token_ids + end[:closes[1]])
    with torch.no_grad():
        _, full = model(torch.tensor([ids]))
    for k, v in full.state_dict().items():
        assert_close(s.state.state_dict()[k].float(), v.float(), tol=1e-4, name=k)


def test_reply_cut_short_is_closed_before_the_next_turn(tok):
    model = model_for("transformer-debug")
    s = Session(model, tok, mode="session", sampling=GREEDY, max_new_tokens=3)
    r = s.ask("hi")
    assert r.finish_reason == "length" and len(r.token_ids) == 3
    end = marker_ids(tok, END)
    assert s.tokens_seen == r.prompt_tokens + 3 + len(end)  # the end marker was fed after the cut reply


def test_learning_off_keeps_memory_bit_identical(tok):
    model = model_for("titans-mag-debug")
    s = Session(model, tok, mode="session", sampling=GREEDY, max_new_tokens=4)
    s.ask("remember this")
    h = s.state_hash()
    s.set_learning(False)
    r = s.ask("and this?")
    assert len(r.token_ids) == 4 and r.reply is not None  # the turn was answered ...
    assert s.state_hash() == h and r.state_hash == h  # ... and left no trace
    s.set_learning(True)
    s.ask("now keep it")
    assert s.state_hash() != h


def test_readonly_never_writes(tok, tmp_path):
    model = model_for("transformer-debug")
    store = SessionStore(tmp_path)
    w = Session(model, tok, mode="persistent", store=store, session_id="r", sampling=GREEDY, max_new_tokens=4)
    w.ask("a fact")
    before = snapshot(tmp_path)
    ro = Session(model, tok, mode="readonly", store=store, session_id="r", sampling=GREEDY, max_new_tokens=4,
                 learning=True)
    assert ro.loaded and ro.turns == 1 and ro.state_hash() == w.state_hash()
    for msg in ("question one", "question two"):
        ro.ask(msg)
        assert ro.state_hash() == w.state_hash()
    assert not ro.writes_memory
    for bad in (ro.save, ro.reset):
        with pytest.raises(UserError, match="readonly"):
            bad()
    assert snapshot(tmp_path) == before


def test_persistent_saves_every_turn_and_reloads_identically(tok, tmp_path):
    model = model_for("deltanet-debug", 3.0)
    store = SessionStore(tmp_path)
    a = Session(model, tok, mode="persistent", store=store, session_id="p", sampling=GREEDY, max_new_tokens=5)
    for i, msg in enumerate(["one", "two"], 1):
        a.ask(msg)
        b = Session(model, tok, mode="persistent", store=store, session_id="p", sampling=GREEDY, max_new_tokens=5)
        assert b.turns == i and b.state_hash() == a.state_hash() and b.transcript == a.transcript
    assert torch.equal(a.next_token_logits("three"), b.next_token_logits("three"))
    with pytest.raises(UserError, match="needs a store"):
        Session(model, tok, mode="persistent")


def test_cancelled_turn_changes_nothing(tok, tmp_path):
    model = model_for("transformer-debug", 3.0)
    s = Session(model, tok, mode="persistent", store=tmp_path, session_id="c", sampling=GREEDY, max_new_tokens=40)
    s.ask("hello")
    h, turns, tx = s.state_hash(), s.turns, list(s.transcript)
    before = snapshot(tmp_path)
    turn = s.send("go on and on")
    next(turn)
    turn.close()
    assert turn.cancelled and s.state_hash() == h and s.turns == turns and s.transcript == tx
    assert snapshot(tmp_path) == before
    with pytest.raises(RuntimeError, match="cancelled"):
        _ = turn.result


def test_fork_save_reset(tok, tmp_path):
    model = model_for("transformer-debug")
    s = Session(model, tok, mode="session", store=tmp_path, sampling=GREEDY, max_new_tokens=3)
    s.ask("base")
    assert s.save("base") == "base" and s.session_id == "base"
    s.fork("branch")
    s.ask("only in branch")
    old = Session(model, tok, mode="readonly", store=tmp_path, session_id="base")
    assert old.turns == 1 and s.session_id == "branch"
    s.save()
    assert Session(model, tok, mode="readonly", store=tmp_path, session_id="branch").turns == 2
    s.reset()
    assert s.tokens_seen == 0 and s.turns == 0 and s.transcript == []
    with pytest.raises(UserError, match="invalid"):
        s.save("../escape")


# ------------------------------------------------------------------------------------------------ CMS


def test_cms_online_learning_is_per_session_and_persisted(tok, tmp_path):
    model = model_for("cms-debug")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    store = SessionStore(tmp_path)
    s = Session(model, tok, mode="persistent", store=store, session_id="c", sampling=GREEDY, max_new_tokens=8,
                cms_every=8, cms_lr=1e-2)
    r = s.ask("teach me something about the sea")
    assert r.cms_loss is not None and math.isfinite(r.cms_loss)
    assert s.cms and all(n in dict(cms_online_params(model)) for n in s.cms)
    assert max(d.abs().max().item() for d in s.cms.values()) > 0
    # the shared model's weights are exactly the base weights again between turns
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    # another session on the same model does not see those deltas
    other = Session(model, tok, mode="session", sampling=GREEDY)
    fresh = Session(model, tok, mode="session", sampling=GREEDY)
    assert torch.equal(other.next_token_logits("x"), fresh.next_token_logits("x"))
    # reloaded from the store: same deltas, same predictions
    again = Session(model, tok, mode="persistent", store=store, session_id="c", sampling=GREEDY)
    assert again.cms.keys() == s.cms.keys() and all(torch.equal(again.cms[k], s.cms[k]) for k in s.cms)
    assert again.cms_buffer == s.cms_buffer
    assert torch.equal(again.next_token_logits("what now?"), s.next_token_logits("what now?"))
    # while a turn of s is streaming (its deltas are in the weights), another session waits for the weights
    reference = other.next_token_logits("y")
    turn = s.send("and now a long reply please")
    next(turn)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("logits", other.next_token_logits("y")))
    t.start()
    t.join(timeout=0.5)
    assert t.is_alive()  # blocked on the model's lock, not reading s's deltas
    _ = turn.result
    t.join(timeout=60)
    assert torch.equal(box["logits"], reference)
    # with learning off, no CMS step is taken
    deltas = {k: v.clone() for k, v in s.cms.items()}
    s.set_learning(False)
    assert s.ask("more words that would otherwise be learned").cms_loss is None
    assert all(torch.equal(s.cms[k], deltas[k]) for k in deltas)


# ------------------------------------------------------------------------------------------------ CLI


def test_chat_cli_persistent_survives_a_process_restart(tok, tmp_path, capsys):
    """`memlm chat` in a subprocess (stdin scripted) writes a persistent session; this process loads it and gets
    the same memory as replaying the turn here; slash commands work and mistakes do not end the REPL."""
    model = model_for("transformer-debug", 3.0)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    store = tmp_path / "store"
    script = "".join(f"{line}\n" for line in ["My name is Zed.", "/help", "/stats", "/set temperature=0.5",
                                                "/set nope=1", "/mode bogus", "/learning off", "/learning on",
                                                "/set temperature=0", "/fork side", "/mode session", "/save", "/exit"])
    r = subprocess.run([sys.executable, "-m", "memlm.cli.main", "chat", str(model_dir), "--session", "zed",
                        "--store", str(store), "--temperature", "0", "--max-new-tokens", "6"],
                       input=script, capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("model>") == 1
    err = r.stderr
    assert "/learning [on|off]" in err and "tokens_seen" in err and "unknown key 'nope'" in err
    assert "memory mode 'bogus' unknown" in err and "forked: now in session side" in err
    # a restart: this process loads what the subprocess saved
    loaded = Session(model, tok, mode="persistent", store=store, session_id="zed", sampling=GREEDY, max_new_tokens=6)
    assert loaded.loaded and loaded.turns == 1
    assert [m["role"] for m in loaded.transcript] == ["user", "assistant"]
    replay = Session(model, tok, mode="session", sampling=GREEDY, max_new_tokens=6)
    rr = replay.ask("My name is Zed.")
    assert loaded.transcript[1]["content"] == rr.reply
    for k, v in replay.state.state_dict().items():
        assert_close(loaded.state.state_dict()[k].float(), v.float(), tol=1e-5, name=k)
    assert torch.allclose(loaded.next_token_logits("Who am I?"), replay.next_token_logits("Who am I?"), atol=1e-5)
    assert SessionStore(store).ids() == ["side", "zed"]
    assert main(["memory", "show", "side", "--store", str(store)]) == 0
    side = json.loads(capsys.readouterr().out)
    assert side["turns"] == 1 and side["tokens_seen"] == [loaded.tokens_seen] and side["mode"] == "session"
