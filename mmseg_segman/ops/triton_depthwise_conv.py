"""Triton backend of :func:`mmseg_segman.ops.depthwise_conv2d`: a ``k x k`` depthwise
convolution (stride 1, ``k // 2`` zero padding, optional bias) of a ``(B, C, H, W)`` map,
read and written in that layout, forward and backward.

PyTorch runs a bf16 NCHW depthwise convolution on its own CUDA kernel (slow: 24% of
SegMAN-B's inference time on an H100) and a channels-last one on cuDNN, which builds a plan
for every new input shape. Here one program owns a ``BLOCK_H x BLOCK_W`` tile of one
(batch, channel) plane and adds its ``k * k`` shifted, masked loads times the taps (the
shifted loads overlap and hit the cache). The input gradient is the same kernel with the
taps flipped. ``residual`` adds the input (its centre tap) to the output, and ``dy`` to the
input gradient: the blocks' ``x + dwconv(x)`` in one pass. The weight and bias gradients: a
few programs per channel each loop over a share of its tiles, accumulate ``dy`` times the
input shifted by every tap element-wise, reduce once, and PyTorch adds the few partial sums.
Sizes and strides are runtime values and the tile is 32 or 64 wide after the map's width
(:func:`tile_shape`): two compilations per (dtype, k) serve every map size. A plain
``torch.autograd.Function``, as :mod:`.triton_layer_norm` explains.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_jit import cdiv, jit_with_runtime_ints, launch, next_power_of_2, records_autograd

TILE_ELEMENTS = 1024  # forward and input-gradient programs: one tile of one plane
NUM_WARPS = 4
# weight-gradient programs: taps x tile elements in registers (padded taps x tile = 8192)
WEIGHT_GRADIENT_ELEMENTS = 8192
WEIGHT_GRADIENT_WARPS = 8
WEIGHT_GRADIENT_PROGRAMS = 2048  # about; each loops over its share of one channel's tiles
_RUNTIME_INTS = {'channels', 'height', 'width', 'sx_b', 'sx_c', 'sy_b', 'sy_c', 'batch',
                 'tiles_w', 'tiles', 'splits'}


def tile_shape(width: int, elements: int) -> Tuple[int, int]:
    """``(BLOCK_H, BLOCK_W)`` of ``elements``: 32 wide for maps up to 32 wide (SegMAN's
    stages 3 and 4 at 512x512 would leave half of a 64-wide tile masked), else 64. Two
    shapes only, each compiled once: a 480x480 image already meets both in the four stages,
    so later image sizes compile nothing (a shape per map size cost 0.3-0.7 s a new size)."""
    block_w = 32 if width <= 32 else 64
    return elements // block_w, block_w


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
                   RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    plane = tl.program_id(2).to(tl.int64)
    batch, channel = plane // channels, plane % channels
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    x_base = x_ptr + batch * sx_b + channel * sx_c
    acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    for i in tl.static_range(KERNEL):
        for j in tl.static_range(KERNEL):
            tap = (KERNEL * KERNEL - 1 - i * KERNEL - j) if FLIP else (i * KERNEL + j)
            w = tl.load(w_ptr + channel * KERNEL * KERNEL + tap).to(tl.float32)
            shifted = _shifted(x_base, rows, cols, i - KERNEL // 2, j - KERNEL // 2, height, width)
            acc += w * shifted
            if RESIDUAL:
                if i == KERNEL // 2:
                    if j == KERNEL // 2:
                        acc += shifted  # the centre tap: x itself
    if HAS_BIAS:
        acc += tl.load(b_ptr + channel).to(tl.float32)
    ok = (rows < height)[:, None] & (cols < width)[None, :]
    tl.store(y_ptr + batch * sy_b + channel * sy_c + rows[:, None] * width + cols[None, :], acc,
             mask=ok)


@jit_with_runtime_ints(_RUNTIME_INTS)
def _dw_bwd_weight_kernel(x_ptr, dy_ptr, partial_ptr, height, width, sx_b, sx_c, sy_b, sy_c,
                          batch, tiles_w, tiles, splits, KERNEL: tl.constexpr,
                          TAPS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Program ``(split, channel)`` adds ``dy * x`` shifted by every tap over the tiles
    ``split, split + splits, ...`` of the channel's ``batch * tiles`` tiles, element-wise in
    a ``(TAPS, BLOCK_H, BLOCK_W)`` accumulator, and sums it once at the end. Slot
    ``KERNEL * KERNEL`` collects the sum of ``dy`` (the bias gradient)."""
    split = tl.program_id(0)
    channel = tl.program_id(1).to(tl.int64)
    taps = tl.arange(0, TAPS)
    di = (taps // KERNEL - KERNEL // 2)[:, None, None]
    dj = (taps % KERNEL - KERNEL // 2)[:, None, None]
    is_tap = (taps < KERNEL * KERNEL)[:, None, None]
    is_bias = (taps == KERNEL * KERNEL)[:, None, None]
    acc = tl.zeros([TAPS, BLOCK_H, BLOCK_W], dtype=tl.float32)
    for item in range(split, batch * tiles, splits):
        b = (item // tiles).to(tl.int64)
        tile = item % tiles
        rows = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
        cols = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
        ok = (rows < height)[:, None] & (cols < width)[None, :]
        dy = tl.load(dy_ptr + b * sy_b + channel * sy_c + rows[:, None] * width + cols[None, :],
                     mask=ok, other=0.0).to(tl.float32)
        r = rows[None, :, None] + di
        q = cols[None, None, :] + dj
        inside = is_tap & (r >= 0) & (r < height) & (q >= 0) & (q < width)
        x = tl.load(x_ptr + b * sx_b + channel * sx_c + r * width + q, mask=inside, other=0.0)
        acc += (x.to(tl.float32) + is_bias.to(tl.float32)) * dy[None, :, :]
    tl.store(partial_ptr + (channel * splits + split) * TAPS + taps, tl.sum(tl.sum(acc, 2), 1))


def _convolve(x: Tensor, weight: Tensor, bias: Optional[Tensor], flip: bool, residual: bool,
              dtype: torch.dtype) -> Tensor:
    batch, channels, height, width = x.shape
    block_h, block_w = tile_shape(width, TILE_ELEMENTS)
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    grid = (cdiv(width, block_w), cdiv(height, block_h), batch * channels)
    launch(_dw_fwd_kernel, grid, x, weight, x if bias is None else bias, y, channels, height,
           width, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
           KERNEL=weight.shape[-1], HAS_BIAS=bias is not None, FLIP=flip,
           RESIDUAL=residual, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=NUM_WARPS)
    return y


def _weight_and_bias_gradients(dy: Tensor, x: Tensor, kernel: int) -> Tuple[Tensor, Tensor]:
    """``(C, k * k)`` and ``(C,)`` float32: the sums over batch and pixels."""
    batch, channels, height, width = x.shape
    taps = next_power_of_2(kernel * kernel + 1)
    block_h, block_w = tile_shape(width, WEIGHT_GRADIENT_ELEMENTS // taps)
    tiles_w = cdiv(width, block_w)
    tiles = tiles_w * cdiv(height, block_h)
    splits = max(1, min(batch * tiles, WEIGHT_GRADIENT_PROGRAMS // channels))
    partial = torch.empty(channels, splits, taps, dtype=torch.float32, device=x.device)
    launch(_dw_bwd_weight_kernel, (splits, channels),
           x, dy, partial, height, width, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
           batch, tiles_w, tiles, splits, KERNEL=kernel, TAPS=taps, BLOCK_H=block_h,
           BLOCK_W=block_w, num_warps=WEIGHT_GRADIENT_WARPS)
    sums = partial.sum(1)
    return sums[:, :kernel * kernel], sums[:, kernel * kernel]


class _DepthwiseConv2d(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: bool,
                out_dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.residual = residual
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _convolve(x, weight, bias, flip=False, residual=residual, dtype=out_dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        needed = ctx.needs_input_grad
        dx = _convolve(dy, weight, None, flip=True, residual=ctx.residual, dtype=x.dtype) \
            if needed[0] else None
        dw = db = None
        if needed[1] or needed[2]:
            dw, db = _weight_and_bias_gradients(dy, x, weight.shape[-1])
            dw = dw.view(weight.shape).to(weight.dtype)
            db = db.to(ctx.bias_dtype) if needed[2] else None
        return dx, dw if needed[1] else None, db, None, None


def depthwise_conv2d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                            residual: bool = False, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)``, plus ``x`` if ``residual``,
    for ``x (B, C, H, W)`` (each ``H x W`` plane contiguous, any float dtype: read as is and
    computed in float32) and ``weight (C, 1, k, k)``, ``k`` odd; in ``out_dtype`` (default
    ``x``'s). Without autograd recording (inference) the kernel is launched directly."""
    out_dtype = out_dtype or x.dtype
    if records_autograd(x, weight, bias):
        return _DepthwiseConv2d.apply(x, weight, bias, residual, out_dtype)
    return _convolve(x, weight, bias, flip=False, residual=residual, dtype=out_dtype)
