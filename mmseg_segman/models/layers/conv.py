"""The convolutions of SegMAN, each running its op (release keys unchanged)."""
from typing import Optional

from torch import Tensor, nn

from ...ops import dense_conv2d, depthwise_conv2d, pointwise_conv2d
from ...ops.depthwise_conv import RunningBatchNorm
from ...ops.pointwise_conv import Residual


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
    running the op :func:`pointwise_conv2d`, which can apply a GELU or a block's residual
    connection to the result in the same pass.

    It takes the arguments mmcv's ``ConvModule`` passes to its convolution
    (``conv_cfg=dict(type=PointwiseConv2d)``), and refuses any but those of a 1x1 convolution.
    """

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
                residual: Optional[Residual] = None) -> Tensor:
        """``(B, C, H, W) -> (B, O, H, W)``, then ``activation`` (``'gelu'``) and
        ``residual.add_to``."""
        return pointwise_conv2d(x, self.weight, self.bias, activation, residual)


class DenseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)`` of one
    group (keys ``weight (O, C, kh, kw)``, ``bias``) running the op :func:`dense_conv2d`
    (no execution plan per input shape at inference), which can apply a batch norm in eval
    mode and a GELU to the result in the same pass.

    It takes the arguments mmcv's ``ConvModule`` passes to its convolution
    (``conv_cfg=dict(type=DenseConv2d)``), and refuses groups, dilation, padding modes and
    paddings by name (``'same'``) that the op does not run.
    """

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
                activation: Optional[str] = None) -> Tensor:
        """``(B, C, H, W) -> (B, O, H', W')``, then ``norm`` and ``activation`` (``'gelu'``)."""
        return dense_conv2d(x, self.weight, self.bias, self.stride, self.padding, norm, activation)


class ConvNormSequence(nn.Sequential):
    """A ``Sequential`` of convolution, norm and activation layers (the release's keys: its
    indices), run in order; in eval mode a :class:`DenseConv2d` takes the batch norm after it
    and an exact GELU after that into its op (one pass on the fast path where they took
    three)."""

    def forward(self, x: Tensor) -> Tensor:
        layers = list(self)
        i = 0
        while i < len(layers):
            layer = layers[i]
            norm = RunningBatchNorm.in_eval(layers[i + 1]) if i + 1 < len(layers) else None
            if not isinstance(layer, DenseConv2d) or norm is None:
                x = layer(x)
                i += 1
                continue
            gelu = i + 2 < len(layers) and isinstance(layers[i + 2], nn.GELU) \
                and layers[i + 2].approximate == 'none'
            x = layer(x, norm, 'gelu' if gelu else None)
            i += 3 if gelu else 2
        return x
