"""Short causal depthwise convolution with a carried state (DeltaNet / Gated DeltaNet / Mamba-2 input conv).

Notation: B batch, T new tokens, C channels, K kernel width, w [C, K] taps (w[:, K−1] multiplies the current token),
g the norm group (0: off).

    y_t = act( b + Σ_{j=0}^{K−1} w[:, K−1−j] ⊙ x_{t−j} · [x_{t−j} is in the same document as x_t] )
    y_t ← y_t / max(‖y_t‖, 1e-12) over each run of g consecutive channels, in float32     (norm_group g > 0)

The state is the last K−1 inputs [B, K−1, C] (zeros when fresh). It is strictly causal (left padding only, never
centred — seed defect 1) and never mixes tokens across a document reset: a tap whose source token lies before the
most recent reset contributes nothing, so a packed row equals separate documents exactly, and the carried cache has
its pre-reset entries zeroed so the next call cannot see them either. The optional per-group L2 normalisation is the
one the neural memory applies to its q / k / v heads right after the conv (fused into the Triton kernels).

Op "short_conv" (memlm.ops.dispatch), arguments (x, weight, bias, cache, reset, activation, *, norm_group):
  "torch"   `causal_conv1d_torch` below: one multiply-add per tap in x's dtype (the reference, any device, CPU default);
  "triton"  memlm.ops.short_conv: one forward kernel, two backward ones, float32 inside (CUDA default for T ≥ 2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.ops import dispatch
from memlm.ops.short_conv import new_cache  # importing it also registers backend "triton" of op "short_conv"

__all__ = ["ShortConv", "causal_conv1d", "causal_conv1d_torch"]

ACTIVATIONS = ("silu", None)


def _check(channels: int, activation: str | None, norm_group: int) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} not allowed; allowed: ['silu', None]")
    if norm_group < 0 or (norm_group > 0 and channels % norm_group != 0):
        raise ValueError(f"norm_group={norm_group} must be 0 (off) or a divisor of channels={channels}")


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, cache: Tensor | None = None,
                  reset: Tensor | None = None, activation: str | None = "silu", *, norm_group: int = 0,
                  backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv. x [B, T, C]; weight [C, K]; bias [C] or None; cache [B, K−1, C] (the K−1 inputs
    before x, oldest first) or None (zeros); reset bool [B, T] or None (token t starts a new document); norm_group g:
    L2-normalise each run of g channels after the activation (0: off); backend: a backend of op "short_conv" by name
    (None: the dispatch's choice, "triton" on CUDA for T ≥ 2, else "torch").

    Returns y [B, T, C] (in x's dtype) and the new cache [B, K−1, C] in the cache's dtype (x's dtype if None).
    """
    _check(x.shape[-1], activation, norm_group)
    return dispatch.call("short_conv", x, weight, bias, cache, reset, activation, norm_group=norm_group,
                         backend=backend)


def causal_conv1d_torch(x: Tensor, weight: Tensor, bias: Tensor | None = None, cache: Tensor | None = None,
                        reset: Tensor | None = None, activation: str | None = "silu", *, norm_group: int = 0
                        ) -> tuple[Tensor, Tensor]:
    """The reference (backend "torch"): arguments and results as causal_conv1d. The taps accumulate in x's dtype; the
    normalisation is F.normalize in float32, cast back to x's dtype."""
    _check(x.shape[-1], activation, norm_group)
    B, T, Cc = x.shape
    K = weight.shape[1]
    P = K - 1
    if cache is None:
        cache = x.new_zeros(B, P, Cc)
    xe = torch.cat([cache.to(x.dtype), x], dim=1)                        # [B, P+T, C]
    if reset is not None:
        # segment id per extended position: cached tokens are segment 0, each reset opens a new one
        seg = torch.cat([reset.new_zeros(B, P, dtype=torch.int32), torch.cumsum(reset.to(torch.int32), 1)], 1)
    if T == 1 and reset is None:
        # decode: one dot product over the window (three kernels instead of a multiply-add per tap)
        y = (xe * weight.t().to(x.dtype)).sum(1, keepdim=True)
        y = y if bias is None else y + bias.to(x.dtype)
        y = F.silu(y) if activation == "silu" else y
        return _normalize(y, norm_group), new_cache(x, xe[:, :P], reset, P).to(cache.dtype)
    y = x.new_zeros(B, T, Cc) if bias is None else bias.to(x.dtype).expand(B, T, Cc).clone()
    for j in range(K):  # loop over the K taps (a handful), never over time
        src = xe[:, P - j: P - j + T]                                    # x_{t−j}
        tap = weight[:, K - 1 - j].to(x.dtype)
        if reset is not None and j > 0:
            same = (seg[:, P - j: P - j + T] == seg[:, P:]).to(x.dtype)   # [B, T]
            src = src * same[..., None]
        y = y + src * tap
    if activation == "silu":
        y = F.silu(y)
    return _normalize(y, norm_group), new_cache(x, xe[:, :P], reset, P).to(cache.dtype)


def _normalize(y: Tensor, g: int) -> Tensor:
    """Each run of g channels divided by max(its L2 norm, 1e-12), in float32 (F.normalize), back in y's dtype."""
    if not g:
        return y
    B, T, Cc = y.shape
    return F.normalize(y.float().view(B, T, Cc // g, g), dim=-1).view(B, T, Cc).to(y.dtype)


dispatch.register("short_conv", "torch", causal_conv1d_torch, priority=0)


class ShortConv(nn.Module):
    """Learned depthwise causal conv over C channels with kernel K (default 4), optional SiLU and, with norm_group
    g > 0, an L2 normalisation of each run of g channels after it (e.g. per head: g = the head width)."""

    def __init__(self, channels: int, kernel_size: int = 4, *, bias: bool = False,
                 activation: str | None = "silu", norm_group: int = 0) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size={kernel_size} must be ≥ 1")
        _check(channels, activation, norm_group)
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.norm_group = norm_group
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.reset_parameters()

    custom_init = True  # the generic init only touches Linear/Embedding, but keep our init explicit

    def reset_parameters(self) -> None:
        # PyTorch's Conv1d default (kaiming-uniform over fan_in = K for a depthwise kernel)
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def init_cache(self, batch_size: int, *, device=None, dtype=torch.float32) -> Tensor:
        """Zero cache [B, K−1, C]."""
        return torch.zeros(batch_size, self.kernel_size - 1, self.channels, device=device, dtype=dtype)

    def forward(self, x: Tensor, cache: Tensor | None = None, reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [B, T, C], cache [B, K−1, C] -> (y [B, T, C], new cache [B, K−1, C])."""
        return causal_conv1d(x, self.weight, self.bias, cache, reset, self.activation, norm_group=self.norm_group)
