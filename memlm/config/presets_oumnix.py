"""Oumnix presets (SPEC.md, Oumnix): MoOp mixers over {local attention, strided global attention, SSM, conv},
Bayesian residuals (PFP), WEAVE on the feed-forward projections, Oumnix cells on odd layers and early exits.

Every feature is one ``--set`` away from off (the ablation switches, tests/models/test_oumnix.py checks each):
    --set model.moop_off=true          fixed equal mixing of the operators instead of the top-k router
    --set model.residual=sequential    no PFP variance channel
    --set model.weave_rank=0           dense feed-forward projections
    --set model.cell_layers=[]         no Oumnix cells
    --set model.exit_layers=[]         no exit heads / auxiliary loss
"""
from __future__ import annotations

from memlm.config.model import ModelConfig
from memlm.config.presets import _debug_train, _gpu_train, register_preset
from memlm.config.train import RunConfig
from memlm.layers.conv import ConvConfig
from memlm.layers.moop import MoOpConfig
from memlm.layers.sparse_attention import GlobalAttentionConfig, LocalAttentionConfig
from memlm.layers.ssm import SSMConfig


def oumnix(d: int, n_layers: int, heads: int, vocab: int, *, window: int, stride: int, ssm_head: int, d_state: int,
           chunk: int, conv: int, weave_rank: int, exits: list[int], top_k: int = 2) -> ModelConfig:
    """Oumnix stack: one MoOp mixer per layer, PFP residual, WEAVE MLP, cells on odd layers, exits after ``exits``."""
    def ops():
        return [LocalAttentionConfig(window=window), GlobalAttentionConfig(stride=stride),
                SSMConfig(head_dim=ssm_head, d_state=d_state, chunk_size=chunk), ConvConfig(kernel_size=conv)]

    layers = [MoOpConfig(operators=ops(), top_k=top_k) for _ in range(n_layers)]
    return ModelConfig(vocab_size=vocab, d_model=d, n_heads=heads, layers=layers, residual="pfp", position="rope",
                       weave_rank=weave_rank, weave_targets=["w_in", "w_out"],
                       cell_layers=list(range(1, n_layers, 2)), exit_layers=exits)


@register_preset("oumnix-debug", "oumnix", "Oumnix (MoOp, PFP, WEAVE, cells, early exit), debug size: d64 L4")
def _oumnix_debug() -> RunConfig:
    return RunConfig(model=oumnix(64, 4, 4, 263, window=16, stride=8, ssm_head=16, d_state=16, chunk=16, conv=4,
                                  weave_rank=16, exits=[1]), train=_debug_train())


@register_preset("oumnix-tiny", "oumnix", "Oumnix d256 L6 H4, window 128, stride 64, WEAVE rank 64, exits after "
                 "layers 1 and 3, vocab 16384 (13,121,180 parameters)")
def _oumnix_tiny() -> RunConfig:
    return RunConfig(model=oumnix(256, 6, 4, 16384, window=128, stride=64, ssm_head=64, d_state=64, chunk=64, conv=4,
                                  weave_rank=64, exits=[1, 3]), train=_gpu_train())


@register_preset("oumnix-small", "oumnix", "Oumnix d512 L8 H8, window 256, stride 64, WEAVE rank 128, exits after "
                 "layers 3 and 5, vocab 16384 (55,355,280 parameters)")
def _oumnix_small() -> RunConfig:
    return RunConfig(model=oumnix(512, 8, 8, 16384, window=256, stride=64, ssm_head=64, d_state=64, chunk=64, conv=4,
                                  weave_rank=128, exits=[3, 5]), train=_gpu_train())
