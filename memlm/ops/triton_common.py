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

__all__ = ["Relauncher", "interpreting", "loop_count", "tl", "triton"]


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


class Relauncher:
    """``kernel[grid](*args, **kw)`` for a launch sequence in which nothing the JIT specialises on changes — a chunk
    loop: the same dtypes, constexprs and launch options, pointers at the same 16-byte alignment, integers that differ
    only where the kernel is built with ``do_not_specialize``. The first launch goes through Triton's JIT (compiles,
    specialises, finds the kernel); the later ones call that compiled kernel's launcher with the arguments bound in
    the same order, skipping the JIT's argument binding and cache lookup (H100, Triton 3.6: 30.5 → 10.3 µs of host
    time a launch). The caller vouches for the invariance. ``direct=False`` (the interpreter, code traced by
    torch.compile) launches through the JIT every time."""

    def __init__(self, kernel, grid: tuple[int, ...], direct: bool = True):
        self.kernel, self.grid, self.direct, self.compiled = kernel, tuple(grid) + (1,) * (3 - len(grid)), direct, None

    @property
    def pinned(self) -> bool:
        """True once launches go straight to the compiled kernel, on the stream current at the first launch (not
        the one current at the call)."""
        return self.compiled is not None

    def __call__(self, *args, **kw) -> None:
        if self.compiled is None or not self.direct:
            k = self.kernel[self.grid](*args, **kw)
            if self.direct:
                self.compiled = k.result() if hasattr(k, "result") else k
                self.names = self.kernel.arg_names[len(args):]     # the rest of the parameters, given by keyword
                from triton.runtime import driver
                self.stream = driver.active.get_current_stream(driver.active.get_current_device())
            return
        k, (g0, g1, g2) = self.compiled, self.grid
        bound = (*args, *(kw[n] for n in self.names))
        hooks = triton.knobs.runtime
        meta = k.launch_metadata(self.grid, self.stream, *bound) if hooks.launch_enter_hook is not None else None
        k.run(g0, g1, g2, self.stream, k.function, k.packed_metadata, meta, hooks.launch_enter_hook,
              hooks.launch_exit_hook, *bound)
