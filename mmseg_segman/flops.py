"""FLOP counting for SegMAN with mmengine's analyzer (jit trace, multiply-adds).

The jit trace sees the SegMAN ops only through their implementation (gathers, masked
cumulative sums, compiled kernels), which it miscounts or skips. Inside :func:`segman_ops_as_nodes`
(a :func:`~mmseg_segman.ops.use_backends` scope, the strongest backend choice, so whatever a
model's ``op_backends`` say) every call of a dispatched SegMAN op becomes one
``prim::PythonOp.SegMAN<Op>`` node of the
trace, and :func:`segman_flop_analyzer` counts those nodes with the rules of the authors'
release (fvcore with natten's handles and VMamba's selective-scan formula):

* neighborhood attention, ``n = min(k, H) * min(k, W)`` keys per query:
  ``q.k``: ``B*heads*H*W*d*n``, bias add: ``B*heads*H*W*n`` (with rpb), ``attn.v``: ``B*heads*H*W*d*n``;
* global attention (stage 4): ``q.k`` and ``attn.v``, ``B*heads*L*L*d`` each (the release's
  two einsums; its bias add and softmax are not counted);
* selective scan: ``9*B*L*D*N`` plus ``B*D*L`` for the ``D`` skip, ``D`` counting the
  channels of all four directions, plus the step projection that it applies (``B*L*D*R``,
  the release's einsum, counted as mmengine counts einsums).

A segmentor is counted on ``encode_decode``: encoder, decode head and the bilinear resize
of the logits to the input size, as mmseg 0.x's ``forward_dummy`` in the release's
``get_flops.py``; mmseg 1.x's own tool traces ``forward(mode='tensor')``, which stops
before that resize.

Everything else (convolutions, linears, einsums, norms, bilinear resizes, pooling) is
counted by mmengine's default handles, as fvcore counted it for the paper; softmax,
activations, element-wise ops and the bicubic resize of the stage-4 bias are not counted.
"""
import inspect
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.analysis.jit_handles import get_shape
from mmengine.analysis.print_helper import complexity_stats_table
from torch import Tensor, nn

from .ops.dispatch import registered_ops, use_backends


def _node_args(inputs: List[Any], outputs: List[Any]) -> List[Any]:
    """The arguments of a ``prim::PythonOp`` node in call order: shapes of tensors, scalars as is."""
    node = outputs[0].node()
    tensors, scalars = iter(inputs), iter(node.scalar_args())
    return [get_shape(next(tensors)) if kind == 'd' else next(scalars) for kind in node.cconv()]


def neighborhood_attention_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """``neighborhood_attention_2d(q, k, v, kernel_size, rpb)``, q ``(B, heads, H, W, d)``."""
    q_shape, _, _, kernel_size, rpb = _node_args(inputs, outputs)
    batch, heads, height, width, dim = q_shape
    queries = batch * heads * height * width
    keys = min(kernel_size, height) * min(kernel_size, width)
    return 2 * queries * keys * dim + (queries * keys if rpb is not None else 0)


def biased_attention_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """``biased_attention(q, k, v, bias)``, q ``(B, heads, L, d)``: ``q.k`` and ``attn.v``."""
    batch, heads, length, dim = _node_args(inputs, outputs)[0]
    return 2 * batch * heads * length * length * dim


def _scan_flops(batch: int, channels: int, length: int, state: int, with_d: bool) -> int:
    return 9 * batch * length * channels * state + (batch * channels * length if with_d else 0)


def cross_selective_scan_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """``cross_selective_scan(x, dt_low, dt_proj, A, B, C, D, delta_bias)``: four directions
    over x ``(B, D, H, W)``, B ``(B, 4, N, H*W)``, with steps ``dt_proj (4, D, R)`` times
    ``dt_low``."""
    x, _, dt_proj, _, b, _, d = _node_args(inputs, outputs)[:7]
    batch, channels, height, width = x
    projection = batch * height * width * dt_proj[0] * channels * dt_proj[2]
    return _scan_flops(batch, b[1] * channels, height * width, b[2], d is not None) + projection


OP_FLOPS: Dict[str, Callable] = {
    'neighborhood_attention': neighborhood_attention_flops,
    'biased_attention': biased_attention_flops,
    'cross_selective_scan': cross_selective_scan_flops,
}


def node_name(op: str) -> str:
    """Trace node kind of a SegMAN op inside :func:`segman_ops_as_nodes`."""
    return 'prim::PythonOp.SegMAN' + ''.join(part.title() for part in op.split('_'))


def _as_node(op: str, signature: inspect.Signature) -> Callable:
    """The op as an autograd function named after it: one opaque node in a jit trace.

    Its forward returns zeros of the output's shape: FLOPs depend on shapes only, and the
    reference kernels would need tens of GB for the largest models at 1024x2048 on CPU.
    The output has the first argument's shape; the scans compute in float32 (or float64).
    """

    def forward(ctx, *args):
        first = args[0]
        dtype = first.dtype if op in ('neighborhood_attention', 'biased_attention') \
            else torch.promote_types(first.dtype, torch.float32)
        return first.new_zeros(first.shape, dtype=dtype)

    function = type(node_name(op)[len('prim::PythonOp.'):], (torch.autograd.Function, ),
                    {'forward': staticmethod(forward)})

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return function.apply(*bound.arguments.values())

    return call


def segman_ops_as_nodes():
    """A scope in which each dispatched SegMAN op of :data:`OP_FLOPS` is a single
    ``SegMAN<Op>`` trace node, whichever backend would run it otherwise, and every other
    op runs its ``torch`` reference, whose convolutions and products the trace counts (a
    Triton kernel's launch is invisible to it: on CUDA the fast backends' FLOPs were lost)."""
    ops = registered_ops()
    return use_backends({**{op: 'torch' for op in ops},
                         **{op: _as_node(op, inspect.signature(ops[op].backends['torch'].fn))
                            for op in OP_FLOPS}})


class SegMANFlopAnalyzer(FlopAnalyzer):
    """mmengine's :class:`FlopAnalyzer` that also counts the SegMAN ops (see module doc)."""

    def __init__(self, model: nn.Module, inputs: Any):
        super().__init__(model, inputs)
        self.set_op_handle(**{node_name(op): handle for op, handle in OP_FLOPS.items()})

    def _analyze(self):
        if self._stats is not None:
            return self._stats
        with segman_ops_as_nodes():
            return super()._analyze()


def segman_flop_analyzer(model: nn.Module, inputs: Any,
                         warn_unsupported: Optional[bool] = None) -> SegMANFlopAnalyzer:
    """A :class:`SegMANFlopAnalyzer` of ``model(*inputs)``; ``warn_unsupported=False`` silences
    the warnings about ops the analyzer does not count."""
    analyzer = SegMANFlopAnalyzer(model, inputs)
    if warn_unsupported is not None:
        analyzer.unsupported_ops_warnings(warn_unsupported)
    return analyzer


@contextmanager
def _forward_as_encode_decode(segmentor: nn.Module, inputs: Tensor) -> Iterator[None]:
    """``segmentor(inputs)`` runs ``encode_decode``: logits ``(B, classes, H, W)`` of the input size."""
    if not callable(getattr(segmentor, 'encode_decode', None)):
        raise TypeError(f'{type(segmentor).__name__} has no encode_decode: only encoder-decoder '
                        'segmentors can be counted')
    shape = tuple(inputs.shape[-2:])
    metas = [dict(img_shape=shape, ori_shape=shape, pad_shape=shape)] * inputs.size(0)
    segmentor.forward = lambda x: segmentor.encode_decode(x, metas)
    try:
        yield
    finally:
        del segmentor.forward


def segmentor_complexity(segmentor: nn.Module, inputs: Tensor, show_table: bool = False,
                         max_depth: int = 3) -> Dict[str, Any]:
    """FLOPs (multiply-adds) and parameters of a segmentor on ``inputs (B, 3, H, W)``.

    Returns:
        ``flops``, ``params`` (numbers), ``analyzer`` and, with ``show_table``, ``table``
        (mmengine's per-module table down to ``max_depth``).
    """
    analyzer = segman_flop_analyzer(segmentor, (inputs, ), warn_unsupported=False)
    with _forward_as_encode_decode(segmentor, inputs):
        flops = analyzer.total()
    result = dict(flops=flops, params=parameter_count(segmentor)[''], analyzer=analyzer)
    if show_table:
        result['table'] = complexity_stats_table(flops=analyzer, max_depth=max_depth,
                                                 show_param_shapes=False)
    return result
