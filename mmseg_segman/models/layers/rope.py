"""2-D rotary position embedding of the SegMAN encoder."""
from typing import Dict, Tuple

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor

from ...ops.dispatch import traced


class RoPE2d(nn.Module):
    """Rotary embedding tables for a ``head_dim`` split between rows and columns (applied by
    the op :func:`~mmseg_segman.ops.rotary_embedding_2d`).

    The buffer ``angle`` (``head_dim // 2``, each frequency twice) is kept in the state
    dict, as in the released checkpoints. The tables of the last :attr:`CACHED_SIZES` map
    sizes are kept while ``angle`` is unchanged (eight small kernels a stage, whose host time
    counts at small batches); traced, compiled and fake-tensor forwards compute them.
    """
    CACHED_SIZES = 4

    def __init__(self, head_dim: int):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f'RoPE2d needs head_dim divisible by 4, got {head_dim}')
        angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4))
        self.register_buffer('angle', angle.repeat_interleave(2))
        self._cache: Dict[Tuple, Tuple[Tensor, Tensor]] = {}

    def forward(self, size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        """``(sin, cos)``, each ``(H, W, head_dim)``: row angles then column angles."""
        angle = self.angle
        if traced() or angle.is_inference() or \
                isinstance(angle, FakeTensor):  # a fake tensor has no data to identify it by
            return self._tables(size)
        # the angles' identity and version: a new tensor or an in-place change (loading a
        # state dict) makes new tables
        key = (tuple(size), angle.device, angle.dtype, angle.data_ptr(), angle._version)
        tables = self._cache.get(key)
        if tables is None:
            if len(self._cache) >= self.CACHED_SIZES:
                del self._cache[next(iter(self._cache))]
            # normal tensors even inside inference_mode, so that autograd may save them later
            with torch.inference_mode(False), torch.no_grad():
                tables = self._cache[key] = self._tables(size)
        return tables

    def _tables(self, size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        height, width = size
        rows = torch.arange(height, device=self.angle.device, dtype=self.angle.dtype)
        cols = torch.arange(width, device=self.angle.device, dtype=self.angle.dtype)
        row_phase = (rows[:, None] * self.angle).unsqueeze(1).expand(-1, width, -1)
        col_phase = (cols[:, None] * self.angle).unsqueeze(0).expand(height, -1, -1)
        phase = torch.cat([row_phase, col_phase], dim=-1)
        return phase.sin(), phase.cos()
