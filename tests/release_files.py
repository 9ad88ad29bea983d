"""Files in the layouts of the authors' release, written here from randomly initialised models."""
import argparse
from pathlib import Path

import numpy as np
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS

from mmseg_segman.models import SegMANEncoder

REPO = Path(__file__).resolve().parents[1]


def build_segmentor(config: Path):
    """The segmentor of ``config``, without pretrained weights, BN instead of SyncBN."""
    cfg = Config.fromfile(str(config))
    cfg.model.backbone.init_cfg = None
    cfg.model.decode_head.norm_cfg = dict(type='BN', requires_grad=True)
    init_default_scope('mmseg')
    return MODELS.build(cfg.model)


def write_release_segmentor(path: Path, state: dict, classes=('wall', 'building')) -> Path:
    """An mmseg 0.x segmentation checkpoint as the release has them."""
    torch.save({
        'meta': {'mmseg_version': '0.30.0', 'CLASSES': tuple(classes),
                 'PALETTE': [[i, i, i] for i in range(len(classes))], 'iter': 160000,
                 'hook_msgs': {'best_score': np.float64(43.0)}},
        'state_dict': state,
        'optimizer': {'state': {}, 'param_groups': [{'lr': 0.0, 'params': [0, 1]}]},
    }, path)
    return path


def write_release_encoder(path: Path, arch: str = 't') -> Path:
    """A timm ImageNet checkpoint of the SegMAN encoder as the release has them."""
    state = dict(SegMANEncoder(arch=arch).state_dict())
    state['classifier.0.weight'] = torch.randn(1024, 8, 1, 1)  # the converter keeps it aside
    torch.save({'epoch': 299, 'state_dict': state, 'state_dict_ema': state,
                'args': argparse.Namespace(model=f'SegMANEncoder_{arch}'),
                'optimizer': {'state': {}, 'param_groups': []}}, path)
    return path
