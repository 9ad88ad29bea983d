"""Whether a model's eager step is bound by the GPU or by the host: the GPU's busy time against
the step's wall time, and the host's time per phase.

    python3 tools/gpu_checks/check_gpu_busy.py --models segman-l segformer-b4 \
        [--mode train] [--batch 8] [--size 512] [--rounds 6] [--steps 3] [--table] \
        [--out busy.jsonl]

The step is ``tools/benchmark.py``'s (bf16 autocast; training: the loss on random labels,
backward, AdamW step). Every model is built and warmed up (four steps) first; then
``--rounds`` steps of each are timed unprofiled, one step of each model in turn (the host's
speed drifts within a process and between processes, by tens of percent on the GPU
machines: interleaved, it weighs on every model of the call alike): ``wall_ms``
(synchronised) and ``host_ms``, the time until the step's Python returns without
synchronising, with the host's ms of each phase (forward with the loss, backward, optimizer
step), medians over the rounds. When ``host_ms`` equals ``wall_ms`` the host never waited for the
GPU: the GPU waited for the host. Then ``--steps`` steps under ``torch.profiler``, means a
step: ``gpu_busy_ms``, the union of the intervals in which a kernel, copy or memset ran, and
``busy_share``, its share of the profiled wall time (the profiler slows the host, so the
share is a lower bound); per phase the host's span and the GPU's busy time inside it; the
GPU's idle gaps over 1 ms. One JSON line per model.
``--table``: torch.profiler's operators by their own CPU time, and the backward's autograd
nodes by their host time (their own and their operators').
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark import (GRAPHED, MODELS, TRAINING_PHASES as PHASES, build_model,  # noqa: E402
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


def timed_step(step) -> Tuple[float, float, List[float]]:
    """One unprofiled step: its wall seconds (synchronised), the host's seconds until its
    Python returned, and the host's seconds of each phase."""
    torch.cuda.synchronize()
    marks = [time.perf_counter()]
    step(marks)
    host = time.perf_counter() - marks[0]
    torch.cuda.synchronize()
    return time.perf_counter() - marks[0], host, [end - begin for begin, end in zip(marks, marks[1:])]


def interleaved_timings(steps: Dict[str, Callable], rounds: int) -> Dict[str, List]:
    """``rounds`` timed steps of every model, one step of each in turn (the order reversed
    every other round), so that the host's speed, which drifts within a process, weighs on
    every model alike: ``{name: [timed_step(), ...]}``."""
    names = list(steps)
    timings = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            timings[name].append(timed_step(steps[name]))
    return timings


def timing_row(name: str, timings: List, args) -> Dict:
    """The medians of a model's timed steps."""
    walls, hosts, phases = zip(*timings)
    return dict(model=name, mode=args.mode, batch=args.batch, size=args.size,
                wall_ms=round(1e3 * statistics.median(walls), 1),
                host_ms=round(1e3 * statistics.median(hosts), 1),
                **{f'{p}_host_ms': round(1e3 * statistics.median(v), 1)
                   for p, v in zip(PHASES, zip(*phases))})


def profiled(step, args) -> Dict:
    """``args.steps`` steps under ``torch.profiler``: :func:`summarize_trace`'s figures (and,
    with ``--table``, the operators and autograd nodes printed)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step([])
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'trace.json')
        prof.export_chrome_trace(path)
        with open(path) as trace:
            row = summarize_trace(json.load(trace)['traceEvents'], args.steps)
    if args.table:
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=30,
                                        max_name_column_width=60), flush=True)
        print(backward_nodes_table(prof.key_averages(), args.steps), flush=True)
    return row


def measure(names: List[str], args) -> Iterator[Dict]:
    """Build every model, warm each up, time them interleaved, then profile each."""
    steps = {name: make_step(build_model(name), args.mode, args.batch, args.size)
             for name in names}
    for step in steps.values():
        for _ in range(4):  # Triton's kernels, cuDNN's choices, the optimizer's state
            step([])
    timings = interleaved_timings(steps, args.rounds)
    for name, step in steps.items():
        yield {**timing_row(name, timings[name], args), **profiled(step, args)}


def backward_nodes_table(averages, steps: int) -> str:
    """The autograd nodes of the backward by their host time (their own and their
    operators'), ms and calls a step: where the backward's host time goes."""
    prefix = 'autograd::engine::evaluate_function: '
    nodes = sorted((e for e in averages if e.key.startswith(prefix)),
                   key=lambda e: -e.cpu_time_total)
    lines = [f'{"autograd node":<48} {"host ms":>8} {"calls":>6} {"us a call":>9}']
    for e in nodes[:25]:
        lines.append(f'{e.key[len(prefix):][:48]:<48} {e.cpu_time_total / 1e3 / steps:8.1f} '
                     f'{e.count // steps:6d} {e.cpu_time_total / e.count:9.0f}')
    return '\n'.join(lines)


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of :func:`make_step`'s steps: ``--models``, ``--mode``, ``--batch``,
    ``--size``."""
    parser.add_argument('--models', nargs='+', choices=MODELS + GRAPHED, required=True)
    parser.add_argument('--mode', choices=['train', 'infer'], default='train')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_step_arguments(parser)
    parser.add_argument('--rounds', type=int, default=6,
                        help='timed steps of each model, interleaved')
    parser.add_argument('--steps', type=int, default=3, help='profiled steps')
    parser.add_argument('--table', action='store_true', help="print the profiler's operators")
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    print(f'# torch {torch.__version__}, {torch.cuda.get_device_name()}', flush=True)
    for row in measure(args.models, args):
        write_row(row, args.out)


if __name__ == '__main__':
    main()
