"""Weight initialisation: normal(0, σ) for matrices and embeddings, zeros for biases, and residual output
projections scaled by 1/√(2·n_layers) (GPT-2) so the residual stream's variance does not grow with depth.
Layers that need their own init (gates, decays, learned memories) define ``reset_parameters`` and it wins.
"""
from __future__ import annotations

import math

from torch import nn

# Names of the linear layers that write into the residual stream.
RESIDUAL_OUT = ("o_proj", "w_out", "out_proj")


def init_weights(model: nn.Module, *, std: float, n_layers: int) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            s = std / math.sqrt(2 * n_layers) if name.rsplit(".", 1)[-1] in RESIDUAL_OUT else std
            nn.init.normal_(m.weight, 0.0, s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
    # Mixer-specific initialisations run last so they are not overwritten (seed defect 4: a learned initial
    # state clobbered by a later generic re-init).
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters") and getattr(m, "custom_init", False):
            m.reset_parameters()
