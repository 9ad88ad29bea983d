"""The convolutions of ``dense_conv2d`` in a SegMAN size, each backend, on CUDA: error, time,
and the cost of a first call at a new input shape.

    python3 tools/gpu_checks/check_dense_conv.py [--arch t] [--batch 16] [--out dense.jsonl]
    python3 tools/gpu_checks/check_dense_conv.py --sweep [--arch l] ...   # launch shapes

The nine convolutions outside the blocks at 512x512, in the layouts the model hands them and
asks of them: the stem's four 3x3 (each with its eval batch norm, the first three with a
GELU; channels-last between them), the three downsampling 3x3 (with their norms), the
decoder's two strided convolutions (3x3 stride 2, 5x5 stride 4, with their norms and ReLUs).
For each, under ``torch.inference_mode``, the ``triton`` and ``torch`` (``F.conv2d`` on cuDNN,
then ``F.batch_norm`` and the activation) backends:

* ``error``: the largest difference from the ``torch`` backend in float64 over its largest
  magnitude, bfloat16 maps under bfloat16 autocast (float32 parameters, as in the model) and
  float32 without TF32;
* ``ms``: the median of 20 bfloat16 autocast calls (CUDA events);
* ``first_ms``: the wall time of the first call at a new input size (the layer's input four
  pixels taller and wider, the GPU synchronised), after a call at the usual size: cuDNN
  builds its execution plan there, the Triton kernel is compiled already.

One JSON line per layer and backend. ``--sweep``: the Triton kernel under each launch shape of
:data:`SWEEP` and the default (:func:`launch_config`), bfloat16, one JSON line per layer.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import write_row  # noqa: E402  (tools/benchmark.py)
from check_cross_selective_scan import median_ms  # noqa: E402

from mmseg_segman.models.variants import ENCODER_ARCHS, HEAD_WIDTHS  # noqa: E402
from mmseg_segman.ops.dense_conv import _dense_conv2d  # noqa: E402
from mmseg_segman.ops.depthwise_conv import RunningBatchNorm  # noqa: E402
from mmseg_segman.ops.triton_dense_conv import Config, _convolve, launch_config  # noqa: E402

SWEEP = [Config(128, 64, 64, 4, 3), Config(128, 128, 64, 8, 3), Config(64, 128, 64, 4, 3),
         Config(128, 64, 32, 4, 4), Config(128, 32, 32, 4, 4), Config(256, 64, 32, 8, 3),
         Config(64, 64, 64, 4, 4), Config(128, 16, 16, 4, 4), Config(256, 128, 32, 8, 3),
         Config(128, 64, 16, 4, 4)]


def layers(arch: str, batch: int):
    """``(name, input shape, channels-last input, the output's memory format (None: the
    input's), out_channels, kernel, stride, padding, norm, activation)`` of the nine
    convolutions at 512x512."""
    dims = ENCODER_ARCHS[arch]['embed_dims']
    channels, projection = HEAD_WIDTHS[arch]['ade20k']
    half = dims[0] // 2
    stem = [(3, half, 2, 256), (half, half, 1, 256), (half, dims[0], 2, 128), (dims[0], dims[0], 1, 128)]
    for i, (cin, cout, stride, out_side) in enumerate(stem):
        side = out_side * stride
        out_format = torch.channels_last if i < 3 else torch.contiguous_format
        yield (f'stem {i}', (batch, cin, side, side), i > 0, out_format, cout, 3, stride, 1,
               True, 'gelu' if i < 3 else None)
    for i in range(3):
        side = 128 >> i
        yield (f'downsample {i + 1}', (batch, dims[i], side, side), False,
               torch.contiguous_format, dims[i + 1], 3, 2, 1, True, None)
    for stride, kernel in ((2, 3), (4, 5)):
        yield (f'head stride {stride}', (batch, channels, 64, 64), False, None,
               stride * channels, kernel, stride, 1, True, 'relu')


def make(shape, channels_last, out_channels, kernel, norm, dtype):
    cin = shape[1]
    x = torch.randn(*shape, device='cuda').to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, cin, kernel, kernel, device='cuda') * (cin * kernel ** 2) ** -0.5
    bias = None if norm else torch.randn(out_channels, device='cuda')
    running = RunningBatchNorm(torch.randn(out_channels, device='cuda'),
                               torch.rand(out_channels, device='cuda') + 0.5,
                               torch.randn(out_channels, device='cuda'),
                               torch.randn(out_channels, device='cuda'), 1e-5) if norm else None
    return x, weight, bias, running


def upcast(args):
    x, weight, bias, norm = args
    return (x.double(), weight.double(), None if bias is None else bias.double(),
            None if norm is None else RunningBatchNorm(*(t.double() for t in norm[:4]), norm.eps))


def error(got, want) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def first_call_ms(fn, shape, channels_last, out_channels, kernel, norm) -> float:
    bigger = (*shape[:2], shape[2] + 4, shape[3] + 4)
    args = make(bigger, channels_last, out_channels, kernel, norm, torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def check(args) -> None:
    allow_tf32 = torch.backends.cudnn.allow_tf32
    for name, shape, channels_last, out_format, cout, kernel, stride, padding, norm, act in \
            layers(args.arch, args.batch):
        bf16 = make(shape, channels_last, cout, kernel, norm, torch.bfloat16)
        x64, weight64, bias64, norm64 = upcast(bf16)
        want = _dense_conv2d.backends['torch'].fn(x64, weight64, bias64, stride, padding, norm64,
                                                  act, out_format)
        f32 = (bf16[0].float(), *bf16[1:])
        for backend in ('triton', 'torch'):
            fn = _dense_conv2d.backends[backend].fn

            def call(x, weight, bias, running):
                return fn(x, weight, bias, (stride, stride), (padding, padding), running, act,
                          out_format)

            def autocast_call(*args):  # as in the model: a 16-bit map, float32 parameters
                with torch.autocast('cuda', dtype=torch.bfloat16):
                    return call(*args)

            torch.backends.cudnn.allow_tf32 = False
            float32_error = error(call(*f32), want)
            torch.backends.cudnn.allow_tf32 = allow_tf32
            bf16_error = error(autocast_call(*bf16), want)
            ms = median_ms(lambda: autocast_call(*bf16), 20)
            first = first_call_ms(autocast_call, shape, channels_last, cout, kernel, norm)
            write_row(dict(check='dense_conv', arch=args.arch, batch=args.batch, layer=name,
                           backend=backend, input=list(shape), out_channels=cout, kernel=kernel,
                           stride=stride, error_bf16=bf16_error, error_fp32=float32_error,
                           ms=round(ms, 4), first_ms=round(first, 2)), args.out)


def sweep(args) -> None:
    for name, shape, channels_last, out_format, cout, kernel, stride, padding, norm, act in \
            layers(args.arch, args.batch):
        x, weight, bias, running = make(shape, channels_last, cout, kernel, norm, torch.bfloat16)
        out_channels_last = channels_last if out_format is None \
            else out_format == torch.channels_last
        default = launch_config(shape[1], cout)
        row = dict(check='dense_conv_sweep', arch=args.arch, batch=args.batch, layer=name,
                   default=list(default))
        for config in [default] + [c for c in SWEEP if c != default]:
            try:
                ms = median_ms(lambda: _convolve(x, weight, bias, [stride] * 2, [padding] * 2,
                                                 *(running[:4] if running else (None, ) * 4),
                                                 running.eps if running else 0.0, act,
                                                 x.dtype, out_channels_last, config), 20)
            except Exception as failure:  # a shape the GPU cannot launch (shared memory)
                ms = f'{type(failure).__name__}'
            row['x'.join(map(str, config))] = round(ms, 4) if isinstance(ms, float) else ms
        write_row(row, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='t', choices=sorted(ENCODER_ARCHS))
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--sweep', action='store_true')
    parser.add_argument('--out')
    args = parser.parse_args()
    with torch.inference_mode():
        (sweep if args.sweep else check)(args)


if __name__ == '__main__':
    main()
