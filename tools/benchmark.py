"""Throughput and peak memory of SegMAN and mmseg's SegFormer / SegNeXt on one GPU.

Inference: ``model(images, mode='tensor')`` (encoder and decode head, logits at the head's
stride), eval mode, ``torch.inference_mode``. Training: one step of ``model.loss`` on random
labels (150 classes), backward, AdamW step. Both on random images; float32 or bf16 autocast
(parameters stay float32). Each cell: warm-up steps (the first one compiles FlexAttention),
then timed steps (CUDA events, ``--iters`` at most, stopping after ``--cell-seconds``); the
median step gives images/s, ``torch.cuda.max_memory_allocated`` over the timed steps the
peak memory. SegMAN runs on its ``fast`` path (every op's fastest backend) and its ``ref``
path (every op on its ``torch`` backend: ``use_backends('torch')`` around each cell). All models use
their ADE20K heads (150 classes) at every size. Out-of-memory is reported as ``OOM``.
``--compile no yes cudagraphs`` runs each cell eagerly, under ``torch.compile`` of the whole
segmentor (default options) and under ``torch.compile(mode='reduce-overhead')`` (inductor
replays CUDA graphs: no host time a step); one graph per cell (dynamo's caches are reset
first; the warm-up, whose seconds are recorded, pays for the compilation).

    python tools/benchmark.py --mode infer --models segman-t segnext-t --sizes 512 \\
        --batches 1 16 --dtypes bf16 --paths fast ref --compile no yes --out results.jsonl
    python tools/benchmark.py --mode train --batches 8 --models segman-l segformer-b4 \\
        --rounds 3 --out train.jsonl          # each model 3 times, alternating, one process a run
    python tools/benchmark.py --render results.jsonl [more.jsonl ...]   # markdown tables

Results go to ``--out`` as JSON lines as each cell finishes; ``--render`` prints the tables
of one or more such files.

``--rounds N`` runs every model N times, each run in its own process (a cell bound by the
host varies by tens of percent between processes of the same code), the models' order
reversed in every other round, so that SegMAN and its peer alternate; rows carry their
``round``, and ``--render`` gives the median of a cell's runs with their range.
``--budget-seconds`` stops before a time limit; cells left are recorded as not run.
"""
import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from mmseg_segman.models.variants import ENCODER_ARCHS, head_widths

PEER_CONFIGS = {
    **{f'segformer-b{i}': f'segformer/segformer_mit-b{i}_8xb2-160k_ade20k-512x512.py' for i in range(5)},
    **{f'segnext-{s}': f'segnext/segnext_mscan-{s}_1xb16-adamw-160k_ade20k-512x512.py' for s in 'tsbl'},
}
MODELS = [f'segman-{a}' for a in ENCODER_ARCHS] + list(PEER_CONFIGS)
# SegMAN with cuda_graph=True (encoder and head replay CUDA graphs of their training steps and
# inference forwards, as the configs build them)
GRAPHED = [f'segman-{a}-graphed' for a in ENCODER_ARCHS]
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
NUM_CLASSES = 150


def build_model(name: str, with_cp: bool = False) -> nn.Module:
    """An mmseg segmentor for ``name`` (one of :data:`MODELS` or :data:`GRAPHED`), on the GPU.

    ``with_cp`` (gradient checkpointing) applies to SegMAN only."""
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmseg.registry import MODELS as REGISTRY
    from mmseg.utils import register_all_modules

    register_all_modules()
    if name.startswith('segman-'):
        arch, graphed = name.split('-')[1], name.endswith('-graphed')
        cfg = dict(type='SegMANEncoderDecoder',
                   backbone=dict(type='SegMANEncoder', arch=arch, with_cp=with_cp,
                                 cuda_graph=graphed),
                   decode_head=dict(type='SegMANHead', **head_widths(arch, 'ade20k'),
                                    cuda_graph=graphed,
                                    num_classes=NUM_CLASSES, dropout_ratio=0.1,
                                    loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
                   train_cfg=dict(), test_cfg=dict(mode='whole'))
    else:
        import mmseg
        config_dir = Path(mmseg.__file__).parent / '.mim' / 'configs'
        cfg = Config.fromfile(str(config_dir / PEER_CONFIGS[name])).model.to_dict()
        cfg.pop('pretrained', None)
        cfg['backbone'].pop('init_cfg', None)
    cfg.pop('data_preprocessor', None)  # the harness feeds normalised tensors directly
    return revert_sync_batchnorm(REGISTRY.build(cfg)).cuda()


def path_backends(path: str):
    """``fast``: automatic backend choice; ``ref``: every SegMAN op on its torch backend."""
    from mmseg_segman.ops import use_backends

    return use_backends('torch' if path == 'ref' else None)


def data_samples(batch: int, height: int, width: int) -> List:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for _ in range(batch):
        sample = SegDataSample()
        labels = torch.randint(0, NUM_CLASSES, (1, height, width), device='cuda')
        sample.gt_sem_seg = PixelData(data=labels)
        sample.set_metainfo(dict(img_shape=(height, width), ori_shape=(height, width),
                                 pad_shape=(height, width)))
        samples.append(sample)
    return samples


def timed_steps(step, warmup: int, iters: int, cell_seconds: float) -> Dict:
    """Median seconds per ``step()`` after ``warmup`` calls, and peak memory over the timed
    calls: allocated by tensors, and reserved by PyTorch's allocator (the process's footprint:
    it counts the memory a CUDA graph keeps between steps)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    times = []
    begin = time.perf_counter()
    while len(times) < iters and (len(times) < 3 or time.perf_counter() - begin < cell_seconds):
        events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        events[0].record()
        step()
        events[1].record()
        torch.cuda.synchronize()
        times.append(events[0].elapsed_time(events[1]) / 1e3)
    return dict(step_s=statistics.median(times), iters=len(times), warmup_s=round(warmup_s, 1),
                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30)


TRAINING_PHASES = ('forward', 'backward', 'optimizer')


def training_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The AdamW of every training cell, SegMAN's and its peers' alike: the ADE20K configs'
    learning rate and weight decay, and PyTorch's fused implementation, as SegMAN's configs
    use (the default one costs host time per parameter tensor)."""
    return torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01, fused=True)


def training_phases(model: nn.Module, images, samples, optimizer: torch.optim.Optimizer,
                    dtype: torch.dtype = torch.bfloat16,
                    losses: Optional[List[float]] = None) -> Iterator[str]:
    """One training step, yielding each of :data:`TRAINING_PHASES` as it ends: the loss
    (``dtype`` autocast unless float32), its backward, the optimizer step; the gradients are
    dropped when the iteration resumes after the last. ``losses``: a list the summed loss is
    appended to (a float: the host waits for it)."""
    with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
        loss = sum(v for k, v in model(images, samples, mode='loss').items() if 'loss' in k)
    if losses is not None:
        losses.append(loss.item())
    yield 'forward'
    loss.backward()
    yield 'backward'
    optimizer.step()
    yield 'optimizer'
    optimizer.zero_grad(set_to_none=True)


def measure(model: nn.Module, mode: str, batch: int, height: int, width: int, dtype: torch.dtype,
            compiled: str, args) -> Dict:
    images = torch.randn(batch, 3, height, width, device='cuda')
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    run_model = model
    if compiled != 'no':
        torch._dynamo.reset()
        run_model = torch.compile(model, mode='reduce-overhead' if compiled == 'cudagraphs' else None)
    if mode == 'infer':
        model.eval()
        autocast = torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32)

        def step():
            with torch.inference_mode(), autocast:
                run_model(images, mode='tensor')
    else:
        model.train()
        samples = data_samples(batch, height, width)
        optimizer = training_optimizer(model)

        def step():
            for _ in training_phases(run_model, images, samples, optimizer, dtype):
                pass
    result = timed_steps(step, args.warmup, args.iters, args.cell_seconds)
    result['img_s'] = batch / result.pop('step_s')
    if args.profile:
        print_profile(step)
    return result


def print_profile(step, steps: int = 3) -> None:
    """The CUDA kernels that take the most time over ``steps`` more steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by='self_cuda_time_total', row_limit=45, max_name_column_width=70),
          flush=True)


def parse_size(size: str):
    height, _, width = size.partition('x')
    return int(height), int(width or height)


def cells(args) -> Iterable[Dict]:
    for model in args.models:
        paths = args.paths if model.startswith('segman-') else ['-']
        for path in paths:
            for size in args.sizes:
                for dtype in args.dtypes:
                    for batch in args.batches:
                        for compiled in args.compile:
                            yield dict(model=model, path=path, mode=args.mode, size=size,
                                       dtype=dtype, batch=batch, with_cp=args.with_cp,
                                       compiled=compiled != 'no',
                                       cudagraphs=compiled == 'cudagraphs',
                                       channels_last=args.channels_last, round=args.round)


def write_row(row: Dict, out: Optional[str]) -> None:
    """Print ``row`` as a JSON line and append it to the file ``out`` (if given)."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, 'a') as f:
            f.write(json.dumps(row) + '\n')


def run(args) -> None:
    deadline = time.perf_counter() + args.budget_seconds
    model, built = None, None
    for cell in cells(args):
        if time.perf_counter() > deadline:
            cell['status'] = 'not run (time budget)'
        else:
            try:
                if built != cell['model']:
                    model = built = None
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.manual_seed(0)
                    model, built = build_model(cell['model'], args.with_cp), cell['model']
                with path_backends(cell['path']):
                    cell.update(measure(model, args.mode, cell['batch'], *parse_size(cell['size']),
                                        DTYPES[cell['dtype']],
                                        'cudagraphs' if cell['cudagraphs'] else
                                        'yes' if cell['compiled'] else 'no', args))
                cell['status'] = 'ok'
            except torch.OutOfMemoryError:
                cell['status'] = 'OOM'
            except Exception as error:  # e.g. a compilation failure: recorded, the run goes on
                cell['status'] = f'error: {type(error).__name__}: {str(error).splitlines()[0][:200]}'
            finally:
                gc.collect()
                torch.cuda.empty_cache()
        write_row(cell, args.out)


def round_order(models: List[str], rounds: int) -> List[Tuple[int, str]]:
    """``(round, model)`` runs in order: the models as given, reversed in every other round."""
    return [(r, model) for r in range(rounds) for model in (models if r % 2 == 0 else models[::-1])]


def run_rounds(args, argv: List[str]) -> None:
    """Each ``(round, model)`` of :func:`round_order` as a process of this script with the
    same arguments (``--round`` marks its rows; the time budget shrinks as runs finish)."""
    deadline = time.perf_counter() + args.budget_seconds
    rest = _without_options(argv, {'--models', '--rounds', '--budget-seconds'})
    for r, model in round_order(args.models, args.rounds):
        budget = deadline - time.perf_counter()
        subprocess.run([sys.executable, __file__, *rest, '--models', model, '--round', str(r),
                        '--budget-seconds', str(max(0.0, budget))], check=False)


def _without_options(argv: List[str], options: set) -> List[str]:
    """``argv`` without the named options and their values."""
    kept, skipping = [], False
    for arg in argv:
        if arg.startswith('--'):
            skipping = arg.split('=', 1)[0] in options
        if not skipping:
            kept.append(arg)
    return kept


def path_label(cell: Dict) -> str:
    return cell['path'] + (' compiled' if cell.get('compiled') else '') + \
        (' (CUDA graphs)' if cell.get('cudagraphs') else '') + \
        (' channels_last' if cell.get('channels_last') else '')


def cell_text(runs: List[Dict]) -> str:
    """A cell's images/s and peak GiB: the median of its runs that finished, with their range
    where there are several (``median [min-max] (peak)``), else the first run's status."""
    done = [r for r in runs if r['status'] == 'ok']
    if not done:
        return runs[0]['status'] if runs else 'not run'
    speeds = sorted(r['img_s'] for r in done)
    peak = max(r['peak_gib'] for r in done)
    spread = f' [{speeds[0]:.1f}-{speeds[-1]:.1f}]' if len(speeds) > 1 else ''
    return f'{statistics.median(speeds):.1f}{spread} ({peak:.1f})'


def render(files: List[str]) -> str:
    """Markdown tables (one per mode, batch and dtype) of the cells in ``files``."""
    rows = [json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line]
    lines = []
    keys = sorted({(r['mode'], r['with_cp'], r['batch'], r['dtype']) for r in rows},
                  key=lambda k: (k[0], k[1], k[2], k[3] != 'bf16'))
    for mode, with_cp, batch, dtype in keys:
        group = [r for r in rows if (r['mode'], r['with_cp'], r['batch'], r['dtype']) == (mode, with_cp, batch, dtype)]
        sizes = list(dict.fromkeys(r['size'] for r in group))
        title = 'inference' if mode == 'infer' else 'training step'
        lines += ['', f'**{title}, batch {batch}, {dtype}{", with_cp" if with_cp else ""}** '
                  '(images/s, peak GiB)', '',
                  '| model | path | ' + ' | '.join(sizes) + ' |',
                  '|---|---|' + '---|' * len(sizes)]
        for model, path in dict.fromkeys((r['model'], path_label(r)) for r in group):
            runs = [r for r in group if (r['model'], path_label(r)) == (model, path)]
            values = [cell_text([r for r in runs if r['size'] == size]) for size in sizes]
            lines.append(f'| {model} | {path} | ' + ' | '.join(values) + ' |')
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--render', nargs='+', metavar='JSONL', help='print tables and exit')
    parser.add_argument('--mode', choices=['infer', 'train'], default='infer')
    parser.add_argument('--models', nargs='+', choices=MODELS + GRAPHED, default=MODELS)
    parser.add_argument('--paths', nargs='+', choices=['fast', 'ref'], default=['fast'],
                        help='SegMAN op paths (peers have one)')
    parser.add_argument('--sizes', nargs='+', default=['512'], help='HxW or S for SxS')
    parser.add_argument('--batches', nargs='+', type=int, default=[16])
    parser.add_argument('--dtypes', nargs='+', choices=list(DTYPES), default=['bf16'])
    parser.add_argument('--compile', nargs='+', choices=['no', 'yes', 'cudagraphs'],
                        default=['no'], help='eager, torch.compile of the whole segmentor, '
                        'torch.compile with CUDA graphs (mode reduce-overhead)')
    parser.add_argument('--channels-last', action='store_true',
                        help='model and images in channels-last memory format')
    parser.add_argument('--with-cp', action='store_true', help='gradient checkpointing (backbone)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--cell-seconds', type=float, default=3.0)
    parser.add_argument('--budget-seconds', type=float, default=1e9)
    parser.add_argument('--profile', action='store_true', help='print the top kernels of each cell')
    parser.add_argument('--rounds', type=int, default=1,
                        help='run each model this many times, each in its own process')
    parser.add_argument('--round', type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    if args.render:
        print(render(args.render))
        return
    if args.rounds > 1:
        run_rounds(args, sys.argv[1:])
        return
    print(f'# torch {torch.__version__}, {torch.cuda.get_device_name()}', flush=True)
    run(args)


if __name__ == '__main__':
    main()
