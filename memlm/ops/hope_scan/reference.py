"""HOPE's walk over chunks in PyTorch (backend "loop" of op "hope_scan"), and the per-chunk maths it is made of.

Notation (per memory head; B batch, N chunks, C chunk length, H memory heads, D head width, R = 2D + 2 (+ D with
the memory read) stacked rows M = [M_k; M_v; m_η; m_α (; M_mem)] ∈ R^{R×D}):
  produce  k = M_k u, v = M_v u, β = σ(m_η·u + b_η), g = log σ(m_α·u + b_α), v̂ = M⁰ (v/‖v‖)   (from the chunk-start M⁰)
  write    M ← α M (I − β k̂ k̂ᵀ) + β (½ α v̂) k̂ᵀ per token (α = e^g, k̂ = k/‖k‖), the gated delta rule on the stacked
           state, run in its parallel WY/UT form by memlm.ops.delta_rule (memlm.layers.hope's docstring).
Each chunk's quantities need the memory at its start, so the chunks run one after another: ~30 launches per chunk
forward, twice that backward. The "triton" backend (triton_scan.py) runs the same walk as one kernel per direction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memlm.layers.static import in_static_decode
from memlm.ops.delta_rule import delta_rule

__all__ = ["dgd_chunk", "hope_scan", "produce", "write"]


def produce(M0: Tensor, u: Tensor, eta_bias: Tensor, alpha_bias: Tensor
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Quantities of a chunk from its starting memory. M0 [B, H, R, D] f32, u [B, C, H, D], biases [H] ->
    k [B, C, H, D] (raw), v [B, C, H, D], v̂ [B, C, H, R] (every memory's target), β, g = log α [B, C, H]."""
    dh = M0.shape[-1]
    out = torch.einsum("bhrd,bchd->bchr", M0, u.to(M0.dtype))
    k, v = out[..., :dh], out[..., dh: 2 * dh]
    beta = torch.sigmoid(out[..., 2 * dh] + eta_bias.to(M0.dtype))
    g = F.logsigmoid(out[..., 2 * dh + 1] + alpha_bias.to(M0.dtype))
    # targets from the unit value: ‖v̂‖ ≤ ‖M⁰‖ whatever the scale of v, so a write neither shrinks the memory
    # towards zero (small v) nor inflates it (large v) — each memory stays on the scale of its initial value
    v_hat = torch.einsum("bhrd,bchd->bchr", M0, F.normalize(v, dim=-1))
    return k, v, v_hat, beta, g


def dgd_chunk(M0: Tensor, k: Tensor, v_hat: Tensor, beta: Tensor, g: Tensor, *, q: Tensor | None = None,
              backend: str | None = None) -> tuple[Tensor, Tensor]:
    """A chunk of DGD writes, every token's quantities given, with α = exp(g) and η = ½ α β.

    M0 [B, H, R, D] f32; k [B, C, H, D] unit keys; v_hat [B, C, H, R]; beta, g [B, C, H]; q [B, C, H, D] or None.
    Returns (o [B, C, H, R] = M_t q_t after token t's write (M_t k_t if q is None), M at the chunk end).
    Equal to C successive DGD steps: M(αI − η k kᵀ) − η(M k − v̂)kᵀ = α M (I − β k kᵀ) + β (½ α v̂) kᵀ, the gated
    delta rule, so the chunk runs in the WY/UT-parallel form of memlm.ops.delta_rule.
    """
    val = 0.5 * torch.exp(g)[..., None] * v_hat
    return delta_rule(k if q is None else q, k, val, beta, g, initial_state=M0, chunk_size=k.shape[1],
                      backend=backend)


def write(M0: Tensor, u: Tensor, q: Tensor | None, valid: Tensor, eta_bias: Tensor, alpha_bias: Tensor, *,
          backend: str | None = None) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """One chunk: M0 [B, H, R, D]; u, q [B, C, H, D]; valid [B, C] -> (M at the chunk end, memory read [B, C, H, D]
    or None, keys k and values v [B, C, H, D]). Empty slots write nothing."""
    dh = M0.shape[-1]
    k, v, v_hat, beta, g = produce(M0, u, eta_bias, alpha_bias)
    m = valid[..., None].float()
    kn = F.normalize(k, dim=-1) * m[..., None]
    qq = None if q is None else F.normalize(q.to(M0.dtype), dim=-1)
    o, M1 = dgd_chunk(M0, kn, v_hat, beta * m, g * m, q=qq, backend=backend)
    read = o[..., 2 * dh + 2:] if q is not None else None
    return M1, read, k, v


def hope_scan(u: Tensor, q: Tensor | None, *, mem: Tensor, init: Tensor, eta_bias: Tensor, alpha_bias: Tensor,
              slot_valid: Tensor, starts_doc: Tensor, complete: Tensor, delta_backend: str | None = None
              ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """The walk over a chunk grid (memlm.ops.compressive.segments.ChunkLayout), never over tokens.

    u [B, N, C, H, D] memory inputs (empty slots zero); q [B, N, C, H, D] queries of the memory read or None;
    mem [B, H, R, D] f32 memory at the call's start; init [H, R, D] learned initial memory (a chunk that starts a
    document restarts from it); biases [H]; slot_valid [B, N, C], starts_doc, complete [B, N] bool (only complete
    chunks commit their writes). Returns (memory after the last complete chunk [B, H, R, D], reads [B, N, C, H, D] or
    None, keys k and values v [B, N, C, H, D], raw as produced, for the attention read), all float32 (float64 when
    mem or init is).
    """
    wide = torch.promote_types(torch.promote_types(mem.dtype, init.dtype), torch.float32)  # float32, or float64 (tests)
    M = mem.to(wide)
    ini = init.to(wide)[None]
    reads, keys, vals = [], [], []
    for n in range(u.shape[1]):
        M0 = torch.where(starts_doc[:, n, None, None, None], ini, M)   # a document restarts the memory
        # a static step, a compiled graph or a training step always computes the write (no host sync, no graph
        # break; in training nearly every chunk completes, and a sync per chunk stalls the launch queue) and
        # commits it where the chunk completed; eager decode skips the write inside a chunk
        need_write = (q is not None or in_static_decode() or torch.compiler.is_compiling()
                      or torch.is_grad_enabled() or bool(complete[:, n].any()))
        if need_write:
            M1, read, k, v = write(M0, u[:, n], None if q is None else q[:, n], slot_valid[:, n], eta_bias,
                                   alpha_bias, backend=delta_backend)
            M = torch.where(complete[:, n, None, None, None], M1, M0)   # only complete chunks commit
            reads.append(read)
        else:  # decode inside a chunk with the attention read: only this token's k, v are needed
            k, v, *_ = produce(M0, u[:, n], eta_bias, alpha_bias)
            M = M0
        keys.append(k)
        vals.append(v)
    return M, (torch.stack(reads, 1) if q is not None else None), torch.stack(keys, 1), torch.stack(vals, 1)
