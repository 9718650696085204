"""Presets of the fast-weight memory families: DeltaNet, Gated DeltaNet, HOPE / Onyx, Infini-attention / Infini-Pythia.

Parameter counts in the descriptions are those of the built models (tests/layers/test_fastweight_defects.py checks
them); "non-embedding" excludes the token embedding and an untied head.
"""
from __future__ import annotations

from memlm.config.model import ModelConfig
from memlm.config.presets import _debug_train, _gpu_train, pythia, register_preset
from memlm.config.train import RunConfig, TrainConfig
from memlm.layers.compressive import CompressiveConfig
from memlm.layers.delta import DeltaNetConfig, GatedDeltaNetConfig
from memlm.layers.hope import HopeConfig

# --------------------------------------------------------------------------------------------- (gated) DeltaNet


def deltanet(d: int, n_layers: int, heads: int, vocab: int, *, gated: bool, chunk: int = 64) -> ModelConfig:
    """Llama-style stack (RMSNorm, SwiGLU, tied) whose every mixer is a (gated) DeltaNet layer."""
    cls = GatedDeltaNetConfig if gated else DeltaNetConfig
    return ModelConfig(vocab_size=vocab, d_model=d, n_heads=heads, layers=[cls(chunk_size=chunk) for _ in range(n_layers)],
                       position="none")


@register_preset("deltanet-debug", "deltanet", "DeltaNet (delta rule, short conv, L2 q/k, output gate), debug size")
def _deltanet_debug() -> RunConfig:
    return RunConfig(model=deltanet(64, 2, 4, 263, gated=False, chunk=16), train=_debug_train())


@register_preset("deltanet-34m", "deltanet", "DeltaNet, d512 L8 H8, vocab 16384 (36,267,072 parameters)")
def _deltanet_34m() -> RunConfig:
    return RunConfig(model=deltanet(512, 8, 8, 16384, gated=False), train=_gpu_train())


@register_preset("gated-deltanet-debug", "gated-deltanet", "Gated DeltaNet (Mamba-2 style decay), debug size")
def _gated_deltanet_debug() -> RunConfig:
    return RunConfig(model=deltanet(64, 2, 4, 263, gated=True, chunk=16), train=_debug_train())


@register_preset("gated-deltanet-34m", "gated-deltanet", "Gated DeltaNet, d512 L8 H8, vocab 16384 "
                 "(36,299,968 parameters)")
def _gated_deltanet_34m() -> RunConfig:
    return RunConfig(model=deltanet(512, 8, 8, 16384, gated=True), train=_gpu_train())


# ---------------------------------------------------------------------------------------------------- HOPE / Onyx


def onyx(d: int, n_layers: int, heads: int, kv_heads: int, d_ff: int, vocab: int, *, read: str = "attention",
         chunk: int = 64, head_dim: int = 64) -> ModelConfig:
    """Onyx (SPEC.md): HOPE mixers (Hope attention by default) with GQA, RoPE base 5e5, RMSNorm, tied embeddings,
    and CMS feed-forwards (the seed's "CMS FFN": three SwiGLU levels, each d_ff wide, updated every 1 / 4 / 16
    optimizer steps with their summed gradients)."""
    layers = [HopeConfig(read=read, n_kv_heads=kv_heads, head_dim=head_dim, chunk_size=chunk) for _ in range(n_layers)]
    return ModelConfig(vocab_size=vocab, d_model=d, n_heads=heads, layers=layers, norm="rmsnorm", mlp="cms",
                       cms_levels=[1, 4, 16], d_ff=d_ff, position="rope", rope_base=5e5,
                       max_seq_len=4096, tie_embeddings=True)


def _onyx_train(**kw) -> TrainConfig:
    return _gpu_train(**({"optimizer": "m3", "seq_len": 4096, "batch_size": 8} | kw))


@register_preset("onyx-11m", "onyx", "Onyx: 6 HOPE-attention layers, d384, 6 query / 2 KV heads of 64, CMS "
                 "feed-forwards of 3 × 432 (periods 1/4/16), context 4096, vocab 16384 — 11,130,264 non-embedding "
                 "parameters (17,421,720 in all)")
def _onyx_11m() -> RunConfig:
    return RunConfig(model=onyx(384, 6, 6, 2, 432, 16384), train=_onyx_train())


@register_preset("onyx-16m", "onyx", "Onyx growth target: d384, 8 layers, CMS 3 × 480 — 16,167,328 "
                 "non-embedding parameters (22,458,784 in all)")
def _onyx_16m() -> RunConfig:
    return RunConfig(model=onyx(384, 8, 6, 2, 480, 16384), train=_onyx_train())


@register_preset("onyx-24m", "onyx", "Onyx growth target: d512, 8 layers, 8 query / 2 KV heads, CMS 3 × 512 — "
                 "23,738,912 non-embedding parameters (32,127,520 in all)")
def _onyx_24m() -> RunConfig:
    return RunConfig(model=onyx(512, 8, 8, 2, 512, 16384), train=_onyx_train())


@register_preset("onyx-debug", "onyx", "Onyx (HOPE attention, GQA 4/2), debug size")
def _onyx_debug() -> RunConfig:
    return RunConfig(model=onyx(64, 2, 4, 2, 128, 263, chunk=16, head_dim=16), train=_debug_train())


@register_preset("hope-debug", "hope", "HOPE with the memory read (o = M_mem q), debug size")
def _hope_debug() -> RunConfig:
    return RunConfig(model=onyx(64, 2, 4, 4, 128, 263, read="memory", chunk=16, head_dim=16), train=_debug_train())


# ------------------------------------------------------------------------------------ Infini-attention / Pythia


def infini_pythia(d: int, n_pythia: int, heads: int, vocab: int, *, segment: int, multi: int = 1,
                  hier: int = 0) -> ModelConfig:
    """Infini-Pythia: one Infini-attention layer (NoPE, compressive memory) first, then Pythia layers."""
    cfg = pythia(d, n_pythia, heads, vocab)
    infini = CompressiveConfig(segment_size=segment, multi_memory=multi, hierarchical=hier, bias=True)
    cfg.layers = [infini, *cfg.layers]
    return cfg


@register_preset("infini-pythia-70m", "infini-pythia", "Infini layer + 5 Pythia layers, d512 H8, segment 512, "
                 "vocab 50304 (70,426,632 parameters)")
def _infini_pythia_70m() -> RunConfig:
    return RunConfig(model=infini_pythia(512, 5, 8, 50304, segment=512), train=_gpu_train(tbptt=True))


@register_preset("infini-pythia-70m-multi4", "infini-pythia", "Infini-Pythia with 4 memories per head (round-robin "
                 "writes, content-match reads) (70,426,640 parameters)")
def _infini_pythia_70m_multi4() -> RunConfig:
    return RunConfig(model=infini_pythia(512, 5, 8, 50304, segment=512, multi=4), train=_gpu_train(tbptt=True))


@register_preset("infini-pythia-70m-hier4", "infini-pythia", "Infini-Pythia with 4 fine memories + a coarse sum and "
                 "an expansion gate (70,430,744 parameters)")
def _infini_pythia_70m_hier4() -> RunConfig:
    return RunConfig(model=infini_pythia(512, 5, 8, 50304, segment=512, hier=4), train=_gpu_train(tbptt=True))


@register_preset("infini-pythia-70m-debug", "infini-pythia", "Infini layer + 1 Pythia layer, debug size")
def _infini_pythia_debug() -> RunConfig:
    return RunConfig(model=infini_pythia(64, 1, 4, 263, segment=16), train=_debug_train())


@register_preset("infini-pythia-70m-multi4-debug", "infini-pythia", "Infini-Pythia multi-memory (4), debug size")
def _infini_pythia_multi4_debug() -> RunConfig:
    return RunConfig(model=infini_pythia(64, 1, 4, 263, segment=16, multi=4), train=_debug_train())


@register_preset("infini-pythia-70m-hier4-debug", "infini-pythia", "Infini-Pythia hierarchical (4), debug size")
def _infini_pythia_hier4_debug() -> RunConfig:
    return RunConfig(model=infini_pythia(64, 1, 4, 263, segment=16, hier=4), train=_debug_train())
