"""Bayesian residuals (PFP, Oumnix): a variance channel beside the residual stream, trained through a per-token
logit temperature and exposed as per-token uncertainty.

Notation: B batch, T tokens, D model width, V vocabulary, L layers, ℓ a layer, x_ℓ [B, T, D] the residual stream
entering block ℓ, s_ℓ [B, T] its predicted log-variance, v [B, T] the accumulated variance, h the final hidden.

    s_ℓ = w_ℓ · norm1_ℓ(x_ℓ) + b_ℓ             one small head per block (D → 1) predicts the log-variance of the
                                               block's update from what the block reads
    v   = Σ_ℓ exp(s_ℓ)                         updates treated as independent: variances add along the stream
    h   = norm_f(x_L) / √(1 + v)               ⇒ logits = W_head h = (W_head norm_f(x_L)) / √(1 + v)

The head is linear without a bias, so scaling h *is* a per-token temperature 1 + v on the logits' scale: the
variance is trained by the ordinary next-token loss (a token the model cannot predict is better served by flatter
logits) and nothing else — no sampling, no extra loss. Everything is per token, so it is causal and chunk invariant.
``collect_uncertainty`` lets inference read v for every forward without changing any signature
(``memlm.inference.engine.generate(..., return_uncertainty=True)``).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from memlm.scoped import Scoped

__all__ = ["PFPHeads", "collect_uncertainty", "pfp_temperature", "report_uncertainty"]

_UNC = Scoped()  # not a ContextVar: read inside compiled forwards without a graph break


@contextlib.contextmanager
def collect_uncertainty() -> Iterator[dict]:
    """Collect the per-token variance v [B, T] of every PFP forward run inside: yields {"variance": last v or None}."""
    with _UNC.scope({"variance": None}) as box:
        yield box


def report_uncertainty(var: Tensor) -> None:
    box = _UNC.get()
    if box is not None:
        box["variance"] = var.detach()


class PFPHeads(nn.Module):
    """One log-variance head (D → 1) per block; ``init_var`` is the total variance v of a fresh model."""

    custom_init = True

    def __init__(self, d_model: int, n_layers: int, *, init_var: float = 0.1) -> None:
        super().__init__()
        self.init_var = init_var
        self.heads = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(n_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Weights start at zero (every token the same temperature; the loss' gradient still reaches them), biases
        # at log(init_var / L) so the L contributions add up to init_var.
        b = math.log(self.init_var / len(self.heads))
        for h in self.heads:
            nn.init.zeros_(h.weight)
            nn.init.constant_(h.bias, b)

    def log_var(self, layer: int, n: Tensor) -> Tensor:
        """n [B, T, D] (block ℓ's normalised input) -> s_ℓ [B, T] float32, clamped to keep exp finite."""
        return self.heads[layer](n).squeeze(-1).float().clamp(-20.0, 10.0)


def pfp_temperature(hidden: Tensor, var: Tensor) -> Tensor:
    """hidden [B, T, D], var [B, T] -> hidden / √(1 + var) (in hidden's dtype)."""
    return hidden * torch.rsqrt(1.0 + var).to(hidden.dtype)[..., None]
