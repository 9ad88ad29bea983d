"""``PointwiseConv2d`` and ``DenseConv2d`` built as mmcv's ``ConvModule`` builds its
convolution; ``ConvNormSequence`` hands a conv's eval batch norm and GELU to its op, and in
training the batch norm and the GELU to the batch norm's op, as ``BatchNormActConvModule``
does with a ``ConvModule``'s norm and activation."""
import copy

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from torch import nn

from mmseg_segman.models.layers import (BatchNormActConvModule, ConvNormSequence, DenseConv2d,
                                        PointwiseConv2d)
from mmseg_segman.ops import use_backends
from mmseg_segman.ops.batch_norm import _batch_norm_2d
from mmseg_segman.ops.dense_conv import _dense_conv2d
from mmseg_segman.ops.pointwise_conv import _pointwise_conv2d


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


def calls_of_the_op(module, x, *args):
    """``module(x)`` and ``(norm given, activation, memory_format)`` of each ``dense_conv2d``
    call."""
    calls = []
    reference = _dense_conv2d.backends['torch'].fn

    def recording(x, weight, bias, stride, padding, norm, activation, memory_format):
        calls.append((norm is not None, activation, memory_format))
        return reference(x, weight, bias, stride, padding, norm, activation, memory_format)

    with use_backends(dense_conv2d=recording):
        return module(x, *args), calls


def test_conv_norm_sequence_hands_eval_norms_and_gelus_to_the_op():
    """In eval mode, with the first convolution's result written channels-last for the second
    (the layout the fast path reads) and the last one's NCHW."""
    sequence, plain = stem_like()
    x = torch.randn(2, 3, 12, 10)
    sequence.eval()
    out, calls = calls_of_the_op(sequence, x)
    assert calls == [(True, 'gelu', torch.channels_last), (True, None, torch.contiguous_format)]
    assert out.is_contiguous()
    torch.testing.assert_close(out, plain(x))
    sequence.train()  # batch statistics: the norms run after the convolutions' op
    out, calls = calls_of_the_op(sequence, x)
    assert calls == [(False, None, None), (False, None, None)]
    assert out.is_contiguous()
    torch.testing.assert_close(out, plain(x))


def batch_norm_calls(module, x, *args):
    """``module(x, *args)`` and the ``activation`` of each ``batch_norm_2d`` call."""
    calls = []
    reference = _batch_norm_2d.backends['torch'].fn

    def recording(*inputs):
        calls.append(inputs[-1])
        return reference(*inputs)

    with use_backends(batch_norm_2d=recording):
        return module(x, *args), calls


def assert_trains_as(module, twin, x, *args):
    """Output, input and parameter gradients, running statistics and batch counts of
    ``module`` in training mode those of ``twin`` (its copy, run by PyTorch's modules)."""
    leaves = [x.clone().requires_grad_() for _ in range(2)]
    outputs = [m(leaf, *args) for m, leaf in zip((module, twin), leaves)]
    dy = torch.randn_like(outputs[0])
    for out in outputs:
        out.backward(dy)
    torch.testing.assert_close(*outputs)
    torch.testing.assert_close(leaves[0].grad, leaves[1].grad)
    for (name, a), b in zip(module.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), b in zip(module.named_buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_conv_norm_sequence_trains_its_norms_and_gelus_as_one_op():
    sequence, _ = stem_like()
    x = torch.randn(2, 3, 12, 10)
    _, calls = batch_norm_calls(sequence, x)
    assert calls == ['gelu', None]
    assert int(sequence[1].num_batches_tracked) == 1
    assert_trains_as(sequence, nn.Sequential(*copy.deepcopy(list(sequence))), x)
    assert int(sequence[1].num_batches_tracked) == 2


@pytest.mark.parametrize('act_cfg,activation', [
    (dict(type='ReLU'), 'relu'), (dict(type='GELU'), 'gelu'), (dict(type='SiLU'), 'silu'),
    (None, None)])
def test_conv_module_trains_its_norm_and_activation_as_one_op(act_cfg, activation):
    torch.manual_seed(0)
    module = BatchNormActConvModule(4, 6, 3, padding=1, conv_cfg=dict(type=DenseConv2d),
                                    norm_cfg=dict(type='BN', momentum=0.2), act_cfg=act_cfg)
    twin = ConvModule(4, 6, 3, padding=1, norm_cfg=dict(type='BN', momentum=0.2), act_cfg=act_cfg)
    assert list(module.state_dict()) == list(twin.state_dict())
    x = torch.randn(2, 4, 7, 5)
    assert batch_norm_calls(module, x)[1] == [activation]
    assert batch_norm_calls(module, x, False)[1] == [None]  # activate=False
    assert batch_norm_calls(module, x, True, False)[1] == []  # norm=False: no norm at all
    twin.load_state_dict(module.state_dict())
    assert_trains_as(module, twin, x)
    assert_trains_as(module, twin, x, False)


def pointwise_calls(module, x, *args):
    """``module(x, *args)`` and ``(norm given, activation)`` of each ``pointwise_conv2d``
    call."""
    calls = []
    reference = _pointwise_conv2d.backends['torch'].fn

    def recording(x, weight, bias, activation, residual, norm):
        calls.append((norm is not None, activation))
        return reference(x, weight, bias, activation, residual, norm)

    with use_backends(pointwise_conv2d=recording):
        return module(x, *args), calls


@pytest.mark.parametrize('act_cfg,call', [
    (dict(type='ReLU'), (True, 'relu')), (dict(type='GELU'), (True, 'gelu')), (None, (True, None)),
    (dict(type='SiLU'), (False, None))])  # no convolution op applies a SiLU: ConvModule's
def test_conv_module_in_eval_mode_hands_its_norm_and_activation_to_the_op(act_cfg, call):
    """A decode head's ConvModule at inference: one op call with the norm and the activation,
    the output of mmcv's ConvModule."""
    torch.manual_seed(0)
    for conv_cfg, calls_of in ((dict(type=PointwiseConv2d), pointwise_calls),
                               (dict(type=DenseConv2d), calls_of_the_op)):
        kernel = 1 if conv_cfg['type'] is PointwiseConv2d else 3
        module = BatchNormActConvModule(4, 6, kernel, padding=kernel // 2, conv_cfg=conv_cfg,
                                        norm_cfg=dict(type='BN'), act_cfg=act_cfg).eval()
        twin = ConvModule(4, 6, kernel, padding=kernel // 2, norm_cfg=dict(type='BN'),
                          act_cfg=act_cfg).eval()
        module.norm.running_mean.uniform_(-1, 1)
        module.norm.running_var.uniform_(0.5, 2)
        twin.load_state_dict(module.state_dict())
        x = torch.randn(2, 4, 7, 5)
        out, calls = calls_of(module, x)
        assert [c[:2] for c in calls] == [call], (conv_cfg, calls)
        torch.testing.assert_close(out, twin(x))
        out, calls = calls_of(module, x, False)  # activate=False: the norm alone
        assert [c[:2] for c in calls] == [(True, None)]
        torch.testing.assert_close(out, twin(x, False))
        out, calls = calls_of(module, x, True, False)  # norm=False: ConvModule's forward
        assert [c[:2] for c in calls] == [(False, None)]
        torch.testing.assert_close(out, twin(x, True, False))


@pytest.mark.parametrize('kwargs', [dict(act_cfg=dict(type='LeakyReLU')),
                                    dict(order=('norm', 'conv', 'act'))])
def test_conv_module_runs_other_layers_as_modules(kwargs):
    torch.manual_seed(0)
    module = BatchNormActConvModule(4, 4, 1, norm_cfg=dict(type='BN'), **kwargs)
    twin = ConvModule(4, 4, 1, norm_cfg=dict(type='BN'), **kwargs)
    x = torch.randn(2, 4, 3, 3)
    assert batch_norm_calls(module, x)[1] == []
    assert batch_norm_calls(module.eval(), x)[1] == []  # eval mode: the running statistics
    twin.load_state_dict(module.state_dict())
    assert_trains_as(module.train(), twin, x)


def test_conv_norm_sequence_keeps_other_activations_and_the_release_keys():
    sequence, plain = stem_like(gelu=nn.GELU(approximate='tanh'))
    x = torch.randn(1, 3, 9, 9)
    out, calls = calls_of_the_op(sequence.eval(), x)
    # the tanh GELU runs as its module
    assert calls == [(True, None, torch.channels_last), (True, None, torch.contiguous_format)]
    torch.testing.assert_close(out, plain(x))
    assert list(sequence.state_dict()) == list(plain.state_dict())
