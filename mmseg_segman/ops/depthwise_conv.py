"""Depthwise ``k x k`` convolution of a ``(B, C, H, W)`` map, stride 1, ``k // 2`` padding
(the SegMAN blocks' positional encodings, ``lepe``, the LASS and FFN depthwise convs).

Backends: ``triton`` (:mod:`.triton_depthwise_conv`: one kernel in the map's layout, no
per-shape plan, for eager runs on CUDA) and ``torch`` (``F.conv2d``). Under
``torch.compile`` the reference runs.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import Backend, OpDispatcher, autocast_dtype, eager_triton_unavailable, runs_anywhere


def _depthwise_conv2d_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                            residual: bool) -> Tensor:
    out = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    return x + out if residual else out


def _triton_unavailable(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                        residual: bool) -> Optional[str]:
    return eager_triton_unavailable(x)


def _depthwise_conv2d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                             residual: bool) -> Tensor:
    from .triton_depthwise_conv import depthwise_conv2d_triton

    # the dtype F.conv2d's output has (autocast's), and x + that with the residual
    out_dtype = autocast_dtype(x)
    if residual:
        out_dtype = torch.promote_types(x.dtype, out_dtype)
    # each H x W plane contiguous (a channel slice of a contiguous map is)
    if x.stride(3) != 1 or x.stride(2) != x.size(3):
        x = x.contiguous()
    return depthwise_conv2d_triton(x, weight, bias, residual, out_dtype)


_depthwise_conv2d = OpDispatcher('depthwise_conv2d', {
    'triton': Backend(_depthwise_conv2d_triton, _triton_unavailable),
    'torch': Backend(_depthwise_conv2d_torch, runs_anywhere),
})


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     residual: bool = False) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)``, plus ``x`` if ``residual``.

    Args:
        x: ``(B, C, H, W)``.
        weight: ``(C, 1, k, k)``, ``k`` odd.
        bias: ``(C,)`` or None.
        residual: return ``x + conv(x)`` (one pass on the ``triton`` backend).

    Returns:
        ``(B, C, H, W)``.
    """
    channels = x.shape[1] if x.dim() == 4 else None
    k = weight.shape[-1]
    if x.dim() != 4 or weight.shape != (channels, 1, k, k) or k % 2 == 0:
        raise ValueError(f'x must be (B, C, H, W) and weight (C, 1, k, k) with k odd, got '
                         f'{tuple(x.shape)} and {tuple(weight.shape)}')
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f'bias must be ({channels},), got {tuple(bias.shape)}')
    return _depthwise_conv2d(x, weight, bias, residual)
