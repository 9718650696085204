"""(Gated) delta rule: S_t = α_t S_{t-1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t.

Notation: S state [Dv, Dk]; α = exp(g) decay; β write strength; q, k, v query/key/value.

Backends (memlm.ops.dispatch, op name "delta_rule"): "chunked" (WY/UT chunkwise form, default),
"triton" (the CUDA default: the whole chunk pipeline in Triton for bf16/fp16 (triton_fused.py), else chunked with
the state recurrence as Triton kernels; CPU only under TRITON_INTERPRET=1), "reference" (token loop, by name only). `delta_rule(...)` below dispatches; call a
module directly to pin one.
"""
from __future__ import annotations

from torch import Tensor

from .. import dispatch
from . import chunked, reference, triton_fused, triton_impl
from .reference import delta_rule_step

__all__ = ["TRITON_PRIORITY", "chunked", "delta_rule", "delta_rule_step", "reference", "triton_fused", "triton_impl"]

# Above 0: the CUDA default. tests/ops/test_delta_rule_triton.py (101 tests: outputs, states, every gradient, fp32 and
# bf16, awkward lengths, resets) passed on an H100 with Triton 3.6 on 2026-11-22 (Hopper miscompiled some delta-rule
# backward kernels elsewhere with Triton < 3.7.1, so this is re-checked on every new Triton). Set it below 0 to make
# the backend by-name only. CPU tensors never pick it automatically (auto=on_cuda; the interpreter is for tests).
TRITON_PRIORITY = 10

dispatch.register("delta_rule", "chunked", chunked.delta_rule, priority=0)
dispatch.register("delta_rule", "triton", triton_impl.delta_rule, supports=triton_impl.supports,
                  priority=TRITON_PRIORITY, auto=dispatch.on_cuda)
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
