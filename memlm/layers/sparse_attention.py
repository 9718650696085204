"""Causal local (sliding-window) and causal strided global attention mixers — the attention operators of MoOp.

Notation: B batch, T new tokens, L cached keys, Hq query heads, Hk key/value heads, Dh head width, W window,
S stride, i = p − d the position of a token inside its document (p stream position, d document start).

local_attention:   query i sees keys j with i − W < j ≤ i                     (AttentionCore with a window; ring cache)
global_attention:  query i sees the landmarks j ≤ i with j mod S = 0, and itself     (strided, Sparse-Transformer-like)

Landmarks are counted inside the document (j = 0, S, 2S, …), so every query sees its document's first token and a
packed row equals its documents run alone. Only landmark keys are ever cached: the state (a ``KVState``) holds the
landmarks of each row's current document, compacted in position order (rows padded with empty slots, kpos = −1, to
the longest row), so its content is a function of the tokens seen — never of how the stream was split into calls.
Attention cost per query is O(L + T/S) instead of O(L + T). The self key of a query that is not a landmark enters
the softmax as one extra logit (it is never cached: a later query cannot see it).

Inside torch.compile the compactions use widths known from shapes instead of the longest row (which needs a host
read and breaks the graph): the new tokens' landmarks get ceil(T/S) + r columns (r = 0 without a reset, else the
``reset_bound`` promise, else T columns) and the returned cache L + that many. Outputs are the same (padding slots are
masked); the compiled cache just carries extra empty slots at the end.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from memlm.layers.attention import Attention, AttentionConfig, KVState, core_from_config
from memlm.layers.base import Mixer, register_mixer, stream_positions
from memlm.layers.static import no_host_sync
from memlm.ops.compressive.segments import static_chunks

__all__ = ["GlobalAttention", "GlobalAttentionConfig", "LocalAttention", "LocalAttentionConfig", "compact_keys"]


@dataclass(kw_only=True)
class LocalAttentionConfig(AttentionConfig):
    kind: str = "local_attention"
    window: int | None = 128  # W (required): a token sees itself and W−1 tokens before it

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window is None:
            raise ValueError("local_attention needs a window ≥ 1 (use kind='attention' for full attention)")


@register_mixer("local_attention", LocalAttentionConfig)
class LocalAttention(Attention):
    """Causal sliding-window attention x [B, T, D] -> [B, T, D]; the state is a ring KV cache of W slots."""


@dataclass(kw_only=True)
class GlobalAttentionConfig(AttentionConfig):
    kind: str = "global_attention"
    stride: int = 64  # S: landmarks at document positions 0, S, 2S, …

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stride < 1:
            raise ValueError(f"stride={self.stride} must be ≥ 1")
        if self.window is not None:
            raise ValueError("global_attention has no window (its keys are the strided landmarks)")
        if self.n_persistent:
            raise ValueError("global_attention does not support n_persistent")


def compact_keys(k: Tensor, v: Tensor, kpos: Tensor, width: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Move the valid slots (kpos ≥ 0) of every row to the front in position order; drop columns no row needs.

    k, v: [B, Hk, L, Dh]; kpos: [B, L] (−1 = empty) -> the same with L' = max valid count over rows ≤ L, or
    L' = ``width`` (a bound ≥ that count, known without reading the device: no host sync, no graph break).
    """
    valid = kpos >= 0
    if width is None:
        if bool(valid.all()):
            return k, v, kpos  # nothing to drop; valid slots are already in position order (cache, then new keys)
        n = int(valid.sum(1).max())
    else:
        n = min(width, kpos.shape[1])
    big = torch.iinfo(kpos.dtype).max
    order = torch.argsort(torch.where(valid, kpos, torch.full_like(kpos, big)), dim=1, stable=True)[:, :n]
    idx = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    kpos = kpos.gather(1, order)
    keep = (kpos >= 0)[:, None, :, None]  # padding slots hold zeros, so the state is canonical bit for bit
    return torch.where(keep, k.gather(2, idx), 0.0), torch.where(keep, v.gather(2, idx), 0.0), kpos


@register_mixer("global_attention", GlobalAttentionConfig)
class GlobalAttention(Mixer):
    """Causal strided attention x [B, T, D] -> [B, T, D]; the state caches only landmark keys and values."""

    def __init__(self, cfg: GlobalAttentionConfig, model_cfg, layer_idx: int) -> None:
        super().__init__(cfg, model_cfg, layer_idx)
        self.core = core_from_config(cfg, model_cfg)
        self.stride = cfg.stride

    def init_state(self, batch_size: int, *, device=None) -> KVState:
        p = self.core.o_proj.weight
        return self.core.init_state(batch_size, device or p.device, p.dtype)  # window None: an empty cache

    def forward(self, x: Tensor, state: KVState | None = None, *, reset: Tensor | None = None,
                update: bool = True) -> tuple[Tensor, KVState]:
        """x [B, T, D]; reset bool [B, T] | None -> (y [B, T, D], new state)."""
        core = self.core
        bsz, t_len, _ = x.shape
        if state is None:
            state = self.init_state(bsz, device=x.device)
        q, k, v = core.project(x)
        if core.q_norm is not None:
            q, k = core.q_norm(q), core.k_norm(k)
        abs_pos, doc_tok = stream_positions(state.pos, state.doc_start, reset, t_len)
        if core.rotary is not None:
            q, k = core.rotary(q, k, abs_pos - doc_tok)
        is_land = (abs_pos - doc_tok) % self.stride == 0  # [B, T]
        # Landmarks among the new tokens, compacted per row (rows differ when documents start at different places).
        # Compiled or captured: a width from shapes (module docstring); a bound on landmarks is a bound on chunks of S
        # tokens.
        width = None
        if no_host_sync():
            width = static_chunks(t_len, self.stride, reset, fresh=True) or t_len
        k_l, v_l, p_l = compact_keys(k, v, torch.where(is_land, abs_pos, torch.full_like(abs_pos, -1)), width)
        keys = torch.cat([state.k.to(k.dtype), k_l], dim=2)
        vals = torch.cat([state.v.to(v.dtype), v_l], dim=2)
        kpos = torch.cat([state.kpos, p_l], dim=1)
        o = self._attend(q, k, v, keys, vals, kpos, abs_pos, doc_tok, is_land)
        y = core.o_proj(o.transpose(1, 2).reshape(bsz, t_len, core.hq * core.dh))
        if not update:
            return y, state
        # Keep the landmarks of each row's current document only (older documents can never be attended again).
        alive = (kpos >= 0) & (kpos >= doc_tok[:, -1:])
        kpos = torch.where(alive, kpos, torch.full_like(kpos, -1))
        keys, vals, kpos = compact_keys(keys, vals, kpos, None if width is None else kpos.shape[1])
        kd = state.k.dtype
        return y, KVState(k=keys.to(kd), v=vals.to(kd), kpos=kpos, pos=state.pos + t_len, doc_start=doc_tok[:, -1])

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, keys: Tensor, vals: Tensor, kpos: Tensor, abs_pos: Tensor,
                doc_tok: Tensor, is_land: Tensor) -> Tensor:
        """q [B, Hq, T, Dh]; k, v the new tokens' own keys [B, Hk, T, Dh]; keys/vals [B, Hk, L, Dh] landmarks with
        kpos [B, L] -> o [B, Hq, T, Dh]. Softmax over {visible landmarks} ∪ {self if not a landmark}."""
        core = self.core
        rep = core.hq // core.hk
        if rep > 1:  # GQA: query head h reads key head h // rep (as SDPA's enable_gqa)
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            keys, vals = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
        scale = core.dh ** -0.5
        qf = q.float()
        scores = torch.einsum("bhtd,bhld->bhtl", qf, keys.float()) * scale  # [B, H, T, L]
        qp, kp = abs_pos[:, :, None], kpos[:, None, :]
        mask = (kp >= 0) & (kp <= qp) & (kp >= doc_tok[:, :, None])  # [B, T, L]
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        self_s = (qf * k.float()).sum(-1) * scale  # [B, H, T]
        # a landmark query already sees itself through the landmark keys: its extra self logit is masked out
        self_s = self_s.masked_fill(is_land[:, None], float("-inf"))
        p = torch.softmax(torch.cat([scores, self_s[..., None]], dim=-1), dim=-1)  # never all −inf: self or landmark
        o = torch.einsum("bhtl,bhld->bhtd", p[..., :-1], vals.float()) + p[..., -1:] * v.float()
        return o.to(q.dtype)
