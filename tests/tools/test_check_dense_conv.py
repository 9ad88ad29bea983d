"""tools/gpu_checks/check_dense_conv.py times the convolutions SegMAN runs on dense_conv2d:
its table of layers is the model's (the timings are measurements, not tested)."""
import sys
from pathlib import Path

import torch

from mmseg_segman.models import SegMANEncoder, SegMANHead
from mmseg_segman.models.layers import DenseConv2d
from mmseg_segman.models.variants import head_widths

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'tools' / 'gpu_checks'))
from check_dense_conv import layers  # noqa: E402


def test_the_layers_are_those_segman_t_runs_at_512():
    encoder, head = SegMANEncoder('t').eval(), SegMANHead(**head_widths('t'), num_classes=150).eval()
    seen = []

    def record(module, args, kwargs):
        x, norm, activation, memory_format = (
            args[i] if len(args) > i else kwargs.get(name)
            for i, name in enumerate(('x', 'norm', 'activation', 'memory_format')))
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        seen.append((tuple(x.shape), channels_last, memory_format, module.out_channels,
                     module.kernel_size[0], module.stride[0], module.padding[0], norm is not None,
                     activation))

    for module in list(encoder.modules()) + list(head.modules()):
        if isinstance(module, DenseConv2d):
            module.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        head(encoder(torch.randn(1, 3, 512, 512)))
    # in eval mode every one gets its norm and activation, the stem's their layouts
    listed = [layer[1:] for layer in layers('t', 1)]
    assert sorted(seen, key=str) == sorted(listed, key=str)
