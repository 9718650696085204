"""Compressive (Infini-attention) memory with the loop over segments in Triton: backend "triton" of op
"compressive_memory". Same contract and notation as reference.py (σ applied by the caller; R memories per head):

  per segment n (memories cleared first when it starts a document):
    read   num_{t,r} = σ(q_t) M_r,  den_{t,r} = σ(q_t) · z_r            (every r, from the pre-segment memories)
    write  into r_n = write_slot[n], committed only if the segment is complete:
           val_t = v_t − σ(k_t) M_r / max(σ(k_t) · z_r, ε)  (delta)  or  v_t  (linear)
           M_r += Σ_t σ(k_t)ᵀ val_t,   z_r += Σ_t σ(k_t)

What runs where. The chunked form is ~15 launches per segment forward, and its backward zero-fills a full-size
gradient for every per-segment slice (sq[:, n], ...) — O(N²) traffic for N segments — besides permuting [B, C, H, K]
layouts inside each einsum. Here one program per batch·head walks all segments with its memories M_r [K, V] in
registers (`_seg_fwd`), reading the segment's tokens in tiles of BC rows straight from the caller's
[B, N, C, H, ·] layout; the backward (`_seg_bwd`) walks them in reverse from the saved pre-segment memories and
writes every gradient once. Kernel math is float32 (IEEE dots by default, `precision()`), like the chunked form.

CPU tensors run through the Triton interpreter when TRITON_INTERPRET=1 (tests without a GPU).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from memlm.ops.triton_common import interpreting, tl, triton  # None, None without Triton
from memlm.ops.triton_common import loop_count as _count

from ..neural_memory.triton_memory import precision

__all__ = ["AVAILABLE", "MAX_DIM", "interpreting", "segment_memory", "supports"]

AVAILABLE = triton is not None
MAX_DIM = 128   # K, V: a memory M_r [K, V] is one register tile
# tl.dot precision: memlm.ops.neural_memory.triton_memory.precision(), shared by both backends ("ieee" unless
# MEMLM_TRITON_PRECISION says "tf32x3" or "tf32").



def supports(sq: Tensor, sk: Tensor, v: Tensor, *, M0: Tensor, **_: object) -> bool:
    """CUDA tensors (or CPU under TRITON_INTERPRET=1), Triton importable, K, V ≤ MAX_DIM."""
    if not AVAILABLE or not (sq.is_cuda or (sq.device.type == "cpu" and interpreting())):
        return False
    return sq.dim() == 5 and v.dim() == 5 and sq.shape[-1] <= MAX_DIM and v.shape[-1] <= MAX_DIM


# ------------------------------------------------------------------------------------------------------ kernels
# Plain functions, made Triton kernels on first use (`_kernels`): compiled for CUDA tensors, interpreted for CPU ones.
# Only builtins inside (tl.full, tl.reduce with the sum combiner): the jitted tl.zeros / tl.sum would only interpret
# when TRITON_INTERPRET was set before `import triton`.
# Layouts (contiguous float32 unless said): SQ, SK [B, N, C, H, K], Vv [B, N, C, H, V]; Slot int32, Start, Comp
# int8 [B, N]; Num [B, N, C, H, R, V], Den [B, N, C, H, R], Zpre [B, N, H, R, K], Mpre [B, N, H, R, K, V];
# Mst [B, H, R, K, V], Zst [B, H, R, K] (the running memories, updated in place).

def _seg_fwd(SQ, SK, Vv, Slot, Start, Comp, Num, Den, Zpre, Mpre, Mst, Zst,
             H, N, C, R, K, V, NCT, eps, save,
             DELTA: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Grid (B·H,). Mst, Zst hold M0, z0 on entry and the final memories on exit; with save ≠ 0 the pre-segment
    memories go to Mpre (for the backward)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    m_kv = mk[:, None] & mv[None, :]
    off_kv = rk[:, None] * V + rv[None, :]
    for n in range(N):
        fresh = tl.load(Start + b * N + n) != 0
        comp = tl.load(Comp + b * N + n).to(tl.float32)
        slot = tl.load(Slot + b * N + n)
        seg = b * N + n
        for r in range(R):
            m_r = tl.load(Mst + (bh * R + r) * K * V + off_kv, mask=m_kv, other=0.0)
            z_r = tl.load(Zst + (bh * R + r) * K + rk, mask=mk, other=0.0)
            m_r = tl.where(fresh, 0.0, m_r)          # where, not a multiply: a new document cuts the memory off
            z_r = tl.where(fresh, 0.0, z_r)
            tl.store(Zpre + ((seg * H + h) * R + r) * K + rk, z_r, mask=mk)
            if save != 0:
                tl.store(Mpre + ((seg * H + h) * R + r) * K * V + off_kv, m_r, mask=m_kv)
            for ct in range(NCT):
                c = ct * BC + rc
                mc = c < C
                tok = (seg * C + c) * H + h                                  # [BC] token rows of this head
                q = tl.load(SQ + tok[:, None] * K + rk[None, :], mask=mc[:, None] & mk[None, :], other=0.0)
                num = tl.dot(q, m_r, input_precision=PREC)                   # [BC, BV]
                tl.store(Num + (tok[:, None] * R + r) * V + rv[None, :], num, mask=mc[:, None] & mv[None, :])
                tl.store(Den + tok * R + r, tl.reduce(q * z_r[None, :], 1, tl.standard._sum_combine), mask=mc)
            if r == slot:
                dm = tl.full([BK, BV], 0.0, tl.float32)
                dzz = tl.full([BK], 0.0, tl.float32)
                for ct in range(NCT):
                    c = ct * BC + rc
                    mc = c < C
                    tok = (seg * C + c) * H + h
                    k = tl.load(SK + tok[:, None] * K + rk[None, :], mask=mc[:, None] & mk[None, :], other=0.0)
                    val = tl.load(Vv + tok[:, None] * V + rv[None, :], mask=mc[:, None] & mv[None, :], other=0.0)
                    if DELTA:
                        ret = tl.dot(k, m_r, input_precision=PREC)
                        nrm = tl.maximum(tl.reduce(k * z_r[None, :], 1, tl.standard._sum_combine), eps)
                        val = val - ret / nrm[:, None]
                    dm += tl.dot(tl.trans(k), val, input_precision=PREC)
                    dzz += tl.reduce(k, 0, tl.standard._sum_combine)
                m_r = m_r + comp * dm
                z_r = z_r + comp * dzz
            tl.store(Mst + (bh * R + r) * K * V + off_kv, m_r, mask=m_kv)
            tl.store(Zst + (bh * R + r) * K + rk, z_r, mask=mk)
            tl.debug_barrier()                   # the next segment reads M_r back, maybe in another thread layout


def _seg_bwd(SQ, SK, Vv, Slot, Start, Comp, Zpre, Mpre, dNum, dDen, dZpre, dM, dZ, dSQ, dSK, dV,
             H, N, C, R, K, V, NCT, eps,
             DELTA: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Grid (B·H,). dM [B, H, R, K, V], dZ [B, H, R, K] hold the gradients of the final memories on entry and
    those of M0, z0 on exit. dSQ, dSK, dV (zero on entry) receive the token gradients."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    m_kv = mk[:, None] & mv[None, :]
    off_kv = rk[:, None] * V + rv[None, :]
    for nn in range(N):
        n = N - 1 - nn
        fresh = tl.load(Start + b * N + n) != 0
        comp = tl.load(Comp + b * N + n).to(tl.float32)
        slot = tl.load(Slot + b * N + n)
        seg = b * N + n
        for r in range(R):
            m_r = tl.load(Mpre + ((seg * H + h) * R + r) * K * V + off_kv, mask=m_kv, other=0.0)
            z_r = tl.load(Zpre + ((seg * H + h) * R + r) * K + rk, mask=mk, other=0.0)
            g_m = tl.load(dM + (bh * R + r) * K * V + off_kv, mask=m_kv, other=0.0)   # ∂L/∂M_r after the segment
            g_z = tl.load(dZ + (bh * R + r) * K + rk, mask=mk, other=0.0)
            acc_m = g_m                                  # M_r passes through the write unchanged ...
            acc_z = g_z + tl.load(dZpre + ((seg * H + h) * R + r) * K + rk, mask=mk, other=0.0)
            for ct in range(NCT):                        # ... and is read by every token
                c = ct * BC + rc
                mc = c < C
                m_ck = mc[:, None] & mk[None, :]
                tok = (seg * C + c) * H + h
                q = tl.load(SQ + tok[:, None] * K + rk[None, :], mask=m_ck, other=0.0)
                dnum = tl.load(dNum + (tok[:, None] * R + r) * V + rv[None, :], mask=mc[:, None] & mv[None, :],
                               other=0.0)
                dden = tl.load(dDen + tok * R + r, mask=mc, other=0.0)
                dq = tl.dot(dnum, tl.trans(m_r), input_precision=PREC) + dden[:, None] * z_r[None, :]
                pq = dSQ + tok[:, None] * K + rk[None, :]
                tl.store(pq, tl.load(pq, mask=m_ck, other=0.0) + dq, mask=m_ck)   # summed over r
                acc_m += tl.dot(tl.trans(q), dnum, input_precision=PREC)
                acc_z += tl.reduce(dden[:, None] * q, 0, tl.standard._sum_combine)
            if r == slot:                                # the write: M_r += comp Σ kᵀ val, z_r += comp Σ k
                gc_m = comp * g_m
                gc_z = comp * g_z
                for ct in range(NCT):
                    c = ct * BC + rc
                    mc = c < C
                    m_ck = mc[:, None] & mk[None, :]
                    m_cv = mc[:, None] & mv[None, :]
                    tok = (seg * C + c) * H + h
                    k = tl.load(SK + tok[:, None] * K + rk[None, :], mask=m_ck, other=0.0)
                    val = tl.load(Vv + tok[:, None] * V + rv[None, :], mask=m_cv, other=0.0)
                    dval = tl.dot(k, gc_m, input_precision=PREC)                      # [BC, BV]
                    if DELTA:
                        ret = tl.dot(k, m_r, input_precision=PREC)
                        kz = tl.reduce(k * z_r[None, :], 1, tl.standard._sum_combine)
                        nrm = tl.maximum(kz, eps)
                        val = val - ret / nrm[:, None]
                    dk = tl.dot(val, tl.trans(gc_m), input_precision=PREC) + gc_z[None, :]
                    if DELTA:
                        dret = -dval / nrm[:, None]
                        dnrm = tl.reduce(dval * ret, 1, tl.standard._sum_combine) / (nrm * nrm)
                        dnrm = tl.where(kz >= eps, dnrm, 0.0)                        # clamp_min's gradient
                        dk += tl.dot(dret, tl.trans(m_r), input_precision=PREC) + dnrm[:, None] * z_r[None, :]
                        acc_m += tl.dot(tl.trans(k), dret, input_precision=PREC)
                        acc_z += tl.reduce(dnrm[:, None] * k, 0, tl.standard._sum_combine)
                    tl.store(dSK + tok[:, None] * K + rk[None, :], dk, mask=m_ck)
                    tl.store(dV + tok[:, None] * V + rv[None, :], dval, mask=m_cv)
            # a segment that starts a document cleared the memories: nothing flows to the earlier segments
            tl.store(dM + (bh * R + r) * K * V + off_kv, tl.where(fresh, 0.0, acc_m), mask=m_kv)
            tl.store(dZ + (bh * R + r) * K + rk, tl.where(fresh, 0.0, acc_z), mask=mk)
            tl.debug_barrier()                           # dSQ, dM, dZ are read back by the next r / segment


def _build(interpret: bool) -> tuple:
    """(forward, backward), compiled for the GPU or wrapped for the interpreter (CPU tensors)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(_seg_fwd), InterpretedFunction(_seg_bwd)
    varying = ["N", "R", "NCT", "save"]   # change from call to call: one compiled kernel for all values
    return triton.jit(_seg_fwd, do_not_specialize=varying), triton.jit(_seg_bwd, do_not_specialize=varying)


# The compiled kernels are built at import, so that a torch.compile'd model finds plain kernel objects and launches
# them in its graph (building them inside the trace would break the graph); the interpreted ones only when a test
# asks (CPU tensors under TRITON_INTERPRET=1).
_JIT = _build(False) if AVAILABLE else None
_interpreted = functools.cache(lambda: _build(True))


def _kernels(interpret: bool):
    """(forward, backward) kernels for CPU tensors (interpreter) or CUDA tensors."""
    return _interpreted() if interpret else _JIT



def _empty(like: Tensor, *shape: int) -> Tensor:
    """Uninitialised float32 buffer for kernel outputs (tests NaN-poison it by patching this)."""
    return like.new_empty(shape)


def _config(C: int, K: int, V: int) -> dict:
    """Tiles of 16 tokens: compiled for sm_90 without a GPU (cuobjdump -res-usage), the IEEE-dot kernels at K = V = 64
    spill 0.1–0.4 KB a thread with 16-token tiles and 8 warps, 1–10 KB with 32–64-token tiles (FMA dots keep
    per-thread operand panels as long as the contraction); K = V = 128 spills ~10 KB whatever the tile."""
    BK, BV = (max(16, triton.next_power_of_2(d)) for d in (K, V))
    return {"BC": 16, "BK": BK, "BV": BV, "num_warps": 8 if BK * BV >= 64 * 64 else 4}


class _Segments(torch.autograd.Function):
    """sq, sk [B, N, C, H, K], v [B, N, C, H, V], M0 [B, H, R, K, V], z0 [B, H, R, K] (contiguous float32);
    slot int32, start, comp int8 [B, N] -> num, den, z_pre, M, z (see reference.segment_memory)."""

    @staticmethod
    def forward(ctx, sq, sk, v, M0, z0, slot, start, comp, delta, eps):
        B, N, C, H, K = sq.shape
        R, V = M0.shape[2], v.shape[-1]
        interpret = sq.device.type == "cpu"
        save = any(ctx.needs_input_grad[:5])
        num, den = _empty(sq, B, N, C, H, R, V), _empty(sq, B, N, C, H, R)
        z_pre = _empty(sq, B, N, H, R, K)
        M_pre = _empty(sq, B, N, H, R, K, V) if save else num
        M, z = M0.clone(), z0.clone()
        cfg = _config(C, K, V)
        fwd, _ = _kernels(interpret)
        fwd[(B * H,)](sq, sk, v, slot, start, comp, num, den, z_pre, M_pre, M, z,
                      H, _count(N, interpret), C, _count(R, interpret), K, V,
                      _count(triton.cdiv(C, cfg["BC"]), interpret), eps, int(save), DELTA=delta, PREC=precision(),
                      **cfg)
        if save:
            ctx.save_for_backward(sq, sk, v, slot, start, comp, z_pre, M_pre)
            ctx.meta = (delta, eps)
        return num, den, z_pre, M, z

    @staticmethod
    def backward(ctx, dnum, dden, dz_pre, dM, dz):
        sq, sk, v, slot, start, comp, z_pre, M_pre = ctx.saved_tensors
        delta, eps = ctx.meta
        B, N, C, H, K = sq.shape
        R, V = M_pre.shape[3], v.shape[-1]
        interpret = sq.device.type == "cpu"
        dM0, dz0 = dM.float().contiguous().clone(), dz.float().contiguous().clone()
        dsq, dsk, dv = torch.zeros_like(sq), torch.zeros_like(sk), torch.zeros_like(v)
        cfg = _config(C, K, V)
        _, bwd = _kernels(interpret)
        bwd[(B * H,)](sq, sk, v, slot, start, comp, z_pre, M_pre, dnum.float().contiguous(),
                      dden.float().contiguous(), dz_pre.float().contiguous(), dM0, dz0, dsq, dsk, dv,
                      H, _count(N, interpret), C, _count(R, interpret), K, V,
                      _count(triton.cdiv(C, cfg["BC"]), interpret), eps, DELTA=delta, PREC=precision(), **cfg)
        return dsq, dsk, dv, dM0, dz0, None, None, None, None, None


def segment_memory(sq: Tensor, sk: Tensor, v: Tensor, *, M0: Tensor, z0: Tensor, write_slot: Tensor,
                   starts_doc: Tensor, complete: Tensor, delta: bool, eps: float = 1e-6
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See reference.segment_memory: sq, sk [B, N, C, H, K]; v [B, N, C, H, V]; M0 [B, H, R, K, V]; z0 [B, H, R, K];
    write_slot [B, N]; starts_doc, complete [B, N] -> num, den, z_pre, M, z (float32)."""
    if not supports(sq, sk, v, M0=M0):
        raise ValueError(f"compressive_memory backend 'triton' needs Triton, CUDA tensors (or CPU with "
                         f"TRITON_INTERPRET=1) and K, V ≤ {MAX_DIM}; use backend 'chunked' otherwise")
    f32 = (lambda t: t.float().contiguous())
    return _Segments.apply(f32(sq), f32(sk), f32(v), f32(M0), f32(z0), write_slot.to(torch.int32).contiguous(),
                           starts_doc.to(torch.int8).contiguous(), complete.to(torch.int8).contiguous(), bool(delta),
                           float(eps))
