"""Triton backend of :func:`mmseg_segman.ops.pointwise_conv2d`: a 1x1 convolution of a
``(B, C, H, W)`` map as one matrix product per batch element, ``W (O, C) @ x[b] (C, H*W)``,
with what follows it in a SegMAN block done before the tile is stored: the bias, the FFN's
GELU, and the block's residual connection ``shortcut + sample_scale[b] * (scale * y + shift)``
(layer scale and stochastic depth); at inference, a decode head ``ConvModule``'s batch norm by
its running statistics and its ReLU (:func:`pointwise_conv2d_inference_triton`, no backward).

Run as a 1x1 convolution followed by those layers, PyTorch stores the product, then reads and
writes it again for each of them: in SegMAN-L's inference the bias alone (a broadcast add)
took 14% of the GPU time, more than the products themselves, the layer scale (a grouped 1x1
convolution), the GELU and the residual adds 8% more. One program here owns a
``BLOCK_O x BLOCK_P`` tile of outputs of one batch element and walks the input channels in
steps of ``BLOCK_K`` on the tensor cores (float32 accumulation; float32 maps in TF32 where
cuDNN's convolutions are, :func:`~.triton_jit.conv_dot_precision`); programs of one pixel tile
are launched together, so its input is read from the cache by all but the first. For 16-bit
maps of at most 128 channels (the first stages) a program instead keeps its tile of the whole
weight and walks pixel tiles of every batch element, the next tiles' inputs loaded while it
multiplies (``resident``, :func:`launch_config`): with two or three steps of ``BLOCK_K`` a
tile, the pipeline never filled. The weight
is read in its own dtype and rounded to the map's in the tile, as autocast rounds it: eagerly
the float32 parameter, with no cast launched (eager inference is bound by the host's time);
compiled inference passes it cast (:mod:`.pointwise_conv`). The GELU's erf is a rational
approximation as accurate as libdevice's at a fraction of its cost
(:func:`~.triton_jit.normal_cdf_and_density`).

Backward: the input gradient in Triton, the weight gradient by cuBLAS, and few small
operations around them (training is bound by the host's time, docs/benchmarks.md). The
shortcut's gradient is the output gradient ``g`` itself. With GELU, one pass of the forward's
product computes ``g' = g k_b s GELU'(W x + bias)`` (the pre-activation recomputed in the
tile, not kept); without it ``g' = g`` and the layer scale ``s`` and factor ``k_b`` stay
outside the products. Then ``dx = (s W)^T (k_b g')`` is the forward kernel again on the
transposed weight (its columns scaled by ``s``, each batch element's result by ``k_b``). The
weight products ``G = sum_b k_b g'[b] x[b]^T`` and the sums ``S_b = sum g'[b]`` come from one
batched cuBLAS product (float32 accumulation and result), its weighted sum over the batch and
one sum (cuDNN's weight gradient, which reduces over the batch too, launches more kernels,
transposing both maps to channels-last first, docs/benchmarks.md; a Triton product split over
batch and pixels gave wrong, run-dependent bfloat16 results on an H100 for 96 input channels,
cause not found), and one more kernel turns them into every parameter gradient: with ``S =
sum_b k_b S_b``, ``dW = s G``, ``d bias = s S``, ``d scale = rowsum(W G) + bias S``, ``d shift
= S``.
Sizes are runtime values but for the pixel and input channel counts (whether each is a
multiple of 16, which aligns and widens the loads: the weight's rows are read 16 bytes at a
time only where the channel count is known to be a multiple of 16, docs/benchmarks.md): at
most four compilations per (dtype, epilogue, launch shape). ``torch.compile`` traces the
kernels as custom ops (:data:`POINTWISE_CONV2D`, a :class:`~.triton_jit.TritonAutogradOp`;
the inference epilogues ``mmseg_segman::pointwise_conv2d_inference_forward``).
"""
import functools
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .depthwise_conv import NO_NORM, RunningBatchNorm
from .dispatch import cast
from .triton_jit import (INV_SQRT_2PI, TritonAutogradOp, aligned, alignment, cdiv,
                         conv_dot_precision, jit_with_runtime_ints, launch, next_power_of_2,
                         normal_cdf_and_density, records_autograd, running_norm_scale_and_shift)

# the pixel count changes with the input size: a runtime int, aligned by ALIGN (specialised by
# Triton on being a multiple of 16, it compiled the kernels again at 16x16 maps after 15x15
# ones, docs/benchmarks.md); channel counts are the layers' own and stay specialised
_RUNTIME_INTS = {'out_channels', 'pixels'}


class Config(NamedTuple):
    """Launch shape: a ``block_o x block_p`` output tile, ``block_k`` input channels a step;
    ``resident`` (0 or 1): all the input channels in one step (``block_k`` at least their
    count), each program keeping its weight tile and walking pixel tiles of every batch element
    (:data:`RESIDENT_PROGRAMS_PER_SM` programs a multiprocessor)."""
    block_o: int
    block_p: int
    block_k: int
    num_warps: int
    num_stages: int
    resident: int = 0


# the most input channels a resident program takes in one step, and its programs a
# multiprocessor
RESIDENT_MAX_CHANNELS = 128
RESIDENT_PROGRAMS_PER_SM = 2
H100_MULTIPROCESSORS = 132


def launch_config(channels: int, out_channels: int, pixels: int, element_size: int = 2) -> Config:
    """The launch shape for a product of ``out_channels x channels`` by ``channels x pixels``
    of ``element_size``-byte numbers. For 16-bit inputs of at most
    :data:`RESIDENT_MAX_CHANNELS` channels, resident programs of 128 x 64 tiles (64 x 64 for at
    most 64 output channels) with 4 warps, three tiles in flight: SegMAN-L's first-stage 1x1
    kernels took 690 -> 530 us a training block at batch 8 on an H200 (docs/benchmarks.md).
    Else 64 x 128 tiles with 4 warps where there are at most 64 output channels, or 128 x 256
    with 8; 64 channels a step, 32 for float32 (whose pipelined tiles would not fit an H100's
    227 KiB of shared memory). For 16-bit inputs the fastest, or within 10% of it, of the
    shapes ``tools/gpu_checks/check_pointwise_conv.py --sweep`` tried for SegMAN-T's and -L's
    layers on an H200 (docs/benchmarks.md)."""
    if element_size == 2 and channels <= RESIDENT_MAX_CHANNELS:
        return Config(64 if out_channels <= 64 else 128, 64, max(16, next_power_of_2(channels)),
                      4, 3, resident=1)
    config = Config(64, 128, 64, 4, 4) if out_channels <= 64 else Config(128, 256, 64, 8, 3)
    return config._replace(block_k=32) if element_size > 2 else config


def _multiprocessors(x: Tensor) -> int:
    """The multiprocessor count of ``x``'s CUDA device; an H100's where CUDA was never
    initialised (fake CUDA tensors, whose launches run nothing:
    ``tools/analysis_tools/saved_for_backward.py``), 2 for a CPU tensor (Triton's
    interpreter)."""
    if not x.is_cuda:
        return 2
    if not torch.cuda.is_initialized():
        return H100_MULTIPROCESSORS
    return _device_multiprocessors(x.device.index or 0)


@functools.lru_cache(maxsize=None)
def _device_multiprocessors(device: int) -> int:
    """The multiprocessor count of CUDA device ``device``, read once (a few us a call)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _weight_tile(w_ptr, scale_ptr, o, k, o_ok, k_ok, sw_o, sw_k, dtype: tl.constexpr,
                 SCALE_K: tl.constexpr):
    """``W[o, k]`` (its columns times ``scale`` if ``SCALE_K``) in ``dtype``."""
    w = tl.load(w_ptr + o[:, None] * sw_o + k[None, :] * sw_k, mask=o_ok[:, None] & k_ok[None, :],
                other=0.0)
    if SCALE_K:
        column_scale = tl.load(scale_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        w = w.to(tl.float32) * column_scale[None, :]
    return w.to(dtype)


@triton.jit
def _epilogue(acc, b, o, p, o_ok, p_ok, out_channels, pixels, bias_ptr, norm_ptrs, eps,
              shortcut_ptr, scale_ptr, shift_ptr, sample_ptr, grad_ptr, out_ptr,
              HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, GELU: tl.constexpr,
              GELU_GRAD: tl.constexpr, RELU: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
              HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SAMPLE: tl.constexpr):
    """:func:`_pw_fwd_kernel`'s epilogue of the float32 product ``acc`` of output channels
    ``o`` and pixels ``p`` of batch element ``b``, stored; ``norm_ptrs`` the norm's mean,
    variance, weight and bias."""
    offsets = b * out_channels * pixels + o[:, None] * pixels + p[None, :]
    ok = o_ok[:, None] & p_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_NORM:
        mean_ptr, var_ptr, gamma_ptr, beta_ptr = norm_ptrs
        norm_scale, norm_shift = running_norm_scale_and_shift(mean_ptr, var_ptr, gamma_ptr,
                                                              beta_ptr, eps, o, o_ok)
        acc = acc * norm_scale[:, None] + norm_shift[:, None]
    if GELU_GRAD:
        cdf, density = normal_cdf_and_density(acc)
        acc = tl.load(grad_ptr + offsets, mask=ok, other=0.0).to(tl.float32) \
            * (cdf + acc * density * INV_SQRT_2PI)
    elif GELU:
        cdf, _ = normal_cdf_and_density(acc)
        acc *= cdf
    elif RELU:
        acc = tl.maximum(acc, 0.0)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_SHIFT:
        acc += tl.load(shift_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_SAMPLE:
        acc *= tl.load(sample_ptr + b).to(tl.float32)
    if HAS_SHORTCUT:
        acc += tl.load(shortcut_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=ok)


@jit_with_runtime_ints(_RUNTIME_INTS | {'tiles'})
def _pw_fwd_kernel(x_ptr, w_ptr, bias_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, shortcut_ptr,
                   scale_ptr, shift_ptr, sample_ptr, grad_ptr, out_ptr, eps, channels,
                   out_channels, pixels, tiles, sw_o, sw_k, HAS_BIAS: tl.constexpr,
                   HAS_NORM: tl.constexpr, GELU: tl.constexpr, GELU_GRAD: tl.constexpr,
                   RELU: tl.constexpr, HAS_SHORTCUT: tl.constexpr, HAS_SCALE: tl.constexpr,
                   HAS_SHIFT: tl.constexpr, HAS_SAMPLE: tl.constexpr, SCALE_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr, ALIGN: tl.constexpr):
    """``out[b] = epilogue(W x[b])`` for ``W (out_channels, channels)`` at strides
    ``(sw_o, sw_k)``, its columns times ``scale`` if ``SCALE_K``. Epilogue, in order: ``+ bias``;
    ``HAS_NORM``: a batch norm by its running statistics; then either ``GELU`` or ``RELU`` and
    ``* scale``, ``+ shift``, ``* sample[b]``, ``+ shortcut``, or (``GELU_GRAD``) ``grad *
    GELU'(.) * scale * sample[b]``, the gradient before the GELU.
    ``pixels`` (a runtime int) is a multiple of ``ALIGN``. A program owns output channel tile
    ``program_id(0)`` and either the pixel tile ``program_id(1)`` of batch element
    ``program_id(2)``, or, ``RESIDENT`` (``channels <= BLOCK_K``), every ``num_programs(1)``-th
    of the ``tiles`` pixel tiles of all the batch elements, from ``program_id(1)``, with the
    weight tile loaded once."""
    pixels = aligned(pixels, ALIGN)
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < out_channels
    dtype = x_ptr.dtype.element_ty
    norm_ptrs = (mean_ptr, var_ptr, gamma_ptr, beta_ptr)
    if RESIDENT:
        k = tl.arange(0, BLOCK_K)
        k_ok = k < channels
        w = _weight_tile(w_ptr, scale_ptr, o, k, o_ok, k_ok, sw_o, sw_k, dtype, SCALE_K)
        pixel_tiles = tl.cdiv(pixels, BLOCK_P)
        for tile in range(tl.program_id(1), tiles, tl.num_programs(1)):
            b = (tile // pixel_tiles).to(tl.int64)
            p = (tile % pixel_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
            p_ok = p < pixels
            x = tl.load(x_ptr + b * channels * pixels + k[:, None] * pixels + p[None, :],
                        mask=k_ok[:, None] & p_ok[None, :], other=0.0)
            acc = tl.dot(w, x, input_precision=DOT_PRECISION)
            _epilogue(acc, b, o, p, o_ok, p_ok, out_channels, pixels, bias_ptr, norm_ptrs, eps,
                      shortcut_ptr, scale_ptr, shift_ptr, sample_ptr, grad_ptr, out_ptr,
                      HAS_BIAS, HAS_NORM, GELU, GELU_GRAD, RELU, HAS_SHORTCUT, HAS_SCALE,
                      HAS_SHIFT, HAS_SAMPLE)
    else:
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        b = tl.program_id(2).to(tl.int64)
        p_ok = p < pixels
        x_base = x_ptr + b * channels * pixels
        acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=tl.float32)
        for k0 in range(0, channels, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < channels
            w = _weight_tile(w_ptr, scale_ptr, o, k, o_ok, k_ok, sw_o, sw_k, dtype, SCALE_K)
            x = tl.load(x_base + k[:, None] * pixels + p[None, :],
                        mask=k_ok[:, None] & p_ok[None, :], other=0.0)
            acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
        _epilogue(acc, b, o, p, o_ok, p_ok, out_channels, pixels, bias_ptr, norm_ptrs, eps,
                  shortcut_ptr, scale_ptr, shift_ptr, sample_ptr, grad_ptr, out_ptr, HAS_BIAS,
                  HAS_NORM, GELU, GELU_GRAD, RELU, HAS_SHORTCUT, HAS_SCALE, HAS_SHIFT, HAS_SAMPLE)


@jit_with_runtime_ints(_RUNTIME_INTS | {'batch'})
def _pw_param_grad_kernel(g_ptr, s_ptr, sample_ptr, w_ptr, bias_ptr, scale_ptr, dw_ptr,
                          dbias_ptr, dscale_ptr, dshift_ptr, batch, channels, out_channels, sw_o,
                          sw_k, HAS_SAMPLE: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_SCALE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    """From ``G (out_channels, channels)`` and the per-sample sums ``S_b (batch,
    out_channels)`` (float32, contiguous), with ``S = sum_b k_b S_b`` (``k_b = sample[b]``, 1
    without ``HAS_SAMPLE``): ``dW = s G``, ``d bias = s S``, ``d scale = rowsum(W G) + bias
    S`` and ``d shift = S`` (``s = 1`` without ``HAS_SCALE``), computed in float32."""
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < out_channels
    total = tl.zeros((BLOCK_O, ), dtype=tl.float32)
    for b in range(batch):
        sums = tl.load(s_ptr + b * out_channels + o, mask=o_ok, other=0.0)
        if HAS_SAMPLE:
            sums *= tl.load(sample_ptr + b).to(tl.float32)
        total += sums
    scale = tl.full((BLOCK_O, ), 1.0, tl.float32)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + o, mask=o_ok, other=0.0).to(tl.float32)
    row = tl.zeros((BLOCK_O, ), dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = o_ok[:, None] & (c < channels)[None, :]
        product = tl.load(g_ptr + o[:, None] * channels + c[None, :], mask=ok, other=0.0)
        tl.store(dw_ptr + o[:, None] * channels + c[None, :],
                 (product * scale[:, None]).to(dw_ptr.dtype.element_ty), mask=ok)
        if HAS_SCALE:
            w = tl.load(w_ptr + o[:, None] * sw_o + c[None, :] * sw_k, mask=ok, other=0.0)
            row += tl.sum(w.to(tl.float32) * product, axis=1)
    if HAS_BIAS:
        tl.store(dbias_ptr + o, (total * scale).to(dbias_ptr.dtype.element_ty), mask=o_ok)
    if HAS_SCALE:
        if HAS_BIAS:
            row += tl.load(bias_ptr + o, mask=o_ok, other=0.0).to(tl.float32) * total
        tl.store(dscale_ptr + o, row.to(dscale_ptr.dtype.element_ty), mask=o_ok)
    tl.store(dshift_ptr + o, total.to(dshift_ptr.dtype.element_ty), mask=o_ok)


def _product(x: Tensor, weight: Tensor, out_dtype: torch.dtype, bias: Optional[Tensor] = None,
             gelu: bool = False, shortcut: Optional[Tensor] = None, scale: Optional[Tensor] = None,
             shift: Optional[Tensor] = None, sample_scale: Optional[Tensor] = None,
             gelu_grad: Optional[Tensor] = None, transpose: bool = False,
             config: Optional[Config] = None, norm: Optional[RunningBatchNorm] = None,
             relu: bool = False) -> Tensor:
    """:func:`_pw_fwd_kernel` for ``x (B, C, H, W)`` contiguous and ``weight (O, C, ...)`` of
    any float dtype; with ``transpose`` the product is by ``weight^T`` (``x`` has ``O``
    channels) and ``scale`` scales its columns. ``shortcut`` and ``gelu_grad`` are ``(B, O,
    H, W)`` contiguous, the vectors (and ``norm``'s) contiguous. Returns the ``(B, O, H, W)``
    result (``(B, C, H, W)`` with ``transpose``)."""
    batch, channels, height, width = x.shape
    pixels = height * width
    w_strides = (weight.stride(1), weight.stride(0)) if transpose else weight.stride()[:2]
    out_channels = weight.shape[1] if transpose else weight.shape[0]
    out = torch.empty(batch, out_channels, height, width, dtype=out_dtype, device=x.device)
    config = config or launch_config(channels, out_channels, pixels, x.element_size())
    o_tiles, pixel_tiles = cdiv(out_channels, config.block_o), cdiv(pixels, config.block_p)
    tiles = batch * pixel_tiles
    if config.resident:
        if config.block_k < channels:
            raise ValueError(f'a resident launch takes all {channels} input channels in one '
                             f'step; block_k is {config.block_k}')
        programs = RESIDENT_PROGRAMS_PER_SM * _multiprocessors(x) // o_tiles
        grid = (o_tiles, max(1, min(tiles, programs)))
    else:
        grid = (o_tiles, pixel_tiles, batch)
    vectors = (x if t is None else t for t in (bias, *(norm or NO_NORM)[:4], shortcut, scale,
                                                shift, sample_scale, gelu_grad))
    launch(_pw_fwd_kernel, grid, x, weight, *vectors, out, float(norm.eps) if norm else 0.0,
           channels, out_channels, pixels, tiles, *w_strides, HAS_BIAS=bias is not None,
           HAS_NORM=norm is not None, GELU=gelu, GELU_GRAD=gelu_grad is not None, RELU=relu,
           HAS_SHORTCUT=shortcut is not None, HAS_SCALE=scale is not None and not transpose,
           HAS_SHIFT=shift is not None, HAS_SAMPLE=sample_scale is not None,
           SCALE_K=scale is not None and transpose, DOT_PRECISION=conv_dot_precision(x.dtype),
           BLOCK_O=config.block_o, BLOCK_P=config.block_p, BLOCK_K=config.block_k,
           RESIDENT=bool(config.resident), ALIGN=alignment(pixels), num_warps=config.num_warps,
           num_stages=config.num_stages)
    return out


# the parameter-gradient kernel's tile: 4 output channels, 512 input channels a step (one
# program per 4 rows of dW: SegMAN-L's stage-3 fc2 took 50 us on 14 programs of 32 rows, 12 on
# 108; the fastest of seven tiles at every layer of SegMAN-L, H200, docs/benchmarks.md)
PARAM_BLOCK_O, PARAM_BLOCK_C = 4, 512
# torch.bmm(..., out_dtype=float32) of 16-bit inputs: CUDA only (PyTorch >= 2.8)
_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, 'dtype')


def _weight_products(g: Tensor, x: Tensor,
                     sample_scale: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``G = sum_b k_b g[b] x[b]^T (O, C)`` and the per-sample sums ``S_b = sum_p g[b] (B,
    O)``, float32, for ``g (B, O, H, W)`` and ``x (B, C, H, W)`` contiguous and of one dtype:
    one batched cuBLAS product (float32 accumulation and result, for 16-bit inputs too), its
    sum over the batch, weighted by ``sample_scale (B,)`` (``k_b``, 1 when None), and one sum
    over the pixels."""
    g_rows, x_columns = g.flatten(2), x.flatten(2).transpose(1, 2)
    if g.dtype == torch.float32:
        products = torch.bmm(g_rows, x_columns)
    elif g.is_cuda and _BMM_OUT_DTYPE:
        products = torch.bmm(g_rows, x_columns, out_dtype=torch.float32)
    else:  # the CPU (Triton's interpreter in the tests) has no bmm with out_dtype
        products = torch.bmm(g_rows.float(), x_columns.float())
    if sample_scale is not None:
        products = (sample_scale.to(torch.float32)[None] @ products.flatten(1)).view(
            products.shape[1:])
    elif g.size(0) > 1:
        products = products.sum(0)
    else:
        products = products[0]
    return products, g_rows.sum(2, dtype=torch.float32)


def _parameter_gradients(g: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                         scale: Optional[Tensor],
                         sample_scale: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``dW`` (``weight``'s shape and dtype) and, float32 ``(3, O)``, ``d bias``, ``d scale``
    and ``d shift`` for ``g (B, O, H, W)`` and ``x (B, C, H, W)``, contiguous and of one
    dtype; see the module doc. The products and sums of :func:`_weight_products`, then one
    kernel."""
    out_channels, channels = weight.shape[:2]
    products, sums = _weight_products(g, x, sample_scale)
    d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=x.device)
    d_vectors = torch.empty(3, out_channels, dtype=torch.float32, device=x.device)
    d_bias, d_scale, d_shift = d_vectors.unbind()
    launch(_pw_param_grad_kernel, (cdiv(out_channels, PARAM_BLOCK_O), ), products, sums,
           weight if sample_scale is None else sample_scale, weight,
           weight if bias is None else bias, weight if scale is None else scale, d_weight, d_bias,
           d_scale, d_shift, g.size(0), channels, out_channels, *weight.stride()[:2],
           HAS_SAMPLE=sample_scale is not None, HAS_BIAS=bias is not None,
           HAS_SCALE=scale is not None, BLOCK_O=PARAM_BLOCK_O, BLOCK_C=PARAM_BLOCK_C, num_warps=4)
    return d_weight, d_vectors


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool,
             shortcut: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
             sample_scale: Optional[Tensor], out_dtype: torch.dtype, config: List[int]) -> Tensor:
    """``shortcut + k_b * (scale * act(W x + bias) + shift)`` (:func:`_product`); ``config``
    a :class:`Config`'s values, or empty (:func:`launch_config`)."""
    return _product(x, weight, out_dtype, bias, gelu, shortcut, scale, shift, sample_scale,
                    config=Config(*config) if config else None)


def _forward_fake(x, weight, bias, gelu, shortcut, scale, shift, sample_scale, out_dtype, config):
    return x.new_empty(x.shape[0], weight.shape[0], *x.shape[2:], dtype=out_dtype)


def _backward(g: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
              scale: Optional[Tensor], shift: Optional[Tensor], sample_scale: Optional[Tensor],
              gelu: bool, config: List[int], needed: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients ``needed`` (of x, weight, bias, scale, shift), from the output's ``g``:
    ``dx`` (``x``'s dtype), ``dW`` (``weight``'s) and float32 ``(3, O)``, ``d bias``, ``d
    scale`` and ``d shift`` (where any parameter's is needed); an empty tensor for each one
    not computed. See the module doc."""
    need_x, need_weight, need_bias, need_scale, need_shift = needed
    config = Config(*config) if config else None
    g = cast(g.contiguous(), x.dtype)
    # the layer scale and per-sample factor applied in the products below
    outer_scale, outer_sample = scale, sample_scale
    if gelu:  # the gradient before the GELU, which takes them in
        if need_scale or need_shift:
            d_scale, d_shift = _gelu_scale_and_shift_gradients(g, x, weight, bias, sample_scale,
                                                               config)
        g = _product(x, weight, x.dtype, bias, scale=scale, sample_scale=sample_scale,
                     gelu_grad=g, config=config)
        outer_scale = outer_sample = None
    dx = _product(g, weight, x.dtype, scale=outer_scale, sample_scale=outer_sample,
                  transpose=True) if need_x else x.new_empty(0)
    d_weight, d_vectors = weight.new_empty(0), x.new_empty(0, dtype=torch.float32)
    # with GELU the scale's and shift's gradients came from the activation above
    if need_weight or need_bias or (not gelu and (need_scale or need_shift)):
        all_weight, d_vectors = _parameter_gradients(g, x, weight, bias, outer_scale, outer_sample)
        d_weight = all_weight if need_weight else d_weight
    if gelu and (need_scale or need_shift):
        d_bias = d_vectors[0] if d_vectors.numel() else torch.zeros_like(d_scale)
        d_vectors = torch.stack((d_bias, d_scale, d_shift))
    return dx, d_weight, d_vectors


def _backward_fake(g, x, weight, bias, scale, shift, sample_scale, gelu, config, needed):
    return (x.new_empty(x.shape if needed[0] else (0, )),
            weight.new_empty(weight.shape if needed[1] else (0, )),
            x.new_empty((3, weight.shape[0]) if any(needed[1:]) else (0, ), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, gelu, shortcut, scale, shift, sample_scale, _, config = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift, sample_scale)
    ctx.gelu, ctx.config = gelu, config
    ctx.shortcut_dtype = None if shortcut is None else shortcut.dtype


def _gradients(forward: Callable, backward: Callable) -> Callable:
    """The autograd backward: the shortcut's gradient the output's, every other by
    ``backward``, in its input's dtype."""

    def gradients(ctx, g):
        x, weight, bias, scale, shift, sample_scale = ctx.saved_tensors
        needed = ctx.needs_input_grad
        dx, d_weight, d_vectors = backward(g, x, weight, bias, scale, shift, sample_scale,
                                           ctx.gelu, ctx.config, [needed[i] for i in _DIFFERENTIABLE])
        return (dx if needed[0] else None, d_weight if needed[1] else None,
                cast(d_vectors[0], bias.dtype) if needed[2] else None, None,
                cast(g, ctx.shortcut_dtype) if needed[4] else None,
                cast(d_vectors[1], scale.dtype) if needed[5] else None,
                cast(d_vectors[2], shift.dtype) if needed[6] else None, None, None, None)

    return gradients


_DIFFERENTIABLE = (0, 1, 2, 5, 6)  # the inputs x, weight, bias, scale, shift
POINTWISE_CONV2D = TritonAutogradOp('pointwise_conv2d', _forward, _forward_fake, _backward,
                                    _backward_fake, _setup_context, _gradients)


def _gelu_scale_and_shift_gradients(g: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                                    sample_scale: Optional[Tensor],
                                    config: Optional[Config]) -> Tuple[Tensor, Tensor]:
    """``d scale = sum k_b g GELU(W x + bias)`` and ``d shift = sum k_b g`` (float32), for a
    layer scale after the GELU (not in SegMAN: its FFN scales its second 1x1 convolution)."""
    if sample_scale is not None:
        g = g * sample_scale.view(-1, 1, 1, 1).to(g.dtype)
    activation = _product(x, weight, torch.float32, bias, gelu=True, config=config)
    return (g.float() * activation).sum((0, 2, 3)), g.sum((0, 2, 3), dtype=torch.float32)


def _inference(x: Tensor, weight: Tensor, bias: Optional[Tensor], mean: Optional[Tensor],
               var: Optional[Tensor], gamma: Optional[Tensor], beta: Optional[Tensor], eps: float,
               gelu: bool, relu: bool, out_dtype: torch.dtype) -> Tensor:
    norm = None if mean is None else RunningBatchNorm(mean, var, gamma, beta, eps)
    return _product(x, weight, out_dtype, bias, gelu, norm=norm, relu=relu)


def _inference_fake(x, weight, bias, mean, var, gamma, beta, eps, gelu, relu, out_dtype):
    return _forward_fake(x, weight, bias, gelu, None, None, None, None, out_dtype, [])


_inference_op = torch.library.custom_op('mmseg_segman::pointwise_conv2d_inference_forward',
                                        _inference, mutates_args=())
_inference_op.register_fake(_inference_fake)


def pointwise_conv2d_inference_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                                      norm: Optional[RunningBatchNorm] = None,
                                      activation: Optional[str] = None,
                                      out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``act(norm(W x + bias))`` (``act``: ``'gelu'``, ``'relu'`` or None; ``norm`` a batch
    norm by its running statistics, of any float dtype) in the product's pass, for ``x (B, C,
    H, W)`` contiguous of a float dtype; ``(B, O, H, W)`` in ``out_dtype`` (default ``x``'s).
    Without autograd: refused where autograd would record the call (where it does,
    :func:`pointwise_conv2d_triton` computes the product and PyTorch's ops the rest)."""
    if records_autograd(x, weight, bias, *(norm or ())[:4]):
        raise RuntimeError('pointwise_conv2d_inference_triton has no backward pass; where '
                           'autograd records, run pointwise_conv2d_triton and the norm after it')
    args = (x, weight, bias, *(norm or NO_NORM), activation == 'gelu', activation == 'relu',
            out_dtype or x.dtype)
    return (_inference_op if torch.compiler.is_compiling() else _inference)(*args)


def pointwise_conv2d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                            gelu: bool = False, shortcut: Optional[Tensor] = None,
                            scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                            sample_scale: Optional[Tensor] = None,
                            out_dtype: Optional[torch.dtype] = None,
                            config: Optional[Config] = None) -> Tensor:
    """``shortcut + sample_scale[b] * (scale * act(W x + bias) + shift)``, each term optional
    (``act`` GELU if ``gelu``), for ``x (B, C, H, W)`` contiguous of a float dtype, ``weight
    (O, C)`` or ``(O, C, 1, 1)`` of any float dtype (rounded to ``x``'s in the product),
    ``shortcut (B, O, H, W)`` contiguous, ``bias``/``scale``/``shift`` ``(O,)`` and
    ``sample_scale (B,)`` of any float dtype. Returns ``(B, O, H, W)`` in ``out_dtype`` (default
    ``x``'s). ``config``: the launch shape (default :func:`launch_config`). Through
    :data:`POINTWISE_CONV2D`."""
    return POINTWISE_CONV2D(x, weight, bias, gelu, shortcut, scale, shift, sample_scale,
                            out_dtype or x.dtype, list(config) if config else [],
                            records=records_autograd(x, weight, bias, shortcut, scale, shift))
