import pytest
import torch
from mmseg.models import build_segmentor  # noqa: F401  (registers mmseg's modules)
from mmseg.registry import MODELS

from mmseg_segman.models import SegMANEncoderDecoder
from mmseg_segman.models.variants import head_widths

TINY = dict(embed_dims=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
            window_size=[5, 5, 3, 3], mlp_ratios=[2, 2, 2, 2])


def segmentor_cfg(type='SegMANEncoderDecoder', in_channels=TINY['embed_dims'], **changes):
    return dict(type=type, backbone=dict(type='SegMANEncoder', arch=TINY),
                decode_head=dict(type='SegMANHead', in_channels=in_channels, channels=8,
                                 feat_proj_dim=12, num_classes=5),
                test_cfg=dict(mode='whole'), **changes)


def test_registered_and_keys_are_encoder_decoders():
    model = MODELS.build(segmentor_cfg())
    assert type(model) is SegMANEncoderDecoder and MODELS.get('SegMANEncoderDecoder') is SegMANEncoderDecoder
    plain = MODELS.build(segmentor_cfg(type='EncoderDecoder'))
    assert list(model.state_dict()) == list(plain.state_dict())
    assert model(torch.randn(1, 3, 64, 64), mode='tensor').shape == (1, 5, 8, 8)


def test_head_that_does_not_fit_is_refused_at_build():
    with pytest.raises(ValueError, match=(
            r"SegMANHead was built with in_channels=\[32, 64, 144, 192\] \(SegMAN-T's\) but the "
            r"encoder gives maps of widths \[8, 16, 24, 32\]: set decode_head.in_channels")):
        MODELS.build(segmentor_cfg(in_channels=head_widths('t')['in_channels']))


def test_plain_encoder_decoder_refuses_at_first_forward():
    model = MODELS.build(segmentor_cfg(type='EncoderDecoder', in_channels=[8, 16, 24, 48])).eval()
    with pytest.raises(ValueError, match=r'in_channels=\[8, 16, 24, 48\] but the encoder gives maps '
                                         r'of widths \[8, 16, 24, 32\]'):
        model(torch.randn(1, 3, 64, 64), mode='tensor')


def test_head_picking_a_map_the_encoder_drops_is_refused_at_build():
    cfg = segmentor_cfg()
    cfg['backbone']['out_indices'] = (1, 2, 3)
    with pytest.raises(ValueError, match=r"in_index=\[0, 1, 2, 3\] picks maps the encoder does not "
                                         r"give: it gives 3 maps of widths \[16, 24, 32\]"):
        MODELS.build(cfg)


def test_neck_widths_are_left_to_the_heads_forward():
    """With a neck the head reads the neck's maps: no build-time refusal of a fitting head."""
    neck = dict(type='FPN', in_channels=TINY['embed_dims'], out_channels=16, num_outs=4)
    model = MODELS.build(segmentor_cfg(in_channels=[16] * 4, neck=neck)).eval()
    assert model(torch.randn(1, 3, 64, 64), mode='tensor').shape == (1, 5, 8, 8)
    unfit = MODELS.build(segmentor_cfg(neck=neck)).eval()
    with pytest.raises(ValueError, match=r'widths \[16, 16, 16, 16\]'):
        unfit(torch.randn(1, 3, 64, 64), mode='tensor')
