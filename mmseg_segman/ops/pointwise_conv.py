"""1x1 convolution of a ``(B, C, H, W)`` map (the blocks' ``qkv``, ``proj`` and FFN
``fc1`` / ``fc2``, the decode head's ``ConvModule``s), optionally followed by a batch norm in
eval mode, a GELU or ReLU, and a block's residual connection (:class:`Residual`: layer scale,
stochastic depth and the shortcut).

Backends: ``triton`` (:mod:`.triton_pointwise_conv`: the product on the tensor cores with
the bias, the GELU and the residual connection applied before the result is stored, and the
norm and the ReLU where autograd does not record; on CUDA, eager or compiled), ``matmul``
(one batched matrix product with the weight broadcast over the batch, then the bias: cuBLAS
picks its kernel per shape in microseconds, where cuDNN builds an execution plan for every
new input shape, about 2 ms for each of SegMAN-T's 60 convolutions on an H100) and ``torch``
(``F.conv2d``, the norm, ``F.gelu`` or ``F.relu`` and the residual connection as the
released model computes it).
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .depthwise_conv import RunningBatchNorm, check_bias_norm_activation
from .dispatch import (Backend, OpDispatcher, autocast_dtype, cast, cast_kept, promote_types,
                       runs_anywhere, triton_float_unavailable)

ACTIVATIONS = (None, 'gelu', 'relu')


class Residual(NamedTuple):
    """A block's residual connection around a branch ``y``:
    ``shortcut + sample_scale[b] * (scale * y + shift)``.

    ``scale``/``shift`` ``(C,)`` are a layer scale (the release's depthwise 1x1 convolution,
    whose weight and bias they are), ``sample_scale`` ``(B,)`` the per-sample factor of
    stochastic depth (0 or ``1 / keep probability``); each may be None.
    """
    shortcut: Tensor
    scale: Optional[Tensor] = None
    shift: Optional[Tensor] = None
    sample_scale: Optional[Tensor] = None

    def add_to(self, branch: Tensor) -> Tensor:
        """``shortcut + sample_scale[b] * (scale * branch + shift)`` for a ``(B, C, H, W)``
        branch, as the released model computes it (layer scale as a grouped convolution)."""
        if self.scale is not None:
            branch = F.conv2d(branch, self.scale.view(-1, 1, 1, 1), self.shift, groups=branch.shape[1])
        elif self.shift is not None:
            branch = branch + self.shift.view(-1, 1, 1)
        if self.sample_scale is not None:
            branch = branch * self.sample_scale.view(-1, 1, 1, 1).to(branch.dtype)
        return self.shortcut + branch


def _epilogue(out: Tensor, activation: Optional[str], residual: Optional[Residual],
              norm: Optional[RunningBatchNorm]) -> Tensor:
    if norm is not None:
        out = norm(out)
    if activation == 'gelu':
        out = F.gelu(out)
    elif activation == 'relu':
        out = F.relu(out)
    return out if residual is None else residual.add_to(out)


def _pointwise_conv2d_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                            activation: Optional[str], residual: Optional[Residual],
                            norm: Optional[RunningBatchNorm]) -> Tensor:
    return _epilogue(F.conv2d(x, weight, bias), activation, residual, norm)


def _matmul_unavailable(x: Tensor, *args) -> Optional[str]:
    if not x.is_cuda:
        return 'CUDA only (it avoids cuDNN\'s per-shape plans; the CPU runs F.conv2d well)'
    if torch.compiler.is_compiling():
        return 'under torch.compile the reference runs (inductor plans it)'
    return None


def _pointwise_conv2d_matmul(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                             activation: Optional[str], residual: Optional[Residual],
                             norm: Optional[RunningBatchNorm]) -> Tensor:
    batch, channels, height, width = x.shape
    dtype = autocast_dtype(x)  # F.conv2d's compute dtype: autocast's, else x's
    w = weight.view(weight.shape[0], channels).to(dtype)
    out = torch.bmm(w.expand(batch, -1, -1), x.reshape(batch, channels, height * width).to(dtype))
    if bias is not None:
        out = out.add_(bias.view(-1, 1))
    return _epilogue(out.view(batch, -1, height, width), activation, residual, norm)


def _triton_unavailable(x: Tensor, *args) -> Optional[str]:
    return triton_float_unavailable(x)


def _pointwise_conv2d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                             activation: Optional[str], residual: Optional[Residual],
                             norm: Optional[RunningBatchNorm]) -> Tensor:
    from .triton_jit import records_autograd
    from .triton_pointwise_conv import pointwise_conv2d_inference_triton, pointwise_conv2d_triton

    dtype = autocast_dtype(x)
    if not records_autograd(weight):
        # inference: the kernel reads the weight in the compute dtype, half the bytes of a
        # float32 parameter under autocast (docs/benchmarks.md); compiled, inductor makes the
        # cast and CUDA graphs replay it, eagerly the copy is kept (in training the kernel
        # rounds the weight in its tiles rather than pay a launch)
        weight = cast(weight, dtype) if torch.compiler.is_compiling() else cast_kept(weight, dtype)
    x = cast(x, dtype).contiguous()
    if norm is not None or activation == 'relu':
        # the norm and the ReLU in the product's pass where autograd does not record (the
        # decode head's ConvModules at inference), else PyTorch's ops after it
        if residual is None and not records_autograd(x, weight, bias, *(norm or ())[:4]):
            return pointwise_conv2d_inference_triton(x, weight, bias, norm, activation, dtype)
        return _epilogue(pointwise_conv2d_triton(x, weight, bias, out_dtype=dtype), activation,
                         residual, norm)
    out_dtype = dtype
    shortcut = scale = shift = sample_scale = None
    if residual is not None:
        out_dtype = promote_types(residual.shortcut.dtype, dtype)
        shortcut = residual.shortcut.contiguous()
        scale = None if residual.scale is None else residual.scale.reshape(-1)
        shift, sample_scale = residual.shift, residual.sample_scale
    return pointwise_conv2d_triton(x, weight, bias, activation == 'gelu', shortcut, scale, shift,
                                   sample_scale, out_dtype)


_pointwise_conv2d = OpDispatcher('pointwise_conv2d', {
    'triton': Backend(_pointwise_conv2d_triton, _triton_unavailable),
    'matmul': Backend(_pointwise_conv2d_matmul, _matmul_unavailable),
    'torch': Backend(_pointwise_conv2d_torch, runs_anywhere),
})


def pointwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     activation: Optional[str] = None, residual: Optional[Residual] = None,
                     norm: Optional[RunningBatchNorm] = None) -> Tensor:
    """``F.conv2d(x, weight, bias)`` with a 1x1 ``weight``, then ``norm``, ``activation`` and
    ``residual.add_to``.

    Args:
        x: ``(B, C, H, W)``.
        weight: ``(O, C, 1, 1)``.
        bias: ``(O,)`` or None.
        activation: ``'gelu'`` (``F.gelu``, exact), ``'relu'`` or None.
        residual: a :class:`Residual` whose ``shortcut`` is ``(B, O, H, W)``, or None.
        norm: a batch norm in eval mode (:meth:`RunningBatchNorm.of`), or None.

    Returns:
        ``(B, O, H, W)``.
    """
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1:] != (x.shape[1], 1, 1):
        raise ValueError(f'x must be (B, C, H, W) and weight (O, C, 1, 1), got {tuple(x.shape)} '
                         f'and {tuple(weight.shape)}')
    out_channels = weight.shape[0]
    check_bias_norm_activation(out_channels, bias, norm, activation, ACTIVATIONS)
    if residual is not None:
        _check_residual(residual, (x.shape[0], out_channels, *x.shape[2:]))
    return _pointwise_conv2d(x, weight, bias, activation, residual, norm)


def _check_residual(residual: Residual, out_shape) -> None:
    if not isinstance(residual, Residual):
        raise TypeError(f'residual must be a Residual, got {type(residual).__name__}')
    if residual.shortcut.shape != out_shape:
        raise ValueError(f'residual shortcut must be {tuple(out_shape)} (the output), got '
                         f'{tuple(residual.shortcut.shape)}')
    for name, size in (('scale', out_shape[1]), ('shift', out_shape[1]),
                       ('sample_scale', out_shape[0])):
        value = getattr(residual, name)
        if value is not None and value.numel() != size:
            raise ValueError(f'residual {name} must have {size} values, got shape {tuple(value.shape)}')
