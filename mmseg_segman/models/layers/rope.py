"""2-D rotary position embedding of the SegMAN encoder."""
from typing import Tuple

import torch
from torch import Tensor, nn


class RoPE2d(nn.Module):
    """Rotary embedding tables for a ``head_dim`` split between rows and columns (applied by
    the op :func:`~mmseg_segman.ops.rotary_embedding_2d`).

    The buffer ``angle`` (``head_dim // 2``, each frequency twice) is kept in the state
    dict, as in the released checkpoints.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f'RoPE2d needs head_dim divisible by 4, got {head_dim}')
        angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4))
        self.register_buffer('angle', angle.repeat_interleave(2))

    def forward(self, size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        """``(sin, cos)``, each ``(H, W, head_dim)``: row angles then column angles."""
        height, width = size
        rows = torch.arange(height, device=self.angle.device, dtype=self.angle.dtype)
        cols = torch.arange(width, device=self.angle.device, dtype=self.angle.dtype)
        row_phase = (rows[:, None] * self.angle).unsqueeze(1).expand(-1, width, -1)
        col_phase = (cols[:, None] * self.angle).unsqueeze(0).expand(height, -1, -1)
        phase = torch.cat([row_phase, col_phase], dim=-1)
        return phase.sin(), phase.cos()
