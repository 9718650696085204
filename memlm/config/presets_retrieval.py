"""Presets with a retrieval-as-attention layer (``retrieval`` mixer, memlm/layers/retrieval.py): a Llama-style stack
whose designated layer attends to its local window and to the top-k entries of an episodic memory of earlier
segments (Memorizing Transformer places one such layer about three quarters up the stack); and the Oumnix stack with
its third layer replaced by one.
"""
from __future__ import annotations

from memlm.config.presets import _debug_train, _gpu_train, register_preset, transformer
from memlm.config.presets_oumnix import oumnix
from memlm.config.train import RunConfig
from memlm.layers.retrieval import RetrievalConfig


def with_retrieval(model, layer: int, **kw):
    """``model`` (a ModelConfig) with layer ``layer`` replaced by a retrieval layer (GQA heads kept)."""
    old = model.layers[layer]
    kv = getattr(old, "n_kv_heads", None)
    model.layers[layer] = RetrievalConfig(n_kv_heads=kv, **kw)
    return model


@register_preset("transformer-retrieval-debug", "transformer-retrieval",
                 "Llama-style, layer 1 of 2 is kNN retrieval attention (window 16, segments 16, memory 64, top 8), "
                 "debug size")
def _transformer_retrieval_debug() -> RunConfig:
    m = with_retrieval(transformer(64, 2, 4, 2, 263), 1, window=16, segment_size=16, memory_size=64, top_k=8)
    return RunConfig(model=m, train=_debug_train())


@register_preset("transformer-retrieval-34m", "transformer-retrieval",
                 "Llama-style d512 L8 H8, vocab 16384; layer 6 is kNN retrieval attention (window 512, segments "
                 "512, memory 8192 entries per head, top 32)")
def _transformer_retrieval_34m() -> RunConfig:
    m = with_retrieval(transformer(512, 8, 8, 8, 16384), 6, window=512, segment_size=512, memory_size=8192,
                       top_k=32)
    return RunConfig(model=m, train=_gpu_train())


@register_preset("oumnix-retrieval-debug", "oumnix-retrieval",
                 "Oumnix debug stack with layer 2 replaced by kNN retrieval attention (window 16, memory 64)")
def _oumnix_retrieval_debug() -> RunConfig:
    m = oumnix(64, 4, 4, 263, window=16, stride=8, ssm_head=16, d_state=16, chunk=16, conv=4, weave_rank=16,
               exits=[1])
    m = with_retrieval(m, 2, window=16, segment_size=16, memory_size=64, top_k=8)
    return RunConfig(model=m, train=_debug_train())
