"""Cross scan and cross merge: the four scan orders of SS2D (VMamba).

Direction 0 reads the map row-major, 1 column-major, 2 and 3 are 0 and 1 reversed.
"""
import torch
from torch import Tensor


def cross_scan(x: Tensor) -> Tensor:
    """Lay a map out in the four scan orders.

    Args:
        x: ``(B, C, H, W)``, shared by all directions, or ``(B, 4, C, H, W)``, one map per
            direction (direction k is read in order k).

    Returns:
        ``(B, 4, C, H*W)``.
    """
    if x.dim() == 4:
        forward = torch.stack([x.flatten(2), x.transpose(2, 3).flatten(2)], dim=1)
        return torch.cat([forward, forward.flip(-1)], dim=1)
    if x.dim() != 5 or x.size(1) != 4:
        raise ValueError(f'cross_scan expects (B, C, H, W) or (B, 4, C, H, W), got {tuple(x.shape)}')
    return torch.stack([
        x[:, 0].flatten(2),
        x[:, 1].transpose(2, 3).flatten(2),
        x[:, 2].flatten(2).flip(-1),
        x[:, 3].transpose(2, 3).flatten(2).flip(-1),
    ], dim=1)


def cross_merge(ys: Tensor, height: int, width: int) -> Tensor:
    """Undo each direction's order and sum the four: ``(B, 4, C, L) -> (B, C, H, W)``."""
    if ys.dim() != 4 or ys.size(1) != 4 or ys.size(-1) != height * width:
        raise ValueError(f'cross_merge expects (B, 4, C, {height * width}), got {tuple(ys.shape)}')
    y = ys[:, :2] + ys[:, 2:].flip(-1)
    rows = y[:, 0].unflatten(-1, (height, width))
    cols = y[:, 1].unflatten(-1, (width, height)).transpose(-1, -2)
    return rows + cols


def uncross(ys: Tensor, height: int, width: int) -> Tensor:
    """Each direction's sequence back in its map: ``(B, 4, C, L) -> (B, 4, C, H, W)``
    (the inverse of :func:`cross_scan` of one map per direction)."""
    if ys.dim() != 4 or ys.size(1) != 4 or ys.size(-1) != height * width:
        raise ValueError(f'uncross expects (B, 4, C, {height * width}), got {tuple(ys.shape)}')
    ys = torch.cat([ys[:, :2], ys[:, 2:].flip(-1)], dim=1)
    rows = ys[:, 0::2].unflatten(-1, (height, width))
    cols = ys[:, 1::2].unflatten(-1, (width, height)).transpose(-1, -2)
    return torch.stack([rows[:, 0], cols[:, 0], rows[:, 1], cols[:, 1]], dim=1)
