"""Triton backend of :func:`mmseg_segman.ops.layer_norm_2d`: LayerNorm over the channels of
a ``(B, C, H, W)`` map, read and written in that layout, forward and backward.

The reference normalises a channels-last view (``permute`` to ``(B, H, W, C)``), so PyTorch
copies the map into that layout first and hands a channels-last map to the next layer; its
depthwise convolutions then go to cuDNN, which builds a new execution plan for every new
input shape (about 0.1 s a convolution on an H100, seconds per image size for SegMAN). Here
one program owns ``BLOCK_P`` pixels of one batch element and walks the channels in chunks of
``BLOCK_C``, once for the mean, once for the variance about it, once for the output; from 257
to 512 channels the forward holds all of them in registers instead and reads the map once
(:func:`tiling`). Either way the variance is taken about the mean (no cancellation). Loads
run along the pixels of a channel, which are contiguous.

Backward: ``dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))`` with ``g = dy * weight``,
from the saved per-pixel mean and ``rstd``; every program adds its partial sums of
``dy * xhat`` and ``dy`` per channel into one row by atomics (:data:`PARTIAL_ROWS`), the
weight and bias gradients; under ``torch.use_deterministic_algorithms`` it writes a row of its
own, which PyTorch adds up (one reduction; :func:`~.triton_jit.partial_sum_rows`). Sizes and
strides are runtime values: one compilation per dtype and tiling (chunks, or a tile of 512
channels) serves every map size where they are multiples of 8 (16-byte loads and stores,
:func:`~.triton_jit.aligned`), one more every other size.

``torch.compile`` traces the kernels as the custom ops ``mmseg_segman::layer_norm_2d_forward``
and ``_backward`` (:data:`LAYER_NORM_2D`, a :class:`~.triton_jit.TritonAutogradOp`).
"""
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import cast, with_contiguous_planes
from .triton_jit import (TritonAutogradOp, aligned, alignment, cdiv, empty_partial_sums,
                         jit_with_runtime_ints, launch, next_power_of_2, partial_sum_rows,
                         records_autograd)

RESIDENT_ELEMENTS = 8192  # (channels, pixels) of a tile kept in registers, 32 a thread
L1_CHANNELS = 256  # up to these, a chunked program's 64-pixel rows (32 KiB) stay in L1
_RUNTIME_INTS = {'channels', 'pixels', 'pixel_blocks', 'partial_rows', 'sx_b', 'sx_c', 'sy_b',
                 'sy_c', 'sd_b', 'sd_c', 'sa1_b', 'sa1_c', 'sa2_b', 'sa2_c'}


class Tiling(NamedTuple):
    """A program's tile: ``resident`` (all channels at once) or chunks of ``block_c``
    channels, over ``block_p`` pixels, with ``num_warps``."""
    resident: bool
    block_c: int
    block_p: int
    num_warps: int


CHUNKS = Tiling(False, 32, 64, 4)  # the backward's tiling, and the forward's but from 257 to 512
# rows the backward's programs add their partial sums of the parameter gradients into (one: no
# reduction after; a launch of its own took about 5 us at SegMAN-L's stage 3, batch 8)
PARTIAL_ROWS = 1


def tiling(channels: int) -> Tiling:
    """The forward's tiling. Chunks of 32 channels over 64 pixels, 4 warps, where the
    program's rows of all channels stay in L1 (up to 256 channels), so that reading them again
    costs little: the map is read from memory once, from L1 twice more. From 257 to 512
    channels all of them in one tile in registers, 16 pixels wide (a 32-byte sector of a
    bfloat16 row), 8 warps: the map is read once. On an H100 (SegMAN-L, batch 16, bf16,
    docs/benchmarks.md) the three norms of a block took 53 us in registers where the chunks
    took 70 at 432 channels, and 182 where they took 172 at 96. Wider maps: chunks. The
    backward always runs in chunks: in registers its 16-pixel programs wrote four times as
    many rows of partial sums, whose sum then cost more than the kernel saved."""
    block_c = next_power_of_2(channels)
    if channels <= L1_CHANNELS or block_c * 16 > RESIDENT_ELEMENTS:
        return CHUNKS
    return Tiling(True, block_c, RESIDENT_ELEMENTS // block_c, 8)


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


@triton.jit
def _stats_pointers(stats_ptr, batch, pixels, p):
    """Where pixels ``p`` of a batch element keep their mean and ``rstd`` in the float32
    statistics ``(2, B, H*W)``: the means, then the ``rstd`` (B: the grid's second size)."""
    mean_ptrs = stats_ptr + batch * pixels + p
    return mean_ptrs, mean_ptrs + tl.num_programs(1).to(tl.int64) * pixels


@triton.jit
def _store_normalised(xhat, c, p, ok, batch, w_ptr, b_ptr, a1_ptr, a2_ptr, y_ptr, channels,
                      sa1_b, sa1_c, sa2_b, sa2_c, sy_b, sy_c, ADDENDS: tl.constexpr):
    """Store ``xhat * weight + bias`` plus the first ``ADDENDS`` addends for the tile of
    channels ``c`` and pixels ``p``."""
    c_ok = c < channels
    w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    out = xhat * w[:, None] + b[:, None]
    if ADDENDS >= 1:
        out += _tile(a1_ptr, batch * sa1_b, c, sa1_c, p, ok)
    if ADDENDS >= 2:
        out += _tile(a2_ptr, batch * sa2_b, c, sa2_c, p, ok)
    tl.store(y_ptr + batch * sy_b + c[:, None] * sy_c + p[None, :], out, mask=ok)


@jit_with_runtime_ints(_RUNTIME_INTS)
def _ln2d_fwd_kernel(x_ptr, w_ptr, b_ptr, a1_ptr, a2_ptr, y_ptr, stats_ptr, channels,
                     pixels, sx_b, sx_c, sa1_b, sa1_c, sa2_b, sa2_c, sy_b, sy_c, eps,
                     ADDENDS: tl.constexpr, STATS: tl.constexpr, RESIDENT: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ALIGN: tl.constexpr):
    """``y = layer_norm(x) + a1 + a2`` (the first ``ADDENDS`` of them) for ``BLOCK_P``
    pixels of one batch element; with ``STATS`` the mean and ``rstd`` stored for the backward
    pass (:func:`_stats_pointers`). ``RESIDENT``: all channels are one tile (``channels <=
    BLOCK_C``), read once and kept in registers; else chunks of ``BLOCK_C`` channels, read
    three times (:func:`tiling`). ``pixels`` and the strides are multiples of ``ALIGN``."""
    pixels = aligned(pixels, ALIGN)
    sx_b, sx_c = aligned(sx_b, ALIGN), aligned(sx_c, ALIGN)
    sa1_b, sa1_c = aligned(sa1_b, ALIGN), aligned(sa1_c, ALIGN)
    sa2_b, sa2_c = aligned(sa2_b, ALIGN), aligned(sa2_c, ALIGN)
    sy_b, sy_c = aligned(sy_b, ALIGN), aligned(sy_c, ALIGN)
    batch, p, p_ok = _program_pixels(pixels, BLOCK_P)
    x_off = batch * sx_b
    # the mean is taken about channel 0's value (no cancellation against a large mean)
    ref = tl.load(x_ptr + x_off + p, mask=p_ok, other=0.0).to(tl.float32)
    if RESIDENT:
        c = tl.arange(0, BLOCK_C)
        ok = (c < channels)[:, None] & p_ok[None, :]
        x = tl.where(ok, _tile(x_ptr, x_off, c, sx_c, p, ok) - ref[None, :], 0.0)
        mean = tl.sum(x, 0) / channels
        centred = tl.where(ok, x - mean[None, :], 0.0)
        mean += ref
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / channels + eps)
        _store_normalised(centred * rstd[None, :], c, p, ok, batch, w_ptr, b_ptr, a1_ptr, a2_ptr,
                          y_ptr, channels, sa1_b, sa1_c, sa2_b, sa2_c, sy_b, sy_c, ADDENDS)
    else:
        # sums kept per (channel in the chunk, pixel) and reduced over the channels once: a
        # reduction a chunk crosses the warps (a barrier each) where a 16-byte layout spreads
        # them over the channels
        total = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for c0 in range(0, channels, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = (c < channels)[:, None] & p_ok[None, :]
            total += tl.where(ok, _tile(x_ptr, x_off, c, sx_c, p, ok) - ref[None, :], 0.0)
        mean = ref + tl.sum(total, 0) / channels
        total = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for c0 in range(0, channels, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = (c < channels)[:, None] & p_ok[None, :]
            centred = tl.where(ok, _tile(x_ptr, x_off, c, sx_c, p, ok) - mean[None, :], 0.0)
            total += centred * centred
        rstd = 1.0 / tl.sqrt(tl.sum(total, 0) / channels + eps)
        for c0 in range(0, channels, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = (c < channels)[:, None] & p_ok[None, :]
            xhat = (_tile(x_ptr, x_off, c, sx_c, p, ok) - mean[None, :]) * rstd[None, :]
            _store_normalised(xhat, c, p, ok, batch, w_ptr, b_ptr, a1_ptr, a2_ptr, y_ptr,
                              channels, sa1_b, sa1_c, sa2_b, sa2_c, sy_b, sy_c, ADDENDS)
    if STATS:
        mean_ptrs, rstd_ptrs = _stats_pointers(stats_ptr, batch, pixels, p)
        tl.store(mean_ptrs, mean, mask=p_ok)
        tl.store(rstd_ptrs, rstd, mask=p_ok)


@jit_with_runtime_ints(_RUNTIME_INTS)
def _ln2d_bwd_kernel(dy_ptr, x_ptr, w_ptr, stats_ptr, dx_ptr, partial_ptr, channels,
                     pixels, pixel_blocks, partial_rows, sx_b, sx_c, sd_b, sd_c, sy_b, sy_c,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ALIGN: tl.constexpr,
                     ATOMIC: tl.constexpr):
    """``dx`` of the program's pixels, and its partial sums of ``d weight`` then ``d bias``
    in row ``program % partial_rows`` of ``partial`` (added with ``ATOMIC``)."""
    pixels = aligned(pixels, ALIGN)
    sx_b, sx_c = aligned(sx_b, ALIGN), aligned(sx_c, ALIGN)
    sd_b, sd_c = aligned(sd_b, ALIGN), aligned(sd_c, ALIGN)
    sy_b, sy_c = aligned(sy_b, ALIGN), aligned(sy_c, ALIGN)
    batch, p, p_ok = _program_pixels(pixels, BLOCK_P)
    x_off, dy_off = batch * sx_b, batch * sd_b
    mean_ptrs, rstd_ptrs = _stats_pointers(stats_ptr, batch, pixels, p)
    mean = tl.load(mean_ptrs, mask=p_ok, other=0.0)
    rstd = tl.load(rstd_ptrs, mask=p_ok, other=0.0)
    sum_g = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)  # reduced once, as the forward's
    sum_gx = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        ok = c_ok[:, None] & p_ok[None, :]
        w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        g = _tile(dy_ptr, dy_off, c, sd_c, p, ok) * w[:, None]
        xhat = (_tile(x_ptr, x_off, c, sx_c, p, ok) - mean[None, :]) * rstd[None, :]
        sum_g += g
        sum_gx += g * xhat
    mean_g = tl.sum(sum_g, 0) / channels
    mean_gx = tl.sum(sum_gx, 0) / channels
    # the program's row of partial sums: d weight's, then d bias's
    partial_row = partial_ptr + \
        ((batch * pixel_blocks + tl.program_id(0)) % partial_rows) * 2 * channels
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        ok = c_ok[:, None] & p_ok[None, :]
        w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        dy = _tile(dy_ptr, dy_off, c, sd_c, p, ok)
        xhat = tl.where(ok, (_tile(x_ptr, x_off, c, sx_c, p, ok) - mean[None, :]) * rstd[None, :], 0.0)
        dx = (dy * w[:, None] - mean_g[None, :] - xhat * mean_gx[None, :]) * rstd[None, :]
        tl.store(dx_ptr + batch * sy_b + c[:, None] * sy_c + p[None, :], dx, mask=ok)
        if ATOMIC:
            tl.atomic_add(partial_row + c, tl.sum(dy * xhat, 1), mask=c_ok, sem='relaxed')
            tl.atomic_add(partial_row + channels + c, tl.sum(dy, 1), mask=c_ok, sem='relaxed')
        else:
            tl.store(partial_row + c, tl.sum(dy * xhat, 1), mask=c_ok)
            tl.store(partial_row + channels + c, tl.sum(dy, 1), mask=c_ok)


def _grid(x: Tensor, tiles: Tiling) -> Tuple[int, int]:
    return cdiv(x.shape[2] * x.shape[3], tiles.block_p), x.shape[0]


def tile_constexprs(tiles: Tiling) -> dict:
    """The forward kernel's constexprs of a tiling (its launch takes ``tiles.num_warps``)."""
    return dict(RESIDENT=tiles.resident, BLOCK_C=tiles.block_c, BLOCK_P=tiles.block_p)


def _plane_strides(x: Tensor) -> Tuple[int, int]:
    """Batch and channel strides of ``x``, whose ``H x W`` planes are contiguous."""
    return x.stride(0), x.stride(1)


def _forward(x: Tensor, weight: Tensor, bias: Tensor, addend1: Optional[Tensor],
             addend2: Optional[Tensor], eps: float, out_dtype: torch.dtype,
             stats: bool) -> Tuple[Tensor, Tensor]:
    """``y (B, C, H, W)`` contiguous in ``out_dtype`` (plus the addends, each None or with
    contiguous ``H x W`` planes), and with ``stats`` the float32 mean and ``rstd`` of every
    pixel, ``(2, B, H*W)`` (else an empty tensor: inference needs none)."""
    y, stats = _launch_forward(x, weight, bias, addend1, addend2, eps, out_dtype, stats)
    return y, y.new_empty(0, dtype=torch.float32) if stats is None else stats


def _forward_fake(x, weight, bias, addend1, addend2, eps, out_dtype, stats):
    batch, _, height, width = x.shape
    return (x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty((2, batch, height * width) if stats else (0, ), dtype=torch.float32))


def _launch_forward(x: Tensor, weight: Tensor, bias: Tensor, addend1: Optional[Tensor],
                    addend2: Optional[Tensor], eps: float, out_dtype: torch.dtype,
                    stats: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`_forward` with None for the statistics not stored (no empty tensor made)."""
    batch, channels, height, width = x.shape
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    stats = torch.empty(2, batch, height * width, dtype=torch.float32,
                        device=x.device) if stats else None
    addends = 2 if addend2 is not None else 1 if addend1 is not None else 0
    a1, a2 = addend1 if addend1 is not None else x, addend2 if addend2 is not None else x
    ints = (height * width, *_plane_strides(x), *_plane_strides(a1), *_plane_strides(a2),
            *_plane_strides(y))
    # y stands for the statistics not stored, x for the addends not read
    tiles = tiling(channels)
    launch(_ln2d_fwd_kernel, _grid(x, tiles), x, weight, bias, a1, a2, y,
           y if stats is None else stats, channels, *ints, eps, ADDENDS=addends,
           STATS=stats is not None, ALIGN=alignment(*ints), num_warps=tiles.num_warps,
           **tile_constexprs(tiles))
    return y, stats


def _backward(dy: Tensor, x: Tensor, weight: Tensor, stats: Tensor) -> Tuple[Tensor, Tensor]:
    """``dx`` (contiguous, ``x``'s dtype) and ``d weight`` then ``d bias`` in one ``(2C,)``
    tensor (``weight``'s dtype)."""
    channels = x.shape[1]
    grid = _grid(x, CHUNKS)
    dy = with_contiguous_planes(dy)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows, atomic = partial_sum_rows(grid[1] * grid[0], PARTIAL_ROWS)
    partial = empty_partial_sums(rows, 2 * channels, atomic, x.device)
    strides = (*_plane_strides(x), *_plane_strides(dy), *_plane_strides(dx))
    pixels = x.shape[2] * x.shape[3]
    launch(_ln2d_bwd_kernel, grid, dy, x, weight, stats, dx, partial, channels, pixels, grid[0],
           rows, *strides, BLOCK_C=CHUNKS.block_c, BLOCK_P=CHUNKS.block_p,
           ALIGN=alignment(pixels, *strides), ATOMIC=atomic, num_warps=CHUNKS.num_warps)
    sums = partial[0] if rows == 1 else partial.sum(0)  # one reduction for both
    return dx, cast(sums, weight.dtype)


def _backward_fake(dy, x, weight, stats):
    return x.new_empty(x.shape), weight.new_empty(2 * x.shape[1])


def _setup_context(ctx, inputs, output):
    x, weight, bias, addend1, addend2, eps, _, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.eps = eps
    ctx.addend_dtypes = [None if a is None else a.dtype for a in (addend1, addend2)]


def _gradients(forward: Callable, backward: Callable) -> Callable:
    """The autograd backward: the input's, weight's and bias's gradients by ``backward``
    (the statistics computed again by ``forward`` where the forward pass stored none), the
    addends' the output's."""

    def gradients(ctx, dy, grad_stats):
        x, weight, bias, stats = ctx.saved_tensors
        needed = ctx.needs_input_grad
        if stats.numel() == 0:
            stats = forward(x, weight, bias, None, None, ctx.eps, x.dtype, True)[1]
        dx, sums = backward(dy, x, weight, stats)
        channels = x.shape[1]
        return (dx if needed[0] else None, sums[:channels] if needed[1] else None,
                sums[channels:] if needed[2] else None,
                *(cast(dy, dtype) if need else None
                  for dtype, need in zip(ctx.addend_dtypes, needed[3:5])), None, None, None)

    return gradients


LAYER_NORM_2D = TritonAutogradOp('layer_norm_2d', _forward, _forward_fake, _backward,
                                 _backward_fake, _setup_context, _gradients,
                                 direct=_launch_forward)


def layer_norm_2d_triton(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                         out_dtype: torch.dtype, addends: Sequence[Tensor] = ()) -> Tensor:
    """LayerNorm over dim 1 of ``x (B, C, H, W)`` (each ``H x W`` plane contiguous), plus
    the ``addends`` (at most two maps of ``x``'s shape: the residual sums that follow the norm,
    in the same pass), in ``out_dtype``; returns a contiguous ``(B, C, H, W)``, through
    :data:`LAYER_NORM_2D` (statistics stored only where autograd records)."""
    addend1, addend2 = (*map(with_contiguous_planes, addends), None, None)[:2]
    records = records_autograd(x, weight, bias, addend1, addend2)
    return LAYER_NORM_2D(x, weight, bias, addend1, addend2, eps, out_dtype, records,
                         records=records)[0]
