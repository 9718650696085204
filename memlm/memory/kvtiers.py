"""Infinity-Window: tiered KV memory for the attention layers of any model, at inference (Oumnix, SPEC.md).

Notation: B batch, T new tokens, Hq / Hk query / KV heads (G = Hq / Hk), Dh head width, Q = G·T queries per KV head,
W_h hot tokens, w tokens per warm window, n warm windows, M product-quantiser sub-spaces of Dh / M dims with
K = 2^bits centroids each, r value rank, A anchors per window, k teleported windows, f tree fan-out, β beam width,
D the distance at which teleported tokens are placed, t a query's stream position, p a key's.

Tiers of one attention layer (state ``TieredKVState``; every past token lives in exactly one tier for a query):
- hot: the last W_h tokens, exact rotated keys and values in a ring buffer on the accelerator; visible iff t − p < W_h.
- warm (host RAM): each completed window of w tokens (aligned on stream positions) is compressed once, when it
  completes: keys *without* position encoding → PQ codes [w, M] (codebook trained by FAISS on calibration keys,
  ``calibrate``); values → mean μ [Dh] + rank-r basis U [r, Dh] (SVD of the centred window) + coefficients [w, r];
  anchors [A, Dh] = the mean key of each of A equal sub-blocks. A warm token is visible iff t − p ≥ W_h and it
  belongs to the query's document and to one of the query's teleported windows.
- teleport: per query and head, the k windows that best match the query are chosen, by a coarse-to-fine search
  of the context tree (``search="tree"``: level-ℓ nodes summarise f^ℓ consecutive windows by their mean anchor;
  the β best nodes of a level are expanded down to windows) or by scoring every window (``search="flat"``); a
  window scores max_a q·anchor_a. Chosen windows are decompressed and attended to jointly with the hot tokens in one
  softmax. The decompression is folded into the maths without materialising keys: q·k̂ = Σ_m LUT[m, code_m]
  (LUT = per-query sub-space dot products with the centroids, as FAISS's asymmetric distance) and
  Σ_j e_j v̂_j = (Σ_j e_j c_j) U + (Σ_j e_j) μ — exactly what decompressing first would give.
- positions: teleported tokens are placed at distance D (default W_h) from the query (q rotated by D, keys kept
  unrotated), as retrieval-based long-context methods place retrieved blocks: the model never sees a relative
  distance it was not trained on, which is what lets a tiered model run far beyond its training length.

Causality and chunk invariance: a window is compressed from exactly its own w tokens; node summaries are computed per
query from prefix sums over the windows that query may see (earlier than t − W_h + 1, inside its document), so no
summary mixes in a later window; the whole forward is a function of (state, tokens). Rows of a batch must be in
lockstep (the same stream position), as the engine keeps them.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.errors import UserError
from memlm.layers.attention import Attention, AttentionCore, KVState
from memlm.layers.base import LayerState, stream_positions

SEARCHES = ("tree", "flat")


@dataclass
class KVTierConfig:
    """Settings of the tiers (``--kv-tiers hot=4096,warm=262144,window=64,...``, see ``parse_kv_tiers``)."""

    hot: int = 4096  # W_h exact recent tokens
    warm: int = 0  # most warm tokens kept (whole windows, oldest dropped first); 0: unbounded
    window: int = 64  # w
    pq: int = 0  # M sub-quantisers (0: Dh // 4, i.e. one code byte per 4 dims)
    bits: int = 8  # log2 K
    rank: int = 8  # r
    anchors: int = 4  # A (must divide w)
    topk: int = 8  # k windows teleported per query and head
    fanout: int = 8  # f
    beam: int = 4  # β
    search: str = "tree"
    spread: float = 0.0  # κ: weight of a tree node's spread in its score (0: mean anchor only)
    distance: int = 0  # D (0: = hot)
    warm_device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("hot", "window", "bits", "rank", "anchors", "topk", "fanout", "beam"):
            if getattr(self, name) < 1:
                raise UserError(f"kv tiers: {name}={getattr(self, name)} must be ≥ 1")
        if self.warm < 0 or self.pq < 0 or self.distance < 0:
            raise UserError("kv tiers: warm, pq and distance must be ≥ 0")
        if self.hot < self.window:
            raise UserError(f"kv tiers: hot={self.hot} must be ≥ window={self.window}")
        if self.window % self.anchors:
            raise UserError(f"kv tiers: anchors={self.anchors} must divide window={self.window}")
        if self.bits > 8:
            raise UserError(f"kv tiers: bits={self.bits} must be ≤ 8 (one code byte per sub-space)")
        if self.search not in SEARCHES:
            raise UserError(f"kv tiers: search={self.search!r}; choose from {', '.join(SEARCHES)}")

    @property
    def warm_windows(self) -> int:
        return self.warm // self.window

    @property
    def dist(self) -> int:
        return self.distance or self.hot


def parse_kv_tiers(spec: str) -> KVTierConfig:
    """``"hot=4096,warm=262144,window=64,pq=16,rank=8,topk=8,search=tree"`` -> KVTierConfig (UserError on a bad key)."""
    fields = {f.name: f for f in dataclasses.fields(KVTierConfig)}
    kw: dict = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, val = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise UserError(f"--kv-tiers: {part!r} is not KEY=VALUE with KEY one of {', '.join(fields)}")
        try:
            kw[key] = val.strip() if fields[key].type in ("str", str) else int(val)
        except ValueError:
            raise UserError(f"--kv-tiers: {key}={val!r} is not an integer") from None
    return KVTierConfig(**kw)


@dataclass(frozen=True)
class TieredKVState(LayerState):
    """hot: KVState (ring of W_h rotated keys/values; its pos, doc_start [B] are the layer's); warm tensors (host):
    codes [B, Hk, n, w, M] uint8, coef [B, Hk, n, w, r], basis [B, Hk, n, r, Dh], vmean [B, Hk, n, Dh],
    anchors [B, Hk, n, A, Dh] (float16), wpos [B, n] first stream position of each window."""

    hot: KVState
    codes: Tensor
    coef: Tensor
    basis: Tensor
    vmean: Tensor
    anchors: Tensor
    wpos: Tensor


def derotate(core: AttentionCore, k: Tensor, rel: Tensor) -> Tensor:
    """Undo RoPE/XPOS on keys k [B, Hk, L, Dh] rotated at document positions rel [B, L]."""
    if core.rotary is None:
        return k
    return core.rotary._rotate(k, -rel, -1.0)


def pq_encode(x: Tensor, centroids: Tensor) -> Tensor:
    """x [..., Hk, L, Dh], centroids [Hk, M, K, Dh/M] -> codes [..., Hk, L, M] (nearest centroid per sub-space)."""
    Hk, M, K, ds = centroids.shape
    xs = x.float().reshape(*x.shape[:-1], M, ds)
    c = centroids.float().view(*([1] * (x.dim() - 3)), Hk, 1, M, K, ds)
    d = (xs.unsqueeze(-2) - c).pow(2).sum(-1)                              # [..., Hk, L, M, K]
    return d.argmin(-1).to(torch.uint8)


def pq_decode(codes: Tensor, centroids: Tensor) -> Tensor:
    """codes [B, Hk, ..., M] -> vectors [B, Hk, ..., Dh] (the inverse of pq_encode up to quantisation)."""
    Hk, M, _K, ds = centroids.shape
    B = codes.shape[0]
    c = codes.long().reshape(B, Hk, -1, M)
    out = torch.stack([centroids[h, torch.arange(M), c[:, h]] for h in range(Hk)], 1)   # [B, Hk, L, M, ds]
    return out.reshape(*codes.shape[:-1], M * ds).float()


class TieredAttention(nn.Module):
    """An attention layer's parameters (shared, not copied) with the Infinity-Window tiers as its state."""

    kind = "attention"

    def __init__(self, attn: Attention, cfg: KVTierConfig, centroids: Tensor) -> None:
        super().__init__()
        self.core: AttentionCore = attn.core
        self.layer_idx = attn.layer_idx
        self.d_model = attn.d_model
        self.cfg = cfg
        c = attn.core
        self.hq, self.hk, self.dh = c.hq, c.hk, c.dh
        self.Wh = min(cfg.hot, c.window) if c.window else cfg.hot
        self.register_buffer("centroids", centroids.float(), persistent=False)   # [Hk, M, K, Dh/M]
        self.M = centroids.shape[1]

    # ------------------------------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, device=None) -> TieredKVState:
        p = self.core.o_proj.weight
        device = device or p.device
        B, Hk, w, Dh, c = batch_size, self.hk, self.cfg.window, self.dh, self.cfg
        wd = torch.device(c.warm_device)
        z = torch.zeros(B, Hk, self.Wh, Dh, device=device, dtype=p.dtype)
        hot = KVState(k=z, v=z.clone(), kpos=torch.full((B, self.Wh), -1, dtype=torch.long, device=device),
                      pos=torch.zeros(B, dtype=torch.long, device=device),
                      doc_start=torch.zeros(B, dtype=torch.long, device=device))
        h16 = {"device": wd, "dtype": torch.float16}
        return TieredKVState(hot=hot, codes=torch.zeros(B, Hk, 0, w, self.M, dtype=torch.uint8, device=wd),
                             coef=torch.zeros(B, Hk, 0, w, c.rank, **h16), basis=torch.zeros(B, Hk, 0, c.rank, Dh, **h16),
                             vmean=torch.zeros(B, Hk, 0, Dh, **h16), anchors=torch.zeros(B, Hk, 0, c.anchors, Dh, **h16),
                             wpos=torch.zeros(B, 0, dtype=torch.long, device=wd))

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, state: TieredKVState | None = None, *, reset: Tensor | None = None,
                update: bool = True) -> tuple[Tensor, TieredKVState]:
        """x [B, T, D] -> (y [B, T, D], new state)."""
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, device=x.device)
        core, hot = self.core, state.hot
        if B > 1 and bool((hot.pos != hot.pos[0]).any()):
            raise ValueError("kv tiers: the rows of a batch must be at the same stream position")
        q, k, v = core.project(x)
        if core.q_norm is not None:
            q, k = core.q_norm(q), core.k_norm(k)
        abs_pos, doc_tok = stream_positions(hot.pos, hot.doc_start, reset, T)
        qr, kr = core.rotary(q, k, abs_pos - doc_tok) if core.rotary is not None else (q, k)
        warm = self._compress(state, kr, v, abs_pos, doc_tok)               # old + windows completed in this call
        o = self._attend(q, qr, kr, v, hot, warm, abs_pos, doc_tok)
        y = core.o_proj(o.to(x.dtype).transpose(1, 2).reshape(B, T, self.hq * self.dh))
        if not update:
            return y, state
        return y, dataclasses.replace(warm, hot=self._ring_write(hot, kr, v, abs_pos, doc_tok))

    def _ring_write(self, hot: KVState, k: Tensor, v: Tensor, abs_pos: Tensor, doc_tok: Tensor) -> KVState:
        W, T = self.Wh, k.shape[2]
        n = min(T, W)
        slot = abs_pos[:, -n:] % W
        idx = slot[:, None, :, None].expand(-1, self.hk, -1, self.dh)
        return KVState(k=hot.k.scatter(2, idx, k[:, :, -n:].to(hot.k.dtype)),
                       v=hot.v.scatter(2, idx, v[:, :, -n:].to(hot.v.dtype)),
                       kpos=hot.kpos.scatter(1, slot, abs_pos[:, -n:]), pos=hot.pos + T, doc_start=doc_tok[:, -1])

    def _compress(self, state: TieredKVState, kr: Tensor, v: Tensor, abs_pos: Tensor, doc_tok: Tensor
                  ) -> TieredKVState:
        """Append the windows completed by this call (w tokens each, from the hot ring and the new tokens)."""
        c, w, hot = self.cfg, self.cfg.window, state.hot
        wd = torch.device(c.warm_device)
        pos0, T = int(hot.pos[0]), kr.shape[2]
        j0, j1 = pos0 // w, (pos0 + T) // w                                   # windows j0 … j1−1 complete here
        if j1 == j0:
            return state if state.codes.device == wd else state.map(lambda t: t.to(wd))  # type: ignore[return-value]
        dev = kr.device
        p = (torch.arange(j0 * w, j1 * w, device=dev))                        # [n_new·w]
        from_new = p >= pos0
        src = torch.where(from_new, self.Wh + (p - pos0), p % self.Wh)
        keys = torch.cat([hot.k.to(kr.dtype), kr], 2)[:, :, src]             # [B, Hk, n_new·w, Dh]
        vals = torch.cat([hot.v.to(v.dtype), v], 2)[:, :, src]
        # document position of each token (ring tokens of an earlier document are invalid: no later query sees them)
        doc_new = doc_tok[:, (p - pos0).clamp(0, T - 1)]
        doc_p = torch.where(from_new[None], doc_new, hot.doc_start[:, None])
        ring_ok = hot.kpos[:, p % self.Wh] == p[None]
        ok = (from_new[None] | ring_ok) & (p[None] >= doc_p)                  # [B, n_new·w]
        keys = derotate(self.core, keys, (p[None] - doc_p).clamp_min(0)).float() * ok[:, None, :, None]
        vals = vals.float() * ok[:, None, :, None]
        B, nn_ = keys.shape[0], j1 - j0
        kw = keys.view(B, self.hk, nn_, w, self.dh)
        vw = vals.view(B, self.hk, nn_, w, self.dh)
        okw = ok.view(B, 1, nn_, w, 1).float()
        codes = pq_encode(kw.reshape(B, self.hk, nn_ * w, self.dh), self.centroids).view(B, self.hk, nn_, w, self.M)
        A = c.anchors
        sub = okw.view(B, 1, nn_, A, w // A, 1)
        anchors = (kw.view(B, self.hk, nn_, A, w // A, self.dh) * sub).sum(4) / sub.sum(4).clamp_min(1)
        mu = (vw * okw).sum(3) / okw.sum(3).clamp_min(1)                      # [B, Hk, n, Dh]
        vc = (vw - mu[:, :, :, None]) * okw
        _, _, vh = torch.linalg.svd(vc.double(), full_matrices=False)         # vh [B, Hk, n, min(w, Dh), Dh]
        vh = vh.float()  # (float64: exact enough, and LAPACK on small float32 batches is pathologically slow)
        r = min(c.rank, vh.shape[-2])
        basis = vh[..., :r, :]
        sign = torch.sign(torch.gather(basis, -1, basis.abs().argmax(-1, keepdim=True)))   # canonical signs
        basis = basis * torch.where(sign == 0, torch.ones_like(sign), sign)
        coef = vc @ basis.transpose(-1, -2)                                   # [B, Hk, n, w, r]
        if r < c.rank:
            basis = F.pad(basis, (0, 0, 0, c.rank - r))
            coef = F.pad(coef, (0, c.rank - r))
        new = {"codes": codes, "coef": coef.half(), "basis": basis.half(), "vmean": mu.half(),
               "anchors": anchors.half(), "wpos": (p.view(nn_, w)[:, 0])[None].expand(B, -1)}
        out = {}
        for name, t in new.items():
            old = getattr(state, name).to(wd)
            joined = torch.cat([old, t.to(wd)], dim=2 if name != "wpos" else 1)
            if c.warm_windows:
                joined = joined[:, :, -c.warm_windows:] if name != "wpos" else joined[:, -c.warm_windows:]
            out[name] = joined
        return TieredKVState(hot=state.hot, **out)

    # -------------------------------------------------------------------------------------- attention
    def _attend(self, q: Tensor, qr: Tensor, kr: Tensor, v: Tensor, hot: KVState, warm: TieredKVState,
                abs_pos: Tensor, doc_tok: Tensor) -> Tensor:
        """Joint softmax over hot tokens and teleported warm windows -> o [B, Hq, T, Dh] (float32)."""
        B, Hq, T, Dh = q.shape
        Hk, G = self.hk, Hq // self.hk
        Q = G * T
        scale = 1.0 / math.sqrt(Dh)
        qpos, qdoc = abs_pos.repeat(1, G), doc_tok.repeat(1, G)                # [B, Q] (query index g·T + t)
        # hot: ring + new tokens, exact
        keys = torch.cat([hot.k.to(kr.dtype), kr], 2).float()
        vals = torch.cat([hot.v.to(v.dtype), v], 2).float()
        kpos = torch.cat([hot.kpos, abs_pos], 1)
        qg = qr.float().reshape(B, Hk, Q, Dh)
        s_hot = torch.einsum("bhqd,bhld->bhql", qg, keys) * scale
        kp, qp = kpos[:, None, None, :], qpos[:, None, :, None]
        m_hot = (kp >= 0) & (kp <= qp) & (kp >= qdoc[:, None, :, None]) & (qp - kp < self.Wh)
        if self.core.persist_k is not None:
            pk, pv = self.core.persist_k.float(), self.core.persist_v.float()
            s_hot = torch.cat([torch.einsum("bhqd,hnd->bhqn", qg, pk) * scale, s_hot], -1)
            vals = torch.cat([pv.expand(B, -1, -1, -1), vals], 2)
            m_hot = torch.cat([m_hot.new_ones(B, 1, Q, pk.shape[1]), m_hot], -1)
        s_hot = s_hot.masked_fill(~m_hot, float("-inf"))
        n = warm.wpos.shape[1]
        if n == 0:
            o = torch.softmax(s_hot, -1) @ vals
            return o.view(B, Hk, G, T, Dh).reshape(B, Hq, T, Dh)
        # warm: queries rotated to distance D against unrotated keys
        qw = q.float()
        if self.core.rotary is not None:
            qw = self.core.rotary._rotate(qw, torch.full_like(abs_pos, self.cfg.dist), 1.0)
        qw = qw.reshape(B, Hk, Q, Dh)
        sel = self.teleport(qw, warm, qpos, qdoc)                            # [B, Hk, Q, k] window ids, −1 none
        s_warm, m_warm, coef, basis, mu = self._gather_warm(qw, warm, sel, qpos, qdoc)
        s_warm = (s_warm * scale).masked_fill(~m_warm, float("-inf"))        # [B, Hk, Q, k, w]
        mx = torch.maximum(s_hot.amax(-1), s_warm.flatten(-2).amax(-1))[..., None]
        e_hot = torch.exp(s_hot - mx)
        e_warm = torch.exp(s_warm - mx[..., None])
        Z = e_hot.sum(-1) + e_warm.sum((-1, -2))
        o = e_hot @ vals
        o = o + torch.einsum("bhqkr,bhqkrd->bhqd", torch.einsum("bhqkw,bhqkwr->bhqkr", e_warm, coef), basis)
        o = o + torch.einsum("bhqk,bhqkd->bhqd", e_warm.sum(-1), mu)
        o = o / Z[..., None]
        return o.view(B, Hk, G, T, Dh).reshape(B, Hq, T, Dh)

    def _gather_warm(self, qw: Tensor, warm: TieredKVState, sel: Tensor, qpos: Tensor, qdoc: Tensor):
        """Scores [B, Hk, Q, k, w] of the chosen windows' tokens by PQ look-up tables, their mask, and the value
        factors (coef [.., k, w, r], basis [.., k, r, Dh], μ [.., k, Dh]), moved from host to the compute device."""
        B, Hk, Q, _Dh = qw.shape
        k, w, M = sel.shape[-1], self.cfg.window, self.M
        cent = self.centroids
        K, ds = cent.shape[2], cent.shape[3]
        lut = torch.einsum("bhqmd,hmkd->bhqmk", qw.reshape(B, Hk, Q, M, ds), cent.float()).reshape(B, Hk, Q, M * K)
        safe = sel.clamp_min(0)
        hs = safe.to(warm.codes.device)

        def take(t: Tensor) -> Tensor:  # [B, Hk, n, ...] at windows hs [B, Hk, Q, k] -> [B, Hk, Q, k, ...]
            flat = hs.reshape(B, Hk, Q * k)
            idx = flat.view(B, Hk, Q * k, *([1] * (t.dim() - 3))).expand(B, Hk, Q * k, *t.shape[3:])
            return torch.gather(t, 2, idx).view(B, Hk, Q, k, *t.shape[3:]).to(qw.device)

        codes = take(warm.codes).long()                                       # [B, Hk, Q, k, w, M]
        idx = (codes + torch.arange(M, device=qw.device) * K).reshape(B, Hk, Q, k * w * M)
        s = torch.gather(lut, 3, idx).view(B, Hk, Q, k, w, M).sum(-1)
        p = warm.wpos.to(qw.device)[:, None, :].expand(B, Hk, -1)
        p = torch.gather(p, 2, safe.reshape(B, Hk, Q * k)).view(B, Hk, Q, k, 1) + torch.arange(w, device=qw.device)
        qp, qd = qpos[:, None, :, None, None], qdoc[:, None, :, None, None]
        mask = (sel >= 0)[..., None] & (p >= qd) & (qp - p >= self.Wh)
        return s, mask, take(warm.coef).float(), take(warm.basis).float(), take(warm.vmean).float()

    # -------------------------------------------------------------------------------------- teleport
    def eligible_range(self, warm: TieredKVState, qpos: Tensor, qdoc: Tensor) -> tuple[Tensor, Tensor]:
        """Per query [B, Q]: the windows [lo, hi) it may see — some token out of the hot range, inside its document."""
        w, n = self.cfg.window, warm.wpos.shape[1]
        base = warm.wpos[:, :1].to(qpos.device)                               # first window's position (lockstep rows)
        hi = torch.div(qpos - self.Wh - base, w, rounding_mode="floor") + 1
        lo = torch.div(qdoc - base, w, rounding_mode="floor")                # first window ending at or after it
        return lo.clamp(0, n), hi.clamp(0, n)

    def teleport(self, qw: Tensor, warm: TieredKVState, qpos: Tensor, qdoc: Tensor) -> Tensor:
        """Choose k windows per query: qw [B, Hk, Q, Dh] -> window ids [B, Hk, Q, k] (−1 where fewer are visible)."""
        B, Hk, Q, _Dh = qw.shape
        c, n = self.cfg, warm.wpos.shape[1]
        k = min(c.topk, n)
        lo, hi = (t[:, None].expand(B, Hk, Q) for t in self.eligible_range(warm, qpos, qdoc))
        anchors = warm.anchors.to(qw.device).float()                          # [B, Hk, n, A, Dh]
        if c.search == "flat" or n <= c.beam * c.fanout:
            cand = torch.arange(n, device=qw.device).expand(B, Hk, Q, n)
            score = torch.einsum("bhqd,bhnad->bhqna", qw, anchors).amax(-1)  # every window: [B, Hk, Q, n]
        else:
            cand = self._descend(qw, anchors, lo, hi)                         # [B, Hk, Q, β·f] (may run past n)
            C = cand.shape[-1]
            a = torch.gather(anchors, 2, cand.clamp(max=n - 1).reshape(B, Hk, Q * C, 1, 1).expand(
                -1, -1, -1, *anchors.shape[3:])).view(B, Hk, Q, C, *anchors.shape[3:])
            score = torch.einsum("bhqd,bhqcad->bhqca", qw, a).amax(-1)
        ok = (cand >= lo[..., None]) & (cand < hi[..., None])
        top, i = score.masked_fill(~ok, float("-inf")).topk(min(k, cand.shape[-1]), dim=-1)
        return torch.where(torch.isfinite(top), torch.gather(cand, 3, i), torch.full_like(i, -1))

    def _descend(self, qw: Tensor, anchors: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Coarse-to-fine search of the context tree: β nodes per level -> β·f candidate windows [B, Hk, Q, β·f].

        A node's summary for a query is the mean c and spread σ (root-mean-square distance to c) of the anchors of
        the node's windows that the query may see, from prefix sums (float64) — so a node never mixes in a window
        the query may not see. A node scores q·c + κ‖q‖σ (κ = ``spread``): an optimistic estimate of its best
        anchor (the bound of a ball tree when σ is the radius), so a node holding one strong match among many
        weak ones is still expanded."""
        B, Hk, Q, Dh = qw.shape
        n, f, beam = anchors.shape[2], self.cfg.fanout, self.cfg.beam
        A = anchors.shape[3]
        P = F.pad(anchors.double().sum(3).cumsum(2), (0, 0, 1, 0))             # [B, Hk, n+1, Dh]
        P2 = F.pad(anchors.double().pow(2).sum((3, 4)).cumsum(2), (1, 0))       # [B, Hk, n+1]
        qn = qw.norm(dim=-1, keepdim=True).double()
        level = 0
        while math.ceil(n / f ** level) > beam * f:
            level += 1
        nodes = torch.arange(math.ceil(n / f ** level), device=qw.device).expand(B, Hk, Q, -1)
        while level > 0:
            span = f ** level
            s = torch.minimum(torch.maximum(nodes * span, lo[..., None]), hi[..., None])
            e = torch.maximum(torch.minimum(nodes * span + span, hi[..., None]), s)
            cnt = ((e - s).clamp_min(1) * A).double()
            g1 = lambda i: torch.gather(P, 2, i.reshape(B, Hk, -1, 1).expand(-1, -1, -1, Dh)).view(*i.shape, Dh)
            g2 = lambda i: torch.gather(P2, 2, i.reshape(B, Hk, -1)).view(i.shape)
            c = (g1(e) - g1(s)) / cnt[..., None]
            var = ((g2(e) - g2(s)) / cnt - c.pow(2).sum(-1)).clamp_min(0)
            score = torch.einsum("bhqd,bhqcd->bhqc", qw.double(), c) + self.cfg.spread * qn * var.sqrt()
            score = score.masked_fill(e <= s, float("-inf"))
            best = torch.gather(nodes, 3, score.topk(min(beam, nodes.shape[-1]), dim=-1).indices)   # [B, Hk, Q, β]
            level -= 1
            nodes = (best[..., None] * f + torch.arange(f, device=qw.device)).flatten(-2)  # children (unique)
        return nodes

    def nbytes_per_token(self) -> dict[str, float]:
        """Bytes per token of the hot tier (at its full size) and of the warm tier (amortised over a window)."""
        c, Hk, Dh = self.cfg, self.hk, self.dh
        es = self.core.o_proj.weight.element_size()
        per_window = Hk * (c.window * (self.M + 2 * c.rank) + 2 * (c.rank * Dh + Dh + c.anchors * Dh)) + 8
        return {"hot_bytes": float(self.Wh * Hk * Dh * 2 * es + self.Wh * 8), "warm_bytes_per_token":
                per_window / c.window, "exact_bytes_per_token": float(Hk * Dh * 2 * es + 8)}


# --------------------------------------------------------------------------------------------- model level


def attention_layers(model) -> list[int]:
    return [i for i, b in enumerate(model.blocks) if isinstance(b.mixer, Attention)]


@torch.no_grad()
def collect_keys(model, ids: Tensor, max_keys: int = 50_000) -> dict[int, Tensor]:
    """Unrotated (post-norm) keys of every attention layer on ids [B, T]: {layer: [Hk, n, Dh]}."""
    out: dict[int, list[Tensor]] = {i: [] for i in attention_layers(model)}
    hooks = []
    for i in out:
        core = model.blocks[i].mixer.core

        def hook(_mod, args, _core=core, _i=i):
            _, k, _ = _core.project(args[0])
            if _core.k_norm is not None:
                k = _core.k_norm(k)
            out[_i].append(k.float().transpose(0, 1).reshape(_core.hk, -1, _core.dh))
        hooks.append(model.blocks[i].mixer.register_forward_pre_hook(hook))
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v, 1)[:, :max_keys] for i, v in out.items()}


def calibrate(model, ids: Tensor, cfg: KVTierConfig, max_keys: int = 8192) -> dict[int, Tensor]:
    """PQ codebooks per attention layer, trained with FAISS on the model's own keys over ids [B, T] (at most
    ``max_keys`` per head): {layer: centroids [Hk, M, K, Dh/M]}."""
    from memlm.memory.episodic import require_faiss

    faiss = require_faiss()
    books = {}
    for i, keys in collect_keys(model, ids, max_keys).items():
        Hk, n, Dh = keys.shape
        M = cfg.pq or max(1, Dh // 4)
        if Dh % M:
            raise UserError(f"kv tiers: pq={M} must divide the head width {Dh}")
        if n < 2 ** cfg.bits:
            raise UserError(f"kv tiers: {n} calibration tokens cannot train {2 ** cfg.bits} centroids; "
                            f"give more calibration text")
        per_head = []
        threads = faiss.omp_get_max_threads()
        # k-means on a few thousand points: one OpenMP thread is several times faster than fighting torch's pool
        faiss.omp_set_num_threads(1 if n < 200_000 else threads)
        try:
            for h in range(Hk):
                pq = faiss.ProductQuantizer(Dh, M, cfg.bits)
                pq.cp.min_points_per_centroid = 1  # small calibration sets are fine (FAISS would warn below 39·K)
                pq.train(np.ascontiguousarray(keys[h].numpy()))
                per_head.append(torch.from_numpy(
                    faiss.vector_to_array(pq.centroids).reshape(M, 2 ** cfg.bits, Dh // M)))
        finally:
            faiss.omp_set_num_threads(threads)
        books[i] = torch.stack(per_head)
    return books


def apply_kv_tiers(model, cfg: KVTierConfig | str, calibration: Tensor | None = None,
                   codebooks: dict[int, Tensor] | None = None):
    """A copy of ``model`` (parameters shared) whose attention layers keep Infinity-Window tiers as their state.

    calibration: ids [B, T] to train the PQ codebooks on (or give ``codebooks`` from ``calibrate``). The copy works
    with Engine, Session and generate like any model; its states carry a distinct config hash."""
    if isinstance(cfg, str):
        cfg = parse_kv_tiers(cfg)
    layers = attention_layers(model)
    if not layers:
        raise UserError("kv tiers: this model has no attention layers")
    if codebooks is None:
        if calibration is None:
            raise UserError("kv tiers: give calibration ids (or codebooks) to train the PQ codebooks")
        codebooks = calibrate(model, calibration, cfg)
    new = copy.copy(model)
    for name in ("_parameters", "_buffers", "_modules", "_forward_pre_hooks", "_forward_hooks"):
        setattr(new, name, copy.copy(getattr(model, name)))
    blocks = []
    for i, b in enumerate(model.blocks):
        if i in layers:
            nb = copy.copy(b)
            nb._modules = copy.copy(b._modules)
            nb.mixer = TieredAttention(b.mixer, cfg, codebooks[i].to(b.mixer.core.o_proj.weight.device))
            b = nb
        blocks.append(b)
    new.blocks = nn.ModuleList(blocks)
    tag = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    new._config_hash = model._config_hash + "+kvtiers-" + hashlib.sha256(tag.encode()).hexdigest()[:8]
    new.kv_tiers = cfg
    return new


def tier_memory(model) -> dict[str, float]:
    """Bytes per token of each tier summed over the tiered layers (see TieredAttention.nbytes_per_token)."""
    out = {"hot_bytes": 0.0, "warm_bytes_per_token": 0.0, "exact_bytes_per_token": 0.0}
    for m in model.modules():
        if isinstance(m, TieredAttention):
            for k, v in m.nbytes_per_token().items():
                out[k] += v
    return out


def calibration_ids(tokenizer, n_tokens: int = 16384) -> Tensor:
    """Ids [1, n] from the demo corpus shipped with memlm (for calibrating codebooks when no text is given)."""
    import lzma
    from importlib import resources

    path = resources.files("memlm") / "data" / "demo" / "books-demo.jsonl.xz"
    ids: list[int] = []
    with lzma.open(str(path), "rt", encoding="utf-8") as f:
        for line in f:
            ids.extend(tokenizer.encode(json.loads(line).get("text", "")))
            if len(ids) >= n_tokens:
                break
    return torch.tensor([ids[:n_tokens]])


def kv_tiers_from_flag(model, tokenizer, spec: str, calibration_text: str | None = None):
    """What ``--kv-tiers SPEC`` does in the CLI: parse, calibrate on ``calibration_text`` (default: the demo corpus),
    and return the tiered copy of ``model``."""
    cfg = parse_kv_tiers(spec)
    ids = torch.tensor([tokenizer.encode(calibration_text)]) if calibration_text else calibration_ids(tokenizer)
    return apply_kv_tiers(model, cfg, calibration=ids.to(next(model.parameters()).device))
