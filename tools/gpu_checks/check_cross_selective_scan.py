"""GPU check of the ``cross_selective_scan`` backends (the SS2D scan) against the reference.

    python tools/gpu_checks/check_cross_selective_scan.py [--sweep] [--iters 20]

Needs only torch, triton and mmengine: the ``mmseg_segman.ops`` package is loaded without
running ``mmseg_segman/__init__.py`` (which imports the models and so mmseg).

Variants: ``triton`` (the fused kernels) and ``torch`` (cross scan + chunked PyTorch scan +
cross merge, the reference). The 1-D Triton scan and the mamba-ssm backend that were compared
here (``torch+triton1d``, ``torch+mamba_ssm``) were removed: the models never ran them.

1. Correctness, float32 and bfloat16 inputs (A, D, delta_bias float32, as in SS2D), odd and
   model sizes: output and the gradients of all seven inputs against the ``torch`` backend
   on the same values upcast to float64. Error = max |x - ref| / max |ref|; PASS when under
   the dtype's tolerance or under twice the error of the ``torch`` backend itself in that
   dtype. The triton backend is also run twice under ``torch.use_deterministic_algorithms``
   and must give bitwise equal results (by default the backward's ``dB`` and ``dC`` add
   channel blocks into shared rows by atomics, in a run-dependent order).
2. Timing (CUDA events, warm-up, median): forward under ``no_grad`` and forward+backward,
   with the peak memory of forward+backward.
3. ``--sweep``: time of the triton kernels for several (BLOCK_D, BLOCK_L, num_warps): the
   forward alone, forward+backward by backward blocks.
4. ``--sweep-bc-rows``: the backward's GPU ms (from CUDA graphs) at SegMAN-L's stage sizes by
   the rows of ``dB``'s and ``dC``'s partial sums (``BC_ROWS``; ``one a block`` is the
   deterministic path).
5. ``--sweep-projection``: the step projection's backward alone at SegMAN-L's stage sizes
   (batch 8, bf16 ``dt_low``, float32 ``ddelta``): PyTorch's products under bf16 autocast (as
   the backward ran them before the Triton kernel), in float32 (the reference's), and the
   Triton kernel at its default and other launch shapes, with each one's error against
   float64.
Exits 1 if any check failed.
"""
import argparse
import contextlib
import importlib
import math
import os
import statistics
import sys
import types
from pathlib import Path
from typing import Callable, List, Tuple

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[2]
# cuBLAS under torch.use_deterministic_algorithms (the torch backend's products)
os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')


def load_ops(*names: str) -> List[types.ModuleType]:
    """Import modules of ``mmseg_segman.ops`` without executing the package's ``__init__``."""
    if 'mmseg_segman' not in sys.modules:
        package = types.ModuleType('mmseg_segman')
        package.__path__ = [str(REPO / 'mmseg_segman')]
        sys.modules['mmseg_segman'] = package
    return [importlib.import_module(f'mmseg_segman.ops.{name}') for name in names]


scan_mod, = load_ops('selective_scan')

VARIANTS = ['triton', 'torch']  # backends of cross_selective_scan
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
NAMES = ['y', 'dx', 'ddt_low', 'ddt_proj', 'dA', 'dB', 'dC', 'dD', 'ddelta_bias']
# (batch, channels, height, width, delta scale): odd sizes, H or W = 1, several tiles,
# softplus' linear and exponential ends (scale 10), then encoder stage 1 of SegMAN-B at
# 512x512 and the decoder's MMSCopE (3*128 channels at 16x16)
CHECK_SHAPES = [(1, 3, 7, 5, 0.5), (2, 5, 1, 9, 0.5), (2, 7, 13, 1, 0.5), (1, 4, 1, 1, 0.5),
                (3, 33, 17, 23, 0.5), (2, 5, 9, 11, 10.0), (8, 96, 128, 128, 0.5),
                (16, 384, 16, 16, 0.5)]
TIME_SHAPES = [(8, 96, 128, 128), (8, 192, 64, 64), (8, 384, 32, 32), (16, 384, 16, 16)]
# (BLOCK_D, BLOCK_L, num_warps)
FWD_SWEEP = [(1, 256, 2), (2, 128, 2), (2, 256, 4), (4, 128, 4), (4, 256, 4), (8, 64, 4),
             (8, 128, 4), (8, 256, 8), (16, 64, 4)]
BWD_SWEEP = [(1, 128, 4), (2, 128, 4), (2, 256, 2), (2, 256, 4), (1, 256, 4), (4, 256, 8),
             (2, 512, 4)]


def make_inputs(batch, channels, height, width, dtype, delta_scale=0.5, seed=0) -> List[Tensor]:
    """SS2D-like inputs: activations in ``dtype`` (dt_low, B, C in direction order), parameters
    float32 (rank R = ceil(D / 16), delta = dt_proj @ dt_low about ``delta_scale`` in
    size), VMamba's dt init."""
    g = torch.Generator(device='cuda').manual_seed(seed)
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device='cuda') * scale
    dt = torch.empty(4 * channels, device='cuda').uniform_(math.log(1e-3), math.log(0.1)).exp()
    length, rank = height * width, math.ceil(channels / 16)
    return [randn(batch, channels, height, width).to(dtype),
            randn(batch, 4, rank, length).to(dtype), randn(4, channels, rank, scale=delta_scale / rank ** 0.5),
            -torch.exp(randn(4 * channels, 1, scale=0.5)),
            randn(batch, 4, 1, length).to(dtype), randn(batch, 4, 1, length).to(dtype),
            randn(4 * channels), dt + torch.log(-torch.expm1(-dt))]


def available(variant: str, inputs: List[Tensor]) -> bool:
    return scan_mod._cross_selective_scan.why_not(variant, *inputs) is None


def op(variant: str, fwd_blocks=None, bwd_blocks=None) -> Callable:
    if fwd_blocks is not None or bwd_blocks is not None:
        triton_scan, = load_ops('triton_cross_selective_scan')
        return lambda *args: triton_scan.cross_selective_scan_triton(*args, fwd_blocks, bwd_blocks)
    return scan_mod._cross_selective_scan.backends[variant].fn


def outputs_and_grads(fn: Callable, inputs: List[Tensor], dy: Tensor) -> List[Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, dy.to(out.dtype))]


def rel_errors(got: List[Tensor], want: List[Tensor]) -> dict:
    return {n: ((a.double() - b).abs().max() / (b.abs().max() + 1e-30)).item()
            for n, a, b in zip(NAMES, got, want)}


def check_correctness(variants: List[str]) -> int:
    failures = 0
    for batch, channels, height, width, scale in CHECK_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            inputs = make_inputs(batch, channels, height, width, dtype, scale)
            dy = torch.randn(batch, channels, height, width, device='cuda')
            want = outputs_and_grads(op('torch'), [t.double() for t in inputs], dy.double())
            errs = {v: rel_errors(outputs_and_grads(op(v), inputs, dy), want) for v in variants}
            floor = 2 * max(errs['torch'].values())
            name = f'B{batch} D{channels} {height}x{width}' + (f' delta*{scale:g}' if scale != 0.5 else '')
            for variant in variants:
                if variant == 'torch':
                    continue
                worst = max(errs[variant], key=errs[variant].get)
                ok = errs[variant][worst] <= max(TOLERANCE[dtype], floor)
                failures += not ok
                print(f'{"PASS" if ok else "FAIL"} {variant:16s} {name:26s} {str(dtype)[6:]:8s} '
                      f'worst {errs[variant][worst]:.1e} ({worst}); torch {floor / 2:.1e}; all: '
                      + ' '.join(f'{n} {e:.0e}' for n, e in errs[variant].items()))
            if 'triton' in variants:
                with deterministic():
                    first, second = (outputs_and_grads(op('triton'), inputs, dy) for _ in range(2))
                same = all(torch.equal(a, b) for a, b in zip(first, second))
                failures += not same
                print(f'{"PASS" if same else "FAIL"} triton deterministic {name} {str(dtype)[6:]}')
            del want, errs
            torch.cuda.empty_cache()
    return failures


@contextlib.contextmanager
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` inside."""
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def median_ms(fn: Callable, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_variant(fn: Callable, inputs: List[Tensor], dy: Tensor, iters: int) -> Tuple[float, float, float]:
    """Median ms of forward (no grad) and forward+backward, and peak MiB of forward+backward."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.no_grad():
        forward = median_ms(lambda: fn(*inputs), iters)
    def step():
        torch.autograd.grad(fn(*leaves), leaves, dy)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return forward, median_ms(step, iters), peak


def timings(variants: List[str], iters: int) -> None:
    print('\n| shape (B, D, H, W) | dtype | variant | fwd ms | fwd+bwd ms | fwd+bwd vs torch | peak MiB |')
    print('|---|---|---|---|---|---|---|')
    for shape in TIME_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            inputs = make_inputs(*shape, dtype)
            dy = torch.randn(*shape, device='cuda', dtype=dtype)
            results = {v: time_variant(op(v), inputs, dy, iters) for v in variants}
            for v, (fwd, both, peak) in results.items():
                print(f'| {shape} | {str(dtype)[6:]} | {v} | {fwd:.3f} | {both:.3f} | '
                      f'{results["torch"][1] / both:.1f}x | {peak:.0f} |')
            torch.cuda.empty_cache()


def sweep(iters: int) -> None:
    """Forward-only (no grad) ms by forward blocks, then forward+backward ms by backward
    blocks (forward at its default)."""
    triton_scan, = load_ops('triton_cross_selective_scan')
    print('\ntriton ms by (BLOCK_D, BLOCK_L, num_warps), bfloat16')
    for shape in TIME_SHAPES:
        inputs = make_inputs(*shape, torch.bfloat16)
        dy = torch.randn(*shape, device='cuda', dtype=torch.bfloat16)
        length = shape[2] * shape[3]
        with torch.no_grad():
            ms = {b: median_ms(lambda: op('triton', b)(*inputs), iters) for b in FWD_SWEEP}
        best = min(ms, key=ms.get)
        print(f'{shape} fwd: ' + ', '.join(f'{b} {t:.3f}' for b, t in ms.items())
              + f'; best {best}, default {triton_scan.block_sizes(length)}')
        ms = {b: time_variant(op('triton', None, b), inputs, dy, iters)[1] for b in BWD_SWEEP}
        best = min(ms, key=ms.get)
        print(f'{shape} fwd+bwd by bwd blocks: ' + ', '.join(f'{b} {t:.3f}' for b, t in ms.items())
              + f'; best {best}, default {triton_scan.block_sizes(length, backward=True)}')


# SegMAN-L's stages 1-3 at 512x512, batch 8
BC_ROWS_SHAPES = [(8, 96, 128, 128), (8, 192, 64, 64), (8, 432, 32, 32)]
BC_ROWS_SWEEP = [1, 4, 8, 16, 32, 64]


def graph_ms(fn: Callable, calls: int = 10, replays: int = 5) -> float:
    """GPU ms a call of ``fn``, replayed from a CUDA graph of ``calls`` calls (no host time)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays / calls


def sweep_bc_rows() -> None:
    """The backward op's GPU ms (its kernels and PyTorch's reductions, from CUDA graphs) by
    ``BC_ROWS`` (:data:`BC_ROWS_SWEEP`), and with one row a channel block (deterministic),
    bfloat16."""
    triton_scan, = load_ops('triton_cross_selective_scan')
    default = triton_scan.BC_ROWS
    print(f'\nbackward GPU ms by rows of dB, dC partial sums (default {default}), bfloat16')
    for shape in BC_ROWS_SHAPES:
        inputs = make_inputs(*shape, torch.bfloat16)
        dy = torch.randn(*shape, device='cuda', dtype=torch.bfloat16)
        states = triton_scan._cross_scan_forward_impl(*inputs, True, [])[1]

        def backward():
            triton_scan._cross_scan_backward_impl(dy, *inputs, states, [])

        with deterministic():
            cells = [f'one a block {graph_ms(backward):.4f}']
        try:
            for rows in BC_ROWS_SWEEP:
                triton_scan.BC_ROWS = rows
                cells.append(f'{rows} {graph_ms(backward):.4f}')
        finally:
            triton_scan.BC_ROWS = default
        print(f'{shape}: ' + ', '.join(cells), flush=True)


# SegMAN-L's SS2D at 512x512: (channels, rank, steps) of stages 1-4
PROJECTION_SHAPES = [(96, 6, 128 * 128), (192, 12, 64 * 64), (432, 27, 32 * 32), (640, 40, 16 * 16)]
# (BLOCK_C, BLOCK_L, num_warps, min_programs)
PROJECTION_SWEEP = [(32, 256, 8, 0), (32, 256, 8, 1024), (32, 128, 4, 512), (64, 128, 8, 512),
                    (32, 64, 4, 512), (16, 128, 4, 512), (32, 128, 4, 1024)]


def sweep_projection(iters: int, batch: int = 8) -> None:
    """ms of the step projection's backward by implementation (:data:`PROJECTION_SWEEP`)."""
    triton_scan, = load_ops('triton_cross_selective_scan')
    print(f'\nstep projection backward, batch {batch}: ms (max error / max of float64)')
    for channels, rank, length in PROJECTION_SHAPES:
        ddelta = torch.randn(batch, 4, channels, length, device='cuda')
        dt_low = torch.randn(batch, 4, rank, length, device='cuda').bfloat16()
        dt_proj = torch.randn(4, channels, rank, device='cuda') * rank ** -0.5
        want = scan_mod.project_steps_backward(ddelta.double(), dt_low.double(), dt_proj.double())

        def autocast_products():
            with torch.autocast('cuda', dtype=torch.bfloat16):
                d_low = dt_proj.transpose(-1, -2) @ ddelta
                d_proj = (ddelta @ dt_low.float().transpose(-1, -2)).sum(0)
            return d_low.to(dt_low.dtype), d_proj.float()

        runs = {'autocast cuBLAS': autocast_products,
                'float32 cuBLAS': lambda: scan_mod.project_steps_backward(ddelta, dt_low, dt_proj),
                'triton default': lambda: triton_scan._project_steps_backward(ddelta, dt_low, dt_proj)}
        for shape in PROJECTION_SWEEP:
            launch_shape = triton_scan.ProjectionBackwardLaunch(*shape)
            runs[f'triton {shape}'] = (lambda s=launch_shape:
                                       triton_scan._project_steps_backward(ddelta, dt_low, dt_proj, s))
        cells = []
        for name, run in runs.items():
            error = max(((g.double() - w).abs().max() / w.abs().max()).item()
                        for g, w in zip(run(), want))
            cells.append(f'{name} {median_ms(run, iters):.3f} ({error:.0e})')
        print(f'D {channels} R {rank} L {length}: ' + ', '.join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--sweep', action='store_true', help='time several triton block sizes')
    parser.add_argument('--sweep-bc-rows', action='store_true',
                        help="only time the backward by rows of dB's and dC's partial sums")
    parser.add_argument('--sweep-projection', action='store_true',
                        help="only time the step projection's backward (no checks)")
    args = parser.parse_args()
    if args.sweep_projection:
        sweep_projection(args.iters)
        return
    if args.sweep_bc_rows:
        sweep_bc_rows()
        return
    import triton
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; '
          f'mmseg imported: {"mmseg" in sys.modules}')
    probe = make_inputs(1, 2, 3, 5, torch.float32)
    variants = [v for v in VARIANTS if available(v, probe)]
    print('variants:', ', '.join(variants), '| not available:',
          ', '.join(v for v in VARIANTS if v not in variants) or '-')
    failures = check_correctness(variants)
    timings(variants, args.iters)
    if args.sweep and 'triton' in variants:
        sweep(args.iters)
    print(f'\n{failures} failures')
    sys.exit(1 if failures else 0)


if __name__ == '__main__':
    main()
