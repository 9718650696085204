"""Tokenise once into memory-mapped shards; read them back by document, in order or shuffled, resumably.

Notation: N documents, n tokens in a shard, V vocabulary size.

Layout of a prepared folder:

    index.json              format/version, dtype, tokenizer (name, kind, V, fingerprint, EOS), counts, shard list,
                            source statistics; written last, so its presence means the folder is complete
    shard-00000.bin         token ids, uint16 when V ≤ 65536 else uint32, documents back to back (no EOS: the packer
                            appends it)
    shard-00000.idx         int64 [docs + 1] start offsets of the documents in the shard (the last is n)
    shard-00000.mask        (only if the shard holds chat documents) uint8 [n] loss mask, 1 = training target
    val/                    the same layout for the validation split when `val_every` is given

Offsets live in binary .idx files rather than in index.json so that millions of documents cost nothing to open.
Every file is written to a temporary name and renamed, inside a temporary folder that replaces the target folder
only when complete. A document never spans two shards.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from memlm.data.chat import encode_chat
from memlm.data.packing import encode_texts
from memlm.data.sources import Document, SourceStats, open_sources
from memlm.data.tokenizer import Tokenizer
from memlm.errors import UserError

FORMAT = "memlm-shards"
VERSION = 1
INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class _Writer:
    """Appends documents to shard files of about `shard_tokens` tokens."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        out.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self.documents = self.tokens = 0
        self._open = False

    def _start(self) -> None:
        k = len(self.shards)
        self.name = f"shard-{k:05d}"
        self._bin = open(self.out / f"{self.name}.bin.tmp", "wb")  # noqa: SIM115 — stays open across add() calls
        self._mask = None  # opened on the first chat document of this shard
        self._offsets = [0]
        self._open = True

    def add(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        if len(ids) == 0:
            return
        if self._open and self._offsets[-1] > 0 and self._offsets[-1] + len(ids) > self.shard_tokens:
            self.close_shard()
        if not self._open:
            self._start()
        if mask is not None and self._mask is None:
            self._mask = open(self.out / f"{self.name}.mask.tmp", "wb")  # noqa: SIM115 — closed in close_shard
            self._mask.write(np.ones(self._offsets[-1], dtype=np.uint8).tobytes())  # earlier text docs: all targets
        self._bin.write(ids.astype(self.dtype, copy=False).tobytes())
        if self._mask is not None:
            m = np.ones(len(ids), dtype=np.uint8) if mask is None else mask.astype(np.uint8)
            self._mask.write(m.tobytes())
        self._offsets.append(self._offsets[-1] + len(ids))
        self.documents += 1
        self.tokens += len(ids)

    def close_shard(self) -> None:
        if not self._open:
            return
        self._bin.close()
        os.replace(self.out / f"{self.name}.bin.tmp", self.out / f"{self.name}.bin")
        idx_tmp = self.out / f"{self.name}.idx.tmp"
        np.asarray(self._offsets, dtype=np.int64).tofile(idx_tmp)
        os.replace(idx_tmp, self.out / f"{self.name}.idx")
        mask_file = None
        if self._mask is not None:
            self._mask.close()
            mask_file = f"{self.name}.mask"
            os.replace(self.out / f"{mask_file}.tmp", self.out / mask_file)
        self.shards.append({"file": f"{self.name}.bin", "offsets": f"{self.name}.idx", "mask": mask_file,
                            "documents": len(self._offsets) - 1, "tokens": self._offsets[-1]})
        self._open = False

    def finish(self, tok: Tokenizer, stats: dict, split: str, extra: dict) -> dict:
        self.close_shard()
        if self.documents == 0:
            raise UserError(f"data prepare: no documents for the {split} split")
        index = {"format": FORMAT, "version": VERSION, "split": split, "dtype": self.dtype.name,
                 "tokenizer": tok.describe(), "documents": self.documents, "tokens": self.tokens,
                 "shards": self.shards, "sources": stats,
                 "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra}
        tmp = self.out / f"{INDEX}.tmp"
        tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
        os.replace(tmp, self.out / INDEX)
        return index


def _tokenize_group(tok: Tokenizer, group: list[Any]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Batch-encode the plain texts of a group (HF tokenizers parallelise), chats one by one; order kept."""
    texts = [(i, d if isinstance(d, str) else d.text) for i, d in enumerate(group)
             if isinstance(d, str) or (isinstance(d, Document) and d.messages is None)]
    enc = dict(zip((i for i, _ in texts), encode_texts(tok, [t for _, t in texts])))
    out: list[tuple[np.ndarray, np.ndarray | None]] = []
    for i, d in enumerate(group):
        if i in enc:
            out.append((enc[i], None))
        else:
            ids, mask = encode_chat(tok, d.messages)
            out.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)))
    return out


def prepare(sources: Any, tokenizer: Tokenizer, out_dir: str | os.PathLike, *, shard_tokens: int = 1 << 26,
            val_every: int | None = None, max_tokens: int | None = None, overwrite: bool = False,
            group_chars: int = 4 << 20, progress: Any = None) -> dict:
    """Tokenise `sources` into shards under out_dir. A string or a list of strings is read as source specs (see
    `open_sources`); anything else is iterated for Documents (wrap raw texts as `Document(text)`).

    val_every=k sends documents k-1, 2k-1, … to out_dir/val. max_tokens stops after about that many tokens (needed
    for an infinite weighted mixture). `progress(tokens_so_far)` is called after every group. Returns the index.

    Everything is written into a hidden sibling folder that replaces out_dir only once complete, so a failed or
    interrupted run leaves any earlier prepared data untouched. out_dir must be new, empty, or (with overwrite) a
    prepared folder — never a folder of other files.
    """
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"'{out}' exists and is not a folder")
        if (out / INDEX).exists():
            if not overwrite:
                raise UserError(f"'{out}' already holds prepared data ({INDEX}); pass overwrite=True / --overwrite")
        elif any(out.iterdir()):
            raise UserError(f"'{out}' exists and is not empty; choose a new folder for prepared data")
    is_specs = isinstance(sources, str) or (isinstance(sources, (list, tuple)) and bool(sources)
                                            and all(isinstance(s, str) for s in sources))
    src = open_sources(list(sources) if not isinstance(sources, str) else sources) if is_specs else sources
    if getattr(src, "infinite", False) and max_tokens is None:
        raise UserError("this weighted mixture cycles forever; give max_tokens (--max-tokens) to prepare it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        index = _prepare_into(src, tokenizer, tmp, shard_tokens, val_every, max_tokens, group_chars, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return index


def _prepare_into(src: Any, tokenizer: Tokenizer, out: Path, shard_tokens: int, val_every: int | None,
                  max_tokens: int | None, group_chars: int, progress: Any) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    train = _Writer(out, dtype, shard_tokens)
    val = _Writer(out / "val", dtype, shard_tokens) if val_every else None
    n_seen = 0
    group: list[Any] = []
    size = 0

    def flush() -> None:
        nonlocal n_seen
        for ids, mask in _tokenize_group(tokenizer, group):
            if ids.size and int(ids.max()) >= tokenizer.vocab_size:
                raise UserError(f"tokenizer produced id {int(ids.max())} ≥ vocab_size {tokenizer.vocab_size}")
            w = val if val is not None and n_seen % val_every == val_every - 1 else train  # type: ignore[operator]
            w.add(ids, mask)
            n_seen += 1
        group.clear()
        if progress is not None:
            progress(train.tokens + (val.tokens if val else 0))

    for doc in src:
        group.append(doc)
        size += len(doc) if isinstance(doc, str) else len(doc.text or "") + sum(
            len(m["content"]) for m in (doc.messages or []))
        if size >= group_chars or len(group) >= 4096:
            flush()
            size = 0
            if max_tokens is not None and train.tokens + (val.tokens if val else 0) >= max_tokens:
                break
    if group:
        flush()
    stats = src.stats.to_dict() if isinstance(getattr(src, "stats", None), SourceStats) else {}
    if val is not None:
        val.finish(tokenizer, stats, "val", {})
    return train.finish(tokenizer, stats, "train", {"val": "val" if val is not None else None,
                                                    "val_every": val_every})


def _read_index(path: Path) -> dict:
    try:
        index = json.loads((path / INDEX).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"'{path}' is not a prepared data folder (no {INDEX}); run `memlm data prepare`") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read '{path / INDEX}': {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"'{path / INDEX}' is not a memlm shard index")
    if index.get("version") != VERSION:
        raise UserError(f"'{path / INDEX}' has format version {index.get('version')}, this memlm reads {VERSION}")
    return index


class ShardDataset:
    """Random-access documents of a prepared folder (memory-mapped; opening costs the .idx files only).

    `ds[i]` / `doc_tokens(i)` → token array [L'] (a read-only view), `doc_mask(i)` → bool [L'] or None.
    `order(epoch, seed=, shuffle=)` → the document order of an epoch (a seeded permutation, a new one each epoch);
    `iterate(epoch=, start=)` walks it from any position, which is all a resumable cursor needs.
    """

    def __init__(self, path: str | os.PathLike, *, tokenizer: Tokenizer | None = None, shuffle: bool = False,
                 seed: int = 0) -> None:
        self.path = Path(path)
        self.index = _read_index(self.path)
        self.dtype = np.dtype(self.index["dtype"])
        self.tokenizer_info = self.index["tokenizer"]
        self.shuffle, self.seed = shuffle, seed
        self._bins: list[np.ndarray | None] = [None] * len(self.index["shards"])
        self._masks: list[np.ndarray | None] = [None] * len(self.index["shards"])
        self._offsets = []
        for s in self.index["shards"]:
            f = self.path / s["offsets"]
            try:
                off = np.fromfile(f, dtype=np.int64)
            except OSError:
                raise UserError(f"prepared data '{self.path}' is missing {s['offsets']}") from None
            if len(off) != s["documents"] + 1 or off[-1] != s["tokens"]:
                raise UserError(f"prepared data '{self.path}': {s['offsets']} does not match {INDEX}")
            self._offsets.append(off)
        counts = np.array([s["documents"] for s in self.index["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_tokens = int(self.index["tokens"])
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    def __repr__(self) -> str:
        return f"ShardDataset({str(self.path)!r}, documents={len(self)}, tokens={self.num_tokens})"

    def __len__(self) -> int:
        return int(self._starts[-1])

    def check_tokenizer(self, tok: Tokenizer) -> None:
        info = self.tokenizer_info
        if info.get("fingerprint") != tok.fingerprint or info.get("vocab_size") != tok.vocab_size:
            raise UserError(f"prepared data '{self.path}' was tokenised with '{info.get('name')}' "
                            f"(vocab {info.get('vocab_size')}, fingerprint {info.get('fingerprint')}), not with "
                            f"'{tok.name}' (vocab {tok.vocab_size}, fingerprint {tok.fingerprint})")

    def _bin(self, k: int) -> np.ndarray:
        if self._bins[k] is None:
            s = self.index["shards"][k]
            f = self.path / s["file"]
            if not f.is_file() or f.stat().st_size != s["tokens"] * self.dtype.itemsize:
                raise UserError(f"prepared data '{self.path}': {s['file']} is missing or has the wrong size")
            self._bins[k] = np.memmap(f, dtype=self.dtype, mode="r", shape=(s["tokens"],))
        return self._bins[k]  # type: ignore[return-value]

    def _locate(self, i: int) -> tuple[int, int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range [0, {len(self)})")
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        j = i - int(self._starts[k])
        return k, int(self._offsets[k][j]), int(self._offsets[k][j + 1])

    def doc_tokens(self, i: int) -> np.ndarray:
        k, a, b = self._locate(int(i))
        return self._bin(k)[a:b]

    __getitem__ = doc_tokens

    def doc_mask(self, i: int) -> np.ndarray | None:
        k, a, b = self._locate(int(i))
        name = self.index["shards"][k]["mask"]
        if name is None:
            return None
        if self._masks[k] is None:
            self._masks[k] = np.memmap(self.path / name, dtype=np.uint8, mode="r")
        return self._masks[k][a:b].astype(bool)  # type: ignore[index]

    def order(self, epoch: int = 0, *, seed: int | None = None, shuffle: bool | None = None) -> np.ndarray:
        """Document order of an epoch: identity, or a permutation drawn from (seed, epoch)."""
        seed = self.seed if seed is None else seed
        shuffle = self.shuffle if shuffle is None else shuffle
        if not shuffle:
            return np.arange(len(self))
        return np.random.default_rng([seed, epoch]).permutation(len(self))

    def iterate(self, *, epoch: int = 0, start: int = 0) -> Iterator[np.ndarray]:
        """Documents of `epoch` from position `start` of its order."""
        order = self.order(epoch)
        for j in order[start:]:
            yield self.doc_tokens(int(j))

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.iterate()

    def val(self) -> ShardDataset:
        """The validation split written by prepare(val_every=...)."""
        if not self.index.get("val"):
            raise UserError(f"prepared data '{self.path}' has no validation split (prepare with val_every)")
        return ShardDataset(self.path / self.index["val"], shuffle=False, seed=self.seed)

