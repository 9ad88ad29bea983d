"""The host's (CPU's) time for one eager inference, per model: Python and kernel launches.

    python3 tools/gpu_checks/check_host_time.py --models segman-t segman-b segnext-l \
        [--size 256] [--profile segman-b] [--out host.jsonl]

At a small input (batch 1, ``--size`` square, bf16 autocast, ``torch.inference_mode``) the GPU
finishes each kernel before the host has launched the next, so a forward's wall time is the
host's: ``host_ms``, the median of 20 synchronised forwards. ``kernels`` counts the CUDA
kernels one forward launches and ``gpu_ms`` adds their times (``torch.profiler``);
``host_us_per_kernel`` is ``host_ms`` over ``kernels``. A model whose ``host_ms`` at batch 16,
512x512 exceeds its GPU time is bound by the host there (``benchmark.py --profile``).
``--profile NAME``: Python's profile of NAME's forwards, the functions with the most own time.
One JSON line per model.
"""
import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark import MODELS, build_model, write_row  # noqa: E402  (tools/benchmark.py)


def forward(model, images) -> None:
    with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16):
        model(images, mode='tensor')


def host_ms(model, images, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        forward(model, images)
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def kernels_and_gpu_ms(model, images):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward(model, images)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels), sum(e.device_time for e in kernels) / 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', choices=MODELS, default=MODELS)
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--profile', nargs='*', choices=MODELS, default=[],
                        help='print the Python functions with the most own time')
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    images = torch.randn(1, 3, args.size, args.size, device='cuda')
    for name in args.models:
        model = build_model(name).cuda().eval()
        for _ in range(3):  # Triton's kernels, cuDNN's choices
            forward(model, images)
        host = host_ms(model, images)
        kernels, gpu = kernels_and_gpu_ms(model, images)
        write_row(dict(model=name, size=args.size, host_ms=round(host, 2), kernels=kernels,
                       gpu_ms=round(gpu, 2), host_us_per_kernel=round(1e3 * host / kernels, 1)),
                  args.out)
        if name in args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(lambda: [forward(model, images) for _ in range(5)])
            pstats.Stats(profiler).sort_stats('tottime').print_stats(30)
        del model
        torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
