"""Imports every module that registers presets (baselines live in presets.py; memory families add theirs here)."""
from __future__ import annotations

import importlib

import memlm.layers  # noqa: F401  (registers mixers)

FAMILY_MODULES = ("memlm.config.presets_memory",)

for _m in FAMILY_MODULES:
    try:
        importlib.import_module(_m)
    except ModuleNotFoundError as e:
        if e.name != _m:
            raise
