import logging

import pytest
import torch
from mmengine.logging import MMLogger

from mmseg_segman.models import SegMANEncoder

DIMS = {'t': [32, 64, 144, 192], 's': [64, 144, 288, 512], 'b': [96, 160, 364, 560],
        'l': [96, 192, 432, 640]}
TINY = dict(embed_dims=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
            window_size=[5, 5, 3, 3], mlp_ratios=[2, 2, 2, 2], layerscales=[True] * 4)


@pytest.mark.parametrize('size', ['t', 's', 'b', 'l'])
def test_output_shapes_every_size(size):
    encoder = SegMANEncoder(arch=size).eval()
    with torch.no_grad():
        outs = encoder(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(DIMS[size], (4, 8, 16, 32))]


def stride_sizes(height, width):
    """Map sizes after each stage: every stride-2 conv (padding 1) rounds up."""
    sizes = []
    for i in range(5):
        height, width = (height + 1) // 2, (width + 1) // 2
        if i:
            sizes.append((height, width))
    return sizes


@pytest.mark.parametrize('height,width', [(33, 47), (20, 20), (7, 9), (128, 40)])
def test_any_input_size_trains(height, width):
    """Sizes not divisible by 32 and maps smaller than a stage's window."""
    encoder = SegMANEncoder(arch=TINY, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, height, width, requires_grad=True)
    outs = encoder(x)
    for out, dim, (h, w) in zip(outs, TINY['embed_dims'], stride_sizes(height, width)):
        assert out.shape == (2, dim, h, w)
    sum(o.sum() for o in outs).backward()
    assert torch.isfinite(x.grad).all()


def test_out_indices_and_batch_one():
    encoder = SegMANEncoder(arch=TINY, out_indices=(1, 3)).train()
    outs = encoder(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [16, 32]


def test_with_cp_gives_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = SegMANEncoder(arch=TINY)
    checkpointed = SegMANEncoder(arch=TINY, with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 40, 40)
    grads = []
    for model in (plain, checkpointed):
        model.eval()
        model.zero_grad()
        sum(o.square().sum() for o in model(x.clone().requires_grad_())).backward()
        grads.append(model.layers[0].blocks[0].token_mixer.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_drop_path_is_linear_over_all_blocks():
    encoder = SegMANEncoder(arch='t', drop_path_rate=0.3)
    rates = [getattr(b.drop_path, 'drop_prob', 0.0) for i in range(0, 7, 2)
             for b in encoder.layers[i].blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 10))


@pytest.mark.parametrize('bad,error,match', [
    (torch.randn(3, 32, 32), ValueError, r'\(B, C, H, W\)'),
    (torch.randn(1, 4, 32, 32), ValueError, '3 input channels, got 4'),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, 'floating-point'),
    (torch.full((1, 3, 32, 32), float('nan')), ValueError, 'NaN'),
])
def test_bad_input_is_named(bad, error, match):
    with pytest.raises(error, match=match):
        SegMANEncoder(arch=TINY)(bad)


def test_bad_arch_is_named():
    with pytest.raises(ValueError, match="unknown SegMAN arch 'xl'"):
        SegMANEncoder(arch='xl')
    with pytest.raises(ValueError, match=r"missing keys \['depths'\]"):
        SegMANEncoder(arch={k: v for k, v in TINY.items() if k != 'depths'})
    with pytest.raises(ValueError, match=r"unknown keys \['window'\]"):
        SegMANEncoder(arch={**TINY, 'window': [3] * 4})
    with pytest.raises(ValueError, match='window_dilation 1'):
        SegMANEncoder(arch={**TINY, 'window_dilation': [2] * 4})
    with pytest.raises(ValueError, match='out_indices'):
        SegMANEncoder(arch=TINY, out_indices=(4,))


def imagenet_checkpoint(encoder, path, ema=True):
    """A file in the layout of the released ImageNet encoders (timm train script)."""
    state = dict(encoder.state_dict())
    state['classifier.0.weight'] = torch.randn(1024, encoder.embed_dims[-1], 1, 1)
    state['classifier.4.weight'] = torch.randn(1000, 1024, 1, 1)
    ckpt = {'epoch': 300, 'arch': 'SegMANEncoder_t', 'state_dict': state}
    if ema:
        ckpt['state_dict_ema'] = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(ckpt, path)
    return ckpt


@pytest.mark.parametrize('ema', [True, False])
def test_init_cfg_loads_imagenet_encoder(tmp_path, ema):
    source = SegMANEncoder(arch=TINY)
    ckpt = imagenet_checkpoint(source, tmp_path / 'in1k.pth', ema=ema)
    encoder = SegMANEncoder(arch=TINY, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'in1k.pth')))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        encoder.init_weights()
    finally:
        logger.removeHandler(handler)
    log = '\n'.join(r.getMessage() for r in records)
    assert f"({'state_dict_ema' if ema else 'state_dict'}); ignored 2 classifier keys" in log, log
    expected = ckpt['state_dict_ema' if ema else 'state_dict']
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_loads_backbone_of_segmentor_checkpoint(tmp_path):
    source = SegMANEncoder(arch=TINY)
    state = {f'backbone.{k}': v for k, v in source.state_dict().items()}
    state['decode_head.conv_seg.weight'] = torch.zeros(3, 3, 1, 1)
    torch.save({'meta': {}, 'state_dict': state}, tmp_path / 'seg.pth')
    encoder = SegMANEncoder(arch=TINY)
    encoder.load_pretrained(str(tmp_path / 'seg.pth'))
    assert torch.equal(encoder.layers[0].blocks[0].cpe1.weight, source.layers[0].blocks[0].cpe1.weight)


def test_checkpoint_of_another_size_is_refused(tmp_path):
    imagenet_checkpoint(SegMANEncoder(arch='t'), tmp_path / 't.pth')
    encoder = SegMANEncoder(arch='s', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 't.pth')))
    with pytest.raises(ValueError, match='another SegMAN size'):
        encoder.init_weights()


def test_missing_checkpoint_is_named(tmp_path):
    encoder = SegMANEncoder(arch=TINY, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'nope.pth')))
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        encoder.init_weights()
