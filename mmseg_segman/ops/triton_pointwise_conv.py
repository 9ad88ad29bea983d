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

Backward: PyTorch's convolution backward (cuDNN: the weight gradient reduces over batch and
pixels in one product), once. The shortcut's gradient is the output gradient ``g`` itself.
Without GELU the layer scale folds into the weight: the call with ``k_b g`` and ``s W`` gives
``dx``, and ``G = sum_b k_b g[b] x[b]^T`` and ``S = sum k_b g`` give every parameter gradient,
``dW = s G``, ``d bias = s S``, ``d scale = rowsum(W G) + bias S``, ``d shift = S``: no
product is saved and no map-sized pass runs (but ``k_b g`` under stochastic depth). With
GELU the pre-activation is recomputed (the same kernel without it) instead of kept: a map
4 channels wide less in memory. Sizes are runtime values but for the pixel count (whether
it is a multiple of 16, which aligns the loads): at most two compilations per (dtype,
epilogue, launch shape). A plain ``torch.autograd.Function``, launched directly when
autograd does not record, as :mod:`.triton_layer_norm` explains; under ``torch.compile`` the
reference runs.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .triton_jit import dot_precision, jit_with_runtime_ints, launch, records_autograd

_RUNTIME_INTS = {'channels', 'out_channels'}
SQRT_HALF = tl.constexpr(0.7071067811865476)


class Config(NamedTuple):
    """Launch shape: a ``block_o x block_p`` output tile, ``block_k`` input channels a step."""
    block_o: int
    block_p: int
    block_k: int
    num_warps: int
    num_stages: int


def launch_config(channels: int, out_channels: int, pixels: int, element_size: int = 2) -> Config:
    """The launch shape for a product of ``out_channels x channels`` by ``channels x pixels``
    of ``element_size``-byte numbers: 64 x 128 tiles with 4 warps where there are at most 64
    output channels (SegMAN-T's first stage), else 128 x 256 with 8; 64 channels a step, 32
    for float32 (whose pipelined tiles would not fit an H100's 227 KiB of shared memory). For
    16-bit inputs the fastest, or within 10% of it, of the shapes
    ``tools/gpu_checks/check_pointwise_conv.py --sweep`` tried for SegMAN-T's and -L's layers
    on an H200 (docs/benchmarks.md)."""
    config = Config(64, 128, 64, 4, 4) if out_channels <= 64 else Config(128, 256, 64, 8, 3)
    return config._replace(block_k=32) if element_size > 2 else config


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
            sample_scale: Optional[Tensor], out_dtype: torch.dtype,
            config: Optional[Config] = None) -> Tensor:
    """``x (B, C, H, W)`` and ``weight (O, C)`` contiguous, of one dtype; ``shortcut
    (B, O, H, W)`` contiguous; the vectors contiguous, any float dtype. Returns ``(B, O, H, W)``."""
    batch, channels, height, width = x.shape
    pixels, out_channels = height * width, weight.shape[0]
    out = torch.empty(batch, out_channels, height, width, dtype=out_dtype, device=x.device)
    config = config or launch_config(channels, out_channels, pixels, x.element_size())
    grid = (triton.cdiv(out_channels, config.block_o), triton.cdiv(pixels, config.block_p), batch)
    vectors = (x if t is None else t for t in (bias, shortcut, scale, shift, sample_scale))
    launch(_pw_fwd_kernel, grid, x, weight, *vectors, out, channels, out_channels, pixels,
           HAS_BIAS=bias is not None, GELU=gelu, HAS_SHORTCUT=shortcut is not None,
           HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
           HAS_SAMPLE=sample_scale is not None,
           DOT_PRECISION=dot_precision(x.dtype), BLOCK_O=config.block_o, BLOCK_P=config.block_p,
           BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def _conv_backward(g: Tensor, x: Tensor, weight: Tensor, mask) -> Tuple[Optional[Tensor], ...]:
    """``dx (B, C, H, W)``, ``dW (O, C)`` and ``d bias (O,)`` (each where ``mask`` asks) of the
    1x1 convolution of ``x (B, C, H, W)`` by ``weight (O, C)`` for ``g (B, O, H, W)``: PyTorch's
    convolution backward (cuDNN), whose weight gradient reduces over batch and pixels in one
    product."""
    out_channels, channels = weight.shape
    dx, dw, db = torch.ops.aten.convolution_backward(
        g, x, weight.view(out_channels, channels, 1, 1), [out_channels], [1, 1], [0, 0], [1, 1],
        False, [0, 0], 1, list(mask))
    return dx, None if dw is None else dw.view(weight.shape), db


class _PointwiseConv2d(torch.autograd.Function):
    """``shortcut + k_b * (scale * act(W x + bias) + shift)`` on ``(B, C, H, W)`` maps."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool,
                shortcut: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                sample_scale: Optional[Tensor], out_dtype: torch.dtype,
                config: Optional[Config]) -> Tensor:
        ctx.save_for_backward(x, weight, bias, scale, sample_scale)
        ctx.gelu, ctx.config = gelu, config
        ctx.shortcut_dtype = None if shortcut is None else shortcut.dtype
        ctx.shift_dtype = None if shift is None else shift.dtype
        return _launch(x, weight, bias, gelu, shortcut, scale, shift, sample_scale, out_dtype, config)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, bias, scale, sample_scale = ctx.saved_tensors
        needed = ctx.needs_input_grad
        g = g.contiguous()
        d_shortcut = g.to(ctx.shortcut_dtype) if needed[4] else None
        # the gradient of the branch after the layer scale: g times the per-sample factor
        if sample_scale is not None:
            g = g * sample_scale.view(-1, 1, 1, 1).to(g.dtype)
        g = g.to(x.dtype)
        d_scale = d_shift = None
        if needed[6]:
            d_shift = g.sum((0, 2, 3), dtype=torch.float32)
        if ctx.gelu:
            pre = _launch(x, weight, bias, False, None, None, None, None, x.dtype, ctx.config)
            if needed[5]:
                d_scale = (g.float() * F.gelu(pre.float())).sum((0, 2, 3))
            if scale is not None:
                g = g * scale.view(-1, 1, 1).to(g.dtype)
            g_pre = torch.ops.aten.gelu_backward(g, pre)
            dx, d_weight, d_bias = _conv_backward(g_pre, x, weight, needed[:3])
        else:
            # one convolution backward: dW and d bias before the layer scale (G and S), dx
            # through the layer-scaled weight
            w = weight
            if scale is not None:
                w = (weight.float() * scale.float()[:, None]).to(weight.dtype)
            mask = (needed[0], needed[1] or needed[5], needed[2] or needed[5])
            dx, products, sums = _conv_backward(g, x, w, mask)
            d_weight, d_bias = products, sums
            if scale is not None:
                s = scale.float()
                d_weight = products.float() * s[:, None] if needed[1] else None
                d_bias = sums.float() * s if needed[2] else None
            if needed[5]:
                d_scale = (weight.float() * products.float()).sum(1)
                if bias is not None:
                    d_scale = d_scale + bias.float() * sums.float()
        return (dx, d_weight.to(weight.dtype) if needed[1] else None,
                d_bias.to(bias.dtype) if needed[2] else None, None, d_shortcut,
                d_scale.to(scale.dtype) if needed[5] else None,
                d_shift.to(ctx.shift_dtype) if needed[6] else None, None, None, None)


def pointwise_conv2d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                            gelu: bool = False, shortcut: Optional[Tensor] = None,
                            scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                            sample_scale: Optional[Tensor] = None,
                            out_dtype: Optional[torch.dtype] = None,
                            config: Optional[Config] = None) -> Tensor:
    """``shortcut + sample_scale[b] * (scale * act(W x + bias) + shift)``, each term optional
    (``act`` GELU if ``gelu``), for ``x (B, C, H, W)`` and ``weight (O, C)`` contiguous and of
    one float dtype, ``shortcut (B, O, H, W)`` contiguous, ``bias``/``scale``/``shift`` ``(O,)``
    and ``sample_scale (B,)`` of any float dtype. Returns ``(B, O, H, W)`` in ``out_dtype`` (default
    ``x``'s). ``config``: the launch shape (default :func:`launch_config`). Without autograd
    recording (inference) the kernel is launched directly."""
    out_dtype = out_dtype or x.dtype
    args = (x, weight, bias, gelu, shortcut, scale, shift, sample_scale, out_dtype, config)
    if records_autograd(x, weight, bias, shortcut, scale, shift):
        return _PointwiseConv2d.apply(*args)
    return _launch(*args)
