"""memlm — language models that remember.

    import memlm
    cfg = memlm.preset("transformer-debug")
    model = memlm.build_model(cfg)
    logits, state = model(input_ids, state=None)
"""
from __future__ import annotations

__version__ = "0.1.0"

import memlm.layers  # noqa: F401  (registers every mixer)
from memlm.config.model import ModelConfig
from memlm.config.presets import list_presets, preset
from memlm.config.train import RunConfig, TrainConfig
from memlm.errors import UserError
from memlm.models.lm import MemoryLM, load_model
from memlm.models.state import ModelState


def build_model(cfg: "RunConfig | ModelConfig | str", *, device=None) -> MemoryLM:
    """Build a freshly initialised model from a preset name, a RunConfig or a ModelConfig."""
    if isinstance(cfg, str):
        cfg = preset(cfg)
    if isinstance(cfg, RunConfig):
        cfg = cfg.model
    model = MemoryLM(cfg)
    return model.to(device) if device is not None else model


def load_tokenizer(name_or_path: str = "byte"):
    from memlm.data.tokenizer import load_tokenizer as _load

    return _load(name_or_path)


def generate(model, tokenizer, prompt, **kwargs):
    """Stream generated text pieces for ``prompt`` (see memlm.inference.engine.generate)."""
    from memlm.inference.engine import generate as _generate

    return _generate(model, tokenizer, prompt, **kwargs)


__all__ = ["ModelConfig", "RunConfig", "TrainConfig", "UserError", "MemoryLM", "ModelState", "build_model",
           "load_model", "load_tokenizer", "generate", "list_presets", "preset"]
