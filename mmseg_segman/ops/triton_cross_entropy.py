"""Triton backend of :func:`mmseg_segman.ops.cross_entropy_2d`: the pixel-wise softmax cross
entropy of contiguous ``(B, K, H, W)`` logits, forward and backward, and each pixel's
predicted class.

One program owns ``BLOCK_P`` pixels of one batch element and walks the ``K`` classes
``BLOCK_K`` at a time (each row of a step ``BLOCK_P`` contiguous pixels of a class's plane: 16
bytes a thread of a 16-bit map where the pixel count is a multiple of 8). Forward, in float32
registers: the running maximum and sum of ``exp(z - max)`` (the log-sum-exp ``lse``), the
label's logit and the first class of the largest logit; it writes the loss ``lse - z[label]``
(0 at ``ignore_index``, NaN at a label outside the classes), ``lse`` (float32, what the
backward reads) and the prediction. Backward: ``dz = dloss (exp(z - lse) - [k = label])``,
written in the logits' dtype (0 at ignored pixels). The logits are read once forward and once
backward; PyTorch's path under autocast moved them five times and kept two float32 copies for
the backward (:mod:`.cross_entropy`). Sizes are runtime values: one compilation per dtype (two
where the pixel count is not a multiple of 8). ``torch.compile`` traces the kernels as custom
ops (:data:`CROSS_ENTROPY_2D`, a :class:`~.triton_jit.TritonAutogradOp`).
"""
from typing import Callable, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import cast
from .triton_jit import (LOG2_E, TritonAutogradOp, aligned, alignment, cdiv, jit_with_runtime_ints,
                         launch, records_autograd)

BLOCK_K = 8  # classes a step
BLOCK_P = 1024  # pixels a program: 16 bytes of a 16-bit map a thread of 4 warps
NUM_WARPS = 4
_RUNTIME_INTS = {'classes', 'pixels', 'ignore_index'}


@triton.jit
def _pixels(label_ptr, pixels, ignore_index, BLOCK_P: tl.constexpr, ALIGN: tl.constexpr):
    """The program's batch element (int64), pixels, their flags, labels and whether each pixel
    counts (its label is not ``ignore_index``)."""
    pixels = aligned(pixels, ALIGN)
    batch = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = p < pixels
    label = tl.load(label_ptr + batch * pixels + p, mask=ok, other=ignore_index)
    return pixels, batch, p, ok, label, label != ignore_index


@triton.jit
def _class_block(plane, k0, classes, pixels, p, ok, BLOCK_K: tl.constexpr):
    """Classes ``k0 .. k0 + BLOCK_K`` of the program's pixels as float32 ``(BLOCK_K,
    BLOCK_P)`` (``-inf`` past the last class), and the classes."""
    k = k0 + tl.arange(0, BLOCK_K)
    k_ok = k < classes
    z = tl.load(plane + k[:, None] * pixels + p[None, :], mask=k_ok[:, None] & ok[None, :],
                other=0.0).to(tl.float32)
    return tl.where(k_ok[:, None], z, float('-inf')), k


@jit_with_runtime_ints(_RUNTIME_INTS)
def _ce_fwd_kernel(x_ptr, label_ptr, loss_ptr, lse_ptr, pred_ptr, classes, pixels, ignore_index,
                   BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, ALIGN: tl.constexpr):
    pixels, batch, p, ok, label, counts = _pixels(label_ptr, pixels, ignore_index, BLOCK_P, ALIGN)
    plane = x_ptr + batch * classes * pixels
    top = tl.full([BLOCK_P], float('-inf'), tl.float32)  # the running maximum
    total = tl.zeros([BLOCK_P], dtype=tl.float32)  # sum of exp(z - top)
    picked = tl.zeros([BLOCK_P], dtype=tl.float32)  # the label's logit
    best = tl.zeros([BLOCK_P], dtype=tl.int32)  # the first class of the maximum
    for k0 in range(0, classes, BLOCK_K):
        z, k = _class_block(plane, k0, classes, pixels, p, ok, BLOCK_K)
        block_top = tl.max(z, 0)
        block_best = tl.argmax(z, 0, tie_break_left=True)
        best = tl.where(block_top > top, k0 + block_best, best)
        new_top = tl.maximum(top, block_top)
        total = total * tl.math.exp2((top - new_top) * LOG2_E) \
            + tl.sum(tl.math.exp2((z - new_top[None, :]) * LOG2_E), 0)
        top = new_top
        picked += tl.sum(tl.where(k[:, None] == label[None, :], z, 0.0), 0)
    lse = top + tl.log(total)
    foreign = counts & ((label < 0) | (label >= classes))
    loss = tl.where(counts, lse - picked, 0.0)
    out = batch * pixels + p
    tl.store(loss_ptr + out, tl.where(foreign, float('nan'), loss), mask=ok)
    tl.store(lse_ptr + out, lse, mask=ok)
    tl.store(pred_ptr + out, best.to(tl.int64), mask=ok)


@jit_with_runtime_ints(_RUNTIME_INTS)
def _ce_bwd_kernel(x_ptr, label_ptr, lse_ptr, dloss_ptr, dx_ptr, classes, pixels, ignore_index,
                   BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, ALIGN: tl.constexpr):
    pixels, batch, p, ok, label, counts = _pixels(label_ptr, pixels, ignore_index, BLOCK_P, ALIGN)
    plane = x_ptr + batch * classes * pixels
    out_plane = dx_ptr + batch * classes * pixels
    lse = tl.load(lse_ptr + batch * pixels + p, mask=ok, other=0.0)
    dloss = tl.where(counts, tl.load(dloss_ptr + batch * pixels + p, mask=ok, other=0.0), 0.0)
    for k0 in range(0, classes, BLOCK_K):
        z, k = _class_block(plane, k0, classes, pixels, p, ok, BLOCK_K)
        prob = tl.math.exp2((z - lse[None, :]) * LOG2_E)
        dz = (prob - tl.where(k[:, None] == label[None, :], 1.0, 0.0)) * dloss[None, :]
        tl.store(out_plane + k[:, None] * pixels + p[None, :], dz.to(dx_ptr.dtype.element_ty),
                 mask=(k < classes)[:, None] & ok[None, :])


def _grid(logits: Tensor) -> Tuple[int, int]:
    return cdiv(logits.shape[2] * logits.shape[3], BLOCK_P), logits.shape[0]


def _launch_args(logits: Tensor, ignore_index: int) -> Tuple[tuple, dict]:
    pixels = logits.shape[2] * logits.shape[3]
    return ((logits.shape[1], pixels, ignore_index),
            dict(BLOCK_K=BLOCK_K, BLOCK_P=BLOCK_P, ALIGN=alignment(pixels), num_warps=NUM_WARPS))


def _forward(logits: Tensor, label: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The loss and ``lse`` (float32) and the prediction (int64) of each pixel, ``(B, H, W)``."""
    batch, _, height, width = logits.shape
    loss = torch.empty(batch, height, width, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    prediction = torch.empty(batch, height, width, dtype=torch.int64, device=logits.device)
    ints, meta = _launch_args(logits, ignore_index)
    launch(_ce_fwd_kernel, _grid(logits), logits, label, loss, lse, prediction, *ints, **meta)
    return loss, lse, prediction


def _forward_fake(logits, label, ignore_index):
    shape = label.shape
    return (logits.new_empty(shape, dtype=torch.float32),
            logits.new_empty(shape, dtype=torch.float32), label.new_empty(shape))


def _backward(dloss: Tensor, logits: Tensor, label: Tensor, lse: Tensor,
              ignore_index: int) -> Tensor:
    """The logits' gradient, contiguous in their dtype."""
    dx = torch.empty_like(logits, memory_format=torch.contiguous_format)
    ints, meta = _launch_args(logits, ignore_index)
    launch(_ce_bwd_kernel, _grid(logits), logits, label, lse, cast(dloss, torch.float32).contiguous(), dx,
           *ints, **meta)
    return dx


def _backward_fake(dloss, logits, label, lse, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, label, ignore_index = inputs
    _, lse, prediction = output
    ctx.mark_non_differentiable(lse, prediction)
    ctx.save_for_backward(logits, label, lse)
    ctx.ignore_index = ignore_index


def _gradients(forward: Callable, backward: Callable) -> Callable:
    """The autograd backward: the logits' gradient by ``backward``."""

    def gradients(ctx, dloss, grad_lse, grad_prediction):
        logits, label, lse = ctx.saved_tensors
        dx = backward(dloss, logits, label, lse, ctx.ignore_index) if ctx.needs_input_grad[0] \
            else None
        return dx, None, None

    return gradients


CROSS_ENTROPY_2D = TritonAutogradOp('cross_entropy_2d', _forward, _forward_fake, _backward,
                                    _backward_fake, _setup_context, _gradients)


def cross_entropy_2d_triton(logits: Tensor, label: Tensor,
                            ignore_index: int) -> Tuple[Tensor, Tensor]:
    """The loss (float32) and the prediction (int64) of each pixel, ``(B, H, W)``, of
    contiguous ``logits (B, K, H, W)`` and ``label (B, H, W)``; as
    :func:`~.cross_entropy.cross_entropy_2d`."""
    loss, _, prediction = CROSS_ENTROPY_2D(logits, label, ignore_index,
                                           records=records_autograd(logits))
    return loss, prediction
