"""Document sources: files, folders, globs, compressed files, HF datasets, weighted mixtures.

Notation: w_i mixture weight of source i, u_i its consumed units (documents or characters).

A *record* is one line of a .jsonl file, one element of a .json array, one parquet row, one HF dataset row, or one
.txt file. Records that cannot be used are skipped and counted by reason in `SourceStats` (never a traceback):

    invalid_utf8   bytes that are not UTF-8 (or a JSON string with a lone surrogate)
    broken_json    a line / file that does not parse
    empty          no text after stripping whitespace (empty files, blank lines, "" fields, empty chats)
    missing_field  a record with none of the text fields
    bad_messages   a chat record whose turns are not {role, content} / {from, value} with known roles
    line_too_long  a line longer than max_line_bytes (read in bounded pieces, never held in memory)
    binary         a file with NUL bytes in its first 8 KiB (or a NUL inside a line)
    unreadable     an I/O or decompression error; the rest of that file is skipped

Text fields, first match wins: `text`, `content`, `input`, then chat `messages` / `conversations`.
A .txt file is one document (split at a blank line once it exceeds txt_max_doc_bytes, 16 MiB by default; line
endings become "\n"). A UTF-8 byte-order mark at the start of a file is dropped.
Locations are "file:N" with N the 1-based line (or array element / parquet row / dataset row) number.

Every source is re-iterable (each pass re-reads), which is what lets the packer run epochs and resume by index.
"""
from __future__ import annotations

import bz2
import glob as _glob
import gzip
import io
import json
import lzma
import os
import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memlm.errors import UserError

TEXT_FIELDS = ("text", "content", "input")
CHAT_FIELDS = ("messages", "conversations")
TEXT_EXTS = (".txt", ".text", ".md", ".rst")
JSONL_EXTS = (".jsonl", ".ndjson")
JSON_EXTS = (".json",)
PARQUET_EXTS = (".parquet",)
COMPRESSED = (".gz", ".xz", ".lzma", ".zst", ".zstd", ".bz2")
SUPPORTED = TEXT_EXTS + JSONL_EXTS + JSON_EXTS + PARQUET_EXTS
ROLE_MAP = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
            "bot": "assistant", "model": "assistant"}
REASONS = ("invalid_utf8", "broken_json", "empty", "missing_field", "bad_messages", "line_too_long", "binary",
           "unreadable")
MAX_EXAMPLES = 5
_SNIFF = 8192


@dataclass
class Document:
    """One training document: plain text or a chat (list of {"role", "content"} with normalised roles)."""

    text: str | None
    messages: list[dict] | None = None
    source: str = ""
    line: int = 0


@dataclass
class SourceStats:
    """Counts of used documents and skipped records (per reason), with the first few skip locations."""

    documents: int = 0
    chars: int = 0
    files: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, str]] = field(default_factory=list)  # (location "file:line", reason)
    last_line: int = field(default=0, repr=False, compare=False)  # line reached in the current file (for I/O errors)

    def skip(self, reason: str, where: str, line: int, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((f"{where}:{line}", reason))

    @property
    def locations(self) -> list[str]:
        """The first few skipped records as "file:line" strings."""
        return [loc for loc, _ in self.examples]

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: SourceStats) -> SourceStats:
        out = SourceStats(self.documents + other.documents, self.chars + other.chars, self.files + other.files,
                          dict(self.skipped), list(self.examples))
        for k, v in other.skipped.items():
            out.skipped[k] = out.skipped.get(k, 0) + v
        out.examples = (out.examples + other.examples)[:MAX_EXAMPLES]
        return out

    def to_dict(self) -> dict:
        return {"documents": self.documents, "chars": self.chars, "files": self.files, "skipped": dict(self.skipped),
                "examples": [list(e) for e in self.examples]}

    def summary(self) -> str:
        """One paragraph for humans."""
        s = f"read {self.documents:,} documents ({self.chars:,} characters) from {self.files:,} file(s)"
        if not self.skipped:
            return s + "; nothing skipped."
        parts = ", ".join(f"{n:,} {r.replace('_', ' ')}" for r, n in sorted(self.skipped.items(), key=lambda x: -x[1]))
        first = ", ".join(f"{loc} ({r.replace('_', ' ')})" for loc, r in self.examples)
        return f"{s}; skipped {self.total_skipped:,} record(s): {parts}. First: {first}."


# --------------------------------------------------------------------------------------------------------------------
# Record → Document
# --------------------------------------------------------------------------------------------------------------------

def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _content_text(c: Any) -> str | None:
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # OpenAI-style content parts
        parts = [p.get("text") for p in c if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(parts) if parts else None
    return None


def normalize_messages(raw: Any) -> list[dict] | None:
    """[{role, content}] or [{from, value}] → [{"role": system|user|assistant, "content": str}]; None if malformed."""
    if not isinstance(raw, list):
        return None
    out = []
    for m in raw:
        if not isinstance(m, dict):
            return None
        role = m.get("role", m.get("from"))
        content = _content_text(m.get("content", m.get("value")))
        role = ROLE_MAP.get(str(role).lower()) if role is not None else None
        if role is None or content is None:
            return None
        out.append({"role": role, "content": content})
    return out


def record_to_document(rec: Any, where: str, line: int, stats: SourceStats,
                       text_field: str | None = None) -> Document | None:
    """Convert one parsed record; count and return None if unusable."""
    if isinstance(rec, str):
        text: Any = rec
    elif isinstance(rec, dict):
        fields = (text_field,) if text_field else TEXT_FIELDS + CHAT_FIELDS
        key = next((f for f in fields if f in rec), None)
        if key is None:
            stats.skip("missing_field", where, line)
            return None
        text = rec[key]
        if key in CHAT_FIELDS or isinstance(text, list):
            msgs = normalize_messages(text)
            if msgs is None:
                stats.skip("bad_messages", where, line)
                return None
            if not any(m["content"].strip() for m in msgs):
                stats.skip("empty", where, line)
                return None
            if not all(_utf8_ok(m["content"]) for m in msgs):
                stats.skip("invalid_utf8", where, line)
                return None
            stats.documents += 1
            stats.chars += sum(len(m["content"]) for m in msgs)
            return Document(None, msgs, where, line)
    else:
        stats.skip("missing_field", where, line)
        return None
    if not isinstance(text, str):
        stats.skip("missing_field", where, line)
        return None
    if not text.strip():
        stats.skip("empty", where, line)
        return None
    if not _utf8_ok(text):
        stats.skip("invalid_utf8", where, line)
        return None
    stats.documents += 1
    stats.chars += len(text)
    return Document(text, None, where, line)


# --------------------------------------------------------------------------------------------------------------------
# File readers
# --------------------------------------------------------------------------------------------------------------------

def _strip_compression(name: str) -> tuple[str, str | None]:
    low = name.lower()
    for ext in COMPRESSED:
        if low.endswith(ext):
            return low[: -len(ext)], ext
    return low, None


def _open_binary(path: str) -> io.BufferedIOBase:
    _, comp = _strip_compression(path)
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp in (".xz", ".lzma"):
        return lzma.open(path, "rb")
    if comp == ".bz2":
        return bz2.open(path, "rb")
    if comp in (".zst", ".zstd"):
        try:
            import zstandard
        except ImportError:
            raise UserError(f"reading '{path}' needs the 'zstandard' package: pip install zstandard") from None
        raw = open(path, "rb")  # noqa: SIM115 — owned (closefd) by the returned reader
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _read_lines(fh: io.BufferedIOBase, where: str, stats: SourceStats, max_line_bytes: int,
                first: bytes | None = None) -> Iterator[tuple[int, str]]:
    """Yield (line number, decoded line without its newline) for readable lines; count the others.

    Reads with readline(limit) so a giant line costs at most max_line_bytes of memory. `first` is a line the caller
    already read (with the same limit) while sniffing the format.
    """
    lineno = 0
    while True:
        raw, first = (first, None) if first is not None else (fh.readline(max_line_bytes + 1), None)
        if not raw:
            return
        lineno += 1
        stats.last_line = lineno
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # drain the rest of the giant line
                raw = fh.readline(1 << 20)
            stats.skip("line_too_long", where, lineno)
            continue
        if b"\x00" in raw:
            stats.skip("binary", where, lineno)
            continue
        try:
            # utf-8-sig on the first line drops a byte-order mark (files saved by Windows editors)
            yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            stats.skip("invalid_utf8", where, lineno)


def _decompress_errors() -> tuple[type[BaseException], ...]:
    """What a truncated or corrupt (compressed) file raises while being read."""
    errs: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError, ValueError)
    zstd = sys.modules.get("zstandard")  # only imported when a .zst file was opened
    return (*errs, zstd.ZstdError) if zstd is not None and hasattr(zstd, "ZstdError") else errs


def _iter_jsonl(fh: io.BufferedIOBase, where: str, stats: SourceStats, max_line_bytes: int,
                text_field: str | None, first: bytes | None = None) -> Iterator[Document]:
    for lineno, line in _read_lines(fh, where, stats, max_line_bytes, first):
        if not line.strip():
            stats.skip("empty", where, lineno)
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            stats.skip("broken_json", where, lineno)
            continue
        doc = record_to_document(rec, where, lineno, stats, text_field)
        if doc is not None:
            yield doc


def _iter_json(fh: io.BufferedIOBase, where: str, stats: SourceStats, max_line_bytes: int,
               text_field: str | None) -> Iterator[Document]:
    """A .json file holds an array of records, one record, {"key": [records]}, or (often, in practice) JSON lines."""
    head = fh.peek(_SNIFF)[:_SNIFF] if hasattr(fh, "peek") else b""
    first = head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
    if first == b"{" or not head:
        # One object, or (common in practice for big files) JSON lines: if the first line parses on its own, stream
        # the file as JSON lines; otherwise parse it as a whole.
        line1 = fh.readline(max_line_bytes + 1)
        try:
            jsonl = line1.endswith(b"\n") and isinstance(json.loads(line1.removeprefix(b"\xef\xbb\xbf")),
                                                         (dict, str, list))
        except ValueError:
            jsonl = False
        if jsonl:
            yield from _iter_jsonl(fh, where, stats, max_line_bytes, text_field, first=line1)
            return
        data = line1 + fh.read()
        if not data.strip():
            stats.skip("empty", where, 1)
            return
        try:
            rec = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError:
            stats.skip("invalid_utf8", where, 1)
            return
        except ValueError:
            yield from _iter_jsonl(io.BufferedReader(io.BytesIO(data)), where, stats, max_line_bytes, text_field)
            return
        if isinstance(rec, dict) and not any(f in rec for f in ((text_field,) if text_field else
                                                                 TEXT_FIELDS + CHAT_FIELDS)):
            lists = [v for v in rec.values() if isinstance(v, list)]
            if len(lists) == 1:
                rec = lists[0]
        records = rec if isinstance(rec, list) else [rec]
    elif first == b"[":
        try:
            records = json.loads(fh.read().decode("utf-8-sig"))
        except UnicodeDecodeError:
            stats.skip("invalid_utf8", where, 1)
            return
        except ValueError:
            stats.skip("broken_json", where, 1)
            return
    else:
        yield from _iter_jsonl(fh, where, stats, max_line_bytes, text_field)
        return
    for i, rec in enumerate(records, 1):
        doc = record_to_document(rec, where, i, stats, text_field)
        if doc is not None:
            yield doc


def _iter_txt(fh: io.BufferedIOBase, where: str, stats: SourceStats, max_line_bytes: int,
              max_doc_bytes: int) -> Iterator[Document]:
    parts: list[str] = []
    size = 0
    start = 1

    def emit() -> Document | None:
        text = "".join(parts)
        if not text.strip():
            stats.skip("empty", where, start)
            return None
        stats.documents += 1
        stats.chars += len(text)
        return Document(text, None, where, start)

    lineno = 0
    for lineno, line in _read_lines(fh, where, stats, max_line_bytes):
        if size >= max_doc_bytes and not line.strip():
            doc = emit()
            if doc is not None:
                yield doc
            parts, size, start = [], 0, lineno + 1
            continue
        parts.append(line + "\n")
        size += len(line) + 1
    if parts or lineno == 0:
        doc = emit()
        if doc is not None:
            yield doc
    # A file whose only lines were all skipped still yields nothing; the skips were counted.


def _iter_parquet(path: str, where: str, stats: SourceStats, text_field: str | None) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading '{path}' needs the 'pyarrow' package: pip install pyarrow") from None
    with pq.ParquetFile(path) as pf:
        names = pf.schema_arrow.names
        fields = (text_field,) if text_field else TEXT_FIELDS + CHAT_FIELDS
        col = next((f for f in fields if f in names), None)
        if col is None:
            stats.skip("missing_field", where, 1, n=max(pf.metadata.num_rows, 1))
            return
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[col]):
            for value in batch.column(0).to_pylist():
                row += 1
                doc = record_to_document({col: value} if value is not None else {}, where, row, stats, col)
                if doc is not None:
                    yield doc


def iter_file(path: str, stats: SourceStats, *, text_field: str | None = None, max_line_bytes: int = 8 << 20,
              txt_max_doc_bytes: int = 16 << 20) -> Iterator[Document]:
    """Documents of one file, chosen by extension (after removing a compression suffix); unknown → plain text."""
    where = path
    base, _ = _strip_compression(os.path.basename(path))
    stats.files += 1
    if base.endswith(PARQUET_EXTS):
        try:
            yield from _iter_parquet(path, where, stats, text_field)
        except (OSError, ValueError):  # pyarrow's ArrowInvalid / ArrowIOError derive from these
            stats.skip("unreadable", where, 1)
        return
    stats.last_line = 0
    try:
        with _open_binary(path) as fh:
            head = fh.peek(_SNIFF)[:_SNIFF] if hasattr(fh, "peek") else b"?"
            if not head:
                stats.skip("empty", where, 1)
                return
            if b"\x00" in head:
                stats.skip("binary", where, 1)
                return
            if base.endswith(JSONL_EXTS):
                it = _iter_jsonl(fh, where, stats, max_line_bytes, text_field)
            elif base.endswith(JSON_EXTS):
                it = _iter_json(fh, where, stats, max_line_bytes, text_field)
            else:
                it = _iter_txt(fh, where, stats, max_line_bytes, txt_max_doc_bytes)
            yield from it
    except Exception as e:  # not `except _decompress_errors()`: a generator closed at interpreter exit would call
        if not isinstance(e, _decompress_errors()):  # it after the module's globals are gone (a TypeError on stderr)
            raise
        stats.skip("unreadable", where, stats.last_line + 1)  # the line being read when it failed


# --------------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------------

def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _is_supported(name: str) -> bool:
    base, _ = _strip_compression(os.path.basename(name))
    return base.endswith(SUPPORTED)


def _is_hf_disk_dir(p: Path) -> bool:
    return any((p / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def resolve_files(spec: str) -> list[str]:
    """A file, a folder (recursive; supported extensions only; hidden entries skipped) or a glob → sorted paths."""
    p = Path(os.path.expanduser(spec))
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        out = []
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            out.extend(os.path.join(root, f) for f in files if not f.startswith(".") and _is_supported(f))
        return sorted(out)
    if _has_glob(spec):
        return sorted(f for f in _glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(f))
    return []


class DocumentSource:
    """Documents from one spec: a file, folder, glob, `hf:NAME` (streamed HF dataset) or a `save_to_disk` folder.

    Iterating re-reads from the start; `stats` describes the latest pass. A pass that yields no document raises
    UserError naming the spec (and the skip summary)."""

    def __init__(self, spec: str | os.PathLike, *, text_field: str | None = None, max_line_bytes: int = 8 << 20,
                 txt_max_doc_bytes: int = 16 << 20, hf_config: str | None = None, hf_split: str = "train") -> None:
        self.spec = str(spec)
        self.text_field = text_field
        self.max_line_bytes = max_line_bytes
        self.txt_max_doc_bytes = txt_max_doc_bytes
        self.hf_config = hf_config
        self.hf_split = hf_split
        self.stats = SourceStats()
        self.kind = "files"
        if self.spec.startswith("hf:"):
            self.kind = "hf"
            self.files: list[str] = []
        elif Path(self.spec).is_dir() and _is_hf_disk_dir(Path(self.spec)):
            self.kind = "hf_disk"
            self.files = []
        else:
            self.files = resolve_files(self.spec)
            if not self.files:
                what = "no supported files in folder" if Path(self.spec).is_dir() else "no file matches"
                raise UserError(f"data source '{self.spec}': {what} (supported: "
                                f"{', '.join(SUPPORTED)}, optionally {', '.join(COMPRESSED)})")

    def __repr__(self) -> str:
        return f"DocumentSource({self.spec!r})"

    def __iter__(self) -> Iterator[Document]:
        self.stats = stats = SourceStats()
        if self.kind == "files":
            for f in self.files:
                yield from iter_file(f, stats, text_field=self.text_field, max_line_bytes=self.max_line_bytes,
                                     txt_max_doc_bytes=self.txt_max_doc_bytes)
        else:
            yield from self._iter_hf(stats)
        if stats.documents == 0:
            raise UserError(f"data source '{self.spec}' has no usable text: {stats.summary()}")

    def _iter_hf(self, stats: SourceStats) -> Iterator[Document]:
        try:
            import datasets
        except ImportError:
            raise UserError(f"data source '{self.spec}' needs the 'datasets' package: pip install datasets") from None
        try:
            if self.kind == "hf":
                name = self.spec[3:]
                ds = datasets.load_dataset(name, self.hf_config, split=self.hf_split, streaming=True)
            else:
                ds = datasets.load_from_disk(self.spec)
                if isinstance(ds, dict) or hasattr(ds, "keys") and not hasattr(ds, "features"):
                    ds = ds[self.hf_split]
        except Exception as e:  # noqa: BLE001 — datasets raises many unrelated types; the user needs one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            raise UserError(f"cannot open dataset '{self.spec}': {msg}") from None
        stats.files += 1
        for i, rec in enumerate(ds, 1):
            doc = record_to_document(rec, self.spec, i, stats, self.text_field)
            if doc is not None:
                yield doc


def merged_stats(sources: list[Any]) -> SourceStats:
    """The skip/count statistics of several sources added together (sources without stats contribute nothing)."""
    out = SourceStats()
    for s in sources:
        if isinstance(getattr(s, "stats", None), SourceStats):
            out = out.merge(s.stats)
    return out


class Mixture:
    """Deterministic weighted interleaving of re-iterable document sources.

    Stride scheduling: the next document comes from the source with the smallest (u_i + o_i) / w_i, where u_i counts
    what source i already gave (documents, or characters with unit="chars") and o_i ∈ [0, 1) is a seeded offset
    that only breaks ties. Proportions are therefore exact up to one document, not just in expectation.
    cycle=True (the default): an exhausted source restarts, so the mixture is infinite and keeps its proportions.
    cycle=False: exhausted sources drop out and the mixture ends when all are done.
    """

    def __init__(self, components: Iterable[tuple[Any, float]], seed: int = 0, *, unit: str = "docs",
                 cycle: bool = True, **source_kwargs: Any) -> None:
        comps = list(components)
        if not comps:
            raise UserError("a data mixture needs at least one source")
        if unit not in ("docs", "chars"):
            raise UserError(f"mixture unit must be 'docs' or 'chars', got {unit!r}")
        self.sources = [DocumentSource(s, **source_kwargs) if isinstance(s, (str, os.PathLike)) else s
                        for s, _ in comps]
        self.weights = [float(w) for _, w in comps]
        for (s, _), w in zip(comps, self.weights):
            if not w > 0:
                raise UserError(f"mixture weight for '{s}' must be > 0, got {w}")
        self.seed, self.unit, self.cycle = seed, unit, cycle
        self.infinite = cycle
        self.epochs = [0] * len(self.sources)  # how many times each source was restarted in the latest pass

    @property
    def stats(self) -> SourceStats:
        return merged_stats(self.sources)

    def __iter__(self) -> Iterator[Document]:
        rng = random.Random(self.seed)
        n = len(self.sources)
        offset = [rng.random() for _ in range(n)]
        used = [0.0] * n
        self.epochs = [0] * n
        its: list[Iterator | None] = [iter(s) for s in self.sources]
        while True:
            live = [i for i in range(n) if its[i] is not None]
            if not live:
                return
            i = min(live, key=lambda j: ((used[j] + offset[j]) / self.weights[j], j))
            try:
                doc = next(its[i])  # type: ignore[arg-type]
            except StopIteration:
                if self.cycle:
                    self.epochs[i] += 1
                    its[i] = iter(self.sources[i])
                    try:
                        doc = next(its[i])  # type: ignore[arg-type]
                    except StopIteration:
                        raise UserError(f"data source {self.sources[i]!r} yields no documents") from None
                else:
                    its[i] = None
                    continue
            used[i] += _doc_chars(doc) if self.unit == "chars" else 1
            yield doc


def _doc_chars(doc: Any) -> int:
    if isinstance(doc, Document):
        return len(doc.text) if doc.text is not None else sum(len(m["content"]) for m in doc.messages or [])
    return len(doc) if hasattr(doc, "__len__") else 1


def mixture(components: Iterable[tuple[Any, float]], seed: int = 0, **kwargs: Any) -> Mixture:
    """`mixture([("books/", 0.7), ("wiki.jsonl.xz", 0.3)], seed=0)`; see `Mixture`."""
    return Mixture(components, seed, **kwargs)


def parse_spec(spec: str) -> list[tuple[str, float | None]]:
    """ "a.jsonl:0.7,b/:0.3" → [("a.jsonl", 0.7), ("b/", 0.3)]; a part without a numeric ":w" suffix has weight None."""
    out: list[tuple[str, float | None]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        head, sep, tail = part.rpartition(":")
        w: float | None = None
        if sep and head:
            try:
                w = float(tail)
            except ValueError:
                w = None
        out.append((head, w) if w is not None else (part, None))
    return out


def open_sources(specs: list[str] | str, weights: list[float] | None = None, *, seed: int = 0, unit: str = "docs",
                 cycle: bool = True, **source_kwargs: Any) -> DocumentSource | Mixture | Concat:
    """CLI entry: one or more specs (each may itself be "a:0.7,b:0.3") → a DocumentSource or a Mixture.

    Without any weight, several sources are simply read one after another (cycle ignored)."""
    raw = [specs] if isinstance(specs, str) else list(specs)
    parts: list[tuple[str, float | None]] = [p for s in raw for p in parse_spec(s)]
    if not parts:
        raise UserError("no data source given")
    if weights is not None:
        if len(weights) != len(parts):
            raise UserError(f"{len(weights)} weights for {len(parts)} data sources")
        parts = [(s, float(w)) for (s, _), w in zip(parts, weights)]
    has_w = any(w is not None for _, w in parts)
    if has_w and not all(w is not None for _, w in parts):
        raise UserError("give a weight to every data source or to none: " + ", ".join(s for s, _ in parts))
    if len(parts) == 1 and not has_w:
        return DocumentSource(parts[0][0], **source_kwargs)
    if not has_w:
        return Concat([DocumentSource(s, **source_kwargs) for s, _ in parts])
    return Mixture([(s, float(w)) for s, w in parts], seed, unit=unit, cycle=cycle,  # type: ignore[arg-type]
                   **source_kwargs)


class Concat:
    """Sources read one after another (an unweighted list of specs)."""

    infinite = False

    def __init__(self, sources: list[Any]) -> None:
        self.sources = sources

    @property
    def stats(self) -> SourceStats:
        return merged_stats(self.sources)

    def __iter__(self) -> Iterator[Document]:
        for s in self.sources:
            yield from s


class _Split:
    def __init__(self, docs: Iterable[Any], every: int, val: bool) -> None:
        self.docs, self.every, self.val = docs, every, val

    @property
    def stats(self) -> SourceStats | None:
        return getattr(self.docs, "stats", None)

    def __repr__(self) -> str:
        return f"{'val' if self.val else 'train'} split (every {self.every}) of {self.docs!r}"

    def __iter__(self) -> Iterator[Any]:
        for i, d in enumerate(self.docs):
            if (i % self.every == self.every - 1) == self.val:
                yield d


def split_documents(docs: Iterable[Any], every: int = 50) -> tuple[Iterable[Any], Iterable[Any]]:
    """Deterministic train/validation split by document index: documents every-1, 2·every-1, … go to validation.

    Both halves are re-iterable when `docs` is (each pass re-reads `docs`)."""
    if every < 2:
        raise UserError(f"validation split 'every' must be ≥ 2, got {every}")
    return _Split(docs, every, False), _Split(docs, every, True)
