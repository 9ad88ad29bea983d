"""Every shipped segmentation config builds its model through mmseg's registry."""
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS

import mmseg_segman  # noqa: F401
from mmseg_segman.models.variants import ENCODER_ARCHS, head_widths

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / 'configs' / 'segman').glob('segman-*.py'))
NUM_CLASSES = {'ade20k': 150, 'cityscapes': 19, 'coco-stuff164k': 171, 'toy': 5}


def load(path: Path) -> Config:
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.init_cfg = None  # released ImageNet weights are not part of the tests
    return cfg


def dataset_of(path: Path) -> str:
    """The dataset a config trains on: the last part of mmseg's config names
    (``segman-t-ade20k-pre_1xb8-300i_toy-96x96``: toy)."""
    return next(name for name in NUM_CLASSES if name in path.stem.rsplit('_', 1)[1])


def test_all_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    for size in 'tsbl':
        assert f'segman-{size}_4xb4-160k_ade20k-512x512.py' in names
        assert f'segman-{size}_4xb2-160k_cityscapes-1024x1024.py' in names
        assert f'segman-{size}_4xb4-160k_coco-stuff164k-512x512.py' in names


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path):
    cfg = load(path)
    assert cfg.custom_imports.imports == ['mmseg_segman']
    size = path.stem.split('_')[0].split('-')[1]
    dataset = dataset_of(path)
    init_default_scope('mmseg')
    model = MODELS.build(cfg.model)
    assert type(model).__name__ == 'SegMANEncoderDecoder'
    assert type(model.backbone).__name__ == 'SegMANEncoder'
    assert type(model.decode_head).__name__ == 'SegMANHead'
    assert model.backbone.embed_dims == ENCODER_ARCHS[size]['embed_dims']
    assert model.decode_head.num_classes == NUM_CLASSES[dataset]
    if size == 't':  # a forward through mmseg's data path for the small ones
        model.eval()
        with torch.no_grad():
            logits = model(torch.randn(1, 3, 64, 96), mode='tensor')
        assert logits.shape == (1, NUM_CLASSES[dataset], 8, 12)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_widths_are_the_variant_table(path):
    """Configs keep literal numbers (text configs cannot import the package); they must be
    the table's: the encoder size in the file name, the head of its dataset."""
    cfg = load(path)
    size = path.stem.split('_')[0].split('-')[1]
    dataset = dataset_of(path)
    assert cfg.model.backbone.arch == size
    head = cfg.model.decode_head
    expected = head_widths(size, 'ade20k' if dataset == 'toy' else dataset)  # toy: the base model's
    assert dict(in_channels=head.in_channels, channels=head.channels,
                feat_proj_dim=head.feat_proj_dim) == expected


def test_encoder_norms_are_synchronised_as_released():
    """SyncBN in the encoder too, by its norm_cfg (no global sync_bn switch needed)."""
    cfg = load(REPO / 'configs/segman/segman-t_4xb4-160k_ade20k-512x512.py')
    assert cfg.model.backbone.norm_cfg == dict(type='SyncBN', requires_grad=True)
    assert 'sync_bn' not in cfg.get('env_cfg', {})
    init_default_scope('mmseg')
    encoder = MODELS.build(cfg.model).backbone
    assert isinstance(encoder.patch_embed[1], torch.nn.SyncBatchNorm)
    assert isinstance(encoder.stages[0].blocks[0].token_mixer.dwconv[1], torch.nn.SyncBatchNorm)


def test_paper_recipe():
    cfg = load(REPO / 'configs/segman/segman-b_4xb4-160k_ade20k-512x512.py')
    assert cfg.optim_wrapper.optimizer.lr == 6e-5 and cfg.optim_wrapper.optimizer.weight_decay == 0.01
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys['head'].lr_mult == 10.0
    assert cfg.param_scheduler[0].end == 1500 and cfg.param_scheduler[1].end == 160000
    assert cfg.train_dataloader.batch_size == 4 and cfg.model.decode_head.norm_cfg.type == 'SyncBN'
    assert dict(type='ResizeToMultiple', size_divisor=32) in cfg.test_dataloader.dataset.pipeline
    raw = Config.fromfile(str(REPO / 'configs/segman/segman-b_4xb4-160k_coco-stuff164k-512x512.py'))
    assert raw.model.backbone.init_cfg.checkpoint == 'pretrained/SegMAN_Encoder_b.pth.tar'
    city = load(REPO / 'configs/segman/segman-s_4xb2-160k_cityscapes-1024x1024.py')
    assert city.model.test_cfg.mode == 'slide' and city.model.decode_head.channels == 152
    assert city.train_dataloader.batch_size == 2
    assert load(REPO / 'configs/segman/segman-l_4xb2-160k_cityscapes-1024x1024.py').model.test_cfg.mode == 'whole'


def test_optimizer_groups_follow_the_recipe():
    cfg = load(REPO / 'configs/segman/segman-t_4xb4-160k_ade20k-512x512.py')
    init_default_scope('mmseg')
    model = MODELS.build(cfg.model)
    params = dict(model.named_parameters())
    groups = build_optim_wrapper(model, cfg.optim_wrapper).param_groups

    def lr_and_decay(name):
        group = next(g for g in groups if any(p is params[name] for p in g['params']))
        return pytest.approx(group['lr']), group['weight_decay']

    assert lr_and_decay('decode_head.conv_seg.weight') == (6e-4, 0.01)
    assert lr_and_decay('backbone.patch_embed.0.weight') == (6e-5, 0.01)
    norms = [n for n in params if n.startswith('backbone.') and ('norm' in n or 'patch_embed.1.' in n)]
    assert norms and all(lr_and_decay(n) == (6e-5, 0.0) for n in norms)


def test_config_typo_is_named():
    cfg = load(REPO / 'configs/segman/segman-t_4xb4-160k_ade20k-512x512.py')
    cfg.model.backbone.arch = 'tiny'
    init_default_scope('mmseg')
    with pytest.raises(ValueError, match="unknown SegMAN arch 'tiny'"):
        MODELS.build(cfg.model)
    cfg.model.backbone.arch = 't'
    cfg.model.decode_head.feat_proj_dims = 192  # typo of feat_proj_dim
    with pytest.raises(TypeError, match='feat_proj_dims'):
        MODELS.build(cfg.model)


def test_head_of_another_size_is_refused_at_build():
    """The configs' SegMANEncoderDecoder checks the head against the encoder when built;
    mmseg's plain EncoderDecoder leaves it to the head's first forward."""
    cfg = load(REPO / 'configs/segman/segman-t_4xb4-160k_ade20k-512x512.py')
    cfg.model.backbone.arch = 's'  # the T head's in_channels stay
    init_default_scope('mmseg')
    message = (r"in_channels=\[32, 64, 144, 192\] \(SegMAN-T's\) but the encoder gives maps of "
               r"widths \[64, 144, 288, 512\] \(SegMAN-S's\)")
    with pytest.raises(ValueError, match=message):
        MODELS.build(cfg.model)
    cfg.model.type = 'EncoderDecoder'
    model = MODELS.build(cfg.model).eval()
    with pytest.raises(ValueError, match=message):
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64), mode='tensor')


def test_empty_image_through_mmseg_inference_is_named():
    from mmseg.apis import inference_model, init_model

    model = init_model(load(REPO / 'configs/segman/segman-t_1xb8-300i_toy-96x96.py'), None, device='cpu')
    with pytest.raises(ValueError, match=r'empty image batch \(1, 3, 0, 0\)'):
        inference_model(model, np.zeros((0, 0, 3), np.uint8))
