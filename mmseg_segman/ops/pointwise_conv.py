"""1x1 convolution of a ``(B, C, H, W)`` map (the blocks' ``qkv``, ``proj`` and FFN
``fc1`` / ``fc2``).

Backends: ``matmul`` (one batched matrix product with the weight broadcast over the batch,
then the bias; cuBLAS picks its kernel per shape in microseconds, where cuDNN builds an
execution plan for every new input shape, about 2 ms for each of SegMAN-T's 60 convolutions
on an H100) and ``torch`` (``F.conv2d``). Under ``torch.compile`` the reference runs.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import Backend, OpDispatcher, autocast_dtype, runs_anywhere


def _pointwise_conv2d_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.conv2d(x, weight, bias)


def _matmul_unavailable(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[str]:
    if not x.is_cuda:
        return 'CUDA only (it avoids cuDNN\'s per-shape plans; the CPU runs F.conv2d well)'
    if torch.compiler.is_compiling():
        return 'under torch.compile the reference runs (inductor plans it)'
    return None


def _pointwise_conv2d_matmul(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    batch, channels, height, width = x.shape
    dtype = autocast_dtype(x)  # F.conv2d's compute dtype: autocast's, else x's
    w = weight.view(weight.shape[0], channels).to(dtype)
    out = torch.bmm(w.expand(batch, -1, -1), x.reshape(batch, channels, height * width).to(dtype))
    if bias is not None:
        out = out.add_(bias.view(-1, 1))
    return out.view(batch, -1, height, width)


_pointwise_conv2d = OpDispatcher('pointwise_conv2d', {
    'matmul': Backend(_pointwise_conv2d_matmul, _matmul_unavailable),
    'torch': Backend(_pointwise_conv2d_torch, runs_anywhere),
})


def pointwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.conv2d(x, weight, bias)`` with a 1x1 ``weight``.

    Args:
        x: ``(B, C, H, W)``.
        weight: ``(O, C, 1, 1)``.
        bias: ``(O,)`` or None.

    Returns:
        ``(B, O, H, W)``.
    """
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1:] != (x.shape[1], 1, 1):
        raise ValueError(f'x must be (B, C, H, W) and weight (O, C, 1, 1), got {tuple(x.shape)} '
                         f'and {tuple(weight.shape)}')
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f'bias must be ({weight.shape[0]},), got {tuple(bias.shape)}')
    return _pointwise_conv2d(x, weight, bias)
