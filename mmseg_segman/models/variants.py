"""The released SegMAN sizes as data: encoder settings and decode-head widths per dataset.

One table per size (``'t'``, ``'s'``, ``'b'``, ``'l'``), read by
:class:`~mmseg_segman.models.SegMANEncoder` (``arch='t'``), by ``tools/benchmark.py``, and
checked against the shipped configs by ``tests/test_configs.py`` (configs keep literal
numbers: mmengine's text configs cannot import the package).
"""
from typing import Dict, List, Optional, Sequence

DATASETS = ('ade20k', 'cityscapes', 'coco-stuff164k')

ENCODER_ARCHS: Dict[str, Dict] = {
    't': dict(embed_dims=[32, 64, 144, 192], depths=[2, 2, 4, 2], num_heads=[1, 2, 4, 8],
              window_size=[11, 9, 9, 7], mlp_ratios=[4, 4, 3, 3], layerscales=[False] * 4),
    's': dict(embed_dims=[64, 144, 288, 512], depths=[2, 2, 10, 4], num_heads=[2, 4, 8, 16],
              window_size=[11, 9, 7, 7], mlp_ratios=[4, 4, 3.4, 3.4], layerscales=[False] * 4),
    'b': dict(embed_dims=[96, 160, 364, 560], depths=[4, 4, 18, 4], num_heads=[4, 8, 13, 20],
              window_size=[11, 9, 7, 7], mlp_ratios=[4, 4, 3, 3], layerscales=[True] * 4),
    'l': dict(embed_dims=[96, 192, 432, 640], depths=[4, 4, 28, 4], num_heads=[4, 8, 12, 20],
              window_size=[11, 9, 7, 7], mlp_ratios=[4, 4, 3, 3], layerscales=[True] * 4),
}

# Decode head (channels C, feat_proj_dim P) of the released segmentors, per dataset.
HEAD_WIDTHS: Dict[str, Dict[str, tuple]] = {
    't': {'ade20k': (128, 192), 'cityscapes': (128, 192), 'coco-stuff164k': (128, 192)},
    's': {'ade20k': (144, 288), 'cityscapes': (152, 288), 'coco-stuff164k': (144, 288)},
    'b': {'ade20k': (180, 320), 'cityscapes': (180, 320), 'coco-stuff164k': (180, 320)},
    'l': {'ade20k': (224, 432), 'cityscapes': (224, 432), 'coco-stuff164k': (224, 432)},
}


def head_widths(arch: str, dataset: str = 'ade20k') -> Dict[str, object]:
    """``in_channels`` (the encoder's widths), ``channels``, ``feat_proj_dim`` of the
    released decode head of size ``arch`` trained on ``dataset``."""
    if arch not in ENCODER_ARCHS:
        raise ValueError(f'unknown SegMAN arch {arch!r}; choose one of {sorted(ENCODER_ARCHS)}')
    if dataset not in DATASETS:
        raise ValueError(f'no released SegMAN head for dataset {dataset!r}; choose one of {DATASETS}')
    channels, feat_proj_dim = HEAD_WIDTHS[arch][dataset]
    return dict(in_channels=list(ENCODER_ARCHS[arch]['embed_dims']), channels=channels,
                feat_proj_dim=feat_proj_dim)


def arch_of(embed_dims: Sequence[int]) -> Optional[str]:
    """The released size with these stage widths, or None."""
    return next((name for name, arch in ENCODER_ARCHS.items()
                 if arch['embed_dims'] == list(embed_dims)), None)


def describe_widths(embed_dims: Sequence[int]) -> str:
    """``[32, 64, 144, 192] (SegMAN-T's)`` for error messages."""
    arch = arch_of(embed_dims)
    widths: List[int] = list(embed_dims)
    return f'{widths} (SegMAN-{arch.upper()}\'s)' if arch else str(widths)
