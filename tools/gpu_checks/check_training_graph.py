"""Whether SegMAN's training steps replayed as CUDA graphs (``cuda_graph=True``, encoder and
head) give the eager steps' numbers.

    python3 tools/gpu_checks/check_training_graph.py --models segman-t segman-l \
        [--batch 4] [--size 512] [--steps 3] [--dtypes bf16 fp32] [--out graph.jsonl]

Four copies of one randomly initialised segmentor (dropout off, so that no random numbers
are drawn) train ``--steps`` steps of ``tools/benchmark.py``'s training step (AdamW) on the
same random images and labels: three eagerly, one with its encoder and head graphed. Per
step: the loss of each, and how far each copy's gradients are from the first eager copy's
(the largest difference over all parameters, relative to the largest gradient). The second
eager copy (``floor``) shows whether eager steps repeat bit for bit; the third
(``permuted``) takes the batch in another order, the same sums in other orders: how far
rounding alone moves the gradients. In bfloat16 that is far, because the biases of the
convolutions before SegMAN's batch norms have a gradient that is zero but for rounding. A
graph may differ by rounding where cuBLAS chooses other kernels while capturing. After the
steps, the parameters and the batch norms' running statistics likewise. One JSON line per
model and dtype.
"""
import argparse
import copy
import sys
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark import (DTYPES, MODELS, build_model, data_samples,  # noqa: E402
                       training_optimizer, write_row)

from mmseg_segman.models.cuda_graphs import CUDAGraphs  # noqa: E402


def graphed(model):
    """A copy of ``model`` whose encoder and head replay CUDA graphs, as ``cuda_graph=True``
    builds them (training and inference)."""
    model = copy.deepcopy(model)
    model.backbone.cuda_graphs = CUDAGraphs('SegMANEncoder')
    model.decode_head.cuda_graphs = CUDAGraphs('SegMANHead')
    return model


def captured(model) -> bool:
    """Whether the encoder's and the head's training steps replay graphs (not eager steps)."""
    return all(graphs is not None and graphs.training._captured is not None
               for graphs in (model.backbone.cuda_graphs, model.decode_head.cuda_graphs))


def reversed_batch(images: torch.Tensor, samples: List):
    """The same batch in reverse order: the same sums in other orders."""
    order = list(range(images.shape[0]))[::-1]
    return images[order], [samples[i] for i in order]


def relative_difference(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    scale = max(x.abs().max().item() for x in a) or 1.0
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b)) / scale


def worst(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], count: int = 3) -> List:
    """The ``count`` parameters whose gradients differ most, relative to the largest."""
    scale = max(x.abs().max().item() for x in a.values()) or 1.0
    gaps = sorted(((a[n].float() - b[n].float()).abs().max().item() / scale, n) for n in a)
    return [f'{name} {gap:.1e}' for gap, name in gaps[::-1][:count]]


def check(name: str, dtype: torch.dtype, args) -> Dict:
    torch.manual_seed(0)
    model = build_model(name)
    model.decode_head.dropout = None
    models = {'eager': model, 'floor': copy.deepcopy(model), 'permuted': copy.deepcopy(model),
              'graphed': graphed(model)}
    optimizers = {k: training_optimizer(m) for k, m in models.items()}
    images = torch.randn(args.batch, 3, args.size, args.size, device='cuda')
    samples = data_samples(args.batch, args.size, args.size)
    inputs = {key: reversed_batch(images, samples) if key == 'permuted' else (images, samples)
              for key in models}
    losses = {k: [] for k in models}
    differences = {key: [] for key in models if key != 'eager'}
    for _ in range(args.steps):
        grads = {}
        for key, m in models.items():
            m.train()
            with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
                loss = sum(v for k, v in m(*inputs[key], mode='loss').items() if 'loss' in k)
            loss.backward()
            losses[key].append(round(loss.item(), 6))
            grads[key] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
            optimizers[key].step()
            optimizers[key].zero_grad(set_to_none=True)
        for key, values in differences.items():
            values.append(f"{relative_difference(list(grads['eager'].values()), list(grads[key].values())):.2e}")
    worst_last = {f'worst_{key}': worst(grads['eager'], grads[key]) for key in differences}

    def state(key, buffers):
        m = models[key]
        return [t.detach() for t in (m.buffers() if buffers else m.parameters())
                if t.is_floating_point()]

    return dict(
        model=name, dtype=str(dtype).replace('torch.', ''), batch=args.batch, size=args.size,
        steps=args.steps, losses=losses,
        **{f'gradients_{key}': values for key, values in differences.items()},
        **{f'{what}_{key}': f"{relative_difference(state('eager', buffers), state(key, buffers)):.2e}"
           for what, buffers in (('parameters', False), ('running_stats', True))
           for key in differences},
        **worst_last,
        captured=captured(models['graphed']))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', choices=[m for m in MODELS if m.startswith('segman-')],
                        default=['segman-t'])
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--dtypes', nargs='+', choices=list(DTYPES), default=['bf16'])
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(f'# torch {torch.__version__}, {torch.cuda.get_device_name()}', flush=True)
    for name in args.models:
        for dtype in args.dtypes:
            write_row(check(name, DTYPES[dtype], args), args.out)


if __name__ == '__main__':
    main()
