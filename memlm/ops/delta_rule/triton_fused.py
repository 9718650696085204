"""(Gated) delta rule with the whole chunk pipeline in Triton: prelude, state recurrence, outputs, and their backward.

Same notation and chunk algebra as chunked.py (NOTES.md §1, §8). One program per (chunk n, batch·head), except the
state recurrence (triton_impl's kernels, one program per batch·head walking the chunks):

  forward   _prelude_fwd   A = (β ⊙rows K Kᵀ) ⊙ D⁻, X = (I + A)⁻¹ (products of 16-block Neumann factors, in
                           registers), U = X (β V), Wk = X (βγ K), Ke = e ⊙ K, γ_{C−1}
            recurrence     S_{n+1} = γ_{C−1} S_n + (U − Wk S_nᵀ)ᵀ Ke           (triton_impl)
            _output_fwd    O = (γ Q) Sᵀ + (Q Kᵀ ⊙ D) (U − Wk Sᵀ)
  backward  _output_bwd    dQ, dK (attention part), dU, dWk, dS_n, d log-decay (output part)
            recurrence     dS_{n+1} of every chunk, dS0 (state-only walk, triton_impl)
            _prelude_bwd   the chunk's recurrence gradients (dU, dKe, dWk, dγ_{C−1}) from S_n and dS_{n+1},
                           then dK, dV, dβ, dg (through X, A, γ, e)

q, k, v are read in their own dtype and layout [B, T, H, D] (no transposes or upcasts in HBM); products of two
input tensors are tensor-core dots in that dtype with float32 accumulation; products involving float32
intermediates (X, U, W, S, gradients) use PREC: "ieee" for fp32 inputs (the 1e-5 tests), TF32 for bf16/fp16
inputs. Decays inside a chunk are
exp(G_t − G_i) of the chunk's cumulative log-decay G (as in flash-linear-attention), so the log-decay gradient is
dG_t = Σ_i dL_ti − Σ_i dL_it (+ the γ and e terms) and dg is its reverse cumulative sum; the chunked backend's
pairwise sums are exact for very strong decay, this difference loses |G|·2⁻²⁴ relative (NOTES.md §8).

Limits (else `triton_impl` falls back to its recurrence-only path): chunk_size ∈ {16, 32, 64}, Dk, Dv ≤ 64,
bf16/fp16 (fp32 only when `FP32` is set: the interpreter tests).
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from memlm.ops.triton_common import tl, triton  # None, None without Triton

from . import triton_impl

__all__ = ["CHUNKS", "MAX_DIM", "delta_rule", "supports"]

CHUNKS = (16, 32, 64)
MAX_DIM = 64         # at 128 the backward kernels need more shared memory than an H100 block has (ptxas, sm_90)
# fp32 inputs stay on triton_impl's recurrence-only path by default: with IEEE dots (fp32 accuracy) the fused kernels
# spill tens of KB of registers and take minutes to compile. The interpreter tests switch it on (exact either way).
FP32 = False
# dtype of the per-chunk intermediates in HBM (Xm, U, Wk, Ke, the chunk-start states, the backward's partial
# gradients); kernel math and the carried state are float32 either way. None: bfloat16 for bf16 inputs (half the
# traffic: 13 % faster on an H100; errors against float64 2.9e-3–4.2e-3 at T 2048, below flash-linear-attention's
# 4.0e-3–5.9e-3 with its bf16 intermediates, docs/benchmarks.md), float32 otherwise (fp16 inputs keep their 10-bit
# accuracy; fp16 partial gradients could underflow).
STORE_DTYPE: torch.dtype | None = None
# dtype of the two state walks' inputs (U, Wk, Ke forward; the output kernel's dS_n backward). "auto": STORE_DTYPE's
# choice when the op is differentiated (training: with bf16 walk inputs the op is 8-12 % faster, 2.49 vs 2.78 ms at
# T 2K on an H100 — below flash-linear-attention's 2.62 in the same run, which keeps them in bf16 too — and the outputs'
# and gradients' errors against float64 stay below fla's), float32 without autograd (prefill, evaluation): the final
# state, carried into decoding, then keeps TF32 accuracy (with bf16 walk inputs its error against float64 is ~6e-3).
# A dtype pins it; None: STORE_DTYPE's choice always.
RECURRENCE_DTYPE: torch.dtype | str | None = "auto"
# bf16/fp16 inputs: the prelude backward's dots of float32 intermediates (S, dS, W, X, the partial gradients) take
# operands rounded to the input dtype (full-rate tensor cores and half the registers, as flash-linear-attention's
# backward) instead of TF32. H100, 65,536 tokens, H 8, D 64, bf16 (benchmarks/delta_rule_tune.py lowp_bwd=1): the
# kernel 0.84 → 0.44 ms, the op fwd+bwd 2.44 → 2.06 ms at T 2K; errors against float64 dk 4.0e-3 → 4.7e-3, dv 3.1e-3 →
# 3.7e-3, dbeta 3.5e-3 → 4.2e-3 (fla 0.6.0: 5.9e-3, 4.0e-3, 4.8e-3), and the half-precision GPU tests at D 64 pass.
# "auto": on for Dk = Dv = 64 only — at Dk 32 / Dv 48 the bf16 build hit an illegal memory access on Triton 3.6
# (not investigated; the TF32 build of the same kernel is fine). True / False force it (MEMLM_DELTA_HALF_BWD_DOTS=1/0).
HALF_BWD_DOTS: bool | str = {"1": True, "0": False}.get(os.environ.get("MEMLM_DELTA_HALF_BWD_DOTS", ""), "auto")
# num_warps per kernel ("prelude_fwd", "output_fwd", "output_bwd", "prelude_bwd") overriding `_meta` (tuning runs)
WARPS: dict[str, int] = {}
BLK = tl.constexpr(16) if tl is not None else 16   # diagonal blocks of the inverse
LOG_BLK = tl.constexpr(4) if tl is not None else 4


def supports(q: Tensor, v: Tensor, chunk_size: int) -> bool:
    """CUDA bf16/fp16 (and fp32 when FP32); CPU (the interpreter) fp32 when FP32 — the Triton 3.6 interpreter
    multiplies bf16 tiles as raw bits. chunk_size in CHUNKS, Dk, Dv ≤ MAX_DIM."""
    half = (torch.bfloat16, torch.float16) if q.device.type != "cpu" else ()
    dtypes = (*half, torch.float32) if FP32 else half
    return (triton is not None and chunk_size in CHUNKS and q.shape[-1] <= MAX_DIM and v.shape[-1] <= MAX_DIM
            and q.dtype in dtypes)


# ------------------------------------------------------------------------------------------------------ kernels
# Plain functions made kernels in `_build` (compiled or interpreted, see triton_impl). No helper functions: a kernel
# may only call jitted ones, and the interpreter only runs those when TRITON_INTERPRET was set before `import triton`;
# so the per-chunk decay lines (G, D, γ) and the loads before them are repeated in each kernel (the duplicate finder
# lists them; merging forward and backward into one kernel per stage with a BWD flag would trade that for a dozen
# placeholder pointers), and tl.reduce / tl.associative_scan with the
# standard sum combiner stand for tl.sum / tl.cumsum, tl.full for tl.zeros.
# Layouts: Q, K [B, T, H, Dk], V, O [B, T, H, Dv] (unit last stride); Beta, G [B, T, H]; R int8 [B, T]; per-chunk
# buffers (contiguous float32) Xm [BH, N, C, C] (the inverse, kept for the backward), U [BH, N, C, Dv], Wk, Ke [BH, N, C, Dk], GL [BH, N],
# S_all [BH, N, Dv, Dk]. Program (n, bh) with bh = b·H + h.

def _prelude_fwd(K, V, Beta, G, R, Xm, U, Wk, Ke, GL,
                 skb, skt, skh, svb, svt, svh,
                 T, H, Dk, Dv, N,
                 HAS_G: tl.constexpr, HAS_R: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 PREC: tl.constexpr, NB_ROUNDS: tl.constexpr):
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, C)
    t = n * C + rc
    mt = t < T
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    m_tk = mt[:, None] & (rk < Dk)[None, :]
    m_tv = mt[:, None] & (rv < Dv)[None, :]
    k = tl.load(K + b * skb + t[:, None] * skt + h * skh + rk[None, :], mask=m_tk, other=0.0)
    v = tl.load(V + b * svb + t[:, None] * svt + h * svh + rv[None, :], mask=m_tv, other=0.0)
    tok = (b * T + t) * H + h
    beta = tl.load(Beta + tok, mask=mt, other=0.0).to(tl.float32)
    # --- decays (same lines in every kernel) ---
    if HAS_G:
        gc = tl.associative_scan(tl.load(G + tok, mask=mt, other=0.0).to(tl.float32), 0, tl.standard._sum_combine)
    else:
        gc = tl.full((C,), 0.0, tl.float32)
    pair = rc[:, None] >= rc[None, :]
    if HAS_R:
        seg = tl.associative_scan(tl.load(R + b * T + t, mask=mt, other=0).to(tl.int32), 0, tl.standard._sum_combine)
        pair = pair & (seg[:, None] == seg[None, :])
        gamma = tl.where(seg == 0, tl.exp(gc), 0.0)
    else:
        gamma = tl.exp(gc)
    D = tl.where(pair, tl.exp(tl.where(pair, gc[:, None] - gc[None, :], 0.0)), 0.0)
    # --- end decays ---
    last = rc[:, None] == C - 1
    e = tl.reduce(tl.where(last, D, 0.0), 0, tl.standard._sum_combine)          # D_{C−1, i}
    gl = tl.reduce(tl.where(rc == C - 1, gamma, 0.0), 0, tl.standard._sum_combine)
    strict = rc[:, None] > rc[None, :]
    A = tl.where(strict, beta[:, None] * tl.dot(k, tl.trans(k), input_precision=PREC) * D, 0.0)
    # X = (I + A)⁻¹ without a sequential solve, all in registers. Split A = A_d + A_o (16 × 16 diagonal blocks, the
    # strictly block-lower rest): I + A = (I + A_d)(I + X_d A_o) with X_d = (I + A_d)⁻¹, so X = (I + M)⁻¹ X_d,
    # M = X_d A_o. Both inverses are finite Neumann sums of nilpotent matrices (A_d¹⁶ = 0, M^(C/16) = 0), formed by
    # repeated squaring: Σ_{m<2^r} (−N)^m = (I − N)(I + N²)(I + N⁴)…  Only 16-long products are squared, so the
    # terms stay bounded by binomials of 15 (a 64-long Neumann sum would cancel terms of size C(63, 31)).
    blk = rc // BLK
    same_blk = blk[:, None] == blk[None, :]
    nd = tl.where(same_blk, -A, 0.0)
    X = tl.where(rc[:, None] == rc[None, :], 1.0, 0.0) + nd
    for _ in tl.static_range(LOG_BLK - 1):
        nd = tl.dot(nd, nd, input_precision=PREC)
        X = tl.dot(X, nd, acc=X, input_precision=PREC)
    M = tl.dot(X, tl.where(same_blk, 0.0, A), input_precision=PREC)
    Y = tl.where(rc[:, None] == rc[None, :], 1.0, 0.0) - M
    M = -M
    for _ in tl.static_range(NB_ROUNDS):
        M = tl.dot(M, M, input_precision=PREC)
        Y = tl.dot(Y, M, acc=Y, input_precision=PREC)
    X = tl.dot(Y, X, input_precision=PREC)
    tl.store(Xm + (bh * N + n) * C * C + rc[:, None] * C + rc[None, :], X.to(Xm.dtype.element_ty))
    cb = ((bh * N + n) * C + rc)[:, None]
    u = tl.dot(X, beta[:, None] * v.to(tl.float32), input_precision=PREC)
    tl.store(U + cb * Dv + rv[None, :], u.to(U.dtype.element_ty), mask=(rv < Dv)[None, :])
    kf = k.to(tl.float32)
    wk = tl.dot(X, (beta * gamma)[:, None] * kf, input_precision=PREC)
    tl.store(Wk + cb * Dk + rk[None, :], wk.to(Wk.dtype.element_ty), mask=(rk < Dk)[None, :])
    tl.store(Ke + cb * Dk + rk[None, :], (e[:, None] * kf).to(Ke.dtype.element_ty), mask=(rk < Dk)[None, :])
    tl.store(GL + bh * N + n, gl)


def _output_fwd(Q, K, G, R, S_all, U, Wk, O,
                sqb, sqt, sqh, skb, skt, skh,
                T, H, Dk, Dv, N,
                HAS_G: tl.constexpr, HAS_R: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                PREC: tl.constexpr, scale: tl.constexpr):
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, C)
    t = n * C + rc
    mt = t < T
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk, mv = rk < Dk, rv < Dv
    q = tl.load(Q + b * sqb + t[:, None] * sqt + h * sqh + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
    k = tl.load(K + b * skb + t[:, None] * skt + h * skh + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
    tok = (b * T + t) * H + h
    # --- decays (same lines in every kernel) ---
    if HAS_G:
        gc = tl.associative_scan(tl.load(G + tok, mask=mt, other=0.0).to(tl.float32), 0, tl.standard._sum_combine)
    else:
        gc = tl.full((C,), 0.0, tl.float32)
    pair = rc[:, None] >= rc[None, :]
    if HAS_R:
        seg = tl.associative_scan(tl.load(R + b * T + t, mask=mt, other=0).to(tl.int32), 0, tl.standard._sum_combine)
        pair = pair & (seg[:, None] == seg[None, :])
        gamma = tl.where(seg == 0, tl.exp(gc), 0.0)
    else:
        gamma = tl.exp(gc)
    D = tl.where(pair, tl.exp(tl.where(pair, gc[:, None] - gc[None, :], 0.0)), 0.0)
    # --- end decays ---
    cb = ((bh * N + n) * C + rc)[:, None]
    S = tl.load(S_all + (bh * N + n) * Dv * Dk + rv[:, None] * Dk + rk[None, :], mask=mv[:, None] & mk[None, :],
                other=0.0).to(tl.float32)                                        # [BV, BK]
    u = tl.load(U + cb * Dv + rv[None, :], mask=mv[None, :], other=0.0).to(tl.float32)
    wk = tl.load(Wk + cb * Dk + rk[None, :], mask=mk[None, :], other=0.0).to(tl.float32)
    W = u - tl.dot(wk, tl.trans(S), input_precision=PREC)                       # pseudo values [C, BV]
    P = tl.dot(q, tl.trans(k), input_precision=PREC) * (scale * D)
    o = tl.dot((scale * gamma)[:, None] * q.to(tl.float32), tl.trans(S), input_precision=PREC)
    o = tl.dot(P, W, acc=o, input_precision=PREC)
    tl.store(O + tok[:, None] * Dv + rv[None, :], o.to(O.dtype.element_ty),
             mask=mt[:, None] & mv[None, :])


def _output_bwd(Q, K, G, R, S_all, U, Wk, dO, dQ, dKo, dU, dWk, dS, dGC,
                sqb, sqt, sqh, skb, skt, skh, sdb, sdt, sdh,
                T, H, Dk, Dv, N,
                HAS_G: tl.constexpr, HAS_R: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                PREC: tl.constexpr, scale: tl.constexpr):
    """dQ [B, T, H, Dk] contiguous (q's dtype, final); chunk-layout float32: dKo, dWk [BH, N, C, Dk], dU [BH, N, C, Dv],
    dS [BH, N, Dv, Dk] (∂L/∂S_n through the outputs), dGC [BH, N, C] (∂L/∂G through the outputs)."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, C)
    t = n * C + rc
    mt = t < T
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk, mv = rk < Dk, rv < Dv
    q = tl.load(Q + b * sqb + t[:, None] * sqt + h * sqh + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
    k = tl.load(K + b * skb + t[:, None] * skt + h * skh + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
    tok = (b * T + t) * H + h
    # --- decays (same lines in every kernel) ---
    if HAS_G:
        gc = tl.associative_scan(tl.load(G + tok, mask=mt, other=0.0).to(tl.float32), 0, tl.standard._sum_combine)
    else:
        gc = tl.full((C,), 0.0, tl.float32)
    pair = rc[:, None] >= rc[None, :]
    if HAS_R:
        seg = tl.associative_scan(tl.load(R + b * T + t, mask=mt, other=0).to(tl.int32), 0, tl.standard._sum_combine)
        pair = pair & (seg[:, None] == seg[None, :])
        gamma = tl.where(seg == 0, tl.exp(gc), 0.0)
    else:
        gamma = tl.exp(gc)
    D = tl.where(pair, tl.exp(tl.where(pair, gc[:, None] - gc[None, :], 0.0)), 0.0)
    # --- end decays ---
    cb = ((bh * N + n) * C + rc)[:, None]
    s_off = (bh * N + n) * Dv * Dk + rv[:, None] * Dk + rk[None, :]
    S = tl.load(S_all + s_off, mask=mv[:, None] & mk[None, :], other=0.0).to(tl.float32)
    u = tl.load(U + cb * Dv + rv[None, :], mask=mv[None, :], other=0.0).to(tl.float32)
    wk = tl.load(Wk + cb * Dk + rk[None, :], mask=mk[None, :], other=0.0).to(tl.float32)
    W = u - tl.dot(wk, tl.trans(S), input_precision=PREC)
    P = tl.dot(q, tl.trans(k), input_precision=PREC) * (scale * D)
    do = tl.load(dO + b * sdb + t[:, None] * sdt + h * sdh + rv[None, :], mask=mt[:, None] & mv[None, :],
                 other=0.0).to(tl.float32)
    qf, kf = q.to(tl.float32), k.to(tl.float32)
    qg = (scale * gamma)[:, None] * qf
    dW = tl.dot(tl.trans(P), do, input_precision=PREC)                          # [C, BV]
    tl.store(dU + cb * Dv + rv[None, :], dW.to(dU.dtype.element_ty), mask=mv[None, :])
    tl.store(dWk + cb * Dk + rk[None, :], (-tl.dot(dW, S, input_precision=PREC)).to(dWk.dtype.element_ty),
             mask=mk[None, :])
    dS_n = tl.dot(tl.trans(do), qg, input_precision=PREC)
    dS_n = tl.dot(tl.trans(dW), -wk, acc=dS_n, input_precision=PREC)
    tl.store(dS + s_off, dS_n.to(dS.dtype.element_ty), mask=mv[:, None] & mk[None, :])
    dP = tl.dot(do, tl.trans(W), input_precision=PREC)                          # ∂L/∂P  [C, C]
    dPD = dP * (scale * D)                                                      # ∂L/∂(Q Kᵀ)
    doS = tl.dot(do, S, input_precision=PREC)                                   # [C, BK]
    dq = tl.dot(dPD, kf, input_precision=PREC) + (scale * gamma)[:, None] * doS
    tl.store(dQ + tok[:, None] * Dk + rk[None, :], dq.to(dQ.dtype.element_ty),
             mask=mt[:, None] & mk[None, :])
    tl.store(dKo + cb * Dk + rk[None, :], tl.dot(tl.trans(dPD), qf, input_precision=PREC).to(dKo.dtype.element_ty),
             mask=mk[None, :])
    dL = dP * P                                                                 # ∂L/∂L_ti, L_ti = G_t − G_i
    dgc = (tl.reduce(dL, 1, tl.standard._sum_combine) - tl.reduce(dL, 0, tl.standard._sum_combine)
           + tl.reduce(qg * doS, 1, tl.standard._sum_combine))                 # dγ ⊙ γ
    tl.store(dGC + (bh * N + n) * C + rc, dgc)


def _prelude_bwd(K, V, Beta, G, R, Xm, U, Wk, S_all, dS_next, dU_o, dWk_o, dKo, dGC_o,
                 dK, dV, dBeta, dG,
                 skb, skt, skh, svb, svt, svh,
                 T, H, Dk, Dv, N,
                 HAS_G: tl.constexpr, HAS_R: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 PREC: tl.constexpr, LP: tl.constexpr):
    """dK, dV contiguous, in k's and v's dtype; dBeta, dG [B, T, H] float32 (contiguous). LP: the dots of float32
    intermediates take operands rounded to k's dtype (HALF_BWD_DOTS). dS_next [BH, N, Dv, Dk]
    (∂L/∂S_{n+1}) from the recurrence's backward: the chunk's own recurrence gradients (dU = Ke dS_{n+1}ᵀ,
    dKe = W dS_{n+1}, dWk = −dU S_n, dγ_{C−1} = ⟨dS_{n+1}, S_n⟩) are formed here, in parallel over chunks;
    dU_o, dWk_o, dKo, dGC_o from _output_bwd."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, C)
    t = n * C + rc
    mt = t < T
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk, mv = rk < Dk, rv < Dv
    DT: tl.constexpr = K.dtype.element_ty if LP else tl.float32
    k = tl.load(K + b * skb + t[:, None] * skt + h * skh + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
    v = tl.load(V + b * svb + t[:, None] * svt + h * svh + rv[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
    tok = (b * T + t) * H + h
    beta = tl.load(Beta + tok, mask=mt, other=0.0).to(tl.float32)
    # --- decays (same lines in every kernel) ---
    if HAS_G:
        gc = tl.associative_scan(tl.load(G + tok, mask=mt, other=0.0).to(tl.float32), 0, tl.standard._sum_combine)
    else:
        gc = tl.full((C,), 0.0, tl.float32)
    pair = rc[:, None] >= rc[None, :]
    if HAS_R:
        seg = tl.associative_scan(tl.load(R + b * T + t, mask=mt, other=0).to(tl.int32), 0, tl.standard._sum_combine)
        pair = pair & (seg[:, None] == seg[None, :])
        gamma = tl.where(seg == 0, tl.exp(gc), 0.0)
    else:
        gamma = tl.exp(gc)
    D = tl.where(pair, tl.exp(tl.where(pair, gc[:, None] - gc[None, :], 0.0)), 0.0)
    # --- end decays ---
    cb = ((bh * N + n) * C + rc)[:, None]
    # Ordered so that few [C, C] / [C, D] tiles are live at once (4 warps: fewer register spills): each partial
    # gradient is loaded right before its use and each [C, C] tile is reduced to row / column sums as soon as it is made.
    e = tl.reduce(tl.where(rc[:, None] == C - 1, D, 0.0), 0, tl.standard._sum_combine)   # D_{C−1, i}
    kf, vf = k.to(tl.float32), v.to(tl.float32)
    # the recurrence S_{n+1} = γ_{C−1} S_n + (U − Wk S_nᵀ)ᵀ Ke: gradients from dS_{n+1}
    s_off = (bh * N + n) * Dv * Dk + rv[:, None] * Dk + rk[None, :]
    S = tl.load(S_all + s_off, mask=mv[:, None] & mk[None, :], other=0.0).to(tl.float32)
    dSn = tl.load(dS_next + s_off, mask=mv[:, None] & mk[None, :], other=0.0).to(tl.float32)
    dgl = tl.reduce(tl.reduce(dSn * S, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine)
    dw_r = tl.dot((e[:, None] * kf).to(DT), tl.trans(dSn).to(DT), input_precision=PREC)        # ∂L/∂W through S_{n+1}  [C, BV]
    W = tl.load(U + cb * Dv + rv[None, :], mask=mv[None, :], other=0.0).to(tl.float32) - tl.dot(
        tl.load(Wk + cb * Dk + rk[None, :], mask=mk[None, :], other=0.0).to(DT), tl.trans(S).to(DT),
        input_precision=PREC)
    dke = tl.dot(W.to(DT), dSn.to(DT), input_precision=PREC)                                  # ∂L/∂Ke  [C, BK]
    dwk = tl.load(dWk_o + cb * Dk + rk[None, :], mask=mk[None, :], other=0.0).to(tl.float32) - tl.dot(
        dw_r.to(DT), S.to(DT), input_precision=PREC)
    du = tl.load(dU_o + cb * Dv + rv[None, :], mask=mv[None, :], other=0.0).to(tl.float32) + dw_r
    # Ke = e ⊙ K, e_i = exp(G_{C−1} − G_i) [same segment]; γ_{C−1} = exp(G_{C−1}) [no reset in the chunk]
    dk = e[:, None] * dke
    dee = e * tl.reduce(dke * kf, 1, tl.standard._sum_combine)                  # ∂L/∂e ⊙ e
    bg = beta * gamma
    # U = X (β V), Wk = X (βγ K)
    X = tl.load(Xm + (bh * N + n) * C * C + rc[:, None] * C + rc[None, :], mask=rc[:, None] >= rc[None, :],
                other=0.0).to(tl.float32)
    drv = tl.dot(tl.trans(X).to(DT), du.to(DT), input_precision=PREC)                         # ∂L/∂(β V)
    drk = tl.dot(tl.trans(X).to(DT), dwk.to(DT), input_precision=PREC)                        # ∂L/∂(βγ K)
    dX = tl.dot(du.to(DT), tl.trans(beta[:, None] * vf).to(DT), input_precision=PREC)
    dX = tl.dot(dwk.to(DT), tl.trans(bg[:, None] * kf).to(DT), acc=dX, input_precision=PREC)
    # X = (I + A)⁻¹  ⇒  dA = −Xᵀ dX Xᵀ on the strictly lower part; A = (β ⊙rows K Kᵀ) ⊙ D⁻
    strict = rc[:, None] > rc[None, :]
    dA = tl.where(strict, -tl.dot(tl.dot(tl.trans(X).to(DT), dX.to(DT), input_precision=PREC).to(DT), tl.trans(X).to(DT),
                                  input_precision=PREC),
                  0.0)
    tl.store(dV + tok[:, None] * Dv + rv[None, :], (beta[:, None] * drv).to(dV.dtype.element_ty),
             mask=mt[:, None] & mv[None, :])
    kdrk = tl.reduce(kf * drk, 1, tl.standard._sum_combine)
    dbeta = tl.reduce(vf * drv, 1, tl.standard._sum_combine) + gamma * kdrk
    dgamma = beta * kdrk
    dk += bg[:, None] * drk
    dAD = dA * D
    dAA = dAD * tl.where(strict, tl.dot(k, tl.trans(k), input_precision=PREC), 0.0)   # dA ⊙ (K Kᵀ ⊙ D⁻)
    dbeta += tl.reduce(dAA, 1, tl.standard._sum_combine)
    dAA = dAA * beta[:, None]                                                   # dA ⊙ A
    dl = tl.reduce(dAA, 1, tl.standard._sum_combine) - tl.reduce(dAA, 0, tl.standard._sum_combine)
    dKK = dAD * beta[:, None]
    dk = tl.dot(dKK.to(DT), kf.to(DT), acc=dk, input_precision=PREC)
    dk = tl.dot(tl.trans(dKK).to(DT), kf.to(DT), acc=dk, input_precision=PREC)
    dk += tl.load(dKo + cb * Dk + rk[None, :], mask=mk[None, :], other=0.0).to(tl.float32)
    tl.store(dK + tok[:, None] * Dk + rk[None, :], dk.to(dK.dtype.element_ty),
             mask=mt[:, None] & mk[None, :])
    tl.store(dBeta + tok, dbeta, mask=mt)
    if HAS_G:
        dgc = dl - dee + dgamma * gamma + tl.load(dGC_o + (bh * N + n) * C + rc)
        dlast = tl.reduce(dee, 0, tl.standard._sum_combine) + dgl * tl.reduce(
            tl.where(rc == C - 1, gamma, 0.0), 0, tl.standard._sum_combine)
        dgc += tl.where(rc == C - 1, dlast, 0.0)
        # G_t = Σ_{s ≤ t} g_s  ⇒  dg_s = Σ_{t ≥ s} dG_t
        tl.store(dG + tok, tl.associative_scan(dgc, 0, tl.standard._sum_combine, reverse=True),
                 mask=mt)


def _build(interpret: bool) -> dict:
    fns = {"prelude_fwd": _prelude_fwd, "output_fwd": _output_fwd, "output_bwd": _output_bwd,
           "prelude_bwd": _prelude_bwd}
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return {n: InterpretedFunction(f) for n, f in fns.items()}
    from triton.runtime.jit import JITFunction
    return {n: JITFunction(f, do_not_specialize=["T", "N"]) for n, f in fns.items()}


_JIT = _build(False) if triton is not None else None     # built at import: torch.compile finds plain kernels
_interpreted = functools.cache(lambda: _build(True))


def _kernels(interpret: bool) -> dict:
    return _interpreted() if interpret else _JIT


# ------------------------------------------------------------------------------------------------------ autograd

def _inner(x: Tensor) -> Tensor:
    """Unit last stride (the kernels index the feature axis directly); the other strides are passed."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _meta(Dk: int, Dv: int, C: int, prec: str) -> dict:
    BK, BV = triton_impl._pow2(Dk), triton_impl._pow2(Dv)
    # 4 warps, although at C = 64 the backward kernels then spill 2.6–3 KB of registers (ptxas; < 1 KB at 8 warps):
    # two programs per SM hide each other's latency, 1.4–1.8× faster per kernel on an H100 (delta_rule_tune.py)
    return {"C": C, "BK": BK, "BV": BV, "PREC": prec, "num_warps": 4, "num_stages": 1}


def _tuned(kernel: str, meta: dict) -> dict:
    return {**meta, "num_warps": WARPS[kernel]} if kernel in WARPS else meta


def _half_bwd_dots(k: Tensor, v: Tensor) -> bool:
    """HALF_BWD_DOTS for these inputs ("auto": bf16/fp16 with Dk = Dv = 64, see there)."""
    if k.dtype == torch.float32:
        return False
    if HALF_BWD_DOTS == "auto":
        return k.shape[-1] == v.shape[-1] == 64
    return bool(HALF_BWD_DOTS)


def _s3(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


class _FusedDeltaRule(torch.autograd.Function):
    """(q, k, v [B, T, H, D]; beta, g [B, T, H] contiguous; S0 [B, H, Dv, Dk] or None; reset int8 [B, T]
    contiguous or None) -> (o [B, T, H, Dv], S_N [B, H, Dv, Dk] float32)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, S0, reset, scale, chunk_size, prec, rec_dtype):
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        C = chunk_size
        N = -(-T // C)
        BH = B * H
        dev = q.device
        f32 = {"dtype": torch.float32, "device": dev}
        st = {"dtype": STORE_DTYPE or (torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32), "device": dev}
        rt = {**st, "dtype": rec_dtype or st["dtype"]}
        Xm = torch.empty(BH, N, C, C, **st)
        U = torch.empty(BH, N, C, Dv, **rt)
        Wk = torch.empty(BH, N, C, Dk, **rt)
        Ke = torch.empty(BH, N, C, Dk, **rt)
        GL = torch.empty(BH, N, **f32)
        gx = g if g is not None else beta          # a valid pointer when there is no g / reset (never read)
        rx = reset if reset is not None else beta
        meta = {"HAS_G": g is not None, "HAS_R": reset is not None, **_meta(Dk, Dv, C, prec)}
        kern = _kernels(dev.type == "cpu")
        kern["prelude_fwd"][(N, BH)](k, v, beta, gx, rx, Xm, U, Wk, Ke, GL, *_s3(k), *_s3(v),
                                     T, H, Dk, Dv, N, NB_ROUNDS=max(0, (C // 16).bit_length() - 2),
                                     **_tuned("prelude_fwd", meta))
        S0_ = (S0.float() if S0 is not None else torch.zeros(B, H, Dv, Dk, **f32)).reshape(BH, Dv, Dk).contiguous()
        S_all, S_fin = triton_impl.recurrence_forward(U, Wk, Ke, GL, S0_, prec, Xm.dtype)
        o = torch.empty(B, T, H, Dv, dtype=q.dtype, device=dev)
        kern["output_fwd"][(N, BH)](q, k, gx, rx, S_all, U, Wk, o, *_s3(q), *_s3(k), T, H, Dk, Dv, N, scale=scale,
                                    **_tuned("output_fwd", meta))
        ctx.save_for_backward(q, k, v, beta, g, reset, Xm, U, Wk, Ke, GL, S_all)
        ctx.args = (scale, C, prec, None if S0 is None else S0.dtype)
        ctx.set_materialize_grads(False)
        return o, S_fin.view(B, H, Dv, Dk)

    @staticmethod
    def backward(ctx, do, dS_fin):
        q, k, v, beta, g, reset, Xm, U, Wk, Ke, GL, S_all = ctx.saved_tensors
        scale, C, prec, S0_dtype = ctx.args
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        BH, N = B * H, U.shape[1]
        dev = q.device
        f32 = {"dtype": torch.float32, "device": dev}
        st = {"dtype": Xm.dtype, "device": dev}
        gx = g if g is not None else beta
        rx = reset if reset is not None else beta
        meta = {"HAS_G": g is not None, "HAS_R": reset is not None, **_meta(Dk, Dv, C, prec)}
        kern = _kernels(dev.type == "cpu")
        dq = torch.empty(B, T, H, Dk, dtype=q.dtype, device=dev)
        dKo = torch.empty(BH, N, C, Dk, **st)
        dU_o = torch.empty(BH, N, C, Dv, **st)
        dWk_o = torch.empty(BH, N, C, Dk, **st)
        dGC_o = torch.empty(BH, N, C, **f32)
        if do is not None:
            do = _inner(do)
            dS_o = torch.empty(BH, N, Dv, Dk, dtype=U.dtype, device=dev)    # the backward walk's input, as U is the forward's
            kern["output_bwd"][(N, BH)](q, k, gx, rx, S_all, U, Wk, do, dq, dKo, dU_o, dWk_o, dS_o, dGC_o,
                                        *_s3(q), *_s3(k), *_s3(do), T, H, Dk, Dv, N, scale=scale,
                                        **_tuned("output_bwd", meta))
        else:                                        # only the final state is used: no output gradients
            dS_o = None
            for x in (dq, dKo, dU_o, dWk_o, dGC_o):
                x.zero_()
        dS_next, dS0 = triton_impl.recurrence_backward_states(
            Wk, Ke, GL, dS_o, None if dS_fin is None else dS_fin.reshape(BH, Dv, Dk), Dv, prec, Xm.dtype)
        dk = torch.empty(B, T, H, Dk, dtype=k.dtype, device=dev)
        dv = torch.empty(B, T, H, Dv, dtype=v.dtype, device=dev)
        dbeta = torch.empty(B, T, H, **f32)
        dg = torch.empty(B, T, H, **f32) if g is not None else dbeta
        kern["prelude_bwd"][(N, BH)](k, v, beta, gx, rx, Xm, U, Wk, S_all, dS_next, dU_o, dWk_o, dKo, dGC_o,
                                     dk, dv, dbeta, dg, *_s3(k), *_s3(v), T, H, Dk, Dv, N,
                                     LP=_half_bwd_dots(k, v), **_tuned("prelude_bwd", meta))
        return (dq, dk, dv, dbeta.to(beta.dtype), dg.to(g.dtype) if g is not None else None,
                dS0.view(B, H, Dv, Dk).to(S0_dtype) if S0_dtype is not None else None, None, None, None, None,
                None)


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, *, initial_state: Tensor | None,
               reset: Tensor | None, chunk_size: int, scale: float | None, prec: str) -> tuple[Tensor, Tensor]:
    """The whole op in Triton (inputs and device already checked by triton_impl.delta_rule): o [B, T, H, Dv] in q's dtype and
    the final state [B, H, Dv, Dk] float32."""
    r = reset.to(torch.int8).contiguous() if reset is not None else None
    rec = RECURRENCE_DTYPE
    if rec == "auto":   # see RECURRENCE_DTYPE: the storage dtype under autograd, float32 otherwise
        grads = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                                for x in (q, k, v, beta, g, initial_state))
        rec = None if grads else torch.float32
    return _FusedDeltaRule.apply(_inner(q), _inner(k), _inner(v), beta.contiguous(),
                                 g.contiguous() if g is not None else None, initial_state, r,
                                 1.0 if scale is None else float(scale), chunk_size, prec, rec)
