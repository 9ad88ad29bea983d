"""SegMAN (CVPR 2025) for MMSegmentation 1.x.

``import mmseg_segman`` registers ``SegMANEncoder``, ``SegMANHead`` and ``SegMANEncoderDecoder`` in
mmseg's ``MODELS``, ``RNGStateHook`` and ``CompileHook`` in its ``HOOKS`` and the loops that
refuse empty datasets in its ``LOOPS``, and lets mmengine's checkpoint loading read the
checkpoints mmengine writes, and nothing more (see :mod:`mmseg_segman.checkpoint_safety`).
"""
from .checkpoint_safety import guard_mmengine_loading
from .engine import CompileHook, RNGStateHook
from .models import SegMANEncoder, SegMANEncoderDecoder, SegMANHead

__version__ = '0.1.0'
guard_mmengine_loading()

__all__ = ['CompileHook', 'RNGStateHook', 'SegMANEncoder', 'SegMANEncoderDecoder', 'SegMANHead',
           '__version__']
