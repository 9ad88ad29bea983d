"""``PointwiseConv2d`` built as mmcv's ``ConvModule`` builds its convolution."""
import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule

from mmseg_segman.models.layers import PointwiseConv2d


def test_conv_module_builds_it_and_it_computes_the_convolution():
    module = ConvModule(6, 4, 1, conv_cfg=dict(type=PointwiseConv2d), norm_cfg=dict(type='BN'))
    assert type(module.conv) is PointwiseConv2d and module.conv.bias is None
    x = torch.randn(2, 6, 5, 7).to(memory_format=torch.channels_last)
    torch.testing.assert_close(module.conv(x), F.conv2d(x, module.conv.weight))


@pytest.mark.parametrize('given', [dict(kernel_size=3), dict(stride=2), dict(padding=1),
                                   dict(dilation=2), dict(groups=2)])
def test_other_convolutions_are_refused_by_name(given):
    name = next(iter(given))
    with pytest.raises(ValueError, match=f'{name}'):
        PointwiseConv2d(4, 4, **given)
