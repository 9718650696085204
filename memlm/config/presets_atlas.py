"""Atlas-MAG and Titans-MAG presets (SPEC.md, Atlas-MAG): every layer is a MAG block — sliding-window attention
with persistent memory tokens, gated by a neural memory that learns at test time.

atlas-mag-*: Omega rule with the Muon inner optimizer and degree-2 polynomial features (Atlas).
titans-mag-*: the same block with the Titans inner optimizer (momentum + forgetting, no polynomial features).
Both write once per chunk of C = 64 tokens on the Omega objective over the whole chunk (omega_window = C): with one
step per chunk this is Titans' per-token surprise accumulated over the chunk, each token weighted by its gate γ.

The attention-only ablation of any of them is one flag: ``--set model.memory_off=true``.
Memory shapes: H memory heads of width K = 32 (Atlas: E = 2K = 64 hidden, F = 560 poly features; Titans: E = 4K).
"""
from __future__ import annotations

from memlm.config.model import ModelConfig
from memlm.config.presets import _debug_train, _gpu_train, register_preset
from memlm.config.train import RunConfig
from memlm.layers.neural_memory import MAGConfig, MALConfig, NeuralMemoryConfig

ATLAS = {"optimizer": "muon", "poly": True, "expansion": 2.0}
TITANS = {"optimizer": "momentum", "poly": False, "expansion": 4.0}


def mag_model(d: int, n_layers: int, heads: int, vocab: int, *, style: dict, kind: str = "mag", mem_head_dim: int = 32,
              chunk: int = 64, window: int = 512, n_persistent: int = 16, **layer_kw) -> ModelConfig:
    """Llama-style stack (RMSNorm, SwiGLU, RoPE, tied embeddings) whose every mixer is a MAG (or MAL) block."""
    cls = {"mag": MAGConfig, "mal": MALConfig}[kind]
    layers = [cls(head_dim=mem_head_dim, chunk_size=chunk, window=window, n_persistent=n_persistent,
                  **style, **layer_kw) for _ in range(n_layers)]
    return ModelConfig(vocab_size=vocab, d_model=d, n_heads=heads, layers=layers)


SIZES = {"tiny": (384, 6, 6), "small": (512, 6, 8), "medium": (512, 8, 8), "base": (768, 12, 12)}
GPU_POLAR = {"polar_weight": 0.01, "polar_warmup": 200, "polar_hold": 1000, "polar_decay": 1000}
DEBUG = {"mem_head_dim": 16, "chunk": 16, "window": 32, "n_persistent": 4, "polar_weight": 0.01, "polar_warmup": 20,
             "polar_hold": 50, "polar_decay": 50}


def _register(family: str, style: dict, desc: str) -> None:
    for size, (d, n, h) in SIZES.items():
        name = f"{family}-{size}"

        @register_preset(name, family, f"{desc}, d{d} L{n} H{h}, SWA 512 + 16 persistent tokens, vocab 16384")
        def _fn(d=d, n=n, h=h) -> RunConfig:
            return RunConfig(model=mag_model(d, n, h, 16384, style=style, **GPU_POLAR), train=_gpu_train())

    @register_preset(f"{family}-debug", family, f"{desc}, debug size (chunk 16, SWA 32)")
    def _debug() -> RunConfig:
        return RunConfig(model=mag_model(64, 2, 4, 263, style=style, **DEBUG), train=_debug_train())


_register("atlas-mag", ATLAS, "Atlas-MAG: SWA ⊙ σ(Omega-rule memory, Muon inner optimizer, poly features)")
_register("titans-mag", TITANS, "Titans-MAG: SWA ⊙ σ(neural memory, momentum inner optimizer)")


@register_preset("atlas-mal-debug", "atlas-mal", "Atlas memory as a layer (memory, then SWA), debug size")
def _atlas_mal_debug() -> RunConfig:
    kw = {k: v for k, v in DEBUG.items() if not k.startswith("polar")}
    return RunConfig(model=mag_model(64, 2, 4, 263, style=ATLAS, kind="mal", **kw), train=_debug_train())


@register_preset("titans-lmm-debug", "titans-lmm", "Titans long-term memory alone (neural_memory mixer), debug size")
def _titans_lmm_debug() -> RunConfig:
    layers = [NeuralMemoryConfig(head_dim=16, chunk_size=16, **TITANS) for _ in range(2)]
    return RunConfig(model=ModelConfig(vocab_size=263, d_model=64, n_heads=4, layers=layers, position="none"),
                     train=_debug_train())
