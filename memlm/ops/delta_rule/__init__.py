"""(Gated) delta rule: S_t = α_t S_{t-1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t.

Notation: S state [Dv, Dk]; α = exp(g) decay; β write strength; q, k, v query/key/value.

Backends (memlm.ops.dispatch, op name "delta_rule"): "chunked" (WY/UT chunkwise form, default),
"triton" (chunked with the state recurrence as Triton kernels; CUDA, or CPU under TRITON_INTERPRET=1; opt-in
while TRITON_PRIORITY < 0), "reference" (token loop, by name only). `delta_rule(...)` below dispatches; call a
module directly to pin one.
"""
from __future__ import annotations

from torch import Tensor

from .. import dispatch
from . import chunked, reference, triton_impl
from .reference import delta_rule_step

__all__ = ["TRITON_PRIORITY", "chunked", "delta_rule", "delta_rule_step", "reference", "triton_impl"]

# Negative = only by name (backend="triton" / MEMLM_BACKEND_DELTA_RULE=triton). Raise above 0 to make it the CUDA
# default once tests/ops/test_delta_rule_triton.py passes on the GPU (Hopper miscompiled some delta-rule backward
# kernels with Triton < 3.7.1).
TRITON_PRIORITY = -50

dispatch.register("delta_rule", "chunked", chunked.delta_rule, priority=0)
dispatch.register("delta_rule", "triton", triton_impl.delta_rule, supports=triton_impl.supports,
                  priority=TRITON_PRIORITY)
dispatch.register("delta_rule", "reference", reference.delta_rule, priority=-100)


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
               initial_state: Tensor | None = None, reset: Tensor | None = None, chunk_size: int = 64,
               scale: float | None = None, output_final_state: bool = True, backend: str | None = None
               ) -> tuple[Tensor, Tensor | None]:
    """Dispatching entry point. q, k [B, T, H, Dk]; v [B, T, H, Dv]; beta, g [B, T, H]; initial_state
    [B, H, Dv, Dk]; reset bool [B, T] -> (o [B, T, H, Dv] in q's dtype, final state [B, H, Dv, Dk] float32).
    See reference.delta_rule for the semantics; `backend` names one explicitly (else dispatch decides)."""
    args = (q, k, v, beta, g)
    kwargs = {"initial_state": initial_state, "reset": reset, "chunk_size": chunk_size, "scale": scale,
              "output_final_state": output_final_state}
    return dispatch.get("delta_rule", backend, args=args, kwargs=kwargs)(*args, **kwargs)
