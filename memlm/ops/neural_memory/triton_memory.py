"""Neural memory with the sequential chunk writes in Triton: backend "triton" of op "neural_memory".

Notation as in parallel.py (NOTES.md): per batch·head, chunk j, window of c tokens X = φ(K) [c, F], V [c, Dv],
w [c] (γ, zero before the chunk's last reset), gates η, θ, α of the chunk; (Ws, Ss) = (W_j, S_j), or (W_init, 0)
in a row whose chunk j holds a reset;
  Z = X W1ᵀ, A = gelu(Z), Y = [Kraw] + A W2ᵀ, R = 2 w ⊙ (Y − V), U = R W2, dZ = U ⊙ gelu'(Z)
  G1 = dZᵀ X [E, F], G2 = Rᵀ A [Dv, E];   S_{j+1} = η Ss − θ G;   W_{j+1} = (1 − α) Ws + NS5(S_{j+1}) or + S_{j+1}.

What runs where. The chunked form spends its time in small launches, ~60 computing ops per chunk forward (~180
with the two Newton–Schulz maps of Muon) and ~4× that with the backward, plus a full-size zero-fill for every
per-chunk slice of the stream in the backward (NOTES.md). Here one chunk's write is one kernel (`_step_fwd`, one
program per batch·head, tiles over F), Newton–Schulz one kernel per matrix (float32 inputs: `_ns5_fwd`, iterating
on X streamed over column tiles from an L2-resident scratch; bf16/fp16 inputs: `_ns5g`, the same map on the M × M
Gram matrix in registers, NOTES.md; W1's forward takes that Gram matrix from the step kernel and leaves its second
pass to `_ns5g_apply`); later chunks relaunch the compiled kernels directly (`Relauncher`, `_direct`);
the backward walks the chunks in reverse with the matching `_step_bwd` / `_ns5_bwd` / `_ns5g` (closed-form
second-order terms of the inner gradient; Newton–Schulz iterates recomputed, or the Gram chain the forward kept).
Both are custom operators (torch.library: `memlm::neural_memory_scan` and its backward, so torch.compile sees one
opaque node instead of tracing the chunk loop's launches), called once per stretch of at most MAX_SCAN chunks; the
forward returns the stacked weights W_j of every chunk; the reads o_t = M_{W_j}(q_t) of all chunks are then one
batched PyTorch matmul pair on that stack (autograd differentiates them). Everything before the loop (stream,
features, gate means) is parallel.py's, shared, except φ of the keys: the step kernels make it from the raw keys
(POLY_IN_STEP).

Kernel math is float32 whatever the input dtype, like the chunked form; dot precision per input dtype (`precision`).
CPU tensors run through the Triton interpreter when TRITON_INTERPRET=1 (tests without a GPU).
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as Fn
from torch import Tensor

from memlm.ops.triton_common import Relauncher, interpreting, tl, triton  # None, None without Triton
from memlm.ops.triton_common import loop_count as _count

from .common import NS5_COEFFS, NS5_EPS, NS5_STEPS, NeuralMemoryState, Pending, _poly_maps, maybe_any
from .parallel import Prelude, Stream, chunk_gates, finish, memory_read, prepare, read_only, stream

__all__ = ["AVAILABLE", "MAX_DIM", "MAX_SCAN", "interpreting", "neural_memory", "supports"]

AVAILABLE = triton is not None
MAX_DIM = 128   # window c, hidden E, value width Dv, and min of each Newton–Schulz matrix's sides: register tiles
MAX_SCAN = 64   # chunks per autograd Function call: bounds the stacked W_j kept for the reads (long prefill)
# tl.dot precision of every kernel, by input dtype. float32 inputs: "ieee" (exact float32 products, like PyTorch
# without TF32; the 1e-5 tests). bf16/fp16 inputs: HALF_DOT_PRECISION = "tf32" (one TF32 tensor-core product per dot,
# 10-bit mantissa against the inputs' 7): atlas-mag-small trains 2.3× faster than with "ieee" (42,806 vs 18,274
# tokens/s, H100, docs/benchmarks.md). Its errors against float64 on bf16 inputs (GPU test, T 1000, Muon) are
# 5.8e-3–4.7e-2, about a tenth of the chunked PyTorch form's under bf16 autocast (6.7e-2–4.2e-1), what bf16 training
# without these kernels computes. "tf32x3" (three TF32 products, near float32) hits a CUDA illegal memory access in
# Triton 3.6's build (8 of 12 bf16 GPU tests, H100, 2026-11-22). The environment variable MEMLM_TRITON_PRECISION
# ("ieee", "tf32x3" or "tf32") overrides both; read at every call, so one process can compare them
# (benchmarks/memory_kernels.py does).
DOT_PRECISION = "ieee"
HALF_DOT_PRECISION = "tf32"
PRECISIONS = ("ieee", "tf32x3", "tf32")


def precision(half: bool = False) -> str:
    p = os.environ.get("MEMLM_TRITON_PRECISION", HALF_DOT_PRECISION if half else DOT_PRECISION)
    if p not in PRECISIONS:
        raise ValueError(f"MEMLM_TRITON_PRECISION={p!r}: expected one of {', '.join(PRECISIONS)}")
    return p



def supports(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, theta: Tensor, alpha: Tensor,
             W1: Tensor, W2: Tensor, *_: object, chunk_size: int = 64, window: int | None = None,
             optimizer: str = "momentum", **__: object) -> bool:
    """CUDA tensors (or CPU under TRITON_INTERPRET=1), Triton importable, no float64, c, E, Dv ≤ MAX_DIM (and
    min(E, F) ≤ MAX_DIM for Muon). Malformed shapes are accepted here so that the op's own check names them."""
    if not AVAILABLE or not (q.is_cuda or (q.device.type == "cpu" and interpreting())):
        return False
    if any(t.dtype == torch.float64 for t in (q, k, v, W1)):
        return False
    if q.dim() != 4 or v.dim() != 4 or W1.dim() != 4:
        return True
    E, F, Dv = W1.shape[2], W1.shape[3], v.shape[-1]
    c = chunk_size if window is None else window
    small = E <= MAX_DIM and Dv <= MAX_DIM and isinstance(c, int) and c <= MAX_DIM
    return small and (optimizer != "muon" or min(E, F) <= MAX_DIM)


# ------------------------------------------------------------------------------------------------------ kernels
# Plain functions, made Triton kernels on first use (`_kernels`): compiled for CUDA tensors, interpreted for CPU
# ones, so whether TRITON_INTERPRET was set before `import triton` does not matter. No helper functions (a kernel
# may only call jitted ones), hence the GELU lines appear in both step kernels. Only builtins are used: tl.reduce
# with the standard sum combiner for tl.sum and tl.full for tl.zeros (those two are jitted helpers, which the
# interpreter only runs when TRITON_INTERPRET was set before `import triton`).
# Layouts (all contiguous float32): X [B·H, L, F], XR, V [B·H, L, Dv] (the stream); Wg [B·H, NJ, c];
# Eta/Theta/Alpha [B·H, NJ]; Has [B, NJ] int8; stacks W1s, S1s [B·H, K1, E, F], W2s, S2s [B·H, K1, Dv, E]
# (slot i holds W_{j0+i}); W1i [H, E, F], W2i [H, Dv, E]; carried gradients gW1, gS1 [B·H, E, F], gW2, gS2
# [B·H, Dv, E]. A program handles chunk j (stack slot i -> i + 1) of batch·head bh.
# POLY: X holds the raw keys [B·H, L, DK] instead, and column f of φ(K) is X[:, PI[f]] · X[:, PJ[f]] · PS[f]
# (PJ[f] = DK: the linear column X[:, f]; `_poly_cols`), made per [c, F] tile from the window's keys in registers
# (tl.gather) with the products of `_poly_fwd` (bit for bit its features); the backward still writes ∂L/∂φ(K) to dX
# [B·H, L, F] (summing it into ∂L/∂K inside the kernel made `_step_bwd` 1.3–2× slower, NOTES.md).

def _step_fwd(X, XR, V, Wg, Eta, Theta, Alpha, Has, PI, PJ, PS, W1s, W2s, S1s, S2s, W1i, W2i, G1, SS1,
              j, i, H, L, NJ, K1, C, c, E, F, Dv, NF,
              HAS_XR: tl.constexpr, MUON: tl.constexpr, POLY: tl.constexpr, DK: tl.constexpr, BK: tl.constexpr,
              BC: tl.constexpr, BE: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr,
              GRAM: tl.constexpr, GPREC: tl.constexpr):
    """Grid (B·H,). Writes S_{j+1} into slot i + 1 of S1s/S2s and W_{j+1} (MUON: only (1 − α) Ws; _ns5_fwd adds
    NS5(S_{j+1})) into slot i + 1 of W1s/W2s. GRAM (Muon in Gram form, E ≤ F): also S1_{j+1}'s Gram matrix G1[bh] =
    S1 S1ᵀ [BE, BE] (dots at GPREC) and SS1[bh] = ‖S1‖², from the tiles it writes: W1's Newton–Schulz then needs no
    pass of its own over S1 for them (`_ns5g` with GIN)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, BC)
    re = tl.arange(0, BE)
    rv = tl.arange(0, BV)
    rf = tl.arange(0, BF)
    mc, me, mv = rc < c, re < E, rv < Dv
    m_cv = mc[:, None] & mv[None, :]
    m_ve = mv[:, None] & me[None, :]
    off2 = rv[:, None] * E + re[None, :]                                     # [BV, BE] inside a W2-like matrix
    rows = bh * L + j * C + C - c + rc                                       # the window's rows of the stream
    rk = tl.arange(0, BK)
    kc = tl.full([BC, BK], 0.0, tl.float32)
    if POLY:                                              # the window's raw keys [BC, BK], gathered per F tile
        kc = tl.load(X + rows[:, None] * DK + rk[None, :], mask=mc[:, None] & (rk < DK)[None, :], other=0.0)
    gi = bh * NJ + j
    eta = tl.load(Eta + gi)
    theta = tl.load(Theta + gi)
    alpha = tl.load(Alpha + gi)
    w = tl.load(Wg + gi * c + rc, mask=mc, other=0.0)
    cur = bh * K1 + i
    src1 = W1s + cur * E * F
    src2 = W2s + cur * Dv * E
    keep = 1.0
    if tl.load(Has + b * NJ + j) != 0:                                       # the write starts from (W_init, 0)
        src1 = W1i + h * E * F
        src2 = W2i + h * Dv * E
        keep = 0.0
    z = tl.full([BC, BE], 0.0, tl.float32)
    for fi in range(NF):                                                     # Z = X W1ᵀ over F tiles
        cf = fi * BF + rf
        mf = cf < F
        if POLY:                                                             # φ(K)'s tile from the raw keys
            pi = tl.load(PI + cf, mask=mf, other=0)
            pj = tl.load(PJ + cf, mask=mf, other=0)
            xi = tl.gather(kc, tl.broadcast_to(pi[None, :], (BC, BF)), 1)
            xj = tl.gather(kc, tl.broadcast_to(tl.minimum(pj, DK - 1)[None, :], (BC, BF)), 1)
            xj = tl.where((pj < DK)[None, :], xj, 1.0)                     # a linear column: x_i · 1
            x = xi * xj * tl.load(PS + cf, mask=mf, other=0.0)[None, :]
        else:
            x = tl.load(X + rows[:, None] * F + cf[None, :], mask=(mc[:, None] & mf[None, :]), other=0.0)
        w1 = tl.load(src1 + re[:, None] * F + cf[None, :], mask=me[:, None] & mf[None, :], other=0.0)
        z += tl.dot(x, tl.trans(w1), input_precision=PREC)
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    a = z * cdf                                                              # gelu(Z)
    h1 = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327                # gelu'(Z)
    w2 = tl.load(src2 + off2, mask=m_ve, other=0.0)                          # [BV, BE]
    y = tl.dot(a, tl.trans(w2), input_precision=PREC)                        # [BC, BV]
    if HAS_XR:
        y += tl.load(XR + rows[:, None] * Dv + rv[None, :], mask=m_cv, other=0.0)
    r = 2.0 * w[:, None] * (y - tl.load(V + rows[:, None] * Dv + rv[None, :], mask=m_cv, other=0.0))
    g2 = tl.dot(tl.trans(r), a, input_precision=PREC)                        # G2 [BV, BE]
    s2 = eta * keep * tl.load(S2s + cur * Dv * E + off2, mask=m_ve, other=0.0) - theta * g2
    tl.store(S2s + (cur + 1) * Dv * E + off2, s2, mask=m_ve)
    w2n = (1.0 - alpha) * w2
    if not MUON:
        w2n += s2
    tl.store(W2s + (cur + 1) * Dv * E + off2, w2n, mask=m_ve)
    dz = tl.dot(r, w2, input_precision=PREC) * h1                           # ∂L/∂Z [BC, BE]
    gram = tl.full([BE, BE], 0.0, tl.float32)
    sq = tl.full([BE, BF], 0.0, tl.float32)
    for fi in range(NF):                                                     # G1 = dZᵀ X, and the step, per F tile
        cf = fi * BF + rf
        mf = cf < F
        m_ef = me[:, None] & mf[None, :]
        off1 = re[:, None] * F + cf[None, :]
        if POLY:                                                             # φ(K)'s tile from the raw keys
            pi = tl.load(PI + cf, mask=mf, other=0)
            pj = tl.load(PJ + cf, mask=mf, other=0)
            xi = tl.gather(kc, tl.broadcast_to(pi[None, :], (BC, BF)), 1)
            xj = tl.gather(kc, tl.broadcast_to(tl.minimum(pj, DK - 1)[None, :], (BC, BF)), 1)
            xj = tl.where((pj < DK)[None, :], xj, 1.0)                     # a linear column: x_i · 1
            x = xi * xj * tl.load(PS + cf, mask=mf, other=0.0)[None, :]
        else:
            x = tl.load(X + rows[:, None] * F + cf[None, :], mask=(mc[:, None] & mf[None, :]), other=0.0)
        g1 = tl.dot(tl.trans(dz), x, input_precision=PREC)                   # [BE, BF]
        s1 = eta * keep * tl.load(S1s + cur * E * F + off1, mask=m_ef, other=0.0) - theta * g1
        tl.store(S1s + (cur + 1) * E * F + off1, s1, mask=m_ef)
        if GRAM:                                                             # s1 is zero outside [E, F]
            sq += s1 * s1
            gram += tl.dot(s1, tl.trans(s1), input_precision=GPREC)
        w1n = (1.0 - alpha) * tl.load(src1 + off1, mask=m_ef, other=0.0)
        if not MUON:
            w1n += s1
        tl.store(W1s + (cur + 1) * E * F + off1, w1n, mask=m_ef)
    if GRAM:
        tl.store(G1 + bh * BE * BE + re[:, None] * BE + re[None, :], gram)
        tl.store(SS1 + bh, tl.reduce(sq, None, tl.standard._sum_combine))


def _step_bwd(X, XR, V, Wg, Eta, Theta, Alpha, Has, PI, PJ, PS, W1s, W2s, S1s, S2s, W1i, W2i,
              gW1, gW2, gS1, gS2, R1, R2, dX, dXR, dV, dWg, dEta, dTheta, dAlpha, dW1i, dW2i,
              j, i, H, L, NJ, K1, KR, C, c, E, F, Dv, NF, r1e, r1f, r2v, r2e,
              HAS_XR: tl.constexpr, MUON: tl.constexpr, POLY: tl.constexpr, DK: tl.constexpr, BK: tl.constexpr,
              BC: tl.constexpr, BE: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr):
    """Grid (B·H,). On entry gW, gS hold ∂L/∂W_{j+1}, ∂L/∂S_{j+1} (MUON: gS already includes the Newton–Schulz
    path, added by _ns5_bwd); on exit ∂L/∂W_j (plus R's slot i, the reads' gradient, any dtype, KR slots packed but
    strides (r1e, r1f), (r2v, r2e) inside one: the reads' matmul leaves it transposed), ∂L/∂S_j. Writes the window
    rows of dX, dXR, dV and dWg, dEta, dTheta, dAlpha of chunk j; rows with a reset (Has ≠ 0) add ∂L/∂Ws to
    dW1i/dW2i [B·H, ...] and pass nothing to (W_j, S_j) through the write; Has = 2 (a reset on the chunk's first
    token: slot i of the reads held W_init, `_stack_copy`) sends R's slot i there too."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, BC)
    re = tl.arange(0, BE)
    rv = tl.arange(0, BV)
    rf = tl.arange(0, BF)
    mc, me, mv = rc < c, re < E, rv < Dv
    m_cv = mc[:, None] & mv[None, :]
    m_ve = mv[:, None] & me[None, :]
    off2 = rv[:, None] * E + re[None, :]
    rows = bh * L + j * C + C - c + rc
    rk = tl.arange(0, BK)
    kc = tl.full([BC, BK], 0.0, tl.float32)
    if POLY:                                              # the window's raw keys [BC, BK], gathered per F tile
        kc = tl.load(X + rows[:, None] * DK + rk[None, :], mask=mc[:, None] & (rk < DK)[None, :], other=0.0)
    gi = bh * NJ + j
    eta = tl.load(Eta + gi)
    theta = tl.load(Theta + gi)
    alpha = tl.load(Alpha + gi)
    w = tl.load(Wg + gi * c + rc, mask=mc, other=0.0)
    cur = bh * K1 + i
    src1 = W1s + cur * E * F
    src2 = W2s + cur * Dv * E
    keep = 1.0
    flag = tl.load(Has + b * NJ + j)
    if flag != 0:
        src1 = W1i + h * E * F
        src2 = W2i + h * Dv * E
        keep = 0.0
    head = tl.where(flag == 2, 1.0, 0.0)      # the chunk's reads used W_init (slot i of the read stack held it)
    # pass 1: Z = X W1ᵀ, Q = X gS1ᵀ (so that Σ G1 ⊙ gS1 = Σ dZ ⊙ Q and X dG1ᵀ = −θ Q), and the gate sums
    z = tl.full([BC, BE], 0.0, tl.float32)
    q = tl.full([BC, BE], 0.0, tl.float32)
    acc_eta = tl.full([BE, BF], 0.0, tl.float32)
    acc_alpha = tl.full([BE, BF], 0.0, tl.float32)
    for fi in range(NF):
        cf = fi * BF + rf
        mf = cf < F
        m_ef = me[:, None] & mf[None, :]
        off1 = re[:, None] * F + cf[None, :]
        if POLY:                                                             # φ(K)'s tile from the raw keys
            pi = tl.load(PI + cf, mask=mf, other=0)
            pj = tl.load(PJ + cf, mask=mf, other=0)
            xi = tl.gather(kc, tl.broadcast_to(pi[None, :], (BC, BF)), 1)
            xj = tl.gather(kc, tl.broadcast_to(tl.minimum(pj, DK - 1)[None, :], (BC, BF)), 1)
            xj = tl.where((pj < DK)[None, :], xj, 1.0)                     # a linear column: x_i · 1
            x = xi * xj * tl.load(PS + cf, mask=mf, other=0.0)[None, :]
        else:
            x = tl.load(X + rows[:, None] * F + cf[None, :], mask=(mc[:, None] & mf[None, :]), other=0.0)
        w1 = tl.load(src1 + off1, mask=m_ef, other=0.0)
        gw = tl.load(gW1 + bh * E * F + off1, mask=m_ef, other=0.0)
        gs = tl.load(gS1 + bh * E * F + off1, mask=m_ef, other=0.0)
        if not MUON:
            gs += gw                                                         # U = identity: W_{j+1} ∋ S_{j+1}
        z += tl.dot(x, tl.trans(w1), input_precision=PREC)
        q += tl.dot(x, tl.trans(gs), input_precision=PREC)
        acc_eta += keep * tl.load(S1s + cur * E * F + off1, mask=m_ef, other=0.0) * gs
        acc_alpha += w1 * gw
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    a = z * cdf
    h1 = cdf + z * pdf
    w2 = tl.load(src2 + off2, mask=m_ve, other=0.0)
    gw2 = tl.load(gW2 + bh * Dv * E + off2, mask=m_ve, other=0.0)
    gs2 = tl.load(gS2 + bh * Dv * E + off2, mask=m_ve, other=0.0)
    if not MUON:
        gs2 += gw2
    s2 = keep * tl.load(S2s + cur * Dv * E + off2, mask=m_ve, other=0.0)
    y = tl.dot(a, tl.trans(w2), input_precision=PREC)
    if HAS_XR:
        y += tl.load(XR + rows[:, None] * Dv + rv[None, :], mask=m_cv, other=0.0)
    diff = y - tl.load(V + rows[:, None] * Dv + rv[None, :], mask=m_cv, other=0.0)
    r = 2.0 * w[:, None] * diff
    u = tl.dot(r, w2, input_precision=PREC)                                  # R W2 [BC, BE]
    dz = u * h1
    g2 = tl.dot(tl.trans(r), a, input_precision=PREC)
    # Σ G1 ⊙ gS1 = Σ dZ ⊙ Q; the W1/S1 sums were accumulated as tiles in pass 1
    d_theta = -(tl.reduce(dz * q, None, tl.standard._sum_combine)
                + tl.reduce(g2 * gs2, None, tl.standard._sum_combine))
    d_eta = (tl.reduce(acc_eta, None, tl.standard._sum_combine)
             + tl.reduce(s2 * gs2, None, tl.standard._sum_combine))
    d_alpha = -(tl.reduce(acc_alpha, None, tl.standard._sum_combine)
                + tl.reduce(w2 * gw2, None, tl.standard._sum_combine))
    # backward through G1 = dZᵀ X (dG1 = −θ gS1), G2 = Rᵀ A (dG2 = −θ gS2), dZ = U ⊙ gelu'(Z), U = R W2,
    # R = 2 w (Y − V), Y = [XR] + A W2ᵀ, A = gelu(Z)
    ddz = -theta * q                                                         # ∂/∂dZ
    dg2 = -theta * gs2
    dr = tl.dot(a, tl.trans(dg2), input_precision=PREC)                      # [BC, BV]
    da = tl.dot(r, dg2, input_precision=PREC)                                # [BC, BE]
    du = ddz * h1
    dzt = ddz * u * pdf * (2.0 - z * z)                                      # through gelu''(Z) = φ(Z)(2 − Z²)
    dr += tl.dot(du, tl.trans(w2), input_precision=PREC)
    dw2 = tl.dot(tl.trans(r), du, input_precision=PREC)                      # [BV, BE]
    dy = 2.0 * w[:, None] * dr
    tl.store(dWg + gi * c + rc, 2.0 * tl.reduce(diff * dr, 1, tl.standard._sum_combine), mask=mc)
    tl.store(dV + rows[:, None] * Dv + rv[None, :], -dy, mask=m_cv)
    if HAS_XR:
        tl.store(dXR + rows[:, None] * Dv + rv[None, :], dy, mask=m_cv)
    da += tl.dot(dy, w2, input_precision=PREC)
    dw2 += tl.dot(tl.trans(dy), a, input_precision=PREC)
    dzt += da * h1                                                           # ∂L/∂Z in total
    tl.store(dEta + gi, d_eta)
    tl.store(dTheta + gi, d_theta)
    tl.store(dAlpha + gi, d_alpha)
    dws2 = (1.0 - alpha) * gw2 + dw2                                         # ∂L/∂Ws2
    rslot = bh * KR + i
    rd2 = tl.load(R2 + rslot * Dv * E + rv[:, None] * r2v + re[None, :] * r2e, mask=m_ve, other=0.0).to(tl.float32)
    tl.debug_barrier()                                                       # every read of gW, gS is done
    if keep == 0.0:
        p2 = dW2i + bh * Dv * E + off2
        tl.store(p2, tl.load(p2, mask=m_ve, other=0.0) + dws2 + head * rd2, mask=m_ve)
    tl.store(gW2 + bh * Dv * E + off2, (1.0 - head) * rd2 + keep * dws2, mask=m_ve)
    tl.store(gS2 + bh * Dv * E + off2, keep * eta * gs2, mask=m_ve)
    # pass 2: dX = dZt W1 + dZ dG1, ∂L/∂Ws1 = (1 − α) gW1 + dZtᵀ X, ∂L/∂Ss1 = η gS1 (tile by tile, in place)
    for fi in range(NF):
        cf = fi * BF + rf
        mf = cf < F
        m_ef = me[:, None] & mf[None, :]
        m_cf = mc[:, None] & mf[None, :]
        off1 = re[:, None] * F + cf[None, :]
        if POLY:                                                             # φ(K)'s tile from the raw keys
            pi = tl.load(PI + cf, mask=mf, other=0)
            pj = tl.load(PJ + cf, mask=mf, other=0)
            xi = tl.gather(kc, tl.broadcast_to(pi[None, :], (BC, BF)), 1)
            xj = tl.gather(kc, tl.broadcast_to(tl.minimum(pj, DK - 1)[None, :], (BC, BF)), 1)
            xj = tl.where((pj < DK)[None, :], xj, 1.0)                     # a linear column: x_i · 1
            x = xi * xj * tl.load(PS + cf, mask=mf, other=0.0)[None, :]
        else:
            x = tl.load(X + rows[:, None] * F + cf[None, :], mask=m_cf, other=0.0)
        w1 = tl.load(src1 + off1, mask=m_ef, other=0.0)
        gw = tl.load(gW1 + bh * E * F + off1, mask=m_ef, other=0.0)
        gs = tl.load(gS1 + bh * E * F + off1, mask=m_ef, other=0.0)
        if not MUON:
            gs += gw
        dx = tl.dot(dzt, w1, input_precision=PREC) - theta * tl.dot(dz, gs, input_precision=PREC)
        tl.store(dX + rows[:, None] * F + cf[None, :], dx, mask=m_cf)
        dws1 = (1.0 - alpha) * gw + tl.dot(tl.trans(dzt), x, input_precision=PREC)
        rd1 = tl.load(R1 + rslot * E * F + re[:, None] * r1e + cf[None, :] * r1f, mask=m_ef, other=0.0).to(tl.float32)
        # every thread has read this tile of gW1, gS1 before any overwrites it (the store may use another layout)
        tl.debug_barrier()
        if keep == 0.0:
            p1 = dW1i + bh * E * F + off1
            tl.store(p1, tl.load(p1, mask=m_ef, other=0.0) + dws1 + head * rd1, mask=m_ef)
        tl.store(gW1 + bh * E * F + off1, (1.0 - head) * rd1 + keep * dws1, mask=m_ef)
        tl.store(gS1 + bh * E * F + off1, keep * eta * gs, mask=m_ef)


def _ns5_fwd(S, Out, Xs, s_bh, o_bh, sr, sc, M, N, NT, EPS2,
             A_: tl.constexpr, B_: tl.constexpr, C_: tl.constexpr, STEPS: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Grid (B·H,). Out += NS5(S) for one matrix per program, seen as [M, N] (M ≤ N) through strides (sr, sc)
    (a tall matrix is passed transposed); S at S + bh·s_bh, Out at Out + bh·o_bh, scratch Xs [B·H, M, N]."""
    bh = tl.program_id(0).to(tl.int64)
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    mm = rm < M
    acc = tl.full([BM, BN], 0.0, tl.float32)
    for t in range(NT):
        cn = t * BN + rn
        m = mm[:, None] & (cn < N)[None, :]
        s = tl.load(S + bh * s_bh + rm[:, None] * sr + cn[None, :] * sc, mask=m, other=0.0)
        acc += s * s
    scale = 1.0 / tl.sqrt(tl.reduce(acc, None, tl.standard._sum_combine) + EPS2)
    for t in range(NT):
        cn = t * BN + rn
        m = mm[:, None] & (cn < N)[None, :]
        s = tl.load(S + bh * s_bh + rm[:, None] * sr + cn[None, :] * sc, mask=m, other=0.0)
        tl.store(Xs + bh * M * N + rm[:, None] * N + cn[None, :], s * scale, mask=m)
    for _ in range(STEPS):
        tl.debug_barrier()
        g = tl.full([BM, BM], 0.0, tl.float32)
        for t in range(NT):
            cn = t * BN + rn
            m = mm[:, None] & (cn < N)[None, :]
            x = tl.load(Xs + bh * M * N + rm[:, None] * N + cn[None, :], mask=m, other=0.0)
            g += tl.dot(x, tl.trans(x), input_precision=PREC)
        p = B_ * g + C_ * tl.dot(g, g, input_precision=PREC)
        tl.debug_barrier()
        for t in range(NT):
            cn = t * BN + rn
            m = mm[:, None] & (cn < N)[None, :]
            ptr = Xs + bh * M * N + rm[:, None] * N + cn[None, :]
            x = tl.load(ptr, mask=m, other=0.0)
            tl.store(ptr, A_ * x + tl.dot(p, x, input_precision=PREC), mask=m)
    tl.debug_barrier()
    for t in range(NT):
        cn = t * BN + rn
        m = mm[:, None] & (cn < N)[None, :]
        x = tl.load(Xs + bh * M * N + rm[:, None] * N + cn[None, :], mask=m, other=0.0)
        po = Out + bh * o_bh + rm[:, None] * sr + cn[None, :] * sc
        tl.store(po, tl.load(po, mask=m, other=0.0) + x, mask=m)


def _ns5_bwd(S, dOut, dS, Xs, dY, s_bh, g_bh, sr, sc, M, N, NT, EPS2,
             A_: tl.constexpr, B_: tl.constexpr, C_: tl.constexpr, STEPS: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Grid (B·H,). dS += (∂NS5/∂S)ᵀ dOut for one matrix per program (layout as _ns5_fwd; dOut, dS at bh·g_bh).
    Recomputes the iterates X_0 … X_{STEPS−1} into Xs [B·H, STEPS, M, N], walks them back with dY [B·H, M, N]:
    Y = a X + P X, P = b G + c G², G = X Xᵀ  =>  dX = a dY + P dY + (dG + dGᵀ) X, dG = b dP + c (dP G + G dP),
    dP = dY Xᵀ; finally X_0 = S / n, n = sqrt(‖S‖² + ε²)  =>  dS = dX_0 / n − ⟨dX_0, S⟩ S / n³."""
    bh = tl.program_id(0).to(tl.int64)
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    mm = rm < M
    xb = Xs + bh * STEPS * M * N
    yb = dY + bh * M * N
    acc = tl.full([BM, BN], 0.0, tl.float32)
    for t in range(NT):
        cn = t * BN + rn
        m = mm[:, None] & (cn < N)[None, :]
        s = tl.load(S + bh * s_bh + rm[:, None] * sr + cn[None, :] * sc, mask=m, other=0.0)
        acc += s * s
    scale = 1.0 / tl.sqrt(tl.reduce(acc, None, tl.standard._sum_combine) + EPS2)
    for t in range(NT):
        cn = t * BN + rn
        m = mm[:, None] & (cn < N)[None, :]
        s = tl.load(S + bh * s_bh + rm[:, None] * sr + cn[None, :] * sc, mask=m, other=0.0)
        tl.store(xb + rm[:, None] * N + cn[None, :], s * scale, mask=m)
        go = tl.load(dOut + bh * g_bh + rm[:, None] * sr + cn[None, :] * sc, mask=m, other=0.0)
        tl.store(yb + rm[:, None] * N + cn[None, :], go, mask=m)
    for it in range(STEPS - 1):                                              # X_{it+1} from X_it
        tl.debug_barrier()
        g = tl.full([BM, BM], 0.0, tl.float32)
        for t in range(NT):
            cn = t * BN + rn
            m = mm[:, None] & (cn < N)[None, :]
            x = tl.load(xb + it * M * N + rm[:, None] * N + cn[None, :], mask=m, other=0.0)
            g += tl.dot(x, tl.trans(x), input_precision=PREC)
        p = B_ * g + C_ * tl.dot(g, g, input_precision=PREC)
        for t in range(NT):
            cn = t * BN + rn
            m = mm[:, None] & (cn < N)[None, :]
            x = tl.load(xb + it * M * N + rm[:, None] * N + cn[None, :], mask=m, other=0.0)
            tl.store(xb + (it + 1) * M * N + rm[:, None] * N + cn[None, :],
                     A_ * x + tl.dot(p, x, input_precision=PREC), mask=m)
    for k in range(STEPS):
        it = STEPS - 1 - k
        tl.debug_barrier()
        g = tl.full([BM, BM], 0.0, tl.float32)
        dp = tl.full([BM, BM], 0.0, tl.float32)
        for t in range(NT):
            cn = t * BN + rn
            m = mm[:, None] & (cn < N)[None, :]
            x = tl.load(xb + it * M * N + rm[:, None] * N + cn[None, :], mask=m, other=0.0)
            dy = tl.load(yb + rm[:, None] * N + cn[None, :], mask=m, other=0.0)
            g += tl.dot(x, tl.trans(x), input_precision=PREC)
            dp += tl.dot(dy, tl.trans(x), input_precision=PREC)
        p = B_ * g + C_ * tl.dot(g, g, input_precision=PREC)
        dg = B_ * dp + C_ * (tl.dot(dp, g, input_precision=PREC)
                             + tl.dot(g, dp, input_precision=PREC))
        dgs = dg + tl.trans(dg)
        tl.debug_barrier()
        for t in range(NT):
            cn = t * BN + rn
            m = mm[:, None] & (cn < N)[None, :]
            x = tl.load(xb + it * M * N + rm[:, None] * N + cn[None, :], mask=m, other=0.0)
            dy = tl.load(yb + rm[:, None] * N + cn[None, :], mask=m, other=0.0)
            dy = (A_ * dy + tl.dot(p, dy, input_precision=PREC)
                  + tl.dot(dgs, x, input_precision=PREC))
            tl.store(yb + rm[:, None] * N + cn[None, :], dy, mask=m)
    tl.debug_barrier()
    acc = tl.full([BM, BN], 0.0, tl.float32)
    for t in range(NT):
        cn = t * BN + rn
        m = mm[:, None] & (cn < N)[None, :]
        s = tl.load(S + bh * s_bh + rm[:, None] * sr + cn[None, :] * sc, mask=m, other=0.0)
        acc += s * tl.load(yb + rm[:, None] * N + cn[None, :], mask=m, other=0.0)
    inner = tl.reduce(acc, None, tl.standard._sum_combine)
    for t in range(NT):
        cn = t * BN + rn
        m = mm[:, None] & (cn < N)[None, :]
        s = tl.load(S + bh * s_bh + rm[:, None] * sr + cn[None, :] * sc, mask=m, other=0.0)
        dy = tl.load(yb + rm[:, None] * N + cn[None, :], mask=m, other=0.0)
        pd = dS + bh * g_bh + rm[:, None] * sr + cn[None, :] * sc
        tl.store(pd, tl.load(pd, mask=m, other=0.0) + scale * dy - scale * scale * scale * inner * s, mask=m)


def _ns5g(S, Y, dS, Ch, Gin, SSin, Kout, s_bh, g_bh, c_bh, sr, sc, M, N, NT, EPS2,
          A_: tl.constexpr, B_: tl.constexpr, C_: tl.constexpr, STEPS: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, PC: tl.constexpr, PW: tl.constexpr,
          BWD: tl.constexpr, CHAIN: tl.constexpr, SAVE: tl.constexpr, GIN: tl.constexpr):
    """Grid (B·H,). Newton–Schulz in Gram form, one matrix per program, layout as _ns5_fwd (S at bh·s_bh, Y and dS
    at bh·g_bh); the kernels of bf16/fp16 inputs (NOTES.md). Forward (BWD false): Y += NS5(S) (dS unused).
    Backward: dS += (∂NS5/∂S)ᵀ Y.

    Every iterate is X_k = K_k X_0 with K_k [M, M], so the five steps run on M × M matrices in registers and S is read
    twice instead of twice per step: n = sqrt(‖S‖² + ε²), A_0 = S Sᵀ / n², K_0 = I;
    Q_k = a I + b A_k + c A_k²,  P_k = Q_k A_k,  K_{k+1} = Q_k K_k,  A_{k+1} = P_k Q_k;  NS5(S) = K_5 S / n.
    The chain lives in Ch at bh·c_bh as [STEPS, 4, BM, BM]: (A_k, Q_k, K_{k+1}, P_k) per step. CHAIN: this launch
    computes it (from the pass G = S Sᵀ); SAVE: and stores it (a forward for a later backward, or the backward's own
    recompute); a backward with CHAIN false reads the one its forward stored. The backward also takes D = Y Sᵀ in the
    first pass. All chain matrices are polynomials of A_0, hence symmetric and commuting, and the walk back keeps only
    the symmetric part of ∂L/∂A_k and ∂L/∂Q_k (the maps A ↦ Q, A ↦ P Q are transpose-equivariant, so the symmetric part
    of ∂L/∂A_0, all that reaches S, is unchanged: NOTES.md). From dK_5 = D / n, dA = 0, for k = 4 … 0:
      m = sym(dK K_k) + Y + Yᵀ with Y = dA P_k,  dA <- Q_k dA Q_k + b m + c (Z + Zᵀ) with Z = m A_k,  dK <- Q_k dK
    (25 products of M × M); with ι = ⟨dK_5, K_5⟩ + 2 ⟨dA, A_0⟩, the second pass:
      dS += (K_5 / n)ᵀ Y + (2 dA − ι I) S / n².
    PREC: dots over N (the passes); PC: dots of the M × M chain; PW: dots of the backward's walk back over it.
    GIN (a forward): G and ‖S‖² come from Gin [B·H, BM, BM] and SSin [B·H] (written by _step_fwd), and the kernel
    stores K_5 / n into Kout [B·H, BM, BM] for _ns5g_apply instead of its two passes: one program a matrix spent about
    40 of its 104 µs in them at atlas-mag-small (H100), and this form of the kernel spills less (NOTES.md)."""
    bh = tl.program_id(0).to(tl.int64)
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    mm = rm < M
    off = rm[:, None] * BM + rm[None, :]
    MM = BM * BM
    d = tl.full([BM, BM], 0.0, tl.float32)
    if GIN:
        g = tl.load(Gin + bh * MM + off)
        scale = 1.0 / tl.sqrt(tl.load(SSin + bh) + EPS2)
    else:
        g = tl.full([BM, BM], 0.0, tl.float32)
        acc = tl.full([BM, BN], 0.0, tl.float32)
        for t in range(NT):
            cn = t * BN + rn
            m = mm[:, None] & (cn < N)[None, :]
            s = tl.load(S + bh * s_bh + rm[:, None] * sr + cn[None, :] * sc, mask=m, other=0.0)
            acc += s * s
            if CHAIN:
                g += tl.dot(s, tl.trans(s), input_precision=PREC)
            if BWD:
                dy = tl.load(Y + bh * g_bh + rm[:, None] * sr + cn[None, :] * sc, mask=m, other=0.0)
                d += tl.dot(dy, tl.trans(s), input_precision=PREC)
        scale = 1.0 / tl.sqrt(tl.reduce(acc, None, tl.standard._sum_combine) + EPS2)
    eye = tl.where(rm[:, None] == rm[None, :], 1.0, 0.0)
    cb = Ch + bh * c_bh
    k = eye
    if CHAIN:
        a = g * (scale * scale)
        for it in range(STEPS):          # a runtime loop: unrolled, the backward's chain took minutes to compile
            q = A_ * eye + B_ * a + C_ * tl.dot(a, a, input_precision=PC)
            k = tl.dot(q, k, input_precision=PC)
            if SAVE:
                tl.store(cb + (4 * it) * MM + off, a)
                tl.store(cb + (4 * it + 1) * MM + off, q)
                tl.store(cb + (4 * it + 2) * MM + off, k)
            if it < STEPS - 1:
                p = tl.dot(q, a, input_precision=PC)
                if SAVE:
                    tl.store(cb + (4 * it + 3) * MM + off, p)
                a = tl.dot(p, q, input_precision=PC)
    if BWD:
        tl.debug_barrier()               # the chain's stores above were made by other threads of this program
        k = tl.load(cb + (4 * (STEPS - 1) + 2) * MM + off)                   # K_5
        dk = d * scale
        inner = tl.reduce(dk * k, None, tl.standard._sum_combine)
        da = tl.full([BM, BM], 0.0, tl.float32)
        # the chain's A_r and Q_r are loaded (from L2) at each use rather than held across the step: fewer registers
        # live, spills 1,320 -> 1,064 B a thread (sm_90), 183.4 -> 180.0 µs on 64 × 560 (H100), bit for bit the same
        for i in range(STEPS):
            r = STEPS - 1 - i
            if r > 0:
                m2 = tl.dot(dk, tl.load(cb + (4 * r - 2) * MM + off), input_precision=PW)      # dK K_r
                dk = tl.dot(tl.load(cb + (4 * r + 1) * MM + off), dk, input_precision=PW)
            else:
                m2 = dk                                                                         # K_0 = I
            m2 = 0.5 * (m2 + tl.trans(m2))
            if r < STEPS - 1:
                y = tl.dot(da, tl.load(cb + (4 * r + 3) * MM + off), input_precision=PW)
                m2 += y + tl.trans(y)
                da = tl.dot(tl.load(cb + (4 * r + 1) * MM + off), da, input_precision=PW)
                da = tl.dot(da, tl.load(cb + (4 * r + 1) * MM + off), input_precision=PW)
            z = tl.dot(m2, tl.load(cb + (4 * r) * MM + off), input_precision=PW)
            da += B_ * m2 + C_ * (z + tl.trans(z))
        das = 2.0 * da
        inner += tl.reduce(das * tl.load(cb + off), None, tl.standard._sum_combine)
        t2 = (das - inner * eye) * (scale * scale)
        kt = tl.trans(k) * scale
        for t in range(NT):
            cn = t * BN + rn
            m = mm[:, None] & (cn < N)[None, :]
            s = tl.load(S + bh * s_bh + rm[:, None] * sr + cn[None, :] * sc, mask=m, other=0.0)
            dy = tl.load(Y + bh * g_bh + rm[:, None] * sr + cn[None, :] * sc, mask=m, other=0.0)
            pd = dS + bh * g_bh + rm[:, None] * sr + cn[None, :] * sc
            upd = tl.dot(kt, dy, input_precision=PREC) + tl.dot(t2, s, input_precision=PREC)
            tl.store(pd, tl.load(pd, mask=m, other=0.0) + upd, mask=m)
    elif GIN:
        tl.store(Kout + bh * MM + off, k * scale)
    else:
        k = k * scale
        for t in range(NT):
            cn = t * BN + rn
            m = mm[:, None] & (cn < N)[None, :]
            s = tl.load(S + bh * s_bh + rm[:, None] * sr + cn[None, :] * sc, mask=m, other=0.0)
            po = Y + bh * g_bh + rm[:, None] * sr + cn[None, :] * sc
            tl.store(po, tl.load(po, mask=m, other=0.0) + tl.dot(k, s, input_precision=PREC), mask=m)


def _ns5g_apply(S, Y, K, s_bh, g_bh, sr, sc, M, N, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Grid (B·H, cdiv(N, BN)). The second pass of `_ns5g` with GIN, one BN-column tile a program: Y_t += K[bh] S_t
    (K = K_5 / n [BM, BM]; S, Y laid out as in _ns5g)."""
    bh = tl.program_id(0).to(tl.int64)
    rm = tl.arange(0, BM)
    cn = tl.program_id(1) * BN + tl.arange(0, BN)
    m = (rm < M)[:, None] & (cn < N)[None, :]
    s = tl.load(S + bh * s_bh + rm[:, None] * sr + cn[None, :] * sc, mask=m, other=0.0)
    k = tl.load(K + bh * BM * BM + rm[:, None] * BM + rm[None, :])
    po = Y + bh * g_bh + rm[:, None] * sr + cn[None, :] * sc
    tl.store(po, tl.load(po, mask=m, other=0.0) + tl.dot(k, s, input_precision=PREC), mask=m)


def _stack_copy(W, Wi, Head, Out, H, K1, KR, NH, j0, N, BN: tl.constexpr):
    """Grid (B·H·KR, cdiv(N, BN)). The reads' stack: Out [B·H, KR, N] (the reads' dtype) slot i = W_init Wi[h] [N]
    where chunk j0 + i opens with a reset (Head [B, NH] int8 ≠ 0), else W [B·H, K1, N] slot i (float32): the cast
    copy the reads need anyway, with W_init put in place of a whole chunk's second read."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // KR
    i = pid % KR
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    m = cols < N
    src = W + (bh * K1 + i) * N
    if tl.load(Head + (bh // H) * NH + j0 + i) != 0:
        src = Wi + (bh % H) * N
    tl.store(Out + pid * N + cols, tl.load(src + cols, mask=m, other=0.0).to(Out.dtype.element_ty), mask=m)


def _poly_fwd(X, Out, R, D, P, BR: tl.constexpr, BD: tl.constexpr):
    """Grid (cdiv(R, BR),). Out [R, D + P] = [x, x_i x_j s] for rows x of X [R, D] (common.poly_features): the
    outer product x xᵀ of each row in registers [BR, BD, BD], its upper triangle stored at its place in the row
    (position i·D − i(i−1)/2 + j − i of pair i ≤ j; lanes run along j, so each (row, i) is one contiguous store)."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    rd = tl.arange(0, BD)
    mr = r < R
    m = mr[:, None] & (rd < D)[None, :]
    x = tl.load(X + r[:, None] * D + rd[None, :], mask=m, other=0.0)
    tl.store(Out + r[:, None] * (D + P) + rd[None, :], x, mask=m)
    i, j = rd[:, None], rd[None, :]
    pos = i * D - (i * (i - 1)) // 2 + j - i
    s = tl.where(i == j, 0.7071067811865476, 1.0)                 # float32(1/√2), as common._poly_maps' s
    u = x[:, :, None] * x[:, None, :] * s[None, :, :]
    mu = mr[:, None, None] & ((i <= j) & (j < D))[None, :, :]
    tl.store(Out + r[:, None, None] * (D + P) + D + pos[None, :, :], u, mask=mu)


def _poly_bwd(X, G, DX, POS, GS, R, D, P, BR: tl.constexpr, BD: tl.constexpr):
    """Grid (cdiv(R, BR),). DX [R, D] = G[:, :D] + Σ_n (G[:, D + pos] ⊙ gs)[:, m, n] x_n (common._Poly.backward)."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    rd = tl.arange(0, BD)
    mr, md = r < R, rd < D
    m = mr[:, None] & md[None, :]
    x = tl.load(X + r[:, None] * D + rd[None, :], mask=m, other=0.0)
    mdd = md[:, None] & md[None, :]
    pos = tl.load(POS + rd[:, None] * D + rd[None, :], mask=mdd, other=0)
    gs = tl.load(GS + rd[:, None] * D + rd[None, :], mask=mdd, other=0.0)
    m3 = mr[:, None, None] & mdd[None, :, :]
    g = tl.load(G + r[:, None, None] * (D + P) + D + pos[None, :, :], mask=m3, other=0.0).to(tl.float32)
    dx = tl.load(G + r[:, None] * (D + P) + rd[None, :], mask=m, other=0.0).to(tl.float32)
    dx += tl.reduce(g * gs[None, :, :] * x[:, None, :], 2, tl.standard._sum_combine)
    tl.store(DX + r[:, None] * D + rd[None, :], dx, mask=m)


def _build(interpret: bool) -> dict:
    """The kernels, compiled for the GPU or wrapped for the interpreter (CPU tensors)."""
    fns = {"step_fwd": _step_fwd, "step_bwd": _step_bwd, "ns5_fwd": _ns5_fwd, "ns5_bwd": _ns5_bwd,
           "ns5g": _ns5g, "ns5g_apply": _ns5g_apply,
           "poly_fwd": _poly_fwd, "poly_bwd": _poly_bwd, "stack_copy": _stack_copy}
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return {n: InterpretedFunction(f) for n, f in fns.items()}
    # positions and lengths change from call to call: one compiled kernel for all of them
    varying = {"step_fwd": ["j", "i", "L", "NJ", "K1"], "step_bwd": ["j", "i", "L", "NJ", "K1", "KR"]}
    return {n: triton.jit(f, do_not_specialize=varying.get(n, [])) for n, f in fns.items()}


# The compiled kernels are built at import, so that a torch.compile'd model finds plain kernel objects and launches
# them in its graph (building them inside the trace would break the graph); the interpreted ones only when a test
# asks (CPU tensors under TRITON_INTERPRET=1).
_JIT = _build(False) if AVAILABLE else None
_interpreted = functools.cache(lambda: _build(True))


def _kernels(interpret: bool):
    """The kernels by name, for CPU tensors (interpreter) or CUDA tensors."""
    return _interpreted() if interpret else _JIT


MAX_POLY_DIM = 64    # key width of the Triton feature map (and of φ inside the step kernels)


def poly_supports(x: Tensor) -> bool:
    """The Triton feature map takes float32 tensors on CUDA (or CPU under TRITON_INTERPRET=1) with Dk ≤ 64."""
    return (AVAILABLE and x.dtype == torch.float32 and x.shape[-1] <= MAX_POLY_DIM
            and (x.is_cuda or (x.device.type == "cpu" and interpreting())))


def poly_forward(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """common.poly_features' forward as one kernel: x [..., D] float32 -> [..., D + D(D+1)/2] in dtype."""
    D = x.shape[-1]
    P = D * (D + 1) // 2
    xf = x.reshape(-1, D).contiguous()
    out = torch.empty(*x.shape[:-1], D + P, device=x.device, dtype=dtype)
    R, interpret = xf.shape[0], x.device.type == "cpu"
    BR = 8
    _kernels(interpret)["poly_fwd"][(triton.cdiv(R, BR),)](xf, out, R, D, P, BR=BR, BD=_pow2(D), num_warps=4)
    return out


def poly_backward(x: Tensor, g: Tensor) -> Tensor:
    """common._Poly's backward as one kernel: x [..., D] float32, g [..., D + P] float32 or bf16 -> ∂L/∂x [..., D]
    float32."""
    D = x.shape[-1]
    m = _poly_maps(D, x.device)
    xf, gf = x.reshape(-1, D).contiguous(), g.reshape(-1, g.shape[-1]).contiguous()
    dx = torch.empty_like(xf)
    R, interpret = xf.shape[0], x.device.type == "cpu"
    BR = 8
    _kernels(interpret)["poly_bwd"][(triton.cdiv(R, BR),)](
        xf, gf, dx, m.pos, m.gs.to(x.dtype), R, D, gf.shape[-1] - D, BR=BR, BD=_pow2(D), num_warps=4)
    return dx.view(x.shape)


# φ of the keys inside the step kernels (POLY): they make each [c, F] tile of the features from the window's raw keys
# [c, Dk] held in registers (two tl.gathers, and the products of poly_forward in its order, so bit for bit the same
# features) instead of reading an F-wide float32 stream (F = 560 for Dk = 32) twice a chunk each way; the keys' feature
# map and the stream kept for the backward go (atlas-mag-small, H100: kernel time 3.6 ms less a step, peak memory
# 39.9 -> 36.6 GB). The backward still writes ∂L/∂φ(K), which poly_backward sums into ∂L/∂K after the walk (summing it
# inside _step_bwd was slower, NOTES.md). False: the stream of features made by common.poly_features.
POLY_IN_STEP = True


def _poly_cols(d: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """φ's columns for the step kernels: i, j int32 [F], s float32 [F] (F = d + d(d+1)/2), column f = x_i x_j s, with
    j = d (read as 1) for the linear columns. Made at each call (a few small ops): a cached tensor made inside a
    torch.compile trace would outlive it."""
    i, j = torch.triu_indices(d, d, device=device)
    lin = torch.arange(d, device=device)
    s = torch.where(i == j, 1.0 / math.sqrt(2.0), 1.0).to(torch.float32)
    return (torch.cat([lin, i]).to(torch.int32), torch.cat([torch.full_like(lin, d), j]).to(torch.int32),
            torch.cat([torch.ones(d, device=device), s]))


def _empty(like: Tensor, *shape: int) -> Tensor:
    """Uninitialised float32 buffer for kernel outputs and scratch (tests NaN-poison it by patching this)."""
    return like.new_empty(shape)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))       # tl.dot needs every dimension ≥ 16


# Tile choices were compared by compiling for sm_90 without a GPU (triton.compile + cuobjdump -res-usage) at the
# atlas-mag-small shapes: with IEEE dots every [c, E] tile plus the per-thread operand panels of the FMA dots exceed
# the registers, so the backward spills (~5 KB a thread at 16 warps, ~9 KB at 8); narrower F tiles and more warps
# spill less and compile faster (10 s instead of 18–30 s). TF32×3 dots spill far less (tensor-core operands).

# With TF32 dots (bf16 training) the tensor-core operands spill far less: on the H100 at atlas-mag-small's training
# shapes (B 16, T 2048) the op's forward took 15.0 ms with the IEEE tiles and 13.2 with 64-column tiles at 4 warps,
# forward + backward 45.3 ms and 40.5 with 32-column backward tiles at 4 warps (the best of 16/32/64 × 4/8/16).

def _step_config(c: int, E: int, Dv: int, F: int, backward: bool, prec: str = "ieee") -> dict:
    BC, BE, BV = _pow2(c), _pow2(E), _pow2(Dv)
    if BC * BE < 64 * 64:
        return {"BC": BC, "BE": BE, "BV": BV, "BF": min(64, _pow2(F)), "num_warps": 4}
    if prec == "ieee":
        BF, warps = (16, 16) if backward else (32, 8)
    else:
        BF, warps = (32, 4) if backward else (64, 4)
    return {"BC": BC, "BE": BE, "BV": BV, "BF": min(BF, _pow2(F)), "num_warps": warps}


# Which Newton–Schulz kernels run, by the op's dot precision. Float32 inputs ("ieee"): the iterative form (_ns5_fwd,
# _ns5_bwd), float32-accurate. bf16/fp16 inputs: the Gram form (_ns5g, both ways), two passes over each matrix
# instead of ten (forward) or twenty-two (backward). Its float32 error grows with the momentum's condition (NOTES.md:
# the chain carries A_0's rounding along S's null space, amplified by up to a⁸ by A_4), so its dots must be near
# float32 (passes over N, M × M chain): with one TF32 product per dot the map's error reached 2e-1 on an S with
# singular values from 1 to 1e-3 (CPU emulation; the iterative TF32 form's is 1e-3 there), with three 1e-4.
# Third entry: the backward's walk back over the chain, "bf16x3" (three bf16 tensor-core products a dot, operands
# split into high and low bf16 halves: ~16 mantissa bits against TF32×3's ~21, at half the tensor-core cost a product).
# The walk tolerates it where the forward chain does not (H100, atlas-mag-small's head shapes, bf16 q, k, v, Muon,
# gradients against float64): ∂W2_init 5.3e-3 -> 5.9e-3 at T 64 and 8.7e-3 -> 8.9e-3 at T 1000 with the walk in bf16x3,
# but 8.1e-2 and 1.5e-1 with the forward chain in it too (beyond the chunked form's under autocast, 7.9e-2 at T 64);
# one TF32 product a dot in the walk gave 1.8e-1 (NOTES.md). W1's backward map 178 -> 132 µs a call (H100). The
# interpreter takes "tf32x3" for it (its dots are float32 whatever the precision).
NS5_GRAM_PRECISION = ("tf32x3", "tf32x3", "bf16x3")
# The forward's W1 map in Gram form takes S1's Gram matrix and ‖S1‖² from the step kernel, which holds S1's tiles
# anyway (_step_fwd's GRAM), and its second pass runs as a kernel of one program a column tile (_ns5g_apply, tile
# GRAM_APPLY_BN): no first pass over S1, and the chain's kernel spills less (NOTES.md). Equal to the one-kernel form
# up to float32 rounding (the sums run in another order). False: the one-kernel form.
NS5_GRAM_FROM_STEP = True
GRAM_APPLY_BN = 64
# The Gram form's forward stores each chunk's chain (A_k, Q_k, K_{k+1}, P_k: 20 M × M float32 matrices, 1.3 GB per
# atlas-mag-small layer at B 16 × 2048 with M = 64) when a backward will follow, so that the backward walks it back
# without recomputing it (25 products instead of 18 + 25; the step 272 -> 258 ms, peak memory 33.3 -> 42.7 GB, H100).
# False, or the environment variable MEMLM_NS5_KEEP_CHAIN=0 (read at every call): recompute, memory for time.
NS5_KEEP_CHAIN = True


# W2's Newton–Schulz map (32 × 64 at atlas-mag-small) runs on a side CUDA stream next to W1's (64 × 560): they read
# what the chunk's step kernel wrote and nothing of each other, and W1's 128 programs (one per (row, head)) leave the
# SMs mostly idle (latency bound), so W2's run in their shadow instead of after them. False: one stream. Only for
# direct launches (not in the interpreter, nor while torch.compile traces).
NS5_SIDE_STREAM = True
_SIDE: dict[torch.device, torch.cuda.Stream] = {}


class _Maps:
    """The chunk's Newton–Schulz maps ns (W1's, W2's; none without Muon), W2's on the device's side stream when
    `side`. ``maps(args1, args2)`` launches both; the caller's stream waits for both before its next launch."""

    def __init__(self, ns: list[_NS5], side: bool, device: torch.device):
        self.ns, self.side = ns, None
        if side and len(ns) == 2 and NS5_SIDE_STREAM:
            if device not in _SIDE:
                _SIDE[device] = torch.cuda.Stream(device)
            self.side = _SIDE[device]
            self.main = torch.cuda.current_stream(device)     # the op's stream, the same for all its chunks
            self.ready, self.done = torch.cuda.Event(), torch.cuda.Event()

    def __call__(self, *calls: tuple[tuple, dict]) -> None:
        if self.side is None:
            for g, (a, kw) in zip(self.ns, calls):
                g(*a, **kw)
            return
        self.ready.record(self.main)
        self.side.wait_event(self.ready)
        w2 = self.ns[1]
        if w2.launch is not None and w2.launch.pinned:   # straight to the side stream, without torch's switch
            w2(*calls[1][0], **calls[1][1])
        else:
            with torch.cuda.stream(self.side):
                w2(*calls[1][0], **calls[1][1])
        self.done.record(self.side)
        self.ns[0](*calls[0][0], **calls[0][1])
        self.main.wait_event(self.done)


def keep_chain() -> bool:
    v = os.environ.get("MEMLM_NS5_KEEP_CHAIN", "1" if NS5_KEEP_CHAIN else "0")
    if v not in ("0", "1"):
        raise ValueError(f"MEMLM_NS5_KEEP_CHAIN={v!r}: expected 0 (recompute the Newton–Schulz chain in the backward) "
                         f"or 1 (keep it from the forward)")
    return v == "1"


class _NS5:
    """Newton–Schulz on every [rows, cols] matrix of a [B, H, ...] batch (wide orientation): kernel choice, launch
    geometry, scratch, launch, for the forward or the backward and the op's dot precision `prec`. store (Gram form):
    the forward keeps each chunk's chain for the backward (`chain`), which then skips recomputing it."""

    def __init__(self, rows: int, cols: int, prec: str, backward: bool = False, direct: bool = False,
                 store: bool = False, gram_in: bool = False):
        self.M, self.N = min(rows, cols), max(rows, cols)
        self.direct, self.launch = direct, None     # Relauncher's direct launches (_scan_forward), made at first call
        self.sr, self.sc = (cols, 1) if rows <= cols else (1, cols)          # a tall matrix is read transposed
        self.gram, self.backward = prec != "ieee", backward
        self.store = store and self.gram
        # gram_in (a forward of a wide matrix, M = rows): the step kernel wrote S's Gram matrix and ‖S‖² (_step_fwd's
        # GRAM), _ns5g takes them and leaves its second pass to _ns5g_apply (one program a column tile)
        self.gin = gram_in and self.gram and not backward and rows <= cols
        self.BM = BM = _pow2(self.M)
        # H100, 128 programs of 64×560, TF32 / bf16 dots (fwd, bwd µs): BN 16 and 8 warps 204/607, 175/458; BN 64 and
        # 4 warps 145/419, 117/288 (the best of BN 16/32/64 × 4/8 warps). 128 rows: narrow tiles, unmeasured.
        # Tenth session, TF32, best of 3 × 20 launches: the backward at BN 32 405 µs against 416–421 at BN 64 (no
        # spills against 64 B), and 26 against 36 µs on 32 × 64 (W2's map); the forward stays at BN 64 (143–150 against
        # 154 at BN 32; 19 against 28 on 32 × 64). The Gram kernel takes the same tiles (eleventh session: 4 warps
        # 78 / 326 µs against 125 / 474 at 8 on 64 × 560). Twelfth session, chain kept, 4 warps, BN 16 / 32 / 64 / 128:
        # forward 120 / 113 / 106 / 152 µs, backward 202 / 183 / 195 / 268 on 64 × 560; 32 × 64 all within 4 µs.
        cfg = {"BN": 32 if backward else 64, "num_warps": 4} if BM <= 64 else {"BN": 16, "num_warps": 8}
        a, b, c = NS5_COEFFS
        if self.gram:
            chain = not (backward and self.store)        # a backward with a stored chain only reads it
            dots = {**dict(zip(("PREC", "PC", "PW"), NS5_GRAM_PRECISION)), "BWD": backward, "CHAIN": chain,
                    "SAVE": chain and (backward or self.store), "GIN": self.gin}
        else:
            dots = {"PREC": prec}
        self.consts = {"A_": a, "B_": b, "C_": c, "STEPS": NS5_STEPS, "BM": BM, **dots, **cfg}
        self.NT = triton.cdiv(self.N, cfg["BN"])
        self.apply = None
        self.name = "ns5g" if self.gram else "ns5_bwd" if backward else "ns5_fwd"

    def scratch(self, like: Tensor, BH: int) -> tuple[Tensor, ...]:
        """Iterative: the iterate [B·H, M·N] (forward), or every iterate and dY [B·H, STEPS, M·N], [B·H, M·N]
        (backward). Gram: the recomputed chain [B·H, STEPS, 4, BM, BM] (a backward without a stored one), or nothing;
        with gram_in the Gram matrix [B·H, BM, BM] and ‖S‖² [B·H] (written by _step_fwd) and K_5 / n [B·H, BM, BM]."""
        M, N, BM = self.M, self.N, self.BM
        if self.gin:     # the step's Gram matrix and ‖S‖², and K_5 / n for _ns5g_apply
            return _empty(like, BH, BM, BM), _empty(like, BH), _empty(like, BH, BM, BM)
        if self.gram:
            return (_empty(like, BH, NS5_STEPS, 4, BM, BM),) if self.backward and not self.store else ()
        if self.backward:
            return _empty(like, BH, NS5_STEPS, M * N), _empty(like, BH, M * N)
        return (_empty(like, BH, M * N),)

    def chain(self, like: Tensor, BH: int, K: int) -> Tensor | None:
        """The forward's stored chains of K chunks [B·H, K, STEPS, 4, BM, BM] (store), else None."""
        return _empty(like, BH, K, NS5_STEPS, 4, self.BM, self.BM) if self.store else None

    def __call__(self, s: Tensor, o: Tensor, scratch: tuple[Tensor, ...], dS: Tensor | None = None,
                 chain: Tensor | None = None, slot: int = 0) -> None:
        """Forward: o += NS5(s). Backward: dS += (∂NS5/∂s)ᵀ o. s, o, dS [B, H, rows, cols] views, dense over (B, H)
        with per-head strides s.stride(1), o.stride(1) (dS as o). chain: the stored chains (`chain`; store), of which
        this chunk's is `slot`."""
        interpret = s.device.type == "cpu"
        if self.launch is None:
            self.launch = Relauncher(_kernels(interpret)[self.name], (s.shape[0] * s.shape[1],), self.direct)
        if self.gram:                    # one kernel both ways; unused slots (a forward's dS; Ch; Gin…) take o
            gin, rc = (scratch, ()) if self.gin else ((o, o, o), scratch)
            ch = rc[0] if rc else o if chain is None else chain[:, slot]
            args = (s, o, o if dS is None else dS, ch, *gin, s.stride(1), o.stride(1), ch.stride(0))
        else:
            args = ((s, o, *scratch) if dS is None else (s, o, dS, *scratch)) + (s.stride(1), o.stride(1))
        consts = {k: _interpreted_precision(v) for k, v in self.consts.items()} if interpret else self.consts
        self.launch(*args, self.sr, self.sc, self.M, self.N, _count(self.NT, interpret), NS5_EPS ** 2, **consts)
        if self.gin:
            BN = GRAM_APPLY_BN
            if self.apply is None:
                self.apply = Relauncher(_kernels(interpret)["ns5g_apply"],
                                        (s.shape[0] * s.shape[1], triton.cdiv(self.N, BN)), self.direct)
            self.apply(s, o, scratch[2], s.stride(1), o.stride(1), self.sr, self.sc, self.M, self.N, BM=self.BM,
                       BN=BN, PREC=consts["PREC"], num_warps=4)


def _interpreted_precision(v):
    """A dot precision the interpreter accepts for v (it takes "ieee", "tf32", "tf32x3" and computes every dot in
    float32 regardless); any other constant unchanged."""
    return "tf32x3" if isinstance(v, str) and v.startswith("bf16x") else v


def _direct(interpret: bool) -> bool:
    """Launch a scan's chunks after the first straight through the compiled kernel (triton_common.Relauncher): its
    kernels take the same tensors every chunk and differ only in the chunk indices, built do_not_specialize. Not in
    the interpreter, nor while torch.compile traces (it captures the JIT's launches)."""
    return not interpret and not torch.compiler.is_compiling()


def _aligned(*stacks: Tensor) -> bool:
    """Every slot of these [B, H, K, …] stacks starts at the 16-byte alignment of slot 0 (the Newton–Schulz kernels
    take one slot per chunk, and Triton specialises on 16-byte pointer alignment)."""
    return all(t.stride(2) * t.element_size() % 16 == 0 for t in stacks)


# The chunk walk is one pair of custom operators (torch.library): opaque to torch.compile, which traces their fake
# versions (shapes only) and runs the real ones as they are. Traced as an autograd.Function with its Python chunk loop
# (its launches in the graph, 7 a chunk and layer), atlas-mag-small's compile did not finish in 330 s (H100).
_SCAN_SCHEMA = ("(Tensor X, Tensor? XR, Tensor V, Tensor Wg, Tensor Eta, Tensor Theta, Tensor Alpha, Tensor W1, "
                "Tensor W2, Tensor S1, Tensor S2, Tensor? W1i, Tensor? W2i, Tensor has, int j0, int j1, int C, "
                "bool muon, str prec, ScalarType rd, bool keep, bool grad, int kr, Tensor? commit, Tensor? head, "
                "Tensor[] cols) -> Tensor[]")
_SCAN_BWD_SCHEMA = ("(Tensor X, Tensor? XR, Tensor V, Tensor Wg, Tensor Eta, Tensor Theta, Tensor Alpha, "
                    "Tensor W1all, Tensor W2all, Tensor S1all, Tensor S2all, Tensor? W1i, Tensor? W2i, Tensor has, "
                    "Tensor? commit, Tensor? head, Tensor[] cols, Tensor[] chains, Tensor? dW1r, Tensor? dW2r, "
                    "Tensor? dW1, Tensor? dW2, Tensor? dS1, Tensor? dS2, Tensor? dsel1, Tensor? dsel2, Tensor? dsel3, "
                    "Tensor? dsel4, int j0, int j1, int C, bool muon, str prec, ScalarType rd, int kr) -> Tensor[]")


def _copied_reads(rd: torch.dtype, head: Tensor | None) -> bool:
    """The reads' stacks are copies (W_init in the slots of chunks that open with a reset, or a cast to rd), not the
    kernels' own float32 stacks."""
    return head is not None or rd != torch.float32


def _stores_chain(muon: bool, prec: str, keep: bool, grad: bool) -> bool:
    """The forward keeps the Newton–Schulz chains for the backward (Gram form, a backward will run, keep_chain())."""
    return muon and prec != "ieee" and keep and grad


@torch.library.custom_op("memlm::neural_memory_scan", mutates_args=(), schema=_SCAN_SCHEMA)
def _scan_forward(X, XR, V, Wg, Eta, Theta, Alpha, W1, W2, S1, S2, W1i, W2i, has, j0, j1, C, muon, prec, rd, keep,
                  grad, kr, commit, head, cols):
    """Chunks j0 … j1−1 of the stream written one after another (see the module docstring).

    Inputs: X [B, H, L, F] (or the raw keys [B, H, L, Dk] with cols, φ's column maps: POLY_IN_STEP), XR [B, H, L, Dv]
    or None, V [B, H, L, Dv] (contiguous); Wg [B, H, NJ, c]; Eta, Theta, Alpha [B, H, NJ]; W1, S1 [B, H, E, F], W2, S2
    [B, H, Dv, E] (state before chunk j0); W1i [H, E, F], W2i [H, Dv, E] or None (then has is all zero); has int8
    [B, NJ] (≠ 0: a reset in the chunk); j0, j1, C, muon.
    prec: the kernels' dot precision (`precision`); rd: the reads' dtype (parallel.read_dtype); grad: a backward will
    run; keep: store the Newton–Schulz chains for it (keep_chain()); kr: how many slots the reads use (K1 − 1 when no
    token reads W_{j1}: no open chunk after this stretch); commit [B] int64 or None (the op's, clamped to
    [0, n_full]). head [B, n_chunks] int8 or None: the chunk opens with a reset; its slot of the reads' stacks then
    holds W_init (`_read_stack`) and `has` is 2 there (the kernels send that slot's gradient to W_init).
    Outputs, a list: the kernels' stacks W1all, W2all, S1all, S2all [B, H, K1, …] float32 (slot i: the state before
    chunk j0 + i, K1 = j1 − j0 + 1); the final W1, W2, S1, S2; with commit each row's W1, W2, S1, S2 at slot
    clamp(commit − j0, 0, K1 − 1); when `_copied_reads` the reads' stacks W1r [B, H, kr, E, F], W2r [B, H, kr, Dv, E]
    in rd (else the reads take W1all, W2all: all K1 slots); when `_stores_chain` the chains of W1's and W2's maps
    [B·H, K1 − 1, STEPS, 4, BM, BM]. A cast copy of the reads' stacks is made here once, so that the reads need no
    padding chunk, and the backward kernels read its gradient in rd as it comes (autocast would cast the gradient back
    to float32 in a copy the size of the stack). Writing the copy from the Newton–Schulz kernel instead of casting was
    slower: its [M, N] stores are not coalesced (+30 µs a call, H100).
    """
    B, H, L = X.shape[:3]
    E, F, Dv, NJ, c = W1.shape[2], W1.shape[3], V.shape[-1], Eta.shape[-1], Wg.shape[-1]
    BH, K1 = B * H, j1 - j0 + 1
    interpret = X.device.type == "cpu"
    kern = _kernels(interpret)
    W1all, S1all = (_empty(W1, B, H, K1, E, F) for _ in range(2))
    W2all, S2all = (_empty(W1, B, H, K1, Dv, E) for _ in range(2))
    W1all[:, :, 0], W2all[:, :, 0], S1all[:, :, 0], S2all[:, :, 0] = W1, W2, S1, S2
    cfg = _step_config(c, E, Dv, F, backward=False, prec=prec)
    flags = _scan_flags(X, XR, muon, prec, cols)
    cols = cols or (X, X, X)
    direct = _direct(interpret)
    step = Relauncher(kern["step_fwd"], (BH,), direct)
    store = _stores_chain(muon, prec, keep, grad)
    # W1's Gram matrix from the step kernel, unless a backward will recompute the chain from its own pass (then
    # the forward makes the same pass, so that both chains are the same)
    gram_in = NS5_GRAM_FROM_STEP and (store or not grad)
    ns = [_NS5(E, F, prec, direct=direct and _aligned(S1all, W1all), store=store, gram_in=gram_in),
          _NS5(Dv, E, prec, direct=direct and _aligned(S2all, W2all), store=store)] if muon else []
    scratch = [g.scratch(W1, BH) for g in ns]
    # W1's Gram matrix and ‖S1‖² from the step kernel (Muon, Gram form, E ≤ F; the dots of the map's passes), else
    # unused pointers
    gram = ns[0].gin if ns else False
    G1, SS1 = scratch[0][:2] if gram else (W1all, W1all)
    gprec = ns[0].consts["PREC"] if gram else prec
    chains = [g.chain(W1, BH, K1 - 1) for g in ns] + [None] * (2 - len(ns))
    maps = _Maps(ns, direct, X.device)
    for i, j in enumerate(range(j0, j1)):
        step(
            X, X if XR is None else XR, V, Wg, Eta, Theta, Alpha, has, *cols,
            W1all, W2all, S1all, S2all, W1all if W1i is None else W1i, W2all if W2i is None else W2i, G1, SS1,
            j, i, H, L, NJ, K1, C, c, E, F, Dv, _count(triton.cdiv(F, cfg["BF"]), interpret), **flags, **cfg,
            GRAM=gram, GPREC=gprec)
        maps(*(((Sa[:, :, i + 1], Wa[:, :, i + 1], sc), {"chain": ch, "slot": i})
               for Sa, Wa, sc, ch in zip((S1all, S2all), (W1all, W2all), scratch, chains)))
    stacks = [W1all, W2all, S1all, S2all]
    out = stacks + [t[:, :, -1].clone() for t in stacks]
    if commit is not None:   # each row's state after chunk j0 + slot − 1 (slot 0: this stretch's start)
        slot = (commit - j0).clamp(0, K1 - 1)
        out += [t[torch.arange(B, device=X.device), :, slot] for t in stacks]
    if head is not None:     # W_init in the slots of chunks that open with a reset
        out += [_read_stack(W1all, W1i, head, j0, kr, rd), _read_stack(W2all, W2i, head, j0, kr, rd)]
    elif rd != torch.float32:   # the cast copies only the slots read
        out += [W1all[:, :, :kr].to(rd), W2all[:, :, :kr].to(rd)]
    return out + [ch for ch in chains if ch is not None]


@_scan_forward.register_fake
def _(X, XR, V, Wg, Eta, Theta, Alpha, W1, W2, S1, S2, W1i, W2i, has, j0, j1, C, muon, prec, rd, keep, grad, kr,
      commit, head, cols):
    B, H, (E, F), Dv, K1 = X.shape[0], X.shape[1], W1.shape[2:], V.shape[-1], j1 - j0 + 1
    w1, w2 = (B, H, E, F), (B, H, Dv, E)
    out = [W1.new_empty(B, H, K1, *s) for s in (w1[2:], w2[2:], w1[2:], w2[2:])]
    out += [W1.new_empty(s) for s in (w1, w2, w1, w2) * (2 if commit is not None else 1)]
    if _copied_reads(rd, head):
        out += [W1.new_empty(B, H, kr, *s, dtype=rd) for s in (w1[2:], w2[2:])]
    if _stores_chain(muon, prec, keep, grad):
        out += [W1.new_empty(B * H, K1 - 1, NS5_STEPS, 4, _pow2(min(m, n)), _pow2(min(m, n))) for m, n in ((E, F),
                                                                                                        (Dv, E))]
    return out


def _scan_flags(X: Tensor, XR: Tensor | None, muon: bool, prec: str, cols) -> dict:
    """The step kernels' constexprs (the forward's and the backward's take the same)."""
    return {"HAS_XR": XR is not None, "MUON": muon, "PREC": prec, "POLY": bool(cols), "DK": X.shape[-1],
            "BK": _pow2(X.shape[-1])}


def _parts(out: list, commit: bool, copied: bool) -> tuple[list, list, list, list, list]:
    """`_scan_forward`'s output list, or the gradients of it, split as (stacks, final state, commit selections, the
    reads' stacks, chains); the reads' stacks are the kernels' first two when not copied (`_copied_reads`)."""
    n = 12 if commit else 8
    reads = out[n:n + 2] if copied else out[:2]
    return out[:4], out[4:8], out[8:n], reads, out[n + 2 * copied:]


def _scan_setup(ctx, inputs, output) -> None:
    (X, XR, V, Wg, Eta, Theta, Alpha, W1, W2, S1, S2, W1i, W2i, has, j0, j1, C, muon, prec, rd, keep, grad, kr,
     commit, head, cols) = inputs
    copied = _copied_reads(rd, head)
    stacks, _, _, _, chains = _parts(output, commit is not None, copied)
    # the stacks are kept for the backward; only the reads' ones (W1all, W2all when not copied) take a gradient
    ctx.mark_non_differentiable(*(stacks if copied else stacks[2:]), *chains)
    ctx.set_materialize_grads(False)   # an unused state (or selection) sends no gradient: nothing to add
    ctx.save_for_backward(X, XR, V, Wg, Eta, Theta, Alpha, *stacks, W1i, W2i, has, commit, head, *cols, *chains)
    ctx.meta = (j0, j1, C, muon, prec, rd, kr, len(cols), copied)


def _scan_backward(ctx, grads):
    """The registered autograd formula: the backward operator on what the forward kept."""
    X, XR, V, Wg, Eta, Theta, Alpha, W1all, W2all, S1all, S2all, W1i, W2i, has, commit, head, *rest = \
        ctx.saved_tensors
    j0, j1, C, muon, prec, rd, kr, n_cols, copied = ctx.meta
    cols, chains = rest[:n_cols], rest[n_cols:]
    _, last, sel, reads, _ = _parts(grads, commit is not None, copied)
    g = torch.ops.memlm.neural_memory_scan_backward(
        X, XR, V, Wg, Eta, Theta, Alpha, W1all, W2all, S1all, S2all, W1i, W2i, has, commit, head, list(cols),
        list(chains), *reads, *last, *sel, *[None] * (4 - len(sel)), j0, j1, C, muon, prec, rd, kr)
    dX, dV, dWg, dEta, dTheta, dAlpha, gW1, gW2, gS1, gS2, *more = g
    dXR = more.pop(0) if XR is not None else None
    dW1i, dW2i = more if W1i is not None else (None, None)
    # nothing for has, the nine numbers and flags, commit, head, and the column maps
    return (dX, dXR, dV, dWg, dEta, dTheta, dAlpha, gW1, gW2, gS1, gS2, dW1i, dW2i, *[None] * 12, [None] * n_cols)


torch.library.register_autograd("memlm::neural_memory_scan", _scan_backward, setup_context=_scan_setup)


@torch.library.custom_op("memlm::neural_memory_scan_backward", mutates_args=(), schema=_SCAN_BWD_SCHEMA)
def _scan_backward_op(X, XR, V, Wg, Eta, Theta, Alpha, W1all, W2all, S1all, S2all, W1i, W2i, has, commit, head, cols,
                      chains, dW1r, dW2r, dW1, dW2, dS1, dS2, dsel1, dsel2, dsel3, dsel4, j0, j1, C, muon, prec, rd,
                      kr):
    """The walk back: chunks j1−1 … j0 in reverse. Gradients (None: none came) of the reads' stacks dW1r, dW2r, the
    final state dW1 … dS2 and the commit selections dsel1 … dsel4 -> [∂X, ∂V, ∂Wg, ∂Eta, ∂Theta, ∂Alpha, ∂W1, ∂W2,
    ∂S1, ∂S2, (∂XR), (∂W1i, ∂W2i)] (the bracketed ones when XR, W1i are given)."""
    flags = _scan_flags(X, XR, muon, prec, cols)
    poly = flags["POLY"]
    B, H, L = X.shape[:3]
    E, F, Dv, NJ, c = W1all.shape[3], W1all.shape[4], V.shape[-1], Eta.shape[-1], Wg.shape[-1]
    BH, K1 = B * H, j1 - j0 + 1
    interpret = X.device.type == "cpu"
    kern = _kernels(interpret)
    K = kr if _copied_reads(rd, head) else K1
    # the reads' ∂L/∂W_j in their dtype (zeros when no read was used)
    R1, R2 = (_slots(d) if d is not None else W.new_zeros(B, H, K, *W.shape[3:], dtype=rd)
              for d, W in ((dW1r, W1all), (dW2r, W2all)))
    # carried ∂L/∂W_j, ∂L/∂S_j [B, H, ...] (float32, contiguous, owned: the kernels add into them)
    KR = R1.shape[2]
    gW1, gW2, gS1, gS2 = (W.new_zeros(W.shape[:2] + W.shape[3:]) if d is None else d.float().contiguous().clone()
                          for d, W in ((dW1, W1all), (dW2, W2all), (dS1, S1all), (dS2, S2all)))
    # rows with a reset in chunk j send the write's ∂L/∂Ws here (summed over rows at the end), and the reads' of a
    # chunk that opens with one (`_read_stack`)
    dW1i, dW2i = W1all.new_zeros(B, H, E, F), W1all.new_zeros(B, H, Dv, E)
    if KR == K1:                     # the last slot is read too
        r1, r2 = R1[:, :, -1].float(), R2[:, :, -1].float()
        if head is not None:    # its reads used W_init where the open chunk j1 after this stretch opens with a reset
            hl = head[:, j1].view(B, 1, 1, 1).float()
            dW1i.addcmul_(r1, hl)
            dW2i.addcmul_(r2, hl)
            r1, r2 = r1 * (1.0 - hl), r2 * (1.0 - hl)
        gW1 += r1
        gW2 += r2
    # the selections' gradients join the carried ones at their rows' slots (slot s: the state W_{j0+s})
    picks = [(d.float(), g) for d, g in zip((dsel1, dsel2, dsel3, dsel4), (gW1, gW2, gS1, gS2)) if d is not None]
    slot = None if commit is None else (commit - j0).clamp(0, K1 - 1)

    def add_picks(s: int) -> None:
        if picks:
            at = (slot == s).to(torch.float32).view(B, 1, 1, 1)
            for d, g in picks:
                g.addcmul_(d, at)
    # _step_bwd stores (not adds) the window rows of dX, dXR, dV of its chunk: with the window the whole chunk
    # (c = C) only the rows outside this stretch's chunks need zeros, not a fill of the [B, H, L, F] features
    # (POLY: dX is ∂L/∂φ(K), [B, H, L, F], summed into ∂L/∂K by poly_backward after the walk)
    dX, dV, dXR = (None if t is None else _rows_zeroed_outside(t, j0 * C, j1 * C, c == C, w)
                   for t, w in ((X, F if poly else None), (V, None), (XR, None)))
    dWg = torch.zeros_like(Wg)
    dEta, dTheta, dAlpha = torch.zeros_like(Eta), torch.zeros_like(Theta), torch.zeros_like(Alpha)
    cfg = _step_config(c, E, Dv, F, backward=True, prec=prec)
    direct = _direct(interpret)
    step = Relauncher(kern["step_bwd"], (BH,), direct)
    keep = bool(chains)
    ns = [_NS5(E, F, prec, backward=True, direct=direct and _aligned(S1all), store=keep),
          _NS5(Dv, E, prec, backward=True, direct=direct and _aligned(S2all), store=keep)] if muon else []
    scratch = [g.scratch(X, BH) for g in ns]
    maps = _Maps(ns, direct, X.device)
    chains = list(chains) or [None, None]
    cols = cols or (X, X, X)
    for i in reversed(range(j1 - j0)):
        add_picks(i + 1)
        # gS_{j+1} += (∂NS5/∂S_{j+1})ᵀ gW_{j+1} (Muon)
        maps(*(((Sa[:, :, i + 1], gw, sc), {"dS": gs, "chain": ch, "slot": i})
               for Sa, gw, gs, sc, ch in zip((S1all, S2all), (gW1, gW2), (gS1, gS2), scratch, chains)))
        step(
            X, X if XR is None else XR, V, Wg, Eta, Theta, Alpha, has, *cols,
            W1all, W2all, S1all, S2all, W1all if W1i is None else W1i, W2all if W2i is None else W2i,
            gW1, gW2, gS1, gS2, R1, R2, dX, dX if XR is None else dXR, dV, dWg, dEta, dTheta, dAlpha, dW1i, dW2i,
            j0 + i, i, H, L, NJ, K1, KR, C, c, E, F, Dv, _count(triton.cdiv(F, cfg["BF"]), interpret),
            *R1.stride()[3:], *R2.stride()[3:], **flags, **cfg)
    add_picks(0)
    if poly:
        dX = poly_backward(X, dX)
    out = [dX, dV, dWg, dEta, dTheta, dAlpha, gW1, gW2, gS1, gS2]
    if XR is not None:
        out.append(dXR)
    if W1i is not None:
        out += [dW1i.sum(0), dW2i.sum(0)]
    return out


@_scan_backward_op.register_fake
def _(X, XR, V, Wg, Eta, Theta, Alpha, W1all, W2all, S1all, S2all, W1i, W2i, has, commit, head, cols, chains, dW1r,
      dW2r, dW1, dW2, dS1, dS2, dsel1, dsel2, dsel3, dsel4, j0, j1, C, muon, prec, rd, kr):
    out = [torch.empty_like(t) for t in (X, V, Wg, Eta, Theta, Alpha)]
    out += [W.new_empty(W.shape[:2] + W.shape[3:]) for W in (W1all, W2all, S1all, S2all)]
    if XR is not None:
        out.append(torch.empty_like(XR))
    if W1i is not None:
        out += [torch.empty_like(W1i), torch.empty_like(W2i)]
    return out


def _scan(X, XR, V, Wg, Eta, Theta, Alpha, W1, W2, S1, S2, W1i, W2i, has, j0, j1, C, muon, prec, rd, keep, kr, commit,
          head, cols) -> tuple[Tensor, ...]:
    """The walk over chunks j0 … j1−1 (`_scan_forward`) -> the reads' stacks W1r, W2r, the final W1, W2, S1, S2, and
    with commit each row's W1, W2, S1, S2 at its commit."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (X, XR, V, Wg, Eta, Theta, Alpha, W1, W2, S1, S2, W1i, W2i))
    out = torch.ops.memlm.neural_memory_scan(X, XR, V, Wg, Eta, Theta, Alpha, W1, W2, S1, S2, W1i, W2i, has, j0, j1, C,
                                             muon, prec, rd, keep, grad, kr, commit, head, list(cols or ()))
    _, last, sel, reads, _ = _parts(out, commit is not None, _copied_reads(rd, head))
    return (*reads, *last, *sel)


def _read_stack(W: Tensor, Wi: Tensor, head: Tensor, j0: int, kr: int, rd: torch.dtype) -> Tensor:
    """The reads' stack [B, H, kr, ...] in rd from the kernels' W [B, H, K1, ...] (float32): slot i is W_init Wi
    [H, ...] where chunk j0 + i opens with a reset (head [B, n_chunks] int8), else W's slot i (kernel `_stack_copy`)."""
    B, H, K1 = W.shape[:3]
    N = Wi[0].numel()
    interpret = W.device.type == "cpu"
    # the interpreter rounds float32 to bf16 otherwise than PyTorch (the compiled cast is PyTorch's, GPU test): a
    # float32 copy there, cast by PyTorch
    out = torch.empty(B, H, kr, *W.shape[3:], dtype=torch.float32 if interpret else rd, device=W.device)
    BN = min(2048, _pow2(N))
    _kernels(interpret)["stack_copy"][(B * H * kr, triton.cdiv(N, BN))](
        W, Wi, head, out, H, K1, kr, head.shape[1], j0, N, BN=BN, num_warps=4)
    return out.to(rd)


def _rows_zeroed_outside(like: Tensor, r0: int, r1: int, covered: bool, width: int | None = None) -> Tensor:
    """A buffer like `like` [B, H, L, ·] (last dimension `width` if given) whose rows outside [r0, r1) are zero; all
    zero unless `covered` (the kernels will write every row in [r0, r1))."""
    shape = like.shape if width is None else (*like.shape[:-1], width)
    if not covered:
        return like.new_zeros(shape)
    t = _empty(like, *shape)
    t[:, :, :r0].zero_()
    t[:, :, r1:].zero_()
    return t


def _slots(t: Tensor) -> Tensor:
    """t [B, H, K, a, b] as _step_bwd reads it: slots packed one after another, each dense in either orientation (the
    gradient of the reads' `x @ W.mT` is a transposed view: no copy for it), else a contiguous copy."""
    H, K, a, b = t.shape[1:]
    packed = t.stride()[:3] == (H * K * a * b, K * a * b, a * b) and t.stride()[3:] in ((b, 1), (1, a))
    return t if packed else t.contiguous()


def _read_chunks(pre: Prelude, st: Stream, j0: int, j_end: int, W1: Tensor, W2: Tensor, heads: bool = False) -> Tensor:
    """Reads of this call's tokens in chunks j0 … j_end−1, chunk j with W1[:, :, j − j0] (and W2), W_init after a
    reset in the chunk. W1 [B, H, K, E, F], W2 [B, H, K, Dv, E] with K ≥ j_end − j0: the queries are laid out as K
    chunks (zeros beyond j_end) so that a whole contiguous stack is one batched matmul, never copied. heads: the
    stack holds W_init in the slots of chunks that open with a reset (`_read_stack`), so with chunk-aligned resets
    (pre.aligned) no token needs the second read with W_init.
    -> [B, H, t, Dv] (t: this call's tokens in those chunks, maybe 0)."""
    C, p = pre.C, st.p
    K = W1.shape[2]
    s0, s1 = max(j0 * C, p), min(j_end * C, st.L)
    B, H = pre.qf.shape[:2]
    if s1 <= s0:
        return pre.qf.new_zeros(B, H, 0, W2.shape[-2])
    sl = slice(s0 - p, s1 - p)
    front, n, tail = s0 - j0 * C, s1 - s0, (j0 + K) * C - s1
    qf = pre.qf[:, :, sl]
    if front or tail:   # zero rows that the stack's chunks have but the call does not (a copy of the features)
        qf = Fn.pad(qf, (0, 0, front, tail))
    qf = qf.unflatten(2, (K, C))                                                              # [B, H, K, C, F]
    o = memory_read(W1, W2, qf, None).flatten(2, 3)[:, :, front:front + n]
    if pre.qraw is not None:
        o = o + pre.qraw[:, :, sl]
    if st.any_reset and not (heads and pre.aligned):
        after = st.after[:, j0:j_end].flatten(1)[:, front:front + n]                          # [B, n]
        if maybe_any(after):   # on CUDA and compiled: always (no host sync, no data-dependent branch)
            qraw = None if pre.qraw is None else pre.qraw[:, :, sl]
            o = torch.where(after[:, None, :, None], memory_read(pre.W1i, pre.W2i, pre.qf[:, :, sl], qraw), o)
    return o


def neural_memory(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, theta: Tensor, alpha: Tensor,
                  W1: Tensor, W2: Tensor, S1: Tensor | None = None, S2: Tensor | None = None, *,
                  pending: Pending | None = None, chunk_size: int = 64, window: int | None = None,
                  optimizer: str = "momentum", update: bool = True, poly: bool = False, reset: Tensor | None = None,
                  W1_init: Tensor | None = None, W2_init: Tensor | None = None, commit: Tensor | None = None,
                  chunk_aligned_resets: bool = False) -> tuple[Tensor, NeuralMemoryState]:
    """Same contract as parallel.neural_memory (see there): q, k [B, T, H, Dk]; v [B, T, H, Dv]; gates [B, T, H];
    W1 [B, H, E, F], W2 [B, H, Dv, E] -> o [B, T, H, Dv] (dtype of q), NeuralMemoryState (float32)."""
    if not supports(q, k, v, gamma, eta, theta, alpha, W1, W2, chunk_size=chunk_size, window=window,
                    optimizer=optimizer):
        raise ValueError(f"neural_memory backend 'triton' needs Triton, CUDA tensors (or CPU with TRITON_INTERPRET=1), "
                         f"no float64, and window, E, Dv ≤ {MAX_DIM} (min(E, F) ≤ {MAX_DIM} for muon); "
                         f"use backend 'chunked' otherwise")
    pre = prepare(q, k, v, gamma, eta, theta, alpha, W1, W2, S1, S2, pending, chunk_size, window, optimizer, poly,
                  reset, W1_init, W2_init, commit, chunk_aligned_resets)
    if not update:
        return read_only(pre)
    Dk = k.shape[-1]
    fused = pre.poly and POLY_IN_STEP and Dk <= MAX_POLY_DIM and pre.dt == torch.float32
    cols = _poly_cols(Dk, q.device) if fused else None
    st = stream(pre, k, v, gamma, eta, theta, alpha, raw_keys=cols is not None)
    W1, W2, S1, S2 = pre.W1, pre.W2, pre.S1, pre.S2
    if not st.n_full:   # no chunk completes: every token reads the current weights
        o = _read_chunks(pre, st, 0, st.n_chunks, W1[:, :, None], W2[:, :, None])
        return finish(o, pre, st, W1, W2, S1, S2)
    gw, ge, gt, ga = chunk_gates(st, pre.C, pre.c)
    W1i, W2i = (None, None) if pre.W1i is None else (pre.W1i[0].contiguous(), pre.W2i[0].contiguous())
    head = None      # [B, n_chunks] int8: the chunk opens with a reset (its reads are W_init's: `_read_stack`)
    if st.any_reset:
        has = st.has[:, :st.n_full].to(torch.int8)
        # only where the reads' stack is a cast copy anyway (bf16 reads): float32 reads use the kernels' own stacks
        if W1i is not None and pre.qf.dtype != torch.float32:
            head = st.after[:, :, 0].to(torch.int8).contiguous()
            has = has + head[:, :st.n_full]          # 2: the kernels send that chunk's read gradient to W_init
        has = has.contiguous()
    else:
        has = torch.zeros(q.shape[0], st.n_full, dtype=torch.int8, device=q.device)
    commit = None if pre.commit is None else pre.commit.clamp(0, st.n_full)
    prec = precision(q.dtype in (torch.bfloat16, torch.float16))
    outs, kept = [], None    # kept: each row's state after commit[b] chunks (commit given)
    for j0 in range(0, st.n_full, MAX_SCAN):
        j1 = min(j0 + MAX_SCAN, st.n_full)
        # the stack's last slot W_{j1} (also returned alone, in float32: the next scan's start and the final state)
        # serves the open chunk after the last scan, if this call has tokens there
        j_end = st.n_chunks if j1 == st.n_full else j1
        W1r, W2r, W1, W2, S1, S2, *sel = _scan(
            st.kf, st.kraw, st.vb, gw.contiguous(), ge, gt, ga, W1, W2, S1, S2, W1i, W2i, has, j0, j1, pre.C,
            optimizer == "muon", prec, pre.qf.dtype, keep_chain(), j_end - j0, commit, head, cols)
        if commit is not None:   # rows whose commit lies before this stretch keep the earlier stretch's pick
            before = (commit < j0).view(-1, 1, 1, 1)
            kept = sel if kept is None else [torch.where(before, a, b) for a, b in zip(kept, sel)]
        outs.append(_read_chunks(pre, st, j0, j_end, W1r, W2r, heads=head is not None))
    if kept is not None:
        W1, W2, S1, S2 = kept
    return finish(torch.cat(outs, dim=2), pre, st, W1, W2, S1, S2)
