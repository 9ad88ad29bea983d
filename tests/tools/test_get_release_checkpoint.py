"""``get_release_checkpoint``: a released model by name (or file) -> a checked mmseg 1.x file."""
import importlib.util
import re
from collections import OrderedDict

import pytest
import torch
import yaml
from mmengine.runner import load_checkpoint

from ..release_files import REPO, build_segmentor, write_release_encoder, write_release_segmentor
from ..toy_tools import run

TOOL = REPO / 'tools' / 'get_release_checkpoint.py'
T_ADE = 'segman-t_4xb4-160k_ade20k-512x512'
T_CITYSCAPES = 'segman-t_4xb2-160k_cityscapes-1024x1024'


def config(name):
    return REPO / 'configs' / 'segman' / f'{name}.py'


@pytest.fixture(scope='module')
def released_t_ade(tmp_path_factory):
    """A release-format SegMAN-T ADE20K file and the state it holds."""
    state = OrderedDict(build_segmentor(config(T_ADE)).state_dict())
    path = tmp_path_factory.mktemp('release') / 'segman_t_ade.pth'
    return write_release_segmentor(path, state), state


def test_model_from_a_downloaded_file(tmp_path, released_t_ade):
    src, state = released_t_ade
    code, out = run(TOOL, T_ADE, '--file', src, cwd=tmp_path)
    assert code == 0, out
    dst = tmp_path / 'checkpoints' / f'{T_ADE}.pth'
    assert re.search(rf'wrote checkpoints/{T_ADE}.pth \([\d.]+ MiB\): loads strictly into {T_ADE}.py '
                     r'\(6\.\d\dM parameters, 150 classes in the head, 150 class names\)', out), out
    assert re.search(rf'test\.py \S+/{T_ADE}\.py checkpoints/{T_ADE}\.pth', out), out
    fresh = build_segmentor(config(T_ADE))
    ckpt = load_checkpoint(fresh, str(dst), map_location='cpu', strict=True)
    assert ckpt['meta']['dataset_meta']['classes'][0] == 'wall'  # mmseg's ADE20K classes, 150
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_a_file_of_another_model_is_refused(tmp_path, released_t_ade):
    code, out = run(TOOL, 'segman-s_4xb4-160k_ade20k-512x512', '--file', released_t_ade[0],
                    cwd=tmp_path)
    assert code != 0 and 'does not fit segman-s_4xb4-160k_ade20k-512x512.py' in out, out


def test_release_t_cityscapes_head_of_150_classes(tmp_path, released_t_ade):
    # The release's SegMAN-T Cityscapes config (and so its checkpoint) has 150 classes.
    code, out = run(TOOL, T_CITYSCAPES, '--file', released_t_ade[0], '--out', 'city.pth', cwd=tmp_path)
    assert code == 0, out
    assert 'model.decode_head.num_classes=150' in out and '19 class names' in out, out


def test_encoder_goes_where_the_configs_look(tmp_path):
    src = write_release_encoder(tmp_path / 'SegMAN_Encoder_t.pth.tar')
    code, out = run(TOOL, 'segman-encoder-t', '--file', src, cwd=tmp_path)
    assert code == 0, out
    assert 'wrote pretrained/SegMAN_Encoder_t.pth.tar' in out and "SegMANEncoder(arch='t')" in out, out
    assert (tmp_path / 'pretrained' / 'SegMAN_Encoder_t.pth.tar').is_file()
    code, out = run(TOOL, 'segman-encoder-t', cwd=tmp_path)
    assert code != 0 and 'drive/folders/' in out and '--file' in out, out


def test_unknown_name_and_missing_file(tmp_path):
    code, out = run(TOOL, 'segman-x_ade20k', cwd=tmp_path)
    assert code != 0 and "unknown model 'segman-x_ade20k'" in out and T_ADE in out, out
    code, out = run(TOOL, T_ADE, '--file', tmp_path / 'nope.pth', cwd=tmp_path)
    assert code != 0 and 'no such file' in out, out


def test_download_without_gdown_says_what_to_do(tmp_path):
    if importlib.util.find_spec('gdown') is not None:
        pytest.skip('gdown is installed: this checks the message without it')
    code, out = run(TOOL, T_ADE, cwd=tmp_path)
    assert code != 0 and 'pip install gdown' in out and 'drive.google.com/file/d/' in out, out


def test_metafile_links_every_model_to_its_release_file():
    models = yaml.safe_load((REPO / 'configs' / 'segman' / 'metafile.yaml').read_text())['Models']
    ids = {m['Name']: m['Converted From']['Weights'] for m in models}
    assert len(ids) == 12 and len(set(ids.values())) == 12
    for name, url in ids.items():
        assert re.fullmatch(r'https://drive\.google\.com/file/d/[\w-]{33}/view\?usp=sharing', url), name
        assert url in (REPO / 'README.md').read_text(), name  # the README's table links the same file
