"""Imports every module that registers presets: baselines live in presets.py, each memory family in its own
``memlm/config/presets_<family>.py`` (found automatically, so a new family only adds a file)."""
from __future__ import annotations

import importlib
import pkgutil

import memlm.config
import memlm.layers  # noqa: F401  (registers mixers)

for _info in pkgutil.iter_modules(memlm.config.__path__):
    if _info.name.startswith("presets_"):
        importlib.import_module(f"memlm.config.{_info.name}")
