"""Document sources: formats, compression, folders/globs, malformed input accounting, mixtures, splits."""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from memlm.data import demo_corpus_path
from memlm.data.sources import (
    Concat,
    Document,
    DocumentSource,
    Mixture,
    SourceStats,
    mixture,
    open_sources,
    parse_spec,
    split_documents,
)
from memlm.errors import UserError


def _texts(src) -> list[str]:
    return [d.text for d in src]


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


RECORDS = [{"text": "alpha α"}, {"content": "beta β"}, {"input": "gamma γ"}, {"title": "x", "text": "delta δ"}]
EXPECTED = ["alpha α", "beta β", "gamma γ", "delta δ"]


def test_txt_one_document_per_file(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n\nsecond paragraph\n", encoding="utf-8")
    docs = list(DocumentSource(tmp_path / "a.txt"))
    assert len(docs) == 1 and docs[0].text == "line one\nline two\n\nsecond paragraph\n"
    assert docs[0].source.endswith("a.txt") and docs[0].line == 1


def test_txt_split_at_blank_lines_when_large(tmp_path):
    para = ("word " * 30 + "\n") * 5 + "\n"
    (tmp_path / "big.txt").write_text(para * 10, encoding="utf-8")
    src = DocumentSource(tmp_path / "big.txt", txt_max_doc_bytes=1000)
    docs = list(src)
    assert len(docs) > 1
    assert "".join(d.text for d in docs).replace("\n", "") == (para * 10).replace("\n", "")


@pytest.mark.parametrize("comp", ["", ".gz", ".xz", ".bz2", ".zst"])
def test_jsonl_and_compression(tmp_path, comp):
    raw = _jsonl(RECORDS)
    path = tmp_path / f"data.jsonl{comp}"
    if comp == ".gz":
        path.write_bytes(gzip.compress(raw))
    elif comp == ".xz":
        path.write_bytes(lzma.compress(raw))
    elif comp == ".bz2":
        path.write_bytes(bz2.compress(raw))
    elif comp == ".zst":
        zstandard = pytest.importorskip("zstandard")
        path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    else:
        path.write_bytes(raw)
    src = DocumentSource(path)
    assert _texts(src) == EXPECTED
    assert src.stats.documents == 4 and src.stats.total_skipped == 0


def test_zst_missing_package_is_user_error(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(UserError, match="zstandard"):
        list(DocumentSource(path))


def test_json_array_object_and_jsonl_named_json(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps(RECORDS, indent=2), encoding="utf-8")
    (tmp_path / "obj.json").write_text(json.dumps({"data": RECORDS}, indent=2), encoding="utf-8")
    (tmp_path / "one.json").write_text(json.dumps({"text": "single"}, indent=2), encoding="utf-8")
    (tmp_path / "lines.json").write_bytes(_jsonl(RECORDS))
    assert _texts(DocumentSource(tmp_path / "arr.json")) == EXPECTED
    assert _texts(DocumentSource(tmp_path / "obj.json")) == EXPECTED
    assert _texts(DocumentSource(tmp_path / "one.json")) == ["single"]
    assert _texts(DocumentSource(tmp_path / "lines.json")) == EXPECTED


def test_chat_records(tmp_path):
    recs = [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"messages": [{"role": "wizard", "content": "?"}]},
        {"messages": "not a list"},
    ]
    (tmp_path / "chat.jsonl").write_bytes(_jsonl(recs))
    src = DocumentSource(tmp_path / "chat.jsonl")
    docs = list(src)
    assert [d.text for d in docs] == [None, None]
    assert docs[0].messages[2] == {"role": "assistant", "content": "a"}
    assert docs[1].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert src.stats.skipped == {"bad_messages": 2}
    assert src.stats.locations == [f"{tmp_path / 'chat.jsonl'}:3", f"{tmp_path / 'chat.jsonl'}:4"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"id": [1, 2, 3], "content": ["one", "", "three"]}), tmp_path / "d.parquet")
    src = DocumentSource(tmp_path / "d.parquet")
    assert _texts(src) == ["one", "three"]
    assert src.stats.skipped == {"empty": 1} and src.stats.locations == [f"{tmp_path / 'd.parquet'}:2"]
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "nofield.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet" * 10)
    src = DocumentSource(str(tmp_path / "*.parquet"))
    assert len(list(src)) == 2
    assert src.stats.skipped == {"empty": 1, "missing_field": 2, "unreadable": 1}
    assert _texts(DocumentSource(tmp_path / "nofield.parquet", text_field="body")) == ["x", "y"]


def test_folder_and_glob(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("A", encoding="utf-8")
    (tmp_path / "sub" / "b.jsonl").write_bytes(_jsonl([{"text": "B"}]))
    (tmp_path / "sub" / "deeper" / "c.jsonl.gz").write_bytes(gzip.compress(_jsonl([{"text": "C"}])))
    (tmp_path / "sub" / "ignored.csv").write_text("x,y", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("H", encoding="utf-8")
    src = DocumentSource(tmp_path)
    assert sorted(t.strip() for t in _texts(src)) == ["A", "B", "C"]
    assert src.stats.files == 3
    assert [t.strip() for t in _texts(DocumentSource(str(tmp_path / "**" / "*.jsonl*")))] == ["B", "C"]
    with pytest.raises(UserError, match="no file matches"):
        DocumentSource(str(tmp_path / "*.parquet"))
    with pytest.raises(UserError, match="no file matches"):
        DocumentSource(str(tmp_path / "nope.jsonl"))


def test_malformed_records_skipped_and_counted(tmp_path):
    bad = tmp_path / "bad.jsonl"
    with open(bad, "wb") as f:
        f.write(b'{"text": "good one"}\n')  # 1
        f.write(b'{"text": "bad \xff\xfe utf8"}\n')  # 2 invalid UTF-8
        f.write(b'{"text": "broken\n')  # 3 broken JSON
        f.write(b'{"text": "' + b"x" * (10 << 20) + b'"}\n')  # 4 a 10 MB single line
        f.write(b'{"title": "no text field"}\n')  # 5 missing field
        f.write(b'{"text": "   "}\n')  # 6 empty
        f.write(b'{"text": "lone surrogate \\ud800"}\n')  # 7 valid JSON, not encodable as UTF-8
        f.write(b'{"text": "good two"}\n')  # 8
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "junk.jsonl").write_bytes(bytes(range(256)) * 64)  # binary: NUL bytes
    (tmp_path / "junk.txt").write_bytes(os.urandom(1000) + b"\x00" + os.urandom(1000))
    (tmp_path / "ok.txt").write_text("fine text\n", encoding="utf-8")
    src = DocumentSource(tmp_path)
    texts = _texts(src)
    assert texts == ["good one", "good two", "fine text\n"]
    st = src.stats
    assert st.skipped == {"invalid_utf8": 2, "broken_json": 1, "line_too_long": 1, "missing_field": 1, "empty": 2,
                          "binary": 2}
    assert st.documents == 3 and st.total_skipped == 9
    assert st.locations == [f"{bad}:{n}" for n in (2, 3, 4, 5, 6)]
    assert [r for _, r in st.examples] == ["invalid_utf8", "broken_json", "line_too_long", "missing_field", "empty"]
    summary = st.summary()
    assert f"{bad}:2 (invalid utf8)" in summary and "skipped 9 record(s)" in summary and "\n" not in summary


def test_giant_line_limit_is_configurable(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(_jsonl([{"text": "y" * 5000}, {"text": "short"}]))
    src = DocumentSource(p, max_line_bytes=1000)
    assert _texts(src) == ["short"] and src.stats.skipped == {"line_too_long": 1}
    assert src.stats.locations == [f"{p}:1"]


def test_binary_line_after_sniff_window(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(_jsonl([{"text": "z" * 100}] * 100) + b'{"text": "a\x00b"}\n' + _jsonl([{"text": "end"}]))
    src = DocumentSource(p)
    assert len(list(src)) == 101 and src.stats.skipped == {"binary": 1}
    assert src.stats.locations == [f"{p}:101"]


def test_corrupt_compressed_file_counted(tmp_path):
    good = lzma.compress(_jsonl([{"text": f"doc {i}"} for i in range(1000)]))
    (tmp_path / "a.jsonl.xz").write_bytes(good[: len(good) // 2])  # truncated stream
    (tmp_path / "b.jsonl").write_bytes(_jsonl([{"text": "b"}]))
    src = DocumentSource(tmp_path)
    texts = _texts(src)
    assert texts[-1] == "b" and src.stats.skipped == {"unreadable": 1}
    where, line = src.stats.locations[0].rsplit(":", 1)
    assert where.endswith("a.jsonl.xz") and int(line) == len(texts)  # the line being read when the stream broke


def test_a_stream_left_open_at_exit_prints_nothing(tmp_path):
    """A script that reads a few batches and exits leaves the file's generator open; closing it at interpreter exit
    (module globals already gone) used to print an ignored TypeError from iter_file."""
    (tmp_path / "a.jsonl.xz").write_bytes(lzma.compress(_jsonl([{"text": f"doc {i} " * 50} for i in range(100)])))
    code = ("import itertools, memlm\nfrom memlm.data.packing import Packer\nfrom memlm.data.sources import "
            "open_sources\nfrom memlm.data.tokenizer import load_tokenizer\n"
            f"p = Packer(open_sources([{str(tmp_path)!r}], seed=0), load_tokenizer('byte'), batch_size=2, seq_len=64, "
            "mode='packed', seed=0)\nprint(len(list(itertools.islice(p, 2))))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert r.returncode == 0 and r.stdout.strip() == "2" and r.stderr == "", r.stderr


def test_no_usable_text_is_user_error(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "junk.jsonl").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(UserError) as e:
        list(DocumentSource(tmp_path))
    assert str(tmp_path) in str(e.value) and "no usable text" in str(e.value)


def test_hf_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match="datasets"):
        list(DocumentSource("hf:someone/corpus"))
    calls = {}

    def load_dataset(name, config, split, streaming):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return iter([{"text": "a"}, {"content": "b"}, {"foo": 1}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = DocumentSource("hf:someone/corpus", hf_config="en", hf_split="validation")
    assert _texts(src) == ["a", "b"]
    assert calls == {"name": "someone/corpus", "config": "en", "split": "validation", "streaming": True}
    assert src.stats.locations == ["hf:someone/corpus:3"]


def test_demo_corpus():
    src = DocumentSource(demo_corpus_path())
    docs = list(src)
    assert len(docs) == 20 and src.stats.total_skipped == 0
    assert os.path.getsize(demo_corpus_path()) <= 2_000_000
    assert any("It is a truth universally acknowledged" in d.text for d in docs)


def _list_source(name: str, n: int) -> list[Document]:
    return [Document(f"{name}{i}", None, name, i) for i in range(n)]


def test_mixture_weights_and_determinism():
    a, b = _list_source("a", 50), _list_source("b", 7)
    mix = mixture([(a, 0.7), (b, 0.3)], seed=3)
    first = [d.text for _, d in zip(range(1000), mix)]
    again = [d.text for _, d in zip(range(1000), mixture([(a, 0.7), (b, 0.3)], seed=3))]
    assert first == again
    n_a = sum(t.startswith("a") for t in first)
    assert abs(n_a - 700) <= 2
    # b (7 docs) was cycled ~43 times and kept its share; a restarted too
    assert first.count("b0") >= 40 and mix.epochs[1] >= 40
    # any window of 100 draws is also close to the weights (interleaved, not blocked)
    assert all(abs(sum(t.startswith("a") for t in first[i:i + 100]) - 70) <= 2 for i in range(0, 900, 100))


def test_mixture_by_chars_and_non_cycling():
    long = [Document("x" * 100)] * 20
    short = [Document("y" * 10)] * 200
    mix = Mixture([(long, 0.5), (short, 0.5)], seed=0, unit="chars", cycle=False)
    docs = list(mix)
    assert len(docs) == 220  # everything once, then it ends
    first = docs[:100]
    chars_long = sum(len(d.text) for d in first if d.text[0] == "x")
    chars_short = sum(len(d.text) for d in first if d.text[0] == "y")
    assert abs(chars_long - chars_short) <= 100


def test_open_sources_specs(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_jsonl([{"text": "a"}] * 10))
    (tmp_path / "b.jsonl").write_bytes(_jsonl([{"text": "b"}] * 10))
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    assert parse_spec(f"{a}:0.7,{b}:0.3") == [(a, 0.7), (b, 0.3)]
    assert parse_spec("hf:org/name") == [("hf:org/name", None)]
    mix = open_sources(f"{a}:0.75,{b}:0.25", seed=1)
    assert isinstance(mix, Mixture) and mix.infinite
    got = [d.text for _, d in zip(range(400), mix)]
    assert got.count("a") == 300
    assert isinstance(open_sources(a), DocumentSource)
    both = open_sources([a, b])
    assert isinstance(both, Concat) and [d.text for d in both] == ["a"] * 10 + ["b"] * 10
    assert both.stats.documents == 20
    assert isinstance(open_sources([a, b], weights=[1, 3]), Mixture)
    with pytest.raises(UserError, match="every data source or to none"):
        open_sources(f"{a}:0.5,{b}")
    with pytest.raises(UserError, match="must be > 0"):
        open_sources(f"{a}:0,{b}:1")


def test_split_documents():
    docs = _list_source("d", 20)
    train, val = split_documents(docs, every=5)
    assert [d.line for d in val] == [4, 9, 14, 19]
    assert [d.line for d in train] == [i for i in range(20) if i % 5 != 4]
    assert [d.line for d in val] == [4, 9, 14, 19]  # re-iterable


def test_stats_merge_and_summary():
    a, b = SourceStats(), SourceStats()
    a.documents, b.documents = 2, 3
    for i in range(4):
        a.skip("empty", "f", i)
        b.skip("broken_json", "g", i)
    m = a.merge(b)
    assert m.documents == 5 and m.skipped == {"empty": 4, "broken_json": 4} and len(m.locations) == 5
    assert SourceStats(documents=1).summary().endswith("nothing skipped.")
    assert Path(demo_corpus_path()).name == "books-demo.jsonl.xz"


def test_byte_order_mark_and_crlf(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "one"}\r\n{"text": "two"}\r\n')
    (tmp_path / "b.json").write_bytes(bom + json.dumps(RECORDS).encode())
    (tmp_path / "c.txt").write_bytes(bom + b"hello\r\nworld\r\n")
    assert _texts(DocumentSource(tmp_path / "a.jsonl")) == ["one", "two"]
    assert _texts(DocumentSource(tmp_path / "b.json")) == EXPECTED
    assert _texts(DocumentSource(tmp_path / "c.txt")) == ["hello\nworld\n"]
