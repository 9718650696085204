"""Neural memory (Titans / Atlas): an MLP memory held as per-sequence fast weights, written per chunk at test time.

`neural_memory` is the chunked PyTorch form (registered as backend "chunked" of op "neural_memory");
`neural_memory_reference` the token-by-token specification (backend "reference"); `triton_memory.neural_memory`
the chunk writes as Triton kernels (backend "triton": CUDA, or CPU under TRITON_INTERPRET=1; opt-in while
TRITON_PRIORITY < 0). See NOTES.md.
"""
from __future__ import annotations

from memlm.ops import dispatch

from . import triton_memory
from .common import (NS5_COEFFS, NeuralMemoryState, Pending, empty_pending, feature_dim, newton_schulz5,
                     poly_features)
from .parallel import memory_read, neural_memory, omega_grad
from .reference import neural_memory_reference

__all__ = ["neural_memory", "neural_memory_reference", "NeuralMemoryState", "Pending", "empty_pending",
           "feature_dim", "poly_features", "newton_schulz5", "NS5_COEFFS", "omega_grad", "memory_read",
           "TRITON_PRIORITY", "triton_memory"]

# Negative = only by name (layer backend="triton", force_backend, MEMLM_BACKEND_NEURAL_MEMORY=triton). Raise above 0
# to make it the CUDA default once tests/ops/test_neural_memory_triton.py passes on the GPU (unverified kernels:
# Triton 3.6 on Hopper has miscompiled delta-rule-like backward kernels).
TRITON_PRIORITY = -50

dispatch.register("neural_memory", "chunked", neural_memory, priority=0)
dispatch.register("neural_memory", "reference", neural_memory_reference, priority=-10)
dispatch.register("neural_memory", "triton", triton_memory.neural_memory, supports=triton_memory.supports,
                  priority=TRITON_PRIORITY)
