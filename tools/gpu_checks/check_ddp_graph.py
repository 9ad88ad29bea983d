"""SegMAN's training graphs under DDP with SyncBN on several GPUs (the released recipes' setting):
the same steps as eager DDP, and the speed against the FLOP-matched peer.

    torchrun --nproc_per_node 2 tools/gpu_checks/check_ddp_graph.py \
        --models segman-b segnext-l [--batch 8] [--size 512] [--steps 3] [--dtype bf16] \
        [--cell-seconds 4] [--no-timing] [--out ddp.jsonl]

Each rank takes one GPU and its own random images and labels. A model is built as
``tools/benchmark.py`` builds it, every batch norm made a ``SyncBatchNorm`` (as the configs'
``SyncBN``), wrapped in ``DistributedDataParallel`` as mmengine wraps it
(``broadcast_buffers=False``) and trained by the benchmark's step (autocast, fused AdamW).

- ``segman-<a>``: four copies from the same weights take ``--steps`` steps on the same
  images: three eagerly (``cuda_graph=False``): ``eager``, ``eager_again`` (whether eager DDP
  repeats bit for bit) and ``permuted`` (each rank's batch in reverse order: the same sums in
  other orders, how far rounding alone moves the gradients), and one with its encoder and
  head graphed (``cuda_graph=True``). Per step the loss of each (averaged over the ranks) and
  the largest difference of each copy's gradients (after DDP's all-reduce) from ``eager``'s,
  relative to the largest gradient, as ``check_training_graph.py`` reports on one GPU.
  Then the graphed and the eager copy are timed (``captured``: whether the graphed one replayed
  its graphs, or fell back to eager steps).
- a peer (``segnext-l``, ``segformer-b4``, ...): timed.

Timing: ``tools/benchmark.py``'s median step after warm-up, images/s over all ranks, peak memory
allocated and reserved on rank 0. One JSON line per model and mode, printed by rank 0.
"""
import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import (DTYPES, MODELS, build_model, data_samples, parse_size,  # noqa: E402
                       timed_steps, training_optimizer, training_phases, write_row)
from check_training_graph import (captured, graphed, relative_difference,  # noqa: E402
                                  reversed_batch)


def distributed(model: nn.Module) -> DistributedDataParallel:
    """``model`` with SyncBatchNorms in DDP on this rank's GPU, in a process group of its own.

    Each model gets its own NCCL communicators: built after a graphed copy's timing on the
    default group, DDP's first broadcast (of the parameter count) read a garbage value on
    rank 1 (2 H200s, twenty-sixth session: ``value cannot be converted to type int without
    overflow``), and the ranks of earlier runs did not exit; a training run (mmseg's
    ``train.py``) builds one DDP model before its graphs are captured."""
    group = dist.new_group()
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group).cuda().train()
    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()],
                                   broadcast_buffers=False, process_group=group)


def mean_over_ranks(value: float) -> float:
    total = torch.tensor([value], device='cuda', dtype=torch.float64)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def train(model: nn.Module, images, samples, steps: int, dtype: torch.dtype):
    """``steps`` training steps of ``model`` in DDP: the loss of each, averaged over the ranks,
    and the gradients of each step (after DDP's all-reduce), on the CPU."""
    ddp, optimizer, losses, gradients = distributed(model), training_optimizer(model), [], []
    for _ in range(steps):
        for phase in training_phases(ddp, images, samples, optimizer, dtype, losses):
            if phase == 'backward':
                gradients.append([p.grad.float().cpu() for p in model.parameters()
                                  if p.grad is not None])
    return [round(mean_over_ranks(loss), 6) for loss in losses], gradients


def check_segman(name: str, images, samples, args) -> Dict:
    """The losses of the eager, eager-again, permuted and graphed copies, and each step's
    gradient gap of the last three from the first."""
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)  # the same weights on every rank and in every copy
    base = build_model(name)
    base.decode_head.dropout = None  # no random numbers: the copies see the same steps
    copies = {'eager': copy.deepcopy(base), 'eager_again': copy.deepcopy(base),
              'permuted': copy.deepcopy(base), 'graphed': graphed(base)}
    inputs = {key: reversed_batch(images, samples) if key == 'permuted' else (images, samples)
              for key in copies}
    runs = {key: train(model, *inputs[key], args.steps, dtype) for key, model in copies.items()}
    reference = runs['eager'][1]
    return dict(losses={key: run[0] for key, run in runs.items()},
                captured=captured(copies['graphed']),
                gradient_gap={key: [float(f'{relative_difference(r, g):.2e}')
                                    for r, g in zip(reference, run[1])]
                              for key, run in runs.items() if key != 'eager'})


def timed(model: nn.Module, images, samples, args) -> Dict:
    ddp, optimizer = distributed(model), training_optimizer(model)
    dtype = DTYPES[args.dtype]

    def step():
        for _ in training_phases(ddp, images, samples, optimizer, dtype):
            pass

    result = timed_steps(step, args.warmup, args.iters, args.cell_seconds)
    result['img_s'] = images.shape[0] * dist.get_world_size() / result.pop('step_s')
    if getattr(model.backbone, 'cuda_graphs', None) is not None:  # SegMAN with its graphs on
        result['captured'] = captured(model)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', choices=MODELS, required=True)
    parser.add_argument('--batch', type=int, default=8, help='images a GPU')
    parser.add_argument('--size', default='512', help='HxW or S for SxS')
    parser.add_argument('--steps', type=int, default=3, help='steps of the exactness check')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='bf16')
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--iters', type=int, default=50)
    parser.add_argument('--cell-seconds', type=float, default=4.0)
    parser.add_argument('--no-timing', action='store_true', help='SegMAN: its check, not its timing')
    parser.add_argument('--out', help='append JSON lines here (rank 0)')
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        parser.error('start it with torchrun (one process a GPU)')
    torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
    dist.init_process_group('nccl')
    rank, world = dist.get_rank(), dist.get_world_size()
    height, width = parse_size(args.size)
    torch.manual_seed(1 + rank)  # each rank its own images
    images = torch.randn(args.batch, 3, height, width, device='cuda')
    samples = data_samples(args.batch, height, width)
    for name in args.models:
        row = dict(model=name, gpus=world, batch=args.batch, size=args.size, dtype=args.dtype,
                   device=torch.cuda.get_device_name())
        if name.startswith('segman-'):
            row.update(check_segman(name, images, samples, args))
            if args.no_timing:
                if rank == 0:
                    write_row(row, args.out)
                continue
            torch.manual_seed(0)
            model = build_model(name)
            cells = {'graphed': graphed(model), 'eager': model}  # build_model's: graphs off
        else:
            torch.manual_seed(0)
            cells = {'eager': build_model(name)}
        for mode, model in cells.items():
            torch.cuda.empty_cache()
            result = timed(model, images, samples, args)
            if rank == 0:
                write_row({**row, 'mode': mode, **{k: round(v, 3) if isinstance(v, float) else v
                                                   for k, v in result.items()}}, args.out)
            del model
        cells.clear()
    # no destroy_process_group: with it, the ranks did not exit after their last row (twenty-fifth
    # session), while mmseg's train.py, which leaves the group to the process's exit, did


if __name__ == '__main__':
    main()
