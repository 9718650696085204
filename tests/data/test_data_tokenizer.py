"""Tokenizers: byte round trip, specials, invalid bytes, streaming decode, BPE train/load/round trip, load errors."""
from __future__ import annotations

import json
import lzma
import random

import pytest

from memlm.data import demo_corpus_path
from memlm.data import tokenizer as tmod
from memlm.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, StreamDecoder, load_tokenizer, train_bpe
from memlm.errors import UserError

UNICODE = "Ascii, accents éàü, CJK 世界, emoji 🎉👩‍👩‍👧, RTL שלום, combining e\u0301, \t tabs\n\n  spaces  \r\n\x00 end"


def _random_text(rng: random.Random, n: int) -> str:
    # Any scalar value except surrogates (not encodable in UTF-8, so not a valid str for a tokenizer).
    out = []
    for _ in range(n):
        c = rng.choice([rng.randint(0x20, 0x7E), rng.randint(0, 0x2FF), rng.randint(0x300, 0xD7FF),
                        rng.randint(0xE000, 0x10FFFF)])
        out.append(chr(c))
    return "".join(out)


def test_byte_specials_and_vocab():
    tok = ByteTokenizer()
    assert tok.vocab_size == 263
    assert [tok.special_tokens[s] for s in SPECIAL_TOKENS] == list(range(256, 263))
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (256, 257, 258)
    assert tok.special_tokens["<|system|>"] == 259 and tok.special_tokens["<|end|>"] == 262


def test_byte_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8"))
    assert tok.decode(ids) == UNICODE
    rng = random.Random(0)
    for _ in range(20):
        s = _random_text(rng, 300)
        assert tok.decode(tok.encode(s)) == s


def test_byte_specials_round_trip_and_plain_text_by_default():
    tok = ByteTokenizer()
    s = "<|system|>be kind<|end|><|user|>hi 世界<|end|><|assistant|>"
    ids = tok.encode(s, allow_special=True)
    assert ids[0] == 259 and 262 in ids and ids[-1] == 261
    assert tok.decode(ids) == s
    # Without allow_special a typed marker is plain bytes, never a control id.
    plain = tok.encode(s)
    assert max(plain) < 256 and tok.decode(plain) == s
    ids = tok.encode("ab", add_bos=True, add_eos=True)
    assert ids == [257, 97, 98, 256]
    assert tok.decode(ids, skip_special=True) == "ab"


def test_byte_invalid_bytes_decode_with_replacement():
    tok = ByteTokenizer()
    # lone continuation byte, truncated 3-byte sequence before a special, 0xFF, an id beyond the vocabulary
    assert tok.decode([0x80, 65]) == "\ufffdA"
    assert tok.decode([0xE4, 0xB8, 256, 66]) == "\ufffd<|eos|>B"
    assert tok.decode([0xFF]) == "\ufffd"
    assert tok.decode([300]) == "\ufffd"


def test_stream_decoder_byte_split_multibyte():
    tok = ByteTokenizer()
    text = "a世🎉b"
    sd = StreamDecoder(tok)
    pieces = [sd.push(i) for i in tok.encode(text)]
    # '世' is 3 bytes, '🎉' is 4: nothing is emitted until a character is complete
    assert pieces == ["a", "", "", "世", "", "", "", "🎉", "b"]
    assert sd.flush() == ""
    sd = StreamDecoder(tok)
    out = [sd.push(i) for i in [0xE4, 0xB8, 256]]  # truncated character then a special
    assert "".join(out) == "\ufffd<|eos|>"
    sd = StreamDecoder(tok)
    assert sd.push(0xF0) == "" and sd.flush() == "\ufffd"


def _demo_texts(limit_bytes: int) -> list[str]:
    texts, size = [], 0
    with lzma.open(demo_corpus_path(), "rt", encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)["text"]
            for i in range(0, len(t), 20_000):
                texts.append(t[i:i + 20_000])
                size += len(texts[-1])
                if size >= limit_bytes:
                    return texts
    return texts


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    train_bpe(_demo_texts(300_000) + [UNICODE], 1000, d)
    return d


def test_bpe_train_load_round_trip(bpe_dir):
    assert (bpe_dir / "tokenizer.json").is_file() and (bpe_dir / "memlm_tokenizer.json").is_file()
    from_dir = load_tokenizer(str(bpe_dir))
    from_file = load_tokenizer(str(bpe_dir / "tokenizer.json"))
    assert isinstance(from_dir, HFTokenizer) and isinstance(from_file, HFTokenizer)
    assert from_dir.fingerprint == from_file.fingerprint
    assert from_dir.vocab_size == 1000
    for s in SPECIAL_TOKENS:
        assert s in from_dir.special_tokens
    assert from_dir.eos_id == from_dir.special_tokens["<|eos|>"]
    assert from_dir.bos_id == from_dir.special_tokens["<|bos|>"]
    assert from_dir.pad_id == from_dir.special_tokens["<|pad|>"]
    english = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    ids = from_dir.encode(english)
    assert len(ids) < len(english.encode()) / 2  # merges were learned
    assert from_dir.decode(ids) == english
    rng = random.Random(1)
    for s in [UNICODE, "", " leading space", "trailing  ", "\n\n\n"] + [_random_text(rng, 200) for _ in range(20)]:
        for tok in (from_dir, from_file):
            assert tok.decode(tok.encode(s)) == s, repr(s)


def test_bpe_specials_plain_by_default(bpe_dir):
    tok = load_tokenizer(str(bpe_dir))
    assert tok.encode("<|user|>", allow_special=True) == [tok.special_tokens["<|user|>"]]
    plain = tok.encode("<|user|>")
    assert tok.special_tokens["<|user|>"] not in plain and tok.decode(plain) == "<|user|>"
    ids = tok.encode("x", add_eos=True)
    assert ids[-1] == tok.eos_id
    assert tok.decode(ids) == "x<|eos|>" and tok.decode(ids, skip_special=True) == "x"


def test_stream_decoder_hf(bpe_dir):
    tok = load_tokenizer(str(bpe_dir))
    text = "Elizabeth 世界🎉 said: “Indeed.” naïve café"
    ids = tok.encode(text)
    sd = StreamDecoder(tok)
    pieces = [sd.push(i) for i in ids]
    assert "".join(pieces) + sd.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_save_and_load_byte(tmp_path):
    ByteTokenizer().save(tmp_path / "tok")
    assert isinstance(load_tokenizer(str(tmp_path / "tok")), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_hf_save_reload(bpe_dir, tmp_path):
    tok = load_tokenizer(str(bpe_dir))
    tok.save(tmp_path / "copy")
    again = load_tokenizer(str(tmp_path / "copy"))
    assert again.fingerprint == tok.fingerprint and again.encode(UNICODE) == tok.encode(UNICODE)


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing" / "tokenizer.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path / "bad.json"))

    def offline(name):
        raise OSError("Name or service not known")

    monkeypatch.setattr(tmod, "_from_hub", offline)
    with pytest.raises(UserError) as e:
        load_tokenizer("someorg/some-tokenizer")
    msg = str(e.value)
    assert "someorg/some-tokenizer" in msg and "hub unreachable" in msg and "\n" not in msg


def test_bpe_vocab_too_small(tmp_path):
    with pytest.raises(UserError, match="at least 263"):
        train_bpe(["abc"], 100, tmp_path)


def test_bpe_batch_split_is_exact(bpe_dir, monkeypatch):
    """encode_batch cuts long texts for parallelism; the ids must equal encoding each text whole."""
    tok = load_tokenizer(str(bpe_dir))
    assert tok._splittable
    monkeypatch.setattr(tmod, "_PIECE_CHARS", 64)
    rng = random.Random(3)
    lines = ["It is a truth.", "  indented", "", "'s contraction", "x", "\t", "CAPS!", "naïve café", "123 456",
             "end .", "世界", "a\u00a0b", " \n", "\r"]
    texts = ["\n".join(rng.choice(lines) for _ in range(400)) for _ in range(10)]
    texts += [_demo_texts(60_000)[0], UNICODE * 50, _random_text(rng, 2000).replace("a", "\n")]
    split = [len(tmod._split_text(t)) for t in texts]
    assert max(split) > 10  # the texts really were cut
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_byte256_has_no_specials_and_fits_256():
    from memlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer("byte256")
    assert tok.vocab_size == 256 and tok.eos_id == 0 and tok.special_tokens == {}
    ids = tok.encode("héllo <|end|>", allow_special=True)
    assert max(ids) < 256 and tok.decode(ids) == "héllo <|end|>"
