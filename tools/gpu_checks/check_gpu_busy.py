"""Whether a model's eager step is bound by the GPU or by the host: the GPU's busy time against
the step's wall time, and the host's time per phase.

    python3 tools/gpu_checks/check_gpu_busy.py --models segman-l segformer-b4 \
        [--mode train] [--batch 8] [--size 512] [--steps 3] [--table] [--out busy.jsonl]

The step is ``tools/benchmark.py``'s (bf16 autocast; training: the loss on random labels,
backward, AdamW step). After four warm-up steps, six steps are timed unprofiled: ``wall_ms``
(synchronised) and ``host_ms``, the time until the step's Python returns without
synchronising, with the host's ms of each phase (forward with the loss, backward, optimizer
step), medians of the six. When ``host_ms`` equals ``wall_ms`` the host never waited for the
GPU: the GPU waited for the host. Then ``--steps`` steps under ``torch.profiler``, means a
step: ``gpu_busy_ms``, the union of the intervals in which a kernel, copy or memset ran, and
``busy_share``, its share of the profiled wall time (the profiler slows the host, so the
share is a lower bound); per phase the host's span and the GPU's busy time inside it; the
GPU's idle gaps over 1 ms. One JSON line per model.
``--table``: torch.profiler's operators by their own CPU time.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark import (MODELS, TRAINING_PHASES as PHASES, build_model,  # noqa: E402
                       data_samples, training_optimizer, training_phases, write_row)
GPU_CATEGORIES = ('kernel', 'gpu_memcpy', 'gpu_memset')
Interval = Tuple[float, float]


def merged(intervals: Iterable[Interval]) -> List[Interval]:
    """The union of ``(begin, end)`` intervals as disjoint intervals in order."""
    union: List[Interval] = []
    for begin, end in sorted(intervals):
        if union and begin <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], end))
        else:
            union.append((begin, end))
    return union


def overlap(spans: Sequence[Interval], intervals: Sequence[Interval]) -> float:
    """The total length of ``intervals`` inside ``spans``, each list disjoint."""
    return sum(max(0.0, min(end, span_end) - max(begin, span_begin))
               for span_begin, span_end in spans for begin, end in intervals)


def summarize_trace(events: List[Dict], steps: int) -> Dict:
    """A step's GPU busy time, phases and idle gaps (ms) from a Chrome trace's events of
    ``steps`` steps whose phases are user annotations named ``phase:<name>``."""
    complete = [e for e in events if e.get('ph') == 'X']
    gpu = [(e['ts'], e['ts'] + e['dur']) for e in complete if e.get('cat') in GPU_CATEGORIES]
    intervals = len(gpu)
    phases = {name: [(e['ts'], e['ts'] + e['dur']) for e in complete
                     if e.get('cat') == 'user_annotation' and e['name'] == f'phase:{name}']
              for name in PHASES}
    spans = [span for spans in phases.values() for span in spans]
    if not gpu or not spans:
        raise RuntimeError('the profile holds no GPU activity or no phase annotations')
    start = min(begin for begin, _ in spans)
    wall = max(max(end for _, end in spans), max(end for _, end in gpu)) - start
    gpu = merged(gpu)
    busy = sum(end - begin for begin, end in gpu)
    gaps = [(end, begin) for (_, end), (begin, _) in zip([(start, start)] + gpu, gpu)]
    ms = 1e-3 / steps  # trace microseconds over all steps -> milliseconds a step
    row = dict(profiled_wall_ms=round(wall * ms, 1), gpu_busy_ms=round(busy * ms, 1),
               busy_share=round(busy / wall, 3), gpu_intervals=intervals // steps,
               idle_gaps_over_1ms=round(sum(end - begin > 1e3 for begin, end in gaps) / steps, 1))
    for name, spans in phases.items():
        if spans:
            row[f'{name}_host_span_ms'] = round(sum(e - b for b, e in spans) * ms, 1)
            row[f'{name}_gpu_busy_ms'] = round(overlap(spans, gpu) * ms, 1)
    return row


def make_step(model, mode: str, batch: int, size: int):
    """``step(marks)``: one step, appending ``time.perf_counter()`` after each phase."""
    images = torch.randn(batch, 3, size, size, device='cuda')
    if mode == 'infer':
        model.eval()

        def step(marks: list) -> None:
            with record_function('phase:forward'), torch.inference_mode(), \
                    torch.autocast('cuda', dtype=torch.bfloat16):
                model(images, mode='tensor')
            marks.append(time.perf_counter())
        return step
    model.train()
    samples = data_samples(batch, size, size)
    optimizer = training_optimizer(model)

    def step(marks: list) -> None:
        phases = training_phases(model, images, samples, optimizer)
        for phase in PHASES:
            with record_function(f'phase:{phase}'):
                next(phases)
            marks.append(time.perf_counter())
        next(phases, None)  # the gradients dropped
    return step


def measure(name: str, args) -> Dict:
    step = make_step(build_model(name), args.mode, args.batch, args.size)
    for _ in range(4):  # Triton's kernels, cuDNN's choices, the optimizer's state
        step([])
    torch.cuda.synchronize()
    walls, hosts, phases = [], [], {p: [] for p in PHASES}
    for _ in range(6):
        torch.cuda.synchronize()
        marks = [time.perf_counter()]
        step(marks)
        hosts.append(time.perf_counter() - marks[0])
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - marks[0])
        for phase, begin, end in zip(PHASES, marks, marks[1:]):
            phases[phase].append(end - begin)
    row = dict(model=name, mode=args.mode, batch=args.batch, size=args.size,
               wall_ms=round(1e3 * statistics.median(walls), 1),
               host_ms=round(1e3 * statistics.median(hosts), 1),
               **{f'{p}_host_ms': round(1e3 * statistics.median(v), 1)
                  for p, v in phases.items() if v})
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step([])
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'trace.json')
        prof.export_chrome_trace(path)
        with open(path) as trace:
            row.update(summarize_trace(json.load(trace)['traceEvents'], args.steps))
    if args.table:
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=30,
                                        max_name_column_width=60), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', choices=MODELS, required=True)
    parser.add_argument('--mode', choices=['train', 'infer'], default='train')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--steps', type=int, default=3, help='profiled steps')
    parser.add_argument('--table', action='store_true', help="print the profiler's operators")
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    print(f'# torch {torch.__version__}, {torch.cuda.get_device_name()}', flush=True)
    for name in args.models:
        write_row(measure(name, args), args.out)
        torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
