"""SegMAN decoder: multi-scale features fused, then MMSCopE (one selective scan over a
stack of three scales of the fused feature)."""
from functools import partial
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.models.losses import CrossEntropyLoss
from mmseg.registry import MODELS
from mmseg.utils import SampleList
from torch import Tensor, nn

from ...ops import cross_entropy_2d, pointwise_conv2d, resize_bilinear
from ...ops.dispatch import check_op_backends, traced, with_op_backends
from ..layers import SS2D, BatchNormActConvModule, DenseConv2d, PointwiseConv2d, SegMANBlock
from ..strict_loading import refuse_mismatched_weights
from ..cuda_graphs import CUDAGraphs
from ..variants import arch_of, describe_widths, head_widths


class LinearProjection(nn.Module):
    """A ``nn.Linear`` over the channels of ``(B, C, H, W)`` (key ``proj``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return pointwise_conv2d(x, self.proj.weight[:, :, None, None], self.proj.bias)


@MODELS.register_module()
class SegMANHead(BaseDecodeHead):
    """SegMAN decode head (the released ``SegMANDecoder``).

    Takes the four encoder maps (``c1`` unused). ``c2..c4`` are projected to
    ``feat_proj_dim`` and fused at 1/8 into ``x`` (``channels``). MMSCopE stacks ``x`` at
    three scales on the 1/32 grid (pixel-unshuffled ``x``, a stride-2 conv of it
    pixel-unshuffled, a stride-4 conv of it), runs one SS2D block over the stack, and
    feeds the result back into every projected map. Inputs whose 1/8 map is not a
    multiple of 4 are padded for MMSCopE and cropped back.

    ``in_channels`` must be the encoder's stage widths (``backbone.embed_dims``); the
    released heads are in :data:`mmseg_segman.models.variants.HEAD_WIDTHS`. A head that
    does not fit its encoder is refused when :class:`SegMANEncoderDecoder` builds the two
    (the segman configs' segmentor), else at the head's first forward, before any
    computation (a check of shapes only).

    Weights load strictly (:mod:`mmseg_segman.models.strict_loading`).

    Args:
        feat_proj_dim: channels ``P`` of the projected encoder maps.
        op_backends: ``{op: backend}`` for this head's forward (see ``mmseg_segman.ops.dispatch``).
        reinit_mismatched_classifier: fine-tuning on another class count: once
            ``init_weights`` has run (training), a checkpoint whose classifier (``conv_seg``)
            has another shape loads all but the classifier, which keeps its initialisation,
            with a warning. Testing and inference still refuse such a checkpoint.
        cuda_graph: replay the forward as CUDA graphs in training and in inference, as
            :class:`SegMANEncoder`'s ``cuda_graph`` (the loss and the resize to the image stay
            eager).
        **kwargs: :class:`BaseDecodeHead` arguments (``in_channels`` 4 values,
            ``in_index`` 4 values, ``channels``, ``num_classes``, ``norm_cfg``, ...).
    """

    def __init__(self, feat_proj_dim: int, op_backends: Optional[Dict[str, str]] = None,
                 norm_cfg: Dict = dict(type='BN', requires_grad=True),
                 reinit_mismatched_classifier: bool = False, cuda_graph: bool = False,
                 **kwargs):
        kwargs.setdefault('in_index', [0, 1, 2, 3])
        super().__init__(input_transform='multiple_select', norm_cfg=norm_cfg, **kwargs)
        if len(self.in_channels) != 4:
            raise ValueError(f'SegMANHead takes the four encoder maps, got in_channels={self.in_channels}')
        for name, values in (('in_channels', self.in_channels), ('channels', [self.channels]),
                             ('feat_proj_dim', [feat_proj_dim])):
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
                raise ValueError(f'SegMANHead {name} must be positive integers, got {values}')
        self.op_backends = check_op_backends(op_backends, 'SegMANHead')
        c, p = self.channels, feat_proj_dim
        self.feat_proj_dim = p

        def conv(in_ch, out_ch, kernel_size=1, **kw):
            # convolutions run an op where the config names no conv_cfg (cuDNN builds an
            # execution plan for each new input shape, about 3 ms a convolution, H100): the
            # 1x1 ones pointwise_conv2d, the others dense_conv2d; a training batch norm and
            # its activation one op
            layer = PointwiseConv2d if kernel_size == 1 else DenseConv2d
            conv_cfg = dict(type=layer) if self.conv_cfg is None else self.conv_cfg
            return BatchNormActConvModule(in_ch, out_ch, kernel_size, conv_cfg=conv_cfg,
                                          norm_cfg=self.norm_cfg, act_cfg=self.act_cfg, **kw)

        self.linear_c4 = LinearProjection(self.in_channels[3], p)
        self.linear_c3 = LinearProjection(self.in_channels[2], p)
        self.linear_c2 = LinearProjection(self.in_channels[1], p)
        self.linear_fuse = conv(3 * p, c)
        self.short_path = conv(c, c)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv(c, c))
        # MMSCopE
        self.conv_downsample_2 = conv(c, 2 * c, 3, stride=2, padding=1)
        self.conv_downsample_4 = conv(c, 4 * c, 5, stride=4, padding=1)
        self.reduce_channels = nn.ModuleList([conv(4 * c * 2 ** i, c) for i in range(3)])
        self.vssm = SegMANBlock(3 * c, SS2D(3 * c), ffn_dim=12 * c)
        self.proj_out = conv(3 * c, p)
        self.cat = conv(5 * c + 3 * p, c)
        self.conv_seg = PointwiseConv2d(c, self.out_channels)
        self.reinit_mismatched_classifier = reinit_mismatched_classifier
        self.cuda_graphs = CUDAGraphs('SegMANHead') if cuda_graph else None
        self.register_load_state_dict_pre_hook(partial(refuse_mismatched_weights, classifier='conv_seg'))

    def _image_pool(self, x: Tensor) -> Tensor:
        """Global context; with batch 1 in training, BN uses its running statistics
        (one value per channel gives no batch statistics)."""
        pooled = self.image_pool[0](x)
        conv_module = self.image_pool[1]
        norm = getattr(conv_module, 'bn', None)
        if self.training and pooled.size(0) == 1 and isinstance(norm, nn.modules.batchnorm._BatchNorm) \
                and not (isinstance(norm, nn.SyncBatchNorm) and torch.distributed.is_initialized()):
            norm.eval()
            try:
                return conv_module(pooled)
            finally:
                norm.train()
        return conv_module(pooled)

    def _mmscope(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` at 1/8 -> ``(B, 3C, H, W)``: the scan over three scales."""
        height, width = x.shape[-2:]
        if height % 4 or width % 4 or traced() or torch.is_grad_enabled():
            # zeros to a multiple of 4: 4 padded, the excess cut off (traced, no branch on the
            # size and no padding by a size, which a traced graph would keep as constants; one
            # more than a multiple needs, so that the cut is a strided view at every size:
            # whether it is contiguous is otherwise a guard on the size, which compiled a
            # second graph). Eager inference does not pad a multiple of 4: the padded copy and
            # the copies its strided cut costs its readers (the convolutions, the unshuffle)
            # are saved; with autograd the path stays the traced one's (the convolutions'
            # gradients of the strided cut round otherwise, by 2e-5 on the CPU)
            x = F.pad(x, (0, 4, 0, 4))[..., :(height + 3) // 4 * 4, :(width + 3) // 4 * 4]
        stacked = torch.cat([
            self.reduce_channels[2](F.pixel_unshuffle(x, 4)),
            self.reduce_channels[1](F.pixel_unshuffle(self.conv_downsample_2(x), 2)),
            self.reduce_channels[0](self.conv_downsample_4(x)),
        ], dim=1)
        out = resize_bilinear(self.vssm(stacked), x.shape[-2:], self.align_corners)
        return out[..., :height, :width]

    def check_in_channels(self, widths: Sequence[int]) -> None:
        """Refuse encoder maps of ``widths`` (all of them, before ``in_index`` picks four)
        that do not give ``in_channels``, naming the fix."""
        if any(not -len(widths) <= i < len(widths) for i in self.in_index):
            raise ValueError(f'SegMANHead in_index={self.in_index} picks maps the encoder does not '
                             f'give: it gives {len(widths)} maps of widths {list(widths)}; set the '
                             "encoder's out_indices to (0, 1, 2, 3)")
        picked = [widths[i] for i in self.in_index]
        if picked == list(self.in_channels):
            return
        fix = 'set decode_head.in_channels to the encoder\'s embed_dims'
        arch = arch_of(picked)
        if arch is not None:
            fix += (f"; the released SegMAN-{arch.upper()} head (ADE20K) is "
                    f"{head_widths(arch, 'ade20k')}, see mmseg_segman.models.variants.HEAD_WIDTHS")
        raise ValueError(f'SegMANHead was built with in_channels={describe_widths(self.in_channels)} '
                         f'but the encoder gives maps of widths {describe_widths(picked)}: {fix}')

    @with_op_backends
    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """Four encoder maps -> logits ``(B, num_classes, H/8, W/8)``."""
        self.check_in_channels([x.size(1) for x in inputs])
        if self.cuda_graphs is not None:
            return self.cuda_graphs(self, self._logits, *inputs)
        return self._logits(*inputs)

    def _logits(self, *inputs: Tensor) -> Tensor:
        _, c2, c3, c4 = self._transform_inputs(inputs)
        size = c2.shape[-2:]
        p2 = self.linear_c2(c2)
        p3 = resize_bilinear(self.linear_c3(c3), size)
        p4 = resize_bilinear(self.linear_c4(c4), size)
        x = self.linear_fuse(torch.cat([p4, p3, p2], dim=1))

        context = resize_bilinear(self._image_pool(x), size, self.align_corners)
        scanned = self._mmscope(x)
        q = self.proj_out(scanned)
        out = self.cat(torch.cat([self.short_path(x), context, scanned, p2 + q, p3 + q, p4 + q], dim=1))
        return self.cls_seg(out)

    @with_op_backends
    def loss_by_feat(self, seg_logits: Tensor, batch_data_samples: SampleList) -> dict:
        """mmseg's ``BaseDecodeHead.loss_by_feat`` (1.2.2), with the logits resized to the
        labels by :func:`resize_bilinear`, a plain ``CrossEntropyLoss`` computed by
        :func:`cross_entropy_2d` (:func:`plain_cross_entropy`) and the accuracy from its
        prediction (an ``argmax``): on an H200, ``F.interpolate``'s backward (atomic adds) and
        ``topk`` took 11% and 7% of SegMAN-B's training step, PyTorch's cross entropy 4.6% of
        SegMAN-L's."""
        seg_label = self._stack_batch_gt(batch_data_samples)
        seg_logits = resize_bilinear(seg_logits, seg_label.shape[2:], self.align_corners)
        seg_weight = None if self.sampler is None else self.sampler.sample(seg_logits, seg_label)
        seg_label = seg_label.squeeze(1)
        losses_decode = self.loss_decode if isinstance(self.loss_decode, nn.ModuleList) \
            else [self.loss_decode]
        loss, prediction = dict(), None
        for loss_decode in losses_decode:
            if seg_weight is None and plain_cross_entropy(loss_decode):
                pixel_loss, prediction = cross_entropy_2d(seg_logits, seg_label, self.ignore_index)
                value = loss_decode.loss_weight * mean_cross_entropy(
                    pixel_loss, seg_label, self.ignore_index, loss_decode.avg_non_ignore)
            else:
                value = loss_decode(seg_logits, seg_label, weight=seg_weight,
                                    ignore_index=self.ignore_index)
            name = loss_decode.loss_name
            loss[name] = loss[name] + value if name in loss else value
        if prediction is None:
            with torch.no_grad():
                prediction = seg_logits.argmax(1)
        loss['acc_seg'] = top1_accuracy(prediction, seg_label, self.ignore_index)
        return loss


def plain_cross_entropy(loss_decode: nn.Module) -> bool:
    """Whether ``loss_decode`` is mmseg's ``CrossEntropyLoss`` (not a subclass) of a softmax
    averaged over the pixels, without class weights: what :func:`cross_entropy_2d` and
    :func:`mean_cross_entropy` compute. Others (sigmoid, mask, class weights, ``'sum'``,
    another loss) run themselves."""
    return (type(loss_decode) is CrossEntropyLoss and not loss_decode.use_sigmoid
            and not loss_decode.use_mask and loss_decode.class_weight is None
            and loss_decode.reduction == 'mean')


def mean_cross_entropy(pixel_loss: Tensor, label: Tensor, ignore_index: int,
                       avg_non_ignore: bool) -> Tensor:
    """mmseg's mean of the pixels' losses ``(B, H, W)``: their sum over all the pixels, or
    with ``avg_non_ignore`` over the labelled ones, plus float32's epsilon (as mmseg's
    ``weight_reduce_loss``; the count as a tensor, without mmseg's host sync)."""
    eps = torch.finfo(torch.float32).eps
    count = (label != ignore_index).sum() if avg_non_ignore else label.numel()
    return pixel_loss.sum() / (count + eps)


def top1_accuracy(prediction: Tensor, label: Tensor, ignore_index: int) -> Tensor:
    """mmseg's ``accuracy(logits, label, topk=1, ignore_index=ignore_index)`` from the logits'
    ``argmax`` ``prediction`` ``(B, H, W)``: the percentage of labelled pixels whose top class
    is right, ``(1,)``, for ``label (B, H, W)``; without ``topk`` and without a host sync."""
    with torch.no_grad():
        valid = label != ignore_index
        correct = ((prediction == label) & valid).sum().float().reshape(1)
        eps = torch.finfo(torch.float32).eps
        return (correct + eps) * 100.0 / (valid.sum() + eps)
