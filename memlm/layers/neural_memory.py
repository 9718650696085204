"""Neural memory mixer (Titans, arXiv 2501.00663; Atlas, arXiv 2505.23735) and its hybrids with sliding-window
attention: MAG (memory as a gate) and MAL (memory as a layer). See docs/layers/neural_memory.md and docs/layers/mag.md.

Notation: B batch, T tokens, D model width, H memory heads, K = Dk = Dv memory head width, E = expansion·K hidden
width, F memory input width (K, or K + K(K+1)/2 with poly features), C chunk, c Omega window (≤ C), P = C − 1
pending slots, W = (W1 [E, F], W2 [K, E]) fast weights, S their momenta, g MAG gate values [B, T, D].

  q, k, v = SiLU(conv(W_qkv x)) per head (short causal depthwise conv);  q, k, v ← q/‖q‖, k/‖k‖, v/‖v‖
      (unit values too: the inner loss stays bounded, so the inner GD cannot be driven to diverge)
  γ = σ(W_γ x + b_γ)   η = σ(W_η x + b_η)   θ = (θ_max / c) · σ(W_θ x + b_θ)   α = σ(W_α x + b_α)      [B, T, H]
  per chunk j (memlm.ops.neural_memory): o_t = M_{W_j}(q_t);  S ← η S − θ ∇ Σ_{last c} γ_i ‖M_W(k_i) − v_i‖²,
      W_{j+1} = (1 − α) W + U(S),  U = identity ("momentum", Titans) or Newton–Schulz-5 ("muon", Atlas)
  y = W_o [ RMSNorm_head(o) ⊙ SiLU(W_g x) ]
  MAG: y = SWA(x) ⊙ g,  g = σ(RMSNorm(memory(x)));   MAL: m = memory(x),  y = m + SWA(RMSNorm(x + m))

Chunks are document-aligned (memlm.ops.compressive.segments): every document starts a chunk whose tokens read the
learned initial weights W_init (parameters, so they are trained on every document) and whose write starts from
(W_init, S = 0). The tokens of the open chunk wait in the state's pending buffer (their k, v and gates) and are
written when the chunk completes, in training and decoding alike, so any split of a stream gives the same result.
Test-time learning never looks at ``self.training``: eval mode writes exactly as training does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.config.base import check_choice
from memlm.layers.attention import AttentionConfig, KVState, core_from_config
from memlm.layers.base import (
    LayerState,
    Mixer,
    MixerConfig,
    add_aux_loss,
    add_metric,
    aux_active,
    current_step_tensor,
    register_mixer,
)
from memlm.layers.norm import RMSNorm
from memlm.layers.shortconv import ShortConv
from memlm.layers.static import in_static_decode, no_host_sync
from memlm.ops import dispatch
from memlm.ops.compressive.segments import chunk_layout, gather_chunks, gather_tokens, pending_tail
from memlm.ops.neural_memory import feature_dim, memory_read, poly_features
from memlm.ops.neural_memory.step import decode_step

__all__ = ["MAG", "MAL", "HybridState", "MAGConfig", "MALConfig", "NeuralMemory", "NeuralMemoryConfig",
           "NeuralMemoryLayerState", "polarization_weight"]


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@dataclass(kw_only=True)
class NeuralMemoryConfig(MixerConfig):
    kind: str = "neural_memory"
    n_heads: int | None = None  # memory heads H (None: the model's n_heads)
    head_dim: int | None = None  # K = Dk = Dv (None: d_model // H)
    expansion: float = 4.0  # E = expansion · K
    chunk_size: int = 64  # C: one inner step per chunk
    omega_window: int | None = None  # c ≤ C: the last c tokens of a chunk enter its objective (None: C, every token)
    optimizer: str = "momentum"  # "momentum" (Titans) or "muon" (Atlas: Newton–Schulz-5 on the momentum)
    poly: bool = False  # degree-2 polynomial features on keys and queries (Atlas)
    conv_size: int = 4  # short causal conv on q, k, v (0: off)
    # θ = (θ_max / c) · σ(·): the objective sums c tokens whose keys may coincide (curvature up to ~2c), so a per-token
    # step ≤ θ_max / c keeps plain GD stable whatever the outer training does to the gate. (Muon's step is NS5's.)
    theta_max: float = 1.0
    theta_init: float = 0.3
    gamma_init: float = 0.9  # initial γ (Omega gate), η (momentum), α (forgetting per chunk)
    eta_init: float = 0.5
    alpha_init: float = 0.02
    backend: str | None = None  # neural_memory op backend (None: dispatch decides)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("optimizer", self.optimizer, ("momentum", "muon"))
        if self.chunk_size < 1 or self.expansion <= 0 or self.conv_size < 0:
            raise ValueError(f"chunk_size={self.chunk_size} must be ≥ 1, expansion={self.expansion} > 0, "
                             f"conv_size={self.conv_size} ≥ 0")
        if self.omega_window is not None and not 1 <= self.omega_window <= self.chunk_size:
            raise ValueError(f"omega_window={self.omega_window} must be in [1, chunk_size={self.chunk_size}]")
        for n in ("gamma_init", "eta_init", "alpha_init"):
            if not 0.0 < getattr(self, n) < 1.0:
                raise ValueError(f"{n}={getattr(self, n)} must be in (0, 1)")
        if not 0.0 < self.theta_init < self.theta_max:
            raise ValueError(f"theta_init={self.theta_init} must be in (0, theta_max={self.theta_max})")


@dataclass(kw_only=True)
class _HybridConfig(NeuralMemoryConfig):
    """Memory fields (inherited) + the sliding-window attention branch + the memory switch."""

    memory: bool = True  # False: the attention-only ablation (also model.memory_off=true for every layer)
    window: int | None = 512  # SWA window (a token sees itself and window−1 before it); None: full attention
    n_persistent: int = 16  # learned persistent key/value tokens prepended to the attention keys
    attn_heads: int | None = None  # None: the model's n_heads
    attn_kv_heads: int | None = None  # None: = attn_heads
    attn_head_dim: int | None = None  # None: d_model // attn_heads
    position: str | None = None  # None: the model's position encoding


@dataclass(kw_only=True)
class MAGConfig(_HybridConfig):
    kind: str = "mag"
    # gate polarization λ(step)·mean(1 − |2g − 1|): linear warm-up, hold, then halving every polar_decay steps
    polar_weight: float = 0.01
    polar_warmup: int = 100
    polar_hold: int = 1000
    polar_decay: int = 1000  # half-life in steps (0: no decay)
    gate_bins: int = 10  # histogram bins of the gate values reported as metric gate_hist/layer{i}


@dataclass(kw_only=True)
class MALConfig(_HybridConfig):
    kind: str = "mal"


@dataclass(frozen=True)
class NeuralMemoryLayerState(LayerState):
    """W1 [B, H, E, F], W2 [B, H, K, E], S1, S2 alike (float32; the weights at the start of the open chunk);
    pend [B, P, H(2K+4)] float32 (k, v, γ, η, θ, α of the open chunk's tokens, right-aligned); conv [B, conv−1, 3HK];
    pos, doc_start [B] (stream position and current document start, which place the chunk boundaries)."""

    W1: Tensor
    W2: Tensor
    S1: Tensor
    S2: Tensor
    pend: Tensor
    conv: Tensor
    pos: Tensor
    doc_start: Tensor


@dataclass(frozen=True)
class HybridState(LayerState):
    """kv: the sliding-window KV ring (attention.KVState); mem: NeuralMemoryLayerState or None (memory off)."""

    kv: KVState
    mem: NeuralMemoryLayerState | None


@register_mixer("neural_memory", NeuralMemoryConfig)
class NeuralMemory(Mixer):
    """MLP fast-weight memory that learns at test time (x [B, T, D] -> y [B, T, D])."""

    custom_init = True  # W_init and the gate biases are set by reset_parameters after the generic init (defect 4)
    static_decode = True

    def __init__(self, cfg: NeuralMemoryConfig, model_cfg, layer_idx: int) -> None:
        super().__init__(cfg, model_cfg, layer_idx)
        d = model_cfg.d_model
        self.h = H = cfg.n_heads or model_cfg.n_heads
        self.dk = K = cfg.head_dim or d // H
        self.e = E = max(1, round(cfg.expansion * K))
        self.f = Fd = feature_dim(K, cfg.poly)
        self.C, self.c = cfg.chunk_size, cfg.omega_window or cfg.chunk_size
        self.qkv = nn.Linear(d, 3 * H * K, bias=False)
        # the conv also L2-normalises each head's q, k, v (norm_group K): one fused kernel on CUDA (ops/short_conv.py)
        self.conv = ShortConv(3 * H * K, cfg.conv_size, norm_group=K) if cfg.conv_size > 0 else None
        self.gates = nn.Linear(d, 4 * H, bias=True)  # γ, η, θ, α pre-activations per head
        self.W1_init = nn.Parameter(torch.empty(H, E, Fd))
        self.W2_init = nn.Parameter(torch.empty(H, K, E))
        self.o_norm = RMSNorm(K)
        self.g_proj = nn.Linear(d, H * K, bias=False)
        self.o_proj = nn.Linear(H * K, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W1_init ~ N(0, 1/K): pre-activations of unit-norm keys start at std 1/√K ≈ the GELU's near-linear range;
        W2_init ~ N(0, 1/E): a small update to the identity residual. Gate biases give the configured initial γ, η,
        α and θ."""
        H, cfg = self.h, self.cfg
        with torch.no_grad():
            self.W1_init.normal_(0.0, self.dk ** -0.5)
            self.W2_init.normal_(0.0, self.e ** -0.5)
            b = self.gates.bias.view(4, H)
            b[0].fill_(_logit(cfg.gamma_init))
            b[1].fill_(_logit(cfg.eta_init))
            b[2].fill_(_logit(cfg.theta_init / cfg.theta_max))
            b[3].fill_(_logit(cfg.alpha_init))

    def init_state(self, batch_size: int, *, device=None) -> NeuralMemoryLayerState:
        device = device or self.param_device()
        B, H, K = batch_size, self.h, self.dk
        w = {"device": device, "dtype": torch.float32}
        W1 = self.W1_init.detach().to(**w).expand(B, -1, -1, -1).clone()
        W2 = self.W2_init.detach().to(**w).expand(B, -1, -1, -1).clone()
        conv = torch.zeros(B, max(self.cfg.conv_size - 1, 0), 3 * H * K, device=device, dtype=self.qkv.weight.dtype)
        z = torch.zeros(B, dtype=torch.long, device=device)
        return NeuralMemoryLayerState(W1=W1, W2=W2, S1=torch.zeros_like(W1), S2=torch.zeros_like(W2),
                                      pend=torch.zeros(B, self.C - 1, H * (2 * K + 4), **w), conv=conv, pos=z,
                                      doc_start=z.clone())

    def inputs(self, x: Tensor, conv: Tensor, reset: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x [B, T, D] -> q, k, v [B, T, H, K], gates [B, T, H, 4] (γ, η, θ, α; float32), new conv cache."""
        B, T, _ = x.shape
        qkv = self.qkv(x)
        # normalised in float32 and cast back to the projection's (the autocast) dtype, so that bf16 training reaches
        # the op in bf16 (its Triton kernels then take TF32 dots: triton_memory.HALF_DOT_PRECISION)
        if self.conv is not None:
            qkv, conv = self.conv(qkv, conv, reset)                      # SiLU(conv) and the per-head norm
        else:
            qkv = F.normalize(F.silu(qkv).float().unflatten(-1, (-1, self.dk)), dim=-1).flatten(-2).to(qkv.dtype)
        q, k, v = (t.reshape(B, T, self.h, self.dk) for t in qkv.chunk(3, dim=-1))
        a = self.gates(x).float().view(B, T, 4, self.h).transpose(2, 3)   # [B, T, H, 4]
        gates = torch.stack([torch.sigmoid(a[..., 0]), torch.sigmoid(a[..., 1]),
                             self.cfg.theta_max / self.c * torch.sigmoid(a[..., 2]), torch.sigmoid(a[..., 3])], dim=-1)
        return q, k, v, gates, conv

    def _op(self, q: Tensor, k: Tensor, v: Tensor, gates: Tensor, W: tuple, *, reset: Tensor | None,
            update: bool, commit: Tensor | None = None, aligned: bool = False) -> tuple[Tensor, tuple]:
        kw = {"chunk_size": self.C, "window": self.c, "optimizer": self.cfg.optimizer, "update": update,
              "poly": self.cfg.poly, "reset": reset, "W1_init": self.W1_init, "W2_init": self.W2_init,
              "commit": commit, "chunk_aligned_resets": aligned}
        args = (q, k, v, *gates.unbind(-1), *W)
        o, st = dispatch.get("neural_memory", self.cfg.backend, args=args, kwargs=kw)(*args, **kw)
        return o, (st.W1, st.W2, st.S1, st.S2)

    def forward(self, x: Tensor, state: NeuralMemoryLayerState | None = None, *, reset: Tensor | None = None,
                update: bool = True) -> tuple[Tensor, NeuralMemoryLayerState]:
        """x [B, T, D]; reset bool [B, T] -> (y [B, T, D], new state)."""
        B, T, _ = x.shape
        fresh = state is None  # a known-empty state: the chunk grid's size follows from T alone (no host sync)
        if state is None:
            state = self.init_state(B, device=x.device)
        q, k, v, gates, conv = self.inputs(x, state.conv, reset)
        W = (state.W1, state.W2, state.S1, state.S2)
        if T == 1 and in_static_decode():   # fixed shapes, no host sync (layers/static.py; ops/neural_memory/step.py)
            o, W, pend, pos, doc = decode_step(q, k, v, gates, W, state.pend, state.pos, state.doc_start, reset,
                                               chunk_size=self.C, window=self.c, optimizer=self.cfg.optimizer,
                                               poly=self.cfg.poly, W1_init=self.W1_init, W2_init=self.W2_init,
                                               update=update)
            new_state = NeuralMemoryLayerState(*W, pend=pend, conv=conv if update else state.conv, pos=pos,
                                               doc_start=doc)
        elif not update:  # every token reads the weights of the open chunk (W_init after a reset); nothing is written
            o, _ = self._op(q, k, v, gates, W, reset=reset, update=False)
            new_state = state
        else:
            o, new_state = self._write(q, k, v, gates, state, W, conv, reset, fresh)
        o = self.o_norm(o.to(x.dtype)) * F.silu(self.g_proj(x)).view(B, T, self.h, self.dk)
        return self.o_proj(o.reshape(B, T, self.h * self.dk)), new_state

    def _write(self, q: Tensor, k: Tensor, v: Tensor, gates: Tensor, state: NeuralMemoryLayerState, W: tuple,
               conv: Tensor, reset: Tensor | None, fresh: bool = False) -> tuple[Tensor, NeuralMemoryLayerState]:
        """Document-aligned chunk grid [B, N, C] of [pending; new tokens], fed to the op as a stream of N·C tokens
        with a reset on the first slot of every chunk that starts a document.

        A call of at least C tokens (training, prefill) is one op call over the whole grid: the op writes every chunk,
        also a document's incomplete last chunk and a row's empty trailing ones, but no write of those reaches a read
        (the next chunk of the row starts a document from W_init, or there is none), and each row's state is the one
        after its last complete chunk (the op's ``commit``), or the initial one when a document started after it.
        A shorter call (decoding) writes only where a chunk completes: an op call of the complete leading chunks, then
        chunk by chunk. With a static layout (N from shapes: no host sync, no torch.compile graph break) that split
        comes from shapes too (lay.min_complete), and in a compiled graph every chunk-by-chunk call writes; rows keep
        the write only where their chunk completed, so outputs and states are the same."""
        B, T, H, K = q.shape
        C = self.C
        lay = chunk_layout(state.pos, state.doc_start, reset, T, C, fresh=fresh)
        N = lay.N
        if lay.identity:   # the grid is the new tokens (a fresh state, whole chunks, one document a row): no copies;
            # nothing is pending after it, and pending_tail reads only the shape of what it is given
            ext, qg, kg, vg, gg = state.pend, q, k.float(), v.float(), gates
        else:
            tok = torch.cat([k.float(), v.float(), gates], dim=-1).reshape(B, T, H * (2 * K + 4))
            ext = torch.cat([state.pend, tok], dim=1)                                # [B, P+T, H(2K+4)]
            grid = gather_chunks(ext, lay).view(B, N * C, H, 2 * K + 4)
            qe = torch.cat([q.new_zeros(B, C - 1, H * K), q.reshape(B, T, H * K)], dim=1)  # pending reads not redone
            qg = gather_chunks(qe, lay).view(B, N * C, H, K)
            kg, vg, gg = grid[..., :K], grid[..., K:2 * K], grid[..., 2 * K:]
        rs = torch.zeros(B, N, C, dtype=torch.bool, device=q.device)
        rs[:, :, 0] = lay.starts_doc
        rs = rs.view(B, N * C)
        complete, starts = lay.complete, lay.starts_doc
        inits = (self.W1_init.float(), self.W2_init.float(), torch.zeros_like(W[2]), torch.zeros_like(W[3]))
        if T >= C:
            idx = torch.arange(N, device=q.device)
            commit = torch.where(complete, idx + 1, 0).amax(1)           # [B] 1 + the row's last complete chunk
            o, W = self._op(qg, kg, vg, gg, W, reset=rs, update=True, commit=commit, aligned=True)
            restart = (starts & (idx >= commit[:, None])).any(1).view(B, 1, 1, 1)  # a document opened after it
            W = tuple(torch.where(restart, wi, w) for wi, w in zip(inits, W))
            return self._finish(o, kg, vg, gg, W, complete, starts, ext, lay, conv)
        if lay.static:
            m = lay.min_complete
        else:
            full = complete.all(0).tolist()
            m = full.index(False) if False in full else N   # leading chunks complete in every row: one op call
        outs = []
        if m:
            s = slice(0, m * C)
            o, W = self._op(qg[:, s], kg[:, s], vg[:, s], gg[:, s], W, reset=rs[:, s], update=True, aligned=True)
            outs.append(o)
        for j in range(m, N):   # the rest chunk by chunk, committing each row's write only where its chunk completed
            s = slice(j * C, j * C + C)
            upd = no_host_sync() or bool(complete[:, j].any())  # compiled / captured: always write, no sync
            o, Wn = self._op(qg[:, s], kg[:, s], vg[:, s], gg[:, s], W, reset=rs[:, s], update=upd, aligned=True)
            sel, st = complete[:, j].view(B, 1, 1, 1), starts[:, j].view(B, 1, 1, 1)
            W = tuple(torch.where(sel, wn, torch.where(st, wi, w)) for wn, wi, w in zip(Wn, inits, W))
            outs.append(o)
        return self._finish(torch.cat(outs, dim=1), kg, vg, gg, W, complete, starts, ext, lay, conv)

    def _finish(self, o: Tensor, kg: Tensor, vg: Tensor, gg: Tensor, W: tuple, complete: Tensor, starts: Tensor,
                ext: Tensor, lay, conv: Tensor) -> tuple[Tensor, NeuralMemoryLayerState]:
        """The grid's reads o [B, N·C, H, K] back in token order [B, T, H, K], and the new state."""
        B, T = lay.tok_idx.shape
        o = gather_tokens(o.reshape(B, lay.N, lay.C, -1), lay).view(B, T, self.h, self.dk)
        if aux_active():
            self._report_inner_loss(kg, vg, gg, W, complete, starts)
        new = NeuralMemoryLayerState(W1=W[0], W2=W[1], S1=W[2], S2=W[3], pend=pending_tail(ext, lay), conv=conv,
                                     pos=lay.pos, doc_start=lay.doc_start)
        return o, new

    @torch.no_grad()
    def _report_inner_loss(self, kg: Tensor, vg: Tensor, gg: Tensor, W: tuple, complete: Tensor,
                           starts: Tensor) -> None:
        """Metric inner_loss/layer{i}: the γ-weighted Omega loss Σγ‖M_W(k) − v‖² / Σγ of the last chunk written in
        this call, under the weights right after its write; inner_loss_init/layer{i}: the same under W_init (what the
        memory would answer without test-time learning). Both are means over the rows that qualify, computed with
        masks (no data-dependent shapes: torch.compile traces it whole); eager mode reports nothing when no row
        qualifies (no chunk completed), a compiled graph or a captured CUDA graph reports 0 then."""
        B, N = complete.shape
        C, c = self.C, self.c
        idx = torch.arange(N, device=complete.device)
        j = torch.where(complete.any(0), idx, -1).max()                          # last chunk written (−1: none)
        jj = j.clamp_min(0)
        later = starts & (idx > j)                                               # [B, N] documents started after j
        done_j = complete.gather(1, jj.expand(B, 1))[:, 0]                      # [B] (a gather: no host read of j)
        rows = done_j & (j >= 0) & ~later.any(1)                                # rows whose final W is chunk j's write
        if not no_host_sync() and not bool(rows.any()):
            return
        s = jj * C + C - c + torch.arange(c, device=kg.device)                 # its last c slots (the window)
        k, v, g = kg[:, s].transpose(1, 2), vg[:, s].transpose(1, 2), gg[:, s, :, 0].transpose(1, 2)
        x = poly_features(k) if self.cfg.poly else k
        w = rows.float()
        n = w.sum().clamp_min(1.0)

        def loss(W1: Tensor, W2: Tensor) -> Tensor:
            err = (memory_read(W1, W2, x, k) - v).square().sum(-1)              # [B, H, c]
            per_row = ((g * err).sum(-1) / g.sum(-1).clamp_min(1e-6)).mean(-1)  # [B]
            return (per_row * w).sum() / n

        add_metric(f"inner_loss/layer{self.layer_idx}", loss(W[0], W[1]))
        init = loss(self.W1_init.float()[None], self.W2_init.float()[None])
        add_metric(f"inner_loss_init/layer{self.layer_idx}", init)


def polarization_weight(step: int | Tensor | None, weight: float, warmup: int, hold: int,
                        half_life: int) -> float | Tensor:
    """λ(step): linear warm-up to ``weight`` over ``warmup`` steps, ``hold`` steps at ``weight``, then halving every
    ``half_life`` steps (0: never). step None (no trainer step known) gives ``weight``. A tensor step (a float64
    scalar, ``current_step_tensor``) gives the same schedule as a tensor: a compiled graph then reads the step as an
    input instead of specialising on its value (one recompile per step)."""
    if step is None or weight == 0.0:
        return weight
    if isinstance(step, Tensor):
        s = step - warmup - hold
        decayed = weight * 0.5 ** (s.clamp_min(0) / half_life) if half_life > 0 else torch.full_like(step, weight)
        return torch.where(step < warmup, weight * (step + 1) / max(warmup, 1), torch.where(s <= 0, weight, decayed))
    if step < warmup:
        return weight * (step + 1) / warmup
    s = step - warmup - hold
    if s <= 0 or half_life <= 0:
        return weight
    return weight * 0.5 ** (s / half_life)


class _Hybrid(Mixer):
    """Sliding-window attention (with persistent memory tokens) next to a NeuralMemory branch."""

    def __init__(self, cfg: _HybridConfig, model_cfg, layer_idx: int) -> None:
        super().__init__(cfg, model_cfg, layer_idx)
        acfg = AttentionConfig(n_heads=cfg.attn_heads, n_kv_heads=cfg.attn_kv_heads, head_dim=cfg.attn_head_dim,
                               window=cfg.window, position=cfg.position, n_persistent=cfg.n_persistent)
        self.core = core_from_config(acfg, model_cfg)
        on = cfg.memory and not getattr(model_cfg, "memory_off", False)
        self.memory = NeuralMemory(cfg, model_cfg, layer_idx) if on else None

    static_decode = True

    def static_state(self, state: HybridState, max_len: int) -> HybridState:
        return HybridState(kv=self.core.static_kv(state.kv, max_len), mem=state.mem)

    def compact_state(self, state: HybridState) -> HybridState:
        return HybridState(kv=self.core.compact_kv(state.kv), mem=state.mem)

    def init_state(self, batch_size: int, *, device=None) -> HybridState:
        p = self.core.o_proj.weight
        kv = self.core.init_state(batch_size, device or p.device, p.dtype)
        mem = self.memory.init_state(batch_size, device=device or p.device) if self.memory is not None else None
        return HybridState(kv=kv, mem=mem)


@register_mixer("mag", MAGConfig)
class MAG(_Hybrid):
    """Memory as a gate: y = SWA(x) ⊙ σ(RMSNorm(memory(x))) (x [B, T, D] -> y [B, T, D])."""

    def __init__(self, cfg: MAGConfig, model_cfg, layer_idx: int) -> None:
        super().__init__(cfg, model_cfg, layer_idx)
        self.gate_norm = RMSNorm(model_cfg.d_model) if self.memory is not None else None

    def forward(self, x: Tensor, state: HybridState | None = None, *, reset: Tensor | None = None,
                update: bool = True) -> tuple[Tensor, HybridState]:
        fresh = state is None  # the memory gets None too: it then knows its state is empty without reading it
        if state is None:
            state = self.init_state(x.shape[0], device=x.device)
        a, kv = self.core(x, state.kv, reset, update, fresh=fresh)
        if self.memory is None:
            return a, HybridState(kv=kv, mem=None)
        m, mem = self.memory(x, None if fresh else state.mem, reset=reset, update=update)
        g = torch.sigmoid(self.gate_norm(m))
        if aux_active():
            self._report_gate(g)
        return a * g, HybridState(kv=kv, mem=mem)

    def _report_gate(self, g: Tensor) -> None:
        cfg = self.cfg
        if cfg.polar_weight > 0:  # λ(step) > 0 for every step then
            lam = polarization_weight(current_step_tensor(), cfg.polar_weight, cfg.polar_warmup, cfg.polar_hold,
                                      cfg.polar_decay)
            # a float64 scalar rounded once to float32 (as a Python float would be). On the CPU it stays there (a 0-dim
            # CPU tensor multiplies a CUDA one as a scalar, without a copy); a CUDA graph's step tensor is on the device
            lam = lam.to(torch.float32) if isinstance(lam, Tensor) else lam
            add_aux_loss("gate_polarization", lam * (1.0 - (2.0 * g.float() - 1.0).abs()).mean())
        gd = g.detach().float()
        add_metric(f"gate_hist/layer{self.layer_idx}", torch.histc(gd, bins=cfg.gate_bins, min=0.0, max=1.0))
        add_metric(f"gate_mean/layer{self.layer_idx}", gd.mean())


@register_mixer("mal", MALConfig)
class MAL(_Hybrid):
    """Memory as a layer: m = memory(x); y = m + SWA(RMSNorm(x + m)) — with the block's residual this is a memory
    sublayer followed by an attention sublayer (x [B, T, D] -> y [B, T, D])."""

    def __init__(self, cfg: MALConfig, model_cfg, layer_idx: int) -> None:
        super().__init__(cfg, model_cfg, layer_idx)
        self.attn_norm = RMSNorm(model_cfg.d_model) if self.memory is not None else None

    def forward(self, x: Tensor, state: HybridState | None = None, *, reset: Tensor | None = None,
                update: bool = True) -> tuple[Tensor, HybridState]:
        fresh = state is None  # the memory gets None too: it then knows its state is empty without reading it
        if state is None:
            state = self.init_state(x.shape[0], device=x.device)
        if self.memory is None:
            a, kv = self.core(x, state.kv, reset, update, fresh=fresh)
            return a, HybridState(kv=kv, mem=None)
        m, mem = self.memory(x, None if fresh else state.mem, reset=reset, update=update)
        a, kv = self.core(self.attn_norm(x + m), state.kv, reset, update, fresh=fresh)
        return m + a, HybridState(kv=kv, mem=mem)
