"""Pixel-wise softmax cross entropy of ``(B, K, H, W)`` logits against ``(B, H, W)`` labels,
with each pixel's predicted class: what the decode head's loss and accuracy take.

Backends: ``triton`` (:mod:`.triton_cross_entropy`: one pass over the logits forward, in
float32 registers, one backward that writes the gradient in the logits' dtype; on CUDA, eager
or compiled) and ``torch`` (``F.cross_entropy`` on float32 logits and an ``argmax``: mmseg's
``CrossEntropyLoss`` and ``accuracy``). Under bf16 autocast PyTorch's path copies the logits
to float32, runs a log-softmax forward and backward over the class dimension, fills and
scatters the NLL's gradient and casts it back: on an H200, 4.9 ms of SegMAN-L's graphed
training step at batch 8 of 512x512 (150 classes), more than its whole attention forward
(docs/benchmarks.md).

A label neither ``ignore_index`` nor a class (``0 <= label < K``) gives that pixel a NaN
loss on both backends, where ``F.cross_entropy`` stops the process with a device-side assert
on CUDA: the NaN shows in the logged loss.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import Backend, OpDispatcher, runs_anywhere, triton_float_unavailable


def _cross_entropy_2d_torch(logits: Tensor, label: Tensor,
                            ignore_index: int) -> Tuple[Tensor, Tensor]:
    classes = logits.shape[1]
    foreign = (label != ignore_index) & ((label < 0) | (label >= classes))
    safe = torch.where(foreign, torch.zeros_like(label), label)
    upcast = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(upcast, safe, reduction='none', ignore_index=ignore_index)
    with torch.no_grad():
        prediction = logits.argmax(1)
    return torch.where(foreign, torch.full_like(loss, float('nan')), loss), prediction


def _triton_unavailable(logits: Tensor, label: Tensor, ignore_index: int) -> Optional[str]:
    """As :func:`triton_float_unavailable`, for contiguous logits and labels."""
    reason = triton_float_unavailable(logits)
    if reason is not None:
        return reason
    if not (logits.is_contiguous() and label.is_contiguous()):
        return 'its logits or labels are not contiguous'
    return None


def _cross_entropy_2d_triton(logits: Tensor, label: Tensor,
                             ignore_index: int) -> Tuple[Tensor, Tensor]:
    from .triton_cross_entropy import cross_entropy_2d_triton

    return cross_entropy_2d_triton(logits, label, ignore_index)


_cross_entropy_2d = OpDispatcher('cross_entropy_2d', {
    'triton': Backend(_cross_entropy_2d_triton, _triton_unavailable),
    'torch': Backend(_cross_entropy_2d_torch, runs_anywhere),
})


def cross_entropy_2d(logits: Tensor, label: Tensor,
                     ignore_index: int = 255) -> Tuple[Tensor, Tensor]:
    """Softmax cross entropy of each pixel and its predicted class.

    Args:
        logits: ``(B, K, H, W)`` float.
        label: ``(B, H, W)`` int64 classes; ``ignore_index`` marks pixels without one.
        ignore_index: the label of unlabelled pixels (loss 0, no gradient).

    Returns:
        ``loss`` ``(B, H, W)`` float32 (float64 for float64 logits),
        ``F.cross_entropy(logits.float(), label, reduction='none', ignore_index=ignore_index)``
        (NaN at a label outside the classes), differentiable in ``logits``; ``prediction``
        ``(B, H, W)`` int64, ``logits.argmax(1)``.
    """
    if logits.dim() != 4 or label.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f'logits must be (B, K, H, W) and label (B, H, W) of the same B, H, W, '
                         f'got {tuple(logits.shape)} and {tuple(label.shape)}')
    if not logits.is_floating_point() or label.dtype != torch.int64:
        raise ValueError(f'logits must be float and label int64, got {logits.dtype} and '
                         f'{label.dtype}')
    if logits.shape[1] < 1:
        raise ValueError('logits have no classes (K = 0)')
    return _cross_entropy_2d(logits, label, ignore_index)
