"""Convolution of all input channels of a ``(B, C, H, W)`` map (one group, any kernel,
stride and zero padding), optionally followed by a batch norm in eval mode and a GELU or
ReLU: the encoder's stem and downsampling convolutions and the decoder's strided ones.

Backends: ``triton`` (:mod:`.triton_dense_conv`: one implicit matrix product, the norm and
the activation applied before the result is stored, no plan per input shape where cuDNN builds one
for every new shape, about 3 ms a convolution on an H100; CUDA, inference only: where
autograd records the call it declines) and ``torch`` (``F.conv2d``, then the norm and
``F.gelu``).
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .depthwise_conv import RunningBatchNorm, check_bias_norm_activation
from .dispatch import (Backend, OpDispatcher, autocast_dtype, runs_anywhere,
                       triton_float_unavailable)
from .triton_jit import records_autograd

ACTIVATIONS = (None, 'gelu', 'relu')
MEMORY_FORMATS = (None, torch.contiguous_format, torch.channels_last)
Pair = Union[int, Sequence[int]]


def _dense_conv2d_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Tuple[int, int],
                        padding: Tuple[int, int], norm: Optional[RunningBatchNorm],
                        activation: Optional[str],
                        memory_format: Optional[torch.memory_format]) -> Tensor:
    out = F.conv2d(x, weight, bias, stride, padding)
    if norm is not None:
        out = norm(out)
    if activation is not None:
        out = F.gelu(out) if activation == 'gelu' else F.relu(out)
    return out if memory_format is None else out.contiguous(memory_format=memory_format)


def _triton_unavailable(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                        norm: Optional[RunningBatchNorm], activation: Optional[str],
                        memory_format: Optional[torch.memory_format]) -> Optional[str]:
    reason = triton_float_unavailable(x)
    if reason is None and x.numel() == 0:
        reason = 'an empty map'
    if reason is None and records_autograd(x, weight, bias, *(norm or ())[:4]):
        reason = ('autograd records this call and the Triton kernel has no backward (training '
                  'runs cuDNN, whose plans one crop size makes once)')
    return reason


def _dense_conv2d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                         stride: Tuple[int, int], padding: Tuple[int, int],
                         norm: Optional[RunningBatchNorm], activation: Optional[str],
                         memory_format: Optional[torch.memory_format]) -> Tensor:
    from .triton_dense_conv import dense_conv2d_triton, is_channels_last

    channels_last = is_channels_last(x) if memory_format is None \
        else memory_format == torch.channels_last
    # the kernel reads channels-last in F.conv2d's compute dtype (autocast's, else x's): one
    # copy where either differs
    x = x.to(autocast_dtype(x), memory_format=torch.channels_last)
    return dense_conv2d_triton(x, weight, bias, stride, padding, norm, activation,
                               channels_last=channels_last)


_dense_conv2d = OpDispatcher('dense_conv2d', {
    'triton': Backend(_dense_conv2d_triton, _triton_unavailable),
    'torch': Backend(_dense_conv2d_torch, runs_anywhere),
})


def output_size(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                padding: Sequence[int]) -> Tuple[int, ...]:
    """``(out_height, out_width)`` of a convolution of a ``size`` map, as ``F.conv2d``'s."""
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(size, kernel, stride, padding))


def _pair(value: Pair, name: str, least: int) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < least
                             for v in pair):
        raise ValueError(f'{name} must be an int >= {least} or two of them, got {value!r}')
    return pair


def dense_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: Pair = 1,
                 padding: Pair = 0, norm: Optional[RunningBatchNorm] = None,
                 activation: Optional[str] = None,
                 memory_format: Optional[torch.memory_format] = None) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)``, then ``norm`` and ``activation``.

    Args:
        x: ``(B, C, H, W)``, any layout.
        weight: ``(O, C, kh, kw)``.
        bias: ``(O,)`` or None.
        stride, padding: an int or ``(h, w)``; zero padding.
        norm: a batch norm in eval mode (:meth:`RunningBatchNorm.of`) applied to the result.
        activation: None, ``'gelu'`` (``F.gelu``, exact) or ``'relu'``, applied last.
        memory_format: the result's layout, ``torch.contiguous_format`` (NCHW) or
            ``torch.channels_last``; None: ``x``'s where it is channels-last, else NCHW (as
            ``F.conv2d``). A convolution that feeds another can write channels-last, which the
            ``triton`` backend reads without a copy.

    Returns:
        ``(B, O, (H + 2 ph - kh) // sh + 1, (W + 2 pw - kw) // sw + 1)``.
    """
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f'x must be (B, C, H, W) and weight (O, C, kh, kw), got '
                         f'{tuple(x.shape)} and {tuple(weight.shape)}')
    stride, padding = _pair(stride, 'stride', 1), _pair(padding, 'padding', 0)
    if min(output_size(x.shape[2:], weight.shape[2:], stride, padding)) < 1:
        raise ValueError(f'a {tuple(weight.shape[2:])} kernel with padding {padding} does not fit '
                         f'a {tuple(x.shape[2:])} map')
    check_bias_norm_activation(weight.shape[0], bias, norm, activation, ACTIVATIONS)
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f'memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}')
    return _dense_conv2d(x, weight, bias, stride, padding, norm, activation, memory_format)
