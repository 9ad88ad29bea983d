"""2-D rotary position embedding of queries and keys, ``(B, heads, H, W, d)``, the queries
times a scale.

Channel pairs ``(2m, 2m+1)`` of the head vector at pixel ``(i, j)`` are rotated by the angle
of that pair and pixel (``sin``/``cos`` tables ``(H, W, d)`` of
:class:`~mmseg_segman.models.layers.RoPE2d`, each angle twice):
``y = (x * cos + rotate(x) * sin) * scale`` with ``rotate(x)[2m] = -x[2m+1]``,
``rotate(x)[2m+1] = x[2m]``; ``scale`` is ``q_scale`` for the queries and 1 for the keys.

Backends: ``triton`` (:mod:`.triton_rotary_embedding`: one kernel for both, reading the
strided queries and keys in place, written out contiguous or as planes; on CUDA, eager or
compiled) and ``torch`` (the release's element-wise formula: six kernels a map, each a pass
over it).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .dispatch import Backend, OpDispatcher, cast, triton_float_unavailable, runs_anywhere


def _rotated_torch(x: Tensor, sin: Tensor, cos: Tensor, scale: float) -> Tensor:
    sin, cos = sin.to(x.dtype), cos.to(x.dtype)
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    out = x * cos + rotated * sin
    return out if scale == 1.0 else out * scale


def _rotary_embedding_torch(q: Tensor, k: Tensor, sin: Tensor, cos: Tensor,
                            q_scale: float, planar: bool) -> Tuple[Tensor, Tensor]:
    return _rotated_torch(q, sin, cos, q_scale), _rotated_torch(k, sin, cos, 1.0)


def _triton_unavailable(q: Tensor, k: Tensor, sin: Tensor, cos: Tensor,
                        q_scale: float, planar: bool) -> Optional[str]:
    reason = triton_float_unavailable(q)
    if reason is None and q.stride() != k.stride():
        reason = (f'q and k have different strides, {q.stride()} and {k.stride()} (the kernel '
                  'reads both through one set)')
    if reason is None and torch.is_grad_enabled() and (sin.requires_grad or cos.requires_grad):
        reason = 'sin and cos need gradients (the kernel has none for the tables)'
    return reason


def _rotary_embedding_triton(q: Tensor, k: Tensor, sin: Tensor, cos: Tensor,
                             q_scale: float, planar: bool) -> Tuple[Tensor, Tensor]:
    from .triton_rotary_embedding import rotary_embedding_triton

    return rotary_embedding_triton(q, k, cast(sin, torch.float32).contiguous(),
                                   cast(cos, torch.float32).contiguous(), q_scale, planar)


_rotary_embedding = OpDispatcher('rotary_embedding', {
    'triton': Backend(_rotary_embedding_triton, _triton_unavailable),
    'torch': Backend(_rotary_embedding_torch, runs_anywhere),
})


def rotary_embedding_2d(q: Tensor, k: Tensor, sin: Tensor, cos: Tensor,
                        q_scale: float = 1.0, planar: bool = False) -> Tuple[Tensor, Tensor]:
    """``((q * cos + rotate(q) * sin) * q_scale, k * cos + rotate(k) * sin)`` (see the module
    doc), in the inputs' dtype.

    Args:
        q, k: ``(B, heads, H, W, d)``, ``d`` even, any strides, one dtype and device.
        sin, cos: ``(H, W, d)``.
        q_scale: a number (the attention's ``head_dim ** -0.5``).
        planar: a layout request: the results as views of ``(B, heads, d, H, W)`` planes
            (the ``triton`` backend writes them so, else contiguous; the reference returns its
            own layout either way). :func:`~.neighborhood_attention.reads_planes_faster` says
            where the attention reads them faster so.

    Returns:
        The rotated ``q`` and ``k``, ``(B, heads, H, W, d)`` each.
    """
    if q.dim() != 5 or q.shape[-1] % 2:
        raise ValueError(f'q must be (B, heads, H, W, d) with d even, got {tuple(q.shape)}')
    if k.shape != q.shape or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f'k must have the shape, dtype and device of q, {tuple(q.shape)} '
                         f'{q.dtype} {q.device}; got {tuple(k.shape)} {k.dtype} {k.device}')
    if sin.shape != q.shape[2:] or cos.shape != q.shape[2:]:
        raise ValueError(f'sin and cos must be {tuple(q.shape[2:])} (H, W, d of q), got '
                         f'{tuple(sin.shape)} and {tuple(cos.shape)}')
    return _rotary_embedding(q, k, sin, cos, float(q_scale), bool(planar))
