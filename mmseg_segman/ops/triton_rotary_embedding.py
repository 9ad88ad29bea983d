"""Triton backend of :func:`mmseg_segman.ops.rotary_embedding_2d`: the 2-D rotary embedding
of the queries and the keys in one pass, forward and backward.

The reference makes six element-wise passes over each map (the rotated copy, its negation,
two products, a sum, the scale) on queries and keys that are a permuted view of the ``qkv``
projection: in SegMAN-L's inference about a fifth of the GPU time went to them and to the
copies around them. One program here owns ``BLOCK_P`` pixels of one (batch, head) of the
queries or of the keys (one launch for both): it loads their head vectors through the input's
strides, the same vectors with each channel pair swapped (``d ^ 1``, from the cache), and the
float32 tables, and writes the rotated, scaled vectors contiguous, or as ``(B, heads, d, H,
W)`` planes where the attention reads those faster (its windows up to 9,
:func:`~.neighborhood_attention.reads_planes_faster`). The rotation is orthogonal with the
same angle for both channels of a pair, so the input gradient is the same kernel with ``sin``
negated; it is written in the layout of a
``(B, C, H, W)`` map where the input was a view of one (``qkv``), so that autograd assembles
``qkv``'s gradient by one concatenation (head vectors written contiguous took two strided
copies, 66 us in SegMAN-L's stage-3 block at batch 8 on an H100, docs/benchmarks.md). Sizes
and strides are runtime values: one compilation per (dtype, head dim, input layout,
alignment, :func:`~.triton_jit.aligned`). ``torch.compile`` traces the kernel as custom ops
(:data:`ROTARY_EMBEDDING`, a :class:`~.triton_jit.TritonAutogradOp`).
"""
from typing import Callable, Tuple

import torch
import triton.language as tl
from torch import Tensor

from .triton_jit import (TritonAutogradOp, aligned, alignment, cdiv, empty_channels_first,
                         jit_with_runtime_ints, launch, next_power_of_2, records_autograd)

BLOCK_P = 64
NUM_WARPS = 4
_RUNTIME_INTS = {'planes', 'heads', 'height', 'width', 'sx_b', 'sx_h', 'sx_y', 'sx_x', 'sx_d'}


@jit_with_runtime_ints(_RUNTIME_INTS)
def _rope_kernel(q_ptr, k_ptr, sin_ptr, cos_ptr, out_q_ptr, out_k_ptr, scale, planes, heads,
                 height, width, sx_b, sx_h, sx_y, sx_x, sx_d, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, NEGATE_SIN: tl.constexpr,
                 PLANAR: tl.constexpr, PLANAR_OUT: tl.constexpr, ALIGN: tl.constexpr):
    """Programs ``(., p)`` rotate plane ``p`` (batch * heads + head) of ``q`` (times
    ``scale``) for ``p < planes``, else plane ``p - planes`` of ``k``; ``q`` and ``k`` share
    their strides. ``PLANAR``: each ``H x W`` plane of the inputs is contiguous (``sx_y =
    width``, ``sx_x = 1``: queries and keys as views of the ``qkv`` map), pixel ``p`` at offset
    ``p``; its loads move 16 bytes a thread where the pixel count and the other strides are
    multiples of ``ALIGN``. The outputs are contiguous ``(B, heads, H, W, d)``, or ``(B,
    heads, d, H, W)`` with ``PLANAR_OUT``."""
    plane = tl.program_id(1).to(tl.int64)
    x_ptr = q_ptr
    out_ptr = out_q_ptr
    factor = scale
    if plane >= planes:
        x_ptr = k_ptr
        out_ptr = out_k_ptr
        factor = 1.0
        plane -= planes
    pixels = aligned(height * width, ALIGN)
    sx_b, sx_h, sx_d = aligned(sx_b, ALIGN), aligned(sx_h, ALIGN), aligned(sx_d, ALIGN)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    ok = (p < pixels)[:, None] & (d < HEAD_DIM)[None, :]
    offset = p if PLANAR else (p // width) * sx_y + (p % width) * sx_x
    base = x_ptr + (plane // heads) * sx_b + (plane % heads) * sx_h + offset[:, None]
    x = tl.load(base + d[None, :] * sx_d, mask=ok, other=0.0).to(tl.float32)
    swapped = tl.load(base + (d ^ 1)[None, :] * sx_d, mask=ok, other=0.0).to(tl.float32)
    table = p[:, None] * HEAD_DIM + d[None, :]
    sin = tl.load(sin_ptr + table, mask=ok, other=0.0)
    cos = tl.load(cos_ptr + table, mask=ok, other=0.0)
    if NEGATE_SIN:
        sin = -sin
    # rotate(x)[2m] = -x[2m+1], rotate(x)[2m+1] = x[2m]
    rotated = tl.where((d % 2 == 0)[None, :], -swapped, swapped)
    out = (x * cos + rotated * sin) * factor
    out_base = out_ptr + plane * pixels * HEAD_DIM
    if PLANAR_OUT:
        out_base += d[None, :] * pixels + p[:, None]
    else:
        out_base += table
    tl.store(out_base, out.to(out_ptr.dtype.element_ty), mask=ok)


def _planar(x: Tensor) -> bool:
    """Whether each ``H x W`` plane of ``x (B, heads, H, W, d)`` is contiguous."""
    return x.stride(3) == 1 and x.stride(2) == x.shape[3]


def _empty_rotated(x: Tensor, planar_out: bool) -> Tensor:
    """The rotation's output for ``x``: contiguous, or laid out as ``(B, heads, d, H, W)``."""
    if planar_out:
        return empty_channels_first(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rotate(q: Tensor, k: Tensor, sin: Tensor, cos: Tensor, q_scale: float, inverse: bool,
            planar_out: bool) -> Tuple[Tensor, Tensor]:
    """The rotations of ``q`` (times ``q_scale``) and ``k``, which share shape and strides (by
    ``-angle`` with ``inverse``: the backward pass), contiguous, or laid out as ``(B, heads,
    d, H, W)`` with ``planar_out``."""
    batch, heads, height, width, dim = q.shape
    out_q, out_k = _empty_rotated(q, planar_out), _empty_rotated(k, planar_out)
    grid = (cdiv(height * width, BLOCK_P), 2 * batch * heads)
    sx_b, sx_h, _, _, sx_d = q.stride()
    planar = _planar(q)
    launch(_rope_kernel, grid, q, k, sin, cos, out_q, out_k, q_scale, batch * heads, heads,
           height, width, *q.stride(), HEAD_DIM=dim, BLOCK_D=next_power_of_2(dim),
           BLOCK_P=BLOCK_P, NEGATE_SIN=inverse, PLANAR=planar, PLANAR_OUT=planar_out,
           ALIGN=alignment(height * width, sx_b, sx_h, sx_d) if planar else 1,
           num_warps=NUM_WARPS)
    return out_q, out_k


def _rotate_fake(q, k, sin, cos, q_scale, inverse, planar_out):
    return _empty_rotated(q, planar_out), _empty_rotated(k, planar_out)


def _setup_context(ctx, inputs, output):
    q, _, sin, cos, q_scale, _, _ = inputs
    ctx.save_for_backward(sin, cos)
    ctx.q_scale = q_scale
    ctx.planar = _planar(q)  # the gradients in the inputs' layout where they view a map


def _gradients(forward: Callable, backward: Callable) -> Callable:
    """The autograd backward: the rotations back, by ``backward`` (autograd hands an unused
    output's gradient as zeros)."""

    def gradients(ctx, dq, dk):
        sin, cos = ctx.saved_tensors
        if dq.stride() != dk.stride():  # the kernel reads both through one set of strides
            dq, dk = dq.contiguous(), dk.contiguous()
        return (*backward(dq, dk, sin, cos, ctx.q_scale, True, ctx.planar),
                None, None, None, None, None)

    return gradients


# the forward and the backward are one kernel, the rotation and its inverse
ROTARY_EMBEDDING = TritonAutogradOp('rotary_embedding', _rotate, _rotate_fake, _rotate,
                                    _rotate_fake, _setup_context, _gradients)


def rotary_embedding_triton(q: Tensor, k: Tensor, sin: Tensor, cos: Tensor,
                            q_scale: float = 1.0, planar: bool = False) -> Tuple[Tensor, Tensor]:
    """:func:`~mmseg_segman.ops.rotary_embedding_2d` of ``q`` and ``k (B, heads, H, W, d)``
    (one shape and strides, any strides, float32, bfloat16 or float16) with float32
    contiguous ``sin``/``cos`` ``(H, W, d)``; outputs in the inputs' dtype, contiguous or,
    with ``planar``, laid out as ``(B, heads, d, H, W)``, through :data:`ROTARY_EMBEDDING`;
    the input gradients laid out as ``(B, heads, d, H, W)`` (a map's) where the inputs'
    planes are contiguous, else contiguous."""
    return ROTARY_EMBEDDING(q, k, sin, cos, q_scale, False, planar,
                            records=records_autograd(q, k))
