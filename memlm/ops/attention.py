"""Masked causal attention over [persistent; cached; new] keys: SDPA with a dense mask (reference) or FlexAttention.

Notation: B batch, Hq / Hk query / key-value heads, T queries (new tokens), Np persistent keys, K = Np + L + T keys
(L cached), Dh head width, W window.

Visibility (the AttentionCore rule, module docstring of memlm/layers/attention.py): key j (stream position kpos[b, j],
−1 = empty slot) is visible to query t (position qpos[b, t], document start qdoc[b, t]) iff
    kpos ≥ 0  and  kpos ≤ qpos  and  kpos ≥ qdoc  and (no window or qpos − kpos < W);
the first Np keys (persistent memory) are visible to every query.

Backends (memlm.ops.dispatch, op "masked_attention"; pick one with ``force_backend``, the environment variable
MEMLM_BACKEND_MASKED_ATTENTION or train.attention):
  "sdpa"  the [B, T, K] boolean mask and F.scaled_dot_product_attention (any device; the reference);
  "flex"  torch.nn.attention.flex_attention with a block mask built from the same rule: sliding windows and packed
          documents skip whole blocks instead of masking a dense bias. Automatic on CUDA for T > 1 when training
          (gradients enabled) or inside torch.compile — fixed shapes, so its kernel compiles once; eager inference
          prefills (a new prompt length each time) keep SDPA unless flex is forced. Outside torch.compile the flex
          kernel is compiled here (per shape); on the CPU it runs eagerly (tests, no backward). Block masks are cached
          by the caller's key (shape, window, Np and the identity of the batch's reset tensor) so every layer of one
          forward shares one mask.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from memlm.ops import dispatch

__all__ = ["flex_available", "masked_attention", "masked_attention_flex", "masked_attention_sdpa"]

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention: the SDPA backend only
    create_block_mask = flex_attention = None


def flex_available() -> bool:
    return flex_attention is not None


def masked_attention_sdpa(q: Tensor, keys: Tensor, vals: Tensor, qpos: Tensor, kpos: Tensor, qdoc: Tensor, *,
                          window: int | None = None, n_persist: int = 0, cache_key=None) -> Tensor:
    """q [B, Hq, T, Dh]; keys, vals [B, Hk, K, Dh]; qpos, qdoc [B, T]; kpos [B, K − Np] -> o [B, Hq, T, Dh]."""
    qp, kp = qpos[:, :, None], kpos[:, None, :]
    mask = (kp >= 0) & (kp <= qp) & (kp >= qdoc[:, :, None])
    if window is not None:
        mask &= qp - kp < window
    if n_persist:
        mask = torch.cat([mask.new_ones(mask.shape[0], mask.shape[1], n_persist), mask], dim=2)
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask[:, None], enable_gqa=q.shape[1] != keys.shape[1])


_MASKS: OrderedDict = OrderedDict()  # cache_key -> (objects kept alive so their ids stay unique, BlockMask)
_MAX_MASKS = 8
_compiled_flex = None
# Compiled kernels of the flex function kept per shape, dtype and mask rule (window, persistent keys). Dynamo's own
# limit (8 a function) is process-wide: past it the call silently runs flex_attention's eager reference, which
# materialises every [T, K] score (slow, memory-hungry, and not capturable in a CUDA graph) — a process that trains
# and evaluates a few shapes, or several models, reached it. Raised for these calls only.
FLEX_RECOMPILE_LIMIT = 64


def _block_mask(qpos: Tensor, kpos: Tensor, qdoc: Tensor, window: int | None, n_persist: int):
    B, T = qpos.shape
    K = n_persist + kpos.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        kp = kpos[b, (kv_idx - n_persist).clamp(min=0)]
        qp = qpos[b, q_idx]
        ok = (kp >= 0) & (kp <= qp) & (kp >= qdoc[b, q_idx])
        if window is not None:
            ok = ok & (qp - kp < window)
        return ok | (kv_idx < n_persist)

    return create_block_mask(mask_mod, B, None, T, K, device=qpos.device)


def masked_attention_flex(q: Tensor, keys: Tensor, vals: Tensor, qpos: Tensor, kpos: Tensor, qdoc: Tensor, *,
                          window: int | None = None, n_persist: int = 0, cache_key=None) -> Tensor:
    """The same as ``masked_attention_sdpa`` through FlexAttention. cache_key: a tuple of hashables and tensors that
    determine qpos / kpos / qdoc (tensors by identity and version, kept alive by the cache), or None (no caching)."""
    compiling = torch.compiler.is_compiling()
    bm = None
    if cache_key is not None and not compiling:
        # tensors by identity and version (an in-place change of a cached tensor misses the cache)
        key = tuple((id(x), x._version) if isinstance(x, Tensor) else x for x in cache_key) + (window, n_persist,
                                                                                              qpos.device)
        hit = _MASKS.get(key)
        if hit is not None:
            bm = hit[1]
            _MASKS.move_to_end(key)
    if bm is None:
        bm = _block_mask(qpos, kpos, qdoc, window, n_persist)
        if cache_key is not None and not compiling:
            _MASKS[key] = (cache_key, bm)
            while len(_MASKS) > _MAX_MASKS:
                _MASKS.popitem(last=False)
    fn = _compiled_flex_call if q.is_cuda and not compiling else flex_attention
    # The standard flex kernel, always: for queries shorter than 128 torch's automatic choice may take the
    # flex-decoding template, which has no backward and, in float32 with GQA, no valid config on torch 2.11 (an
    # InductorError "NoValidChoicesError" for a 100-token fp32 batch on an H100).
    opts = {"FORCE_USE_FLEX_ATTENTION": True} if q.is_cuda else None
    return fn(q, keys, vals, block_mask=bm, enable_gqa=q.shape[1] != keys.shape[1], kernel_options=opts)


def _compiled_flex_call(*args, **kwargs) -> Tensor:
    """flex_attention compiled once (its eager form is a slow reference), called with Dynamo's limit of compiled
    versions raised to FLEX_RECOMPILE_LIMIT for the call."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    cfg = torch._dynamo.config
    limit = cfg.recompile_limit     # set and restored directly: config.patch costs 24 µs a call, this 6
    cfg.recompile_limit = max(limit, FLEX_RECOMPILE_LIMIT)
    try:
        return _compiled_flex(*args, **kwargs)
    finally:
        cfg.recompile_limit = limit


def _flex_supports(q: Tensor, keys: Tensor, *args, **kwargs) -> bool:
    """Flex runs anywhere torch has it (eagerly off CUDA); the CUDA kernel wants a power-of-two head width ≥ 16 and
    a 16- or 32-bit float (its Triton template does not compile for float64)."""
    dh = q.shape[-1]
    return flex_available() and (not q.is_cuda or (dh >= 16 and dh & (dh - 1) == 0 and q.dtype != torch.float64))


# "sdpa" is the default everywhere; "flex" is picked by name, or automatically by masked_attention for prefill and
# training on CUDA (T > 1), where its block-sparse kernel beats a dense-mask SDPA.
dispatch.register("masked_attention", "sdpa", masked_attention_sdpa, priority=0)
dispatch.register("masked_attention", "flex", masked_attention_flex, _flex_supports, priority=-10)


def masked_attention(q: Tensor, keys: Tensor, vals: Tensor, qpos: Tensor, kpos: Tensor, qdoc: Tensor, *,
                     window: int | None = None, n_persist: int = 0, cache_key=None) -> Tensor:
    """Dispatch to a backend (module docstring): a forced one, else flex for training / compiled T > 1 on CUDA, else
    SDPA."""
    backend = None
    if (dispatch.named("masked_attention") is None and q.is_cuda and q.shape[2] > 1 and _flex_supports(q, keys)
            and (torch.is_grad_enabled() or torch.compiler.is_compiling())):
        backend = "flex"
    return dispatch.call("masked_attention", q, keys, vals, qpos, kpos, qdoc, window=window, n_persist=n_persist,
                         cache_key=cache_key, backend=backend)
