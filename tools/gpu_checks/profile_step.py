"""Where a step's GPU time goes: by kernel and category, or by PyTorch operator and input shape.

    python3 tools/gpu_checks/profile_step.py --models segman-l-graphed segformer-b4 \
        [--mode train] [--batch 8] [--size 512] [--steps 2] [--by kernel] [--top 45] \
        [--out profile.jsonl]

The step is ``check_gpu_busy.py``'s (``tools/benchmark.py``'s models, bf16 autocast; training:
the loss on random labels, backward, AdamW step), warmed up four times, then ``--steps``
steps under ``torch.profiler``; times are means a step.

- ``--by kernel``: every kernel, copy and memset by name, and their sum by a category read from
  the name (:data:`CATEGORIES`: SegMAN's Triton kernels by op, cuBLAS, cuDNN, PyTorch's
  reductions, copies, ...), printed as the categories and the ``--top`` kernels. This works
  for captured CUDA graphs too (``segman-*-graphed``): their replays keep the kernels' names.
- ``--by launch``: as ``--by kernel``, each kernel name split by its launch grid where the
  trace records one (``name grid=(x, y, z)``): the launches of one kernel at different layers
  or stages apart (a Triton kernel's grid follows its map's size and channels).
- ``--by op``: each PyTorch operator's own GPU time by its input shapes (the Triton ops appear
  under their ``torch.library`` names), for eager models: a graph's replay has no operators,
  so profile ``segman-l`` here, not ``segman-l-graphed``.

One JSON line a model: ``total_ms`` and ``categories`` (``--by kernel``) or ``rows`` (``--by
op``: operator, input shapes, ms and calls a step).
"""
import argparse
import collections
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import build_model  # noqa: E402
from check_gpu_busy import GPU_CATEGORIES, add_step_arguments, make_step  # noqa: E402

# (category, pattern of the kernel's name): the first that matches names the category
CATEGORIES = [('attention forward', r'_na_fwd'), ('attention dq', r'_na_bwd_dq'),
              ('attention dk dv', r'_na_bwd_dkdv'), ('scan forward', r'_cross_scan_fwd'),
              ('scan backward', r'_cross_scan_bwd'),
              ('scan glue', r'_merge|_project_steps|_direction_order|_both_orders'),
              ('1x1 conv', r'_pw_'), ('depthwise conv', r'_dw_'), ('layer norm', r'_ln2d'),
              ('batch norm', r'_bn_|batch_norm'), ('rope', r'_rope'),
              ('dense conv', r'_dense|conv2d|implicit|cudnn|xmma|fprop|dgrad|wgrad'),
              ('cuBLAS', r'nvjet|cutlass|gemm|splitK'), ('optimizer', r'[Aa]dam'),
              ('softmax, loss', r'softmax|nll|cross_entropy'),
              ('upsampling', r'upsample|interp|_resize|bilinear'), ('reduction', r'reduce_kernel'),
              ('copy, cat', r'copy|Cat|Memcpy|transpose'), ('fill, memset', r'Fill|Memset'),
              ('elementwise', r'elementwise|Functor')]


def category(kernel: str) -> str:
    """The :data:`CATEGORIES` entry of a kernel's name, ``other`` if none matches."""
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, kernel)), 'other')


def kernel_times(events: Iterable[Dict], steps: int, by_grid: bool = False) -> Dict:
    """From a Chrome trace's events: ``total_ms``, ``categories`` ``{category: ms}`` (largest
    first) and ``kernels`` ``{name: [ms, calls]}`` (largest first), a step each; with
    ``by_grid`` each name split by its launch grid where the event has one (``name
    grid=(x, y, z)``)."""
    kernels = collections.defaultdict(lambda: [0.0, 0.0])
    for e in events:
        if e.get('ph') == 'X' and e.get('cat') in GPU_CATEGORIES:
            grid = e.get('args', {}).get('grid')
            entry = kernels[f'{e["name"]} grid={tuple(grid)}' if by_grid and grid else e['name']]
            entry[0] += e['dur'] / 1e3 / steps
            entry[1] += 1 / steps
    categories = collections.defaultdict(float)
    for name, (ms, _) in kernels.items():
        categories[category(name)] += ms
    return dict(total_ms=sum(ms for ms, _ in kernels.values()),
                categories=dict(sorted(categories.items(), key=lambda item: -item[1])),
                kernels=dict(sorted(kernels.items(), key=lambda item: -item[1][0])))


def operator_rows(averages, steps: int) -> List[Dict]:
    """``key_averages(group_by_input_shape=True)``'s operators with GPU time of their own:
    name, input shapes, ms and calls a step, largest first."""
    rows = [dict(op=e.key, shapes=str(e.input_shapes), ms=e.self_device_time_total / 1e3 / steps,
                 calls=e.count / steps) for e in averages if e.self_device_time_total > 0]
    return sorted(rows, key=lambda row: -row['ms'])


def profiled(name: str, args) -> Dict:
    """One model's row: ``--steps`` profiled steps after four warm-up steps."""
    torch.manual_seed(0)
    step = make_step(build_model(name), args.mode, args.batch, args.size)
    for _ in range(4):  # Triton's kernels, cuDNN's choices, the optimizer's state, the graphs
        step([])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 record_shapes=args.by == 'op') as prof:
        for _ in range(args.steps):
            step([])
        torch.cuda.synchronize()
    row = dict(model=name, mode=args.mode, batch=args.batch, size=args.size, by=args.by)
    if args.by == 'op':
        rows = operator_rows(prof.key_averages(group_by_input_shape=True), args.steps)
        # the steps' own record_function ranges hold every kernel: not an operator's time
        rows = [r for r in rows if not r['op'].startswith('phase:')]
        return dict(row, total_ms=sum(r['ms'] for r in rows), rows=rows[:args.top])
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'trace.json')
        prof.export_chrome_trace(path)
        with open(path) as trace:
            times = kernel_times(json.load(trace)['traceEvents'], args.steps,
                                 by_grid=args.by == 'launch')
    times['kernels'] = dict(list(times['kernels'].items())[:args.top])
    return dict(row, **times)


def report(row: Dict) -> str:
    """The row as text: the categories and kernels, or the operators."""
    lines = [f'## {row["model"]} ({row["mode"]}, batch {row["batch"]}): '
             f'{row["total_ms"]:.2f} ms of GPU time a step']
    if row['by'] == 'op':
        lines += [f'{r["ms"]:8.3f} ms {r["calls"]:6.0f}x  {r["op"][:40]:40s} {r["shapes"][:110]}'
                  for r in row['rows']]
        return '\n'.join(lines)
    lines += [f'  {cat:18s} {ms:7.2f} ms' for cat, ms in row['categories'].items()]
    lines += [f'{ms:8.3f} ms {calls:6.0f}x  {name[:110]}'
              for name, (ms, calls) in row['kernels'].items()]
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_step_arguments(parser)
    parser.add_argument('--steps', type=int, default=2, help='profiled steps')
    parser.add_argument('--by', choices=['kernel', 'launch', 'op'], default='kernel')
    parser.add_argument('--top', type=int, default=45, help='kernels or operators kept')
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    print(f'# torch {torch.__version__}, {torch.cuda.get_device_name()}', flush=True)
    for name in args.models:
        row = profiled(name, args)
        print(report(row), flush=True)
        if args.out:
            with open(args.out, 'a') as f:
                f.write(json.dumps(row) + '\n')
        torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
