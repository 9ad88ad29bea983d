"""2-D neighborhood attention with relative position bias (NATTEN 0.17 rules, dilation 1).

Each query at ``(i, j)`` attends to the ``k x k`` keys of a window that is centred on it
and shifted inward at the borders, so it always holds ``k`` keys per axis. On an axis of
length ``n`` (``r = k // 2``) the window starts at::

    s(i) = max(i - r, 0) + (i + r >= n) * (n - i - r - 1)

and key ``m`` of the axis is biased by ``rpb[..., m - i + k - 1]`` (the NATTEN index
``p(i) + j`` for key ``j`` of the window). Where an axis is shorter than the kernel
(NATTEN refuses such inputs), the window is the whole axis, biased by the same rule.
"""
from typing import Optional

import torch
from torch import Tensor

from .dispatch import Backend, OpDispatcher, always


def window_starts(length: int, kernel_size: int, device=None) -> Tensor:
    """``(length,)`` index of the first key of each query's window on one axis."""
    i = torch.arange(length, device=device)
    if length <= kernel_size:
        return torch.zeros_like(i)
    r = kernel_size // 2
    return (i - r).clamp(min=0) + (i + r >= length) * (length - i - r - 1)


def _axis_windows(length: int, kernel_size: int, device):
    """Key indices ``(length, k')`` and bias indices ``(length, k')`` on one axis."""
    span = min(kernel_size, length)
    keys = window_starts(length, kernel_size, device)[:, None] + torch.arange(span, device=device)
    bias = keys - torch.arange(length, device=device)[:, None] + kernel_size - 1
    return keys, bias


def _neighborhood_attention_torch(q: Tensor, k: Tensor, v: Tensor, kernel_size: int,
                                  rpb: Optional[Tensor]) -> Tensor:
    batch, heads, height, width, dim = q.shape
    rows, bias_rows = _axis_windows(height, kernel_size, q.device)
    cols, bias_cols = _axis_windows(width, kernel_size, q.device)
    # flat key index for (query row, query col, window row, window col)
    index = (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(-1)
    neighbours = height * width, rows.size(1) * cols.size(1)
    k_nb = k.reshape(batch, heads, -1, dim)[:, :, index].view(batch, heads, *neighbours, dim)
    v_nb = v.reshape(batch, heads, -1, dim)[:, :, index].view(batch, heads, *neighbours, dim)
    logits = torch.einsum('bnpd,bnpjd->bnpj', q.reshape(batch, heads, -1, dim), k_nb)
    if rpb is not None:
        bias = rpb[:, bias_rows[:, None, :, None], bias_cols[None, :, None, :]]
        logits = logits + bias.reshape(heads, *neighbours).to(logits.dtype)
    attn = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
    out = torch.einsum('bnpj,bnpjd->bnpd', attn, v_nb)
    return out.view(batch, heads, height, width, dim)


def _natten_available(q, k, v, kernel_size, rpb) -> bool:
    if rpb is not None or q.shape[2] < kernel_size or q.shape[3] < kernel_size:
        return False
    try:
        import natten  # noqa: F401
    except ImportError:
        return False
    return q.is_cuda


def _neighborhood_attention_natten(q, k, v, kernel_size, rpb):
    from natten.functional import na2d

    # natten takes (B, H, W, heads, d) and scales by itself: q here is already scaled
    out = na2d(*(t.permute(0, 2, 3, 1, 4) for t in (q, k, v)), kernel_size=kernel_size, scale=1.0)
    return out.permute(0, 3, 1, 2, 4)


_neighborhood_attention = OpDispatcher('neighborhood_attention', {
    'natten': Backend(_neighborhood_attention_natten, _natten_available),
    'torch': Backend(_neighborhood_attention_torch, always),
})


def neighborhood_attention_2d(q: Tensor, k: Tensor, v: Tensor, kernel_size: int,
                              rpb: Optional[Tensor] = None) -> Tensor:
    """Neighborhood attention on a 2-D map.

    Args:
        q, k, v: ``(B, heads, H, W, d)``; ``q`` already multiplied by its scale.
        kernel_size: odd window size ``k``.
        rpb: ``(heads, 2k-1, 2k-1)`` relative position bias, or None.

    Returns:
        ``(B, heads, H, W, d)``.
    """
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f'q, k, v must share one (B, heads, H, W, d) shape, got '
                         f'{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f'kernel_size must be odd and positive, got {kernel_size}')
    span = 2 * kernel_size - 1
    if rpb is not None and rpb.shape != (q.shape[1], span, span):
        raise ValueError(f'rpb must be ({q.shape[1]}, {span}, {span}), got {tuple(rpb.shape)}')
    return _neighborhood_attention(q, k, v, kernel_size, rpb)
