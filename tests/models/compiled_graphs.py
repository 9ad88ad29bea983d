"""Run by ``test_segman_model.py`` in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set
before Triton is imported): a tiny SegMAN encoder and head, each Triton backend chosen as on
CUDA, compile to one graph each (``fullgraph``), in training and in inference, and the graphs
hold every Triton op as its custom op, forward and backward (the inference-only ones in
inference, the training-only one in training); compiled with dynamic sizes, one
graph serves a second input size. The kernels are not run
(:func:`~mmseg_segman.ops.triton_jit.kernels_not_launched`): their results are checked op by
op in ``tests/ops``; here only what ``torch.compile`` traces."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'ops'))
from triton_interpreter import compile_recording_graphs  # noqa: E402

from mmseg_segman.models import SegMANEncoder, SegMANHead  # noqa: E402
from mmseg_segman.ops.triton_jit import kernels_not_launched  # noqa: E402

TINY = dict(embed_dims=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
            window_size=[5, 5, 3, 3], mlp_ratios=[2, 2, 2, 2], layerscales=[True] * 4)
TRITON_OPS = ('cross_scan', 'depthwise_conv2d', 'direction_order', 'layer_norm_2d', 'na2d',
              'pointwise_conv2d', 'rotary_embedding')
# training runs the dense convolutions' torch reference, and the decode head's ConvModules'
# norms and activations after the 1x1 product
INFERENCE_ONLY_OPS = ('dense_conv2d', 'pointwise_conv2d_inference')
TRAINING_ONLY_OPS = ('batch_norm_2d', )  # LASS's norm in training mode (in the conv at inference)


class Segmentor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = SegMANEncoder(arch=TINY, drop_path_rate=0.1)
        self.head = SegMANHead(in_channels=TINY['embed_dims'], channels=8, feat_proj_dim=12,
                               num_classes=5)

    def forward(self, x):
        return self.head(self.encoder(x))


def custom_ops(targets):
    return {t.split('.')[1] for t in targets if t.startswith('mmseg_segman.')}


def main():
    torch.manual_seed(0)
    model = Segmentor().train()
    x = torch.randn(2, 3, 64, 64)
    with kernels_not_launched():
        compiled, targets = compile_recording_graphs(model)
        compiled(x).sum().backward()
        for kind in ('forward', 'backward'):
            want = {f'{op}_{kind}' for op in TRITON_OPS + TRAINING_ONLY_OPS}
            assert custom_ops(targets[kind]) == want, (kind, sorted(custom_ops(targets[kind])))
        print('training: one graph, every Triton op, forward and backward', flush=True)
        torch._dynamo.reset()
        model.eval()
        compiled, targets = compile_recording_graphs(model)
        with torch.no_grad():
            compiled(x)
        want = {f'{op}_forward' for op in TRITON_OPS + INFERENCE_ONLY_OPS}
        assert custom_ops(targets['forward']) == want, sorted(custom_ops(targets['forward']))
        print('inference: one graph, every Triton op', flush=True)
        check_sizes_share_one_graph(model)
    print('all checks passed')


def check_sizes_share_one_graph(model):
    """Compiled with dynamic sizes, a second input size runs the first graph: nothing SegMAN
    reads while tracing changes with the size or with the first call (the environment names'
    cache did: a second compilation). Both sizes non-square (else dynamo ties height to width)
    and under the size thresholds at which torch's fake CPU convolution picks another kernel
    (guards of torch's own)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend='aot_eager', dynamic=True)
    with torch.no_grad():
        for height, width in ((48, 80), (40, 88)):
            compiled(torch.randn(1, 3, height, width))
    graphs = counters['stats']['unique_graphs']
    assert graphs == 1, f'{graphs} graphs for two input sizes'
    print('dynamic sizes: one graph for two sizes', flush=True)


if __name__ == '__main__':
    main()
