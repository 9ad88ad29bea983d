"""LayerNorm over the channels of a ``(B, C, H, W)`` map."""
from torch import Tensor, nn

from ...ops import layer_norm_2d


class LayerNorm2d(nn.LayerNorm):
    """``nn.LayerNorm`` over dim 1 of ``(B, C, H, W)`` (the op :func:`layer_norm_2d`); eps
    1e-6 as in SegMAN."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor, *addends: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``, plus the ``addends`` (in the norm's pass on the
        fast path)."""
        return layer_norm_2d(x, self.weight, self.bias, self.eps, addends)
