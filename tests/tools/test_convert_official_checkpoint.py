"""Released checkpoint layouts (written here) convert into files mmseg 1.x loads."""
import argparse
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import load_checkpoint
from mmseg.registry import MODELS

from mmseg_segman.models import SegMANEncoder

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / 'tools' / 'convert_official_checkpoint.py'
CONFIG = REPO / 'configs' / 'segman' / 'segman-t_4xb4-160k_ade20k-512x512.py'


def build_segmentor():
    cfg = Config.fromfile(str(CONFIG))
    cfg.model.backbone.init_cfg = None
    cfg.model.decode_head.norm_cfg = dict(type='BN', requires_grad=True)
    init_default_scope('mmseg')
    return MODELS.build(cfg.model)


def convert(src, dst, *extra):
    return subprocess.run([sys.executable, str(TOOL), str(src), str(dst), *extra],
                          capture_output=True, text=True, timeout=300)


def test_mmseg0x_segmentation_checkpoint(tmp_path):
    model = build_segmentor()
    released = {
        'meta': {'mmseg_version': '0.30.0', 'config': 'model = dict(...)', 'CLASSES': ('wall', 'building'),
                 'PALETTE': [[120, 120, 120], [180, 120, 120]], 'env_info': 'sys.platform: linux',
                 'seed': 0, 'iter': 160000, 'hook_msgs': {'best_score': np.float64(43.0)}},
        'state_dict': OrderedDict(model.state_dict()),
        'optimizer': {'state': {}, 'param_groups': [{'lr': 0.0, 'params': [0, 1]}]},
    }
    torch.save(released, tmp_path / 'segman_t_ade.pth')
    result = convert(tmp_path / 'segman_t_ade.pth', tmp_path / 'converted.pth')
    assert result.returncode == 0, result.stderr
    assert 'SegMAN-T segmentor, 150 classes' in result.stdout
    fresh = build_segmentor()
    ckpt = load_checkpoint(fresh, str(tmp_path / 'converted.pth'), map_location='cpu', strict=True)
    assert ckpt['meta']['dataset_meta']['classes'] == ('wall', 'building')
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_imagenet_encoder_file(tmp_path):
    encoder = SegMANEncoder(arch='t')
    state = dict(encoder.state_dict())
    state['classifier.0.weight'] = torch.randn(1024, 192, 1, 1)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({'epoch': 299, 'arch': 'SegMANEncoder_t', 'state_dict': state, 'state_dict_ema': ema,
                'args': argparse.Namespace(lr=1e-3, model='SegMANEncoder_t'), 'metric': 76.2,
                'optimizer': {'state': {}, 'param_groups': []}}, tmp_path / 'in1k.pth.tar')
    result = convert(tmp_path / 'in1k.pth.tar', tmp_path / 'encoder.pth')
    assert result.returncode == 0, result.stderr
    assert 'encoder from state_dict_ema, 1 classifier tensors kept' in result.stdout
    loaded = SegMANEncoder(arch='t', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'encoder.pth')))
    loaded.init_weights()
    assert torch.equal(loaded.patch_embed[0].weight, ema['patch_embed.0.weight'])


def test_unrelated_checkpoint_is_refused(tmp_path):
    torch.save({'state_dict': {'conv1.weight': torch.zeros(64, 3, 7, 7)}}, tmp_path / 'resnet.pth')
    result = convert(tmp_path / 'resnet.pth', tmp_path / 'out.pth')
    assert result.returncode != 0 and 'not a SegMAN encoder' in result.stderr
    assert not (tmp_path / 'out.pth').exists()


class Payload:
    pass


def test_pickled_objects_need_explicit_trust(tmp_path):
    torch.save({'state_dict': {}, 'meta': Payload()}, tmp_path / 'odd.pth')
    result = convert(tmp_path / 'odd.pth', tmp_path / 'out.pth')
    assert result.returncode != 0 and '--trust-pickle' in result.stderr
