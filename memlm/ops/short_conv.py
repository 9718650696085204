"""The short causal depthwise convolution (memlm.layers.shortconv.causal_conv1d) as Triton kernels: backend "triton"
of op "short_conv" (the torch form in memlm.layers.shortconv is backend "torch", the reference and CPU default).

Notation: B batch, T new tokens, C channels, K kernel width, P = K − 1 cached inputs, w [C, K] taps (w[:, K−1]
multiplies the current token), b [C] bias, g the norm group (0: off). Sources x_{−P..−1} are the cache rows. A source
x_{t−j} is in x_t's document iff no reset lies at positions (t−j, t] (cache rows belong to the document open at the
start of x):

    z_t = b + Σ_{j=0}^{K−1} w[:, K−1−j] ⊙ x_{t−j} · [no reset in (t−j, t]]        pre-activation
    s_t = silu(z_t) (or z_t)
    y_t = s_t                               (g = 0)
    y_t = s_t / max(‖s_t‖, ε) per group     (g > 0: each run of g consecutive channels, ε = 1e-12, F.normalize's)

Kernels (all arithmetic in float32: x and the cache in their dtype, w and b read as they are (the float32 parameters)
and converted, y cast once):
  `_conv_kernel`, grid (cdiv(T, BT), cdiv(C, NG·GW), B): a tile of BT tokens × NG whole groups of GW = g channels
      (a [BT, NG, GP] block, GP the next power of two ≥ g; without a norm NG = 1, GW = GP channels). The K taps are K
      shifted loads of the tile (the rows overlap: L1/L2 hits); the reset flags of the tile's rows are ANDed tap by
      tap (tap j is cut by a reset at t−j+1, which cuts every older tap as well). Forward (GRAD=False) stores y.
      Backward (GRAD=True) recomputes z, s, ‖s‖ and maps dy → dz = ds · σ(z)(1 + z(1 − σ(z))) with the norm backward
          ds = (dy − u (u·dy)) / ‖s‖      when ‖s‖ ≥ ε   (u = s/‖s‖)
          ds = dy / ε                     otherwise     (autograd of F.normalize: the clamp passes no gradient)
      and stores dz float32 [B, T, C].
  `_grad_kernel`, grid (cdiv(T + P, ROWS), cdiv(C, BC), B): ROWS source rows s ∈ [−P, T) a program (the cache rows
      and x's), walked in sub-tiles of BT rows, each gathering
          dx_s = Σ_j w[:, K−1−j] ⊙ dz_{s+j} · [no reset in (s, s+j]]            (dcache for s < 0)
      and summing in registers the program's partials dw[:, K−1−j] = Σ_s x_s ⊙ dz_{s+j} · [same] and db = Σ_t dz_t,
      stored once in float32 [B, NT, K + 1, C] and summed over (B, NT) in torch (no atomics: deterministic).
The autograd Function saves x (and the small weight, bias, cache, reset) and recomputes z in the backward: 3 passes
over [B, T, C] forward+backward instead of dozens of elementwise torch kernels. The new cache (P rows) is computed in
torch by the wrapper, differentiably, exactly as the reference does.

CUDA tensors of float32 / bf16 / fp16 pick it automatically for T ≥ 2 (the decode step T = 1 keeps the torch
special case); CPU tensors only by name and under TRITON_INTERPRET=1 (tests). No host syncs, no branches on tensor
values: it traces under torch.compile as the repo's other Triton autograd Functions.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from memlm.ops import dispatch
from memlm.ops.triton_common import interpreting, tl, triton  # None, None without Triton

__all__ = ["AVAILABLE", "MAX_GROUP", "MAX_K", "new_cache", "plan", "short_conv_triton", "supports"]

AVAILABLE = triton is not None
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# Tile budget: about TILE float32 elements a tile (16 a thread at 4 warps: the backward's conv pass keeps ~6 such tiles
# live, z, σ, s, u, dy, ds), at most BC channels a row; the grad pass walks ROWS source rows a program in sub-tiles,
# so its dw / db partials are B·⌈(T + P)/ROWS⌉·(K + 1)·C floats (4 MB at [16, 2048, 768]). Register counts from
# compiling for sm_90 without a GPU (cuobjdump -res-usage, bf16, K 4, g 32 / none): conv 64 / 96 forward, 72 / 96
# backward, grad 189, no spills; 32 elements a thread needed 180–255 and spilled. H100 timings:
# benchmarks/short_conv.py, docs/benchmarks.md (a TILE of 4096 made forward + backward 15–37 % faster but the plain
# forward slower: not taken).
TILE = 2048
BT_MAX = 32
BC = 128
ROWS = 128
WARPS = 4
MAX_K = 64          # the taps are unrolled (tl.static_range)
MAX_GROUP = 1024    # one group (padded to a power of two) must fit a tile row
EPS = 1e-12         # F.normalize's
_EPS = tl.constexpr(EPS) if tl is not None else EPS   # the kernels see constexpr globals only


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def supports(x: Tensor, weight: Tensor, bias: Tensor | None = None, cache: Tensor | None = None,
             reset: Tensor | None = None, activation: str | None = "silu", *, norm_group: int = 0,
             **_: object) -> bool:
    """Triton importable; x a float32/bf16/fp16 [B, T, C] CUDA tensor (or CPU under TRITON_INTERPRET=1) with B, T,
    C ≥ 1 and B < 2¹⁶; weight a float [C, K] (1 ≤ K ≤ MAX_K), bias None or [C], cache None or [B, K−1, C], reset None
    or [B, T], all on x's device; activation "silu" or None; norm_group 0 or a divisor of C ≤ MAX_GROUP."""
    if not AVAILABLE or not isinstance(x, Tensor) or x.dim() != 3 or x.dtype not in FLOATS or x.numel() == 0:
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
        return False
    B, T, C = x.shape
    if B >= 2**16 or weight.dim() != 2 or weight.shape[0] != C or not 1 <= weight.shape[1] <= MAX_K:
        return False
    if bias is not None and bias.shape != (C,) or cache is not None and cache.shape != (B, weight.shape[1] - 1, C):
        return False
    for t in (weight, bias, cache):
        if t is not None and (t.device != x.device or not t.is_floating_point()):
            return False
    if reset is not None and (reset.shape != (B, T) or reset.device != x.device):
        return False
    g = norm_group
    return activation in ("silu", None) and isinstance(g, int) and (g == 0 or (0 < g <= MAX_GROUP and C % g == 0))


def _auto(x: Tensor, *_: object, **__: object) -> bool:
    """The automatic choice: CUDA tensors with T ≥ 2 (a decode step stays on the torch special case)."""
    return dispatch.on_cuda(x) and x.dim() == 3 and x.shape[1] >= 2


# ------------------------------------------------------------------------------------------------------ kernels
# Plain functions made kernels in `_build`. Only builtins inside (tl.full, tl.reduce with the sum combiner, tl.exp,
# tl.sqrt): jitted helpers (tl.sum, tl.sigmoid, …) only interpret when TRITON_INTERPRET was set before `import triton`.
# Layouts: X [B, T, C] (unit channel stride, strides sxb, sxt); Cache [B, P, C] contiguous in x's dtype; W [C, K],
# Bias [C] contiguous (any float dtype); Rst int8 [B, T] contiguous; Y, DY (x's dtype), DZ (float32) [B, T, C]
# contiguous; DX (x's dtype) [B, T, C] and DC [B, P, C] contiguous; Part float32 [B, NT, K + 1, C]: row K−1−j the
# dw partial of tap j, row K the db partial. Placeholders (an unused pointer) sit where a flag is off.
# Addresses: an int64 scalar base per (row b, tile) and int32 offsets inside the tile (B·T·C may pass 2³¹, a tile's
# (BT + K)·sxt does not); 64-bit offsets per element cost registers (the loads need every one of them).

def _conv_kernel(X, Cache, W, Bias, Rst, Y, DY, DZ, T, C, sxb, sxt,
                 K: tl.constexpr, BT: tl.constexpr, NG: tl.constexpr, GP: tl.constexpr, GW: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_CACHE: tl.constexpr, HAS_RESET: tl.constexpr, SILU: tl.constexpr,
                 NORM: tl.constexpr, GRAD: tl.constexpr):
    """Tokens [t0, t0 + BT) (t0 = pid0·BT) × channels [pid1·NG·GW, +NG·GW) of row b, as [BT, NG, GP] (channel
    (gi, gk) = (pid1·NG + gi)·GW + gk, lanes gk ≥ GW padding). GRAD=False: y; GRAD=True: dz from dy."""
    b = tl.program_id(2).to(tl.int64)
    t0 = tl.program_id(0) * BT
    i = tl.arange(0, BT)
    rt = t0 + i                                                                 # [BT] tokens
    gi = tl.program_id(1) * NG + tl.arange(0, NG)
    gk = tl.arange(0, GP)
    ch = gi[:, None] * GW + gk[None, :]                                         # [NG, GP] channels
    cm = (gk[None, :] < GW) & (ch < C)
    cm3 = cm[None, :, :]
    ch3 = ch[None, :, :]
    row = rt < T
    Xt = X + b * sxb + t0.to(tl.int64) * sxt                                   # x_{t0} of row b
    z = tl.full((BT, NG, GP), 0.0, tl.float32)
    if HAS_BIAS:
        z += tl.load(Bias + ch, mask=cm, other=0.0).to(tl.float32)[None, :, :]
    live = row          # the source x_{t−j} is still in x_t's document
    for j in tl.static_range(K):
        if HAS_RESET and j > 0:
            # a reset at t−j+1 starts x_t's document after x_{t−j} (and after every older source)
            r = tl.load(Rst + b * T + rt - (j - 1), mask=row & (rt >= j - 1), other=0)
            live = live & (r == 0)
        src = rt - j
        w = tl.load(W + ch * K + (K - 1 - j), mask=cm, other=0.0).to(tl.float32)
        m = (live & (src >= 0))[:, None, None] & cm3
        v = tl.load(Xt + ((i - j) * sxt)[:, None, None] + ch3, mask=m, other=0.0).to(tl.float32)
        if HAS_CACHE and j > 0:     # sources before x: cache row P + t − j (P = K − 1)
            crow = tl.where(src < 0, src + K - 1, 0)
            mc = (live & (src < 0))[:, None, None] & cm3
            v += tl.load(Cache + b * (K - 1) * C + (crow * C)[:, None, None] + ch3, mask=mc,
                         other=0.0).to(tl.float32)
        z += v * w[None, :, :]
    if SILU:
        sg = 1.0 / (1.0 + tl.exp(-z))
        s = z * sg
    else:
        s = z
    if NORM:   # padding lanes and masked channels hold s = 0: they add nothing to the group norms
        n = tl.sqrt(tl.reduce(s * s, 2, tl.standard._sum_combine))              # [BT, NG]
        d = tl.maximum(n, _EPS)[:, :, None]
        u = s / d
    else:
        u = s
    ot = (b * T + t0) * C                                                       # element (b, t0, 0) of Y, DY, DZ
    off = (i * C)[:, None, None] + ch3
    om = row[:, None, None] & cm3
    if GRAD:
        dy = tl.load(DY + ot + off, mask=om, other=0.0).to(tl.float32)
        if NORM:
            dot = tl.reduce(u * dy, 2, tl.standard._sum_combine)[:, :, None]
            # ‖s‖ < ε: the clamp is the denominator, constant, so only the direct term dy/ε remains (as autograd)
            ds = tl.where((n >= _EPS)[:, :, None], (dy - u * dot) / d, dy / d)
        else:
            ds = dy
        if SILU:
            ds = ds * sg * (1.0 + z * (1.0 - sg))
        tl.store(DZ + ot + off, ds, mask=om)
    else:
        tl.store(Y + ot + off, u.to(Y.dtype.element_ty), mask=om)


def _grad_kernel(X, Cache, W, Rst, DZ, DX, DC, Part, T, C, sxb, sxt, NT,
                 K: tl.constexpr, BT: tl.constexpr, NSUB: tl.constexpr, BC: tl.constexpr, KP: tl.constexpr,
                 HAS_CACHE: tl.constexpr, HAS_RESET: tl.constexpr, DX_ON: tl.constexpr, DC_ON: tl.constexpr,
                 DW_ON: tl.constexpr, DB_ON: tl.constexpr):
    """Source rows s ∈ [pid0·NSUB·BT − P, +NSUB·BT) (cache rows for s < 0) × channels [pid1·BC, +BC) of row b, in
    NSUB sub-tiles of BT rows: dx (or dcache), and the dw / db partials of these rows summed in registers ([KP, BC]:
    row K−1−j tap j, row K the bias) and stored once."""
    b = tl.program_id(2).to(tl.int64)
    pt = tl.program_id(0)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = rc < C
    cm2 = cm[None, :]
    i = tl.arange(0, BT)
    rk = tl.arange(0, KP)
    part = tl.full((KP, BC), 0.0, tl.float32)
    for it in range(NSUB):
        s0 = (pt * NSUB + it) * BT - (K - 1)                                    # first source row of the sub-tile
        s = s0 + i                                                              # [BT] source rows
        rin = s < T
        xin = rin & (s >= 0)
        crow = tl.where(s < 0, s + K - 1, 0)                                    # cache row of s < 0
        zt = (b * T + s0) * C                                                   # element (b, s0, 0) of DZ, DX
        if DW_ON:
            xs = tl.load(X + b * sxb + s0.to(tl.int64) * sxt + (i * sxt)[:, None] + rc[None, :],
                         mask=xin[:, None] & cm2, other=0.0).to(tl.float32)
            if HAS_CACHE:
                xs += tl.load(Cache + b * (K - 1) * C + (crow * C)[:, None] + rc[None, :],
                              mask=(s < 0)[:, None] & cm2, other=0.0).to(tl.float32)
        acc = tl.full((BT, BC), 0.0, tl.float32)
        live = rin      # no reset in (s, s + j]: x_s still reaches z_{s+j}
        for j in tl.static_range(K):
            t = s + j
            tin = (t >= 0) & (t < T)
            if HAS_RESET and j > 0:
                r = tl.load(Rst + b * T + t, mask=tin, other=0)
                live = live & (r == 0)
            g = tl.load(DZ + zt + ((i + j) * C)[:, None] + rc[None, :], mask=(live & tin)[:, None] & cm2, other=0.0)
            w = tl.load(W + rc * K + (K - 1 - j), mask=cm, other=0.0).to(tl.float32)
            acc += g * w[None, :]
            if DW_ON:
                part += tl.where(rk[:, None] == K - 1 - j, tl.reduce(xs * g, 0, tl.standard._sum_combine)[None, :],
                                 0.0)
            if DB_ON and j == 0:
                part += tl.where(rk[:, None] == K, tl.reduce(g, 0, tl.standard._sum_combine)[None, :], 0.0)
        if DX_ON:
            tl.store(DX + zt + (i * C)[:, None] + rc[None, :], acc.to(DX.dtype.element_ty), mask=xin[:, None] & cm2)
        if DC_ON:
            tl.store(DC + b * (K - 1) * C + (crow * C)[:, None] + rc[None, :], acc.to(DC.dtype.element_ty),
                     mask=(s < 0)[:, None] & cm2)
    if DW_ON or DB_ON:
        tl.store(Part + ((b * NT + pt) * (K + 1) + rk)[:, None] * C + rc[None, :], part,
                 mask=(rk < K + 1)[:, None] & cm2)


def _build(interpret: bool) -> tuple:
    """(conv, grad): interpreted (CPU tensors) or compiled (CUDA tensors), by the device alone."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(_conv_kernel), InterpretedFunction(_grad_kernel)
    # T and NT only enter offsets; C and the strides stay specialised: their divisibility by 16 lets the row loads
    # vectorise (without it, 30–90 more registers a thread in the sm_90 build)
    return (triton.jit(_conv_kernel, do_not_specialize=["T"]),
            triton.jit(_grad_kernel, do_not_specialize=["T", "NT"]))


# built at import: torch.compile finds plain kernel objects (building them inside a trace would break the graph)
_JIT = _build(False) if AVAILABLE else None
_interpreted = functools.cache(lambda: _build(True))


def _kernels(interpret: bool) -> tuple:
    return _interpreted() if interpret else _JIT


def plan(C: int, K: int, norm_group: int = 0) -> dict:
    """Tile sizes. conv: BT tokens × NG groups of GP lanes (GW true channels each: g, or GP without a norm); grad:
    NSUB sub-tiles of BT2 source rows × BC2 channels a program, KP ≥ K + 1 rows of partial sums."""
    if norm_group:
        GP = _pow2(norm_group)
        NG = min(max(1, BC // GP), _pow2(C // norm_group))
        GW = norm_group
    else:
        GP = min(BC, _pow2(C))
        NG, GW = 1, GP
    BT = max(1, min(BT_MAX, TILE // (NG * GP)))
    BC2 = min(BC, _pow2(C))
    BT2 = max(1, min(BT_MAX, TILE // BC2))
    return {"BT": BT, "NG": NG, "GP": GP, "GW": GW, "BT2": BT2, "NSUB": max(1, ROWS // BT2), "BC2": BC2,
            "KP": _pow2(K + 1)}


class _ShortConv(torch.autograd.Function):
    """x [B, T, C] (unit channel stride), weight [C, K], bias [C] or None, cache [B, P, C] contiguous in x's dtype or
    None, reset int8 [B, T] contiguous or None -> y [B, T, C] in x's dtype (contiguous)."""

    @staticmethod
    def forward(ctx, x, weight, bias, cache, reset, silu: bool, group: int):
        B, T, C = x.shape
        K = weight.shape[1]
        cfg = plan(C, K, group)
        y = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
        conv, _ = _kernels(x.device.type == "cpu")
        grid = (triton.cdiv(T, cfg["BT"]), triton.cdiv(C, cfg["NG"] * cfg["GW"]), B)
        conv[grid](x, x if cache is None else cache, weight, x if bias is None else bias,
                   x if reset is None else reset, y, y, y, T, C, x.stride(0), x.stride(1),
                   K=K, BT=cfg["BT"], NG=cfg["NG"], GP=cfg["GP"], GW=cfg["GW"], HAS_BIAS=bias is not None,
                   HAS_CACHE=cache is not None, HAS_RESET=reset is not None, SILU=silu, NORM=group > 0, GRAD=False,
                   num_warps=WARPS)
        ctx.save_for_backward(x, weight, bias, cache, reset)
        ctx.silu, ctx.group = silu, group
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, cache, reset = ctx.saved_tensors
        B, T, C = x.shape
        K = weight.shape[1]
        cfg = plan(C, K, ctx.group)
        need_x, need_w, need_b, need_c = ctx.needs_input_grad[:4]
        need_c = need_c and cache is not None
        dev, f32 = x.device, torch.float32
        conv, grad = _kernels(dev.type == "cpu")
        dy = dy.contiguous()
        dz = torch.empty(B, T, C, dtype=f32, device=dev)
        cc = x if cache is None else cache
        rr = x if reset is None else reset
        grid = (triton.cdiv(T, cfg["BT"]), triton.cdiv(C, cfg["NG"] * cfg["GW"]), B)
        conv[grid](x, cc, weight, x if bias is None else bias, rr, dy, dy, dz, T, C, x.stride(0), x.stride(1),
                   K=K, BT=cfg["BT"], NG=cfg["NG"], GP=cfg["GP"], GW=cfg["GW"], HAS_BIAS=bias is not None,
                   HAS_CACHE=cache is not None, HAS_RESET=reset is not None, SILU=ctx.silu, NORM=ctx.group > 0,
                   GRAD=True, num_warps=WARPS)
        NT = triton.cdiv(T + K - 1, cfg["BT2"] * cfg["NSUB"])
        dx = torch.empty(B, T, C, dtype=x.dtype, device=dev) if need_x else dz
        dc = torch.empty(cache.shape, dtype=cache.dtype, device=dev) if need_c else dz
        part = torch.empty(B, NT, K + 1, C, dtype=f32, device=dev) if (need_w or need_b) else dz
        grad[(NT, triton.cdiv(C, cfg["BC2"]), B)](
            x, cc, weight, rr, dz, dx, dc, part, T, C, x.stride(0), x.stride(1), NT,
            K=K, BT=cfg["BT2"], NSUB=cfg["NSUB"], BC=cfg["BC2"], KP=cfg["KP"], HAS_CACHE=cache is not None,
            HAS_RESET=reset is not None, DX_ON=need_x, DC_ON=need_c, DW_ON=need_w, DB_ON=need_b, num_warps=WARPS)
        dw = part[:, :, :K].sum((0, 1)).t().to(weight.dtype) if need_w else None
        db = part[:, :, K].sum((0, 1)).to(bias.dtype) if need_b else None
        return dx if need_x else None, dw, db, dc if need_c else None, None, None, None


def new_cache(x: Tensor, cache: Tensor | None, reset: Tensor | None, P: int) -> Tensor:
    """The conv's next cache, shared by both backends: the last P inputs (cache rows before x when T < P; cache in
    x's dtype or None for zeros), zeroed where a later reset separates them from the last token, touching only P rows
    (differentiable)."""
    B, T, C = x.shape
    if P == 0:   # empty; from the cache when given, so that it gets its (empty) gradient as in the reference
        return x[:, :0] if cache is None else cache
    if T >= P:
        tail = x[:, T - P:]
    else:
        tail = torch.cat([x.new_zeros(B, P - T, C) if cache is None else cache[:, T:], x], 1)
    if reset is None:
        return tail
    r = reset.to(torch.int32)
    r = r[:, T - P:] if T >= P else torch.cat([r.new_zeros(B, P - T), r], 1)        # reset flags of the P positions
    after = r.flip(1).cumsum(1).flip(1) - r                                          # resets strictly after each
    return tail * (after == 0).to(x.dtype)[..., None]


def short_conv_triton(x: Tensor, weight: Tensor, bias: Tensor | None = None, cache: Tensor | None = None,
                      reset: Tensor | None = None, activation: str | None = "silu", *, norm_group: int = 0
                      ) -> tuple[Tensor, Tensor]:
    """The kernels; arguments and results as memlm.layers.shortconv.causal_conv1d_torch: y [B, T, C] in x's dtype and
    the new cache [B, K−1, C] in the cache's dtype (x's if None). Gradients reach x, weight, bias and cache."""
    if not supports(x, weight, bias, cache, reset, activation, norm_group=norm_group):
        raise ValueError("short_conv backend 'triton' needs Triton, CUDA tensors (or CPU with TRITON_INTERPRET=1), "
                         "float [B, T, C] inputs with matching weight / bias / cache / reset and norm_group 0 or a "
                         "divisor of C; use backend 'torch' otherwise")
    P = weight.shape[1] - 1
    cdtype = x.dtype if cache is None else cache.dtype
    # the reference joins the cache to x in x's dtype: the same rounding here (a differentiable cast)
    cx = None if cache is None else cache.to(x.dtype).contiguous()
    xk = x if x.stride(2) == 1 else x.contiguous()
    rst = None if reset is None else reset.to(torch.int8).contiguous()
    bk = None if bias is None else bias.contiguous()
    y = _ShortConv.apply(xk, weight.contiguous(), bk, cx if P > 0 else None, rst, activation == "silu",
                         int(norm_group))
    return y, new_cache(x, cx, reset, P).to(cdtype)


# "torch" (memlm.layers.shortconv, which imports this module) everywhere by default; "triton" automatically for CUDA
# tensors with T ≥ 2, by name on the CPU (tests under the interpreter)
dispatch.register("short_conv", "triton", short_conv_triton, supports=supports, priority=10, auto=_auto)
