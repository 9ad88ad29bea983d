"""LayerNorm over the channels of a ``(B, C, H, W)`` map (the SegMAN blocks' norms).

Backends: ``triton`` (:mod:`.triton_layer_norm`: one kernel that reads and writes the map in
its own layout, on CUDA, eager or compiled) and ``torch`` (``F.layer_norm`` on a channels-last
view; on CUDA the result is made contiguous again so that the next layer's depthwise
convolutions stay on PyTorch's own kernels: cuDNN runs channels-last ones but builds a plan
for every new input shape, see docs/benchmarks.md).
"""
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor

from .dispatch import (Backend, OpDispatcher, autocast_dtype, triton_float_unavailable,
                       planes_contiguous, runs_anywhere)


def _layer_norm_2d_torch(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                        addends: Sequence[Tensor]) -> Tensor:
    out = F.layer_norm(x.permute(0, 2, 3, 1), weight.shape, weight, bias, eps).permute(0, 3, 1, 2)
    out = out.contiguous() if x.is_cuda else out
    for addend in addends:
        out = out + addend
    return out


def _triton_unavailable(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                        addends: Sequence[Tensor]) -> Optional[str]:
    """As :func:`triton_float_unavailable`, for maps whose ``H x W`` planes are contiguous,
    with at most two addends."""
    reason = triton_float_unavailable(x)
    if reason is not None:
        return reason
    if not planes_contiguous(x):
        return f'its H x W planes are not contiguous (strides {tuple(x.stride())})'
    if len(addends) > 2:
        return f'{len(addends)} addends (the kernel adds at most two)'
    return None


def _layer_norm_2d_triton(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                          addends: Sequence[Tensor]) -> Tensor:
    from .triton_layer_norm import layer_norm_2d_triton

    return layer_norm_2d_triton(x, weight, bias, eps, autocast_dtype(x), addends)


_layer_norm_2d = OpDispatcher('layer_norm_2d', {
    'triton': Backend(_layer_norm_2d_triton, _triton_unavailable),
    'torch': Backend(_layer_norm_2d_torch, runs_anywhere),
})


def layer_norm_2d(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6,
                  addends: Sequence[Tensor] = ()) -> Tensor:
    """LayerNorm over dim 1 of ``x (B, C, H, W)`` with ``weight``, ``bias`` ``(C,)``, plus
    the ``addends`` (maps of ``x``'s shape; added in the norm's pass on the ``triton``
    backend).

    Returns ``(B, C, H, W)``: float32 under autocast on the ``torch`` backend (as
    ``F.layer_norm``), the autocast dtype on the ``triton`` one (what the next layer reads).
    """
    if x.dim() != 4:
        raise ValueError(f'x must be (B, C, H, W), got {tuple(x.shape)}')
    if weight.shape != (x.size(1),) or bias.shape != (x.size(1),):
        raise ValueError(f'weight and bias must be ({x.size(1)},), got {tuple(weight.shape)} '
                         f'and {tuple(bias.shape)}')
    addends = tuple(addends)
    if any(a.shape != x.shape for a in addends):
        raise ValueError(f'addends must be {tuple(x.shape)} as x, got '
                         f'{[tuple(a.shape) for a in addends]}')
    return _layer_norm_2d(x, weight, bias, eps, addends)
