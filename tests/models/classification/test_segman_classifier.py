"""SegMAN in mmpretrain: registry, the release's classifier head, the IN-1k configs, and a
short mmpretrain training on the toy set whose checkpoint feeds the segmentation encoder."""
import re
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from torch import nn

from tests.conftest import REPO, official_keys
from tests.toy_tools import run

mmpretrain = pytest.importorskip('mmpretrain')

from mmpretrain.registry import MODELS as PRETRAIN_MODELS  # noqa: E402
from mmpretrain.structures import DataSample  # noqa: E402
from mmseg.registry import MODELS as SEG_MODELS  # noqa: E402

from mmseg_segman.checkpoint_safety import load_checkpoint_file  # noqa: E402
from mmseg_segman.models import SegMANEncoder  # noqa: E402
from mmseg_segman.models.variants import ENCODER_ARCHS  # noqa: E402
from mmseg_segman.models.classification import SegMANClsHead  # noqa: E402

CONFIGS = REPO / 'configs' / 'segman_cls'
IN1K = {'t': 'segman-t_8xb512_in1k.py', 's': 'segman-s_8xb256_in1k.py',
        'b': 'segman-b_8xb256_in1k.py', 'l': 'segman-l_8xb256_in1k.py'}
TRAIN_TOOL = Path(mmpretrain.__file__).parent / '.mim' / 'tools' / 'train.py'


def release_classifier(in_channels: int, num_classes: int) -> nn.Sequential:
    """The classifier of the released ImageNet encoders, as described by its code."""
    return nn.Sequential(nn.Conv2d(in_channels, 1024, 1), nn.BatchNorm2d(1024), nn.SiLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Conv2d(1024, num_classes, 1))


def test_registered_in_mmpretrain_and_mmseg():
    assert PRETRAIN_MODELS.get('SegMANEncoder') is SegMANEncoder
    assert SEG_MODELS.get('SegMANEncoder') is SegMANEncoder
    assert PRETRAIN_MODELS.get('SegMANClsHead') is SegMANClsHead
    encoder = PRETRAIN_MODELS.build(dict(type='SegMANEncoder', arch='t', out_indices=(3, )))
    assert isinstance(encoder, SegMANEncoder) and encoder.out_indices == (3, )


def test_without_mmpretrain_the_import_says_what_is_missing():
    code, out = run('-c', "import sys; sys.modules['mmpretrain'] = None; "
                    'import mmseg_segman.models.classification', cwd=REPO)
    assert code != 0 and 'needs mmpretrain 1.x' in out, out[-2000:]


def test_head_shapes_loss_and_prediction():
    head = SegMANClsHead(num_classes=7, in_channels=32, hidden_channels=48, topk=(1, 3),
                         cal_acc=True)
    feats = (torch.randn(3, 16, 8, 8), torch.randn(3, 32, 5, 6))  # only the last one is used
    assert head.pre_logits(feats).shape == (3, 48)
    assert head(feats).shape == (3, 7)
    samples = [DataSample().set_gt_label(i) for i in (0, 4, 6)]
    losses = head.loss(feats, samples)
    assert losses['loss'].ndim == 0 and torch.isfinite(losses['loss'])
    assert set(losses) == {'loss', 'accuracy_top-1', 'accuracy_top-3'}
    predictions = head.predict(feats)
    assert [p.pred_score.shape for p in predictions] == [(7, )] * 3


def test_head_errors_name_the_problem():
    with pytest.raises(ValueError, match='num_classes=0'):
        SegMANClsHead(num_classes=0, in_channels=32)
    head = SegMANClsHead(num_classes=4, in_channels=32, hidden_channels=8)
    with pytest.raises(ValueError, match=r'last stage as \(B, 32, H, W\), got \(2, 16, 4, 4\)'):
        head((torch.randn(2, 16, 4, 4), ))
    with pytest.raises(ValueError, match='tuple of encoder stage outputs'):
        head(torch.randn(2, 32, 4, 4))


def test_head_computes_the_release_classifier():
    """The release's ``classifier.*`` weights, renamed to ``head.classifier.*``, give its logits."""
    torch.manual_seed(0)
    reference = release_classifier(24, 10)
    for module in reference.modules():  # non-trivial BN statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2)
            module.weight.data.normal_()
            module.bias.data.normal_()
    reference.eval()
    head = SegMANClsHead(num_classes=10, in_channels=24).eval()
    head.load_state_dict({f'classifier.{k}': v for k, v in reference.state_dict().items()})
    x = torch.randn(2, 24, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(head((x, )), reference(x).flatten(1))


def build_in1k_model(size: str):
    cfg = Config.fromfile(CONFIGS / IN1K[size])
    model_cfg = cfg.model
    model_cfg.pop('init_cfg', None)
    model_cfg.backbone.pop('init_cfg', None)
    model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    return cfg, PRETRAIN_MODELS.build(model_cfg)


@pytest.mark.parametrize('size', ['t', 's', 'b', 'l'])
def test_in1k_config_builds_with_release_keys(size):
    """Model keys = the released encoder's (``backbone.*``) + its classifier (``head.*``)."""
    cfg, model = build_in1k_model(size)
    assert cfg.model.backbone.arch == size and cfg.model.backbone.out_indices == (3, )
    assert cfg.custom_imports.imports == ['mmseg_segman.models.classification']
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    backbone = {k[len('backbone.'):]: s for k, s in shapes.items() if k.startswith('backbone.')}
    released = {k[len('backbone.'):]: s for k, s in official_keys(size).items()
                if k.startswith('backbone.')}
    assert backbone == released
    head = {k[len('head.'):]: s for k, s in shapes.items() if k.startswith('head.')}
    classifier = {f'classifier.{k}': tuple(v.shape)
                  for k, v in release_classifier(ENCODER_ARCHS[size]['embed_dims'][-1], 1000).state_dict().items()}
    assert head == classifier
    assert len(shapes) == len(backbone) + len(head)


def test_in1k_recipe_follows_the_release():
    cfg = Config.fromfile(CONFIGS / IN1K['t'])
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(4e-3)  # 1e-3 per 1024 images
    assert cfg.optim_wrapper.optimizer.weight_decay == 0.05
    assert cfg.optim_wrapper.clip_grad == dict(max_norm=5.0)
    assert cfg.train_cfg.max_epochs == 310  # timm: 300 cosine + 10 cool-down epochs
    assert [(s.type, s.get('begin', 0), s.end) for s in cfg.param_scheduler] == [
        ('LinearLR', 0, 5), ('CosineAnnealingLR', 5, 300)]
    assert cfg.custom_hooks[0].momentum == pytest.approx(1 - 0.99984)
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size
    drop_paths = {s: Config.fromfile(CONFIGS / f).model.backbone.drop_path_rate
                  for s, f in IN1K.items()}
    assert drop_paths == {'t': 0.0, 's': 0.15, 'b': 0.3, 'l': 0.4}


def test_no_decay_on_one_dimensional_parameters():
    """timm's rule in the release: biases and norms (all 1-D) without weight decay."""
    from mmengine.optim import build_optim_wrapper
    cfg, model = build_in1k_model('t')
    groups = build_optim_wrapper(model, cfg.optim_wrapper).optimizer.param_groups
    decay = {p.ndim > 1 for g in groups if g['weight_decay'] > 0 for p in g['params']}
    no_decay = {p.ndim > 1 for g in groups if g['weight_decay'] == 0 for p in g['params']}
    assert decay == {True} and no_decay == {False}


@pytest.fixture(scope='module')
def toy_data(tmp_path_factory):
    """8 train / 4 val toy images in CustomDataset folders, plus ImageNet-style
    ``meta/{train,val}.txt`` so that the IN-1k configs' ``ImageNet`` dataset reads them too."""
    data = tmp_path_factory.mktemp('toy_cls')
    code, out = run(REPO / 'tools' / 'make_toy_cls_dataset.py', data, '--train', '8', '--val',
                    '4', cwd=REPO)
    assert code == 0, out
    (data / 'meta').mkdir()
    for split in ('train', 'val'):
        classes = sorted(d.name for d in (data / split).iterdir())
        lines = [f'{c}/{f.name} {i}' for i, c in enumerate(classes)
                 for f in sorted((data / split / c).glob('*.png'))]
        (data / 'meta' / f'{split}.txt').write_text('\n'.join(lines) + '\n')
    return data


def train(config: str, data: Path, work_dir: Path, *options: str):
    """mmpretrain's tools/train.py on ``config`` with the dataloaders reading ``data``."""
    roots = [f'{split}_dataloader.dataset.data_root={data}' for split in ('train', 'val', 'test')]
    options = [*roots, 'train_dataloader.batch_size=4', 'val_dataloader.batch_size=4',
               'train_dataloader.num_workers=0', 'val_dataloader.num_workers=0', *options]
    return run(TRAIN_TOOL, CONFIGS / config, '--work-dir', work_dir, '--no-persistent-workers',
               '--cfg-options', *options, cwd=work_dir.parent)


def test_in1k_training_pipeline_runs(toy_data, tmp_path):
    """The full IN-1k recipe (RandAugment, random erasing, Mixup/CutMix, EMA, clipping,
    eval resize/crop) for one epoch of 2 iterations on toy images."""
    code, out = train(IN1K['t'], toy_data, tmp_path / 'work', 'train_cfg.max_epochs=1',
                      'default_hooks.logger.interval=1')
    assert code == 0, out[-3000:]
    assert re.search(r'Epoch\(train\) \[1\]\[1/2\]\s+base_lr: 4\.0000e-06', out), out[-3000:]
    assert re.search(r'Epoch\(val\) \[1\]\[1/1\]\s+accuracy/top1: [\d.]+\s+accuracy/top5', out)


def test_toy_training_checkpoint_loads_into_segmentation_encoder(toy_data, tmp_path):
    counts = {d.name: len(list(d.glob('*.png'))) for d in (toy_data / 'train').iterdir()}
    assert counts == {'disc': 2, 'square': 2, 'triangle': 2, 'bar': 2}
    work_dir = tmp_path / 'work'
    code, out = train('segman-t_1xb16_toy-64px.py', toy_data, work_dir, 'train_cfg.max_epochs=2',
                      'train_cfg.val_interval=2', 'default_hooks.checkpoint.interval=2')
    assert code == 0, out[-3000:]
    assert re.search(r'Epoch\(val\) \[2\]\[\d+/\d+\]\s+accuracy/top1: [\d.]+', out), out[-3000:]

    checkpoint = work_dir / 'epoch_2.pth'
    saved = load_checkpoint_file(checkpoint)  # weights-only, with mmengine's types admitted
    assert {k.split('.')[0] for k in saved['state_dict']} == {'backbone', 'head'}
    assert 'ema_state_dict' in saved  # `state_dict` holds the EMA weights, which we want
    encoder = SEG_MODELS.build(dict(type='SegMANEncoder', arch='t',
                                    init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint))))
    encoder.init_weights()
    loaded = encoder.state_dict()
    expected = {k[len('backbone.'):]: v for k, v in saved['state_dict'].items()
                if k.startswith('backbone.')}
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)
    assert len(encoder(torch.randn(1, 3, 64, 64))) == 4
