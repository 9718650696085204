"""Compressive memory (Infini-attention) over document-aligned segments, and the chunk layout shared by every
memory that writes once per chunk (segments.py).

Backends (memlm.ops.dispatch, op name "compressive_memory"): "chunked" (one step per segment, default),
"triton" (the segment loop as Triton kernels; CUDA, or CPU under TRITON_INTERPRET=1; the CUDA default) and "reference" (token loop, by name only). `segment_memory(...)` dispatches.
"""
from __future__ import annotations

from torch import Tensor

from .. import dispatch
from . import chunked, reference, triton_segments
from .segments import ChunkLayout, chunk_layout, gather_chunks, gather_tokens, pending_tail

__all__ = ["TRITON_PRIORITY", "ChunkLayout", "chunk_layout", "chunked", "gather_chunks", "gather_tokens",
           "pending_tail", "reference", "segment_memory", "triton_segments"]

# tests/ops/test_compressive_triton.py passed on an H100 with Triton 3.6 (2026-11-22, twice), and at infini-pythia-70m's
# shapes (B 16, T 2048, segments of 512) forward + backward takes 3.88 ms against the chunked form's 8.05 ms
# (benchmarks/memory_kernels.py, docs/benchmarks.md): the CUDA default. CPU tensors never pick it (auto=on_cuda).
TRITON_PRIORITY = 10

dispatch.register("compressive_memory", "chunked", chunked.segment_memory, priority=0)
dispatch.register("compressive_memory", "triton", triton_segments.segment_memory, supports=triton_segments.supports,
                  priority=TRITON_PRIORITY, auto=dispatch.on_cuda)
dispatch.register("compressive_memory", "reference", reference.segment_memory, priority=-100)


def segment_memory(sq: Tensor, sk: Tensor, v: Tensor, *, M0: Tensor, z0: Tensor, write_slot: Tensor,
                   starts_doc: Tensor, complete: Tensor, delta: bool, eps: float = 1e-6, backend: str | None = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Dispatching entry point; see reference.segment_memory for shapes and semantics."""
    kwargs = {"M0": M0, "z0": z0, "write_slot": write_slot, "starts_doc": starts_doc, "complete": complete,
              "delta": delta, "eps": eps}
    return dispatch.get("compressive_memory", backend, args=(sq, sk, v), kwargs=kwargs)(sq, sk, v, **kwargs)
