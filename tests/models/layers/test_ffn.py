"""``ConvFFN`` hands an exact GELU to ``fc1``'s op and runs any other activation as its layer."""
import pytest
import torch
from torch import nn

from mmseg_segman.models.layers import ConvFFN


@pytest.mark.parametrize('act_cfg,fused', [(dict(type='GELU'), 'gelu'),
                                           (dict(type='GELU', approximate='tanh'), None),
                                           (dict(type='ReLU'), None)])
def test_fused_activation_and_the_same_result(act_cfg, fused):
    torch.manual_seed(0)
    ffn = ConvFFN(4, 8, act_cfg)
    assert ffn.fused_activation == fused
    x = torch.randn(2, 4, 5, 6)
    hidden = ffn.dwconv(ffn.act(nn.functional.conv2d(x, ffn.fc1.weight, ffn.fc1.bias)))
    want = nn.functional.conv2d(hidden, ffn.fc2.weight, ffn.fc2.bias)
    torch.testing.assert_close(ffn(x), want)
