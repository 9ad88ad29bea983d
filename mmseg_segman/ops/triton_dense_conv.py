"""Triton backend of :func:`mmseg_segman.ops.dense_conv2d`, for inference: a convolution of
all input channels (one group, any kernel size, stride and zero padding) as one implicit
matrix product, ``out[b, o, p] = sum_{c, r, s} W[o, c, r, s] x[b, c, ih(p, r), iw(p, s)]``,
then a batch norm by its running statistics and a GELU or ReLU before the tile is stored.

Why: cuDNN builds an execution plan for every new input shape, about 3 ms a convolution on
an H100; SegMAN-T's ten convolutions outside its blocks (the stem's four, the three
downsampling ones, the decoder's fusion and two strided ones) doubled the cost of its first
image at each new size (docs/benchmarks.md). Here every size is a runtime value: one
compilation per layer (channels, kernel, stride, padding, layout, dtype) at most two (its
output pixel count a multiple of 8 or not), whatever the image size.

One program owns a ``BLOCK_P x BLOCK_O`` tile of output pixels by output channels of one
batch element. One loop walks the kernel's taps and, within each, the input channels in
steps of ``BLOCK_K``, gathering the tile's input pixels for that tap (zero where the tap
falls into the padding) and multiplying on the tensor cores (float32 accumulation). (Unrolled
over the taps, the kernel was one pipelined loop a tap: SegMAN-L's ten convolutions took 102 s
to compile for the H100 on a 2-core CPU, its 5x5 one 68 s; as one loop 4.6 s,
docs/benchmarks.md.) The
input is read channels-last and the weight as ``(O, kh, kw, C)``, so that each pixel's
channels load 16 bytes at a time (an NCHW map is copied to channels-last first, as cuDNN
transposes it for its own tensor-core kernels; read in NCHW, one element a thread per load,
SegMAN-L's second stem convolution took 3.2-5.4 ms at batch 16 on an H100). The output is
stored NCHW or channels-last, by default in the input's layout as cuDNN's is (the stem's
convolutions hand each other channels-last maps). The weight is rounded to
the map's dtype, as autocast rounds it; float32 maps multiply in TF32 where
``torch.backends.cudnn.allow_tf32`` lets cuDNN (PyTorch's default), else float32-accurate
(``tf32x3``).

No backward: training keeps cuDNN, whose plans are made once for the crop size.
``torch.compile`` traces the kernel as the custom op ``mmseg_segman::dense_conv2d_forward``.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton.language as tl
from torch import Tensor

from .dense_conv import output_size
from .depthwise_conv import NO_NORM, RunningBatchNorm
from .triton_jit import (aligned, alignment, cdiv, conv_dot_precision, jit_with_runtime_ints,
                         launch, next_power_of_2, normal_cdf_and_density, records_autograd,
                         running_norm_scale_and_shift)

# the map sizes change with the image; channel counts, kernel, stride and padding are the
# layer's own and stay specialised
_RUNTIME_INTS = {'height', 'width', 'out_height', 'out_width'}


class Config(NamedTuple):
    """Launch shape: a ``block_p x block_o`` output tile, ``block_k`` input channels a step."""
    block_p: int
    block_o: int
    block_k: int
    num_warps: int
    num_stages: int


def _block(size: int, blocks: Tuple[int, ...]) -> int:
    """The largest of ``blocks`` that pads ``size`` by at most an eighth, else the one that
    pads it least."""
    fitting = [b for b in blocks if cdiv(size, b) * b * 8 <= size * 9]
    return fitting[0] if fitting else min(blocks, key=lambda b: (cdiv(size, b) * b, -b))


def launch_config(channels: int, out_channels: int, element_size: int = 2) -> Config:
    """The launch shape for ``channels`` input and ``out_channels`` output channels of
    ``element_size``-byte maps: 128 output pixels a tile; all output channels in one tile up
    to 128 (each input tile then read once), more in tiles of 64 or 128; the input channels
    16 to 64 a step (32 at most for float32), each the largest that pads them by at most an
    eighth; 8 warps for the largest tiles."""
    block_o = next_power_of_2(out_channels) if out_channels <= 128 else _block(out_channels, (128, 64))
    block_o = max(16, block_o)
    block_k = _block(channels, (64, 32, 16) if element_size <= 2 else (32, 16))
    return Config(128, block_o, block_k, 8 if block_o == 128 else 4, 3)


@jit_with_runtime_ints(_RUNTIME_INTS)
def _dense_conv_kernel(x_ptr, w_ptr, bias_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, out_ptr,
                       eps, height, width, out_height, out_width,
                       CHANNELS: tl.constexpr, OUT_CHANNELS: tl.constexpr,
                       KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, STRIDE_H: tl.constexpr,
                       STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
                       OUT_CHANNELS_LAST: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_NORM: tl.constexpr, ACTIVATION: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, ALIGN: tl.constexpr):
    """``out[b] = act(norm(W * x[b] + bias))`` (``ACTIVATION``: ``'gelu'``, ``'relu'`` or
    None) for one ``(BLOCK_P, BLOCK_O)`` tile: ``x`` channels-last, the weight
    ``(OUT_CHANNELS, KERNEL_H, KERNEL_W, CHANNELS)``, both contiguous (the input channels
    contiguous: 16-byte loads); the output NCHW or (``OUT_CHANNELS_LAST``) NHWC, contiguous;
    ``out_height * out_width`` a multiple of ``ALIGN``."""
    out_pixels = aligned(out_height * out_width, ALIGN)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    b = tl.program_id(2).to(tl.int64)
    p_ok = p < out_pixels
    o_ok = o < OUT_CHANNELS
    top = (p // out_width) * STRIDE_H - PAD_H
    left = (p % out_width) * STRIDE_W - PAD_W
    x_base = x_ptr + b * height * width * CHANNELS
    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    # one loop over (tap, input-channel step) pairs, not unrolled over the taps (see the module doc)
    chunks: tl.constexpr = (CHANNELS + BLOCK_K - 1) // BLOCK_K
    for i in range(0, KERNEL_H * KERNEL_W * chunks):
        tap = i // chunks
        c = (i % chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
        ih = top + tap // KERNEL_W
        iw = left + tap % KERNEL_W
        pixel_ok = p_ok & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
        c_ok = c < CHANNELS
        x = tl.load(x_base + (ih * width + iw)[:, None] * CHANNELS + c[None, :],
                    mask=pixel_ok[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(w_ptr + o[None, :] * (KERNEL_H * KERNEL_W * CHANNELS) + tap * CHANNELS
                    + c[:, None], mask=c_ok[:, None] & o_ok[None, :], other=0.0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_NORM:
        scale, shift = running_norm_scale_and_shift(mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                                                    o, o_ok)
        acc = acc * scale[None, :] + shift[None, :]
    if ACTIVATION == 'gelu':
        cdf, _ = normal_cdf_and_density(acc)
        acc *= cdf
    elif ACTIVATION == 'relu':
        acc = tl.maximum(acc, 0.0)
    if OUT_CHANNELS_LAST:
        out_offsets = (b * out_pixels + p[:, None]) * OUT_CHANNELS + o[None, :]
    else:
        out_offsets = (b * OUT_CHANNELS + o[None, :]) * out_pixels + p[:, None]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty),
             mask=p_ok[:, None] & o_ok[None, :])


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x (B, C, H, W)`` is read channels-last: contiguous in that format and not as
    NCHW (a map that is both, such as one of a single pixel, counts as NCHW)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _output(x: Tensor, out_channels: int, size: Tuple[int, int], dtype: torch.dtype,
            channels_last: bool) -> Tensor:
    format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x.size(0), out_channels, *size, dtype=dtype, device=x.device,
                       memory_format=format)


def _convolve(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
              padding: List[int], mean: Optional[Tensor], var: Optional[Tensor],
              gamma: Optional[Tensor], beta: Optional[Tensor], eps: float,
              activation: Optional[str], out_dtype: torch.dtype, out_channels_last: bool,
              config: Optional[Config] = None) -> Tensor:
    """:func:`_dense_conv_kernel` for ``x`` channels-last (any other layout read through a
    channels-last copy, as cuDNN transposes an NCHW map for its tensor-core kernels), the
    output channels-last or NCHW; the weight copied to ``(O, kh, kw, C)`` in ``x``'s dtype (a
    few KB to a few MB, read by every program). ``config``: the launch shape (default
    :func:`launch_config`)."""
    batch, channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    size = output_size((height, width), (kernel_h, kernel_w), stride, padding)
    out = _output(x, out_channels, size, out_dtype, out_channels_last)
    pixels = size[0] * size[1]
    config = config or launch_config(channels, out_channels, x.element_size())
    grid = (cdiv(pixels, config.block_p), cdiv(out_channels, config.block_o), batch)
    norm = (mean, var, gamma, beta) if mean is not None else (x, x, x, x)  # x: not read
    taps = weight.to(x.dtype, memory_format=torch.channels_last)  # (O, kh, kw, C) in memory
    launch(_dense_conv_kernel, grid, x.contiguous(memory_format=torch.channels_last), taps,
           x if bias is None else bias, *norm, out, float(eps), height, width, size[0], size[1],
           CHANNELS=channels, OUT_CHANNELS=out_channels, KERNEL_H=kernel_h, KERNEL_W=kernel_w,
           STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
           OUT_CHANNELS_LAST=out_channels_last, HAS_BIAS=bias is not None,
           HAS_NORM=mean is not None, ACTIVATION=activation,
           DOT_PRECISION=conv_dot_precision(x.dtype),
           BLOCK_P=config.block_p, BLOCK_O=config.block_o, BLOCK_K=config.block_k,
           ALIGN=alignment(pixels), num_warps=config.num_warps, num_stages=config.num_stages)
    return out


@torch.library.custom_op('mmseg_segman::dense_conv2d_forward', mutates_args=())
def _dense_conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                     padding: List[int], mean: Optional[Tensor], var: Optional[Tensor],
                     gamma: Optional[Tensor], beta: Optional[Tensor], eps: float,
                     activation: Optional[str], out_dtype: torch.dtype,
                     out_channels_last: bool) -> Tensor:
    return _convolve(x, weight, bias, stride, padding, mean, var, gamma, beta, eps, activation,
                     out_dtype, out_channels_last)


@_dense_conv2d_op.register_fake
def _dense_conv2d_fake(x, weight, bias, stride, padding, mean, var, gamma, beta, eps,
                       activation, out_dtype, out_channels_last):
    size = output_size(x.shape[2:], weight.shape[2:], stride, padding)
    return _output(x, weight.shape[0], size, out_dtype, out_channels_last)


def dense_conv2d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                        stride: Tuple[int, int] = (1, 1), padding: Tuple[int, int] = (0, 0),
                        norm: Optional[RunningBatchNorm] = None,
                        activation: Optional[str] = None,
                        out_dtype: Optional[torch.dtype] = None,
                        channels_last: Optional[bool] = None) -> Tensor:
    """``act(norm(F.conv2d(x, weight, bias, stride, padding)))`` (``act``: ``'gelu'``,
    ``'relu'`` or None) for ``x (B, C, H, W)`` of a float dtype (channels-last is read as it
    is, another layout through a copy) and ``weight (O, C, kh, kw)`` of any float dtype
    (rounded to ``x``'s in the product); the result ``(B, O, H', W')`` in ``out_dtype``
    (default ``x``'s), channels-last or NCHW as ``channels_last`` says (default: ``x``'s
    layout). Without autograd: refused where autograd would record the call (training runs
    cuDNN)."""
    if records_autograd(x, weight, bias, *(norm or ())[:4]):
        raise RuntimeError('dense_conv2d_triton has no backward pass; where autograd records '
                           'the convolution, run the torch backend of dense_conv2d')
    channels_last = is_channels_last(x) if channels_last is None else channels_last
    args = (x, weight, bias, list(stride), list(padding), *(norm or NO_NORM), activation,
            out_dtype or x.dtype, channels_last)
    return _dense_conv2d_op(*args) if torch.compiler.is_compiling() else _convolve(*args)
