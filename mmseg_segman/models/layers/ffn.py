"""The convolutional feed-forward network of SegMAN blocks."""
from typing import Dict

from mmcv.cnn import build_activation_layer
from torch import Tensor, nn

from .conv import DepthwiseConv2d, PointwiseConv2d


class ConvFFN(nn.Module):
    """1x1 conv -> activation (GELU) -> ``x + dwconv3x3(x)`` -> 1x1 conv on ``(B, C, H, W)``."""

    def __init__(self, embed_dim: int, ffn_dim: int, act_cfg: Dict = dict(type='GELU')):
        super().__init__()
        self.fc1 = PointwiseConv2d(embed_dim, ffn_dim)
        self.act = build_activation_layer(act_cfg)
        self.dwconv = DepthwiseConv2d(ffn_dim, 3, residual=True)
        self.fc2 = PointwiseConv2d(ffn_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dwconv(self.act(self.fc1(x))))
