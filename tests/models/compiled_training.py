"""Run by ``test_segman_model.py`` in Triton's CPU interpreter (``TRITON_INTERPRET=1``): a
tiny SegMAN encoder and head, every Triton backend chosen and its kernels run, trained one
step compiled (``aot_eager``) and eagerly in float32: the loss and every parameter's gradient
agree. Batch norms run on their running statistics (in training mode the image pool's norm
over two 1 x 1 samples multiplies rounding differences, docs/benchmarks.md), dropout and drop
path are off."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from compiled_graphs import Segmentor  # noqa: E402


def gradients_after_backward(model, fn, x):
    out = fn(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    loss = (out * weights).sum()  # every logit weighted
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def main():
    torch.manual_seed(0)
    model = Segmentor().train()
    for m in model.modules():
        if isinstance(m, (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)) \
                or type(m).__name__ == 'DropPath':
            m.eval()
    x = torch.randn(1, 3, 64, 64)
    eager_loss, eager = gradients_after_backward(model, model, x)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    loss, grads = gradients_after_backward(model, compiled, x)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    assert grads.keys() == eager.keys(), sorted(grads.keys() ^ eager.keys())
    # each gradient against the model's largest, and those that reach 1e-3 of it against
    # their own largest (a gradient that vanishes mathematically, such as a bias before a
    # normalisation, is rounding noise in both runs)
    largest = max(g.abs().max() for g in eager.values())
    worst_absolute = worst_relative = 0.0
    for name, g in eager.items():
        difference = (grads[name] - g).abs().max()
        assert difference < 1e-5 * largest, f'{name}: {difference / largest:.1e} of the largest gradient off'
        worst_absolute = max(worst_absolute, difference / largest)
        if g.abs().max() >= 1e-3 * largest:
            relative = difference / g.abs().max()
            assert relative < 1e-4, f'{name}: {relative:.1e} of its own largest gradient off'
            worst_relative = max(worst_relative, relative)
    print(f'compiled training: loss and {len(eager)} gradients match eager (largest differences '
          f'{worst_absolute:.1e} of the largest gradient, {worst_relative:.1e} of their own)', flush=True)
    print('all checks passed')


if __name__ == '__main__':
    main()
