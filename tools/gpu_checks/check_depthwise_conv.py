"""The Triton depthwise convolution against PyTorch's, on CUDA: errors, speed, new shapes.

    python3 tools/gpu_checks/check_depthwise_conv.py [--out dw.jsonl]
    python3 tools/gpu_checks/check_depthwise_conv.py --sweep [--out dw.jsonl]   # launch shapes

For SegMAN's depthwise convolutions at 512x512, batch 16, bf16 (SegMAN-B: the 3x3 of the
FFN at stage 1 and 3, the 5x5 ``lepe``, the 3x3 positional encodings), each way:
``triton`` (this repository's kernel), ``torch`` (``F.conv2d`` on an NCHW map: PyTorch's own
kernel) and ``torch channels-last`` (cuDNN): the error of output and gradients against
float64, the median time of forward and forward + backward (CUDA events), and the first call
at a new map size (cuDNN builds a plan per shape). One JSON line per case and way.
``--sweep``: the Triton forward (no autograd) of each case under each launch shape of
:data:`SWEEP` (:class:`ConvolutionTile`), median ms, one JSON line per case.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import write_row  # noqa: E402  (tools/benchmark.py)
from check_cross_selective_scan import median_ms  # noqa: E402

from mmseg_segman.ops.triton_depthwise_conv import (CONVOLUTION_TILE,  # noqa: E402
                                                     ConvolutionTile, _convolve,
                                                     depthwise_conv2d_triton)

# (name, channels, map side, kernel) of SegMAN-B at 512x512, and SegMAN-L's stage 3 and 4
CASES = [('ffn stage 1', 384, 128, 3), ('cpe stage 1', 96, 128, 3), ('lepe stage 1', 96, 128, 5),
         ('ffn stage 3', 1456, 32, 3), ('lepe stage 3', 364, 32, 5), ('L ffn stage 3', 1296, 32, 3),
         ('L cpe stage 3', 432, 32, 3), ('L ffn stage 4', 1920, 16, 3), ('L lepe stage 4', 640, 16, 5)]
SWEEP = [ConvolutionTile(e, u, b) for e in (128, 256) for u in (1, 2) for b in (8, 16, 32)] + \
    [ConvolutionTile(512, 1, 16), ConvolutionTile(64, 2, 16)]


def back_to_back_ms(fn, iters: int = 20) -> float:
    """Mean ms of ``iters`` calls queued back to back (the host runs ahead of the GPU, so a
    short kernel is not timed with its launch)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def sweep(args) -> None:
    for name, channels, side, kernel in CASES:
        x = torch.randn(args.batch, channels, side, side, device='cuda', dtype=torch.bfloat16)
        w = torch.randn(channels, 1, kernel, kernel, device='cuda') * 0.2
        times = {}
        for tile in SWEEP:
            key = '/'.join(map(str, tile))
            times[key] = round(back_to_back_ms(lambda: _convolve(x, w, None, False, True, x.dtype, tile)), 4)
        write_row(dict(case=name, channels=channels, side=side, kernel=kernel, batch=args.batch,
                       default='/'.join(map(str, CONVOLUTION_TILE)), forward_ms=times), args.out)


def torch_conv(x, w, b):
    return F.conv2d(x, w.to(x.dtype), b.to(x.dtype), padding=w.shape[-1] // 2, groups=x.shape[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--sweep', action='store_true', help='time the forward per launch shape')
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    if args.sweep:
        return sweep(args)
    ways = {'triton': (depthwise_conv2d_triton, False), 'torch': (torch_conv, False),
            'torch channels-last': (torch_conv, True)}
    for name, channels, side, kernel in CASES:
        x = torch.randn(args.batch, channels, side, side, device='cuda', dtype=torch.bfloat16)
        w = torch.randn(channels, 1, kernel, kernel, device='cuda') * 0.2
        b = torch.randn(channels, device='cuda')
        dy = torch.randn_like(x)
        leaves64 = [t.double().requires_grad_() for t in (x, w, b)]
        out64 = F.conv2d(*leaves64, padding=kernel // 2, groups=channels)
        out64.backward(dy.double())
        for way, (fn, channels_last) in ways.items():
            xs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            leaves = [t.detach().clone().requires_grad_() for t in (xs, w, b)]
            out = fn(*leaves)
            out.backward(dy)
            errors = {label: ((got.double() - want).norm() / want.norm()).item()
                      for label, got, want in zip(['out', 'dx', 'dw', 'db'], [out] + [t.grad for t in leaves],
                                                  [out64] + [t.grad for t in leaves64])}

            def forward():
                with torch.no_grad():
                    fn(xs, w, b)

            def forward_backward():
                fn(*leaves).backward(dy)

            new = torch.randn(1, channels, side + 8, side + 24, device='cuda', dtype=torch.bfloat16)
            new = new.contiguous(memory_format=torch.channels_last) if channels_last else new
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                fn(new, w, b)
            torch.cuda.synchronize()
            write_row(dict(case=name, channels=channels, side=side, kernel=kernel, batch=args.batch,
                           way=way, errors={k: float(f'{v:.2e}') for k, v in errors.items()},
                           forward_ms=round(median_ms(forward, 20), 3),
                           forward_backward_ms=round(median_ms(forward_backward, 20), 3),
                           new_shape_first_call_ms=round(1e3 * (time.perf_counter() - start), 1)),
                      args.out)


if __name__ == '__main__':
    main()
