"""SegMAN for ImageNet pre-training with mmpretrain (an optional dependency).

Importing this package registers, in ``mmpretrain.registry.MODELS``, the encoder
(``SegMANEncoder``, the same class mmseg builds) and the release's classifier head
(``SegMANClsHead``), so that an mmpretrain ``ImageClassifier`` can be built from
``configs/segman_cls/``.
"""
try:
    from mmpretrain.registry import MODELS
except ImportError as error:
    raise ImportError('mmseg_segman.models.classification needs mmpretrain 1.x '
                      '(pip install "mmpretrain>=1.0"); the segmentation models do not') from error

from ..backbones import SegMANEncoder
from .segman_cls_head import SegMANClsHead

MODELS.register_module(module=SegMANEncoder)

__all__ = ['SegMANClsHead', 'SegMANEncoder']
