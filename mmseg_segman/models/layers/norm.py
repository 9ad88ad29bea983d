"""LayerNorm over the channels of a ``(B, C, H, W)`` map."""
from torch import Tensor, nn


class LayerNorm2d(nn.LayerNorm):
    """``nn.LayerNorm`` over dim 1 of ``(B, C, H, W)``; eps 1e-6 as in SegMAN."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
