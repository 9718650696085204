"""Mamba-2 baseline presets (SPEC.md, baselines): every mixer is the selective SSM of memlm/layers/ssm.py.

Block: RMSNorm → SSM mixer → residual, then RMSNorm → SwiGLU → residual — the same Llama-style block every other
memlm baseline uses, so a comparison isolates the mixer. (Mamba-2 itself has no MLP and twice the layers; that
variant is one flag away: ``--set model.mlp=none``.) Parameter counts are those of the built models
(tests/layers/test_ssm_layer.py checks them).
"""
from __future__ import annotations

from memlm.config.model import ModelConfig
from memlm.config.presets import _debug_train, _gpu_train, register_preset
from memlm.config.train import RunConfig
from memlm.layers.ssm import SSMConfig


def mamba2(d: int, n_layers: int, vocab: int, *, head_dim: int = 64, d_state: int = 64, chunk: int = 64,
           mlp: str = "swiglu") -> ModelConfig:
    """A stack of Mamba-2 mixers (expand 2, conv 4, one B/C group) with RMSNorm, tied embeddings, no positions."""
    layers = [SSMConfig(head_dim=head_dim, d_state=d_state, chunk_size=chunk) for _ in range(n_layers)]
    return ModelConfig(vocab_size=vocab, d_model=d, n_heads=max(1, 2 * d // head_dim), layers=layers,
                       position="none", mlp=mlp)


@register_preset("mamba2-debug", "mamba2", "Mamba-2 (selective SSM, SSD chunked scan), debug size")
def _mamba2_debug() -> RunConfig:
    return RunConfig(model=mamba2(64, 2, 263, head_dim=16, d_state=16, chunk=16), train=_debug_train())


@register_preset("mamba2-34m", "mamba2", "Mamba-2 mixers + SwiGLU, d512 L8, 16 heads of 64, state 64, vocab 16384 "
                 "(the 34m benchmark shape; 38,926,208 parameters)")
def _mamba2_34m() -> RunConfig:
    return RunConfig(model=mamba2(512, 8, 16384), train=_gpu_train())


@register_preset("mamba2-100m", "mamba2", "Mamba-2 mixers + SwiGLU, d768 L12, 24 heads of 64, state 64, vocab "
                 "16384 (113,212,512 parameters, 100,629,600 non-embedding)")
def _mamba2_100m() -> RunConfig:
    return RunConfig(model=mamba2(768, 12, 16384), train=_gpu_train(lr=6e-4))
