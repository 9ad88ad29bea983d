"""The fused Triton neighborhood attention on CUDA: correctness, block sweep, timings.

    python3 tools/gpu_checks/check_neighborhood_attention.py --check
    python3 tools/gpu_checks/check_neighborhood_attention.py --sweep --out sweep.jsonl
    python3 tools/gpu_checks/check_neighborhood_attention.py --bench --variants b --sizes 512 --out bench.jsonl
    python3 tools/gpu_checks/check_neighborhood_attention.py --layouts --out layouts.jsonl

``--check``: output and the gradients of q, k, v and rpb against the ``torch`` backend on
float64 inputs (``||x - ref|| / ||ref||``), float32 / bfloat16 / float16, odd sizes, maps
smaller than the window, batch 1, strided q, k, v (views of one qkv tensor, as the model
passes them), several batch groups of the bias gradient; bitwise determinism of a repeated
run; and the time of the first call at new map sizes (no compilation expected).
``--sweep``: forward, dq and dk/dv launch shapes timed at the stage shapes of
``--sweep-arch`` (SegMAN-L; stages ``--sweep-stages``, 512x512 input, batch ``--sweep-batch``,
``--sweep-dtype``, bf16 by default; ``--sweep-tiles HxWxWARPS ...`` or a default list), with
the swept kernel's own GPU time and registers. ``--bench``: the kernel against FlexAttention and the
reference at the stage shapes of the chosen variants, forward and forward + backward,
median ms (``triton.testing.do_bench``) and peak MiB above the inputs. ``--layouts``: at the
stages of ``--sweep-arch`` (512x512, ``--sweep-batch``, ``--sweep-dtype``), ``q`` and ``k``
with contiguous head vectors and as planes of one ``qkv`` map (``v`` planes), the forward
alone (inference mode) and forward + backward, us a call from CUDA graphs (what
``neighborhood_attention.reads_planes_faster`` is chosen by). Exits 1 if a check failed.
"""
import argparse
import itertools
import json
import sys
import time
from typing import Callable, Dict, Tuple

import torch
import triton

from mmseg_segman.models.backbones.segman_encoder import SegMANEncoder
from mmseg_segman.ops import neighborhood_attention as na
from mmseg_segman.ops import triton_neighborhood_attention as tna

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
KERNELS = ('fwd', 'dq', 'dkdv')  # the order of tna.block_sizes' launch shapes
SWEEP_DTYPES = {'bf16': torch.bfloat16, 'fp32': torch.float32}


def make_inputs(batch, heads, height, width, dim, kernel, dtype, rpb=True, strided=False):
    """q (scaled), k, v as ``(B, heads, H, W, d)``; strided: views of one (B, 3, heads, d, H, W)
    tensor, the layout of the model's qkv projection."""
    if strided:
        qkv = torch.randn(batch, 3, heads, dim, height, width, device='cuda').to(dtype)
        q, k, v = qkv.permute(1, 0, 2, 4, 5, 3)
    else:
        q, k, v = (torch.randn(batch, heads, height, width, dim, device='cuda').to(dtype) for _ in range(3))
    bias = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, device='cuda') if rpb else None
    return q * dim ** -0.5, k, v, bias


def run(fn, q, k, v, kernel, rpb, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    bias = None if rpb is None else rpb.detach().clone().requires_grad_()
    out = fn(*leaves, kernel, bias)
    out.backward(grad_out.to(out.dtype))
    grads = [t.grad for t in leaves] + ([] if bias is None else [bias.grad])
    return [out] + grads


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(args, results):
    cases = [  # batch, heads, H, W, d, kernel, rpb, strided
        (2, 4, 64, 64, 24, 11, True, False), (1, 3, 37, 45, 32, 9, True, True),
        (2, 2, 13, 9, 20, 7, True, False), (1, 2, 5, 19, 36, 7, True, False),
        (3, 1, 6, 4, 24, 11, True, True), (1, 2, 16, 16, 20, 7, True, False),
        (2, 2, 33, 21, 32, 9, False, True), (1, 13, 32, 32, 36, 7, True, True),
        (1, 4, 27, 31, 16, 13, True, False),
    ]
    failed = 0
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    runs = [(case, dtype) for i, case in enumerate(cases)  # float16 on the first three cases
            for dtype in (dtypes if i < 3 else dtypes[:2])]
    for case, dtype in runs:
        batch, heads, height, width, dim, kernel, rpb, strided = case
        q, k, v, bias = make_inputs(batch, heads, height, width, dim, kernel, dtype, rpb, strided)
        grad_out = torch.randn(q.shape, device='cuda')
        ref = run(na._neighborhood_attention_torch, q.double(), k.double(), v.double(), kernel,
                  None if bias is None else bias.double(), grad_out.double())
        first = run(tna.neighborhood_attention_triton, q, k, v, kernel, bias, grad_out)
        again = run(tna.neighborhood_attention_triton, q, k, v, kernel, bias, grad_out)
        errors = [rel_err(x, r) for x, r in zip(first, ref)]
        deterministic = all(torch.equal(a, b) for a, b in zip(first, again))
        finite = all(torch.isfinite(x).all() for x in first)
        ok = max(errors) < TOLERANCE[dtype] and deterministic and finite
        failed += not ok
        row = dict(kind='check', case=str(case), dtype=str(dtype).split('.')[-1], errors=errors,
                   deterministic=deterministic, ok=ok)
        results.append(row)
        print(f"{'PASS' if ok else 'FAIL'} {row['dtype']:8s} B{batch} h{heads} {height}x{width} "
              f"d{dim} k{kernel}{'' if rpb else ' no-rpb'}{' strided' if strided else ''}: "
              f"out/dq/dk/dv/drpb {' '.join(f'{e:.1e}' for e in errors)}"
              f"{'' if deterministic else ' NOT DETERMINISTIC'}", flush=True)
    # bias gradient with several batches per group of G
    q, k, v, bias = make_inputs(5, 2, 12, 10, 32, 7, torch.float32)
    grad_out = torch.randn(q.shape, device='cuda')
    reference = run(tna.neighborhood_attention_triton, q, k, v, 7, bias, grad_out)[-1]
    budget, tna.G_BUDGET = tna.G_BUDGET, 2 * 12 * 10 * 49 * 2  # 2 batches per group, 3 groups
    grouped = run(tna.neighborhood_attention_triton, q, k, v, 7, bias, grad_out)[-1]
    tna.G_BUDGET = budget
    error = rel_err(grouped, reference.double())
    failed += error > 1e-6
    print(f"{'PASS' if error <= 1e-6 else 'FAIL'} bias gradient with batch groups: {error:.1e}")
    # new sizes: the first call at each should cost no compilation
    for dtype in (torch.bfloat16,):
        times = []
        for height, width in [(64, 64), (61, 83), (96, 40), (17, 128), (128, 96), (33, 65)]:
            q, k, v, bias = make_inputs(2, 4, height, width, 24, 11, dtype)
            grad_out = torch.randn(q.shape, device='cuda')
            torch.cuda.synchronize()
            start = time.perf_counter()
            run(tna.neighborhood_attention_triton, q, k, v, 11, bias, grad_out)
            torch.cuda.synchronize()
            times.append(round((time.perf_counter() - start) * 1e3, 1))
        results.append(dict(kind='new-sizes', dtype=str(dtype), first_call_ms=times))
        print(f'first forward+backward at 6 new map sizes (ms, the first includes compilation): {times}')
    return failed


def stage_shapes(variant, size, batch):
    """(name, B, heads, H, W, d, kernel) of the neighborhood attention of each encoder stage."""
    arch = SegMANEncoder.arch_zoo[variant]
    height, width = size
    for i in range(4):
        heads, dim = arch['num_heads'][i], arch['embed_dims'][i] // arch['num_heads'][i]
        yield (f'{variant.upper()} stage {i + 1}', batch, heads, height >> (i + 2), width >> (i + 2),
               dim, arch['window_size'][i])


def bench_one(fn, shape, dtype, backward, keep_step=False):
    """Median ms of a forward (and backward) call (``do_bench``), peak MiB above the inputs;
    with ``keep_step`` the step itself too."""
    _, batch, heads, height, width, dim, kernel = shape
    q, k, v, bias = make_inputs(batch, heads, height, width, dim, kernel, dtype, strided=True)
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v, bias)]
    grad_out = torch.randn(q.shape, device='cuda', dtype=dtype)

    def step():
        out = fn(*leaves[:3], kernel, leaves[3])
        if backward:
            out.backward(grad_out)
    step()  # compiles
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    with torch.no_grad() if not backward else torch.enable_grad():
        ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode='median')
    return (ms, peak, step) if keep_step else (ms, peak)


BACKENDS = {'triton': tna.neighborhood_attention_triton, 'flex': na._neighborhood_attention_flex,
            'torch': na._neighborhood_attention_torch,
            # the cost of the bias gradient: the same kernels with rpb frozen
            'triton-frozen-rpb': lambda q, k, v, kernel, rpb: tna.neighborhood_attention_triton(
                q, k, v, kernel, rpb.detach())}


def bench(args, results):
    sizes = {'512': (512, 512), '1024x2048': (1024, 2048)}
    for variant, size in itertools.product(args.variants, args.sizes):
        batch = 8 if size == '512' else 2
        for shape in stage_shapes(variant, sizes[size], batch):
            for backend in args.backends:
                if time.time() > args.deadline:
                    print('budget spent: stopping'); return
                row = dict(kind='bench', stage=shape[0], size=size, shape=shape[1:], backend=backend)
                for backward in (False, True):
                    try:
                        ms, peak = bench_one(BACKENDS[backend], shape, torch.bfloat16, backward)
                    except torch.OutOfMemoryError:
                        ms, peak = float('nan'), float('nan')
                    torch.cuda.empty_cache()
                    row['fwd_bwd' if backward else 'fwd'] = round(ms, 4)
                    row['peak_fwd_bwd' if backward else 'peak_fwd'] = round(peak, 1)
                results.append(row)
                print(json.dumps(row), flush=True)


def kernel_ms(step: Callable[[], None], reps: int = 5) -> Dict[str, float]:
    """Each kernel's GPU ms a call of ``step`` (its device time under ``torch.profiler`` over
    ``reps`` calls): unlike CUDA events, no host time between launches counts."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    return {e.key: e.self_device_time_total / 1e3 / reps for e in prof.key_averages()
            if e.self_device_time_total > 0}


def profile(args, results):
    """CUDA time of each kernel in a forward + backward at SegMAN-B's stage shapes (torch.profiler)."""
    for shape in stage_shapes('b', (512, 512), 8):
        for backend in ('triton', 'flex'):
            _, batch, heads, height, width, dim, kernel = shape
            q, k, v, bias = (t.detach().requires_grad_() for t in
                             make_inputs(batch, heads, height, width, dim, kernel, torch.bfloat16, strided=True))
            grad_out = torch.randn(q.shape, device='cuda', dtype=torch.bfloat16)

            def step():
                BACKENDS[backend](q, k, v, kernel, bias).backward(grad_out)
            for _ in range(3):
                step()
            times = sorted(kernel_ms(step).items(), key=lambda item: -item[1])
            row = dict(kind='profile', stage=shape[0], backend=backend,
                       cuda_ms=round(sum(ms for _, ms in times), 4),
                       kernels_ms={name[:60]: round(ms, 4) for name, ms in times[:8]})
            results.append(row)
            print(json.dumps(row), flush=True)


def graph_us(fn: Callable[[], None], reps: int) -> float:
    """The least us a call of ``fn`` over 5 replays of a CUDA graph of ``reps`` calls (captured
    after 3 calls on a side stream): the GPU's time, without the host's launches, which bound
    CUDA events around eager calls at SegMAN-L's stages 3 and 4."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return round(min(times), 1)


def layouts(args, results):
    """The forward, and forward + backward, with ``q`` and ``k`` in each layout the rotary
    embedding writes (see the module doc)."""
    dtype = SWEEP_DTYPES[args.sweep_dtype]
    for shape in stage_shapes(args.sweep_arch, (512, 512), args.sweep_batch):
        name, batch, heads, height, width, dim, kernel = shape
        q, k, v, rpb = make_inputs(batch, heads, height, width, dim, kernel, dtype, strided=True)
        grad_out = torch.randn(q.shape, device='cuda', dtype=dtype)
        row = dict(kind='layouts', dtype=args.sweep_dtype, stage=name, shape=list(shape[1:]))
        for layout, (lq, lk) in (('contiguous', (q.contiguous(), k.contiguous())),
                                 ('planes', (q, k))):
            with torch.inference_mode():
                row[f'{layout}_fwd_us'] = graph_us(
                    lambda: tna.neighborhood_attention_triton(lq, lk, v, kernel, rpb), 20)
            leaves = [t.detach().requires_grad_() for t in (lq, lk, v, rpb)]
            row[f'{layout}_fwd_bwd_us'] = graph_us(
                lambda: tna.neighborhood_attention_triton(*leaves[:3], kernel, leaves[3])
                .backward(grad_out), 5)
        results.append(row)
        print(json.dumps(row), flush=True)


def compiled_registers(kernel) -> Dict[str, dict]:
    """Registers and spill bytes of each compiled version of a Triton ``kernel`` (by hash; set
    at a version's first launch), from Triton's in-process cache."""
    versions = {}
    for cache in getattr(kernel, 'device_caches', {}).values():
        for compiled in cache[0].values():
            versions[compiled.hash] = dict(num_warps=compiled.metadata.num_warps,
                                           n_regs=getattr(compiled, 'n_regs', None),
                                           n_spills=getattr(compiled, 'n_spills', None))
    return versions


# (4, 16, 8), (8, 8, 8): the dq kernel's default tiles on 8 warps, where ptxas needs no spill
# stores for it without pairs (with 4 warps it spills: docs/benchmarks.md)
SWEEP_TILES = [(8, 8, 4), (4, 16, 4), (8, 16, 4), (16, 8, 4), (8, 16, 8), (16, 16, 8), (4, 8, 4),
               (4, 32, 8), (4, 16, 8), (8, 8, 8)]
SWEEP_KERNEL_NAMES = {'fwd': '_na_fwd_kernel', 'dq': '_na_bwd_dq_kernel', 'dkdv': '_na_bwd_dkdv_kernel'}


def sweep(args, results):
    """Each kernel's launch shapes (tiles, warps; stages for the first tile) with the others
    at their defaults, at the stages ``--sweep-stages`` of ``--sweep-arch`` (512x512,
    ``--sweep-batch``, ``--sweep-dtype``): the forward alone and forward + backward (CUDA
    events), the swept kernel's own GPU time (the profiler: small kernels' event times are the
    host's) and its registers and spill bytes."""
    dtype = SWEEP_DTYPES[args.sweep_dtype]
    shapes = [s for s in stage_shapes(args.sweep_arch, (512, 512), args.sweep_batch)
              if s[0].endswith(args.sweep_stages)]
    tiles = args.sweep_tiles or SWEEP_TILES
    for kind, shape, (tile_h, tile_w, warps), stages in itertools.product(
            args.sweep_kernels, shapes, tiles, (1, 2, 3)):
        if time.time() > args.deadline:
            print('budget spent: stopping'); return
        if stages != 2 and (tile_h, tile_w, warps) != tiles[0]:
            continue
        candidate = tna.Blocks(tile_h, tile_w, tna.box_columns(tile_w, shape[6]), warps, stages)
        defaults = tna.block_sizes(shape[5], shape[6])
        blocks = [candidate if k == kind else d for k, d in zip(KERNELS, defaults)]
        fn = lambda q, k, v, kernel, rpb: tna.neighborhood_attention_triton(q, k, v, kernel, rpb, blocks)
        jit = getattr(tna, SWEEP_KERNEL_NAMES[kind])
        known = compiled_registers(jit)
        try:
            fwd = bench_one(fn, shape, dtype, False)[0] if kind == 'fwd' else float('nan')
            both, _, step = bench_one(fn, shape, dtype, True, keep_step=True)
        except Exception as error:  # noqa: BLE001 (a launch shape the compiler refuses)
            print(f'{shape[0]} {kind} {candidate}: {type(error).__name__}: {str(error)[:200]}')
            continue
        own_ms = sum(ms for name, ms in kernel_ms(step).items() if SWEEP_KERNEL_NAMES[kind] in name)
        row = dict(kind='sweep', dtype=args.sweep_dtype, stage=shape[0], kernel=kind,
                   blocks=list(candidate),
                   default=list(defaults[KERNELS.index(kind)]),
                   fwd=round(fwd, 4), fwd_bwd=round(both, 4), kernel_us=round(own_ms * 1e3, 1),
                   registers=[v for h, v in compiled_registers(jit).items() if h not in known])
        results.append(row)
        print(json.dumps(row), flush=True)


def tile(text: str) -> Tuple[int, int, int]:
    """``HxWxWARPS`` -> (tile_h, tile_w, num_warps)."""
    try:
        tile_h, tile_w, warps = (int(n) for n in text.split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'a tile is HxWxWARPS (4x16x8), not {text!r}') from None
    return tile_h, tile_w, warps


class Results(list):
    """Rows, each appended to the ``--out`` file as soon as it exists."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def append(self, row):
        super().append(row)
        if self.path:
            with open(self.path, 'a') as f:
                f.write(json.dumps(row) + '\n')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--check', action='store_true')
    parser.add_argument('--sweep', action='store_true')
    parser.add_argument('--bench', action='store_true')
    parser.add_argument('--profile', action='store_true')
    parser.add_argument('--layouts', action='store_true')
    parser.add_argument('--sweep-stages', nargs='+', default=['1', '3'])
    parser.add_argument('--sweep-arch', default='l', choices=['t', 's', 'b', 'l'])
    parser.add_argument('--sweep-kernels', nargs='+', default=list(KERNELS), choices=KERNELS)
    parser.add_argument('--sweep-batch', type=int, default=16)
    parser.add_argument('--sweep-tiles', nargs='+', type=tile, default=None,
                        help='HxWxWARPS launch shapes (the first also with 1 and 3 stages)')
    parser.add_argument('--sweep-dtype', choices=list(SWEEP_DTYPES), default='bf16')
    parser.add_argument('--variants', nargs='+', default=['t', 's', 'b', 'l'])
    parser.add_argument('--sizes', nargs='+', default=['512', '1024x2048'])
    parser.add_argument('--backends', nargs='+', default=['triton', 'flex', 'torch'], choices=list(BACKENDS))
    parser.add_argument('--budget-seconds', type=float, default=1e9)
    parser.add_argument('--out', default=None, help='append JSON lines here')
    args = parser.parse_args()
    args.deadline = time.time() + args.budget_seconds
    args.sweep_stages = tuple(args.sweep_stages)
    torch.manual_seed(0)
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}')
    results, failed = Results(args.out), 0
    if args.check:
        failed += check(args, results)
    if args.sweep:
        sweep(args, results)
    if args.bench:
        bench(args, results)
    if args.profile:
        profile(args, results)
    if args.layouts:
        layouts(args, results)
    print(f'{failed} checks failed' if failed else 'all checks passed')
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
