"""SegMAN (CVPR 2025) for MMSegmentation 1.x.

``import mmseg_segman`` registers ``SegMANEncoder`` and ``SegMANHead`` in mmseg's
``MODELS`` and lets ``torch.load`` read the checkpoints mmengine writes (see
:mod:`mmseg_segman.checkpoint_safety`).
"""
from .checkpoint_safety import allow_mmengine_checkpoints
from .models import SegMANEncoder, SegMANHead

__version__ = '0.1.0'
allow_mmengine_checkpoints()

__all__ = ['SegMANEncoder', 'SegMANHead', '__version__']
