"""Whole-image inference over many input shapes: the first pass against the second.

    python3 tools/gpu_checks/check_many_shapes.py --models segman-t segnext-t --out shapes.jsonl

25 shapes as an ADE20K evaluation meets them (short side 512, long side 512 to 896 in steps
of 32, landscape and portrait), batch 1, bf16 autocast, ``torch.inference_mode``, one
``model(images, mode='tensor')`` per shape. The first pass pays for every compilation and
autotuning a new shape triggers; the second runs warm. Prints one line per model and pass.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark import MODELS, build_model  # noqa: E402  (tools/benchmark.py)

SHAPES = [(512, 512 + 32 * i) for i in range(13)] + [(512 + 32 * i, 512) for i in range(1, 13)]


def one_pass(model, dtype) -> float:
    """Seconds for one inference at each shape, the GPU synchronised at the end."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for height, width in SHAPES:
        images = torch.randn(1, 3, height, width, device='cuda')
        with torch.inference_mode(), torch.autocast('cuda', dtype=dtype):
            model(images, mode='tensor')
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', choices=MODELS, default=['segman-t', 'segnext-t'])
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    for name in args.models:
        model = build_model(name).eval()
        first, second = one_pass(model, torch.bfloat16), one_pass(model, torch.bfloat16)
        row = dict(model=name, shapes=len(SHAPES), first_pass_s=round(first, 2),
                   second_pass_s=round(second, 2), ratio=round(first / second, 2))
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, 'a') as f:
                f.write(json.dumps(row) + '\n')
        del model
        torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
