"""Global multi-head attention with an additive bias (stage 4 of the SegMAN encoder)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .dispatch import Backend, OpDispatcher, runs_anywhere


def _biased_attention_torch(q: Tensor, k: Tensor, v: Tensor, bias) -> Tensor:
    logits = q @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype) @ v


# PyTorch's fused kernels, cuDNN's left out: with a bias, torch 2.11 picks cuDNN for head dims that
# are multiples of 8, and cuDNN builds an execution plan for every new sequence length (0.5-1.3 s
# for the first ones, then 40-130 ms each, stage 4 on an H100: SegMAN-T's first pass over 25 new
# image shapes took 4-7x its second); the memory-efficient kernel builds none
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _biased_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, bias) -> Tensor:
    # the fused kernels take head dims that are multiples of 8 with unit stride along d;
    # SegMAN-B's (28) went to the float32 math path. Zeros appended to q and k leave every
    # product q.k as it was (the scale is given, not derived from d), and the value's zero
    # columns are cut off the output. SegMAN's stage-4 value (the neighborhood attention's
    # output) is laid out along the tokens, and the copy makes d unit-stride too (it went to
    # the math path: about 0.45 ms a SegMAN-L block at batch 16, against a copy of 5 MB)
    dim = q.size(-1)
    pad = -dim % 8
    q, k, v = (F.pad(t, (0, pad)) if pad else t if t.stride(-1) == 1 else t.contiguous()
               for t in (q, k, v))
    mask = None if bias is None else bias.to(q.dtype).unsqueeze(0).expand(q.size(0), -1, -1, -1)
    with sdpa_kernel(_SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    return out[..., :dim] if pad else out


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
