"""The GPU kernels of one encoder block of each stage, in launch order, against the memory
traffic of the block's feature map: which kernels are far from the memory bound.

    python3 tools/gpu_checks/check_block_kernels.py [--arch l] [--batch 16] [--size 512] \
        [--mode infer|train] [--steps 5] [--stages 1 2 3 4] [--compile] [--dtype bf16|fp32] \
        [--out kernels.jsonl]
    ncu --profile-from-start off --clock-control none --csv --page raw --print-units base \
        --metrics "$(python3 tools/gpu_checks/check_block_kernels.py --ncu-metrics)" \
        --log-file kernels.csv python3 tools/gpu_checks/check_block_kernels.py --ncu [options]
    python3 tools/gpu_checks/check_block_kernels.py --render-ncu kernels.csv [--out ...]

For each stage of a SegMAN size, the first block of the stage (the fast path, bf16 autocast
or with ``--dtype fp32`` float32, eval mode for ``infer``; forward and backward for
``train``) runs ``--steps`` times under ``torch.profiler``. Each kernel, copy or memset of a
step is listed in launch order with its mean duration (us) and ``maps``: how many reads or
writes of the stage's ``(B, C, H, W)`` map (in ``--dtype``) the H100's peak memory bandwidth
(3.35 TB/s) would move in that time. A kernel whose ``maps`` is well above the number of
maps it reads and writes is far from the memory bound.
Then the block's total, and the total times the stage's depth. One JSON line per stage.
``--compile``: the block through ``torch.compile`` (inductor, no CUDA graphs; its glue fused
into its own kernels); with ``SEGMAN_BACKEND_<OP>=torch`` an op runs as PyTorch code that
inductor may fuse with its neighbours.
``--ncu``: the same steps between ``cudaProfilerStart`` and ``cudaProfilerStop`` and without
``torch.profiler``, for Nsight Compute (the command above; it runs each kernel alone, with
the L2 flushed, and reads its hardware counters). ``--render-ncu`` prints each kernel of its
CSV with its DRAM bytes, the share of the peak memory bandwidth they took in its time, its
memory and compute (SM) throughput as a share of their peaks, its occupancy and registers;
then the block's total time against the time its DRAM bytes need at peak bandwidth.
"""
import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import write_row  # noqa: E402  (tools/benchmark.py)
from check_gpu_busy import GPU_CATEGORIES  # noqa: E402

from mmseg_segman.models import SegMANEncoder  # noqa: E402
from mmseg_segman.models.variants import ENCODER_ARCHS  # noqa: E402

PEAK_BYTES_PER_US = 3.35e6  # H100 SXM HBM3
STEP = 'block_step'
NCU_METRICS = {  # column: Nsight Compute metric
    'us': 'gpu__time_duration.sum',
    'read': 'dram__bytes_read.sum',
    'write': 'dram__bytes_write.sum',
    'memory_pct': 'gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed',
    'sm_pct': 'sm__throughput.avg.pct_of_peak_sustained_elapsed',
    'occupancy_pct': 'sm__warps_active.avg.pct_of_peak_sustained_active',
    'registers': 'launch__registers_per_thread',
}
NCU_SCALE = {'ns': 1e-3, 'us': 1.0, 'ms': 1e3, 'nsecond': 1e-3, 'usecond': 1.0, 'msecond': 1e3,
             'byte': 1.0, 'Kbyte': 1e3, 'Mbyte': 1e6, 'Gbyte': 1e9, '%': 1.0,
             'register/thread': 1.0}  # unit: to us, bytes, % or registers


def step_kernels(events: List[Dict], steps: int) -> List[Dict]:
    """The GPU events of each step (inside the ``block_step`` annotations' GPU spans) in launch
    order, their durations averaged over the steps: ``[{name, us}]``."""
    complete = [e for e in events if e.get('ph') == 'X']
    gpu = sorted((e for e in complete if e.get('cat') in GPU_CATEGORIES), key=lambda e: e['ts'])
    marks = sorted(e['ts'] for e in complete
                   if e.get('cat') == 'gpu_user_annotation' and e['name'] == STEP)
    if len(marks) != steps:  # no GPU-side annotation: split by count instead
        if len(gpu) % steps:
            raise RuntimeError(f'{len(gpu)} GPU events do not split into {steps} steps')
        per_step = [gpu[i * (len(gpu) // steps):(i + 1) * (len(gpu) // steps)] for i in range(steps)]
    else:
        bounds = marks + [float('inf')]
        per_step = [[e for e in gpu if bounds[i] <= e['ts'] < bounds[i + 1]] for i in range(steps)]
    counts = {len(s) for s in per_step}
    if len(counts) != 1:
        raise RuntimeError(f'the steps launched different numbers of GPU events: {sorted(counts)}')
    return [dict(name=first['name'], us=sum(s[i]['dur'] for s in per_step) / steps)
            for i, first in enumerate(per_step[0])]


def backend_environment() -> Dict[str, str]:
    """The ``SEGMAN_BACKEND*`` variables of this process (the backends chosen outside the code)."""
    return {name: value for name, value in os.environ.items() if name.startswith('SEGMAN_BACKEND')}


def ncu_kernels(path: str) -> List[Dict]:
    """The kernels of an ``ncu --csv --page raw`` log with :data:`NCU_METRICS`, in launch order:
    ``[{name, us, read, write (bytes), memory_pct, sm_pct, occupancy_pct, registers}]``."""
    with open(path) as log:
        lines = [line for line in log if line.startswith('"')]  # ncu's own messages start with ==
    rows = list(csv.reader(lines))
    if len(rows) < 3:
        raise RuntimeError(f'{path}: no kernel in the log (was the profiled range empty?)')
    header, units = rows[0], rows[1]
    missing = [m for m in NCU_METRICS.values() if m not in header]
    if missing:
        raise RuntimeError(f'{path}: metrics {missing} not in the log')
    kernels = []
    for row in rows[2:]:
        kernel = dict(name=row[header.index('Kernel Name')])
        for column, metric in NCU_METRICS.items():
            i = header.index(metric)
            if units[i] not in NCU_SCALE:
                raise RuntimeError(f'{path}: unknown unit {units[i]!r} of {metric}')
            kernel[column] = float(row[i].replace(',', '')) * NCU_SCALE[units[i]]
        kernels.append(kernel)
    return kernels


def render_ncu(path: str, out: str) -> None:
    """Print :func:`ncu_kernels` of ``path`` as a table and the block's totals; one JSON line."""
    kernels = ncu_kernels(path)
    print(f'{"us":>8} {"MB":>7} {"peak BW %":>9} {"mem %":>6} {"SM %":>6} {"occ %":>6} {"regs":>5}  kernel')
    for k in kernels:
        moved = k['read'] + k['write']
        print(f"{k['us']:8.1f} {moved / 1e6:7.1f} {100 * moved / PEAK_BYTES_PER_US / k['us']:9.1f} "
              f"{k['memory_pct']:6.1f} {k['sm_pct']:6.1f} {k['occupancy_pct']:6.1f} "
              f"{k['registers']:5.0f}  {k['name'][:80]}")
    total_us = sum(k['us'] for k in kernels)
    total_bytes = sum(k['read'] + k['write'] for k in kernels)
    bound_us = total_bytes / PEAK_BYTES_PER_US
    print(f'# {len(kernels)} kernels, {total_us:.1f} us; DRAM {total_bytes / 1e6:.1f} MB, '
          f'{bound_us:.1f} us at the peak bandwidth ({100 * bound_us / total_us:.1f}% of the time)')
    write_row(dict(ncu=path, kernels=len(kernels), us=round(total_us, 1),
                   dram_mb=round(total_bytes / 1e6, 1), bandwidth_bound_us=round(bound_us, 1),
                   rows=[{**k, 'name': k['name'][:200]} for k in kernels]), out)


def profile_block(block, x: torch.Tensor, sin, cos, mode: str, steps: int,
                  ncu: bool = False) -> List[Dict]:
    """The block's kernels under bf16 autocast if ``x`` is bf16, else in ``x``'s dtype; with
    ``ncu``, the steps between ``cudaProfilerStart`` and ``Stop`` only (no kernels returned)."""
    def step():
        with record_function(STEP), torch.autocast('cuda', dtype=torch.bfloat16,
                                                   enabled=x.dtype == torch.bfloat16):
            if mode == 'infer':
                with torch.inference_mode():
                    block(x, sin, cos)
            else:
                # the gradients dropped as a training step's optimizer drops them (else each
                # step would add one kernel a parameter accumulating into .grad)
                block.zero_grad(set_to_none=True)
                x.grad = None
                block(x, sin, cos).float().sum().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if ncu:
        with torch.cuda.profiler.profile():
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        return []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'trace.json')
        prof.export_chrome_trace(path)
        with open(path) as trace:
            return step_kernels(json.load(trace)['traceEvents'], steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', default='l', choices=sorted(ENCODER_ARCHS))
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--mode', choices=['infer', 'train'], default='infer')
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--stages', nargs='+', type=int, default=[1, 2, 3, 4])
    parser.add_argument('--compile', action='store_true', help='each block through torch.compile')
    parser.add_argument('--dtype', choices=['bf16', 'fp32'], default='bf16',
                        help='bf16 autocast (the default) or float32 throughout')
    parser.add_argument('--out', help='append JSON lines here')
    parser.add_argument('--ncu', action='store_true',
                        help='run the steps for ncu --profile-from-start off (see above)')
    parser.add_argument('--ncu-metrics', action='store_true', help="print ncu's --metrics and exit")
    parser.add_argument('--render-ncu', metavar='CSV', help="print ncu's CSV log and exit")
    args = parser.parse_args()
    if args.ncu_metrics:
        print(','.join(NCU_METRICS.values()))
        return
    if args.render_ncu:
        render_ncu(args.render_ncu, args.out)
        return
    if args.ncu and len(args.stages) != 1:
        parser.error('--ncu profiles one stage a log (--stages N): --render-ncu totals a log as a block')
    print(f'# torch {torch.__version__}, {torch.cuda.get_device_name()}, compiled: {args.compile}, '
          f'backends: {backend_environment() or "default"}', flush=True)
    encoder = SegMANEncoder(arch=args.arch).cuda().train(args.mode == 'train')
    dtype = torch.bfloat16 if args.dtype == 'bf16' else torch.float32
    depths = ENCODER_ARCHS[args.arch]['depths']
    grand_total = 0.0
    for index, stage in enumerate(encoder.stages):
        if index + 1 not in args.stages:
            continue
        side = args.size // 4 // 2 ** index
        channels = ENCODER_ARCHS[args.arch]['embed_dims'][index]
        x = torch.randn(args.batch, channels, side, side, device='cuda', dtype=dtype,
                        requires_grad=args.mode == 'train')
        sin, cos = stage.rope((side, side))
        block = torch.compile(stage.blocks[0]) if args.compile else stage.blocks[0]
        kernels = profile_block(block, x, sin, cos, args.mode, args.steps, args.ncu)
        if args.ncu:
            print(f'## stage {index + 1}: {args.steps} steps profiled for ncu', flush=True)
            continue
        map_bytes = x.numel() * x.element_size()
        print(f'## stage {index + 1}: ({args.batch}, {channels}, {side}, {side}) {args.dtype} map '
              f'{map_bytes / 2 ** 20:.1f} MiB, {args.mode}', flush=True)
        for k in kernels:
            k['maps'] = round(k['us'] * PEAK_BYTES_PER_US / map_bytes, 2)
            print(f"{k['us']:9.1f} us {k['maps']:6.2f} maps  {k['name'][:100]}", flush=True)
        total = sum(k['us'] for k in kernels)
        grand_total += total * depths[index]
        print(f'block {total:.1f} us; x {depths[index]} blocks = {total * depths[index] / 1e3:.2f} ms',
              flush=True)
        write_row(dict(arch=args.arch, stage=index + 1, mode=args.mode, dtype=args.dtype,
                       compiled=args.compile,
                       backends=backend_environment(), batch=args.batch,
                       size=args.size, map_mib=round(map_bytes / 2 ** 20, 2),
                       block_us=round(total, 1), stage_ms=round(total * depths[index] / 1e3, 3),
                       kernels=[{**k, 'us': round(k['us'], 1)} for k in kernels]), args.out)
    print(f'# all blocks: {grand_total / 1e3:.2f} ms', flush=True)


if __name__ == '__main__':
    main()
