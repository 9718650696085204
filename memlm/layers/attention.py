"""Causal softmax attention: MHA / GQA / MQA, full or sliding window, KV cache as state, document masking.

Notation: B batch, T new tokens, L cached slots, Hq query heads, Hk key/value heads, Dh head width, W window.

State (``KVState``): rotated keys and values of past tokens with their absolute stream positions.
Full attention grows the cache by concatenation; a sliding window keeps a fixed ring of W slots
(token at stream position p lives in slot p mod W), so its state has a static shape. Masks are built from
positions, never from slot order: key j is visible to query t iff it is valid, not in the future, in the
same document (position ≥ the query's document start) and, with a window, fewer than W positions back.
Optional persistent memory (``n_persistent`` = Np > 0): Np learned key/value pairs per KV head, prepended to the keys
of every query — always visible, never cached, no position encoding, no document or window masking (Titans / MAG).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.config.base import check_choice
from memlm.layers.base import LayerState, Mixer, MixerConfig, register_mixer, stream_positions
from memlm.layers.norm import RMSNorm
from memlm.layers.rotary import Rotary
from memlm.layers.static import in_static_decode
from memlm.ops.attention import masked_attention
from memlm.ops.decode_attention import decode_attention


@dataclass(kw_only=True)
class AttentionConfig(MixerConfig):
    kind: str = "attention"
    n_heads: int | None = None  # None: the model's n_heads
    n_kv_heads: int | None = None  # None: = n_heads (MHA); 1: MQA; else GQA
    head_dim: int | None = None  # None: d_model // n_heads
    window: int | None = None  # sliding window W (a token sees itself and W-1 before it); None: full
    position: str | None = None  # None: the model's position ("rope"/"xpos"/"none"/"learned")
    rope_fraction: float | None = None
    rope_base: float | None = None
    bias: bool = False
    qk_norm: bool = False
    fused_qkv: bool = True
    n_persistent: int = 0  # learned persistent key/value tokens visible to every query (0: none)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_persistent < 0:
            raise ValueError(f"n_persistent={self.n_persistent} must be ≥ 0")
        if self.position is not None:
            check_choice("position", self.position, ("rope", "xpos", "none", "learned"))
        if self.window is not None and self.window < 1:
            raise ValueError(f"window={self.window} must be ≥ 1")


@dataclass(frozen=True)
class KVState(LayerState):
    """k, v: [B, Hk, L, Dh]; kpos: [B, L] stream position per slot (-1 empty); pos, doc_start: [B]."""

    k: Tensor
    v: Tensor
    kpos: Tensor
    pos: Tensor
    doc_start: Tensor


class AttentionCore(nn.Module):
    """Projections + positions + masked SDPA over [cache; new]; shared by every attention-based mixer."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, window: int | None,
                 position: str, rope_base: float, rope_fraction: float, xpos_scale_base: float, bias: bool,
                 qk_norm: bool, fused_qkv: bool, n_persistent: int = 0) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        self.hq, self.hk, self.dh, self.window = n_heads, n_kv_heads, head_dim, window
        dims = (n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim)
        self.dims = dims
        if fused_qkv:
            self.qkv = nn.Linear(d_model, sum(dims), bias=bias)
        else:
            self.q_proj = nn.Linear(d_model, dims[0], bias=bias)
            self.k_proj = nn.Linear(d_model, dims[1], bias=bias)
            self.v_proj = nn.Linear(d_model, dims[2], bias=bias)
        self.fused = fused_qkv
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.q_norm = RMSNorm(head_dim) if qk_norm else None
        self.k_norm = RMSNorm(head_dim) if qk_norm else None
        self.rotary = None
        if position in ("rope", "xpos"):
            self.rotary = Rotary(head_dim, base=rope_base, fraction=rope_fraction, xpos=position == "xpos",
                                 scale_base=xpos_scale_base)
        # Persistent memory [Hk, Np, Dh]: parameters (trained with the model), never part of the state.
        self.persist_k = nn.Parameter(torch.randn(n_kv_heads, n_persistent, head_dim) * 0.02) if n_persistent else None
        self.persist_v = nn.Parameter(torch.randn(n_kv_heads, n_persistent, head_dim) * 0.02) if n_persistent else None

    def init_state(self, batch_size: int, device, dtype) -> KVState:
        L = self.window or 0
        z = torch.zeros(batch_size, self.hk, L, self.dh, device=device, dtype=dtype)
        return KVState(k=z, v=z.clone(), kpos=torch.full((batch_size, L), -1, device=device, dtype=torch.long),
                       pos=torch.zeros(batch_size, device=device, dtype=torch.long),
                       doc_start=torch.zeros(batch_size, device=device, dtype=torch.long))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, D] -> q [B, Hq, T, Dh], k, v [B, Hk, T, Dh]."""
        B, T, _ = x.shape
        if self.fused:
            q, k, v = self.qkv(x).split(self.dims, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.hq, self.dh).transpose(1, 2)
        k = k.view(B, T, self.hk, self.dh).transpose(1, 2)
        v = v.view(B, T, self.hk, self.dh).transpose(1, 2)
        return q, k, v

    def forward(self, x: Tensor, state: KVState, reset: Tensor | None, update: bool,
                qkv: tuple[Tensor, Tensor, Tensor] | None = None, fresh: bool = False) -> tuple[Tensor, KVState]:
        """fresh: ``state`` is a fresh init_state (nothing cached), so attention needs only the new keys."""
        B, T, _ = x.shape
        q, k, v = self.project(x) if qkv is None else qkv
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        abs_pos, doc_tok = stream_positions(state.pos, state.doc_start, reset, T)
        if self.rotary is not None:
            q, k = self.rotary(q, k, abs_pos - doc_tok)
        if update and in_static_decode():
            o, new_state = self._static_step(q, k, v, state, abs_pos, doc_tok)
        else:
            o = self._attend(q, k, v, state, abs_pos, doc_tok, reset, fresh)
            new_state = self._write(state, k, v, abs_pos, doc_tok) if update else state
        o = o.transpose(1, 2).reshape(B, T, self.hq * self.dh)
        return self.o_proj(o), new_state

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, state: KVState, abs_pos: Tensor, doc_tok: Tensor,
                reset: Tensor | None, fresh: bool = False) -> Tensor:
        gqa = self.hq != self.hk
        L = 0 if fresh else state.k.shape[2]  # a fresh window ring holds no valid slot: leave it out
        if L == 0 and reset is None and self.window is None and self.persist_k is None:
            # Fresh causal block, no packing: the flash/efficient kernels apply.
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
        if L > 0:
            keys = torch.cat([state.k.to(k.dtype), k], dim=2)
            vals = torch.cat([state.v.to(v.dtype), v], dim=2)
            kpos = torch.cat([state.kpos, abs_pos], dim=1)
        else:
            keys, vals, kpos = k, v, abs_pos
        n = 0
        if self.persist_k is not None:
            B, n = q.shape[0], self.persist_k.shape[1]
            keys = torch.cat([self.persist_k.to(keys.dtype).expand(B, -1, -1, -1), keys], dim=2)
            vals = torch.cat([self.persist_v.to(vals.dtype).expand(B, -1, -1, -1), vals], dim=2)
        # Masked attention (ops/attention.py: dense-mask SDPA, or FlexAttention on CUDA). From a fresh state the
        # mask follows from the shapes and the batch's reset alone: every layer of the forward shares one block mask.
        cache_key = ("fresh", reset, q.shape[0], q.shape[2]) if fresh else None
        return masked_attention(q, keys, vals, abs_pos, kpos, doc_tok, window=self.window, n_persist=n,
                                cache_key=cache_key)

    def _write(self, state: KVState, k: Tensor, v: Tensor, abs_pos: Tensor, doc_tok: Tensor) -> KVState:
        T = k.shape[2]
        new_pos, new_doc = state.pos + T, doc_tok[:, -1]
        if self.window is None:
            kd = state.k.dtype if state.k.shape[2] else k.dtype
            return KVState(k=torch.cat([state.k.to(kd), k.to(kd)], dim=2), v=torch.cat([state.v.to(kd), v.to(kd)], 2),
                           kpos=torch.cat([state.kpos, abs_pos], dim=1), pos=new_pos, doc_start=new_doc)
        W = self.window
        n = min(T, W)  # only the last W new tokens can survive in the ring
        k_new, v_new, p_new = k[:, :, -n:], v[:, :, -n:], abs_pos[:, -n:]
        slot = (p_new % W)  # [B, n]
        idx = slot[:, None, :, None].expand(-1, self.hk, -1, self.dh)
        kd = state.k.dtype
        return KVState(k=state.k.scatter(2, idx, k_new.to(kd)), v=state.v.scatter(2, idx, v_new.to(kd)),
                       kpos=state.kpos.scatter(1, slot, p_new), pos=new_pos, doc_start=new_doc)


    # ------------------------------------------------------------------------------ static decode (layers/static.py)
    def static_kv(self, state: KVState, max_len: int) -> KVState:
        """A copy of ``state`` in static layout: full attention gets a buffer of ``max_len`` slots (the token at stream
        position p in slot p, empty slots kpos = −1); a window keeps its ring of W slots."""
        if self.window is not None:
            return state.map(torch.clone)
        B, _, L, _ = state.k.shape
        top = int(state.kpos.max()) + 1 if L else 0
        if top > max_len:
            raise ValueError(f"static KV buffer of {max_len} slots cannot hold position {top - 1}")
        # one extra dump slot (dropped below) receives the empty source slots
        k = state.k.new_zeros(B, self.hk, max_len + 1, self.dh)
        v = torch.zeros_like(k)
        kpos = state.kpos.new_full((B, max_len + 1), -1)
        if L:
            ok = state.kpos >= 0
            slot = torch.where(ok, state.kpos, max_len)   # slot = position
            idx = slot[:, None, :, None].expand(-1, self.hk, -1, self.dh)
            k.scatter_(2, idx, state.k.to(k.dtype))
            v.scatter_(2, idx, state.v.to(v.dtype))
            kpos.scatter_(1, slot, state.kpos)
        return KVState(k=k[:, :, :max_len].contiguous(), v=v[:, :, :max_len].contiguous(),
                       kpos=kpos[:, :max_len].contiguous(), pos=state.pos.clone(), doc_start=state.doc_start.clone())

    def compact_kv(self, state: KVState) -> KVState:
        """Static layout -> dynamic: a full-attention buffer is cut after the last written slot."""
        if self.window is not None or state.k.shape[2] == 0:
            return state
        n = int(state.kpos.max()) + 1
        return KVState(k=state.k[:, :, :n].clone(), v=state.v[:, :, :n].clone(), kpos=state.kpos[:, :n].clone(),
                       pos=state.pos, doc_start=state.doc_start)

    def _static_step(self, q: Tensor, k: Tensor, v: Tensor, state: KVState, abs_pos: Tensor, doc_tok: Tensor
                     ) -> tuple[Tensor, KVState]:
        """Write k, v into the buffer in place at their slots (stream position, mod W for a ring), then attend over the
        buffer alone: no concatenation, so one step costs no copy of the cache and has fixed shapes. For a ring this
        needs T = 1 (a longer write could overwrite keys that earlier queries of the call still see)."""
        T, L = q.shape[2], state.k.shape[2]
        if self.window is not None and T > 1:
            raise ValueError(f"static decode feeds one token per step; got {T} with a sliding window")
        slot = abs_pos % L if self.window is not None else abs_pos   # full buffer: out of range is an error
        if torch.compiler.is_compiling():
            # torch.compile turns an in-place write into a graph input into an out-of-place op plus a copy back, and
            # makes only index_put in place again (inductor's reinplacing): a scatter_ cost two passes over every K
            # and V buffer per step (0.33 ms of transformer-34m's compiled step at 16K context, H100 profile)
            rows = torch.arange(q.shape[0], device=slot.device)[:, None]
            at = (rows[:, :, None], torch.arange(self.hk, device=slot.device)[:, None], slot[:, None, :])  # [B, Hk, T]
            state.k.index_put_(at, k.to(state.k.dtype))
            state.v.index_put_(at, v.to(state.v.dtype))
            state.kpos.index_put_((rows, slot), abs_pos)
        else:   # eagerly one kernel per buffer (index_put_ adds the index kernels)
            idx = slot[:, None, :, None].expand(-1, self.hk, -1, self.dh)
            state.k.scatter_(2, idx, k.to(state.k.dtype))
            state.v.scatter_(2, idx, v.to(state.v.dtype))
            state.kpos.scatter_(1, slot, abs_pos)
        # The buffers as they are (no dtype copies, no concatenation of the persistent keys): split-KV Triton kernels
        # on CUDA for one token, else the dense-mask SDPA (ops/decode_attention.py). Full buffer: slot = position.
        o = decode_attention(q, state.k, state.v, state.kpos, abs_pos, doc_tok, window=self.window,
                             persist_k=self.persist_k, persist_v=self.persist_v, slot_is_pos=self.window is None,
                             backend=None if T == 1 else "sdpa")
        return o, KVState(k=state.k, v=state.v, kpos=state.kpos, pos=state.pos + T, doc_start=doc_tok[:, -1])


def core_from_config(cfg: AttentionConfig, model_cfg) -> AttentionCore:
    """Build an AttentionCore with the model's defaults filled in (used by attention-based mixers)."""
    hq = cfg.n_heads or model_cfg.n_heads
    return AttentionCore(
        model_cfg.d_model, hq, cfg.n_kv_heads or hq, cfg.head_dim or model_cfg.d_model // hq, window=cfg.window,
        position=cfg.position or model_cfg.position,
        rope_base=cfg.rope_base or model_cfg.rope_base, rope_fraction=cfg.rope_fraction or model_cfg.rope_fraction,
        xpos_scale_base=model_cfg.xpos_scale_base, bias=cfg.bias, qk_norm=cfg.qk_norm, fused_qkv=cfg.fused_qkv,
        n_persistent=cfg.n_persistent)


@register_mixer("attention", AttentionConfig)
class Attention(Mixer):
    """Causal softmax attention mixer (x [B, T, D] -> [B, T, D]) with a KV-cache state."""

    def __init__(self, cfg: AttentionConfig, model_cfg, layer_idx: int) -> None:
        super().__init__(cfg, model_cfg, layer_idx)
        self.core = core_from_config(cfg, model_cfg)

    static_decode = True

    def init_state(self, batch_size: int, *, device=None) -> KVState:
        p = self.core.o_proj.weight
        return self.core.init_state(batch_size, device or p.device, p.dtype)

    def static_state(self, state: KVState, max_len: int) -> KVState:
        return self.core.static_kv(state, max_len)

    def compact_state(self, state: KVState) -> KVState:
        return self.core.compact_kv(state)

    def forward(self, x: Tensor, state: KVState | None = None, *, reset: Tensor | None = None,
                update: bool = True) -> tuple[Tensor, KVState]:
        fresh = state is None
        if state is None:
            state = self.init_state(x.shape[0], device=x.device)
        return self.core(x, state, reset, update, fresh=fresh)
