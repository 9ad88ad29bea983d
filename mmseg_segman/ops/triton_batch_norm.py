"""Triton backend of :func:`mmseg_segman.ops.batch_norm_2d`: training-mode batch norm of a
``(B, C, H, W)`` map, then SiLU, GELU, ReLU or no activation, forward and backward.

Every kernel runs on the grid ``(splits, B, C)``: one program a chunk of :data:`CHUNK` pixels
of one ``H x W`` plane, walked :data:`BLOCK` pixels a step (16-byte loads where the sizes are
multiples of 8, :func:`~.triton_jit.aligned`). Forward: each program sums its chunk's
``x - s`` and ``(x - s)^2`` (``s = x[0, c, 0, 0]``, near the channel's mean: no cancellation)
into a float32 row of partial sums ``(C, B * splits, 2)``; the second kernel's programs each
add up their channel's row (a few dozen values) into the mean and ``rstd``, write
``act((x - mean) rstd weight + bias)``, and the first program of a channel stores its mean,
``rstd`` and unbiased variance ``(3, C)`` (what the backward and the running statistics
take). Backward, with ``z`` the norm's output recomputed and ``g = dy act'(z)``: partial sums
of ``g`` and ``g xhat``, then ``dx = weight rstd (g - mean(g) - xhat mean(g xhat))``, the
first program of a channel storing ``d weight = sum g xhat`` and ``d bias = sum g``. No
atomics: the result does not depend on the order programs run in. Only ``x`` and ``(3, C)``
statistics are kept for the backward pass (PyTorch's SiLU kept the norm's output too).

The GELU is the exact one, its ``erf`` as in :mod:`.triton_pointwise_conv`. Sizes and
strides are runtime values: one compilation per dtype and activation (two where a size is not
a multiple of 8). ``torch.compile`` traces the kernels as the custom ops
``mmseg_segman::batch_norm_2d_forward`` and ``_backward`` (:data:`BATCH_NORM_2D`); the running
statistics are updated by one ``_foreach_lerp_`` after the forward.
"""
from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import cast, with_contiguous_planes
from .triton_jit import (INV_SQRT_2PI, TritonAutogradOp, aligned, alignment, cdiv,
                         jit_with_runtime_ints, launch, normal_cdf_and_density, records_autograd)

CHUNK = 4096  # pixels of a plane a program owns
BLOCK = 1024  # pixels a step: 8 a thread of 4 warps
NUM_WARPS = 4
PARTIALS_STEP = 64  # partial sums a step when a program adds up its channel's row
_RUNTIME_INTS = {'channels', 'pixels', 'sx_b', 'sx_c', 'sd_b', 'sd_c'}


@triton.jit
def _chunk(x_ptr, pixels, sx_b, sx_c, CHUNK: tl.constexpr, ALIGN: tl.constexpr):
    """``pixels`` (a multiple of ``ALIGN``, :func:`~.triton_jit.aligned`), the program's batch
    element (int64), channel, first pixel and the end of its chunk, and its plane of ``x``
    (strides ``sx_b``, ``sx_c``, multiples of ``ALIGN`` too)."""
    pixels = aligned(pixels, ALIGN)
    batch = tl.program_id(1).to(tl.int64)
    channel = tl.program_id(2)
    start = tl.program_id(0) * CHUNK
    plane = x_ptr + batch * aligned(sx_b, ALIGN) + channel * aligned(sx_c, ALIGN)
    return pixels, batch, channel, start, tl.minimum(start + CHUNK, pixels), plane


@triton.jit
def _block(base, p0, end, BLOCK: tl.constexpr):
    """Pixels ``p0 .. p0 + BLOCK`` of a plane at ``base`` (float32, 0 past ``end``), their flags."""
    p = p0 + tl.arange(0, BLOCK)
    ok = p < end
    return tl.load(base + p, mask=ok, other=0.0).to(tl.float32), p, ok


@triton.jit
def _store_partial(partial_ptr, channel, first, second):
    """The program's two partial sums in its channel's row of ``(C, B * splits, 2)``."""
    partials = tl.num_programs(0) * tl.num_programs(1)
    row = partial_ptr + (channel * partials + tl.program_id(1) * tl.num_programs(0)
                         + tl.program_id(0)) * 2
    tl.store(row, first)
    tl.store(row + 1, second)


@triton.jit
def _channel_sums(partial_ptr, channel, PARTIALS_STEP: tl.constexpr):
    """The two sums of channel ``channel``'s row of partial sums."""
    partials = tl.num_programs(0) * tl.num_programs(1)
    row = partial_ptr + channel * partials * 2
    first = tl.zeros([PARTIALS_STEP], dtype=tl.float32)
    second = tl.zeros([PARTIALS_STEP], dtype=tl.float32)
    for i0 in range(0, partials, PARTIALS_STEP):
        i = i0 + tl.arange(0, PARTIALS_STEP)
        ok = i < partials
        first += tl.load(row + 2 * i, mask=ok, other=0.0)
        second += tl.load(row + 2 * i + 1, mask=ok, other=0.0)
    return tl.sum(first), tl.sum(second)


@triton.jit
def _first_program():
    return (tl.program_id(0) == 0) & (tl.program_id(1) == 0)


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """``act(z)``: ``ACTIVATION`` ``'silu'``, ``'gelu'``, ``'relu'`` or None (the identity)."""
    if ACTIVATION == 'silu':
        z = z * tl.sigmoid(z)
    elif ACTIVATION == 'gelu':
        cdf, _ = normal_cdf_and_density(z)
        z = z * cdf
    elif ACTIVATION == 'relu':
        z = tl.maximum(z, 0.0)
    return z


@triton.jit
def _activation_gradient(dy, xhat, weight, bias, ACTIVATION: tl.constexpr):
    """``dy * act'(xhat * weight + bias)`` (ReLU's derivative 0 at 0, as PyTorch's)."""
    z = xhat * weight + bias
    if ACTIVATION == 'silu':
        s = tl.sigmoid(z)
        dy = dy * s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == 'gelu':
        cdf, density = normal_cdf_and_density(z)
        dy = dy * (cdf + z * density * INV_SQRT_2PI)
    elif ACTIVATION == 'relu':
        dy = tl.where(z > 0.0, dy, 0.0)
    return dy


@jit_with_runtime_ints(_RUNTIME_INTS)
def _bn_stats_kernel(x_ptr, partial_ptr, pixels, sx_b, sx_c, CHUNK: tl.constexpr,
                     BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """Partial sums of ``x - s`` and ``(x - s)^2`` over the program's chunk."""
    pixels, batch, channel, start, end, base = _chunk(x_ptr, pixels, sx_b, sx_c, CHUNK, ALIGN)
    shift = tl.load(x_ptr + channel * sx_c).to(tl.float32)
    first = tl.zeros([BLOCK], dtype=tl.float32)
    second = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(start, end, BLOCK):
        x, _, ok = _block(base, p0, end, BLOCK)
        x = tl.where(ok, x - shift, 0.0)
        first += x
        second += x * x
    _store_partial(partial_ptr, channel, tl.sum(first), tl.sum(second))


@jit_with_runtime_ints(_RUNTIME_INTS)
def _bn_fwd_kernel(x_ptr, w_ptr, b_ptr, partial_ptr, y_ptr, stats_ptr, channels, pixels, sx_b,
                   sx_c, eps, ACTIVATION: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                   PARTIALS_STEP: tl.constexpr, ALIGN: tl.constexpr):
    """``y = act(xhat * weight + bias)`` over the program's chunk (``y`` contiguous); the
    first program of a channel stores its mean, ``rstd`` and unbiased variance."""
    pixels, batch, channel, start, end, base = _chunk(x_ptr, pixels, sx_b, sx_c, CHUNK, ALIGN)
    count = (pixels * tl.num_programs(1)).to(tl.float32)
    first, second = _channel_sums(partial_ptr, channel, PARTIALS_STEP)
    offset = first / count
    var = tl.maximum(second / count - offset * offset, 0.0)
    mean = tl.load(x_ptr + channel * sx_c).to(tl.float32) + offset
    rstd = 1.0 / tl.sqrt(var + eps)
    weight = tl.load(w_ptr + channel).to(tl.float32)
    bias = tl.load(b_ptr + channel).to(tl.float32)
    out = y_ptr + (batch * channels + channel) * pixels
    for p0 in range(start, end, BLOCK):
        x, p, ok = _block(base, p0, end, BLOCK)
        z = _activation((x - mean) * rstd * weight + bias, ACTIVATION)
        tl.store(out + p, z.to(y_ptr.dtype.element_ty), mask=ok)
    if _first_program():
        tl.store(stats_ptr + channel, mean)
        tl.store(stats_ptr + channels + channel, rstd)
        tl.store(stats_ptr + 2 * channels + channel, var * count / tl.maximum(count - 1.0, 1.0))


@triton.jit
def _backward_channel(x_ptr, dy_ptr, w_ptr, b_ptr, stats_ptr, channels, pixels, sx_b, sx_c, sd_b,
                      sd_c, CHUNK: tl.constexpr, ALIGN: tl.constexpr):
    """A backward program's ``pixels`` (aligned), batch element, channel, chunk (:func:`_chunk`),
    its channel's ``(mean, rstd, weight, bias)`` and the bases of its planes of ``x`` and ``dy``."""
    pixels, batch, channel, start, end, x_base = _chunk(x_ptr, pixels, sx_b, sx_c, CHUNK, ALIGN)
    norm = (tl.load(stats_ptr + channel), tl.load(stats_ptr + channels + channel),
            tl.load(w_ptr + channel).to(tl.float32), tl.load(b_ptr + channel).to(tl.float32))
    dy_base = dy_ptr + batch * aligned(sd_b, ALIGN) + channel * aligned(sd_c, ALIGN)
    return pixels, batch, channel, start, end, norm, x_base, dy_base


@triton.jit
def _gradient_block(x_base, dy_base, p0, end, norm, ACTIVATION: tl.constexpr,
                    BLOCK: tl.constexpr):
    """``xhat`` (0 past ``end``) and ``g = dy act'(z)`` at pixels ``p0 .. p0 + BLOCK``, the
    pixels and their flags."""
    mean, rstd, weight, bias = norm
    x, p, ok = _block(x_base, p0, end, BLOCK)
    dy, _, _ = _block(dy_base, p0, end, BLOCK)
    xhat = tl.where(ok, (x - mean) * rstd, 0.0)
    return xhat, _activation_gradient(dy, xhat, weight, bias, ACTIVATION), p, ok


@jit_with_runtime_ints(_RUNTIME_INTS)
def _bn_bwd_sums_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, stats_ptr, partial_ptr, channels, pixels,
                        sx_b, sx_c, sd_b, sd_c, ACTIVATION: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """Partial sums of ``g`` and ``g * xhat`` over the program's chunk."""
    # (no name is bound twice: Triton checks that a loop keeps each name's type)
    pixels, batch, channel, start, end, norm, x_base, dy_base = _backward_channel(
        x_ptr, dy_ptr, w_ptr, b_ptr, stats_ptr, channels, pixels, sx_b, sx_c, sd_b, sd_c, CHUNK,
        ALIGN)
    first = tl.zeros([BLOCK], dtype=tl.float32)
    second = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(start, end, BLOCK):
        xhat, g, p, ok = _gradient_block(x_base, dy_base, p0, end, norm, ACTIVATION, BLOCK)
        first += g
        second += g * xhat
    _store_partial(partial_ptr, channel, tl.sum(first), tl.sum(second))


@jit_with_runtime_ints(_RUNTIME_INTS)
def _bn_bwd_dx_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, stats_ptr, partial_ptr, dx_ptr, dwb_ptr,
                      channels, pixels, sx_b, sx_c, sd_b, sd_c, ACTIVATION: tl.constexpr,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr, PARTIALS_STEP: tl.constexpr,
                      ALIGN: tl.constexpr):
    """``dx`` over the program's chunk (contiguous); the first program of a channel stores
    ``d weight`` and ``d bias`` (float32 ``(2, C)``)."""
    pixels, batch, channel, start, end, norm, x_base, dy_base = _backward_channel(
        x_ptr, dy_ptr, w_ptr, b_ptr, stats_ptr, channels, pixels, sx_b, sx_c, sd_b, sd_c, CHUNK,
        ALIGN)
    count = (pixels * tl.num_programs(1)).to(tl.float32)
    sum_g, sum_gx = _channel_sums(partial_ptr, channel, PARTIALS_STEP)
    mean, rstd, weight, bias = norm
    out = dx_ptr + (batch * channels + channel) * pixels
    for p0 in range(start, end, BLOCK):
        xhat, g, p, ok = _gradient_block(x_base, dy_base, p0, end, norm, ACTIVATION, BLOCK)
        dx = weight * rstd * (g - sum_g / count - xhat * (sum_gx / count))
        tl.store(out + p, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    if _first_program():
        tl.store(dwb_ptr + channel, sum_gx)
        tl.store(dwb_ptr + channels + channel, sum_g)


def _grid(x: Tensor) -> Tuple[int, int, int]:
    batch, channels, height, width = x.shape
    return cdiv(height * width, CHUNK), batch, channels


def _blocks() -> dict:
    return dict(CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS)


def _partials(x: Tensor) -> Tensor:
    splits, batch, channels = _grid(x)
    return torch.empty(channels, batch * splits, 2, dtype=torch.float32, device=x.device)


def _forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
             activation: Optional[str]) -> Tuple[Tensor, Tensor]:
    """``y`` (contiguous, ``x``'s dtype) and float32 ``(3, C)``: the batch's mean, ``rstd``
    and unbiased variance of each channel."""
    batch, channels, height, width = x.shape
    pixels = height * width
    ints = (pixels, x.stride(0), x.stride(1))
    partials = _partials(x)
    launch(_bn_stats_kernel, _grid(x), x, partials, *ints, ALIGN=alignment(*ints), **_blocks())
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    stats = torch.empty(3, channels, dtype=torch.float32, device=x.device)
    launch(_bn_fwd_kernel, _grid(x), x, weight, bias, partials, y, stats, channels, *ints, eps,
           ACTIVATION=activation, PARTIALS_STEP=PARTIALS_STEP, ALIGN=alignment(*ints), **_blocks())
    return y, stats


def _forward_fake(x, weight, bias, eps, activation):
    return x.new_empty(x.shape), x.new_empty((3, x.shape[1]), dtype=torch.float32)


def _backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, stats: Tensor,
              activation: Optional[str]) -> Tuple[Tensor, Tensor]:
    """``dx`` (contiguous, ``x``'s dtype) and float32 ``(2, C)``: ``d weight``, ``d bias``."""
    channels = x.shape[1]
    dy = with_contiguous_planes(dy)
    ints = (x.shape[2] * x.shape[3], x.stride(0), x.stride(1), dy.stride(0), dy.stride(1))
    partials = _partials(x)
    common = dict(ACTIVATION=activation, ALIGN=alignment(*ints), **_blocks())
    launch(_bn_bwd_sums_kernel, _grid(x), dy, x, weight, bias, stats, partials, channels, *ints,
           **common)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dwb = torch.empty(2, channels, dtype=torch.float32, device=x.device)
    launch(_bn_bwd_dx_kernel, _grid(x), dy, x, weight, bias, stats, partials, dx, dwb, channels,
           *ints, PARTIALS_STEP=PARTIALS_STEP, **common)
    return dx, dwb


def _backward_fake(dy, x, weight, bias, stats, activation):
    return x.new_empty(x.shape), x.new_empty((2, x.shape[1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, activation = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.activation = activation


def _gradients(forward: Callable, backward: Callable) -> Callable:
    """The autograd backward: the gradients of ``x``, ``weight`` and ``bias`` by ``backward``,
    in their dtypes."""

    def gradients(ctx, dy, grad_stats):
        x, weight, bias, stats = ctx.saved_tensors
        needed = ctx.needs_input_grad
        dx, dwb = backward(dy, x, weight, bias, stats, ctx.activation)
        return (dx if needed[0] else None, cast(dwb[0], weight.dtype) if needed[1] else None,
                cast(dwb[1], bias.dtype) if needed[2] else None, None, None)

    return gradients


BATCH_NORM_2D = TritonAutogradOp('batch_norm_2d', _forward, _forward_fake, _backward,
                                 _backward_fake, _setup_context, _gradients)


def batch_norm_2d_triton(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor,
                         running_var: Tensor, momentum: float, eps: float,
                         activation: Optional[str] = None) -> Tensor:
    """Training-mode batch norm of ``x (B, C, H, W)`` (each ``H x W`` plane contiguous), then
    ``activation``; arguments as :func:`~.batch_norm.batch_norm_2d`.
    Returns a contiguous map in ``x``'s dtype, through :data:`BATCH_NORM_2D`; the running
    statistics are updated after it."""
    y, stats = BATCH_NORM_2D(x, weight, bias, eps, activation,
                             records=records_autograd(x, weight, bias))
    with torch.no_grad():
        torch._foreach_lerp_([running_mean, running_var],
                             [cast(stats[0], running_mean.dtype), cast(stats[2], running_var.dtype)],
                             momentum)
    return y
