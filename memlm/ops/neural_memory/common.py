"""Pieces shared by the reference and the chunked neural-memory op: state containers, the polynomial feature
map, Newton–Schulz orthogonalisation and argument checking. See NOTES.md for the maths.

Notation:
  B batch, T tokens in this call, H heads, Dk key/query width, Dv value width,
  F memory input width (F = Dk, or Dk + Dk(Dk+1)/2 with polynomial features), E hidden width of the memory MLP,
  C chunk size, c window (the last c tokens of a chunk enter its objective), p pending tokens (0 <= p < C),
  W1 [E, F], W2 [Dv, E] fast weights, S1, S2 their momenta, φ the feature map.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

OPTIMIZERS = ("momentum", "muon")
# Quintic Newton–Schulz coefficients (a, b, c): X <- a X + b (X Xᵀ) X + c (X Xᵀ)² X, five steps.
NS5_COEFFS = (3.4445, -4.7750, 2.0315)
NS5_STEPS = 5
NS5_EPS = 1e-7


def maybe_any(mask: Tensor) -> bool:
    """``mask.any()`` as a Python bool for CPU tensors; True without looking for CUDA tensors and inside
    torch.compile. Callers only use it to skip work whose result is masked out anyway, so both answers give the same
    output (tests pin them together). Reading a CUDA mask stalls the host until the GPU has caught up, and the work
    it could skip costs less: atlas-mag-small's training step took 272 ms with its 12 such reads and 248 without
    (H100, B 16 × 2048; training streams always hold a reset, the first token). Inside torch.compile a read would
    break the graph."""
    return True if torch.compiler.is_compiling() or mask.is_cuda else bool(mask.any())


class Pending(NamedTuple):
    """Tokens of the open (incomplete) chunk: already read, not yet written. Sequence-first like the inputs.

    k [B, p, H, Dk], v [B, p, H, Dv], gamma/eta/theta/alpha [B, p, H], reset [B, p] (bool). p < C.
    """

    k: Tensor
    v: Tensor
    gamma: Tensor
    eta: Tensor
    theta: Tensor
    alpha: Tensor
    reset: Tensor

    @property
    def length(self) -> int:
        return self.k.shape[1]


class NeuralMemoryState(NamedTuple):
    """Per-sequence memory: W1 [B, H, E, F], W2 [B, H, Dv, E], momenta S1, S2 alike, and the pending tokens."""

    W1: Tensor
    W2: Tensor
    S1: Tensor
    S2: Tensor
    pending: Pending

    def nbytes(self) -> int:
        ts = [self.W1, self.W2, self.S1, self.S2, *self.pending]
        return sum(t.numel() * t.element_size() for t in ts)


def empty_pending(batch: int, heads: int, dk: int, dv: int, *, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> Pending:
    """A pending buffer with p = 0 tokens."""
    z = dict(device=device, dtype=dtype)
    g = torch.zeros(batch, 0, heads, **z)
    return Pending(torch.zeros(batch, 0, heads, dk, **z), torch.zeros(batch, 0, heads, dv, **z), g, g, g, g,
                   torch.zeros(batch, 0, dtype=torch.bool, device=device))


def feature_dim(dk: int, poly: bool) -> int:
    """Width F of the memory input: Dk, or Dk + Dk(Dk+1)/2 with degree-2 polynomial features."""
    return dk + dk * (dk + 1) // 2 if poly else dk


def poly_features(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Degree-2 feature map φ(x) = [x, u(x)], u_ij = x_i x_j · s_ij for i <= j, s_ij = 1 (i < j), 1/√2 (i = j).

    x [..., D] -> [..., D + D(D+1)/2], computed in x's dtype and returned in ``dtype`` (default x's: e.g. bf16 for
    features only a bf16 matmul reads, rounded once as that matmul would). The scaling makes φ(a)·φ(b) =
    a·b + (a·b)²/2, the first two terms of exp(a·b) − 1, so the quadratic part neither dominates nor vanishes for
    unit-norm keys.
    """
    return _Poly.apply(x, dtype or x.dtype)


class _PolyMaps(NamedTuple):
    """Index maps of φ for width d (P = d(d+1)/2): i, j, s [P] the upper triangle and its scale (s float64, cast at use);
    Oi, Oj [P, d] float32 one-hot rows of i and j (products with them are exact, so a float32 matmul sums without
    rounding the terms); pos [d, d] the entry of u that (m, n) or (n, m) is, gs [d, d] ∂u_pos/∂(x_m x_n) counted for
    both factors (1 off the diagonal, 2/√2 on it; float64) — the Triton backward's form."""

    i: Tensor
    j: Tensor
    s: Tensor
    Oi: Tensor
    Oj: Tensor
    pos: Tensor
    gs: Tensor


@functools.cache
def _poly_maps(d: int, device: torch.device) -> _PolyMaps:
    i, j = torch.triu_indices(d, d, device=device)
    s = torch.ones(i.shape, dtype=torch.float64, device=device).masked_fill(i == j, 1.0 / math.sqrt(2.0))
    eye = torch.eye(d, device=device)
    pos = torch.empty(d, d, dtype=torch.long, device=device)
    pos[i, j] = pos[j, i] = torch.arange(i.numel(), device=device)
    gs = torch.ones(d, d, dtype=torch.float64, device=device).fill_diagonal_(math.sqrt(2.0))
    return _PolyMaps(i, j, s, eye[i], eye[j], pos, gs)


# φ on float32 CUDA tensors runs as two Triton kernels (triton_memory.poly_forward / poly_backward): the torch form
# below writes and re-reads [rows, P] temporaries several times (8 ms per layer's forward + backward at
# atlas-mag-small's training shapes on an H100). False: always the torch form (the reference the kernels are tested on).
POLY_TRITON = True


def _poly_triton(x: Tensor) -> bool:
    if not (POLY_TRITON and x.is_cuda):
        return False
    from . import triton_memory
    return triton_memory.poly_supports(x)


class _Poly(torch.autograd.Function):
    """φ(x) with a backward of gathers and matmuls. Autograd of ``x[..., i]`` accumulates through a sorting index_put
    (its indices repeat), which took 14 ms per call at atlas-mag-small's training shapes on an H100 — half of the whole
    memory op. Here, with g = s ⊙ ∂L/∂u: ∂L/∂x = ∂L/∂x_lin + (g ⊙ x_j) Oi + (g ⊙ x_i) Oj (on the diagonal both terms
    add s x_i: ∂(s x_i²) = 2 s x_i). Half inputs are summed in float32."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(x)
        if _poly_triton(x):
            from .triton_memory import poly_forward
            return poly_forward(x, dtype)
        m = _poly_maps(x.shape[-1], x.device)
        return torch.cat([x, x[..., m.i] * x[..., m.j] * m.s.to(x.dtype)], dim=-1).to(dtype)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        if _poly_triton(x) and g.dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled():
            from .triton_memory import poly_backward
            return poly_backward(x, g), None
        d = x.shape[-1]
        m = _poly_maps(d, x.device)
        dt = torch.promote_types(g.dtype, torch.float32)
        xf = x.to(dt)
        gu = g[..., d:].to(dt) * m.s.to(dt)
        dx = g[..., :d].to(dt) + (gu * xf[..., m.j]) @ m.Oi.to(dt) + (gu * xf[..., m.i]) @ m.Oj.to(dt)
        return dx.to(x.dtype), None


def features(x: Tensor, poly: bool, dtype: torch.dtype | None = None) -> Tensor:
    """The memory's input: φ(x) or x, in ``dtype`` (default x's)."""
    return poly_features(x, dtype) if poly else x.to(dtype or x.dtype)


def read_dtype(dt: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the reads' matmuls run in: autocast's when it is on for this device and the op computes in float32
    (autocast leaves float64 alone), else dt. Tensors only the reads use (query features, the weight stack of the
    Triton backend) are made in it directly: the same values as autocast's cast at every read, minus the copies."""
    if dt == torch.float32 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dt


def newton_schulz5(s: Tensor) -> Tensor:
    """Approximate orthogonalisation U Vᵀ of every matrix s [..., m, n] (U Σ Vᵀ = s), differentiable.

    X0 = s / sqrt(‖s‖_F² + ε²) (ε = 1e-7; smooth at s = 0, where it returns 0), then five steps of
    X <- a X + (b A + c A²) X with A = X Xᵀ and (a, b, c) = (3.4445, −4.7750, 2.0315). Wide orientation is
    used internally (transpose when m > n) so that A is the smaller Gram matrix; the result is the same map.
    """
    a, b, c = NS5_COEFFS
    x = s * torch.rsqrt(s.square().sum(dim=(-2, -1), keepdim=True) + NS5_EPS**2)
    tall = s.shape[-2] > s.shape[-1]
    if tall:
        x = x.mT
    for _ in range(NS5_STEPS):
        g = x @ x.mT
        x = a * x + (b * g + c * (g @ g)) @ x
    return x.mT if tall else x


def newton_schulz5_gram(s: Tensor) -> Tensor:
    """newton_schulz5 computed on the Gram matrix (the same map; the reference of the Triton kernels' form).

    Every iterate is X_k = K_k X_0 with K_k [m, m] (m ≤ n, wide orientation), so the steps need only
    A_0 = X_0 X_0ᵀ: Q_k = a I + b A_k + c A_k², K_{k+1} = Q_k K_k, A_{k+1} = Q_k A_k Q_k, and NS5(s) = K_5 X_0 —
    two products with the n-wide matrix instead of ten. Equal in exact arithmetic (float64: 1e-13); in float32 its
    error grows with the condition of s (K_5's eigenvalues reach a⁵ ≈ 484 where s is small): 1e-6 on a Gaussian
    64 × 560, up to 3e-4 against the iterative form's 1e-5 when s's singular values span 1 … 1e-6.
    """
    a, b, c = NS5_COEFFS
    tall = s.shape[-2] > s.shape[-1]
    x = s.mT if tall else s
    n2 = s.square().sum(dim=(-2, -1), keepdim=True) + NS5_EPS**2
    A = (x @ x.mT) / n2
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    K = None
    for it in range(NS5_STEPS):
        q = a * eye + b * A + c * (A @ A)
        K = q if K is None else q @ K
        if it < NS5_STEPS - 1:
            A = q @ A @ q
    y = (K @ x) * torch.rsqrt(n2)
    return y.mT if tall else y


def compute_dtype(*ts: Tensor | None) -> torch.dtype:
    """float32, or float64 when any input is float64 (references in double for tight comparisons)."""
    dt = torch.float32
    for t in ts:
        if t is not None and t.dtype == torch.float64:
            dt = torch.float64
    return dt


def check_args(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, theta: Tensor, alpha: Tensor,
               W1: Tensor, W2: Tensor, S1: Tensor | None, S2: Tensor | None, pending: Pending | None,
               chunk_size: int, window: int | None, optimizer: str, poly: bool, reset: Tensor | None,
               W1_init: Tensor | None, W2_init: Tensor | None, commit: Tensor | None = None,
               chunk_aligned_resets: bool = False) -> tuple[int, Tensor, Tensor, Pending]:
    """Validate shapes and options; return (window c, S1, S2, pending) with defaults filled in (zeros / empty).
    chunk_aligned_resets (the caller's promise that every reset starts a chunk) is checked on CPU tensors only: on CUDA
    the check would stall the host."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, Dk]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, Dk = q.shape
    if T < 1:
        raise ValueError("neural_memory needs T >= 1 tokens")
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, Dv] with B, T, H = {B, T, H}; got {tuple(v.shape)}")
    Dv = v.shape[-1]
    for name, g in (("gamma", gamma), ("eta", eta), ("theta", theta), ("alpha", alpha)):
        if g.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = {B, T, H}; got {tuple(g.shape)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {optimizer!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    c = chunk_size if window is None else window
    if not isinstance(c, int) or not 1 <= c <= chunk_size:
        raise ValueError(f"window must be an int in [1, chunk_size={chunk_size}]; got {window!r}")
    F = feature_dim(Dk, poly)
    if W1.dim() != 4 or W1.shape[:2] != (B, H) or W1.shape[-1] != F:
        raise ValueError(f"W1 must be [B, H, E, F] = [{B}, {H}, E, {F}] (poly={poly}); got {tuple(W1.shape)}")
    E = W1.shape[2]
    if W2.shape != (B, H, Dv, E):
        raise ValueError(f"W2 must be [B, H, Dv, E] = {B, H, Dv, E}; got {tuple(W2.shape)}")
    S1 = torch.zeros_like(W1) if S1 is None else S1
    S2 = torch.zeros_like(W2) if S2 is None else S2
    if S1.shape != W1.shape or S2.shape != W2.shape:
        raise ValueError(f"S1/S2 must match W1/W2 shapes; got {tuple(S1.shape)}, {tuple(S2.shape)}")
    if reset is not None:
        if reset.shape != (B, T) or reset.dtype != torch.bool:
            raise ValueError(f"reset must be a bool tensor [B, T] = {B, T}; got {reset.dtype} {tuple(reset.shape)}")
    if commit is not None and (commit.shape != (B,) or commit.dtype.is_floating_point or commit.dtype == torch.bool):
        raise ValueError(f"commit must be an integer tensor [B] = [{B}] (complete chunks whose writes each row's "
                         f"returned state keeps); got {commit.dtype} {tuple(commit.shape)}")
    if (reset is not None or pending is not None) and (W1_init is None) != (W2_init is None):
        raise ValueError("W1_init and W2_init must be given together")
    if W1_init is not None:
        if W1_init.shape != (H, E, F) or W2_init.shape != (H, Dv, E):
            raise ValueError(f"W1_init/W2_init must be [H, E, F] = {H, E, F} and [H, Dv, E] = {H, Dv, E}; got "
                             f"{tuple(W1_init.shape)}, {tuple(W2_init.shape)}")
    dt = compute_dtype(q, k, v, W1)
    if pending is None:
        pending = empty_pending(B, H, Dk, Dv, device=q.device, dtype=dt)
    else:
        pending = Pending(*pending)
        p = pending.k.shape[1]
        if p >= chunk_size:
            raise ValueError(f"pending holds {p} tokens; it must hold fewer than chunk_size={chunk_size}")
        want = {"k": (B, p, H, Dk), "v": (B, p, H, Dv), "gamma": (B, p, H), "eta": (B, p, H), "theta": (B, p, H),
                "alpha": (B, p, H), "reset": (B, p)}
        for name, shape in want.items():
            if tuple(getattr(pending, name).shape) != shape:
                raise ValueError(f"pending.{name} must be {shape}; got {tuple(getattr(pending, name).shape)} "
                                 "(was it produced with the same chunk_size, heads and widths?)")
    # the data check only when W_init is missing (a layer always passes it): no host sync, no graph break
    if W1_init is None and ((reset is not None and bool(reset.any())) or bool(pending.reset.any())):
        raise ValueError("reset tokens need W1_init and W2_init (the learned initial weights, [H, E, F], [H, Dv, E])")
    if chunk_aligned_resets and not q.is_cuda and not torch.compiler.is_compiling():
        p = pending.k.shape[1]
        inside = (p + torch.arange(T, device=q.device)) % chunk_size != 0            # stream position not a chunk start
        if (reset is not None and bool(reset[:, inside].any())) or bool(pending.reset[:, 1:].any()):
            raise ValueError(f"chunk_aligned_resets=True, but a reset lies inside a chunk (its stream position, "
                             f"pending tokens included, is not a multiple of chunk_size={chunk_size})")
    return c, S1, S2, pending
