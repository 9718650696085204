"""Episodic store: (key, value, position) vectors of one session, searched by inner product with FAISS.

Notation: n entries, d key width, d_v value width, Q queries, k neighbours, N a retrieval layer's memory size.

Two uses:
- ``EpisodicStore`` — a bounded store of one (layer, KV head) of one session: add / search / save / load, FIFO or
  LRU eviction, a flat index (exact) below ``ivf_threshold`` entries and IVF-PQ (approximate, trained on the entries
  present when the threshold is crossed, retrained when the store has grown 4×) above it; a GPU copy of the index
  is searched when faiss has GPUs. Entry ids are unique integers; the ids of a store are its own.
- ``EpisodicIndexSet`` — the accelerated search structure of a session's ``retrieval`` layers. The memory itself is
  tensors in the layer's state (memlm/layers/retrieval.py: trainable, chunk invariant, saved with the ModelState);
  the index set mirrors those tensors (entry id = write index, slot = id mod N), is synced incrementally before a
  search (rebuilt when the state is not the one it indexed — a fingerprint of the last indexed entry decides), and
  is used while ``use_indexes(...)`` is active (``session_indexes`` does that for a chat Session).

Files (no pickle): ``<name>.faiss`` is FAISS's own serialised index; ``<name>.safetensors`` holds the entries and a
JSON header (format, session id, sizes, the index file's sha256). A changed or truncated index file is refused with
a clear error before FAISS parses it. Sessions are isolated: each Session gets its own index set, files live in the
session's folder, and a store saved for one session id refuses to load under another.

faiss is optional for memlm: importing this module never imports it; using a store without it is a UserError.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from memlm.errors import UserError
from memlm.io import atomic_write_bytes, atomic_write_text
from memlm.scoped import Scoped

FORMAT = "memlm-episodic-v1"
EVICTIONS = ("fifo", "lru")
INDEX_DIR = "episodic"


def require_faiss():
    """The faiss module, or a UserError that says how to install it."""
    try:
        import faiss
    except ImportError:
        raise UserError("episodic memory / KV tiers need FAISS: pip install 'memlm[memory]' (faiss-cpu)") from None
    return faiss


@dataclass
class SearchResult:
    """scores [Q, k] (−inf where fewer than k entries), ids [Q, k] (−1 there), positions [Q, k], values [Q, k, d_v]."""

    scores: np.ndarray
    ids: np.ndarray
    positions: np.ndarray
    values: np.ndarray


class EpisodicStore:
    """A bounded store of (key [d], value [d_v], position) entries of one session, searched by inner product."""

    def __init__(self, dim: int, value_dim: int = 0, *, capacity: int, session_id: str = "default",
                 eviction: str = "fifo", ivf_threshold: int = 65536, nprobe: int = 16, use_gpu: bool | None = None
                 ) -> None:
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction={eviction!r}; choose from {EVICTIONS}")
        if capacity < 1 or dim < 1:
            raise ValueError(f"capacity={capacity} and dim={dim} must be ≥ 1")
        self.faiss = require_faiss()
        self.dim, self.value_dim, self.capacity = dim, value_dim, capacity
        self.session_id, self.eviction = session_id, eviction
        self.ivf_threshold, self.nprobe = ivf_threshold, nprobe
        self.use_gpu = (hasattr(self.faiss, "StandardGpuResources") and self.faiss.get_num_gpus() > 0) \
            if use_gpu is None else use_gpu
        self.keys = np.zeros((capacity, dim), np.float32)
        self.values = np.zeros((capacity, value_dim), np.float32)
        self.positions = np.full(capacity, -1, np.int64)
        self.ids = np.full(capacity, -1, np.int64)          # −1: free slot
        self.last_used = np.zeros(capacity, np.int64)
        self.slot_of: dict[int, int] = {}
        self.next_id = 0
        self.clock = 0
        self.kind = "flat"
        self.trained_at = 0
        self.index = self._new_flat()
        self._gpu = None

    # ------------------------------------------------------------------------------------------ index
    def _new_flat(self):
        return self.faiss.IndexIDMap2(self.faiss.IndexFlatIP(self.dim))

    def _build(self, kind: str) -> None:
        """(Re)build the index of ``kind`` over the current entries (IVF-PQ is trained on them)."""
        f = self.faiss
        used = np.nonzero(self.ids >= 0)[0]
        keys, ids = self.keys[used], self.ids[used]
        if kind == "ivfpq":
            nlist = int(min(max(16, 4 * math.sqrt(len(used))), max(16, len(used) // 39)))
            m = next(m for m in (self.dim // 4, self.dim // 2, self.dim, 1) if m >= 1 and self.dim % m == 0)
            index = f.IndexIVFPQ(f.IndexFlatIP(self.dim), self.dim, nlist, m, 8, f.METRIC_INNER_PRODUCT)
            index.train(keys)
            index.nprobe = min(self.nprobe, nlist)
            self.trained_at = len(used)
        else:
            index = self._new_flat()
        if len(used):
            index.add_with_ids(keys, ids)
        self.index, self.kind, self._gpu = index, kind, None

    def _search_index(self):
        if not self.use_gpu:
            return self.index
        if self._gpu is None:  # the CPU index is the authority; the GPU copy is refreshed after every change
            self._res = getattr(self, "_res", None) or self.faiss.StandardGpuResources()
            self._gpu = self.faiss.index_cpu_to_gpu(self._res, 0, self.index)
        return self._gpu

    # ------------------------------------------------------------------------------------------- API
    def __len__(self) -> int:
        return len(self.slot_of)

    def add(self, keys: np.ndarray | Tensor, values: np.ndarray | Tensor | None = None,
            positions: np.ndarray | Tensor | None = None, ids: np.ndarray | Tensor | None = None) -> np.ndarray:
        """Add n entries (keys [n, d], values [n, d_v], positions [n], ids [n] — default: the next integers).

        When full, entries are evicted first (FIFO: the oldest ids; LRU: the least recently retrieved). Returns ids."""
        keys = _np(keys, np.float32).reshape(-1, self.dim)
        n = len(keys)
        values = np.zeros((n, self.value_dim), np.float32) if values is None else _np(values, np.float32)
        positions = np.full(n, -1, np.int64) if positions is None else _np(positions, np.int64)
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64) if ids is None else _np(ids, np.int64)
        if values.shape != (n, self.value_dim) or positions.shape != (n,) or ids.shape != (n,):
            raise ValueError(f"add: keys {keys.shape}, values {values.shape}, positions {positions.shape}, "
                             f"ids {ids.shape} do not agree (value_dim={self.value_dim})")
        if n > self.capacity:  # the first n − capacity would be evicted at once
            keys, values, positions, ids = keys[-self.capacity:], values[-self.capacity:], positions[-self.capacity:], \
                ids[-self.capacity:]
            n = self.capacity
        if n == 0:
            return ids
        dup = [int(i) for i in ids if int(i) in self.slot_of]
        if dup:
            raise ValueError(f"add: ids already present, e.g. {dup[:3]}")
        self._evict(len(self) + n - self.capacity)
        free = np.nonzero(self.ids < 0)[0][:n]
        self.keys[free], self.values[free], self.positions[free], self.ids[free] = keys, values, positions, ids
        self.clock += 1
        self.last_used[free] = self.clock
        self.slot_of.update(zip(ids.tolist(), free.tolist()))
        self.next_id = max(self.next_id, int(ids.max()) + 1)
        if self.kind == "flat" and len(self) >= self.ivf_threshold or self.kind == "ivfpq" \
                and len(self) >= 4 * self.trained_at:
            self._build("ivfpq")
        else:
            self.index.add_with_ids(keys, ids)
            self._gpu = None
        return ids

    def _evict(self, n: int) -> None:
        if n <= 0:
            return
        used = np.nonzero(self.ids >= 0)[0]
        order = np.lexsort((self.ids[used], self.last_used[used])) if self.eviction == "lru" \
            else np.argsort(self.ids[used], kind="stable")
        self.remove(self.ids[used[order[:n]]])

    def remove(self, ids: np.ndarray | list[int]) -> None:
        """Forget entries by id (unknown ids are ignored)."""
        ids = np.asarray([i for i in np.asarray(ids, np.int64).tolist() if i in self.slot_of], np.int64)
        if not len(ids):
            return
        slots = np.asarray([self.slot_of.pop(int(i)) for i in ids], np.int64)
        self.ids[slots], self.positions[slots] = -1, -1
        self.index.remove_ids(ids)
        self._gpu = None

    def search_ids(self, queries: np.ndarray | Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], ids [Q, k]) of the k entries with the largest inner product (−inf / −1 past the end)."""
        q = _np(queries, np.float32).reshape(-1, self.dim)
        if len(self) == 0 or k < 1:
            return np.full((len(q), max(k, 0)), -np.inf, np.float32), np.full((len(q), max(k, 0)), -1, np.int64)
        D, I = self._search_index().search(q, k)
        D = np.where(I >= 0, D, -np.inf).astype(np.float32)
        return D, I

    def search(self, queries: np.ndarray | Tensor, k: int) -> SearchResult:
        """The k best entries per query [Q, d] with their values and positions; counts as a use for LRU."""
        D, I = self.search_ids(queries, k)
        slots = np.asarray([self.slot_of.get(int(i), -1) for i in I.ravel()], np.int64).reshape(I.shape)
        ok = slots >= 0
        self.clock += 1
        self.last_used[slots[ok]] = self.clock
        s = np.where(ok, slots, 0)
        return SearchResult(scores=D, ids=np.where(ok, I, -1), positions=np.where(ok, self.positions[s], -1),
                            values=self.values[s] * ok[..., None])

    # ------------------------------------------------------------------------------------------ files
    def save(self, folder: str | Path, name: str = "store") -> None:
        """Write ``folder/name.faiss`` (FAISS's format) then ``folder/name.safetensors`` (entries + header), atomically."""
        from safetensors.numpy import save as st_save

        folder = Path(folder)
        blob = self.faiss.serialize_index(self.index).tobytes()
        atomic_write_bytes(folder / f"{name}.faiss", blob)
        used = np.nonzero(self.ids >= 0)[0]
        used = used[np.argsort(self.ids[used], kind="stable")]
        header = {"format": FORMAT, "session_id": self.session_id, "dim": self.dim, "value_dim": self.value_dim,
                  "capacity": self.capacity, "eviction": self.eviction, "kind": self.kind, "next_id": self.next_id,
                  "clock": self.clock, "trained_at": self.trained_at, "ivf_threshold": self.ivf_threshold,
                  "nprobe": self.nprobe, "count": len(used), "index_sha256": hashlib.sha256(blob).hexdigest()}
        tensors = {"keys": self.keys[used], "values": self.values[used], "positions": self.positions[used],
                   "ids": self.ids[used], "last_used": self.last_used[used]}
        atomic_write_bytes(folder / f"{name}.safetensors", st_save(tensors, metadata={"memlm_episodic": json.dumps(header)}))

    @classmethod
    def load(cls, folder: str | Path, name: str = "store", *, session_id: str | None = None,
             use_gpu: bool | None = None) -> EpisodicStore:
        """Read a store written by ``save``; ``session_id`` (when given) must be the one it was saved for."""
        from safetensors import safe_open

        folder = Path(folder)
        meta_path, index_path = folder / f"{name}.safetensors", folder / f"{name}.faiss"
        try:
            with safe_open(str(meta_path), "np") as f:
                header = json.loads((f.metadata() or {})["memlm_episodic"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except FileNotFoundError:
            raise UserError(f"{meta_path}: no episodic store here") from None
        except Exception as e:  # noqa: BLE001 — safetensors/json raise several types on corrupt files
            raise UserError(f"{meta_path}: corrupt episodic store file ({type(e).__name__}: {e})") from None
        if header.get("format") != FORMAT:
            raise UserError(f"{meta_path}: not a memlm episodic store (format {header.get('format')!r})")
        if session_id is not None and header.get("session_id") != session_id:
            raise UserError(f"{meta_path}: episodic store belongs to session {header.get('session_id')!r}, "
                            f"not {session_id!r}; sessions never share memory")
        store = cls(header["dim"], header["value_dim"], capacity=header["capacity"], session_id=header["session_id"],
                    eviction=header["eviction"], ivf_threshold=header["ivf_threshold"], nprobe=header["nprobe"],
                    use_gpu=use_gpu)
        n = int(header["count"])
        if any(len(tensors[k]) != n for k in ("keys", "values", "positions", "ids", "last_used")) or n > store.capacity:
            raise UserError(f"{meta_path}: corrupt episodic store file (entry arrays do not match count {n})")
        store.keys[:n], store.values[:n], store.positions[:n] = tensors["keys"], tensors["values"], tensors["positions"]
        store.ids[:n], store.last_used[:n] = tensors["ids"], tensors["last_used"]
        store.slot_of = {int(i): s for s, i in enumerate(tensors["ids"].tolist())}
        store.next_id, store.clock, store.trained_at = header["next_id"], header["clock"], header["trained_at"]
        try:
            blob = index_path.read_bytes()
        except FileNotFoundError:  # the entries are the authority: rebuild what is missing
            store._build(header["kind"])
            return store
        if hashlib.sha256(blob).hexdigest() != header["index_sha256"]:
            raise UserError(f"{index_path}: corrupt FAISS index file (checksum does not match {meta_path.name}); "
                            f"delete it to rebuild the index from the entries")
        try:
            index = store.faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8).copy())
        except Exception as e:  # noqa: BLE001 — faiss raises RuntimeError on bad files
            raise UserError(f"{index_path}: corrupt FAISS index file ({str(e).splitlines()[0][:200]})") from None
        if index.ntotal != n or index.d != store.dim:
            raise UserError(f"{index_path}: FAISS index holds {index.ntotal} vectors of width {index.d}, "
                            f"the store {n} of width {store.dim}")
        store.index, store.kind = index, header["kind"]
        return store


def _np(x: Any, dtype) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy() if dtype == np.float32 else x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=dtype))


# ----------------------------------------------------------------------------------------- retrieval layers


class LayerIndex:
    """FAISS indexes mirroring one retrieval layer's memory tensors: one store per (batch row, KV head)."""

    def __init__(self, layer_idx: int, session_id: str = "default", **store_kw) -> None:
        self.layer_idx, self.session_id, self.store_kw = layer_idx, session_id, store_kw
        self.stores: dict[tuple[int, int], EpisodicStore] = {}
        self.rows: dict[int, dict] = {}  # row -> {"n": entries indexed up to (write index), "fp": fingerprint}
        self.N = self.Hk = 0

    @staticmethod
    def _fingerprint(mem_k: Tensor, mem_pos: Tensor, b: int, widx: int, N: int) -> list:
        s = widx % N
        return [widx, int(mem_pos[b, s]), float(mem_k[b, :, s].double().sum())]

    def sync(self, mem_k: Tensor, mem_pos: Tensor, n_written: Tensor) -> None:
        """Bring the indexes up to date with mem_k [B, Hk, N, Dh], mem_pos [B, N], n_written [B]."""
        B, Hk, N, Dh = mem_k.shape
        self.N, self.Hk = N, Hk
        for b in range(B):
            n = int(n_written[b])
            row = self.rows.get(b)
            fresh = row is None or n < row["n"] or row["n"] <= n - N or any((b, h) not in self.stores for h in range(Hk))
            if not fresh and row["n"] > 0 and self._fingerprint(mem_k, mem_pos, b, row["n"] - 1, N) != row["fp"]:
                fresh = True  # another state (another turn's scratch copy, a reset session): start over
            start = max(0, n - N) if fresh else row["n"]
            if fresh:
                for h in range(Hk):
                    self.stores[b, h] = EpisodicStore(Dh, 0, capacity=N, session_id=self.session_id, **self.store_kw)
            if n > start:
                widx = torch.arange(start, n)
                slots = widx % N
                ok = mem_pos[b, slots] >= 0
                widx, slots = widx[ok.cpu()], slots[ok.cpu()]
                for h in range(Hk):
                    self.stores[b, h].add(mem_k[b, h, slots.to(mem_k.device)], ids=widx.numpy())
            self.rows[b] = {"n": n, "fp": self._fingerprint(mem_k, mem_pos, b, n - 1, N) if n else []}

    def search(self, qm: Tensor, k: int) -> Tensor:
        """qm [B, Hq, T, Dh] -> candidate slots [B, Hq, T, k] (−1 where fewer entries)."""
        B, Hq, T, Dh = qm.shape
        Hk = self.Hk
        G = Hq // Hk
        out = torch.full((B, Hq, T, k), -1, dtype=torch.long)
        for b in range(B):
            for h in range(Hk):
                q = qm[b, h * G:(h + 1) * G].reshape(G * T, Dh)
                _, ids = self.stores[b, h].search_ids(q, k)
                slots = np.where(ids >= 0, ids % self.N, -1)
                out[b, h * G:(h + 1) * G] = torch.from_numpy(slots).view(G, T, k)
        return out.to(qm.device)

    def save(self, folder: Path) -> dict:
        for (b, h), st in self.stores.items():
            st.session_id = self.session_id
            st.save(folder, f"layer{self.layer_idx}.row{b}.head{h}")
        return {"N": self.N, "rows": {str(b): r for b, r in self.rows.items()},
                "heads": sorted({h for (_, h) in self.stores})}

    def load(self, folder: Path, manifest: dict) -> None:
        self.N, self.Hk = int(manifest["N"]), len(manifest["heads"])
        self.rows = {int(b): r for b, r in manifest["rows"].items()}
        for b in self.rows:
            for h in manifest["heads"]:
                self.stores[b, h] = EpisodicStore.load(folder, f"layer{self.layer_idx}.row{b}.head{h}",
                                                       session_id=self.session_id)


class EpisodicIndexSet:
    """The FAISS indexes of one session's retrieval layers (``layer(i)``), saved in the session's folder."""

    def __init__(self, session_id: str = "default", **store_kw) -> None:
        require_faiss()
        self.session_id, self.store_kw = session_id, store_kw
        self.layers: dict[int, LayerIndex] = {}

    def layer(self, i: int) -> LayerIndex:
        if i not in self.layers:
            self.layers[i] = LayerIndex(i, self.session_id, **self.store_kw)
        return self.layers[i]

    def save(self, session_dir: str | Path) -> None:
        """Write ``session_dir/episodic/`` (per layer, row and head: .faiss + .safetensors; manifest.json last)."""
        folder = Path(session_dir) / INDEX_DIR
        layers = {}
        for i, li in self.layers.items():
            li.session_id = self.session_id
            layers[str(i)] = li.save(folder)
        atomic_write_text(folder / "manifest.json", json.dumps({"format": FORMAT, "session_id": self.session_id,
                                                                "layers": layers}))

    @classmethod
    def load(cls, session_dir: str | Path, session_id: str, **store_kw) -> EpisodicIndexSet:
        """Read ``session_dir/episodic/``; an empty set when there is none. Files of another session are refused."""
        out = cls(session_id, **store_kw)
        path = Path(session_dir) / INDEX_DIR / "manifest.json"
        if not path.exists():
            return out
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: unreadable episodic index manifest ({e})") from None
        if manifest.get("format") != FORMAT or manifest.get("session_id") != session_id:
            raise UserError(f"{path}: episodic indexes of session {manifest.get('session_id')!r}, not {session_id!r}")
        for i, m in manifest.get("layers", {}).items():
            out.layer(int(i)).load(path.parent, m)
        return out


# ------------------------------------------------------------------------------------------- activation

_ACTIVE = Scoped()  # EpisodicIndexSet | None; not a ContextVar: read inside compiled forwards without a graph break


@contextlib.contextmanager
def use_indexes(index_set: EpisodicIndexSet | None) -> Iterator[EpisodicIndexSet | None]:
    """Retrieval layers search through ``index_set`` (large stores only, see RetrievalConfig.index_threshold)."""
    with _ACTIVE.scope(index_set):
        yield index_set


def current_indexes() -> EpisodicIndexSet | None:
    return _ACTIVE.get()


def has_retrieval(model) -> bool:
    return any(getattr(m, "kind", None) == "retrieval" for m in model.modules())


def session_indexes(session) -> contextlib.AbstractContextManager:
    """Context for one turn of a chat Session: its own index set (created on first use) is active. A no-op for
    models without retrieval layers, or when faiss is missing (the layers then search exactly in torch)."""
    if not has_retrieval(session.model):
        return contextlib.nullcontext()
    idx = getattr(session, "episodic", None)
    if idx is None:
        try:
            idx = EpisodicIndexSet(session.session_id or "default")
        except UserError:
            return contextlib.nullcontext()
        session.episodic = idx
    idx.session_id = session.session_id or idx.session_id
    return use_indexes(idx)


def save_session_indexes(session, session_dir: str | Path, session_id: str) -> None:
    """Save a session's index set beside its state — not for encrypted stores (the indexes would be clear text;
    they are rebuilt from the state, which is encrypted)."""
    idx = getattr(session, "episodic", None)
    if idx is None or session.store is None or session.store.encrypted:
        return
    idx.session_id = session_id
    idx.save(session_dir)


def load_session_indexes(session, session_dir: str | Path, session_id: str) -> None:
    if has_retrieval(session.model) and (Path(session_dir) / INDEX_DIR / "manifest.json").exists():
        session.episodic = EpisodicIndexSet.load(session_dir, session_id)
