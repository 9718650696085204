"""HOPE's walk over chunks as one Triton kernel per direction: backend "triton" of op "hope_scan" (both reads).

Same contract and notation as reference.py. One program per batch·head walks all N chunks with the stacked memory
in registers, as tiles M_k, M_v [D, D] and rows m_η, m_α [D] (and M_mem [D, D] with the memory read). Per chunk (C
tokens, all from the chunk-start M⁰):

  produce  k = u M_kᵀ, v = u M_vᵀ, β = m σ(u·m_η + b_η), g = m log σ(u·m_α + b_α)     (m: the slot is valid)
           k̂ = m k/‖k‖, v̂ = (v/‖v‖) M⁰ᵀ,  val = ½ e^g v̂
  write    G = cumsum g, Γ_ij = e^{G_i − G_j} (i ≥ j), A = (β ⊙rows k̂ k̂ᵀ) ⊙ Γ strictly lower, X = (I + A)⁻¹
           Ũ = X (β val) − X (β e^G ⊙ k̂) M⁰ᵀ,   M¹ = e^{G_{C−1}} M⁰ + Ũᵀ (e^{G_{C−1} − G} ⊙ k̂)
  read     (q given; constexpr READ) o_t = M_t q̂_t after token t's write, q̂ = q/max(‖q‖, ε), rows M_mem only:
           read = (γ ⊙ q̂ + Pq Z) M⁰_memᵀ, Pq = (q̂ k̂ᵀ) ⊙ Γ (i ≥ j, diagonal included), Ũ = Z M⁰ᵀ (NOTES.md §2);
           every slot gets its read, empty ones and those of an incomplete chunk included (as the loop)
  commit   M ← M¹ if the chunk is complete, else M⁰; a chunk that starts a document first sets M⁰ = M_init

The forward saves every chunk-start memory (B·N·H·R·D float32: 33 KB per chunk and head at D = 64, 49 KB with the
read); the backward walks the chunks in reverse from them, recomputes the chunk's quantities (and Pq, the read's Yq)
and carries ∂L/∂M. Against the loop (≈ 30 launches per chunk forward, ≈ 60 backward, 32 chunks × 6 layers per onyx-11m
step) this is two launches per layer. Without q the READ lines compile away (same PTX as before the read existed).

The inverse X is formed as in memlm.ops.delta_rule.triton_fused (products of 16-block Neumann factors, in registers);
its lines are repeated here because a kernel may only call jitted helpers, which the interpreter tests cannot run.
Dots are IEEE for float32 inputs (the 1e-5 tests) and TF32 for bf16/fp16 ones; state and accumulation are float32.
Limits (else the loop runs): chunk_size ∈ {16, 32, 64}, head width ≤ 64, queries shaped as u (NOTES.md §6: the read's
backward at D 64 uses 212 KB of an H100 block's 227 KB of shared memory).
CPU tensors run through the Triton interpreter when TRITON_INTERPRET=1 (tests without a GPU).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from memlm.ops.triton_common import interpreting, tl, triton  # None, None without Triton
from memlm.ops.triton_common import loop_count as _count

__all__ = ["CHUNKS", "MAX_DIM", "hope_scan", "supports"]

CHUNKS = (16, 32, 64)
MAX_DIM = 64
# float32 inputs on CUDA (IEEE dots): at D = 64 the backward needs 256 KB of shared memory (an H100 block has 227 KB),
# so float32 stays on the loop; the GPU tests switch this on at D ≤ 32 to pin the kernels at fp32 tolerance.
FP32 = False
EPS = 1e-12      # F.normalize's
BLK = tl.constexpr(16) if tl is not None else 16   # diagonal blocks of the inverse
LOG_BLK = tl.constexpr(4) if tl is not None else 4
# num_warps of the forward and backward kernels, without and with the memory read. One program per batch·head (16–32
# programs for onyx-11m) leaves most SMs idle, so a program may use many warps; the backward holds ~12 [64, 64] float32
# tiles live (~15 with the read). The read's are the attention read's, not measured on a GPU (ptxas: NOTES.md §6).
WARPS = {"fwd": 4, "bwd": 8, "fwd_read": 4, "bwd_read": 8}


def supports(u: Tensor, q: Tensor | None, *, mem: Tensor, **_: object) -> bool:
    """CUDA bf16/fp16 inputs u (float32 ones when FP32 and D ≤ 32), or CPU float32 under TRITON_INTERPRET=1; Triton
    importable, C ∈ CHUNKS, D ≤ MAX_DIM; a memory read's queries q shaped as u, on its device, of a floating dtype
    (then R = 3D + 2 rows, else 2D + 2)."""
    if triton is None or u.dim() != 5:
        return False
    D = u.shape[-1]
    if q is not None and (q.shape != u.shape or q.device != u.device or not q.is_floating_point()):
        return False
    if u.is_cuda:
        if u.dtype not in (torch.bfloat16, torch.float16) and not (FP32 and D <= 32):
            return False
    elif not (u.device.type == "cpu" and interpreting()):
        return False
    return u.shape[2] in CHUNKS and D <= MAX_DIM and mem.shape[-2] == (2 * D + 2 if q is None else 3 * D + 2)


# ------------------------------------------------------------------------------------------------------ kernels
# Plain functions made kernels in `_build`. Only builtins inside (tl.full, tl.reduce / tl.associative_scan with the
# sum combiner, exp/log for σ): jitted helpers (tl.sum, tl.sigmoid, …) only interpret when TRITON_INTERPRET was set
# before `import triton`.
# Layouts (contiguous): U, Qin [B, N, C, H, D] (u's and q's dtype); Valid int8 [B, N, C]; Start, Comp int8 [B, N];
# float32: Init [H, R, D], EB, AB [H], Mst [B, H, R, D] (running memory, in place), Kout, Vout, Rout [B, N, C, H, D];
# saved for the backward: Mpre [B, N, H, R, D] (chunk-start memories), Xs [B, N, H, C, C], Zs [B, N, H, C, D],
# Qs [B, N, H, D, D]. Row offsets inside one [R, D] memory: M_k rows 0..D−1, M_v D..2D−1, m_η 2D, m_α 2D + 1, and
# with READ M_mem 2D + 2..3D + 1 (R = 3D + 2).
#
# The write as one matrix: the targets are v̂ = M⁰ v̂n, so Ũ = X (bw ⊙ v̂n) M⁰ᵀ − X (βγ ⊙ k̂) M⁰ᵀ = Z M⁰ᵀ with
# Z = X (bw ⊙ v̂n − βγ ⊙ k̂) [C, D], and M¹ = γ_{C−1} M⁰ + Ũᵀ Ke = M⁰ P, P = γ_{C−1} I + Q, Q = Zᵀ Ke [D, D]: every row
# block of the memory is multiplied by the same P (two dots for the write, 17 instead of 29 in the backward).
# The read the same way: the delta rule's outputs are O = (γ ⊙ q̂) M⁰ᵀ + Pq Ũ = (γ ⊙ q̂ + Pq Z) M⁰ᵀ = Yq M⁰ᵀ, and
# the read keeps the M_mem rows, Yq M_memᵀ (three dots, one more for M_mem's commit; backward NOTES.md §6).

def _hope_fwd(U, Qin, Valid, Start, Comp, Init, EB, AB, Mst, Mpre, Xs, Zs, Qs, Kout, Vout, Rout,
              H, N, D, save,
              C: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, NB_ROUNDS: tl.constexpr, EPS: tl.constexpr,
              READ: tl.constexpr):
    """READ: the memory read (Qin [B, N, C, H, D] queries, Rout [B, N, C, H, D] float32 reads, rows M_mem in M);
    without it Qin and Rout are never touched."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    R = 2 * D + 2
    if READ:
        R = 3 * D + 2
    rc = tl.arange(0, C)
    rd = tl.arange(0, BD)
    md = rd < D
    m_dd = md[:, None] & md[None, :]
    off_k = rd[:, None] * D + rd[None, :]
    off_v = off_k + D * D
    off_e = 2 * D * D + rd
    off_a = off_e + D
    off_m = off_k + (2 * D + 2) * D
    st = bh * R * D
    ini = h * R * D
    Mk = tl.load(Mst + st + off_k, mask=m_dd, other=0.0)
    Mv = tl.load(Mst + st + off_v, mask=m_dd, other=0.0)
    me = tl.load(Mst + st + off_e, mask=md, other=0.0)
    ma = tl.load(Mst + st + off_a, mask=md, other=0.0)
    if READ:
        Mm = tl.load(Mst + st + off_m, mask=m_dd, other=0.0)
    eb = tl.load(EB + h)
    ab = tl.load(AB + h)
    pair = rc[:, None] >= rc[None, :]
    strict = rc[:, None] > rc[None, :]
    eye = tl.where(rc[:, None] == rc[None, :], 1.0, 0.0)
    same_blk = (rc // BLK)[:, None] == (rc // BLK)[None, :]
    for n in range(N):
        fresh = tl.load(Start + b * N + n) != 0
        comp = tl.load(Comp + b * N + n) != 0
        Mk = tl.where(fresh, tl.load(Init + ini + off_k, mask=m_dd, other=0.0), Mk)
        Mv = tl.where(fresh, tl.load(Init + ini + off_v, mask=m_dd, other=0.0), Mv)
        me = tl.where(fresh, tl.load(Init + ini + off_e, mask=md, other=0.0), me)
        ma = tl.where(fresh, tl.load(Init + ini + off_a, mask=md, other=0.0), ma)
        if READ:
            Mm = tl.where(fresh, tl.load(Init + ini + off_m, mask=m_dd, other=0.0), Mm)
        ch = (b * N + n) * H + h
        if save != 0:
            tl.store(Mpre + ch * R * D + off_k, Mk, mask=m_dd)
            tl.store(Mpre + ch * R * D + off_v, Mv, mask=m_dd)
            tl.store(Mpre + ch * R * D + off_e, me, mask=md)
            tl.store(Mpre + ch * R * D + off_a, ma, mask=md)
            if READ:
                tl.store(Mpre + ch * R * D + off_m, Mm, mask=m_dd)
        tok = ((b * N + n) * C + rc) * H + h
        u = tl.load(U + tok[:, None] * D + rd[None, :], mask=md[None, :], other=0.0).to(tl.float32)
        m = tl.load(Valid + (b * N + n) * C + rc).to(tl.float32)
        k = tl.dot(u, tl.trans(Mk), input_precision=PREC)
        v = tl.dot(u, tl.trans(Mv), input_precision=PREC)
        tl.store(Kout + tok[:, None] * D + rd[None, :], k, mask=md[None, :])
        tl.store(Vout + tok[:, None] * D + rd[None, :], v, mask=md[None, :])
        # --- chunk quantities (same lines in the backward) ---
        beta = m / (1.0 + tl.exp(-(tl.reduce(u * me[None, :], 1, tl.standard._sum_combine) + eb)))
        za = tl.reduce(u * ma[None, :], 1, tl.standard._sum_combine) + ab
        g = m * (tl.minimum(za, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(za))))      # m log σ(za), stable
        kr = tl.maximum(tl.sqrt(tl.reduce(k * k, 1, tl.standard._sum_combine)), EPS)
        kn = k * (m / kr)[:, None]
        vr = tl.maximum(tl.sqrt(tl.reduce(v * v, 1, tl.standard._sum_combine)), EPS)
        vn = v / vr[:, None]
        G = tl.associative_scan(g, 0, tl.standard._sum_combine)
        gamma = tl.exp(G)
        Gm = tl.where(pair, tl.exp(tl.where(pair, G[:, None] - G[None, :], 0.0)), 0.0)
        ed = tl.reduce(tl.where(rc[:, None] == C - 1, Gm, 0.0), 0, tl.standard._sum_combine)   # e^{G_{C−1} − G_i}
        gl = tl.reduce(tl.where(rc == C - 1, gamma, 0.0), 0, tl.standard._sum_combine)
        bw = beta * 0.5 * tl.exp(g)                                              # β ⊙ ½ e^g
        bg = beta * gamma
        # --- end chunk quantities ---
        A = tl.where(strict, beta[:, None] * tl.dot(kn, tl.trans(kn), input_precision=PREC) * Gm, 0.0)
        nd = tl.where(same_blk, -A, 0.0)                 # X = (I + A)⁻¹ (see triton_fused._prelude_fwd)
        X = eye + nd
        for _ in tl.static_range(LOG_BLK - 1):
            nd = tl.dot(nd, nd, input_precision=PREC)
            X = tl.dot(X, nd, acc=X, input_precision=PREC)
        Mn = -tl.dot(X, tl.where(same_blk, 0.0, A), input_precision=PREC)
        Y = eye + Mn
        for _ in tl.static_range(NB_ROUNDS):
            Mn = tl.dot(Mn, Mn, input_precision=PREC)
            Y = tl.dot(Y, Mn, acc=Y, input_precision=PREC)
        X = tl.dot(Y, X, input_precision=PREC)
        Z = tl.dot(X, bw[:, None] * vn - bg[:, None] * kn, input_precision=PREC)
        Q = tl.dot(tl.trans(Z), ed[:, None] * kn, input_precision=PREC)
        if save != 0:
            tl.store(Xs + ch * C * C + rc[:, None] * C + rc[None, :], X)
            tl.store(Zs + ch * C * D + rc[:, None] * D + rd[None, :], Z, mask=md[None, :])
            tl.store(Qs + ch * D * D + off_k, Q, mask=m_dd)
        if READ:   # o_t = M_t q̂_t: O = (γ ⊙ q̂ + Pq Z) M⁰ᵀ, Pq = (q̂ k̂ᵀ) ⊙ Γ (diagonal included); rows M_mem only
            qv = tl.load(Qin + tok[:, None] * D + rd[None, :], mask=md[None, :], other=0.0).to(tl.float32)
            qn = qv / tl.maximum(tl.sqrt(tl.reduce(qv * qv, 1, tl.standard._sum_combine)), EPS)[:, None]
            Pq = tl.dot(qn, tl.trans(kn), input_precision=PREC) * Gm
            Yq = tl.dot(Pq, Z, acc=gamma[:, None] * qn, input_precision=PREC)
            tl.store(Rout + tok[:, None] * D + rd[None, :], tl.dot(Yq, tl.trans(Mm), input_precision=PREC),
                     mask=md[None, :])
            Mm = tl.where(comp, tl.dot(Mm, Q, acc=gl * Mm, input_precision=PREC), Mm)
        # M⁰ (γ I + Q) as γ M⁰ + M⁰ Q: the carried memory is not rounded to the dots' TF32 inputs every chunk
        # (as M⁰ P it was: 8× the error against float64 at 32 chunks)
        Mk = tl.where(comp, tl.dot(Mk, Q, acc=gl * Mk, input_precision=PREC), Mk)
        Mv = tl.where(comp, tl.dot(Mv, Q, acc=gl * Mv, input_precision=PREC), Mv)
        me = tl.where(comp, gl * me + tl.reduce(me[:, None] * Q, 0, tl.standard._sum_combine), me)
        ma = tl.where(comp, gl * ma + tl.reduce(ma[:, None] * Q, 0, tl.standard._sum_combine), ma)
    tl.store(Mst + st + off_k, Mk, mask=m_dd)
    tl.store(Mst + st + off_v, Mv, mask=m_dd)
    tl.store(Mst + st + off_e, me, mask=md)
    tl.store(Mst + st + off_a, ma, mask=md)
    if READ:
        tl.store(Mst + st + off_m, Mm, mask=m_dd)


def _hope_bwd(U, Qin, Valid, Start, Comp, EB, AB, Mpre, Xs, Zs, Qs, Kout, Vout, dKo, dVo, dRo, dM, dU, dQ, dInit,
              dEB, dAB,
              H, N, D,
              C: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr, READ: tl.constexpr):
    """dM [B, H, R, D] holds ∂L/∂(final memory) on entry and ∂L/∂mem on exit; dKo, dVo [B, N, C, H, D] the keys' and
    values' gradients; out: dU [B, N, C, H, D] float32, dInit [B, H, R, D] (zero on entry) and dEB, dAB [B, H] per
    batch row (summed by the caller). Mpre, Xs, Zs, Qs and Kout, Vout from the forward. READ: the memory read, with
    queries Qin, the reads' gradient dRo and out dQ [B, N, C, H, D] float32 (untouched without it)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    R = 2 * D + 2
    if READ:
        R = 3 * D + 2
    rc = tl.arange(0, C)
    rd = tl.arange(0, BD)
    md = rd < D
    m_dd = md[:, None] & md[None, :]
    off_k = rd[:, None] * D + rd[None, :]
    off_v = off_k + D * D
    off_e = 2 * D * D + rd
    off_a = off_e + D
    off_m = off_k + (2 * D + 2) * D
    st = bh * R * D
    dMk = tl.load(dM + st + off_k, mask=m_dd, other=0.0)
    dMv = tl.load(dM + st + off_v, mask=m_dd, other=0.0)
    dme = tl.load(dM + st + off_e, mask=md, other=0.0)
    dma = tl.load(dM + st + off_a, mask=md, other=0.0)
    if READ:
        dMm = tl.load(dM + st + off_m, mask=m_dd, other=0.0)
    deb = tl.full([C], 0.0, tl.float32)
    dab = tl.full([C], 0.0, tl.float32)
    eb = tl.load(EB + h)
    ab = tl.load(AB + h)
    pair = rc[:, None] >= rc[None, :]
    strict = rc[:, None] > rc[None, :]
    for nn in range(N):
        n = N - 1 - nn
        fresh = tl.load(Start + b * N + n) != 0
        compf = (tl.load(Comp + b * N + n) != 0).to(tl.float32)
        ch = (b * N + n) * H + h
        me = tl.load(Mpre + ch * R * D + off_e, mask=md, other=0.0)
        ma = tl.load(Mpre + ch * R * D + off_a, mask=md, other=0.0)
        tok = ((b * N + n) * C + rc) * H + h
        u = tl.load(U + tok[:, None] * D + rd[None, :], mask=md[None, :], other=0.0).to(tl.float32)
        m = tl.load(Valid + (b * N + n) * C + rc).to(tl.float32)
        k = tl.load(Kout + tok[:, None] * D + rd[None, :], mask=md[None, :], other=0.0)
        v = tl.load(Vout + tok[:, None] * D + rd[None, :], mask=md[None, :], other=0.0)
        # --- chunk quantities (same lines as the forward; σ kept for β's gradient) ---
        sb = 1.0 / (1.0 + tl.exp(-(tl.reduce(u * me[None, :], 1, tl.standard._sum_combine) + eb)))
        beta = m * sb
        za = tl.reduce(u * ma[None, :], 1, tl.standard._sum_combine) + ab
        g = m * (tl.minimum(za, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(za))))
        kr = tl.maximum(tl.sqrt(tl.reduce(k * k, 1, tl.standard._sum_combine)), EPS)
        kn = k * (m / kr)[:, None]
        vr = tl.maximum(tl.sqrt(tl.reduce(v * v, 1, tl.standard._sum_combine)), EPS)
        vn = v / vr[:, None]
        G = tl.associative_scan(g, 0, tl.standard._sum_combine)
        gamma = tl.exp(G)
        Gm = tl.where(pair, tl.exp(tl.where(pair, G[:, None] - G[None, :], 0.0)), 0.0)
        ed = tl.reduce(tl.where(rc[:, None] == C - 1, Gm, 0.0), 0, tl.standard._sum_combine)
        gl = tl.reduce(tl.where(rc == C - 1, gamma, 0.0), 0, tl.standard._sum_combine)
        bw = beta * 0.5 * tl.exp(g)
        bg = beta * gamma
        # --- end chunk quantities ---
        # commit: M_next = M⁰ P = γ_{C−1} M⁰ + M⁰ Q if complete, else M⁰
        d1k, d1v, d1e, d1a = compf * dMk, compf * dMv, compf * dme, compf * dma
        Q = tl.load(Qs + ch * D * D + off_k, mask=m_dd, other=0.0)
        Mk = tl.load(Mpre + ch * R * D + off_k, mask=m_dd, other=0.0)
        Mv = tl.load(Mpre + ch * R * D + off_v, mask=m_dd, other=0.0)
        dP = tl.dot(tl.trans(Mk), d1k, input_precision=PREC)
        dP = tl.dot(tl.trans(Mv), d1v, acc=dP, input_precision=PREC)
        dP += me[:, None] * d1e[None, :] + ma[:, None] * d1a[None, :]
        if READ:
            Mm = tl.load(Mpre + ch * R * D + off_m, mask=m_dd, other=0.0)
            d1m = compf * dMm
            dP = tl.dot(tl.trans(Mm), d1m, acc=dP, input_precision=PREC)
            dMm = tl.dot(d1m, tl.trans(Q), acc=(1.0 - compf) * dMm + gl * d1m, input_precision=PREC)
        dMk = tl.dot(d1k, tl.trans(Q), acc=(1.0 - compf) * dMk + gl * d1k, input_precision=PREC)
        dMv = tl.dot(d1v, tl.trans(Q), acc=(1.0 - compf) * dMv + gl * d1v, input_precision=PREC)
        dme = (1.0 - compf) * dme + gl * d1e + tl.reduce(Q * d1e[None, :], 1, tl.standard._sum_combine)
        dma = (1.0 - compf) * dma + gl * d1a + tl.reduce(Q * d1a[None, :], 1, tl.standard._sum_combine)
        # P = γ_{C−1} I + Q, Q = Zᵀ Ke,  Ke = e ⊙ k̂
        dgl = tl.reduce(tl.reduce(tl.where(rd[:, None] == rd[None, :], dP, 0.0), 1, tl.standard._sum_combine), 0,
                        tl.standard._sum_combine)
        Ke = ed[:, None] * kn
        dZ = tl.dot(Ke, tl.trans(dP), input_precision=PREC)                       # [C, BD]
        Z = tl.load(Zs + ch * C * D + rc[:, None] * D + rd[None, :], mask=md[None, :], other=0.0)
        dKe = tl.dot(Z, dP, input_precision=PREC)
        dkn = ed[:, None] * dKe
        dee = ed * tl.reduce(dKe * kn, 1, tl.standard._sum_combine)              # ∂L/∂e ⊙ e
        if READ:
            # read = Yq M_memᵀ, Yq = γ ⊙ q̂ + Pq Z, Pq = (q̂ k̂ᵀ) ⊙ Γ (recomputed: two dots, nothing saved)
            qv = tl.load(Qin + tok[:, None] * D + rd[None, :], mask=md[None, :], other=0.0).to(tl.float32)
            qr = tl.maximum(tl.sqrt(tl.reduce(qv * qv, 1, tl.standard._sum_combine)), EPS)
            qn = qv / qr[:, None]
            Pq = tl.dot(qn, tl.trans(kn), input_precision=PREC) * Gm
            dRd = tl.load(dRo + tok[:, None] * D + rd[None, :], mask=md[None, :], other=0.0)
            dMm = tl.dot(tl.trans(dRd), tl.dot(Pq, Z, acc=gamma[:, None] * qn, input_precision=PREC), acc=dMm,
                         input_precision=PREC)
            dYq = tl.dot(dRd, Mm, input_precision=PREC)
            dZ = tl.dot(tl.trans(Pq), dYq, acc=dZ, input_precision=PREC)
            dPq = tl.dot(dYq, tl.trans(Z), input_precision=PREC)                 # ∂L/∂Pq
            dPP = dPq * Pq
            dGq = (gamma * tl.reduce(dYq * qn, 1, tl.standard._sum_combine) + tl.reduce(dPP, 1, tl.standard._sum_combine)
                   - tl.reduce(dPP, 0, tl.standard._sum_combine))               # through γ and Γ
            dPq = dPq * Gm                                                       # ∂L/∂(q̂ k̂ᵀ)
            dkn = tl.dot(tl.trans(dPq), qn, acc=dkn, input_precision=PREC)
            dqn = tl.dot(dPq, kn, acc=gamma[:, None] * dYq, input_precision=PREC)
            dq = (dqn - tl.where(qr > EPS, tl.reduce(dqn * qn, 1, tl.standard._sum_combine), 0.0)[:, None] * qn) \
                / qr[:, None]
            tl.store(dQ + tok[:, None] * D + rd[None, :], dq, mask=md[None, :])
        # Z = X Y, Y = bw ⊙ v̂n − βγ ⊙ k̂
        X = tl.load(Xs + ch * C * C + rc[:, None] * C + rc[None, :])
        dY = tl.dot(tl.trans(X), dZ, input_precision=PREC)
        dX = tl.dot(dZ, tl.trans(bw[:, None] * vn - bg[:, None] * kn), input_precision=PREC)
        dvn = bw[:, None] * dY
        dbw = tl.reduce(dY * vn, 1, tl.standard._sum_combine)
        dbg = -tl.reduce(dY * kn, 1, tl.standard._sum_combine)
        dkn -= bg[:, None] * dY
        # X = (I + A)⁻¹ ⇒ dA = −Xᵀ dX Xᵀ; A = (β ⊙rows k̂ k̂ᵀ) ⊙ Γ, strictly lower
        dA = tl.where(strict, -tl.dot(tl.dot(tl.trans(X), dX, input_precision=PREC), tl.trans(X),
                                      input_precision=PREC), 0.0)
        dAG = dA * Gm
        dAA = dAG * tl.where(strict, tl.dot(kn, tl.trans(kn), input_precision=PREC), 0.0)
        dbeta = tl.reduce(dAA, 1, tl.standard._sum_combine) + dbw * 0.5 * tl.exp(g) + dbg * gamma
        dAA = dAA * beta[:, None]                        # dA ⊙ A
        dKK = dAG * beta[:, None]
        dkn = tl.dot(dKK, kn, acc=dkn, input_precision=PREC)
        dkn = tl.dot(tl.trans(dKK), kn, acc=dkn, input_precision=PREC)
        # G = cumsum g: through Γ, γ = e^G (βγ), e and γ_{C−1}; bw = β ½ e^g
        dG = (tl.reduce(dAA, 1, tl.standard._sum_combine) - tl.reduce(dAA, 0, tl.standard._sum_combine)
              - dee + dbg * bg)
        dG += tl.where(rc == C - 1, tl.reduce(dee, 0, tl.standard._sum_combine) + dgl * gl, 0.0)
        if READ:
            dG += dGq
        dg = dbw * bw + tl.associative_scan(dG, 0, tl.standard._sum_combine, reverse=True)
        # x / max(‖x‖, ε): (dx̂ − x̂ (dx̂·x̂)) / ‖x‖ above ε, dx̂ / ε below (the clamp passes no gradient to ‖x‖)
        dv = (dvn - tl.where(vr > EPS, tl.reduce(dvn * vn, 1, tl.standard._sum_combine), 0.0)[:, None] * vn) / vr[:, None]
        dkm = dkn * m[:, None]
        ku = k / kr[:, None]
        dk = (dkm - tl.where(kr > EPS, tl.reduce(dkm * ku, 1, tl.standard._sum_combine), 0.0)[:, None] * ku) / kr[:, None]
        dk += tl.load(dKo + tok[:, None] * D + rd[None, :], mask=md[None, :], other=0.0)
        dv += tl.load(dVo + tok[:, None] * D + rd[None, :], mask=md[None, :], other=0.0)
        # β = m σ(u·m_η + b_η), g = m log σ(za): d/dza log σ = 1 − σ(za)
        de = dbeta * m * sb * (1.0 - sb)
        da = dg * m * (1.0 - 1.0 / (1.0 + tl.exp(-za)))
        deb += de
        dab += da
        # k = u M_kᵀ, v = u M_vᵀ, e = u·m_η, za = u·m_α + b_α
        du = tl.dot(dk, Mk, input_precision=PREC)
        du = tl.dot(dv, Mv, acc=du, input_precision=PREC)
        du += de[:, None] * me[None, :] + da[:, None] * ma[None, :]
        tl.store(dU + tok[:, None] * D + rd[None, :], du, mask=md[None, :])
        dMk = tl.dot(tl.trans(dk), u, acc=dMk, input_precision=PREC)
        dMv = tl.dot(tl.trans(dv), u, acc=dMv, input_precision=PREC)
        dme += tl.reduce(de[:, None] * u, 0, tl.standard._sum_combine)
        dma += tl.reduce(da[:, None] * u, 0, tl.standard._sum_combine)
        # a chunk that starts a document read M_init, not the earlier memory (accumulated in HBM: rare, and two
        # fewer [D, D] tiles in registers)
        if fresh:
            tl.store(dInit + st + off_k, tl.load(dInit + st + off_k, mask=m_dd, other=0.0) + dMk, mask=m_dd)
            tl.store(dInit + st + off_v, tl.load(dInit + st + off_v, mask=m_dd, other=0.0) + dMv, mask=m_dd)
            tl.store(dInit + st + off_e, tl.load(dInit + st + off_e, mask=md, other=0.0) + dme, mask=md)
            tl.store(dInit + st + off_a, tl.load(dInit + st + off_a, mask=md, other=0.0) + dma, mask=md)
            if READ:
                tl.store(dInit + st + off_m, tl.load(dInit + st + off_m, mask=m_dd, other=0.0) + dMm, mask=m_dd)
        dMk = tl.where(fresh, 0.0, dMk)
        dMv = tl.where(fresh, 0.0, dMv)
        dme = tl.where(fresh, 0.0, dme)
        dma = tl.where(fresh, 0.0, dma)
        if READ:
            dMm = tl.where(fresh, 0.0, dMm)
    tl.store(dM + st + off_k, dMk, mask=m_dd)
    tl.store(dM + st + off_v, dMv, mask=m_dd)
    tl.store(dM + st + off_e, dme, mask=md)
    tl.store(dM + st + off_a, dma, mask=md)
    if READ:
        tl.store(dM + st + off_m, dMm, mask=m_dd)
    tl.store(dEB + bh, tl.reduce(deb, 0, tl.standard._sum_combine))
    tl.store(dAB + bh, tl.reduce(dab, 0, tl.standard._sum_combine))


def _build(interpret: bool) -> tuple:
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(_hope_fwd), InterpretedFunction(_hope_bwd)
    return (triton.jit(_hope_fwd, do_not_specialize=["N", "save"]), triton.jit(_hope_bwd, do_not_specialize=["N"]))


_JIT = _build(False) if triton is not None else None     # built at import: torch.compile finds plain kernels
_interpreted = functools.cache(lambda: _build(True))


def _kernels(interpret: bool) -> tuple:
    return _interpreted() if interpret else _JIT


def _meta(u: Tensor) -> dict:
    C, D = u.shape[2], u.shape[-1]
    prec = "tf32" if u.dtype in (torch.bfloat16, torch.float16) else "ieee"
    return {"C": C, "BD": max(16, triton.next_power_of_2(D)), "PREC": prec, "EPS": EPS,
            "NB_ROUNDS": max(0, (C // 16).bit_length() - 2), "num_stages": 1}


class _HopeScan(torch.autograd.Function):
    """u [B, N, C, H, D] contiguous (any float dtype); q [B, N, C, H, D] contiguous or None (no memory read); mem
    [B, H, R, D], init [H, R, D], eta_bias, alpha_bias [H] float32 contiguous; valid int8 [B, N, C]; start, comp int8
    [B, N] -> (M [B, H, R, D], reads [B, N, C, H, D] (only with q), k, v [B, N, C, H, D]) float32."""

    @staticmethod
    def forward(ctx, u, q, mem, init, eta_bias, alpha_bias, valid, start, comp):
        B, N, C, H, D = u.shape
        R = mem.shape[-2]
        read = q is not None
        interpret = u.device.type == "cpu"
        save = any(ctx.needs_input_grad[:6])
        M = mem.clone()
        f32 = {"dtype": torch.float32}
        k = u.new_empty(B, N, C, H, D, **f32)
        v = torch.empty_like(k)
        r = torch.empty_like(k) if read else k           # never written without q
        if save:   # chunk-start memories, and per chunk X [C, C], Z [C, D], Q [D, D]
            Mpre, Xs = u.new_empty(B, N, H, R, D, **f32), u.new_empty(B, N, H, C, C, **f32)
            Zs, Qs = u.new_empty(B, N, H, C, D, **f32), u.new_empty(B, N, H, D, D, **f32)
        else:
            Mpre = Xs = Zs = Qs = M                      # never written
        fwd, _ = _kernels(interpret)
        fwd[(B * H,)](u, q if read else u, valid, start, comp, init, eta_bias, alpha_bias, M, Mpre, Xs, Zs, Qs, k, v,
                      r, H, _count(N, interpret), D, int(save), num_warps=WARPS["fwd_read" if read else "fwd"],
                      READ=read, **_meta(u))
        ctx.read = read
        if save:
            ctx.save_for_backward(u, q, valid, start, comp, eta_bias, alpha_bias, Mpre, Xs, Zs, Qs, k, v)
            ctx.init_shape = init.shape
        return (M, r, k, v) if read else (M, k, v)

    @staticmethod
    def backward(ctx, dM, *douts):
        u, q, valid, start, comp, eta_bias, alpha_bias, Mpre, Xs, Zs, Qs, k, v = ctx.saved_tensors
        dr, dk, dv = douts if ctx.read else (None, *douts)
        B, N, _, H, D = u.shape
        interpret = u.device.type == "cpu"
        dmem = dM.float().contiguous().clone()
        du = torch.empty(u.shape, dtype=torch.float32, device=u.device)
        dq = torch.empty_like(du) if ctx.read else du     # never written without q
        dk, dv = dk.float().contiguous(), dv.float().contiguous()
        dr = dr.float().contiguous() if ctx.read else dk
        dinit = torch.zeros(B, H, *ctx.init_shape[1:], dtype=torch.float32, device=u.device)
        deb = torch.empty(B, H, dtype=torch.float32, device=u.device)
        dab = torch.empty_like(deb)
        _, bwd = _kernels(interpret)
        meta = _meta(u)
        del meta["NB_ROUNDS"]
        bwd[(B * H,)](u, q if ctx.read else u, valid, start, comp, eta_bias, alpha_bias, Mpre, Xs, Zs, Qs, k, v, dk,
                      dv, dr, dmem, du, dq, dinit, deb, dab,
                      H, _count(N, interpret), D, num_warps=WARPS["bwd_read" if ctx.read else "bwd"], READ=ctx.read,
                      **meta)
        dq = dq.to(q.dtype) if ctx.read else None
        return du.to(u.dtype), dq, dmem, dinit.sum(0), deb.sum(0), dab.sum(0), None, None, None


def hope_scan(u: Tensor, q: Tensor | None, *, mem: Tensor, init: Tensor, eta_bias: Tensor, alpha_bias: Tensor,
              slot_valid: Tensor, starts_doc: Tensor, complete: Tensor, delta_backend: str | None = None
              ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """See reference.hope_scan (delta_backend is not used)."""
    if not supports(u, q, mem=mem):
        raise ValueError(f"hope_scan backend 'triton' needs Triton, CUDA tensors (or CPU with TRITON_INTERPRET=1), "
                         f"chunk_size in {CHUNKS}, head width ≤ {MAX_DIM} and queries shaped as u; use backend 'loop'")
    f32 = (lambda t: t.float().contiguous())
    i8 = (lambda t: t.to(torch.int8).contiguous())
    out = _HopeScan.apply(u.contiguous(), None if q is None else q.contiguous(), f32(mem), f32(init), f32(eta_bias),
                          f32(alpha_bias), i8(slot_valid), i8(starts_doc), i8(complete))
    if q is None:
        M, k, v = out
        return M, None, k, v
    return out
