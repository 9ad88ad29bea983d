"""Global multi-head attention with an additive bias (stage 4 of the SegMAN encoder)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import Backend, OpDispatcher, runs_anywhere


def _biased_attention_torch(q: Tensor, k: Tensor, v: Tensor, bias) -> Tensor:
    logits = q @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype) @ v


def _biased_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, bias) -> Tensor:
    # PyTorch's fused kernels need every input with unit stride along d; SegMAN's stage-4
    # value (the neighborhood attention's output) is laid out along the tokens, which sent
    # SegMAN-L's attention to the float32 math path (about 0.45 ms a block at batch 16,
    # against a copy of 5 MB)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    mask = None if bias is None else bias.to(q.dtype).unsqueeze(0).expand(q.size(0), -1, -1, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


_SDPA_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _sdpa_unavailable(q, *args) -> Optional[str]:
    """PyTorch's fused attention: on CUDA, and on the CPU for float32, float64 and bfloat16
    (5x the reference's speed at SegMAN-T's 2048 stage-4 tokens, 1024x2048 inputs)."""
    if not q.is_cuda and q.dtype not in _SDPA_CPU_DTYPES:
        return f'{q.dtype} on the CPU (it runs float32, float64 and bfloat16 there)'
    return None


_biased_attention = OpDispatcher('biased_attention', {
    'sdpa': Backend(_biased_attention_sdpa, _sdpa_unavailable),
    'torch': Backend(_biased_attention_torch, runs_anywhere),
})


def biased_attention(q: Tensor, k: Tensor, v: Tensor, bias=None) -> Tensor:
    """``softmax(q @ k^T + bias) @ v`` with ``q`` already scaled.

    Args:
        q, k, v: ``(B, heads, L, d)``.
        bias: ``(heads, L, L)`` or None.

    Returns:
        ``(B, heads, L, d)``.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f'q, k, v must share one (B, heads, L, d) shape, got '
                         f'{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    length = q.size(2)
    if bias is not None and bias.shape != (q.size(1), length, length):
        raise ValueError(f'bias must be ({q.size(1)}, {length}, {length}), got {tuple(bias.shape)}')
    return _biased_attention(q, k, v, bias)
