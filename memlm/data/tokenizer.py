"""Tokenizers: a dependency-free byte tokenizer (the default) and a wrapper around HF `tokenizers`.

Notation: V vocabulary size (ids 0..V-1), n number of ids in a sequence.

Both kinds share one small interface (`Tokenizer`): `encode`, `decode`, `vocab_size`, `eos_id`, `bos_id`, `pad_id`,
`special_tokens` and `save`. The chat markers `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>` are special tokens of
the byte tokenizer and of every BPE trained by `train_bpe`; `memlm.data.chat` falls back to their plain-text
spelling for a foreign tokenizer that lacks them.

`encode(text)` treats the text as plain text: a literal "<|user|>" typed by a user is *not* turned into the control id
(that would let data or chat input forge turns). Pass `allow_special=True` to parse special spellings on purpose.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from memlm.errors import UserError

# Order matters: the byte tokenizer assigns 256 + index, a trained BPE assigns index.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|eos|>", "<|bos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
)
META_FILE = "memlm_tokenizer.json"
HF_FILE = "tokenizer.json"

# Spellings used by common HF tokenizers, most specific first.
_EOS_CANDIDATES = ("<|eos|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")
_BOS_CANDIDATES = ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")


class Tokenizer:
    """Common interface. Subclasses set the attributes below in `__init__`."""

    name: str
    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int
    special_tokens: dict[str, int]

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               allow_special: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many plain texts (no specials added); subclasses may parallelise."""
        return [self.encode(t) for t in texts]

    def save(self, directory: str | os.PathLike) -> None:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """A short hash identifying the exact vocabulary (shards and checkpoints check it)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-ready summary (stored in shard indexes and checkpoints)."""
        return {"name": self.name, "kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "bos_id": self.bos_id, "pad_id": self.pad_id, "fingerprint": self.fingerprint}

    kind: str = "abstract"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------------
# Byte tokenizer
# --------------------------------------------------------------------------------------------------------------------

class ByteTokenizer(Tokenizer):
    """ids 0..255 are the raw UTF-8 bytes; 256.. the specials of SPECIAL_TOKENS (V = 263).

    A model may have a larger vocabulary (e.g. rounded up to 384); ids ≥ V decode to U+FFFD.
    """

    kind = "byte"

    def __init__(self, *, specials: bool = True) -> None:
        # specials=False ("byte256") is the pure 256-byte vocabulary of byte-level models such as NYX: the NUL byte,
        # which never occurs in text, doubles as end-of-document and padding; chat markers are spelled as text.
        self.name = "byte" if specials else "byte256"
        self.special_tokens = {s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)} if specials else {}
        self.vocab_size = 256 + len(self.special_tokens)
        self.eos_id = self.special_tokens["<|eos|>"] if specials else 0
        self.bos_id = self.special_tokens["<|bos|>"] if specials else None
        self.pad_id = self.special_tokens["<|pad|>"] if specials else 0
        self._id_to_special = {i: s for s, i in self.special_tokens.items()}
        self._special_re = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               allow_special: bool = False) -> list[int]:
        if allow_special and self.special_tokens:
            ids: list[int] = []
            pos = 0
            for m in self._special_re.finditer(text):
                ids.extend(text[pos:m.start()].encode("utf-8"))
                ids.append(self.special_tokens[m.group(0)])
                pos = m.end()
            ids.extend(text[pos:].encode("utf-8"))
        else:
            ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            # A special (or out-of-range id) ends the current byte run; bad UTF-8 inside it becomes U+FFFD.
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
            special = self._id_to_special.get(i)
            if special is None:
                out.append("\ufffd")
            elif not skip_special:
                out.append(special)
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(d / META_FILE, {"kind": "byte", "name": self.name, "vocab_size": self.vocab_size,
                                           "special_tokens": self.special_tokens,
                                           "specials": bool(self.special_tokens)})

    @property
    def fingerprint(self) -> str:
        return "byte-v1" if self.special_tokens else "byte256-v1"


# --------------------------------------------------------------------------------------------------------------------
# HF tokenizers wrapper
# --------------------------------------------------------------------------------------------------------------------

def _find_token(vocab: dict[str, int], candidates: Iterable[str]) -> int | None:
    for c in candidates:
        if c in vocab:
            return vocab[c]
    return None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _token_text(entry: object) -> str | None:
    """special_tokens_map.json / tokenizer_config.json store a token as a string or as {"content": ...}."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _byte_level_splittable(tk: object) -> bool:
    """True for a byte-level BPE with the GPT-2 split regex and no normaliser (what train_bpe builds): there a
    newline between two visible ASCII characters is always a pre-token boundary, and BPE never merges across one."""
    try:
        spec = json.loads(tk.to_str())  # type: ignore[attr-defined]
    except (ValueError, AttributeError):
        return False
    pre = spec.get("pre_tokenizer") or {}
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False) and (spec.get("model") or {}).get("type") == "BPE")


_PIECE_CHARS = 1 << 15


def _visible_ascii(c: str) -> bool:
    return "!" <= c <= "~"


def _split_text(t: str) -> list[str]:
    """Cut t after a "\n" that sits between two visible ASCII characters, about every _PIECE_CHARS characters."""
    if len(t) <= 2 * _PIECE_CHARS:
        return [t]
    out, pos = [], 0
    while len(t) - pos > 2 * _PIECE_CHARS:
        cut = t.find("\n", pos + _PIECE_CHARS)
        while cut != -1 and not (_visible_ascii(t[cut - 1]) and cut + 1 < len(t) and _visible_ascii(t[cut + 1])):
            cut = t.find("\n", cut + 1)
        if cut == -1:
            break
        out.append(t[pos:cut + 1])
        pos = cut + 1
    out.append(t[pos:])
    return out


class HFTokenizer(Tokenizer):
    """Wraps a `tokenizers.Tokenizer`. Specials are found by their usual spellings (or the HF config files beside
    tokenizer.json). A tokenizer with no end-of-text token gets `<|eos|>` appended to its vocabulary."""

    kind = "hf"

    def __init__(self, tk: object, *, name: str = "hf", hints: dict | None = None) -> None:
        self._tk = tk
        self.name = name
        hints = hints or {}
        # Plain text must stay plain text: a literal special spelling in the data is not a control token.
        try:
            tk.encode_special_tokens = True
        except AttributeError:  # tokenizers < 0.15
            pass
        vocab = tk.get_vocab(with_added_tokens=True)
        eos = _find_token(vocab, [h for h in (hints.get("eos"),) if h] + list(_EOS_CANDIDATES))
        if eos is None:
            tk.add_special_tokens(["<|eos|>"])
            vocab = tk.get_vocab(with_added_tokens=True)
            eos = vocab["<|eos|>"]
        self.eos_id = eos
        self.bos_id = _find_token(vocab, [h for h in (hints.get("bos"),) if h] + list(_BOS_CANDIDATES))
        pad = _find_token(vocab, [h for h in (hints.get("pad"),) if h] + list(_PAD_CANDIDATES))
        self.pad_id = self.eos_id if pad is None else pad
        added = tk.get_added_tokens_decoder()  # id -> AddedToken
        self.special_tokens = {str(t.content): int(i) for i, t in added.items() if getattr(t, "special", True)}
        for s in SPECIAL_TOKENS:  # our chat markers count as special when present, even if added as normal tokens
            if s in vocab:
                self.special_tokens[s] = vocab[s]
        # Ids may have gaps; the model must cover the largest one.
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self._splittable = _byte_level_splittable(tk)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        """Load from a tokenizer.json file or a directory that holds one (plus optional HF config files)."""
        from tokenizers import Tokenizer as _TK

        p = Path(path)
        d = p if p.is_dir() else p.parent
        f = p / HF_FILE if p.is_dir() else p
        if not f.is_file():
            raise UserError(f"cannot load tokenizer '{path}': no {HF_FILE} in that directory")
        try:
            tk = _TK.from_file(str(f))
        except Exception as e:  # noqa: BLE001 — the Rust side raises a plain Exception on a malformed file
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load tokenizer '{path}': {msg}") from None
        meta = _read_json(d / META_FILE) if p.is_dir() else {}
        hints: dict = {}
        for cfg in ("special_tokens_map.json", "tokenizer_config.json"):
            c = _read_json(d / cfg) if p.is_dir() else {}
            for key in ("eos", "bos", "pad"):
                t = _token_text(c.get(f"{key}_token"))
                if t and key not in hints:
                    hints[key] = t
        name = meta.get("name") or (p.name if p.is_dir() else p.parent.name or p.stem)
        return cls(tk, name=str(name), hints=hints)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               allow_special: bool = False) -> list[int]:
        if allow_special:
            self._tk.encode_special_tokens = False
            try:
                ids = self._tk.encode(text, add_special_tokens=False).ids
            finally:
                self._tk.encode_special_tokens = True
        else:
            ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many plain texts in parallel. Long texts of a GPT-2-style byte-level tokenizer are cut into pieces
        at boundaries the pre-tokenizer always splits at (so the ids are identical) and encoded in parallel too:
        one book is otherwise one thread."""
        if not self._splittable:
            return [e.ids for e in self._encode_many(texts)]
        pieces: list[str] = []
        owner: list[int] = []
        for i, t in enumerate(texts):
            for p in _split_text(t):
                pieces.append(p)
                owner.append(i)
        out: list[list[int]] = [[] for _ in texts]
        for o, e in zip(owner, self._encode_many(pieces)):
            out[o].extend(e.ids)
        return out

    def _encode_many(self, texts: list[str]) -> list:
        fast = getattr(self._tk, "encode_batch_fast", None)  # no offsets: faster (tokenizers ≥ 0.21)
        return (fast or self._tk.encode_batch)(texts, add_special_tokens=False)

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"{HF_FILE}.tmp{os.getpid()}"
        tmp.write_text(self._tk.to_str(), encoding="utf-8")
        os.replace(tmp, d / HF_FILE)
        _write_json_atomic(d / META_FILE, {"kind": "hf", "name": self.name, "vocab_size": self.vocab_size,
                                           "eos_id": self.eos_id, "bos_id": self.bos_id, "pad_id": self.pad_id})

    @property
    def fingerprint(self) -> str:
        if not hasattr(self, "_fp"):
            self._fp = hashlib.sha256(self._tk.to_str().encode("utf-8")).hexdigest()[:16]
        return self._fp

    @property
    def backend(self) -> object:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tk


# --------------------------------------------------------------------------------------------------------------------
# Streaming decode
# --------------------------------------------------------------------------------------------------------------------

class StreamDecoder:
    """Turns ids arriving one by one into text, emitting only complete characters.

    Byte tokenizer: an incremental UTF-8 decoder holds back a partial multi-byte sequence; invalid bytes become
    U+FFFD. HF tokenizers: decode a short sliding window of ids and emit the new suffix, holding back while the
    window ends in U+FFFD (an incomplete byte-level character). The window keeps a few ids of left context because
    some decoders (SentencePiece-style) render a token differently at the start of a string.
    """

    _CONTEXT = 4  # ids of left context kept for the HF window

    def __init__(self, tok: Tokenizer, *, skip_special: bool = False) -> None:
        self.tok = tok
        self.skip_special = skip_special
        self._byte = isinstance(tok, ByteTokenizer)
        if self._byte:
            self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # a short window: left context + ids not yet emitted
        self._read = 0  # ids before this index in _ids have been emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text that became complete (possibly "")."""
        token_id = int(token_id)
        if self._byte:
            if 0 <= token_id < 256:
                return self._dec.decode(bytes((token_id,)))
            text = self._dec.decode(b"", final=True)  # a special ends any partial character
            self._dec.reset()
            return text + self.tok.decode([token_id], skip_special=self.skip_special)
        self._ids.append(token_id)
        prev = self.tok.decode(self._ids[:self._read], skip_special=self.skip_special)
        full = self.tok.decode(self._ids, skip_special=self.skip_special)
        if full.endswith("\ufffd") or len(full) <= len(prev) or not full.startswith(prev):
            return ""
        keep = max(len(self._ids) - self._CONTEXT, 0)
        self._ids = self._ids[keep:]
        self._read = len(self._ids)
        return full[len(prev):]

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character becomes U+FFFD)."""
        if self._byte:
            text = self._dec.decode(b"", final=True)
            self._dec.reset()
            return text
        prev = self.tok.decode(self._ids[:self._read], skip_special=self.skip_special)
        full = self.tok.decode(self._ids, skip_special=self.skip_special)
        self._ids, self._read = [], 0
        return full.removeprefix(prev)


# --------------------------------------------------------------------------------------------------------------------
# Loading and training
# --------------------------------------------------------------------------------------------------------------------

def _from_hub(name: str) -> object:
    """Separate function so tests can replace the network call."""
    from tokenizers import Tokenizer as _TK

    return _TK.from_pretrained(name)


def _looks_like_path(s: str) -> bool:
    return s.endswith(".json") or s.startswith(("/", "./", "../", "~", ".\\")) or os.sep + os.sep in s


def load_tokenizer(name_or_path: str = "byte") -> Tokenizer:
    """"byte" → ByteTokenizer (256 bytes + specials); "byte256" → bytes only (NUL = end of document); a tokenizer.json or a directory (HF tokenizer dir or one written by `save`) →
    that tokenizer; otherwise a Hugging Face hub name (needs the network or the local hub cache)."""
    s = str(name_or_path)
    if s in ("byte", "byte256"):
        return ByteTokenizer(specials=s == "byte")
    p = Path(os.path.expanduser(s))
    if p.is_dir():
        meta = _read_json(p / META_FILE)
        if meta.get("kind") == "byte":
            return ByteTokenizer(specials=meta.get("specials", True))
        if not (p / HF_FILE).is_file():
            raise UserError(f"cannot load tokenizer '{s}': directory has neither {HF_FILE} nor {META_FILE}")
        return HFTokenizer.from_file(p)
    if p.is_file():
        if p.name == META_FILE:
            return load_tokenizer(str(p.parent))
        return HFTokenizer.from_file(p)
    if _looks_like_path(s):
        raise UserError(f"cannot load tokenizer '{s}': no such file or directory")
    try:
        tk = _from_hub(s)
    except Exception as e:  # noqa: BLE001 — network, auth and 404 errors come in many types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load tokenizer '{s}': not a file/dir and hub unreachable: {msg}") from None
    return HFTokenizer(tk, name=s)


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, *, min_frequency: int = 2,
              name: str | None = None, show_progress: bool = False) -> HFTokenizer:
    """Train a byte-level BPE (every byte is in the base alphabet, so any string round-trips exactly).

    vocab_size counts everything: the 7 specials (ids 0..6), 256 byte symbols and the merges.
    Writes out_dir/tokenizer.json and out_dir/memlm_tokenizer.json.
    """
    from tokenizers import Tokenizer as _TK
    from tokenizers import decoders, models, pre_tokenizers, trainers

    min_vocab = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_vocab:
        raise UserError(f"BPE vocab_size must be at least {min_vocab} (7 specials + 256 bytes), got {vocab_size}")
    tk = _TK(models.BPE())
    # No normaliser and no prefix space: decode(encode(s)) == s exactly.
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(iter(texts), trainer=trainer)
    out = Path(out_dir)
    tok = HFTokenizer(tk, name=name or f"bpe{vocab_size}")
    tok.save(out)
    return tok
