"""Chat template and loss mask.

Notation: n number of tokens in an encoded conversation.

The template (one marker per role, every turn closed by `<|end|>`, no extra whitespace):

    <|system|>You are terse.<|end|><|user|>Hi!<|end|><|assistant|>Hello.<|end|>

- For the byte tokenizer and for BPEs trained by memlm, each marker is one special id. For a foreign tokenizer that
  lacks a marker, its plain-text spelling is encoded instead (so the template still works, at a few tokens a marker).
- Message contents are encoded as plain text: a user typing "<|end|>" cannot close a turn or forge one.
- Loss: only on assistant contents and the `<|end|>` that closes them (the model must learn to stop). The
  `<|assistant|>` marker itself and all system/user tokens carry no loss — they are given, not predicted.
- `render_prompt` ends with `<|assistant|>`: generation continues from there and stops at `<|end|>`.
"""
from __future__ import annotations

from collections.abc import Sequence

from memlm.data.tokenizer import Tokenizer
from memlm.errors import UserError

ROLES = ("system", "user", "assistant")
END = "<|end|>"


def marker_ids(tok: Tokenizer, marker: str) -> list[int]:
    """Ids of a chat marker: its special id if the tokenizer has it, else its spelling encoded as text."""
    if marker in tok.special_tokens:
        return [tok.special_tokens[marker]]
    return tok.encode(marker)


def _check(messages: Sequence[dict]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"chat message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.80}")


def encode_chat(tok: Tokenizer, messages: Sequence[dict], *, add_bos: bool = False) -> tuple[list[int], list[bool]]:
    """Encode a conversation → (ids [n], loss_mask [n]); loss_mask[i] is True where token i is a training target.

    Targets are the assistant contents and their closing `<|end|>` (see module docstring)."""
    _check(messages)
    ids: list[int] = []
    mask: list[bool] = []
    if add_bos and tok.bos_id is not None:
        ids.append(tok.bos_id)
        mask.append(False)
    end = marker_ids(tok, END)
    for m in messages:
        head = marker_ids(tok, f"<|{m['role']}|>")
        body = tok.encode(m["content"])
        target = m["role"] == "assistant"
        ids += head
        mask += [False] * len(head)
        ids += body + end
        mask += [target] * (len(body) + len(end))
    return ids, mask


def render_prompt(tok: Tokenizer, messages: Sequence[dict], *, add_bos: bool = False) -> list[int]:
    """Ids of the conversation so far followed by `<|assistant|>`, ready for generation."""
    ids, _ = encode_chat(tok, messages, add_bos=add_bos)
    return ids + marker_ids(tok, "<|assistant|>")


def stop_ids(tok: Tokenizer) -> list[int]:
    """Ids that end an assistant turn when they are single special tokens (`<|end|>`, EOS)."""
    out = [tok.eos_id]
    if END in tok.special_tokens:
        out.insert(0, tok.special_tokens[END])
    return out


def format_chat(messages: Sequence[dict]) -> str:
    """The template as a string (for display and logs; encoding goes through `encode_chat`)."""
    _check(messages)
    return "".join(f"<|{m['role']}|>{m['content']}{END}" for m in messages)
