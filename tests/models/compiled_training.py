"""Run by ``test_segman_model.py`` in Triton's CPU interpreter (``TRITON_INTERPRET=1``): a
tiny SegMAN encoder and head, every Triton backend chosen and its kernels run, trained one
step compiled (``aot_eager``) and eagerly in float32: the loss and every parameter's gradient
agree. Batch norms run on their running statistics (in training mode the image pool's norm
over two 1 x 1 samples multiplies rounding differences, docs/benchmarks.md), dropout and drop
path are off, and the gradients are compared, as on the GPU, by
``tools/gpu_checks/check_compile.py``."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'tools', 'gpu_checks'))
from check_compile import (gradient_differences, gradients,  # noqa: E402
                           without_random_layers_or_batch_statistics)
from compiled_graphs import Segmentor  # noqa: E402


def gradients_after_backward(model, fn, x):
    out = fn(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    loss = (out * weights).sum()  # every logit weighted
    loss.backward()
    return loss.detach(), gradients(model)


def main():
    torch.manual_seed(0)
    model = Segmentor().train()
    without_random_layers_or_batch_statistics(model)
    x = torch.randn(1, 3, 64, 64)
    eager_loss, eager = gradients_after_backward(model, model, x)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    loss, grads = gradients_after_backward(model, compiled, x)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    # each gradient against the model's largest, and those that reach 1e-3 of it against
    # their own largest (a gradient that vanishes mathematically, such as a bias before a
    # normalisation, is rounding noise in both runs)
    differences = gradient_differences(grads, eager)
    assert 'grads_only_in_one_run' not in differences, differences
    assert differences['grad_diff_vs_largest'] < 1e-5, differences
    assert differences['grad_rel_diff_max'] < 1e-4, differences
    print(f'compiled training: loss and {len(eager)} gradients match eager (largest differences '
          f"{differences['grad_diff_vs_largest']:.1e} of the largest gradient, "
          f"{differences['grad_rel_diff_max']:.1e} of their own)", flush=True)
    print('all checks passed')


if __name__ == '__main__':
    main()
