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
                     newton_schulz5_gram, poly_features)
from .parallel import memory_read, neural_memory, omega_grad
from .reference import neural_memory_reference

__all__ = ["neural_memory", "neural_memory_reference", "NeuralMemoryState", "Pending", "empty_pending",
           "feature_dim", "poly_features", "newton_schulz5", "newton_schulz5_gram", "NS5_COEFFS", "omega_grad",
           "memory_read", "TRITON_PRIORITY", "triton_memory"]

# Above 0: the CUDA default. tests/ops/test_neural_memory_triton.py passed on an H100 with Triton 3.6 on 2026-11-22
# (outputs, fast weights and every gradient against the chunked form). Below 0: by name only (layer
# backend="triton", force_backend, MEMLM_BACKEND_NEURAL_MEMORY=triton). CPU tensors never pick it automatically.
TRITON_PRIORITY = 10

dispatch.register("neural_memory", "chunked", neural_memory, priority=0)
dispatch.register("neural_memory", "reference", neural_memory_reference, priority=-10)
dispatch.register("neural_memory", "triton", triton_memory.neural_memory, supports=triton_memory.supports,
                  priority=TRITON_PRIORITY, auto=dispatch.on_cuda)
