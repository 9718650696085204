"""Retrieval-as-attention (``retrieval`` mixer): Memorizing-Transformer kNN attention (Wu et al. 2022), Oumnix.

Notation (per batch row and head; B batch, T tokens, D width, Hq / Hk query / key-value heads, Dh head width,
W local window, S segment length, N memory entries per KV head, k retrieved entries, P = S − 1 pending slots):
  q, k, v = W_q x, W_k x, W_v x
  A_loc = softmax(RoPE(q) RoPE(k)ᵀ / √Dh, causal sliding window W, same document) v      (AttentionCore)
  q̂, k̂ = q / ‖q‖, k / ‖k‖ (no position encoding: memory is matched by content)
  A_mem = softmax_{i ∈ topk_k(τ_h q̂ · k̂_i)}(τ_h q̂ · k̂_i) v_i   over visible memory entries i
  y = W_o [g A_mem + (1 − g) A_loc],  g = σ(gate_h) where some entry is visible, else 0

Memory: every token's (k̂, v) is written once its segment of S tokens (document-aligned, as in
memlm.ops.compressive.segments) is complete; a query sees the entries of EARLIER segments of its own document
only — never its own segment, so nothing it reads can depend on itself or later tokens. The memory is a FIFO
ring of N entries per row and KV head: entry number w (its write index) lives in slot w mod N, and a query sees
an entry iff it is among the last N written before the query's segment began. Segments that complete inside a
call are written and read inside the same call with exactly these rules, so one call equals any split (chunk
invariance); the tokens of the current, incomplete segment wait in a pending buffer in the state.

State (``RetrievalState``): local KVState (ring of W rotated keys/values), mem_k, mem_v [B, Hk, N, Dh],
mem_pos [B, N] (stream position, −1 empty), n_written [B], pend_k, pend_v [B, P, Hk, Dh]; the stream position and
document start are the local state's ``pos`` and ``doc_start``.

Search: exact top-k in torch over the state's tensors (training, tests, small stores). At inference an episodic
index set may be active (memlm.memory.episodic.use_indexes): then, for a store of at least ``index_threshold``
entries, FAISS proposes the k candidates of the stored part (flat = exact, IVF-PQ = approximate) and their scores
are recomputed exactly from the tensors. As in the paper, no gradient flows into memory (``detach_memory``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.layers.attention import AttentionConfig, KVState, core_from_config
from memlm.layers.base import LayerState, Mixer, register_mixer, stream_positions
from memlm.ops.compressive import chunk_layout, gather_chunks, pending_tail

READ_BLOCK = 512  # queries per block of the memory read


@dataclass(kw_only=True)
class RetrievalConfig(AttentionConfig):
    kind: str = "retrieval"
    window: int | None = 512  # local sliding window W (required: the memory is what reaches further back)
    segment_size: int = 512  # S: entries are written when a segment of the document completes
    memory_size: int = 8192  # N entries per row and KV head (FIFO eviction)
    top_k: int = 32  # k entries retrieved per query and head
    detach_memory: bool = True  # Memorizing Transformer: no gradient into stored keys/values
    index_threshold: int = 65536  # use an active FAISS index set from this many stored entries on

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window is None:
            raise ValueError("retrieval: window must be set (the local attention is a sliding window)")
        for name in ("segment_size", "memory_size", "top_k", "index_threshold"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1")
        if self.n_persistent:
            raise ValueError("retrieval: n_persistent is not supported (use an attention layer for it)")


@dataclass(frozen=True)
class RetrievalState(LayerState):
    """local: KVState (its pos, doc_start [B] are the layer's); mem_k, mem_v: [B, Hk, N, Dh]; mem_pos: [B, N];
    n_written: [B]; pend_k, pend_v: [B, P, Hk, Dh]."""

    local: KVState
    mem_k: Tensor
    mem_v: Tensor
    mem_pos: Tensor
    n_written: Tensor
    pend_k: Tensor
    pend_v: Tensor


def slot_write_index(n_written: Tensor, N: int) -> Tensor:
    """Write index of the entry in each ring slot: [B] -> [B, N] (negative for slots never written)."""
    s = torch.arange(N, device=n_written.device)
    last = n_written[:, None] - 1
    return last - (last - s).remainder(N)


@register_mixer("retrieval", RetrievalConfig)
class Retrieval(Mixer):
    """Local sliding-window attention + kNN attention over an episodic memory of earlier segments, gated per head."""

    custom_init = True

    def __init__(self, cfg: RetrievalConfig, model_cfg, layer_idx: int) -> None:
        super().__init__(cfg, model_cfg, layer_idx)
        self.core = core_from_config(cfg, model_cfg)
        self.hq, self.hk, self.dh = self.core.hq, self.core.hk, self.core.dh
        self.S, self.N, self.k = cfg.segment_size, cfg.memory_size, cfg.top_k
        self.gate = nn.Parameter(torch.zeros(self.hq))       # g_h = σ(gate_h)
        self.log_tau = nn.Parameter(torch.zeros(self.hq))    # τ_h, the memory logits' scale (cosines are in [-1, 1])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gate)
        nn.init.constant_(self.log_tau, math.log(max(10.0, math.sqrt(self.dh))))

    def init_state(self, batch_size: int, *, device=None) -> RetrievalState:
        p = self.core.o_proj.weight
        device = device or p.device
        B, Hk, N, Dh, P = batch_size, self.hk, self.N, self.dh, self.S - 1
        z = torch.zeros(B, dtype=torch.long, device=device)
        mem = torch.zeros(B, Hk, N, Dh, device=device, dtype=p.dtype)
        pend = torch.zeros(B, P, Hk, Dh, device=device, dtype=p.dtype)
        return RetrievalState(local=self.core.init_state(B, device, p.dtype), mem_k=mem, mem_v=mem.clone(),
                              mem_pos=torch.full((B, N), -1, dtype=torch.long, device=device), n_written=z,
                              pend_k=pend, pend_v=pend.clone())

    def forward(self, x: Tensor, state: RetrievalState | None = None, *, reset: Tensor | None = None,
                update: bool = True) -> tuple[Tensor, RetrievalState]:
        """x [B, T, D]; reset bool [B, T] -> (y [B, T, D], new state)."""
        B, T, _ = x.shape
        fresh = state is None  # a known-empty state: the chunk grid's size follows from T alone (no host sync)
        if state is None:
            state = self.init_state(B, device=x.device)
        core = self.core
        q, k, v = core.project(x)                                           # [B, H, T, Dh]
        if core.q_norm is not None:
            q, k = core.q_norm(q), core.k_norm(k)
        pos, doc_start = state.local.pos, state.local.doc_start
        abs_pos, doc_tok = stream_positions(pos, doc_start, reset, T)
        qr, kr = core.rotary(q, k, abs_pos - doc_tok) if core.rotary is not None else (q, k)
        a_loc = core._attend(qr, kr, v, state.local, abs_pos, doc_tok, reset)  # [B, Hq, T, Dh]

        # ---- the segments completed by this call become memory entries (pending buffer + new tokens)
        km = F.normalize(k.float(), dim=-1).to(k.dtype)
        vm = v
        if self.cfg.detach_memory:
            km, vm = km.detach(), vm.detach()
        lay = chunk_layout(pos, doc_start, reset, T, self.S, fresh=fresh)
        P = self.S - 1
        ke = torch.cat([state.pend_k.to(k.dtype), km.transpose(1, 2)], dim=1)   # [B, P+T, Hk, Dh]
        ve = torch.cat([state.pend_v.to(v.dtype), vm.transpose(1, 2)], dim=1)
        pe = torch.cat([pos[:, None] - P + torch.arange(P, device=x.device), abs_pos], dim=1)  # [B, P+T]
        E = lay.N * self.S
        new_k = gather_chunks(ke, lay).reshape(B, E, self.hk, self.dh).transpose(1, 2)   # [B, Hk, E, Dh]
        new_v = gather_chunks(ve, lay).reshape(B, E, self.hk, self.dh).transpose(1, 2)
        w_ok = (lay.complete[:, :, None] & lay.slot_valid).reshape(B, E)                # entries written
        new_pos = torch.where(w_ok, gather_chunks(pe, lay).reshape(B, E), torch.full_like(w_ok, -1, dtype=torch.long))
        new_widx = state.n_written[:, None] + torch.cumsum(w_ok.long(), 1) - 1

        # ---- visibility: earlier segments of the same document, among the last N entries written before them
        seg_start = doc_tok + torch.div(abs_pos - doc_tok, self.S, rounding_mode="floor") * self.S   # [B, T]
        before = w_ok[:, None, :] & (new_pos[:, None, :] < seg_start[:, :, None])                    # [B, T, E]
        W_q = state.n_written[:, None] + before.sum(-1)                                               # [B, T]
        lo = W_q - self.N
        old_widx = slot_write_index(state.n_written, self.N)
        vis_old = ((state.mem_pos[:, None, :] >= doc_tok[:, :, None]) & (state.mem_pos[:, None, :] >= 0)
                   & (state.mem_pos[:, None, :] < seg_start[:, :, None]) & (old_widx[:, None, :] >= lo[:, :, None]))
        vis_new = before & (new_pos[:, None, :] >= doc_tok[:, :, None]) & (new_widx[:, None, :] >= lo[:, :, None])

        qm = F.normalize(q.float(), dim=-1) * self.log_tau.float().exp()[None, :, None, None]
        # queries in blocks: the [B, Hq, block, N + E] score matrix is the peak memory of training (topk keeps
        # only indices for backward, so one block's scores are freed before the next)
        blk = READ_BLOCK
        reads = [self._read(qm[:, :, a:a + blk], state, new_k, new_v, vis_old[:, a:a + blk], vis_new[:, a:a + blk])
                 for a in range(0, T, blk)]
        a_mem, has = torch.cat([r[0] for r in reads], 2), torch.cat([r[1] for r in reads], 2)
        g = torch.sigmoid(self.gate.float())[None, :, None, None] * has[..., None]
        a = (g * a_mem + (1 - g) * a_loc.float()).to(x.dtype)
        y = core.o_proj(a.transpose(1, 2).reshape(B, T, self.hq * self.dh))
        if not update:
            return y, state

        # ---- new state: local ring, memory ring (only the last N of the entries survive), pending buffer
        local = core._write(state.local, kr, v, abs_pos, doc_tok)
        n_new = state.n_written + w_ok.sum(1)
        keep = w_ok & (new_widx >= n_new[:, None] - self.N)
        slot = torch.where(keep, new_widx.remainder(self.N), torch.full_like(new_widx, self.N))      # N: dump slot
        dump = state.mem_k.new_zeros(B, self.hk, 1, self.dh)
        idx = slot[:, None, :, None].expand(-1, self.hk, -1, self.dh)
        mem_k = torch.cat([state.mem_k, dump], 2).scatter(2, idx, new_k.to(state.mem_k.dtype))[:, :, :self.N]
        mem_v = torch.cat([state.mem_v, dump], 2).scatter(2, idx, new_v.to(state.mem_v.dtype))[:, :, :self.N]
        mem_pos = torch.cat([state.mem_pos, state.mem_pos[:, :1]], 1).scatter(1, slot, new_pos)[:, :self.N]
        return y, RetrievalState(local=local, mem_k=mem_k, mem_v=mem_v, mem_pos=mem_pos, n_written=n_new,
                                 pend_k=pending_tail(ke, lay).to(state.pend_k.dtype),
                                 pend_v=pending_tail(ve, lay).to(state.pend_v.dtype))

    def _read(self, qm: Tensor, state: RetrievalState, new_k: Tensor, new_v: Tensor, vis_old: Tensor,
              vis_new: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k attention over [stored N; new E] entries. qm [B, Hq, T, Dh] (scaled unit queries); new_k/v
        [B, Hk, E, Dh]; vis_old [B, T, N], vis_new [B, T, E] -> (A_mem [B, Hq, T, Dh] f32, any visible [B, Hq, T])."""
        B, Hq, T, Dh = qm.shape
        G = Hq // self.hk
        qg = qm.view(B, self.hk, G, T, Dh)
        s_new = torch.einsum("bhgtd,bhed->bhgte", qg, new_k.float()).reshape(B, Hq, T, -1)
        s_new = s_new.masked_fill(~vis_new[:, None], float("-inf"))
        index = _active_index(self, state)
        if index is None:
            s_old = torch.einsum("bhgtd,bhnd->bhgtn", qg, state.mem_k.float()).reshape(B, Hq, T, self.N)
            s_old = s_old.masked_fill(~vis_old[:, None], float("-inf"))
            cand = None
        else:  # FAISS proposes candidate slots of the stored part; their scores are recomputed exactly
            cand = index.search(qm, min(self.k, self.N))                     # [B, Hq, T, k'] slots, −1 none
            safe = cand.clamp_min(0)
            kk = _gather_heads(state.mem_k.float(), safe, G)                 # [B, Hq, T, k', Dh]
            s_old = (kk * qm[..., None, :]).sum(-1)
            ok = (cand >= 0) & torch.gather(vis_old[:, None].expand(-1, Hq, -1, -1), 3, safe)
            s_old = s_old.masked_fill(~ok, float("-inf"))
        scores = torch.cat([s_old, s_new], dim=-1)
        top, idx = scores.topk(min(self.k, scores.shape[-1]), dim=-1)                                   # [B, Hq, T, k]
        ok = torch.isfinite(top)
        w = torch.softmax(top.masked_fill(~ok, -1e30), dim=-1) * ok
        n_old = s_old.shape[-1]
        is_old = idx < n_old
        old_slot = idx.clamp(max=n_old - 1)
        if cand is not None:
            old_slot = torch.gather(cand.clamp_min(0), 3, old_slot)
        v_old = _gather_heads(state.mem_v.float(), old_slot, G)
        v_new = _gather_heads(new_v.float(), (idx - n_old).clamp_min(0), G)
        vals = torch.where(is_old[..., None], v_old, v_new)                  # [B, Hq, T, k, Dh]
        return (w[..., None] * vals).sum(-2), ok.any(-1)


def _gather_heads(mem: Tensor, idx: Tensor, G: int) -> Tensor:
    """mem [B, Hk, M, Dh], idx [B, Hq, T, k] (Hq = G·Hk, query head h reads KV head h // G) -> [B, Hq, T, k, Dh]."""
    B, Hk, _, Dh = mem.shape
    _, Hq, T, k = idx.shape
    flat = idx.reshape(B, Hk, G * T * k)
    out = torch.gather(mem, 2, flat[..., None].expand(-1, -1, -1, Dh))
    return out.view(B, Hq, T, k, Dh)


def _active_index(layer: Retrieval, state: RetrievalState):
    """The FAISS-backed index of this layer when an index set is active and the store is large enough, else None."""
    from memlm.memory import episodic  # no faiss import happens unless an index set is active

    active = episodic.current_indexes()
    if active is None or torch.is_grad_enabled() and layer.training:
        return None
    if int((state.mem_pos >= 0).sum(1).max()) < layer.cfg.index_threshold:
        return None
    index = active.layer(layer.layer_idx)
    index.sync(state.mem_k, state.mem_pos, state.n_written)
    return index
