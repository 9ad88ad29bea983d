"""``torch.compile`` of whole SegMAN segmentors: graph breaks, and compiled against eager.

    python3 tools/gpu_checks/check_compile.py --models segman-t segman-b --out compile.jsonl

For each model and mode (``infer``: ``model(images, mode='tensor')`` under
``torch.inference_mode``; ``train``: ``model(images, samples, mode='loss')`` and its backward),
``torch._dynamo.explain`` counts graphs and graph breaks (with their reasons), then the
compiled model (inductor, ``fullgraph=True`` for ``infer``) is compared with the eager one:
logits, or the loss and the gradients of every parameter, as the largest difference relative
to the largest eager value. Gradients two ways: every parameter's difference relative to the
largest gradient of the model (``grad_diff_vs_largest``), and each parameter's relative to its
own largest (``grad_rel_diff_max``, naming the worst) among those whose gradient reaches 1e-3
of the model's largest: a gradient that vanishes mathematically (a bias before a
normalisation) is rounding noise in both runs (``grads_skipped`` counts them). bf16 autocast,
batch 2 at 512x512 (``--size``), fixed seeds, every dropout and drop path off.
"""
import argparse
import sys
import time
from typing import Dict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark import MODELS, build_model, data_samples, write_row  # noqa: E402  (tools/benchmark.py)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def run(model, mode: str, images, samples):
    """Logits (``infer``) or ``[loss, *parameter gradients]`` (``train``)."""
    with torch.autocast('cuda', dtype=torch.bfloat16):
        if mode == 'infer':
            with torch.inference_mode():
                return [model(images, mode='tensor')]
        losses = model(images, samples, mode='loss')
    loss = sum(v for k, v in losses.items() if 'loss' in k)
    loss.backward()
    return [loss.detach()]


def gradients(module) -> Dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return grads


def gradient_differences(compiled: Dict[str, torch.Tensor], eager: Dict[str, torch.Tensor],
                         floor: float = 1e-3) -> dict:
    """The differences of the module doc; a parameter with a gradient in one run only is
    reported by name."""
    if compiled.keys() != eager.keys():
        return dict(grads_only_in_one_run=sorted(compiled.keys() ^ eager.keys()))
    largest = max(e.float().abs().max().item() for e in eager.values())
    vs_largest = max((c.float() - e.float()).abs().max().item() for c, e in
                     zip(compiled.values(), eager.values())) / max(largest, 1e-12)
    own = {n: relative_difference(compiled[n], e) for n, e in eager.items()
           if e.float().abs().max().item() >= floor * largest}
    worst = max(own, key=own.get)
    return dict(grad_diff_vs_largest=vs_largest, grad_rel_diff_max=own[worst], grad_worst=worst,
                grads_skipped=len(eager) - len(own))


def check(name: str, mode: str, size: int) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(name)
    # dropout and drop path off: the compiled and the eager run draw different random numbers
    # (the decode heads' Dropout2d is no nn.Dropout)
    model.eval() if mode == 'infer' else model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) or type(m).__name__ == 'DropPath':
            m.eval()
    images = torch.randn(2, 3, size, size, device='cuda')
    samples = data_samples(2, size, size)
    explanation = torch._dynamo.explain(model)(images, samples, mode='loss') if mode == 'train' \
        else torch._dynamo.explain(model)(images, mode='tensor')
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    eager = run(model, mode, images, samples)
    eager_grads = gradients(model) if mode == 'train' else {}
    compiled_model = torch.compile(model, fullgraph=mode == 'infer')
    start = time.perf_counter()
    compiled = run(compiled_model, mode, images, samples)
    compiled_grads = gradients(model) if mode == 'train' else {}
    torch.cuda.synchronize()
    row = dict(model=name, mode=mode, size=size, graphs=explanation.graph_count,
               graph_breaks=explanation.graph_break_count,
               break_reasons=sorted({str(r.reason).splitlines()[0] for r in explanation.break_reasons}),
               first_compiled_call_s=round(time.perf_counter() - start, 1),
               output_rel_diff=relative_difference(compiled[0], eager[0]))
    if mode == 'train':
        row.update(gradient_differences(compiled_grads, eager_grads))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', choices=MODELS, default=['segman-t'])
    parser.add_argument('--modes', nargs='+', choices=['infer', 'train'], default=['infer', 'train'])
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    for name in args.models:
        for mode in args.modes:
            row = check(name, mode, args.size)
            write_row(row, args.out)


if __name__ == '__main__':
    main()
