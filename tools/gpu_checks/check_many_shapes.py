"""Whole-image inference over many input shapes: the first pass against the second.

    python3 tools/gpu_checks/check_many_shapes.py --models segman-t segnext-t --compile no yes \
        --out shapes.jsonl

25 shapes as an ADE20K evaluation meets them (short side 512, long side 512 to 896 in steps
of 32, landscape and portrait), batch 1, bf16 autocast, ``torch.inference_mode``, one
``model(images, mode='tensor')`` per shape. One warm-up call at 480x480 (a shape not in the
list) pays for what any first call pays (Triton's kernels, cuDNN's choices, ``torch.compile``'s
first graph); then the first pass pays for what each new shape triggers, and the second runs
warm. ``--compile yes``: ``torch.compile`` of the whole segmentor with ``--dynamic`` (``auto``:
dynamo's default, a dynamic graph after the first recompilation), dynamo logging the guard
that failed at each recompilation. ``--passes 3``: a third pass (with ``segman-*-graphed``, the
inference CUDA graphs are captured in the second pass, at a shape's second call, and replayed
in the third). One line per model.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark import GRAPHED, MODELS, build_model, write_row  # noqa: E402  (tools/benchmark.py)

SHAPES = [(512, 512 + 32 * i) for i in range(13)] + [(512 + 32 * i, 512) for i in range(1, 13)]


def triton_cache_entries() -> int:
    """Kernels in Triton's on-disk cache: one more for each compilation."""
    cache = Path(os.environ.get('TRITON_CACHE_DIR', Path.home() / '.triton' / 'cache'))
    return len(list(cache.iterdir())) if cache.is_dir() else 0


def infer_seconds(model, height: int, width: int, channels_last: bool = False) -> float:
    """Seconds of one ``model(images, mode='tensor')`` on a random ``1 x 3 x height x width``
    image (bf16 autocast, ``torch.inference_mode``), the GPU synchronised before and after."""
    images = torch.randn(1, 3, height, width, device='cuda')
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16):
        model(images, mode='tensor')
    torch.cuda.synchronize()
    return time.perf_counter() - start


def one_pass(model) -> dict:
    """Seconds for one inference at each shape, and the Triton compilations each shape
    triggered."""
    seconds, compilations = [], []
    for height, width in SHAPES:
        cached = triton_cache_entries()
        seconds.append(round(infer_seconds(model, height, width), 3))
        compilations.append(triton_cache_entries() - cached)
    return dict(total_s=round(sum(seconds), 2), per_shape_s=seconds, triton_compilations=compilations)


def profile_new_shape(model) -> None:
    """Where the time of one call at a shape not seen before (448x544, not in :data:`SHAPES`)
    goes: the operators with the most CPU time, then the Python functions with the most
    cumulative time (a compilation or a cache miss shows there even where no operator does)."""
    import cProfile
    import pstats
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        infer_seconds(model, 448, 544)
    print(prof.key_averages().table(sort_by='cpu_time_total', row_limit=25,
                                    max_name_column_width=60), flush=True)
    profiler = cProfile.Profile()
    profiler.runcall(infer_seconds, model, 544, 448)
    pstats.Stats(profiler).sort_stats('cumulative').print_stats(40)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', choices=MODELS + GRAPHED, default=['segman-t', 'segnext-t'])
    parser.add_argument('--passes', type=int, choices=[2, 3], default=2)
    parser.add_argument('--compile', nargs='+', choices=['no', 'yes'], default=['no'])
    parser.add_argument('--dynamic', choices=['auto', 'true'], default='auto')
    parser.add_argument('--profile-new-shape', action='store_true',
                        help='after the warm-up, print where the time of one new shape goes')
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    if 'yes' in args.compile:  # dynamo logs why each recompilation happened (the failed guard)
        torch._logging.set_logs(recompiles=True)
    for name, compiled in ((n, c == 'yes') for n in args.models for c in args.compile):
        torch._dynamo.reset()
        model = build_model(name).eval()
        run_model = torch.compile(model, dynamic=True if args.dynamic == 'true' else None) \
            if compiled else model
        warmup = infer_seconds(run_model, 480, 480)
        if args.profile_new_shape:
            profile_new_shape(run_model)
        first, second = one_pass(run_model), one_pass(run_model)
        row = dict(model=name, compiled=compiled, dynamic=args.dynamic if compiled else None,
                   shapes=len(SHAPES), warmup_s=round(warmup, 2), first_pass_s=first['total_s'],
                   second_pass_s=second['total_s'], ratio=round(first['total_s'] / second['total_s'], 2),
                   first_pass=first, second_pass=second)
        if args.passes == 3:
            third = one_pass(run_model)
            row.update(third_pass_s=third['total_s'], third_pass=third,
                       ratio_to_third=round(first['total_s'] / third['total_s'], 2))
        write_row(row, args.out)
        del model
        torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
