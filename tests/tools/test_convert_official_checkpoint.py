"""Released checkpoint layouts (written here) convert into files mmseg 1.x loads."""
import argparse
import importlib.util
import pickle
import subprocess
import sys
import types
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

from ..conftest import official_keys

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / 'tools' / 'convert_official_checkpoint.py'
CONFIG = REPO / 'configs' / 'segman' / 'segman-t_4xb4-160k_ade20k-512x512.py'


def load_tool():
    spec = importlib.util.spec_from_file_location('convert_official_checkpoint', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = load_tool()


def build_segmentor():
    cfg = Config.fromfile(str(CONFIG))
    cfg.model.backbone.init_cfg = None
    cfg.model.decode_head.norm_cfg = dict(type='BN', requires_grad=True)
    init_default_scope('mmseg')
    return MODELS.build(cfg.model)


@pytest.fixture(scope='module')
def segmentor_state():
    return OrderedDict(build_segmentor().state_dict())


def refused(src, dst, *args):
    """The message the converter exits with."""
    with pytest.raises(SystemExit) as exit_info:
        tool.convert(src, dst, *args)
    assert not dst.exists()
    return str(exit_info.value)


def test_mmseg0x_segmentation_checkpoint_command_line(tmp_path, segmentor_state):
    released = {
        'meta': {'mmseg_version': '0.30.0', 'config': 'model = dict(...)', 'CLASSES': ('wall', 'building'),
                 'PALETTE': [[120, 120, 120], [180, 120, 120]], 'env_info': 'sys.platform: linux',
                 'seed': 0, 'iter': 160000, 'hook_msgs': {'best_score': np.float64(43.0)}},
        'state_dict': segmentor_state,
        'optimizer': {'state': {}, 'param_groups': [{'lr': 0.0, 'params': [0, 1]}]},
    }
    torch.save(released, tmp_path / 'segman_t_ade.pth')
    result = subprocess.run([sys.executable, str(TOOL), str(tmp_path / 'segman_t_ade.pth'),
                             str(tmp_path / 'converted.pth')], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'SegMAN-T segmentor, 150 classes, 2 class names' in result.stdout
    fresh = build_segmentor()
    ckpt = load_checkpoint(fresh, str(tmp_path / 'converted.pth'), map_location='cpu', strict=True)
    assert ckpt['meta']['dataset_meta']['classes'] == ('wall', 'building')
    for key, value in segmentor_state.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_imagenet_encoder_file(tmp_path, capsys):
    encoder = SegMANEncoder(arch='t')
    state = dict(encoder.state_dict())
    state['classifier.0.weight'] = torch.randn(1024, 192, 1, 1)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({'epoch': 299, 'arch': 'SegMANEncoder_t', 'state_dict': state, 'state_dict_ema': ema,
                'args': argparse.Namespace(lr=1e-3, model='SegMANEncoder_t'), 'metric': 76.2,
                'optimizer': {'state': {}, 'param_groups': []}}, tmp_path / 'in1k.pth.tar')
    tool.convert(tmp_path / 'in1k.pth.tar', tmp_path / 'encoder.pth')
    assert 'encoder from state_dict_ema, 1 classifier tensors kept' in capsys.readouterr().out
    pretrained = dict(type='Pretrained', checkpoint=str(tmp_path / 'encoder.pth'))
    loaded = SegMANEncoder(arch='t', init_cfg=pretrained)
    loaded.init_weights()
    assert torch.equal(loaded.patch_embed[0].weight, ema['patch_embed.0.weight'])


class ConfigDict(dict):
    """Pickles as mmcv 1.x's ConfigDict (an addict Dict): NEWOBJ, SETITEMS, BUILD with itself."""
    __module__ = 'mmcv.utils.config'

    def __getstate__(self):
        return self

    def __setstate__(self, state):
        self.update(state)


def test_mmcv1_config_dicts_in_meta_and_dataset_option(tmp_path, monkeypatch, segmentor_state):
    monkeypatch.setitem(sys.modules, 'mmcv.utils.config', types.SimpleNamespace(ConfigDict=ConfigDict))
    meta = {'config': ConfigDict(model=ConfigDict(type='EncoderDecoder')), 'CLASSES': ('a', 'b')}
    torch.save({'meta': meta, 'state_dict': segmentor_state}, tmp_path / 'old.pth')
    monkeypatch.delitem(sys.modules, 'mmcv.utils.config')
    with pytest.warns(UserWarning, match='19 class names for a head of 150 classes'):
        meta = tool.convert(tmp_path / 'old.pth', tmp_path / 'new.pth', 'auto', 'cityscapes')
    classes, palette = meta['dataset_meta']['classes'], meta['dataset_meta']['palette']
    assert classes[0] == 'road' and palette[0] == [128, 64, 128]
    assert torch.load(tmp_path / 'new.pth')['meta'] == meta


@pytest.mark.parametrize('size', ['t', 's', 'b', 'l'])
def test_released_key_lists_are_recognised(size):
    """A state dict with the released keys and shapes of each size passes the strict check."""
    state = {key: torch.zeros(shape) for key, shape in official_keys(size).items()}
    assert tool.check_segmentor(state) == (size, 150)


def test_unrelated_checkpoint_is_refused(tmp_path):
    torch.save({'state_dict': {'conv1.weight': torch.zeros(64, 3, 7, 7)}}, tmp_path / 'resnet.pth')
    assert 'not a SegMAN encoder' in refused(tmp_path / 'resnet.pth', tmp_path / 'out.pth')


def test_head_of_another_width_is_refused(tmp_path, segmentor_state):
    state = dict(segmentor_state)
    state['decode_head.cat.conv.weight'] = torch.zeros(128, 7, 1, 1)
    torch.save({'state_dict': state}, tmp_path / 'bad_head.pth')
    assert 'decode_head weights do not fit a SegMAN-T head' in refused(tmp_path / 'bad_head.pth',
                                                                        tmp_path / 'out.pth')


def test_not_a_checkpoint(tmp_path):
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint at all')
    assert 'is not a PyTorch checkpoint' in refused(tmp_path / 'junk.pth', tmp_path / 'out.pth')
    assert 'no checkpoint at' in refused(tmp_path / 'missing.pth', tmp_path / 'out.pth')


class Payload:
    pass


def test_pickled_objects_need_explicit_trust(tmp_path):
    torch.save({'state_dict': {}, 'meta': Payload()}, tmp_path / 'odd.pth')
    assert '--trust-pickle' in refused(tmp_path / 'odd.pth', tmp_path / 'out.pth')


def test_legacy_format_converts_like_zip(tmp_path, segmentor_state):
    """torch < 1.6 wrote checkpoints as a pickle stream, not a zip."""
    torch.save({'meta': {'CLASSES': ('a', 'b')}, 'state_dict': segmentor_state}, tmp_path / 'legacy.pth',
               _use_new_zipfile_serialization=False)
    meta = tool.convert(tmp_path / 'legacy.pth', tmp_path / 'out.pth')
    assert meta['segman_arch'] == 't' and meta['dataset_meta']['classes'] == ('a', 'b')


def test_lists_and_plain_pickles_are_named(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / 'list.pth')
    assert 'not a checkpoint dict but a list' in refused(tmp_path / 'list.pth', tmp_path / 'out.pth')
    torch.save([torch.zeros(1)], tmp_path / 'legacy_list.pth', _use_new_zipfile_serialization=False)
    assert 'not a checkpoint dict but a list' in refused(tmp_path / 'legacy_list.pth', tmp_path / 'out.pth')
    (tmp_path / 'plain.pkl').write_bytes(pickle.dumps([1, 2]))
    assert 'is not a PyTorch checkpoint' in refused(tmp_path / 'plain.pkl', tmp_path / 'out.pth')


def test_non_finite_and_damaged_weights_are_refused(tmp_path, segmentor_state):
    from ..test_checkpoint_safety import flip_tensor_bytes
    state = dict(segmentor_state)
    state['backbone.patch_embed.0.weight'] = state['backbone.patch_embed.0.weight'].clone()
    state['backbone.patch_embed.0.weight'][0, 0, 0, 0] = float('inf')
    torch.save({'state_dict': state}, tmp_path / 'inf.pth')
    assert "NaN or Inf in 1 tensors: ['backbone.patch_embed.0.weight']" in refused(
        tmp_path / 'inf.pth', tmp_path / 'out.pth')
    torch.save({'state_dict': segmentor_state}, tmp_path / 'damaged.pth')
    flip_tensor_bytes(tmp_path / 'damaged.pth')
    assert 'the CRC-32 checksum of' in refused(tmp_path / 'damaged.pth', tmp_path / 'out.pth')
