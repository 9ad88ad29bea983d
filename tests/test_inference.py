"""Inference through mmseg's APIs and the overlay demo, with a small random SegMAN."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmseg.apis import MMSegInferencer, inference_model, init_model
from PIL import Image

import mmseg_segman  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / 'configs' / 'segman' / 'segman-t_1xb8-300i_toy-96x96.py'
PALETTE = [[0, 0, 0], [220, 60, 60], [60, 200, 80], [70, 90, 230], [230, 200, 40]]


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A random toy SegMAN-T saved as mmseg 1.x training would (with dataset_meta)."""
    path = tmp_path_factory.mktemp('ckpt') / 'segman_toy.pth'
    model = init_model(str(CONFIG), None, device='cpu')
    meta = dict(dataset_meta=dict(classes=('background', 'disc', 'square', 'triangle', 'bar'),
                                  palette=PALETTE))
    torch.save({'meta': meta, 'state_dict': model.state_dict()}, path)
    return path


@pytest.fixture(scope='module')
def checkpoint_without_classes(tmp_path_factory, checkpoint):
    """The same weights with an empty meta: the palette must come from the config."""
    path = tmp_path_factory.mktemp('ckpt') / 'segman_toy_no_meta.pth'
    torch.save({'meta': {}, 'state_dict': torch.load(checkpoint)['state_dict']}, path)
    return path


@pytest.fixture(scope='module')
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp('img') / 'image.png'
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
    return path


def test_inference_model_and_inferencer(checkpoint, image):
    model = init_model(str(CONFIG), str(checkpoint), device='cpu')
    assert list(model.dataset_meta['classes'])[1] == 'disc'
    result = inference_model(model, str(image))
    assert result.pred_sem_seg.data.shape == (1, 70, 90)  # an odd size, back at input size
    inferencer = MMSegInferencer(model=str(CONFIG), weights=str(checkpoint), device='cpu')
    out = inferencer(str(image), return_datasamples=True)
    assert out.pred_sem_seg.data.shape == (1, 70, 90)


@pytest.mark.parametrize('dataset,with_meta', [(None, True), (None, False), ('ade20k', True),
                                               ('cityscapes', True), ('coco-stuff', True)])
def test_demo_writes_overlay_in_palette(tmp_path, checkpoint, checkpoint_without_classes, image, dataset,
                                        with_meta):
    out = tmp_path / 'overlay.png'
    weights = checkpoint if with_meta else checkpoint_without_classes
    cmd = [sys.executable, str(REPO / 'demo' / 'image_demo.py'), str(image), str(CONFIG), str(weights),
           '--out-file', str(out), '--opacity', '1.0']
    if dataset:
        cmd += ['--dataset', dataset]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    overlay = np.array(Image.open(out).convert('RGB'))
    assert overlay.shape == (70, 90, 3)
    if dataset is None:
        palette = PALETTE
    else:
        from mmseg.utils import get_palette
        palette = get_palette({'coco-stuff': 'coco_stuff164k'}.get(dataset, dataset))
    colours = {tuple(c) for c in overlay.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in palette[:5]}  # a 5-class model paints classes 0..4


@pytest.mark.parametrize('config,classes,first', [
    ('segman-t_4xb4-160k_ade20k-512x512.py', 150, 'wall'),
    ('segman-s_4xb2-160k_cityscapes-1024x1024.py', 19, 'road'),
    ('segman-b_4xb4-160k_coco-stuff164k-512x512.py', 171, 'person'),
])
def test_config_palettes_of_the_released_datasets(config, classes, first):
    import importlib.util

    from mmengine.registry import init_default_scope
    spec = importlib.util.spec_from_file_location('image_demo', REPO / 'demo' / 'image_demo.py')
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    init_default_scope('mmseg')
    meta = demo.config_dataset_meta(Config.fromfile(str(REPO / 'configs' / 'segman' / config)))
    assert len(meta['classes']) == classes == len(meta['palette']) and meta['classes'][0] == first
