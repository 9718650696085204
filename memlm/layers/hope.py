"""HOPE mixer (Onyx; Behrouz et al. 2025, "Nested Learning", self-modifying Titans with matrix memories).

Notation (per memory head; B batch, T tokens, C chunk length, H query heads, Hm memory heads, Dh head width):
  u_t = SiLU(conv(W_u x))_t ∈ R^Dh            input of the memories (short causal conv, kernel 4, as in Titans)
  M_□ for □ ∈ {k, v, η, α, mem}                fast-weight matrices, stacked row-wise: M = [M_k; M_v; m_η; m_α; M_mem]
                                               ∈ R^{R×Dh}, R = 2Dh + 2 (+ Dh with read="memory")
  k_t = M_k u_t,  v_t = M_v u_t,  η, α from m_η u_t, m_α u_t       (each memory produces its own quantity)
  v̂_□ = M_□ v_t / ‖v_t‖                                            (each memory generates its own target)
  DGD:  M_□ ← M_□ (α_t I − η_t k̂_t k̂_tᵀ) − η_t (M_□ k̂_t − v̂_□) k̂_tᵀ,   k̂ = k/‖k‖

Chunk-wise (SPEC.md Onyx): within a chunk of C tokens every quantity (k, v, η, α, v̂) is produced by the memories
as they stood at the chunk start, M⁰. The DGD recurrence itself is then exact and parallel: with α_t = σ(a_t) and
η_t = ½ α_t β_t, β_t = σ(b_t), it is the gated delta rule S_t = α_t S_{t−1}(I − β_t k̂ k̂ᵀ) + β_t (½ α_t v̂_t) k̂ᵀ on the
stacked state, computed by memlm.ops.delta_rule (updates accumulate in parallel, WY/UT form).
Reads: read="memory"  o_t = M_mem,t q̂_t (the paper's HOPE; q = W_q x, L2-normalised), per-head RMSNorm, W_o;
       read="attention" causal softmax attention with RoPE/GQA over queries W_q x and the memory-produced keys k_t and
       values v_t (Onyx's "Hope attention"), through AttentionCore with a KV cache.
Chunks are document-aligned (memlm.ops.compressive.segments): the learned initial memories M_init (parameters, per
head) start every document, so they receive gradient on every step; tokens of an incomplete chunk wait in the
state's pending buffer (their u) and are written when the chunk completes, in training and decode alike.

State (``HopeState``): mem [B, Hm, R, Dh] float32 (memory at the start of the current chunk), pend [B, C−1, Hm·Dh]
(u of the pending tokens), conv [B, conv_size−1, channels] (short-conv cache), pos, doc_start [B], kv (KVState,
attention read only).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from memlm.config.base import check_choice
from memlm.layers.attention import AttentionConfig, KVState, core_from_config
from memlm.layers.base import LayerState, Mixer, MixerConfig, register_mixer
from memlm.layers.norm import RMSNorm
from memlm.layers.shortconv import ShortConv
from memlm.ops.compressive.segments import ChunkLayout, chunk_layout, gather_chunks, gather_tokens, pending_tail
from memlm.ops.hope_scan import hope_scan
from memlm.ops.hope_scan.reference import dgd_chunk, produce

__all__ = ["Hope", "HopeConfig", "HopeState", "dgd_chunk", "dgd_step"]


@dataclass(kw_only=True)
class HopeConfig(MixerConfig):
    kind: str = "hope"
    read: str = "memory"  # "memory": o = M_mem q; "attention": softmax attention over memory-made keys/values
    n_heads: int | None = None  # query heads (None: the model's)
    n_kv_heads: int | None = None  # memory heads = attention key/value heads (None: = n_heads)
    head_dim: int | None = None  # None: d_model // n_heads
    chunk_size: int = 64
    conv_size: int = 4  # short causal conv on the memory input u (and q with the memory read), as in Titans; 0: off
    position: str | None = None  # attention read: None = the model's position encoding
    rope_base: float | None = None
    rope_fraction: float | None = None
    alpha_init: tuple[float, float] = (0.99, 0.999)  # initial retention α per head (spread over heads)
    backend: str | None = None  # delta_rule backend

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("read", self.read, ("memory", "attention"))
        if self.chunk_size < 1 or self.conv_size < 0:
            raise ValueError(f"chunk_size={self.chunk_size} must be ≥ 1 and conv_size={self.conv_size} ≥ 0")
        if self.read == "memory" and self.n_kv_heads is not None and self.n_heads is not None \
                and self.n_kv_heads != self.n_heads:
            raise ValueError(f"read='memory' reads each memory head with its own query: n_kv_heads={self.n_kv_heads} "
                             f"must equal n_heads={self.n_heads} (GQA needs read='attention')")


@dataclass(frozen=True)
class HopeState(LayerState):
    """mem: [B, Hm, R, Dh] f32; pend: [B, C−1, Hm·Dh]; conv: [B, conv_size−1, channels]; pos, doc_start: [B];
    kv: KVState or None."""

    mem: Tensor
    pend: Tensor
    conv: Tensor
    pos: Tensor
    doc_start: Tensor
    kv: KVState | None = None


def dgd_step(M: Tensor, k: Tensor, v_hat: Tensor, eta: Tensor, alpha: Tensor) -> Tensor:
    """One delta-gradient-descent write, the specification: M (α I − η k kᵀ) − η (M k − v̂) kᵀ.

    M [..., R, Dh]; k [..., Dh] (unit); v_hat [..., R]; eta, alpha [...] -> M [..., R, Dh].
    """
    Mk = torch.einsum("...rd,...d->...r", M, k)
    a, e = alpha[..., None, None], eta[..., None, None]
    return a * M - e * Mk[..., :, None] * k[..., None, :] - e * (Mk - v_hat)[..., :, None] * k[..., None, :]


@register_mixer("hope", HopeConfig)
class Hope(Mixer):
    """Self-modifying matrix memories with delta-gradient-descent updates; x [B, T, D] -> [B, T, D]."""

    custom_init = True
    static_decode = True  # T = 1 keeps every state shape and never syncs (layers/static.py)

    def __init__(self, cfg: HopeConfig, model_cfg, layer_idx: int) -> None:
        super().__init__(cfg, model_cfg, layer_idx)
        d = model_cfg.d_model
        self.hq = cfg.n_heads or model_cfg.n_heads
        self.hm = cfg.n_kv_heads or self.hq
        if cfg.read == "memory" and self.hm != self.hq:
            raise ValueError(f"hope read='memory' needs n_kv_heads == n_heads, got {self.hm} and {self.hq}")
        self.dh = cfg.head_dim or d // self.hq
        self.C = cfg.chunk_size
        dh = self.dh
        # rows of the stacked memory: k, v, η, α (and mem for the memory read)
        self.rows = 2 * dh + 2 + (dh if cfg.read == "memory" else 0)
        self.u_proj = nn.Linear(d, self.hm * dh, bias=False)
        conv_ch = self.hm * dh + (self.hq * dh if cfg.read == "memory" else 0)
        self.conv = ShortConv(conv_ch, cfg.conv_size) if cfg.conv_size > 0 else None
        self.conv_ch = conv_ch
        self.mem_init = nn.Parameter(torch.empty(self.hm, self.rows, dh))
        self.eta_bias = nn.Parameter(torch.zeros(self.hm))
        self.alpha_bias = nn.Parameter(torch.zeros(self.hm))
        if cfg.read == "memory":
            self.q_proj = nn.Linear(d, self.hq * dh, bias=False)
            self.o_norm = RMSNorm(dh)
            self.o_proj = nn.Linear(self.hq * dh, d, bias=False)
        else:
            acfg = AttentionConfig(n_heads=self.hq, n_kv_heads=self.hm, head_dim=dh, position=cfg.position,
                                   rope_base=cfg.rope_base, rope_fraction=cfg.rope_fraction, fused_qkv=False)
            self.core = core_from_config(acfg, model_cfg)
            # keys and values come from the memories: the core's own k/v projections would be dead weights
            del self.core.k_proj, self.core.v_proj
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """M_k, M_v, M_mem start near the identity (so k ≈ v ≈ u and the targets M_□ v are informative), the η/α
        rows at zero; η starts at σ(0)·α/2 and α in ``alpha_init``. Runs after the generic init (seed defect 4)."""
        dh = self.dh
        with torch.no_grad():
            self.mem_init.normal_(0.0, 0.02)
            eye = torch.eye(dh)
            self.mem_init[:, :dh] += eye
            self.mem_init[:, dh: 2 * dh] += eye
            self.mem_init[:, 2 * dh: 2 * dh + 2] = 0.0
            if self.cfg.read == "memory":
                self.mem_init[:, 2 * dh + 2:] += eye
            self.eta_bias.zero_()
            lo, hi = self.cfg.alpha_init
            a = torch.linspace(lo, hi, self.hm) if self.hm > 1 else torch.tensor([hi])
            self.alpha_bias.copy_(torch.log(a / (1 - a)))

    # ------------------------------------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, device=None) -> HopeState:
        device = device or self.param_device()
        z = torch.zeros(batch_size, dtype=torch.long, device=device)
        mem = self.mem_init.detach().float().to(device).expand(batch_size, -1, -1, -1).clone()
        pend = torch.zeros(batch_size, self.C - 1, self.hm * self.dh, device=device, dtype=self.u_proj.weight.dtype)
        kv = None
        if self.cfg.read == "attention":
            kv = self.core.init_state(batch_size, device, self.core.o_proj.weight.dtype)
        conv = torch.zeros(batch_size, max(self.cfg.conv_size - 1, 0), self.conv_ch, device=device,
                           dtype=self.u_proj.weight.dtype)
        return HopeState(mem=mem, pend=pend, conv=conv, pos=z, doc_start=z.clone(), kv=kv)

    def static_state(self, state: HopeState, max_len: int) -> HopeState:
        return state if state.kv is None else dataclasses.replace(state, kv=self.core.static_kv(state.kv, max_len))

    def compact_state(self, state: HopeState) -> HopeState:
        return state if state.kv is None else dataclasses.replace(state, kv=self.core.compact_kv(state.kv))

    # --------------------------------------------------------------------------------------------- memory
    def produce(self, M0: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Quantities of a chunk from its starting memory (memlm.ops.hope_scan.reference.produce): M0 [B, Hm, R, Dh]
        f32, u [B, C, Hm, Dh] -> k, v [B, C, Hm, Dh] (raw), v̂ [B, C, Hm, R], β, g = log α [B, C, Hm]."""
        return produce(M0, u, self.eta_bias, self.alpha_bias)

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, state: HopeState | None = None, *, reset: Tensor | None = None,
                update: bool = True) -> tuple[Tensor, HopeState]:
        """x [B, T, D]; reset bool [B, T] -> (y [B, T, D], new state)."""
        B, T, _ = x.shape
        fresh = state is None  # a known-empty state: the chunk grid's size follows from T alone (no host sync)
        if state is None:
            state = self.init_state(B, device=x.device)
        lay = chunk_layout(state.pos, state.doc_start, reset, T, self.C, fresh=fresh)
        u = self.u_proj(x)
        if self.cfg.read == "memory":
            u = torch.cat([u, self.q_proj(x)], dim=-1)
        conv = state.conv
        if self.conv is not None:
            u, conv = self.conv(u, state.conv, reset)
        if self.cfg.read == "memory":
            u, q = u.split([self.hm * self.dh, self.hq * self.dh], dim=-1)
        ue = torch.cat([state.pend.to(u.dtype), u], dim=1)                 # [B, P+T, Hm·Dh]
        ug = gather_chunks(ue, lay).view(B, lay.N, self.C, self.hm, self.dh)
        qg = None
        if self.cfg.read == "memory":
            qe = torch.cat([q.new_zeros(B, self.C - 1, q.shape[-1]), q], dim=1)  # pending outputs are not re-emitted
            qg = gather_chunks(qe, lay).view(B, lay.N, self.C, self.hq, self.dh)
        M, reads, keys, vals = self._scan(state.mem, ug, qg, lay)
        if self.cfg.read == "memory":
            o = self.o_norm(gather_tokens(reads, lay).to(x.dtype))
            y = self.o_proj(o.reshape(B, T, self.hq * self.dh))
            kv = None
        else:
            k = gather_tokens(keys, lay).to(x.dtype).transpose(1, 2)   # [B, Hm, T, Dh]
            v = gather_tokens(vals, lay).to(x.dtype).transpose(1, 2)
            q = self.core.q_proj(x).view(B, T, self.hq, self.dh).transpose(1, 2)
            y, kv = self.core(x, state.kv, reset, update, qkv=(q, k, v), fresh=fresh)
        if not update:
            return y, state
        return y, HopeState(mem=M, pend=pending_tail(ue, lay).to(state.pend.dtype), conv=conv, pos=lay.pos,
                            doc_start=lay.doc_start, kv=kv)

    def _scan(self, mem: Tensor, ug: Tensor, qg: Tensor | None, lay: ChunkLayout
              ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """The walk over the chunks of the call (memlm.ops.hope_scan): memory after the call, reads, keys, values
        [B, N, C, ·]. A delta_rule backend named in the config keeps the chunk loop, which calls it."""
        return hope_scan(ug, qg, mem=mem, init=self.mem_init, eta_bias=self.eta_bias, alpha_bias=self.alpha_bias,
                         slot_valid=lay.slot_valid, starts_doc=lay.starts_doc, complete=lay.complete,
                         delta_backend=self.cfg.backend, backend="loop" if self.cfg.backend is not None else None)
