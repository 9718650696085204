"""One-token decode attention over a static KV buffer: dense-mask SDPA (reference) or split-KV Triton kernels.

Notation: B batch, Hq / Hk query / key-value heads (Hq a multiple of Hk), L buffer slots, Np persistent keys, Dh head
width, W window; NS splits of SPLIT consecutive slots, each walked in blocks of BLOCK slots.

Visibility (memlm/ops/attention.py, AttentionCore in memlm/layers/attention.py): slot j (stream position kpos[b, j],
−1 = empty) is visible to the query of row b (position qpos[b], document start qdoc[b]) iff
    kpos ≥ 0  and  kpos ≤ qpos  and  kpos ≥ qdoc  and (no window or qpos − kpos < W);
the Np persistent keys (one set per KV head) are visible to every query. Scale 1/√Dh.

Backends (memlm.ops.dispatch, op "decode_attention"):
  "sdpa"    the boolean mask over all L slots and F.scaled_dot_product_attention, persistent keys concatenated in
            front (any device, any T; the reference and the CPU default).
  "triton"  flash-decoding: a decode query is one row, so SDPA parallelises over B·Hq programs only (8 at batch 1),
            each reading the whole buffer. Here pass 1 (`_split_kernel`, grid (NS [+1], B·Hq)) gives each program one
            head and SPLIT slots: scores as a product and row sum in float32, an online softmax, and its partial
            (max m, sum l, unnormalised output acc) in float32 buffers; an extra last split reads the persistent
            keys. Pass 2 (`_combine_kernel`, grid (B·Hq,)) merges the partials: o = Σ e^(m−M) acc / Σ e^(m−M) l.
            K, V and kpos of a block are loaded together (the K / V loads do not wait for kpos); with slot_is_pos
            (a full buffer: position p in slot p) slots outside [qdoc, qpos] are masked out of all three loads, so
            the unused end of a buffer costs no memory traffic. T = 1, Dh ≤ 256; CUDA (automatic there) or CPU
            under TRITON_INTERPRET=1 (by name only). A row with no visible key gets 0 (SDPA: NaN).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from memlm.ops import dispatch
from memlm.ops.attention import masked_attention_sdpa
from memlm.ops.triton_common import interpreting, tl, triton  # None, None without Triton

__all__ = ["AVAILABLE", "decode_attention", "decode_attention_sdpa", "decode_attention_triton", "supports"]

AVAILABLE = triton is not None
MAX_HEAD_DIM = 256
# Aim for about this many split programs (B·Hq·NS). H100, B 1, Hq 8, Dh 64, bf16, cold L2 (2026-11-22): 512 programs
# of 2 warps read 16K slots in 20.0 µs and 64K in 57.1 µs (SDPA: 33.2 / 65.4); 1,024 programs took 21.3 / 58.9.
PROGRAMS = 512
MAX_SPLIT = 4096
# overrides for tuning runs (benchmarks/decode_attention.py --tune): "BLOCK" slots per iteration, "num_warps",
# "num_stages" of the split kernel
TUNE: dict[str, int] = {}
# initial running max: finite, so an empty split ends with l = 0 and e^(m − M) stays finite (no inf − inf)
NEG = tl.constexpr(-1e30) if tl is not None else -1e30


def decode_attention_sdpa(q: Tensor, k_cache: Tensor, v_cache: Tensor, kpos: Tensor, qpos: Tensor, qdoc: Tensor, *,
                          window: int | None = None, persist_k: Tensor | None = None, persist_v: Tensor | None = None,
                          slot_is_pos: bool = False) -> Tensor:
    """q [B, Hq, T, Dh]; k_cache, v_cache [B, Hk, L, Dh]; kpos [B, L]; qpos, qdoc [B] (T = 1) or [B, T];
    persist_k, persist_v [Hk, Np, Dh] or None -> o [B, Hq, T, Dh] in q's dtype. slot_is_pos is ignored."""
    B = q.shape[0]
    keys, vals = k_cache.to(q.dtype), v_cache.to(q.dtype)
    n = 0
    if persist_k is not None:
        n = persist_k.shape[1]
        keys = torch.cat([persist_k.to(q.dtype).expand(B, -1, -1, -1), keys], dim=2)
        vals = torch.cat([persist_v.to(q.dtype).expand(B, -1, -1, -1), vals], dim=2)
    # the same mask rule as every other attention call (ops/attention.py)
    return masked_attention_sdpa(q, keys, vals, qpos.view(B, -1), kpos, qdoc.view(B, -1), window=window, n_persist=n)


def supports(q: Tensor, k_cache: Tensor, v_cache: Tensor, *_: object, **__: object) -> bool:
    """Triton importable; CUDA tensors (or CPU under TRITON_INTERPRET=1); one query (T = 1); Dh ≤ 256; float caches."""
    if not AVAILABLE or q.dim() != 4 or k_cache.dim() != 4 or q.shape[2] != 1 or q.shape[-1] > MAX_HEAD_DIM:
        return False
    if not (q.is_cuda or (q.device.type == "cpu" and interpreting())):
        return False
    floats = (torch.float32, torch.bfloat16, torch.float16)
    return q.dtype in floats and k_cache.dtype in floats and v_cache.dtype in floats


# ------------------------------------------------------------------------------------------------------ kernels
# Plain functions made kernels in `_build` (compiled or interpreted, as in delta_rule/triton_impl.py). Only builtins
# inside: tl.reduce with the standard sum / max combiners for tl.sum / tl.max, tl.full for tl.zeros — the jitted
# helpers would only interpret when TRITON_INTERPRET was set before `import triton`.
# Layouts (unit last stride, other strides passed): Q [B, Hq, 1, Dh]; K, V [B, Hk, L, Dh]; KP [B, L] int64;
# QP, QD [B] int64; PK, PV [Hk, Np, Dh]; partials (contiguous float32) Mp, Lp [B·Hq, NSP], Ap [B·Hq, NSP, BD] with
# NSP = NS (+1 with persistent keys); O [B, Hq, 1, Dh]. Program (s, bh) with bh = b·Hq + hq.

def _split_kernel(Q, K, V, KP, QP, QD, PK, PV, Mp, Lp, Ap,
                  sqb, sqh, skb, skh, skl, svb, svh, svl, skpb, sqpb, sqdb, spkh, spkl, spvh, spvl,
                  L, NS, NSP, NP, HQ, GROUP, W,
                  D: tl.constexpr, BD: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr,
                  SCALE: tl.constexpr, HAS_W: tl.constexpr, SKIP: tl.constexpr):
    """Split s < NS covers slots [s·SPLIT, (s+1)·SPLIT); split NS (when NSP > NS) the persistent keys (NP ≤ SPLIT)."""
    s = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // HQ
    hq = bh % HQ
    hk = hq // GROUP
    rd = tl.arange(0, BD)
    dm = rd < D
    rb = tl.arange(0, BLOCK)
    q = tl.load(Q + b * sqb + hq * sqh + rd, mask=dm, other=0.0).to(tl.float32) * SCALE
    qp = tl.load(QP + b * sqpb)
    qd = tl.load(QD + b * sqdb)
    # The extra split (s = NS) reads the persistent keys through the same loop, without a branch (so that the loop's
    # loads can be pipelined): its rows are j < NP, loaded from PK / PV where the other splits load from K / V (a
    # masked-off load costs no memory traffic; the two sources may differ in dtype).
    cache = s < NS
    pers = s >= NS
    j0 = tl.where(cache, s * SPLIT, 0)
    n = tl.where(cache, L, NP)
    m = tl.full((), NEG, tl.float32)
    den = tl.full((), 0.0, tl.float32)
    acc = tl.full((BD,), 0.0, tl.float32)
    for i in range(SPLIT // BLOCK):
        j = j0 + i * BLOCK + rb                                                     # slots (or persistent keys)
        live = j < n
        if SKIP:   # slot j holds position j: slots outside [qdoc, qpos] cannot be visible and are not read
            live = live & (((j <= qp) & (j >= qd)) | pers)
        # K, V loads depend on the slot range only (not on kpos): both memory reads of a block are in flight at once
        mc = (live & cache)[:, None] & dm[None, :]
        mp = (live & pers)[:, None] & dm[None, :]
        k = (tl.load(K + b * skb + hk * skh + j[:, None] * skl + rd[None, :], mask=mc, other=0.0).to(tl.float32)
             + tl.load(PK + hk * spkh + j[:, None] * spkl + rd[None, :], mask=mp, other=0.0).to(tl.float32))
        v = (tl.load(V + b * svb + hk * svh + j[:, None] * svl + rd[None, :], mask=mc, other=0.0).to(tl.float32)
             + tl.load(PV + hk * spvh + j[:, None] * spvl + rd[None, :], mask=mp, other=0.0).to(tl.float32))
        kp = tl.load(KP + b * skpb + j, mask=live & cache, other=-1)
        vis = (kp >= 0) & (kp <= qp) & (kp >= qd)
        if HAS_W:
            vis = vis & (qp - kp < W)
        ok = live & (vis | pers)
        # decode has one query row: scores are an elementwise product and a row sum (no tl.dot tile to fill);
        # invisible rows are zeroed, not only weighted 0, in case an unused slot holds inf / NaN
        sc = tl.where(ok, tl.reduce(k * q[None, :], 1, tl.standard._sum_combine), NEG)
        m_new = tl.maximum(m, tl.reduce(sc, 0, tl.standard._elementwise_max))
        alpha = tl.exp(m - m_new)
        p = tl.where(ok, tl.exp(sc - m_new), 0.0)
        den = den * alpha + tl.reduce(p, 0, tl.standard._sum_combine)
        acc = acc * alpha + tl.reduce(p[:, None] * tl.where(ok[:, None], v, 0.0), 0, tl.standard._sum_combine)
        m = m_new
    row = bh * NSP + s
    tl.store(Mp + row, m)
    tl.store(Lp + row, den)
    tl.store(Ap + row * BD + rd, acc)


def _combine_kernel(Mp, Lp, Ap, O, sob, soh, NSP, HQ,
                    D: tl.constexpr, BD: tl.constexpr, CS: tl.constexpr, NC: tl.constexpr):
    """Merge the NSP partials of head bh, CS at a time (NC = cdiv(NSP, CS) rounds), with a running max M."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // HQ
    hq = bh % HQ
    rd = tl.arange(0, BD)
    rc = tl.arange(0, CS)
    M = tl.full((), NEG, tl.float32)
    den = tl.full((), 0.0, tl.float32)
    num = tl.full((BD,), 0.0, tl.float32)
    for c in range(NC):
        r = c * CS + rc
        ok = r < NSP
        m = tl.load(Mp + bh * NSP + r, mask=ok, other=NEG)
        lp = tl.load(Lp + bh * NSP + r, mask=ok, other=0.0)
        a = tl.load(Ap + (bh * NSP + r)[:, None] * BD + rd[None, :], mask=ok[:, None], other=0.0)
        M_new = tl.maximum(M, tl.reduce(m, 0, tl.standard._elementwise_max))
        w = tl.exp(m - M_new)            # ≤ 1; splits with nothing visible have l = 0 and acc = 0
        alpha = tl.exp(M - M_new)
        den = den * alpha + tl.reduce(w * lp, 0, tl.standard._sum_combine)
        num = num * alpha + tl.reduce(w[:, None] * a, 0, tl.standard._sum_combine)
        M = M_new
    o = num / tl.where(den > 0, den, 1.0)          # no visible key at all: 0 (SDPA would give NaN)
    tl.store(O + b * sob + hq * soh + rd, o.to(O.dtype.element_ty), mask=rd < D)


def _build(interpret: bool) -> tuple:
    """(split, combine): interpreted (CPU tensors) or compiled (CUDA tensors), by the device alone."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(_split_kernel), InterpretedFunction(_combine_kernel)
    from triton.runtime.jit import JITFunction
    # these sizes only enter masks and offsets: one compiled kernel for all their values
    return (JITFunction(_split_kernel, do_not_specialize=["L", "NS", "NSP", "NP", "W"]),
            JITFunction(_combine_kernel, do_not_specialize=["NSP"]))


# built at import: torch.compile finds plain kernel objects (building them inside a trace would break the graph)
_JIT = _build(False) if AVAILABLE else None
_interpreted = functools.cache(lambda: _build(True))


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def plan(B: int, Hq: int, L: int, Np: int, Dh: int) -> dict:
    """Tile sizes: BD (Dh padded to a power of two ≥ 16), BLOCK slots per iteration, SPLIT slots per program (a
    power of two with B·Hq·NS ≈ PROGRAMS, between BLOCK and MAX_SPLIT, ≥ Np so one split holds the persistent keys),
    NS cache splits."""
    BD = max(16, _pow2(Dh))
    BLOCK = min(TUNE.get("BLOCK", 64 if BD <= 128 else 32), max(16, _pow2(max(L, Np))))   # [BLOCK, BD] K, V tiles
    want = _pow2(-(-L // max(1, PROGRAMS // (B * Hq))))
    SPLIT = max(min(max(want, BLOCK), MAX_SPLIT), _pow2(Np))
    return {"BD": BD, "BLOCK": BLOCK, "SPLIT": SPLIT, "NS": max(1, -(-L // SPLIT))}


def _inner(x: Tensor) -> Tensor:
    """Unit last stride (the kernels index the feature axis directly); the other strides are passed."""
    return x if x.stride(-1) == 1 else x.contiguous()


def decode_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, kpos: Tensor, qpos: Tensor, qdoc: Tensor, *,
                            window: int | None = None, persist_k: Tensor | None = None,
                            persist_v: Tensor | None = None, slot_is_pos: bool = False) -> Tensor:
    """The split-KV kernels; arguments as decode_attention (T = 1). Caches and persistent keys are read in their own
    dtype (no copies); o [B, Hq, 1, Dh] in q's dtype."""
    if not supports(q, k_cache, v_cache):
        raise ValueError("decode_attention backend 'triton' needs Triton, CUDA tensors (or CPU with TRITON_INTERPRET=1), "
                         f"one query and Dh ≤ {MAX_HEAD_DIM}; use backend 'sdpa' otherwise")
    B, Hq, _, Dh = q.shape
    Hk, L = k_cache.shape[1], k_cache.shape[2]
    Np = 0 if persist_k is None else persist_k.shape[1]
    cfg = plan(B, Hq, L, Np, Dh)
    NS, BD = cfg.pop("NS"), cfg["BD"]
    NSP = NS + (Np > 0)
    q, k_cache, v_cache, kpos = _inner(q), _inner(k_cache), _inner(v_cache), _inner(kpos)
    qpos, qdoc = qpos.reshape(B), qdoc.reshape(B)     # [B] or [B, 1]: a view either way
    pk = _inner(persist_k) if Np else k_cache          # placeholders when Np = 0: never read
    pv = _inner(persist_v) if Np else v_cache
    dev = q.device
    part_m = torch.empty(B * Hq, NSP, dtype=torch.float32, device=dev)
    part_l = torch.empty(B * Hq, NSP, dtype=torch.float32, device=dev)
    part_acc = torch.empty(B * Hq, NSP, BD, dtype=torch.float32, device=dev)
    o = torch.empty(B, Hq, 1, Dh, dtype=q.dtype, device=dev)
    split, combine = _interpreted() if dev.type == "cpu" else _JIT
    # 2 warps for a 64 × 64 tile (faster than 4 on an H100: more programs resident per SM), more for larger tiles;
    # ≤ 201 registers a thread without spills for every BD ≤ 256 (sm_90, ptxas)
    warps = TUNE.get("num_warps", max(2, cfg["BLOCK"] * BD // 2048))
    stages = {"num_stages": TUNE["num_stages"]} if "num_stages" in TUNE else {}
    split[(NSP, B * Hq)](q, k_cache, v_cache, kpos, qpos, qdoc, pk, pv, part_m, part_l, part_acc,
                         q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                         v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), kpos.stride(0), qpos.stride(0),
                         qdoc.stride(0), pk.stride(0), pk.stride(1), pv.stride(0), pv.stride(1),
                         L, NS, NSP, Np, Hq, Hq // Hk, 0 if window is None else window,
                         D=Dh, SCALE=1.0 / math.sqrt(Dh), HAS_W=window is not None, SKIP=bool(slot_is_pos),
                         num_warps=warps, **stages, **cfg)
    CS = min(64, max(16, _pow2(NSP)))
    combine[(B * Hq,)](part_m, part_l, part_acc, o, o.stride(0), o.stride(1), NSP, Hq,
                       D=Dh, BD=BD, CS=CS, NC=-(-NSP // CS), num_warps=4)
    return o


# "sdpa" everywhere by default; "triton" automatically for CUDA tensors (auto=on_cuda), by name on the CPU (tests)
dispatch.register("decode_attention", "sdpa", decode_attention_sdpa, priority=0)
dispatch.register("decode_attention", "triton", decode_attention_triton, supports=supports, priority=10,
                  auto=dispatch.on_cuda)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kpos: Tensor, qpos: Tensor, qdoc: Tensor, *,
                     window: int | None = None, persist_k: Tensor | None = None, persist_v: Tensor | None = None,
                     slot_is_pos: bool = False, backend: str | None = None) -> Tensor:
    """Attention of one query per row over a static KV buffer (module docstring).

    q [B, Hq, 1, Dh]; k_cache, v_cache [B, Hk, L, Dh] (any float dtype); kpos [B, L] long (−1 = empty); qpos, qdoc [B]
    long (the query's stream position and document start; [B, T] with T queries for the SDPA backend); window W or
    None; persist_k, persist_v [Hk, Np, Dh] or None (always visible); slot_is_pos: the token at position p lives in
    slot p (a full buffer, not a ring), which lets the Triton kernels skip slots outside [qdoc, qpos]
    -> o [B, Hq, 1, Dh] in q's dtype."""
    kwargs = {"window": window, "persist_k": persist_k, "persist_v": persist_v, "slot_is_pos": slot_is_pos}
    return dispatch.call("decode_attention", q, k_cache, v_cache, kpos, qpos, qdoc, backend=backend, **kwargs)
