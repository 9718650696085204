"""The one generic Block: norm(s) + mixer + optional MLP, wired by the model's residual style.

sequential: x ← x + mixer(norm1 x); x ← x + mlp(norm2 x)        (Llama, pre-norm)
parallel:   n = norm1 x;  x ← x + mixer(n) + mlp(n)              (PaLM / NYX: one norm)
parallel2:  x ← x + mixer(norm1 x) + mlp(norm2 x)                (GPT-NeoX / Pythia: two norms)
"""
from __future__ import annotations

from torch import Tensor, nn

from memlm.layers.base import LayerState, MixerConfig, build_mixer
from memlm.layers.mlp import make_mlp
from memlm.layers.norm import make_norm


class Block(nn.Module):
    def __init__(self, model_cfg, layer_cfg: MixerConfig, layer_idx: int) -> None:
        super().__init__()
        c = model_cfg
        self.residual = "sequential" if c.residual == "pfp" else c.residual
        self.norm1 = make_norm(c.norm, c.d_model, c.norm_eps, bias=c.norm_bias)
        self.mixer = build_mixer(layer_cfg, c, layer_idx)
        mlp_kind = layer_cfg.mlp or c.mlp
        self.mlp = make_mlp(mlp_kind, c.d_model, layer_cfg.d_ff or c.d_ff, bias=c.mlp_bias, model_cfg=c,
                            layer_idx=layer_idx)
        self.norm2 = None
        if self.mlp is not None and c.residual != "parallel":
            self.norm2 = make_norm(c.norm, c.d_model, c.norm_eps, bias=c.norm_bias)

    def forward(self, x: Tensor, state: LayerState | None, reset: Tensor | None, update: bool
                ) -> tuple[Tensor, LayerState]:
        n = self.norm1(x)
        h, state = self.mixer(n, state, reset=reset, update=update)
        if self.mlp is None:
            return x + h, state
        if self.residual == "sequential":
            x = x + h
            return x + self.mlp(self.norm2(x)), state
        if self.residual == "parallel":
            return x + h + self.mlp(n), state
        return x + h + self.mlp(self.norm2(x)), state
