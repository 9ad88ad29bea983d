"""``dense_conv2d``: its checks, the reference's norm and GELU, why the Triton backend declines,
and the Triton backend against ``F.conv2d`` (float64) in Triton's CPU interpreter (a
subprocess running this file, see triton_interpreter.py)."""
import pytest
import torch
import torch.nn.functional as F

from mmseg_segman.ops import dense_conv2d
from mmseg_segman.ops.dense_conv import _dense_conv2d
from mmseg_segman.ops.depthwise_conv import RunningBatchNorm


def make_inputs(batch, channels, out_channels, height, width, kernel, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, height, width, generator=g, dtype=dtype),
            torch.randn(out_channels, channels, kernel, kernel, generator=g, dtype=dtype)
            * (channels * kernel * kernel) ** -0.5,
            torch.randn(out_channels, generator=g, dtype=dtype))


def make_norm(channels, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    mean, weight, bias = (torch.randn(channels, generator=g, dtype=dtype) for _ in range(3))
    return RunningBatchNorm(mean, torch.rand(channels, generator=g, dtype=dtype) + 0.5, weight,
                            bias, 1e-5)


def test_reference_applies_the_norm_then_the_activation():
    x, w, b = make_inputs(2, 3, 5, 7, 6, 3)
    norm = make_norm(5)
    out = F.conv2d(x, w, b, 2, 1)
    want = F.gelu(F.batch_norm(out, norm.mean, norm.var, norm.weight, norm.bias, False, 0.0, 1e-5))
    torch.testing.assert_close(dense_conv2d(x, w, b, 2, 1, norm, 'gelu'), want)
    torch.testing.assert_close(dense_conv2d(x, w, b, 2, 1, norm, 'relu'), F.relu(F.batch_norm(
        out, norm.mean, norm.var, norm.weight, norm.bias, False, 0.0, 1e-5)))
    torch.testing.assert_close(dense_conv2d(x, w, None, (1, 2), (0, 1)),
                               F.conv2d(x, w, None, (1, 2), (0, 1)))


def test_why_the_triton_backend_declines(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    x, w, b = make_inputs(1, 3, 4, 5, 5, 3, torch.float32)
    args = (x, w, b, (1, 1), (1, 1), None, None, None)
    assert 'TRITON_INTERPRET' in _dense_conv2d.why_not('triton', *args)
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    assert _dense_conv2d.why_not('triton', *args) is None
    assert 'empty' in _dense_conv2d.why_not('triton', x[:0], *args[1:])
    assert 'autograd records' in _dense_conv2d.why_not('triton', x, w.requires_grad_(), *args[2:])
    with torch.no_grad():  # inference with parameters that need gradients: no record
        assert _dense_conv2d.why_not('triton', x, w, *args[2:]) is None
    norm = make_norm(4, torch.float32)._replace(weight=torch.ones(4, requires_grad=True))
    assert 'autograd records' in _dense_conv2d.why_not('triton', x, w.detach(), b, (1, 1), (1, 1),
                                                       norm, None, None)


@pytest.mark.parametrize('change,match', [
    (dict(x=torch.zeros(2, 3, 5)), r'x must be \(B, C, H, W\)'),
    (dict(weight=torch.zeros(4, 2, 3, 3)), r'weight \(O, C, kh, kw\)'),
    (dict(bias=torch.zeros(3)), r'bias must be \(4,\)'),
    (dict(stride=0), 'stride must be an int >= 1'),
    (dict(stride=(1, 2, 3)), 'stride must be an int >= 1 or two'),
    (dict(padding=-1), 'padding must be an int >= 0'),
    (dict(padding=True), 'padding must be an int'),
    (dict(weight=torch.zeros(4, 3, 9, 9)), r'a \(9, 9\) kernel with padding \(1, 1\) does not fit a \(6, 7\) map'),
    (dict(norm=make_norm(3)), r"statistics and parameters must be \(4,\)"),
    (dict(activation='silu'), 'activation must be one of'),
    (dict(memory_format=torch.preserve_format), 'memory_format must be one of'),
])
def test_bad_arguments_are_refused(change, match):
    args = dict(x=torch.zeros(2, 3, 6, 7), weight=torch.zeros(4, 3, 3, 3), bias=torch.zeros(4),
                stride=1, padding=1, norm=None, activation=None)
    with pytest.raises(ValueError, match=match):
        dense_conv2d(**{**args, **change})


@pytest.mark.parametrize('channels_last', [False, True])
def test_the_result_is_laid_out_as_asked(channels_last):
    """The reference's result in the layout asked for, else ``F.conv2d``'s (the input's)."""
    x, w, b = make_inputs(2, 3, 5, 7, 6, 3)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    want = F.conv2d(x, w, b, 2, 1)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = dense_conv2d(x, w, b, 2, 1, memory_format=layout)
        assert got.is_contiguous(memory_format=layout), (layout, got.stride())
        torch.testing.assert_close(got, want)
    assert dense_conv2d(x, w, b, 2, 1).stride() == want.stride()


def test_launch_shapes_pad_the_channels_little():
    pytest.importorskip('triton')
    from mmseg_segman.ops.triton_dense_conv import launch_config

    assert launch_config(48, 48)[1:3] == (64, 16)  # SegMAN-L's stem: one output tile, K 3 x 16
    assert launch_config(3, 16)[1:3] == (16, 16)  # the image's three channels, one step
    assert launch_config(96, 192)[1:3] == (64, 32)  # 192 = 3 x 64, 96 = 3 x 32
    assert launch_config(432, 640)[1:3] == (128, 64)  # 448 for 432 channels: 4% padding
    assert launch_config(224, 896, element_size=4)[1:3] == (128, 32)  # float32: K 32 at most


def test_triton_dense_conv_in_interpreter():
    pytest.importorskip('triton')
    from .triton_interpreter import assert_checks_pass_in_interpreter
    assert_checks_pass_in_interpreter(__file__, timeout=600)


# ---- run in Triton's interpreter (python tests/ops/test_dense_conv.py, TRITON_INTERPRET=1)

def relative_error(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def check(batch, channels, out_channels, height, width, kernel, stride, padding, dtype, tol,
          channels_last=False, bias=True, norm=False, activation=None, memory_format=None):
    """The Triton backend's output (dtype, layout: ``memory_format``, by default the input's;
    values) against the float64 reference."""
    x, w, b = make_inputs(batch, channels, out_channels, height, width, kernel, seed=height * width)
    running = make_norm(out_channels) if norm else None
    want = _dense_conv2d.backends['torch'].fn(x, w, b if bias else None, stride, padding, running,
                                              activation, None)
    x_in = x.to(dtype)
    if channels_last:
        x_in = x_in.to(memory_format=torch.channels_last)
    got = _dense_conv2d.backends['triton'].fn(
        x_in, w.float(), b.float() if bias else None, stride, padding,
        None if running is None else RunningBatchNorm(*(t.float() for t in running[:4]), 1e-5),
        activation, memory_format)
    label = (batch, channels, out_channels, height, width, kernel, stride, padding, dtype,
             channels_last, bias, norm, activation, memory_format)
    assert got.dtype == dtype and got.shape == want.shape, (label, got.dtype, got.shape)
    layout = memory_format or (torch.channels_last if channels_last else torch.contiguous_format)
    assert got.is_contiguous(memory_format=layout), (label, got.stride())
    error = relative_error(got, want)
    assert error < tol, f'relative error {error:.2e} over {tol} {label}'


def check_shapes_and_layouts():
    # float16 stands for the 16-bit maps: Triton's interpreter multiplies bfloat16 tiles wrongly
    # (bfloat16 runs on the GPU: tools/gpu_checks/check_dense_conv.py)
    f32, f16 = torch.float32, torch.float16
    check(2, 3, 16, 17, 13, 3, (2, 2), (1, 1), f32, 1e-5)  # the stem's first: three channels
    check(1, 20, 24, 9, 11, 3, (1, 1), (1, 1), f32, 1e-5, bias=False, norm=True, activation='gelu')
    check(2, 70, 40, 10, 12, 3, (2, 2), (1, 1), f16, 2e-2, norm=True)  # two channel steps
    check(1, 24, 136, 12, 12, 5, (4, 4), (1, 1), f16, 2e-2)  # two output-channel tiles
    # MMSCopE's strided ConvModules at inference: their norms and ReLUs
    check(2, 24, 40, 13, 11, 5, (4, 4), (1, 1), f32, 1e-5, bias=False, norm=True,
          activation='relu')
    check(2, 40, 24, 6, 7, 1, (1, 1), (0, 0), f32, 1e-5, channels_last=True)  # the fusion
    check(1, 16, 8, 5, 9, 3, (2, 2), (1, 1), f16, 2e-2, channels_last=True, activation='gelu')
    # the stem's: channels-last written for the next convolution, NCHW for the blocks
    check(2, 3, 16, 17, 13, 3, (2, 2), (1, 1), f32, 1e-5, memory_format=torch.channels_last)
    check(1, 16, 24, 9, 11, 3, (1, 1), (1, 1), f16, 2e-2, channels_last=True, norm=True,
          activation='gelu', memory_format=torch.contiguous_format)
    check(1, 8, 8, 4, 6, 3, (1, 2), (0, 1), f32, 1e-5)  # uneven stride and padding
    check(1, 8, 16, 32, 36, 3, (1, 1), (1, 1), f32, 1e-5)  # pixels over one tile, a multiple of 8
    print('shapes and layouts: ok')


def check_float32_products_follow_cudnn_tf32_switch():
    """The kernel's float32 products are TF32 where cuDNN's may be, float32-accurate else."""
    from mmseg_segman.ops.triton_jit import conv_dot_precision

    allowed = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert conv_dot_precision(torch.float32) == 'tf32'
        torch.backends.cudnn.allow_tf32 = False
        assert conv_dot_precision(torch.float32) == 'tf32x3'
        assert conv_dot_precision(torch.bfloat16) == 'tf32'
    finally:
        torch.backends.cudnn.allow_tf32 = allowed


def check_strided_input_and_autocast():
    """A map neither NCHW nor channels-last contiguous (MMSCopE's padded cut) is read after a
    copy; under autocast the map is computed and returned in autocast's dtype, as F.conv2d."""
    x, w, b = make_inputs(1, 8, 16, 10, 10, 3)
    cut = F.pad(x, (0, 3, 0, 3))[..., :12, :12].float()
    want = F.conv2d(F.pad(x, (0, 3, 0, 3))[..., :12, :12], w, b, 2, 1)
    got = dense_conv2d(cut, w.float(), b.float(), 2, 1)
    assert relative_error(got, want) < 1e-5
    with torch.autocast('cpu', dtype=torch.float16):
        got = dense_conv2d(cut, w.float(), b.float(), 2, 1)
    assert got.dtype == torch.float16 and relative_error(got, want) < 2e-2
    print('strided input and autocast: ok')


def check_no_backward():
    from mmseg_segman.ops.triton_dense_conv import dense_conv2d_triton

    x, w, b = make_inputs(1, 4, 4, 5, 5, 3, torch.float32)
    try:
        dense_conv2d_triton(x, w.requires_grad_(), b)
    except RuntimeError as error:
        assert 'no backward' in str(error), error
    else:
        raise AssertionError('the kernel ran where autograd records')
    out = dense_conv2d(x, w, b, 1, 1)  # automatic choice: the reference, with its gradient
    out.sum().backward()
    assert w.grad is not None


def check_custom_op():
    """The kernel as a custom op (opcheck: schema, fake shapes and layouts); torch.compile of
    the backend traces it, with the eager call's result."""
    from triton_interpreter import compile_recording_graphs

    from mmseg_segman.ops.triton_dense_conv import _dense_conv2d_op

    x, w, b = make_inputs(2, 5, 7, 6, 5, 3, torch.float32)
    norm = make_norm(7, torch.float32)
    torch.library.opcheck(_dense_conv2d_op, (x, w, b, [2, 1], [1, 0], *norm, 'gelu',
                                             torch.float32, False))
    torch.library.opcheck(_dense_conv2d_op, (x.to(memory_format=torch.channels_last), w, None,
                                             [1, 1], [1, 1], None, None, None, None, 0.0, None,
                                             torch.float32, True))
    torch.library.opcheck(_dense_conv2d_op, (x, w, None, [1, 1], [1, 1], *norm, 'relu',
                                             torch.float32, True))
    backend = _dense_conv2d.backends['triton'].fn
    eager = backend(x, w, b, (2, 2), (1, 1), norm, 'gelu', None)
    compiled, targets = compile_recording_graphs(
        lambda x: backend(x, w, b, (2, 2), (1, 1), norm, 'gelu', None))
    with torch.no_grad():
        got = compiled(x)
    assert 'mmseg_segman.dense_conv2d_forward.default' in targets['forward'], targets['forward']
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    print('custom op: ok')


if __name__ == '__main__':
    check_shapes_and_layouts()
    check_float32_products_follow_cudnn_tf32_switch()
    check_strided_input_and_autocast()
    check_no_backward()
    check_custom_op()
    print('all checks passed')
