"""What each convolution of a model costs on its first call at a new input shape.

    python3 tools/gpu_checks/check_new_shape_convs.py --models segman-t segnext-t

cuDNN picks and builds an execution plan for every new (shape, layout, dtype) of a
convolution, which can cost far more than running it. After a warm-up call at 480x480, one
call at 448x544 and a second at the same shape run with every ``nn.Conv2d`` timed on its
own (the GPU synchronised around each); the convolutions are grouped by kind (pointwise,
depthwise, full), the memory layout of their input and whether cuDNN or PyTorch's own
kernel ran them. Then the whole model's first call at three more new shapes: as built, with
cuDNN switched off, and in channels-last memory format. Batch 1, bf16 autocast,
``torch.inference_mode``.
"""
import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark import MODELS, build_model, write_row  # noqa: E402  (tools/benchmark.py)
from check_many_shapes import infer_seconds as infer  # noqa: E402


def conv_kind(conv: nn.Conv2d, x: torch.Tensor) -> str:
    kernel = 'x'.join(map(str, conv.kernel_size))
    if conv.groups == conv.in_channels and conv.groups > 1:
        kind = f'depthwise {kernel}'
    else:
        kind = 'pointwise' if kernel == '1x1' else f'full {kernel}'
    contiguous = x.is_contiguous()
    layout = 'NCHW' if contiguous else \
        'NHWC' if x.is_contiguous(memory_format=torch.channels_last) else 'strided'
    return f'{kind}, {layout} input'


def timed_convs(model, height: int, width: int) -> dict:
    """Seconds of each convolution (by kind) in one call."""
    seconds = defaultdict(float)
    counts = defaultdict(int)
    handles = []

    def before(module, args):
        torch.cuda.synchronize()
        module._started = time.perf_counter()

    def after(module, args, output):
        torch.cuda.synchronize()
        kind = conv_kind(module, args[0])
        seconds[kind] += time.perf_counter() - module._started
        counts[kind] += 1

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        infer(model, height, width)
    finally:
        for handle in handles:
            handle.remove()
    return {kind: (counts[kind], seconds[kind]) for kind in seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', choices=MODELS, default=['segman-t', 'segnext-t'])
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    for name in args.models:
        model = build_model(name).eval()
        infer(model, 480, 480)
        first, second = timed_convs(model, 448, 544), timed_convs(model, 448, 544)
        print(f'# {name}: convolutions at a new shape, first call / second call (ms)')
        for kind, (count, seconds) in sorted(first.items(), key=lambda item: -item[1][1]):
            print(f'{kind:40s} {count:4d} convs {1e3 * seconds:9.1f} / {1e3 * second[kind][1]:7.1f}')
        whole = dict(as_built=infer(model, 416, 576))
        with torch.backends.cudnn.flags(enabled=False):
            whole['cudnn_off'] = infer(model, 384, 608)
        model.to(memory_format=torch.channels_last)
        whole['channels_last'] = infer(model, 352, 640, channels_last=True)
        whole['channels_last_again'] = infer(model, 352, 640, channels_last=True)
        write_row(dict(model=name, first_call_s={k: round(v, 3) for k, v in whole.items()},
                       convs_first_ms={k: round(1e3 * s, 1) for k, (_, s) in first.items()},
                       convs_second_ms={k: round(1e3 * s, 1) for k, (_, s) in second.items()}),
                  args.out)
        del model
        torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
