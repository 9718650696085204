"""Importing this module registers every mixer family (each layer file registers itself on import)."""
from __future__ import annotations

import importlib

from memlm.layers.base import MIXERS, MixerConfig, build_mixer

# One module per layer family; optional families that are not written yet are skipped quietly.
FAMILIES = ("attention", "sparse_attention", "delta", "compressive", "hope", "neural_memory", "ssm", "conv", "moop",
            "retrieval")

for _name in FAMILIES:
    try:
        importlib.import_module(f"memlm.layers.{_name}")
    except ModuleNotFoundError as e:
        if e.name != f"memlm.layers.{_name}":
            raise

__all__ = ["MIXERS", "MixerConfig", "build_mixer"]
