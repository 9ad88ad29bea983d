"""``pointwise_conv2d``: its checks, and the ``matmul`` backend against ``F.conv2d``."""
import pytest
import torch
import torch.nn.functional as F

from mmseg_segman.ops import pointwise_conv2d
from mmseg_segman.ops.pointwise_conv import _pointwise_conv2d

matmul = _pointwise_conv2d.backends['matmul'].fn


def make_inputs(batch=2, channels=5, out_channels=7, height=3, width=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, height, width, generator=g, dtype=torch.float64),
            torch.randn(out_channels, channels, 1, 1, generator=g, dtype=torch.float64),
            torch.randn(out_channels, generator=g, dtype=torch.float64))


def outputs_and_grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(torch.arange(out.numel(), dtype=out.dtype).view(out.shape).cos())
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize('layout', ['contiguous', 'channels_last'])
@pytest.mark.parametrize('bias', [True, False])
def test_matmul_backend_matches_conv2d(layout, bias):
    x, w, b = make_inputs()
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = [x, w, b] if bias else [x, w]
    got = outputs_and_grads(lambda *t: matmul(*t, *([] if bias else [None])), inputs)
    want = outputs_and_grads(lambda *t: F.conv2d(*t, *([] if bias else [None])), inputs)
    assert got[0].shape == (2, 7, 3, 4) and got[0].is_contiguous()
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_matmul_backend_under_autocast_computes_as_conv2d():
    x, w, b = (t.float() for t in make_inputs())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got, want = matmul(x, w, b), F.conv2d(x, w, b)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=5e-2)


def test_reference_on_cpu_and_why_matmul_declines():
    x, w, b = (t.float() for t in make_inputs())
    assert 'CUDA only' in _pointwise_conv2d.why_not('matmul', x, w, b)
    assert _pointwise_conv2d.select(x, w, b) == 'torch'
    torch.testing.assert_close(pointwise_conv2d(x, w, b), F.conv2d(x, w, b))


def test_bad_shapes_are_refused():
    x, w, b = make_inputs()
    with pytest.raises(ValueError, match=r'weight \(O, C, 1, 1\)'):
        pointwise_conv2d(x, w[:, :4])
    with pytest.raises(ValueError, match=r'weight \(O, C, 1, 1\)'):
        pointwise_conv2d(x, torch.randn(7, 5, 3, 3, dtype=x.dtype))
    with pytest.raises(ValueError, match=r'bias must be \(7,\)'):
        pointwise_conv2d(x, w, b[:3])
