"""Preset registry: named functions returning a full RunConfig. Every family has a ``<family>-debug`` size
(< 1M parameters, seconds on CPU). Layer files of later families register their presets here too.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from memlm.config.model import ModelConfig
from memlm.config.train import RunConfig, TrainConfig
from memlm.errors import UserError
from memlm.layers.attention import AttentionConfig
from memlm.layers.base import MixerConfig


@dataclass
class PresetEntry:
    fn: Callable[[], RunConfig]
    family: str
    description: str


PRESETS: dict[str, PresetEntry] = {}


def register_preset(name: str, family: str, description: str = ""):
    def deco(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
        if name in PRESETS:
            raise ValueError(f"preset {name!r} registered twice")
        PRESETS[name] = PresetEntry(fn, family, description)
        return fn

    return deco


def list_presets() -> list[str]:
    _load_all()
    return sorted(PRESETS)


def preset(name: str) -> RunConfig:
    """The RunConfig of preset ``name`` (a fresh object each call)."""
    _load_all()
    if name not in PRESETS:
        near = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else "; `memlm presets` lists them"
        raise UserError(f"unknown preset {name!r}{hint}")
    e = PRESETS[name]
    cfg = e.fn()
    cfg.family, cfg.description = e.family, e.description
    cfg.model.name = name
    return cfg


def pattern(spec: str, legend: dict[str, Callable[[], MixerConfig]]) -> list[MixerConfig]:
    """Expand a layer pattern like ``"DDDA"`` with a legend {"D": make_delta, "A": make_attention}."""
    try:
        return [legend[ch]() for ch in spec]
    except KeyError as e:
        raise ValueError(f"pattern {spec!r}: letter {e.args[0]!r} not in legend {sorted(legend)}") from None


def _load_all() -> None:
    # Presets of every family are registered when their layer modules are imported.
    import memlm.config.preset_families  # noqa: F401


# ------------------------------------------------------------------------------------------------ baselines

def _debug_train(**kw) -> TrainConfig:
    base = dict(seq_len=128, batch_size=8, steps=200, lr=3e-3, warmup=20, eval_every=50, eval_batches=4,
                sample_every=100, save_every=100, val_every_doc=10)  # small corpora (49 books) still hold some out
    return TrainConfig(**(base | kw))


def _gpu_train(**kw) -> TrainConfig:
    base = dict(seq_len=2048, batch_size=16, steps=5000, lr=1e-3, warmup=200, tokenizer="byte")
    return TrainConfig(**(base | kw))


def transformer(d: int, n_layers: int, heads: int, kv_heads: int, vocab: int, *, window: int | None = None,
                **kw) -> ModelConfig:
    """Llama-style: RMSNorm, SwiGLU, RoPE, GQA, tied embeddings."""
    layers = [AttentionConfig(n_kv_heads=kv_heads, window=window) for _ in range(n_layers)]
    return ModelConfig(vocab_size=vocab, d_model=d, n_heads=heads, layers=layers, **kw)


@register_preset("transformer-debug", "transformer", "Llama-style baseline, debug size")
def _transformer_debug() -> RunConfig:
    return RunConfig(model=transformer(64, 2, 4, 2, 263), train=_debug_train())


@register_preset("transformer-34m", "transformer", "Llama-style, d512 L8 H8, vocab 16384 (the benchmark shape)")
def _transformer_34m() -> RunConfig:
    return RunConfig(model=transformer(512, 8, 8, 8, 16384), train=_gpu_train())


@register_preset("transformer-100m", "transformer", "Llama-style, d768 L12 H12, vocab 16384")
def _transformer_100m() -> RunConfig:
    return RunConfig(model=transformer(768, 12, 12, 12, 16384), train=_gpu_train(lr=6e-4))


@register_preset("transformer-swa-debug", "transformer-swa", "sliding-window (64) Llama-style, debug size")
def _transformer_swa_debug() -> RunConfig:
    return RunConfig(model=transformer(64, 2, 4, 2, 263, window=64), train=_debug_train())


@register_preset("transformer-swa-34m", "transformer-swa", "sliding-window (512) Llama-style, d512 L8 H8")
def _transformer_swa_34m() -> RunConfig:
    return RunConfig(model=transformer(512, 8, 8, 8, 16384, window=512), train=_gpu_train())


def nyx(d: int, n_layers: int, heads: int) -> ModelConfig:
    """NYX (SPEC.md): PaLM parallel block with one norm, multi-query attention, XPOS, SwiGLU ×4, bytes, tied."""
    layers = [AttentionConfig(n_kv_heads=1) for _ in range(n_layers)]
    return ModelConfig(vocab_size=256, d_model=d, n_heads=heads, layers=layers, residual="parallel",
                       position="xpos", mlp="swiglu", d_ff=4 * d, norm="rmsnorm", tie_embeddings=True)


@register_preset("nyx-30m", "nyx", "NYX: parallel block, MQA, XPOS, byte vocabulary 256 — 30,020,096 parameters")
def _nyx_30m() -> RunConfig:
    return RunConfig(model=nyx(512, 8, 8), train=_gpu_train(tokenizer="byte256", lr=3e-4, optimizer="lion",
                                                             weight_decay=1.0))


@register_preset("nyx-debug", "nyx", "NYX block, debug size")
def _nyx_debug() -> RunConfig:
    return RunConfig(model=nyx(64, 2, 4), train=_debug_train(tokenizer="byte256"))


def pythia(d: int, n_layers: int, heads: int, vocab: int) -> ModelConfig:
    """GPT-NeoX / Pythia: parallel residual with two LayerNorms, rotary on 25 %, GELU ×4 with biases, untied head."""
    layers = [AttentionConfig(bias=True) for _ in range(n_layers)]
    return ModelConfig(vocab_size=vocab, d_model=d, n_heads=heads, layers=layers, residual="parallel2",
                       norm="layernorm", mlp="gelu", mlp_bias=True, position="rope", rope_fraction=0.25,
                       tie_embeddings=False)


@register_preset("pythia-70m", "pythia", "Pythia-70m shape: d512 L6 H8, vocab 50304 (70,426,624 parameters)")
def _pythia_70m() -> RunConfig:
    return RunConfig(model=pythia(512, 6, 8, 50304), train=_gpu_train())


@register_preset("pythia-debug", "pythia", "Pythia layer, debug size")
def _pythia_debug() -> RunConfig:
    return RunConfig(model=pythia(64, 2, 4, 263), train=_debug_train())
