"""Depthwise ``k x k`` convolution of a ``(B, C, H, W)`` map, stride 1, ``k // 2`` padding
(the SegMAN blocks' positional encodings, ``lepe``, the LASS and FFN depthwise convs).

Backends: ``triton`` (:mod:`.triton_depthwise_conv`: one kernel in the map's layout, no
per-shape plan, on CUDA, eager or compiled) and ``torch`` (``F.conv2d``).
"""
from typing import NamedTuple, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import (Backend, OpDispatcher, autocast_dtype, triton_float_unavailable,
                       promote_types, runs_anywhere, with_contiguous_planes)

ACTIVATIONS = (None, 'silu')


class RunningBatchNorm(NamedTuple):
    """A batch norm by its running statistics (eval mode):
    ``(x - mean) / sqrt(var + eps) * weight + bias``, each tensor ``(C,)``."""
    mean: Tensor
    var: Tensor
    weight: Tensor
    bias: Tensor
    eps: float

    @classmethod
    def of(cls, norm: nn.modules.batchnorm._BatchNorm) -> 'RunningBatchNorm':
        return cls(norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)

    @classmethod
    def in_eval(cls, module: nn.Module) -> Optional['RunningBatchNorm']:
        """``module`` as a :class:`RunningBatchNorm` where it is an affine batch norm in eval
        mode with running statistics (what a convolution's op can apply), else None."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training \
                and module.track_running_stats and module.affine:
            return cls.of(module)
        return None

    def __call__(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.mean, self.var, self.weight, self.bias, False, 0.0, self.eps)


NO_NORM = (None, None, None, None, 0.0)  # a RunningBatchNorm's fields where there is no norm


def norm_and_activation(out: Tensor, norm: Optional[RunningBatchNorm],
                         activation: Optional[str]) -> Tensor:
    if norm is not None:
        out = norm(out)
    return F.silu(out) if activation == 'silu' else out


def _depthwise_conv2d_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: bool,
                            norm: Optional[RunningBatchNorm], activation: Optional[str]) -> Tensor:
    out = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    return norm_and_activation(x + out if residual else out, norm, activation)


def _triton_unavailable(x: Tensor, *args) -> Optional[str]:
    return triton_float_unavailable(x)


def _depthwise_conv2d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: bool,
                             norm: Optional[RunningBatchNorm], activation: Optional[str]) -> Tensor:
    from .triton_depthwise_conv import depthwise_conv2d_triton

    # the dtype F.conv2d's output has (autocast's), and x + that with the residual
    out_dtype = autocast_dtype(x)
    if residual:
        out_dtype = promote_types(x.dtype, out_dtype)
    return depthwise_conv2d_triton(with_contiguous_planes(x), weight, bias, residual, out_dtype,
                                   norm, activation)


_depthwise_conv2d = OpDispatcher('depthwise_conv2d', {
    'triton': Backend(_depthwise_conv2d_triton, _triton_unavailable),
    'torch': Backend(_depthwise_conv2d_torch, runs_anywhere),
})


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     residual: bool = False, norm: Optional[RunningBatchNorm] = None,
                     activation: Optional[str] = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)``, plus ``x`` if ``residual``,
    then ``norm`` and ``activation``.

    Args:
        x: ``(B, C, H, W)``.
        weight: ``(C, 1, k, k)``, ``k`` odd.
        bias: ``(C,)`` or None.
        residual: return ``x + conv(x)`` (one pass on the ``triton`` backend).
        norm: a batch norm in eval mode (:meth:`RunningBatchNorm.of`) applied to the result.
        activation: None or ``'silu'``, applied last. The ``triton`` backend applies the norm
            and the activation in the convolution's pass where autograd does not record.

    Returns:
        ``(B, C, H, W)``.
    """
    channels = x.shape[1] if x.dim() == 4 else None
    k = weight.shape[-1]
    if x.dim() != 4 or weight.shape != (channels, 1, k, k) or k % 2 == 0:
        raise ValueError(f'x must be (B, C, H, W) and weight (C, 1, k, k) with k odd, got '
                         f'{tuple(x.shape)} and {tuple(weight.shape)}')
    check_bias_norm_activation(channels, bias, norm, activation, ACTIVATIONS)
    return _depthwise_conv2d(x, weight, bias, residual, norm, activation)


def check_bias_norm_activation(channels: int, bias: Optional[Tensor],
                               norm: Optional[RunningBatchNorm], activation: Optional[str],
                               activations: Tuple[Optional[str], ...]) -> None:
    """Refuse a bias or a norm that is not ``(channels,)``, or an activation not in
    ``activations``, with an error that names it (a convolution op's epilogue)."""
    if bias is not None and bias.shape != (channels, ):
        raise ValueError(f'bias must be ({channels},), got {tuple(bias.shape)}')
    if norm is not None and any(t.shape != (channels, ) for t in norm[:4]):
        raise ValueError(f'the norm\'s statistics and parameters must be ({channels},), got '
                         f'{[tuple(t.shape) for t in norm[:4]]}')
    if activation not in activations:
        raise ValueError(f'activation must be one of {activations}, got {activation!r}')
