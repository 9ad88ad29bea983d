"""Triton backend of :func:`mmseg_segman.ops.pointwise_conv2d`: a 1x1 convolution of a
``(B, C, H, W)`` map as one matrix product per batch element, ``W (O, C) @ x[b] (C, H*W)``,
with what follows it in a SegMAN block done before the tile is stored: the bias, the FFN's
GELU, and the block's residual connection ``shortcut + sample_scale[b] * (scale * y + shift)``
(layer scale and stochastic depth).

Run as a 1x1 convolution followed by those layers, PyTorch stores the product, then reads and
writes it again for each of them: in SegMAN-L's inference the bias alone (a broadcast add)
took 14% of the GPU time, more than the products themselves, the layer scale (a grouped 1x1
convolution), the GELU and the residual adds 8% more. One program here owns a
``BLOCK_O x BLOCK_P`` tile of outputs of one batch element and walks the input channels in
steps of ``BLOCK_K`` on the tensor cores (float32 accumulation); programs of one pixel tile
are launched together, so its input is read from the cache by all but the first.

Backward (PyTorch's batched matrix products, cuBLAS): with ``g`` the output gradient, the
shortcut's gradient is ``g`` itself; without GELU the layer scale and the per-sample factor
fold into the weight, ``dx[b] = (k_b s W)^T g[b]``, and every parameter gradient comes from
``G = sum_b k_b g[b] x[b]^T`` and ``S = sum_b k_b sum_p g[b]``: ``dW = s G``,
``d bias = s S``, ``d scale = rowsum(W G) + bias S``, ``d shift = S``, so no product is
saved and no map-sized pass runs but the reduction of ``g``. With GELU the pre-activation is
recomputed (the same kernel without it) instead of kept: a product against a map 4 channels
wide less in memory. Sizes are runtime values but for the pixel count (whether it is a
multiple of 16, which aligns the loads): at most two compilations per (dtype, epilogue).
A plain ``torch.autograd.Function``, launched directly when autograd does not record, as
:mod:`.triton_layer_norm` explains; under ``torch.compile`` the reference runs.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_jit import dot_precision, jit_with_runtime_ints, records_autograd

BLOCK_P = 128
BLOCK_K = 32
NUM_STAGES = 3
_RUNTIME_INTS = {'channels', 'out_channels'}
SQRT_HALF = tl.constexpr(0.7071067811865476)


def block_o(out_channels: int) -> Tuple[int, int]:
    """``(BLOCK_O, num_warps)``: 64 output channels with 4 warps where there are at most 64
    (SegMAN-T's first stage), else 128 with 8."""
    return (64, 4) if out_channels <= 64 else (128, 8)


@jit_with_runtime_ints(_RUNTIME_INTS)
def _pw_fwd_kernel(x_ptr, w_ptr, bias_ptr, shortcut_ptr, scale_ptr, shift_ptr, sample_ptr, out_ptr,
                   channels, out_channels, pixels,
                   HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
                   HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SAMPLE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    b = tl.program_id(2).to(tl.int64)
    o_ok = o < out_channels
    p_ok = p < pixels
    x_base = x_ptr + b * channels * pixels
    acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, channels, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < channels
        w = tl.load(w_ptr + o[:, None] * channels + k[None, :], mask=o_ok[:, None] & k_ok[None, :],
                    other=0.0)
        x = tl.load(x_base + k[:, None] * pixels + p[None, :], mask=k_ok[:, None] & p_ok[None, :],
                    other=0.0)
        acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[:, None]
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * SQRT_HALF))
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_SHIFT:
        acc += tl.load(shift_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_SAMPLE:
        acc *= tl.load(sample_ptr + b).to(tl.float32)
    offsets = b * out_channels * pixels + o[:, None] * pixels + p[None, :]
    ok = o_ok[:, None] & p_ok[None, :]
    if HAS_SHORTCUT:
        acc += tl.load(shortcut_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool,
            shortcut: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
            sample_scale: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """``x (B, C, P)`` and ``weight (O, C)`` contiguous, of one dtype; ``shortcut (B, O, P)``
    contiguous; the vectors contiguous, any float dtype. Returns ``(B, O, P)``."""
    batch, channels, pixels = x.shape
    out_channels = weight.shape[0]
    out = torch.empty(batch, out_channels, pixels, dtype=out_dtype, device=x.device)
    block, warps = block_o(out_channels)
    grid = (triton.cdiv(out_channels, block), triton.cdiv(pixels, BLOCK_P), batch)
    _pw_fwd_kernel[grid](
        x, weight, *(x if t is None else t for t in (bias, shortcut, scale, shift, sample_scale)),
        out, channels, out_channels, pixels, HAS_BIAS=bias is not None, GELU=gelu,
        HAS_SHORTCUT=shortcut is not None, HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None, HAS_SAMPLE=sample_scale is not None,
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_O=block, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K,
        num_warps=warps, num_stages=NUM_STAGES)
    return out


def _weight_products(g: Tensor, x: Tensor, sample_scale: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``G = sum_b k_b g[b] x[b]^T (O, C)`` and ``S = sum_b k_b sum_p g[b] (O,)``, float32."""
    per_batch = torch.bmm(g, x.transpose(1, 2)).float()  # (B, O, C)
    sums = g.sum(2, dtype=torch.float32)  # (B, O)
    if sample_scale is not None:
        k = sample_scale.float()
        per_batch, sums = per_batch * k[:, None, None], sums * k[:, None]
    return per_batch.sum(0), sums.sum(0)


class _PointwiseConv2d(torch.autograd.Function):
    """``shortcut + k_b * (scale * act(W x + bias) + shift)`` on ``(B, C, P)`` maps."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool,
                shortcut: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                sample_scale: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(x, weight, bias, scale, sample_scale)
        ctx.gelu = gelu
        ctx.shortcut_dtype = None if shortcut is None else shortcut.dtype
        ctx.shift_dtype = None if shift is None else shift.dtype
        return _launch(x, weight, bias, gelu, shortcut, scale, shift, sample_scale, out_dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, bias, scale, sample_scale = ctx.saved_tensors
        needed = ctx.needs_input_grad
        g = g.contiguous()
        d_shortcut = g.to(ctx.shortcut_dtype) if needed[4] else None
        factor = None  # k_b * scale_o, (B, O, 1)
        if scale is not None or sample_scale is not None:
            factor = torch.ones(1, weight.shape[0], 1, device=g.device)
            if scale is not None:
                factor = factor * scale.float().view(1, -1, 1)
            if sample_scale is not None:
                factor = factor * sample_scale.float().view(-1, 1, 1)
        d_scale = d_shift = None
        if ctx.gelu:
            pre = _launch(x, weight, bias, False, None, None, None, None, g.dtype)
            if needed[5]:  # d scale = sum k_b g gelu(pre)
                k = 1.0 if sample_scale is None else sample_scale.float().view(-1, 1, 1)
                d_scale = (g.float() * k * torch.nn.functional.gelu(pre.float())).sum((0, 2))
            if needed[6]:
                k = 1.0 if sample_scale is None else sample_scale.float().view(-1, 1)
                d_shift = (g.sum(2, dtype=torch.float32) * k).sum(0)
            g_pre = torch.ops.aten.gelu_backward(g if factor is None else (g * factor).to(g.dtype), pre)
            d_weight, d_bias = _weight_products(g_pre, x, None)
            dx = torch.bmm(weight.t().expand(g.shape[0], -1, -1), g_pre) if needed[0] else None
        else:
            products, sums = _weight_products(g, x, sample_scale)
            s = None if scale is None else scale.float()
            d_weight = products if s is None else products * s[:, None]
            d_bias = sums if s is None else sums * s
            if needed[5]:
                d_scale = (weight.float() * products).sum(1)
                if bias is not None:
                    d_scale = d_scale + bias.float() * sums
            d_shift = sums if needed[6] else None
            dx = None
            if needed[0]:
                w = weight[None] if factor is None else (weight.float()[None] * factor).to(weight.dtype)
                dx = torch.bmm(w.transpose(1, 2).expand(g.shape[0], -1, -1), g)
        return (dx, d_weight.to(weight.dtype) if needed[1] else None,
                d_bias.to(bias.dtype) if needed[2] else None, None, d_shortcut,
                d_scale.to(scale.dtype) if needed[5] else None,
                d_shift.to(ctx.shift_dtype) if needed[6] else None, None, None)


def pointwise_conv2d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                            gelu: bool = False, shortcut: Optional[Tensor] = None,
                            scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                            sample_scale: Optional[Tensor] = None,
                            out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``shortcut + sample_scale[b] * (scale * act(W x + bias) + shift)``, each term optional
    (``act`` GELU if ``gelu``), for ``x (B, C, P)`` and ``weight (O, C)`` contiguous and of one
    float dtype, ``shortcut (B, O, P)`` contiguous, ``bias``/``scale``/``shift`` ``(O,)`` and
    ``sample_scale (B,)`` of any float dtype. Returns ``(B, O, P)`` in ``out_dtype`` (default
    ``x``'s). Without autograd recording (inference) the kernel is launched directly."""
    out_dtype = out_dtype or x.dtype
    args = (x, weight, bias, gelu, shortcut, scale, shift, sample_scale, out_dtype)
    if records_autograd(x, weight, bias, shortcut, scale, shift):
        return _PointwiseConv2d.apply(*args)
    return _launch(*args)
