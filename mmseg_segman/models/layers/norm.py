"""Norms: LayerNorm over the channels of a ``(B, C, H, W)`` map; batch norms in training mode
with the activation after them as one op."""
from typing import Optional

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...ops import batch_norm_2d, layer_norm_2d


class LayerNorm2d(nn.LayerNorm):
    """``nn.LayerNorm`` over dim 1 of ``(B, C, H, W)`` (the op :func:`layer_norm_2d`); eps
    1e-6 as in SegMAN."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor, *addends: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``, plus the ``addends`` (in the norm's pass on the
        fast path)."""
        return layer_norm_2d(x, self.weight, self.bias, self.eps, addends)


def op_activation(module: Optional[nn.Module]) -> Optional[str]:
    """The name the ops give ``module`` (``'silu'``, ``'relu'``, ``'gelu'`` for the exact
    GELU), or None where they have none for it (a subclass may compute another function)."""
    if type(module) is nn.GELU:
        return 'gelu' if module.approximate == 'none' else None
    return {nn.SiLU: 'silu', nn.ReLU: 'relu'}.get(type(module))


def batch_norm_with_statistics(norm: _BatchNorm, x: Tensor,
                               activation: Optional[str] = None) -> Tensor:
    """``activation(norm(x))`` for ``x (B, C, H, W)`` and a batch norm that
    :func:`~mmseg_segman.ops.batch_norm.trains_with_batch_statistics` (the batch's statistics,
    the running ones updated), as the op :func:`batch_norm_2d`; the batch is counted in
    ``num_batches_tracked`` as ``_BatchNorm.forward`` counts it."""
    norm.num_batches_tracked.add_(1)
    return batch_norm_2d(x, norm.weight, norm.bias, norm.running_mean, norm.running_var,
                         norm.momentum, norm.eps, activation)
