"""Engine: chunked prefill, the KV cache (seed defect 8), batching, stop handling and streaming text.

Notation: B batch rows, T tokens, V vocabulary, N new tokens, W sliding window.

Random debug models are nearly uniform and greedy decoding collapses into one repeated token, which would let a
broken cache pass. ``sharp_model`` re-initialises weights with a larger gain so greedy outputs vary and the gap
between the best two logits (≥ 1e-3) dwarfs float noise (~1e-6).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memlm
from memlm.data.tokenizer import ByteTokenizer
from memlm.inference.engine import Engine, generate
from memlm.inference.sampling import SamplingConfig
from memlm.layers.base import stream_positions
from memlm.models.state import ModelState
from memlm.ops.testing import assert_close

GREEDY = SamplingConfig(temperature=0)
CACHE_PRESETS = ["transformer-debug", "nyx-debug", "pythia-debug", "transformer-swa-debug"]


def sharp_model(name: str, gain: float = 3.0) -> memlm.MemoryLM:
    torch.manual_seed(0)
    m = memlm.build_model(name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p.shape[-1]))
    return m


_MODELS: dict[str, memlm.MemoryLM] = {}


def model_for(name: str) -> memlm.MemoryLM:
    if name not in _MODELS:
        _MODELS[name] = sharp_model(name)
    return _MODELS[name]


def rand_ids(n: int, seed: int, hi: int = 256) -> list[int]:
    return torch.randint(0, hi, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def greedy_by_recompute(model, prompt: list[int], n: int) -> list[int]:
    """The specification: every step runs the whole context from scratch (no state) and takes the argmax."""
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


class ScriptedLM(nn.Module):
    """A stand-in model that 'knows' a document: at document position p it predicts script[p + 1] with certainty.

    So a prompt equal to script[:P] continues with script[P:], with or without left padding (positions are taken
    relative to the document start, like every real layer does). Its state is a ModelState with no layers.
    """

    def __init__(self, script: list[int], vocab_size: int = 263) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.register_buffer("script", torch.tensor(script + [script[-1]]))
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, ids, state=None, reset=None, update=True, *, return_hidden=False):
        B, T = ids.shape
        if state is None:
            z = torch.zeros(B, dtype=torch.long, device=ids.device)
            state = ModelState((), z, z.clone())
        abs_pos, doc = stream_positions(state.pos, state.doc_start, reset, T)
        nxt = self.script[(abs_pos - doc + 1).clamp(max=len(self.script) - 1)]
        out = F.one_hot(nxt, self.config.vocab_size).float() * 20
        return out, ModelState((), state.pos + T, doc[:, -1])

    def logits(self, hidden):
        return hidden


TOK = ByteTokenizer()


def scripted(text: str, *, extra: list[int] = ()) -> ScriptedLM:
    return ScriptedLM(TOK.encode(text) + list(extra))


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ prefill / step


@pytest.mark.parametrize("name", ["transformer-debug", "transformer-swa-debug"])
def test_prefill_chunked_equals_one_call(name):
    model = model_for(name)
    ids = torch.tensor([rand_ids(150, 1), rand_ids(150, 2)])
    with torch.no_grad():
        full, _s_full = model(ids)
    for chunk in (7, 64, 150, 512):
        eng = Engine(model, prefill_chunk=chunk)
        last, state = eng.prefill(ids)
        assert_close(last, full[:, -1], name=f"prefill chunk {chunk}")
        nxt = torch.tensor([5, 9])
        a, _ = eng.step(nxt, state)
        with torch.no_grad():
            b, _ = model(torch.cat([ids, nxt[:, None]], 1))
        assert_close(a, b[:, -1], name=f"step after chunked prefill ({chunk})")
        assert state.pos.tolist() == [150, 150]


@pytest.mark.parametrize("name", CACHE_PRESETS)
def test_step_logits_equal_full_forward(name):
    """Every decode step, fed one token and the state, equals the full forward at that position."""
    model = model_for(name)
    seq = torch.tensor([rand_ids(100, 3)])
    eng = Engine(model, prefill_chunk=16)
    logits, state = eng.prefill(seq[:, :30])
    steps = [logits]
    for t in range(30, 100):
        logits, state = eng.step(seq[:, t], state)
        steps.append(logits)
    with torch.no_grad():
        full, _ = model(seq)
    assert_close(torch.stack(steps, 1)[:, :-1], full[:, 29:-1], tol=1e-5, name=f"{name} decode vs full")
    # The check can fail: a step that sees only its own token (no cache) gives different logits.
    with torch.no_grad():
        alone, _ = model(seq[:, 99:100])
    assert (alone[:, -1] - full[:, -1]).abs().max() > 1e-2


@pytest.mark.parametrize("name", CACHE_PRESETS)
def test_greedy_generation_equals_full_recompute(name):
    """Seed defect 8: generation must see the whole context. Prompt 40 + 60 new > the SWA window of 64."""
    model = model_for(name)
    if name == "transformer-swa-debug":
        assert all(lc.window == 64 for lc in model.config.layers)
    prompt = rand_ids(40, 4)
    want = greedy_by_recompute(model, prompt, 60)
    assert len(set(want)) > 20, "reference output too repetitive to test the cache"
    got = Engine(model, prefill_chunk=16).generate_ids([prompt], 60, GREEDY, ignore_eos=True).run()
    assert got.rows[0].token_ids == want
    assert got.rows[0].finish_reason == "length"


# ------------------------------------------------------------------------------------------------ batching


def test_batch_of_ragged_prompts_equals_each_alone():
    model = model_for("transformer-debug")
    eng = Engine(model, TOK)
    prompts = [rand_ids(5, 10), rand_ids(17, 11), rand_ids(40, 12)]
    batch = eng.generate_ids(prompts, 25, GREEDY, ignore_eos=True, return_state=True).run()
    for p, res in zip(prompts, batch.rows):
        alone = eng.generate_ids([p], 25, GREEDY, ignore_eos=True, return_state=True).run().rows[0]
        assert res.token_ids == alone.token_ids
        # The returned state continues identically too (left padding is masked out of it).
        a, _ = eng.step([7], res.state)
        b, _ = eng.step([7], alone.state)
        assert_close(a, b, tol=1e-5, name="state of a batched row")


def test_batch_from_state_equals_each_alone():
    """Continuing from a state, ragged prompts cannot be reset-padded; rows still match their solo runs."""
    model = model_for("pythia-debug")
    eng = Engine(model)
    _, ctx = eng.prefill(torch.tensor([rand_ids(20, 20)]))
    prompts = [rand_ids(3, 21), rand_ids(11, 22), rand_ids(6, 23)]
    batch = eng.generate_ids(prompts, 15, GREEDY, state=ctx, ignore_eos=True).run()
    for p, res in zip(prompts, batch.rows):
        alone = eng.generate_ids([p], 15, GREEDY, state=ctx, ignore_eos=True).run().rows[0]
        assert res.token_ids == alone.token_ids
    # With nothing to generate, each row's state still holds its whole prompt.
    zero = eng.generate_ids(prompts, 0, GREEDY, state=ctx).run()
    assert [r.state.pos.item() for r in zero.rows] == [23, 31, 26]
    a, _ = eng.step([1], zero.rows[1].state)
    b, _ = eng.prefill(torch.tensor([prompts[1] + [1]]), ctx)
    assert_close(a, b, tol=1e-5, name="state after a 0-token generation")


def test_rows_finish_independently_and_are_dropped():
    model = scripted("abcdefghij")
    eng = Engine(model, TOK)
    gen = eng.generate_ids([TOK.encode("a"), TOK.encode("abc"), TOK.encode("ab")], 6, GREEDY,
                           stop_ids=[ord("e")], stop_strings=["gh"])
    steps = list(gen)
    r = gen.rows
    assert TOK.decode(r[0].token_ids) == "bcde" and r[0].finish_reason == "stop"  # stop id 'e' (kept in ids)
    assert TOK.decode(r[1].token_ids) == "d" + "e" and r[1].finish_reason == "stop"
    assert TOK.decode(r[2].token_ids) == "cde" and r[2].finish_reason == "stop"
    assert r[0].text == "bcd" and r[2].text == "cd"
    assert [len(s.rows) for s in steps] == [3, 3, 2, 1]  # finished rows leave the batch
    gen = eng.generate_ids([TOK.encode("a"), TOK.encode("abcde")], 4, GREEDY, stop_strings=["gh"]).run()
    assert gen.rows[0].finish_reason == "length" and TOK.decode(gen.rows[0].token_ids) == "bcde"
    assert gen.rows[1].finish_reason == "stop" and gen.rows[1].text == "f"


# ------------------------------------------------------------------------------------------------ text API


def test_stop_strings_cut_exactly_and_are_never_emitted():
    model = scripted("Q: hi\nA: hello wor" + "ld.\nQ: next")
    # The stop "\nQ:" arrives over three byte tokens; "ld." must not be held forever, "\n" must be held.
    gen = generate(model, TOK, "Q: hi\nA:", stop=["\nQ:"], max_new_tokens=50, temperature=0)
    pieces = list(gen)
    assert "".join(pieces) == " hello world."
    assert gen.text == " hello world." and gen.finish_reason == "stop"
    assert all("\n" not in p for p in pieces)
    # A partial match that fails is released: "wo" looks like the start of "wor!" but the text goes on.
    gen = generate(model, TOK, "Q: hi\nA:", stop=["wor!", "ld.\nQ: n"], max_new_tokens=50, temperature=0)
    assert "".join(gen) == " hello wor" and gen.finish_reason == "stop"
    # Earliest occurrence wins among several stop strings.
    gen = generate(model, TOK, "Q: hi\nA:", stop=["world", "llo"], max_new_tokens=50, temperature=0)
    assert "".join(gen) == " he"


def test_streamed_pieces_never_contain_a_stop_prefix_that_is_later_cut():
    model = scripted("xxabXabYab" + "Z")
    gen = generate(model, TOK, "x", stop="abZ", max_new_tokens=40, temperature=0)
    seen = ""
    for piece in gen:
        seen += piece
        assert "xabXabY".startswith(seen), f"emitted {seen!r}, which the stop string later cuts"
    assert seen == "xabXabY"
    assert gen.finish_reason == "stop"


def test_max_new_tokens_respected():
    model = model_for("nyx-debug")
    tok = ByteTokenizer()
    for n in (0, 1, 13):
        gen = generate(model, tok, "hello", max_new_tokens=n, temperature=0.9, seed=0)
        list(gen)
        assert len(gen.token_ids) == n and gen.finish_reason == "length"
        assert len(gen.logprobs) == n
        assert gen.state.pos.item() == 5 + n


def test_eos_ends_generation_and_is_not_emitted():
    model = scripted("hi there", extra=[TOK.eos_id, ord("z")])
    gen = generate(model, TOK, "hi", max_new_tokens=20, temperature=0)
    assert "".join(gen) == " there" and gen.finish_reason == "eos"
    assert gen.token_ids[-1] == TOK.eos_id
    gen = generate(model, TOK, "hi", max_new_tokens=8, temperature=0, ignore_eos=True)
    assert gen.finish_reason == "length" and gen.token_ids[6] == TOK.eos_id


def test_multibyte_utf8_split_across_byte_tokens_streams_whole():
    text = "aé€😀b"
    model = scripted("<" + text)
    gen = generate(model, TOK, "<", max_new_tokens=len(text.encode()), temperature=0)
    pieces = list(gen)
    assert pieces == list(text)  # each character once, complete, never a fragment or U+FFFD
    assert gen.text == text and len(gen.token_ids) == len(text.encode())


def test_stop_string_made_of_multibyte_chars():
    model = scripted("<abc€def")
    gen = generate(model, TOK, "<", stop="c€d", max_new_tokens=20, temperature=0)
    assert "".join(gen) == "ab" and gen.text == "ab"


def test_batch_text_mode_yields_rows():
    model = scripted("0123456789")
    gen = generate(model, TOK, ["01", "0123"], max_new_tokens=3, temperature=0)
    out = {0: "", 1: ""}
    for row, piece in gen:
        out[row] += piece
    assert out == {0: "234", 1: "456"}
    assert gen.text == ["234", "456"] and gen.finish_reason == ["length", "length"]


def test_generation_from_state_equals_concatenated_prompt():
    model = model_for("transformer-swa-debug")
    a, b = rand_ids(50, 30), rand_ids(9, 31)
    eng = Engine(model, TOK)
    first = generate(eng, TOK, a, max_new_tokens=20, temperature=0, ignore_eos=True)
    list(first)
    cont = generate(eng, TOK, b, max_new_tokens=30, temperature=0, ignore_eos=True, state=first.state)
    list(cont)
    whole = generate(eng, TOK, a + first.token_ids + b, max_new_tokens=30, temperature=0, ignore_eos=True)
    list(whole)
    assert cont.token_ids == whole.token_ids
    assert cont.state.pos.item() == 50 + 20 + 9 + 30
    # The returned state is made of ordinary tensors (usable with autograd later).
    assert not any(t.is_inference() for t in cont.state.state_dict().values())


def test_memory_layers_are_not_switched_to_eval_or_readonly():
    model = model_for("transformer-debug").train()
    calls = []
    orig = model.forward

    def spy(*args, **kw):
        calls.append((model.training, kw.get("update", args[3] if len(args) > 3 else True)))
        return orig(*args, **kw)

    model.forward = spy
    try:
        list(generate(model, TOK, "hey", max_new_tokens=3, temperature=0))
    finally:
        del model.forward
    assert calls and all(training and update for training, update in calls)


def test_sampling_kwargs_and_seed_determinism():
    model = model_for("pythia-debug")
    a = memlm.generate(model, TOK, "abc", max_new_tokens=20, temperature=1.0, top_k=50, seed=5).token_ids
    b = generate(model, TOK, "abc", max_new_tokens=20, sampling=SamplingConfig(temperature=1.0, top_k=50, seed=5))
    assert a == b.token_ids
    with pytest.raises(TypeError, match="temprature"):
        generate(model, TOK, "abc", temprature=1.0)


def test_no_repeat_ngram_in_generation():
    model = scripted("abababababababab")
    gen = generate(model, TOK, "a", max_new_tokens=8, temperature=0, no_repeat_ngram=2)
    ids = gen.token_ids
    grams = [tuple(ids[i:i + 2]) for i in range(len(ids) - 1)]
    assert len(grams) == len(set(grams)), TOK.decode(ids)
    assert TOK.decode(ids[:3]) == "bab"  # the ban only starts once a 2-gram would repeat
