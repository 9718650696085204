"""Neural memory (Titans / Atlas): an MLP memory held as per-sequence fast weights, written per chunk at test time.

`neural_memory` is the chunked PyTorch form (registered as backend "chunked" of op "neural_memory");
`neural_memory_reference` the token-by-token specification (backend "reference"). See NOTES.md.
"""
from __future__ import annotations

from memlm.ops import dispatch

from .common import (NS5_COEFFS, NeuralMemoryState, Pending, empty_pending, feature_dim, newton_schulz5,
                     poly_features)
from .parallel import memory_read, neural_memory, omega_grad
from .reference import neural_memory_reference

__all__ = ["neural_memory", "neural_memory_reference", "NeuralMemoryState", "Pending", "empty_pending",
           "feature_dim", "poly_features", "newton_schulz5", "NS5_COEFFS", "omega_grad", "memory_read"]

dispatch.register("neural_memory", "chunked", neural_memory, priority=0)
dispatch.register("neural_memory", "reference", neural_memory_reference, priority=-10)
