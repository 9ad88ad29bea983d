"""The classifier of the released SegMAN ImageNet-1k encoders as an mmpretrain head."""
from typing import Optional, Sequence

from mmpretrain.models.heads import ClsHead
from mmpretrain.registry import MODELS
from torch import Tensor, nn


@MODELS.register_module()
class SegMANClsHead(ClsHead):
    """1x1 conv to ``hidden_channels``, BN, SiLU, global average pool, 1x1 conv to classes.

    The layers live in ``self.classifier``, an ``nn.Sequential`` with the release's indices,
    so an :class:`~mmpretrain.models.ImageClassifier` holding this head has the keys of the
    released ImageNet files with ``backbone.`` / ``head.`` in front:

    - ``classifier.0.*`` <-> ``head.classifier.0.*``: conv ``(hidden, in_channels, 1, 1)``;
    - ``classifier.1.*`` <-> ``head.classifier.1.*``: BN over ``hidden``;
    - ``classifier.4.*`` <-> ``head.classifier.4.*``: conv ``(num_classes, hidden, 1, 1)``;
    - every other key ``k`` (the encoder) <-> ``backbone.k``.

    Args:
        num_classes: classes (1000 for ImageNet-1k).
        in_channels: channels of the last encoder stage (192, 512, 560, 640 for T/S/B/L).
        hidden_channels: width of the projection before pooling (1024 in the release).
        init_cfg: initialisation; defaults to the release's (truncated normal, std 0.02, zero
            bias, for both convs).
        **kwargs: ``loss``, ``topk``, ``cal_acc`` of :class:`~mmpretrain.models.heads.ClsHead`.
    """

    def __init__(self, num_classes: int, in_channels: int, hidden_channels: int = 1024,
                 init_cfg: Optional[dict] = dict(type='TruncNormal', layer='Conv2d', std=0.02,
                                                 bias=0.),
                 **kwargs):
        super().__init__(init_cfg=init_cfg, **kwargs)
        for name, value in (('num_classes', num_classes), ('in_channels', in_channels),
                            ('hidden_channels', hidden_channels)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f'{name}={value!r} must be a positive integer')
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.classifier = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size=1),
            nn.BatchNorm2d(hidden_channels),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(hidden_channels, num_classes, kernel_size=1),
        )

    def pre_logits(self, feats: Sequence[Tensor]) -> Tensor:
        """Last stage ``(B, in_channels, H, W)`` of ``feats`` -> pooled ``(B, hidden_channels)``."""
        if not isinstance(feats, (tuple, list)) or not feats:
            raise ValueError('SegMANClsHead expects the tuple of encoder stage outputs, got '
                             f'{type(feats).__name__}')
        x = feats[-1]
        if not isinstance(x, Tensor) or x.dim() != 4 or x.size(1) != self.in_channels:
            raise ValueError(
                f'SegMANClsHead(in_channels={self.in_channels}) expects the last stage as '
                f'(B, {self.in_channels}, H, W), got '
                f'{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}; '
                'is in_channels the width of the encoder\'s last stage?')
        return self.classifier[:4](x).flatten(1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """``feats`` (last stage ``(B, in_channels, H, W)``) -> logits ``(B, num_classes)``."""
        pooled = self.pre_logits(feats)
        return self.classifier[4](pooled[:, :, None, None]).flatten(1)
