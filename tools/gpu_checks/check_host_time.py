"""The host's (CPU's) time for one eager inference or training step, per model: Python and
kernel launches.

    python3 tools/gpu_checks/check_host_time.py --models segman-t segman-b segnext-l \
        [--size 256] [--train] [--profile segman-b] [--out host.jsonl]

At a small input (batch 1, ``--size`` square, bf16 autocast, ``torch.inference_mode``) the GPU
finishes each kernel before the host has launched the next, so a forward's wall time is the
host's: ``host_ms``, the median of 20 synchronised forwards. ``kernels`` counts the CUDA
kernels one forward launches and ``gpu_ms`` adds their times (``torch.profiler``);
``host_us_per_kernel`` is ``host_ms`` over ``kernels``. A model whose ``host_ms`` at batch 16,
512x512 exceeds its GPU time is bound by the host there (``benchmark.py --profile``).
``--profile NAME``: Python's profile of NAME's forwards, the functions with the most own time.
One JSON line per model.

``--train``: the same for one training step (batch 1, ``--size`` square, random labels):
the wall milliseconds of the forward with the loss, the backward and the AdamW step, each
the median of 10 synchronised steps, and the kernels a step launches; ``--profile NAME`` then
profiles NAME's training steps, Python's functions and ``torch.profiler``'s operators by
their own CPU time.

``--ops``: the host's microseconds per call of each layer of a SegMAN op on a tiny map (the
public op with its dispatch, the Triton backend with its autograd wrapper, the kernel
launch) and of PyTorch operations for scale (an add, ``F.layer_norm``,
``F.conv2d``), without and with autograd recording. ``--ops --cpu`` measures the same layers
on CPU tensors under Triton's interpreter with the kernels not launched: the Python layers'
host time without a GPU (``TRITON_INTERPRET=1 python3 tools/gpu_checks/check_host_time.py
--ops --cpu``; PyTorch's own operations then compute on the CPU).

``--ops --backward`` (with ``--cpu`` or on the GPU): the host's microseconds a backward
node of each op's fast backend, and the PyTorch operations it calls (those not inside
another), from the backward of 40 chained calls on a ``(2, 32, 8, 8)`` map; ``x * 1.0``, a
node of PyTorch's own, for scale.
"""
import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import (MODELS, build_model, data_samples, training_optimizer,  # noqa: E402
                       training_phases, write_row)  # (tools/benchmark.py)
from check_many_shapes import infer_seconds  # noqa: E402


def forward(model, images) -> None:
    with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16):
        model(images, mode='tensor')


def host_ms(model, size: int, repeats: int = 20) -> float:
    return 1e3 * statistics.median(infer_seconds(model, size, size) for _ in range(repeats))


def kernels_and_gpu_ms(model, images):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward(model, images)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels), sum(e.device_time for e in kernels) / 1e3


def infer_host(name: str, model, size: int, profiled: bool) -> dict:
    """Median wall ms of a forward at batch 1 (the host's time), its kernels and GPU ms."""
    images = torch.randn(1, 3, size, size, device='cuda')
    for _ in range(3):  # Triton's kernels, cuDNN's choices
        forward(model, images)
    host = host_ms(model, size)
    kernels, gpu = kernels_and_gpu_ms(model, images)
    if profiled:
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [forward(model, images) for _ in range(5)])
        pstats.Stats(profiler).sort_stats('tottime').print_stats(30)
    return dict(model=name, size=size, host_ms=round(host, 2), kernels=kernels, gpu_ms=round(gpu, 2),
                host_us_per_kernel=round(1e3 * host / kernels, 1))


def train_step(model, images, samples, optimizer, marks: list) -> None:
    """One training step as ``tools/benchmark.py`` runs it, appending ``time.perf_counter()``
    to ``marks`` after the forward with the loss, the backward and the optimizer step, each
    synchronised."""
    for _ in training_phases(model, images, samples, optimizer):
        torch.cuda.synchronize()
        marks.append(time.perf_counter())


def train_host(name: str, model, size: int, profiled: bool, repeats: int = 10) -> dict:
    """Median wall ms of each training phase at batch 1 (the host's time), and kernels a step."""
    model.train()
    images = torch.randn(1, 3, size, size, device='cuda')
    samples = data_samples(1, size, size)
    optimizer = training_optimizer(model)
    phases = {'forward_ms': [], 'backward_ms': [], 'optimizer_ms': []}
    for step in range(3 + repeats):  # 3 warm-up steps: Triton's kernels, cuDNN's choices
        torch.cuda.synchronize()
        marks = [time.perf_counter()]
        train_step(model, images, samples, optimizer, marks)
        if step >= 3:
            for key, start, end in zip(phases, marks, marks[1:]):
                phases[key].append(1e3 * (end - start))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_step(model, images, samples, optimizer, [])
    kernels = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
    if profiled:
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [train_step(model, images, samples, optimizer, []) for _ in range(5)])
        pstats.Stats(profiler).sort_stats('tottime').print_stats(40)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                train_step(model, images, samples, optimizer, [])
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=40,
                                        max_name_column_width=60), flush=True)
    row = {key: round(statistics.median(values), 2) for key, values in phases.items()}
    return dict(model=name, size=size, mode='train', **row, kernels=kernels)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def per_call_us(fn, calls: int = 2000) -> float:
    """Host microseconds per ``fn()``: the GPU runs tiny kernels faster than they come."""
    for _ in range(50):
        fn()
    _synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _synchronize()
    return 1e6 * (time.perf_counter() - start) / calls


def scan_parameters(batch: int, device: str, grad: bool) -> tuple:
    """``dt_low`` (R = 2), ``dt_proj``, ``A``, ``B``, ``C``, ``D``, ``delta_bias`` of a
    32-channel SS2D on an 8 x 8 map (``A`` never needs a gradient)."""
    def randn(*shape):
        return torch.randn(*shape, device=device, requires_grad=grad)

    return (randn(batch, 4, 2, 64), randn(4, 32, 2), -torch.ones(128, 1, device=device),
            randn(batch, 4, 1, 64), randn(batch, 4, 1, 64), randn(128), randn(128))


def op_layers(grad: bool, device: str = 'cuda'):
    """``{name: fn}``: the layers of ``layer_norm_2d`` and ``depthwise_conv2d``, the ops
    ``pointwise_conv2d``, ``neighborhood_attention_2d`` and ``cross_selective_scan`` with
    their Triton backends, and PyTorch operations, on a ``(1, 32, 8, 8)`` map."""
    import torch.nn.functional as F

    from mmseg_segman.ops import (cross_selective_scan, depthwise_conv2d, layer_norm_2d,
                                  neighborhood_attention_2d, pointwise_conv2d)
    from mmseg_segman.ops import triton_cross_selective_scan as tcs
    from mmseg_segman.ops import triton_depthwise_conv as tdw
    from mmseg_segman.ops import triton_layer_norm as tln
    from mmseg_segman.ops import triton_neighborhood_attention as tna

    def randn(*shape, grad=False):
        return torch.randn(*shape, device=device, requires_grad=grad)

    x = randn(1, 32, 8, 8, grad=grad)
    w, b = torch.ones(32, device=device), torch.zeros(32, device=device)
    taps = randn(32, 1, 3, 3)
    pointwise = randn(64, 32, 1, 1)
    q, rpb = randn(1, 2, 8, 8, 16, grad=grad), torch.zeros(2, 13, 13, device=device)
    scan = (x, *scan_parameters(1, device, grad=False))
    return {
        'add': lambda: x + x,
        'F.layer_norm (channels last)': lambda: F.layer_norm(x.permute(0, 2, 3, 1), (32,), w, b),
        'layer_norm_2d': lambda: layer_norm_2d(x, w, b),
        'layer_norm_2d triton backend': lambda: tln.layer_norm_2d_triton(x, w, b, 1e-6, x.dtype),
        'layer_norm_2d launch': lambda: tln._forward(x, w, b, None, None, 1e-6, x.dtype, stats=False),
        'depthwise_conv2d': lambda: depthwise_conv2d(x, taps, b),
        'depthwise_conv2d triton backend': lambda: tdw.depthwise_conv2d_triton(x, taps, b),
        'depthwise_conv2d launch': lambda: tdw._convolve(x, taps, b, False, False, x.dtype),
        'F.conv2d depthwise 3x3': lambda: F.conv2d(x, taps, b, padding=1, groups=32),
        'F.conv2d 1x1': lambda: F.conv2d(x, pointwise, b.repeat(2)),
        'pointwise_conv2d': lambda: pointwise_conv2d(x, pointwise, b.repeat(2)),
        'neighborhood_attention_2d': lambda: neighborhood_attention_2d(q, q, q, 7, rpb),
        'neighborhood_attention_2d triton backend': lambda: tna.neighborhood_attention_triton(
            q, q, q, 7, rpb),
        'cross_selective_scan': lambda: cross_selective_scan(*scan),
        'cross_selective_scan triton backend': lambda: tcs.cross_selective_scan_triton(*scan),
    }


def backward_chains(device: str = 'cuda'):
    """``{name: step}``: ``step(x)`` one call of a SegMAN op (its fast backend) on a ``(2, 32,
    8, 8)`` map, chained into the next, and ``x * 1.0`` for scale (PyTorch's own node)."""
    from mmseg_segman.ops import (cross_selective_scan, depthwise_conv2d, layer_norm_2d,
                                  neighborhood_attention_2d, pointwise_conv2d)
    from mmseg_segman.ops.pointwise_conv import Residual

    def param(*shape):
        return torch.randn(*shape, device=device, requires_grad=True)

    norm, shift, taps, pointwise = param(32), param(32), param(32, 1, 3, 3), param(32, 32, 1, 1)
    scan, rpb = scan_parameters(2, device, grad=True), param(2, 13, 13)

    def heads(x):  # (2, 32, 8, 8) as (B, heads, H, W, d)
        return x.view(2, 2, 16, 8, 8).permute(0, 1, 3, 4, 2)

    return {
        'x * 1.0': lambda x: x * 1.0,
        'layer_norm_2d': lambda x: layer_norm_2d(x, norm, shift),
        'depthwise_conv2d, residual': lambda x: depthwise_conv2d(x, taps, shift, True),
        'pointwise_conv2d': lambda x: pointwise_conv2d(x, pointwise, shift),
        'pointwise_conv2d, gelu': lambda x: pointwise_conv2d(x, pointwise, shift, 'gelu'),
        'pointwise_conv2d, residual': lambda x: pointwise_conv2d(
            x, pointwise, shift, None, Residual(x, norm, shift)),
        'neighborhood_attention_2d': lambda x: neighborhood_attention_2d(
            heads(x), heads(x), heads(x), 7, rpb).permute(0, 1, 4, 2, 3).reshape(2, 32, 8, 8),
        'cross_selective_scan': lambda x: cross_selective_scan(x, *scan),
    }


def backward_node(step, device: str, chain: int = 40, repeats: int = 7) -> dict:
    """Host us a node of ``chain`` calls' backward (the least of ``repeats`` backward passes),
    and PyTorch operations a node (those the autograd nodes call, not counting their parts;
    the pass adds three over the chain: its seed, the final sum's, the input's)."""
    def chained():
        x = torch.randn(2, 32, 8, 8, device=device, requires_grad=True)
        for _ in range(chain):
            x = step(x)
        return x.sum()

    times = []
    for _ in range(repeats):
        loss = chained()
        _synchronize()
        start = time.perf_counter()
        loss.backward()
        _synchronize()
        times.append(1e6 * (time.perf_counter() - start) / chain)
    loss = chained()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    operations = sum(1 for e in prof.events() if e.name.startswith('aten::')
                     and (e.cpu_parent is None or not e.cpu_parent.name.startswith('aten::')))
    return dict(backward_us_a_node=round(min(times), 1),
                operations_a_node=round(operations / chain, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='*', choices=MODELS,
                        help='default: all, or none with --ops')
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--profile', nargs='*', choices=MODELS, default=[],
                        help='print the Python functions with the most own time')
    parser.add_argument('--ops', action='store_true', help='host time per call of op layers')
    parser.add_argument('--backward', action='store_true',
                        help='with --ops: host time and operations a backward node of each op')
    parser.add_argument('--cpu', action='store_true',
                        help='--ops on the CPU, under TRITON_INTERPRET=1, kernels not launched')
    parser.add_argument('--train', action='store_true', help='time training steps, not forwards')
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    if args.cpu and (not args.ops or args.models or os.environ.get('TRITON_INTERPRET') != '1'):
        parser.error('--cpu measures --ops only, with TRITON_INTERPRET=1 set')
    if args.backward and not args.ops:
        parser.error('--backward measures --ops')
    if args.cpu:
        torch.set_num_threads(1)  # PyTorch's own CPU operations: no waiting on busy cores
    if args.ops:
        from mmseg_segman.ops.triton_jit import kernels_not_launched

        device = 'cpu' if args.cpu else 'cuda'
        with kernels_not_launched() if args.cpu else nullcontext():
            if args.backward:
                for name, step in backward_chains(device).items():
                    write_row(dict(op=name, device=device, **backward_node(step, device)),
                              args.out)
            else:
                for grad in (False, True):
                    for name, fn in op_layers(grad, device).items():
                        write_row(dict(op=name, autograd=grad, device=device,
                                       host_us=round(per_call_us(fn), 1)), args.out)
    for name in args.models if args.models is not None else ([] if args.ops else MODELS):
        model = build_model(name).cuda().eval()
        measure = train_host if args.train else infer_host
        write_row(measure(name, model, args.size, name in args.profile), args.out)
        del model
        torch.cuda.empty_cache()

if __name__ == '__main__':
    main()
