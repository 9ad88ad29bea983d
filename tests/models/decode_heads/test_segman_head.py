import pytest
import torch
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample
from torch import nn

from mmseg_segman.models import SegMANEncoder, SegMANHead
from mmseg_segman.models.layers import DenseConv2d, PointwiseConv2d
from mmseg_segman.models.variants import head_widths
from mmseg_segman.ops import cross_entropy_2d

TINY = dict(embed_dims=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
            window_size=[5, 5, 3, 3], mlp_ratios=[2, 2, 2, 2])


def tiny_head(**kwargs):
    return SegMANHead(in_channels=TINY['embed_dims'], channels=8, feat_proj_dim=12, num_classes=5,
                      **kwargs)


def features(batch, height, width):
    encoder = SegMANEncoder(arch=TINY).eval()
    with torch.no_grad():
        return encoder(torch.randn(batch, 3, height, width))


@pytest.mark.parametrize('height,width', [(64, 96), (100, 76), (40, 40), (24, 200)])
def test_logits_at_one_eighth_for_any_size(height, width):
    feats = features(2, height, width)
    logits = tiny_head().train()(feats)
    assert logits.shape == (2, 5, *feats[1].shape[-2:])
    assert torch.isfinite(logits).all()


def test_batch_one_trains_and_keeps_image_pool_statistics():
    head = tiny_head().train()
    norm = head.image_pool[1].bn
    before = norm.running_mean.clone(), norm.running_var.clone()
    other_norm = head.short_path.bn
    other_before = other_norm.running_mean.clone()
    logits = head(features(1, 64, 64))
    logits.sum().backward()
    assert norm.training, 'the image-pool BN must be back in training mode'
    assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])
    assert not torch.equal(other_norm.running_mean, other_before)
    assert head.image_pool[1].conv.weight.grad is not None


def test_mmseg_loss_and_predict_api():
    head = tiny_head(loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)).train()
    feats = features(2, 64, 64)
    samples = []
    for _ in range(2):
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, 64, 64)))
        sample.set_metainfo(dict(img_shape=(64, 64), pad_shape=(64, 64)))
        samples.append(sample)
    losses = head.loss(feats, samples, train_cfg={})
    assert set(losses) >= {'loss_ce', 'acc_seg'} and losses['loss_ce'].requires_grad
    head.eval()
    with torch.no_grad():
        seg = head.predict(feats, [s.metainfo for s in samples], test_cfg={})
    assert seg.shape == (2, 5, 64, 64)


LOSSES = {'plain': {}, 'avg_non_ignore': dict(avg_non_ignore=True),
          'class weights': dict(class_weight=[1.0, 2.0, 0.5, 1.0, 3.0]),
          'sum': dict(reduction='sum')}


@pytest.mark.parametrize('ignored', ['some', 'all'])
@pytest.mark.parametrize('losses', ['one', 'two of one name'])
@pytest.mark.parametrize('ignore_index', [255, 0])
@pytest.mark.parametrize('kind', list(LOSSES))
def test_loss_by_feat_as_mmseg(ignored, losses, ignore_index, kind):
    """SegMANHead's loss (its own resize, cross entropy and accuracy) against mmseg's
    BaseDecodeHead's: the same losses, accuracy and gradients, with ignored pixels, all
    pixels ignored, an ignored index that is also a class, two loss terms adding under one
    name, and each kind of CrossEntropyLoss (those it does not compute run themselves)."""
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead

    if kind == 'class weights' and ignore_index == 255:
        pytest.skip("mmseg 1.2.2's class-weighted mean indexes the weights by every label, "
                    'an ignored 255 too (an IndexError in mmseg itself)')
    ce = dict(type='CrossEntropyLoss', loss_weight=1.0, **LOSSES[kind])
    head = tiny_head(loss_decode=ce if losses == 'one' else [ce, dict(ce, loss_weight=0.5)],
                     ignore_index=ignore_index)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 8, 10, generator=g)
    samples = []
    for _ in range(2):
        label = torch.randint(0, 5, (1, 64, 80), generator=g)
        label[:, :10] = ignore_index
        if ignored == 'all':
            label[:] = ignore_index
        samples.append(SegDataSample(gt_sem_seg=PixelData(data=label)))
    runs = []
    for loss_by_feat in (SegMANHead.loss_by_feat, BaseDecodeHead.loss_by_feat):
        leaf = logits.clone().requires_grad_()
        result = loss_by_feat(head, leaf, samples)
        result['loss_ce'].backward()
        runs.append((result, leaf.grad))
    (got, got_grad), (want, want_grad) = runs
    assert set(got) == set(want) == {'loss_ce', 'acc_seg'}
    for key in want:
        assert got[key].shape == want[key].shape
        torch.testing.assert_close(got[key], want[key])
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize('kind,fused', [('plain', True), ('avg_non_ignore', True),
                                        ('class weights', False), ('sum', False)])
def test_which_losses_run_the_cross_entropy_op(kind, fused, monkeypatch):
    from mmseg_segman.models.decode_heads import segman_head

    calls = []

    def counted(*args):
        calls.append(args)
        return cross_entropy_2d(*args)

    monkeypatch.setattr(segman_head, 'cross_entropy_2d', counted)
    head = tiny_head(loss_decode=dict(type='CrossEntropyLoss', **LOSSES[kind]))
    label = torch.randint(0, 5, (1, 64, 80))
    head.loss_by_feat(torch.randn(1, 5, 8, 10), [SegDataSample(gt_sem_seg=PixelData(data=label))])
    assert len(calls) == fused


def test_needs_four_encoder_maps():
    with pytest.raises(ValueError, match='four encoder maps'):
        SegMANHead(in_channels=[8, 16, 24], in_index=[0, 1, 2], channels=8, feat_proj_dim=12,
                   num_classes=5)


@pytest.mark.parametrize('change,match', [
    (dict(in_channels=[8, 0, 24, 32]), r'in_channels must be positive integers, got \[8, 0, 24, 32\]'),
    (dict(feat_proj_dim=0), r'feat_proj_dim must be positive integers, got \[0\]'),
])
def test_bad_widths_are_named(change, match):
    kwargs = dict(in_channels=TINY['embed_dims'], channels=8, feat_proj_dim=12, num_classes=5)
    with pytest.raises(ValueError, match=match):
        SegMANHead(**{**kwargs, **change})


def test_head_of_another_encoder_is_refused_before_computing_anything():
    head = SegMANHead(**head_widths('t'), num_classes=5).eval()
    feats = [torch.zeros(1, c, 64 // s, 64 // s) for c, s in zip([64, 144, 288, 512], (4, 8, 16, 32))]
    with pytest.raises(ValueError, match=(
            r"in_channels=\[32, 64, 144, 192\] \(SegMAN-T's\) but the encoder gives maps of widths "
            r"\[64, 144, 288, 512\] \(SegMAN-S's\).*'channels': 144, 'feat_proj_dim': 288")):
        head(feats)
    with pytest.raises(ValueError, match=r"widths \[8, 16, 24, 32\]: set decode_head.in_channels"):
        head(features(1, 64, 64))


def test_every_convolution_runs_an_op():
    # no cuDNN execution plan per new input shape: the 1x1 convolutions run pointwise_conv2d,
    # the strided ones dense_conv2d
    head = tiny_head()
    ops = {name for name, module in head.named_modules() if isinstance(module, PointwiseConv2d)}
    assert {'linear_fuse.conv', 'short_path.conv', 'image_pool.1.conv', 'proj_out.conv',
            'cat.conv', 'conv_seg'} \
        | {f'reduce_channels.{i}.conv' for i in range(3)} <= ops
    dense = {name for name, module in head.named_modules() if isinstance(module, DenseConv2d)}
    assert dense == {'conv_downsample_2.conv', 'conv_downsample_4.conv'}
    assert not [name for name, module in head.named_modules()
                if type(module) is nn.Conv2d]  # cuDNN's plans at each new shape
    # the keys the released checkpoints hold
    assert {'conv_seg.weight', 'conv_seg.bias', 'cat.conv.weight'} <= set(head.state_dict())
    assert 'cat.conv.bias' not in head.state_dict()  # ConvModule's conv before a norm has none


def test_a_conv_cfg_of_the_config_is_kept():
    head = tiny_head(conv_cfg=dict(type='Conv2d'))
    assert type(head.short_path.conv) is nn.Conv2d


@pytest.mark.parametrize('height, width, padded', [(8, 12, False), (8, 10, True), (9, 12, True)])
def test_mmscope_pads_at_eager_inference_only_maps_not_a_multiple_of_4(monkeypatch, height,
                                                                         width, padded):
    # at eager inference a 1/8 map that is a multiple of 4 on both sides is not padded (the
    # traced forward pads at every size, with the same result; so does one under autograd)
    from mmseg_segman.models.decode_heads import segman_head
    head = tiny_head().eval()
    x = torch.randn(2, 8, height, width)
    pads = []
    pad = segman_head.F.pad

    def recording(*args, **kwargs):
        if tuple(args[1]) == (0, 4, 0, 4):  # MMSCopE's (the convolutions pad by 0)
            pads.append(args[1])
        return pad(*args, **kwargs)

    monkeypatch.setattr(segman_head.F, 'pad', recording)
    with torch.no_grad():
        eager = head._mmscope(x)
        assert len(pads) == padded
        monkeypatch.setattr(segman_head, 'traced', lambda: True)
        traced = head._mmscope(x)
    assert len(pads) == padded + 1 and eager.shape == (2, 3 * 8, height, width)
    assert eager.is_contiguous() or padded
    torch.testing.assert_close(eager, traced, rtol=0, atol=0)
    monkeypatch.setattr(segman_head, 'traced', lambda: False)
    head._mmscope(x)  # with autograd
    assert len(pads) == padded + 2
