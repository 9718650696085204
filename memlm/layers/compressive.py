"""Compressive memory mixer: Infini-attention (Munkhdalai et al. 2024, "Leave No Context Behind"), Infini-Pythia.

Notation (per batch row and head; B batch, T tokens, D width, H heads, K = V = Dh head width, N segment length):
  Q, K, V = W_q x, W_k x, W_v x; σ(x) = ELU(x) + 1
  A_dot   = softmax(Q Kᵀ / √K + causal mask inside the segment) V       (earlier tokens of the same segment only)
  A_mem   = σ(Q) M / (σ(Q) z)                                            (memory before the segment; 0 while empty)
  A       = g_h A_mem + (1 − g_h) A_dot,  g_h = σ(gate_h) learned per head;  y = W_o [A_1 … A_H]
  after each segment:  M += σ(K)ᵀ V  ("linear")  or  M += σ(K)ᵀ (V − σ(K) M / (σ(K) z))  ("delta");  z += Σ σ(K)

Every batch row owns its memory (nothing is shared or averaged across the batch); segments are document-aligned
(memlm.ops.compressive.segments: boundaries every N tokens of a document, so at absolute positions without packing)
and a reset empties the memory. Gradients flow through M and z across segments; only the caller (TBPTT) detaches.

Variants: ``multi_memory=R`` keeps R memories per head; segment s of a document writes memory s mod R, and a token
reads the mixture Σ_r w_r A_mem,r with w = softmax_r(τ_h · cos(σ(q), z_r)) (content match against each memory's
key summary z_r; empty memories excluded). ``hierarchical=R``: R fine memories written the same way plus their
sum as a coarse memory; a per-token expansion gate e = σ(W_e x) picks A_mem = (1 − e) A_coarse + e A_fine.

State (``CompressiveState``): M [B, H, R, K, V] f32, z [B, H, R, K] f32, pend_k, pend_v [B, N−1, H·Dh] (keys and
values of the current incomplete segment), pos, doc_start [B].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.config.base import check_choice
from memlm.layers.base import LayerState, Mixer, MixerConfig, register_mixer
from memlm.layers.rotary import Rotary
from memlm.ops.compressive import chunk_layout, gather_chunks, gather_tokens, pending_tail, segment_memory


@dataclass(kw_only=True)
class CompressiveConfig(MixerConfig):
    kind: str = "compressive"
    n_heads: int | None = None  # None: the model's n_heads
    head_dim: int | None = None  # None: d_model // n_heads
    segment_size: int = 512  # N
    update: str = "delta"  # "linear" | "delta"
    position: str = "none"  # "none" (NoPE, as the Infini-Pythia layer) | "rope" (inside the segment only)
    rope_base: float | None = None
    multi_memory: int = 1  # R memories per head, written round-robin, read by content match
    hierarchical: int = 0  # R fine memories + their sum as a coarse memory (0: off)
    bias: bool = False
    backend: str | None = None  # compressive_memory backend

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("update", self.update, ("linear", "delta"))
        check_choice("position", self.position, ("none", "rope"))
        if self.segment_size < 1:
            raise ValueError(f"segment_size={self.segment_size} must be ≥ 1")
        if self.multi_memory < 1 or self.hierarchical < 0:
            raise ValueError(f"multi_memory={self.multi_memory} must be ≥ 1 and hierarchical={self.hierarchical} ≥ 0")
        if self.multi_memory > 1 and self.hierarchical:
            raise ValueError("multi_memory and hierarchical are alternatives; set one of them")
        if self.hierarchical == 1:
            raise ValueError("hierarchical=1 has nothing to expand into; use ≥ 2 fine memories (or 0)")

    @property
    def n_memories(self) -> int:
        return self.hierarchical or self.multi_memory


@dataclass(frozen=True)
class CompressiveState(LayerState):
    """M: [B, H, R, K, V] f32; z: [B, H, R, K] f32; pend_k, pend_v: [B, N−1, H·Dh]; pos, doc_start: [B]."""

    M: Tensor
    z: Tensor
    pend_k: Tensor
    pend_v: Tensor
    pos: Tensor
    doc_start: Tensor


def elu1(x: Tensor) -> Tensor:
    """σ(x) = ELU(x) + 1 (positive feature map of Infini-attention)."""
    return F.elu(x) + 1.0


def content_weights(sq: Tensor, z_pre: Tensor, log_tau: Tensor) -> Tensor:
    """Which memory a token reads: softmax_r(τ_h · cos(σ(q), z_r)) over the non-empty memories (0 where all empty).

    sq [B, S, N, H, K] (σ(q)); z_pre [B, S, H, R, K] key summaries before the segment; log_tau [H] -> w [B, S, N, H, R].
    The match is by direction, so a memory is not preferred for having absorbed more keys (a larger ‖z‖).
    """
    zn = F.normalize(z_pre.float(), dim=-1)
    cos = torch.einsum("bsnhk,bshrk->bsnhr", F.normalize(sq.float(), dim=-1), zn)
    logits = cos * log_tau.float().exp()[:, None]
    filled = (z_pre.abs().sum(-1) > 0)[:, :, None]                           # [B, S, 1, H, R]
    # finite fill (not −inf) keeps softmax and its gradient NaN-free when every memory is still empty
    return torch.softmax(logits.masked_fill(~filled, -1e9), dim=-1) * filled


@register_mixer("compressive", CompressiveConfig)
class Compressive(Mixer):
    """Infini-attention: segment-local causal softmax attention plus a per-sequence compressive memory."""

    custom_init = True
    static_decode = True  # T = 1 keeps every state shape and never syncs (layers/static.py)

    def __init__(self, cfg: CompressiveConfig, model_cfg, layer_idx: int) -> None:
        super().__init__(cfg, model_cfg, layer_idx)
        d = model_cfg.d_model
        self.h = cfg.n_heads or model_cfg.n_heads
        self.dh = cfg.head_dim or d // self.h
        self.N = cfg.segment_size
        self.R = cfg.n_memories
        self.qkv = nn.Linear(d, 3 * self.h * self.dh, bias=cfg.bias)
        self.o_proj = nn.Linear(self.h * self.dh, d, bias=cfg.bias)
        self.gate = nn.Parameter(torch.zeros(self.h))  # g_h = σ(gate_h) mixes A_mem and A_dot
        self.log_tau = nn.Parameter(torch.zeros(self.h)) if self.R > 1 else None
        self.expand = nn.Linear(d, self.h, bias=True) if cfg.hierarchical else None
        self.rotary = None
        if cfg.position == "rope":
            self.rotary = Rotary(self.dh, base=cfg.rope_base or model_cfg.rope_base)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gate)
        if self.log_tau is not None:
            nn.init.constant_(self.log_tau, math.log(10.0))  # cosines of positive vectors are close: sharpen
        if self.expand is not None:
            nn.init.zeros_(self.expand.bias)

    def init_state(self, batch_size: int, *, device=None) -> CompressiveState:
        device = device or self.param_device()
        B, H, R, K = batch_size, self.h, self.R, self.dh
        pend = torch.zeros(B, self.N - 1, H * K, device=device, dtype=self.qkv.weight.dtype)
        z = torch.zeros(B, dtype=torch.long, device=device)
        return CompressiveState(M=torch.zeros(B, H, R, K, K, device=device), z=torch.zeros(B, H, R, K, device=device),
                                pend_k=pend, pend_v=pend.clone(), pos=z, doc_start=z.clone())

    def forward(self, x: Tensor, state: CompressiveState | None = None, *, reset: Tensor | None = None,
                update: bool = True) -> tuple[Tensor, CompressiveState]:
        """x [B, T, D]; reset bool [B, T] -> (y [B, T, D], new state)."""
        B, T, _ = x.shape
        H, K, N, P = self.h, self.dh, self.N, self.N - 1
        fresh = state is None  # a known-empty state: the chunk grid's size follows from T alone (no host sync)
        if state is None:
            state = self.init_state(B, device=x.device)
        lay = chunk_layout(state.pos, state.doc_start, reset, T, N, fresh=fresh)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        ke = torch.cat([state.pend_k.to(k.dtype), k], dim=1)                # [B, P+T, H·K]
        ve = torch.cat([state.pend_v.to(v.dtype), v], dim=1)
        qe = torch.cat([q.new_zeros(B, P, H * K), q], dim=1)                 # pending outputs are not re-emitted
        S = lay.N
        qg, kg, vg = (gather_chunks(t, lay).view(B, S, N, H, K) for t in (qe, ke, ve))
        valid = lay.slot_valid                                               # [B, S, N]

        a_dot = self._local_attention(qg, kg, vg, valid, lay)                # [B, S, N, H, K]
        sk = elu1(kg) * valid[..., None, None].to(kg.dtype)                  # empty slots write nothing
        num, den, z_pre, M, z = segment_memory(
            elu1(qg), sk, vg, M0=state.M, z0=state.z, write_slot=lay.index % self.R, starts_doc=lay.starts_doc,
            complete=lay.complete, delta=self.cfg.update == "delta", backend=self.cfg.backend)
        a_mem = self._combine(num, den, z_pre, elu1(qg), x, lay)              # [B, S, N, H, K]
        g = torch.sigmoid(self.gate.float())[:, None]
        a = g * a_mem + (1 - g) * a_dot.float()
        a = gather_tokens(a, lay).to(x.dtype)                                # [B, T, H, K]
        y = self.o_proj(a.reshape(B, T, H * K))
        if not update:
            return y, state
        return y, CompressiveState(M=M, z=z, pend_k=pending_tail(ke, lay).to(state.pend_k.dtype),
                                   pend_v=pending_tail(ve, lay).to(state.pend_v.dtype), pos=lay.pos,
                                   doc_start=lay.doc_start)

    def _local_attention(self, qg: Tensor, kg: Tensor, vg: Tensor, valid: Tensor, lay) -> Tensor:
        """Causal softmax attention inside each segment, all segments at once. Grids [B, S, N, H, K]."""
        B, S, N, H, K = qg.shape
        q, k, v = (t.reshape(B * S, N, H, K).transpose(1, 2) for t in (qg, kg, vg))   # [B·S, H, N, K]
        if self.rotary is not None:
            # position inside the document of every grid slot: segment index · N + slot
            pos = (lay.index[:, :, None] * N + torch.arange(N, device=qg.device)).reshape(B * S, N)
            q, k = self.rotary(q, k, pos)
        causal = torch.ones(N, N, dtype=torch.bool, device=qg.device).tril()
        kval = valid.reshape(B * S, 1, 1, N)
        # the diagonal stays visible so that empty query slots (discarded) never see an all-masked row (NaN)
        mask = causal & (kval | torch.eye(N, dtype=torch.bool, device=qg.device))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o.transpose(1, 2).reshape(B, S, N, H, K)

    def _combine(self, num: Tensor, den: Tensor, z_pre: Tensor, sq: Tensor, x: Tensor, lay) -> Tensor:
        """Reads of the R memories -> A_mem [B, S, N, H, K]. num [B, S, N, H, R, K]; den [B, S, N, H, R]."""
        eps = 1e-6
        reads = num / den.clamp_min(eps)[..., None]                          # σ(q) M_r / (σ(q) z_r); 0 if empty
        if self.R == 1:
            return reads[..., 0, :]
        w = content_weights(sq, z_pre, self.log_tau)
        fine = (w[..., None] * reads).sum(-2)
        if self.expand is None:
            return fine
        coarse = num.sum(-2) / den.sum(-1).clamp_min(eps)[..., None]         # the sum of the fine memories
        xe = torch.cat([x.new_zeros(x.shape[0], self.N - 1, x.shape[-1]), x], dim=1)
        e = torch.sigmoid(self.expand(gather_chunks(xe, lay)).float())[..., None]   # [B, S, N, H, 1]
        return (1 - e) * coarse + e * fine
