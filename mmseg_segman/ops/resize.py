"""Resizing ``(B, C, H, W)`` maps by interpolation matrices: ``M_rows @ x @ M_cols^T``.

:func:`bilinear_matrix` and :func:`bicubic_matrix` give the ``(out, in)`` matrix that resizes
one axis as ``F.interpolate`` does. The op :func:`resize_bilinear` has the backends ``matmul``
(two matrix products, whose backward is two matrix products too; ``F.interpolate``'s
backward scatters with atomic adds, 11% of SegMAN-B's training step on an H200 when the loss
resized the logits to the labels with it) and ``torch`` (``F.interpolate``, the reference,
and what an ONNX export and ``torch.compile`` get).
"""
from functools import wraps
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import Backend, OpDispatcher, autocast_dtype, runs_anywhere, tensor_cache


def _cached_matrix(build: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``build(in_size, out_size, *args, device)`` (a float32 matrix) in ``dtype``, cached per
    arguments (the same few sizes recur, :func:`~.dispatch.tensor_cache`) and built as a
    normal tensor inside ``torch.inference_mode`` too, so that autograd may save it later."""

    @tensor_cache(maxsize=64)
    @wraps(build)
    def matrix(in_size: int, out_size: int, *args, dtype: torch.dtype,
               device: torch.device) -> Tensor:
        with torch.inference_mode(False), torch.no_grad():
            return build(in_size, out_size, *args, device=device).to(dtype)

    return matrix


def _half_pixel_sources(in_size: int, out_size: int, device: torch.device) -> Tensor:
    """The source coordinate of each output index (``align_corners=False``), in float32 as
    ``F.interpolate`` computes it."""
    scale = torch.full((), float(in_size), device=device) / out_size
    return scale * (torch.arange(out_size, dtype=torch.float32, device=device) + 0.5) - 0.5


@_cached_matrix
def bicubic_matrix(in_size: int, out_size: int, device: torch.device) -> Tensor:
    """``(out_size, in_size)`` matrix ``M``: ``M @ v`` resizes ``v`` along dim 0 as
    ``F.interpolate(mode='bicubic', align_corners=False)`` resizes an axis (cubic convolution,
    ``A = -0.75``, source indices clamped to the axis)."""
    a = -0.75
    source = _half_pixel_sources(in_size, out_size, device)
    first = source.floor()
    t = source - first

    def near(x: Tensor) -> Tensor:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: Tensor) -> Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], 1)
    taps = (first.long()[:, None] + torch.arange(-1, 3, device=device)).clamp(0, in_size - 1)
    return torch.zeros(out_size, in_size, device=device).scatter_add_(1, taps, weights)


@_cached_matrix
def bilinear_matrix(in_size: int, out_size: int, align_corners: bool,
                    device: torch.device) -> Tensor:
    """``(out_size, in_size)`` matrix ``M``: ``M @ v`` resizes ``v`` along dim 0 as
    ``F.interpolate(mode='bilinear', align_corners=align_corners)`` resizes an axis to a
    given size (source coordinates clamped at 0, as there)."""
    if align_corners:
        out = torch.arange(out_size, dtype=torch.float32, device=device)
        source = out * ((in_size - 1) / (out_size - 1)) if out_size > 1 else out * 0
    else:
        source = _half_pixel_sources(in_size, out_size, device).clamp_min(0)
    first = source.floor().long().clamp_max(in_size - 1)
    t = source - first
    taps = torch.stack([first, (first + 1).clamp_max(in_size - 1)], 1)
    matrix = torch.zeros(out_size, in_size, device=device)
    return matrix.scatter_add_(1, taps, torch.stack([1 - t, t], 1))


def _resize_bilinear_torch(x: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=align_corners)


def _matmul_unavailable(x: Tensor, size: Sequence[int], align_corners: bool) -> Optional[str]:
    if not x.is_cuda:
        return 'CUDA only (on the CPU F.interpolate is not the bottleneck)'
    if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        return 'torch.compile and ONNX exports get F.interpolate'
    return None


def _resize_bilinear_matmul(x: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    dtype = autocast_dtype(x)
    rows = bilinear_matrix(x.shape[-2], size[0], align_corners, dtype=dtype, device=x.device)
    cols = bilinear_matrix(x.shape[-1], size[1], align_corners, dtype=dtype, device=x.device)
    return torch.matmul(torch.matmul(rows, x.to(dtype)), cols.t())


_resize_bilinear = OpDispatcher('resize_bilinear', {
    'matmul': Backend(_resize_bilinear_matmul, _matmul_unavailable),
    'torch': Backend(_resize_bilinear_torch, runs_anywhere),
})


def resize_bilinear(x: Tensor, size: Sequence[int], align_corners: bool = False) -> Tensor:
    """``F.interpolate(x, size, mode='bilinear', align_corners=align_corners)``.

    Args:
        x: ``(B, C, h, w)``.
        size: ``(H, W)``.

    Returns:
        ``(B, C, H, W)``.
    """
    if x.dim() != 4 or len(size) != 2 or min(size) < 1:
        raise ValueError(f'x must be (B, C, h, w) and size (H, W) positive, got {tuple(x.shape)} '
                         f'and {tuple(size)}')
    return _resize_bilinear(x, tuple(size), align_corners)
