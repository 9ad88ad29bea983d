"""The blocks' 1x1 convolutions with what follows them, each backend of ``pointwise_conv2d``,
on CUDA: time of forward and forward + backward.

    python3 tools/gpu_checks/check_pointwise_conv.py [--arch l] [--batch 16] [--out pw.jsonl]
    python3 tools/gpu_checks/check_pointwise_conv.py --sweep [--arch l] ...   # launch shapes

For each stage of a SegMAN size at 512x512 (bf16 autocast): ``qkv`` (C -> 3C, bias), ``proj``
(C -> C, then the block's residual connection with its layer scale), ``fc1`` (C -> rC, GELU)
and ``fc2`` (rC -> C, residual connection), on the backends ``triton`` (one kernel, the
epilogue fused), ``matmul`` (a batched cuBLAS product, then PyTorch's bias add, GELU, layer
scale convolution and add) and ``torch`` (``F.conv2d`` and the same layers). Median of 20
(CUDA events), ms; one JSON line per layer and backend. Errors are checked by ``check_ops.py``.
``--sweep``: the Triton forward (no autograd) of each layer under each launch shape of
:data:`SWEEP` and the default one (:func:`launch_config`), one JSON line per layer (a resident
shape of fewer channels a step than the layer has is refused: its error is written).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import write_row  # noqa: E402  (tools/benchmark.py)
from check_cross_selective_scan import median_ms  # noqa: E402

from mmseg_segman.models.variants import ENCODER_ARCHS  # noqa: E402
from mmseg_segman.ops.pointwise_conv import Residual, _pointwise_conv2d  # noqa: E402
from mmseg_segman.ops.triton_pointwise_conv import (Config, launch_config,  # noqa: E402
                                                    pointwise_conv2d_triton)

SWEEP = [Config(128, 128, 32, 8, 3), Config(128, 128, 64, 8, 3), Config(128, 128, 64, 8, 4),
         Config(128, 64, 64, 4, 4), Config(64, 128, 64, 4, 4), Config(128, 256, 64, 8, 3),
         Config(256, 128, 64, 8, 3), Config(64, 64, 64, 4, 4), Config(128, 128, 128, 8, 3),
         Config(128, 64, 64, 4, 3, resident=1), Config(128, 64, 128, 4, 3, resident=1),
         Config(128, 128, 128, 8, 3, resident=1), Config(64, 64, 128, 4, 3, resident=1)]


def layers(arch: str, batch: int):
    """``(name, x, weight, bias, activation, residual)`` of every stage's four 1x1 convs."""
    settings = ENCODER_ARCHS[arch]
    for stage, (dim, ratio) in enumerate(zip(settings['embed_dims'], settings['mlp_ratios'])):
        side = 512 // 4 // 2 ** stage
        hidden = int(dim * ratio)

        def conv(name, cin, cout, activation=None, residual=False):
            x = torch.randn(batch, cin, side, side, device='cuda', dtype=torch.bfloat16)
            weight = torch.randn(cout, cin, 1, 1, device='cuda') * cin ** -0.5
            res = None
            if residual:
                res = Residual(torch.randn(batch, cout, side, side, device='cuda', dtype=torch.bfloat16),
                               torch.rand(cout, device='cuda'), torch.randn(cout, device='cuda'))
            return (f'stage {stage + 1} {name}', x, weight, torch.randn(cout, device='cuda'),
                    activation, res)

        yield conv('qkv', dim, 3 * dim)
        yield conv('proj', dim, dim, residual=True)
        yield conv('fc1', dim, hidden, activation='gelu')
        yield conv('fc2', hidden, dim, residual=True)


def sweep(args) -> None:
    for name, x, weight, bias, activation, residual in layers(args.arch, args.batch):
        batch, channels, height, width = x.shape
        w2 = weight.view(weight.shape[0], -1).to(x.dtype)
        extra = {} if residual is None else dict(shortcut=residual.shortcut, scale=residual.scale,
                                                 shift=residual.shift)
        times = {}
        default = launch_config(channels, weight.shape[0], height * width)
        for config in SWEEP + [default] * (default not in SWEEP):
            def forward():
                pointwise_conv2d_triton(x, w2, bias, activation == 'gelu', config=config, **extra)
            key = '/'.join(map(str, config))
            try:
                times[key] = round(median_ms(forward, 20), 3)
            except Exception as error:  # a shape that does not fit the GPU's shared memory
                times[key] = f'{type(error).__name__}: {str(error)[:80]}'
        write_row(dict(arch=args.arch, layer=name, batch=args.batch, channels=channels,
                       out_channels=weight.shape[0], pixels=height * width,
                       default='/'.join(map(str, default)),
                       forward_ms=times), args.out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', default='l', choices=sorted(ENCODER_ARCHS))
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--sweep', action='store_true', help='time the Triton forward per launch shape')
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    if args.sweep:
        return sweep(args)
    for name, x, weight, bias, activation, residual in layers(args.arch, args.batch):
        for backend in ('triton', 'matmul', 'torch'):
            fn = _pointwise_conv2d.backends[backend].fn
            leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
            res = None if residual is None else Residual(
                *(t.detach().clone().requires_grad_() for t in residual[:3]))

            def forward():
                with torch.no_grad(), torch.autocast('cuda', torch.bfloat16):
                    fn(x, weight, bias, activation, residual, None)

            def forward_backward():
                with torch.autocast('cuda', torch.bfloat16):
                    out = fn(*leaves, activation, res, None)
                out.backward(torch.ones_like(out))

            write_row(dict(arch=args.arch, layer=name, batch=args.batch, backend=backend,
                           channels=x.shape[1], out_channels=weight.shape[0],
                           epilogue=activation or ('residual' if residual else 'bias'),
                           forward_ms=round(median_ms(forward, 20), 3),
                           forward_backward_ms=round(median_ms(forward_backward, 20), 3)), args.out)


if __name__ == '__main__':
    main()
