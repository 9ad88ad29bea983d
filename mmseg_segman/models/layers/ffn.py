"""The convolutional feed-forward network of SegMAN blocks."""
from typing import Dict, Optional

from mmcv.cnn import build_activation_layer
from torch import Tensor, nn

from ...ops.pointwise_conv import Residual
from .conv import DepthwiseConv2d, PointwiseConv2d
from .norm import op_activation
from .recompute import recomputed_for_backward


class ConvFFN(nn.Module):
    """1x1 conv -> activation (GELU) -> ``x + dwconv3x3(x)`` -> 1x1 conv on ``(B, C, H, W)``.

    An exact GELU runs inside ``fc1``'s op (one pass on the fast path); another activation
    runs as its own layer. While a CUDA graph captures the training step, ``fc2``'s backward
    pass recomputes its input from ``dwconv``'s (:func:`~.recompute.recomputed_for_backward`)."""

    def __init__(self, embed_dim: int, ffn_dim: int, act_cfg: Dict = dict(type='GELU')):
        super().__init__()
        self.fc1 = PointwiseConv2d(embed_dim, ffn_dim)
        self.act = build_activation_layer(act_cfg)
        self.dwconv = DepthwiseConv2d(ffn_dim, 3, residual=True)
        self.fc2 = PointwiseConv2d(ffn_dim, embed_dim)
        self.fused_activation = 'gelu' if op_activation(self.act) == 'gelu' else None

    def forward(self, x: Tensor, residual: Optional[Residual] = None) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``, then ``residual.add_to`` (inside ``fc2``'s op)."""
        hidden = self.fc1(x, self.fused_activation)
        if self.fused_activation is None:
            hidden = self.act(hidden)
        mixed = self.dwconv(hidden)
        with recomputed_for_backward(mixed, hidden, self.dwconv.forward):
            return self.fc2(mixed, residual=residual)
