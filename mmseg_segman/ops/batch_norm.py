"""Batch norm of a ``(B, C, H, W)`` map in training mode, then an activation: LASS's
``silu(bn(dwconv(y)))``, the stem's and the downsampling convolutions' norms (GELU between
the stem's) and the decode head's ``ConvModule`` norms (ReLU) while they train.

The batch's statistics normalise the map and the running ones are updated in place (``running
= (1 - momentum) running + momentum batch``, the variance unbiased), as ``nn.BatchNorm2d``
does in training mode. Backends: ``triton`` (:mod:`.triton_batch_norm`: two passes over the
map forward, two backward, the activation in them, on CUDA, eager or compiled) and ``torch``
(``F.batch_norm`` then the activation: what the modules run). PyTorch's kernels reduce each
channel in one block, which left most of an H100 idle where a map has few channels: SegMAN-L's
first stage (96 channels) spent 0.37 ms a block in them and the activation, about ten times
the time its traffic takes (docs/benchmarks.md). An eval-mode batch norm runs in the
convolution before it (:class:`~.depthwise_conv.RunningBatchNorm`).
"""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .dispatch import (Backend, OpDispatcher, planes_contiguous, runs_anywhere,
                       triton_float_unavailable)

ACTIVATIONS = {None: lambda x: x, 'silu': F.silu, 'gelu': F.gelu, 'relu': F.relu}


def trains_with_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a batch norm whose forward :func:`batch_norm_2d` does: PyTorch's
    own ``_BatchNorm`` forward (not ``SyncBatchNorm``'s, whose statistics span the processes,
    nor another override), in training mode, affine, with running statistics and a momentum
    (``momentum=None``, a cumulative average, reads the batch count on the host)."""
    return (isinstance(module, _BatchNorm) and type(module).forward is _BatchNorm.forward
            and module.training and module.affine and module.track_running_stats
            and module.momentum is not None)


def _batch_norm_2d_torch(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor,
                         running_var: Tensor, momentum: float, eps: float,
                         activation: Optional[str]) -> Tensor:
    return ACTIVATIONS[activation](
        F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps))


def _triton_unavailable(x: Tensor, *args) -> Optional[str]:
    reason = triton_float_unavailable(x)
    if reason is None and not planes_contiguous(x):
        return f'its H x W planes are not contiguous (strides {tuple(x.stride())})'
    return reason


def _batch_norm_2d_triton(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor,
                          running_var: Tensor, momentum: float, eps: float,
                          activation: Optional[str]) -> Tensor:
    from .triton_batch_norm import batch_norm_2d_triton

    return batch_norm_2d_triton(x, weight, bias, running_mean, running_var, momentum, eps,
                                activation)


_batch_norm_2d = OpDispatcher('batch_norm_2d', {
    'triton': Backend(_batch_norm_2d_triton, _triton_unavailable),
    'torch': Backend(_batch_norm_2d_torch, runs_anywhere),
})


def batch_norm_2d(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor,
                  running_var: Tensor, momentum: float = 0.1, eps: float = 1e-5,
                  activation: Optional[str] = None) -> Tensor:
    """Training-mode batch norm of ``x (B, C, H, W)`` by its statistics over ``(B, H, W)``,
    ``weight``, ``bias`` ``(C,)``; ``running_mean``, ``running_var`` ``(C,)`` updated in place
    by ``momentum``; then ``activation`` (None, ``'silu'``, ``'gelu'`` (exact) or ``'relu'``).
    Returns ``(B, C, H, W)`` in ``x``'s dtype. (The module's ``num_batches_tracked`` is the
    caller's, as in ``_BatchNorm.forward``.)"""
    if x.dim() != 4:
        raise ValueError(f'x must be (B, C, H, W), got {tuple(x.shape)}')
    channels = x.shape[1]
    shapes = [tuple(t.shape) for t in (weight, bias, running_mean, running_var)]
    if any(shape != (channels, ) for shape in shapes):
        raise ValueError(f'weight, bias, running_mean and running_var must be ({channels},), '
                         f'got {shapes}')
    if x.numel() // max(channels, 1) < 2:
        raise ValueError(f'a batch norm in training mode needs more than one value a channel, '
                         f'got x of shape {tuple(x.shape)}')
    if not isinstance(activation, (str, type(None))) or activation not in ACTIVATIONS:
        raise ValueError(f'activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}')
    return _batch_norm_2d(x, weight, bias, running_mean, running_var, momentum, eps, activation)
