"""Triton backend of :func:`mmseg_segman.ops.depthwise_conv2d`: a ``k x k`` depthwise
convolution (stride 1, ``k // 2`` zero padding, optional bias) of a ``(B, C, H, W)`` map,
read and written in that layout, forward and backward.

PyTorch runs a bf16 NCHW depthwise convolution on its own CUDA kernel (slow: 24% of
SegMAN-B's inference time on an H100) and a channels-last one on cuDNN, which builds a plan
for every new input shape. Here one program owns a ``BLOCK_H x BLOCK_W`` tile of one
(batch, channel) plane and adds its ``k * k`` shifted, masked loads times the taps (the
shifted loads overlap and hit the cache). The input gradient is the same kernel with the
taps flipped; the weight gradient: every program writes the ``k * k`` sums of ``dy`` times
the shifted input over its tile, and PyTorch adds them up. Sizes and strides are runtime
values: one compilation per (dtype, k) serves every map size.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_jit import jit_with_runtime_ints

BLOCK_H = 16
BLOCK_W = 64
NUM_WARPS = 4
_RUNTIME_INTS = {'channels', 'height', 'width', 'sx_b', 'sx_c', 'sy_b', 'sy_c', 'tiles'}


@triton.jit
def _program_tile(channels, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """The program's batch element, channel (int64), and the rows and columns of its tile."""
    plane = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    return plane // channels, plane % channels, rows, cols


@triton.jit
def _shifted(base, rows, cols, di, dj, height, width):
    """The map at ``(rows + di, cols + dj)`` as float32, zero outside it."""
    r = rows + di
    q = cols + dj
    ok = ((r >= 0) & (r < height))[:, None] & ((q >= 0) & (q < width))[None, :]
    return tl.load(base + r[:, None] * width + q[None, :], mask=ok, other=0.0).to(tl.float32)


@jit_with_runtime_ints(_RUNTIME_INTS)
def _dw_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, channels, height, width, sx_b, sx_c, sy_b, sy_c,
                   KERNEL: tl.constexpr, HAS_BIAS: tl.constexpr, FLIP: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    batch, channel, rows, cols = _program_tile(channels, BLOCK_H, BLOCK_W)
    x_base = x_ptr + batch * sx_b + channel * sx_c
    acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    for i in tl.static_range(KERNEL):
        for j in tl.static_range(KERNEL):
            tap = (KERNEL * KERNEL - 1 - i * KERNEL - j) if FLIP else (i * KERNEL + j)
            w = tl.load(w_ptr + channel * KERNEL * KERNEL + tap).to(tl.float32)
            acc += w * _shifted(x_base, rows, cols, i - KERNEL // 2, j - KERNEL // 2, height, width)
    if HAS_BIAS:
        acc += tl.load(b_ptr + channel).to(tl.float32)
    ok = (rows < height)[:, None] & (cols < width)[None, :]
    tl.store(y_ptr + batch * sy_b + channel * sy_c + rows[:, None] * width + cols[None, :], acc,
             mask=ok)


@jit_with_runtime_ints(_RUNTIME_INTS)
def _dw_bwd_weight_kernel(x_ptr, dy_ptr, dw_ptr, channels, height, width, sx_b, sx_c, sy_b, sy_c,
                          tiles, KERNEL: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_W: tl.constexpr):
    batch, channel, rows, cols = _program_tile(channels, BLOCK_H, BLOCK_W)
    ok = (rows < height)[:, None] & (cols < width)[None, :]
    dy = tl.load(dy_ptr + batch * sy_b + channel * sy_c + rows[:, None] * width + cols[None, :],
                 mask=ok, other=0.0).to(tl.float32)
    x_base = x_ptr + batch * sx_b + channel * sx_c
    tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    out = dw_ptr + ((tl.program_id(2).to(tl.int64) * tiles + tile) * KERNEL * KERNEL)
    for i in tl.static_range(KERNEL):
        for j in tl.static_range(KERNEL):
            x = _shifted(x_base, rows, cols, i - KERNEL // 2, j - KERNEL // 2, height, width)
            tl.store(out + i * KERNEL + j, tl.sum(tl.sum(dy * x, 1), 0))


def _grid(x: Tensor) -> Tuple[int, int, int]:
    batch, channels, height, width = x.shape
    return triton.cdiv(width, BLOCK_W), triton.cdiv(height, BLOCK_H), batch * channels


def _convolve(x: Tensor, weight: Tensor, bias: Optional[Tensor], flip: bool,
              dtype: torch.dtype) -> Tensor:
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    _dw_fwd_kernel[_grid(x)](x, weight, x if bias is None else bias, y, x.shape[1], x.shape[2],
                             x.shape[3], x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                             KERNEL=weight.shape[-1], HAS_BIAS=bias is not None, FLIP=flip,
                             BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W, num_warps=NUM_WARPS)
    return y


@torch.library.custom_op('mmseg_segman::depthwise_conv2d_forward', mutates_args=())
def depthwise_conv2d_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``(B, C, H, W)`` contiguous, in ``x``'s dtype."""
    return _convolve(x, weight, bias, flip=False, dtype=x.dtype)


@depthwise_conv2d_forward.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op('mmseg_segman::depthwise_conv2d_backward', mutates_args=())
def depthwise_conv2d_backward(dy: Tensor, x: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """``dx`` (``x``'s dtype) and ``d weight`` (``weight``'s dtype)."""
    dx = _convolve(dy, weight, None, flip=True, dtype=x.dtype)
    grid = _grid(x)
    tiles = grid[0] * grid[1]
    kernel = weight.shape[-1]
    partial = torch.empty(grid[2] * tiles * kernel * kernel, dtype=torch.float32, device=x.device)
    _dw_bwd_weight_kernel[grid](x, dy, partial, x.shape[1], x.shape[2], x.shape[3], x.stride(0),
                                x.stride(1), dy.stride(0), dy.stride(1), tiles, KERNEL=kernel,
                                BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W, num_warps=NUM_WARPS)
    dw = partial.view(x.shape[0], x.shape[1], tiles, kernel * kernel).sum((0, 2))
    return dx, dw.view(weight.shape).to(weight.dtype)


@depthwise_conv2d_backward.register_fake
def _(dy, x, weight):
    return x.new_empty(x.shape), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dy = dy.contiguous()
    needed = ctx.needs_input_grad
    dx, dw = depthwise_conv2d_backward(dy, x, weight) if needed[0] or needed[1] else (None, None)
    dbias = dy.float().sum((0, 2, 3)).to(ctx.bias_dtype) if needed[2] else None
    return dx if needed[0] else None, dw if needed[1] else None, dbias


depthwise_conv2d_forward.register_autograd(_backward, setup_context=_setup_context)


def depthwise_conv2d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)`` for ``x (B, C, H, W)`` (each
    ``H x W`` plane contiguous) and ``weight (C, 1, k, k)``, ``k`` odd."""
    return depthwise_conv2d_forward(x, weight, bias)
