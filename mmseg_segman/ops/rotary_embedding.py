"""2-D rotary position embedding of queries or keys, ``(B, heads, H, W, d)``, times a scale.

Channel pairs ``(2m, 2m+1)`` of the head vector at pixel ``(i, j)`` are rotated by the angle
of that pair and pixel (``sin``/``cos`` tables ``(H, W, d)`` of
:class:`~mmseg_segman.models.layers.RoPE2d`, each angle twice):
``y = (x * cos + rotate(x) * sin) * scale`` with ``rotate(x)[2m] = -x[2m+1]``,
``rotate(x)[2m+1] = x[2m]``.

Backends: ``triton`` (:mod:`.triton_rotary_embedding`: one kernel reading the strided
queries or keys in place, written out contiguous; on CUDA, eager or compiled) and ``torch``
(the release's element-wise formula: six kernels, each a pass over the map).
"""
from typing import Optional

import torch
from torch import Tensor

from .dispatch import Backend, OpDispatcher, cast, triton_float_unavailable, runs_anywhere


def _rotary_embedding_torch(x: Tensor, sin: Tensor, cos: Tensor, scale: float) -> Tensor:
    sin, cos = sin.to(x.dtype), cos.to(x.dtype)
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    out = x * cos + rotated * sin
    return out if scale == 1.0 else out * scale


def _triton_unavailable(x: Tensor, sin: Tensor, cos: Tensor, scale: float) -> Optional[str]:
    reason = triton_float_unavailable(x)
    if reason is None and torch.is_grad_enabled() and (sin.requires_grad or cos.requires_grad):
        return 'sin and cos need gradients (the kernel has none for the tables)'
    return reason


def _rotary_embedding_triton(x: Tensor, sin: Tensor, cos: Tensor, scale: float) -> Tensor:
    from .triton_rotary_embedding import rotary_embedding_triton

    return rotary_embedding_triton(x, cast(sin, torch.float32).contiguous(),
                                   cast(cos, torch.float32).contiguous(), scale)


_rotary_embedding = OpDispatcher('rotary_embedding', {
    'triton': Backend(_rotary_embedding_triton, _triton_unavailable),
    'torch': Backend(_rotary_embedding_torch, runs_anywhere),
})


def rotary_embedding_2d(x: Tensor, sin: Tensor, cos: Tensor, scale: float = 1.0) -> Tensor:
    """``(x * cos + rotate(x) * sin) * scale`` (see the module doc), in ``x``'s dtype.

    Args:
        x: ``(B, heads, H, W, d)``, ``d`` even, any strides.
        sin, cos: ``(H, W, d)``.
        scale: a number (the attention's ``head_dim ** -0.5`` for queries).

    Returns:
        ``(B, heads, H, W, d)``.
    """
    if x.dim() != 5 or x.shape[-1] % 2:
        raise ValueError(f'x must be (B, heads, H, W, d) with d even, got {tuple(x.shape)}')
    if sin.shape != x.shape[2:] or cos.shape != x.shape[2:]:
        raise ValueError(f'sin and cos must be {tuple(x.shape[2:])} (H, W, d of x), got '
                         f'{tuple(sin.shape)} and {tuple(cos.shape)}')
    return _rotary_embedding(x, sin, cos, float(scale))
