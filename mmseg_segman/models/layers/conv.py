"""The convolutions of SegMAN, each running its op (release keys unchanged)."""
from typing import Optional

import torch
from mmcv.cnn import ConvModule
from torch import Tensor, nn

from ...ops import dense_conv, dense_conv2d, depthwise_conv2d, pointwise_conv, pointwise_conv2d
from ...ops.batch_norm import trains_with_batch_statistics
from ...ops.depthwise_conv import RunningBatchNorm
from ...ops.pointwise_conv import Residual
from .norm import batch_norm_with_statistics, op_activation


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels)`` (its keys
    ``weight (C, 1, k, k)`` and ``bias``) running the op :func:`depthwise_conv2d`; with
    ``residual``, ``x + conv(x)`` (fused into the convolution on the fast path)."""

    def __init__(self, channels: int, kernel_size: int, residual: bool = False):
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        return depthwise_conv2d(x, self.weight, self.bias, self.residual)

    def extra_repr(self) -> str:
        return super().extra_repr() + (', residual=True' if self.residual else '')


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)`` (keys ``weight (O, C, 1, 1)``, ``bias``)
    running the op :func:`pointwise_conv2d`, which can apply an eval-mode batch norm, a GELU or
    ReLU, and a block's residual connection to the result in the same pass.

    It takes the arguments mmcv's ``ConvModule`` passes to its convolution
    (``conv_cfg=dict(type=PointwiseConv2d)``), and refuses any but those of a 1x1 convolution.
    """

    activations = pointwise_conv.ACTIVATIONS  # what its op applies after an eval-mode norm

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = True):
        given = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                     groups=groups)
        wrong = {name: value for name, value in given.items()
                 if value not in ((0, (0, 0)) if name == 'padding' else (1, (1, 1)))}
        if wrong:
            raise ValueError(f'PointwiseConv2d is a 1x1 convolution of stride 1, unpadded, one group; '
                             f'got {wrong}')
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: Tensor, activation: Optional[str] = None,
                residual: Optional[Residual] = None,
                norm: Optional[RunningBatchNorm] = None) -> Tensor:
        """``(B, C, H, W) -> (B, O, H, W)``, then ``norm`` (a batch norm in eval mode),
        ``activation`` (``'gelu'``, ``'relu'``) and ``residual.add_to``."""
        return pointwise_conv2d(x, self.weight, self.bias, activation, residual, norm)


class DenseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)`` of one
    group (keys ``weight (O, C, kh, kw)``, ``bias``) running the op :func:`dense_conv2d`
    (no execution plan per input shape at inference), which can apply a batch norm in eval
    mode and a GELU or ReLU to the result in the same pass.

    It takes the arguments mmcv's ``ConvModule`` passes to its convolution
    (``conv_cfg=dict(type=DenseConv2d)``), and refuses groups, dilation, padding modes and
    paddings by name (``'same'``) that the op does not run.
    """

    activations = dense_conv.ACTIVATIONS  # what its op applies after an eval-mode norm

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = 'zeros'):
        given = dict(dilation=dilation, groups=groups, padding_mode=padding_mode)
        wrong = {name: value for name, value in given.items()
                 if value not in ('zeros', 1, (1, 1))}
        if wrong or isinstance(padding, str):
            raise ValueError(f'DenseConv2d is a convolution of one group, no dilation, zero '
                             f'padding given in pixels; got {wrong or dict(padding=padding)}')
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias)

    def forward(self, x: Tensor, norm: Optional[RunningBatchNorm] = None,
                activation: Optional[str] = None,
                memory_format: Optional[torch.memory_format] = None) -> Tensor:
        """``(B, C, H, W) -> (B, O, H', W')``, then ``norm`` and ``activation`` (``'gelu'``,
        ``'relu'``), in ``memory_format`` (:func:`~mmseg_segman.ops.dense_conv2d`)."""
        return dense_conv2d(x, self.weight, self.bias, self.stride, self.padding, norm, activation,
                            memory_format)


class ConvNormSequence(nn.Sequential):
    """A ``Sequential`` of convolution, norm and activation layers (the release's keys: its
    indices), run in order. A batch norm after a :class:`DenseConv2d` runs with the exact GELU
    after it (if one follows) as one op: in eval mode inside the convolution's op, in training
    mode the batch norm's op (:func:`~.norm.batch_norm_with_statistics`); one pass on the fast
    path where they took three. In eval mode a convolution whose result another convolution of
    the sequence reads writes it channels-last, the layout the fast path reads (the stem's
    three: no copy between them); the result is NCHW."""

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, O, H', W')``, NCHW."""
        layers = list(self) + [None, None]
        last_conv = max((j for j, layer in enumerate(self) if isinstance(layer, DenseConv2d)),
                        default=-1)
        i = 0
        while layers[i] is not None:
            layer, norm, after = layers[i:i + 3]
            running = RunningBatchNorm.in_eval(norm)
            if not isinstance(layer, DenseConv2d) or (
                    running is None and not trains_with_batch_statistics(norm)):
                x = layer(x)
                i += 1
                continue
            gelu = op_activation(after) == 'gelu'
            activation = 'gelu' if gelu else None
            if running is not None:
                layout = torch.channels_last if i < last_conv else torch.contiguous_format
                x = layer(x, running, activation, layout)
            else:
                x = batch_norm_with_statistics(norm, layer(x), activation)
            i += 3 if gelu else 2
        return x.contiguous()


class BatchNormActConvModule(ConvModule):
    """mmcv's ``ConvModule`` (its keys and arguments) whose batch norm and the activation after
    it run in ops where its layers come in the order conv, norm, act and the ops have the
    activation: in training mode as the batch norm's op
    (:func:`~.norm.batch_norm_with_statistics`: ReLU, SiLU, the exact GELU, or none), in eval
    mode inside a :class:`PointwiseConv2d`'s or :class:`DenseConv2d`'s op (ReLU, the exact
    GELU, or none: one pass on the fast path where they took three); otherwise
    ``ConvModule.forward``."""

    def forward(self, x: Tensor, activate: bool = True, norm: bool = True) -> Tensor:
        """``(B, C, H, W) -> (B, O, H', W')``."""
        activation = op_activation(self.activate) if activate and self.with_activation else None
        if not (norm and self.with_norm and tuple(self.order) == ('conv', 'norm', 'act')) or (
                activate and self.with_activation and activation is None):
            return super().forward(x, activate, norm)
        running = RunningBatchNorm.in_eval(self.norm)
        if running is not None and isinstance(self.conv, (PointwiseConv2d, DenseConv2d)) \
                and activation in self.conv.activations:
            return self.conv(self._padded(x), norm=running, activation=activation)
        if not trains_with_batch_statistics(self.norm):
            return super().forward(x, activate, norm)
        return batch_norm_with_statistics(self.norm, self.conv(self._padded(x)), activation)

    def _padded(self, x: Tensor) -> Tensor:
        return self.padding_layer(x) if self.with_explicit_padding else x
