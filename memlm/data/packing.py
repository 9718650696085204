"""Packing token documents into fixed-size training batches, with document boundaries and a resumable cursor.

Notation: B rows per batch, T tokens per row, L length of one document (its ids plus the EOS appended here).

Each document becomes `ids + [EOS]` (optionally `[BOS] + ids + [EOS]`). Documents are laid end to end in a row;
a document longer than what is left of a row continues in the next row of the same stream.

Labels are the *next* token (the label shift): for position i of a document, label = doc[i + 1] when that token is a
training target (always, for plain text; only assistant tokens for chat), else -100. The last real token's label is
the EOS (the model learns to end documents); the EOS's own label is -100, because what follows an EOS is the next,
unrelated document. Nothing ever predicts across a document boundary.

`reset[b, t]` is True exactly where token t is the first token of a document. A row that continues a document from
the previous row has reset[b, 0] = False: a recurrent memory may carry its state into it (TBPTT).

Two modes:
    "packed"   one stream cut into consecutive rows (row b+1 continues row b; the next batch continues the last row).
               The usual mode when rows are independent samples.
    "streams"  B independent streams: row b of every batch continues row b of the previous batch. This is what lets
               the trainer carry ModelState row by row across steps (TBPTT over documents of any length).

Sources: a ShardDataset (random access, shuffled per epoch by the seed, O(1) resume) or any re-iterable of
Documents, strings, token lists / arrays, or (ids, loss_mask) pairs, tokenised on the fly (resume replays the
source up to the cursor, so it must be deterministic).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from memlm.data.chat import encode_chat
from memlm.data.sources import Document
from memlm.data.tokenizer import ByteTokenizer, Tokenizer
from memlm.errors import UserError

IGNORE = -100
MODES = ("packed", "streams")


@dataclass
class Batch:
    """input_ids [B, T] long, labels [B, T] long (IGNORE where no loss), reset [B, T] bool (document starts)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    reset: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(self.input_ids.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking),
                     self.reset.to(device, non_blocking=non_blocking))

    @property
    def num_targets(self) -> int:
        """Tokens that carry loss (normalise the loss by this)."""
        return int((self.labels != IGNORE).sum())


def document_ids(reset: torch.Tensor) -> torch.Tensor:
    """reset [B, T] → document index [B, T] within the row (0 for a document continued from the previous row).

    Attention restricted to one document: allowed(q, k) = k ≤ q and doc[q] == doc[k]."""
    return torch.cumsum(reset.long(), dim=-1)


# --------------------------------------------------------------------------------------------------------------------
# Tokenisation of one item
# --------------------------------------------------------------------------------------------------------------------

def encode_texts(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Plain texts → int64 id arrays (byte tokenizer: a zero-copy view of the UTF-8 bytes, widened)."""
    if isinstance(tok, ByteTokenizer):
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]
    return [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(texts)]


def tokenize_item(item: Any, tok: Tokenizer | None) -> tuple[np.ndarray, np.ndarray | None]:
    """One source item → (ids [L'] int64, loss mask [L'] bool or None meaning "all targets"). No EOS added."""
    if isinstance(item, Document):
        if item.messages is not None:
            if tok is None:
                raise UserError("chat documents need a tokenizer")
            ids, mask = encode_chat(tok, item.messages)
            return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
        item = item.text
    if isinstance(item, str):
        if tok is None:
            raise UserError("text documents need a tokenizer")
        return encode_texts(tok, [item])[0], None
    if isinstance(item, tuple) and len(item) == 2 and hasattr(item[0], "__len__"):
        ids, mask = item
        return np.asarray(ids, dtype=np.int64), (None if mask is None else np.asarray(mask, dtype=bool))
    return np.asarray(item, dtype=np.int64), None


def _make_doc(ids: np.ndarray, mask: np.ndarray | None, eos: int, bos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """→ (ids with BOS/EOS [L], next-token labels [L])."""
    # EOS is a target after plain text (learn to end a document); after a chat (some tokens are not targets) the
    # turn already ended with <|end|>. An all-true mask (a text document stored beside chats in a shard) is text.
    eos_target = mask is None or bool(mask.all())
    parts, mparts = [], []
    if bos is not None:
        parts.append(np.array([bos], dtype=np.int64))
        mparts.append(np.zeros(1, dtype=bool))
    parts.append(ids.astype(np.int64, copy=False))
    mparts.append(mask if mask is not None else np.ones(len(ids), dtype=bool))
    parts.append(np.array([eos], dtype=np.int64))
    mparts.append(np.array([eos_target]))
    full = np.concatenate(parts)
    m = np.concatenate(mparts)
    labels = np.full(len(full), IGNORE, dtype=np.int64)
    labels[:-1] = np.where(m[1:], full[1:], IGNORE)
    return full, labels


# --------------------------------------------------------------------------------------------------------------------
# Document streams (what the packer pulls from)
# --------------------------------------------------------------------------------------------------------------------

Key = tuple[int, int]  # (epoch, index of the document within that epoch's order)


class _Feed:
    """Hands out raw items with their (epoch, index) keys; can re-fetch any key handed out before."""

    def __init__(self, source: Any, *, seed: int, shuffle: bool, loop: bool) -> None:
        self.source = source
        self.random_access = hasattr(source, "doc_tokens") and hasattr(source, "order")
        self.seed, self.shuffle = seed, shuffle
        # A generator cannot be re-read: no epochs and no replay for it.
        self.one_shot = (not self.random_access) and hasattr(source, "__next__") and iter(source) is source
        self.loop = loop and not self.one_shot
        self.next_key: Key = (0, 0)
        self._it: Iterator | None = None
        self._order: np.ndarray | None = None
        self._order_epoch = -1
        self._epoch_docs = 0  # items handed out in the current epoch (guards against an empty source looping forever)
        self._exhausted = False

    # -- random access (ShardDataset) --
    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = self.source.order(epoch, seed=self.seed, shuffle=self.shuffle)
            self._order_epoch = epoch
        return self._order  # type: ignore[return-value]

    def _shard_item(self, key: Key) -> tuple[np.ndarray, np.ndarray | None]:
        j = int(self._order_for(key[0])[key[1]])
        return np.asarray(self.source.doc_tokens(j)), self.source.doc_mask(j)

    def next(self) -> tuple[Key, Any] | None:
        """Next (key, item) or None when the data is exhausted and loop is off."""
        if self._exhausted:
            return None
        while True:
            e, i = self.next_key
            if self.random_access:
                n = len(self.source)
                if n == 0:
                    raise UserError("the shard dataset has no documents")
                if i < n:
                    self.next_key = (e, i + 1)
                    return (e, i), self._shard_item((e, i))
            else:
                if self._it is None:
                    self._it = iter(self.source)
                    self._epoch_docs = 0
                try:
                    item = next(self._it)
                    self.next_key = (e, i + 1)
                    self._epoch_docs += 1
                    return (e, i), item
                except StopIteration:
                    self._it = None
                    if self._epoch_docs == 0:
                        raise UserError(f"data source {self.source!r} yields no documents") from None
            if not self.loop:
                self._exhausted = True
                return None
            self.next_key = (e + 1, 0)

    def seek(self, next_key: Key, want: set[Key]) -> dict[Key, Any]:
        """Position the feed at next_key; return the items for the keys in `want` (all before next_key)."""
        got: dict[Key, Any] = {}
        self._exhausted = False
        if self.random_access:
            self.next_key = tuple(next_key)  # type: ignore[assignment]
            return {k: self._shard_item(k) for k in want}
        # Sequential source: replay from the earliest epoch needed.
        start_epoch = min([k[0] for k in want] + [next_key[0]])
        self.next_key, self._it = (start_epoch, 0), None
        while self.next_key != tuple(next_key):
            r = self.next()
            if r is None:
                raise UserError("cannot resume the data cursor: the source ended before the saved position "
                                "(did the data change?)")
            if r[0] in want:
                got[r[0]] = r[1]
        if len(got) != len(want):
            raise UserError("cannot resume the data cursor: saved documents not found in the source")
        return got


# --------------------------------------------------------------------------------------------------------------------
# Packer
# --------------------------------------------------------------------------------------------------------------------

class _Row:
    __slots__ = ("ids", "key", "labels", "offset")

    def __init__(self) -> None:
        self.key: Key | None = None
        self.ids = np.zeros(0, dtype=np.int64)
        self.labels = np.zeros(0, dtype=np.int64)
        self.offset = 0


class Packer:
    """Iterator of `Batch`es from a document source; see the module docstring for the layout.

    Deterministic for a given source and seed. `state_dict()` after any batch and `load_state_dict()` on a fresh
    Packer over the same source give exactly the same following batches.

    shuffle/seed reorder the documents of a ShardDataset (a new permutation each epoch). Other sources are read in
    their own order (a Mixture has its own seed). loop=True starts a new epoch when the source ends; loop=False pads
    the last rows (pad id, no loss, no reset) and then stops.
    """

    def __init__(self, source: Any, tokenizer: Tokenizer | None = None, *, batch_size: int, seq_len: int,
                 mode: str = "packed", seed: int = 0, shuffle: bool = True, loop: bool = True,
                 add_bos: bool = False, eos_id: int | None = None, pad_id: int | None = None) -> None:
        if mode not in MODES:
            raise UserError(f"packing mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size and seq_len must be ≥ 1, got {batch_size} and {seq_len}")
        self.tok = tokenizer
        info = getattr(source, "tokenizer_info", None) or {}  # a ShardDataset knows its tokenizer's specials
        if eos_id is None:
            eos_id = tokenizer.eos_id if tokenizer is not None else info.get("eos_id")
            if eos_id is None:
                raise UserError("Packer needs a tokenizer or an explicit eos_id")
        if pad_id is None and tokenizer is None:
            pad_id = info.get("pad_id")
        self.eos_id = eos_id
        self.bos_id = (tokenizer.bos_id if tokenizer is not None else None) if add_bos else None
        if add_bos and self.bos_id is None:
            raise UserError("add_bos=True but the tokenizer has no BOS token")
        self.pad_id = pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer is not None else eos_id)
        self.B, self.T, self.mode, self.seed = batch_size, seq_len, mode, seed
        check = getattr(source, "check_tokenizer", None)
        if check is not None and tokenizer is not None:
            check(tokenizer)
        self.feed = _Feed(source, seed=seed, shuffle=shuffle, loop=loop)
        self.rows = [_Row() for _ in range(batch_size if mode == "streams" else 1)]
        self.batches = 0
        self._done = False

    def __iter__(self) -> Packer:
        return self

    def _load(self, row: _Row, key: Key, item: Any) -> None:
        ids, mask = tokenize_item(item, self.tok)
        row.key = key
        row.ids, row.labels = _make_doc(ids, mask, self.eos_id, self.bos_id)
        row.offset = 0

    def _advance(self, row: _Row) -> bool:
        """Give the row its next non-empty document; False when the data is exhausted."""
        while True:
            r = self.feed.next()
            if r is None:
                row.key = None
                return False
            self._load(row, *r)
            if len(row.ids) > 1 + (self.bos_id is not None):  # skip documents with no tokens of their own
                return True

    def _fill(self, row: _Row, ids: np.ndarray, labels: np.ndarray, reset: np.ndarray) -> bool:
        """Fill one output row [T] from the stream `row`; False if it holds no real token at all."""
        t = 0
        while t < self.T:
            if (row.key is None or row.offset >= len(row.ids)) and not self._advance(row):
                ids[t:] = self.pad_id
                labels[t:] = IGNORE
                return t > 0
            n = min(self.T - t, len(row.ids) - row.offset)
            ids[t:t + n] = row.ids[row.offset:row.offset + n]
            labels[t:t + n] = row.labels[row.offset:row.offset + n]
            reset[t] = row.offset == 0
            row.offset += n
            t += n
        return True

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        ids = np.zeros((self.B, self.T), dtype=np.int64)
        labels = np.full((self.B, self.T), IGNORE, dtype=np.int64)
        reset = np.zeros((self.B, self.T), dtype=bool)
        any_real = False
        for b in range(self.B):
            row = self.rows[b if self.mode == "streams" else 0]
            any_real |= self._fill(row, ids[b], labels[b], reset[b])
        if not any_real:
            self._done = True
            raise StopIteration
        self.batches += 1
        return Batch(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(reset))

    # -- cursor --
    def state_dict(self) -> dict:
        """JSON-serialisable cursor: where each stream stands and which document comes next."""
        return {"version": 1, "mode": self.mode, "batch_size": self.B, "seq_len": self.T, "seed": self.seed,
                "batches": self.batches, "next": list(self.feed.next_key),
                "rows": [None if r.key is None else [r.key[0], r.key[1], r.offset] for r in self.rows]}

    def load_state_dict(self, state: dict) -> None:
        for k, v in (("mode", self.mode), ("batch_size", self.B), ("seq_len", self.T), ("seed", self.seed)):
            if state.get(k) != v:
                hint = " (with several processes: train.batch_size × world size)" if k == "batch_size" else ""
                raise UserError(f"data cursor was saved with {k}={state.get(k)!r}, this run has {k}={v!r}{hint}")
        want = {(r[0], r[1]) for r in state["rows"] if r is not None}
        items = self.feed.seek(tuple(state["next"]), want)  # type: ignore[arg-type]
        for row, r in zip(self.rows, state["rows"]):
            if r is None:
                row.key, row.offset = None, 0
            else:
                self._load(row, (r[0], r[1]), items[(r[0], r[1])])
                row.offset = r[2]
        self.batches = state["batches"]
        self._done = False


def shard_rows(batch: Any, rank: int, world: int) -> Batch:
    """Rows ``rank::world`` of a global batch (anything with input_ids, labels, reset [B, T]) → Batch [B / world, T].

    Data parallelism over W processes: every rank packs the same global batch (the same Packer, batch_size = rows per
    rank × W) and keeps its own rows. The W slices are disjoint and together are exactly the batch one process would
    train on, and the cursor (``Packer.state_dict``) is the same on every rank, so a checkpoint resumes at any world
    size with the same global batch. In "streams" mode row b of every batch continues row b, so rank r always holds
    the same streams and its carried memory state stays row-aligned.
    """
    B = batch.input_ids.shape[0]
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_rows: rank {rank} is not in [0, {world})")
    if B % world:
        raise UserError(f"a global batch of {B} rows cannot be split over {world} processes; give the data stream "
                        f"rows per rank × world size rows per batch")
    reset = getattr(batch, "reset", None)  # None (no document starts) stays None
    return Batch(batch.input_ids[rank::world], batch.labels[rank::world], None if reset is None else reset[rank::world])


def pack(source: Iterable[Any], tokenizer: Tokenizer | None = None, **kwargs: Any) -> Packer:
    """Shorthand for `Packer(source, tokenizer, **kwargs)`."""
    return Packer(source, tokenizer, **kwargs)
