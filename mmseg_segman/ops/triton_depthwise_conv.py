"""Triton backend of :func:`mmseg_segman.ops.depthwise_conv2d`: a ``k x k`` depthwise
convolution (stride 1, ``k // 2`` zero padding, optional bias) of a ``(B, C, H, W)`` map,
read and written in that layout, forward and backward.

PyTorch runs a bf16 NCHW depthwise convolution on its own CUDA kernel (slow: 24% of
SegMAN-B's inference time on an H100) and a channels-last one on cuDNN, which builds a plan
for every new input shape. Here every kernel walks a band of rows of one channel down the map
on a (batch elements x columns) tile, loads each input row once per column shift and keeps
the ``k`` rows of the window in registers. The forward (:func:`_dw_fwd_kernel`): each output
element costs ``k`` loads and ``k * k`` multiply-adds (a kernel with a tile per plane and
``k * k`` shifted, masked loads an element took 1.3-2.6x its time at SegMAN-B's sizes). The
input gradient is the same kernel with the taps flipped. ``residual`` adds the input (its
centre tap) to the output, and ``dy`` to the input gradient: the blocks' ``x + dwconv(x)``
in one pass. The weight and bias gradients (:func:`_dw_bwd_weight_kernel`): each ``dy``
element costs ``k + 1`` loads and ``k * k`` multiply-adds into the program's sums, which
PyTorch adds up. Sizes and strides are runtime values and the tiles are 32 or 64 wide after
the map's width (:func:`tile_shape`): a few compilations per (dtype, k) and kernel serve
every map size. ``torch.compile`` traces the kernels as custom ops (:data:`DEPTHWISE_CONV2D`, a
:class:`~.triton_jit.TritonAutogradOp`).
"""
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .depthwise_conv import NO_NORM, RunningBatchNorm, norm_and_activation
from .dispatch import cast, with_contiguous_planes
from .triton_jit import (TritonAutogradOp, cdiv, empty_partial_sums, jit_with_runtime_ints,
                         launch, next_power_of_2, partial_sum_rows, records_autograd,
                         running_norm_scale_and_shift)

NUM_WARPS = 4


class ConvolutionTile(NamedTuple):
    """Launch shape of the forward and input-gradient programs: ``elements`` of a row tile
    (batch elements x columns, :func:`tile_shape`), ``unroll`` rows a block, ``band`` rows a
    program."""
    elements: int
    unroll: int
    band: int


# chosen on an H100 (check_depthwise_conv.py --sweep, docs/benchmarks.md): best or within 5%
# of the best of 14 shapes at SegMAN-B's and -L's sizes, batch 16
CONVOLUTION_TILE = ConvolutionTile(256, 2, 32)
# weight-gradient programs: k -> (tile elements, rows a block), 4 warps; chosen on an H100
# (docs/benchmarks.md): 3.2-6.3x the kernel they replaced at SegMAN-B's and -L's sizes; 3x3 in
# blocks of 2 rows since an H200 sweep at SegMAN-L's training sizes (FFN's at stage 1 135 ->
# 116 us, the best or within 5% of it of nine shapes at every 3x3 size)
WEIGHT_GRADIENT_TILES = {3: (128, 2), 5: (128, 2)}
WEIGHT_GRADIENT_TILE_OTHER_K = (128, 1)
WEIGHT_GRADIENT_PROGRAMS = 2048  # about: (batch, column) tiles x row bands x channels
WEIGHT_GRADIENT_MIN_BAND = 8  # rows
# rows the weight gradient's programs add their partial sums into (triton_jit.partial_sum_rows;
# one: no reduction after)
WEIGHT_GRADIENT_ROWS = 1
_RUNTIME_INTS = {'channels', 'height', 'width', 'sx_b', 'sx_c', 'sy_b', 'sy_c', 'batch',
                 'strips', 'band', 'partial_rows'}


def tile_shape(width: int, elements: int, batch: int) -> Tuple[int, int]:
    """``(NB, BLOCK_W)``, a tile of at most ``elements``: ``BLOCK_W`` 32 for maps up to 32
    wide (SegMAN's stages 3 and 4 at 512x512 would leave half of a 64-wide tile masked), else
    64; ``NB`` batch elements, no more than the batch's next power of two (lanes past the
    batch compute for nothing). A few shapes only, each compiled once: a 480x480 image
    already meets both widths in the four stages, so later image sizes compile nothing (a
    shape per map size cost 0.3-0.7 s a new size)."""
    block_w = 32 if width <= 32 else 64
    return min(elements // block_w, next_power_of_2(batch)), block_w


@triton.jit
def _x_row(ptrs, shifted_cols, row, height, width, SHIFT: tl.constexpr):
    """Row ``row`` of a ``(batch, BLOCK_W)`` tile (``ptrs`` at its unshifted start) shifted by
    ``SHIFT`` columns, raw, zero outside the map: one unsigned compare an element
    (``shifted_cols`` as uint32 against ``width``, or against 0 for a row outside the map)."""
    limit = tl.where((row >= 0) & (row < height), width, 0).to(tl.uint32)
    return tl.load(ptrs + SHIFT, mask=(shifted_cols < limit)[None, :], other=0.0)


@triton.jit
def _x_rows(ptrs, shifted_cols, row, height, width, KERNEL: tl.constexpr, UNROLL: tl.constexpr):
    """Rows ``row .. row + UNROLL - 1`` (``ptrs`` at ``row``), each at the ``k`` column shifts."""
    out = ()
    for u in tl.static_range(UNROLL):
        for j in tl.static_range(KERNEL):
            out = out + (_x_row(ptrs + u * width, shifted_cols[j], row + u, height, width,
                                j - KERNEL // 2),)
    return out


@triton.jit
def _window_above(ptrs, shifted_cols, first, height, width, KERNEL: tl.constexpr):
    """The window before row ``first``: rows ``first - k//2 .. first + k//2 - 1`` at every
    column shift, float32 (``ptrs`` at row 0)."""
    window = ()
    for i in tl.static_range(KERNEL - 1):
        for j in tl.static_range(KERNEL):
            window = window + (_x_row(ptrs + (first - KERNEL // 2 + i) * width, shifted_cols[j],
                                      first - KERNEL // 2 + i, height, width,
                                      j - KERNEL // 2).to(tl.float32),)
    return window


@triton.jit
def _dy_rows(ptrs, cols_u, row, end, width, UNROLL: tl.constexpr):
    """``dy`` rows ``row .. row + UNROLL - 1`` (``ptrs`` at ``row``), zero from row ``end`` on
    and in the lanes past the batch (``cols_u`` holds ~0 there)."""
    out = ()
    for u in tl.static_range(UNROLL):
        limit = tl.where(row + u < end, width, 0).to(tl.uint32)
        out = out + (tl.load(ptrs + u * width, mask=cols_u < limit, other=0.0),)
    return out


@triton.jit
def _accumulate(acc, dy_sum, window, xs, dys, KERNEL: tl.constexpr, UNROLL: tl.constexpr):
    """For each of the ``UNROLL`` rows: the window (rows ``r - k//2 .. r + k//2`` at every
    column shift) completed by its newest row, times that row's ``dy``, into the ``k * k``
    accumulators; then the window slides down one row."""
    for u in tl.static_range(UNROLL):
        full = window
        for j in tl.static_range(KERNEL):
            full = full + (xs[u * KERNEL + j].to(tl.float32),)
        dy = dys[u].to(tl.float32)
        updated = ()
        for t in tl.static_range(KERNEL * KERNEL):
            updated = updated + (acc[t] + full[t] * dy,)
        acc = updated
        dy_sum += dy
        window = full[KERNEL:]
    return acc, dy_sum, window


@triton.jit
def _band_tile(x_ptr, y_ptr, height, sx_b, sx_c, sy_b, sy_c, batch, strips, band,
               KERNEL: tl.constexpr, NB: tl.constexpr, BLOCK_W: tl.constexpr):
    """Program ``(lane, band, channel)``'s channel, rows ``first .. end - 1``, the pointers of
    its tile's row 0 in ``x`` and in ``y`` (the lanes past the batch at the last batch
    element), its columns as uint32 (~0 in the lanes past the batch) and at the ``k`` column
    shifts."""
    lane = tl.program_id(0)
    channel = tl.program_id(2).to(tl.int64)
    batches = (lane // strips) * NB + tl.arange(0, NB)
    cols = (lane % strips) * BLOCK_W + tl.arange(0, BLOCK_W)
    clamped = tl.minimum(batches, batch - 1).to(tl.int64)
    x_ptrs = (x_ptr + channel * sx_c + clamped * sx_b)[:, None] + cols[None, :]
    y_ptrs = (y_ptr + channel * sy_c + clamped * sy_b)[:, None] + cols[None, :]
    cols_u = tl.where((batches < batch)[:, None], cols[None, :], -1).to(tl.uint32)
    shifted_cols = ()
    for j in tl.static_range(KERNEL):
        shifted_cols = shifted_cols + ((cols + (j - KERNEL // 2)).to(tl.uint32),)
    first = tl.program_id(1) * band
    return channel, first, tl.minimum(first + band, height), x_ptrs, y_ptrs, cols_u, shifted_cols


@triton.jit
def _convolve_rows(window, xs, taps, bias, scale, shift, y_ptrs, cols_u, row, end, width,
                   KERNEL: tl.constexpr, UNROLL: tl.constexpr, HAS_BIAS: tl.constexpr,
                   RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr, SILU: tl.constexpr):
    """For each of the ``UNROLL`` rows: the window completed by its newest row (``xs``), times
    the taps, plus the bias and the centre tap (``RESIDUAL``), then ``* scale + shift``
    (``HAS_NORM``) and SiLU, stored as output row ``row + u`` (none from row ``end`` on, nor
    in the lanes past the batch); then the window slides down."""
    for u in tl.static_range(UNROLL):
        full = window
        for j in tl.static_range(KERNEL):
            full = full + (xs[u * KERNEL + j].to(tl.float32),)
        acc = full[0] * taps[0]
        for t in tl.static_range(1, KERNEL * KERNEL):
            acc += full[t] * taps[t]
        if RESIDUAL:
            acc += full[(KERNEL // 2) * KERNEL + KERNEL // 2]  # the centre tap: x itself
        if HAS_BIAS:
            acc += bias
        if HAS_NORM:
            acc = acc * scale + shift
        if SILU:
            acc = acc * tl.sigmoid(acc)
        limit = tl.where(row + u < end, width, 0).to(tl.uint32)
        tl.store(y_ptrs + u * width, acc, mask=cols_u < limit)
        window = full[KERNEL:]
    return window


@jit_with_runtime_ints(_RUNTIME_INTS)
def _dw_fwd_kernel(x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, y_ptr, eps,
                   height, width, sx_b, sx_c, sy_b, sy_c, batch, strips, band,
                   KERNEL: tl.constexpr, HAS_BIAS: tl.constexpr, FLIP: tl.constexpr,
                   RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr, SILU: tl.constexpr,
                   NB: tl.constexpr, BLOCK_W: tl.constexpr, UNROLL: tl.constexpr):
    """Program ``(lane, band, channel)``: output rows ``band * b .. band * (b + 1) - 1`` of one
    channel on an ``NB`` batch elements x ``BLOCK_W`` columns tile (the lane), walking down
    the map with the ``k`` input rows of the window at the ``k`` column shifts in registers:
    each output element costs ``k`` loads (of its newest input row) and ``k * k``
    multiply-adds. ``FLIP`` reverses the taps (the input gradient). ``HAS_NORM``: a batch
    norm with running statistics follows (``mean``, ``var``, ``gamma``, ``beta``, ``eps``),
    and ``SILU`` an activation, in the same pass (inference). Rows go in blocks of
    ``UNROLL``, two blocks a loop iteration: one block's loads are issued before the other is
    summed. Lanes past the batch read the last batch element and store nothing."""
    P: tl.constexpr = KERNEL // 2
    TAPS: tl.constexpr = KERNEL * KERNEL
    channel, first, end, x_ptrs, y_ptrs, cols_u, shifted_cols = _band_tile(
        x_ptr, y_ptr, height, sx_b, sx_c, sy_b, sy_c, batch, strips, band, KERNEL, NB, BLOCK_W)
    taps = ()
    for t in tl.static_range(TAPS):
        tap = (TAPS - 1 - t) if FLIP else t
        taps = taps + (tl.load(w_ptr + channel * TAPS + tap).to(tl.float32),)
    bias = tl.load(b_ptr + channel).to(tl.float32)  # b_ptr is x's when there is no bias
    scale = 1.0
    shift = 0.0
    if HAS_NORM:
        scale, shift = running_norm_scale_and_shift(mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                                                    channel, True)
    window = _window_above(x_ptrs, shifted_cols, first, height, width, KERNEL)
    x_next = x_ptrs + (first + P) * width  # the next input row to load: r + P
    y_next = y_ptrs + first * width
    xs0 = _x_rows(x_next, shifted_cols, first + P, height, width, KERNEL, UNROLL)
    for row in range(first, end, 2 * UNROLL):
        x_next += UNROLL * width
        xs1 = _x_rows(x_next, shifted_cols, row + UNROLL + P, height, width, KERNEL, UNROLL)
        window = _convolve_rows(window, xs0, taps, bias, scale, shift, y_next, cols_u, row, end,
                                width, KERNEL, UNROLL, HAS_BIAS, RESIDUAL, HAS_NORM, SILU)
        x_next += UNROLL * width
        y_next += UNROLL * width
        xs0 = _x_rows(x_next, shifted_cols, row + 2 * UNROLL + P, height, width, KERNEL, UNROLL)
        window = _convolve_rows(window, xs1, taps, bias, scale, shift, y_next, cols_u,
                                row + UNROLL, end, width, KERNEL, UNROLL, HAS_BIAS, RESIDUAL,
                                HAS_NORM, SILU)
        y_next += UNROLL * width


@jit_with_runtime_ints(_RUNTIME_INTS)
def _dw_bwd_weight_kernel(x_ptr, dy_ptr, partial_ptr, height, width, sx_b, sx_c, sy_b, sy_c,
                          batch, strips, band, partial_rows, KERNEL: tl.constexpr,
                          NB: tl.constexpr, BLOCK_W: tl.constexpr, UNROLL: tl.constexpr,
                          SLOTS: tl.constexpr, ATOMIC: tl.constexpr):
    """Program ``(lane, band, channel)``: ``NB`` batch elements x ``BLOCK_W`` columns (the
    lane), rows ``band * b .. band * (b + 1) - 1`` of one channel. Writes (adds, with
    ``ATOMIC``), in row ``(band * lanes + lane) % partial_rows`` of the ``(partial_rows,
    channels * (k * k + 1))`` partial sums, the channel's ``k * k`` sums of ``dy`` times the
    shifted input (the first ``channels * k * k`` columns, channel-major) and its sum of
    ``dy`` (the bias gradient, the last ``channels``).

    Rows go in blocks of ``UNROLL``, two blocks a loop iteration: one block's loads are issued
    before the other is summed. Lanes past the batch read the last batch element's input
    (their ``dy`` is zero), so the input is masked only at the map's edges; a non-finite
    input there (already a non-finite gradient) can turn an infinite sum into NaN."""
    P: tl.constexpr = KERNEL // 2
    TAPS: tl.constexpr = KERNEL * KERNEL
    channel, first, end, x_ptrs, dy_ptrs, cols_u, shifted_cols = _band_tile(
        x_ptr, dy_ptr, height, sx_b, sx_c, sy_b, sy_c, batch, strips, band, KERNEL, NB, BLOCK_W)
    window = _window_above(x_ptrs, shifted_cols, first, height, width, KERNEL)
    x_next = x_ptrs + (first + P) * width  # the next input row to load: r + P
    dy_next = dy_ptrs + first * width
    xs0 = _x_rows(x_next, shifted_cols, first + P, height, width, KERNEL, UNROLL)
    dys0 = _dy_rows(dy_next, cols_u, first, end, width, UNROLL)
    acc = (tl.zeros([NB, BLOCK_W], dtype=tl.float32),) * TAPS
    dy_sum = tl.zeros([NB, BLOCK_W], dtype=tl.float32)
    for row in range(first, end, 2 * UNROLL):
        x_next += UNROLL * width
        dy_next += UNROLL * width
        xs1 = _x_rows(x_next, shifted_cols, row + UNROLL + P, height, width, KERNEL, UNROLL)
        dys1 = _dy_rows(dy_next, cols_u, row + UNROLL, end, width, UNROLL)
        acc, dy_sum, window = _accumulate(acc, dy_sum, window, xs0, dys0, KERNEL, UNROLL)
        x_next += UNROLL * width
        dy_next += UNROLL * width
        xs0 = _x_rows(x_next, shifted_cols, row + 2 * UNROLL + P, height, width, KERNEL, UNROLL)
        dys0 = _dy_rows(dy_next, cols_u, row + 2 * UNROLL, end, width, UNROLL)
        acc, dy_sum, window = _accumulate(acc, dy_sum, window, xs1, dys1, KERNEL, UNROLL)
    # the k * k + 1 sums as one vector, stored or added by one instruction
    channels = tl.num_programs(2)
    row = partial_ptr + ((tl.program_id(1) * tl.num_programs(0) + tl.program_id(0))
                         % partial_rows).to(tl.int64) * channels * (TAPS + 1)
    slot = tl.arange(0, SLOTS)
    sums = tl.where(slot == TAPS, tl.sum(dy_sum), 0.0)
    for t in tl.static_range(TAPS):
        sums = tl.where(slot == t, tl.sum(acc[t]), sums)
    ptrs = row + tl.where(slot < TAPS, channel * TAPS + slot, channels * TAPS + channel)
    if ATOMIC:
        tl.atomic_add(ptrs, sums, mask=slot <= TAPS, sem='relaxed')
    else:
        tl.store(ptrs, sums, mask=slot <= TAPS)


def _convolve(x: Tensor, weight: Tensor, bias: Optional[Tensor], flip: bool, residual: bool,
              dtype: torch.dtype, tile: ConvolutionTile = CONVOLUTION_TILE,
              norm: Optional[RunningBatchNorm] = None, silu: bool = False) -> Tensor:
    batch, channels, height, width = x.shape
    batches, block_w = tile_shape(width, tile.elements, batch)
    strips = cdiv(width, block_w)
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    grid = (cdiv(batch, batches) * strips, cdiv(height, tile.band), channels)
    # x stands for the pointers that are not read
    mean, var, gamma, beta, eps = norm if norm is not None else (x, x, x, x, 0.0)
    launch(_dw_fwd_kernel, grid, x, weight, x if bias is None else bias, mean, var, gamma, beta,
           y, eps, height, width, x.stride(0), x.stride(1), y.stride(0), y.stride(1), batch,
           strips, tile.band, KERNEL=weight.shape[-1], HAS_BIAS=bias is not None, FLIP=flip,
           RESIDUAL=residual, HAS_NORM=norm is not None, SILU=silu, NB=batches,
           BLOCK_W=block_w, UNROLL=tile.unroll, num_warps=NUM_WARPS)
    return y


def _weight_and_bias_gradients(dy: Tensor, x: Tensor, kernel: int) -> Tensor:
    """``(C * k * k + C,)`` float32: the weight's gradient, then the bias's, the sums over
    batch and pixels: the programs' partial sums added into one row by atomics, or reduced
    from a row a program under ``torch.use_deterministic_algorithms`` (each gradient a contiguous
    part of its result, which autograd accumulates as it is, where a strided one would be
    copied first)."""
    batch, channels, height, width = x.shape
    elements, unroll = WEIGHT_GRADIENT_TILES.get(kernel, WEIGHT_GRADIENT_TILE_OTHER_K)
    batches, block_w = tile_shape(width, elements, batch)
    strips = cdiv(width, block_w)
    lanes = cdiv(batch, batches) * strips
    rows_a_step = 2 * unroll
    wanted = max(1, WEIGHT_GRADIENT_PROGRAMS // (lanes * channels))
    band = rows_a_step * cdiv(max(WEIGHT_GRADIENT_MIN_BAND, cdiv(height, wanted)), rows_a_step)
    bands = cdiv(height, band)
    rows, atomic = partial_sum_rows(bands * lanes, WEIGHT_GRADIENT_ROWS)
    partial = empty_partial_sums(rows, channels * (kernel * kernel + 1), atomic, x.device)
    launch(_dw_bwd_weight_kernel, (lanes, bands, channels), x, dy, partial, height, width,
           x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), batch, strips, band, rows,
           KERNEL=kernel, NB=batches, BLOCK_W=block_w, UNROLL=unroll,
           SLOTS=next_power_of_2(kernel * kernel + 1), ATOMIC=atomic,
           num_warps=NUM_WARPS)
    return partial[0] if rows == 1 else partial.sum(0)


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: bool,
             out_dtype: torch.dtype, norm_mean: Optional[Tensor], norm_var: Optional[Tensor],
             norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], norm_eps: float,
             silu: bool) -> Tensor:
    """:func:`_convolve`; the norm's four tensors (:class:`RunningBatchNorm`) all None or
    none."""
    norm = None if norm_mean is None else RunningBatchNorm(norm_mean, norm_var, norm_weight,
                                                           norm_bias, norm_eps)
    return _convolve(x, weight, bias, flip=False, residual=residual, dtype=out_dtype, norm=norm,
                     silu=silu)


def _forward_fake(x, weight, bias, residual, out_dtype, *norm_and_silu):
    return x.new_empty(x.shape, dtype=out_dtype)


def _backward(dy: Tensor, x: Tensor, weight: Tensor, residual: bool, input_grad: bool,
              parameter_grads: bool) -> Tuple[Tensor, Tensor]:
    """The input's gradient (``x``'s dtype) if ``input_grad``, and if ``parameter_grads``
    the weight's and the bias's, float32, in one ``(C * k * k + C,)`` tensor (each an empty
    tensor where not asked for)."""
    dy = with_contiguous_planes(dy)
    dx = _convolve(dy, weight, None, flip=True, residual=residual, dtype=x.dtype) \
        if input_grad else x.new_empty(0)
    sums = _weight_and_bias_gradients(dy, x, weight.shape[-1]) if parameter_grads \
        else x.new_empty(0, dtype=torch.float32)
    return dx, sums


def _backward_fake(dy, x, weight, residual, input_grad, parameter_grads):
    channels, _, k, _ = weight.shape
    return (x.new_empty(x.shape if input_grad else (0, )),
            x.new_empty(channels * (k * k + 1) if parameter_grads else 0, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, _, norm_mean, *_ = inputs
    if norm_mean is not None:
        raise RuntimeError('the Triton depthwise convolution has no backward pass through a '
                           'norm: the norm follows as its own op where autograd records')
    ctx.save_for_backward(x, weight)
    ctx.residual = residual
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gradients(forward: Callable, backward: Callable) -> Callable:
    """The autograd backward: every gradient by ``backward``, the parameters' cast to their
    dtypes (views of one sum, contiguous, which autograd accumulates as they are)."""

    def gradients(ctx, dy):
        x, weight = ctx.saved_tensors
        needed = ctx.needs_input_grad
        dx, sums = backward(dy, x, weight, ctx.residual, needed[0], needed[1] or needed[2])
        weight_size = weight.numel()
        return (dx if needed[0] else None,
                cast(sums[:weight_size].view(weight.shape), weight.dtype) if needed[1] else None,
                cast(sums[weight_size:], ctx.bias_dtype) if needed[2] else None,
                *(None for _ in needed[3:]))

    return gradients


DEPTHWISE_CONV2D = TritonAutogradOp('depthwise_conv2d', _forward, _forward_fake, _backward,
                                    _backward_fake, _setup_context, _gradients)


def depthwise_conv2d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                            residual: bool = False, out_dtype: Optional[torch.dtype] = None,
                            norm: Optional[RunningBatchNorm] = None,
                            activation: Optional[str] = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)``, plus ``x`` if ``residual``,
    then ``norm`` and ``activation`` (None or ``'silu'``), for ``x (B, C, H, W)`` (each
    ``H x W`` plane contiguous, any float dtype: read as is and computed in float32) and
    ``weight (C, 1, k, k)``, ``k`` odd; in ``out_dtype`` (default ``x``'s), through
    :data:`DEPTHWISE_CONV2D`. Without autograd recording (inference) the norm and the
    activation are applied in the convolution's pass; else they follow as PyTorch's ops (the
    kernel has no backward for them)."""
    out_dtype = out_dtype or x.dtype
    if records_autograd(x, weight, bias, *(norm or ())[:4]):
        out = DEPTHWISE_CONV2D(x, weight, bias, residual, out_dtype, *NO_NORM, False,
                               records=True)
        return norm_and_activation(out, norm, activation)
    return DEPTHWISE_CONV2D(x, weight, bias, residual, out_dtype, *(norm or NO_NORM),
                            activation == 'silu', records=False)
