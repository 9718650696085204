"""(Gated) delta rule with the sequential state recurrence in Triton (forward and backward kernels).

Notation as in chunked.py (NOTES.md §1, §7): per batch·head and chunk n of C tokens,
  S_n ∈ R^{Dv×Dk}  chunk-start state;  U_n [C, Dv], Wk_n [C, Dk], Ke_n = (e ⊙rows K)_n [C, Dk];  γ_n = γ_{C−1}
  W_n     = U_n − Wk_n S_nᵀ                        [C, Dv]  pseudo values
  S_{n+1} = γ_n S_n + W_nᵀ Ke_n                    [Dv, Dk]
bf16/fp16 inputs (chunk 16/32/64, D ≤ 64) go to `triton_fused` (the whole chunk pipeline in Triton, reusing the two
recurrence kernels below). Otherwise everything batched over chunks (UT solve, intra-chunk P, outputs) stays in
PyTorch via `chunked.prepare` / `chunked.outputs`, so autograd differentiates it; only the loop over chunks is a
kernel, wrapped in a torch.autograd.Function whose backward is the reverse recurrence
(dS_{n+1} → dU_n, dWk_n, dKe_n, dγ_n, dS_n).

Rows of S (the Dv axis) evolve independently, so each program owns one (batch·head, block of BV rows of S) and
walks all chunks; in the backward the sums over Dv (dWk, dKe, dγ) are per-block partials added afterwards.
Kernel math is float32; dots are IEEE for fp32 inputs and TF32 for bf16/fp16 inputs (`HALF_DOT_PRECISION`).

CPU tensors run through the Triton interpreter when TRITON_INTERPRET=1 (tests without a GPU).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from memlm.ops.triton_common import interpreting, tl, triton  # None, None without Triton
from memlm.ops.triton_common import loop_count as _count

from . import chunked, triton_fused
from .reference import check_inputs

__all__ = ["AVAILABLE", "MAX_CHUNK", "MAX_HEAD_DIM", "delta_rule", "interpreting", "state_recurrence", "supports"]

AVAILABLE = triton is not None
MAX_HEAD_DIM = 256   # Dk, Dv; padded to a power of two (≥ 16) inside the kernels
MAX_CHUNK = 128      # min(chunk_size, T); walked in SUB_ROWS sub-blocks, larger chunks are untested
MAX_BV = 32          # largest block of state rows (Dv) per program
SUB_ROWS = 16        # rows of a chunk per dot (16 is tl.dot's minimum; larger fp32 tiles spill registers)
# Products inside the kernels, by input dtype. fp32 inputs: "ieee", exact fp32 products (tests demand 1e-5 relative
# vs float64). bf16/fp16 inputs: "tf32" tensor-core products — TF32's 10-bit mantissa is finer than bf16's 7 bits, so
# it stays far inside the half-precision tolerance (5e-3) while the state itself is still accumulated in fp32.
DOT_PRECISION = "ieee"
HALF_DOT_PRECISION = "tf32"
# The whole chunk pipeline in Triton (triton_fused.py) where it applies (chunk_size 16/32/64, D ≤ 128); else only the
# state recurrence is a kernel and the rest is chunked.py's PyTorch. False pins the recurrence-only path.
FUSED = True
# {"rec_fwd" | "rec_bwd": {"num_warps": …}} overriding `_config` (tuning runs, benchmarks/delta_rule_tune.py)
CONFIG_OVERRIDE: dict[str, dict] = {}



def supports(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *, chunk_size: int = 64,
             **_: object) -> bool:
    """CUDA tensors (or CPU under TRITON_INTERPRET=1), Triton importable, float32/bf16/fp16, Dk, Dv ≤ 256,
    min(chunk_size, T) ≤ 128. Shape errors are left to the backend's own check (clear message)."""
    if not AVAILABLE or q.dim() != 4 or v.dim() != 4:
        return False
    if not (q.is_cuda or (q.device.type == "cpu" and interpreting())):
        return False
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    T = q.shape[1]
    return (q.shape[-1] <= MAX_HEAD_DIM and v.shape[-1] <= MAX_HEAD_DIM and T >= 1
            and 1 <= min(chunk_size, T) <= MAX_CHUNK)


# ------------------------------------------------------------------------------------------------------ kernels
# Plain functions, turned into Triton kernels on first use (`_kernels`): whether a kernel is compiled or
# interpreted is decided when it is built, so building lazily lets one process choose per device.

def _recurrence_fwd(U, Wk, Ke, GL, S0, S_all, S_fin,
                    su_bh, su_n, su_c, sw_bh, sw_n, sw_c, se_bh, se_n, se_c,
                    N, C, Dk, Dv,
                    BC: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    PREC: tl.constexpr):
    """Grid (BH, cdiv(Dv, BV)). U [BH, N, C, Dv], Wk/Ke [BH, N, C, Dk] (unit last stride), GL [BH, N],
    S0/S_fin [BH, Dv, Dk], S_all [BH, N, Dv, Dk] (contiguous). A chunk (BC ≥ C rows) is walked in sub-blocks
    of SUB rows: W's rows only need the chunk-start S and S_next sums over rows, so small tiles suffice
    (fp32 FMA dots with a 64 × 64 operand would spill registers)."""
    bh = tl.program_id(0).to(tl.int64)
    rk = tl.arange(0, BK)
    rv = tl.program_id(1) * BV + tl.arange(0, BV)
    mk, mv = rk < Dk, rv < Dv
    m_s = mv[:, None] & mk[None, :]
    s_off = rv[:, None] * Dk + rk[None, :]                                  # [BV, BK] inside one state
    S = tl.load(S0 + bh * Dv * Dk + s_off, mask=m_s, other=0.0)
    for n in range(N):
        tl.store(S_all + (bh * N + n) * Dv * Dk + s_off, S.to(S_all.dtype.element_ty), mask=m_s)
        S_next = tl.load(GL + bh * N + n) * S
        for j in range(BC // SUB):
            rc = j * SUB + tl.arange(0, SUB)
            mc = rc < C
            u = tl.load(U + bh * su_bh + n * su_n + rc[:, None] * su_c + rv[None, :],
                        mask=mc[:, None] & mv[None, :], other=0.0).to(tl.float32)
            wk = tl.load(Wk + bh * sw_bh + n * sw_n + rc[:, None] * sw_c + rk[None, :],
                         mask=mc[:, None] & mk[None, :], other=0.0).to(tl.float32)
            ke = tl.load(Ke + bh * se_bh + n * se_n + rc[:, None] * se_c + rk[None, :],
                         mask=mc[:, None] & mk[None, :], other=0.0).to(tl.float32)
            w = u - tl.dot(wk, tl.trans(S), input_precision=PREC)          # rows of W_n  [SUB, BV]
            S_next = tl.dot(tl.trans(w), ke, acc=S_next, input_precision=PREC)
        S = S_next
    tl.store(S_fin + bh * Dv * Dk + s_off, S, mask=m_s)


def _recurrence_bwd(U, Wk, Ke, GL, S_all, dS_all, dS_fin, dU, dWk, dKe, dGL, dS0,
                    su_bh, su_n, su_c, sw_bh, sw_n, sw_c, se_bh, se_n, se_c,
                    BH, N, C, Dk, Dv,
                    HAS_DSALL: tl.constexpr, STATES: tl.constexpr, BC: tl.constexpr, SUB: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Grid (BH, NV). Inputs as in the forward, plus dS_all [BH, N, Dv, Dk], dS_fin [BH, Dv, Dk].
    Writes dU [BH, N, C, Dv], dS0 [BH, Dv, Dk] and the per-Dv-block partials dWk, dKe [NV, BH, N, C, Dk],
    dGL [NV, BH, N] (all contiguous). Rows of a chunk in sub-blocks of SUB, as in the forward.
    STATES (triton_fused): only the state gradients — dU is then dS_next [BH, N, Dv, Dk], ∂L/∂S_{n+1} per chunk,
    and U, S_all, dWk, dKe, dGL are not touched; the per-chunk gradients (dU = Ke dS_{n+1}ᵀ, dKe = W dS_{n+1},
    dWk = −dU S_n, dγ = ⟨dS_{n+1}, S_n⟩) are left to a parallel kernel, so each step of this sequential walk does two
    dots instead of five."""
    bh = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1).to(tl.int64)
    rk = tl.arange(0, BK)
    rv = vb * BV + tl.arange(0, BV)
    mk, mv = rk < Dk, rv < Dv
    m_s = mv[:, None] & mk[None, :]
    s_off = rv[:, None] * Dk + rk[None, :]
    part = vb * BH + bh                                                     # row of the partial buffers
    dS = tl.load(dS_fin + bh * Dv * Dk + s_off, mask=m_s, other=0.0)
    for i in range(N):
        n = N - 1 - i
        # here dS = ∂L/∂S_{n+1}; dS_prev collects ∂L/∂S_n (direct, through γ_n, through W_n = U_n − Wk_n S_nᵀ)
        dS_prev = tl.load(GL + bh * N + n) * dS
        if HAS_DSALL:
            dS_prev += tl.load(dS_all + (bh * N + n) * Dv * Dk + s_off, mask=m_s, other=0.0).to(tl.float32)
        if STATES:
            tl.store(dU + (bh * N + n) * Dv * Dk + s_off, dS.to(dU.dtype.element_ty), mask=m_s)
            S = dS                                                          # unused in this mode
        else:
            S = tl.load(S_all + (bh * N + n) * Dv * Dk + s_off, mask=m_s, other=0.0).to(tl.float32)
            # tl.sum's own body is a jit function that only works in the interpreter if TRITON_INTERPRET was set
            # before triton was imported; tl.reduce with the standard sum combiner is what tl.sum expands to
            # (and the interpreter maps it to np.sum)
            tl.store(dGL + part * N + n, tl.reduce(dS * S, None, tl.standard._sum_combine))
        for j in range(BC // SUB):
            rc = j * SUB + tl.arange(0, SUB)
            mc = rc < C
            m_ck = mc[:, None] & mk[None, :]
            wk = tl.load(Wk + bh * sw_bh + n * sw_n + rc[:, None] * sw_c + rk[None, :], mask=m_ck,
                         other=0.0).to(tl.float32)
            ke = tl.load(Ke + bh * se_bh + n * se_n + rc[:, None] * se_c + rk[None, :], mask=m_ck,
                         other=0.0).to(tl.float32)
            dw = tl.dot(ke, tl.trans(dS), input_precision=PREC)            # ∂L/∂W_n = Ke dSᵀ        [SUB, BV]
            if not STATES:
                u = tl.load(U + bh * su_bh + n * su_n + rc[:, None] * su_c + rv[None, :],
                            mask=mc[:, None] & mv[None, :], other=0.0).to(tl.float32)
                w = u - tl.dot(wk, tl.trans(S), input_precision=PREC)      # recomputed rows of W_n  [SUB, BV]
                tl.store(dU + (bh * N + n) * C * Dv + rc[:, None] * Dv + rv[None, :], dw.to(dU.dtype.element_ty),
                         mask=mc[:, None] & mv[None, :])
                ck_off = (part * N + n) * C * Dk + rc[:, None] * Dk + rk[None, :]
                tl.store(dKe + ck_off, tl.dot(w, dS, input_precision=PREC).to(dKe.dtype.element_ty), mask=m_ck)
                tl.store(dWk + ck_off, (-tl.dot(dw, S, input_precision=PREC)).to(dWk.dtype.element_ty),
                         mask=m_ck)                                                                # −dW S
            dS_prev = tl.dot(tl.trans(dw), -wk, acc=dS_prev, input_precision=PREC)        # −dWᵀ Wk
        dS = dS_prev
    tl.store(dS0 + bh * Dv * Dk + s_off, dS, mask=m_s)


def _build(interpret: bool) -> tuple:
    """(forward, backward) kernels: interpreted (CPU tensors) or compiled (CUDA tensors), by the device alone —
    triton.jit would decide by TRITON_INTERPRET at build time instead."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(_recurrence_fwd), InterpretedFunction(_recurrence_bwd)
    from triton.runtime.jit import JITFunction
    # sizes that only enter masks and offsets are not specialised on: fewer compilations for odd T
    return (JITFunction(_recurrence_fwd, do_not_specialize=["N", "C"]),
            JITFunction(_recurrence_bwd, do_not_specialize=["N", "C", "BH"]))


# The compiled kernels are built at import, so that a torch.compile'd model finds plain kernel objects and launches
# them in its graph (building them inside the trace would break the graph); the interpreted ones only when a test
# asks (CPU tensors under TRITON_INTERPRET=1).
_JIT = _build(False) if AVAILABLE else None
_interpreted = functools.cache(lambda: _build(True))


def _kernels(interpret: bool):
    """(forward, backward) kernels for CPU tensors (interpreter) or CUDA tensors."""
    return _interpreted() if interpret else _JIT



def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))      # tl.dot needs every dimension ≥ 16


def _config(BH: int, C: int, Dk: int, Dv: int, device: torch.device, prec: str = DOT_PRECISION) -> dict:
    """Tile sizes, warps and pipeline stages.

    BV is halved (down to 16) while there are fewer programs than 2 per SM: the sequential walk over chunks is
    latency-bound, so more, smaller programs beat fewer, larger ones. fp32 FMA dots keep a whole K = BK slice
    of an operand per thread, so registers grow with BK · BV / warps. BK · BV ≤ 2048 with 4 warps up to 1024
    and 8 above kept every sm_90 build (BK 16 … 256) at ≤ 255 registers without spills (ptxas). With tensor-core
    (TF32) dots a whole chunk of up to 64 rows is one tile (SUB = BC): one dot pair per chunk instead of four."""
    BC, BK = _pow2(C), _pow2(Dk)
    BV = min(_pow2(Dv), MAX_BV, max(16, 2048 // BK))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        while BV > 16 and BH * triton.cdiv(Dv, BV) < 2 * sms:
            BV //= 2
    sub = BC if prec != "ieee" and BC <= 64 and BK <= 64 else SUB_ROWS
    # tensor-core dots: 4 warps even where FMA dots needed 8 (2.2× faster recurrence backward at BK · BV = 2048)
    warps = 4 if BK * BV <= 1024 or (prec != "ieee" and BK <= 64) else 8
    return {"BC": BC, "SUB": sub, "BK": BK, "BV": BV, "num_warps": warps, "num_stages": 1 if BK >= 256 else 2}


def _rows(x: Tensor) -> Tensor:
    """[B, H, N, C, D] -> [BH, N, C, D] view with unit last stride (the kernels take the other strides)."""
    x = x.reshape(-1, *x.shape[2:])
    return x if x.stride(-1) == 1 else x.contiguous()


def recurrence_forward(U: Tensor, Wk: Tensor, Ke: Tensor, GL: Tensor, S0: Tensor, prec: str,
                       store: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The forward kernel on U [BH, N, C, Dv], Wk, Ke [BH, N, C, Dk] (unit last stride; float32, or `store`
    from triton_fused), GL [BH, N], S0 [BH, Dv, Dk] float32 -> (S_all [BH, N, Dv, Dk] chunk-start states in
    `store`, S_fin [BH, Dv, Dk] float32). The state itself is carried in float32 either way."""
    BH, N, C, Dv = U.shape
    Dk = Wk.shape[-1]
    if any(x.dtype not in (torch.float32, torch.bfloat16, torch.float16) for x in (U, Wk, Ke)) or \
            GL.dtype != torch.float32 or S0.dtype != torch.float32:
        raise ValueError("delta_rule[triton]: the state recurrence takes float32 tensors, got "
                         f"{', '.join(str(x.dtype) for x in (U, Wk, Ke, GL, S0))}")
    S_all = torch.empty(BH, N, Dv, Dk, dtype=store, device=U.device)
    S_fin = torch.empty(BH, Dv, Dk, dtype=torch.float32, device=U.device)
    cfg = {**_config(BH, C, Dk, Dv, U.device, prec), **CONFIG_OVERRIDE.get("rec_fwd", {})}
    interpret = U.device.type == "cpu"
    fwd, _ = _kernels(interpret)
    fwd[(BH, triton.cdiv(Dv, cfg["BV"]))](
        U, Wk, Ke, GL.contiguous(), S0.contiguous(), S_all, S_fin, U.stride(0), U.stride(1), U.stride(2),
        Wk.stride(0), Wk.stride(1), Wk.stride(2), Ke.stride(0), Ke.stride(1), Ke.stride(2),
        _count(N, interpret), C, Dk, Dv, PREC=prec, **cfg)
    return S_all, S_fin


def recurrence_backward(U: Tensor, Wk: Tensor, Ke: Tensor, GL: Tensor, S_all: Tensor, dS_all: Tensor | None,
                        dS_fin: Tensor | None, prec: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward kernel (shapes as in `recurrence_forward`; dS_all, dS_fin may be None = zero) ->
    (dU [BH, N, C, Dv], dWk, dKe [BH, N, C, Dk], dGL [BH, N], dS0 [BH, Dv, Dk]), float32 (the fused path uses
    `recurrence_backward_states` instead)."""
    BH, N, C, Dv = U.shape
    Dk = Wk.shape[-1]
    dev = U.device
    cfg = {**_config(BH, C, Dk, Dv, dev, prec), **CONFIG_OVERRIDE.get("rec_bwd", {})}
    NV = triton.cdiv(Dv, cfg["BV"])
    f32 = {"dtype": torch.float32, "device": dev}
    dU = torch.empty(BH, N, C, Dv, **f32)
    dWk = torch.empty(NV, BH, N, C, Dk, **f32)
    dKe = torch.empty(NV, BH, N, C, Dk, **f32)
    dGL = torch.empty(NV, BH, N, **f32)
    dS0 = torch.empty(BH, Dv, Dk, **f32)
    # an absent dS_all is skipped in the kernel (the pointer passed for it is never read); an absent dS_fin is
    # the zero start of the reverse walk (tl.zeros is a jit helper that the interpreter cannot always run)
    dS_all_ = dS_all.reshape(BH, N, Dv, Dk).contiguous() if dS_all is not None else S_all   # read as float32
    dS_fin_ = (dS_fin.reshape(BH, Dv, Dk).float().contiguous() if dS_fin is not None
               else torch.zeros(BH, Dv, Dk, **f32))
    interpret = dev.type == "cpu"
    _, bwd = _kernels(interpret)
    bwd[(BH, NV)](
        U, Wk, Ke, GL.contiguous(), S_all, dS_all_, dS_fin_, dU, dWk, dKe, dGL, dS0,
        U.stride(0), U.stride(1), U.stride(2), Wk.stride(0), Wk.stride(1), Wk.stride(2),
        Ke.stride(0), Ke.stride(1), Ke.stride(2), BH, _count(N, interpret), C, Dk, Dv,
        HAS_DSALL=dS_all is not None, STATES=False, PREC=prec, **cfg)
    if NV > 1:
        return dU, dWk.sum(0), dKe.sum(0), dGL.sum(0), dS0
    return dU, dWk[0], dKe[0], dGL[0], dS0


def recurrence_backward_states(Wk: Tensor, Ke: Tensor, GL: Tensor, dS_all: Tensor | None, dS_fin: Tensor | None,
                               Dv: int, prec: str, store: torch.dtype) -> tuple[Tensor, Tensor]:
    """The backward walk for the state gradients only (triton_fused): Wk, Ke [BH, N, C, Dk], GL [BH, N], dS_all
    [BH, N, Dv, Dk] or None, dS_fin [BH, Dv, Dk] or None -> (dS_next [BH, N, Dv, Dk] = ∂L/∂S_{n+1} per chunk in
    `store`, dS0 [BH, Dv, Dk] float32)."""
    BH, N, C, Dk = Wk.shape
    dev = Wk.device
    cfg = {**_config(BH, C, Dk, Dv, dev, prec), **CONFIG_OVERRIDE.get("rec_bwd", {})}
    dS_next = torch.empty(BH, N, Dv, Dk, dtype=store, device=dev)
    dS0 = torch.empty(BH, Dv, Dk, dtype=torch.float32, device=dev)
    dS_fin_ = (dS_fin.reshape(BH, Dv, Dk).float().contiguous() if dS_fin is not None
               else torch.zeros(BH, Dv, Dk, dtype=torch.float32, device=dev))
    interpret = dev.type == "cpu"
    _, bwd = _kernels(interpret)
    # U, S_all, dWk, dKe, dGL are not touched in this mode: any valid pointer stands in for them
    bwd[(BH, triton.cdiv(Dv, cfg["BV"]))](
        Wk, Wk, Ke, GL.contiguous(), Wk, dS_all if dS_all is not None else Wk, dS_fin_, dS_next, Wk, Wk, GL, dS0,
        0, 0, 0, Wk.stride(0), Wk.stride(1), Wk.stride(2), Ke.stride(0), Ke.stride(1), Ke.stride(2),
        BH, _count(N, interpret), C, Dk, Dv, HAS_DSALL=dS_all is not None, STATES=True, PREC=prec, **cfg)
    return dS_next, dS0


class _Recurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, U: Tensor, Wk: Tensor, Ke: Tensor, GL: Tensor, S0: Tensor, prec: str) -> tuple[Tensor, Tensor]:
        B, H, N, C, Dv = U.shape
        Dk = Wk.shape[-1]
        BH = B * H
        U_, Wk_, Ke_ = _rows(U), _rows(Wk), _rows(Ke)
        GL_ = GL.reshape(BH, N)
        S_all, S_fin = recurrence_forward(U_, Wk_, Ke_, GL_, S0.reshape(BH, Dv, Dk), prec)
        ctx.save_for_backward(U_, Wk_, Ke_, GL_, S_all)
        ctx.shape, ctx.prec = (B, H, N, C, Dk, Dv), prec
        ctx.set_materialize_grads(False)
        return S_all.view(B, H, N, Dv, Dk), S_fin.view(B, H, Dv, Dk)

    @staticmethod
    def backward(ctx, dS_all: Tensor | None, dS_fin: Tensor | None):
        U_, Wk_, Ke_, GL_, S_all = ctx.saved_tensors
        B, H, N, C, Dk, Dv = ctx.shape
        dU, dWk, dKe, dGL, dS0 = recurrence_backward(U_, Wk_, Ke_, GL_, S_all, dS_all, dS_fin, ctx.prec)
        return (dU.view(B, H, N, C, Dv), dWk.reshape(B, H, N, C, Dk), dKe.reshape(B, H, N, C, Dk),
                dGL.reshape(B, H, N), dS0.view(B, H, Dv, Dk), None)


def state_recurrence(U: Tensor, Wk: Tensor, k_end: Tensor, gamma_last: Tensor, S0: Tensor,
                     precision: str = DOT_PRECISION) -> tuple[Tensor, Tensor]:
    """Drop-in for `chunked.state_recurrence` (float32 tensors): (S_all [B, H, N, Dv, Dk], S_N [B, H, Dv, Dk]).
    precision: tl.dot input precision of the kernels ("ieee", "tf32", "tf32x3")."""
    return _Recurrence.apply(U, Wk, k_end, gamma_last, S0, precision)


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
               initial_state: Tensor | None = None, reset: Tensor | None = None, chunk_size: int = 64,
               scale: float | None = None, output_final_state: bool = True, fused: bool | None = None
               ) -> tuple[Tensor, Tensor | None]:
    """Same contract as `reference.delta_rule` (q, k [B, T, H, Dk]; v [B, T, H, Dv]; beta, g [B, T, H];
    initial_state [B, H, Dv, Dk]; reset bool [B, T] -> o [B, T, H, Dv] in q's dtype, final state float32).
    fused: the whole-pipeline kernels where they apply (None: the module's FUSED), else the recurrence-only path."""
    check_inputs(q, k, v, beta, g, initial_state, reset)
    if not supports(q, k, v, beta, g, chunk_size=chunk_size):
        raise ValueError(f"delta_rule[triton]: unsupported inputs (device {q.device}, dtype {q.dtype}, "
                         f"Dk {q.shape[-1]}, Dv {v.shape[-1]}, chunk {min(chunk_size, q.shape[1])}); needs Triton, "
                         f"CUDA (or CPU with TRITON_INTERPRET=1), fp32/bf16/fp16, D ≤ {MAX_HEAD_DIM}, "
                         f"chunk ≤ {MAX_CHUNK}")
    prec = HALF_DOT_PRECISION if q.dtype in (torch.bfloat16, torch.float16) else DOT_PRECISION
    if (FUSED if fused is None else fused) and triton_fused.supports(q, v, chunk_size):
        o, S = triton_fused.delta_rule(q, k, v, beta, g, initial_state=initial_state, reset=reset,
                                       chunk_size=chunk_size, scale=scale, prec=prec)
        return o, (S if output_final_state else None)
    c = chunked.prepare(q, k, v, beta, g, initial_state=initial_state, reset=reset, chunk_size=chunk_size,
                        scale=scale)
    S_all, S = state_recurrence(c.U, c.Wk, c.k_end, c.gamma_last, c.S0, prec)
    return chunked.outputs(c, S_all, q.shape[1], q.dtype), (S if output_final_state else None)
