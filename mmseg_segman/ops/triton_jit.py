"""``triton.jit`` for kernels whose sizes and strides stay runtime values, when a Triton
backend needs its autograd wrapper, and the precision of float32 products."""
import inspect
from typing import Callable, Collection, Optional

import torch
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


def records_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd records an op on ``tensors`` (``None`` allowed): where it does not
    (inference), a backend launches its kernel without an ``autograd.Function`` around it."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for products of ``dtype`` as PyTorch's matmuls make them:
    float32-accurate (three TF32 products on the tensor cores, ``tf32x3``) unless TF32 is
    allowed; ignored for 16-bit inputs."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == 'highest':
        return 'tf32x3'
    return 'tf32'
