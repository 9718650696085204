"""Data: tokenizers, document sources, chat template, packing, shards, synthetic tasks, the demo corpus.

Submodules import torch/numpy/tokenizers lazily where they can; `demo_corpus_path` needs nothing.
"""
from __future__ import annotations

from pathlib import Path

DEMO_CORPUS = "books-demo.jsonl.xz"


def demo_corpus_path() -> str:
    """Path of the bundled public-domain demo corpus (JSON lines, xz; fields text/title/source)."""
    return str(Path(__file__).resolve().parent / "demo" / DEMO_CORPUS)
