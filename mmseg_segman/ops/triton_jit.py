"""``triton.jit`` for kernels whose sizes and strides stay runtime values."""
import inspect
from typing import Callable, Collection

import triton


def jit_with_runtime_ints(runtime_ints: Collection[str]) -> Callable:
    """``triton.jit`` that does not specialise the kernel on the int arguments named in
    ``runtime_ints``. Triton otherwise specialises every int argument on being 1, a multiple
    of 16 or neither, and compiles the kernel again when that changes: for sizes and the
    strides that follow them, at new input sizes."""

    def decorate(fn: Callable):
        names = [name for name in inspect.signature(fn).parameters if name in runtime_ints]
        return triton.jit(do_not_specialize=names)(fn)

    return decorate
