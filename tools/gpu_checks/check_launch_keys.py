"""Which Triton compilations a new input size would cost SegMAN, found without a GPU.

    TRITON_INTERPRET=1 python3 tools/gpu_checks/check_launch_keys.py --models segman-t \
        [--warmup 480x480] [--shapes 512x512 512x544 ...] [--out keys.jsonl]

A Triton kernel compiles once for each key: its constexprs and launch options, the dtypes of
its tensors and whether their addresses are 16-byte aligned, and each int that is not a
runtime int (:func:`~mmseg_segman.ops.triton_jit.jit_with_runtime_ints`) as 1, a multiple of
16 or neither. The model runs in bf16 on the CPU under Triton's interpreter with the kernels
not launched (:func:`~mmseg_segman.ops.triton_jit.kernels_not_launched`; the interpreter must
be set before triton is imported), once at ``--warmup`` and then at each of ``--shapes``
(default: ``check_many_shapes.py``'s 25), recording the key of every launch; a kernel that
takes ``ALIGN`` counts its other alignment (``triton_jit.other_alignment_of``) as compiled
too (``triton_jit.launch`` compiles it at the first launch). Prints, for each shape, the keys
no earlier shape met: what the first pass of ``check_many_shapes.py`` compiles on the GPU.
One JSON line per (model, shape).
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: benchmark
sys.path.insert(0, str(Path(__file__).resolve().parent))      # check_many_shapes

Key = Tuple[str, Tuple, Tuple]


def argument_key(kernel, args) -> Tuple:
    """What Triton specialises a launch's positional ``args`` on (see the module doc)."""
    runtime = set(kernel.kwargs.get('do_not_specialize') or ())
    key = []
    for name, value in zip(kernel.arg_names, args):
        if isinstance(value, torch.Tensor):
            key.append((str(value.dtype).replace('torch.', ''), value.data_ptr() % 16 == 0))
        elif type(value) is int:
            key.append('runtime' if name in runtime else
                       1 if value == 1 else 16 if value % 16 == 0 else 0)
        else:
            key.append(type(value).__name__)
    return tuple(key)


class LaunchRecorder:
    """Replaces ``launch`` in the ``mmseg_segman`` modules that imported it, recording the key
    of each launch (and of its other ``ALIGN``) in :attr:`keys`."""

    def __init__(self):
        from mmseg_segman.ops import triton_jit
        self.triton_jit = triton_jit
        self.keys: Set[Key] = set()
        self.launch = triton_jit.launch
        for module in list(sys.modules.values()):
            if module is not None and module.__name__.startswith('mmseg_segman') \
                    and getattr(module, 'launch', None) is self.launch:
                module.launch = self.record

    def record(self, kernel, grid, *args, other_alignment=None, **meta) -> None:
        name, arguments = kernel.fn.__name__, argument_key(kernel, args)
        self.keys.add((name, arguments, tuple(sorted(meta.items()))))
        other = self.triton_jit.other_alignment_of(meta, other_alignment)
        if other is not None:
            self.keys.add((name, arguments, tuple(sorted({**meta, **other}.items()))))
        self.launch(kernel, grid, *args, other_alignment=other_alignment, **meta)

    def keys_at(self, model: nn.Module, height: int, width: int) -> Set[Key]:
        """The keys of one bf16 inference at ``height x width``."""
        self.keys = set()
        with torch.inference_mode(), self.triton_jit.kernels_not_launched():
            model(torch.randn(1, 3, height, width, dtype=torch.bfloat16), mode='tensor')
        return self.keys


def cpu_model(name: str) -> nn.Module:
    """``benchmark.build_model(name)`` left on the CPU, in bf16, in eval mode."""
    from benchmark import build_model
    cuda = nn.Module.cuda
    nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        model = build_model(name)
    finally:
        nn.Module.cuda = cuda
    return model.eval().to(torch.bfloat16)


def new_keys(name: str, warmup: Tuple[int, int], shapes: List[Tuple[int, int]]) -> List[Dict]:
    """For each shape, the keys that neither the warm-up nor an earlier shape met."""
    recorder = LaunchRecorder()
    model = cpu_model(name)
    known = recorder.keys_at(model, *warmup)
    rows = []
    for height, width in shapes:
        new = recorder.keys_at(model, height, width) - known
        known |= new
        rows.append(dict(model=name, warmup=f'{warmup[0]}x{warmup[1]}', shape=f'{height}x{width}',
                         new_keys=len(new), kernels=sorted(key[0] for key in new),
                         keys=[dict(kernel=k[0], meta=dict(k[2]), arguments=list(k[1]))
                               for k in sorted(new, key=str)]))
    return rows


def size(text: str) -> Tuple[int, int]:
    height, _, width = text.partition('x')
    return int(height), int(width or height)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['segman-t'],
                        choices=['segman-t', 'segman-s', 'segman-b', 'segman-l'])
    parser.add_argument('--warmup', type=size, default=(480, 480))
    parser.add_argument('--shapes', nargs='+', type=size, help='HxW (default: the 25 of '
                        'check_many_shapes.py)')
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    if os.environ.get('TRITON_INTERPRET') != '1':
        parser.error('set TRITON_INTERPRET=1 (before Python starts): the kernels run under '
                     "Triton's interpreter, not launched")
    if args.shapes is None:
        from check_many_shapes import SHAPES
        args.shapes = SHAPES
    for name in args.models:
        for row in new_keys(name, args.warmup, args.shapes):
            print(f"{row['model']} {row['shape']}: {row['new_keys']} new keys "
                  f"{row['kernels']}", flush=True)
            if args.out:
                with open(args.out, 'a') as f:
                    f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
    main()
