"""Triton backend of :func:`mmseg_segman.ops.layer_norm_2d`: LayerNorm over the channels of
a ``(B, C, H, W)`` map, read and written in that layout, forward and backward.

The reference normalises a channels-last view (``permute`` to ``(B, H, W, C)``), so PyTorch
copies the map into that layout first and hands a channels-last map to the next layer; its
depthwise convolutions then go to cuDNN, which builds a new execution plan for every new
input shape (about 0.1 s a convolution on an H100, seconds per image size for SegMAN). Here
one program owns ``BLOCK_P`` pixels of one batch element and walks the channels in chunks of
``BLOCK_C``: the mean, then the variance about it (two passes, no cancellation), then the
output. Loads run along the pixels of a channel, which are contiguous.

Backward: ``dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))`` with ``g = dy * weight``,
from the saved per-pixel mean and ``rstd``; every program writes its partial sums of
``dy * xhat`` and ``dy`` per channel (no atomics), which PyTorch adds up into the weight and
bias gradients (one reduction). Sizes and strides are runtime values: one compilation per
dtype serves every map size.

A plain ``torch.autograd.Function``, not a ``torch.library`` custom op: under ``torch.compile``
the reference runs, so nothing traces it, and a custom op's dispatch cost 20-45 us of host
time a call on the GPU machine (``tools/gpu_checks/check_host_time.py --ops``).
"""
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import cast, with_contiguous_planes
from .triton_jit import cdiv, jit_with_runtime_ints, launch, records_autograd

BLOCK_C = 32
BLOCK_P = 64
NUM_WARPS = 4
_RUNTIME_INTS = {'channels', 'pixels', 'pixel_blocks', 'sx_b', 'sx_c', 'sy_b', 'sy_c',
                 'sd_b', 'sd_c', 'sa1_b', 'sa1_c', 'sa2_b', 'sa2_c'}


@triton.jit
def _tile(ptr, batch_offset, c, channel_stride, p, ok):
    """The ``(BLOCK_C, BLOCK_P)`` tile of channels ``c`` and pixels ``p`` as float32."""
    return tl.load(ptr + batch_offset + c[:, None] * channel_stride + p[None, :], mask=ok,
                   other=0.0).to(tl.float32)


@triton.jit
def _program_pixels(pixels, BLOCK_P: tl.constexpr):
    """The program's batch element (int64), its pixels and their mask."""
    batch = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    return batch, p, p < pixels


@jit_with_runtime_ints(_RUNTIME_INTS)
def _ln2d_fwd_kernel(x_ptr, w_ptr, b_ptr, a1_ptr, a2_ptr, y_ptr, mean_ptr, rstd_ptr, channels,
                     pixels, sx_b, sx_c, sa1_b, sa1_c, sa2_b, sa2_c, sy_b, sy_c, eps,
                     ADDENDS: tl.constexpr, STATS: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    """``y = layer_norm(x) + a1 + a2`` (the first ``ADDENDS`` of them) for ``BLOCK_P``
    pixels of one batch element; with ``STATS`` the mean and ``rstd`` stored for the backward
    pass."""
    batch, p, p_ok = _program_pixels(pixels, BLOCK_P)
    x_off = batch * sx_b
    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        total += tl.sum(_tile(x_ptr, x_off, c, sx_c, p, (c < channels)[:, None] & p_ok[None, :]), 0)
    mean = total / channels
    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = (c < channels)[:, None] & p_ok[None, :]
        centred = tl.where(ok, _tile(x_ptr, x_off, c, sx_c, p, ok) - mean[None, :], 0.0)
        total += tl.sum(centred * centred, 0)
    rstd = 1.0 / tl.sqrt(total / channels + eps)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        ok = c_ok[:, None] & p_ok[None, :]
        w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        xhat = (_tile(x_ptr, x_off, c, sx_c, p, ok) - mean[None, :]) * rstd[None, :]
        out = xhat * w[:, None] + b[:, None]
        if ADDENDS >= 1:
            out += _tile(a1_ptr, batch * sa1_b, c, sa1_c, p, ok)
        if ADDENDS >= 2:
            out += _tile(a2_ptr, batch * sa2_b, c, sa2_c, p, ok)
        tl.store(y_ptr + batch * sy_b + c[:, None] * sy_c + p[None, :], out, mask=ok)
    if STATS:
        tl.store(mean_ptr + batch * pixels + p, mean, mask=p_ok)
        tl.store(rstd_ptr + batch * pixels + p, rstd, mask=p_ok)


@jit_with_runtime_ints(_RUNTIME_INTS)
def _ln2d_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, partial_ptr, channels,
                     pixels, pixel_blocks, sx_b, sx_c, sd_b, sd_c, sy_b, sy_c,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    batch, p, p_ok = _program_pixels(pixels, BLOCK_P)
    x_off, dy_off = batch * sx_b, batch * sd_b
    mean = tl.load(mean_ptr + batch * pixels + p, mask=p_ok, other=0.0)
    rstd = tl.load(rstd_ptr + batch * pixels + p, mask=p_ok, other=0.0)
    sum_g = tl.zeros([BLOCK_P], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        ok = c_ok[:, None] & p_ok[None, :]
        w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        g = _tile(dy_ptr, dy_off, c, sd_c, p, ok) * w[:, None]
        xhat = (_tile(x_ptr, x_off, c, sx_c, p, ok) - mean[None, :]) * rstd[None, :]
        sum_g += tl.sum(g, 0)
        sum_gx += tl.sum(g * xhat, 0)
    mean_g = sum_g / channels
    mean_gx = sum_gx / channels
    # the program's row of partial sums: d weight's, then d bias's
    partial_row = partial_ptr + (batch * pixel_blocks + tl.program_id(0)) * 2 * channels
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        ok = c_ok[:, None] & p_ok[None, :]
        w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        dy = _tile(dy_ptr, dy_off, c, sd_c, p, ok)
        xhat = tl.where(ok, (_tile(x_ptr, x_off, c, sx_c, p, ok) - mean[None, :]) * rstd[None, :], 0.0)
        dx = (dy * w[:, None] - mean_g[None, :] - xhat * mean_gx[None, :]) * rstd[None, :]
        tl.store(dx_ptr + batch * sy_b + c[:, None] * sy_c + p[None, :], dx, mask=ok)
        tl.store(partial_row + c, tl.sum(dy * xhat, 1), mask=c_ok)
        tl.store(partial_row + channels + c, tl.sum(dy, 1), mask=c_ok)


def _grid(x: Tensor) -> Tuple[int, int]:
    return cdiv(x.shape[2] * x.shape[3], BLOCK_P), x.shape[0]


def _plane_strides(x: Tensor) -> Tuple[int, int]:
    """Batch and channel strides of ``x``, whose ``H x W`` planes are contiguous."""
    return x.stride(0), x.stride(1)


def _forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype,
             addends: Sequence[Tensor] = (),
             stats: bool = True) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``y (B, C, H, W)`` contiguous in ``out_dtype`` (plus the ``addends``, at most two, each
    with contiguous ``H x W`` planes), and with ``stats`` the float32 mean and ``rstd``
    ``(B, H*W)`` of every pixel (else None: inference needs none)."""
    batch, channels, height, width = x.shape
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean, rstd = (torch.empty(batch, height * width, dtype=torch.float32, device=x.device)
                  for _ in range(2)) if stats else (y, y)  # y stands for the stats not stored
    a1, a2 = (*addends, x, x)[:2]  # x stands for the addends that are not read
    launch(_ln2d_fwd_kernel, _grid(x), x, weight, bias, a1, a2, y, mean, rstd, channels,
           height * width, *_plane_strides(x), *_plane_strides(a1), *_plane_strides(a2),
           *_plane_strides(y), eps, ADDENDS=len(addends), STATS=stats, BLOCK_C=BLOCK_C,
           BLOCK_P=BLOCK_P, num_warps=NUM_WARPS)
    return (y, mean, rstd) if stats else (y, None, None)


def _backward(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor,
              rstd: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``dx`` (contiguous, ``x``'s dtype), ``d weight`` and ``d bias`` (``weight``'s dtype)."""
    channels = x.shape[1]
    grid = _grid(x)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    partial = torch.empty(grid[1] * grid[0], 2 * channels, dtype=torch.float32, device=x.device)
    launch(_ln2d_bwd_kernel, grid, dy, x, weight, mean, rstd, dx, partial, channels,
           x.shape[2] * x.shape[3], grid[0], *_plane_strides(x),
           *_plane_strides(dy), *_plane_strides(dx),
           BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, num_warps=NUM_WARPS)
    sums = cast(partial.sum(0), weight.dtype)  # one reduction for both
    return dx, sums[:channels], sums[channels:]


class _LayerNorm2d(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                out_dtype: torch.dtype, *addends: Tensor) -> Tensor:
        y, mean, rstd = _forward(x, weight, bias, eps, out_dtype, addends)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.addend_dtypes = [a.dtype for a in addends]
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        dy = dy.contiguous()
        dx, dw, db = _backward(dy, *ctx.saved_tensors)
        needed = ctx.needs_input_grad
        return (dx if needed[0] else None, dw if needed[1] else None, db if needed[2] else None,
                None, None, *(cast(dy, dtype) if need else None
                              for dtype, need in zip(ctx.addend_dtypes, needed[5:])))


def layer_norm_2d_triton(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                         out_dtype: torch.dtype, addends: Sequence[Tensor] = ()) -> Tensor:
    """LayerNorm over dim 1 of ``x (B, C, H, W)`` (each ``H x W`` plane contiguous), plus
    the ``addends`` (at most two maps of ``x``'s shape: the residual sums that follow the norm,
    in the same pass), in ``out_dtype``; returns a contiguous ``(B, C, H, W)``. Without
    autograd recording (inference) the kernel is launched directly, with no autograd node."""
    addends = tuple(map(with_contiguous_planes, addends))
    if records_autograd(x, weight, bias, *addends):
        return _LayerNorm2d.apply(x, weight, bias, eps, out_dtype, *addends)
    return _forward(x, weight, bias, eps, out_dtype, addends, stats=False)[0]
