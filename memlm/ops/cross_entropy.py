"""Summed next-token cross-entropy, plain and chunked (LM head fused in, never materialising [N, V] fp32 logits).

Notation: N tokens (B·T flattened), D model width, V vocabulary, n rows per chunk, ignore = −100 (labels to skip).

plain:    logits = h Wᵀ [N, V] in the matmul dtype (bf16 under autocast), CE computed in fp32 — what
          ``F.cross_entropy(logits.float(), labels, reduction="sum")`` does; the logits and their fp32 copy are
          kept for backward (2–6 bytes × N × V).
chunked:  the same numbers chunk by chunk of n rows. Its gradient is known in closed form,
              ∂CE/∂logits = softmax(logits) − onehot(label)   (0 on ignored rows),
          so the forward computes it per chunk right away (∂h = G W, ∂W += Gᵀ h) and keeps only ∂h [N, D] and
          ∂W [V, D] (fp32); backward scales them by the incoming gradient. Three matmuls like the plain path, no
          recomputation, peak extra memory n × V × 4 bytes × 2 instead of N × V × (2 + 4 + 4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "linear_ce_sum", "token_ce_sum"]

IGNORE_INDEX = -100


def token_ce_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Plain summed CE: logits [..., V] (any float dtype, computed in fp32), labels [...] (−100 skips) -> fp32 scalar."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def _matmul_dtype(h: Tensor) -> torch.dtype:
    """The dtype F.linear(h, W) would compute in here: the autocast dtype when autocast is on for h's device."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, labels: Tensor, chunk: int, dtype: torch.dtype) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):  # dtypes are explicit below
            wc = w.to(dtype)
            total = h.new_zeros((), dtype=torch.float32)
            gh, gw = [], (torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None)
            for s in range(0, h.shape[0], chunk):
                hc, lab = h[s:s + chunk].to(dtype), labels[s:s + chunk]
                logits = (hc @ wc.t()).float()                                # [n, V], rounded like the plain path
                valid = lab != IGNORE_INDEX
                tgt = torch.where(valid, lab, 0)[:, None]
                lse = torch.logsumexp(logits, dim=-1)
                total = total + torch.where(valid, lse - logits.gather(1, tgt)[:, 0], 0.0).sum()
                if need_h or need_w:
                    g = torch.exp(logits - lse[:, None])                      # softmax − onehot(label), masked
                    g = g.scatter_add(1, tgt, torch.full_like(lse[:, None], -1.0))
                    g = (g * valid[:, None]).to(dtype)
                    if need_h:
                        gh.append((g @ wc).float())
                    if need_w:
                        gw = gw + (g.t() @ hc).float()
        ctx.save_for_backward(torch.cat(gh) if need_h else None, gw)
        ctx.dtypes = (h.dtype, w.dtype)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        gh, gw = ctx.saved_tensors
        dh = None if gh is None else (gh * grad).to(ctx.dtypes[0])
        dw = None if gw is None else (gw * grad).to(ctx.dtypes[1])
        return dh, dw, None, None, None


def linear_ce_sum(h: Tensor, w: Tensor, labels: Tensor, *, chunk: int = 4096) -> Tensor:
    """Σ CE(h Wᵀ, labels) over tokens, computed ``chunk`` rows at a time (module docstring).

    h [..., D] final hidden states, w [V, D] the LM head weight, labels [...] (−100 skips) -> fp32 scalar. Equal to
    ``token_ce_sum(F.linear(h, w), labels)`` (matmul in the autocast dtype when autocast is on), gradients included.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be ≥ 1")
    h2 = h.reshape(-1, h.shape[-1])
    return _LinearCE.apply(h2, w, labels.reshape(-1), chunk, _matmul_dtype(h2))
