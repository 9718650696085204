"""Data: tokenizers, document sources, chat template, packing, shards, synthetic tasks, the demo corpus.

Importing `memlm.data` itself is cheap (`demo_corpus_path` needs nothing); the submodules pull in numpy, torch and
tokenizers.
"""
from __future__ import annotations

from pathlib import Path

DEMO_CORPUS = "books-demo.jsonl.xz"


def demo_corpus_path() -> str:
    """Path of the bundled public-domain demo corpus (JSON lines, xz; fields text/title/source)."""
    return str(Path(__file__).resolve().parent / "demo" / DEMO_CORPUS)
