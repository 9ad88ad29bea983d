"""Cross scan and cross merge: the four scan orders of SS2D (VMamba).

Direction 0 reads the map row-major, 1 column-major, 2 and 3 are 0 and 1 reversed. Three
layouts of a direction's data appear: the map ``(H, W)``; the *direction order*, the map
flattened row-major (directions 0, 2) or column-major (1, 3), which is how
:func:`~mmseg_segman.ops.cross_selective_scan` takes its per-direction inputs (contiguous
along the sequence for every direction, reversed or not); and the *scan order*, the direction
order with directions 2 and 3 reversed (the sequences the recurrence runs over).
"""
from typing import Optional

import torch
from torch import Tensor

from .dispatch import Backend, OpDispatcher, triton_float_unavailable, runs_anywhere


def both_orders(x: Tensor) -> Tensor:
    """A map flattened row-major and column-major: ``(B, C, H, W) -> (B, 2, C, H*W)``, the
    direction order of directions 0 and 2, and of 1 and 3 (a copy)."""
    if x.dim() != 4:
        raise ValueError(f'expected a (B, C, H, W) map, got {tuple(x.shape)}')
    return torch.stack([x.flatten(2), x.transpose(2, 3).flatten(2)], dim=1)


def cross_scan(x: Tensor) -> Tensor:
    """Lay a map out in the four scan orders: ``(B, C, H, W) -> (B, 4, C, H*W)``."""
    forward = both_orders(x)
    return torch.cat([forward, forward.flip(-1)], dim=1)


def _direction_order_torch(maps: Tensor) -> Tensor:
    rows, cols = maps[:, 0::2].flatten(3), maps[:, 1::2].transpose(3, 4).flatten(3)
    return torch.stack([rows, cols], dim=2).flatten(1, 2)


# the third dimension of the kernel's grid counts B * 4 * C planes
_MAX_PLANES = 2 ** 16 - 1


def _triton_unavailable(maps: Tensor) -> Optional[str]:
    """As :func:`triton_float_unavailable`, for contiguous maps of at most 65535 planes."""
    reason = triton_float_unavailable(maps)
    if reason is not None:
        return reason
    if not maps.is_contiguous():
        return f'the maps are not contiguous (strides {tuple(maps.stride())})'
    planes = maps.shape[:3].numel()
    return f'{planes} planes (B * 4 * C) are over {_MAX_PLANES}' if planes > _MAX_PLANES else None


def _direction_order_triton(maps: Tensor) -> Tensor:
    from .triton_cross_selective_scan import direction_order_triton

    return direction_order_triton(maps)


_direction_order = OpDispatcher('direction_order', {
    'triton': Backend(_direction_order_triton, _triton_unavailable),
    'torch': Backend(_direction_order_torch, runs_anywhere),
})


def direction_order(maps: Tensor) -> Tensor:
    """One map per direction in its direction order: ``(B, 4, C, H, W) -> (B, 4, C, H*W)``,
    directions 0 and 2 row-major, 1 and 3 column-major (a copy). Backends: ``triton`` (one
    kernel, on CUDA) and ``torch`` (strided copies and ``stack``)."""
    if maps.dim() != 5 or maps.size(1) != 4:
        raise ValueError(f'direction_order expects (B, 4, C, H, W), got {tuple(maps.shape)}')
    return _direction_order(maps)


def flip_reversed(seqs: Tensor) -> Tensor:
    """Direction order to scan order and back, ``(B, 4, C, L)``: directions 2 and 3 reversed."""
    if seqs.dim() != 4 or seqs.size(1) != 4:
        raise ValueError(f'flip_reversed expects (B, 4, C, L), got {tuple(seqs.shape)}')
    return torch.cat([seqs[:, :2], seqs[:, 2:].flip(-1)], dim=1)


def cross_merge(ys: Tensor, height: int, width: int) -> Tensor:
    """Undo each direction's scan order and sum the four: ``(B, 4, C, L) -> (B, C, H, W)``."""
    if ys.dim() != 4 or ys.size(1) != 4 or ys.size(-1) != height * width:
        raise ValueError(f'cross_merge expects (B, 4, C, {height * width}), got {tuple(ys.shape)}')
    y = ys[:, :2] + ys[:, 2:].flip(-1)
    rows = y[:, 0].unflatten(-1, (height, width))
    cols = y[:, 1].unflatten(-1, (width, height)).transpose(-1, -2)
    return rows + cols
