"""Chat template: marker ids, loss mask only on assistant content + closing <|end|>, prompt rendering."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer as TK
from tokenizers import decoders, models, pre_tokenizers, trainers

from memlm.data.chat import encode_chat, format_chat, marker_ids, render_prompt, stop_ids
from memlm.data.tokenizer import ByteTokenizer, HFTokenizer, train_bpe
from memlm.errors import UserError

MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi <|end|> there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao."},
]


def _check_mask(tok, ids, mask):
    """Reconstruct the targets from the mask: exactly the assistant contents, each followed by <|end|>."""
    end = marker_ids(tok, "<|end|>")
    targets = [i for i, m in zip(ids, mask) if m]
    expected = []
    for m in MSGS:
        if m["role"] == "assistant":
            expected += tok.encode(m["content"]) + end
    assert targets == expected
    # every prompt token (system, user, role markers) carries no loss
    n_prompt = len(ids) - len(expected)
    assert mask.count(False) == n_prompt


def test_byte_chat_template():
    tok = ByteTokenizer()
    ids, mask = encode_chat(tok, MSGS)
    assert len(ids) == len(mask)
    assert ids[0] == 259  # <|system|>
    assert tok.decode(ids) == format_chat(MSGS)
    # the user's literal "<|end|>" stays text: exactly one <|end|> id per message
    assert ids.count(262) == len(MSGS)
    assert ids.count(261) == 2 and all(not mask[i] for i, t in enumerate(ids) if t == 261)
    _check_mask(tok, ids, mask)
    a = ids.index(261)  # first <|assistant|>
    assert mask[a] is False and mask[a + 1] is True and tok.decode(ids[a + 1:a + 7]) == "Hello!"
    assert ids[a + 7] == 262 and mask[a + 7] is True and mask[a + 8] is False


def test_render_prompt_ends_with_assistant():
    tok = ByteTokenizer()
    ids = render_prompt(tok, MSGS[:2])
    assert ids[-1] == tok.special_tokens["<|assistant|>"]
    assert tok.decode(ids) == format_chat(MSGS[:2]) + "<|assistant|>"
    assert stop_ids(tok) == [262, 256]
    ids = render_prompt(tok, MSGS[:2], add_bos=True)
    assert ids[0] == tok.bos_id


def test_trained_bpe_uses_special_ids(tmp_path):
    tok = train_bpe(["hello there, how are you? " * 50, "Be brief. Ciao. Bye"] * 20, 400, tmp_path)
    ids, mask = encode_chat(tok, MSGS)
    for s in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert marker_ids(tok, s) == [tok.special_tokens[s]]
    assert ids.count(tok.special_tokens["<|end|>"]) == len(MSGS)
    assert tok.decode(ids) == format_chat(MSGS)
    _check_mask(tok, ids, mask)


def test_foreign_tokenizer_falls_back_to_marker_text():
    tk = TK(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["some text here"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = HFTokenizer(tk, name="foreign")
    assert tok.eos_id == tk.token_to_id("</s>")
    assert "<|user|>" not in tok.special_tokens and len(marker_ids(tok, "<|user|>")) > 1
    ids, mask = encode_chat(tok, MSGS)
    assert tok.decode(ids) == format_chat(MSGS)
    _check_mask(tok, ids, mask)


def test_bad_messages_rejected():
    with pytest.raises(UserError, match="chat message 0"):
        encode_chat(ByteTokenizer(), [{"role": "robot", "content": "x"}])
    with pytest.raises(UserError):
        encode_chat(ByteTokenizer(), [{"role": "user", "content": None}])
