"""HOPE's walk over a chunk grid (Onyx; memlm.layers.hope): produce every chunk's keys, values, step sizes and
targets from the chunk-start memory, then write the chunk (delta gradient descent in its parallel form).

Backends (memlm.ops.dispatch, op name "hope_scan"): "loop" (a PyTorch step per chunk, calling memlm.ops.delta_rule;
the CPU default) and "triton" (the whole walk as one kernel per direction; CUDA, or CPU under TRITON_INTERPRET=1; the
CUDA default, for the attention and the memory read). `hope_scan(...)` dispatches.
"""
from __future__ import annotations

from torch import Tensor

from .. import dispatch
from . import reference, triton_scan

__all__ = ["TRITON_PRIORITY", "hope_scan", "reference", "triton_scan"]

TRITON_PRIORITY = 10

dispatch.register("hope_scan", "loop", reference.hope_scan, priority=0)
dispatch.register("hope_scan", "triton", triton_scan.hope_scan, supports=triton_scan.supports,
                  priority=TRITON_PRIORITY, auto=dispatch.on_cuda)


def hope_scan(u: Tensor, q: Tensor | None, *, mem: Tensor, init: Tensor, eta_bias: Tensor, alpha_bias: Tensor,
              slot_valid: Tensor, starts_doc: Tensor, complete: Tensor, delta_backend: str | None = None,
              backend: str | None = None) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Dispatching entry point; see reference.hope_scan for shapes and semantics."""
    kwargs = {"mem": mem, "init": init, "eta_bias": eta_bias, "alpha_bias": alpha_bias, "slot_valid": slot_valid,
              "starts_doc": starts_doc, "complete": complete, "delta_backend": delta_backend}
    return dispatch.get("hope_scan", backend, args=(u, q), kwargs=kwargs)(u, q, **kwargs)
