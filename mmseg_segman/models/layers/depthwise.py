"""The depthwise convolution of the SegMAN blocks."""
from torch import Tensor, nn

from ...ops import depthwise_conv2d


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels)`` (its keys
    ``weight (C, 1, k, k)`` and ``bias``) running the op :func:`depthwise_conv2d`."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        return depthwise_conv2d(x, self.weight, self.bias)
