"""What the Triton backends share: the optional import (``triton`` and ``tl`` are None without Triton, so the backends
report unsupported and never call their kernels), the interpreter switch and its loop bounds."""
from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the backends report unsupported and never call their kernels
    triton = None
    tl = None

__all__ = ["interpreting", "loop_count", "tl", "triton"]


def interpreting() -> bool:
    """True when the kernels may run on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def loop_count(n: int, interpret: bool):
    """A loop bound for a kernel. The Triton 3.6 interpreter turns int arguments into 1-element arrays, and NumPy ≥ 2.4
    refuses int() of those, which breaks `range(N)`; a 0-d array converts, so the interpreter gets one."""
    if not interpret:
        return n
    import numpy as np
    from triton.runtime.interpreter import TensorHandle
    return tl.tensor(TensorHandle(np.array(n, dtype=np.int32), tl.int32), tl.int32)
