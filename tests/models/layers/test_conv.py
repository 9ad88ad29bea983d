"""``PointwiseConv2d`` and ``DenseConv2d`` built as mmcv's ``ConvModule`` builds its
convolution; ``ConvNormSequence`` hands a conv's eval batch norm and GELU to its op."""
import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from torch import nn

from mmseg_segman.models.layers import ConvNormSequence, DenseConv2d, PointwiseConv2d
from mmseg_segman.ops import use_backends
from mmseg_segman.ops.dense_conv import _dense_conv2d


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


def test_conv_module_builds_a_dense_one_and_it_computes_the_convolution():
    module = ConvModule(6, 4, 5, stride=4, padding=1, conv_cfg=dict(type=DenseConv2d),
                        norm_cfg=dict(type='BN'))
    assert type(module.conv) is DenseConv2d and module.conv.bias is None
    x = torch.randn(2, 6, 13, 11)
    torch.testing.assert_close(module.conv(x), F.conv2d(x, module.conv.weight, None, 4, 1))


@pytest.mark.parametrize('given', [dict(dilation=2), dict(groups=2), dict(padding_mode='reflect'),
                                   dict(padding='same')])
def test_dense_convolutions_the_op_does_not_run_are_refused_by_name(given):
    name = next(iter(given))
    with pytest.raises(ValueError, match=f'{name}'):
        DenseConv2d(4, 4, 3, **given)


def stem_like(gelu=nn.GELU()):
    torch.manual_seed(0)
    layers = [DenseConv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), gelu,
              DenseConv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)]
    sequence = ConvNormSequence(*layers)
    for norm in (layers[1], layers[4]):  # running statistics of a trained model
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.data.uniform_(0.5, 2)
        norm.bias.data.uniform_(-1, 1)
    return sequence, nn.Sequential(*layers)


def calls_of_the_op(module, x):
    """``module(x)`` and ``(norm given, activation)`` of each ``dense_conv2d`` call."""
    calls = []
    reference = _dense_conv2d.backends['torch'].fn

    def recording(x, weight, bias, stride, padding, norm, activation):
        calls.append((norm is not None, activation))
        return reference(x, weight, bias, stride, padding, norm, activation)

    with use_backends(dense_conv2d=recording):
        return module(x), calls


def test_conv_norm_sequence_hands_eval_norms_and_gelus_to_the_op():
    sequence, plain = stem_like()
    x = torch.randn(2, 3, 12, 10)
    sequence.eval()
    out, calls = calls_of_the_op(sequence, x)
    assert calls == [(True, 'gelu'), (True, None)]
    torch.testing.assert_close(out, plain(x))
    sequence.train()  # batch statistics: the norms run as modules
    out, calls = calls_of_the_op(sequence, x)
    assert calls == [(False, None), (False, None)]
    torch.testing.assert_close(out, plain(x))


def test_conv_norm_sequence_keeps_other_activations_and_the_release_keys():
    sequence, plain = stem_like(gelu=nn.GELU(approximate='tanh'))
    x = torch.randn(1, 3, 9, 9)
    out, calls = calls_of_the_op(sequence.eval(), x)
    assert calls == [(True, None), (True, None)]  # the tanh GELU runs as its module
    torch.testing.assert_close(out, plain(x))
    assert list(sequence.state_dict()) == list(plain.state_dict())
