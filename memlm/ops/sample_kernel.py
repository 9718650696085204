"""The in-graph sampler's core (memlm.inference.sampling.packed_sample without top-k / top-p / min-p): one pass over
the logits for the token, its log-probability and the entropy.

Notation: B batch, V vocabulary, τ temperature; NS splits of SPLIT consecutive logits per row, each walked in blocks
of BLOCK logits. x = logits[b] in float32, lse = log Σ e^x, p = e^(x − lse) (the model's distribution, τ = 1).

    token    greedy (noise None or τ = 0): argmax_v x_v (lowest index among ties, as torch.argmax); otherwise the
             exponential race argmax_v softmax(x/τ)_v / E_v with E_v ~ Exp(1), computed as argmax_v (x_v/τ − log E_v)
             (the same order: log is monotone and lse_τ is common to the row), E clamped to ≥ 1e-30 as the reference;
    logprob  x_token − lse;
    entropy  −Σ p log p = lse − Σ p x (0·log 0 = 0: −inf logits, masked tokens, add nothing).

Backends (memlm.ops.dispatch, op "packed_sample", arguments (logits, noise, temperature) -> [3, B] float64 rows
token ids, log-probabilities, entropies):
  "torch"   log_softmax, argmax, gather and an xlogy sum: the reference (any device; the CPU default). At B = 1 every
            reduction is one block over the V logits, and there are several of them.
  "triton"  pass 1 (`_split_kernel`, grid (NS, B)) gives each program SPLIT logits of one row, so many SMs read a row
            at B = 1. Each thread keeps, for its own lanes of the block and in float32, a running max m, s = Σ e^(x−m),
            t = Σ e^(x−m)(x − m) (both rescaled when m grows: one exp per logit) and the best race score with its
            index; the lanes are merged once at the end into a partial (m, s, t, best, index). Pass 2
            (`_combine_kernel`, grid (B,)) merges the NS partials: M = max m, Z = Σ s e^(m−M), lse = M + log Z,
            entropy = log Z − (Σ e^(m−M)(t + (m − M) s)) / Z, token = the best score's lowest index; it reloads
            x_token for the log-probability and writes the [3, B] float64 output (one tensor: one device→host read).
            t is taken about the running max, not as Σ e^(x−m)·x, so the entropy does not cancel lse against Σ p x
            (≈ 20 each for confident rows of large logits, entropy ≈ 0.01). CUDA (automatic there) or CPU under
            TRITON_INTERPRET=1 (by name only). Graph-capturable: no host reads, allocations of fixed size.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from memlm.ops import dispatch
from memlm.ops.triton_common import interpreting, tl, triton  # None, None without Triton

__all__ = ["AVAILABLE", "packed_sample_torch", "packed_sample_triton", "plan", "supports"]

AVAILABLE = triton is not None
# Aim for about this many split programs (B·NS), with at least one block per program. At B = 1 and V = 16,384 the
# block floor gives 16; H100, bf16, graph replay (benchmarks/sample_kernel.py): 3.9 µs at B 1 for V 16K and 50K,
# 6.3 µs at B 64 — both passes together, against 15–25 µs for the compiled torch form.
PROGRAMS = 256
MAX_BLOCK = 1024      # logits per block: 8 a thread at 4 warps (two 16-byte loads of float32, one of bf16)
MIN_BLOCK = 128       # small vocabularies (tests): one warp (BLOCK / 256 warps, at least one)
NOISE_MIN = 1e-30     # the reference's clamp of the Exp(1) draws
# initial running max: finite, so a lane or split that saw only −inf ends with s = 0 and e^(m − M) stays finite
NEG = tl.constexpr(-1e30) if tl is not None else -1e30
IMAX = tl.constexpr(2**31 - 1) if tl is not None else 2**31 - 1   # "no index" in the min-index-among-ties reduction
EMIN = tl.constexpr(NOISE_MIN) if tl is not None else NOISE_MIN     # the kernels see constexpr globals only
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def packed_sample_torch(logits: Tensor, noise: Tensor | None, temperature: float) -> Tensor:
    """logits [B, V] (any float dtype); noise [B, V] Exp(1) draws or None (greedy); temperature τ (0: greedy)
    -> [3, B] float64: token ids, their log-probabilities and the entropies under log_softmax(logits)."""
    raw = logits.float()
    logp = raw.log_softmax(-1)
    if noise is None or temperature == 0:
        tokens = raw.argmax(-1)
    else:
        tokens = ((raw / temperature).softmax(-1) / noise.clamp_min(NOISE_MIN)).argmax(-1)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
    entropy = -torch.special.xlogy(logp.exp(), logp.exp()).sum(-1)  # xlogy: 0·log 0 = 0 for masked-out tokens
    return torch.stack([tokens.double(), chosen.double(), entropy.double()])


def supports(logits: Tensor, noise: Tensor | None = None, *_: object, **__: object) -> bool:
    """Triton importable; CUDA tensors (or CPU under TRITON_INTERPRET=1); float [B, V] logits with B, V ≥ 1 and
    V < 2³¹; noise None or float [B, V] on the same device."""
    if not AVAILABLE or logits.dim() != 2 or logits.dtype not in FLOATS or logits.numel() == 0:
        return False
    if logits.shape[1] >= 2**31 or not (logits.is_cuda or (logits.device.type == "cpu" and interpreting())):
        return False
    return noise is None or (noise.shape == logits.shape and noise.device == logits.device
                             and noise.is_floating_point())


# ------------------------------------------------------------------------------------------------------ kernels
# Plain functions made kernels in `_build` (as in decode_attention.py). Only builtins inside: tl.reduce with the
# standard sum / max / min combiners — the jitted helpers (tl.sum, tl.argmax) would only interpret when
# TRITON_INTERPRET was set before `import triton`.
# Layouts: X [B, V] (unit last stride, row stride sx), E [B, V] (row stride se); partials (contiguous) Pm, Ps, Pt,
# Pb float32 and Pi int32, [B, NS]; O [3, B] float64. Program (s, b) of pass 1 covers logits [s·SPLIT, (s+1)·SPLIT).

def _split_kernel(X, E, Pm, Ps, Pt, Pb, Pi, sx, se, V, NS, INV_T,
                  BLOCK: tl.constexpr, SPLIT: tl.constexpr, SAMPLED: tl.constexpr):
    s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rb = tl.arange(0, BLOCK)
    j0 = s * SPLIT
    # per-lane state: no cross-lane reduction inside the loop, one merge of the lanes at the end
    m = tl.full((BLOCK,), NEG, tl.float32)
    sl = tl.full((BLOCK,), 0.0, tl.float32)
    tt = tl.full((BLOCK,), 0.0, tl.float32)
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    # a lane starts at its first index: a row of −inf logits ties everywhere and gets token 0, as torch.argmax
    idx = j0 + rb
    for i in range(SPLIT // BLOCK):
        j = j0 + i * BLOCK + rb
        live = j < V
        x = tl.load(X + b * sx + j, mask=live, other=float("-inf")).to(tl.float32)
        q = x - m
        up = q > 0
        # e^(−|x − m|): e^(x−m) to add when x ≤ m, e^(m−x) to rescale the lane's sums when x is the new max (then the
        # new term is e^0 = 1 with weight x − m = 0). For x = −inf, d = 0 and q is zeroed, so no 0·inf makes a NaN.
        d = tl.exp(tl.where(up, -q, q))
        q = tl.where(d > 0, q, 0.0)
        tt = tl.where(up, d * (tt - q * sl), tt + d * q)
        sl = tl.where(up, d * sl + 1.0, sl + d)
        m = tl.where(up, x, m)
        if SAMPLED:   # the race score x/τ − log E (monotone in softmax(x/τ)/E); masked lanes stay −inf
            e = tl.load(E + b * se + j, mask=live, other=1.0).to(tl.float32)
            sc = x * INV_T - tl.log(tl.maximum(e, EMIN))
        else:
            sc = x
        # strictly greater: a lane walks increasing indices, so a tie keeps the earlier (lower) index
        better = sc > best
        best = tl.where(better, sc, best)
        idx = tl.where(better, j, idx)
    M = tl.reduce(m, 0, tl.standard._elementwise_max)
    w = tl.exp(m - M)                                   # lanes that saw only −inf: s = t = 0
    Z = tl.reduce(w * sl, 0, tl.standard._sum_combine)
    T = tl.reduce(w * (tt + (m - M) * sl), 0, tl.standard._sum_combine)
    top = tl.reduce(best, 0, tl.standard._elementwise_max)
    arg = tl.reduce(tl.where(best == top, idx, IMAX), 0, tl.standard._elementwise_min)
    row = b * NS + s
    tl.store(Pm + row, M)
    tl.store(Ps + row, Z)
    tl.store(Pt + row, T)
    tl.store(Pb + row, top)
    tl.store(Pi + row, arg)


def _combine_kernel(X, Pm, Ps, Pt, Pb, Pi, O, ID, sx, sid, V, NS, B, CS: tl.constexpr, NC: tl.constexpr,
                    HAS_IDS: tl.constexpr):
    """Merge the NS partials of row b, CS at a time (NC = cdiv(NS, CS) rounds), with a running max M; with HAS_IDS
    the token id also goes to ID[b] (int64, stride sid)."""
    b = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, CS)
    M = tl.full((), NEG, tl.float32)
    Z = tl.full((), 0.0, tl.float32)
    T = tl.full((), 0.0, tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    tok = tl.full((), IMAX, tl.int32)
    for c in range(NC):
        r = c * CS + rc
        ok = r < NS
        m = tl.load(Pm + b * NS + r, mask=ok, other=NEG)
        s = tl.load(Ps + b * NS + r, mask=ok, other=0.0)
        t = tl.load(Pt + b * NS + r, mask=ok, other=0.0)
        bs = tl.load(Pb + b * NS + r, mask=ok, other=float("-inf"))
        bi = tl.load(Pi + b * NS + r, mask=ok, other=IMAX)
        M_new = tl.maximum(M, tl.reduce(m, 0, tl.standard._elementwise_max))
        alpha = tl.exp(M - M_new)
        w = tl.exp(m - M_new)
        # t is about its own max: re-centred on M_new, Σ e^(x−M')(x − M') = e^(m−M')(t + (m − M') s)
        T = alpha * (T + (M - M_new) * Z) + tl.reduce(w * (t + (m - M_new) * s), 0, tl.standard._sum_combine)
        Z = alpha * Z + tl.reduce(w * s, 0, tl.standard._sum_combine)
        M = M_new
        cb = tl.reduce(bs, 0, tl.standard._elementwise_max)
        ci = tl.reduce(tl.where(bs == cb, bi, IMAX), 0, tl.standard._elementwise_min)
        take = (cb > best) | ((cb == best) & (ci < tok))
        tok = tl.where(take, ci, tok)
        best = tl.maximum(best, cb)
    tok = tl.minimum(tl.maximum(tok, 0), V - 1)        # NaN logits match no max: still read inside the row
    lz = tl.log(Z)
    xt = tl.load(X + b * sx + tok).to(tl.float32)
    tl.store(O + b, tok.to(tl.float64))
    if HAS_IDS:
        tl.store(ID + b * sid, tok.to(tl.int64))
    tl.store(O + B + b, ((xt - M) - lz).to(tl.float64))           # the rounding order of torch's log_softmax
    tl.store(O + 2 * B + b, (lz - T / Z).to(tl.float64))


def _build(interpret: bool) -> tuple:
    """(split, combine): interpreted (CPU tensors) or compiled (CUDA tensors), by the device alone."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(_split_kernel), InterpretedFunction(_combine_kernel)
    from triton.runtime.jit import JITFunction
    # V stays specialised (a model has one; its divisibility lets the masked loads vectorise); NS, B only enter offsets
    return (JITFunction(_split_kernel, do_not_specialize=["NS"]),
            JITFunction(_combine_kernel, do_not_specialize=["NS", "B", "sid"]))


# built at import: torch.compile finds plain kernel objects (building them inside a trace would break the graph)
_JIT = _build(False) if AVAILABLE else None
_interpreted = functools.cache(lambda: _build(True))


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def plan(B: int, V: int) -> dict:
    """BLOCK logits per iteration (a power of two in [MIN_BLOCK, MAX_BLOCK], no larger than V needs), SPLIT logits
    per program (a power-of-two multiple of BLOCK with B·NS ≈ PROGRAMS), NS splits per row."""
    BLOCK = min(MAX_BLOCK, max(MIN_BLOCK, _pow2(V)))
    SPLIT = max(BLOCK, _pow2(-(-V // max(1, PROGRAMS // B))))
    return {"BLOCK": BLOCK, "SPLIT": SPLIT, "NS": -(-V // SPLIT)}


def packed_sample_triton(logits: Tensor, noise: Tensor | None, temperature: float, *, out: Tensor | None = None,
                         ids: Tensor | None = None) -> Tensor:
    """The two kernels; arguments and result as packed_sample_torch. Logits and noise are read in their own dtype,
    with any row stride (the sampled vocabulary may be a slice of wider logits).

    out: a contiguous float64 [3, B] to write the result into instead of a new tensor — it may be pinned host memory,
    which the kernel writes across the bus (a CUDA graph's decode step then needs no device→host copy of its own);
    ids: an int64 tensor of B elements (e.g. the next step's input ids [B, 1]) that also receives the token ids."""
    if not supports(logits, noise):
        raise ValueError("packed_sample backend 'triton' needs Triton, CUDA tensors (or CPU with TRITON_INTERPRET=1) "
                         "and float [B, V] logits; use backend 'torch' otherwise")
    B, V = logits.shape
    cfg = plan(B, V)
    NS = cfg.pop("NS")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    sampled = noise is not None and temperature != 0
    if sampled and noise.stride(1) != 1:
        noise = noise.contiguous()
    e = noise if sampled else logits                    # placeholder when greedy: never read
    dev = logits.device
    part = torch.empty(4, B, NS, dtype=torch.float32, device=dev)     # m, s, t, best score
    part_i = torch.empty(B, NS, dtype=torch.int32, device=dev)
    if out is None:
        out = torch.empty(3, B, dtype=torch.float64, device=dev)
    elif out.shape != (3, B) or out.dtype != torch.float64 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float64 [3, {B}] tensor, got {out.dtype} {tuple(out.shape)}")
    if ids is not None and (ids.numel() != B or ids.dtype != torch.int64):
        raise ValueError(f"ids must be an int64 tensor of {B} elements, got {ids.dtype} {tuple(ids.shape)}")
    idv = ids.view(B) if ids is not None else part_i      # placeholder when None: never written
    split, combine = _interpreted() if dev.type == "cpu" else _JIT
    split[(NS, B)](logits, e, part[0], part[1], part[2], part[3], part_i, logits.stride(0), e.stride(0), V, NS,
                   1.0 / temperature if sampled else 1.0, SAMPLED=sampled, num_warps=max(1, cfg["BLOCK"] // 256),
                   **cfg)
    CS = min(64, max(16, _pow2(NS)))
    # one warp: the merge of ≤ 64 partials is a few shuffles, no shared memory
    combine[(B,)](logits, part[0], part[1], part[2], part[3], part_i, out, idv, logits.stride(0), idv.stride(0), V,
                  NS, B, CS=CS, NC=-(-NS // CS), HAS_IDS=ids is not None, num_warps=1)
    return out


# "torch" everywhere by default; "triton" automatically for CUDA tensors (auto=on_cuda), by name on the CPU (tests)
dispatch.register("packed_sample", "torch", packed_sample_torch, priority=0)
dispatch.register("packed_sample", "triton", packed_sample_triton, supports=supports, priority=10,
                  auto=dispatch.on_cuda)
