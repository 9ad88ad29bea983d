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
normalisation) is rounding noise in both runs (``grads_skipped`` counts them); the five
parameters with the largest differences are named. The eager model runs twice: the second
run against the first (``eager_again_*``) is the floor of the comparison. bf16 autocast (or
float32, ``--dtypes``), batch 2 at 512x512 (``--size``), fixed seeds, every dropout and drop
path off and every batch norm on its running statistics (in training mode the decode head's
image-pool norm, over two 1 x 1 samples, amplifies rounding: on the CPU a 4e-3 relative change
of the images moved SegMAN-T's gradients by 0.14 of the largest with it, 4e-6 without it,
docs/benchmarks.md). ``--parts backbone decode_head`` compiles one submodule a run, the rest
eager (which part's compilation makes a difference; gradients by the parameters' plain
names; ``graphs`` and ``graph_breaks`` stay the whole model's). float32 runs without TF32:
PyTorch lets cuDNN's convolutions round to TF32 by default, and the compiled model's
convolutions run in other layouts and algorithms than the eager ones, so they would differ by
TF32's rounding (on an H100 SegMAN-T's stem biases' gradients by 0.7% of the largest
gradient, docs/benchmarks.md).
"""
import argparse
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark import MODELS, build_model, data_samples, write_row  # noqa: E402  (tools/benchmark.py)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def run(model, mode: str, images, samples, dtype: str) -> torch.Tensor:
    """Logits (``infer``) or the loss after its backward (``train``), under bf16 autocast
    unless ``dtype`` is ``fp32``."""
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=dtype == 'bf16'):
        if mode == 'infer':
            with torch.inference_mode():
                return model(images, mode='tensor')
        losses = model(images, samples, mode='loss')
    loss = sum(v for k, v in losses.items() if 'loss' in k)
    loss.backward()
    return loss.detach()


@contextmanager
def without_tf32() -> Iterator[None]:
    """cuDNN's convolutions and cuBLAS's float32 products in float32, not TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def gradients(module) -> Dict[str, torch.Tensor]:
    """Every parameter's gradient by its name in the uncompiled module (a submodule replaced
    by its ``torch.compile`` wrapper adds ``_orig_mod.`` to its parameters' names)."""
    grads = {n.replace('_orig_mod.', ''): p.grad.clone() for n, p in module.named_parameters()
             if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return grads


def gradient_differences(compiled: Dict[str, torch.Tensor], eager: Dict[str, torch.Tensor],
                         floor: float = 1e-3, named: int = 5) -> dict:
    """The differences of the module doc, and the ``named`` parameters with the largest
    differences against the model's largest gradient (each with its own largest gradient,
    also relative to the model's); a parameter with a gradient in one run only is reported by
    name."""
    if compiled.keys() != eager.keys():
        return dict(grads_only_in_one_run=sorted(compiled.keys() ^ eager.keys()))
    peaks = {n: e.float().abs().max().item() for n, e in eager.items()}
    largest = max(max(peaks.values()), 1e-12)
    vs_largest = {n: (compiled[n].float() - e.float()).abs().max().item() / largest
                  for n, e in eager.items()}
    own = {n: relative_difference(compiled[n], e) for n, e in eager.items()
           if peaks[n] >= floor * largest}
    worst = max(own, key=own.get)
    return dict(grad_diff_vs_largest=max(vs_largest.values()), grad_rel_diff_max=own[worst],
                grad_worst=worst, grads_skipped=len(eager) - len(own),
                grad_largest_diffs={n: [round(vs_largest[n], 6), round(peaks[n] / largest, 6)]
                                    for n in sorted(vs_largest, key=vs_largest.get)[-named:]})


def without_random_layers_or_batch_statistics(model: torch.nn.Module) -> None:
    """Every dropout and drop path off (the compiled and the eager run draw different random
    numbers; the decode heads' Dropout2d is no nn.Dropout) and every batch norm on its running
    statistics (in training mode the image pool's norm, over two 1 x 1 samples, multiplies
    rounding differences by orders of magnitude on their way back), the rest as it is."""
    for m in model.modules():
        if isinstance(m, (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)) \
                or type(m).__name__ == 'DropPath':
            m.eval()


def compiled_part(model: torch.nn.Module, part: Optional[str], fullgraph: bool) -> torch.nn.Module:
    """``model`` compiled, or with only its submodule ``part`` (``'backbone.patch_embed'``)
    replaced by the compiled submodule: to find which part's compilation makes a difference."""
    if part is None:
        return torch.compile(model, fullgraph=fullgraph)
    parent, _, child = part.rpartition('.')
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, child, torch.compile(owner.get_submodule(child), fullgraph=fullgraph))
    return model


def check(name: str, mode: str, size: int, dtype: str, part: Optional[str] = None) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(name)
    model.eval() if mode == 'infer' else model.train()
    without_random_layers_or_batch_statistics(model)
    images = torch.randn(2, 3, size, size, device='cuda')
    samples = data_samples(2, size, size)
    explanation = torch._dynamo.explain(model)(images, samples, mode='loss') if mode == 'train' \
        else torch._dynamo.explain(model)(images, mode='tensor')
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    # the eager model twice: how far two runs of the same code differ (atomics, library
    # kernels chosen per call), the floor of the comparison with the compiled one
    runs = {}
    for key in ('eager', 'eager_again', 'compiled'):
        fn = compiled_part(model, part, mode == 'infer') if key == 'compiled' else model
        start = time.perf_counter()
        out = run(fn, mode, images, samples, dtype)
        runs[key] = (out, gradients(model) if mode == 'train' else {})
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    row = dict(model=name, mode=mode, size=size, dtype=dtype, compiled=part or 'all',
               graphs=explanation.graph_count,
               graph_breaks=explanation.graph_break_count,
               break_reasons=sorted({str(r.reason).splitlines()[0] for r in explanation.break_reasons}),
               first_compiled_call_s=round(seconds, 1))
    eager_out, eager_grads = runs['eager']
    for key in ('compiled', 'eager_again'):
        prefix = '' if key == 'compiled' else 'eager_again_'
        out, grads = runs[key]
        row[prefix + 'output_rel_diff'] = relative_difference(out, eager_out)
        if mode == 'train':
            row.update({prefix + k: v for k, v in gradient_differences(grads, eager_grads).items()})
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', choices=MODELS, default=['segman-t'])
    parser.add_argument('--modes', nargs='+', choices=['infer', 'train'], default=['infer', 'train'])
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--dtypes', nargs='+', choices=['bf16', 'fp32'], default=['bf16'])
    parser.add_argument('--parts', nargs='+', metavar='SUBMODULE',
                        help="compile only these submodules, one run each (e.g. 'backbone', "
                             "'decode_head', 'backbone.patch_embed'), the rest eager")
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    for name in args.models:
        for mode in args.modes:
            for dtype in args.dtypes:
                for part in args.parts or [None]:
                    with without_tf32() if dtype == 'fp32' else nullcontext():
                        row = check(name, mode, args.size, dtype, part)
                    write_row(dict(row, tf32=False) if dtype == 'fp32' else row, args.out)


if __name__ == '__main__':
    main()
